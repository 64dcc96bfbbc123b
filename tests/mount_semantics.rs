//! Open-file semantics through the mount, as programs rely on them: fsync
//! is durable before close, a descriptor stays usable after a child closed
//! its copy, unlinked and renamed-over open files stay usable until the
//! last close, shared writable mmap, set-id bits cleared by writes of
//! others, O_APPEND from several processes, and what locks hold.

mod client_util;
mod common;
mod mount_util;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::TempDir;
use mount_util::*;

/// The two ways the mount serves open files: kernel passthrough to the
/// container (the default where the kernel has it) and the plain path.
const MODES: [&[&str]; 2] = [&[], &["--no-passthrough"]];

fn rw(path: &std::path::Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap()
}

fn status_line(m: &Mount, key: &str) -> String {
    let out = stdout(&m.cli(&["status"]));
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}: ")).map(str::to_string))
        .unwrap_or_default()
}

#[test]
fn fsync_makes_data_durable_before_close_even_if_the_mount_dies() {
    if !fuse_available() {
        return;
    }
    let srv = client_util::start();
    let d = TempDir::new("sem-fsync");
    let mut m = Mount::start(&srv, d.path(), &[], &[]);
    let mut f = std::fs::File::create(m.path("journal")).unwrap();
    f.write_all(b"committed entry\n").unwrap();
    f.sync_all().unwrap();
    // coda-mount dies with the file still open: no flush, no release.
    unsafe { libc::kill(m.pid(), libc::SIGKILL) };
    m.terminate();
    drop(f);
    let other = client_util::client(&srv, &d.path().join("other-cache"));
    assert_eq!(client_util::get(&other, "/journal"), b"committed entry\n");
}

#[test]
fn fsync_while_disconnected_logs_the_data_durably() {
    if !fuse_available() {
        return;
    }
    let srv = client_util::start();
    let d = TempDir::new("sem-fsync-disco");
    let mut m = Mount::start(&srv, d.path(), &[], &[]);
    std::fs::write(m.path("log"), b"v1").unwrap();
    let o = m.cli(&["disconnect"]);
    assert!(o.status.success(), "disconnect: {o:?}");
    let mut f = rw(&m.path("log"));
    f.write_all(b"v2 written while disconnected").unwrap();
    f.sync_all().unwrap();
    unsafe { libc::kill(m.pid(), libc::SIGKILL) };
    m.terminate();
    drop(f);
    let _ = Command::new("fusermount3")
        .args(["-u", "-z"])
        .arg(&m.mountpoint)
        .status();
    // A client on the dead mount's cache finds the logged store and sends
    // it when it connects.
    let revived = client_util::client(&srv, &m.cache_dir);
    let _ = revived.reintegrate_now();
    drop(revived);
    let other = client_util::client(&srv, &d.path().join("other-cache"));
    assert_eq!(
        client_util::get(&other, "/log"),
        b"v2 written while disconnected"
    );
}

#[test]
fn ftruncate_works_after_a_child_closed_its_copy_of_the_descriptor() {
    if !fuse_available() {
        return;
    }
    let srv = client_util::start();
    for (i, args) in MODES.iter().enumerate() {
        let d = TempDir::new(&format!("sem-trunc{i}"));
        let m = Mount::start(&srv, d.path(), &[], args);
        let p = m.path(&format!("requests{i}"));
        std::fs::write(&p, b"old contents").unwrap();
        let mut f = rw(&p);
        // What autom4te does: the descriptor is inherited by a child that
        // execs (close-on-exec closes its copy: a FUSE flush), then the
        // parent truncates and rewrites.
        let fd = f.as_raw_fd();
        // SAFETY: plain fcntl on our own open descriptor.
        unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
        let st = Command::new("true").status().unwrap();
        assert!(st.success());
        f.set_len(0)
            .expect("ftruncate after a child closed its copy");
        f.seek(SeekFrom::Start(0)).unwrap();
        f.write_all(b"new").unwrap();
        assert_eq!(f.metadata().unwrap().len(), 3);
        drop(f);
        assert_eq!(std::fs::read(&p).unwrap(), b"new", "mode {args:?}");
        let other = client_util::client(&srv, &d.path().join("other"));
        assert_eq!(client_util::get(&other, &format!("/requests{i}")), b"new");
    }
}

#[test]
fn unlinked_and_renamed_over_open_files_stay_usable_until_closed() {
    if !fuse_available() {
        return;
    }
    let srv = client_util::start();
    for (i, args) in MODES.iter().enumerate() {
        let d = TempDir::new(&format!("sem-unlink{i}"));
        let m = Mount::start(&srv, d.path(), &[], args);
        // unlinked while open for writing
        let p = m.path("scratch");
        std::fs::write(&p, b"hello").unwrap();
        let mut f = rw(&p);
        std::fs::remove_file(&p).unwrap();
        assert!(!p.exists());
        let md = f.metadata().expect("fstat of an unlinked open file");
        assert_eq!((md.len(), md.nlink()), (5, 0), "mode {args:?}");
        f.seek(SeekFrom::End(0)).unwrap();
        f.write_all(b" world").unwrap();
        let mut back = String::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_string(&mut back).unwrap();
        assert_eq!(back, "hello world");
        f.set_len(4).expect("ftruncate of an unlinked open file");
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .expect("fchmod of an unlinked open file");
        let md = f.metadata().unwrap();
        assert_eq!((md.len(), md.mode() & 0o7777), (4, 0o600));
        drop(f); // close succeeds (std ignores close's result; sync shows it)

        // renamed over while open for reading
        std::fs::write(m.path("a"), b"old a").unwrap();
        std::fs::write(m.path("b"), b"new b").unwrap();
        let mut a = std::fs::File::open(m.path("a")).unwrap();
        std::fs::rename(m.path("b"), m.path("a")).unwrap();
        assert_eq!(a.metadata().expect("fstat renamed-over").len(), 5);
        let mut s = String::new();
        a.read_to_string(&mut s).expect("read renamed-over");
        assert_eq!(s, "old a");
        a.sync_all().expect("fsync of a renamed-over file");
        drop(a);
        assert_eq!(std::fs::read(m.path("a")).unwrap(), b"new b");

        // an unlinked file written and closed: close reports success
        let mut g = rw(&{
            std::fs::write(m.path("c"), b"c").unwrap();
            m.path("c")
        });
        std::fs::remove_file(m.path("c")).unwrap();
        g.write_all(b"more").unwrap();
        g.sync_all().expect("fsync of an unlinked file");
        // SAFETY: closing our own descriptor once; `g` is forgotten below.
        let rc = unsafe { libc::close(g.as_raw_fd()) };
        std::mem::forget(g);
        assert_eq!(rc, 0, "close of an unlinked written file");
    }
}

#[test]
fn o_tmpfile_is_refused_with_eopnotsupp() {
    if !fuse_available() {
        return;
    }
    let srv = client_util::start();
    let d = TempDir::new("sem-tmpfile");
    let m = Mount::start(&srv, d.path(), &[], &[]);
    // Documented in docs/MOUNT.md ("Open files"): fuser 0.18 has no
    // TMPFILE request, so the kernel answers for the mount.
    let e = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .open(&m.mountpoint)
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP), "{e}");
}

/// Map `f` shared and writable, write `data` at `off` through the mapping.
fn mmap_write(f: &std::fs::File, len: usize, off: usize, data: &[u8]) -> std::io::Result<()> {
    // SAFETY: a fresh shared mapping of an open file; unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: off + data.len() <= len, within the mapping.
    unsafe {
        std::ptr::copy_nonoverlapping(data.as_ptr(), (p as *mut u8).add(off), data.len());
        libc::msync(p, len, libc::MS_SYNC);
        libc::munmap(p, len);
    }
    Ok(())
}

#[test]
fn shared_writable_mmap_works_and_is_stored() {
    if !fuse_available() {
        return;
    }
    let srv = client_util::start();
    for (i, args) in MODES.iter().enumerate() {
        let d = TempDir::new(&format!("sem-mmap{i}"));
        let m = Mount::start(&srv, d.path(), &[], args);
        // an existing file opened for writing (open), and a new one (create)
        let old = format!("old{i}");
        std::fs::write(m.path(&old), vec![b'.'; 8192]).unwrap();
        let f = rw(&m.path(&old));
        mmap_write(&f, 8192, 4096, b"mapped").expect("MAP_SHARED of an open for writing");
        drop(f);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(m.path(&format!("new{i}")))
            .unwrap();
        f.set_len(4096).unwrap();
        mmap_write(&f, 4096, 10, b"shm").expect("MAP_SHARED of a created file");
        drop(f);
        let back = std::fs::read(m.path(&old)).unwrap();
        assert_eq!(&back[4096..4102], b"mapped", "mode {args:?}");
        let other = client_util::client(&srv, &d.path().join("other"));
        let got = client_util::get(&other, &format!("/{old}"));
        assert_eq!(&got[4096..4102], b"mapped");
        let new = client_util::get(&other, &format!("/new{i}"));
        assert_eq!(&new[10..13], b"shm");
        if args.is_empty() && status_line(&m, "passthrough") == "on" {
            let n: u64 = status_line(&m, "passthrough_opens").parse().unwrap();
            assert!(n >= 2, "writable opens used passthrough: {n}");
        }
    }
}

#[test]
fn a_write_by_another_user_clears_setuid_and_setgid() {
    if !fuse_available() || !common::prereq::require_root("root", "writes as another user") {
        return;
    }
    let srv = client_util::start();
    for (i, args) in MODES.iter().enumerate() {
        let d = TempDir::new(&format!("sem-suid{i}"));
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut a = vec!["--allow-other"];
        a.extend_from_slice(args);
        let m = Mount::start(&srv, d.path(), &[], &a);
        std::fs::set_permissions(&m.mountpoint, std::fs::Permissions::from_mode(0o777)).unwrap();
        let p = m.path("prog");
        std::fs::write(&p, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o6777)).unwrap();
        // root (CAP_FSETID) writing keeps them, as on a local file
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .unwrap()
            .write_all(b"# root\n")
            .unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o7777, 0o6777);
        let st = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "sh",
                "-c",
            ])
            .arg("echo '# nobody' >> \"$0\"")
            .arg(&p)
            .status()
            .unwrap();
        assert!(st.success(), "write as nobody");
        let mode = std::fs::metadata(&p).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o777, "mode {args:?}: {mode:o}");
        let other = client_util::client(&srv, &d.path().join("other"));
        assert_eq!(other.stat("/prog").unwrap().mode & 0o7777, 0o777);
    }
}

#[test]
fn appends_from_several_processes_are_all_kept() {
    if !fuse_available() || !common::prereq::require_python() {
        return;
    }
    let srv = client_util::start();
    for (i, args) in MODES.iter().enumerate() {
        let d = TempDir::new(&format!("sem-append{i}"));
        let m = Mount::start(&srv, d.path(), &[], args);
        let p = m.path(&format!("log{i}"));
        std::fs::write(&p, b"").unwrap();
        let script = "import os,sys\n\
            fd=os.open(sys.argv[1],os.O_WRONLY|os.O_APPEND)\n\
            for n in range(300):\n\
            \x20   os.write(fd,('p%s %05d\\n'%(sys.argv[2],n)).encode())\n\
            os.close(fd)\n";
        let kids: Vec<_> = (0..4)
            .map(|k| {
                Command::new("python3")
                    .args(["-c", script])
                    .arg(&p)
                    .arg(k.to_string())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for mut k in kids {
            assert!(k.wait().unwrap().success());
        }
        let text = std::fs::read_to_string(&p).unwrap();
        let other = client_util::client(&srv, &d.path().join("other"));
        let remote = client_util::get(&other, &format!("/log{i}"));
        eprintln!("mount {} remote {}", text.len(), remote.len());
        for e in std::fs::read_dir(d.path().join("cache")).unwrap() {
            eprintln!("{:?}", e.unwrap().path());
        }
        let mut lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1200, "mode {args:?}");
        lines.sort();
        let mut want: Vec<String> = (0..4)
            .flat_map(|k| (0..300).map(move |n| format!("p{k} {n:05}")))
            .collect();
        want.sort();
        assert!(lines == want, "lines lost or garbled");
        assert_eq!(
            client_util::get(&other, &format!("/log{i}")),
            text.as_bytes()
        );
    }
}

/// A python3 process holding a lock (`fcntl` or `flock`) on `path` until
/// its stdin closes; returns once it holds it.
fn hold_lock(kind: &str, path: &std::path::Path) -> std::process::Child {
    let script = format!(
        "import fcntl,sys\n\
         f=open(sys.argv[1],'r+')\n\
         fcntl.{kind}(f, fcntl.LOCK_EX)\n\
         print('locked', flush=True)\n\
         sys.stdin.read()\n"
    );
    let mut c = Command::new("python3")
        .args(["-c", &script])
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = [0u8; 7];
    c.stdout.as_mut().unwrap().read_exact(&mut line).unwrap();
    assert_eq!(&line, b"locked\n");
    c
}

/// Whether another process can take the lock right now (non-blocking).
fn can_lock(kind: &str, path: &std::path::Path) -> bool {
    let script = format!(
        "import fcntl,sys\n\
         f=open(sys.argv[1],'r+')\n\
         try:\n\
         \x20   fcntl.{kind}(f, fcntl.LOCK_EX|fcntl.LOCK_NB)\n\
         except BlockingIOError:\n\
         \x20   sys.exit(3)\n"
    );
    let st = Command::new("python3")
        .args(["-c", &script])
        .arg(path)
        .status()
        .unwrap();
    match st.code() {
        Some(0) => true,
        Some(3) => false,
        other => panic!("lock probe failed: {other:?}"),
    }
}

#[test]
fn locks_are_coherent_within_one_mount_and_per_client_across_mounts() {
    if !fuse_available() || !common::prereq::require_python() {
        return;
    }
    let srv = client_util::start();
    let d1 = TempDir::new("sem-lock1");
    let d2 = TempDir::new("sem-lock2");
    let m1 = Mount::start(&srv, d1.path(), &[], &[]);
    let m2 = Mount::start(&srv, d2.path(), &[], &[]);
    std::fs::write(m1.path("db"), b"data").unwrap();
    assert!(eventually(Duration::from_secs(10), || m2
        .path("db")
        .exists()));
    for kind in ["lockf", "flock"] {
        let mut holder = hold_lock(kind, &m1.path("db"));
        // the same mount (one client): the lock holds against others
        assert!(!can_lock(kind, &m1.path("db")), "{kind} on the same mount");
        // another client: locks are per client (docs/MOUNT.md "Locks")
        assert!(can_lock(kind, &m2.path("db")), "{kind} on another client");
        drop(holder.stdin.take());
        assert!(holder.wait().unwrap().success());
        // released with its holder
        assert!(can_lock(kind, &m1.path("db")), "{kind} after release");
    }
}

#[test]
fn times_set_while_open_for_writing_are_kept_at_close() {
    if !fuse_available() {
        return;
    }
    let srv = client_util::start();
    for (i, args) in MODES.iter().enumerate() {
        let d = TempDir::new(&format!("sem-times{i}"));
        let m = Mount::start(&srv, d.path(), &[], args);
        // What tar and cp -p do: write, set the times on the descriptor,
        // then close.
        let when = std::time::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
        let name = format!("copied{i}");
        let mut f = std::fs::File::create(m.path(&name)).unwrap();
        f.write_all(b"contents").unwrap();
        f.set_modified(when).unwrap();
        drop(f);
        let md = std::fs::metadata(m.path(&name)).unwrap();
        assert_eq!(md.modified().unwrap(), when, "mode {args:?}");
        assert_eq!(md.len(), 8);
        let other = client_util::client(&srv, &d.path().join("other"));
        let st = other.stat(&format!("/{name}")).unwrap();
        assert_eq!((st.mtime.sec, st.size), (1_600_000_000, 8));
    }
}

#[test]
fn an_o_trunc_open_beside_an_open_for_writing_truncates_the_one_file() {
    if !fuse_available() {
        return;
    }
    let srv = client_util::start();
    for (i, args) in MODES.iter().enumerate() {
        let d = TempDir::new(&format!("sem-otrunc{i}"));
        let m = Mount::start(&srv, d.path(), &[], args);
        let name = format!("shared{i}");
        let p = m.path(&name);
        std::fs::write(&p, b"old contents").unwrap();
        // A writer holds the file open (with passthrough: the inode has a
        // backing file) when another descriptor opens it with O_TRUNC.
        let mut w = rw(&p);
        w.write_all(b"written").unwrap();
        let mut t = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&p)
            .unwrap_or_else(|e| panic!("O_TRUNC open beside a writer, mode {args:?}: {e}"));
        // One file, as locally: the writer's descriptor sees the cut.
        assert_eq!(w.metadata().unwrap().len(), 0, "mode {args:?}");
        t.write_all(b"xy").unwrap();
        drop(t);
        assert_eq!(std::fs::read(&p).unwrap(), b"xy", "mode {args:?}");
        drop(w);
        assert_eq!(std::fs::read(&p).unwrap(), b"xy", "mode {args:?}");
        // A reader holds it open: the O_TRUNC open works too.
        let r = std::fs::File::open(&p).unwrap();
        let mut t = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&p)
            .unwrap_or_else(|e| panic!("O_TRUNC open beside a reader, mode {args:?}: {e}"));
        t.write_all(b"z").unwrap();
        drop(t);
        drop(r);
        assert_eq!(std::fs::read(&p).unwrap(), b"z", "mode {args:?}");
        let other = client_util::client(&srv, &d.path().join("other"));
        assert_eq!(client_util::get(&other, &format!("/{name}")), b"z");
    }
}

#[test]
fn opens_after_the_file_changed_elsewhere_work_beside_older_opens() {
    if !fuse_available() {
        return;
    }
    use std::os::unix::fs::FileExt;
    let srv = client_util::start();
    for (i, args) in MODES.iter().enumerate() {
        let d = TempDir::new(&format!("sem-newver{i}"));
        let m = Mount::start(&srv, d.path(), &[], args);
        let name = format!("page{i}");
        let p = m.path(&name);
        std::fs::write(&p, b"version one").unwrap();
        // An older open stays (with passthrough: the inode's backing file
        // is the old container) while another client stores a new version.
        let old = std::fs::File::open(&p).unwrap();
        let mut buf = [0u8; 64];
        let n = old.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..n], b"version one");
        let other = client_util::client(&srv, &d.path().join("other"));
        client_util::put(&other, &format!("/{name}"), b"version two, longer");
        assert!(
            eventually(Duration::from_secs(20), || std::fs::metadata(&p)
                .map(|m| m.len() == 19)
                .unwrap_or(false)),
            "the mount sees the new size, mode {args:?}"
        );
        let got = std::fs::read(&p)
            .unwrap_or_else(|e| panic!("open beside an older open, mode {args:?}: {e}"));
        assert_eq!(got, b"version two, longer", "mode {args:?}");
        // With passthrough the older open keeps the version it opened (its
        // reads go to its own container). The plain path shares the kernel's
        // page cache of the inode, which the newer open filled.
        if args.is_empty() && status_line(&m, "passthrough") == "on" {
            let n = old.read_at(&mut buf, 0).unwrap();
            assert_eq!(&buf[..n], b"version one");
        }
        let mut w = rw(&p);
        w.write_all(b"V").unwrap();
        drop(w);
        drop(old);
        assert_eq!(
            client_util::get(&other, &format!("/{name}")),
            b"Version two, longer",
            "mode {args:?}"
        );
    }
}

#[test]
fn an_unchanged_files_backing_is_kept_across_opens_and_a_changed_one_replaced() {
    if !fuse_available() {
        return;
    }
    let srv = client_util::start();
    let d = TempDir::new("sem-kept");
    let m = Mount::start(&srv, d.path(), &[], &[]);
    if status_line(&m, "passthrough") != "on" {
        // Nothing to keep without passthrough (mount_basic checks that the
        // kernel has it where it should).
        eprintln!("kernel without FUSE passthrough: no backing files to keep");
        return;
    }
    let p = m.path("kept");
    std::fs::write(&p, b"first").unwrap();
    let before: u64 = status_line(&m, "backing_files").parse().unwrap();
    for _ in 0..5 {
        assert_eq!(std::fs::read(&p).unwrap(), b"first");
    }
    let after: u64 = status_line(&m, "backing_files").parse().unwrap();
    assert!(
        after <= before + 1,
        "one backing file for 5 opens: {before} -> {after}"
    );
    // Another client changes it while nothing is open here: the next open
    // reads the new version (through a new backing file).
    let other = client_util::client(&srv, &d.path().join("other"));
    client_util::put(&other, "/kept", b"second version");
    assert!(eventually(Duration::from_secs(20), || std::fs::read(&p)
        .map(|v| v == b"second version")
        .unwrap_or(false)));
    // Written here, then read back here and there.
    std::fs::write(&p, b"third").unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"third");
    assert_eq!(client_util::get(&other, "/kept"), b"third");
}
