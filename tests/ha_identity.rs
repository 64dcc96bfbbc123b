//! Identity across IP takeover and restarts (ARCHITECTURE decision 4): the
//! server keys promises by client id and epoch, never by address. Clients
//! that must die or hang run in child processes (this test binary, run again
//! as `child_process_client`), so `kill -9` and SIGSTOP hit a real process.

mod client_util;
mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use client_util::*;
use coda::client::{Client, Event};
use common::{TempDir, TestServer};

/// A client in another process: caches `reads`, then answers `read PATH`.
struct ChildClient {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl ChildClient {
    fn start(srv: &TestServer, cache: &Path, bind: Option<&str>, reads: &[&str]) -> ChildClient {
        ChildClient::start_with(srv, cache, bind, reads, false)
    }

    fn start_with(
        srv: &TestServer,
        cache: &Path,
        bind: Option<&str>,
        reads: &[&str],
        reopen: bool,
    ) -> ChildClient {
        ChildClient::spawn(srv, cache, bind, reads, reopen, 500)
    }

    fn spawn(
        srv: &TestServer,
        cache: &Path,
        bind: Option<&str>,
        reads: &[&str],
        reopen: bool,
        dead_after_ms: u64,
    ) -> ChildClient {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["child_process_client", "--exact", "--nocapture"])
            .env("CODA_HA_CHILD", "1")
            .env("CODA_HA_SERVER", srv.addr().to_string())
            .env("CODA_HA_SECRET", srv.secret_file())
            .env("CODA_HA_CACHE", cache)
            .env("CODA_HA_READ", reads.join(","))
            .env("CODA_HA_REOPEN", if reopen { "1" } else { "" })
            .env("CODA_HA_BIND", bind.unwrap_or(""))
            .env("CODA_HA_DEAD_AFTER", dead_after_ms.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn the child client");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut c = ChildClient {
            child,
            stdin,
            stdout,
        };
        c.expect("@@ready");
        c
    }

    /// The next line of ours starting with `prefix` (harness lines skipped).
    fn expect(&mut self, prefix: &str) -> String {
        loop {
            let mut line = String::new();
            let n = self.stdout.read_line(&mut line).unwrap();
            assert!(n > 0, "child client ended before {prefix:?}");
            if let Some(rest) = line.trim_end().strip_prefix(prefix) {
                return rest.trim().to_string();
            }
        }
    }

    fn read(&mut self, path: &str) -> String {
        writeln!(self.stdin, "read {path}").unwrap();
        self.expect("@@data")
    }

    fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildClient {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        self.kill9();
    }
}

/// Not a test of its own: the body of the child client above.
#[test]
fn child_process_client() {
    if std::env::var("CODA_HA_CHILD").is_err() {
        return;
    }
    let var = |k: &str| std::env::var(k).unwrap();
    let make = || {
        let mut cfg = coda::client::Config::new();
        cfg.set("servers", &var("CODA_HA_SERVER")).unwrap();
        cfg.set("secret_file", &var("CODA_HA_SECRET")).unwrap();
        cfg.set("cache_dir", &var("CODA_HA_CACHE")).unwrap();
        cfg.set("heartbeat_ms", "100").unwrap();
        let dead_after = std::env::var("CODA_HA_DEAD_AFTER").unwrap_or_else(|_| "500".into());
        cfg.set("dead_after_ms", &dead_after).unwrap();
        if !var("CODA_HA_BIND").is_empty() {
            cfg.set("bind_addr", &var("CODA_HA_BIND")).unwrap();
        }
        Client::new(cfg).unwrap()
    };
    let mut c = make();
    let reads = var("CODA_HA_READ");
    let reads: Vec<&str> = reads.split(',').filter(|s| !s.is_empty()).collect();
    for p in &reads {
        get(&c, p);
    }
    if !var("CODA_HA_REOPEN").is_empty() {
        // Start again on the same cache: the index is written out cleanly,
        // and the new run holds callbacks under a new epoch.
        drop(c);
        c = make();
        for p in &reads {
            get(&c, p);
        }
    }
    println!("@@ready");
    for line in std::io::stdin().lines() {
        let line = line.unwrap();
        if let Some(p) = line.strip_prefix("read ") {
            let data = get(&c, p);
            println!("@@data {}", String::from_utf8_lossy(&data));
        }
    }
}

/// Run `f` on another thread; its result, or a panic if it takes more than
/// 20 s (the servers here use a 60 s break timeout for "held up" cases).
fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("{what} was held up"))
}

fn free_local_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

#[test]
fn a_new_client_from_a_killed_clients_address_and_port_gets_none_of_its_promises() {
    let srv = TestServer::start_with(&["--break-timeout-ms", "60000"]);
    let d = TempDir::new("ha-id");
    let w = client(&srv, &d.path().join("w"));
    put(&w, "/a-only", b"a1");
    put(&w, "/shared", b"s1");

    let addr = free_local_port();
    let mut a = ChildClient::start(
        &srv,
        &d.path().join("a"),
        Some(&addr),
        &["/a-only", "/shared"],
    );
    a.kill9();

    // B takes over A's address and port, with a cache of its own.
    let mut cfg = config(&srv, &d.path().join("b"));
    cfg.set("bind_addr", &addr).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let b = loop {
        match Client::new(cfg.clone()) {
            Ok(b) => break b,
            // The old 4-tuple may linger for a moment after the kill.
            Err(e) if Instant::now() < deadline => {
                eprintln!("retrying from {addr}: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("B cannot connect from {addr}: {e}"),
        }
    };
    assert_eq!(get(&b, "/shared"), b"s1");
    let shared = b.stat("/shared").unwrap().fid;
    let a_only = w.stat("/a-only").unwrap().fid;

    let w2 = w.clone();
    bounded(
        "the writer (A is dead, B holds no promise of A's)",
        move || {
            put(&w2, "/a-only", b"a2");
            put(&w2, "/shared", b"s2");
        },
    );
    assert_eq!(get(&b, "/shared"), b"s2", "B sees the change it caches");
    let w3 = w.clone();
    bounded("the next writer", move || put(&w3, "/shared", b"s3"));
    assert_eq!(get(&b, "/shared"), b"s3", "and every later one");
    // Events trail the acks a little: pull until the bus stays quiet.
    let evs: Vec<Event> =
        std::iter::from_fn(|| b.events().next(Duration::from_millis(500))).collect();
    let broken = |fid| {
        evs.iter()
            .filter(|e| matches!(e, Event::CallbackBreak { fid: f } if *f == fid))
            .count()
    };
    assert_eq!(broken(a_only), 0, "no break for a file only A cached");
    assert_eq!(broken(shared), 2, "one break per change of what B caches");
}

#[test]
fn a_restarted_client_loses_its_old_promises_and_refetches_only_what_changed() {
    let srv = TestServer::start_with(&["--break-timeout-ms", "60000"]);
    let d = TempDir::new("ha-id");
    let w = client(&srv, &d.path().join("w"));
    for f in ["/f1", "/f2", "/f3"] {
        put(&w, f, f.as_bytes());
    }
    // The old run: holds callbacks on all three under its epoch, then hangs
    // with its session open (the server still has it).
    let cache = d.path().join("a");
    let old = ChildClient::start_with(&srv, &cache, None, &["/f1", "/f2", "/f3"], true);
    old.signal(libc::SIGSTOP);
    // Its cache, as a crash would leave it, is what the restarted run finds.
    let copy = d.path().join("a-restarted");
    let st = Command::new("cp")
        .arg("-a")
        .arg(&cache)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(st.success());

    let restarted = client(&srv, &copy);
    assert_eq!(restarted.client_id(), {
        let id = std::fs::read(cache.join("client_id")).unwrap();
        <[u8; 16]>::try_from(id).unwrap()
    });
    let w2 = w.clone();
    bounded(
        "the writer (the old epoch's promises must be gone)",
        move || put(&w2, "/f2", b"changed"),
    );
    let before = restarted.stats();
    assert_eq!(get(&restarted, "/f1"), b"/f1");
    assert_eq!(get(&restarted, "/f2"), b"changed");
    assert_eq!(get(&restarted, "/f3"), b"/f3");
    let after = restarted.stats();
    assert_eq!(after.fetches - before.fetches, 1, "only /f2 is fetched");
    assert!(
        after.validations_unchanged >= 2,
        "{}",
        after.validations_unchanged
    );
}

#[test]
fn a_client_whose_break_times_out_revalidates_and_the_writer_is_not_held() {
    let srv = TestServer::start_with(&["--break-timeout-ms", "500"]);
    let d = TempDir::new("ha-id");
    let w = client(&srv, &d.path().join("w"));
    put(&w, "/f", b"old");
    let mut x = ChildClient::start(&srv, &d.path().join("x"), None, &["/f"]);
    x.signal(libc::SIGSTOP);

    let w2 = w.clone();
    let took = bounded("the writer", move || {
        let t0 = Instant::now();
        put(&w2, "/f", b"new");
        t0.elapsed()
    });
    eprintln!("writer's close with a hung callback holder took {took:?} (break timeout 500 ms)");

    x.signal(libc::SIGCONT);
    assert_eq!(x.read("/f"), "new", "the cut client revalidates");
}

/// A client whose own `dead_after` is longer than the server's break
/// timeout, stopped for longer than the break timeout only: it still thinks
/// its session fresh when it resumes, but the server dropped its callbacks.
/// The break timeout it learned from Welcome tells it to ask first.
#[test]
fn a_client_stopped_past_the_break_timeout_but_not_its_dead_after_asks_before_trusting() {
    let srv = TestServer::start_with(&["--break-timeout-ms", "300"]);
    let d = TempDir::new("ha-id");
    let w = client(&srv, &d.path().join("w"));
    put(&w, "/f", b"old");
    let mut x = ChildClient::spawn(&srv, &d.path().join("x"), None, &["/f"], false, 10_000);
    x.signal(libc::SIGSTOP);
    let w2 = w.clone();
    bounded("the writer", move || put(&w2, "/f", b"new"));
    // Queue the read before the client runs again, so that it races the
    // client's reading of the break and of the closed connection.
    writeln!(x.stdin, "read /f").unwrap();
    x.signal(libc::SIGCONT);
    assert_eq!(x.expect("@@data"), "new", "the stopped client revalidates");
}
