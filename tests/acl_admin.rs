//! Issue 13: users and groups kept by the server, administered with
//! `coda-server user|group|anonymous|adduser` while the server runs (the
//! command goes through the server's admin socket) and while it is stopped
//! (the command opens the metadata itself). Group membership grants rights
//! at once; removing a user or a member takes them away.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

use coda::error::WireCode;
use coda::proto::acl::{parse_rights, ADMINISTRATORS, ANY_USER};
use coda::proto::auth::read_secret_file;
use coda::proto::{ConnKind, Fid, Msg};
use common::raw::{rec, Raw};
use common::{TestServer, SERVER_BIN};

fn run(srv: &TestServer, args: &[&str]) -> Output {
    Command::new(SERVER_BIN)
        .args(args)
        .arg("--root")
        .arg(srv.root())
        .output()
        .expect("run coda-server")
}

fn ok(srv: &TestServer, args: &[&str]) -> String {
    let out = run(srv, args);
    assert!(
        out.status.success(),
        "coda-server {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(srv: &TestServer, args: &[&str]) -> String {
    let out = run(srv, args);
    assert!(!out.status.success(), "coda-server {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[allow(clippy::result_large_err)] // a refusal is the message itself
fn connect(srv: &TestServer, user: &str, id: u8, epoch: u64) -> Result<Raw, Msg> {
    let secret = read_secret_file(&srv.root().join(format!("{user}.secret")))
        .unwrap_or_else(|e| panic!("{user}'s secret: {e}"));
    Raw::connect(
        srv.addr(),
        user,
        &secret,
        ConnKind::Control,
        [id; 16],
        epoch,
    )
}

fn set_acl(c: &mut Raw, dir: Fid, name: &str, rights: &str) {
    let (bits, negative) = parse_rights(rights).unwrap();
    match c.call(&Msg::SetAcl {
        fid: dir,
        name: name.into(),
        rights: bits,
        negative,
    }) {
        Msg::AclReply { .. } => {}
        m => panic!("setacl {name} {rights}: {m:?}"),
    }
}

fn whoami(c: &mut Raw) -> (String, u32, Vec<String>) {
    match c.call(&Msg::WhoAmI) {
        Msg::WhoReply { user, id, groups } => (user, id, groups),
        m => panic!("WhoAmI: {m:?}"),
    }
}

#[test]
fn users_and_groups_change_while_the_server_runs() {
    let mut srv = TestServer::start();
    // The socket is private to the server's user.
    let sock = srv.root().join("admin.sock");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // Today's command, kept as an alias, now works with the server up.
    let out = ok(&srv, &["adduser", "--user", "bob"]);
    assert!(out.starts_with("added bob; secret in "), "{out}");
    ok(&srv, &["user", "add", "carol"]);
    assert!(fails(&srv, &["user", "add", "bob"]).contains("already exists"));
    assert_eq!(ok(&srv, &["user", "list"]), "admin\t1\nbob\t2\ncarol\t3\n");
    assert_eq!(
        ok(&srv, &["group", "members", ADMINISTRATORS]),
        "admin\n",
        "the init user is the first administrator"
    );

    let mut admin = connect(&srv, "admin", 1, 1).unwrap();
    assert_eq!(whoami(&mut admin).1, 1);
    let d = admin.alloc(1)[0];
    let root = admin.root;
    admin.apply(vec![rec::mkdir(1, root, "team", d)]);
    // A group is made (empty here) before an access list may name it.
    ok(&srv, &["group", "add", "web:editors"]);
    set_acl(&mut admin, d, "web:editors", "rlidw");
    drop(admin);

    // Joining a group while the server runs grants its rights at once.
    ok(&srv, &["group", "add", "web:editors", "carol"]);
    assert_eq!(
        ok(&srv, &["group", "list"]),
        format!("{ADMINISTRATORS}\nweb:editors\n")
    );
    assert_eq!(ok(&srv, &["group", "members", "web:editors"]), "carol\n");
    let mut carol = connect(&srv, "carol", 3, 1).unwrap();
    let (user, id, groups) = whoami(&mut carol);
    assert_eq!((user.as_str(), id), ("carol", 3));
    assert_eq!(groups, [ANY_USER, "web:editors"]);
    let f = carol.alloc(2);
    carol.apply(vec![rec::create(1, d, "by-carol", f[0])]);
    // bob is not in the group: the default (inherited) rl only.
    let mut bob = connect(&srv, "bob", 2, 1).unwrap();
    let nf = bob.alloc(1)[0];
    match bob.reintegrate(vec![rec::create(1, d, "by-bob", nf)]) {
        Msg::Error {
            code: WireCode::Access,
            index: 0,
            ..
        } => {}
        m => panic!("bob outside the group: {m:?}"),
    }
    // Out of the group: carol's rights go with it.
    ok(&srv, &["group", "remove", "web:editors", "carol"]);
    match carol.reintegrate(vec![rec::create(2, d, "again", f[1])]) {
        Msg::Error {
            code: WireCode::Access,
            ..
        } => {}
        m => panic!("carol after leaving the group: {m:?}"),
    }
    ok(&srv, &["group", "add", "web:editors", "bob"]);
    bob.apply(vec![rec::create(2, d, "by-bob", nf)]);
    drop((bob, carol));

    // Administrators: never without a member; a new one gets every right.
    assert!(fails(&srv, &["group", "remove", ADMINISTRATORS, "admin"]).contains("at least one"));
    assert!(fails(&srv, &["group", "add", "nocolon", "bob"]).contains("':'"));
    assert!(fails(&srv, &["group", "add", "web:x", "nosuchuser"]).contains("no such"));

    // A removed user cannot connect, and its name is free again; its new
    // namesake gets a new id (objects the old one owned stay its old id's).
    let mut carol = connect(&srv, "carol", 3, 2).unwrap();
    ok(&srv, &["user", "remove", "carol"]);
    assert!(!srv.root().join("carol.secret").exists());
    // Her open connection is refused from then on.
    match carol.call(&Msg::WhoAmI) {
        Msg::Error {
            code: WireCode::Auth,
            ..
        } => {}
        m => panic!("a removed user's request: {m:?}"),
    }
    drop(carol);
    assert!(matches!(connect(&srv, "admin", 1, 2).map(|_| ()), Ok(())));
    ok(&srv, &["user", "add", "carol"]);
    assert_eq!(ok(&srv, &["user", "list"]), "admin\t1\nbob\t2\ncarol\t4\n");
    assert!(
        ok(&srv, &["group", "members", "web:editors"]) == "bob\n",
        "the old carol's memberships went with her"
    );

    // Stopped: the same commands open the metadata themselves.
    assert!(srv.stop(), "server stops cleanly");
    assert!(!sock.exists(), "the socket goes with the server");
    ok(&srv, &["user", "add", "dave"]);
    ok(&srv, &["group", "add", ADMINISTRATORS, "dave"]);
    srv.restart();
    let mut dave = connect(&srv, "dave", 5, 1).unwrap();
    assert!(whoami(&mut dave).2.contains(&ADMINISTRATORS.to_string()));
    // An administrator may do anything, whatever the lists say.
    set_acl(&mut dave, d, "bob", "-rlidwka");
    let g = dave.alloc(1)[0];
    dave.apply(vec![rec::create(1, d, "by-dave", g)]);

    // Bad input: a clear usage error, nothing changed.
    let out = run(&srv, &["user", "frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&srv, &["group", "add"]);
    assert_eq!(out.status.code(), Some(2));
}

/// `coda-server quota` works while the server runs (through admin.sock, as
/// `user` and `group` do): a quota set then refuses the next store past it
/// with `Quota` (EDQUOT), and raising it lets the same store through, with
/// no restart in between.
#[test]
fn a_quota_set_on_a_running_server_applies_to_the_next_store() {
    let srv = TestServer::start();
    assert_eq!(
        ok(&srv, &["quota", "--volume", "1"]),
        "volume 1: 0 bytes used, quota unlimited\n"
    );
    let mut c = connect(&srv, "admin", 0x51, 1).unwrap();
    let mut bulk = common::raw::Raw::bulk(srv.addr(), &srv.secret_file(), [0x51; 16], 1);
    let root = c.root;
    let f = c.alloc(2);
    let data = vec![7u8; 60 * 1024];
    assert!(matches!(bulk.upload(1, &data), Msg::Uploaded { .. }));
    c.apply(vec![
        rec::create(1, root, "first", f[0]),
        rec::store(2, f[0], 0, 1, data.len() as u64),
    ]);

    // 100 KiB: the first 60 KiB fit, a second 60 KiB does not.
    assert_eq!(
        ok(&srv, &["quota", "--volume", "1", "--bytes", "100K"]),
        "volume 1: 61440 bytes used, quota 102400\n"
    );
    assert!(matches!(bulk.upload(2, &data), Msg::Uploaded { .. }));
    c.apply(vec![rec::create(3, root, "second", f[1])]);
    match c.reintegrate(vec![rec::store(4, f[1], 0, 2, data.len() as u64)]) {
        Msg::Error {
            code: WireCode::Quota,
            index: 0,
            ..
        } => {}
        m => panic!("a store past the quota just set: {m:?}"),
    }
    assert_eq!(c.attr(f[1]).unwrap().size, 0, "nothing of it applied");

    // Raised while running: the same store goes through.
    assert_eq!(
        ok(&srv, &["quota", "--volume", "1", "--bytes", "1M"]),
        "volume 1: 61440 bytes used, quota 1048576\n"
    );
    assert!(matches!(bulk.upload(3, &data), Msg::Uploaded { .. }));
    c.apply(vec![rec::store(4, f[1], 0, 3, data.len() as u64)]);
    assert_eq!(c.attr(f[1]).unwrap().size, data.len() as u64);
    assert_eq!(
        ok(&srv, &["quota", "--bytes", "none"]),
        "volume 1: 122880 bytes used, quota unlimited\n"
    );

    // Bad input: a clear error, the quota unchanged.
    assert!(fails(&srv, &["quota", "--volume", "9"]).contains("volume 9"));
    assert_eq!(
        run(&srv, &["quota", "--bytes", "lots"]).status.code(),
        Some(2)
    );
    assert_eq!(
        ok(&srv, &["quota"]),
        "volume 1: 122880 bytes used, quota unlimited\n"
    );
}
