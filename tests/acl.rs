//! Issue 13, "who may do what": directory access lists enforced by a real
//! `coda-server` for real users (admin, bob, anonymous). Raw protocol
//! clients give the exact wire code of every refusal; library clients show
//! the errno an application sees. Users are added while the server runs.

mod client_util;
mod common;
mod mount_util;

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use coda::client::{Client, Config};
use coda::error::WireCode;
use coda::proto::acl::ANY_USER;
use coda::proto::auth::read_secret_file;
use coda::proto::{ConnKind, Fid, Msg};
use common::raw::{rec, Raw};
use common::{TempDir, TestServer, SERVER_BIN};

/// `coda-server ARGS --root <server's>` must succeed; returns its stdout.
fn coda_server(srv: &TestServer, args: &[&str]) -> String {
    let out = Command::new(SERVER_BIN)
        .args(args)
        .arg("--root")
        .arg(srv.root())
        .output()
        .expect("run coda-server");
    assert!(
        out.status.success(),
        "coda-server {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Add `user` to the running server; returns its secret.
fn add_user(srv: &TestServer, user: &str) -> [u8; 32] {
    coda_server(srv, &["user", "add", user]);
    read_secret_file(&srv.root().join(format!("{user}.secret"))).expect("read the new secret")
}

fn set_acl(c: &mut Raw, dir: Fid, name: &str, rights: &str) -> Msg {
    let (bits, negative) = coda::proto::acl::parse_rights(rights).unwrap();
    c.call(&Msg::SetAcl {
        fid: dir,
        name: name.into(),
        rights: bits,
        negative,
    })
}

fn ok_acl(c: &mut Raw, dir: Fid, name: &str, rights: &str) {
    match set_acl(c, dir, name, rights) {
        Msg::AclReply { .. } => {}
        m => panic!("setacl {name} {rights}: {m:?}"),
    }
}

/// The code (and record index) a refused request carries.
fn refusal(m: Msg) -> (WireCode, u32) {
    match m {
        Msg::Error { code, index, .. } => (code, index),
        m => panic!("expected a refusal, got {m:?}"),
    }
}

const ACCESS: WireCode = WireCode::Access;

/// Upload `data` on `bulk` as upload `up` and store it into `fid`.
fn store(c: &mut Raw, b: &mut Raw, id: u64, fid: Fid, up: u64, data: &[u8]) -> Msg {
    assert!(matches!(b.upload(up, data), Msg::Uploaded { .. }));
    c.reintegrate(vec![rec::store(id, fid, 0, up, data.len() as u64)])
}

/// The test server and its users' secrets. Each step opens fresh
/// connections (`as_user`) and drops them: an idle raw connection holding
/// callbacks would not acknowledge another user's breaks, and the server
/// would rightly cut it.
struct World {
    srv: TestServer,
    secrets: Vec<(String, [u8; 32])>,
    epoch: AtomicU64,
    /// /m: AnyUser's entry removed, so bob starts with no rights there.
    m: Fid,
    /// /m/f, admin's, mode 0644, holding "secret".
    f: Fid,
    /// /m/sub, an empty directory.
    sub: Fid,
}

impl World {
    fn as_user(&self, user: &str) -> (Raw, Raw) {
        let (i, (_, secret)) = self
            .secrets
            .iter()
            .enumerate()
            .find(|(_, (u, _))| u == user)
            .expect("known user");
        let e = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        let id = [i as u8 + 1; 16];
        let c = Raw::connect(self.srv.addr(), user, secret, ConnKind::Control, id, e)
            .unwrap_or_else(|m| panic!("{user} control: {m:?}"));
        let b = Raw::connect(self.srv.addr(), user, secret, ConnKind::Bulk, id, e)
            .unwrap_or_else(|m| panic!("{user} bulk: {m:?}"));
        (c, b)
    }

    fn acl(&self, dir: Fid, name: &str, rights: &str) {
        let (mut a, _) = self.as_user("admin");
        ok_acl(&mut a, dir, name, rights);
    }
}

fn world() -> World {
    let srv = TestServer::start();
    let secret = read_secret_file(&srv.secret_file()).unwrap();
    let bob = add_user(&srv, "bob");
    let w = World {
        srv,
        secrets: vec![("admin".into(), secret), ("bob".into(), bob)],
        epoch: AtomicU64::new(1),
        m: Fid::default(),
        f: Fid::default(),
        sub: Fid::default(),
    };
    let (mut admin, mut admin_bulk) = w.as_user("admin");
    let ids = admin.alloc(3);
    let root = admin.root;
    admin.apply(vec![
        rec::mkdir(1, root, "m", ids[0]),
        rec::create(2, ids[0], "f", ids[1]),
        rec::mkdir(3, ids[0], "sub", ids[2]),
    ]);
    assert!(matches!(
        store(&mut admin, &mut admin_bulk, 4, ids[1], 1, b"secret"),
        Msg::Reintegrated { .. }
    ));
    ok_acl(&mut admin, ids[0], ANY_USER, "none");
    World {
        m: ids[0],
        f: ids[1],
        sub: ids[2],
        ..w
    }
}

#[test]
fn each_right_grants_exactly_its_operations() {
    let w = world();
    let (m, f, sub) = (w.m, w.f, w.sub);
    let (mut bob, mut bulk) = w.as_user("bob");
    let new = bob.alloc(8);

    // No rights: no status, no listing, no data, no change.
    assert_eq!(bob.attr(f), Err(ACCESS));
    assert_eq!(bob.attr(m), Err(ACCESS));
    assert_eq!(
        refusal(bob.call(&Msg::ReadDir { fid: m, cursor: 0 })).0,
        ACCESS
    );
    assert_eq!(refusal(bulk.fetch(f).unwrap_err()).0, ACCESS);
    assert_eq!(refusal(bob.call(&Msg::GetAcl { fid: m })).0, ACCESS);
    drop((bob, bulk));

    // l: status and listing, not data, not insert.
    w.acl(m, "bob", "l");
    let (mut bob, mut bulk) = w.as_user("bob");
    assert_eq!(bob.attr(f).unwrap().size, 6);
    assert_eq!(bob.list(m).len(), 2);
    assert_eq!(refusal(bulk.fetch(f).unwrap_err()).0, ACCESS);
    assert_eq!(
        refusal(bob.reintegrate(vec![rec::create(1, m, "b1", new[0])])),
        (ACCESS, 0)
    );
    drop((bob, bulk));

    // r (with l): data.
    w.acl(m, "bob", "rl");
    let (ctl, mut bulk) = w.as_user("bob");
    assert_eq!(bulk.fetch(f).unwrap().1, b"secret");
    drop((ctl, bulk));

    // i: create, mkdir, symlink, link; bob's own new file takes its first
    // contents without w. Not delete, not write admin's file.
    w.acl(m, "bob", "rli");
    let (mut bob, mut bulk) = w.as_user("bob");
    bob.apply(vec![
        rec::create(1, m, "b1", new[0]),
        rec::mkdir(2, m, "bd", new[1]),
        rec::symlink(3, m, "bl", new[2], "b1"),
        rec::link(4, m, "b1-again", new[0]),
    ]);
    // Its owner may chmod the new directory with i (Coda: i or d).
    bob.apply(vec![rec::chmod(5, new[1], 0, 0o700)]);
    assert!(matches!(
        store(&mut bob, &mut bulk, 6, new[0], 1, b"mine"),
        Msg::Reintegrated { .. }
    ));
    assert_eq!(
        refusal(store(&mut bob, &mut bulk, 7, new[0], 2, b"again")),
        (ACCESS, 0),
        "only a virgin file is the owner's to fill without w"
    );
    assert_eq!(
        refusal(store(&mut bob, &mut bulk, 8, f, 3, b"pay 9999")),
        (ACCESS, 0)
    );
    assert_eq!(
        refusal(bob.reintegrate(vec![rec::remove(9, m, "b1-again", new[0])])),
        (ACCESS, 0)
    );
    assert_eq!(
        refusal(bob.reintegrate(vec![rec::rmdir(10, m, "sub", sub)])),
        (ACCESS, 0)
    );
    assert_eq!(
        refusal(bob.reintegrate(vec![rec::rename(11, m, "b1", m, "b2", new[0])])),
        (ACCESS, 0),
        "rename needs d on its source"
    );
    drop((bob, bulk));

    // d: remove, rmdir, rename within m.
    w.acl(m, "bob", "rlid");
    let (mut bob, bulk) = w.as_user("bob");
    bob.apply(vec![
        rec::remove(12, m, "b1-again", new[0]),
        rec::rmdir(13, m, "sub", sub),
        rec::rename(14, m, "b1", m, "b2", new[0]),
    ]);
    // Writing admin's file still needs w.
    assert_eq!(
        refusal(bob.reintegrate(vec![rec::truncate(15, f, 1)])),
        (ACCESS, 0)
    );
    drop((bob, bulk));

    // w: write and truncate admin's file; chmod still needs owner or a.
    w.acl(m, "bob", "rlidw");
    let (mut bob, mut bulk) = w.as_user("bob");
    assert!(matches!(
        store(&mut bob, &mut bulk, 16, f, 4, b"edited"),
        Msg::Reintegrated { .. }
    ));
    bob.apply(vec![rec::truncate(17, f, 3)]);
    assert_eq!(
        refusal(bob.reintegrate(vec![rec::chmod(18, f, 0, 0o600)])),
        (ACCESS, 0)
    );
    // ...but bob chmods his own file.
    bob.apply(vec![rec::chmod(19, new[0], 0, 0o600)]);
    assert_eq!(refusal(set_acl(&mut bob, m, "bob", "all")).0, ACCESS);
    drop((bob, bulk));

    // a: administer the list, and chmod anything in the directory.
    w.acl(m, "bob", "rlidwa");
    let (mut bob, _bulk) = w.as_user("bob");
    bob.apply(vec![rec::chmod(20, f, 0, 0o640)]);
    ok_acl(&mut bob, m, ANY_USER, "l");
    match bob.call(&Msg::GetAcl { fid: m }) {
        Msg::AclReply { entries, rights } => {
            assert_eq!(coda::proto::acl::rights_string(rights), "rlidwa");
            let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
            assert_eq!(names, ["System:Administrators", ANY_USER, "bob"]);
        }
        m => panic!("GetAcl: {m:?}"),
    }
}

#[test]
fn negative_rights_beat_positive_ones_and_a_denied_record_refuses_its_batch() {
    let w = world();
    let (m, f) = (w.m, w.f);
    w.acl(m, ANY_USER, "rlidw");
    w.acl(m, "bob", "rl");
    w.acl(m, "bob", "-rw");
    let (mut bob, mut bulk) = w.as_user("bob");
    assert_eq!(bob.attr(f).unwrap().size, 6, "l is still granted");
    assert_eq!(refusal(bulk.fetch(f).unwrap_err()).0, ACCESS);
    let new = bob.alloc(1);
    // The create alone would pass; the store after it is denied, so
    // neither is applied.
    assert!(matches!(bulk.upload(1, b"x"), Msg::Uploaded { .. }));
    assert_eq!(
        refusal(bob.reintegrate(vec![
            rec::create(1, m, "n", new[0]),
            rec::store(2, f, 0, 1, 1),
        ])),
        (ACCESS, 1)
    );
    drop((bob, bulk));
    let (mut admin, _) = w.as_user("admin");
    assert!(admin.list(m).iter().all(|(n, _)| n != "n"));
    // Taking the negative entry away restores the positive ones.
    ok_acl(&mut admin, m, "bob", "-none");
    drop(admin);
    let (mut bob, mut bulk) = w.as_user("bob");
    assert_eq!(bulk.fetch(f).unwrap().1, b"secret");
    bob.apply(vec![rec::create(3, m, "n", new[0])]);
    drop(bulk);
}

#[test]
fn owner_mode_bits_restrict_others_and_writes_by_others_clear_setuid() {
    let w = world();
    let (m, f) = (w.m, w.f);
    w.acl(m, "bob", "rlidw");
    let chmod = |id: u64, mode: u32| {
        let (mut a, _) = w.as_user("admin");
        a.apply(vec![rec::chmod(id, f, 0, mode)]);
    };
    let mode = || w.as_user("admin").0.attr(f).unwrap().mode;
    // No owner read bit: bob (not the owner) cannot read, whatever his rights.
    chmod(10, 0o244);
    let (ctl, mut bulk) = w.as_user("bob");
    assert_eq!(refusal(bulk.fetch(f).unwrap_err()).0, ACCESS);
    drop((ctl, bulk));
    assert_eq!(w.as_user("admin").1.fetch(f).unwrap().1, b"secret");
    // No owner write bit: bob cannot store or truncate.
    chmod(11, 0o4555);
    let (mut bob, mut bulk) = w.as_user("bob");
    assert_eq!(
        refusal(store(&mut bob, &mut bulk, 1, f, 1, b"x")),
        (ACCESS, 0)
    );
    assert_eq!(
        refusal(bob.reintegrate(vec![rec::truncate(2, f, 0)])),
        (ACCESS, 0)
    );
    drop((bob, bulk));
    // A setuid file bob may write: his store clears setuid and setgid.
    chmod(12, 0o6755);
    let (mut bob, mut bulk) = w.as_user("bob");
    assert!(matches!(
        store(&mut bob, &mut bulk, 3, f, 2, b"planted"),
        Msg::Reintegrated { .. }
    ));
    drop((bob, bulk));
    assert_eq!(mode(), 0o755);
    // The owner's own store keeps them.
    chmod(13, 0o4755);
    let (mut a, mut ab) = w.as_user("admin");
    assert!(matches!(
        store(&mut a, &mut ab, 14, f, 3, b"owner"),
        Msg::Reintegrated { .. }
    ));
    drop((a, ab));
    assert_eq!(mode(), 0o4755);
}

#[test]
fn a_new_directory_inherits_its_parents_list_and_setacl_breaks_callbacks() {
    let w = world();
    let m = w.m;
    w.acl(m, "bob", "rli");
    w.acl(m, "bob", "-r");
    let (mut bob, _bulk) = w.as_user("bob");
    let d = bob.alloc(1)[0];
    bob.apply(vec![rec::mkdir(1, m, "child", d)]);
    let list = |fid| match w.as_user("admin").0.call(&Msg::GetAcl { fid }) {
        Msg::AclReply { entries, .. } => entries,
        m => panic!("GetAcl: {m:?}"),
    };
    assert_eq!(list(d), list(m));
    // bob holds callbacks on m (listing) and on f (status); a setacl on m
    // breaks both, and waits for bob's acknowledgement.
    bob.list(m);
    bob.attr(w.f).unwrap();
    std::thread::scope(|s| {
        let setter = s.spawn(|| w.acl(m, "bob", "rl"));
        let (bid, fids) = match bob.recv() {
            Some((bid, Msg::CallbackBreak { fids })) => (bid, fids),
            other => panic!("expected a callback break, got {other:?}"),
        };
        assert!(fids.contains(&m) && fids.contains(&w.f), "breaks: {fids:?}");
        bob.send_id(bid, &Msg::BreakAck);
        setter.join().unwrap();
    });
    // Names of unknown users or groups are refused.
    let (mut admin, _) = w.as_user("admin");
    assert_eq!(
        refusal(set_acl(&mut admin, m, "nobody", "rl")).0,
        WireCode::NotFound
    );
}

fn lib_client(srv: &TestServer, dir: &std::path::Path, user: &str) -> Client {
    let mut c = client_util::config(srv, dir);
    c.set("user", user).unwrap();
    c.set(
        "secret_file",
        srv.root().join(format!("{user}.secret")).to_str().unwrap(),
    )
    .unwrap();
    Client::new(c).expect("client connects")
}

#[test]
fn library_clients_see_eacces_and_manage_acls() {
    let srv = TestServer::start();
    add_user(&srv, "bob");
    let d = TempDir::new("acl-lib");
    let admin = client_util::client(&srv, &d.path().join("admin"));
    admin.mkdir("/pub", 0o755).unwrap();
    client_util::put(&admin, "/pub/index.html", b"<h1>hi</h1>");
    let bob = lib_client(&srv, &d.path().join("bob"), "bob");
    // The root's default list: everyone reads, nobody else changes.
    assert_eq!(client_util::get(&bob, "/pub/index.html"), b"<h1>hi</h1>");
    let eacces = -libc::EACCES;
    assert_eq!(bob.mkdir("/pub/x", 0o755).unwrap_err().code(), eacces);
    assert_eq!(bob.unlink("/pub/index.html").unwrap_err().code(), eacces);
    assert_eq!(
        bob.rename("/pub/index.html", "/pub/i2").unwrap_err().code(),
        eacces
    );
    assert_eq!(
        bob.chmod("/pub/index.html", 0o777).unwrap_err().code(),
        eacces
    );
    // Nothing of it reached the server.
    assert_eq!(client_util::names(&admin, "/pub"), ["index.html"]);
    assert_eq!(admin.stat("/pub/index.html").unwrap().mode & 0o777, 0o644);

    let me = bob.whoami().unwrap();
    assert_eq!(
        (me.user.as_str(), me.groups.as_slice()),
        ("bob", &[ANY_USER.to_string()][..])
    );
    assert!(admin
        .whoami()
        .unwrap()
        .groups
        .contains(&"System:Administrators".to_string()));
    assert_eq!(
        bob.acl_set("/pub", "bob", "all").unwrap_err().code(),
        eacces
    );
    let acl = admin.acl_set("/pub", "bob", "rlidw").unwrap();
    assert!(acl
        .entries
        .iter()
        .any(|e| e.name == "bob" && e.rights == 0x1f && !e.negative));
    assert_eq!(
        coda::proto::acl::rights_string(bob.acl_get("/pub").unwrap().rights),
        "rlidw"
    );
    bob.mkdir("/pub/x", 0o755).unwrap();
    client_util::put(&bob, "/pub/x/note", b"bob's");
    assert_eq!(client_util::get(&admin, "/pub/x/note"), b"bob's");
    assert_eq!(
        admin.acl_get("/pub/x/note").unwrap_err().code(),
        -libc::ENOTDIR
    );
    admin.acl_set("/pub", "bob", "-w").unwrap();
    let mut f = bob
        .open("/pub/index.html", libc::O_WRONLY | libc::O_TRUNC, 0)
        .unwrap();
    f.write_at(b"defaced", 0).unwrap();
    assert_eq!(f.close().unwrap_err().code(), eacces);
    assert_eq!(client_util::get(&admin, "/pub/index.html"), b"<h1>hi</h1>");
    // Disconnected, the access calls need the server: EIO, never the cache.
    bob.disconnect().unwrap();
    assert_eq!(bob.acl_get("/pub").unwrap_err().code(), -libc::EIO);
    assert_eq!(
        bob.acl_set("/pub", "bob", "rl").unwrap_err().code(),
        -libc::EIO
    );
    assert_eq!(bob.whoami().unwrap_err().code(), -libc::EIO);
    bob.reconnect().unwrap();
    assert_eq!(bob.whoami().unwrap().user, "bob");
}

#[test]
fn anonymous_reads_public_trees_and_changes_nothing() {
    let srv = TestServer::start();
    let d = TempDir::new("acl-anon");
    let admin = client_util::client(&srv, &d.path().join("admin"));
    client_util::put(&admin, "/index.html", b"public");
    // Off by default: the handshake is refused.
    let anon = Raw::connect(
        srv.addr(),
        "anonymous",
        &[0; 32],
        ConnKind::Control,
        [9; 16],
        1,
    );
    assert!(
        matches!(
            anon,
            Err(Msg::Error {
                code: WireCode::Auth,
                ..
            })
        ),
        "anonymous before it is enabled"
    );
    coda_server(&srv, &["anonymous", "on"]);
    // Even a list granting everyone everything gives anonymous rl only.
    admin.acl_set("/", ANY_USER, "all").unwrap();
    let mut c = Config::new();
    c.set("servers", &srv.addr().to_string()).unwrap();
    c.set("cache_dir", d.path().join("anon").to_str().unwrap())
        .unwrap();
    c.set("user", "anonymous").unwrap();
    // No secret file to find the server's fingerprint beside: it is named.
    c.set(
        "tls_fingerprint_file",
        srv.fingerprint_file().to_str().unwrap(),
    )
    .unwrap();
    let anon = Client::new(c).expect("anonymous needs no secret file");
    assert_eq!(client_util::get(&anon, "/index.html"), b"public");
    assert_eq!(anon.whoami().unwrap().user, "anonymous");
    assert_eq!(
        anon.mkdir("/mine", 0o755).unwrap_err().code(),
        -libc::EACCES
    );
    assert_eq!(
        anon.acl_set("/", "anonymous", "all").unwrap_err().code(),
        -libc::EACCES
    );
    drop(anon);
    coda_server(&srv, &["anonymous", "off"]);
    let again = Raw::connect(
        srv.addr(),
        "anonymous",
        &[0; 32],
        ConnKind::Control,
        [9; 16],
        2,
    );
    assert!(matches!(
        again,
        Err(Msg::Error {
            code: WireCode::Auth,
            ..
        })
    ));
    // "anonymous" is not a name a user may take.
    let out = Command::new(SERVER_BIN)
        .args(["user", "add", "anonymous", "--root"])
        .arg(srv.root())
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn the_cli_drives_acls_through_mounts_and_bobs_mount_gets_eacces() {
    if !mount_util::fuse_available() {
        return;
    }
    let srv = TestServer::start();
    add_user(&srv, "bob");
    let d = TempDir::new("acl-mount");
    let (ad, bd) = (d.path().join("admin"), d.path().join("bob"));
    std::fs::create_dir_all(&ad).unwrap();
    std::fs::create_dir_all(&bd).unwrap();
    let admin = mount_util::Mount::start(&srv, &ad, &[], &[]);
    std::fs::create_dir(admin.path("web")).unwrap();
    std::fs::write(admin.path("web/index.html"), b"hello").unwrap();
    let out = |o: std::process::Output| {
        assert!(o.status.success(), "{o:?}");
        mount_util::stdout(&o)
    };
    assert!(out(admin.cli(&["whoami"])).starts_with("user: admin\n"));
    let web = admin.path("web").display().to_string();
    let acl = out(admin.cli(&["setacl", &web, "bob", "rlidw"]));
    assert_eq!(
        acl,
        "System:Administrators rlidwka\nSystem:AnyUser rl\nbob rlidw\n"
    );
    out(admin.cli(&["setacl", &web, "bob", "-d"]));
    assert!(out(admin.cli(&["listacl", "/web"])).ends_with("bob rlidw\nbob -d\n"));
    let bad = admin.cli(&["setacl", &web, "bob", "rx"]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");

    let secret = srv.root().join("bob.secret").display().to_string();
    let bob =
        mount_util::Mount::start(&srv, &bd, &[("user", "bob"), ("secret_file", &secret)], &[]);
    assert!(out(bob.cli(&["whoami"])).starts_with("user: bob\nid: 2\n"));
    assert_eq!(std::fs::read(bob.path("web/index.html")).unwrap(), b"hello");
    std::fs::write(bob.path("web/bob.txt"), b"from bob").unwrap();
    let eacces = |e: std::io::Error| e.raw_os_error();
    assert_eq!(
        std::fs::remove_file(bob.path("web/index.html")).map_err(eacces),
        Err(Some(libc::EACCES)),
        "bob holds -d"
    );
    assert_eq!(
        std::fs::create_dir(bob.path("elsewhere")).map_err(eacces),
        Err(Some(libc::EACCES)),
        "the root gives bob rl only"
    );
    let refused = bob.cli(&["setacl", "/web", "bob", "all"]);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert_eq!(
        std::fs::read(admin.path("web/bob.txt")).unwrap(),
        b"from bob"
    );
}

#[test]
fn a_denied_record_logged_while_disconnected_is_kept_aside_and_the_rest_arrive() {
    let srv = TestServer::start();
    add_user(&srv, "bob");
    let d = TempDir::new("acl-disco");
    let admin = client_util::client(&srv, &d.path().join("admin"));
    admin.mkdir("/pub", 0o755).unwrap();
    admin.acl_set("/pub", "bob", "rlidw").unwrap();
    let bob = lib_client(&srv, &d.path().join("bob"), "bob");
    client_util::names(&bob, "/");
    client_util::names(&bob, "/pub");
    bob.disconnect().unwrap();
    // Offline the client cannot know the rights: both are logged.
    bob.mkdir("/denied", 0o755).unwrap();
    bob.mkdir("/pub/ok", 0o755).unwrap();
    assert_eq!(bob.pending_records(), 2);
    bob.reconnect().unwrap();
    bob.reintegrate_now().unwrap();
    assert_eq!(bob.pending_records(), 0);
    let conflicts = bob.conflicts().unwrap();
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    assert_eq!(conflicts[0].path, "/denied", "{conflicts:?}");
    assert_eq!(client_util::names(&admin, "/"), ["pub"]);
    assert_eq!(client_util::names(&admin, "/pub"), ["ok"]);
}

#[test]
fn taking_a_right_away_reaches_contents_a_client_already_cached() {
    let srv = TestServer::start();
    add_user(&srv, "bob");
    let d = TempDir::new("acl-revoke");
    let admin = client_util::client(&srv, &d.path().join("admin"));
    admin.mkdir("/pub", 0o755).unwrap();
    client_util::put(&admin, "/pub/f", b"data");
    let bob = lib_client(&srv, &d.path().join("bob"), "bob");
    assert_eq!(client_util::get(&bob, "/pub/f"), b"data");
    // The cached copy is not served once r is gone: the list's files
    // changed status, so bob's client fetches, and is refused.
    admin.acl_set("/pub", "bob", "-r").unwrap();
    let eacces = -libc::EACCES;
    let opened = bob.open("/pub/f", libc::O_RDONLY, 0);
    assert_eq!(opened.err().map(|e| e.code()), Some(eacces));
    assert_eq!(
        bob.stat("/pub/f").unwrap().size,
        4,
        "l still lets bob see status"
    );
    admin.acl_set("/pub", "bob", "-rl").unwrap();
    assert_eq!(bob.stat("/pub/f").unwrap_err().code(), eacces);
    assert_eq!(bob.readdir("/pub").unwrap_err().code(), eacces);
    // Given back, it reads again; the setter's own cache stayed coherent.
    admin.acl_set("/pub", "bob", "-none").unwrap();
    assert_eq!(client_util::get(&bob, "/pub/f"), b"data");
    client_util::put(&admin, "/pub/f", b"new");
    assert_eq!(client_util::get(&bob, "/pub/f"), b"new");
}

/// Creates the server refuses leave nothing in the cache: their fids were
/// handed out, and the empty containers the client made ahead under them
/// (docs/CLIENT.md "Named containers") are removed, not kept until the next
/// start.
#[test]
fn refused_creates_leave_no_containers_behind() {
    let srv = TestServer::start();
    add_user(&srv, "bob");
    let d = TempDir::new("acl-refused");
    let admin = client_util::client(&srv, &d.path().join("admin"));
    admin.mkdir("/pub", 0o755).unwrap();
    let cache = d.path().join("bob");
    let bob = lib_client(&srv, &cache, "bob");
    const REFUSED: usize = 100;
    for i in 0..REFUSED {
        match bob.open(&format!("/pub/f{i}"), libc::O_CREAT | libc::O_WRONLY, 0o644) {
            Err(e) => assert_eq!(e.code(), -libc::EACCES),
            Ok(_) => panic!("bob created /pub/f{i}"),
        }
    }
    // What stays is what is made ahead for the next creates (32, and one
    // being made): the thread removes the refused ones' as it goes.
    let names = || std::fs::read_dir(cache.join("containers")).unwrap().count();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while names() > 33 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} names left in containers/ after {REFUSED} refused creates",
            names()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(client_util::names(&admin, "/pub"), Vec::<String>::new());
    // Nor do fids that went to directories and symlinks.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    for i in 0..REFUSED {
        admin.mkdir(&format!("/pub/d{i}"), 0o755).unwrap();
        admin.symlink("d0", &format!("/pub/l{i}")).unwrap();
    }
    let names = || {
        std::fs::read_dir(d.path().join("admin/containers"))
            .unwrap()
            .count()
    };
    while names() > 33 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} names left in containers/ after {} directories and symlinks",
            names(),
            2 * REFUSED
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
