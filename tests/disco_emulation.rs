//! Disconnected operation: with the server stopped, cached files stay
//! readable and writable, uncached ones fail at once, and everything done
//! meanwhile reaches the server when it is back.

mod client_util;
mod common;
mod disco_util;

use client_util::*;
use coda::client::{Client, ClientState, Event};
use coda::Error;
use common::TempDir;
use disco_util::*;

fn bytes(s: &str) -> Option<Vec<u8>> {
    Some(s.as_bytes().to_vec())
}

#[test]
fn changes_made_while_the_server_is_stopped_reach_it_when_it_returns() {
    let mut srv = start();
    let d = TempDir::new("c");
    let c = client(&srv, d.path());
    put(&c, "/a", b"version one");
    c.mkdir("/d", 0o755).unwrap();
    put(&c, "/d/b", b"bee");
    put(&c, "/d/gone", b"to be removed");
    c.symlink("/a", "/ln").unwrap();
    // A second client makes /u, which the first lists but never opens.
    let d2 = TempDir::new("c2");
    let other = client(&srv, d2.path());
    put(&other, "/u", b"never cached by c");
    drop(other);
    assert_eq!(names(&c, "/"), vec!["a", "d", "ln", "u"]);

    assert!(srv.stop());
    // Reads of cached objects succeed.
    assert_eq!(get(&c, "/a"), b"version one");
    disco_util::wait_disconnected(&c);
    assert_eq!(c.readlink("/ln").unwrap(), "/a");
    assert_eq!(get(&c, "/ln"), b"version one");
    // An object that was never cached fails at once, naming the path.
    let e = c.open("/u", libc::O_RDONLY, 0).err().expect("uncached");
    assert!(matches!(&e, Error::Timeout(m) if m.contains("/u")), "{e}");
    assert_eq!(e.code(), -libc::ETIMEDOUT);
    // Mutations are logged and succeed locally.
    put(&c, "/a", b"version two, offline");
    put(&c, "/d/new", b"made offline");
    c.mkdir("/e", 0o700).unwrap();
    put(&c, "/e/inner", b"inside a new dir");
    c.rename("/d/b", "/e/b").unwrap();
    c.unlink("/d/gone").unwrap();
    c.chmod("/a", 0o600).unwrap();
    c.symlink("/e/inner", "/ln2").unwrap();
    assert!(c.pending_records() > 0);
    // The local view shows them.
    assert_eq!(names(&c, "/"), vec!["a", "d", "e", "ln", "ln2", "u"]);
    assert_eq!(names(&c, "/e"), vec!["b", "inner"]);
    assert_eq!(get(&c, "/e/b"), b"bee");
    assert_eq!(get(&c, "/ln2"), b"inside a new dir");
    assert_eq!(c.stat("/a").unwrap().mode & 0o7777, 0o600);

    srv.restart();
    wait_reintegrated(&c);
    assert!(c.conflicts().unwrap().is_empty());
    let d3 = TempDir::new("c3");
    let fresh = client(&srv, d3.path());
    let t = tree(&fresh);
    let want: Vec<(&str, Option<Vec<u8>>)> = vec![
        ("/a", bytes("version two, offline")),
        ("/d", None),
        ("/d/new", bytes("made offline")),
        ("/e", None),
        ("/e/b", bytes("bee")),
        ("/e/inner", bytes("inside a new dir")),
        ("/ln", bytes("-> /a")),
        ("/ln2", bytes("-> /e/inner")),
        ("/u", bytes("never cached by c")),
    ];
    let want: std::collections::BTreeMap<String, Option<Vec<u8>>> =
        want.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    assert_eq!(t, want);
    assert_eq!(fresh.stat("/a").unwrap().mode & 0o7777, 0o600);
    assert_eq!(fresh.stat("/e").unwrap().mode & 0o7777, 0o700);
    // And the first client sees the same tree, now connected.
    assert_eq!(tree(&c), want);
}

#[test]
fn a_client_restarted_without_a_server_serves_its_cache_and_reintegrates_later() {
    let mut srv = start();
    let d = TempDir::new("c");
    {
        let c = client(&srv, d.path());
        put(&c, "/kept", b"cached before");
        c.mkdir("/dir", 0o755).unwrap();
    }
    assert!(srv.stop());
    {
        let c = client(&srv, d.path());
        assert_eq!(c.state(), ClientState::Disconnected);
        assert_eq!(get(&c, "/kept"), b"cached before");
        put(&c, "/dir/offline", b"written by a restarted client");
        c.unlink("/kept").unwrap();
    }
    // A cache that never saw a server cannot start offline.
    let empty = TempDir::new("empty");
    let e = Client::new(config(&srv, empty.path()))
        .err()
        .expect("refused");
    assert!(matches!(e, Error::Eio(_) | Error::Timeout(_)), "{e}");

    srv.restart();
    let c = client(&srv, d.path());
    wait_reintegrated(&c);
    let d2 = TempDir::new("c2");
    let fresh = client(&srv, d2.path());
    assert_eq!(names(&fresh, "/"), vec!["dir"]);
    assert_eq!(
        get(&fresh, "/dir/offline"),
        b"written by a restarted client"
    );
}

#[test]
fn creating_and_removing_offline_leaves_nothing_to_send() {
    let mut srv = start();
    let d = TempDir::new("c");
    let c = client(&srv, d.path());
    c.mkdir("/base", 0o755).unwrap();
    assert!(srv.stop());
    put(&c, "/base/tmp", b"scratch");
    put(&c, "/base/tmp", b"scratch again");
    c.chmod("/base/tmp", 0o600).unwrap();
    c.unlink("/base/tmp").unwrap();
    c.mkdir("/base/empty", 0o755).unwrap();
    c.rmdir("/base/empty").unwrap();
    assert_eq!(c.pending_records(), 0, "every record cancelled");
    assert!(names(&c, "/base").is_empty());
    // Rmdir of a non-empty directory is refused locally too.
    c.mkdir("/base/full", 0o755).unwrap();
    put(&c, "/base/full/x", b"x");
    let e = c.rmdir("/base/full").unwrap_err();
    assert!(matches!(e, Error::NotEmpty(_)), "{e}");
    srv.restart();
    wait_reintegrated(&c);
    let d2 = TempDir::new("c2");
    let fresh = client(&srv, d2.path());
    assert_eq!(names(&fresh, "/base"), vec!["full"]);
    assert_eq!(get(&fresh, "/base/full/x"), b"x");
}

#[test]
fn reintegration_progress_is_reported_as_events() {
    let mut srv = start();
    let d = TempDir::new("c");
    let c = client(&srv, d.path());
    put(&c, "/f", b"1");
    assert!(srv.stop());
    for i in 0..5 {
        put(&c, &format!("/n{i}"), b"n");
    }
    srv.restart();
    wait_reintegrated(&c);
    let mut records = 0;
    while let Some(ev) = c.events().next(std::time::Duration::from_millis(100)) {
        if let Event::Reintegrated { records: n, .. } = ev {
            records += n;
        }
    }
    // Five creates and five stores.
    assert_eq!(records, 10);
}
