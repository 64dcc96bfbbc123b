//! The client's bulk connection pool is capped (`bulk_connections`,
//! default 4): 32 threads opening 32 distinct uncached files at once must
//! not become 32 connections (and 32 threads) on the server, and every open
//! still succeeds.

mod client_util;
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use client_util::*;
use common::TempDir;

const FILES: usize = 32;

fn contents(i: usize) -> Vec<u8> {
    (0..(512 << 10)).map(|k| (k * 7 + i) as u8).collect()
}

/// Sockets the server process holds (listener, control and bulk
/// connections): distinct ones, since the server holds clones of some.
fn server_sockets(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read the server's fd table")
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|t| t.to_string_lossy().into_owned())
        .filter(|t| t.starts_with("socket:"))
        .collect::<std::collections::HashSet<_>>()
        .len()
}

fn wait_sockets(pid: i32, want: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while server_sockets(pid) != want {
        assert!(
            Instant::now() < deadline,
            "the server still holds {} sockets, expected {want}",
            server_sockets(pid)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn concurrent_opens_share_a_capped_bulk_pool() {
    let srv = start();
    let pid = srv.pid();
    let idle = server_sockets(pid);
    {
        let dir = TempDir::new("bulk-writer");
        let w = client(&srv, dir.path());
        w.mkdir("/b", 0o755).unwrap();
        for i in 0..FILES {
            put(&w, &format!("/b/f{i}"), &contents(i));
        }
    }
    // The writer's connections are gone before the readers start.
    wait_sockets(pid, idle);

    let dir = TempDir::new("bulk-reader");
    let c = client(&srv, dir.path());
    let with_control = server_sockets(pid);
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut most = 0;
            while !done.load(Ordering::Relaxed) {
                most = most.max(server_sockets(pid));
                std::thread::yield_now();
            }
            most
        })
    };
    let start = Arc::new(Barrier::new(FILES));
    let readers: Vec<_> = (0..FILES)
        .map(|i| {
            let (c, start) = (c.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                get(&c, &format!("/b/f{i}")) == contents(i)
            })
        })
        .collect();
    let ok: Vec<bool> = readers.into_iter().map(|t| t.join().unwrap()).collect();
    done.store(true, Ordering::Relaxed);
    let most = sampler.join().unwrap();
    assert!(ok.iter().all(|x| *x), "every open read its file: {ok:?}");
    assert_eq!(c.stats().fetches, FILES as u64);
    let bulk = most - with_control;
    assert!(
        bulk <= 4,
        "the server saw {bulk} bulk connections of one client at once (cap 4)"
    );
    assert!(bulk >= 1, "the sampler saw the transfers");
}
