//! The mount's kernel caching stays coherent: what the kernel keeps
//! (entries, attributes, listings, file pages) is dropped by notification the
//! moment the client stops trusting it, so a change by another client is seen
//! through the mount as soon as that client's call returns (the server breaks
//! our callback, and we tell the kernel, before it acknowledges the change),
//! and nothing cached is served after a failover.

mod client_util;
mod common;
mod mount_util;

use std::io::ErrorKind;

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

fn listing(p: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(p)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn another_clients_changes_reach_the_mounts_cached_entries_attributes_and_listings() {
    if !fuse_available() {
        return;
    }
    let srv = client_util::start();
    let d = TempDir::new("kc");
    let other = client_util::client(&srv, &d.path().join("other-cache"));
    other.mkdir("/d", 0o755).unwrap();
    client_util::put(&other, "/d/f.txt", b"one");
    let m = Mount::start(&srv, d.path(), &[], &[]);
    let f = m.path("d/f.txt");

    assert_eq!(std::fs::read(&f).unwrap(), b"one");
    assert_eq!(listing(&m.path("d")), ["f.txt"]);
    std::fs::metadata(&f).unwrap();
    // Cached now: the kernel answers without asking the mount.
    let asked = (counter(&m, "fuse_lookups"), counter(&m, "fuse_getattrs"));
    for _ in 0..3 {
        assert_eq!(std::fs::metadata(&f).unwrap().len(), 3);
    }
    assert_eq!(
        (counter(&m, "fuse_lookups"), counter(&m, "fuse_getattrs")),
        asked,
        "entries and attributes the client vouched for are kept by the kernel"
    );

    // New contents (and size): seen as soon as the writer's close returns.
    client_util::put(&other, "/d/f.txt", b"version two");
    assert_eq!(std::fs::metadata(&f).unwrap().len(), 11);
    assert_eq!(std::fs::read(&f).unwrap(), b"version two");

    // A rename: the old name is gone at once, the new one is there.
    other.rename("/d/f.txt", "/d/g.txt").unwrap();
    assert_eq!(
        std::fs::metadata(&f).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(std::fs::read(m.path("d/g.txt")).unwrap(), b"version two");
    assert_eq!(listing(&m.path("d")), ["g.txt"]);

    // A new file shows in the cached listing; an unlink removes the entry.
    client_util::put(&other, "/d/h.txt", b"h");
    assert_eq!(listing(&m.path("d")), ["g.txt", "h.txt"]);
    std::fs::metadata(m.path("d/g.txt")).unwrap();
    other.unlink("/d/g.txt").unwrap();
    assert_eq!(
        std::fs::metadata(m.path("d/g.txt")).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(listing(&m.path("d")), ["h.txt"]);

    // A mode change by the other client reaches the cached attributes.
    use std::os::unix::fs::PermissionsExt;
    let h = m.path("d/h.txt");
    assert_eq!(
        std::fs::metadata(&h).unwrap().permissions().mode() & 0o777,
        0o644
    );
    other.chmod("/d/h.txt", 0o600).unwrap();
    assert_eq!(
        std::fs::metadata(&h).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn cached_paths_fail_with_eio_at_once_after_failover() {
    if !fuse_available() {
        return;
    }
    let srv = client_util::start();
    let d = TempDir::new("kcfo");
    let m = Mount::start(&srv, d.path(), &[], &[]);
    std::fs::create_dir(m.path("site")).unwrap();
    std::fs::write(m.path("site/index.html"), b"page").unwrap();
    // Into the kernel's caches: entry, attributes, listing, pages.
    for _ in 0..2 {
        assert_eq!(std::fs::read(m.path("site/index.html")).unwrap(), b"page");
        std::fs::metadata(m.path("site/index.html")).unwrap();
        assert_eq!(listing(&m.path("site")), ["index.html"]);
    }
    m.failover_to_local(d.path());
    for r in [
        std::fs::metadata(m.path("site/index.html")).map(|_| ()),
        std::fs::read(m.path("site/index.html")).map(|_| ()),
        std::fs::metadata(m.path("site")).map(|_| ()),
        std::fs::read_dir(m.path("site")).map(|_| ()),
    ] {
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EIO));
    }
}

#[test]
fn an_unchanged_file_keeps_its_pages_across_opens_and_a_changed_one_does_not() {
    if !fuse_available() {
        return;
    }
    let srv = client_util::start();
    let d = TempDir::new("kcpg");
    let other = client_util::client(&srv, &d.path().join("other-cache"));
    let a: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    client_util::put(&other, "/p.bin", &a);
    // Without passthrough the file's pages are the mount's own (with it,
    // they are the container's, kept by the kernel anyway).
    let m = Mount::start(&srv, d.path(), &[], &["--no-passthrough"]);
    let p = m.path("p.bin");

    assert_eq!(std::fs::read(&p).unwrap(), a);
    let reads = counter(&m, "fuse_reads");
    assert!(reads > 0);
    assert_eq!(std::fs::read(&p).unwrap(), a);
    assert_eq!(
        counter(&m, "fuse_reads"),
        reads,
        "a second open of the unchanged file is served from the kernel's pages"
    );
    assert!(counter(&m, "kept_cache_opens") >= 1);

    // Same size, other bytes: only the invalidation can tell.
    let b: Vec<u8> = a.iter().map(|x| x ^ 0x5a).collect();
    client_util::put(&other, "/p.bin", &b);
    assert_eq!(std::fs::read(&p).unwrap(), b);
    assert!(counter(&m, "fuse_reads") > reads);
}

/// A file made through the mount is in the kernel's caches from its create
/// on: the open's permission check asks no getattr, and a later stat or
/// unlink of the name asks no lookup (the create's reply carried the
/// lifetime). Another client's rename, removal or mode change of such a file
/// still reaches the mount at once.
#[test]
fn a_file_made_here_is_kept_from_its_create_and_others_changes_still_reach_it() {
    if !fuse_available() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let srv = client_util::start();
    for (k, args) in [&[][..], &["--no-passthrough"][..]].iter().enumerate() {
        let d = TempDir::new(&format!("kcmk{k}"));
        let other = client_util::client(&srv, &d.path().join("other-cache"));
        let m = Mount::start(&srv, d.path(), &[], args);
        let dir = format!("made{k}");
        std::fs::create_dir(m.path(&dir)).unwrap();
        std::fs::metadata(m.path(&dir)).unwrap();
        std::fs::metadata(m.path("")).unwrap();

        // The first file in the directory (whose attributes the kernel
        // holds from the mkdir): no getattr at all.
        let getattrs = counter(&m, "fuse_getattrs");
        let f = m.path(&format!("{dir}/a.txt"));
        std::fs::File::create(&f).unwrap();
        assert_eq!(
            counter(&m, "fuse_getattrs"),
            getattrs,
            "{args:?}: the create's reply carries the new file's attributes"
        );
        let lookups = counter(&m, "fuse_lookups");
        std::fs::write(&f, b"hello").unwrap();
        assert_eq!(std::fs::metadata(&f).unwrap().len(), 5);
        assert_eq!(std::fs::read(&f).unwrap(), b"hello");
        std::fs::remove_file(&f).unwrap();
        assert_eq!(
            counter(&m, "fuse_lookups"),
            lookups,
            "{args:?}: the created name stays in the kernel until its unlink"
        );
        assert_eq!(
            std::fs::metadata(&f).unwrap_err().kind(),
            ErrorKind::NotFound
        );

        // Others' changes to files made here.
        let rel = |n: &str| format!("/{dir}/{n}");
        std::fs::write(m.path(&format!("{dir}/b.txt")), b"b").unwrap();
        std::fs::write(m.path(&format!("{dir}/c.txt")), b"c").unwrap();
        std::fs::File::create(m.path(&format!("{dir}/e.txt"))).unwrap();
        other.rename(&rel("b.txt"), &rel("moved.txt")).unwrap();
        assert_eq!(
            std::fs::metadata(m.path(&format!("{dir}/b.txt")))
                .unwrap_err()
                .kind(),
            ErrorKind::NotFound
        );
        assert_eq!(
            std::fs::read(m.path(&format!("{dir}/moved.txt"))).unwrap(),
            b"b"
        );
        other.unlink(&rel("c.txt")).unwrap();
        assert_eq!(
            std::fs::metadata(m.path(&format!("{dir}/c.txt")))
                .unwrap_err()
                .kind(),
            ErrorKind::NotFound
        );
        other.chmod(&rel("e.txt"), 0o600).unwrap();
        assert_eq!(
            std::fs::metadata(m.path(&format!("{dir}/e.txt")))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        client_util::put(&other, &rel("e.txt"), b"from the other client");
        assert_eq!(
            std::fs::read(m.path(&format!("{dir}/e.txt"))).unwrap(),
            b"from the other client"
        );
        assert_eq!(listing(&m.path(&dir)), ["e.txt", "moved.txt"]);
    }
}
