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
