//! The client's mode: when it leaves "connected", every call that was
//! waiting on the server is released at once into the new mode.

mod client_util;
mod common;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use client_util::*;
use coda::client::{Client, ClientState};
use common::TempDir;

/// With no failover configured, a reader of a cached file that meets a hung
/// (SIGSTOPped) server waits in a handshake or for a reply that only the
/// server could end (`rpc_timeout_ms` is a minute here). Once the prober
/// judges the server dead (`dead_after_ms`), disconnected operation takes
/// over and the reader is answered from the cache, not after the minute.
#[test]
fn readers_blocked_on_a_hung_server_are_answered_from_the_cache_once_it_is_judged_dead() {
    let srv = start();
    let d = TempDir::new("c");
    let mut cfg = config(&srv, d.path());
    cfg.set("heartbeat_ms", "100").unwrap();
    cfg.set("dead_after_ms", "500").unwrap();
    cfg.set("rpc_timeout_ms", "60000").unwrap();
    let c = Client::new(cfg).unwrap();
    put(&c, "/f", b"cached");
    assert_eq!(get(&c, "/f"), b"cached");
    srv.sigstop();
    let (tx, rx) = mpsc::channel();
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let c = c.clone();
            let tx = tx.clone();
            std::thread::spawn(move || {
                // Read until the client serves from the cache, then a few
                // more times; every read must succeed with the cached data.
                let mut after = 0;
                let deadline = Instant::now() + Duration::from_secs(25);
                while Instant::now() < deadline {
                    assert_eq!(get(&c, "/f"), b"cached");
                    if c.state() == ClientState::Disconnected {
                        after += 1;
                        if after == 5 {
                            break;
                        }
                    }
                }
                tx.send(after).unwrap();
            })
        })
        .collect();
    for _ in 0..3 {
        let after = rx.recv_timeout(Duration::from_secs(30)).expect(
            "a reader stayed blocked on the hung server (it should be released \
             when the server is judged dead, long before rpc_timeout_ms)",
        );
        assert_eq!(after, 5);
    }
    for r in readers {
        r.join().unwrap();
    }
    srv.sigcont();
}
