//! Group commit: batches of many sessions that arrive together share one
//! durable commit, and each stays all-or-nothing on its own. A batch that
//! fails in the middle leaves nothing and fails no other batch; a kill -9
//! during a concurrent load loses no acknowledged batch and half-applies
//! none.
mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::io::Write;

use coda::error::WireCode;
use coda::proto::frame::encode_frame;
use coda::proto::{Fid, Msg, Record};
use common::raw::{rec, Raw};
use common::TestServer;

fn random_u64() -> u64 {
    u64::from_le_bytes(coda::proto::auth::random_bytes())
}

fn data_of(writer: usize, round: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|k| (k * 7 + writer * 31 + round * 13) as u8)
        .collect()
}

const WRITERS: usize = 8;
const ROUNDS: usize = 12;

#[test]
fn a_batch_failing_in_the_middle_leaves_nothing_and_the_others_commit_exactly() {
    // Writers ack breaks only between their own requests: a generous break
    // timeout keeps a slow machine from cutting one of them.
    let s = TestServer::start_with(&["--break-timeout-ms", "60000"]);
    let (addr, secret) = (s.addr(), s.secret_file());
    let handles: Vec<_> = (0..WRITERS)
        .map(|w| {
            let secret = secret.clone();
            std::thread::spawn(move || {
                let id = [0x10 + w as u8; 16];
                let mut c = Raw::control(addr, &secret, id, 1);
                let mut b = Raw::bulk(addr, &secret, id, 1);
                let fids = c.alloc(3 * ROUNDS as u32);
                let root = c.root;
                let mut good = Vec::new();
                let mut bad = Vec::new();
                let mut next_id = 1;
                for r in 0..ROUNDS {
                    let (f, g) = (fids[3 * r], fids[3 * r + 1]);
                    let data = data_of(w, r, 4096);
                    let up = r as u64 + 1;
                    assert!(matches!(b.upload(up, &data), Msg::Uploaded { .. }));
                    // Writer 0 sends every other batch with a last record
                    // that must fail (no such entry), after three writes.
                    let failing = w == 0 && r % 2 == 1;
                    let (fname, gname) = if failing {
                        (format!("bad_f{r}"), format!("bad_g{r}"))
                    } else {
                        (format!("w{w}_f{r}"), format!("w{w}_g{r}"))
                    };
                    let mut records = vec![
                        rec::create(next_id, root, &fname, f),
                        rec::store(next_id + 1, f, 0, up, data.len() as u64),
                        rec::create(next_id + 2, root, &gname, g),
                    ];
                    if failing {
                        records.push(rec::remove(next_id + 3, root, "ghost", fids[3 * r + 2]));
                    }
                    match c.try_reintegrate(records).expect("server answers") {
                        Msg::Reintegrated { results } if !failing => {
                            assert_eq!(results.len(), 3);
                            assert_eq!(results[1].size, 4096);
                            next_id += 3;
                            good.push((fname, gname, f, g, data));
                        }
                        Msg::Error { code, index, .. } if failing => {
                            assert_eq!((code, index), (WireCode::NotFound, 3));
                            // It took nothing: its store ids, fids and
                            // staged upload serve a corrected batch (under
                            // other names, so the bad ones can be checked
                            // absent at the end).
                            let (rf, rg) = (format!("retry_f{r}"), format!("retry_g{r}"));
                            let records = vec![
                                rec::create(next_id, root, &rf, f),
                                rec::store(next_id + 1, f, 0, up, data.len() as u64),
                                rec::create(next_id + 2, root, &rg, g),
                            ];
                            let m = c.try_reintegrate(records).expect("server answers");
                            assert!(matches!(m, Msg::Reintegrated { .. }), "retry: {m:?}");
                            next_id += 3;
                            bad.push((fname, gname));
                            good.push((rf, rg, f, g, data));
                        }
                        m => panic!("writer {w} round {r}: {m:?}"),
                    }
                }
                // Closed at once: a finished writer that kept its session
                // would hold callbacks it no longer acknowledges.
                drop((c, b));
                (w, good, bad)
            })
        })
        .collect();
    let results: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("writer"))
        .collect();

    let mut c = Raw::control(addr, &secret, [0x99; 16], 1);
    let mut b = Raw::bulk(addr, &secret, [0x99; 16], 1);
    let names: HashMap<String, Fid> = c.list(c.root).into_iter().collect();
    let mut expected = HashSet::new();
    for (w, good, bad) in &results {
        assert_eq!(good.len(), ROUNDS);
        assert_eq!(bad.len(), if *w == 0 { ROUNDS / 2 } else { 0 });
        for (fname, gname, f, g, data) in good {
            assert_eq!(names.get(fname), Some(f), "{fname} committed");
            assert_eq!(names.get(gname), Some(g), "{gname} committed");
            let (attr, got) = b.fetch(*f).expect("fetch");
            assert_eq!(attr.size, 4096);
            assert!(got == *data, "{fname}: data intact");
            expected.insert(fname.clone());
            expected.insert(gname.clone());
        }
        for (fname, gname) in bad {
            assert!(!names.contains_key(fname) && !names.contains_key(gname));
        }
    }
    let all: HashSet<String> = names.keys().cloned().collect();
    assert_eq!(all, expected, "exactly the committed batches' names");
    // Nothing half-made is left, and 4 KiB stores keep their bytes in the
    // index (SERVER.md "Small files"): no object file at all.
    let files = std::fs::read_dir(s.root().join("objects/1"))
        .unwrap()
        .count();
    const { assert!(4096 <= coda::server::SMALL_DATA_MAX) };
    assert_eq!(files, 0);
}

struct Sent {
    f: String,
    g: String,
    f_fid: Fid,
    data: Vec<u8>,
}

const KILLS: u64 = 5;
const CRASH_WRITERS: usize = 4;
const PER_WRITER: usize = 200;

/// Send batches until the connection dies; returns how many were
/// acknowledged (each is recorded in `sent` before it goes out).
fn crash_writer(
    mut c: Raw,
    mut b: Raw,
    w: usize,
    iter: u64,
    fids: Vec<Fid>,
    sent: Arc<Mutex<Vec<Sent>>>,
) -> usize {
    let root = c.root;
    let mut acked = 0;
    for i in 0..PER_WRITER {
        let (f_fid, g_fid) = (fids[2 * i], fids[2 * i + 1]);
        let len = (random_u64() % (64 * 1024)) as usize >> (i % 6);
        let data = data_of(w, i + iter as usize, len);
        let upload_id = i as u64 + 1;
        let up = b
            .try_send(&common::raw::dense_upload(upload_id, data.len() as u64))
            .and_then(|_| b.send_bytes(&data));
        if up.is_err() || !matches!(b.recv(), Some((_, Msg::Uploaded { .. }))) {
            return acked;
        }
        let (f, g) = (format!("k{iter}_w{w}_f{i}"), format!("k{iter}_w{w}_g{i}"));
        let base = iter * 10_000 + i as u64 * 3 + 1;
        let records = vec![
            rec::create(base, root, &f, f_fid),
            rec::store(base + 1, f_fid, 0, upload_id, data.len() as u64),
            rec::create(base + 2, root, &g, g_fid),
        ];
        sent.lock().unwrap().push(Sent { f, g, f_fid, data });
        match c.try_reintegrate(records) {
            Some(Msg::Reintegrated { .. }) => acked = i + 1,
            Some(m) => panic!("writer {w} batch {i} refused: {m:?}"),
            None => return acked,
        }
    }
    acked
}

#[test]
fn kill9_during_concurrent_batches_loses_no_acknowledged_one_and_halves_none() {
    let mut s = TestServer::start_with(&["--break-timeout-ms", "60000"]);
    let mut total_acked = 0;
    // Every sent f's size: a small one has no object file.
    let mut sizes: HashMap<String, usize> = HashMap::new();
    for iter in 1..=KILLS {
        let mut threads = Vec::new();
        let mut logs = Vec::new();
        for w in 0..CRASH_WRITERS {
            let id = [0x40 + w as u8; 16];
            let mut c = Raw::control(s.addr(), &s.secret_file(), id, iter);
            let b = Raw::bulk(s.addr(), &s.secret_file(), id, iter);
            let fids = c.alloc(2 * PER_WRITER as u32);
            let sent = Arc::new(Mutex::new(Vec::new()));
            logs.push(Arc::clone(&sent));
            threads.push(std::thread::spawn(move || {
                crash_writer(c, b, w, iter, fids, sent)
            }));
        }
        std::thread::sleep(Duration::from_millis(50 + random_u64() % 400));
        s.kill9();
        let acked: Vec<usize> = threads
            .into_iter()
            .map(|t| t.join().expect("writer thread"))
            .collect();
        total_acked += acked.iter().sum::<usize>();
        s.restart();

        let mut c = Raw::control(s.addr(), &s.secret_file(), [0x98; 16], 100 + iter);
        let mut b = Raw::bulk(s.addr(), &s.secret_file(), [0x98; 16], 100 + iter);
        let names: HashMap<String, Fid> = c.list(c.root).into_iter().collect();
        for sent in &logs {
            for batch in sent.lock().unwrap().iter() {
                sizes.insert(batch.f.clone(), batch.data.len());
            }
        }
        for (w, sent) in logs.iter().enumerate() {
            for (i, batch) in sent.lock().unwrap().iter().enumerate() {
                let has_f = names.contains_key(&batch.f);
                assert_eq!(
                    has_f,
                    names.contains_key(&batch.g),
                    "kill {iter} writer {w} batch {i} half applied"
                );
                if i < acked[w] {
                    assert!(has_f, "kill {iter} writer {w}: acknowledged batch {i} lost");
                }
                if has_f {
                    assert_eq!(names[&batch.f], batch.f_fid);
                    let (attr, data) = b.fetch(batch.f_fid).expect("fetch after restart");
                    assert_eq!(attr.size, batch.data.len() as u64);
                    assert!(data == batch.data, "kill {iter} writer {w} batch {i}: data");
                }
            }
        }
        let staged = std::fs::read_dir(s.root().join("staging")).unwrap().count();
        assert_eq!(staged, 0, "staging is empty after a restart");
        let files = std::fs::read_dir(s.root().join("objects/1"))
            .unwrap()
            .count();
        // Only data past the small-file limit has an object file.
        let with_data = names
            .keys()
            .filter(|n| n.contains("_f") && sizes[*n] as u64 > coda::server::SMALL_DATA_MAX)
            .count();
        assert_eq!(
            files, with_data,
            "kill {iter}: unreferenced object files remain"
        );
    }
    eprintln!("{KILLS} kills, {total_acked} acknowledged batches, all intact");
}

/// Records in each of the pipelining client's batches: large (more than
/// the server's 64-record "small" bound), so each commits alone and gives
/// way to small batches.
const LARGE: u64 = 1000;

/// One client pipelines five large batches on one connection (without
/// waiting for replies) while three others keep committing one-record
/// batches. Every record of the large client expects the exact version
/// the one before it left, so any reordering or partial application
/// would be refused. Batch 3 fails at its last record and leaves nothing;
/// the others commit whole, in the order they were sent; and the large
/// batches commit while the small writers are still writing (the
/// starvation bound).
#[test]
fn pipelined_large_batches_beside_small_writers_commit_whole_in_order() {
    let s = TestServer::start_with(&["--break-timeout-ms", "60000"]);
    let (addr, secret) = (s.addr(), s.secret_file());

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Small writers that have committed one chmod: the large batches go
    // only once all three are writing (their TLS handshakes take a while
    // on a loaded machine).
    let writing = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let small: Vec<_> = (0..3u8)
        .map(|w| {
            let (secret, stop) = (secret.clone(), Arc::clone(&stop));
            let writing = Arc::clone(&writing);
            std::thread::spawn(move || {
                let mut c = Raw::control(addr, &secret, [0x71 + w; 16], 1);
                let g = c.alloc(1)[0];
                let root = c.root;
                c.apply(vec![rec::create(1, root, &format!("small{w}"), g)]);
                let mut n = 1u64;
                // Bounded by the large client: it sets `stop` when its
                // batches are answered (or the test fails on its deadline).
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    n += 1;
                    let m = c.try_reintegrate(vec![rec::chmod(n, g, 0, 0o600 | (n as u32 & 0o77))]);
                    assert!(
                        matches!(m, Some(Msg::Reintegrated { .. })),
                        "small {w}: {m:?}"
                    );
                    if n == 2 {
                        writing.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }
                n - 1
            })
        })
        .collect();

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while writing.load(std::sync::atomic::Ordering::SeqCst) < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the small writers did not start"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // The large client comes once they write (its create in the root is
    // the last change there, so no break waits on it before it reads).
    let mut l = Raw::control(addr, &secret, [0x70; 16], 1);
    let f = l.alloc(1)[0];
    let root = l.root;
    let v0 = l.apply(vec![rec::create(1, root, "large", f)])[0].version;

    // Batch b's record i expects version v0 + b*LARGE + i; batch 3's last
    // record expects a version that never comes. Batch 4 goes on from
    // where batch 2 left the file.
    let mut frames = Vec::new();
    let mut store = 1;
    for b in 0..5u64 {
        let base = v0 + b.min(3) * LARGE;
        let records: Vec<Record> = (0..LARGE)
            .map(|i| {
                store += 1;
                let expect = if b == 3 && i == LARGE - 1 {
                    1
                } else {
                    base + i
                };
                rec::chmod(store, f, expect, 0o600 | ((b * LARGE + i) as u32 & 0o77))
            })
            .collect();
        let m = Msg::Reintegrate { records };
        frames.push(encode_frame(m.kind(), 100 + b, &m.encode()));
    }
    for fr in &frames {
        l.stream.write_all(fr).unwrap();
    }
    let mut replies: HashMap<u64, Msg> = HashMap::new();
    // Bounded: each frame is a break, a reply, or the read times out.
    while replies.len() < frames.len() {
        match l.recv().expect("the large client's replies") {
            (bid, Msg::CallbackBreak { .. }) => {
                let ack = Msg::BreakAck;
                l.stream
                    .write_all(&encode_frame(ack.kind(), bid, &ack.encode()))
                    .unwrap();
            }
            (id, m) => {
                replies.insert(id, m);
            }
        }
    }
    let running = small.iter().all(|t| !t.is_finished());
    // Closed first: it acks no more breaks, and the small writers' last
    // batches would wait for it.
    drop(l);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let done: Vec<u64> = small.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(running, "the small writers were still writing");
    assert!(
        done.iter().all(|n| *n > 0),
        "every small writer committed: {done:?}"
    );

    for b in [0u64, 1, 2, 4] {
        match &replies[&(100 + b)] {
            Msg::Reintegrated { results } => {
                assert_eq!(results.len() as u64, LARGE);
                let from = v0 + b.min(3) * LARGE;
                assert_eq!(results[0].version, from + 1, "batch {b} in order");
                assert_eq!(results.last().unwrap().version, from + LARGE);
            }
            m => panic!("batch {b}: {m:?}"),
        }
    }
    match &replies[&103] {
        Msg::Error { code, index, .. } => {
            assert_eq!(*code, WireCode::Conflict);
            assert_eq!(*index as u64, LARGE - 1);
        }
        m => panic!("batch 3 must fail at its last record: {m:?}"),
    }
    let mut c = Raw::control(addr, &secret, [0x7f; 16], 1);
    let a = c.attr(f).unwrap();
    assert_eq!(
        a.version,
        v0 + 4 * LARGE,
        "batches 0, 1, 2 and 4 whole; 3 not at all"
    );
    assert_eq!(a.mode & 0o7777, 0o600 | ((5 * LARGE - 1) as u32 & 0o77));
}

/// Pipelined batches of one client on one connection, all written before
/// any answer: batch 1 creates `x` and then fails (a remove of a name that
/// does not exist); batches 2 and 3 are `ReintegrateAfter` their
/// predecessors and are refused `NotApplied`, applying nothing. No store id
/// of theirs counts as applied: the records sent again as one plain batch
/// all apply (were the watermark past them, they would be answered as
/// replays and silently dropped). A pipeline whose batches all apply
/// commits each, in order.
#[test]
fn a_pipelined_batch_after_a_failed_one_is_not_applied_and_its_records_go_again() {
    let s = TestServer::start();
    let mut c = Raw::control(s.addr(), &s.secret_file(), [0x5a; 16], 1);
    let root = c.root;
    let f = c.alloc(8);
    let ghost = Fid::new(1, 999_999, 1);
    let batches = [
        Msg::Reintegrate {
            records: vec![
                rec::create(1, root, "x", f[0]),
                rec::remove(2, root, "ghost", ghost),
            ],
        },
        Msg::ReintegrateAfter {
            after: 2,
            records: vec![rec::create(3, root, "y", f[1])],
        },
        Msg::ReintegrateAfter {
            after: 3,
            records: vec![rec::create(4, root, "z", f[2])],
        },
    ];
    let ids: Vec<u64> = batches.iter().map(|m| c.send(m)).collect();
    let mut replies: HashMap<u64, Msg> = HashMap::new();
    // Bounded: each frame is a reply (no other client holds callbacks).
    while replies.len() < ids.len() {
        let (id, m) = c.recv().expect("the replies");
        replies.insert(id, m);
    }
    match &replies[&ids[0]] {
        Msg::Error { code, index, .. } => assert_eq!((*code, *index), (WireCode::NotFound, 1)),
        m => panic!("batch 1: {m:?}"),
    }
    for id in &ids[1..] {
        match &replies[id] {
            Msg::Error { code, index, .. } => {
                assert_eq!((*code, *index), (WireCode::NotApplied, u32::MAX))
            }
            m => panic!("a successor of the failed batch: {m:?}"),
        }
    }
    assert!(c.list(root).is_empty(), "nothing applied");

    // The records not applied, again, in store-id order.
    let again = c.apply(vec![
        rec::create(1, root, "x", f[0]),
        rec::create(3, root, "y", f[1]),
        rec::create(4, root, "z", f[2]),
    ]);
    let fids: Vec<Fid> = again.iter().map(|a| a.fid).collect();
    assert_eq!(fids, f[..3], "applied now");
    // A pipeline that succeeds: each batch after the one before.
    let ok = [
        Msg::Reintegrate {
            records: vec![rec::create(5, root, "a", f[3])],
        },
        Msg::ReintegrateAfter {
            after: 5,
            records: vec![rec::create(6, root, "b", f[4])],
        },
        Msg::ReintegrateAfter {
            after: 6,
            records: vec![rec::create(7, root, "c", f[5])],
        },
    ];
    let ids: Vec<u64> = ok.iter().map(|m| c.send(m)).collect();
    let mut n = 0;
    while n < ids.len() {
        let (id, m) = c.recv().expect("the replies");
        assert!(ids.contains(&id));
        assert!(
            matches!(m, Msg::Reintegrated { ref results } if results.len() == 1),
            "{m:?}"
        );
        n += 1;
    }
    let mut names: Vec<String> = c.list(root).into_iter().map(|(n, _)| n).collect();
    names.sort();
    assert_eq!(names, ["a", "b", "c", "x", "y", "z"]);
    // A batch whose predecessor never reached the server (after 9) is
    // refused even on a fresh connection: the rule needs no session state.
    let mut c2 = Raw::control(s.addr(), &s.secret_file(), [0x5a; 16], 2);
    match c2.call(&Msg::ReintegrateAfter {
        after: 9,
        records: vec![rec::create(10, root, "late", f[6])],
    }) {
        Msg::Error { code, .. } => assert_eq!(code, WireCode::NotApplied),
        m => panic!("{m:?}"),
    }
    assert_eq!(c2.list(root).len(), 6);
}
