//! What the power-cut tests share: checking their prerequisites, running a
//! command that must succeed, and a loop-mounted file system image that
//! is unmounted and detached on drop.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// `None` when every prerequisite is there; otherwise what is missing.
pub fn missing_prerequisites() -> Option<String> {
    let mut missing = Vec::new();
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (mount and losetup need it)".to_string());
    }
    for t in ["losetup", "mkfs.ext4", "mount", "umount", "e2fsck"] {
        if !have(t) {
            missing.push(t.to_string());
        }
    }
    if !Path::new("/dev/loop-control").exists() {
        missing.push("/dev/loop-control (loop devices)".to_string());
    }
    (!missing.is_empty()).then(|| missing.join(", "))
}

/// Whether the power-cut test `what` may run: true when every prerequisite
/// is there; false (saying so) when one is missing and `CODA_SKIP`
/// contains `powercut`; otherwise the test fails, naming what is missing.
pub fn may_run(what: &str) -> bool {
    let Some(m) = missing_prerequisites() else {
        return true;
    };
    if std::env::var("CODA_SKIP").is_ok_and(|s| s.contains("powercut")) {
        eprintln!("SKIPPED {what} (CODA_SKIP): missing {m}");
        return false;
    }
    panic!("{what} needs {m} (set CODA_SKIP=powercut to skip it)");
}

/// A fresh 64 MiB ext4 image at `image` (initialised whole, so nothing is
/// left for the kernel to write lazily behind the test's back).
pub fn make_image(image: &Path) {
    std::fs::File::create(image)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
        .arg(image));
}

/// A file system image attached to a loop device and mounted; unmounted and
/// detached on drop, even when the test fails.
pub struct LoopMount {
    dev: String,
    at: PathBuf,
    mounted: bool,
}

impl LoopMount {
    pub fn attach(image: &Path, at: &Path) -> LoopMount {
        let out = run(Command::new("losetup")
            .args(["--find", "--show"])
            .arg(image));
        let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        let mut m = LoopMount {
            dev,
            at: at.to_path_buf(),
            mounted: false,
        };
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .arg(&m.dev)
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // A crash image the kernel will not mount as is: repair, retry.
            let _ = Command::new("e2fsck").arg("-fy").arg(&m.dev).status();
            run(Command::new("mount").arg(&m.dev).arg(at));
        }
        m.mounted = true;
        m
    }

    pub fn detach(&mut self) {
        if self.mounted {
            let ok = Command::new("umount")
                .arg(&self.at)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&self.at).status();
            }
            self.mounted = false;
        }
        if !self.dev.is_empty() {
            let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
            self.dev.clear();
        }
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        self.detach();
    }
}
