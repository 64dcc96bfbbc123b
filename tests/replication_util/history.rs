//! The randomized history run of issue 14 and its checker, shared by
//! `tests/replication_history.rs` (about 40 s under `cargo test`) and
//! `benches/history.rs` (the longer run): three clients (each its own
//! `Client` with its own cache, in threads of this process) read and write
//! unique values on three files of a replicated group of three real
//! coda-server processes behind proxies, while a scheduler kills, stops and
//! cuts off members. See the test file for the properties checked.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coda::client::{Client, ClientState};

use super::{wait_until, Group};

/// Files the clients share.
pub const FILES: usize = 3;
/// Clients, each in its own thread.
pub const CLIENTS: usize = 3;

#[derive(Debug, Clone)]
pub enum Kind {
    Write(String),
    /// The value read ("" = empty file or none yet).
    Read(String),
}

#[derive(Debug, Clone)]
pub struct Op {
    pub client: usize,
    pub file: usize,
    pub kind: Kind,
    pub invoke: Instant,
    pub complete: Instant,
    /// Writes: committed by the group. Reads: answered.
    pub ok: bool,
    /// Unknown outcome (a write logged while disconnected).
    pub unknown: bool,
    /// The client was connected at invocation and completion.
    pub connected: bool,
    /// An unknown write: when the client's log had drained (it reached the
    /// group, or was refused, by then).
    pub landed: Option<Instant>,
    /// Records in the client's log when the operation began and ended
    /// (a failure's report: a read of a directory the log names is
    /// answered from the cache).
    pub logged: (usize, usize),
    /// The error, for a failure's report.
    pub error: Option<String>,
}

/// A small deterministic generator (no rand crate): xorshift.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn write(c: &Client, path: &str, v: &str) -> coda::Result<()> {
    let mut f = c.open(path, libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC, 0o644)?;
    f.write_at(v.as_bytes(), 0)?;
    f.close()
}

fn read(c: &Client, path: &str) -> coda::Result<String> {
    let f = match c.open(path, libc::O_RDONLY, 0) {
        Ok(f) => f,
        Err(coda::Error::NotFound(_)) => return Ok(String::new()),
        Err(e) => return Err(e),
    };
    let mut buf = vec![0u8; 256];
    let n = f.read_at(&mut buf, 0)?;
    f.close()?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// The seed from `CODA_HISTORY_SEED`, else one from the clock.
pub fn seed_from_env() -> u64 {
    crate::common::seed_from_env("CODA_HISTORY_SEED")
}

/// `CODA_HISTORY_RUN_S` if set (a shorter or longer run, to repeat one
/// phase), else `default`.
pub fn run_from_env(default: Duration) -> Duration {
    std::env::var("CODA_HISTORY_RUN_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(default, Duration::from_secs)
}

/// Names of the fault kinds, indexed as [`Report::faults`] records them.
pub const FAULT_NAMES: [&str; 3] = ["kill -9", "SIGSTOP", "cut"];

/// What one run did and what the checker found.
pub struct Report {
    pub seed: u64,
    /// The run length asked: the scheduler starts no fault after it.
    pub run: Duration,
    /// The clients' operations, from their start to the last fault healed
    /// (the scheduler's last fault may end after `run`).
    pub operating: Duration,
    /// The whole run, group start to final read.
    pub elapsed: Duration,
    pub t0: Instant,
    pub ops: Vec<Op>,
    /// Each file's value as a fresh client reads it at the end.
    pub finals: Vec<String>,
    /// (kind, member id) per fault: kind 0 kill -9, 1 SIGSTOP, 2 cut off.
    pub faults: Vec<(u64, u64)>,
    /// When each fault began and healed (ms from the start).
    pub timeline: Vec<String>,
    /// The leader's term when the clients began and at the end: each
    /// election begins a term, so the difference bounds the leader changes
    /// from above (an election that elects nobody also takes a term).
    pub terms: (u64, u64),
    pub violations: Vec<String>,
}

impl Report {
    /// Acknowledged writes.
    pub fn writes(&self) -> usize {
        self.ops
            .iter()
            .filter(|o| matches!(o.kind, Kind::Write(_)) && o.ok)
            .count()
    }

    /// Answered reads.
    pub fn reads(&self) -> usize {
        self.ops
            .iter()
            .filter(|o| matches!(o.kind, Kind::Read(_)) && o.ok)
            .count()
    }

    /// Writes as (acknowledged, failed, unknown) and reads as (answered,
    /// failed).
    pub fn outcomes(&self) -> ((usize, usize, usize), (usize, usize)) {
        let (mut w, mut r) = ((0, 0, 0), (0, 0));
        for o in &self.ops {
            match (&o.kind, o.ok, o.unknown) {
                (Kind::Write(_), true, _) => w.0 += 1,
                (Kind::Write(_), false, false) => w.1 += 1,
                (Kind::Write(_), false, true) => w.2 += 1,
                (Kind::Read(_), true, _) => r.0 += 1,
                (Kind::Read(_), false, _) => r.1 += 1,
            }
        }
        (w, r)
    }

    /// Faults injected per kind, as [`FAULT_NAMES`] orders them.
    pub fn faults_by_kind(&self) -> [usize; 3] {
        let mut n = [0; 3];
        for (k, _) in &self.faults {
            n[*k as usize] += 1;
        }
        n
    }

    /// Violations per property (1, 2, 3 of the test's list), told apart by
    /// how `check` words them.
    pub fn violations_by_property(&self) -> [usize; 3] {
        let mut n = [0; 3];
        for v in &self.violations {
            if v.starts_with("file ") {
                n[0] += 1;
            } else if v.starts_with("read of file ") {
                n[1] += 1;
            } else {
                n[2] += 1;
            }
        }
        n
    }

    /// The failure report: the violations, the faults' timeline and the
    /// first violating client's own operations.
    pub fn failure(&self) -> String {
        format!(
            "seed {}: {} violations: {:#?}\nfaults: {:#?}\n{}",
            self.seed,
            self.violations.len(),
            self.violations,
            self.timeline,
            own_ops(&self.ops, &self.violations, self.t0)
        )
    }
}

/// One history of `run` under faults with `seed`, checked.
pub fn run(seed: u64, run: Duration) -> Report {
    eprintln!("history seed {seed} (CODA_HISTORY_SEED to repeat)");
    let start = Instant::now();
    let (mut g, cutter) = Group::start_behind_proxies(3);
    let l = g.wait_leader(&[0, 1, 2]);
    let term0 = g.status(l).map_or(0, |s| s.term);
    let t0 = Instant::now();
    let caches = crate::common::TempDir::new("history");
    let history = Arc::new(Mutex::new(Vec::<Op>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    // The clients begin together, so their first creates may overlap: a
    // CI run found a client trusting a listing that missed the others'
    // creates there (a break between its lookup and its token, which its
    // first create's fid lease write widens; tests/client_own_edits.rs).
    let begin = Arc::new(std::sync::Barrier::new(CLIENTS));
    for k in 0..CLIENTS {
        let mut cfg = g.client_config(&caches.path().join(format!("c{k}")));
        cfg.set("rpc_timeout_ms", "3000").unwrap();
        cfg.set("dead_after_ms", "500").unwrap();
        let history = Arc::clone(&history);
        let stop = Arc::clone(&stop);
        let begin = Arc::clone(&begin);
        clients.push(std::thread::spawn(move || {
            // A member starved of CPU may miss a first connect's 500 ms:
            // the history starts once the client is in.
            let c = wait_until("the client connects", 60, || Client::new(cfg.clone()).ok());
            begin.wait();
            let mut rng = Rng(seed ^ (k as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let file = rng.below(FILES as u64) as usize;
                let path = format!("/h{file}");
                let connected0 = c.state() == ClientState::Connected;
                let logged0 = c.pending_records();
                let invoke = Instant::now();
                let op = if rng.below(2) == 0 {
                    n += 1;
                    let v = format!("c{k}-{n}");
                    let r = write(&c, &path, &v);
                    let complete = Instant::now();
                    let logged1 = c.pending_records();
                    let logged = logged1 > 0;
                    Op {
                        client: k,
                        file,
                        kind: Kind::Write(v),
                        invoke,
                        complete,
                        ok: r.is_ok() && !logged,
                        unknown: r.is_ok() && logged,
                        connected: connected0 && c.state() == ClientState::Connected,
                        landed: None,
                        logged: (logged0, logged1),
                        error: r.err().map(|e| e.to_string()),
                    }
                } else {
                    let r = read(&c, &path);
                    let complete = Instant::now();
                    let (value, error) = match r {
                        Ok(v) => (Some(v), None),
                        Err(e) => (None, Some(e.to_string())),
                    };
                    Op {
                        client: k,
                        file,
                        ok: value.is_some(),
                        kind: Kind::Read(value.unwrap_or_default()),
                        invoke,
                        complete,
                        unknown: false,
                        connected: connected0 && c.state() == ClientState::Connected,
                        landed: None,
                        logged: (logged0, c.pending_records()),
                        error,
                    }
                };
                let mut op = op;
                if op.unknown {
                    // Wait until the client's log reached the group before
                    // the next operation (bounded), so the operation's
                    // outcome is known when it lands.
                    let end = Instant::now() + Duration::from_secs(30);
                    while c.pending_records() > 0 && Instant::now() < end {
                        let _ = c.reintegrate_now();
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    op.landed = (c.pending_records() == 0).then(Instant::now);
                }
                history.lock().unwrap().push(op);
                std::thread::sleep(Duration::from_millis(rng.below(20)));
            }
            c
        }));
    }
    // The scheduler: one fault at a time, healed before the next.
    let mut rng = Rng(seed.rotate_left(17) | 1);
    let end = Instant::now() + run;
    let mut faults = Vec::new();
    // When each fault began and healed (ms from the start), printed with a
    // failure so a violation can be placed against them.
    let mut timeline = Vec::new();
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(500 + rng.below(1000)));
        let live: Vec<usize> = (0..3).collect();
        let target = if rng.below(2) == 0 {
            g.wait_leader(&live)
        } else {
            rng.below(3) as usize
        };
        let fault = rng.below(3);
        faults.push((fault, g.members[target].id));
        let began = t0.elapsed().as_millis();
        match fault {
            0 => g.kill9(target),
            1 => g.sigstop(target),
            _ => cutter.cut(g.members[target].id),
        }
        std::thread::sleep(Duration::from_millis(1000 + rng.below(2000)));
        match fault {
            0 => g.serve(target),
            1 => g.sigcont(target),
            _ => cutter.heal(g.members[target].id),
        }
        timeline.push(format!(
            "{} member {} {began}..{} ms",
            FAULT_NAMES[fault as usize],
            g.members[target].id,
            t0.elapsed().as_millis()
        ));
    }
    stop.store(true, Ordering::SeqCst);
    let operating = t0.elapsed();
    g.wait_caught_up(&[0, 1, 2]);
    let l = g.wait_leader(&[0, 1, 2]);
    let term1 = g.status(l).map_or(0, |s| s.term);
    let mut done = Vec::new();
    for t in clients {
        let c = t.join().expect("client thread");
        // Logged writes reach the group (or are refused as conflicts).
        wait_until("every client's log drained", 60, || {
            let _ = c.reintegrate_now();
            (c.pending_records() == 0).then_some(())
        });
        done.push(c);
    }
    let reader = Client::new(g.client_config(&caches.path().join("final"))).unwrap();
    let finals: Vec<String> = (0..FILES)
        .map(|f| read(&reader, &format!("/h{f}")).unwrap())
        .collect();
    let ops = history.lock().unwrap().clone();
    let violations = check(&ops, &finals, t0);
    Report {
        seed,
        run,
        operating,
        elapsed: start.elapsed(),
        t0,
        ops,
        finals,
        faults,
        timeline,
        terms: (term0, term1),
        violations,
    }
}

/// An operation with its times from the start, for a violation's report.
fn show(o: &Op, t0: Instant) -> String {
    format!(
        "client {} {:?} file {} {}..{} ms ok {} unknown {} connected {}",
        o.client,
        o.kind,
        o.file,
        o.invoke.duration_since(t0).as_millis(),
        o.complete.duration_since(t0).as_millis(),
        o.ok,
        o.unknown,
        o.connected
    )
}

/// The operations of the client of the first violation, up to its first
/// violating read and 10 after: what it did before it read stale.
fn own_ops(ops: &[Op], violations: &[String], t0: Instant) -> String {
    let Some(first) = violations.iter().find_map(|v| {
        let rest = v.strip_prefix("client ")?;
        rest.split(' ').next()?.parse::<usize>().ok()
    }) else {
        return String::new();
    };
    let mine: Vec<&Op> = ops.iter().filter(|o| o.client == first).collect();
    let mut out = format!("client {first}'s operations (log depth at start/end, error):\n");
    let mut after = None;
    for (i, o) in mine.iter().enumerate() {
        if after.is_some_and(|a| i > a + 10) || i > 400 {
            break;
        }
        let line = format!(
            "  {} log {}/{} {}\n",
            show(o, t0),
            o.logged.0,
            o.logged.1,
            o.error.as_deref().unwrap_or("")
        );
        if after.is_none()
            && violations
                .iter()
                .any(|v| v.contains(&format!("[read: {}]", show(o, t0))))
        {
            after = Some(i);
        }
        out.push_str(&line);
    }
    out
}

/// The properties the test file lists, over a whole history and the final
/// values: one line per violation.
pub fn check(ops: &[Op], finals: &[String], t0: Instant) -> Vec<String> {
    let mut bad = Vec::new();
    // Every value written per file (any outcome).
    let mut written: HashMap<(usize, &str), &Op> = HashMap::new();
    for o in ops {
        if let Kind::Write(v) = &o.kind {
            written.insert((o.file, v.as_str()), o);
        }
    }
    let acked = |f: usize| {
        ops.iter()
            .filter(move |o| o.file == f && o.ok && matches!(o.kind, Kind::Write(_)))
    };
    // 1. The final value is the last acknowledged write's or a later one's.
    for (f, fin) in finals.iter().enumerate() {
        let Some(w) = written.get(&(f, fin.as_str())) else {
            if !fin.is_empty() || acked(f).next().is_some() {
                bad.push(format!("file {f}: final value {fin:?} was never written"));
            }
            continue;
        };
        for a in acked(f) {
            // `a` finished before `w` began: `w` is later, fine. `a` began
            // after `w` finished and was acknowledged: it must have replaced w.
            if a.invoke > w.complete && w.ok {
                bad.push(format!(
                    "file {f}: final {fin:?} but the acknowledged write {:?} came after it",
                    a.kind
                ));
            }
            if a.invoke > w.complete && !w.ok && !w.unknown {
                bad.push(format!("file {f}: final {fin:?} is a failed write's"));
            }
        }
    }
    for r in ops
        .iter()
        .filter(|o| o.ok && matches!(o.kind, Kind::Read(_)))
    {
        let Kind::Read(v) = &r.kind else { continue };
        // 2. Reads return written values.
        let source = written.get(&(r.file, v.as_str()));
        if !v.is_empty() && source.is_none() {
            bad.push(format!(
                "read of file {} returned {v:?}, never written",
                r.file
            ));
            continue;
        }
        if !r.connected {
            continue;
        }
        // 3. No read older than a write acknowledged to another connected
        // client before the read began.
        for w in
            acked(r.file).filter(|w| w.client != r.client && w.connected && w.complete < r.invoke)
        {
            let Kind::Write(wv) = &w.kind else { continue };
            if wv == v {
                continue;
            }
            let stale = match source {
                None => true, // empty, yet w had been acknowledged
                // A write of unknown outcome (logged while disconnected)
                // reached the group at some point before the client's log
                // drained: only one that had landed before w began is
                // replaced by it.
                Some(s) if s.unknown => s.landed.is_some_and(|l| l < w.invoke),
                Some(s) => s.complete < w.invoke, // the value read was replaced by w
            };
            if stale {
                bad.push(format!(
                    "client {} read {v:?} from file {} after client {}'s write {wv:?} was acknowledged \
                     [read: {}] [write: {}] [source: {}]",
                    r.client,
                    r.file,
                    w.client,
                    show(r, t0),
                    show(w, t0),
                    source.map(|s| show(s, t0)).unwrap_or_default()
                ));
            }
        }
    }
    bad
}
