//! Disconnected-operation benchmarks. Each prints a ratio against a baseline
//! measured in the same run (the machines are shared and noisy).
//!
//!   cargo bench --bench disco          (CODA_BENCH_QUICK=1 for a short run)
//!
//! 1. Reintegration of 10,000 small records (5,000 files created and
//!    written while write-disconnected, sent by `reintegrate_now`) vs the
//!    same changes made connected, one write-through round trip each.
//! 2. Reintegration of 100 files of 10 MiB vs the same files stored
//!    connected (write-through on close).
//! 3. Revalidation of 100,000 cached files at client start: unchanged
//!    volume (one ValidateVolume) vs every file checked (GetAttrs batches,
//!    forced by another client's change to one file).

use std::path::Path;
use std::time::{Duration, Instant};

use coda::client::{Client, Config};

mod common;
use common::{write_file as put, BenchServer as Server};

fn config(s: &Server, cache: &Path) -> Config {
    let mut c = s.config(cache);
    c.set("cache_size", "8G").unwrap();
    c.set("hoard_walk_ms", "0").unwrap();
    c.set("rpc_timeout_ms", "60000").unwrap();
    c
}

fn write_disconnected(s: &Server, cache: &Path) -> Client {
    let mut c = config(s, cache);
    c.set("write_disconnected", "true").unwrap();
    c.set("reintegration_age_ms", "86400000").unwrap();
    Client::new(c).unwrap()
}

/// Start a client on `cfg`'s cache once the previous client of that cache
/// has let go of it (a dropped client's threads may hold the index for a
/// moment): retry while the cache is "in use by another client", bounded,
/// and return the time of the successful start alone, so waiting for the
/// lock never counts in the figures.
fn start_client(cfg: impl Fn() -> Config) -> (Client, Duration) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let t = Instant::now();
        match Client::new(cfg()) {
            Ok(c) => return (c, t.elapsed()),
            Err(coda::Error::Again(m))
                if m.contains("in use by another client") && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("starting a client: {e}"),
        }
    }
}

fn rate(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn small_records(s: &Server, scratch: &Path, files: usize) {
    // Baseline: the same creates and writes, connected (one round trip and
    // one server commit per record).
    // 100 files per directory: a cached listing is rewritten whole in the
    // index on every change, so huge directories would measure that.
    let conn = Client::new(config(s, &scratch.join("small-conn"))).unwrap();
    conn.mkdir("/small-conn", 0o755).unwrap();
    for d in 0..files.div_ceil(100) {
        conn.mkdir(&format!("/small-conn/d{d}"), 0o755).unwrap();
    }
    let t = Instant::now();
    for i in 0..files {
        put(&conn, &format!("/small-conn/d{}/f{i}", i / 100), b"x");
    }
    let connected = t.elapsed();
    drop(conn);

    let c = write_disconnected(s, &scratch.join("small-wd"));
    c.mkdir("/small", 0o755).unwrap();
    for d in 0..files.div_ceil(100) {
        c.mkdir(&format!("/small/d{d}"), 0o755).unwrap();
    }
    c.reintegrate_now().unwrap();
    let t = Instant::now();
    for i in 0..files {
        put(&c, &format!("/small/d{}/f{i}", i / 100), b"x");
    }
    let logging = t.elapsed();
    let records = c.pending_records() as u64;
    let before = c.stats().reintegrations;
    let t = Instant::now();
    c.reintegrate_now().unwrap();
    let reint = t.elapsed();
    let batches = c.stats().reintegrations - before;
    assert_eq!(c.pending_records(), 0);
    println!(
        "small records: {records} records reintegrated in {:.2} s ({:.0} records/s, {batches} batches); \
         logging them took {:.2} s; connected write-through of the same: {:.2} s ({:.0} records/s); \
         reintegration {:.1}x faster than write-through",
        reint.as_secs_f64(),
        rate(records, reint),
        logging.as_secs_f64(),
        connected.as_secs_f64(),
        rate(2 * files as u64, connected),
        connected.as_secs_f64() / reint.as_secs_f64()
    );
}

fn big_files(s: &Server, scratch: &Path, files: usize, mib: usize) {
    let data = vec![0x5au8; mib << 20];
    let total = (files * mib) as f64;
    let conn = Client::new(config(s, &scratch.join("big-conn"))).unwrap();
    conn.mkdir("/big-conn", 0o755).unwrap();
    let t = Instant::now();
    for i in 0..files {
        put(&conn, &format!("/big-conn/f{i}"), &data);
    }
    let connected = t.elapsed();
    drop(conn);

    let c = write_disconnected(s, &scratch.join("big-wd"));
    c.mkdir("/big", 0o755).unwrap();
    c.reintegrate_now().unwrap();
    for i in 0..files {
        put(&c, &format!("/big/f{i}"), &data);
    }
    let t = Instant::now();
    c.reintegrate_now().unwrap();
    let reint = t.elapsed();
    println!(
        "big files: {files} x {mib} MiB reintegrated in {:.2} s ({:.0} MiB/s); connected \
         write-through of the same: {:.2} s ({:.0} MiB/s); ratio {:.2}",
        reint.as_secs_f64(),
        total / reint.as_secs_f64(),
        connected.as_secs_f64(),
        total / connected.as_secs_f64(),
        connected.as_secs_f64() / reint.as_secs_f64()
    );
}

fn revalidation(s: &Server, scratch: &Path, files: usize) {
    let cache = scratch.join("reval");
    {
        let c = write_disconnected(s, &cache);
        c.mkdir("/many", 0o755).unwrap();
        for d in 0..files.div_ceil(100) {
            c.mkdir(&format!("/many/d{d}"), 0o755).unwrap();
        }
        for i in 0..files {
            // An empty file: one Create record, cached with its status.
            let f = c
                .open(
                    &format!("/many/d{}/f{i}", i / 100),
                    libc::O_WRONLY | libc::O_CREAT,
                    0o644,
                )
                .unwrap();
            f.close().unwrap();
        }
        c.reintegrate_now().unwrap();
    }
    // Unchanged volume: one ValidateVolume.
    let (c, unchanged) = start_client(|| config(s, &cache));
    let su = c.stats();
    drop(c);
    // Another client changes one file: every cached file is checked.
    {
        let o = Client::new(config(s, &scratch.join("reval-other"))).unwrap();
        put(&o, "/many/d0/f0", b"changed");
    }
    let (c, changed) = start_client(|| config(s, &cache));
    let sc = c.stats();
    drop(c);
    // The index load is common to both: time it alone (no server answers).
    let offline = || {
        let mut off = config(s, &cache);
        off.set("servers", "127.0.0.1:1").unwrap();
        off
    };
    let (c, load) = start_client(offline);
    drop(c);
    println!(
        "revalidation of {files} cached files at start: unchanged volume {:.3} s \
         ({} ValidateVolume, {} GetAttrs); changed volume {:.3} s ({} ValidateVolume, {} GetAttrs); \
         opening the cache alone (offline) {:.3} s; validation itself: unchanged {:.3} s vs every file {:.3} s",
        unchanged.as_secs_f64(),
        su.volume_validations,
        su.getattr_rpcs,
        changed.as_secs_f64(),
        sc.volume_validations,
        sc.getattr_rpcs,
        load.as_secs_f64(),
        unchanged.saturating_sub(load).as_secs_f64(),
        changed.saturating_sub(load).as_secs_f64(),
    );
}

fn main() {
    let quick = std::env::var_os("CODA_BENCH_QUICK").is_some();
    // `cargo test --benches` runs benches without --bench: stay tiny then.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let scratch = std::env::temp_dir().join(format!("coda-bench-disco-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let s = Server::start(&scratch);
    let (small, big, mib, many) = if smoke {
        (50, 2, 1, 500)
    } else if quick {
        (1000, 10, 10, 10_000)
    } else {
        (5000, 100, 10, 100_000)
    };
    small_records(&s, &scratch, small);
    big_files(&s, &scratch, big, mib);
    revalidation(&s, &scratch, many);
    drop(s);
    let _ = std::fs::remove_dir_all(&scratch);
}
