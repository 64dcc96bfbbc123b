//! The examples a user copies from are built and run here, so none rots:
//! the C examples through the documented install path (make install +
//! pkg-config), the Python demo, and the Rust demo.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

use common::{TempDir, TestServer};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn ok(o: Output, what: &str) -> String {
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "{what} failed ({}):\n{out}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// `make install` into a prefix, then build the C examples exactly as the
/// README says (`cc app.c $(pkg-config --cflags --libs coda)`) and run them.
#[test]
fn c_examples_build_with_pkg_config_and_run() {
    if !common::prereq::require_cc()
        || !common::prereq::require_tool("cc", "pkg-config", "pkg-config")
    {
        return;
    }
    let server = TestServer::start();
    let scratch = TempDir::new("examples-c");
    let prefix = scratch.path().join("prefix");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    ok(
        Command::new("make")
            .args(["-s", "install", "PROFILE=debug"])
            .arg(format!("PREFIX={}", prefix.display()))
            .arg(format!("CARGO={cargo}"))
            .current_dir(repo())
            .output()
            .expect("run make install"),
        "make install",
    );
    let pc_path = prefix.join("lib/pkgconfig");
    for name in ["readwrite", "failover"] {
        let exe = scratch.path().join(name);
        let src = repo().join(format!("examples/c/{name}.c"));
        ok(
            Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "cc -std=c99 -D_DEFAULT_SOURCE -Wall -Wextra -Werror {} -o {} $(pkg-config --cflags --libs coda)",
                    src.display(),
                    exe.display()
                ))
                .env("PKG_CONFIG_PATH", &pc_path)
                .output()
                .unwrap(),
            &format!("building examples/c/{name}.c"),
        );
    }
    let lib = prefix.join("lib");
    let out = ok(
        Command::new(scratch.path().join("readwrite"))
            .arg(server.addr().to_string())
            .arg(server.secret_file())
            .arg(scratch.path().join("cache-rw"))
            .env("LD_LIBRARY_PATH", &lib)
            .output()
            .unwrap(),
        "readwrite example",
    );
    assert!(
        out.contains("read 19 bytes from /hello.txt: hello through coda"),
        "{out}"
    );
    assert!(out.contains("  hello.txt"), "{out}");

    let link = scratch.path().join("web");
    std::os::unix::fs::symlink("remote", &link).unwrap();
    let out = ok(
        Command::new(scratch.path().join("failover"))
            .arg(&link)
            .arg("local")
            .arg("remote")
            .arg(server.addr().to_string())
            .arg(server.secret_file())
            .arg(scratch.path().join("cache-fo"))
            .env("LD_LIBRARY_PATH", &lib)
            .output()
            .unwrap(),
        "failover example",
    );
    assert!(
        out.contains("remote stat after failover: input/output error"),
        "{out}"
    );
    assert!(out.contains("remote stat after failback: success"), "{out}");
    assert_eq!(std::fs::read_link(&link).unwrap(), PathBuf::from("remote"));
}

#[test]
fn python_demo_runs() {
    if !common::prereq::require_python() {
        return;
    }
    let server = TestServer::start();
    let scratch = TempDir::new("examples-py");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    ok(
        Command::new(cargo)
            .args(["build", "--lib", "--quiet"])
            .current_dir(repo())
            .output()
            .unwrap(),
        "cargo build --lib",
    );
    let lib = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("libcoda.so");
    let out = ok(
        Command::new("python3")
            .arg(repo().join("examples/python/demo.py"))
            .arg(server.addr().to_string())
            .arg(server.secret_file())
            .arg(scratch.path().join("cache"))
            .env("CODA_LIB", lib)
            .env("PYTHONPATH", repo().join("python"))
            .output()
            .unwrap(),
        "python demo",
    );
    assert!(out.contains("read back: hello from python"), "{out}");
    assert!(
        out.contains("listing of /pydemo: ['greeting.txt']"),
        "{out}"
    );
    assert!(out.contains("stat of a missing file: 2"), "{out}");
}

/// The README's first command, exactly: `cargo run --example demo`.
#[test]
fn rust_demo_runs() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let o = Command::new(cargo)
        .args(["run", "--quiet", "--example", "demo"])
        .current_dir(repo())
        .output()
        .expect("run cargo run --example demo");
    // Only the demo's own story: the server's log lines are hidden.
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!err.contains("coda-server:"), "server log on stderr: {err}");
    let out = ok(o, "cargo run --example demo");
    assert!(
        out.contains("B read \"version 1\" (fetches so far: 1)"),
        "{out}"
    );
    assert!(
        out.contains("again from its cache (fetches so far: 1)"),
        "{out}"
    );
    assert!(out.contains("breaks B received: 1"), "{out}");
    assert!(
        out.contains("B read \"version 2\" (fetches so far: 2)"),
        "{out}"
    );
    assert!(out.contains("(errno 2)"), "{out}");
}
