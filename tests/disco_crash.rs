//! The end-to-end crash test of disconnected operation: with the server
//! stopped, a client process makes 1,000 mixed changes and is killed with
//! SIGKILL twice along the way (each time restarted on the same cache, still
//! without a server); then the server comes back, the client is killed once
//! more while it reintegrates, and a last run finishes. The server must hold
//! exactly the tree the changes describe: nothing lost, nothing applied
//! twice, no conflicts.
//!
//! The client runs in a child process: this test binary again, with
//! `CODA_DISCO_CHILD` set, running the `child_writer` test.

mod client_util;
mod common;
mod disco_util;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use client_util::*;
use coda::client::{Client, FileType};
use common::{TempDir, TestServer};

const DIRS: u64 = 5;
const FILES: u64 = 12;
const SUBDIRS: u64 = 3;
const SETUP: u64 = 60;
const OFFLINE: u64 = 1000;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Dir,
    File(Vec<u8>, u32),
}

/// Change number `k`: what it does is a function of `k` alone, and running
/// it again after it was done changes nothing (so a run that was killed can
/// redo the change it may have been in the middle of).
#[derive(Debug)]
enum Op {
    Write(String, Vec<u8>),
    Unlink(String),
    Rename(String, String),
    Chmod(String, u32),
    Truncate(String, u64),
    Mkdir(String),
    Rmdir(String),
}

fn op(k: u64) -> Op {
    let mut x = k
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = |n: u64| {
        x ^= x >> 29;
        x = x.wrapping_mul(0xbf58476d1ce4e5b9);
        x ^= x >> 32;
        x % n
    };
    let file = |d: u64, f: u64| format!("/d{d}/f{f}");
    let (d, f) = (next(DIRS), next(FILES));
    match next(10) {
        0..=3 => Op::Write(
            file(d, f),
            format!("change {k} of {}", file(d, f)).into_bytes(),
        ),
        4 => Op::Unlink(file(d, f)),
        5 => Op::Rename(file(d, f), file(next(DIRS), next(FILES))),
        6 => Op::Chmod(file(d, f), 0o600 | (next(8) as u32) << 3),
        7 => Op::Truncate(file(d, f), next(6)),
        8 => Op::Mkdir(format!("/d{d}/s{}", next(SUBDIRS))),
        _ => Op::Rmdir(format!("/d{d}/s{}", next(SUBDIRS))),
    }
}

/// What the tree must be after changes `0..n` (plus the directories).
fn model(n: u64) -> BTreeMap<String, Node> {
    let mut t = BTreeMap::new();
    for d in 0..DIRS {
        t.insert(format!("/d{d}"), Node::Dir);
    }
    for k in 0..n {
        match op(k) {
            Op::Write(p, data) => {
                let mode = match t.get(&p) {
                    Some(Node::File(_, m)) => *m,
                    _ => 0o644,
                };
                t.insert(p, Node::File(data, mode));
            }
            Op::Unlink(p) => {
                t.remove(&p);
            }
            Op::Rename(a, b) => {
                if a != b && matches!(t.get(&a), Some(Node::File(..))) {
                    let n = t.remove(&a).unwrap();
                    t.insert(b, n);
                }
            }
            Op::Chmod(p, m) => {
                if let Some(Node::File(_, mode)) = t.get_mut(&p) {
                    *mode = m;
                }
            }
            Op::Truncate(p, n) => {
                if let Some(Node::File(data, _)) = t.get_mut(&p) {
                    data.resize(n as usize, 0);
                }
            }
            Op::Mkdir(p) => {
                t.entry(p).or_insert(Node::Dir);
            }
            Op::Rmdir(p) => {
                t.remove(&p);
            }
        }
    }
    t
}

fn exists(c: &Client, p: &str) -> Option<FileType> {
    match c.lstat(p) {
        Ok(s) => Some(if s.mode & libc::S_IFMT == libc::S_IFDIR {
            FileType::Dir
        } else {
            FileType::File
        }),
        Err(coda::Error::NotFound(_)) => None,
        Err(e) => panic!("stat {p}: {e}"),
    }
}

fn apply(c: &Client, k: u64) {
    match op(k) {
        Op::Write(p, data) => put(c, &p, &data),
        Op::Unlink(p) => {
            if exists(c, &p).is_some() {
                c.unlink(&p).unwrap();
            }
        }
        Op::Rename(a, b) => {
            if a != b && exists(c, &a) == Some(FileType::File) {
                c.rename(&a, &b).unwrap();
            }
        }
        Op::Chmod(p, m) => {
            if exists(c, &p).is_some() {
                c.chmod(&p, m).unwrap();
            }
        }
        Op::Truncate(p, n) => {
            if exists(c, &p).is_some() {
                c.truncate(&p, n).unwrap();
            }
        }
        Op::Mkdir(p) => {
            if exists(c, &p).is_none() {
                c.mkdir(&p, 0o755).unwrap();
            }
        }
        Op::Rmdir(p) => {
            if exists(c, &p).is_some() {
                c.rmdir(&p).unwrap();
            }
        }
    }
}

/// The child process: apply changes FROM..TO, printing each as done; with
/// CODA_CLEAN, wait until everything is reintegrated and report conflicts.
#[test]
fn child_writer() {
    if std::env::var("CODA_DISCO_CHILD").is_err() {
        return; // only meaningful as the child of the test below
    }
    let from: u64 = std::env::var("CODA_FROM").unwrap().parse().unwrap();
    let to: u64 = std::env::var("CODA_TO").unwrap().parse().unwrap();
    let c = Client::new(disco_util::child_config()).expect("client starts");
    if from == 0 {
        for d in 0..DIRS {
            if exists(&c, &format!("/d{d}")).is_none() {
                c.mkdir(&format!("/d{d}"), 0o755).unwrap();
            }
        }
    }
    println!("state {:?}", c.state());
    for k in from..to {
        apply(&c, k);
        println!("op {k}");
    }
    if std::env::var("CODA_CLEAN").is_ok() {
        disco_util::wait_reintegrated(&c);
        let cs = c.conflicts().unwrap();
        for x in cs.iter().take(8) {
            eprintln!("CONFLICT {x:?}");
        }
        println!("conflicts {}", cs.len());
    }
    println!("finished");
}

struct Run {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

fn spawn(srv: &TestServer, cache: &std::path::Path, from: u64, to: u64, clean: bool) -> Run {
    spawn_with(srv, cache, from, to, clean, &[])
}

/// As `spawn`, with more environment for the child.
fn spawn_with(
    srv: &TestServer,
    cache: &std::path::Path,
    from: u64,
    to: u64,
    clean: bool,
    env: &[(&str, &str)],
) -> Run {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "child_writer", "--nocapture", "--test-threads=1"])
        .env("CODA_DISCO_CHILD", "1")
        .env("CODA_SERVER", srv.addr().to_string())
        .env("CODA_CACHE", cache)
        .env("CODA_SECRET", srv.secret_file())
        .env("CODA_FROM", from.to_string())
        .env("CODA_TO", to.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if clean {
        cmd.env("CODA_CLEAN", "1");
    }
    cmd.envs(env.iter().copied());
    let mut child = cmd.spawn().expect("spawn the writer");
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    Run { child, lines }
}

impl Run {
    /// Read until the line `until` (or the end); returns the last change
    /// reported done and every line read.
    fn read(&mut self, until: impl Fn(&str) -> bool) -> (Option<u64>, Vec<String>) {
        let mut last = None;
        let mut all = Vec::new();
        for l in self.lines.by_ref() {
            let l = l.unwrap();
            if let Some(n) = l.strip_prefix("op ") {
                last = Some(n.parse().unwrap());
            }
            let stop = until(&l);
            all.push(l);
            if stop {
                break;
            }
        }
        (last, all)
    }

    fn kill9(mut self) -> Option<u64> {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        // Whatever it printed before dying still counts as done.
        self.read(|_| false).0
    }

    fn finish(mut self) -> Vec<String> {
        let (_, lines) = self.read(|_| false);
        assert!(self.child.wait().unwrap().success(), "{lines:?}");
        assert!(lines.iter().any(|l| l.ends_with("finished")), "{lines:?}");
        lines
    }
}

/// An inotify watch for files created in (or moved into) a directory: the
/// events queue in the kernel, so a file that appears and goes at once is
/// still seen.
struct Watch(std::os::fd::OwnedFd);

impl Watch {
    fn new(dir: &std::path::Path) -> Watch {
        use std::os::fd::FromRawFd;
        use std::os::unix::ffi::OsStrExt;
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        assert!(
            fd >= 0,
            "inotify_init1: {}",
            std::io::Error::last_os_error()
        );
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
        let wd = unsafe {
            libc::inotify_add_watch(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                path.as_ptr(),
                libc::IN_CREATE | libc::IN_MOVED_TO,
            )
        };
        assert!(
            wd >= 0,
            "inotify_add_watch {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        );
        Watch(fd)
    }

    /// Block (bounded) until the first event.
    fn wait_for_a_file(&self) {
        use std::os::fd::AsRawFd;
        let mut p = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let n = unsafe { libc::poll(&mut p, 1, 60_000) };
        assert!(
            n == 1,
            "no upload reached the server's staging directory within a minute"
        );
    }
}

#[test]
fn a_thousand_offline_changes_survive_client_kills_and_reach_the_server_exactly() {
    let mut srv = TestServer::start();
    let cache = TempDir::new("cache");
    // Connected: the directories and a first set of files, all cached.
    spawn(&srv, cache.path(), 0, SETUP, false).finish();

    assert!(srv.stop());
    let end = SETUP + OFFLINE;
    let mut next = SETUP;
    // Two SIGKILLs in the middle of the offline changes.
    for stop_at in [SETUP + 250, SETUP + 600] {
        let mut run = spawn(&srv, cache.path(), next, end, false);
        let (last, lines) = run.read(|l| l == format!("op {stop_at}"));
        assert!(
            lines.iter().any(|l| l.ends_with("state Disconnected")),
            "{lines:?}"
        );
        let last = run.kill9().or(last).expect("some changes were made");
        next = last + 1;
    }
    let lines = spawn(&srv, cache.path(), next, end, false).finish();
    assert!(lines.iter().any(|l| l.ends_with("state Disconnected")));

    // The server returns; the client is killed once while reintegrating.
    srv.restart();
    // Killed once its first upload reaches the server's staging directory:
    // the server is stopped at that moment, so the kill lands after the
    // reintegration began and before its batch can commit.
    // Small files would go inline (no upload to watch for): this run
    // uploads every store; the next one replays with inline records.
    let staging = Watch::new(&srv.root().join("staging"));
    let mut run = spawn_with(
        &srv,
        cache.path(),
        end,
        end,
        true,
        &[("CODA_CLIENT_NO_INLINE", "1")],
    );
    staging.wait_for_a_file();
    srv.sigstop();
    let _ = run.child.kill();
    let _ = run.child.wait();
    srv.sigcont();
    let lines = spawn(&srv, cache.path(), end, end, true).finish();
    assert!(
        lines.iter().any(|l| l.ends_with("conflicts 0")),
        "{lines:?}"
    );

    // Exactly the expected tree, seen by a fresh client.
    let fresh_dir = TempDir::new("fresh");
    let fresh = client(&srv, fresh_dir.path());
    let mut got = BTreeMap::new();
    for (p, n) in disco_util::tree(&fresh) {
        let node = match n {
            None => Node::Dir,
            Some(data) => Node::File(data, fresh.stat(&p).unwrap().mode & 0o7777),
        };
        got.insert(p, node);
    }
    let want = model(end);
    let diff: Vec<_> = want
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(v))
        .map(|(k, v)| (k.clone(), Some(v.clone()), got.get(k).cloned()))
        .chain(
            got.iter()
                .filter(|(k, _)| !want.contains_key(*k))
                .map(|(k, v)| (k.clone(), None, Some(v.clone()))),
        )
        .collect();
    assert!(diff.is_empty(), "(path, want, got): {diff:#?}");
    assert!(want.len() > 40, "a meaningful tree: {}", want.len());
}
