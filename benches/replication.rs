//! Replicated servers (issue 14) against a single server in the same run.
//!
//!   cargo bench --bench replication          (CODA_BENCH_QUICK=1 for a short run)
//!   CODA_BENCH_FAILOVERS=N sets the number of failovers of each kind;
//!   CODA_BENCH_SERVER=PATH runs another coda-server binary;
//!   CODA_BENCH_ONLY=small runs section 1 only;
//!   CODA_BENCH_SMALL=N stores N small files in section 1.
//!
//! 1. small connected stores (create + write 4 KiB + close), median per file:
//!    a group of three vs a single server (goal <= 1.5x);
//! 2. one 256 MiB store (64 MiB quick): group vs single;
//! 3. kill -9 of the leader to the next write acknowledged by the group
//!    (median and max of 20 runs, 3 quick; goal <= 1.5 s);
//! 4. SIGSTOP of the leader to the next acknowledged write (5 runs, 2
//!    quick; goal <= election timeout (0.5-1 s) + 0.5 s).

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coda::client::{Client, Config};
use coda::server::replication::{
    ask_status,
    transport::{peer_key, PeerKey},
};

mod common;
use common::{write_file, BenchServer};

const BUILT_BIN: &str = env!("CARGO_BIN_EXE_coda-server");

/// The server binary: `CODA_BENCH_SERVER` names another (a copy of an
/// earlier build, to measure before and after a change on one machine).
fn server_bin() -> String {
    std::env::var("CODA_BENCH_SERVER").unwrap_or_else(|_| BUILT_BIN.to_string())
}

struct Group {
    roots: Vec<PathBuf>,
    addrs: Vec<SocketAddr>,
    children: Vec<Option<Child>>,
    key: PeerKey,
}

impl Group {
    fn start(dir: &Path, n: usize) -> Group {
        let addrs: Vec<SocketAddr> = (0..n)
            .map(|_| {
                TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
            })
            .collect();
        let list = addrs
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let roots: Vec<PathBuf> = (0..n).map(|i| dir.join(format!("m{}", i + 1))).collect();
        for (i, r) in roots.iter().enumerate() {
            let mut c = Command::new(server_bin());
            c.args(["init", "--root"]).arg(r).args([
                "--node",
                &(i + 1).to_string(),
                "--group",
                &list,
            ]);
            if i > 0 {
                c.arg("--from").arg(&roots[0]);
            }
            assert!(c.stdout(Stdio::null()).status().unwrap().success());
        }
        let key = peer_key(&roots[0], true).unwrap();
        let mut g = Group {
            roots,
            addrs,
            children: (0..n).map(|_| None).collect(),
            key,
        };
        for i in 0..n {
            g.serve(i);
        }
        g
    }

    fn serve(&mut self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpListener::bind(self.addrs[i]).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let log_path = self.roots[i].with_extension("log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let mut child = Command::new(server_bin())
            .args(["serve", "--root"])
            .arg(&self.roots[i])
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.starts_with("listening on"),
            "member {} did not start: {}",
            i + 1,
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        self.children[i] = Some(child);
    }

    fn signal(&self, i: usize, sig: i32) {
        if let Some(c) = &self.children[i] {
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The leader every running member agrees on, with everyone caught up.
    fn settled_leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let sts: Option<Vec<_>> = (0..self.addrs.len())
                .filter(|i| self.children[*i].is_some())
                .map(|i| ask_status(&self.addrs[i].to_string(), i as u64 + 1, &self.key).ok())
                .collect();
            if let Some(sts) = sts {
                if let Some(l) = sts.iter().find(|s| s.role == "leader") {
                    if sts
                        .iter()
                        .all(|s| s.leader == l.id && s.applied >= l.commit)
                    {
                        return l.id as usize - 1;
                    }
                }
            }
            assert!(Instant::now() < deadline, "no settled leader");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn config(&self, cache: &Path) -> Config {
        let mut c = Config::new();
        c.set(
            "servers",
            &self
                .addrs
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(","),
        )
        .unwrap();
        c.set(
            "secret_file",
            self.roots[0].join("admin.secret").to_str().unwrap(),
        )
        .unwrap();
        c.set("cache_dir", cache.to_str().unwrap()).unwrap();
        c.set("cache_size", "4G").unwrap();
        c.set("heartbeat_ms", "100").unwrap();
        c.set("dead_after_ms", "500").unwrap();
        c
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.signal(i, libc::SIGCONT);
            self.kill9(i);
        }
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// CPU time (user + system) a process has used so far, from /proc.
fn cpu_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command's closing parenthesis: state is the
    // first, utime and stime the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_micros(f.iter().sum::<u64>() * 1_000_000 / hz)
}

/// CPU time used so far by these processes together.
fn cpu_sum(pids: &[u32]) -> Duration {
    pids.iter().map(|p| cpu_of(*p)).sum()
}

fn small_stores(c: &Client, tag: &str, n: usize) -> Duration {
    let data = vec![5u8; 4096];
    let mut t = Vec::with_capacity(n);
    for i in 0..n {
        let s = Instant::now();
        write_file(c, &format!("/{tag}-{i}"), &data);
        t.push(s.elapsed());
    }
    median(t)
}

fn big_store(c: &Client, path: &str, mib: usize) -> Duration {
    let chunk = vec![0x5au8; 1 << 20];
    let s = Instant::now();
    let mut f = c
        .open(path, libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC, 0o644)
        .unwrap();
    for i in 0..mib {
        let mut off = 0;
        while off < chunk.len() {
            off += f
                .write_at(&chunk[off..], (i << 20) as u64 + off as u64)
                .unwrap();
        }
    }
    f.close().unwrap();
    s.elapsed()
}

/// From the failure to the first write the group acknowledged (the client
/// may log writes meanwhile: only an empty log counts).
fn until_acknowledged(c: &Client, tag: &str, since: Instant) -> Duration {
    let deadline = since + Duration::from_secs(60);
    let mut i = 0;
    loop {
        i += 1;
        let ok = c
            .open(
                &format!("/{tag}-{i}"),
                libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
                0o644,
            )
            .and_then(|mut f| {
                f.write_at(b"x", 0)?;
                f.close()
            })
            .is_ok();
        if ok
            && (c.pending_records() == 0 || c.reintegrate_now().is_ok() && c.pending_records() == 0)
        {
            return since.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "no acknowledged write within 60 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The time from `since` until a member other than `old` reports itself
/// leader in a term above `term` (polled every 5 ms; None after 30 s).
fn elected_after(
    addrs: Vec<SocketAddr>,
    key: PeerKey,
    old: usize,
    term: u64,
    since: Instant,
) -> std::thread::JoinHandle<Option<Duration>> {
    std::thread::spawn(move || {
        let deadline = since + Duration::from_secs(30);
        while Instant::now() < deadline {
            for (i, a) in addrs.iter().enumerate().filter(|(i, _)| *i != old) {
                if let Ok(st) = ask_status(&a.to_string(), i as u64 + 1, &key) {
                    if st.role == "leader" && st.term > term {
                        return Some(since.elapsed());
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    })
}

/// Per failover: (failure → next acknowledged write, failure → a new
/// leader elected).
fn failover_runs(g: &mut Group, c: &Client, runs: usize, stop: bool) -> Vec<(Duration, Duration)> {
    let mut t = Vec::new();
    for r in 0..runs {
        let l = g.settled_leader();
        write_file(c, "/warm", b"w");
        let term = ask_status(&g.addrs[l].to_string(), l as u64 + 1, &g.key)
            .map(|s| s.term)
            .unwrap_or(0);
        let since = Instant::now();
        if stop {
            g.signal(l, libc::SIGSTOP);
        } else {
            g.kill9(l);
        }
        let elected = elected_after(g.addrs.clone(), g.key.clone(), l, term, since);
        let acked = until_acknowledged(
            c,
            &format!("{}-{r}", if stop { "stop" } else { "kill" }),
            since,
        );
        let elected = elected.join().unwrap().unwrap_or(acked);
        t.push((acked, elected));
        if stop {
            g.signal(l, libc::SIGCONT);
        } else {
            g.serve(l);
        }
    }
    t
}

/// The line printed for a set of failovers: the total, then its two parts
/// (the election, and from it to the acknowledged write).
fn failover_report(what: &str, goal: &str, t: &[(Duration, Duration)]) {
    let total: Vec<Duration> = t.iter().map(|x| x.0).collect();
    let elect: Vec<Duration> = t.iter().map(|x| x.1).collect();
    let after: Vec<Duration> = t.iter().map(|x| x.0.saturating_sub(x.1)).collect();
    let max = |v: &[Duration]| v.iter().max().copied().unwrap_or_default();
    println!(
        "{what} to the next acknowledged write ({} runs): median {:.0} ms, max {:.0} ms ({goal}); \
         of which the election: median {:.0} ms, max {:.0} ms; election to the write: median {:.0} ms, \
         max {:.0} ms (a new leader's write wait is at most {} ms with the default break timeout)",
        t.len(),
        ms(median(total.clone())),
        ms(max(&total)),
        ms(median(elect.clone())),
        ms(max(&elect)),
        ms(median(after.clone())),
        ms(max(&after)),
        (coda::server::DEFAULT_BREAK_TIMEOUT / 2 + coda::server::replication::WRITE_DELAY_MARGIN)
            .saturating_sub(coda::server::replication::node::LEASE_SLACK)
            .as_millis()
    );
}

fn main() {
    let quick = std::env::var_os("CODA_BENCH_QUICK").is_some();
    let smoke = !std::env::args().any(|a| a == "--bench");
    let scratch = std::env::temp_dir().join(format!("coda-bench-repl-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let (n_small, mib, kills, stops) = match (smoke, quick) {
        (true, _) => (5, 4, 1, 1),
        (false, true) => (50, 64, 3, 2),
        (false, false) => (300, 256, 20, 5),
    };
    // `CODA_BENCH_SMALL=N`: N small files (a longer section to profile).
    let n_small = std::env::var("CODA_BENCH_SMALL")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n >= 2)
        .unwrap_or(n_small);
    // `CODA_BENCH_FAILOVERS=N`: N failovers of each kind (20 kill -9 runs
    // in quick mode, say, without the full run's 256 MiB store).
    let (kills, stops) = match std::env::var("CODA_BENCH_FAILOVERS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        Some(n) if n > 0 => (n, n),
        _ => (kills, stops),
    };
    let single = BenchServer::start(&scratch.join("single"));
    let mut sc = single.config(&scratch.join("cache-single"));
    sc.set("cache_size", "4G").unwrap();
    let sc = Client::new(sc).unwrap();
    let mut g = Group::start(&scratch.join("group"), 3);
    g.settled_leader();
    let gc = Client::new(g.config(&scratch.join("cache-group"))).unwrap();
    // Rounds alternate the single server and the group, and each round's
    // ratio compares two runs a few hundred milliseconds apart, so drift on
    // the shared machine (another process, ext4's writeback) hits both
    // sides of a ratio alike; the median round is reported.
    let rounds = if n_small >= 60 { 6 } else { 2 };
    let per_round = (n_small / rounds).max(1);
    let (mut s_t, mut g_t, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    // The servers' CPU time over the section (members summed): on a
    // machine of few cores a group's three members compete for them.
    let g_pids: Vec<u32> = g.children.iter().flatten().map(Child::id).collect();
    let (mut s_cpu, mut g_cpu) = (Duration::ZERO, Duration::ZERO);
    for round in 0..rounds {
        let c0 = cpu_of(single.pid());
        let s = small_stores(&sc, &format!("s{round}"), per_round);
        s_cpu += cpu_of(single.pid()).saturating_sub(c0);
        let c0 = cpu_sum(&g_pids);
        let gr = small_stores(&gc, &format!("g{round}"), per_round);
        g_cpu += cpu_sum(&g_pids).saturating_sub(c0);
        ratios.push(gr.as_secs_f64() / s.as_secs_f64().max(1e-9));
        s_t.push(s);
        g_t.push(gr);
    }
    let (s, gr) = (median(s_t), median(g_t));
    ratios.sort_by(|a, b| a.total_cmp(b));
    let ratio = ratios[ratios.len() / 2];
    println!(
        "small store (4 KiB, {} files): single {:.2} ms, group of 3 {:.2} ms per file (median); ratio {ratio:.2}x (goal <= 1.5x; median of {rounds} rounds: {})",
        per_round * rounds,
        ms(s),
        ms(gr),
        ratios
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let per = (per_round * rounds).max(1) as f64;
    println!(
        "  server CPU per small file: single {:.2} ms, group of 3 {:.2} ms (members summed)",
        ms(s_cpu) / per,
        ms(g_cpu) / per
    );
    if std::env::var("CODA_BENCH_ONLY").is_ok_and(|v| v == "small") {
        drop((gc, g, sc, single));
        // `CODA_BENCH_KEEP`: the members' logs stay (`CODA_REPL_TRACE`'s lines).
        if std::env::var_os("CODA_BENCH_KEEP").is_some() {
            println!("kept {}", scratch.display());
        } else {
            let _ = std::fs::remove_dir_all(&scratch);
        }
        return;
    }
    let bs = big_store(&sc, "/big", mib);
    let bg = big_store(&gc, "/big", mib);
    println!(
        "{mib} MiB store: single {:.0} ms, group of 3 {:.0} ms; ratio {:.2}x",
        ms(bs),
        ms(bg),
        ms(bg) / ms(bs)
    );
    let k = failover_runs(&mut g, &gc, kills, false);
    failover_report("kill -9 of the leader", "goal <= 1500 ms", &k);
    let st = failover_runs(&mut g, &gc, stops, true);
    failover_report(
        "SIGSTOP of the leader",
        "goal <= election timeout 600-1000 ms + 500 ms",
        &st,
    );
    drop(gc);
    drop(g);
    let _ = std::fs::remove_dir_all(&scratch);
}
