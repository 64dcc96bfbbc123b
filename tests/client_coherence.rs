//! Two clients on one server: what one changes, the other sees on its next
//! call, because the server broke its callbacks before acknowledging.

mod client_util;
mod common;

use client_util::*;
use coda::client::{FileType, Timespec};
use coda::Error;
use common::TempDir;

#[test]
fn second_client_reads_new_contents_after_first_closes_and_refetches_only_after_a_break() {
    let srv = start();
    let (da, db) = (TempDir::new("a"), TempDir::new("b"));
    let (a, b) = (client(&srv, da.path()), client(&srv, db.path()));

    put(&a, "/f", b"one");
    assert_eq!(get(&b, "/f"), b"one");
    let s0 = b.stats();
    assert_eq!(get(&b, "/f"), b"one");
    assert_eq!(
        b.stats().fetches,
        s0.fetches,
        "a second open under a callback fetches nothing"
    );

    put(&a, "/f", b"two, longer");
    let s1 = b.stats();
    assert!(
        s1.breaks_received > s0.breaks_received,
        "A's close returned only after B's break"
    );
    assert_eq!(get(&b, "/f"), b"two, longer");
    assert_eq!(
        b.stats().fetches,
        s1.fetches + 1,
        "refetched once, because of the break"
    );
    assert_eq!(get(&b, "/f"), b"two, longer");
    assert_eq!(
        b.stats().fetches,
        s1.fetches + 1,
        "and not again without a change"
    );
}

#[test]
fn creates_mkdirs_renames_and_removes_are_seen_by_the_other_client() {
    let srv = start();
    let (da, db) = (TempDir::new("a"), TempDir::new("b"));
    let (a, b) = (client(&srv, da.path()), client(&srv, db.path()));

    assert!(names(&b, "/").is_empty());
    a.mkdir("/d", 0o755).unwrap();
    assert_eq!(names(&b, "/"), vec!["d"]);
    assert_eq!(b.stat("/d").unwrap().ftype, FileType::Dir);
    assert!(matches!(b.stat("/d/x"), Err(Error::NotFound(_))));

    put(&a, "/d/x", b"hello");
    assert_eq!(names(&b, "/d"), vec!["x"]);
    assert_eq!(b.stat("/d/x").unwrap().size, 5);
    assert_eq!(get(&b, "/d/x"), b"hello");

    a.rename("/d/x", "/y").unwrap();
    assert!(matches!(b.stat("/d/x"), Err(Error::NotFound(_))));
    assert!(names(&b, "/d").is_empty());
    assert_eq!(names(&b, "/"), vec!["d", "y"]);
    assert_eq!(get(&b, "/y"), b"hello");

    // Rename over an existing file replaces it.
    put(&a, "/z", b"zzz");
    assert_eq!(get(&b, "/z"), b"zzz");
    a.rename("/y", "/z").unwrap();
    assert_eq!(get(&b, "/z"), b"hello");
    assert_eq!(names(&b, "/"), vec!["d", "z"]);

    a.unlink("/z").unwrap();
    assert!(matches!(b.stat("/z"), Err(Error::NotFound(_))));
    assert!(matches!(
        b.open("/z", libc::O_RDONLY, 0),
        Err(Error::NotFound(_))
    ));

    a.rmdir("/d").unwrap();
    assert!(names(&b, "/").is_empty());
    assert!(matches!(b.readdir("/d"), Err(Error::NotFound(_))));

    // And the other way round, with the first client's own cache updated locally.
    b.mkdir("/e", 0o700).unwrap();
    b.symlink("/e", "/link").unwrap();
    assert_eq!(names(&a, "/"), vec!["e", "link"]);
    assert_eq!(a.readlink("/link").unwrap(), "/e");
    assert_eq!(a.lstat("/link").unwrap().ftype, FileType::Symlink);
    assert_eq!(a.stat("/link").unwrap().mode, libc::S_IFDIR | 0o700);
    assert_eq!(names(&b, "/"), vec!["e", "link"]);
}

#[test]
fn append_trunc_truncate_chmod_and_utimes_are_visible_to_the_other_client() {
    let srv = start();
    let (da, db) = (TempDir::new("a"), TempDir::new("b"));
    let (a, b) = (client(&srv, da.path()), client(&srv, db.path()));

    put(&a, "/f", b"hello");
    assert_eq!(get(&b, "/f"), b"hello");

    let mut f = a.open("/f", libc::O_WRONLY | libc::O_APPEND, 0).unwrap();
    f.write_at(b" world", 0).unwrap();
    f.close().unwrap();
    assert_eq!(get(&b, "/f"), b"hello world");

    let mut f = a.open("/f", libc::O_RDWR | libc::O_TRUNC, 0).unwrap();
    assert_eq!(read_file(&f), b"", "O_TRUNC empties the file at open");
    f.write_at(b"x", 0).unwrap();
    f.close().unwrap();
    assert_eq!(get(&b, "/f"), b"x");

    a.truncate("/f", 3).unwrap();
    assert_eq!(b.stat("/f").unwrap().size, 3);
    assert_eq!(get(&b, "/f"), b"x\0\0");
    assert_eq!(
        get(&a, "/f"),
        b"x\0\0",
        "the writer's own container was cut too"
    );

    a.chmod("/f", 0o600).unwrap();
    assert_eq!(b.stat("/f").unwrap().mode, libc::S_IFREG | 0o600);

    let t = Timespec {
        sec: 1_000_000_000,
        nsec: 123,
    };
    a.utimes("/f", t).unwrap();
    assert_eq!(b.stat("/f").unwrap().mtime, t);
    assert_eq!(a.stat("/f").unwrap().mtime, t);

    // Opening an O_TRUNC file and closing it unwritten still empties it everywhere.
    a.open("/f", libc::O_WRONLY | libc::O_TRUNC, 0)
        .unwrap()
        .close()
        .unwrap();
    assert_eq!(b.stat("/f").unwrap().size, 0);
}

/// The mount's invalidation subscriber may wait (bounded) for the kernel,
/// and the kernel for a request of the mount that waits for a reply: while
/// the subscriber of a server's break runs, the client's other calls must
/// still get their replies, or the two wait for each other until the
/// subscriber gives up and the server, its break unacknowledged, ends the
/// session.
#[test]
fn replies_keep_arriving_while_the_invalidation_subscriber_of_a_break_waits() {
    use std::sync::mpsc;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    let srv = start();
    let (da, db) = (TempDir::new("a"), TempDir::new("b"));
    let (a, b) = (client(&srv, da.path()), client(&srv, db.path()));
    put(&a, "/f", b"one");
    put(&a, "/g", b"g");
    assert_eq!(get(&b, "/f"), b"one", "b holds a callback on /f");

    let (entered_tx, entered_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (entered_tx, go_rx) = (Mutex::new(entered_tx), Mutex::new(go_rx));
    // Whether the subscriber was let go (true) or gave up waiting (false).
    let outcome: Arc<Mutex<Option<bool>>> = Arc::default();
    let out2 = outcome.clone();
    b.set_invalidation_hook(Some(Arc::new(move |inv: &coda::client::Invalidation| {
        if let coda::client::Invalidation::Fids {
            from_server: true, ..
        } = inv
        {
            let _ = entered_tx.lock().unwrap().send(());
            let let_go = go_rx
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(10))
                .is_ok();
            out2.lock().unwrap().get_or_insert(let_go);
        }
    })));
    let b_breaks = b.stats().breaks_received;
    let writer = std::thread::spawn(move || {
        put(&a, "/f", b"two");
        a
    });
    entered_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("a's store breaks b's callback on /f");
    // A round trip of b's (it never asked for /g's status) while its
    // subscriber still waits for the kernel.
    let t = Instant::now();
    assert_eq!(b.stat("/g").expect("stat /g").size, 1);
    let took = t.elapsed();
    go_tx.send(()).unwrap();
    let a = writer.join().expect("a's store returns");
    assert_eq!(
        *outcome.lock().unwrap(),
        Some(true),
        "b's stat waited for its subscriber ({took:?}): the reply was not delivered meanwhile"
    );
    b.set_invalidation_hook(None);
    assert!(b.stats().breaks_received > b_breaks);
    assert_eq!(get(&b, "/f"), b"two");
    put(&a, "/f", b"three");
    assert_eq!(get(&b, "/f"), b"three", "the session survived the wait");
}

/// A status change of a file whose callback another client's store broke
/// (the new contents not read here yet) keeps the cached contents only as
/// the old version's: the status change's new version is the server's
/// contents, not these.
#[test]
fn a_chmod_or_truncate_after_a_break_does_not_relabel_the_old_contents_as_current() {
    let srv = start();
    let (da, db) = (TempDir::new("a"), TempDir::new("b"));
    let (a, b) = (client(&srv, da.path()), client(&srv, db.path()));
    put(&a, "/f", b"one");
    put(&a, "/g", b"first");
    assert_eq!(get(&b, "/f"), b"one");
    assert_eq!(get(&b, "/g"), b"first");
    put(&a, "/f", b"two");
    put(&a, "/g", b"second");
    // b heard of both stores (a's closes waited for b's acks), read neither.
    b.chmod("/f", 0o600).unwrap();
    assert_eq!(get(&b, "/f"), b"two", "after chmod");
    b.truncate("/g", 3).unwrap();
    assert_eq!(get(&b, "/g"), b"sec", "after truncate");
    assert_eq!(get(&a, "/g"), b"sec");
}
