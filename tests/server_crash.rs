//! Crash safety (decision 9): kill -9 the server at random moments while a
//! writer sends batches; after each restart every acknowledged batch is
//! fully there with the right data, and every batch is all or nothing.
mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coda::proto::{Fid, Msg};
use common::raw::{rec, Raw};
use common::TestServer;

const W: [u8; 16] = [0x77; 16];
const ITERATIONS: u64 = 15;
const PER_ITERATION: usize = 300;

struct Batch {
    f: String,
    g: String,
    f_fid: Fid,
    data: Vec<u8>,
}

fn random_u64() -> u64 {
    u64::from_le_bytes(coda::proto::auth::random_bytes())
}

fn data_for(iter: u64, i: usize) -> Vec<u8> {
    // Sizes from a few bytes to ~256 KiB so kills land in every phase.
    let len = (random_u64() % (256 * 1024)) as usize >> (i % 8);
    (0..len)
        .map(|k| (k as u64 * 31 + iter * 7 + i as u64) as u8)
        .collect()
}

/// Send batches until the connection dies; returns how many were
/// acknowledged (attempted ones are pushed to `attempted` before sending).
fn writer(
    mut c: Raw,
    mut b: Raw,
    iter: u64,
    fids: Vec<Fid>,
    attempted: Arc<Mutex<Vec<Batch>>>,
) -> usize {
    let root = c.root;
    let mut acked = 0;
    for i in 0..PER_ITERATION {
        let (f_fid, g_fid) = (fids[2 * i], fids[2 * i + 1]);
        let data = data_for(iter, i);
        let upload_id = i as u64 + 1;
        let sent = b
            .try_send(&common::raw::dense_upload(upload_id, data.len() as u64))
            .and_then(|_| b.send_bytes(&data));
        if sent.is_err() || !matches!(b.recv(), Some((_, Msg::Uploaded { .. }))) {
            return acked;
        }
        let (f, g) = (format!("f{iter}_{i}"), format!("g{iter}_{i}"));
        let base = iter * 10_000 + i as u64 * 3 + 1;
        let records = vec![
            rec::create(base, root, &f, f_fid),
            rec::store(base + 1, f_fid, 0, upload_id, data.len() as u64),
            rec::create(base + 2, root, &g, g_fid),
        ];
        attempted.lock().unwrap().push(Batch { f, g, f_fid, data });
        if c.try_send(&Msg::Reintegrate { records }).is_err() {
            return acked;
        }
        match c.recv() {
            Some((_, Msg::Reintegrated { .. })) => acked = i + 1,
            Some((_, m)) => panic!("batch {i} refused: {m:?}"),
            None => return acked,
        }
    }
    acked
}

#[test]
fn kill9_at_random_moments_loses_no_acknowledged_batch() {
    let mut s = TestServer::start();
    let mut total_acked = 0;
    // Every attempted f's size: a small one has no object file.
    let mut sizes: HashMap<String, usize> = HashMap::new();
    for iter in 1..=ITERATIONS {
        let mut c = Raw::control(s.addr(), &s.secret_file(), W, iter);
        let b = Raw::bulk(s.addr(), &s.secret_file(), W, iter);
        let fids = c.alloc(2 * PER_ITERATION as u32);
        let attempted = Arc::new(Mutex::new(Vec::new()));
        let att = Arc::clone(&attempted);
        let t = std::thread::spawn(move || writer(c, b, iter, fids, att));
        std::thread::sleep(Duration::from_millis(20 + random_u64() % 380));
        s.kill9();
        let acked = t.join().expect("writer thread");
        total_acked += acked;
        s.restart();

        let mut c = Raw::control(s.addr(), &s.secret_file(), W, 1000 + iter);
        let mut b = Raw::bulk(s.addr(), &s.secret_file(), W, 1000 + iter);
        let names: HashMap<String, Fid> = c.list(c.root).into_iter().collect();
        let attempted = attempted.lock().unwrap();
        for batch in attempted.iter() {
            sizes.insert(batch.f.clone(), batch.data.len());
        }
        for (i, batch) in attempted.iter().enumerate() {
            let has_f = names.contains_key(&batch.f);
            let has_g = names.contains_key(&batch.g);
            assert_eq!(has_f, has_g, "iteration {iter} batch {i} half applied");
            if i < acked {
                assert!(has_f, "iteration {iter}: acknowledged batch {i} lost");
            }
            if has_f {
                assert_eq!(names[&batch.f], batch.f_fid);
                let (attr, data) = b.fetch(batch.f_fid).expect("fetch after restart");
                assert_eq!(attr.size, batch.data.len() as u64);
                assert!(data == batch.data, "iteration {iter} batch {i}: wrong data");
            }
        }
        // Nothing half-made survives a restart: no staged uploads, and one
        // object file per file whose data is past the small-file limit.
        let staged = std::fs::read_dir(s.root().join("staging")).unwrap().count();
        assert_eq!(staged, 0, "staging is empty after a restart");
        let files = std::fs::read_dir(s.root().join("objects/1"))
            .unwrap()
            .count();
        // Every f present was stored in its own (atomic) batch; a store of
        // at most SMALL_DATA_MAX bytes (0 included) keeps them in the index.
        let with_data = names
            .keys()
            .filter(|n| n.starts_with('f') && sizes[*n] as u64 > coda::server::SMALL_DATA_MAX)
            .count();
        assert_eq!(
            files, with_data,
            "iteration {iter}: unreferenced object files remain"
        );
    }
    eprintln!("{ITERATIONS} kills, {total_acked} acknowledged batches, all intact");
}
