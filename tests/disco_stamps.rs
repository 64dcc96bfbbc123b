//! Volume version stamps and volume callbacks: an unchanged volume is
//! revalidated with one request, a changed one in batches of many fids, and
//! a change by another client breaks the volume callback.

mod client_util;
mod common;
mod disco_util;

use client_util::*;
use common::TempDir;

const N: usize = 30;

fn paths() -> Vec<String> {
    (0..N).map(|i| format!("/f{i}")).collect()
}

#[test]
fn an_unchanged_volume_costs_one_request_and_a_changed_one_a_batch() {
    let srv = start();
    let (da, db) = (TempDir::new("a"), TempDir::new("b"));
    {
        let a = client(&srv, da.path());
        for p in paths() {
            put(&a, &p, p.as_bytes());
        }
        assert_eq!(names(&a, "/").len(), N);
    }
    // Restart with nothing changed: one ValidateVolume, no GetAttrs, and
    // every cached file is used as it is.
    {
        let a = client(&srv, da.path());
        let s = a.stats();
        assert_eq!((s.volume_validations, s.getattr_rpcs), (1, 0));
        assert!(s.validations_unchanged > N as u64);
        for p in paths() {
            assert_eq!(get(&a, &p), p.as_bytes());
        }
        let s = a.stats();
        assert_eq!((s.getattr_rpcs, s.fetches, s.readdir_rpcs), (0, 0, 0));
        // Another client's change breaks the volume callback: the changed
        // file is fetched again, never served stale.
        let b = client(&srv, db.path());
        put(&b, "/f3", b"changed by b");
        assert_eq!(get(&a, "/f3"), b"changed by b");
    }
    // Changed since the stamp: the objects are checked in one batch.
    let b = client(&srv, db.path());
    put(&b, "/f7", b"changed again");
    drop(b);
    let a = client(&srv, da.path());
    let s = a.stats();
    assert_eq!(s.volume_validations, 1);
    assert_eq!(s.getattr_rpcs, 1, "all {N} files in one GetAttrs");
    for p in paths() {
        let want: &[u8] = match p.as_str() {
            "/f3" => b"changed by b",
            "/f7" => b"changed again",
            _ => p.as_bytes(),
        };
        assert_eq!(get(&a, &p), want);
    }
    assert_eq!(a.stats().fetches, 1, "only /f7 is fetched");
}

#[test]
fn after_the_server_returns_an_unchanged_volume_is_validated_by_its_stamp() {
    let mut srv = start();
    let d = TempDir::new("a");
    {
        let a = client(&srv, d.path());
        for p in paths() {
            put(&a, &p, p.as_bytes());
        }
    }
    let a = client(&srv, d.path());
    let before = a.stats();
    assert!(srv.stop());
    assert_eq!(get(&a, "/f1"), b"/f1");
    srv.restart();
    disco_util::wait_reintegrated(&a);
    for p in paths() {
        assert_eq!(get(&a, &p), p.as_bytes());
    }
    let after = a.stats();
    assert!(after.volume_validations > before.volume_validations);
    assert_eq!(
        after.getattr_rpcs, before.getattr_rpcs,
        "no per-file checks"
    );
    assert_eq!(after.fetches, before.fetches);
}
