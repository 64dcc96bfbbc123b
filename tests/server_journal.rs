//! The lone server's commit journal (docs/SERVER.md "Commit journal"):
//! small batches are durable once journaled, redb committing them without
//! a sync; a kill -9 loses none of them, a torn last record loses only its
//! own batch, and a long run checkpoints and keeps going. Real clients and
//! a real coda-server.
mod client_util;
mod common;

use std::path::Path;

use client_util::{client, get, names};
use common::{TempDir, TestServer};

const IDLE_NEVER: (&str, &str) = ("CODA_SERVER_JOURNAL_IDLE_MS", "3600000");
/// Where the journal's first frame starts (after its header block).
const FIRST_FRAME: u64 = 4096;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn put(c: &coda::client::Client, path: &str, data: &[u8]) {
    client_util::put(c, path, data)
}

/// (offset, length) of each frame of the journal from its first, up to
/// the zeroed head that ends what was written.
fn frames(root: &Path) -> Vec<(u64, u64)> {
    let bytes = std::fs::read(root.join("commit.journal")).expect("read the journal");
    let mut out = Vec::new();
    let mut pos = FIRST_FRAME as usize;
    while pos + 16 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        let seq = u64::from_le_bytes(bytes[pos + 4..pos + 12].try_into().unwrap());
        if seq == 0 || pos + 16 + len > bytes.len() {
            break;
        }
        out.push((pos as u64, len as u64));
        pos += 16 + len;
    }
    out
}

#[test]
fn acknowledged_small_mutations_survive_a_kill9_from_the_journal_alone() {
    let mut srv = TestServer::start_env(&[], &[IDLE_NEVER]);
    let d = TempDir::new("journal-kill9");
    let n = 40;
    {
        let a = client(&srv, &d.path().join("a"));
        a.mkdir("/d", 0o755).unwrap();
        for i in 0..n {
            put(&a, &format!("/d/f{i}"), &pattern(4096, i as u8));
        }
        // Renames, removes, stores over, a chmod and a symlink: every kind
        // a connected writer sends for small files.
        for i in 0..10 {
            a.rename(&format!("/d/f{i}"), &format!("/r{i}")).unwrap();
        }
        for i in 10..20 {
            a.unlink(&format!("/d/f{i}")).unwrap();
        }
        for i in 20..30 {
            put(&a, &format!("/d/f{i}"), &pattern(100 + i, 200));
        }
        a.chmod("/d/f30", 0o600).unwrap();
        a.symlink("d/f31", "/link").unwrap();
    }
    let journaled = frames(&srv.root());
    assert!(
        journaled.len() >= n,
        "the batches went to the journal: {} frames",
        journaled.len()
    );
    srv.kill9();
    srv.restart();
    // Replayed, then checkpointed: the journal starts again.
    assert!(
        frames(&srv.root()).is_empty(),
        "no checkpoint after the replay"
    );
    let b = client(&srv, &d.path().join("b"));
    let mut want: Vec<String> = (20..n).map(|i| format!("f{i}")).collect();
    want.sort();
    assert_eq!(names(&b, "/d"), want);
    for i in 0..10 {
        assert_eq!(get(&b, &format!("/r{i}")), pattern(4096, i as u8), "r{i}");
    }
    for i in 20..30 {
        assert_eq!(get(&b, &format!("/d/f{i}")), pattern(100 + i, 200), "f{i}");
    }
    for i in 30..n {
        assert_eq!(get(&b, &format!("/d/f{i}")), pattern(4096, i as u8), "f{i}");
    }
    assert_eq!(b.stat("/d/f30").unwrap().mode & 0o777, 0o600);
    assert_eq!(b.readlink("/link").unwrap(), "d/f31");
}

#[test]
fn a_torn_last_journal_record_loses_only_its_own_batch() {
    let mut srv = TestServer::start_env(&[], &[IDLE_NEVER]);
    let d = TempDir::new("journal-torn");
    {
        let a = client(&srv, &d.path().join("a"));
        for i in 0..5 {
            put(&a, &format!("/f{i}"), &pattern(4096, i as u8));
        }
    }
    srv.kill9();
    let journal = srv.root().join("commit.journal");
    let fr = frames(&srv.root());
    let &(at, len) = fr.last().expect("journaled frames");
    // The last record's second half never reached the disk.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&journal)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &vec![0u8; (len / 2) as usize], at + 16 + len / 2)
        .unwrap();
    drop(f);
    srv.restart();
    let b = client(&srv, &d.path().join("b"));
    let listed = names(&b, "/");
    for i in 0..4 {
        assert_eq!(get(&b, &format!("/f{i}")), pattern(4096, i as u8), "f{i}");
    }
    // The last file's batch (its create and its data) is gone whole, or
    // (if it took two records) present empty: never partly written.
    if listed.contains(&"f4".to_string()) {
        assert!(get(&b, "/f4").is_empty(), "a torn record applied in part");
    }
    // The server goes on: the file can be written again.
    put(&b, "/f4", &pattern(4096, 4));
    assert_eq!(get(&b, "/f4"), pattern(4096, 4));
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

#[test]
fn a_long_run_of_small_stores_checkpoints_and_nothing_grows_without_bound() {
    // A 256 KiB journal fills about every 30 stores of 4 KiB.
    let mut srv =
        TestServer::start_env(&[], &[IDLE_NEVER, ("CODA_SERVER_JOURNAL_BYTES", "262144")]);
    let d = TempDir::new("journal-long");
    let meta = srv.root().join("meta.redb");
    let journal = srv.root().join("commit.journal");
    let a = client(&srv, &d.path().join("a"));
    let round = |r: u8| {
        for i in 0..300u32 {
            put(
                &a,
                &format!("/f{}", i % 10),
                &pattern(4096, r.wrapping_add(i as u8)),
            );
        }
    };
    round(0);
    let first = file_len(&meta);
    round(1);
    round(2);
    let third = file_len(&meta);
    eprintln!("meta.redb: {first} bytes after 300 stores, {third} after 900");
    assert_eq!(file_len(&journal), 262_144, "the journal keeps its size");
    // 600 more stores of the same ten files: redb reuses the pages they
    // free (each checkpoint is a durable commit); without checkpoints it
    // would grow by megabytes.
    assert!(
        third <= first + (1 << 20),
        "meta.redb grew from {first} to {third} bytes"
    );
    drop(a);
    srv.kill9();
    srv.restart();
    let b = client(&srv, &d.path().join("b"));
    for i in 290..300u32 {
        let want = pattern(4096, 2u8.wrapping_add(i as u8));
        assert_eq!(get(&b, &format!("/f{}", i % 10)), want, "f{}", i % 10);
    }
}
