//! Hoarding: a profile of paths with priorities is prefetched by a hoard
//! walk, so those paths are there while disconnected; eviction keeps the
//! hoarded objects while unhoarded ones can go.

mod client_util;
mod common;

use client_util::*;
use coda::client::{Client, Expand};
use coda::Error;
use common::TempDir;

#[test]
fn a_hoard_walk_prefetches_the_profile_for_disconnected_use() {
    let mut srv = start();
    let (da, db) = (TempDir::new("a"), TempDir::new("b"));
    let b = client(&srv, db.path());
    b.mkdir("/proj", 0o755).unwrap();
    b.mkdir("/proj/sub", 0o755).unwrap();
    put(&b, "/proj/a", b"alpha");
    put(&b, "/proj/sub/deep", b"deep down");
    b.mkdir("/lib", 0o755).unwrap();
    b.mkdir("/lib/inner", 0o755).unwrap();
    put(&b, "/lib/top", b"top");
    put(&b, "/lib/inner/not", b"not hoarded: below the children");
    put(&b, "/other", b"not hoarded");

    let mut cfg = config(&srv, da.path());
    cfg.set("hoard_walk_ms", "0").unwrap();
    let a = Client::new(cfg).unwrap();
    a.hoard_load("/proj 100:d+\n/lib 20:c\n/missing 5\n")
        .unwrap();
    assert_eq!(a.hoard_list().unwrap().len(), 3);
    let r = a.hoard_walk().unwrap();
    assert_eq!(r.fetched, 3, "{r:?}"); // /proj/a, /proj/sub/deep, /lib/top
    assert_eq!(r.missing, 1);
    assert_eq!(a.hoard_walk().unwrap().fetched, 0, "already hoarded");

    assert!(srv.stop());
    assert_eq!(get(&a, "/proj/sub/deep"), b"deep down");
    assert_eq!(get(&a, "/proj/a"), b"alpha");
    assert_eq!(get(&a, "/lib/top"), b"top");
    assert_eq!(names(&a, "/lib/inner"), vec!["not"], "listed as a child");
    let e = a.open("/lib/inner/not", libc::O_RDONLY, 0).err().unwrap();
    assert!(matches!(e, Error::Timeout(_)), "{e}");
    let e = a.open("/other", libc::O_RDONLY, 0).err().unwrap();
    assert!(matches!(e, Error::Timeout(_)), "{e}");
    assert!(matches!(a.hoard_walk(), Err(Error::Timeout(_))));
    a.hoard_remove("/missing").unwrap();
    assert!(matches!(
        a.hoard_remove("/missing"),
        Err(Error::NotFound(_))
    ));
    a.hoard_add("/other", 1, Expand::Itself).unwrap();
    assert_eq!(a.hoard_list().unwrap()[0].path, "/proj");
}

#[test]
fn eviction_takes_unhoarded_objects_before_hoarded_ones() {
    let srv = start();
    let (da, db) = (TempDir::new("a"), TempDir::new("b"));
    let b = client(&srv, db.path());
    let kb = vec![7u8; 1000];
    for n in ["h1", "h2", "x", "y", "z"] {
        put(&b, &format!("/{n}"), &kb);
    }
    let mut cfg = config(&srv, da.path());
    cfg.set("hoard_walk_ms", "0").unwrap();
    cfg.set("cache_size", "3500").unwrap();
    let a = Client::new(cfg).unwrap();
    a.hoard_add("/h1", 100, Expand::Itself).unwrap();
    a.hoard_add("/h2", 50, Expand::Itself).unwrap();
    a.hoard_walk().unwrap();
    // Three unhoarded files through a cache of three and a half: they
    // push each other out, never the hoarded two.
    for n in ["/x", "/y", "/z", "/x", "/y"] {
        assert_eq!(get(&a, n), kb);
    }
    let before = a.stats().fetches;
    assert_eq!(get(&a, "/h1"), kb);
    assert_eq!(get(&a, "/h2"), kb);
    assert_eq!(a.stats().fetches, before, "hoarded files stayed cached");
}
