//! The commit journal (issues 10 and 11, docs/SERVER.md "Commit journal"):
//! 1 and 4 raw sessions each commit batches of one `CreateWith` of 4 KiB
//! (what a connected create of a small file sends) as fast as the server
//! answers, against a server with the journal (the default) and one with
//! it off (`CODA_SERVER_NO_JOURNAL=1`: every group a durable redb commit,
//! as before), both running from the start, rounds alternated.
//!
//!   cargo bench --bench server_journal      (CODA_BENCH_QUICK=1 for a short run)
//!
//! Printed per round: commits/s of each; at the end the median ratio
//! journal / no journal per session count, and each `meta.redb`'s size.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coda::proto::{Fid, Msg, Record, RecordOp};

mod common;
use common::BenchServer as Server;

#[allow(dead_code)]
#[path = "../tests/common/raw.rs"]
mod raw;
use raw::{rec, Raw};

const SESSIONS: [usize; 2] = [1, 4];
const FILE: usize = 4096;

/// One session creating 4 KiB files until `stop`; returns how many.
fn session(addr: SocketAddr, secret: &Path, id: [u8; 16], stop: &AtomicBool) -> u64 {
    let mut c = Raw::control(addr, secret, id, 1);
    c.stream.set_nodelay(true).unwrap();
    let dir = c.alloc(1)[0];
    let root = c.root;
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    c.apply(vec![rec::mkdir(1, root, &format!("s{hex}"), dir)]);
    let data = vec![id[1]; FILE];
    let mut fids: Vec<Fid> = Vec::new();
    let mut done = 0u64;
    let mut store_id = 2;
    while !stop.load(Ordering::Relaxed) {
        if fids.is_empty() {
            fids = c.alloc(4096);
            fids.reverse();
        }
        let fid = fids.pop().unwrap();
        let records = vec![Record {
            store_id,
            op: RecordOp::CreateWith {
                parent: dir,
                name: format!("f{done}"),
                fid,
                mode: 0o644,
                mtime: rec::t(),
                uid: 0,
                gid: 0,
                data: data.clone(),
            },
        }];
        store_id += 1;
        match c.try_reintegrate(records) {
            Some(Msg::Reintegrated { .. }) => done += 1,
            other => panic!("batch refused: {other:?}"),
        }
    }
    done
}

fn run(s: &Server, sessions: usize, tag: u16, dur: Duration) -> f64 {
    let addr: SocketAddr = s.addr.parse().unwrap();
    let secret = s.secret();
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let threads: Vec<_> = (0..sessions)
        .map(|n| {
            let (secret, stop) = (secret.clone(), Arc::clone(&stop));
            let mut id = [0u8; 16];
            id[0..2].copy_from_slice(&tag.to_be_bytes());
            id[2] = n as u8;
            id[15] = 1;
            std::thread::spawn(move || session(addr, &secret, id, &stop))
        })
        .collect();
    std::thread::sleep(dur);
    stop.store(true, Ordering::Relaxed);
    let total: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    total as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::var_os("CODA_BENCH_QUICK").is_some();
    let smoke = !std::env::args().any(|a| a == "--bench");
    let (dur, rounds) = if smoke {
        (Duration::from_millis(300), 1)
    } else if quick {
        (Duration::from_secs(2), 3)
    } else {
        (Duration::from_secs(5), 5)
    };
    let mut servers = Vec::new();
    for (mode, off) in [("journal", false), ("no journal", true)] {
        // Read by the server at start; set while this process has no other
        // threads.
        if off {
            std::env::set_var("CODA_SERVER_NO_JOURNAL", "1");
        } else {
            std::env::remove_var("CODA_SERVER_NO_JOURNAL");
        }
        let scratch = std::env::temp_dir().join(format!(
            "coda-bench-journal-{}-{}",
            std::process::id(),
            mode.replace(' ', "-")
        ));
        std::fs::create_dir_all(&scratch).unwrap();
        let s = Server::start_with(&scratch, &["--break-timeout-ms", "60000"]);
        servers.push((mode, s, scratch));
    }
    std::env::remove_var("CODA_SERVER_NO_JOURNAL");
    let mut tag = 0u16;
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); SESSIONS.len()];
    for round in 1..=rounds {
        for (k, &n) in SESSIONS.iter().enumerate() {
            let mut rates = Vec::new();
            for (mode, s, _) in &servers {
                tag += 1;
                let rate = run(s, n, tag, dur);
                println!("round {round}  {mode:>10}  {n} session(s)  {rate:>8.0} commits/s");
                rates.push(rate);
            }
            ratios[k].push(rates[0] / rates[1]);
        }
    }
    for (k, n) in SESSIONS.iter().enumerate() {
        println!(
            "{n} session(s): journal / no journal = {:.2} (median of {rounds})",
            median(ratios[k].clone())
        );
    }
    for (mode, s, scratch) in servers {
        let size = std::fs::metadata(s.root.join("meta.redb")).map_or(0, |m| m.len());
        println!(
            "{mode:>10}: meta.redb {:.1} MiB",
            size as f64 / (1 << 20) as f64
        );
        drop(s);
        let _ = std::fs::remove_dir_all(&scratch);
    }
}
