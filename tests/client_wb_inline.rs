//! In write-back (and disconnected) mode a store of at most 64 KiB is
//! logged with its bytes inside the record (CLIENT.md "Inline data in the
//! log"): the record's one durable commit is the data's durable copy and
//! the container, the cache's working copy, is not fsynced. So whatever
//! happens to the container afterwards (a power cut that loses it, later
//! writes), the record decides what reaches the server, what a conflict
//! preserves and what a restart puts back in the cache.

//!
//! A new file's Create is logged without a sync of its own: it becomes
//! durable with the file's first close or fsync (its first store's commit,
//! or a sync of the log when it stores nothing), so a small file's create,
//! write and close cost one log commit. The killed client runs in a child
//! process: this test binary again, with `CODA_WBI_CHILD` set.

mod client_util;
mod common;
mod disco_util;

use std::io::{BufRead, BufReader};

use client_util::*;
use coda::client::{Client, ClientState, Keep};
use common::{child_test, KillOnDrop, TempDir, TestServer};

/// Long enough that nothing is sent by itself while a test looks.
const NEVER_MS: &str = "600000";

fn write_back_client(srv: &TestServer, dir: &std::path::Path) -> Client {
    let mut cfg = config(srv, dir);
    cfg.set("write_back_ms", NEVER_MS).unwrap();
    Client::new(cfg).expect("client connects")
}

fn container(cache: &std::path::Path, c: &Client, path: &str) -> std::path::PathBuf {
    cache
        .join("containers")
        .join(c.stat(path).unwrap().fid.to_string())
}

/// A client stopped with small stores in its log, whose containers then
/// lose their data (what a power cut does to files never fsynced), starts
/// again on the same cache: the records carry the bytes, so the server gets
/// them intact and the cache serves them again. Before, such a store was
/// sent from its container, and an emptied container made it a conflict.
#[test]
fn small_write_back_stores_survive_the_loss_of_their_containers() {
    let mut srv = start();
    let cache = TempDir::new("wbi-lost");
    let sizes = [1usize, 4096, 65536];
    let data = |i: usize| -> Vec<u8> { (0..sizes[i]).map(|k| (k * 31 + i) as u8).collect() };
    let mut paths = Vec::new();
    {
        let a = write_back_client(&srv, cache.path());
        a.mkdir("/lost", 0o755).unwrap();
        for i in 0..sizes.len() {
            let p = format!("/lost/f{i}");
            put(&a, &p, &data(i));
            paths.push((p.clone(), container(cache.path(), &a, &p)));
        }
        assert_eq!(
            a.pending_records(),
            1 + 2 * sizes.len(),
            "mkdir, creates, stores"
        );
        // Dropped without sending (write-back with a long delay).
    }
    for (_, c) in &paths {
        std::fs::write(c, b"").unwrap();
    }
    std::fs::remove_file(&paths[0].1).unwrap();

    // Started with no server: the cache serves the logged bytes.
    srv.kill9();
    {
        let a = client(&srv, cache.path());
        assert_eq!(a.state(), ClientState::Disconnected);
        assert_eq!(a.pending_records(), 1 + 2 * sizes.len());
        for (i, (p, c)) in paths.iter().enumerate() {
            assert_eq!(
                std::fs::read(c).unwrap(),
                data(i),
                "container of {p} redone"
            );
            assert_eq!(get(&a, p), data(i), "{p} offline");
        }
    }
    srv.restart();
    let a = client(&srv, cache.path());
    assert_eq!(a.pending_records(), 0, "the log went at start");
    assert!(a.conflicts().unwrap().is_empty(), "nothing was lost");
    for (i, (p, c)) in paths.iter().enumerate() {
        assert_eq!(
            std::fs::read(c).unwrap(),
            data(i),
            "container of {p} redone"
        );
        assert_eq!(get(&a, p), data(i), "{p}");
    }
    let other = TempDir::new("wbi-lost-b");
    let b = client(&srv, other.path());
    for (i, (p, _)) in paths.iter().enumerate() {
        assert_eq!(get(&b, p), data(i), "{p} on the server");
    }
}

/// A write-back store over a file another client changed meanwhile is a
/// conflict; the local copy it preserves is the data the store logged,
/// even when the container was written again afterwards, and keeping the
/// local version puts exactly that data on the server.
#[test]
fn a_conflicting_inline_store_preserves_the_logged_bytes() {
    let srv = start();
    let (da, db) = (TempDir::new("wbi-a"), TempDir::new("wbi-b"));
    let b = client(&srv, db.path());
    put(&b, "/f", b"base");
    let a = write_back_client(&srv, da.path());
    assert_eq!(get(&a, "/f"), b"base");
    put(&a, "/f", b"logged by a");
    assert_eq!(a.pending_records(), 1);
    // Later, unstored writes to the working copy: not what was logged.
    std::fs::write(container(da.path(), &a, "/f"), b"scribbled over").unwrap();
    put(&b, "/f", b"changed by b");

    a.reintegrate_now().unwrap();
    assert_eq!(a.pending_records(), 0);
    let cs = a.conflicts().unwrap();
    assert_eq!(cs.len(), 1, "{cs:?}");
    assert_eq!(
        (cs[0].kind.as_str(), cs[0].op.as_str()),
        ("Conflict", "store")
    );
    let local = cs[0].local_copy.clone().expect("local copy kept");
    assert_eq!(std::fs::read(&local).unwrap(), b"logged by a");
    assert_eq!(get(&a, "/f"), b"changed by b");

    a.resolve_conflict(cs[0].id, Keep::Local).unwrap();
    assert!(a.conflicts().unwrap().is_empty());
    assert_eq!(get(&b, "/f"), b"logged by a");
    assert_eq!(get(&a, "/f"), b"logged by a");
    assert!(!local.exists(), "the copy goes with the conflict");
}

#[test]
fn child_creator() {
    if std::env::var("CODA_WBI_CHILD").is_err() {
        return; // only meaningful as the child of the test below
    }
    let mut cfg = disco_util::child_config();
    cfg.set("write_back_ms", NEVER_MS).unwrap();
    let c = Client::new(cfg).expect("client starts");
    c.mkdir("/e", 0o755).unwrap();
    put(&c, "/e/written", b"small");
    // Created, written and fsynced, still open when the process dies.
    let mut f = c
        .open("/e/synced", libc::O_WRONLY | libc::O_CREAT, 0o600)
        .unwrap();
    f.write_at(b"fsynced", 0).unwrap();
    f.sync().unwrap();
    // Created and closed without a write, last: no store, and no later
    // record's commit; the close syncs the log.
    c.open("/e/empty", libc::O_WRONLY | libc::O_CREAT, 0o640)
        .unwrap()
        .close()
        .unwrap();
    println!("acknowledged {}", c.pending_records());
    std::thread::sleep(std::time::Duration::from_secs(120));
    drop(f);
}

/// A write-back client killed with SIGKILL after a close or an fsync
/// returned keeps the file those made: written, empty, or still open.
#[test]
fn files_created_in_write_back_survive_a_kill_once_closed_or_fsynced() {
    let srv = start();
    let cache = TempDir::new("wbi-killed");
    let mut w = KillOnDrop(
        child_test("child_creator", "CODA_WBI_CHILD", &srv, cache.path())
            .spawn()
            .expect("spawn the creator"),
    );
    let mut said = Vec::new();
    for l in BufReader::new(w.0.stdout.take().unwrap()).lines() {
        let l = l.unwrap();
        let done = l.contains("acknowledged");
        said.push(l);
        if done {
            break;
        }
    }
    assert!(
        said.iter().any(|l| l.contains("acknowledged 6")),
        "mkdir, 3 creates, 2 stores logged: {said:?}"
    );
    w.0.kill().unwrap(); // SIGKILL: no clean shutdown
    w.0.wait().unwrap();
    drop(w);

    let a = client(&srv, cache.path());
    assert_eq!(a.pending_records(), 0, "the log went at start");
    assert!(a.conflicts().unwrap().is_empty());
    let other = TempDir::new("wbi-killed-b");
    let b = client(&srv, other.path());
    assert_eq!(names(&b, "/e"), vec!["empty", "synced", "written"]);
    assert_eq!(get(&b, "/e/written"), b"small");
    assert_eq!(get(&b, "/e/synced"), b"fsynced");
    let st = b.stat("/e/empty").unwrap();
    assert_eq!((st.size, st.mode & 0o777), (0, 0o640));
}

/// In write-back mode, a directory whose listing changed in the log (a file
/// created in it) has extended attributes the client never read: setting
/// or reading one asks the server for the list (the log changes none of
/// it) instead of failing with `Timeout` (ETIMEDOUT through the mount) for
/// want of a cached list.
#[test]
fn xattrs_of_a_directory_with_logged_changes_are_read_from_the_server() {
    use coda::client::XattrHow;
    let srv = start();
    let (da, db) = (TempDir::new("wbi-xa"), TempDir::new("wbi-xb"));
    let b = client(&srv, db.path());
    b.mkdir("/x", 0o755).unwrap();
    let x = b.stat("/x").unwrap().fid;
    b.setxattr_fid(x, "user.old", b"1", XattrHow::Set).unwrap();
    let a = write_back_client(&srv, da.path());
    put(&a, "/x/f", b"f");
    assert_eq!(a.pending_records(), 2);
    a.setxattr_fid(x, "user.new", b"2", XattrHow::Create)
        .unwrap();
    let want = vec![
        ("user.new".to_string(), b"2".to_vec()),
        ("user.old".to_string(), b"1".to_vec()),
    ];
    assert_eq!(a.xattrs_fid(x).unwrap(), want);
    assert_eq!(a.getxattr_fid(x, "user.old").unwrap(), b"1");
    let e = a
        .setxattr_fid(x, "user.old", b"again", XattrHow::Create)
        .unwrap_err();
    assert!(matches!(e, coda::Error::Exists(_)), "{e}");
    a.reintegrate_now().unwrap();
    assert_eq!(a.pending_records(), 0);
    assert_eq!(b.xattrs_fid(x).unwrap(), want);
}

#[test]
fn child_exiter() {
    if std::env::var("CODA_WBI_EXIT_CHILD").is_err() {
        return; // only meaningful as the child of the test below
    }
    let c = Client::new(disco_util::child_config()).expect("client starts");
    c.mkdir("/made", 0o755).unwrap();
    put(&c, "/made/f", b"connected");
    // An open file keeps the client's insides alive past the last handle,
    // as a thread of the client holding it for a turn does.
    let f = c.open("/made/f", libc::O_RDONLY, 0).unwrap();
    drop(c);
    println!("dropped");
    std::mem::forget(f);
    std::process::exit(0);
}

/// The index's commits are not synced one by one (redb keeps such a commit
/// in memory until a synced one follows). The last `Client` handle makes
/// them durable when it is dropped, even while the client lives on
/// (an open file, or its prober holding it for a turn) and the process then
/// exits: a client started on that cache with no server still finds what
/// the first one made. Before, this depended on which thread dropped the
/// client last (`disco_crash` failed now and then: NotFound for a
/// directory the connected run had made).
#[test]
fn dropping_the_last_client_handle_makes_the_index_durable_before_the_process_exits() {
    let mut srv = start();
    let cache = TempDir::new("wbi-exit");
    let out = child_test("child_exiter", "CODA_WBI_EXIT_CHILD", &srv, cache.path())
        .output()
        .expect("run the child");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && said.contains("dropped"), "{said}");
    srv.kill9();
    let a = client(&srv, cache.path());
    assert_eq!(a.state(), ClientState::Disconnected);
    assert_eq!(names(&a, "/made"), vec!["f"]);
    assert_eq!(get(&a, "/made/f"), b"connected");
}
