//! The client when space runs out: on the server (ENOSPC from an upload
//! reaches a connected caller; logged records stay pending, reported by an
//! event, and are retried with a back-off instead of in a tight loop) and
//! in its own cache (a full cache file system fails the call that needed
//! space, and the client works again once space is free).
//!
//! Needs root and tmpfs mounts: when missing the tests fail naming them,
//! unless `CODA_SKIP` contains "space" (then they say they skipped).

mod client_util;
mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use client_util::*;
use coda::client::event::Event;
use coda::client::{Client, Config};
use common::{TempDir, SERVER_BIN};

/// `true` to go on; `false` when skipped by `CODA_SKIP`.
fn prerequisites(test: &str) -> bool {
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CODA_SKIP").is_ok_and(|s| s.contains("space")) {
        eprintln!("SKIPPED {test} (CODA_SKIP): needs root to mount a tmpfs");
        return false;
    }
    panic!("{test} needs root to mount a small tmpfs (set CODA_SKIP=space to skip it)");
}

/// A small tmpfs mounted for the test; unmounted on drop.
struct Tmpfs {
    at: PathBuf,
}

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("run mount");
        assert!(st.success(), "mount -t tmpfs failed");
        Tmpfs {
            at: at.to_path_buf(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // A client just dropped may still be closing its files on one of
        // its threads: try a few times before a lazy unmount.
        let mut ok = false;
        for _ in 0..50 {
            ok = Command::new("umount")
                .arg(&self.at)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.at).status();
        }
    }
}

/// Fill the file system of `dir` with `filler` until it is full.
fn fill(filler: &Path) {
    let mut f = std::fs::File::create(filler).unwrap();
    let chunk = vec![0x5au8; 64 << 10];
    loop {
        match f.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling: {e}"),
        }
    }
    let _ = f.sync_all();
}

/// A `coda-server` whose data directory is on a small tmpfs.
struct SmallServer {
    child: Child,
    addr: SocketAddr,
    root: PathBuf,
    // Dropped after the child is killed (field order).
    _fs: Tmpfs,
}

impl SmallServer {
    fn start(work: &Path, size: &str) -> SmallServer {
        let fs = Tmpfs::mount(&work.join("srvfs"), size);
        let root = fs.at.join("data");
        let out = Command::new(SERVER_BIN)
            .args(["init", "--root"])
            .arg(&root)
            .output()
            .unwrap();
        assert!(out.status.success(), "init: {out:?}");
        let mut child = Command::new(SERVER_BIN)
            .args(["serve", "--root"])
            .arg(&root)
            .args(["--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let Some(addr) = line.trim().strip_prefix("listening on ") else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("unexpected first line {line:?}");
        };
        SmallServer {
            addr: addr.parse().unwrap(),
            child,
            root,
            _fs: fs,
        }
    }

    fn config(&self, cache: &Path) -> Config {
        let mut c = Config::new();
        c.set("servers", &self.addr.to_string()).unwrap();
        c.set("cache_dir", cache.to_str().unwrap()).unwrap();
        c.set(
            "secret_file",
            self.root.join("admin.secret").to_str().unwrap(),
        )
        .unwrap();
        c.set("rpc_timeout_ms", "5000").unwrap();
        c
    }
}

impl Drop for SmallServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Counts the files created in a directory (inotify), so the test sees
/// every upload the server staged.
struct StagingWatch {
    fd: i32,
}

impl StagingWatch {
    fn new(dir: &Path) -> StagingWatch {
        use std::os::unix::ffi::OsStrExt;
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(fd >= 0, "inotify_init1");
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
        let wd = unsafe { libc::inotify_add_watch(fd, c.as_ptr(), libc::IN_CREATE) };
        assert!(wd >= 0, "watching {}", dir.display());
        StagingWatch { fd }
    }

    /// Files created since the watch began.
    fn count(&self) -> usize {
        let mut n = 0;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let got = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) };
            if got <= 0 {
                return n;
            }
            let mut off = 0;
            while off + 16 <= got as usize {
                let len = u32::from_ne_bytes(buf[off + 12..off + 16].try_into().unwrap());
                n += 1;
                off += 16 + len as usize;
            }
        }
    }
}

impl Drop for StagingWatch {
    fn drop(&mut self) {
        unsafe { libc::close(self.fd) };
    }
}

fn data(tag: &str, n: usize) -> Vec<u8> {
    tag.bytes().cycle().take(n).collect()
}

#[test]
fn a_full_server_disk_gets_enospc_to_the_caller_and_a_backed_off_retry_of_the_log() {
    if !prerequisites("the server-full test") {
        return;
    }
    let work = TempDir::new("space-server");
    let srv = SmallServer::start(work.path(), "24m");
    let cache = TempDir::new("space-server-cache");
    let c = Client::new(srv.config(cache.path())).expect("client connects");
    c.mkdir("/s", 0o755).unwrap();
    put(&c, "/s/before", b"written while there was room");

    let filler = srv._fs.at.join("filler");
    fill(&filler);
    let big = data("no room for this ", 2 << 20);

    // Connected, nothing logged: the caller hears ENOSPC, and nothing stays.
    match try_put(&c, "/s/connected", &big) {
        Err(coda::Error::NoSpace(_)) => {}
        r => panic!("a connected close on a full server: {r:?}"),
    }
    assert_eq!(c.pending_records(), 0);

    // Logged records (write-disconnected): close() succeeds; reintegration
    // is refused for space, the records stay, an event says so, and the
    // retries back off.
    c.set_write_disconnected(true);
    put(&c, "/s/logged", &big);
    let pending = c.pending_records();
    assert!(pending >= 1);
    c.set_write_disconnected(false);
    let deadline = Instant::now() + Duration::from_secs(30);
    let stalled = loop {
        match c.events().next(Duration::from_millis(100)) {
            Some(Event::ReintegrationStalled { code, pending, .. }) => break (code, pending),
            _ => assert!(Instant::now() < deadline, "no ReintegrationStalled event"),
        }
    };
    assert_eq!(stalled.0, -libc::ENOSPC);
    assert!(stalled.1 >= 1);
    // Over six seconds: a handful of refused tries (1 s, 2 s, 4 s apart),
    // not one per reintegrator turn. Each try stages the upload again in
    // the server's staging directory: a watch on it counts them.
    let refusals = c.stats().space_refusals;
    let staged = StagingWatch::new(&srv.root.join("staging"));
    std::thread::sleep(Duration::from_secs(6));
    let uploads = staged.count();
    let refusals = c.stats().space_refusals - refusals;
    assert!(
        uploads <= 4 && refusals <= 4,
        "in 6 s the server was sent {uploads} uploads of the refused file; {refusals} refusals"
    );
    assert_eq!(c.pending_records(), pending, "the records stay logged");
    assert!(c.conflicts().unwrap().is_empty(), "not a conflict");
    // A connected call queued behind them hears ENOSPC at once.
    match c.chmod("/s/before", 0o600) {
        Err(coda::Error::NoSpace(_)) => {}
        r => panic!("a call behind refused records: {r:?}"),
    }

    // Space again: the records arrive.
    std::fs::remove_file(&filler).unwrap();
    c.reintegrate_now()
        .expect("reintegrates once there is room");
    assert_eq!(c.pending_records(), 0);
    let fresh_dir = TempDir::new("space-server-fresh");
    let fresh = Client::new(srv.config(fresh_dir.path())).unwrap();
    assert_eq!(get(&fresh, "/s/logged"), big);
    assert_eq!(get(&fresh, "/s/before"), b"written while there was room");
    assert!(
        matches!(
            fresh.stat("/s/connected"),
            Ok(s) if s.size == 0
        ) || matches!(fresh.stat("/s/connected"), Err(coda::Error::NotFound(_)))
    );
}

#[test]
fn a_full_cache_file_system_fails_only_the_calls_that_need_space_and_recovers() {
    if !prerequisites("the full-cache test") {
        return;
    }
    let srv = common::TestServer::start();
    let work = TempDir::new("space-cache");
    let fs = Tmpfs::mount(&work.path().join("cachefs"), "8m");
    let cache = fs.at.join("cache");
    let mut cfg = config(&srv, &cache);
    cfg.set("reintegration_age_ms", "600000").unwrap();
    let c = Client::new(cfg).unwrap();
    c.mkdir("/t", 0o755).unwrap();
    put(&c, "/t/first", b"cached before the disk filled");

    let filler = fs.at.join("filler");
    fill(&filler);
    // Logged mutations (kept in the index until sent) until the index
    // cannot grow: its free pages run out and its file must grow.
    c.set_write_disconnected(true);
    let long = "n".repeat(200);
    let mut failed = None;
    for i in 0..50_000 {
        if let Err(e) = c.mkdir(&format!("/t/{long}{i}"), 0o755) {
            failed = Some((i, e));
            break;
        }
    }
    let (made, err) = failed.expect("a full cache file system fails some call");
    eprintln!("mkdir {made} failed on the full cache: {err}");
    assert_eq!(err.code(), -libc::ENOSPC, "{err}");

    // Space again: the client works, without a restart.
    std::fs::remove_file(&filler).unwrap();
    c.set_write_disconnected(false);
    c.mkdir("/t/after", 0o755)
        .expect("mkdir once the cache has room again");
    put(&c, "/t/second", b"written after space came back");
    assert_eq!(get(&c, "/t/second"), b"written after space came back");
    c.reintegrate_now().unwrap();
    assert_eq!(c.pending_records(), 0);
    let fresh_dir = TempDir::new("space-cache-fresh");
    let fresh = client(&srv, fresh_dir.path());
    assert_eq!(get(&fresh, "/t/second"), b"written after space came back");
    assert_eq!(get(&fresh, "/t/first"), b"cached before the disk filled");
    assert!(fresh.stat("/t/after").is_ok());
    drop(c);
    drop(fs);
}

fn set_quota(srv: &common::TestServer, bytes: &str) {
    let out = Command::new(SERVER_BIN)
        .args(["quota", "--root"])
        .arg(srv.root())
        .args(["--volume", "1", "--bytes", bytes])
        .output()
        .unwrap();
    assert!(out.status.success(), "coda-server quota: {out:?}");
}

/// EDQUOT the same way: a connected close hears it; logged records stay
/// pending (not conflicts), reported by the event, until the quota allows.
#[test]
fn a_volume_quota_refusal_keeps_the_logged_records_and_reports_edquot() {
    let mut srv = common::TestServer::start();
    assert!(srv.stop());
    set_quota(&srv, "64k");
    srv.restart();
    let cache = TempDir::new("quota-cache");
    let mut cfg = config(&srv, cache.path());
    cfg.set("reintegration_age_ms", "600000").unwrap();
    let c = Client::new(cfg).unwrap();
    let big = data("over the quota ", 256 << 10);
    match try_put(&c, "/connected", &big) {
        Err(coda::Error::Quota(_)) => {}
        r => panic!("a connected close past the quota: {r:?}"),
    }

    c.set_write_disconnected(true);
    put(&c, "/logged", &big);
    let pending = c.pending_records();
    c.set_write_disconnected(false);
    match c.reintegrate_now() {
        Err(coda::Error::Quota(_)) => {}
        r => panic!("reintegration past the quota: {r:?}"),
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match c.events().next(Duration::from_millis(100)) {
            Some(Event::ReintegrationStalled { code, .. }) => {
                assert_eq!(code, -libc::EDQUOT);
                break;
            }
            _ => assert!(Instant::now() < deadline, "no ReintegrationStalled event"),
        }
    }
    assert_eq!(c.pending_records(), pending, "the records stay logged");
    assert!(c.conflicts().unwrap().is_empty(), "not a conflict");

    // The quota is lifted: the records arrive.
    assert!(srv.stop());
    set_quota(&srv, "none");
    srv.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = c.reintegrate_now() {
        assert!(Instant::now() < deadline, "still not reintegrated: {e}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(c.pending_records(), 0);
    let fresh_dir = TempDir::new("quota-fresh");
    let fresh = client(&srv, fresh_dir.path());
    assert_eq!(get(&fresh, "/logged"), big);
}
