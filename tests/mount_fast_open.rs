//! The fast open of an unchanged cached file (docs/MOUNT.md, "Passthrough"):
//! a read-only open that reuses the kept backing file without the client's
//! open must never serve what an ordinary open would not: another client's
//! change, this client's own write, a failover, and an unlinked or renamed
//! over open file all behave as without it.

mod client_util;
mod common;
mod mount_util;

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;

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

/// Fast opens need FUSE passthrough (Linux >= 6.9); without it every open
/// goes through the client and only the contents are checked.
fn passthrough(m: &Mount) -> bool {
    stdout(&m.cli(&["status"])).contains("passthrough: on")
}

fn bytes(seed: u8) -> Vec<u8> {
    (0..4096u32).map(|i| (i as u8) ^ seed).collect()
}

/// Open `p` until two opens were fast (bounded): the first opens go through
/// the client and mark the file (a small file's first open of a version is
/// passed through, a later one, once that open's asynchronous release is
/// in, marks its pages: docs/MOUNT.md "Page-cache opens"), the next ones
/// are fast. Asserts they were (with passthrough).
fn warm(m: &Mount, p: &std::path::Path, want: &[u8]) {
    let before = counter(m, "fast_opens");
    let pt = passthrough(m);
    for i in 0..100 {
        assert_eq!(std::fs::read(p).unwrap(), want);
        if i >= 2 && (!pt || counter(m, "fast_opens") >= before + 2) {
            break;
        }
    }
    if pt {
        assert!(
            counter(m, "fast_opens") >= before + 2,
            "an unchanged cached file is opened without the client"
        );
    }
}

#[test]
fn a_fast_open_after_a_change_here_or_elsewhere_sees_the_new_contents() {
    if !fuse_available() {
        return;
    }
    let srv = client_util::start();
    let d = TempDir::new("fo-chg");
    let other = client_util::client(&srv, &d.path().join("other-cache"));
    client_util::put(&other, "/f.bin", &bytes(1));
    let m = Mount::start(&srv, d.path(), &[], &[]);
    let f = m.path("f.bin");
    warm(&m, &f, &bytes(1));

    // Another client's store of the same size: only the break can tell.
    client_util::put(&other, "/f.bin", &bytes(2));
    assert_eq!(std::fs::read(&f).unwrap(), bytes(2));
    warm(&m, &f, &bytes(2));

    // This client's own store through the mount (a truncating open gets a
    // new container).
    std::fs::write(&f, bytes(3)).unwrap();
    assert_eq!(std::fs::read(&f).unwrap(), bytes(3));
    warm(&m, &f, &bytes(3));
    assert_eq!(client_util::get(&other, "/f.bin"), bytes(3));

    // A write in place (no truncation) through the mount.
    {
        use std::os::unix::fs::FileExt;
        let w = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
        w.write_all_at(&bytes(4)[..100], 0).unwrap();
    }
    let mut want = bytes(3);
    want[..100].copy_from_slice(&bytes(4)[..100]);
    assert_eq!(std::fs::read(&f).unwrap(), want);
    warm(&m, &f, &want);

    // A descriptor opened fast before another client's change keeps
    // reading the version it opened; a new open sees the new one.
    let mut old = std::fs::File::open(&f).unwrap();
    client_util::put(&other, "/f.bin", &bytes(5));
    let mut got = Vec::new();
    old.read_to_end(&mut got).unwrap();
    assert_eq!(got, want, "an open file keeps the version it opened");
    assert_eq!(std::fs::read(&f).unwrap(), bytes(5));
    drop(old);
    warm(&m, &f, &bytes(5));
}

#[test]
fn a_fast_open_after_failover_is_eio_and_earlier_descriptors_still_read() {
    if !fuse_available() {
        return;
    }
    let srv = client_util::start();
    let d = TempDir::new("fo-fo");
    let m = Mount::start(&srv, d.path(), &[], &[]);
    std::fs::create_dir(m.path("site")).unwrap();
    let page = m.path("site/index.html");
    std::fs::write(&page, bytes(7)).unwrap();
    warm(&m, &page, &bytes(7));
    let mut kept = std::fs::File::open(&page).unwrap();

    m.failover_to_local(d.path());
    let fast = counter(&m, "fast_opens");
    for _ in 0..3 {
        let e = std::fs::File::open(&page).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    }
    assert_eq!(
        counter(&m, "fast_opens"),
        fast,
        "no fast open after failover"
    );
    let mut got = Vec::new();
    kept.read_to_end(&mut got).unwrap();
    assert_eq!(got, bytes(7), "a descriptor opened before reads on");
}

#[test]
fn a_fast_opened_file_unlinked_or_renamed_over_stays_readable() {
    if !fuse_available() {
        return;
    }
    let srv = client_util::start();
    let d = TempDir::new("fo-gone");
    let other = client_util::client(&srv, &d.path().join("other-cache"));
    client_util::put(&other, "/a.bin", &bytes(1));
    client_util::put(&other, "/b.bin", &bytes(2));
    client_util::put(&other, "/c.bin", &bytes(3));
    let m = Mount::start(&srv, d.path(), &[], &[]);
    for (name, seed) in [("a.bin", 1), ("b.bin", 2), ("c.bin", 3)] {
        warm(&m, &m.path(name), &bytes(seed));
    }

    // Each opened fast, then removed: by this mount, by another client, and
    // renamed over by this mount.
    let fast = counter(&m, "fast_opens");
    let mut a = std::fs::File::open(m.path("a.bin")).unwrap();
    let mut b = std::fs::File::open(m.path("b.bin")).unwrap();
    let mut c = std::fs::File::open(m.path("c.bin")).unwrap();
    if passthrough(&m) {
        assert_eq!(counter(&m, "fast_opens"), fast + 3);
    }
    std::fs::remove_file(m.path("a.bin")).unwrap();
    other.unlink("/b.bin").unwrap();
    std::fs::write(m.path("d.bin"), b"new").unwrap();
    std::fs::rename(m.path("d.bin"), m.path("c.bin")).unwrap();

    for (f, seed) in [(&mut a, 1), (&mut b, 2), (&mut c, 3)] {
        let mut got = Vec::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut got).unwrap();
        assert_eq!(got, bytes(seed), "an open file outlives its name");
        let st = f.metadata().unwrap();
        assert_eq!(st.len(), 4096);
        assert_eq!(st.nlink(), 0, "no name left");
    }
    for name in ["a.bin", "b.bin"] {
        let e = std::fs::File::open(m.path(name)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{name}: {e}");
    }
    assert_eq!(std::fs::read(m.path("c.bin")).unwrap(), b"new");
    drop((a, b, c));
    assert_eq!(std::fs::read(m.path("c.bin")).unwrap(), b"new");
}
