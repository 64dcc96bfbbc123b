//! Small files travel with their data inline (PROTOCOL.md "Inline data"):
//! a connected store of at most 64 KiB is one record without an upload,
//! and in write-back (or disconnected) replay a Create followed by the
//! Store of the same small file goes as one `CreateWith`. Files made
//! either way are on the server with their contents, also after the
//! server is killed with SIGKILL right after the calls returned. (A
//! write-back client killed with SIGKILL: client_write_back.rs, whose
//! small files now replay as `CreateWith`.)

mod client_util;
mod common;

use client_util::*;
use coda::client::Client;
use common::{TempDir, TestServer};

/// Long enough that nothing is sent by itself while a test looks.
const NEVER_MS: &str = "600000";

/// Around the 64 KiB inline limit, and past it (uploaded as before).
const SIZES: [usize; 8] = [0, 1, 100, 4096, 65535, 65536, 65537, 300_000];

fn contents(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|k| (k * 7 + i * 13) as u8).collect()
}

fn check_from_a_fresh_client(srv: &TestServer, dir: &str, files: &[(String, Vec<u8>)]) {
    let cache = TempDir::new("inline-check");
    let c = client(srv, cache.path());
    let mut want: Vec<String> = files.iter().map(|(n, _)| n.clone()).collect();
    want.sort();
    assert_eq!(names(&c, dir), want);
    for (name, data) in files {
        let path = format!("{dir}/{name}");
        assert_eq!(get(&c, &path), *data, "{path}");
        assert_eq!(c.stat(&path).unwrap().size, data.len() as u64, "{path}");
    }
}

#[test]
fn small_files_stored_connected_are_on_the_server_and_survive_kill_9() {
    let mut srv = start();
    let da = TempDir::new("inline-a");
    let mut files = Vec::new();
    {
        let a = client(&srv, da.path());
        a.mkdir("/c", 0o755).unwrap();
        for (i, len) in SIZES.iter().enumerate() {
            let name = format!("f{i}");
            let data = contents(i, *len);
            put(&a, &format!("/c/{name}"), &data);
            files.push((name, data));
        }
        // Stored again, smaller and larger: the inline store replaces.
        put(&a, "/c/f3", b"rewritten");
        files[3].1 = b"rewritten".to_vec();
        assert_eq!(a.pending_records(), 0, "connected: all on the server");
    }
    srv.restart(); // SIGKILL, then the same data directory again
    check_from_a_fresh_client(&srv, "/c", &files);
}

fn write_back_client(srv: &TestServer, dir: &std::path::Path) -> Client {
    let mut cfg = config(srv, dir);
    cfg.set("write_back_ms", NEVER_MS).unwrap();
    Client::new(cfg).expect("client connects")
}

#[test]
fn write_back_small_files_replay_as_one_record_each_and_survive_kill_9() {
    let mut srv = start();
    let da = TempDir::new("inline-wb");
    let mut files = Vec::new();
    {
        let a = write_back_client(&srv, da.path());
        a.mkdir("/wb", 0o755).unwrap();
        for (i, len) in SIZES.iter().enumerate() {
            let name = format!("f{i}");
            let data = contents(i, *len);
            put(&a, &format!("/wb/{name}"), &data);
            files.push((name, data));
        }
        // Not merged: something about the file between its Create and
        // its Store (a rename), and a store of a file the server has.
        let mut f = a
            .open("/wb/moved-before", libc::O_WRONLY | libc::O_CREAT, 0o600)
            .unwrap();
        a.rename("/wb/moved-before", "/wb/moved").unwrap();
        f.write_at(b"written after the rename", 0).unwrap();
        f.close().unwrap();
        files.push(("moved".into(), b"written after the rename".to_vec()));
        let before = a.stats().records_reintegrated;
        let pending = a.pending_records();
        assert!(pending >= 2 * SIZES.len(), "{pending} records logged");
        a.reintegrate_now().unwrap();
        assert_eq!(a.pending_records(), 0);
        // Every log record is accounted for, merged or not.
        assert_eq!(a.stats().records_reintegrated - before, pending as u64);
        assert!(a.conflicts().unwrap().is_empty());
        // A file the server has, stored again in write-back: a plain
        // (inline) store.
        put(&a, "/wb/f2", b"second version");
        files[2].1 = b"second version".to_vec();
        a.reintegrate_now().unwrap();
        assert!(a.conflicts().unwrap().is_empty());
    }
    srv.restart();
    check_from_a_fresh_client(&srv, "/wb", &files);
}
