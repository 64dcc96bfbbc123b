//! The cache index is written without an fsync (CLIENT.md "Cache
//! layout"): a client killed with SIGKILL loses index commits, never an
//! acknowledged change. The server's commit is the durable copy of a
//! connected change, and a restarted client revalidates what its index
//! says against the server.
//!
//! The client runs in a child process: this test binary again, with
//! `CODA_CRASH_CHILD` set, running the `child_writer` test.

mod client_util;
mod common;

use std::io::{BufRead, BufReader};

use client_util::*;
use common::{child_test, KillOnDrop, TempDir, TestServer};

const FILES: usize = 300;

fn first(i: usize) -> Vec<u8> {
    format!("first {i}").into_bytes()
}

/// The second contents differ in length from the first for odd `i` only:
/// a container whose index row went back to the first version must not
/// pass for it because its size happens to match.
fn second(i: usize) -> Vec<u8> {
    if i % 2 == 0 {
        format!("secnd {i}").into_bytes()
    } else {
        format!("second version {i}").into_bytes()
    }
}

#[test]
fn child_writer() {
    if std::env::var("CODA_CRASH_CHILD").is_err() {
        return; // only meaningful as the child of the test below
    }
    let c = coda::client::Client::new(disco_util_config()).expect("client starts");
    c.mkdir("/big", 0o755).unwrap();
    c.mkdir("/gone", 0o755).unwrap();
    for i in 0..FILES {
        put(&c, &format!("/big/f{i}"), &first(i));
    }
    for i in 0..FILES {
        put(&c, &format!("/big/f{i}"), &second(i));
    }
    for i in 0..FILES / 3 {
        c.unlink(&format!("/big/f{i}")).unwrap();
    }
    c.rmdir("/gone").unwrap();
    // Everything above was acknowledged; now die without a clean shutdown.
    println!("acknowledged");
    std::thread::sleep(std::time::Duration::from_secs(120));
}

fn disco_util_config() -> coda::client::Config {
    let v = |k: &str| std::env::var(k).unwrap();
    let mut cfg = coda::client::Config::new();
    cfg.set("servers", &v("CODA_SERVER")).unwrap();
    cfg.set("cache_dir", &v("CODA_CACHE")).unwrap();
    cfg.set("secret_file", &v("CODA_SECRET")).unwrap();
    cfg.set("rpc_timeout_ms", "5000").unwrap();
    cfg
}

#[test]
fn a_client_killed_after_connected_changes_restarts_and_shows_every_acknowledged_one() {
    let srv = TestServer::start();
    let cache = TempDir::new("crash-cache");
    let mut w = KillOnDrop(
        child_test("child_writer", "CODA_CRASH_CHILD", &srv, cache.path())
            .spawn()
            .expect("spawn the writer"),
    );
    let out = BufReader::new(w.0.stdout.take().unwrap());
    let mut said = Vec::new();
    for l in out.lines() {
        let l = l.unwrap();
        let done = l.ends_with("acknowledged");
        said.push(l);
        if done {
            break;
        }
    }
    assert!(
        said.iter().any(|l| l.ends_with("acknowledged")),
        "the writer ended early: {said:?}"
    );
    w.0.kill().unwrap(); // SIGKILL: no clean shutdown, no index flush
    w.0.wait().unwrap();
    drop(w);

    // The same cache directory, restarted: the index opens (redb rolls it
    // back to its last durable commit) and revalidation corrects the rest.
    let c = client(&srv, cache.path());
    let mut names: Vec<String> = c
        .readdir("/big")
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    names.sort();
    let mut want: Vec<String> = (FILES / 3..FILES).map(|i| format!("f{i}")).collect();
    want.sort();
    assert_eq!(names, want);
    for i in FILES / 3..FILES {
        assert_eq!(get(&c, &format!("/big/f{i}")), second(i), "/big/f{i}");
    }
    assert!(c.stat("/gone").is_err(), "the removed directory stays gone");
    assert!(c.stat("/big/f0").is_err(), "a removed file stays gone");
    // And it goes on working: a new change is acknowledged and seen by
    // another client.
    put(&c, "/big/after", b"after the crash");
    let other = TempDir::new("crash-other");
    let o = client(&srv, other.path());
    assert_eq!(get(&o, "/big/after"), b"after the crash");
    assert_eq!(o.readdir("/big").unwrap().len(), FILES - FILES / 3 + 1);
}

const THREADS: usize = 4;
const PER_THREAD: usize = 60;

fn par_data(t: usize, k: usize) -> Vec<u8> {
    format!("thread {t} file {k} ")
        .repeat(1 + k % 7)
        .into_bytes()
}

#[test]
fn child_parallel_writer() {
    if std::env::var("CODA_CRASH_CHILD").is_err() {
        return; // only meaningful as the child of the test below
    }
    let c = coda::client::Client::new(disco_util_config()).expect("client starts");
    c.mkdir("/par", 0o755).unwrap();
    let ts: Vec<_> = (0..THREADS)
        .map(|t| {
            let c = c.clone();
            std::thread::spawn(move || {
                for k in 0..PER_THREAD {
                    put(&c, &format!("/par/t{t}-f{k}"), &par_data(t, k));
                    // Said only once the create and the store returned.
                    println!("stored {t} {k}");
                }
            })
        })
        .collect();
    for t in ts {
        t.join().unwrap();
    }
    std::thread::sleep(std::time::Duration::from_secs(120));
}

/// Four threads of one client store small files at once (connected
/// records held in memory until acknowledged, `Cml::log_connected`); the
/// client is killed while they are at it, right after some returned.
/// Restarted, it shows every file whose store returned, whole, and files
/// it was still writing only as what the server committed (nothing, an
/// empty new file, or the whole contents).
#[test]
fn concurrent_stores_survive_a_kill_right_after_they_return() {
    let srv = TestServer::start();
    let cache = TempDir::new("crash-par-cache");
    let mut w = KillOnDrop(
        child_test(
            "child_parallel_writer",
            "CODA_CRASH_CHILD",
            &srv,
            cache.path(),
        )
        .spawn()
        .expect("spawn the writer"),
    );
    let out = BufReader::new(w.0.stdout.take().unwrap());
    let mut acked = Vec::new();
    for l in out.lines() {
        let l = l.unwrap();
        let mut it = l.split_whitespace();
        if it.next() != Some("stored") {
            continue;
        }
        let t: usize = it.next().unwrap().parse().unwrap();
        let k: usize = it.next().unwrap().parse().unwrap();
        acked.push((t, k));
        // Mid-run: the other threads are between create and store, or
        // waiting for their batch.
        if acked.len() == THREADS * PER_THREAD / 2 {
            break;
        }
    }
    assert_eq!(
        acked.len(),
        THREADS * PER_THREAD / 2,
        "the writer ended early"
    );
    w.0.kill().unwrap(); // SIGKILL right after those returned
    w.0.wait().unwrap();
    drop(w);

    let c = client(&srv, cache.path());
    let other = TempDir::new("crash-par-other");
    let o = client(&srv, other.path());
    for (t, k) in &acked {
        let name = format!("/par/t{t}-f{k}");
        assert_eq!(
            get(&c, &name),
            par_data(*t, *k),
            "{name} (restarted client)"
        );
        assert_eq!(get(&o, &name), par_data(*t, *k), "{name} (another client)");
    }
    for e in c.readdir("/par").unwrap() {
        let (t, k) = e.name[1..]
            .split_once("-f")
            .map(|(t, k)| (t.parse::<usize>().unwrap(), k.parse::<usize>().unwrap()))
            .unwrap();
        let got = get(&o, &format!("/par/{}", e.name));
        assert!(
            got.is_empty() || got == par_data(t, k),
            "{}: {} bytes, neither empty nor whole",
            e.name,
            got.len()
        );
    }
    // And the restarted client goes on storing.
    put(&c, "/par/after", b"after the crash");
    assert_eq!(get(&o, "/par/after"), b"after the crash");
}
