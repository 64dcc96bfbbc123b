//! POSIX metadata through the mount, checked on the mount and from a
//! second client of the same server: owners (chown as root), hard links
//! and link counts, special files, times (exact utimensat, times set while
//! open for writing kept at close, `touch -h` on symlinks), and the
//! owner of a record logged while disconnected; user extended attributes.

mod client_util;
mod common;
mod mount_util;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use coda::client::{FileType, Owner, Timespec};
use common::{prereq, TempDir};
use mount_util::*;

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// utimensat(AT_FDCWD, p, {atime, mtime}, flags); `None` is UTIME_OMIT.
fn utimens(p: &Path, atime: Option<(i64, i64)>, mtime: Option<(i64, i64)>, flags: i32) -> i32 {
    let t = |v: Option<(i64, i64)>| match v {
        Some((s, n)) => libc::timespec {
            tv_sec: s,
            tv_nsec: n,
        },
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
    };
    let times = [t(atime), t(mtime)];
    let c = cpath(p);
    // SAFETY: a NUL-terminated path and a two-element array.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), flags) };
    if r == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap()
    }
}

fn setup() -> Option<(common::TestServer, TempDir)> {
    if !prereq::require_root("root", "the mount shows real owners only when run as root")
        || !fuse_available()
    {
        return None;
    }
    let srv = client_util::start();
    let d = TempDir::new("mnt-posix");
    Some((srv, d))
}

#[test]
fn owners_links_and_special_files_are_seen_by_every_client() {
    let Some((srv, d)) = setup() else { return };
    let m = Mount::start(&srv, d.path(), &[], &["--allow-other"]);
    let other = client_util::client(&srv, &d.path().join("other-cache"));

    // chown and chgrp as root, seen by another client.
    std::fs::write(m.path("f"), b"data").unwrap();
    assert_eq!(std::fs::metadata(m.path("f")).unwrap().uid(), 0);
    std::os::unix::fs::chown(m.path("f"), Some(1234), Some(5678)).unwrap();
    let md = std::fs::metadata(m.path("f")).unwrap();
    assert_eq!((md.uid(), md.gid()), (1234, 5678));
    let st = other.stat("/f").unwrap();
    assert_eq!((st.uid, st.gid), (1234, 5678));

    // Hard links: both names count, across directories; one name goes,
    // the other stays; the directory counts its subdirectories.
    std::fs::create_dir(m.path("d")).unwrap();
    std::fs::create_dir(m.path("d/sub1")).unwrap();
    std::fs::create_dir(m.path("d/sub2")).unwrap();
    assert_eq!(std::fs::metadata(m.path("d")).unwrap().nlink(), 4);
    std::fs::hard_link(m.path("f"), m.path("d/g")).unwrap();
    assert_eq!(std::fs::metadata(m.path("f")).unwrap().nlink(), 2);
    assert_eq!(
        std::fs::metadata(m.path("d/g")).unwrap().ino(),
        std::fs::metadata(m.path("f")).unwrap().ino()
    );
    assert_eq!(other.stat("/d/g").unwrap().nlink, 2);
    // A rename over another name of the same object does nothing.
    std::fs::rename(m.path("f"), m.path("d/g")).unwrap();
    assert!(m.path("f").exists());
    std::fs::remove_file(m.path("f")).unwrap();
    assert_eq!(std::fs::read(m.path("d/g")).unwrap(), b"data");
    assert_eq!(std::fs::metadata(m.path("d/g")).unwrap().nlink(), 1);
    std::fs::remove_dir(m.path("d/sub2")).unwrap();
    assert_eq!(std::fs::metadata(m.path("d")).unwrap().nlink(), 3);

    // Special files: a fifo and a character device, as such everywhere.
    let fifo = cpath(&m.path("fifo"));
    // SAFETY: NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
    let dev = cpath(&m.path("null2"));
    let rdev = libc::makedev(1, 3);
    // SAFETY: NUL-terminated path.
    assert_eq!(
        unsafe { libc::mknod(dev.as_ptr(), libc::S_IFCHR | 0o600, rdev) },
        0
    );
    let md = std::fs::symlink_metadata(m.path("fifo")).unwrap();
    assert!(md.file_type().is_fifo());
    assert_eq!(md.mode() & 0o7777, 0o640);
    let md = std::fs::symlink_metadata(m.path("null2")).unwrap();
    assert!(md.file_type().is_char_device());
    assert_eq!(md.rdev(), rdev);
    assert_eq!(other.lstat("/fifo").unwrap().ftype, FileType::Fifo);
    assert_eq!(other.lstat("/null2").unwrap().rdev, rdev);
    // FUSE mounts are `nodev`: a device node there is not opened.
    let e = std::fs::write(m.path("null2"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES));
}

#[test]
fn times_are_kept_exactly_even_when_set_while_open_for_writing() {
    let Some((srv, d)) = setup() else { return };
    let m = Mount::start(&srv, d.path(), &[], &[]);
    let other = client_util::client(&srv, &d.path().join("other-cache"));

    // utimensat: both times to the nanosecond; UTIME_OMIT leaves one.
    std::fs::write(m.path("t"), b"x").unwrap();
    assert_eq!(
        utimens(
            &m.path("t"),
            Some((1_000_000_000, 111)),
            Some((1_100_000_000, 222)),
            0
        ),
        0
    );
    assert_eq!(
        utimens(&m.path("t"), None, Some((1_200_000_000, 333)), 0),
        0
    );
    let md = std::fs::metadata(m.path("t")).unwrap();
    assert_eq!((md.atime(), md.atime_nsec()), (1_000_000_000, 111));
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_200_000_000, 333));
    assert_ne!(md.ctime(), md.mtime(), "ctime is the time of the change");
    let st = other.stat("/t").unwrap();
    assert_eq!(
        st.atime,
        Timespec {
            sec: 1_000_000_000,
            nsec: 111
        }
    );
    assert_eq!(
        st.mtime,
        Timespec {
            sec: 1_200_000_000,
            nsec: 333
        }
    );
    // Reading does not move atime.
    assert_eq!(std::fs::read(m.path("t")).unwrap(), b"x");
    assert_eq!(
        std::fs::metadata(m.path("t")).unwrap().atime(),
        1_000_000_000
    );

    // cp -p: write, set the times, then close: the store keeps them.
    {
        use std::io::Write;
        let mut f = std::fs::File::create(m.path("copy")).unwrap();
        f.write_all(b"copied contents").unwrap();
        f.flush().unwrap();
        assert_eq!(
            utimens(
                &m.path("copy"),
                Some((900_000_000, 5)),
                Some((900_000_000, 7)),
                0
            ),
            0
        );
    }
    let md = std::fs::metadata(m.path("copy")).unwrap();
    assert_eq!((md.mtime(), md.mtime_nsec()), (900_000_000, 7));
    assert_eq!(md.len(), 15);
    let st = other.stat("/copy").unwrap();
    assert_eq!(
        st.mtime,
        Timespec {
            sec: 900_000_000,
            nsec: 7
        }
    );
    assert_eq!(client_util::get(&other, "/copy"), b"copied contents");

    // touch -h: the link's own times, for a relative, an absolute and a
    // dangling link; the target's stay.
    std::os::unix::fs::symlink("t", m.path("rel")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/far/away", m.path("abs")).unwrap();
    std::os::unix::fs::symlink("missing", m.path("dangling")).unwrap();
    for l in ["rel", "abs", "dangling"] {
        assert_eq!(
            utimens(
                &m.path(l),
                Some((800_000_000, 1)),
                Some((800_000_000, 2)),
                libc::AT_SYMLINK_NOFOLLOW
            ),
            0,
            "touch -h {l}"
        );
        let md = std::fs::symlink_metadata(m.path(l)).unwrap();
        assert_eq!((md.mtime(), md.mtime_nsec()), (800_000_000, 2), "{l}");
    }
    let md = std::fs::metadata(m.path("t")).unwrap();
    assert_eq!(md.mtime(), 1_200_000_000, "the target is untouched");
}

#[test]
fn a_record_logged_disconnected_carries_its_owner_and_times_to_the_server() {
    let srv = client_util::start();
    let d = TempDir::new("posix-disco");
    let c = client_util::client(&srv, &d.path().join("a"));
    let other = client_util::client(&srv, &d.path().join("b"));
    let root = c.root_fid().unwrap();
    c.set_write_disconnected(true);
    let owner = Owner {
        uid: 4242,
        gid: 4343,
    };
    let f = c
        .create_at_as(root, "logged", 0o640, libc::O_WRONLY, owner)
        .unwrap();
    f.close().unwrap();
    let dir = c.mkdir_at_as(root, "dir", 0o750, owner).unwrap();
    c.mknod_at(dir, "p", FileType::Fifo, 0o600, 0, owner)
        .unwrap();
    let t = Timespec {
        sec: 1_234_567_890,
        nsec: 42,
    };
    let fid = c.lookup_at(root, "logged").unwrap().unwrap().fid;
    c.set_status_fid(
        fid,
        &coda::client::SetStatus {
            atime: Some(t),
            gid: Some(77),
            ..Default::default()
        },
    )
    .unwrap();
    c.setxattr_fid(
        fid,
        "user.k",
        b"logged value",
        coda::client::XattrHow::Create,
    )
    .unwrap();
    assert_eq!(c.getxattr_fid(fid, "user.k").unwrap(), b"logged value");
    // Applied locally at once...
    let local = c.getattr_fid(fid).unwrap();
    assert_eq!((local.uid, local.gid, local.atime), (4242, 77, t));
    assert!(c.pending_records() > 0, "logged, not sent");
    // ...and the same on the server after reintegration.
    c.set_write_disconnected(false);
    c.reintegrate_now().unwrap();
    assert_eq!(c.pending_records(), 0);
    let st = other.stat("/logged").unwrap();
    assert_eq!((st.uid, st.gid, st.atime), (4242, 77, t));
    assert_eq!(
        other.getxattr_fid(st.fid, "user.k").unwrap(),
        b"logged value"
    );
    let st = other.stat("/dir").unwrap();
    assert_eq!((st.uid, st.gid, st.mode & 0o7777), (4242, 4343, 0o750));
    let st = other.lstat("/dir/p").unwrap();
    assert_eq!((st.ftype, st.uid), (FileType::Fifo, 4242));
}

fn xattr_call(r: isize) -> Result<usize, i32> {
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap())
    } else {
        Ok(r as usize)
    }
}

fn setx(p: &Path, name: &str, value: &[u8], flags: i32) -> Result<usize, i32> {
    let (c, n) = (cpath(p), CString::new(name).unwrap());
    // SAFETY: NUL-terminated strings and a live buffer of that length.
    xattr_call(unsafe {
        libc::setxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    } as isize)
}

fn getx(p: &Path, name: &str) -> Result<Vec<u8>, i32> {
    let (c, n) = (cpath(p), CString::new(name).unwrap());
    let mut buf = vec![0u8; 70_000];
    // SAFETY: NUL-terminated strings and a live buffer of that length.
    let len = xattr_call(unsafe {
        libc::getxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
    })?;
    buf.truncate(len);
    Ok(buf)
}

fn listx(p: &Path) -> Vec<String> {
    let c = cpath(p);
    let mut buf = vec![0u8; 4096];
    // SAFETY: a NUL-terminated path and a live buffer of that length.
    let len =
        xattr_call(unsafe { libc::listxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })
            .unwrap();
    buf[..len]
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8(s.to_vec()).unwrap())
        .collect()
}

fn removex(p: &Path, name: &str) -> Result<usize, i32> {
    let (c, n) = (cpath(p), CString::new(name).unwrap());
    // SAFETY: NUL-terminated strings.
    xattr_call(unsafe { libc::removexattr(c.as_ptr(), n.as_ptr()) } as isize)
}

#[test]
fn user_extended_attributes_are_kept_with_the_flags_and_limits_of_linux() {
    let Some((srv, d)) = setup() else { return };
    let m = Mount::start(&srv, d.path(), &[], &[]);
    let other = client_util::client(&srv, &d.path().join("other-cache"));
    let f = m.path("x");
    std::fs::write(&f, b"data").unwrap();
    assert_eq!(getx(&f, "user.none"), Err(libc::ENODATA));
    setx(&f, "user.a", b"one", 0).unwrap();
    setx(&f, "user.b", b"", 0).unwrap();
    assert_eq!(
        setx(&f, "user.a", b"two", libc::XATTR_CREATE),
        Err(libc::EEXIST)
    );
    assert_eq!(
        setx(&f, "user.c", b"two", libc::XATTR_REPLACE),
        Err(libc::ENODATA)
    );
    setx(&f, "user.a", b"two", libc::XATTR_REPLACE).unwrap();
    assert_eq!(getx(&f, "user.a").unwrap(), b"two");
    assert_eq!(getx(&f, "user.b").unwrap(), b"");
    assert_eq!(listx(&f), vec!["user.a", "user.b"]);
    // Another client sees them; a change there is seen here.
    let fid = other.stat("/x").unwrap().fid;
    assert_eq!(other.getxattr_fid(fid, "user.a").unwrap(), b"two");
    other
        .setxattr_fid(fid, "user.z", b"from b", coda::client::XattrHow::Set)
        .unwrap();
    assert!(eventually(std::time::Duration::from_secs(10), || getx(
        &f, "user.z"
    )
    .is_ok_and(|v| v == b"from b")));
    // Removal, and removal of what is not there.
    removex(&f, "user.b").unwrap();
    assert_eq!(removex(&f, "user.b"), Err(libc::ENODATA));
    assert_eq!(listx(&f), vec!["user.a", "user.z"]);
    // Limits: a 64 KiB value is the largest; namespaces other than user.
    // are refused.
    setx(&f, "user.big", &vec![7u8; 60_000], 0).unwrap();
    assert_eq!(getx(&f, "user.big").unwrap().len(), 60_000);
    assert!(setx(&f, "user.huge", &vec![7u8; 70_000], 0).is_err());
    assert_eq!(setx(&f, "trusted.t", b"v", 0), Err(libc::EOPNOTSUPP));
    assert_eq!(getx(&f, "security.selinux"), Err(libc::ENODATA));
    // A change of attributes is a status change.
    let before = std::fs::metadata(&f).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    setx(&f, "user.a", b"three", 0).unwrap();
    let after = std::fs::metadata(&f).unwrap();
    assert!(
        (after.ctime(), after.ctime_nsec()) > (before.ctime(), before.ctime_nsec()),
        "ctime moves"
    );
    assert_eq!(after.mtime(), before.mtime(), "mtime does not");
}

/// Bytes of disk the files under `dir` take (holes take none).
fn disk_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let md = e.metadata().unwrap();
        total += if md.is_dir() {
            disk_bytes(&e.path())
        } else {
            md.blocks() * 512
        };
    }
    total
}

#[test]
fn sparse_files_stay_sparse_on_the_mount_the_server_and_another_client() {
    let Some((srv, d)) = setup() else { return };
    let m = Mount::start(&srv, d.path(), &[], &[]);
    let gib: u64 = 1 << 30;
    // truncate -s 3G (times printed for the record, not asserted)
    let t0 = std::time::Instant::now();
    std::fs::File::create(m.path("big"))
        .unwrap()
        .set_len(3 * gib)
        .unwrap();
    assert_eq!(std::fs::metadata(m.path("big")).unwrap().len(), 3 * gib);
    // A 1-byte write at 2.5 GiB.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(m.path("big"))
            .unwrap();
        f.write_all_at(b"!", 5 * gib / 2).unwrap();
    }
    eprintln!(
        "sparse: truncate -s 3G then a 1-byte write at 2.5 GiB (both stored): {:?}",
        t0.elapsed()
    );
    let limit = 16 << 20;
    let server = disk_bytes(&srv.root().join("objects"));
    assert!(server < limit, "the server keeps {server} bytes for 1 byte");
    let cache = disk_bytes(&m.cache_dir.join("containers"));
    assert!(cache < limit, "the mount's cache keeps {cache} bytes");
    // Another client fetches it sparse, with the byte where it was.
    let other_cache = d.path().join("other-cache");
    let other = client_util::client(&srv, &other_cache);
    let f = other.open("/big", libc::O_RDONLY, 0).unwrap();
    let mut b = [0u8; 3];
    f.read_at(&mut b, 5 * gib / 2 - 1).unwrap();
    assert_eq!(&b, b"\0!\0");
    f.close().unwrap();
    assert_eq!(other.stat("/big").unwrap().size, 3 * gib);
    let fetched = disk_bytes(&other_cache.join("containers"));
    assert!(
        fetched < limit,
        "the other client's copy takes {fetched} bytes"
    );
    // Reading through the mount finds the byte too.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(m.path("big")).unwrap();
        let mut b = [7u8; 2];
        f.read_exact_at(&mut b, 5 * gib / 2).unwrap();
        assert_eq!(&b, b"!\0");
    }
}
