//! Shared test harness: real `coda-server` processes on loopback ports chosen
//! at run time, killed by PID and cleaned up even when a test fails.
#![allow(dead_code)]

pub mod prereq;
pub mod proxy;
pub mod raw;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SERVER_BIN: &str = env!("CARGO_BIN_EXE_coda-server");

/// A scratch directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let base = std::env::temp_dir();
        for i in 0..1000u32 {
            let p = base.join(format!("coda-test-{tag}-{}-{i}", std::process::id()));
            if std::fs::create_dir(&p).is_ok() {
                return TempDir(p);
            }
        }
        panic!("could not make a temp dir under {}", base.display());
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `coda-server` child process serving a data directory of its own.
pub struct TestServer {
    pub dir: TempDir,
    child: Option<Child>,
    addr: SocketAddr,
    extra_args: Vec<String>,
    /// Extra environment of every `serve` (`start_env`).
    env: Vec<(String, String)>,
}

impl TestServer {
    /// `coda-server init` a fresh data directory, then serve it on a free port.
    pub fn start() -> TestServer {
        TestServer::start_with(&[])
    }

    /// Like `start`, with extra arguments for `serve` (e.g. `--break-timeout-ms 300`).
    pub fn start_with(extra: &[&str]) -> TestServer {
        TestServer::start_env(extra, &[])
    }

    /// Like `start_with`, serving with `env` added to the environment
    /// (kept across restarts).
    pub fn start_env(extra: &[&str], env: &[(&str, &str)]) -> TestServer {
        let dir = TempDir::new("server");
        let root = dir.path().join("data");
        let out = Command::new(SERVER_BIN)
            .args(["init", "--root"])
            .arg(&root)
            .output()
            .expect("run coda-server init");
        assert!(
            out.status.success(),
            "coda-server init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut s = TestServer {
            dir,
            child: None,
            addr: "127.0.0.1:0".parse().unwrap(),
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        s.serve("127.0.0.1:0");
        s
    }

    fn serve(&mut self, listen: &str) {
        let mut child = Command::new(SERVER_BIN)
            .args(["serve", "--root"])
            .arg(self.root())
            .args(["--listen", listen])
            .args(&self.extra_args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn coda-server serve");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read coda-server's first line");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| {
                let _ = child.kill();
                panic!("unexpected first line from coda-server: {line:?}")
            });
        self.addr = addr.parse().expect("listening address");
        self.child = Some(child);
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("data")
    }
    /// The `admin` user's secret, as `coda-server init` wrote it.
    pub fn secret_file(&self) -> PathBuf {
        self.root().join("admin.secret")
    }
    /// The server's certificate fingerprint file clients pin, as
    /// `coda-server init` wrote it.
    pub fn fingerprint_file(&self) -> PathBuf {
        self.root().join("server.fingerprint")
    }
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("server running").id() as i32
    }

    /// `kill -9` the server and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP, and wait (bounded) until every thread of the server is
    /// stopped: `kill` only queues the signal, and a server still running
    /// for a moment could answer a request the test sends right after.
    pub fn sigstop(&self) {
        unsafe { libc::kill(self.pid(), libc::SIGSTOP) };
        wait_stopped(self.pid());
    }
    pub fn sigcont(&self) {
        unsafe { libc::kill(self.pid(), libc::SIGCONT) };
    }

    /// SIGTERM and wait (bounded) for a clean exit; returns whether it exited 0.
    pub fn stop(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st.success();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Serve the same data directory again, on the same port (retrying while
    /// the old socket lingers).
    pub fn restart(&mut self) {
        self.kill9();
        let listen = self.addr.to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // The port may still be held for a moment; try until it binds.
            let probe = std::net::TcpListener::bind(self.addr);
            if probe.is_ok() || Instant::now() > deadline {
                drop(probe);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.serve(&listen);
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
        }
        self.kill9();
    }
}

/// A randomized test's seed: `var`'s value if set (to repeat a run),
/// else one from the clock. The caller prints it.
pub fn seed_from_env(var: &str) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

/// Waits (at most 5 s) until every thread of `pid` is in the stopped state
/// (`T` in /proc/PID/task/*/stat), after a SIGSTOP was sent to it.
pub fn wait_stopped(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let all_stopped = || -> bool {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return true; // gone: nothing left to run
        };
        tasks.flatten().all(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            // The state follows the command name's closing parenthesis.
            match stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().next())
            {
                Some(state) => state == "T" || state == "t" || state == "Z" || state == "X",
                None => true,
            }
        })
    };
    while !all_stopped() {
        assert!(
            Instant::now() < deadline,
            "process {pid} did not stop within 5 s of SIGSTOP"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// This test binary again, to run only the test `name` as a child process:
/// the child test does its work only when the variable `marker` is set,
/// and finds the server and its cache in `CODA_SERVER`, `CODA_SECRET` and
/// `CODA_CACHE`. Its stdout is piped (what it has done, line by line).
pub fn child_test(name: &str, marker: &str, srv: &TestServer, cache: &Path) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(marker, "1")
        .env("CODA_SERVER", srv.addr().to_string())
        .env("CODA_CACHE", cache)
        .env("CODA_SECRET", srv.secret_file())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    c
}

/// A child process, killed (SIGKILL) and reaped on drop whatever happens to
/// the test.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
