//! High-availability benchmarks (issue: high availability). Timings, not
//! tests: results and the command go in docs/BENCHMARKS.md.
//!
//!   cargo bench --bench ha           (CODA_BENCH_RUNS=N, CODA_BENCH_SOAK_S=S to change)
//!
//! 1. `kill -9` of the server (host up) → link swapped and pending calls
//!    failed (automatic failover; default heartbeat 200 ms, dead 1000 ms);
//! 2. `SIGSTOP` of the server (hung) → the same;
//! 3. a read blocked on a hung server → its EIO, after `failover` is called;
//! 4. no false alarm: both cores saturated by busy processes and large
//!    transfers through one client, while another heartbeats; counts
//!    ServerDown events (must be 0).
//!
//! Under `cargo test` (no `--bench` argument) it runs a tiny smoke version.

use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coda::client::{Client, ClientState, Config, Event};

mod common;
use common::{write_file, BenchServer as Server};

fn config(s: &Server, cache: &Path) -> Config {
    let mut c = s.config(cache);
    c.set("cache_size", "4G").unwrap();
    c
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median_max(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[v.len() - 1])
}

/// Scenario 1/2: time from the signal to the link swapped and the client
/// failed over (its interrupt fired: every pending call has its EIO).
fn detection(scratch: &Path, runs: usize, hang: bool) -> Vec<Duration> {
    let mut out = Vec::new();
    for run in 0..runs {
        let dir = scratch.join(format!("{}-{run}", if hang { "stop" } else { "kill" }));
        std::fs::create_dir_all(&dir).unwrap();
        let srv = Server::start(&dir);
        let (link, remote, local) = (dir.join("web"), dir.join("remote"), dir.join("local"));
        std::fs::create_dir(&local).unwrap();
        std::os::unix::fs::symlink(&remote, &link).unwrap();
        let mut cfg = config(&srv, &dir.join("cache"));
        cfg.set("failover_link", link.to_str().unwrap()).unwrap();
        cfg.set("failover_target", local.to_str().unwrap()).unwrap();
        let c = Client::new(cfg).unwrap();
        write_file(&c, "/f", b"x");
        // Let the prober settle into its rhythm at a random phase.
        std::thread::sleep(Duration::from_millis(100 + (run as u64 * 37) % 200));
        let t0 = Instant::now();
        srv.signal(if hang { libc::SIGSTOP } else { libc::SIGKILL });
        while !(c.state() == ClientState::FailedOver
            && std::fs::read_link(&link).is_ok_and(|t| t == local))
        {
            assert!(t0.elapsed() < Duration::from_secs(30), "no failover");
            std::thread::sleep(Duration::from_micros(200));
        }
        out.push(t0.elapsed());
        drop(c);
        drop(srv);
        let _ = std::fs::remove_dir_all(&dir);
    }
    out
}

/// Scenario 3: a fetch blocked on a hung server; time from the failover call
/// to the blocked call's EIO.
fn pending_read_eio(scratch: &Path, runs: usize) -> Vec<Duration> {
    let dir = scratch.join("pending");
    std::fs::create_dir_all(&dir).unwrap();
    let srv = Server::start(&dir);
    let (link, local) = (dir.join("web"), dir.join("local"));
    std::os::unix::fs::symlink(dir.join("remote"), &link).unwrap();
    let w = Client::new(config(&srv, &dir.join("w"))).unwrap();
    write_file(&w, "/big", &vec![1u8; 1 << 20]);
    let mut out = Vec::new();
    for run in 0..runs {
        let mut cfg = config(&srv, &dir.join(format!("c{run}")));
        cfg.set("dead_after_ms", "600000").unwrap();
        cfg.set("rpc_timeout_ms", "600000").unwrap();
        let c = Client::new(cfg).unwrap();
        srv.signal(libc::SIGSTOP);
        let (tx, rx) = crossbeam_channel::bounded(1);
        let c2 = c.clone();
        std::thread::spawn(move || {
            let r = c2.open("/big", libc::O_RDONLY, 0).map(|_| ());
            let _ = tx.send((r, Instant::now()));
        });
        std::thread::sleep(Duration::from_millis(50));
        let t0 = Instant::now();
        c.failover(&link, &local).unwrap();
        let (r, t1) = rx.recv_timeout(Duration::from_secs(30)).unwrap();
        assert!(matches!(r, Err(coda::Error::Eio(_))), "{r:?}");
        out.push(t1 - t0);
        srv.signal(libc::SIGCONT);
    }
    out
}

/// Scenario 4: no false alarm under load. Returns (ServerDown events seen by
/// the heartbeating client and the loaded ones, bytes moved).
fn soak(scratch: &Path, secs: u64, size: usize) -> (usize, u64) {
    let dir = scratch.join("soak");
    std::fs::create_dir_all(&dir).unwrap();
    let srv = Server::start(&dir);
    let watcher = Client::new(config(&srv, &dir.join("h"))).unwrap();
    let writer = Client::new(config(&srv, &dir.join("w"))).unwrap();
    let reader = Client::new(config(&srv, &dir.join("r"))).unwrap();
    let mut busy: Vec<Child> = (0..2)
        .map(|_| {
            Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .spawn()
                .unwrap()
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let moved = {
        let stop = stop.clone();
        let (writer, reader) = (writer.clone(), reader.clone());
        std::thread::spawn(move || {
            let data = vec![9u8; size];
            let mut moved = 0u64;
            let mut buf = vec![0u8; 1 << 20];
            while !stop.load(Ordering::Relaxed) {
                write_file(&writer, "/big", &data);
                // The reader's callback was broken: this is a cold fetch.
                let f = reader.open("/big", libc::O_RDONLY, 0).unwrap();
                let mut off = 0;
                while let Ok(n @ 1..) = f.read_at(&mut buf, off) {
                    off += n as u64;
                }
                f.close().unwrap();
                moved += 2 * size as u64;
            }
            moved
        })
    };
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    let moved = moved.join().unwrap();
    for b in &mut busy {
        let _ = b.kill();
        let _ = b.wait();
    }
    let downs = [&watcher, &writer, &reader]
        .iter()
        .map(|c| {
            std::iter::from_fn(|| c.events().next(Duration::ZERO))
                .filter(|e| matches!(e, Event::ServerDown { .. }))
                .count()
        })
        .sum();
    (downs, moved)
}

fn main() {
    let smoke = !std::env::args().any(|a| a == "--bench");
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let runs = if smoke {
        2
    } else {
        env("CODA_BENCH_RUNS", 20) as usize
    };
    let soak_s = if smoke {
        2
    } else {
        env("CODA_BENCH_SOAK_S", 60)
    };
    let size = if smoke { 1 << 20 } else { 64 << 20 };
    let scratch = std::env::temp_dir().join(format!("coda-bench-ha-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();

    let (m, x) = median_max(detection(&scratch, runs, false));
    println!(
        "kill -9 -> failed over: median {:.1} ms, max {:.1} ms over {runs} runs (target <= 300 ms)",
        ms(m),
        ms(x)
    );
    let (m, x) = median_max(detection(&scratch, runs, true));
    println!(
        "SIGSTOP -> failed over: median {:.1} ms, max {:.1} ms over {runs} runs (target <= dead_after 1000 + 300 ms)",
        ms(m),
        ms(x)
    );
    let (m, x) = median_max(pending_read_eio(&scratch, runs));
    println!(
        "failover call -> blocked read's EIO: median {:.3} ms, max {:.3} ms over {runs} runs (target <= 10 ms)",
        ms(m),
        ms(x)
    );
    let (downs, moved) = soak(&scratch, soak_s, size);
    println!(
        "no false alarm: {soak_s} s, 2 busy processes + {} MiB moved through clients: {downs} ServerDown events (must be 0)",
        moved >> 20
    );
    let _ = std::fs::remove_dir_all(&scratch);
    assert_eq!(downs, 0, "a server was declared down under load");
}
