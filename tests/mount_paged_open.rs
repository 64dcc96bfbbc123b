//! Page-cache opens (docs/MOUNT.md, "Page-cache opens"): a read-only open of
//! a small file the client vouches for is served from the kernel's page
//! cache, kept across opens, instead of through passthrough. Nothing it does
//! may be seen that an ordinary open would not show: another client's
//! change, a writer here beside it, a large file (still passthrough).

mod client_util;
mod common;
mod mount_util;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;

use common::TempDir;
use mount_util::*;

/// A counter from `coda status` of the mount.
fn counter(m: &Mount, name: &str) -> u64 {
    let out = stdout(&m.cli(&["status"]));
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .unwrap_or_else(|| panic!("no {name} in status:\n{out}"))
        .trim()
        .parse()
        .unwrap()
}

fn passthrough(m: &Mount) -> bool {
    stdout(&m.cli(&["status"])).contains("passthrough: on")
}

fn bytes(seed: u8, n: usize) -> Vec<u8> {
    (0..n).map(|i| (i as u8) ^ seed).collect()
}

/// What nginx does per request: open, fstat, read, close.
fn serve(p: &std::path::Path) -> (u64, Vec<u8>) {
    let mut f = std::fs::File::open(p).unwrap();
    let len = f.metadata().unwrap().len();
    let mut got = Vec::new();
    f.read_to_end(&mut got).unwrap();
    (len, got)
}

/// Serve `p` until its opens are page-cache ones (bounded): the first open
/// of a version is passed through, a later one, once that open's
/// asynchronous release is in, marks its pages.
fn warm(m: &Mount, p: &std::path::Path, want: &[u8]) {
    let before = counter(m, "paged_opens");
    for _ in 0..100 {
        assert_eq!(serve(p).1, want);
        if counter(m, "paged_opens") >= before + 2 {
            return;
        }
    }
    panic!("no page-cache opens of {}", p.display());
}

#[test]
fn a_small_cached_file_is_read_from_the_page_cache_and_its_fstat_asks_nothing() {
    if !fuse_available() {
        return;
    }
    let srv = client_util::start();
    let d = TempDir::new("po-small");
    let other = client_util::client(&srv, &d.path().join("other-cache"));
    let small = bytes(1, 4096);
    let large = bytes(2, (1 << 20) + 4096);
    client_util::put(&other, "/s.bin", &small);
    client_util::put(&other, "/l.bin", &large);
    let m = Mount::start(&srv, d.path(), &[], &[]);
    let s = m.path("s.bin");
    // The first open of a version is passed through; a later one, once
    // that open's (asynchronous) release is in, fills the pages (a read
    // request, after which the kernel asks the attributes once more); from
    // then on nothing is asked.
    for _ in 0..100 {
        assert_eq!(serve(&s), (4096, small.clone()));
        if counter(&m, "paged_opens") >= 2 {
            break;
        }
    }
    assert!(counter(&m, "paged_opens") >= 2, "page-cache opens");

    let asked = (
        counter(&m, "fuse_getattrs"),
        counter(&m, "fuse_reads"),
        counter(&m, "paged_opens"),
        counter(&m, "passthrough_opens"),
    );
    for _ in 0..20 {
        assert_eq!(serve(&s), (4096, small.clone()));
    }
    let now = (
        counter(&m, "fuse_getattrs"),
        counter(&m, "fuse_reads"),
        counter(&m, "paged_opens"),
        counter(&m, "passthrough_opens"),
    );
    assert_eq!(now.0, asked.0, "fstat after a read asks no getattr");
    assert_eq!(now.1, asked.1, "the pages are kept across opens");
    assert_eq!(now.2, asked.2 + 20, "every open a page-cache one");
    assert_eq!(now.3, asked.3, "no passthrough open");

    // Above the size limit: passthrough, as before (when the kernel has it).
    let l = m.path("l.bin");
    let pt = counter(&m, "passthrough_opens");
    let paged = counter(&m, "paged_opens");
    for _ in 0..2 {
        assert_eq!(serve(&l), (large.len() as u64, large.clone()));
    }
    assert_eq!(counter(&m, "paged_opens"), paged, "a large file is not");
    if passthrough(&m) {
        assert_eq!(counter(&m, "passthrough_opens"), pt + 2);
    }
}

#[test]
fn another_clients_change_reaches_page_cache_opens_and_the_baseline_flag_turns_them_off() {
    if !fuse_available() {
        return;
    }
    let srv = client_util::start();
    let d = TempDir::new("po-chg");
    let other = client_util::client(&srv, &d.path().join("other-cache"));
    client_util::put(&other, "/f.bin", &bytes(1, 4096));
    let m = Mount::start(&srv, d.path(), &[], &[]);
    let f = m.path("f.bin");
    warm(&m, &f, &bytes(1, 4096));
    // Held open across the change: it keeps reading its own version until
    // its pages are dropped, never a mix.
    let paged = counter(&m, "paged_opens");
    let mut old = std::fs::File::open(&f).unwrap();
    assert_eq!(counter(&m, "paged_opens"), paged + 1);
    let mut first = vec![0u8; 100];
    old.read_exact(&mut first).unwrap();
    assert_eq!(first, bytes(1, 100));

    // Same size, other bytes: only the break can tell.
    client_util::put(&other, "/f.bin", &bytes(2, 4096));
    for _ in 0..3 {
        assert_eq!(serve(&f), (4096, bytes(2, 4096)), "new bytes at once");
    }
    old.seek(SeekFrom::Start(0)).unwrap();
    let mut got = Vec::new();
    old.read_to_end(&mut got).unwrap();
    assert!(
        got == bytes(1, 4096) || got == bytes(2, 4096),
        "an open file reads one version whole"
    );
    drop(old);
    // Its reads (of the older version) left nothing a later open keeps.
    for _ in 0..3 {
        assert_eq!(serve(&f).1, bytes(2, 4096));
    }

    // A shorter file: the size the kernel holds is dropped too.
    client_util::put(&other, "/f.bin", b"short");
    assert_eq!(serve(&f), (5, b"short".to_vec()));

    // The baseline: small read-only opens through passthrough again.
    drop(m);
    let d2 = TempDir::new("po-chg2");
    let m = Mount::start(&srv, d2.path(), &[], &["--no-paged-open"]);
    for _ in 0..3 {
        assert_eq!(serve(&m.path("f.bin")).1, b"short");
    }
    assert_eq!(counter(&m, "paged_opens"), 0);
}

#[test]
fn a_writer_beside_page_cache_readers_is_seen_by_them_at_once_and_stored_at_close() {
    if !fuse_available() {
        return;
    }
    let srv = client_util::start();
    let d = TempDir::new("po-wr");
    let other = client_util::client(&srv, &d.path().join("other-cache"));
    client_util::put(&other, "/w.bin", &bytes(1, 4096));
    let m = Mount::start(&srv, d.path(), &[], &[]);
    let f = m.path("w.bin");
    warm(&m, &f, &bytes(1, 4096));
    let paged = counter(&m, "paged_opens");
    let reader = std::fs::File::open(&f).unwrap();
    assert_eq!(counter(&m, "paged_opens"), paged + 1, "a page-cache reader");
    let mut buf = vec![0u8; 4096];
    reader.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, bytes(1, 4096));

    // A writer while a page-cache reader is open (no passthrough possible
    // for it then): the reader sees each write at once, as locally.
    let mut w = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
    w.write_all(&bytes(3, 100)).unwrap();
    let mut want = bytes(1, 4096);
    want[..100].copy_from_slice(&bytes(3, 100));
    reader.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, want, "the open reader sees the write");
    assert_eq!(serve(&f).1, want, "a new open sees it");
    drop(w);
    assert_eq!(client_util::get(&other, "/w.bin"), want, "stored at close");
    drop(reader);
    for _ in 0..3 {
        assert_eq!(serve(&f).1, want);
    }

    // And the other way: a writer first (passthrough when the kernel has
    // it), readers beside it see its writes, and page-cache opens after its
    // close see what it stored.
    let w = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
    w.write_all_at(&bytes(4, 50), 1000).unwrap();
    want[1000..1050].copy_from_slice(&bytes(4, 50));
    assert_eq!(serve(&f).1, want);
    drop(w);
    for _ in 0..3 {
        assert_eq!(serve(&f).1, want);
    }
    assert_eq!(client_util::get(&other, "/w.bin"), want);
    std::fs::write(&f, b"truncated and rewritten").unwrap();
    assert_eq!(serve(&f).1, b"truncated and rewritten");
}
