//! Prerequisites of the tests (a tool, a device, root): a missing one fails
//! the test with a message naming it and how to get it, unless the person
//! running the tests opted out of it by name in `CODA_SKIP`
//! (`CODA_SKIP=fuse,asan,valgrind,nginx,powercut,deb,root,python,cc,cbindgen,git`),
//! and then the test says it skipped. Never a silent pass.

use std::process::Command;

/// Whether `key` is listed in `skip` (the value of `CODA_SKIP`: names
/// separated by commas or spaces).
pub fn listed(skip: &str, key: &str) -> bool {
    skip.split([',', ' ']).any(|k| k.trim() == key)
}

/// The decision, without side effects: `Ok(true)` go on, `Ok(false)` skip
/// (opted out), `Err(message)` fail with that message.
pub fn decide(key: &str, present: bool, what: &str, how: &str, skip: &str) -> Result<bool, String> {
    if present {
        Ok(true)
    } else if listed(skip, key) {
        Ok(false)
    } else {
        Err(format!(
            "missing prerequisite: {what}. {how}. \
             (To skip the tests needing it instead: CODA_SKIP={key})"
        ))
    }
}

/// `present`: go on (true). Missing and opted out: print that the test
/// skipped and return false (the caller returns). Missing otherwise: fail,
/// naming `what` and `how` to get it.
pub fn require(key: &str, present: bool, what: &str, how: &str) -> bool {
    let skip = std::env::var("CODA_SKIP").unwrap_or_default();
    match decide(key, present, what, how, &skip) {
        Ok(true) => true,
        Ok(false) => {
            eprintln!("SKIPPED (CODA_SKIP={key}): {what} is missing");
            false
        }
        Err(msg) => panic!("{msg}"),
    }
}

/// Whether `tool` is on PATH.
pub fn have_tool(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// `require` for a program on PATH, installed from Debian package `pkg`.
pub fn require_tool(key: &str, tool: &str, pkg: &str) -> bool {
    require(
        key,
        have_tool(tool),
        &format!("the program `{tool}`"),
        &format!("Install it (Debian: apt-get install {pkg}; `make test` does it as root)"),
    )
}

/// The C compiler `cc` (every C test needs it).
pub fn require_cc() -> bool {
    require_tool("cc", "cc", "gcc")
}

/// python3 (the ctypes tests and the Python package).
pub fn require_python() -> bool {
    require_tool("python", "python3", "python3")
}

/// /dev/fuse for the mount tests.
pub fn require_fuse() -> bool {
    require(
        "fuse",
        std::path::Path::new("/dev/fuse").exists(),
        "/dev/fuse (the FUSE device)",
        "Load the module (modprobe fuse) or give a container the device \
         (docker run --device /dev/fuse --cap-add SYS_ADMIN); Debian: apt-get install fuse3",
    )
}

/// Running as root (installing a Debian package).
pub fn require_root(key: &str, why: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    require(
        key,
        root,
        &format!("root ({why})"),
        "Run the tests as root (CI does)",
    )
}
