//! The README, followed as a newcomer would: clone the repository into a
//! scratch directory and run every command block in order.
//!
//! Each fenced block in README.md of language sh, c, python or rust is
//! preceded by a tag saying what to do with it:
//! `<!-- readme-test: run -->` (a shell block, run), `<!-- readme-test: file
//! NAME -->` (written to NAME in the clone, for a later block to use) or
//! `<!-- readme-test: skip REASON -->`. An untagged block fails the test.
//!
//! The run blocks form one bash script (`set -euo pipefail`), run as written
//! except that absolute paths outside the clone (/usr/local, /etc/coda,
//! /srv, /var/cache/coda, /var/log, /opt, /coda) move under the scratch
//! directory, port 2432 becomes a free one, and `ldconfig` (which cannot
//! know a scratch prefix) becomes LD_LIBRARY_PATH and PKG_CONFIG_PATH set
//! as the README says for another PREFIX. The clone's `target` is a
//! directory kept under this repository's target dir, so dependencies are
//! compiled once, not on every run.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{prereq, TempDir};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[derive(Debug)]
enum Block {
    Run(String),
    File(String, String),
}

/// The tagged blocks of a README, in order.
fn blocks(readme: &str) -> Vec<Block> {
    let mut out = vec![];
    let mut tag: Option<String> = None;
    let mut lines = readme.lines();
    while let Some(l) = lines.next() {
        if let Some(t) = l.trim().strip_prefix("<!-- readme-test:") {
            tag = Some(t.trim_end_matches("-->").trim().to_string());
            continue;
        }
        let Some(lang) = l.strip_prefix("```") else {
            if !l.trim().is_empty() {
                tag = None;
            }
            continue;
        };
        let mut body = String::new();
        for b in lines.by_ref() {
            if b.starts_with("```") {
                break;
            }
            body.push_str(b);
            body.push('\n');
        }
        if !["sh", "c", "python", "rust"].contains(&lang.trim()) {
            continue;
        }
        let t = tag
            .take()
            .unwrap_or_else(|| panic!("README block without a readme-test tag:\n{body}"));
        if t == "run" {
            assert_eq!(lang, "sh", "only sh blocks run: {body}");
            out.push(Block::Run(body));
        } else if let Some(name) = t.strip_prefix("file ") {
            out.push(Block::File(name.trim().to_string(), body));
        } else {
            assert!(
                t.starts_with("skip "),
                "unknown tag {t:?} (skip needs a reason)"
            );
        }
    }
    out
}

/// Move the README's absolute system paths under `root` and its port to
/// `port`.
fn relocate(text: &str, root: &Path, port: u16) -> String {
    let r = root.display().to_string();
    let mut s = text.replace(":2432", &format!(":{port}"));
    for p in [
        "/usr/local",
        "/etc/coda",
        "/var/cache/coda",
        "/var/log",
        "/srv",
        "/opt",
    ] {
        s = s.replace(p, &format!("{r}{p}"));
    }
    // The mountpoint /coda, but not the /coda inside the paths above nor
    // paths inside the file system (/web/index.html).
    let mut out = String::new();
    let mut rest = s.as_str();
    while let Some(i) = rest.find("/coda") {
        let before = rest[..i].chars().last();
        let after = rest[i + 5..].chars().next();
        let starts = matches!(before, None | Some(' ' | '=' | '"' | '\'' | '\n' | '>'));
        let ends = matches!(after, None | Some('/' | ' ' | '\n' | '"' | '\''));
        out.push_str(&rest[..i]);
        if starts && ends {
            out.push_str(&r);
        }
        out.push_str("/coda");
        rest = &rest[i + 5..];
    }
    out.push_str(rest);
    out.lines()
        .map(|l| {
            if l.trim_start().starts_with("ldconfig") {
                format!("true # {l} (LD_LIBRARY_PATH is set instead)")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// The scratch mount and the script's process group, gone even on failure.
struct Cleanup {
    mountpoint: PathBuf,
    pgid: Option<i32>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let mounted = std::fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .contains(&format!(" {} ", self.mountpoint.display()));
        if mounted {
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&self.mountpoint)
                .status();
        }
        if let Some(g) = self.pgid {
            // SAFETY: signalling the process group of the bash we started.
            unsafe { libc::kill(-g, libc::SIGKILL) };
        }
    }
}

#[test]
fn readme_commands_work_in_order_in_a_fresh_clone() {
    if !prereq::require_tool("git", "git", "git")
        || !prereq::require_cc()
        || !prereq::require_tool("cc", "pkg-config", "pkg-config")
        || !prereq::require_python()
        || !prereq::require_fuse()
    {
        return;
    }
    let d = TempDir::new("readme");
    let root = d.path().join("root");
    let clone = d.path().join("coda");
    let o = Command::new("git")
        .args(["clone", "-q", "--no-hardlinks"])
        .arg(repo())
        .arg(&clone)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "git clone: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo().join("target"))
        .join("readme-clone-target");
    std::fs::create_dir_all(&target).unwrap();
    std::os::unix::fs::symlink(&target, clone.join("target")).unwrap();

    let wheelhouse = target.parent().unwrap().join("wheelhouse");
    if !prereq::require(
        "python",
        wheelhouse.is_dir(),
        &format!(
            "the wheelhouse {} (setuptools, wheel)",
            wheelhouse.display()
        ),
        "Run `make deps` (or `make test`), which downloads it from PyPI once",
    ) {
        return;
    }
    let readme = std::fs::read_to_string(clone.join("README.md")).unwrap();
    let port = free_port();
    let mut script = String::from("set -euxo pipefail\n");
    let mut runs = 0;
    for b in blocks(&readme) {
        match b {
            Block::Run(body) => {
                runs += 1;
                script.push_str(&relocate(&body, &root, port));
            }
            Block::File(name, body) => {
                std::fs::write(clone.join(name), relocate(&body, &root, port)).unwrap();
            }
        }
    }
    assert!(runs >= 8, "README has its run blocks: {runs}");
    for dir in ["usr/local", "etc", "srv", "var/cache", "var/log", "opt"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::write(d.path().join("script.sh"), &script).unwrap();

    let prefix = root.join("usr/local");
    let path = format!(
        "{}:{}",
        prefix.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cleanup = Cleanup {
        mountpoint: root.join("coda"),
        pgid: None,
    };
    let log = d.path().join("script.log");
    let mut child = Command::new("bash")
        .arg(d.path().join("script.sh"))
        .current_dir(&clone)
        .env("PATH", path)
        .env("LD_LIBRARY_PATH", prefix.join("lib"))
        .env("PKG_CONFIG_PATH", prefix.join("lib/pkgconfig"))
        // pip builds from the wheelhouse `make deps` filled: no network here.
        .env("PIP_NO_INDEX", "1")
        .env("PIP_FIND_LINKS", &wheelhouse)
        .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
        .env_remove("CARGO_TARGET_DIR")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(d.path().join("script.err")).unwrap())
        .process_group(0)
        .spawn()
        .unwrap();
    cleanup.pgid = Some(child.id() as i32);
    // Bounded: a release build of the crate on a slow machine, then seconds.
    let deadline = Instant::now() + Duration::from_secs(1200);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = std::fs::read_to_string(&log).unwrap_or_default();
    let err = std::fs::read_to_string(d.path().join("script.err")).unwrap_or_default();
    let tail: String = {
        let lines: Vec<&str> = err.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    };
    assert!(
        status.is_some_and(|s| s.success()),
        "the README's commands failed ({status:?}); the script is {}:\nstdout:\n{out}\nstderr (last lines):\n{tail}",
        d.path().join("script.sh").display()
    );
    for want in [
        "mounted on ",
        "\ndisconnected\n<h1>hello</h1>\nreconnected\n",
        "state: connected",
        "<h1>hello</h1>",
        "failed over: ",
        "b'hi' [",
    ] {
        assert!(out.contains(want), "README output lacks {want:?}:\n{out}");
    }
    // ./app and ./app-local both printed the page.
    assert!(out.matches("<h1>hello</h1>").count() >= 5, "{out}");
    drop(cleanup);
}
