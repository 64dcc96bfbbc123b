//! Soak under abuse (issue 9 §4): a well-behaved client's latency alone and
//! beside hostile clients, and the server's peak memory.
//!
//!   cargo bench --bench abuse            (CODA_BENCH_QUICK=1 for a short run;
//!                                         CODA_ABUSE_PHASES=flood,all for some phases)
//!
//! The good client repeats one operation: write a 4 KiB file (create, upload,
//! store), stat it, and open/read/close another small file; the first
//! reaches the server every time. It is measured alone, then beside each
//! hostile pattern, then beside all of them at once:
//!   unread    a control connection sending 1 MiB-reply GetAttrs, never reading;
//!   dribble   50 handshakes sending a byte a second;
//!   idle      1,000 idle unauthenticated connections (reopened when cut);
//!   upload    a bulk connection uploading 1 MiB chunks it never commits
//!             (bounded here to 256 MiB, 64 MiB quick, so the bench cannot
//!             fill the disk it runs on; the server runs with
//!             --max-staged 128M --max-staged-per-session 64M);
//!   flood     a control connection pipelining 4,096-record batches.
//! Every hostile loop stops by itself at the end of its phase. Printed: the
//! good client's p50/p99 per phase, p99 against alone (goal <= 3x), and the
//! server's peak RSS (VmHWM; goal <= 256 MiB). Also where the CPU went in
//! each phase: the server's CPU for the hostile sessions (its CPU minus
//! what the good client's operations cost it alone), the bench's own
//! hostile threads, and the good client, as shares of the wall time
//! (CODA_ABUSE_DEBUG=1 adds the server's CPU by thread group).
//! CODA_ABUSE_NICE=N runs the hostile threads at nice N (default 0), to
//! take their own CPU use, which on a real network is on other machines,
//! out of the good client's way; CODA_SERVER_NO_NICE=1 turns off the
//! server's lowered priorities for bulk readers and handshakes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use coda::client::Client;
use coda::proto::auth::read_secret_file;
use coda::proto::frame::encode_frame;
use coda::proto::{ConnKind, Msg};

mod common;
use common::{write_file, BenchServer as Server};

#[allow(dead_code)]
#[path = "../tests/common/raw.rs"]
mod raw;
use raw::{hello, rec, Raw};

/// Flood batches answered, for the report.
static FLOOD_DONE: AtomicU64 = AtomicU64::new(0);
/// Uploads the server refused.
static REFUSED: AtomicU64 = AtomicU64::new(0);
/// Bytes the uploader got accepted (staged, never committed), in all.
static UPLOADED: AtomicU64 = AtomicU64::new(0);

const PATTERNS: [&str; 5] = ["unread", "dribble", "idle", "upload", "flood"];

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// CPU ticks (user + system) of a process, its exited threads included.
fn proc_ticks(pid: u32) -> u64 {
    stat_ticks(&format!("/proc/{pid}/stat")).map_or(0, |(_, t)| t)
}

/// (thread name, CPU ticks) of a stat file.
fn stat_ticks(path: &str) -> Option<(String, u64)> {
    let s = std::fs::read_to_string(path).ok()?;
    let (head, rest) = s.rsplit_once(')')?;
    let name = head.split_once('(')?.1.to_string();
    // After the name: state is field 3; utime and stime are fields 14, 15.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some((name, t))
}

/// CPU ticks of a process's live threads, summed by thread-name group
/// (the name without its trailing number).
fn thread_ticks(pid: u32) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for e in dir.flatten() {
        let path = format!("{}/stat", e.path().display());
        if let Some((name, t)) = stat_ticks(&path) {
            let group = name.trim_end_matches(|c: char| c.is_ascii_digit() || c == '-');
            *out.entry(group.to_string()).or_insert(0) += t;
        }
    }
    out
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}

/// Where the CPU went during a measured window.
#[derive(Default, Clone, Copy)]
struct Cpu {
    /// Seconds of CPU: the server process, the bench's hostile threads
    /// (the bench process minus the good client's threads), the good
    /// client's threads (every live thread not named `hostile-*`).
    server: f64,
    attackers: f64,
    good: f64,
    wall: f64,
}

struct CpuMark {
    at: Instant,
    server: u64,
    bench: u64,
    good: u64,
    /// The server's live threads by name group (workers, connection
    /// readers, control writers).
    server_threads: std::collections::BTreeMap<String, u64>,
}

fn good_ticks() -> u64 {
    thread_ticks(std::process::id())
        .iter()
        // Hostile threads and the threads they spawn (which inherit the
        // name) are `hostile-*`; everything else is the good client's.
        .filter(|(g, _)| !g.starts_with("hostile"))
        .map(|(_, t)| t)
        .sum()
}

impl CpuMark {
    fn now(server: u32) -> CpuMark {
        CpuMark {
            at: Instant::now(),
            server: proc_ticks(server),
            bench: proc_ticks(std::process::id()),
            good: good_ticks(),
            server_threads: thread_ticks(server),
        }
    }
    fn since(&self, server: u32) -> Cpu {
        let now = CpuMark::now(server);
        let hz = clk_tck();
        if std::env::var_os("CODA_ABUSE_DEBUG").is_some() {
            let groups: Vec<String> = now
                .server_threads
                .iter()
                .map(|(g, t)| {
                    let before = self.server_threads.get(g).copied().unwrap_or(0);
                    format!("{g} {:.2} s", t.saturating_sub(before) as f64 / hz)
                })
                .collect();
            println!(
                "server CPU by thread group (live threads): {}",
                groups.join(", ")
            );
        }
        let good = now.good.saturating_sub(self.good) as f64 / hz;
        Cpu {
            server: now.server.saturating_sub(self.server) as f64 / hz,
            attackers: (now.bench.saturating_sub(self.bench) as f64 / hz - good).max(0.0),
            good,
            wall: now.at.duration_since(self.at).as_secs_f64(),
        }
    }
}

/// Nice value for the bench's hostile threads (`CODA_ABUSE_NICE`,
/// default 0: as fast as the good client). On a real network attackers
/// run on their own machines; on the bench's one machine their own CPU
/// use competes with the good client process, which the server cannot
/// help. A positive value keeps them below the good client so that what
/// is measured is the server's share.
fn attacker_nice() -> i32 {
    std::env::var("CODA_ABUSE_NICE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Lower the calling thread's priority (Linux: nice is per thread, and
/// threads it spawns inherit it).
fn nice_this_thread(n: i32) {
    if n <= 0 {
        return;
    }
    // SAFETY: setpriority on our own thread id.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, n);
    }
}

fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

/// What hostile threads share: where to go and when to stop.
#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    secret: PathBuf,
    stop: Arc<AtomicBool>,
    until: Instant,
    upload_budget: u64,
    /// Distinct client ids for hostile sessions.
    next_id: Arc<AtomicU64>,
}

impl Target {
    fn going(&self) -> bool {
        !self.stop.load(Ordering::SeqCst) && Instant::now() < self.until
    }
    fn id(&self) -> [u8; 16] {
        let n = self.next_id.fetch_add(1, Ordering::SeqCst);
        let mut id = [0xAB; 16];
        id[..8].copy_from_slice(&n.to_be_bytes());
        id
    }
    fn control(&self) -> Option<Raw> {
        self.connect(ConnKind::Control, self.id())
    }
    fn connect(&self, kind: ConnKind, id: [u8; 16]) -> Option<Raw> {
        let secret = read_secret_file(&self.secret).ok()?;
        Raw::connect(self.addr, "admin", &secret, kind, id, 1).ok()
    }
    /// Pause between reconnects that stops early when the phase ends.
    fn nap(&self, d: Duration) {
        let end = Instant::now() + d;
        while self.going() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Run `body` again and again (a cut connection panics inside Raw) until
/// the phase ends.
fn hostile(name: &str, t: &Target, body: fn(&Target)) -> JoinHandle<()> {
    let t = t.clone();
    std::thread::Builder::new()
        .name(format!("hostile-{name}"))
        .spawn(move || {
            nice_this_thread(attacker_nice());
            while t.going() {
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&t)));
                t.nap(Duration::from_millis(100));
            }
        })
        .unwrap()
}

fn unread(t: &Target) {
    let Some(c) = t.control() else { return };
    let n = (coda::proto::MAX_FRAME - 13) / (1 + coda::proto::codec::ATTR_LEN);
    let m = Msg::GetAttrs {
        fids: vec![c.root; n],
    };
    let frame = encode_frame(m.kind(), 1, &m.encode());
    let mut s = c.stream.try_clone().unwrap();
    let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
    while t.going() {
        match s.write_all(&frame) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return,
        }
    }
}

fn dribble(t: &Target) {
    let h = hello(ConnKind::Control, "admin", t.id(), 1, [0; 32]);
    let bytes = encode_frame(h.kind(), 0, &h.encode());
    // Inside TLS, as a client past the TLS handshake (plaintext bytes to a
    // TLS server are refused at their first byte).
    let mut conns: Vec<(coda::tls::Stream, usize)> = Vec::new();
    while t.going() {
        conns.retain_mut(|(c, i)| {
            if *i >= bytes.len() || c.write_all(&bytes[*i..*i + 1]).is_err() {
                return false;
            }
            *i += 1;
            true
        });
        while conns.len() < 50 {
            match TcpStream::connect(t.addr).ok().and_then(raw::try_tls_over) {
                Some(c) => conns.push((c, 0)),
                None => break,
            }
        }
        t.nap(Duration::from_secs(1));
    }
}

fn idle(t: &Target) {
    let mut conns: Vec<TcpStream> = Vec::new();
    while t.going() {
        // Drop the ones the server closed (a read sees EOF at once).
        conns.retain(|c| {
            let _ = c.set_nonblocking(true);
            let mut b = [0u8; 64];
            matches!(
                (&*c).read(&mut b),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
            )
        });
        while conns.len() < 1000 && t.going() {
            match TcpStream::connect_timeout(&t.addr, Duration::from_secs(1)) {
                Ok(c) => conns.push(c),
                Err(_) => break,
            }
        }
        t.nap(Duration::from_secs(1));
    }
}

fn upload(t: &Target) {
    // The bulk connection joins the control session of the same id.
    let id = t.id();
    let Some(_ctl) = t.connect(ConnKind::Control, id) else {
        return;
    };
    let Some(mut b) = t.connect(ConnKind::Bulk, id) else {
        return;
    };
    let chunk = vec![0x5Au8; 1 << 20];
    let mut up = 1u64;
    while t.going() && UPLOADED.load(Ordering::SeqCst) < t.upload_budget {
        match b.upload(up, &chunk) {
            Msg::Uploaded { .. } => {
                UPLOADED.fetch_add(chunk.len() as u64, Ordering::SeqCst);
            }
            // Refused (quota, staged bound, full disk): back off a little.
            _ => {
                REFUSED.fetch_add(1, Ordering::SeqCst);
                t.nap(Duration::from_millis(100))
            }
        }
        up += 1;
    }
    // Hold the session (and what it staged) until the phase ends.
    while t.going() {
        t.nap(Duration::from_millis(200));
    }
}

fn flood(t: &Target) {
    let Some(mut c) = t.control() else { return };
    let f = c.alloc(1)[0];
    let name = format!("flood-{}", f.vnode);
    c.apply(vec![rec::create(1, c.root, &name, f)]);
    // Frames go out whole under this lock: batches from the loop below,
    // break acks from the reader (this client is greedy, not broken).
    let w = Arc::new(parking_lot::Mutex::new(c.stream.try_clone().unwrap()));
    let _ = c.stream.set_read_timeout(Some(Duration::from_millis(500)));
    let stop = Arc::new(AtomicBool::new(false));
    let (stop2, w2) = (Arc::clone(&stop), Arc::clone(&w));
    let reader = std::thread::spawn(move || {
        while !stop2.load(Ordering::SeqCst) {
            match c.recv() {
                Some((_, Msg::Reintegrated { .. })) => {
                    FLOOD_DONE.fetch_add(1, Ordering::SeqCst);
                }
                Some((bid, Msg::CallbackBreak { .. })) => {
                    let ack = encode_frame(Msg::BreakAck.kind(), bid, &Msg::BreakAck.encode());
                    let _ = w2.lock().write_all(&ack);
                }
                // A read timeout, a close or a refusal; the writer decides.
                _ => continue,
            }
        }
    });
    let mut store = 2u64;
    let mut batch = 1u64;
    while t.going() {
        let records = (0..coda::proto::MAX_BATCH)
            .map(|i| {
                store += 1;
                rec::chmod(store, f, 0, 0o600 | (i as u32 & 0o77))
            })
            .collect();
        let m = Msg::Reintegrate { records };
        batch += 1;
        let frame = encode_frame(m.kind(), batch, &m.encode());
        if w.lock().write_all(&frame).is_err() {
            break;
        }
    }
    stop.store(true, Ordering::SeqCst);
    let _ = w.lock().shutdown(std::net::Shutdown::Both);
    let _ = reader.join();
}

fn start_pattern(name: &str, t: &Target) -> Vec<JoinHandle<()>> {
    match name {
        "unread" => vec![hostile(name, t, unread)],
        "dribble" => vec![hostile(name, t, dribble)],
        "idle" => vec![hostile(name, t, idle)],
        "upload" => vec![hostile(name, t, upload)],
        "flood" => vec![hostile(name, t, flood)],
        _ => unreachable!(),
    }
}

/// The good client's operation, repeated until `until`; returns latencies.
fn good_client(c: &Client, until: Instant, max_ops: usize) -> Vec<Duration> {
    let data = vec![3u8; 4096];
    let mut buf = vec![0u8; 8192];
    let mut out = Vec::new();
    while Instant::now() < until && out.len() < max_ops {
        let t = Instant::now();
        write_file(c, "/good-w", &data);
        let t1 = t.elapsed();
        c.stat("/good-w").unwrap();
        let t2 = t.elapsed();
        let f = c.open("/good-r", libc::O_RDONLY, 0).unwrap();
        assert_eq!(f.read_at(&mut buf, 0).unwrap(), 4096);
        f.close().unwrap();
        let el = t.elapsed();
        if std::env::var_os("CODA_ABUSE_DEBUG").is_some() && el > Duration::from_millis(300) {
            eprintln!("slow op: write {t1:?} stat {t2:?} total {el:?}");
        }
        out.push(el);
    }
    out
}

struct Phase {
    name: String,
    p50: Duration,
    p99: Duration,
    ops: usize,
    cpu: Cpu,
}

#[allow(clippy::too_many_arguments)]
fn phase(
    name: &str,
    patterns: &[&str],
    s: &Server,
    c: &Client,
    dur: Duration,
    settle: Duration,
    budget: u64,
    ids: &Arc<AtomicU64>,
) -> Phase {
    let stop = Arc::new(AtomicBool::new(false));
    let t = Target {
        addr: s.addr.parse().unwrap(),
        secret: s.secret(),
        stop: Arc::clone(&stop),
        until: Instant::now() + settle + dur + Duration::from_secs(2),
        upload_budget: budget,
        next_id: Arc::clone(ids),
    };
    let flood0 = FLOOD_DONE.load(Ordering::SeqCst);
    let mut threads = Vec::new();
    for p in patterns {
        threads.extend(start_pattern(p, &t));
    }
    // Let the hostile load build up before measuring.
    std::thread::sleep(settle);
    let mark = CpuMark::now(s.pid());
    let mut lat = good_client(c, Instant::now() + dur, 1_000_000);
    let cpu = mark.since(s.pid());
    stop.store(true, Ordering::SeqCst);
    for th in threads {
        let _ = th.join();
    }
    lat.sort();
    let (p50, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
    let floods = FLOOD_DONE.load(Ordering::SeqCst) - flood0;
    println!(
        "{name:>8}: {} ops, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, server RSS now {} MiB{}",
        lat.len(),
        ms(p50),
        ms(p99),
        ms(*lat.last().unwrap()),
        status_kib(s.pid(), "VmRSS") / 1024,
        if floods > 0 {
            format!(", {floods} flood batches of 4,096 records applied")
        } else {
            String::new()
        }
    );
    println!(
        "{name:>8}: CPU over {:.1} s: server {:.2} s, hostile threads {:.2} s, good client {:.2} s \
         (cores busy: {:.2} of 2)",
        cpu.wall,
        cpu.server,
        cpu.attackers,
        cpu.good,
        (cpu.server + cpu.attackers + cpu.good) / cpu.wall
    );
    Phase {
        name: name.into(),
        p50,
        p99,
        ops: lat.len(),
        cpu,
    }
}

fn main() {
    let quick = std::env::var_os("CODA_BENCH_QUICK").is_some();
    // `cargo test --benches` runs benches with --bench absent: stay tiny then.
    let smoke = !std::env::args().any(|a| a == "--bench");
    // Hostile threads die by panics inside Raw when the server cuts them;
    // only the main thread's panics are news.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name() == Some("main") {
            default_hook(info);
        }
    }));
    raise_nofile();
    let (dur, settle, budget) = if smoke {
        (Duration::from_secs(1), Duration::from_millis(300), 8 << 20)
    } else if quick {
        (Duration::from_secs(5), Duration::from_secs(2), 64u64 << 20)
    } else {
        (
            Duration::from_secs(20),
            Duration::from_secs(3),
            256u64 << 20,
        )
    };
    let scratch = std::env::temp_dir().join(format!("coda-bench-abuse-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    // Staged-upload bounds below the uploader's budget, so the bench shows
    // them refusing it (the defaults, 4 GiB a session, are above it).
    let s = Server::start_with(
        &scratch,
        &["--max-staged", "128M", "--max-staged-per-session", "64M"],
    );
    let mut cfg = s.config(&scratch.join("cache-good"));
    cfg.set("cache_size", "1G").unwrap();
    let c = Client::new(cfg).unwrap();
    write_file(&c, "/good-r", &[4u8; 4096]);
    let ids = Arc::new(AtomicU64::new(1));

    let alone = phase("alone", &[], &s, &c, dur, Duration::ZERO, budget, &ids);
    let mut phases = Vec::new();
    // CODA_ABUSE_PHASES=flood,all runs only those phases (with both alone runs).
    let only = std::env::var("CODA_ABUSE_PHASES").ok();
    let wanted = |p: &str| only.as_deref().is_none_or(|o| o.split(',').any(|w| w == p));
    for p in PATTERNS.into_iter().filter(|p| wanted(p)) {
        phases.push(phase(p, &[p], &s, &c, dur, settle, budget, &ids));
    }
    if wanted("all") {
        phases.push(phase("all", &PATTERNS, &s, &c, dur, settle, budget, &ids));
    }
    let again = phase("alone2", &[], &s, &c, dur, Duration::ZERO, budget, &ids);

    let hwm = status_kib(s.pid(), "VmHWM") / 1024;
    // The machine is shared: compare against the quieter of the two alone
    // runs (the stricter baseline).
    let base = if again.p99 < alone.p99 {
        &again
    } else {
        &alone
    };
    println!(
        "good client alone: before the abuse p50 {:.2} ms p99 {:.2} ms ({} ops); after it p50 {:.2} ms p99 {:.2} ms ({} ops); baseline p99 {:.2} ms",
        ms(alone.p50),
        ms(alone.p99),
        alone.ops,
        ms(again.p50),
        ms(again.p99),
        again.ops,
        ms(base.p99)
    );
    for p in &phases {
        println!(
            "beside {:>7}: p50 {:.2} ms p99 {:.2} ms ({} ops); p99/alone {:.2}x (goal <= 3x)",
            p.name,
            ms(p.p50),
            ms(p.p99),
            p.ops,
            ms(p.p99) / ms(base.p99)
        );
    }
    // The server's CPU per good operation alone: what the good client
    // itself costs it; the rest of the server's CPU beside a pattern is
    // spent on the hostile sessions.
    let per_op = (alone.cpu.server / alone.ops.max(1) as f64)
        .min(again.cpu.server / again.ops.max(1) as f64);
    println!(
        "server CPU per good op alone: {:.3} ms; hostile threads at nice {}",
        per_op * 1e3,
        attacker_nice()
    );
    for p in &phases {
        let for_hostile = (p.cpu.server - per_op * p.ops as f64).max(0.0);
        println!(
            "beside {:>7}: CPU share of the wall time: server for hostile sessions {:.0}%, \
             bench hostile threads {:.0}%, good client {:.0}%, server for the good client {:.0}%",
            p.name,
            100.0 * for_hostile / p.cpu.wall,
            100.0 * p.cpu.attackers / p.cpu.wall,
            100.0 * p.cpu.good / p.cpu.wall,
            100.0 * (p.cpu.server - for_hostile) / p.cpu.wall
        );
    }
    println!("server peak RSS (VmHWM) {hwm} MiB (goal <= 256 MiB)");
    println!(
        "uncommitted uploads: {} MiB accepted (the bench stops at {} MiB), {} refused",
        UPLOADED.load(Ordering::SeqCst) >> 20,
        budget >> 20,
        REFUSED.load(Ordering::SeqCst)
    );
    drop(c);
    drop(s);
    let _ = std::fs::remove_dir_all(&scratch);
}
