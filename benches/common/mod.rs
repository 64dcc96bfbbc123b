//! What every benchmark needs: a real `coda-server` process in a scratch
//! directory (killed on drop), and client configurations pointing at it.
#![allow(dead_code)] // each bench uses its own subset

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use coda::client::{Client, Config};

pub struct BenchServer {
    child: Child,
    pub root: PathBuf,
    pub addr: String,
    /// With `CODA_SERVER_TRACE` set: the server's group-commit trace lines
    /// (`TRACE group`, `TRACE commit`) not yet taken.
    trace: Option<std::sync::Arc<std::sync::Mutex<Vec<String>>>>,
}

/// Names another `coda-server` binary for the benches to start (for
/// example one built from an older commit), so a before/after pair runs
/// the same client against both servers in one session.
pub const SERVER_BIN_ENV: &str = "CODA_BENCH_SERVER_BIN";

/// The `coda-server` binary to start: [`SERVER_BIN_ENV`]'s, else this build's.
pub fn server_bin() -> String {
    std::env::var(SERVER_BIN_ENV).unwrap_or_else(|_| env!("CARGO_BIN_EXE_coda-server").into())
}

impl BenchServer {
    /// `coda-server init` in `dir/data`, then serve it on a free loopback port.
    pub fn start(dir: &Path) -> BenchServer {
        BenchServer::start_with(dir, &[])
    }

    /// Like `start`, with extra arguments for `serve`.
    pub fn start_with(dir: &Path, extra: &[&str]) -> BenchServer {
        let bin = &server_bin();
        let root = dir.join("data");
        let st = Command::new(bin)
            .args(["init", "--root"])
            .arg(&root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "coda-server init failed");
        let tracing = std::env::var_os("CODA_SERVER_TRACE").is_some();
        let mut child = Command::new(bin)
            .args(["serve", "--root"])
            .arg(&root)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(if tracing {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .spawn()
            .unwrap();
        // The collector ends when the server's stderr closes (its exit).
        let trace = child.stderr.take().map(|err| {
            let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let keep = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    if line.starts_with("TRACE group") || line.starts_with("TRACE commit") {
                        keep.lock().unwrap().push(line);
                    }
                }
            });
            lines
        });
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        BenchServer {
            child,
            root,
            addr,
            trace,
        }
    }

    /// The group-commit trace lines the server printed since the last
    /// call (empty without `CODA_SERVER_TRACE`).
    pub fn take_trace(&self) -> Vec<String> {
        self.trace
            .as_ref()
            .map(|t| std::mem::take(&mut *t.lock().unwrap()))
            .unwrap_or_default()
    }

    pub fn secret(&self) -> PathBuf {
        self.root.join("admin.secret")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// A client configuration for this server with its own cache directory.
    pub fn config(&self, cache: &Path) -> Config {
        let mut c = Config::new();
        c.set("servers", &self.addr).unwrap();
        c.set("secret_file", self.secret().to_str().unwrap())
            .unwrap();
        c.set("cache_dir", cache.to_str().unwrap()).unwrap();
        c
    }
}

impl Drop for BenchServer {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Create or truncate `path` and write all of `data` through `c`, stored on close.
pub fn write_file(c: &Client, path: &str, data: &[u8]) {
    let mut f = c
        .open(path, libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC, 0o644)
        .unwrap();
    let mut off = 0;
    while off < data.len() {
        off += f.write_at(&data[off..], off as u64).unwrap();
    }
    f.close().unwrap();
}
