//! Issue 9, sections 1 and 5 on the client: a client never reuses a store
//! id after losing its index, `client_id` is kept with the index, and the
//! cache is private to its owner. Real clients against a real server.

mod client_util;
mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use client_util::{client, get, put};
use common::TempDir;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn a_client_that_lost_its_index_never_has_its_stores_dropped_as_replays() {
    let srv = client_util::start();
    let d = TempDir::new("ident-index");
    let cache = d.path().join("cache");
    let first_id = {
        let c = client(&srv, &cache);
        for i in 0..11 {
            put(&c, &format!("/f{i}"), format!("first {i}").as_bytes());
        }
        c.client_id()
    };
    // The index is lost (deleted, a fresh disk), client_id stays.
    std::fs::remove_file(cache.join("index.redb")).unwrap();
    let second_id = {
        let c = client(&srv, &cache);
        for i in 0..11 {
            put(&c, &format!("/f{i}"), format!("second {i}").as_bytes());
        }
        c.client_id()
    };
    let reader = client(&srv, &d.path().join("reader"));
    let arrived = (0..11)
        .filter(|i| get(&reader, &format!("/f{i}")) == format!("second {i}").as_bytes())
        .count();
    assert_eq!(arrived, 11, "every acknowledged store reaches the server");
    assert_ne!(first_id, second_id, "a new index takes a fresh client id");
    assert_eq!(std::fs::read(cache.join("client_id")).unwrap(), second_id);
}

#[test]
fn a_missing_or_damaged_client_id_file_is_rewritten_from_the_index() {
    let srv = client_util::start();
    let d = TempDir::new("ident-file");
    let cache = d.path().join("cache");
    let id = {
        let c = client(&srv, &cache);
        put(&c, "/a", b"1");
        c.client_id()
    };
    std::fs::remove_file(cache.join("client_id")).unwrap();
    {
        let c = client(&srv, &cache);
        assert_eq!(c.client_id(), id);
        put(&c, "/a", b"2");
    }
    assert_eq!(std::fs::read(cache.join("client_id")).unwrap(), id);
    std::fs::write(cache.join("client_id"), b"").unwrap();
    {
        let c = client(&srv, &cache);
        assert_eq!(c.client_id(), id);
        put(&c, "/a", b"3");
    }
    assert_eq!(std::fs::read(cache.join("client_id")).unwrap(), id);
    assert_eq!(mode(&cache.join("client_id")), 0o600);
    let reader = client(&srv, &d.path().join("reader"));
    assert_eq!(get(&reader, "/a"), b"3");
}

#[test]
fn the_cache_is_private_and_loose_modes_are_fixed_at_start() {
    let srv = client_util::start();
    let d = TempDir::new("ident-cmodes");
    let cache = d.path().join("cache");
    // A cache_dir made beforehand with the usual umask.
    std::fs::create_dir(&cache).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o755)).unwrap();
    let containers = |cache: &Path| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(cache.join("containers"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect()
    };
    {
        let c = client(&srv, &cache);
        put(&c, "/private", b"0600 on the server");
        assert_eq!(get(&c, "/private"), b"0600 on the server");
        assert_eq!(mode(&cache), 0o700, "cache_dir");
        assert_eq!(mode(&cache.join("client_id")), 0o600, "client_id");
        assert_eq!(mode(&cache.join("index.redb")), 0o600, "index.redb");
        let cs = containers(&cache);
        assert!(!cs.is_empty(), "the file is cached");
        for p in &cs {
            assert_eq!(mode(p), 0o600, "{}", p.display());
        }
    }
    // As an older version left them: fixed by the next start.
    let loosen =
        |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    loosen(&cache, 0o755);
    loosen(&cache.join("index.redb"), 0o644);
    loosen(&cache.join("client_id"), 0o644);
    // The file's container (the others are empty ones made ahead for the
    // next new files, removed at start as the index does not name them).
    let held = containers(&cache)
        .into_iter()
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0))
        .expect("the file's container");
    loosen(&held, 0o644);
    let c = client(&srv, &cache);
    assert_eq!(mode(&cache), 0o700);
    assert_eq!(mode(&cache.join("index.redb")), 0o600);
    assert_eq!(mode(&cache.join("client_id")), 0o600);
    assert_eq!(mode(&held), 0o600);
    assert_eq!(get(&c, "/private"), b"0600 on the server");
}
