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
//!    ServerDown events (must be 0);
//! 5. failover releases every caller, including ones waiting to connect: a
//!    hung server whose accept queue is full (so a new connection hangs in
//!    connect), the client judged it dead, callers then block connecting or
//!    queued behind the one connecting; `failover` is called: the latest
//!    caller's EIO after it;
//! 6. a hung server (SIGSTOP), no failover configured: a reader of a cached
//!    file answered from the cache, timed from the read's start (and from
//!    the signal); the read starts at the signal or once the server was
//!    judged dead, through the library or through `coda-mount`.
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

/// The scheduler state (R, S, D, ...) of one of this process's threads.
fn thread_state(tid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

/// Fill the accept queue of a stopped server, so that a further connect
/// hangs (the kernel drops its SYN). Returns the connections that got in.
fn fill_accept_queue(addr: &str) -> Vec<std::net::TcpStream> {
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let mut held = Vec::new();
    for _ in 0..4096 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => held.push(s),
            Err(_) => return held,
        }
    }
    panic!("the accept queue of a stopped server never filled");
}

/// Scenario 5: per run, the time from the `failover` call to the last of the
/// blocked callers' return (each must be EIO).
fn release_all(scratch: &Path, runs: usize, callers: usize) -> Vec<Duration> {
    let mut out = Vec::new();
    for run in 0..runs {
        let dir = scratch.join(format!("release-{run}"));
        std::fs::create_dir_all(&dir).unwrap();
        let srv = Server::start(&dir);
        let (link, local) = (dir.join("web"), dir.join("local"));
        std::fs::create_dir(&local).unwrap();
        std::os::unix::fs::symlink(dir.join("remote"), &link).unwrap();
        let w = Client::new(config(&srv, &dir.join("w"))).unwrap();
        for k in 0..callers {
            write_file(&w, &format!("/f{k}"), b"x");
        }
        let mut cfg = config(&srv, &dir.join("c"));
        // Remote calls go to the server (no emulation); only the failover
        // call (none is configured) ends them, or the RPC timeout.
        cfg.set("disconnected_operation", "false").unwrap();
        cfg.set("heartbeat_ms", "100").unwrap();
        cfg.set("dead_after_ms", "500").unwrap();
        cfg.set("rpc_timeout_ms", "5000").unwrap();
        let c = Client::new(cfg).unwrap();
        srv.signal(libc::SIGSTOP);
        let held = fill_accept_queue(&srv.addr);
        let t = Instant::now();
        while c.state() == ClientState::Connected {
            assert!(t.elapsed() < Duration::from_secs(30), "never judged dead");
            std::thread::sleep(Duration::from_millis(5));
        }
        let (tx, rx) = crossbeam_channel::unbounded();
        let (tid_tx, tid_rx) = crossbeam_channel::unbounded();
        for k in 0..callers {
            let (c, tx, tid_tx) = (c.clone(), tx.clone(), tid_tx.clone());
            std::thread::spawn(move || {
                let _ = tid_tx.send(unsafe { libc::gettid() });
                let r = c.stat(&format!("/f{k}")).map(|_| ());
                let _ = tx.send((r, Instant::now()));
            });
        }
        let tids: Vec<i32> = (0..callers).map(|_| tid_rx.recv().unwrap()).collect();
        let t = Instant::now();
        while !tids.iter().all(|t| thread_state(*t) == Some('S')) {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "callers never blocked"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let early = rx.try_recv().ok();
        let t0 = Instant::now();
        c.failover(&link, &local).unwrap();
        let mut last = Duration::ZERO;
        for _ in 0..callers - early.is_some() as usize {
            let (r, t1) = rx.recv_timeout(Duration::from_secs(60)).unwrap();
            // Today a caller inside `connect` is not interrupted: it ends
            // with its own timeout instead of the failover's EIO.
            if !matches!(r, Err(coda::Error::Eio(_))) {
                println!("  (run {run}: a caller ended with {r:?}, not the failover's EIO)");
            }
            last = last.max(t1.saturating_duration_since(t0));
        }
        if let Some((r, _)) = early {
            println!("  (run {run}: a caller returned before the failover: {r:?})");
        }
        out.push(last);
        drop(held);
        drop(c);
        drop(w);
        drop(srv);
        let _ = std::fs::remove_dir_all(&dir);
    }
    out
}

/// A `coda-mount` of the server on `dir/mnt` (killed and unmounted on drop).
struct Mount {
    child: Child,
    mnt: std::path::PathBuf,
}

impl Drop for Mount {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(&self.mnt)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Mount with default liveness and no failover, or say why not.
fn mount(srv: &Server, dir: &Path) -> Result<Mount, String> {
    use std::io::BufRead;
    let bin = option_env!("CARGO_BIN_EXE_coda-mount").ok_or("built without coda-mount")?;
    if !Path::new("/dev/fuse").exists() {
        return Err("no /dev/fuse".into());
    }
    let conf = dir.join("mount.conf");
    std::fs::write(
        &conf,
        format!(
            "servers = {}\nsecret_file = {}\ncache_dir = {}\n",
            srv.addr,
            srv.secret().display(),
            dir.join("mcache").display()
        ),
    )
    .unwrap();
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mut child = Command::new(bin)
        .arg("--config")
        .arg(&conf)
        .arg(&mnt)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("coda-mount: {e}"))?;
    let mut line = String::new();
    let _ = std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
    let m = Mount { child, mnt };
    if !line.starts_with("mounted on") {
        return Err(format!("coda-mount said {line:?} (root needed)"));
    }
    Ok(m)
}

/// Scenario 6: per run, (time from SIGSTOP, time from the read's start) to
/// a cached file's contents, read through the library (`through_mount ==
/// false`) or through `coda-mount`. Default liveness (dead_after_ms 1000,
/// rpc_timeout_ms 10000), no failover. `late == false`: the read starts at
/// the signal, and the file's callback was broken by another client's store
/// just before (so the read asks the server first; disconnected operation
/// serves the copy cached before the break). `late == true`: the read
/// starts once the server was judged dead (the library client reports
/// Disconnected, plus 300 ms for the mount's own prober), on a file whose
/// cached copy is current.
fn hung_cached_read(
    scratch: &Path,
    runs: usize,
    through_mount: bool,
    late: bool,
) -> Result<Vec<(Duration, Duration)>, String> {
    let mut out = Vec::new();
    for run in 0..runs {
        let dir = scratch.join(format!("hungread-{through_mount}-{late}-{run}"));
        std::fs::create_dir_all(&dir).unwrap();
        let srv = Server::start(&dir);
        let c = Client::new(config(&srv, &dir.join("c"))).unwrap();
        let m = if through_mount {
            Some(mount(&srv, &dir)?)
        } else {
            None
        };
        write_file(&c, "/f", b"cached");
        let read = {
            let path = m.as_ref().map(|m| m.mnt.join("f"));
            let c = c.clone();
            move || -> Result<Vec<u8>, String> {
                match &path {
                    Some(p) => std::fs::read(p).map_err(|e| e.to_string()),
                    None => {
                        let e = |e: coda::Error| e.to_string();
                        let f = c.open("/f", libc::O_RDONLY, 0).map_err(e)?;
                        let mut buf = vec![0u8; 16];
                        let n = f.read_at(&mut buf, 0).map_err(e)?;
                        f.close().map_err(e)?;
                        buf.truncate(n);
                        Ok(buf)
                    }
                }
            }
        };
        assert_eq!(read().unwrap(), b"cached");
        write_file(&c, "/f", b"server");
        assert_eq!(read().unwrap(), b"server");
        let w = Client::new(config(&srv, &dir.join("w"))).unwrap();
        if !late {
            write_file(&w, "/f", b"broken");
        }
        std::thread::sleep(Duration::from_millis(100 + (run as u64 * 37) % 200));
        let t0 = Instant::now();
        srv.signal(libc::SIGSTOP);
        // On a loaded machine the server's other threads can still answer
        // for a moment after kill(2) returns (the group stop begins when
        // the thread chosen for the signal runs): start the read once every
        // thread is stopped, so it really meets a hung server.
        wait_all_threads_stopped(srv.pid());
        if late {
            while c.state() == ClientState::Connected {
                assert!(t0.elapsed() < Duration::from_secs(30), "never judged dead");
                std::thread::sleep(Duration::from_millis(2));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        let t1 = Instant::now();
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            let _ = tx.send(read());
        });
        let r = rx
            .recv_timeout(Duration::from_secs(60))
            .map_err(|_| "the read did not return within 60 s".to_string())?;
        out.push((t0.elapsed(), t1.elapsed()));
        let data = r.map_err(|e| format!("the read failed: {e}"))?;
        assert_eq!(data, b"server", "the copy cached (before the break)");
        drop(m);
        drop(w);
        drop(c);
        drop(srv);
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(out)
}

/// Wait (bounded) until every thread of process `pid` is stopped (state
/// `T` in /proc).
fn wait_all_threads_stopped(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return;
        };
        let all = tasks.flatten().all(|t| {
            std::fs::read_to_string(t.path().join("stat"))
                .ok()
                .and_then(|st| st.rsplit_once(") ").map(|(_, r)| r.starts_with('T')))
                .unwrap_or(true)
        });
        if all {
            return;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
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

    // CODA_BENCH_ONLY=detect,eio,release,hung,soak runs only those lines.
    let only = std::env::var("CODA_BENCH_ONLY").ok();
    let runs_line = |what: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|x| x == what))
    };
    if runs_line("detect") {
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
    }
    if runs_line("eio") {
        let (m, x) = median_max(pending_read_eio(&scratch, runs));
        println!(
            "failover call -> blocked read's EIO: median {:.3} ms, max {:.3} ms over {runs} runs (target <= 10 ms)",
            ms(m),
            ms(x)
        );
    }
    if runs_line("release") {
        let (m, x) = median_max(release_all(&scratch, runs.min(10), 4));
        println!(
            "failover releases every caller, including ones waiting to connect: max release time median {:.1} ms, max {:.1} ms over {} runs of 4 callers (target <= 10 ms)",
            ms(m),
            ms(x),
            runs.min(10)
        );
    }
    for (through_mount, late) in [(false, false), (true, false), (false, true), (true, true)] {
        if !runs_line("hung") {
            break;
        }
        let how = match (through_mount, late) {
            (false, false) => "through the library, read at the signal",
            (true, false) => "through coda-mount, read at the signal",
            (false, true) => "through the library, read once judged dead",
            (true, true) => "through coda-mount, read once judged dead",
        };
        match hung_cached_read(&scratch, runs.min(10), through_mount, late) {
            Ok(v) => {
                let (m, x) = median_max(v.iter().map(|p| p.0).collect());
                let (rm, rx) = median_max(v.iter().map(|p| p.1).collect());
                println!(
                    "hung server (SIGSTOP), no failover configured: a reader of a cached file ({how}) answered from the cache after median {:.0} ms, max {:.0} ms from its start ({:.0} / {:.0} ms from the signal) over {} runs (target <= dead_after 1000 + 100 ms)",
                    ms(rm),
                    ms(rx),
                    ms(m),
                    ms(x),
                    runs.min(10)
                );
            }
            Err(e) => println!("hung server, reader of a cached file ({how}): skipped: {e}"),
        }
    }
    if runs_line("soak") {
        let (downs, moved) = soak(&scratch, soak_s, size);
        println!(
            "no false alarm: {soak_s} s, 2 busy processes + {} MiB moved through clients: {downs} ServerDown events (must be 0)",
            moved >> 20
        );
        assert_eq!(downs, 0, "a server was declared down under load");
    }
    let _ = std::fs::remove_dir_all(&scratch);
}
