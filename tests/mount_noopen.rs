//! `coda-mount --no-open` (docs/MOUNT.md, "No-open mode"): a read-only mount
//! where the kernel opens and closes files without asking `coda-mount`.
//! What it still owes: contents fetched by inode at the first read, pages
//! dropped the moment another client's change returns, `EIO` at once after
//! a failover, `EROFS` for every change, the kernel's mode-bit checks.

mod client_util;
mod common;
mod mount_util;

use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::TempDir;
use mount_util::*;

/// A line `NAME: VALUE` of `coda status` of the mount.
fn status(m: &Mount, name: &str) -> String {
    let out = stdout(&m.cli(&["status"]));
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .unwrap_or_else(|| panic!("no {name} in status:\n{out}"))
        .trim()
        .to_string()
}

fn counter(m: &Mount, name: &str) -> u64 {
    status(m, name).parse().unwrap()
}

#[test]
fn files_are_read_by_inode_with_one_open_and_one_flush_request_for_the_whole_mount() {
    if !fuse_available() {
        return;
    }
    let srv = client_util::start();
    let d = TempDir::new("no-read");
    let other = client_util::client(&srv, &d.path().join("other-cache"));
    other.mkdir("/www", 0o755).unwrap();
    let big: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    client_util::put(&other, "/www/big.bin", &big);
    for i in 0..5 {
        client_util::put(
            &other,
            &format!("/www/f{i}.html"),
            format!("page {i}").as_bytes(),
        );
    }
    let m = Mount::start(&srv, d.path(), &[], &["--no-open"]);
    assert_eq!(status(&m, "no_open"), "on");
    assert_eq!(status(&m, "passthrough"), "off");

    // Never fetched by this client: the first read fetches by inode.
    assert_eq!(counter(&m, "fetches"), 0);
    assert_eq!(std::fs::read(m.path("www/big.bin")).unwrap(), big);
    assert!(counter(&m, "fetches") >= 1);
    for i in 0..5 {
        assert_eq!(
            std::fs::read(m.path(&format!("www/f{i}.html"))).unwrap(),
            format!("page {i}").as_bytes()
        );
    }
    let reads = counter(&m, "fuse_reads");
    for _ in 0..3 {
        for i in 0..5 {
            assert_eq!(
                std::fs::read(m.path(&format!("www/f{i}.html"))).unwrap(),
                format!("page {i}").as_bytes()
            );
        }
        assert_eq!(std::fs::read(m.path("www/big.bin")).unwrap(), big);
    }
    // 24 opens and closes: the kernel asked once for each (answered
    // ENOSYS, which it keeps for the mount), never again, and read nothing
    // more (it kept the pages).
    assert_eq!(counter(&m, "fuse_open_requests"), 1);
    assert_eq!(counter(&m, "fuse_flush_requests"), 1);
    assert_eq!(counter(&m, "fuse_reads"), reads);
    assert_eq!(
        counter(&m, "plain_opens") + counter(&m, "passthrough_opens"),
        0
    );
    // Listings and mmap work as on any mount.
    let mut names: Vec<String> = std::fs::read_dir(m.path("www"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["big.bin", "f0.html", "f1.html", "f2.html", "f3.html", "f4.html"]
    );
}

#[test]
fn every_change_through_the_mount_is_refused_with_erofs_and_changes_nothing() {
    if !fuse_available() {
        return;
    }
    let srv = client_util::start();
    let d = TempDir::new("no-ro");
    let other = client_util::client(&srv, &d.path().join("other-cache"));
    other.mkdir("/d", 0o755).unwrap();
    client_util::put(&other, "/d/f", b"kept");
    let m = Mount::start(&srv, d.path(), &[], &["--no-open"]);
    let f = m.path("d/f");
    assert_eq!(std::fs::read(&f).unwrap(), b"kept");
    let erofs = |r: std::io::Result<()>, what: &str| {
        assert_eq!(
            r.expect_err(what).raw_os_error(),
            Some(libc::EROFS),
            "{what}"
        );
    };
    erofs(
        std::fs::OpenOptions::new().write(true).open(&f).map(|_| ()),
        "open for writing",
    );
    erofs(
        std::fs::OpenOptions::new()
            .append(true)
            .open(&f)
            .map(|_| ()),
        "open for appending",
    );
    erofs(std::fs::write(m.path("d/new"), b"x"), "create");
    erofs(std::fs::create_dir(m.path("d/sub")), "mkdir");
    erofs(std::fs::remove_file(&f), "unlink");
    erofs(std::fs::rename(&f, m.path("d/g")), "rename");
    erofs(
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)),
        "chmod",
    );
    let c = std::ffi::CString::new(f.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path.
    let r = unsafe { libc::truncate(c.as_ptr(), 0) };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EROFS),
        "truncate"
    );
    assert_eq!(std::fs::read(&f).unwrap(), b"kept");
    assert_eq!(client_util::get(&other, "/d/f"), b"kept");
    assert_eq!(client_util::names(&other, "/d"), ["f"]);
}

#[test]
fn another_clients_change_drops_the_kept_pages_before_it_returns() {
    if !fuse_available() {
        return;
    }
    let srv = client_util::start();
    let d = TempDir::new("no-coh");
    let other = client_util::client(&srv, &d.path().join("other-cache"));
    let a: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    client_util::put(&other, "/p.bin", &a);
    let m = Mount::start(&srv, d.path(), &[], &["--no-open"]);
    let p = m.path("p.bin");
    assert_eq!(std::fs::read(&p).unwrap(), a);
    assert_eq!(std::fs::read(&p).unwrap(), a);

    // Same size, other bytes: only the invalidation can tell.
    let b: Vec<u8> = a.iter().map(|x| x ^ 0x5a).collect();
    client_util::put(&other, "/p.bin", &b);
    assert_eq!(std::fs::read(&p).unwrap(), b);
    // Shorter, then longer.
    client_util::put(&other, "/p.bin", b"short");
    assert_eq!(std::fs::read(&p).unwrap(), b"short");
    client_util::put(&other, "/p.bin", &a);
    assert_eq!(std::fs::read(&p).unwrap(), a);
    // A descriptor opened before the change reads the new bytes too (its
    // pages were dropped; as with any shared page cache).
    let f = std::fs::File::open(&p).unwrap();
    client_util::put(&other, "/p.bin", &b);
    let mut got = vec![0u8; b.len()];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut got, 0).unwrap();
    assert_eq!(got, b);
    drop(f);
    // Gone at once; a new name shows.
    other.unlink("/p.bin").unwrap();
    assert_eq!(
        std::fs::metadata(&p).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    client_util::put(&other, "/q.bin", b"q");
    assert_eq!(std::fs::read(m.path("q.bin")).unwrap(), b"q");
}

#[test]
fn cached_files_fail_with_eio_at_once_after_failover() {
    if !fuse_available() {
        return;
    }
    let srv = client_util::start();
    let d = TempDir::new("no-fo");
    let other = client_util::client(&srv, &d.path().join("other-cache"));
    other.mkdir("/site", 0o755).unwrap();
    client_util::put(&other, "/site/index.html", b"page");
    let m = Mount::start(&srv, d.path(), &[], &["--no-open"]);
    let page = m.path("site/index.html");
    // Into the kernel's caches: entry, attributes, pages; and one
    // descriptor held open across the failover, as a server's would be.
    for _ in 0..2 {
        assert_eq!(std::fs::read(&page).unwrap(), b"page");
    }
    let held = std::fs::File::open(&page).unwrap();
    m.failover_to_local(d.path());
    for r in [
        std::fs::read(&page).map(|_| ()),
        std::fs::metadata(&page).map(|_| ()),
        std::fs::read_dir(m.path("site")).map(|_| ()),
        std::os::unix::fs::FileExt::read_at(&held, &mut [0u8; 4], 0).map(|_| ()),
    ] {
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EIO));
    }
}

#[test]
fn the_kernel_checks_modes_at_every_open() {
    if !fuse_available() || !common::prereq::require_root("root", "opens as another user") {
        return;
    }
    let srv = client_util::start();
    let d = TempDir::new("no-acc");
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let other = client_util::client(&srv, &d.path().join("other-cache"));
    client_util::put(&other, "/open.txt", b"open");
    client_util::put(&other, "/closed.txt", b"closed");
    other.chmod("/closed.txt", 0o600).unwrap();
    let m = Mount::start(&srv, d.path(), &[], &["--no-open", "--allow-other"]);
    // Root reads both (pages of both in the kernel now).
    assert_eq!(std::fs::read(m.path("closed.txt")).unwrap(), b"closed");
    let cat = |name: &str| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
            .arg(m.path(name))
            .output()
            .expect("setpriv (util-linux)")
    };
    let ok = cat("open.txt");
    assert!(ok.status.success(), "{ok:?}");
    assert_eq!(ok.stdout, b"open");
    let no = cat("closed.txt");
    assert!(!no.status.success());
    assert!(
        String::from_utf8_lossy(&no.stderr).contains("Permission denied"),
        "{no:?}"
    );
    // A mode change by another client reaches the kernel's check at once.
    other.chmod("/closed.txt", 0o644).unwrap();
    let now = cat("closed.txt");
    assert!(now.status.success(), "{now:?}");
    assert_eq!(now.stdout, b"closed");
}

#[test]
fn no_open_refuses_to_run_without_the_kernel_cache() {
    let d = TempDir::new("no-usage");
    let out = Command::new(MOUNT_BIN)
        .args(["--config", "/nonexistent", "--no-open", "--no-kernel-cache"])
        .arg(d.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--no-open needs the kernel cache"),
        "{out:?}"
    );
}

/// A `coda-mount` whose stderr goes to a file; killed and unmounted on drop.
struct Logged {
    child: std::process::Child,
    mnt: std::path::PathBuf,
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if is_mounted(&self.mnt) {
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&self.mnt)
                .status();
        }
    }
}

#[test]
fn unmount_ends_the_session_at_once_with_many_inodes_cached() {
    if !fuse_available() {
        return;
    }
    let srv = client_util::start();
    let d = TempDir::new("no-umount");
    let other = client_util::client(&srv, &d.path().join("other-cache"));
    let conf = write_config(&srv, d.path(), &[]);
    let mnt = d.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let log = d.path().join("stderr.log");
    for args in [&["--no-open"][..], &[][..]] {
        other.mkdir("/many", 0o755).unwrap();
        for i in 0..300 {
            client_util::put(&other, &format!("/many/f{i}"), b"x");
        }
        let child = Command::new(MOUNT_BIN)
            .arg("--config")
            .arg(&conf)
            .args(args)
            .arg(&mnt)
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut m = Logged {
            child,
            mnt: mnt.clone(),
        };
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(m.child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert!(line.starts_with("mounted on"), "{line:?}");
        for i in 0..300 {
            assert_eq!(std::fs::read(mnt.join(format!("many/f{i}"))).unwrap(), b"x");
        }
        // Quiet for a moment: every request thread goes back to reading
        // (gate.rs). Then another client renames the directory away: the
        // mount drops the kernel's entry for it, and the kernel forgets its
        // 300 inodes at once (BATCH_FORGET), which must not hold a thread
        // for long: the unmount right after waits for every thread.
        std::thread::sleep(std::time::Duration::from_millis(600));
        other
            .rename("/many", &format!("/gone{}", args.len()))
            .unwrap();
        unsafe { libc::kill(m.child.id() as i32, libc::SIGTERM) };
        assert!(
            eventually(std::time::Duration::from_secs(60), || matches!(
                m.child.try_wait(),
                Ok(Some(_))
            )),
            "coda-mount {args:?} did not exit"
        );
        let err = std::fs::read_to_string(&log).unwrap();
        assert!(err.contains("unmounting"), "{args:?}: {err}");
        assert!(
            !err.contains("did not end"),
            "{args:?}: the session must end when the mount goes: {err}"
        );
    }
}
