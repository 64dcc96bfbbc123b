//! Helpers for the disconnected-operation tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use coda::client::{Client, ClientState, Config};

/// Wait (bounded, generously: this is not a timing assertion) until the
/// client is connected again and its log is empty.
pub fn wait_reintegrated(c: &Client) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.state() != ClientState::Connected || c.pending_records() > 0 {
        assert!(
            Instant::now() < deadline,
            "not reintegrated: state {:?}, {} records pending",
            c.state(),
            c.pending_records()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The whole tree under `/` as path → contents (`None` for directories,
/// `Some("-> target")` for symlinks).
pub fn tree(c: &Client) -> BTreeMap<String, Option<Vec<u8>>> {
    fn walk(c: &Client, dir: &str, out: &mut BTreeMap<String, Option<Vec<u8>>>) {
        for e in c.readdir(dir).expect("readdir") {
            let p = if dir == "/" {
                format!("/{}", e.name)
            } else {
                format!("{dir}/{}", e.name)
            };
            match e.ftype {
                coda::client::FileType::Dir => {
                    out.insert(p.clone(), None);
                    walk(c, &p, out);
                }
                coda::client::FileType::Symlink => {
                    let t = c.readlink(&p).expect("readlink");
                    out.insert(p, Some(format!("-> {t}").into_bytes()));
                }
                coda::client::FileType::File => {
                    let d = crate::client_util::get(c, &p);
                    out.insert(p, Some(d));
                }
                t => {
                    out.insert(p, Some(format!("{t:?}").into_bytes()));
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(c, "/", &mut out);
    out
}

/// Wait (bounded, generously) until the client has noticed its server is
/// gone. A read served from the cache can come before the connection's
/// reader thread has seen the close, so `state()` right after a kill races.
pub fn wait_disconnected(c: &Client) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.state() != ClientState::Disconnected {
        assert!(
            Instant::now() < deadline,
            "still {:?} long after the server went away",
            c.state()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The configuration of a test's child client process, from the
/// environment its parent sets (CODA_SERVER, CODA_CACHE, CODA_SECRET).
pub fn child_config() -> Config {
    let v = |k: &str| std::env::var(k).unwrap();
    let mut cfg = Config::new();
    cfg.set("servers", &v("CODA_SERVER")).unwrap();
    cfg.set("cache_dir", &v("CODA_CACHE")).unwrap();
    cfg.set("secret_file", &v("CODA_SECRET")).unwrap();
    cfg.set("rpc_timeout_ms", "5000").unwrap();
    cfg
}
