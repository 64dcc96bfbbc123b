//! Small files (at most `SMALL_DATA_MAX` bytes) keep their bytes in the
//! server's index instead of an object file (docs/SERVER.md "Small
//! files"): real clients against a real coda-server, killed with -9.
mod client_util;
mod common;

use std::path::Path;

use client_util::{client, get, put};
use coda::server::SMALL_DATA_MAX;
use common::{TempDir, TestServer};

/// Files in the root volume's objects directory.
fn object_files(root: &Path) -> usize {
    std::fs::read_dir(root.join("objects/1")).unwrap().count()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn acknowledged_small_files_survive_a_kill9_and_read_whole_from_another_client() {
    let mut srv = TestServer::start();
    let d = TempDir::new("small-kill9");
    let limit = SMALL_DATA_MAX as usize;
    let files = [
        ("/one-byte", pattern(1, 1)),
        ("/four-k", pattern(4096, 2)),
        ("/at-the-limit", pattern(limit, 3)),
        ("/past-the-limit", pattern(limit + 1, 4)),
    ];
    {
        let a = client(&srv, &d.path().join("a"));
        for (name, data) in &files {
            put(&a, name, data);
        }
    }
    // Only the file past the limit has an object file.
    assert_eq!(object_files(&srv.root()), 1);
    srv.kill9();
    srv.restart();
    let b = client(&srv, &d.path().join("b"));
    for (name, data) in &files {
        let got = get(&b, name);
        assert_eq!(got.len(), data.len(), "{name}");
        assert!(got == *data, "{name}: the bytes read back differ");
    }
    assert_eq!(object_files(&srv.root()), 1, "the restart's sweep kept it");
}

#[test]
fn a_small_file_grown_to_64k_and_shrunk_back_reads_right_each_time() {
    let srv = TestServer::start();
    let d = TempDir::new("small-grow");
    let a = client(&srv, &d.path().join("a"));
    let mut reader = 0;
    // Each read by a client with an empty cache: what the server serves.
    let mut check = |want: &[u8], objects: usize, step: &str| {
        reader += 1;
        let b = client(&srv, &d.path().join(format!("b{reader}")));
        let got = get(&b, "/f");
        assert_eq!(got.len(), want.len(), "{step}");
        assert!(got == want, "{step}: the bytes read back differ");
        assert_eq!(object_files(&srv.root()), objects, "{step}: object files");
    };
    let small = pattern(100, 5);
    put(&a, "/f", &small);
    check(&small, 0, "stored small");
    let big = pattern(64 * 1024, 6);
    put(&a, "/f", &big);
    check(&big, 1, "grown to 64 KiB");
    let tiny = pattern(10, 7);
    put(&a, "/f", &tiny);
    check(&tiny, 0, "shrunk to 10 bytes");
    a.truncate("/f", 64 * 1024).unwrap();
    let mut grown = tiny.clone();
    grown.resize(64 * 1024, 0);
    check(&grown, 1, "truncated up to 64 KiB");
    a.truncate("/f", 5).unwrap();
    check(&tiny[..5], 0, "truncated down to 5 bytes");
    a.truncate("/f", 0).unwrap();
    check(&[], 0, "truncated to empty");
}
