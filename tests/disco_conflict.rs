//! Conflicts at reintegration: a file changed on the server while the client
//! was disconnected, or a name that now exists, is not applied; the server's
//! version stays, the client's is preserved and listed, the other records go
//! on, and the user keeps either version.

mod client_util;
mod common;
mod disco_util;

use client_util::*;
use coda::client::{Client, ClientState, Event, Keep};
use coda::Error;
use common::{TempDir, TestServer};

/// A client whose reintegrator does not probe on its own during the test
/// (it waits a minute between probes), so the test decides when it comes
/// back: `reintegrate_now`.
fn slow_prober(srv: &TestServer, dir: &std::path::Path) -> Client {
    let mut cfg = config(srv, dir);
    cfg.set("heartbeat_ms", "60000").unwrap();
    cfg.set("dead_after_ms", "120000").unwrap();
    Client::new(cfg).unwrap()
}

#[test]
fn a_store_over_a_changed_file_and_a_taken_name_become_conflicts_and_the_rest_goes_on() {
    let mut srv = start();
    let (da, db) = (TempDir::new("a"), TempDir::new("b"));
    let a = slow_prober(&srv, da.path());
    put(&a, "/f", b"base");
    put(&a, "/g", b"g base");
    a.mkdir("/dir", 0o755).unwrap();

    srv.kill9();
    assert_eq!(get(&a, "/f"), b"base");
    disco_util::wait_disconnected(&a);
    put(&a, "/f", b"local f");
    put(&a, "/g", b"local g");
    put(&a, "/dir/n", b"local n");
    a.symlink("/g", "/dir/s").unwrap();

    srv.restart();
    let b = client(&srv, db.path());
    put(&b, "/f", b"server f");
    put(&b, "/dir/n", b"server n");
    a.reintegrate_now().unwrap();
    assert_eq!(a.state(), ClientState::Connected);
    assert_eq!(a.pending_records(), 0);

    let mut cs = a.conflicts().unwrap();
    cs.sort_by(|x, y| x.path.cmp(&y.path));
    assert_eq!(cs.len(), 2, "{cs:?}");
    // The create of a name B took is refused, with the store into it.
    assert_eq!(cs[0].path, "/dir/n");
    assert_eq!(cs[0].kind, "Exists");
    assert_eq!(cs[0].op, "create \"n\"");
    assert_eq!(cs[0].records, 2);
    assert_eq!(cs[1].path, "/f");
    assert_eq!(cs[1].kind, "Conflict");
    assert_eq!(cs[1].op, "store");
    let local = cs[1].local_copy.clone().expect("local copy kept");
    assert_eq!(std::fs::read(&local).unwrap(), b"local f");
    let server = a.conflict_server_version(cs[1].id).unwrap().unwrap();
    assert_eq!(server.size, b"server f".len() as u64);
    let mut saw = 0;
    while let Some(ev) = a.events().next(std::time::Duration::from_millis(50)) {
        if matches!(ev, Event::Conflict { .. }) {
            saw += 1;
        }
    }
    assert_eq!(saw, 2, "each conflict is an event");

    // The server's version is what everyone sees; the rest reintegrated.
    assert_eq!(get(&a, "/f"), b"server f");
    assert_eq!(get(&b, "/g"), b"local g");
    assert_eq!(get(&a, "/dir/n"), b"server n");
    assert_eq!(names(&b, "/dir"), vec!["n", "s"]);

    // Keep the local /f: it replaces the server's.
    a.resolve_conflict(cs[1].id, Keep::Local).unwrap();
    assert_eq!(get(&b, "/f"), b"local f");
    assert_eq!(get(&a, "/f"), b"local f");
    // Keep the server's /dir/n: the local one is dropped.
    a.resolve_conflict(cs[0].id, Keep::Server).unwrap();
    assert!(a.conflicts().unwrap().is_empty());
    assert_eq!(names(&a, "/dir"), vec!["n", "s"]);
    assert_eq!(get(&a, "/dir/n"), b"server n");
    let e = a.resolve_conflict(cs[0].id, Keep::Server).unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e}");
}

#[test]
fn keeping_the_local_version_of_a_name_conflict_replaces_the_servers_entry() {
    let mut srv = start();
    let (da, db) = (TempDir::new("a"), TempDir::new("b"));
    let a = slow_prober(&srv, da.path());
    a.mkdir("/p", 0o755).unwrap();
    srv.kill9();
    put(&a, "/p/x", b"mine");
    // Held until B has written (see the rename test below).
    a.disconnect().unwrap();
    srv.restart();
    let b = client(&srv, db.path());
    put(&b, "/p/x", b"theirs");
    a.reconnect().unwrap();
    a.reintegrate_now().unwrap();
    let cs = a.conflicts().unwrap();
    assert_eq!(cs.len(), 1, "{cs:?}");
    assert_eq!(
        (cs[0].kind.as_str(), cs[0].path.as_str()),
        ("Exists", "/p/x")
    );
    assert_eq!(
        cs[0].records, 2,
        "the create and the store that depends on it"
    );
    assert_eq!(get(&a, "/p/x"), b"theirs");
    a.resolve_conflict(cs[0].id, Keep::Local).unwrap();
    assert!(a.conflicts().unwrap().is_empty());
    assert_eq!(get(&b, "/p/x"), b"mine");
    assert_eq!(get(&a, "/p/x"), b"mine");
}

#[test]
fn conflicts_survive_a_client_restart() {
    let mut srv = start();
    let (da, db) = (TempDir::new("a"), TempDir::new("b"));
    {
        let a = slow_prober(&srv, da.path());
        put(&a, "/f", b"base");
        srv.kill9();
        // Written whether or not the client noticed the server died yet: a
        // store that finds the server gone is checked like an offline one.
        put(&a, "/f", b"offline edit");
        // Held until B has written (see the rename test below).
        a.disconnect().unwrap();
        srv.restart();
        let b = client(&srv, db.path());
        put(&b, "/f", b"online edit");
        a.reconnect().unwrap();
        a.reintegrate_now().unwrap();
        assert_eq!(a.conflicts().unwrap().len(), 1);
    }
    let a = client(&srv, da.path());
    let cs = a.conflicts().unwrap();
    assert_eq!(cs.len(), 1);
    assert_eq!(
        std::fs::read(cs[0].local_copy.as_ref().unwrap()).unwrap(),
        b"offline edit"
    );
    a.resolve_conflict(cs[0].id, Keep::Server).unwrap();
    assert_eq!(get(&a, "/f"), b"online edit");
    assert!(cs[0].local_copy.as_ref().is_some_and(|p| !p.exists()));
}

/// A rename logged while disconnected onto a name that was free then, but
/// that another client took meanwhile, does not silently replace the other
/// client's file: it becomes a conflict and the server's file stays.
#[test]
fn an_offline_rename_onto_a_name_taken_meanwhile_is_a_conflict_not_a_replacement() {
    let mut srv = start();
    let (da, db) = (TempDir::new("ra"), TempDir::new("rb"));
    let a = slow_prober(&srv, da.path());
    put(&a, "/draft", b"a's draft");
    assert_eq!(names(&a, "/"), vec!["draft"]);

    srv.kill9();
    a.rename("/draft", "/final").unwrap();
    assert_eq!(names(&a, "/"), vec!["final"]);
    // Held by the operator until B has written: otherwise A's reintegrator
    // may find the restarted server first and send the rename before B's
    // file exists (then there is nothing to conflict with).
    a.disconnect().unwrap();

    srv.restart();
    let b = client(&srv, db.path());
    put(&b, "/final", b"b's final");
    a.reconnect().unwrap();
    a.reintegrate_now().unwrap();

    let cs = a.conflicts().unwrap();
    assert_eq!(cs.len(), 1, "{cs:?}");
    assert_eq!(cs[0].kind, "Exists");
    assert_eq!(get(&b, "/final"), b"b's final", "b's file was not replaced");
    assert_eq!(
        get(&b, "/draft"),
        b"a's draft",
        "a's file is still under its old name"
    );
}
