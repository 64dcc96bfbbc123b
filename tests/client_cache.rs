//! The cache: reused across restarts after revalidation, bounded by
//! `cache_size` with least recently used files evicted first.

mod client_util;
mod common;

use client_util::*;
use coda::client::Client;
use common::TempDir;

#[test]
fn a_restarted_client_revalidates_unchanged_files_instead_of_refetching() {
    let srv = start();
    let (da, db) = (TempDir::new("a"), TempDir::new("b"));
    let a = client(&srv, da.path());
    put(&a, "/same", b"unchanged");
    put(&a, "/other", b"before");

    let b = client(&srv, db.path());
    assert_eq!(get(&b, "/same"), b"unchanged");
    assert_eq!(get(&b, "/other"), b"before");
    assert_eq!(b.stats().fetches, 2);
    let id = b.client_id();
    drop(b);

    put(&a, "/other", b"after!");

    let b = client(&srv, db.path());
    assert_eq!(
        b.client_id(),
        id,
        "the client id persists in the cache directory"
    );
    assert_eq!(get(&b, "/same"), b"unchanged");
    assert_eq!(
        b.stats().fetches,
        0,
        "an unchanged file is revalidated, not refetched"
    );
    assert!(b.stats().validations_unchanged >= 1);
    assert_eq!(get(&b, "/other"), b"after!");
    assert_eq!(b.stats().fetches, 1, "only the changed file is fetched");
}

fn container_exists(c: &Client, cache_dir: &std::path::Path, path: &str) -> bool {
    let fid = c.stat(path).unwrap().fid;
    cache_dir.join("containers").join(fid.to_string()).exists()
}

#[test]
fn cache_size_evicts_least_recently_used_first_and_never_an_open_file() {
    let srv = start();
    let (da, db) = (TempDir::new("a"), TempDir::new("b"));
    let a = client(&srv, da.path());
    let mb = vec![7u8; 1 << 20];
    for n in 1..=5 {
        put(&a, &format!("/e{n}"), &mb);
    }
    let mut cfg = config(&srv, db.path());
    cfg.set("cache_size", "3M").unwrap();
    let b = Client::new(cfg).unwrap();

    get(&b, "/e1");
    get(&b, "/e2");
    get(&b, "/e3");
    get(&b, "/e1"); // e1 is now more recent than e2
    assert_eq!(b.stats().fetches, 3);
    get(&b, "/e4");
    assert!(
        !container_exists(&b, db.path(), "/e2"),
        "least recently used went first"
    );
    assert!(container_exists(&b, db.path(), "/e1"));
    let before = b.stats().fetches;
    get(&b, "/e1");
    get(&b, "/e3");
    assert_eq!(b.stats().fetches, before, "recently used files stayed");

    // An open file is never evicted, even when it is the least recently used.
    let held = b.open("/e4", libc::O_RDONLY, 0).unwrap();
    get(&b, "/e2");
    get(&b, "/e5");
    get(&b, "/e1");
    assert!(container_exists(&b, db.path(), "/e4"));
    assert_eq!(read_file(&held), mb);
    held.close().unwrap();
}

/// An unlink, a rename (over another file, and into another directory) and
/// a hard link each save their index changes (the object, a replaced one,
/// the listings' edits) together: after a restart the cached listings are
/// the server's, reused without a readdir, and every entry is right.
#[test]
fn namespace_changes_are_saved_whole_and_reused_after_a_restart() {
    let srv = start();
    let d = TempDir::new("ns");
    let c = client(&srv, d.path());
    c.mkdir("/a", 0o755).unwrap();
    c.mkdir("/b", 0o755).unwrap();
    for n in ["gone", "old", "over", "moved", "linked"] {
        put(&c, &format!("/a/{n}"), n.as_bytes());
    }
    c.unlink("/a/gone").unwrap();
    c.rename("/a/old", "/a/over").unwrap();
    c.rename("/a/moved", "/b/moved").unwrap();
    let (f, b) = (c.stat("/a/linked").unwrap().fid, c.stat("/b").unwrap().fid);
    c.link_at(f, b, "link").unwrap();
    let names = |c: &Client, p: &str| {
        let mut v: Vec<String> = c.readdir(p).unwrap().into_iter().map(|e| e.name).collect();
        v.sort();
        v
    };
    assert_eq!(names(&c, "/a"), ["linked", "over"]);
    assert_eq!(names(&c, "/b"), ["link", "moved"]);
    drop(c);

    let c = client(&srv, d.path());
    assert_eq!(names(&c, "/a"), ["linked", "over"]);
    assert_eq!(names(&c, "/b"), ["link", "moved"]);
    assert_eq!(
        c.stats().readdir_rpcs,
        0,
        "the listings saved before the restart are current"
    );
    assert_eq!(get(&c, "/a/over"), b"old");
    assert_eq!(get(&c, "/b/moved"), b"moved");
    assert_eq!(get(&c, "/b/link"), b"linked");
    assert_eq!(c.stat("/a/linked").unwrap().nlink, 2);
    assert!(c.stat("/a/gone").is_err());
    assert!(c.stat("/a/old").is_err());
}
