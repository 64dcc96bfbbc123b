//! Helpers for the client tests: clients with their own cache directories
//! talking to a real `coda-server`.
#![allow(dead_code)]

use std::path::Path;

use coda::client::{Client, Config, File};

use crate::common::TestServer;

/// A real `coda-server` on a free loopback port.
pub fn start() -> TestServer {
    TestServer::start()
}

pub fn config(server: &TestServer, cache_dir: &Path) -> Config {
    let mut c = Config::new();
    c.set("servers", &server.addr().to_string()).unwrap();
    c.set("cache_dir", cache_dir.to_str().unwrap()).unwrap();
    c.set("secret_file", server.secret_file().to_str().unwrap())
        .unwrap();
    // Named, so a test that moves the secret elsewhere still pins it.
    c.set(
        "tls_fingerprint_file",
        server.fingerprint_file().to_str().unwrap(),
    )
    .unwrap();
    c.set("rpc_timeout_ms", "5000").unwrap();
    c
}

pub fn client(server: &TestServer, cache_dir: &Path) -> Client {
    Client::new(config(server, cache_dir)).expect("client connects")
}

/// As `put`, with the error returned (a write that may find no server).
pub fn try_put(c: &Client, path: &str, data: &[u8]) -> coda::Result<()> {
    let mut f = c.open(path, libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC, 0o644)?;
    let mut off = 0;
    while off < data.len() {
        off += f.write_at(&data[off..], off as u64)?;
    }
    f.close()
}

/// Write `data` as the whole new contents of `path` (created if needed).
pub fn put(c: &Client, path: &str, data: &[u8]) {
    let mut f = c
        .open(path, libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC, 0o644)
        .expect("open for writing");
    let mut off = 0;
    while off < data.len() {
        off += f.write_at(&data[off..], off as u64).expect("write");
    }
    f.close().expect("close stores the file");
}

pub fn read_file(f: &File) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read_at(&mut buf, out.len() as u64).expect("read");
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n]);
    }
}

pub fn get(c: &Client, path: &str) -> Vec<u8> {
    let f = c.open(path, libc::O_RDONLY, 0).expect("open for reading");
    let data = read_file(&f);
    f.close().expect("close");
    data
}

pub fn names(c: &Client, path: &str) -> Vec<String> {
    let mut v: Vec<String> = c
        .readdir(path)
        .expect("readdir")
        .into_iter()
        .map(|e| e.name)
        .collect();
    v.sort();
    v
}
