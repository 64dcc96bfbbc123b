//! Several Reintegrate batches of one client in flight at once (connected
//! writers of several threads). A batch the server refuses in the middle of
//! the pipeline fails the batches sent after it (`NotApplied`); their
//! records go again and apply, in order; the refused record's writer alone
//! hears the error, and no record is ever taken as applied that was not.

mod client_util;
mod common;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use client_util::*;
use coda::client::Client;
use coda::Error;
use common::{TempDir, TestServer};

/// The server's largest file: a truncate past it is refused by the server
/// (the client does not know the bound), at that record of its batch.
const MAX_FILE: u64 = 1 << 20;

fn server() -> TestServer {
    // A long break timeout: a client that hears nothing while the server
    // is stopped still trusts its callbacks (no Ping before its mkdir).
    TestServer::start_with(&[
        "--max-file-size",
        &MAX_FILE.to_string(),
        "--break-timeout-ms",
        "60000",
    ])
}

/// Wait (bounded) until `cond` holds.
fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Resumes a stopped server even if the test fails first.
struct Cont<'a>(&'a TestServer);

impl Drop for Cont<'_> {
    fn drop(&mut self) {
        self.0.sigcont();
    }
}

/// The server is stopped (SIGSTOP) so the batches queue in flight: first
/// a truncate the server will refuse, then one mkdir per thread, each
/// written (as `ReintegrateAfter` the one before it) before any answer.
/// Once the server runs again: the truncate's caller gets `Invalid`, the
/// batches behind it are answered `NotApplied` and sent again, every mkdir
/// returns Ok and is on the server, and the log is empty.
#[test]
fn batches_behind_a_refused_one_are_not_applied_then_sent_again() {
    let srv = server();
    let d = TempDir::new("c");
    let mut cfg = config(&srv, d.path());
    // The stop must not look like a dead server.
    cfg.set("dead_after_ms", "60000").unwrap();
    cfg.set("rpc_timeout_ms", "60000").unwrap();
    let c = Client::new(cfg).unwrap();
    put(&c, "/big", b"small");
    c.mkdir("/d", 0o755).unwrap();
    let base = c.stats();

    let (tx, rx) = mpsc::channel();
    let cont = Cont(&srv);
    srv.sigstop();
    let bad = {
        let (c, tx) = (c.clone(), tx.clone());
        std::thread::spawn(move || {
            let r = c.truncate("/big", 2 * MAX_FILE);
            tx.send(("bad".to_string(), r)).unwrap();
        })
    };
    wait_for("the truncate's batch to be sent", || {
        c.stats().batches_sent == base.batches_sent + 1
    });
    const THREADS: usize = 4;
    let makers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (c, tx) = (c.clone(), tx.clone());
            std::thread::spawn(move || {
                let p = format!("/d/m{t}");
                let r = c.mkdir(&p, 0o755);
                tx.send((p, r)).unwrap();
            })
        })
        .collect();
    // At least one batch is in flight behind the truncate's.
    wait_for("a batch behind it", || {
        c.stats().batches_sent >= base.batches_sent + 2
    });
    drop(cont);
    bad.join().unwrap();
    for m in makers {
        m.join().unwrap();
    }
    drop(tx);
    let mut results: Vec<(String, coda::Result<()>)> = rx.iter().collect();
    results.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(results.len(), THREADS + 1);
    for (p, r) in &results {
        if p == "bad" {
            assert!(matches!(r, Err(Error::Invalid(_))), "the truncate: {r:?}");
        } else {
            assert!(r.is_ok(), "{p}: {r:?}");
        }
    }
    let st = c.stats();
    assert!(
        st.batches_not_applied > base.batches_not_applied,
        "a batch behind the refused one was answered NotApplied: {st:?}"
    );
    assert_eq!(c.pending_records(), 0);
    // Another client sees exactly the applied records.
    let d2 = TempDir::new("c2");
    let other = client(&srv, d2.path());
    let want: Vec<String> = (0..THREADS).map(|t| format!("m{t}")).collect();
    assert_eq!(names(&other, "/d"), want);
    assert_eq!(get(&other, "/big"), b"small");
}

/// Four threads of one client store small files concurrently; each also
/// makes, now and then, a truncate the server refuses. Whatever batches
/// the records share and however the pipeline interleaves them, each
/// refused call gets `Invalid`, every other call is on the server with
/// its contents (a later store of a file wins), and the log ends empty.
#[test]
fn parallel_stores_with_refused_records_in_the_middle_all_apply_in_order() {
    let srv = server();
    let d = TempDir::new("c");
    let c = client(&srv, d.path());
    const THREADS: usize = 4;
    const FILES: usize = 24;
    for t in 0..THREADS {
        c.mkdir(&format!("/t{t}"), 0o755).unwrap();
        put(&c, &format!("/t{t}/big"), b"kept");
    }
    let base = c.stats();
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let c = c.clone();
            s.spawn(move || {
                for i in 0..FILES {
                    let p = format!("/t{t}/f{i}");
                    put(&c, &p, format!("{p} v1").as_bytes());
                    if i % 6 == 3 {
                        let r = c.truncate(&format!("/t{t}/big"), 2 * MAX_FILE);
                        assert!(matches!(r, Err(Error::Invalid(_))), "{t}/{i}: {r:?}");
                    }
                    put(&c, &p, format!("{p} v2").as_bytes());
                }
            });
        }
    });
    assert_eq!(c.pending_records(), 0);
    let st = c.stats();
    println!(
        "{} batches sent, {} answered NotApplied, {} records in {} batches applied",
        st.batches_sent - base.batches_sent,
        st.batches_not_applied - base.batches_not_applied,
        st.records_reintegrated - base.records_reintegrated,
        st.reintegrations - base.reintegrations
    );
    let d2 = TempDir::new("c2");
    let other = client(&srv, d2.path());
    for t in 0..THREADS {
        let mut want: Vec<String> = (0..FILES).map(|i| format!("f{i}")).collect();
        want.push("big".into());
        want.sort();
        assert_eq!(names(&other, &format!("/t{t}")), want);
        for i in 0..FILES {
            let p = format!("/t{t}/f{i}");
            assert_eq!(get(&other, &p), format!("{p} v2").as_bytes());
        }
        assert_eq!(get(&other, &format!("/t{t}/big")), b"kept");
    }
}
