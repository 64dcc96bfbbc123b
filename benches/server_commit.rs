//! Small durable commits from many sessions (issue 11): 1, 4 and 16 raw
//! sessions each commit batches of a Create and a Store of 4 KiB (uploaded
//! first on the session's bulk connection) as fast as the server answers,
//! for a bounded time. Run twice in one go: with group commit (the default)
//! and with it turned off (`CODA_SERVER_NO_GROUP_COMMIT=1` in the server's
//! environment, a knob only for this comparison).
//!
//!   cargo bench --bench server_commit        (CODA_BENCH_QUICK=1 for a short run)
//!
//! Printed per mode and session count: batches committed, commits/s, the
//! ratio to one session in the same mode, and grouped against not grouped.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coda::proto::{Fid, Msg};

mod common;
use common::BenchServer as Server;

#[allow(dead_code)]
#[path = "../tests/common/raw.rs"]
mod raw;
use raw::{rec, Raw};

const SESSIONS: [usize; 3] = [1, 4, 16];
const FILE: usize = 4096;

/// One session committing until `stop`; returns its batches committed.
fn session(addr: SocketAddr, secret: &Path, n: u8, tag: u8, stop: &AtomicBool) -> u64 {
    let id = [tag, n, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let mut c = Raw::control(addr, secret, id, 1);
    let mut b = Raw::bulk(addr, secret, id, 1);
    // The upload's header and bytes go in two writes: without this, Nagle
    // and the peer's delayed ack add ~40 ms to every batch.
    c.stream.set_nodelay(true).unwrap();
    b.stream.set_nodelay(true).unwrap();
    let dir = c.alloc(1)[0];
    let root = c.root;
    c.apply(vec![rec::mkdir(1, root, &format!("s{tag}_{n}"), dir)]);
    let data = vec![n; FILE];
    let mut fids: Vec<Fid> = Vec::new();
    let mut done = 0u64;
    let mut store_id = 2;
    while !stop.load(Ordering::Relaxed) {
        if fids.is_empty() {
            fids = c.alloc(4096);
            fids.reverse();
        }
        let fid = fids.pop().unwrap();
        let up = done + 1;
        assert!(matches!(b.upload(up, &data), Msg::Uploaded { .. }));
        let records = vec![
            rec::create(store_id, dir, &format!("f{done}"), fid),
            rec::store(store_id + 1, fid, 0, up, FILE as u64),
        ];
        store_id += 2;
        match c.try_reintegrate(records) {
            Some(Msg::Reintegrated { .. }) => done += 1,
            other => panic!("batch refused: {other:?}"),
        }
    }
    // Closing at once: a finished session must not hold callbacks that the
    // others' commits would wait to have acknowledged.
    drop((c, b));
    done
}

fn run(s: &Server, sessions: usize, tag: u8, dur: Duration) -> (u64, Duration) {
    let addr: SocketAddr = s.addr.parse().unwrap();
    let secret = s.secret();
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let threads: Vec<_> = (0..sessions)
        .map(|n| {
            let (secret, stop) = (secret.clone(), Arc::clone(&stop));
            std::thread::spawn(move || session(addr, &secret, n as u8, tag, &stop))
        })
        .collect();
    std::thread::sleep(dur);
    stop.store(true, Ordering::Relaxed);
    let total = threads.into_iter().map(|t| t.join().unwrap()).sum();
    (total, start.elapsed())
}

fn main() {
    let quick = std::env::var_os("CODA_BENCH_QUICK").is_some();
    // `cargo test --benches` runs benches without --bench: stay tiny then.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let dur = if smoke {
        Duration::from_millis(500)
    } else if quick {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(10)
    };
    // Both servers run from the start and the two modes alternate at each
    // session count, so load from elsewhere on the machine hits both alike.
    let mut servers = Vec::new();
    for (mode, off) in [("grouped", false), ("one-by-one", true)] {
        // Read by the server at start; set while this process has no other
        // threads.
        if off {
            std::env::set_var("CODA_SERVER_NO_GROUP_COMMIT", "1");
        } else {
            std::env::remove_var("CODA_SERVER_NO_GROUP_COMMIT");
        }
        let scratch =
            std::env::temp_dir().join(format!("coda-bench-commit-{}-{mode}", std::process::id()));
        std::fs::create_dir_all(&scratch).unwrap();
        // Sessions ack breaks only between their own requests: a long
        // break timeout keeps a busy machine from cutting one.
        let s = Server::start_with(&scratch, &["--break-timeout-ms", "60000"]);
        servers.push((mode, s, scratch));
    }
    std::env::remove_var("CODA_SERVER_NO_GROUP_COMMIT");
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for (k, &n) in SESSIONS.iter().enumerate() {
        for (m, (mode, s, _)) in servers.iter().enumerate() {
            let (done, took) = run(s, n, k as u8 + 1, dur);
            let rate = done as f64 / took.as_secs_f64();
            let ratio = rate / rates[m].first().copied().unwrap_or(rate);
            println!(
                "{mode:>10}  {n:>2} sessions  {done:>6} batches  {rate:>8.0} commits/s  x{ratio:.2} vs 1 session"
            );
            rates[m].push(rate);
        }
    }
    for (k, n) in SESSIONS.iter().enumerate() {
        println!(
            "{n:>2} sessions: grouped / one-by-one = {:.2}",
            rates[0][k] / rates[1][k]
        );
    }
    for (_, s, scratch) in servers {
        drop(s);
        let _ = std::fs::remove_dir_all(&scratch);
    }
}
