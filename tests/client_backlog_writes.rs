//! Writing while the client reintegrates a log it built during an outage:
//! every write is kept and none turns into a conflict, since nobody else
//! wrote (docs/CLIENT.md "Reintegration": a batch that changed a file twice
//! once left the older version as the next record's base, and a status
//! answered before an acknowledgement could set the cached version back).

mod client_util;
mod common;

use std::time::{Duration, Instant};

use client_util::*;
use common::TempDir;

#[test]
fn writes_while_an_outage_log_reintegrates_never_conflict_with_themselves() {
    let mut srv = start();
    let d = TempDir::new("backlog-writes");
    let mut cfg = config(&srv, &d.path().join("a"));
    cfg.set("heartbeat_ms", "50").unwrap();
    cfg.set("dead_after_ms", "300").unwrap();
    let a = coda::client::Client::new(cfg).unwrap();
    for f in 0..3 {
        put(&a, &format!("/f{f}"), b"first");
    }
    // Each round: an outage, writes logged, the server back, writes while
    // the log is sent. Before the fix a conflict came within 3 rounds in
    // most runs.
    let rounds = 6;
    let mut last = vec![Vec::new(); 3];
    for round in 0..rounds {
        srv.kill9();
        // Logged offline (the first write may find the server gone).
        for i in 0..20 {
            let f = i % 3;
            let data = format!("round {round} offline {i}").into_bytes();
            if try_put(&a, &format!("/f{f}"), &data).is_ok() {
                last[f] = data;
            }
        }
        srv.restart();
        // Keep writing while the client finds the server and sends its log.
        let t = Instant::now();
        let mut i = 0;
        while t.elapsed() < Duration::from_millis(1500) {
            let f = i % 3;
            let data = format!("round {round} online {i}").into_bytes();
            if try_put(&a, &format!("/f{f}"), &data).is_ok() {
                last[f] = data;
            }
            i += 1;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while a.pending_records() > 0 {
            let _ = a.reintegrate_now();
            assert!(Instant::now() < deadline, "the log drains");
            std::thread::sleep(Duration::from_millis(20));
        }
        let cs = a.conflicts().unwrap();
        assert!(
            cs.is_empty(),
            "round {round}: conflicts with nobody: {cs:?}"
        );
    }
    let b = client(&srv, &d.path().join("b"));
    for (f, want) in last.iter().enumerate() {
        assert_eq!(
            &get(&b, &format!("/f{f}")),
            want,
            "/f{f} holds the last write"
        );
    }
}
