//! Replicated servers (issue 14) against a single server in the same run.
//!
//!   cargo bench --bench replication          (CODA_BENCH_QUICK=1 for a short run)
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

const BIN: &str = env!("CARGO_BIN_EXE_coda-server");

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
            let mut c = Command::new(BIN);
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
        let mut child = Command::new(BIN)
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

fn failover_runs(g: &mut Group, c: &Client, runs: usize, stop: bool) -> (Duration, Duration) {
    let mut t = Vec::new();
    for r in 0..runs {
        let l = g.settled_leader();
        write_file(c, "/warm", b"w");
        let since = Instant::now();
        if stop {
            g.signal(l, libc::SIGSTOP);
        } else {
            g.kill9(l);
        }
        t.push(until_acknowledged(
            c,
            &format!("{}-{r}", if stop { "stop" } else { "kill" }),
            since,
        ));
        if stop {
            g.signal(l, libc::SIGCONT);
        } else {
            g.serve(l);
        }
    }
    let max = *t.iter().max().unwrap();
    (median(t), max)
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
    let single = BenchServer::start(&scratch.join("single"));
    let mut sc = single.config(&scratch.join("cache-single"));
    sc.set("cache_size", "4G").unwrap();
    let sc = Client::new(sc).unwrap();
    let mut g = Group::start(&scratch.join("group"), 3);
    g.settled_leader();
    let gc = Client::new(g.config(&scratch.join("cache-group"))).unwrap();
    // Interleave halves so drift hits both alike.
    let mut s_t = Vec::new();
    let mut g_t = Vec::new();
    for half in 0..2 {
        s_t.push(small_stores(&sc, &format!("s{half}"), n_small / 2));
        g_t.push(small_stores(&gc, &format!("g{half}"), n_small / 2));
    }
    let (s, gr) = (median(s_t), median(g_t));
    println!(
        "small store (4 KiB, {n_small} files): single {:.2} ms, group of 3 {:.2} ms per file (median); ratio {:.2}x (goal <= 1.5x)",
        ms(s),
        ms(gr),
        ms(gr) / ms(s)
    );
    let bs = big_store(&sc, "/big", mib);
    let bg = big_store(&gc, "/big", mib);
    println!(
        "{mib} MiB store: single {:.0} ms, group of 3 {:.0} ms; ratio {:.2}x",
        ms(bs),
        ms(bg),
        ms(bg) / ms(bs)
    );
    let (kmed, kmax) = failover_runs(&mut g, &gc, kills, false);
    println!(
        "kill -9 of the leader to the next acknowledged write ({kills} runs): median {:.0} ms, max {:.0} ms (goal <= 1500 ms)",
        ms(kmed),
        ms(kmax)
    );
    let (smed, smax) = failover_runs(&mut g, &gc, stops, true);
    println!(
        "SIGSTOP of the leader to the next acknowledged write ({stops} runs): median {:.0} ms, max {:.0} ms (goal <= election timeout 500-1000 ms + 500 ms)",
        ms(smed),
        ms(smax)
    );
    drop(gc);
    drop(g);
    let _ = std::fs::remove_dir_all(&scratch);
}
