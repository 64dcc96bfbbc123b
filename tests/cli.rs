//! The `coda` CLI: every command against a running mount, `failover`
//! without one, and the exit codes a script relies on (0 ok, 1 failed,
//! 2 usage, 3 no running mount).

mod client_util;
mod common;
mod mount_util;

use common::TempDir;
use mount_util::*;

fn code(o: &std::process::Output) -> i32 {
    o.status.code().expect("exited")
}

#[test]
fn every_command_against_a_running_mount() {
    if !fuse_available() {
        return;
    }
    let mut srv = client_util::start();
    let d = TempDir::new("cli");
    let m = Mount::start(&srv, d.path(), &[], &[]);
    std::fs::create_dir(m.path("web")).unwrap();
    std::fs::write(m.path("web/index.html"), b"remote").unwrap();
    assert_eq!(std::fs::read(m.path("web/index.html")).unwrap(), b"remote");

    let o = m.cli(&["status"]);
    assert_eq!(code(&o), 0, "{o:?}");
    let s = stdout(&o);
    assert!(s.contains("state: connected"), "{s}");
    assert!(
        s.contains(&format!("mountpoint: {}", m.mountpoint.display())),
        "{s}"
    );

    let o = m.cli(&["checkservers"]);
    assert_eq!(code(&o), 0, "{o:?}");
    assert!(
        stdout(&o).contains(&format!("server {} up", srv.addr())),
        "{o:?}"
    );

    let o = m.cli(&["listcache"]);
    assert_eq!(code(&o), 0, "{o:?}");
    let l = stdout(&o);
    let line = l
        .lines()
        .find(|l| l.ends_with(" /web/index.html"))
        .unwrap_or_else(|| panic!("{l}"));
    assert!(line.starts_with("file 6 6 current callback "), "{line}");

    // flush one object, by file system path or by mountpoint path
    let o = m.cli(&["flush", "/web/index.html"]);
    assert_eq!(code(&o), 0, "{o:?}");
    assert!(stdout(&o).contains("flushed: 1"), "{o:?}");
    let l = stdout(&m.cli(&["listcache"]));
    assert!(
        l.lines()
            .any(|l| l.starts_with("file 6 - stale - ") && l.ends_with(" /web/index.html")),
        "{l}"
    );
    assert_eq!(std::fs::read(m.path("web/index.html")).unwrap(), b"remote");
    let o = m.cli(&["flush", m.path("web/index.html").to_str().unwrap()]);
    assert!(stdout(&o).contains("flushed: 1"), "{o:?}");
    // An open file is busy; one closed while the flush waits for the
    // kernel's release (which close(2) does not wait for) is flushed.
    let held = std::fs::File::open(m.path("web/index.html")).unwrap();
    let o = m.cli(&["flush", "/web/index.html"]);
    assert!(stdout(&o).contains("busy: 1"), "{o:?}");
    let closer = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(100));
        drop(held);
    });
    let o = m.cli(&["flush", "/web/index.html"]);
    closer.join().unwrap();
    assert!(stdout(&o).contains("flushed: 1\nbusy: 0"), "{o:?}");
    let o = m.cli(&["flush"]);
    assert_eq!(code(&o), 0, "{o:?}");
    let o = m.cli(&["flush", "/nope"]);
    assert_eq!(code(&o), 1, "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("errno 2"),
        "{o:?}"
    );

    // disconnect / reconnect (the flushed file is read back into the cache first)
    assert_eq!(std::fs::read(m.path("web/index.html")).unwrap(), b"remote");
    let o = m.cli(&["disconnect"]);
    assert_eq!(code(&o), 0, "{o:?}");
    assert!(stdout(&m.cli(&["status"])).contains("state: disconnected by operator"));
    // Disconnected operation: cached files read, changes are logged, and
    // nothing reaches the server until reconnect.
    assert_eq!(std::fs::read(m.path("web/index.html")).unwrap(), b"remote");
    std::fs::write(m.path("web/offline.txt"), b"written while disconnected").unwrap();
    let watcher = client_util::client(&srv, &d.path().join("watcher-cache"));
    assert_eq!(
        watcher.stat("/web/offline.txt").unwrap_err().code(),
        -libc::ENOENT,
        "a disconnected client sends nothing"
    );
    let o = m.cli(&["reconnect"]);
    assert_eq!(code(&o), 0, "{o:?}");
    assert!(stdout(&m.cli(&["status"])).contains("state: connected"));
    assert_eq!(std::fs::read(m.path("web/index.html")).unwrap(), b"remote");
    assert_eq!(
        client_util::get(&watcher, "/web/offline.txt"),
        b"written while disconnected",
        "reconnect reintegrated the logged change"
    );
    drop(watcher);

    // failover / failback through the mount
    let link = d.path().join("web");
    std::os::unix::fs::symlink(m.path("web"), &link).unwrap();
    let local = d.path().join("local");
    std::fs::create_dir(&local).unwrap();
    let o = m.cli(&[
        "failover",
        "--link",
        link.to_str().unwrap(),
        "--target",
        local.to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 0, "{o:?}");
    assert_eq!(std::fs::read_link(&link).unwrap(), local);
    assert!(stdout(&m.cli(&["status"])).contains("state: failed over"));
    let o = m.cli(&["reconnect"]);
    assert_eq!(code(&o), 1, "reconnect does not undo a failover: {o:?}");
    let o = m.cli(&[
        "failback",
        "--target",
        m.path("web").to_str().unwrap(),
        "--link",
        link.to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 0, "{o:?}");
    assert_eq!(std::fs::read_link(&link).unwrap(), m.path("web"));

    // a dead server: checkservers says so and exits 1; failback refuses
    srv.kill9();
    let o = m.cli(&["checkservers"]);
    assert_eq!(code(&o), 1, "{o:?}");
    assert!(stdout(&o).contains(" down"), "{o:?}");
    let o = m.cli(&[
        "failover",
        "--link",
        link.to_str().unwrap(),
        "--target",
        local.to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 0, "{o:?}");
    let o = m.cli(&[
        "failback",
        "--link",
        link.to_str().unwrap(),
        "--target",
        m.path("web").to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 1, "{o:?}");
    assert_eq!(
        std::fs::read_link(&link).unwrap(),
        local,
        "still failed over"
    );
}

#[test]
fn without_a_mount_failover_swaps_the_link_and_the_rest_exit_3() {
    let d = TempDir::new("nomount");
    let cache = d.path().join("cache");
    let link = d.path().join("web");
    std::os::unix::fs::symlink("remote", &link).unwrap();
    let o = cli(
        &cache,
        &[
            "failover",
            "--link",
            link.to_str().unwrap(),
            "--target",
            "local",
        ],
    );
    assert_eq!(code(&o), 0, "{o:?}");
    assert!(stdout(&o).contains("no running mount"), "{o:?}");
    assert_eq!(
        std::fs::read_link(&link).unwrap(),
        std::path::PathBuf::from("local")
    );
    // refuses to replace what is not a symlink
    let file = d.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let o = cli(
        &cache,
        &[
            "failover",
            "--link",
            file.to_str().unwrap(),
            "--target",
            "t",
        ],
    );
    assert_eq!(code(&o), 1, "{o:?}");
    for cmd in [
        &["status"][..],
        &["checkservers"],
        &["listcache"],
        &["flush"],
        &["disconnect"],
        &["reconnect"],
        &[
            "failback",
            "--link",
            link.to_str().unwrap(),
            "--target",
            "r",
        ],
    ] {
        let o = cli(&cache, cmd);
        assert_eq!(code(&o), 3, "{cmd:?}: {o:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("no running mount"),
            "{o:?}"
        );
    }
}

#[test]
fn bad_usage_exits_2() {
    let d = TempDir::new("usage");
    let c = d.path().to_str().unwrap();
    for args in [
        &[][..],
        &["--cache-dir", c],
        &["status"],
        &["--cache-dir", c, "bogus"],
        &["--cache-dir", c, "status", "extra"],
        &["--cache-dir", c, "failover", "--link", "x"],
        &["--cache-dir", c, "failback", "--target", "x"],
        &["--cache-dir", c, "flush", "relative/path"],
        &["--bogus-option"],
    ] {
        let o = std::process::Command::new(CLI_BIN)
            .args(args)
            .output()
            .unwrap();
        assert_eq!(code(&o), 2, "{args:?}: {o:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("usage: coda"),
            "{o:?}"
        );
    }
}

/// A change held in write-disconnected mode meets a newer server version:
/// `coda reintegrate` turns it into a conflict that `coda listconflicts`
/// shows with both versions, and `coda resolve --keep local` settles it.
#[test]
fn conflicts_are_listed_and_resolved_and_hoarding_is_driven_from_the_cli() {
    if !fuse_available() {
        return;
    }
    let srv = client_util::start();
    let d = TempDir::new("cli-conflict");
    let m = Mount::start(
        &srv,
        d.path(),
        &[
            ("write_disconnected", "true"),
            ("reintegration_age_ms", "600000"),
        ],
        &[],
    );
    let other = client_util::client(&srv, &d.path().join("other-cache"));
    client_util::put(&other, "/doc", b"v1");
    assert_eq!(std::fs::read(m.path("doc")).unwrap(), b"v1");

    // Held by the mount's client (aging window of ten minutes)...
    std::fs::write(m.path("doc"), b"local edit").unwrap();
    // ...while another client changes the server's copy.
    client_util::put(&other, "/doc", b"server edit");

    let o = m.cli(&["reintegrate"]);
    assert_eq!(code(&o), 0, "{o:?}");
    let o = m.cli(&["listconflicts"]);
    assert_eq!(code(&o), 0, "{o:?}");
    let listing = stdout(&o);
    let line = listing
        .lines()
        .find(|l| l.contains("| /doc |"))
        .unwrap_or_else(|| panic!("no conflict for /doc in {listing:?}"));
    let id = line.split_whitespace().next().unwrap().to_string();
    let local = line
        .split(" | ")
        .find_map(|f| f.strip_prefix("local: "))
        .unwrap_or_else(|| panic!("{line}"));
    assert_eq!(std::fs::read(local).unwrap(), b"local edit", "{line}");
    assert_eq!(client_util::get(&other, "/doc"), b"server edit");

    assert_eq!(code(&m.cli(&["resolve", &id, "--keep", "sideways"])), 2);
    assert_eq!(code(&m.cli(&["resolve", "999999", "--keep", "local"])), 1);
    let o = m.cli(&["resolve", &id, "--keep", "local"]);
    assert_eq!(code(&o), 0, "{o:?}");
    let o = m.cli(&["reintegrate"]);
    assert_eq!(code(&o), 0, "{o:?}");
    assert_eq!(client_util::get(&other, "/doc"), b"local edit");
    assert_eq!(stdout(&m.cli(&["listconflicts"])).trim(), "");

    // Hoarding through the CLI.
    client_util::put(&other, "/h1", b"hoard me");
    let o = m.cli(&["hoard", "add", "/h1", "600"]);
    assert_eq!(code(&o), 0, "{o:?}");
    assert_eq!(stdout(&m.cli(&["hoard", "list"])).trim(), "/h1 600");
    let o = m.cli(&["hoard", "walk"]);
    assert_eq!(code(&o), 0, "{o:?}");
    assert!(stdout(&o).contains("objects: 1"), "{o:?}");
    assert_eq!(code(&m.cli(&["hoard", "add", "/h1", "0"])), 1);
    assert_eq!(code(&m.cli(&["hoard", "bogus"])), 2);
    let o = m.cli(&["hoard", "remove", "/h1"]);
    assert_eq!(code(&o), 0, "{o:?}");
    assert_eq!(stdout(&m.cli(&["hoard", "list"])).trim(), "");
}
