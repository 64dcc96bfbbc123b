//! The server and disk space: a full disk fails only the request that hit
//! it and the server recovers by itself; staged uploads are bounded per
//! session and in total; volume quotas and the largest file size bound
//! what a Store or truncate may take.

mod client_util;
mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coda::client::{Client, Config};
use coda::error::WireCode;
use coda::proto::Msg;
use coda::Error;
use common::raw::{rec, Raw};
use common::{TempDir, TestServer, SERVER_BIN};

// ---- helpers ----------------------------------------------------------

fn config(addr: SocketAddr, secret: &Path, cache: &Path) -> Config {
    let mut c = Config::new();
    c.set("servers", &addr.to_string()).unwrap();
    c.set("cache_dir", cache.to_str().unwrap()).unwrap();
    c.set("secret_file", secret.to_str().unwrap()).unwrap();
    c.set("rpc_timeout_ms", "5000").unwrap();
    c
}

fn try_put(c: &Client, path: &str, data: &[u8]) -> Result<(), Error> {
    let mut f = c.open(path, libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC, 0o644)?;
    let mut off = 0;
    while off < data.len() {
        off += f.write_at(&data[off..], off as u64)?;
    }
    f.close()
}

fn get(c: &Client, path: &str) -> Vec<u8> {
    let f = c.open(path, libc::O_RDONLY, 0).expect("open for reading");
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read_at(&mut buf, out.len() as u64).expect("read");
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    f.close().expect("close");
    out
}

fn server_cmd(args: &[&str], root: &Path) -> std::process::Output {
    Command::new(SERVER_BIN)
        .arg(args[0])
        .arg("--root")
        .arg(root)
        .args(&args[1..])
        .output()
        .expect("run coda-server")
}

fn error_code(m: &Msg) -> Option<(WireCode, u32)> {
    match m {
        Msg::Error { code, index, .. } => Some((*code, *index)),
        _ => None,
    }
}

/// A tmpfs mounted for one test, unmounted on drop (after whatever was
/// declared later, such as the server on it, is gone).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            panic!("this test needs root to mount a tmpfs (run as root)");
        }
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap_or_else(|e| panic!("this test needs mount(8) for a tmpfs: {e}"));
        assert!(
            out.status.success(),
            "this test needs to mount a tmpfs: mount -t tmpfs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// A `coda-server serve` of a data directory the test made, killed by PID
/// on drop.
struct Serving {
    child: Child,
    addr: SocketAddr,
}

impl Serving {
    /// `journal_bytes`: the size of the commit journal it creates.
    fn start(root: &Path, journal_bytes: u64) -> Serving {
        let mut child = Command::new(SERVER_BIN)
            .args(["serve", "--root"])
            .arg(root)
            .env("CODA_SERVER_JOURNAL_BYTES", journal_bytes.to_string())
            .args(["--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn coda-server serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("read coda-server's first line");
        let addr = match line.trim().strip_prefix("listening on ") {
            Some(a) => a.parse().expect("listening address"),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("unexpected first line from coda-server: {line:?}");
            }
        };
        Serving { child, addr }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Write to `path` until the file system refuses with ENOSPC.
fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).expect("create filler");
    let big = vec![0xa5u8; 1 << 20];
    let small = [0x5au8; 512];
    for chunk in [&big[..], &small[..]] {
        for _ in 0..100_000 {
            match f.write_all(chunk) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling the disk: {e}"),
            }
        }
    }
    let _ = f.sync_all();
}

// ---- 1. a full disk ---------------------------------------------------

/// mkdirs `/full0`, `/full1`, ... until one is refused, which must be for
/// lack of space (ENOSPC); returns how many were made. They are durable
/// in the commit journal, which needs no new space; its checkpoint (past
/// half the journal) writes redb's pages, which a full disk cannot give,
/// so it fails, the journal keeps its groups, and the change that no
/// longer fits in it commits in redb durably, and fails. A 64 KiB journal
/// holds a few hundred mkdirs: bounded well above that.
fn mkdirs_until_refused(c: &Client) -> usize {
    for i in 0..2000 {
        if let Err(e) = c.mkdir(&format!("/full{i}"), 0o755) {
            assert!(matches!(e, Error::NoSpace(_)), "mkdir on a full disk: {e}");
            assert_eq!(e.code(), -libc::ENOSPC);
            return i;
        }
    }
    panic!("no mkdir failed on a full disk");
}

/// Every acknowledged mkdir (`/pre0..20`, `/full0..made`) is in the root
/// directory as `c` reads it, and not the refused one.
fn assert_kept(c: &Client, made: usize) {
    let names = client_util::names(c, "/");
    for i in 0..20 {
        assert!(names.contains(&format!("pre{i}")), "pre{i} lost: {names:?}");
    }
    for i in 0..made {
        assert!(
            names.contains(&format!("full{i}")),
            "full{i} lost: {names:?}"
        );
    }
    assert!(
        !names.contains(&format!("full{made}")),
        "the refused mkdir applied"
    );
}

/// A data directory on a 16 MiB tmpfs served by its own `coda-server`
/// with a small commit journal (64 KiB, so that it fills within a test:
/// the server checkpoints it past half full, and on a full disk it cannot,
/// so journaled changes go on until the journal itself is full). Fields
/// drop in order: the server is killed before the tmpfs is unmounted.
struct FullDisk {
    srv: Option<Serving>,
    root: PathBuf,
    secret: PathBuf,
    /// The file that fills the disk (`free` removes it).
    filler: PathBuf,
    _fs: Tmpfs,
    _dir: TempDir,
}

impl FullDisk {
    /// Serve a new data directory; client `a` (cache `cache`) stores
    /// `/before` and makes `/pre0..20` (so the store has pages it may write
    /// in place); then the disk is filled.
    fn new(tag: &str, cache: &TempDir) -> (FullDisk, Client) {
        let dir = TempDir::new(tag);
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let fs = Tmpfs::mount(&mnt, "16m");
        let root = mnt.join("data");
        let out = server_cmd(&["init"], &root);
        assert!(out.status.success(), "init: {out:?}");
        let mut d = FullDisk {
            srv: None,
            secret: root.join("admin.secret"),
            root,
            filler: mnt.join("filler"),
            _fs: fs,
            _dir: dir,
        };
        d.restart();
        let a = d.client(cache).expect("client a");
        try_put(&a, "/before", b"before the disk filled").unwrap();
        for i in 0..20 {
            a.mkdir(&format!("/pre{i}"), 0o755).unwrap();
        }
        fill(&d.filler);
        (d, a)
    }

    /// kill -9 the server (if one runs) and start it again.
    fn restart(&mut self) {
        self.srv = None;
        self.srv = Some(Serving::start(&self.root, 64 << 10));
    }

    fn client(&self, cache: &TempDir) -> Result<Client, Error> {
        let addr = self.srv.as_ref().expect("a server runs").addr;
        Client::new(config(addr, &self.secret, cache.path()))
    }

    fn free(&self) {
        std::fs::remove_file(&self.filler).unwrap();
    }
}

#[test]
fn a_full_disk_fails_the_request_with_enospc_and_the_server_recovers_without_restart() {
    let cache_a = TempDir::new("space-full-a");
    let (disk, a) = FullDisk::new("space-full", &cache_a);
    // Metadata-only changes until one is refused.
    let made = mkdirs_until_refused(&a);
    // A store on the full disk is refused the same way.
    let e = try_put(&a, "/full-file", &vec![7u8; 256 * 1024]).unwrap_err();
    assert_eq!(e.code(), -libc::ENOSPC, "store on a full disk: {e}");
    // Reads keep working while the disk is full, for a new client too
    // (its handshake reads the store; its cache is empty).
    assert_eq!(get(&a, "/before"), b"before the disk filled");
    let cache_c = TempDir::new("space-full-c");
    let c = disk
        .client(&cache_c)
        .expect("a new client connects while the disk is full");
    assert_eq!(get(&c, "/before"), b"before the disk filled");
    drop(c);

    disk.free();
    // The same client works again (bounded wait: it may be backing off).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match try_put(&a, "/after-a", b"written by a after") {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline => {
                eprintln!("store after freeing space: {e}; retrying");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("the server did not recover within 30 s: {e}"),
        }
    }
    a.mkdir("/after-dir", 0o755).unwrap();
    assert_eq!(get(&a, "/after-a"), b"written by a after");
    // A new client can connect (the handshake reads the store) and work.
    let cache_b = TempDir::new("space-full-b");
    let b = disk.client(&cache_b).expect("client b connects");
    try_put(&b, "/after-b", b"written by b after").unwrap();
    assert_eq!(get(&b, "/after-b"), b"written by b after");
    assert_eq!(get(&b, "/after-a"), b"written by a after");
    assert_eq!(get(&b, "/before"), b"before the disk filled");
    assert_eq!(get(&a, "/after-b"), b"written by b after");
    // Every mkdir acknowledged before the failure is still there: the
    // reopened store (back at its last durable commit) applied the commit
    // journal again, and not the refused one.
    assert_kept(&b, made);
}

#[test]
fn a_server_killed_while_its_disk_is_full_restarts_on_it_with_every_acknowledged_change() {
    let cache_a = TempDir::new("space-crash-a");
    let (mut disk, a) = FullDisk::new("space-crash", &cache_a);
    // Acknowledged, and durable only in the commit journal: its checkpoint
    // failed for lack of space.
    let made = mkdirs_until_refused(&a);
    drop(a);
    // kill -9, and a restart while the disk is still full: the open
    // applies the journal again, cannot checkpoint it, and serves.
    disk.restart();
    // The same client id (its cache), claimed before the disk filled.
    let a = disk
        .client(&cache_a)
        .expect("client a connects to the restarted server on a full disk");
    assert_kept(&a, made);
    assert_eq!(get(&a, "/before"), b"before the disk filled");
    let e = a.mkdir("/refused", 0o755).unwrap_err();
    assert_eq!(e.code(), -libc::ENOSPC, "mkdir on a full disk: {e}");

    // Space again: changes go on; another kill -9 and start find every
    // change (in redb, checkpointed meanwhile, or in the journal).
    disk.free();
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = a.mkdir("/after", 0o755) {
        assert!(
            Instant::now() < deadline,
            "the server did not recover within 30 s: {e}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(a);
    disk.restart();
    let cache_b = TempDir::new("space-crash-b");
    let b = disk.client(&cache_b).expect("client b connects");
    assert_kept(&b, made);
    assert!(b.readdir("/").unwrap().iter().any(|e| e.name == "after"));
}

// ---- 2. staged uploads ------------------------------------------------

#[test]
fn staged_uploads_are_bounded_per_session_and_in_total_and_freed_when_the_session_ends() {
    let srv = TestServer::start_with(&[
        "--max-staged-per-session",
        "1M",
        "--max-staged",
        "3M",
        "--max-staged-uploads",
        "8",
    ]);
    let secret = srv.secret_file();
    let quarter = vec![1u8; 256 * 1024];
    let staging = srv.root().join("staging");
    let staged_files = || std::fs::read_dir(&staging).unwrap().count();

    // Session A stages 1 MiB, its bound; the next upload is refused with
    // Quota and the connection stays in step.
    let ctl_a = Raw::control(srv.addr(), &secret, [0xa1; 16], 1);
    let mut bulk_a = Raw::bulk(srv.addr(), &secret, [0xa1; 16], 1);
    for id in 1..=4 {
        let m = bulk_a.upload(id, &quarter);
        assert!(
            matches!(m, Msg::Uploaded { upload_id } if upload_id == id),
            "{m:?}"
        );
    }
    let m = bulk_a.upload(5, &quarter);
    assert_eq!(error_code(&m), Some((WireCode::Quota, u32::MAX)), "{m:?}");
    assert!(matches!(bulk_a.call(&Msg::Ping), Msg::Pong));
    assert_eq!(staged_files(), 4, "the refused upload wrote nothing");

    // Other sessions still upload, up to the server's total of 3 MiB.
    let _ctl_b = Raw::control(srv.addr(), &secret, [0xb2; 16], 1);
    let mut bulk_b = Raw::bulk(srv.addr(), &secret, [0xb2; 16], 1);
    let _ctl_c = Raw::control(srv.addr(), &secret, [0xc3; 16], 1);
    let mut bulk_c = Raw::bulk(srv.addr(), &secret, [0xc3; 16], 1);
    for id in 1..=4 {
        assert!(matches!(bulk_b.upload(id, &quarter), Msg::Uploaded { .. }));
        assert!(matches!(bulk_c.upload(id, &quarter), Msg::Uploaded { .. }));
    }
    let _ctl_d = Raw::control(srv.addr(), &secret, [0xd4; 16], 1);
    let mut bulk_d = Raw::bulk(srv.addr(), &secret, [0xd4; 16], 1);
    let m = bulk_d.upload(1, &quarter);
    assert_eq!(error_code(&m), Some((WireCode::Quota, u32::MAX)), "{m:?}");

    // A's session ends: its staged bytes are freed (files and count).
    drop(bulk_a);
    drop(ctl_a);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = bulk_d.upload(1, &quarter);
        if matches!(m, Msg::Uploaded { upload_id: 1 }) {
            break;
        }
        assert_eq!(error_code(&m), Some((WireCode::Quota, u32::MAX)), "{m:?}");
        assert!(Instant::now() < deadline, "A's staged bytes were not freed");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(staged_files(), 9, "A's 4 staged files are gone");

    // The count bound: a session stages at most 8 uploads, however small.
    let _ctl_e = Raw::control(srv.addr(), &secret, [0xe5; 16], 1);
    let mut bulk_e = Raw::bulk(srv.addr(), &secret, [0xe5; 16], 1);
    for id in 1..=8 {
        assert!(matches!(bulk_e.upload(id, b"x"), Msg::Uploaded { .. }));
    }
    let m = bulk_e.upload(9, b"x");
    assert_eq!(error_code(&m), Some((WireCode::Quota, u32::MAX)), "{m:?}");

    // An upload longer than the largest file is refused with Invalid and
    // its connection closed (its bytes are not worth reading).
    let id = bulk_e.send(&common::raw::dense_upload(10, 1 << 40));
    match bulk_e.recv() {
        Some((rid, m)) if rid == id => {
            assert_eq!(error_code(&m), Some((WireCode::Invalid, u32::MAX)), "{m:?}")
        }
        other => panic!("reply to a 1 TiB upload: {other:?}"),
    }
    assert!(bulk_e.is_closed());

    // A Store consumes an upload and frees its bytes for the next one.
    let mut ctl_b = _ctl_b;
    let f = ctl_b.alloc(1)[0];
    let root = ctl_b.root;
    ctl_b.apply(vec![
        rec::create(1, root, "f", f),
        rec::store(2, f, 0, 1, quarter.len() as u64),
    ]);
    let m = bulk_d.upload(2, &quarter);
    assert!(matches!(m, Msg::Uploaded { upload_id: 2 }), "{m:?}");
}

// ---- 3. quotas and the largest file -----------------------------------

#[test]
fn a_volume_quota_refuses_stores_with_edquot_and_usage_goes_down_after_remove() {
    let mut srv = TestServer::start();
    // Set on a stopped server here (tests/acl_admin.rs sets one on a
    // running server).
    assert!(srv.stop());
    let out = server_cmd(&["quota", "--volume", "1", "--bytes", "100K"], &srv.root());
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "volume 1: 0 bytes used, quota 102400"
    );
    srv.restart();

    let cache = TempDir::new("space-quota");
    let c = Client::new(config(srv.addr(), &srv.secret_file(), cache.path())).unwrap();
    let sixty = vec![3u8; 60 * 1024];
    try_put(&c, "/a", &sixty).unwrap();
    let e = try_put(&c, "/b", &sixty).unwrap_err();
    assert!(matches!(e, Error::Quota(_)), "store past the quota: {e}");
    assert_eq!(e.code(), -libc::EDQUOT);
    // Growing by truncate is bound by the quota too.
    let e = c.truncate("/a", 200 * 1024).unwrap_err();
    assert_eq!(e.code(), -libc::EDQUOT, "{e}");
    assert_eq!(get(&c, "/a"), sixty);

    // Nothing of a refused batch applies: a create and a store past the
    // quota in one batch leave no trace.
    let mut raw = Raw::control(srv.addr(), &srv.secret_file(), [0x77; 16], 1);
    let mut bulk = Raw::bulk(srv.addr(), &srv.secret_file(), [0x77; 16], 1);
    assert!(matches!(bulk.upload(1, &sixty), Msg::Uploaded { .. }));
    let f = raw.alloc(1)[0];
    let root = raw.root;
    let m = raw.reintegrate(vec![
        rec::create(1, root, "raw", f),
        rec::store(2, f, 0, 1, sixty.len() as u64),
    ]);
    assert_eq!(error_code(&m), Some((WireCode::Quota, 1)), "{m:?}");
    assert!(!raw.list(root).iter().any(|(n, _)| n == "raw"));

    // Removing a file gives its bytes back.
    c.unlink("/a").unwrap();
    try_put(&c, "/b", &sixty).unwrap();
    assert_eq!(get(&c, "/b"), sixty);
    drop(c);
    drop(raw);
    drop(bulk);
    assert!(srv.stop());
    let out = server_cmd(&["quota"], &srv.root());
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "volume 1: 61440 bytes used, quota 102400"
    );
    // `none` lifts the quota.
    let out = server_cmd(&["quota", "--bytes", "none"], &srv.root());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "volume 1: 61440 bytes used, quota unlimited"
    );
}

#[test]
fn a_one_tib_truncate_is_refused_without_any_quota() {
    let srv = TestServer::start();
    let mut raw = Raw::control(srv.addr(), &srv.secret_file(), [0x42; 16], 1);
    let f = raw.alloc(1)[0];
    let root = raw.root;
    raw.apply(vec![rec::create(1, root, "sparse", f)]);
    let m = raw.reintegrate(vec![rec::truncate(2, f, 1 << 40)]);
    assert_eq!(error_code(&m), Some((WireCode::Invalid, 0)), "{m:?}");
    assert_eq!(raw.attr(f).unwrap().size, 0);
    // No object file was made for it.
    let objs = srv.root().join("objects").join("1");
    assert_eq!(std::fs::read_dir(&objs).unwrap().count(), 0);

    // Through a real client: truncate(2) gets EINVAL, the file stays empty.
    let cache = TempDir::new("space-tib");
    let c = Client::new(config(srv.addr(), &srv.secret_file(), cache.path())).unwrap();
    let e = c.truncate("/sparse", 1 << 40).unwrap_err();
    assert_eq!(e.code(), -libc::EINVAL, "{e}");
    assert_eq!(c.stat("/sparse").unwrap().size, 0);
    // A size within the bound still works.
    c.truncate("/sparse", 4096).unwrap();
    assert_eq!(get(&c, "/sparse"), vec![0u8; 4096]);
}

#[test]
fn usage_is_computed_at_open_for_data_kept_before_usage_was() {
    let mut srv = TestServer::start();
    let cache = TempDir::new("space-usage");
    let c = Client::new(config(srv.addr(), &srv.secret_file(), cache.path())).unwrap();
    try_put(&c, "/one", &[1u8; 10_000]).unwrap();
    try_put(&c, "/two", &[2u8; 2_000]).unwrap();
    c.mkdir("/dir", 0o755).unwrap();
    c.symlink("/one", "/link").unwrap();
    drop(c);
    assert!(srv.stop());
    // A data directory of an older server has no usage table.
    {
        let db = redb::Database::open(srv.root().join("meta.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        let usage: redb::TableDefinition<u32, u64> = redb::TableDefinition::new("volusage");
        assert!(txn.delete_table(usage).unwrap());
        txn.commit().unwrap();
    }
    let out = server_cmd(&["quota"], &srv.root());
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "volume 1: 12000 bytes used, quota unlimited"
    );
}
