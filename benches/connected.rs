//! Connected-mode benchmarks (issue: server, protocol and connected client).
//! Each prints a ratio against a baseline measured in the same run, because
//! these machines are shared and absolute times drift.
//!
//!   cargo bench --bench connected            (CODA_BENCH_QUICK=1 for a short run)
//!
//! 1. cached open+read+close of a 4 KiB file vs the same on a local file;
//! 2. cold fetch of a 256 MiB file vs copying it through a plain loopback socket;
//! 3. A's close() of a 4 KiB write while B holds a callback on the file vs while
//!    no one else does (p50 and p99 of each);
//! 4. parallel small stores: 1, 2 and 4 threads of one client each creating
//!    distinct 4 KiB files (open O_CREAT|O_WRONLY, write, close): files/s
//!    and the ratio 4 threads / 1 thread (CODA_BENCH_VERBOSE=1: records per
//!    Reintegrate, and client and server CPU per file);
//! 5. client fsyncs per connected create (a child process of this bench run
//!    under `strace -f -c`; skipped with a note without strace);
//! 6. 10,000 creates in one directory: time of the second 5,000 / the first.
//! 7. TLS against plaintext (a second server with --insecure-plaintext):
//!    cold fetch of a 256 MiB file over TLS vs the plain socket copy and vs
//!    the plaintext fetch; small stores (create + write 4 KiB + close) over
//!    TLS vs plaintext.

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

/// One client, `threads` threads, each creating `per_thread` distinct 4 KiB
/// files in a directory of its own. Returns files/s for the whole client.
fn parallel_stores(
    s: &Server,
    scratch: &Path,
    threads: usize,
    per_thread: usize,
    tag: &str,
) -> f64 {
    let cache = scratch.join(format!("par-{tag}"));
    let c = client(s, &cache);
    for t in 0..threads {
        c.mkdir(&format!("/par{tag}-{t}"), 0o755).unwrap();
    }
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(threads + 1));
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (c, barrier, tag) = (c.clone(), barrier.clone(), tag.to_string());
            std::thread::spawn(move || {
                let data = vec![t as u8; parallel_bytes()];
                barrier.wait();
                let (mut to, mut tc) = (Duration::ZERO, Duration::ZERO);
                for k in 0..per_thread {
                    let t0 = Instant::now();
                    let mut f = c
                        .open(
                            &format!("/par{tag}-{t}/f{k}"),
                            libc::O_CREAT | libc::O_WRONLY,
                            0o644,
                        )
                        .unwrap();
                    to += t0.elapsed();
                    assert_eq!(f.write_at(&data, 0).unwrap(), data.len());
                    let t1 = Instant::now();
                    f.close().unwrap();
                    tc += t1.elapsed();
                }
                if std::env::var_os("CODA_BENCH_VERBOSE").is_some() {
                    println!("  thread {t}: open {to:?} close {tc:?}");
                }
            })
        })
        .collect();
    let cpu0 = (own_cpu(), process_cpu(s.pid()));
    s.take_trace();
    barrier.wait();
    let t = Instant::now();
    for w in workers {
        w.join().unwrap();
    }
    let wall = t.elapsed();
    let rate = (threads * per_thread) as f64 / wall.as_secs_f64();
    let st = c.stats();
    if std::env::var_os("CODA_BENCH_VERBOSE").is_some() {
        let (client_cpu, server_cpu) = (own_cpu() - cpu0.0, process_cpu(s.pid()) - cpu0.1);
        let files = (threads * per_thread) as f64;
        println!(
            "  {threads} thread(s): {} records in {} Reintegrates ({:.2} per batch; {} batches sent, {} not applied); CPU per file: client {:.2} ms, server {:.2} ms; cores busy {:.2}",
            st.records_reintegrated,
            st.reintegrations,
            st.records_reintegrated as f64 / st.reintegrations.max(1) as f64,
            st.batches_sent,
            st.batches_not_applied,
            client_cpu.as_secs_f64() * 1e3 / files,
            server_cpu.as_secs_f64() * 1e3 / files,
            (client_cpu + server_cpu).as_secs_f64() / wall.as_secs_f64(),
        );
        if let Some(line) = group_summary(&s.take_trace()) {
            println!("  {threads} thread(s): server {line}");
        }
    }
    // The cache is removed by the caller after the last round: on ext4
    // without a journal every new inode is searched for past the inodes
    // freed in the last 30 s, so removing it here would slow the next
    // rounds' creates by this bench's own cleanup.
    drop(c);
    rate
}

/// One line about the server's group commits from its trace lines
/// (`CODA_SERVER_TRACE`): groups, batches and records per group, mean µs
/// a group took and the group commit sat idle before it (idle spells over
/// 50 ms, between rounds, left out), and the mean split of a commit.
fn group_summary(lines: &[String]) -> Option<String> {
    let field = |l: &str, k: &str| -> Option<f64> {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
    };
    let mean = |prefix: &str, k: &str, max: f64| -> f64 {
        let v: Vec<f64> = lines
            .iter()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| field(l, k))
            .filter(|x| *x >= 0.0 && *x <= max)
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let groups = lines
        .iter()
        .filter(|l| l.starts_with("TRACE group"))
        .count();
    if groups == 0 {
        return None;
    }
    let (g, c) = ("TRACE group", "TRACE commit");
    Some(format!(
        "{groups} groups, {:.2} batches and {:.2} records per group; per group {:.0} us busy \
         after {:.0} us idle; commit split: apply {:.0}, journal write {:.0}, \
         redb commit {:.0} while the disk writes, journal sync after it {:.0}, after {:.0} us",
        mean(g, "batches", f64::MAX),
        mean(g, "records", f64::MAX),
        mean(g, "busy", f64::MAX),
        mean(g, "idle", 50_000.0),
        mean(c, "apply", f64::MAX),
        mean(c, "journal", f64::MAX),
        mean(c, "commit", f64::MAX),
        mean(c, "sync", f64::MAX),
        mean(c, "after", f64::MAX),
    ))
}

/// Bytes per file of the parallel small stores: 4 KiB, or
/// `CODA_BENCH_PARALLEL_BYTES` (to compare sizes, e.g. around the server's
/// small-file limit).
fn parallel_bytes() -> usize {
    std::env::var("CODA_BENCH_PARALLEL_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4096)
}

/// User + system CPU time of this process (all threads) so far.
fn own_cpu() -> Duration {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// User + system CPU time of process `pid` so far (`/proc/PID/stat`);
/// zero if it cannot be read.
fn process_cpu(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the command name (which may hold spaces), from field 3.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    // utime and stime are fields 14 and 15: indexes 11 and 12 here.
    let t = ticks(11) + ticks(12);
    Duration::from_millis(t * 1000 / hz)
}

/// CPU time of every thread of process `pid` so far, in nanoseconds
/// (`/proc/PID/task/*/schedstat`: finer than the clock ticks of `stat`).
fn threads_cpu(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    let mut ns = 0u64;
    for t in tasks.flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
            ns += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Duration::from_nanos(ns)
}

/// How the client of one run of `parallel_stores` sends its batches.
#[derive(Clone, Copy, PartialEq)]
enum Sending {
    /// As built: up to 8 batches in flight, each held for the writers
    /// active lately.
    Pipelined,
    /// `CODA_CLIENT_MAX_IN_FLIGHT=1`: the client before pipelining.
    OneInFlight,
    /// `CODA_CLIENT_HOLD=off`: the client before batches were held.
    NotHeld,
}

/// The name of one run of `parallel_stores` (its directories and its cache).
fn round_tag(threads: usize, sending: Sending, round: usize) -> String {
    let mode = match sending {
        Sending::Pipelined => "",
        Sending::OneInFlight => "o",
        Sending::NotHeld => "n",
    };
    format!("{threads}{mode}-r{round}")
}

fn parallel_small_stores(s: &Server, scratch: &Path, per_thread: usize, rounds: usize) {
    // Rounds interleave the thread counts, so a busy spell on the shared
    // machine hits all of them alike; the medians are compared. The last
    // line is 4 threads with one batch in flight (the client before
    // pipelining), as a baseline measured in the same run, and 4 threads
    // whose batches are sent at once, not held for the other writers (the
    // client before holding).
    const ONE_IN_FLIGHT: &str = "CODA_CLIENT_MAX_IN_FLIGHT";
    const HOLD: &str = "CODA_CLIENT_HOLD";
    let runs = [
        (1, Sending::Pipelined),
        (2, Sending::Pipelined),
        (4, Sending::Pipelined),
        (4, Sending::OneInFlight),
        (4, Sending::NotHeld),
    ];
    let mut rates: [Vec<f64>; 5] = Default::default();
    for round in 0..rounds {
        for (i, (threads, sending)) in runs.into_iter().enumerate() {
            let tag = round_tag(threads, sending, round);
            match sending {
                Sending::Pipelined => {}
                Sending::OneInFlight => std::env::set_var(ONE_IN_FLIGHT, "1"),
                Sending::NotHeld => std::env::set_var(HOLD, "off"),
            }
            rates[i].push(parallel_stores(s, scratch, threads, per_thread, &tag));
            std::env::remove_var(ONE_IN_FLIGHT);
            std::env::remove_var(HOLD);
        }
    }
    for round in 0..rounds {
        for (threads, sending) in runs {
            let tag = round_tag(threads, sending, round);
            let _ = std::fs::remove_dir_all(scratch.join(format!("par-{tag}")));
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let one = median(&mut rates[0].clone());
    let serial = median(&mut rates[3].clone());
    let not_held = median(&mut rates[4].clone());
    for (i, (threads, sending)) in runs.into_iter().enumerate() {
        let all: Vec<String> = rates[i].iter().map(|r| format!("{r:.0}")).collect();
        let m = median(&mut rates[i]);
        let note = match (threads, sending) {
            (4, Sending::Pipelined) => {
                format!(
                    " (target >= 2.5x; {:.2}x one batch in flight, {:.2}x not held)",
                    m / serial,
                    m / not_held
                )
            }
            (_, Sending::OneInFlight) => " with one batch in flight (as before pipelining)".into(),
            (_, Sending::NotHeld) => {
                " with batches not held for other writers (CODA_CLIENT_HOLD=off)".into()
            }
            _ => String::new(),
        };
        println!(
            "parallel small stores: {threads} thread(s) x {per_thread} files of {}: median {m:.0} files/s over {rounds} rounds ({}) = {:.2}x one thread{note}",
            match parallel_bytes() {
                4096 => "4 KiB".to_string(),
                n => format!("{n} bytes"),
            },
            all.join(", "),
            m / one,
        );
    }
}

/// What the child run under strace does: connect, then `n` connected
/// creates of 4 KiB files in a fresh directory; setup is the same for every
/// `n`, so the difference of two runs is the creates' own fsyncs.
fn fsync_child(n: usize) {
    let v = |k: &str| std::env::var(k).unwrap();
    let mut cfg = coda::client::Config::new();
    cfg.set("servers", &v("CODA_BENCH_SERVER")).unwrap();
    cfg.set("secret_file", &v("CODA_BENCH_SECRET")).unwrap();
    cfg.set("cache_dir", &v("CODA_BENCH_CACHE")).unwrap();
    let c = Client::new(cfg).unwrap();
    let dir = v("CODA_BENCH_DIR");
    c.mkdir(&dir, 0o755).unwrap();
    let data = vec![3u8; 4096];
    let empty = std::env::var_os("CODA_BENCH_EMPTY").is_some();
    for k in 0..n {
        if empty {
            let f = c
                .open(
                    &format!("{dir}/f{k}"),
                    libc::O_CREAT | libc::O_WRONLY,
                    0o644,
                )
                .unwrap();
            f.close().unwrap();
        } else {
            write_file(&c, &format!("{dir}/f{k}"), &data);
        }
    }
}

/// fsync-family calls of one child run (`strace -c` summary), or why not.
fn child_fsyncs(
    s: &Server,
    scratch: &Path,
    tag: &str,
    n: usize,
    empty: bool,
) -> Result<u64, String> {
    let out = scratch.join(format!("strace-{tag}"));
    let mut cmd = std::process::Command::new("strace");
    if empty {
        cmd.env("CODA_BENCH_EMPTY", "1");
    }
    let st = cmd
        .args([
            "-f",
            "-c",
            "-e",
            "trace=fsync,fdatasync,sync_file_range,syncfs,msync",
            "-o",
        ])
        .arg(&out)
        .arg(std::env::current_exe().unwrap())
        .env("CODA_BENCH_FSYNC_CHILD", n.to_string())
        .env("CODA_BENCH_SERVER", &s.addr)
        .env("CODA_BENCH_SECRET", s.secret())
        .env("CODA_BENCH_CACHE", scratch.join(format!("fs-cache-{tag}")))
        .env("CODA_BENCH_DIR", format!("/fsync-{tag}"))
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("no strace: {e}"))?;
    if !st.success() {
        return Err(format!("strace or its child failed: {st}"));
    }
    let text = std::fs::read_to_string(&out).map_err(|e| e.to_string())?;
    // Summary rows: "% time seconds usecs/call calls [errors] syscall".
    let total = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let name = *f.last()?;
            if !name.contains("sync") || f.len() < 5 {
                return None;
            }
            f[3].parse::<u64>().ok()
        })
        .sum();
    Ok(total)
}

fn fsyncs_per_create(s: &Server, scratch: &Path, n: usize) {
    for (empty, what) in [
        (false, "create+write 4 KiB+close"),
        (true, "create+close, empty"),
    ] {
        let tag = if empty { "empty" } else { "4k" };
        match (
            child_fsyncs(s, scratch, &format!("{tag}-zero"), 0, empty),
            child_fsyncs(s, scratch, &format!("{tag}-many"), n, empty),
        ) {
            (Ok(base), Ok(with)) => println!(
                "connected {what}: {:.2} client fsyncs per file ({with} with {n} files, {base} without; target <= 1)",
                with.saturating_sub(base) as f64 / n as f64
            ),
            (Err(e), _) | (_, Err(e)) => {
                println!("connected {what}: client fsyncs per file: skipped ({e})")
            }
        }
    }
}

fn creates_in_one_dir(s: &Server, scratch: &Path, n: usize) {
    let cache = scratch.join("onedir");
    let c = client(s, &cache);
    c.mkdir("/onedir", 0o755).unwrap();
    let data = vec![5u8; 64];
    // Every `chunk` creates in the big directory, `probe` creates in a fresh
    // small one: the machine is shared, so the big directory's cost is also
    // compared with the small one's measured at the same moments.
    let chunk = (n / 40).max(1);
    let probe = (chunk / 10).max(1);
    let mut big = [Duration::ZERO; 2];
    let mut small = [Duration::ZERO; 2];
    let mut k = 0;
    while k < n {
        let half = (k >= n / 2) as usize;
        let t = Instant::now();
        for j in k..(k + chunk).min(n) {
            write_file(&c, &format!("/onedir/f{j}"), &data);
        }
        big[half] += t.elapsed();
        let d = format!("/small{k}");
        c.mkdir(&d, 0o755).unwrap();
        let t = Instant::now();
        for j in 0..probe {
            write_file(&c, &format!("{d}/f{j}"), &data);
        }
        small[half] += t.elapsed();
        k += chunk;
    }
    let raw = big[1].as_secs_f64() / big[0].as_secs_f64();
    let load = small[1].as_secs_f64() / small[0].as_secs_f64();
    println!(
        "{n} creates in one directory: first {} {:.2} s, second {} {:.2} s; second / first {raw:.2} (target <= 1.2); small-directory creates at the same moments: second / first {load:.2}, so {:.2} with the machine's drift taken out",
        n / 2,
        big[0].as_secs_f64(),
        n / 2,
        big[1].as_secs_f64(),
        raw / load
    );
    drop(c);
    let _ = std::fs::remove_dir_all(&cache);
}

fn main() {
    if let Ok(n) = std::env::var("CODA_BENCH_FSYNC_CHILD") {
        fsync_child(n.parse().unwrap());
        return;
    }
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
    // CODA_BENCH_ONLY=reads,fetch,break,parallel,fsync,onedir,tls runs only those lines.
    let only = std::env::var("CODA_BENCH_ONLY").ok();
    let runs = |what: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|x| x == what))
    };
    if runs("reads") {
        cached_small_reads(&a, &scratch, iters);
    }
    if runs("fetch") {
        cold_fetch(&s, &a, &scratch, mib, rounds);
    }
    if runs("break") {
        callback_break_cost(&s, &a, &scratch, iters.min(2000));
    }
    let (per_thread, rounds, creates, one_dir) = if smoke {
        (5, 1, 5, 40)
    } else if quick {
        (50, 3, 50, 2000)
    } else {
        (100, 5, 200, 10_000)
    };
    if runs("parallel") {
        parallel_small_stores(&s, &scratch, per_thread, rounds);
    }
    if runs("fsync") {
        fsyncs_per_create(&s, &scratch, creates);
    }
    if runs("onedir") {
        creates_in_one_dir(&s, &scratch, one_dir);
    }
    let (small, tls_rounds) = if smoke {
        (5, 1)
    } else if quick {
        (100, 3)
    } else {
        (400, 5)
    };
    if runs("tls") {
        tls_vs_plaintext(&s, &a, &scratch, mib, small, tls_rounds);
    }
    drop(a);
    drop(s);
    let _ = std::fs::remove_dir_all(&scratch);
}

/// 7: the same work over TLS (server `s`) and over plaintext (a second
/// server), rounds interleaved so a busy spell on the machine hits both.
fn tls_vs_plaintext(
    s: &Server,
    a: &Client,
    scratch: &Path,
    mib: usize,
    small: usize,
    rounds: usize,
) {
    let pdir = scratch.join("plain");
    std::fs::create_dir_all(&pdir).unwrap();
    let p = Server::start_with(&pdir, &["--insecure-plaintext"]);
    let plain_client = |cache: &Path| {
        let mut c = p.config(cache);
        c.set("insecure_plaintext", "true").unwrap();
        c.set("cache_size", "4G").unwrap();
        Client::new(c).unwrap()
    };
    // The file to fetch, on both servers ("/big" on s is cold_fetch's).
    let size = mib << 20;
    let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
    let local = scratch.join("tls-local-big");
    std::fs::write(&local, &data).unwrap();
    write_file(a, "/tls-big", &data);
    let pa = plain_client(&scratch.join("plain-a"));
    write_file(&pa, "/tls-big", &data);
    drop(data);
    // Wall time, and the CPU time the client (this process) and the server
    // spent on it: on a loaded machine the CPU times are the steadier figure.
    let fetch = |c: &Client, server: u32| {
        let (c0, s0) = (threads_cpu(std::process::id()), threads_cpu(server));
        let t = Instant::now();
        let f = c.open("/tls-big", libc::O_RDONLY, 0).unwrap();
        let d = t.elapsed();
        let (c1, s1) = (threads_cpu(std::process::id()), threads_cpu(server));
        f.close().unwrap();
        (d, c1.saturating_sub(c0), s1.saturating_sub(s0))
    };
    let stores = |c: &Client, tag: &str| {
        let buf = vec![7u8; 4096];
        let dir = format!("/tls-small-{tag}");
        c.mkdir(&dir, 0o755).unwrap();
        let t = Instant::now();
        for i in 0..small {
            write_file(c, &format!("{dir}/f{i}"), &buf);
        }
        t.elapsed() / small as u32
    };
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (mut vs_copy, mut vs_plain, mut store_ratio) = (Vec::new(), Vec::new(), Vec::new());
    let (mut cpu_client, mut cpu_server) = (Vec::new(), Vec::new());
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    for r in 0..rounds {
        let base = socket_copy(&local, &scratch.join("tls-copy-big"));
        let tc = scratch.join(format!("tls-cold-{r}"));
        let (t, tcc, tsc) = fetch(&client(s, &tc), s.pid());
        let pc = scratch.join(format!("plain-cold-{r}"));
        let (pl, pcc, psc) = fetch(&plain_client(&pc), p.pid());
        println!(
            "tls round {r}: cold fetch CPU: TLS client {:.0} ms + server {:.0} ms, \
             plaintext client {:.0} ms + server {:.0} ms",
            ms(tcc),
            ms(tsc),
            ms(pcc),
            ms(psc)
        );
        cpu_client.push(ms(tcc) / ms(pcc).max(0.001));
        cpu_server.push(ms(tsc) / ms(psc).max(0.001));
        let _ = std::fs::remove_dir_all(&tc);
        let _ = std::fs::remove_dir_all(&pc);
        let ts = stores(a, &format!("t{r}"));
        let ps = stores(&pa, &format!("p{r}"));
        println!(
            "tls round {r}: cold fetch {mib} MiB: TLS {:.0} ms, plaintext {:.0} ms, socket copy {:.0} ms; \
             small store: TLS {:.0} us, plaintext {:.0} us",
            t.as_secs_f64() * 1e3,
            pl.as_secs_f64() * 1e3,
            base.as_secs_f64() * 1e3,
            us(ts),
            us(ps)
        );
        vs_copy.push(base.as_secs_f64() / t.as_secs_f64());
        vs_plain.push(pl.as_secs_f64() / t.as_secs_f64());
        store_ratio.push(ts.as_secs_f64() / ps.as_secs_f64());
    }
    println!(
        "tls: cold fetch {mib} MiB throughput, TLS / plain socket copy: median {:.2} (target >= 0.7); \
         TLS / plaintext fetch: median {:.2}",
        median(&mut vs_copy),
        median(&mut vs_plain)
    );
    println!(
        "tls: small store (4 KiB create+write+close) time, TLS / plaintext: median {:.2} (target <= 1.1)",
        median(&mut store_ratio)
    );
    println!(
        "tls: cold fetch CPU, TLS / plaintext: client median {:.2}, server median {:.2}",
        median(&mut cpu_client),
        median(&mut cpu_server)
    );
    drop(pa);
    let _ = std::fs::remove_dir_all(scratch.join("plain-a"));
}
