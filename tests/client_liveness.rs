//! Liveness: a dead or silent server fails calls promptly, and the next call
//! after it is back opens a new session.

mod client_util;
mod common;

use std::time::{Duration, Instant};

use client_util::*;
use coda::client::Client;
use coda::Error;
use common::TempDir;

#[test]
fn client_and_file_can_be_shared_and_sent_across_threads() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Client>();
    send::<coda::client::File>();
}

#[test]
fn many_threads_use_one_client_at_once() {
    let srv = start();
    let d = TempDir::new("c");
    let c = client(&srv, d.path());
    std::thread::scope(|s| {
        for t in 0..8 {
            let c = c.clone();
            s.spawn(move || {
                c.mkdir(&format!("/t{t}"), 0o755).unwrap();
                for i in 0..5 {
                    let p = format!("/t{t}/f{i}");
                    put(&c, &p, p.as_bytes());
                    assert_eq!(get(&c, &p), p.as_bytes());
                }
            });
        }
    });
    assert_eq!(names(&c, "/").len(), 8);
    assert_eq!(names(&c, "/t3"), vec!["f0", "f1", "f2", "f3", "f4"]);
}

#[test]
fn a_silent_server_is_declared_dead_after_dead_after_ms_not_the_rpc_timeout() {
    let srv = start();
    let d = TempDir::new("c");
    let mut cfg = config(&srv, d.path());
    cfg.set("heartbeat_ms", "100").unwrap();
    cfg.set("dead_after_ms", "500").unwrap();
    cfg.set("rpc_timeout_ms", "20000").unwrap();
    // Connected-mode liveness: with disconnected operation the mkdir would
    // succeed locally (tests/disco_*.rs cover that).
    cfg.set("disconnected_operation", "false").unwrap();
    let c = Client::new(cfg).unwrap();
    put(&c, "/f", b"x");
    srv.sigstop();
    let t0 = Instant::now();
    let e = c.mkdir("/d", 0o755).unwrap_err();
    let took = t0.elapsed();
    srv.sigcont();
    assert!(
        matches!(e, Error::Eio(ref m) if m.contains(&srv.addr().to_string())),
        "{e}"
    );
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[test]
fn a_killed_server_fails_calls_at_once_and_the_next_call_reconnects() {
    let mut srv = start();
    let d = TempDir::new("c");
    let mut cfg = config(&srv, d.path());
    cfg.set("disconnected_operation", "false").unwrap();
    let c = Client::new(cfg).unwrap();
    put(&c, "/f", b"kept");
    srv.kill9();
    let t0 = Instant::now();
    let e = c.mkdir("/g", 0o755).unwrap_err();
    assert!(matches!(e, Error::Eio(_) | Error::Timeout(_)), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(3));
    srv.restart();
    // A new session: callbacks are gone, so this revalidates with the server.
    assert_eq!(c.stat("/f").unwrap().size, 4);
    c.mkdir("/g", 0o755).unwrap();
    assert_eq!(names(&c, "/"), vec!["f", "g"]);
}
