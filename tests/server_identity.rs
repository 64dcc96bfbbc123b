//! Issue 9, sections 1 and 5 on the server: a client id belongs to the
//! user who first used it, store ids cannot leap ahead of the replay
//! watermark, error messages carry no server paths, and the data directory
//! is private. Real `coda-server` processes; hostile clients are raw sockets
//! authenticated as a real second user.

mod client_util;
mod common;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use client_util::{client, get, put};
use coda::error::WireCode;
use coda::proto::auth::read_secret_file;
use coda::proto::{ConnKind, Msg};
use common::raw::{rec, Raw};
use common::{TempDir, TestServer, SERVER_BIN};

/// Add `user` to the test server's data directory (the server is stopped
/// for it: the store is single-opener) and serve again; returns its secret.
fn add_user(srv: &mut TestServer, user: &str) -> [u8; 32] {
    srv.kill9();
    let out = Command::new(SERVER_BIN)
        .args(["adduser", "--root"])
        .arg(srv.root())
        .args(["--user", user])
        .output()
        .expect("run coda-server adduser");
    assert!(
        out.status.success(),
        "coda-server adduser failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    srv.restart();
    read_secret_file(&srv.root().join(format!("{user}.secret"))).expect("read bob's secret")
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn is_auth_refusal(r: &Result<Raw, Msg>) -> bool {
    matches!(r, Err(Msg::Error { code: WireCode::Auth, message, .. })
        if message.contains("belongs to another user"))
}

fn describe(r: &Result<Raw, Msg>) -> String {
    match r {
        Ok(_) => "welcomed".into(),
        Err(m) => format!("{m:?}"),
    }
}

#[test]
fn another_users_client_id_is_refused_and_the_owners_writes_all_arrive() {
    let mut srv = TestServer::start();
    let bob = add_user(&mut srv, "bob");
    let d = TempDir::new("ident-owner");
    let admin = client(&srv, &d.path().join("admin"));
    put(&admin, "/kept", b"before");
    let id = admin.client_id();

    // bob, properly authenticated as bob, presents admin's client id.
    let ctl = Raw::connect(srv.addr(), "bob", &bob, ConnKind::Control, id, 1);
    let ctl_seen = describe(&ctl);
    let ctl_refused = is_auth_refusal(&ctl);
    if let Ok(mut b) = ctl {
        // What an attacker does once in: one harmless record numbered so
        // high that every later store of admin's looks like a replay. Sent
        // at once, before admin's client takes its session back.
        let root = b.root;
        let attack = Msg::Reintegrate {
            records: vec![rec::chmod(1 << 62, root, 0, 0o755)],
        };
        if b.try_send(&attack).is_ok() {
            let _ = b.recv();
        }
    }
    let bulk = Raw::connect(srv.addr(), "bob", &bob, ConnKind::Bulk, id, 1);
    let bulk_seen = describe(&bulk);
    let bulk_refused = is_auth_refusal(&bulk);
    drop(bulk);

    // The owner goes on writing; another client must see every write.
    put(&admin, "/kept", b"after");
    put(&admin, "/new", b"fresh");
    let reader = client(&srv, &d.path().join("reader"));
    assert_eq!(
        get(&reader, "/kept"),
        b"after",
        "admin's acknowledged store must reach the server"
    );
    assert_eq!(get(&reader, "/new"), b"fresh");
    assert!(ctl_refused, "bob's control connection: {ctl_seen}");
    assert!(bulk_refused, "bob's bulk connection: {bulk_seen}");
}

#[test]
fn a_refused_impostor_leaves_the_owners_session_and_bulk_connection_alone() {
    let mut srv = TestServer::start();
    let bob = add_user(&mut srv, "bob");
    let id = [0x5a; 16];
    let mut owner = Raw::control(srv.addr(), &srv.secret_file(), id, 7);
    let mut owner_bulk = Raw::bulk(srv.addr(), &srv.secret_file(), id, 7);
    let f = owner.alloc(1)[0];

    for kind in [ConnKind::Control, ConnKind::Bulk] {
        let r = Raw::connect(srv.addr(), "bob", &bob, kind, id, 7);
        assert!(is_auth_refusal(&r), "{kind:?}: {}", describe(&r));
    }
    // The owner's control session was not ended: it still serves, and its
    // fid reservation and replay watermark are its own.
    owner.apply(vec![rec::create(1, owner.root, "mine", f)]);
    assert_eq!(owner.attr(f).map(|a| a.fid), Ok(f));
    assert!(owner
        .list(owner.root)
        .iter()
        .any(|(n, fid)| n == "mine" && *fid == f));
    // Its bulk connection is still attached.
    let ping = owner_bulk.send(&Msg::Ping);
    assert!(matches!(owner_bulk.recv(), Some((i, Msg::Pong)) if i == ping));
    // bob is not locked out under an id of his own, and his attempt did
    // not make admin's id his.
    let mine = Raw::connect(srv.addr(), "bob", &bob, ConnKind::Control, [0xb0; 16], 1);
    assert!(mine.is_ok(), "bob under his own id: {}", describe(&mine));
    drop(owner);
    let again = Raw::connect(
        srv.addr(),
        "admin",
        &read_secret_file(&srv.secret_file()).unwrap(),
        ConnKind::Control,
        id,
        8,
    );
    assert!(again.is_ok(), "the owner reconnects: {}", describe(&again));
}

#[test]
fn a_store_id_far_above_the_watermark_is_refused_and_applies_nothing() {
    let srv = TestServer::start();
    let mut c = Raw::control(srv.addr(), &srv.secret_file(), [0x11; 16], 1);
    let f = c.alloc(4);
    let root = c.root;
    match c.reintegrate(vec![
        rec::create(1, root, "a", f[0]),
        rec::create(1 << 62, root, "b", f[1]),
    ]) {
        Msg::Error { code, index, .. } => {
            assert_eq!((code, index), (WireCode::Invalid, 1));
        }
        m => panic!("a leap of 2^62 must be refused, got {m:?}"),
    }
    let names: Vec<String> = c.list(root).into_iter().map(|(n, _)| n).collect();
    assert!(names.is_empty(), "nothing applied: {names:?}");
    // The watermark did not move: ids 1, 2, 3 are still new and applied.
    c.apply(vec![rec::create(1, root, "a", f[0])]);
    c.apply(vec![rec::create(2, root, "c", f[2])]);
    // A leap within the bound (a long log, records cancelled locally) is fine.
    c.apply(vec![rec::create(3 + (1 << 31), root, "d", f[3])]);
    let mut names: Vec<String> = c.list(root).into_iter().map(|(n, _)| n).collect();
    names.sort();
    assert_eq!(names, ["a", "c", "d"]);
}

#[test]
fn a_server_storage_error_reaches_the_client_without_server_paths() {
    let srv = TestServer::start();
    let id = [0x22; 16];
    let _ctl = Raw::control(srv.addr(), &srv.secret_file(), id, 1);
    let mut bulk = Raw::bulk(srv.addr(), &srv.secret_file(), id, 1);
    // The staging directory disappears under the server: creating the
    // upload's file fails with an OS error naming its path.
    std::fs::remove_dir_all(srv.root().join("staging")).unwrap();
    match bulk.upload(1, b"hello") {
        Msg::Error { code, message, .. } => {
            assert_eq!(code, WireCode::Io);
            let root = srv.root().display().to_string();
            assert!(
                !message.contains(&root) && !message.contains("staging"),
                "the message names server paths: {message:?}"
            );
            assert!(message.starts_with("server storage error:"), "{message:?}");
        }
        m => panic!("upload into a missing staging directory: {m:?}"),
    }
}

/// A `coda-server serve` whose stderr the test reads; killed on drop.
struct Serving(Child);

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Serve `root` until it listens, stop it, and return what it logged.
fn serve_and_log(root: &Path) -> String {
    let mut s = Serving(
        Command::new(SERVER_BIN)
            .args(["serve", "--root"])
            .arg(root)
            .args(["--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn coda-server serve"),
    );
    let mut line = String::new();
    BufReader::new(s.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("listening on "), "{line:?}");
    let mut err = s.0.stderr.take().unwrap();
    let _ = s.0.kill();
    let _ = s.0.wait();
    let mut log = String::new();
    err.read_to_string(&mut log).unwrap();
    log
}

fn object_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for vol in std::fs::read_dir(root.join("objects")).unwrap().flatten() {
        for f in std::fs::read_dir(vol.path()).unwrap().flatten() {
            out.push(f.path());
        }
    }
    out
}

#[test]
fn the_data_directory_is_private_and_loose_modes_are_fixed_at_start() {
    let mut srv = TestServer::start();
    let root = srv.root();
    let d = TempDir::new("ident-modes");
    {
        let c = client(&srv, &d.path().join("c"));
        // Past the small-file limit, so it gets an object file.
        put(&c, "/secret-data", &[b'a'; 64 * 1024]);
    }
    let objects = object_files(&root);
    assert!(!objects.is_empty(), "the store left an object file");
    assert_eq!(mode(&root), 0o700, "data directory");
    assert_eq!(mode(&root.join("meta.redb")), 0o600, "meta.redb");
    assert_eq!(mode(&root.join("admin.secret")), 0o600, "admin.secret");
    for o in &objects {
        assert_eq!(mode(o), 0o600, "{}", o.display());
    }

    // As an older version (or a loose umask) left them.
    srv.kill9();
    let loosen =
        |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    loosen(&root, 0o755);
    loosen(&root.join("meta.redb"), 0o644);
    loosen(&objects[0], 0o644);
    let log = serve_and_log(&root);
    assert_eq!(mode(&root), 0o700);
    assert_eq!(mode(&root.join("meta.redb")), 0o600);
    assert_eq!(mode(&objects[0]), 0o600);
    assert!(
        log.contains("tightened the modes of 3 path(s)") && log.contains("meta.redb 644 -> 600"),
        "one message naming what changed: {log}"
    );
}
