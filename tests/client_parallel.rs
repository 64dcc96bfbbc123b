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

/// Connected writers in parallel when the server dies (`kill -9`): every
/// call ends promptly (its record kept for disconnected operation, none
/// waiting out the RPC timeout behind a record that cannot be sent), and
/// everything arrives once the server is back.
#[test]
fn parallel_writers_when_the_server_dies_keep_their_records_and_none_is_stuck() {
    use std::sync::mpsc;
    use std::time::Duration;
    let mut srv = start();
    let d = TempDir::new("c");
    let mut cfg = config(&srv, d.path());
    cfg.set("heartbeat_ms", "100").unwrap();
    cfg.set("dead_after_ms", "500").unwrap();
    // A writer stuck behind an unsendable record would wait minutes.
    cfg.set("rpc_timeout_ms", "60000").unwrap();
    let c = coda::client::Client::new(cfg).unwrap();
    for t in 0..4 {
        c.mkdir(&format!("/t{t}"), 0o755).unwrap();
    }
    let (tx, rx) = mpsc::channel();
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let c = c.clone();
            let tx = tx.clone();
            std::thread::spawn(move || {
                for i in 0..30 {
                    c.mkdir(&format!("/t{t}/d{i}"), 0o755).unwrap();
                    tx.send((t, i)).unwrap();
                }
            })
        })
        .collect();
    // Let some go through connected, then kill the server under them.
    for _ in 0..20 {
        rx.recv_timeout(Duration::from_secs(30))
            .expect("writers progress");
    }
    srv.kill9();
    for _ in 20..120 {
        rx.recv_timeout(Duration::from_secs(30))
            .expect("every writer's call ends once the server is gone");
    }
    for w in writers {
        w.join().unwrap();
    }
    srv.restart();
    c.reintegrate_now().unwrap();
    assert_eq!(c.pending_records(), 0);
    let d2 = TempDir::new("c2");
    let other = client(&srv, d2.path());
    for t in 0..4 {
        assert_eq!(names(&other, &format!("/t{t}")).len(), 30);
    }
}

/// With `CODA_CLIENT_HOLD` (a measuring knob: a leader waits for several
/// records before it sends) every store still reaches the server, from 4
/// writers that fill the batch and from a lone one that never does (each
/// of its batches goes when the hold's time is up).
#[test]
fn held_batches_still_carry_every_store() {
    // Read when a client starts; the other tests here only get slower.
    std::env::set_var("CODA_CLIENT_HOLD", "4:2000");
    let srv = start();
    let d = TempDir::new("c");
    let c = client(&srv, d.path());
    std::env::remove_var("CODA_CLIENT_HOLD");
    for t in 0..4 {
        c.mkdir(&format!("/h{t}"), 0o755).unwrap();
    }
    std::thread::scope(|s| {
        for t in 0..4 {
            let c = c.clone();
            s.spawn(move || {
                for i in 0..20 {
                    let p = format!("/h{t}/f{i}");
                    put(&c, &p, p.as_bytes());
                }
            });
        }
    });
    put(&c, "/h0/alone", b"alone");
    assert_eq!(c.pending_records(), 0);
    let d2 = TempDir::new("c2");
    let other = client(&srv, d2.path());
    for t in 0..4 {
        assert_eq!(
            names(&other, &format!("/h{t}")).len(),
            20 + usize::from(t == 0)
        );
        for i in 0..20 {
            let p = format!("/h{t}/f{i}");
            assert_eq!(get(&other, &p), p.as_bytes());
        }
    }
    assert_eq!(get(&other, "/h0/alone"), b"alone");
}
