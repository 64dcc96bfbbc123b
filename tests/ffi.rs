//! Builds and runs the C and Python tests of the C ABI (ffi-tests/) against
//! a real coda-server, plus the header and exported-symbol checks.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::{prereq, TempDir, TestServer};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Build `libcoda.so` (the cdylib) with the same profile the tests run under
/// and return its directory. Built once per test process.
fn lib_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "--lib", "--quiet"])
            .current_dir(repo())
            .status()
            .expect("run cargo build --lib");
        assert!(st.success(), "cargo build --lib failed");
        // tests run from target/debug/deps; the library sits in target/debug.
        let exe = std::env::current_exe().unwrap();
        let dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
        assert!(
            dir.join("libcoda.so").exists(),
            "no libcoda.so in {}",
            dir.display()
        );
        // Programs linked with -lcoda ask the loader for the SONAME.
        let soname = dir.join("libcoda.so.0");
        if std::fs::symlink_metadata(&soname).is_err() {
            let _ = std::os::unix::fs::symlink("libcoda.so", &soname);
        }
        dir
    })
}

fn cc(out: &Path, sources: &[PathBuf], extra: &[&str]) {
    let lib = lib_dir();
    need_cc();
    let mut cmd = Command::new("cc");
    cmd.args([
        "-std=c99",
        "-D_DEFAULT_SOURCE",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-g",
    ])
    .arg("-I")
    .arg(repo().join("include"))
    .arg("-I")
    .arg(repo().join("ffi-tests"))
    .args(extra)
    .args(sources)
    .arg("-o")
    .arg(out)
    .arg(format!("-L{}", lib.display()))
    .arg(format!("-Wl,-rpath,{}", lib.display()))
    .arg("-lcoda");
    let o = cmd.output().expect("run cc");
    assert!(
        o.status.success(),
        "compiling {:?} failed:\n{}",
        sources,
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Compile one C test and run it against a fresh server, optionally under a
/// wrapper (valgrind).
fn run_c_test(name: &str, wrapper: &[&str], cflags: &[&str]) {
    if !prereq::require_cc() {
        return;
    }
    let server = TestServer::start();
    let scratch = TempDir::new(name);
    let exe = scratch.path().join(name);
    cc(
        &exe,
        &[repo().join("ffi-tests").join(format!("{name}.c"))],
        cflags,
    );
    let work = scratch.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let mut cmd = if wrapper.is_empty() {
        Command::new(&exe)
    } else {
        let mut c = Command::new(wrapper[0]);
        c.args(&wrapper[1..]).arg(&exe);
        c
    };
    let o = cmd
        .env("CODA_TEST_SERVER", server.addr().to_string())
        .env("CODA_TEST_SECRET", server.secret_file())
        .env("CODA_TEST_FINGERPRINT", server.fingerprint_file())
        .env("CODA_TEST_DIR", &work)
        .env("CODA_TEST_SERVER_PID", server.pid().to_string())
        .output()
        .expect("run C test");
    print!("{}", String::from_utf8_lossy(&o.stdout));
    assert!(
        o.status.success(),
        "{name} failed ({}):\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn c_connect() {
    run_c_test("t_connect", &[], &[]);
}

#[test]
fn c_file_read_write_and_second_client() {
    run_c_test("t_file", &[], &[]);
}

#[test]
fn c_directory_operations() {
    run_c_test("t_dir", &[], &[]);
}

#[test]
fn c_errors_null_and_bad_utf8() {
    run_c_test("t_errors", &[], &[]);
}

#[test]
fn c_access_lists_and_whoami() {
    run_c_test("t_acl", &[], &[]);
}

#[test]
fn c_event_callback_runs_on_a_library_thread() {
    run_c_test("t_event_callback", &[], &["-pthread"]);
}

#[test]
fn c_failover_swaps_a_real_symlink() {
    run_c_test("t_failover", &[], &[]);
}

#[test]
fn c_conflicts_are_listed_and_resolved() {
    run_c_test("t_conflict", &[], &[]);
}

#[test]
fn c_automatic_failover_reports_server_down_and_failover_events() {
    run_c_test("t_auto_failover", &[], &[]);
}

/// `cc` must be there: a test that got past `require_cc` (or opted out of
/// nothing) and still has no compiler fails naming it.
fn need_cc() {
    assert!(
        prereq::have_tool("cc"),
        "missing prerequisite: the C compiler `cc` (Debian: apt-get install gcc)"
    );
}

/// Every C test again under valgrind: no invalid access, no leak of ours.
#[test]
fn c_tests_under_valgrind() {
    if !prereq::require_tool("valgrind", "valgrind", "valgrind") || !prereq::require_cc() {
        return;
    }
    for t in ["t_connect", "t_errors", "t_file"] {
        run_c_test(
            t,
            &[
                "valgrind",
                "--quiet",
                "--error-exitcode=99",
                // TLS record bytes made by ring's assembly (see the file).
                concat!(
                    "--suppressions=",
                    env!("CARGO_MANIFEST_DIR"),
                    "/ffi-tests/valgrind.supp"
                ),
                "--leak-check=full",
                "--errors-for-leak-kinds=definite",
                "--show-leak-kinds=definite",
            ],
            &[],
        );
    }
}

/// The C tests built with AddressSanitizer and UndefinedBehaviorSanitizer,
/// where the toolchain has them.
#[test]
fn c_tests_under_asan_and_ubsan() {
    let flags = [
        "-fsanitize=address,undefined",
        "-fno-omit-frame-pointer",
        "-fno-sanitize-recover=all",
    ];
    if !prereq::require_cc() {
        return;
    }
    // Probe: a toolchain without the runtimes cannot link this.
    let scratch = TempDir::new("asan-probe");
    let src = scratch.path().join("p.c");
    std::fs::write(&src, "int main(void) { return 0; }\n").unwrap();
    let probe = Command::new("cc")
        .args(flags)
        .arg(&src)
        .arg("-o")
        .arg(scratch.path().join("p"))
        .status();
    if !prereq::require(
        "asan",
        probe.map(|s| s.success()).unwrap_or(false),
        "the address/undefined sanitizer runtimes of `cc`",
        "Install them (Debian 12: apt-get install gcc, which brings libasan8 and libubsan1)",
    ) {
        return;
    }
    for t in ["t_errors", "t_file", "t_dir", "t_failover", "t_conflict"] {
        run_c_test(t, &[], &flags);
    }
}

/// The header alone compiles as C99 and as C++ with warnings as errors.
#[test]
fn header_compiles_alone_as_c_and_cpp() {
    if !prereq::require_cc() || !prereq::require_tool("cc", "c++", "g++") {
        return;
    }
    let scratch = TempDir::new("header");
    let src = scratch.path().join("h.c");
    std::fs::write(&src, "#include \"coda.h\"\nint main(void) { return 0; }\n").unwrap();
    for (compiler, std) in [("cc", "-std=c99"), ("c++", "-std=c++11")] {
        let o = Command::new(compiler)
            .args([
                std,
                "-Wall",
                "-Wextra",
                "-Werror",
                "-pedantic",
                "-fsyntax-only",
            ])
            .args(if compiler == "c++" {
                vec!["-x", "c++"]
            } else {
                vec![]
            })
            .arg("-I")
            .arg(repo().join("include"))
            .arg(&src)
            .output()
            .expect("run compiler");
        assert!(
            o.status.success(),
            "{compiler} {std}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// The committed header is exactly what the pinned cbindgen generates.
#[test]
fn header_matches_cbindgen() {
    if !prereq::require(
        "cbindgen",
        prereq::have_tool("cbindgen"),
        "the program `cbindgen`",
        "Install the pinned version: cargo install --locked cbindgen@0.29.4 (`make test` does)",
    ) {
        return;
    }
    let o = Command::new("cbindgen")
        .args(["--quiet", "--verify", "--output", "include/coda.h"])
        .current_dir(repo())
        .output()
        .expect("run cbindgen");
    assert!(
        o.status.success(),
        "include/coda.h is stale: run `cbindgen --output include/coda.h`\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `libcoda.so` exports exactly the symbols listed in ffi-tests/symbols.txt.
#[test]
fn exported_symbols_match_the_list() {
    let lib = lib_dir().join("libcoda.so");
    let o = Command::new("nm")
        .args(["-D", "--defined-only", "--format=posix"])
        .arg(&lib)
        .output()
        .expect("run nm");
    assert!(o.status.success());
    let mut got: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    got.sort();
    let want_text = std::fs::read_to_string(repo().join("ffi-tests/symbols.txt")).unwrap();
    let want: Vec<String> = want_text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    assert_eq!(
        got, want,
        "exported symbols differ from ffi-tests/symbols.txt"
    );
    let so = Command::new("sh")
        .arg("-c")
        .arg(format!("readelf -d {} | grep SONAME", lib.display()))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&so.stdout).contains("libcoda.so.0"));
}

/// The Python ctypes module's unittest suite.
#[test]
fn python_ctypes_module() {
    if !prereq::require_python() {
        return;
    }
    let server = TestServer::start();
    let scratch = TempDir::new("python");
    let o = Command::new("python3")
        .args(["-m", "unittest", "discover", "-v", "-s"])
        .arg(repo().join("ffi-tests/python"))
        .env("CODA_LIB", lib_dir().join("libcoda.so"))
        .env("PYTHONPATH", repo().join("python"))
        .env("CODA_TEST_SERVER", server.addr().to_string())
        .env("CODA_TEST_SECRET", server.secret_file())
        .env("CODA_TEST_FINGERPRINT", server.fingerprint_file())
        .env("CODA_TEST_DIR", scratch.path())
        .output()
        .expect("run python3");
    let err = String::from_utf8_lossy(&o.stderr);
    print!("{err}");
    assert!(o.status.success(), "python tests failed:\n{err}");
}
