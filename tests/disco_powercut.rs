//! The power-cut test of disconnected operation: the client's cache lives on
//! a loop-mounted ext4; a client process writes a file while the server is
//! stopped (SIGSTOP: the connected close keeps its record when no answer
//! comes), then, disconnected, makes 20 offline writes (10 overwrite files
//! the server has, 10 create new ones), each close() returning 0. Then the power is "cut": the loop's backing
//! file is copied while still mounted (the copy keeps only what reached the
//! disk), the client is killed with SIGKILL, and the copy is mounted as the
//! cache of a new client. Once the server is back and the log reintegrated,
//! every one of the 21 writes must be intact on the server or kept as a
//! conflict with its data: never an empty or truncated file over the
//! server's copy.
//!
//! Needs root, `losetup`, `mkfs.ext4`, `mount`/`umount` and `e2fsck`: when
//! missing the test fails naming them, unless `CODA_SKIP` contains
//! "powercut" (then it says it skipped). The client runs in a child process:
//! this test binary again, with `CODA_POWERCUT_CHILD` set.

mod client_util;
mod common;
mod disco_util;
mod powercut_util;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use client_util::*;
use coda::client::{Client, ClientState};
use common::{TempDir, TestServer};
use powercut_util::{make_image, may_run, run, LoopMount};

const FILES: usize = 10;

fn server_copy(i: usize) -> Vec<u8> {
    format!("server copy of old{i}\n").repeat(50).into_bytes()
}

/// Offline contents: several pages, so a lost or partial write shows.
fn offline_copy(name: &str) -> Vec<u8> {
    format!("offline write of {name}, line\n")
        .repeat(400)
        .into_bytes()
}

/// A client child process, SIGKILLed on drop if still running.
struct ChildClient {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl ChildClient {
    fn spawn(srv: &TestServer, cache: &Path, phase: &str) -> ChildClient {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_client", "--nocapture", "--test-threads=1"])
            .env("CODA_POWERCUT_CHILD", phase)
            .env("CODA_SERVER", srv.addr().to_string())
            .env("CODA_CACHE", cache)
            .env("CODA_SECRET", srv.secret_file())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the client process");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        ChildClient { child, lines }
    }

    /// Read lines until one equals `want` (panics if the child ends first).
    fn wait_for(&mut self, want: &str) -> Vec<String> {
        let mut seen = Vec::new();
        for l in self.lines.by_ref() {
            let l = l.unwrap();
            let done = l.ends_with(want);
            seen.push(l);
            if done {
                return seen;
            }
        }
        panic!("the client process ended before {want:?}: {seen:?}");
    }

    fn finish(mut self) -> Vec<String> {
        let seen = self.wait_for("finished");
        assert!(self.child.wait().unwrap().success(), "{seen:?}");
        seen
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildClient {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// What the child said (its lines marked "@@ ", after libtest's own output).
fn said(lines: &[String]) -> impl Iterator<Item = &str> {
    lines
        .iter()
        .filter_map(|l| l.split_once("@@ ").map(|(_, x)| x))
}

/// The client process of the test below, one phase per run.
#[test]
fn child_client() {
    let Ok(phase) = std::env::var("CODA_POWERCUT_CHILD") else {
        return; // only meaningful as the child of the test below
    };
    let c = Client::new(disco_util::child_config()).expect("client starts");
    match phase.as_str() {
        "setup" => {
            c.mkdir("/p", 0o755).unwrap();
            for i in 0..FILES {
                put(&c, &format!("/p/old{i}"), &server_copy(i));
                assert_eq!(get(&c, &format!("/p/old{i}")), server_copy(i));
            }
            put(&c, "/p/old-kept", &server_copy(FILES));
        }
        "offline" => {
            // Connected; the test stops the server (SIGSTOP), then a close
            // whose server never answers keeps its record and returns 0.
            assert_eq!(c.state(), ClientState::Connected);
            println!("@@ ready");
            let mut l = String::new();
            std::io::stdin().read_line(&mut l).unwrap();
            put(&c, "/p/old-kept", &offline_copy("old-kept"));
            println!("@@ closed /p/old-kept");
            assert_eq!(c.state(), ClientState::Disconnected);
            for i in 0..FILES {
                let name = format!("old{i}");
                put(&c, &format!("/p/{name}"), &offline_copy(&name));
                println!("@@ closed /p/{name}");
                let name = format!("new{i}");
                put(&c, &format!("/p/{name}"), &offline_copy(&name));
                println!("@@ closed /p/{name}");
            }
            println!("pending {}", c.pending_records());
            println!("written");
            // Stay alive, holding the cache, until the power is cut.
            let mut l = String::new();
            let _ = std::io::stdin().read_line(&mut l);
            std::process::exit(0);
        }
        "reintegrate" => {
            disco_util::wait_reintegrated(&c);
            for x in c.conflicts().unwrap() {
                let data = x
                    .local_copy
                    .as_ref()
                    .map(|p| std::fs::read(p).unwrap_or_default());
                println!(
                    "@@ conflict {} {} {} {}",
                    x.path,
                    x.kind,
                    x.reason.replace(' ', "_"),
                    match data {
                        Some(d) if d == offline_copy(x.path.rsplit('/').next().unwrap()) =>
                            "data-intact".to_string(),
                        Some(d) => format!("data-bad-{}-bytes", d.len()),
                        None => "no-data".to_string(),
                    }
                );
            }
        }
        p => panic!("unknown phase {p}"),
    }
    drop(c);
    println!("finished");
}

#[test]
fn offline_writes_acknowledged_before_a_power_cut_reach_the_server_intact() {
    if std::env::var("CODA_POWERCUT_CHILD").is_ok() {
        return;
    }
    if !may_run("the power-cut test") {
        return;
    }
    let work = TempDir::new("powercut");
    let image = work.path().join("cache.img");
    let copy = work.path().join("cache-after-power-cut.img");
    make_image(&image);
    let mnt = work.path().join("mnt");
    let mut srv = TestServer::start();
    let mut disk = LoopMount::attach(&image, &mnt);
    let cache = mnt.join("cache");

    // Connected: the files exist on the server and are cached.
    ChildClient::spawn(&srv, &cache, "setup").finish();
    // What the cache held before the offline writes is on disk (the test
    // is about the writes made after this point).
    unsafe { libc::sync() };

    let mut writer = ChildClient::spawn(&srv, &cache, "offline");
    writer.wait_for("@@ ready");
    srv.sigstop();
    writeln!(writer.child.stdin.as_mut().unwrap(), "go").unwrap();
    let seen = writer.wait_for("written");
    let closed = said(&seen).filter(|l| l.starts_with("closed ")).count();
    assert_eq!(closed, 2 * FILES + 1, "{seen:?}");
    srv.kill9();

    // The power cut: only what reached the disk is in the copy.
    run(Command::new("cp")
        .arg("--sparse=always")
        .arg(&image)
        .arg(&copy));
    writer.kill9();
    disk.detach();
    drop(disk);

    // The machine comes back with the copy as its disk.
    let disk = LoopMount::attach(&copy, &mnt);
    srv.restart();
    let lines = ChildClient::spawn(&srv, &cache, "reintegrate").finish();
    let conflicts: Vec<&str> = said(&lines)
        .filter(|l| l.starts_with("conflict "))
        .collect();

    // Read back by a fresh client.
    let fresh_dir = TempDir::new("powercut-fresh");
    let fresh = client(&srv, fresh_dir.path());
    let mut bad = Vec::new();
    let mut intact = 0;
    let writes = (0..FILES)
        .flat_map(|i| {
            [
                (format!("old{i}"), Some(server_copy(i))),
                (format!("new{i}"), None),
            ]
        })
        .chain([("old-kept".to_string(), Some(server_copy(FILES)))]);
    {
        for (name, before) in writes {
            let path = format!("/p/{name}");
            let want = offline_copy(&name);
            let got = match fresh.stat(&path) {
                Ok(_) => Some(get(&fresh, &path)),
                Err(coda::Error::NotFound(_)) => None,
                Err(e) => panic!("stat {path}: {e}"),
            };
            if got.as_deref() == Some(&want[..]) {
                intact += 1;
                continue;
            }
            // Not intact on the server: then it must be a conflict holding
            // the data, with the server's copy left as it was.
            let kept = conflicts
                .iter()
                .any(|l| l.contains(&format!(" {path} ")) && l.ends_with("data-intact"));
            let server_untouched = got.as_deref() == before.as_deref()
                || (before.is_none() && got.as_deref() == Some(&b""[..]) && kept);
            if !(kept && server_untouched) {
                bad.push(format!(
                    "{path}: server has {}, conflict kept with data: {kept}",
                    match &got {
                        None => "nothing".to_string(),
                        Some(d) if d.is_empty() => "an EMPTY file".to_string(),
                        Some(d) if before.as_deref() == Some(&d[..]) => "its old copy".to_string(),
                        Some(d) => format!("{} bytes that are not the write", d.len()),
                    }
                ));
            }
        }
    }
    drop(disk);
    assert!(
        bad.is_empty(),
        "{intact} of {} acknowledged writes intact; lost or damaged: {bad:#?}\nconflicts: {conflicts:#?}",
        2 * FILES + 1
    );
}

/// The window the fsync rule cannot close: a record logged by a connected
/// close whose server never answered, then a power cut before the container
/// reached the disk (close() had not returned). Simulated by cutting the
/// logged container short: reintegration must keep the server's copy and
/// report a conflict, not send the short file over it.
#[test]
fn a_logged_store_whose_container_lost_its_data_becomes_a_conflict() {
    if std::env::var("CODA_POWERCUT_CHILD").is_ok() {
        return;
    }
    let srv = TestServer::start();
    let cache = TempDir::new("lost-data");
    let mut cfg = config(&srv, cache.path());
    cfg.set("reintegration_age_ms", "600000").unwrap();
    let c = Client::new(cfg).unwrap();
    let before = server_copy(1);
    put(&c, "/x", &before);
    c.set_write_disconnected(true);
    put(&c, "/x", &offline_copy("x"));
    assert_eq!(c.pending_records(), 1);
    let fid = c.stat("/x").unwrap().fid;
    let container = cache.path().join("containers").join(fid.to_string());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&container)
        .unwrap()
        .set_len(0)
        .unwrap();

    c.reintegrate_now().unwrap();
    assert_eq!(c.pending_records(), 0);
    let conflicts = c.conflicts().unwrap();
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    assert!(
        conflicts[0].reason.contains("data lost locally"),
        "{conflicts:?}"
    );
    let fresh_dir = TempDir::new("lost-data-fresh");
    let fresh = client(&srv, fresh_dir.path());
    assert_eq!(get(&fresh, "/x"), before, "the server's copy is kept");
}
