//! Helpers for the mount tests: a `coda-mount` child process on a scratch
//! mountpoint, always unmounted on drop (SIGTERM, then `fusermount3 -u -z`
//! if it is still there), and the `coda` CLI.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::TestServer;

pub const MOUNT_BIN: &str = env!("CARGO_BIN_EXE_coda-mount");
pub const CLI_BIN: &str = env!("CARGO_BIN_EXE_coda");

/// FUSE needs /dev/fuse (and root, which CI has). Without it the test
/// fails naming it, unless `CODA_SKIP=fuse` (then it says it skipped).
pub fn fuse_available() -> bool {
    crate::common::prereq::require_fuse()
}

/// Whether `path` is a mountpoint right now (per /proc/self/mounts).
pub fn is_mounted(path: &Path) -> bool {
    let want = path.display().to_string();
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(want.as_str()))
}

pub struct Mount {
    child: Option<Child>,
    pub mountpoint: PathBuf,
    pub cache_dir: PathBuf,
    pub config: PathBuf,
}

/// The config file for a mount of `server` with its cache in `dir/cache`.
pub fn write_config(server: &TestServer, dir: &Path, extra: &[(&str, &str)]) -> PathBuf {
    let mut text = format!(
        "# written by the mount tests\nservers = {}\ncache_dir = {}\nsecret_file = {}\nrpc_timeout_ms = 5000\n",
        server.addr(),
        dir.join("cache").display(),
        server.secret_file().display()
    );
    for (k, v) in extra {
        text.push_str(&format!("{k} = {v}\n"));
    }
    let p = dir.join("coda.conf");
    std::fs::write(&p, text).unwrap();
    p
}

impl Mount {
    /// Mount `server` on `dir/mnt` (cache in `dir/cache`), waiting for the
    /// `mounted on` line.
    pub fn start(server: &TestServer, dir: &Path, extra: &[(&str, &str)], args: &[&str]) -> Mount {
        Mount::start_config(write_config(server, dir, extra), dir, args)
    }

    /// Mount with the config file `config` (its cache in `dir/cache`) on
    /// `dir/mnt`: for servers that are not one `TestServer` (a group).
    pub fn start_config(config: PathBuf, dir: &Path, args: &[&str]) -> Mount {
        let mountpoint = dir.join("mnt");
        std::fs::create_dir_all(&mountpoint).unwrap();
        let mut child = Command::new(MOUNT_BIN)
            .arg("--config")
            .arg(&config)
            .args(args)
            .arg(&mountpoint)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn coda-mount");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let m = Mount {
            child: Some(child),
            mountpoint: mountpoint.clone(),
            cache_dir: dir.join("cache"),
            config,
        };
        let line = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
        assert_eq!(
            line.trim(),
            format!("mounted on {}", mountpoint.display()),
            "coda-mount's first line"
        );
        assert!(is_mounted(&mountpoint));
        m
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("mount running").id() as i32
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mountpoint.join(rel.trim_start_matches('/'))
    }

    /// `coda failover` of this mount, as an operator runs it: a link
    /// `dir/web` to the mount point (`mnt`) is swapped to a new, empty
    /// `dir/local`. Asserts the command succeeded; returns (link, local).
    pub fn failover_to_local(&self, dir: &Path) -> (PathBuf, PathBuf) {
        let link = dir.join("web");
        std::os::unix::fs::symlink("mnt", &link).unwrap();
        let local = dir.join("local");
        std::fs::create_dir(&local).unwrap();
        let out = self.cli(&[
            "failover",
            "--link",
            link.to_str().unwrap(),
            "--target",
            local.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{out:?}");
        (link, local)
    }

    /// Run the CLI against this mount's cache.
    pub fn cli(&self, args: &[&str]) -> Output {
        cli(&self.cache_dir, args)
    }

    /// SIGTERM and wait (bounded) for the exit status.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.terminate();
        if is_mounted(&self.mountpoint) {
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&self.mountpoint)
                .status();
        }
    }
}

pub fn cli(cache_dir: &Path, args: &[&str]) -> Output {
    Command::new(CLI_BIN)
        .arg("--cache-dir")
        .arg(cache_dir)
        .args(args)
        .output()
        .expect("run coda")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Poll `f` until it returns true or `limit` passes.
pub fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
