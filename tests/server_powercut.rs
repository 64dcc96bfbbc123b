//! The server's power cut: its data directory lives on a loop-mounted ext4.
//! A client uploads files (`Uploaded` no longer means the bytes are on
//! disk: the staged file is not fsynced) and stores them in batches; once
//! every batch is acknowledged the power is "cut": the loop's backing file
//! is copied while still mounted (the copy keeps only what reached the
//! disk) and the server is killed with SIGKILL. The server restarted on the
//! copy must serve every acknowledged file whole: the batch commit fsyncs
//! the data of the files it stores before it acknowledges, also the data
//! carried inline by `CreateWith` records (every other batch).
//!
//! Needs root, `losetup`, `mkfs.ext4`, `mount`/`umount` and `e2fsck`: when
//! missing the test fails naming them, unless `CODA_SKIP` contains
//! "powercut" (then it says it skipped).

mod common;
mod powercut_util;

use std::process::Command;

use coda::proto::Msg;
use common::raw::{rec, Raw};
use common::{TempDir, TestServer};
use powercut_util::{make_image, may_run, run, LoopMount};

const W: [u8; 16] = [0x5e; 16];
/// Files stored in one batch, and batches.
const PER_BATCH: usize = 4;
const BATCHES: usize = 5;

/// Contents of file `i`: several pages, distinct per file, so a lost,
/// zeroed or truncated file shows.
fn data_for(i: usize) -> Vec<u8> {
    format!("file {i} stored before the power cut, line\n")
        .repeat(200 + 37 * i)
        .into_bytes()
}

/// Move the (killed) server's data directory onto a loop file system of
/// `image`: made by `init`, copied in, the loop mounted over it, synced
/// (what init made is on disk: the tests are about what follows), and the
/// server started again on it.
fn onto_image(srv: &mut TestServer, image: &std::path::Path, work: &std::path::Path) -> LoopMount {
    srv.kill9();
    let root = srv.root();
    let staging = work.join("mnt");
    let mut disk = LoopMount::attach(image, &staging);
    run(Command::new("cp")
        .arg("-a")
        .arg(root.join("."))
        .arg(&staging));
    disk.detach();
    drop(disk);
    let disk = LoopMount::attach(image, &root);
    unsafe { libc::sync() };
    srv.restart();
    disk
}

#[test]
fn stored_files_acknowledged_before_a_power_cut_survive_it_whole() {
    if !may_run("the server power-cut test") {
        return;
    }
    let work = TempDir::new("srv-powercut");
    let image = work.path().join("server.img");
    let copy = work.path().join("server-after-power-cut.img");
    make_image(&image);

    // The server's data directory moves onto the loop file system: made
    // by `init`, copied in, and the loop mounted over it.
    let mut srv = TestServer::start();
    let mut disk = onto_image(&mut srv, &image, work.path());
    let root = srv.root();

    let mut c = Raw::control(srv.addr(), &srv.secret_file(), W, 1);
    let mut b = Raw::bulk(srv.addr(), &srv.secret_file(), W, 1);
    let fids = c.alloc((PER_BATCH * BATCHES) as u32);
    let root_fid = c.root;
    let mut store_id = 0;
    for batch in 0..BATCHES {
        let mut records = Vec::new();
        for k in 0..PER_BATCH {
            let i = batch * PER_BATCH + k;
            let data = data_for(i);
            if batch % 2 == 1 {
                // Created with its data inline (`CreateWith`): the commit
                // fsyncs the data file it wrote, as a staged upload's.
                assert!(data.len() <= coda::proto::MAX_INLINE);
                store_id += 1;
                records.push(coda::proto::Record {
                    store_id,
                    op: coda::proto::RecordOp::CreateWith {
                        parent: root_fid,
                        name: format!("f{i}"),
                        fid: fids[i],
                        mode: 0o644,
                        mtime: rec::t(),
                        uid: 0,
                        gid: 0,
                        data,
                    },
                });
                continue;
            }
            let upload_id = i as u64 + 1;
            assert!(
                matches!(b.upload(upload_id, &data), Msg::Uploaded { .. }),
                "upload {i}"
            );
            store_id += 1;
            records.push(rec::create(store_id, root_fid, &format!("f{i}"), fids[i]));
            store_id += 1;
            records.push(rec::store(
                store_id,
                fids[i],
                0,
                upload_id,
                data.len() as u64,
            ));
        }
        assert!(
            matches!(c.reintegrate(records), Msg::Reintegrated { .. }),
            "batch {batch} acknowledged"
        );
    }

    // The power cut: only what reached the disk is in the copy.
    run(Command::new("cp")
        .arg("--sparse=always")
        .arg(&image)
        .arg(&copy));
    drop(c);
    drop(b);
    srv.kill9();
    disk.detach();
    drop(disk);

    // The machine comes back with the copy as its disk.
    let _disk = LoopMount::attach(&copy, &root);
    srv.restart();
    let mut c = Raw::control(srv.addr(), &srv.secret_file(), W, 2);
    let mut b = Raw::bulk(srv.addr(), &srv.secret_file(), W, 2);
    let names: std::collections::HashMap<String, _> = c.list(c.root).into_iter().collect();
    for (i, fid) in fids.iter().enumerate() {
        let name = format!("f{i}");
        assert_eq!(names.get(&name), Some(fid), "{name} after the power cut");
        let (attr, data) = b.fetch(*fid).expect("fetch after the power cut");
        let want = data_for(i);
        assert_eq!(attr.size, want.len() as u64, "{name}'s size");
        assert!(data == want, "{name}'s data after the power cut");
    }
    drop(c);
    drop(b);
    srv.kill9();
}

/// Small batches (inline data of at most 16 KiB, renames, removes) are
/// durable in the server's commit journal, and redb commits them without
/// a sync (docs/SERVER.md "Commit journal"): after a power cut the server
/// applies them again from the journal.
#[test]
fn small_batches_acknowledged_before_a_power_cut_come_back_from_the_journal() {
    if !may_run("the server power-cut test") {
        return;
    }
    let work = TempDir::new("srv-powercut-journal");
    let image = work.path().join("server.img");
    let copy = work.path().join("server-after-power-cut.img");
    make_image(&image);
    // No idle checkpoint before the cut: the journal alone has them.
    let mut srv = TestServer::start_env(&[], &[("CODA_SERVER_JOURNAL_IDLE_MS", "3600000")]);
    let mut disk = onto_image(&mut srv, &image, work.path());
    let root = srv.root();

    let mut c = Raw::control(srv.addr(), &srv.secret_file(), W, 3);
    let n = 30;
    let fids = c.alloc(n as u32);
    let root_fid = c.root;
    let small = |i: usize, round: usize| -> Vec<u8> {
        format!("small file {i}, round {round}\n")
            .repeat(20 + 13 * i)
            .into_bytes()
    };
    let mut store_id = 0;
    let mut next = || {
        store_id += 1;
        store_id
    };
    for (i, fid) in fids.iter().enumerate() {
        let data = small(i, 0);
        assert!(data.len() as u64 <= coda::server::SMALL_DATA_MAX);
        let r = coda::proto::Record {
            store_id: next(),
            op: coda::proto::RecordOp::CreateWith {
                parent: root_fid,
                name: format!("s{i}"),
                fid: *fid,
                mode: 0o644,
                mtime: rec::t(),
                uid: 0,
                gid: 0,
                data,
            },
        };
        assert!(matches!(c.reintegrate(vec![r]), Msg::Reintegrated { .. }));
    }
    // Stores over the first ten, renames of the next ten, removes of five.
    for (i, fid) in fids.iter().enumerate().take(10) {
        let r = coda::proto::Record {
            store_id: next(),
            op: coda::proto::RecordOp::StoreInline {
                fid: *fid,
                expected_version: 0,
                mtime: rec::t(),
                data: small(i, 1),
            },
        };
        assert!(matches!(c.reintegrate(vec![r]), Msg::Reintegrated { .. }));
    }
    for (i, fid) in fids.iter().enumerate().take(20).skip(10) {
        let (from, to) = (format!("s{i}"), format!("moved{i}"));
        let r = rec::rename(next(), root_fid, &from, root_fid, &to, *fid);
        assert!(matches!(c.reintegrate(vec![r]), Msg::Reintegrated { .. }));
    }
    for (i, fid) in fids.iter().enumerate().take(25).skip(20) {
        let r = rec::remove(next(), root_fid, &format!("s{i}"), *fid);
        assert!(matches!(c.reintegrate(vec![r]), Msg::Reintegrated { .. }));
    }

    run(Command::new("cp")
        .arg("--sparse=always")
        .arg(&image)
        .arg(&copy));
    drop(c);
    srv.kill9();
    disk.detach();
    drop(disk);

    let _disk = LoopMount::attach(&copy, &root);
    srv.restart();
    let mut c = Raw::control(srv.addr(), &srv.secret_file(), W, 4);
    let mut b = Raw::bulk(srv.addr(), &srv.secret_file(), W, 4);
    let names: std::collections::HashMap<String, _> = c.list(c.root).into_iter().collect();
    for (i, fid) in fids.iter().enumerate() {
        let (name, want) = match i {
            0..10 => (format!("s{i}"), Some(small(i, 1))),
            10..20 => (format!("moved{i}"), Some(small(i, 0))),
            20..25 => (format!("s{i}"), None),
            _ => (format!("s{i}"), Some(small(i, 0))),
        };
        let Some(want) = want else {
            assert_eq!(names.get(&name), None, "{name} was removed before the cut");
            continue;
        };
        assert_eq!(names.get(&name), Some(fid), "{name} after the power cut");
        let (attr, data) = b.fetch(*fid).expect("fetch after the power cut");
        assert_eq!(attr.size, want.len() as u64, "{name}'s size");
        assert!(data == want, "{name}'s data after the power cut");
    }
    assert_eq!(names.len(), n - 5, "nothing else: {names:?}");
    drop(c);
    drop(b);
    srv.kill9();
}
