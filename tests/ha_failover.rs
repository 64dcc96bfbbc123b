//! High availability: failure detection, automatic failover, failback, and
//! the events for each transition, against real coda-server processes.
//! No timing thresholds: outcomes are asserted, waits are generous bounds.

mod client_util;
mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use client_util::*;
use coda::client::{Client, ClientState, Config, Event};
use coda::Error;
use common::{TempDir, TestServer};

/// `dir/web` -> `dir/remote`, and an empty `dir/local` to fail over to.
fn failover_link(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (link, remote, local) = (dir.join("web"), dir.join("remote"), dir.join("local"));
    std::fs::create_dir(&remote).unwrap();
    std::fs::create_dir(&local).unwrap();
    std::os::unix::fs::symlink(&remote, &link).unwrap();
    (link, remote, local)
}

/// Fast probing, a long RPC timeout (so only liveness can end a wait), and
/// automatic failover of `link` to `local`.
fn ha_config(srv: &TestServer, cache: &Path, link: &Path, local: &Path) -> Config {
    let mut cfg = config(srv, cache);
    cfg.set("heartbeat_ms", "100").unwrap();
    cfg.set("dead_after_ms", "500").unwrap();
    cfg.set("rpc_timeout_ms", "60000").unwrap();
    cfg.set("failover_link", link.to_str().unwrap()).unwrap();
    cfg.set("failover_target", local.to_str().unwrap()).unwrap();
    cfg
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The scheduler state (R, S, D, ...) of one of this process's threads.
fn thread_state(tid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    // "tid (comm) S ...": the state follows the last ')'.
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

/// Whether a TCP connection to the local `port` holds bytes its owner has
/// not read (a request sent to a stopped server).
fn unread_at(port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp is readable");
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let local_port = f
            .get(1)
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| u16::from_str_radix(p, 16).ok());
        let state = f.get(3).copied();
        let rx_queue = f
            .get(4)
            .and_then(|q| q.split(':').nth(1))
            .and_then(|q| u64::from_str_radix(q, 16).ok());
        // 01: established; a listening socket's queue counts connections.
        local_port == Some(port) && state == Some("01") && rx_queue.unwrap_or(0) > 0
    })
}

/// Events other than callback breaks, pulled until `last` arrives.
fn transitions_until(c: &Client, last: fn(&Event) -> bool) -> Vec<Event> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = c
            .events()
            .next(left)
            .unwrap_or_else(|| panic!("no final event; saw {seen:?}"));
        if matches!(ev, Event::CallbackBreak { .. }) {
            continue;
        }
        let done = last(&ev);
        seen.push(ev);
        if done {
            return seen;
        }
    }
}

fn kinds(evs: &[Event]) -> Vec<&'static str> {
    evs.iter()
        .map(|e| match e {
            Event::ServerDown { .. } => "down",
            Event::ServerUp { .. } => "up",
            Event::Failover { .. } => "failover",
            Event::Failback { .. } => "failback",
            Event::CallbackBreak { .. } => "break",
            Event::Reintegrated { .. } => "reintegrated",
            Event::Conflict { .. } => "conflict",
            Event::ReintegrationStalled { .. } => "stalled",
            Event::LeaderChanged { .. } => "leader",
            Event::MemberDown { .. } => "member down",
            Event::MemberUp { .. } => "member up",
            _ => "other",
        })
        .collect()
}

fn points_to(link: &Path, target: &Path) -> bool {
    std::fs::read_link(link).is_ok_and(|t| t == target)
}

#[test]
fn killed_server_fails_over_by_itself_and_remote_calls_get_eio() {
    let mut srv = start();
    let d = TempDir::new("ha");
    let (link, _remote, local) = failover_link(d.path());
    let c = Client::new(ha_config(&srv, &d.path().join("c"), &link, &local)).unwrap();
    put(&c, "/f", b"data");
    assert_eq!(c.state(), ClientState::Connected);

    srv.kill9();
    let evs = transitions_until(&c, |e| matches!(e, Event::Failover { .. }));
    assert_eq!(kinds(&evs), ["down", "failover"]);
    assert!(
        points_to(&link, &local),
        "readers of the link see the local copy"
    );
    assert_eq!(c.state(), ClientState::FailedOver);
    assert!(matches!(c.stat("/f"), Err(Error::Eio(_))));
    assert!(matches!(c.mkdir("/g", 0o755), Err(Error::Eio(_))));
}

#[test]
fn hung_server_fails_over_and_a_fetch_blocked_on_it_gets_eio() {
    let srv = start();
    let d = TempDir::new("ha");
    let (link, _remote, local) = failover_link(d.path());
    let c = Client::new(ha_config(&srv, &d.path().join("c"), &link, &local)).unwrap();
    // Written by another client, so `c` must fetch it from the server.
    let w = client(&srv, &d.path().join("w"));
    put(&w, "/big", &vec![7u8; 1 << 20]);

    srv.sigstop();
    let (tx, rx) = crossbeam_channel::bounded(1);
    let c2 = c.clone();
    std::thread::spawn(move || {
        let _ = tx.send(c2.open("/big", libc::O_RDONLY, 0).map(|_| ()));
    });
    let r = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the blocked open returns");
    assert!(matches!(r, Err(Error::Eio(_))), "{r:?}");
    wait_until("failover", || c.state() == ClientState::FailedOver);
    assert!(points_to(&link, &local));
    srv.sigcont();
}

#[test]
fn failover_by_call_fails_a_read_blocked_on_a_hung_server() {
    let srv = start();
    let d = TempDir::new("ha");
    let (link, _remote, local) = failover_link(d.path());
    let mut cfg = config(&srv, &d.path().join("c"));
    // Liveness would take a minute: only the failover call can end the wait.
    cfg.set("dead_after_ms", "60000").unwrap();
    cfg.set("rpc_timeout_ms", "60000").unwrap();
    let c = Client::new(cfg).unwrap();
    let w = client(&srv, &d.path().join("w"));
    put(&w, "/big", &vec![7u8; 1 << 20]);
    put(&w, "/small", b"x");

    srv.sigstop();
    let (tx, rx) = crossbeam_channel::unbounded();
    let (tid_tx, tid_rx) = crossbeam_channel::unbounded();
    for path in ["/big", "/small"] {
        let (c, tx, tid_tx) = (c.clone(), tx.clone(), tid_tx.clone());
        std::thread::spawn(move || {
            let _ = tid_tx.send(unsafe { libc::gettid() });
            let _ = tx.send(c.open(path, libc::O_RDONLY, 0).map(|_| ()));
        });
    }
    let c3 = c.clone();
    std::thread::spawn(move || {
        let _ = tid_tx.send(unsafe { libc::gettid() });
        let _ = tx.send(c3.stat("/small").map(|_| ()));
    });
    // Wait until the calls are blocked: every caller asleep in the kernel and
    // a request sitting unread at the stopped server.
    let tids: Vec<i32> = (0..3)
        .map(|_| tid_rx.recv_timeout(Duration::from_secs(20)).unwrap())
        .collect();
    wait_until("the calls to block on the hung server", || {
        tids.iter().all(|t| thread_state(*t) == Some('S')) && unread_at(srv.addr().port())
    });
    assert!(
        rx.try_recv().is_err(),
        "nothing finishes while the server hangs"
    );
    c.failover(&link, &local).unwrap();
    for _ in 0..3 {
        let r = rx.recv_timeout(Duration::from_secs(10)).expect("returns");
        assert!(matches!(r, Err(Error::Eio(_))), "{r:?}");
    }
    assert!(points_to(&link, &local));
    srv.sigcont();
}

#[test]
fn failback_by_call_waits_for_a_server_and_revalidates_first() {
    let mut srv = start();
    let d = TempDir::new("ha");
    let (link, remote, local) = failover_link(d.path());
    let c = Client::new(ha_config(&srv, &d.path().join("c"), &link, &local)).unwrap();
    put(&c, "/f", b"kept");
    srv.kill9();
    transitions_until(&c, |e| matches!(e, Event::Failover { .. }));

    let e = c.failback(&link, &remote).unwrap_err();
    assert!(matches!(e, Error::Again(_)), "{e}");
    assert!(points_to(&link, &local), "no server: the link stays");
    assert_eq!(c.state(), ClientState::FailedOver);

    srv.restart();
    // Revalidation is GetAttrs, or one ValidateVolume for a volume whose
    // stamp shows it unchanged (disconnected operation's volume stamps).
    let checks = |c: &Client| c.stats().getattr_rpcs + c.stats().volume_validations;
    let before = checks(&c);
    c.failback(&link, &remote).unwrap();
    assert!(checks(&c) > before, "revalidated before the swap");
    assert!(points_to(&link, &remote));
    assert_eq!(c.state(), ClientState::Connected);
    assert_eq!(get(&c, "/f"), b"kept");
    let evs = transitions_until(&c, |e| matches!(e, Event::Failback { .. }));
    assert_eq!(kinds(&evs), ["up", "failback"]);
}

#[test]
fn automatic_failback_once_servers_answer_again() {
    let mut srv = start();
    let d = TempDir::new("ha");
    let (link, remote, local) = failover_link(d.path());
    let mut cfg = ha_config(&srv, &d.path().join("c"), &link, &local);
    cfg.set("failback_after_ms", "300").unwrap();
    let c = Client::new(cfg).unwrap();
    put(&c, "/f", b"kept");

    srv.kill9();
    wait_until("failover", || points_to(&link, &local));
    srv.restart();
    wait_until("failback", || points_to(&link, &remote));
    let evs = transitions_until(&c, |e| matches!(e, Event::Failback { .. }));
    assert_eq!(kinds(&evs), ["down", "failover", "up", "failback"]);
    assert_eq!(c.state(), ClientState::Connected);
    assert_eq!(get(&c, "/f"), b"kept");
}

#[test]
fn a_stopped_then_continued_server_is_one_down_and_one_up() {
    let srv = start();
    let d = TempDir::new("ha");
    let mut cfg = config(&srv, d.path());
    cfg.set("heartbeat_ms", "100").unwrap();
    cfg.set("dead_after_ms", "500").unwrap();
    let c = Client::new(cfg).unwrap();
    put(&c, "/f", b"x");

    srv.sigstop();
    let evs = transitions_until(&c, |e| matches!(e, Event::ServerDown { .. }));
    assert_eq!(kinds(&evs), ["down"]);
    assert_eq!(c.state(), ClientState::Disconnected);
    srv.sigcont();
    let evs = transitions_until(&c, |e| matches!(e, Event::ServerUp { .. }));
    assert_eq!(kinds(&evs), ["up"], "hysteresis: one up, no flapping");
    assert_eq!(c.state(), ClientState::Connected);
    // Nothing more happens while the server stays up.
    std::thread::sleep(Duration::from_millis(700));
    let later: Vec<_> = std::iter::from_fn(|| c.events().next(Duration::ZERO))
        .filter(|e| !matches!(e, Event::CallbackBreak { .. }))
        .collect();
    assert!(later.is_empty(), "{later:?}");
    assert_eq!(get(&c, "/f"), b"x");
}
