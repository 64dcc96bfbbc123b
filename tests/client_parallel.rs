//! Connected writers of one client in parallel: each store is on the server
//! when its close returns, whatever the others do (their records share
//! Reintegrate batches, in store-id order).

mod client_util;
mod common;

use client_util::*;
use common::TempDir;

#[test]
fn parallel_connected_stores_and_creates_all_reach_the_server_in_order() {
    let srv = start();
    let d = TempDir::new("c");
    let c = client(&srv, d.path());
    for t in 0..4 {
        c.mkdir(&format!("/t{t}"), 0o755).unwrap();
    }
    std::thread::scope(|s| {
        for t in 0..4 {
            let c = c.clone();
            s.spawn(move || {
                for i in 0..40 {
                    let p = format!("/t{t}/f{i}");
                    put(&c, &p, format!("{p} v1").as_bytes());
                    // The same file again: a later store of it must win.
                    put(&c, &p, format!("{p} v2").as_bytes());
                }
            });
        }
    });
    assert_eq!(c.pending_records(), 0);
    // Another client sees every file, with its last contents.
    let d2 = TempDir::new("c2");
    let other = client(&srv, d2.path());
    for t in 0..4 {
        let mut n = names(&other, &format!("/t{t}"));
        n.sort();
        let mut want: Vec<String> = (0..40).map(|i| format!("f{i}")).collect();
        want.sort();
        assert_eq!(n, want);
        for i in 0..40 {
            let p = format!("/t{t}/f{i}");
            assert_eq!(get(&other, &p), format!("{p} v2").as_bytes());
        }
    }
}
