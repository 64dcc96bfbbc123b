//! Connected-mode benchmarks (issue: server, protocol and connected client).
//! Each prints a ratio against a baseline measured in the same run, because
//! these machines are shared and absolute times drift.
//!
//!   cargo bench --bench connected            (CODA_BENCH_QUICK=1 for a short run)
//!
//! 1. cached open+read+close of a 4 KiB file vs the same on a local file;
//! 2. cold fetch of a 256 MiB file vs copying it through a plain loopback socket;
//! 3. A's close() of a 4 KiB write while B holds a callback on the file vs while
//!    no one else does (p50 and p99 of each).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use coda::client::Client;

mod common;
use common::{write_file, BenchServer as Server};

fn client(s: &Server, cache: &Path) -> Client {
    let mut c = s.config(cache);
    c.set("cache_size", "4G").unwrap();
    Client::new(c).unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn summarize(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (percentile(&v, 0.5), percentile(&v, 0.99))
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn cached_small_reads(a: &Client, scratch: &Path, iters: usize) {
    let data = vec![7u8; 4096];
    write_file(a, "/small", &data);
    let local = scratch.join("local-small");
    std::fs::write(&local, &data).unwrap();
    let mut buf = vec![0u8; 8192];
    // Warm both paths, then interleave rounds so drift hits both alike.
    let mut coda_t = Vec::new();
    let mut local_t = Vec::new();
    for round in 0..(iters * 2) {
        let t = Instant::now();
        if round % 2 == 0 {
            let f = a.open("/small", libc::O_RDONLY, 0).unwrap();
            let n = f.read_at(&mut buf, 0).unwrap();
            assert_eq!(n, 4096);
            f.close().unwrap();
            coda_t.push(t.elapsed());
        } else {
            let mut f = std::fs::File::open(&local).unwrap();
            let n = f.read(&mut buf).unwrap();
            assert_eq!(n, 4096);
            drop(f);
            local_t.push(t.elapsed());
        }
    }
    let (c50, c99) = summarize(coda_t);
    let (l50, l99) = summarize(local_t);
    println!(
        "cached 4 KiB open+read+close: coda p50 {:.1} us p99 {:.1} us; local p50 {:.1} us p99 {:.1} us; ratio (p50) {:.2}x (target <= 1.5x)",
        us(c50), us(c99), us(l50), us(l99), us(c50) / us(l50)
    );
}

/// Baseline: the same bytes from a file through a plain loopback TCP socket
/// into a file, in 256 KiB chunks (what the fetch does, minus the protocol).
fn socket_copy(src: &Path, dst: &Path) -> Duration {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let src = src.to_path_buf();
    let sender = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut f = std::fs::File::open(&src).unwrap();
        std::io::copy(&mut f, &mut s).unwrap();
    });
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap();
    let mut out = std::fs::File::create(dst).unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).unwrap();
    }
    // No fsync: a fetched container is cache, and the client does not sync it either.
    let d = t.elapsed();
    sender.join().unwrap();
    d
}

fn cold_fetch(s: &Server, a: &Client, scratch: &Path, mib: usize, rounds: usize) {
    let size = mib << 20;
    let mut data = vec![0u8; size];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i * 31 % 251) as u8;
    }
    write_file(a, "/big", &data);
    let local = scratch.join("local-big");
    std::fs::write(&local, &data).unwrap();
    drop(data);
    let mut best_ratio = Vec::new();
    for r in 0..rounds {
        let base = socket_copy(&local, &scratch.join("copy-big"));
        let cache = scratch.join(format!("cold-{r}"));
        let b = client(s, &cache);
        let t = Instant::now();
        let f = b.open("/big", libc::O_RDONLY, 0).unwrap();
        let fetch = t.elapsed();
        assert_eq!(b.stat("/big").unwrap().size as usize, size);
        f.close().unwrap();
        drop(b);
        let _ = std::fs::remove_dir_all(&cache);
        let ratio = base.as_secs_f64() / fetch.as_secs_f64();
        println!(
            "cold fetch {mib} MiB: coda {:.0} ms ({:.0} MiB/s); plain loopback socket {:.0} ms; throughput ratio {:.2} (target >= 0.8)",
            fetch.as_secs_f64() * 1e3,
            mib as f64 / fetch.as_secs_f64(),
            base.as_secs_f64() * 1e3,
            ratio
        );
        best_ratio.push(ratio);
    }
    best_ratio.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "cold fetch {mib} MiB: median throughput ratio {:.2}",
        best_ratio[best_ratio.len() / 2]
    );
}

fn callback_break_cost(s: &Server, a: &Client, scratch: &Path, iters: usize) {
    let b = client(s, &scratch.join("cache-b"));
    let data = vec![1u8; 4096];
    write_file(a, "/shared", &data);
    write_file(a, "/alone", &data);
    let mut with_holder = Vec::new();
    let mut alone = Vec::new();
    for _ in 0..iters {
        // B takes a callback on /shared (a cached stat is enough after a break).
        b.stat("/shared").unwrap();
        let t = Instant::now();
        write_file(a, "/shared", &data);
        with_holder.push(t.elapsed());
        let t = Instant::now();
        write_file(a, "/alone", &data);
        alone.push(t.elapsed());
    }
    let breaks = b.stats().breaks_received;
    let (h50, h99) = summarize(with_holder);
    let (a50, a99) = summarize(alone);
    println!(
        "4 KiB write+close: with B holding a callback p50 {:.0} us p99 {:.0} us; no other holder p50 {:.0} us p99 {:.0} us; break cost ratio p50 {:.2}x p99 {:.2}x ({breaks} breaks delivered)",
        us(h50), us(h99), us(a50), us(a99), us(h50) / us(a50), us(h99) / us(a99)
    );
}

fn main() {
    let quick = std::env::var_os("CODA_BENCH_QUICK").is_some();
    // `cargo test --benches` runs benches with --bench absent: stay tiny then.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let scratch = std::env::temp_dir().join(format!("coda-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let s = Server::start(&scratch);
    let a = client(&s, &scratch.join("cache-a"));
    let (iters, mib, rounds) = if smoke {
        (20, 4, 1)
    } else if quick {
        (500, 64, 1)
    } else {
        (5000, 256, 3)
    };
    cached_small_reads(&a, &scratch, iters);
    cold_fetch(&s, &a, &scratch, mib, rounds);
    callback_break_cost(&s, &a, &scratch, iters.min(2000));
    drop(a);
    drop(s);
    let _ = std::fs::remove_dir_all(&scratch);
}
