//! The FUSE mount: ordinary file operations through std::fs on the
//! mountpoint reach the server; EIO after failover, working again after
//! failback; SIGTERM unmounts cleanly.

mod client_util;
mod common;
mod mount_util;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::TempDir;
use mount_util::*;

#[test]
fn files_and_directories_work_through_the_mount() {
    if !fuse_available() {
        return;
    }
    let srv = client_util::start();
    let d = TempDir::new("mnt");
    let other = client_util::client(&srv, &d.path().join("other-cache"));
    client_util::put(&other, "/hello.txt", b"from the server");
    let m = Mount::start(&srv, d.path(), &[], &[]);

    // read what another client wrote
    assert_eq!(
        std::fs::read(m.path("hello.txt")).unwrap(),
        b"from the server"
    );
    // write, mkdir, rename, ls
    std::fs::create_dir(m.path("web")).unwrap();
    std::fs::write(m.path("web/a.html"), b"page a").unwrap();
    std::fs::rename(m.path("web/a.html"), m.path("web/index.html")).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(m.path("web"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["index.html"]);
    assert_eq!(std::fs::read(m.path("web/index.html")).unwrap(), b"page a");
    // append, truncate, chmod, symlink
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(m.path("web/index.html"))
            .unwrap();
        f.write_all(b" more").unwrap();
    }
    assert_eq!(
        std::fs::read(m.path("web/index.html")).unwrap(),
        b"page a more"
    );
    std::fs::set_permissions(
        m.path("web/index.html"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let md = std::fs::metadata(m.path("web/index.html")).unwrap();
    assert_eq!(md.permissions().mode() & 0o777, 0o600);
    assert_eq!(md.len(), 11);
    std::os::unix::fs::symlink("index.html", m.path("web/link")).unwrap();
    assert_eq!(
        std::fs::read_link(m.path("web/link")).unwrap(),
        std::path::PathBuf::from("index.html")
    );
    assert_eq!(std::fs::read(m.path("web/link")).unwrap(), b"page a more");
    std::fs::File::options()
        .write(true)
        .open(m.path("web/index.html"))
        .unwrap()
        .set_len(4)
        .unwrap();
    assert_eq!(std::fs::read(m.path("web/index.html")).unwrap(), b"page");
    // errors carry the right errno
    let e = std::fs::read(m.path("missing")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    let e = std::fs::remove_dir(m.path("web")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTEMPTY));

    // The other client sees the mount's changes on the server (the store
    // happens when the kernel releases the file, just after close).
    assert!(
        eventually(Duration::from_secs(5), || other
            .open("/web/index.html", libc::O_RDONLY, 0)
            .ok()
            .map(|f| client_util::read_file(&f))
            .as_deref()
            == Some(b"page")),
        "the server has the mount's write"
    );
    // and the mount sees the other client's changes at once (no kernel TTL)
    client_util::put(&other, "/hello.txt", b"changed");
    assert_eq!(std::fs::read(m.path("hello.txt")).unwrap(), b"changed");

    // remove everything again
    std::fs::remove_file(m.path("web/link")).unwrap();
    std::fs::remove_file(m.path("web/index.html")).unwrap();
    std::fs::remove_dir(m.path("web")).unwrap();
    assert!(other.stat("/web").is_err());
}

#[test]
fn cached_reads_use_passthrough_where_the_kernel_has_it_and_the_plain_path_otherwise() {
    if !fuse_available() {
        return;
    }
    let srv = client_util::start();
    let d = TempDir::new("pt");
    let other = client_util::client(&srv, &d.path().join("other-cache"));
    // Above the page-cache opens' limit (1 MiB, docs/MOUNT.md): smaller
    // read-only files are served from the kernel's page cache instead.
    let data: Vec<u8> = (0..1_300_000u32).map(|i| (i % 251) as u8).collect();
    client_util::put(&other, "/big", &data);

    let m = Mount::start(&srv, d.path(), &[], &[]);
    assert_eq!(std::fs::read(m.path("big")).unwrap(), data);
    let st = stdout(&m.cli(&["status"]));
    if st.contains("passthrough: on") {
        assert!(!st.contains("passthrough_opens: 0"), "{st}");
    } else {
        eprintln!("kernel without FUSE passthrough: plain read path only");
    }
    drop(m);

    let d2 = TempDir::new("plain");
    let m = Mount::start(&srv, d2.path(), &[], &["--no-passthrough"]);
    assert_eq!(std::fs::read(m.path("big")).unwrap(), data);
    let st = stdout(&m.cli(&["status"]));
    assert!(st.contains("passthrough: off"), "{st}");
    assert!(st.contains("passthrough_opens: 0"), "{st}");
}

#[test]
fn operations_fail_with_eio_after_failover_and_work_after_failback() {
    if !fuse_available() {
        return;
    }
    let srv = client_util::start();
    let d = TempDir::new("fo");
    let m = Mount::start(&srv, d.path(), &[], &[]);
    std::fs::write(m.path("f"), b"data").unwrap();
    let (link, local) = m.failover_to_local(d.path());
    assert_eq!(std::fs::read_link(&link).unwrap(), local);
    let t0 = std::time::Instant::now();
    for r in [
        std::fs::read(m.path("f")).map(|_| ()),
        std::fs::metadata(m.path("f")).map(|_| ()),
        std::fs::read_dir(&m.mountpoint).map(|_| ()),
        std::fs::write(m.path("g"), b"x"),
    ] {
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EIO));
    }
    assert!(t0.elapsed() < Duration::from_secs(2), "EIO at once");
    assert!(stdout(&m.cli(&["status"])).contains("state: failed over"));

    let out = m.cli(&[
        "failback",
        "--link",
        link.to_str().unwrap(),
        "--target",
        "mnt",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read(m.path("f")).unwrap(), b"data");
    std::fs::write(m.path("g"), b"x").unwrap();
    assert!(stdout(&m.cli(&["status"])).contains("state: connected"));
}

#[test]
fn sigterm_unmounts_cleanly_and_removes_the_control_socket() {
    if !fuse_available() {
        return;
    }
    let srv = client_util::start();
    let d = TempDir::new("term");
    let mut m = Mount::start(&srv, d.path(), &[], &[]);
    std::fs::write(m.path("f"), b"x").unwrap();
    assert!(m.cache_dir.join("control.sock").exists());
    let st = m.terminate().expect("coda-mount exits on SIGTERM");
    assert!(st.success(), "{st:?}");
    assert!(!is_mounted(&m.mountpoint));
    assert!(!m.cache_dir.join("control.sock").exists());
    // A busy mount (a file held open) is detached, and the process exits.
    let mut m = Mount::start(&srv, d.path(), &[], &[]);
    let held = std::fs::File::open(m.path("f")).unwrap();
    let st = m
        .terminate()
        .expect("coda-mount exits on SIGTERM while busy");
    assert!(st.success(), "{st:?}");
    assert!(!is_mounted(&m.mountpoint));
    drop(held);
}
