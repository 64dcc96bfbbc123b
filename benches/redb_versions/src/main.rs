//! The server's journaled small commits, modelled on redb alone: a store
//! preloaded with 20,000 objects and directory entries, then 2,048
//! transactions like a Create's (a new object, its directory's record, a
//! directory entry, the journal sequence number in `settings`, the
//! client's store id), 255 of every 256 unsynced (`Durability::None`, the
//! journal being the durable copy) and the 256th durable (the checkpoint).
//! Run against redb 2.6.4 (what the crate uses) and redb 4.6.0, twice each,
//! in `<scratch dir>`. Prints commits/s, the mean unsynced commit, each
//! checkpoint, and the file's size at the end.

use std::time::Instant;

/// One run with the redb crate `$redb` (the same code for both versions;
/// only `set_durability`'s signature differs: `$set`).
macro_rules! run {
    ($redb:ident, $set:ident, $path:expr, $label:expr) => {{
        let path: String = $path;
        let _ = std::fs::remove_file(&path);
        let db = $redb::Database::create(&path).unwrap();
        const OBJECTS: $redb::TableDefinition<&[u8; 16], &[u8]> =
            $redb::TableDefinition::new("objects");
        const DIRENTS: $redb::TableDefinition<&[u8], &[u8; 17]> =
            $redb::TableDefinition::new("dirents");
        const SETTINGS: $redb::TableDefinition<&str, u64> =
            $redb::TableDefinition::new("settings");
        const CLIENT_STORE: $redb::TableDefinition<&[u8; 16], u64> =
            $redb::TableDefinition::new("client_store");
        let dir = [7u8; 16];
        let entry = |name: &str| [&dir[..], name.as_bytes()].concat();
        let w = db.begin_write().unwrap();
        {
            let mut objects = w.open_table(OBJECTS).unwrap();
            let mut dirents = w.open_table(DIRENTS).unwrap();
            for i in 0..20_000u64 {
                let mut k = [0u8; 16];
                k[..8].copy_from_slice(&i.to_be_bytes());
                objects.insert(&k, &[1u8; 120][..]).unwrap();
                dirents
                    .insert(&entry(&format!("pre{i}"))[..], &[2u8; 17])
                    .unwrap();
            }
            w.open_table(SETTINGS).unwrap().insert("seq", 0).unwrap();
            w.open_table(CLIENT_STORE).unwrap().insert(&[9u8; 16], 0).unwrap();
        }
        w.commit().unwrap();
        let (mut unsynced_us, mut unsynced, mut checkpoints) = (0u128, 0u64, Vec::new());
        let n = 2048u64;
        let start = Instant::now();
        for i in 0..n {
            let t = Instant::now();
            let mut w = db.begin_write().unwrap();
            let durable = i % 256 == 255;
            $set!(w, durable, $redb);
            {
                let mut objects = w.open_table(OBJECTS).unwrap();
                let mut k = [0u8; 16];
                k[..8].copy_from_slice(&(100_000 + i).to_be_bytes());
                objects.insert(&k, &[1u8; 120][..]).unwrap();
                objects.insert(&dir, &[3u8; 120][..]).unwrap();
                w.open_table(DIRENTS)
                    .unwrap()
                    .insert(&entry(&format!("f{i}"))[..], &[2u8; 17])
                    .unwrap();
                w.open_table(SETTINGS).unwrap().insert("seq", i).unwrap();
                w.open_table(CLIENT_STORE).unwrap().insert(&[9u8; 16], i).unwrap();
            }
            w.commit().unwrap();
            let us = t.elapsed().as_micros();
            if durable {
                checkpoints.push(us as f64 / 1000.0);
            } else {
                unsynced_us += us;
                unsynced += 1;
            }
        }
        let elapsed = start.elapsed();
        let size = std::fs::metadata(&path).unwrap().len();
        let _ = std::fs::remove_file(&path);
        println!(
            "{}: {:.0} commits/s, unsynced commit {:.0} us (mean), checkpoints {:.1?} ms, file {} MiB",
            $label,
            n as f64 / elapsed.as_secs_f64(),
            unsynced_us as f64 / unsynced as f64,
            checkpoints,
            size >> 20
        );
    }};
}

macro_rules! set2 {
    ($w:ident, $durable:expr, $redb:ident) => {
        $w.set_durability(if $durable {
            $redb::Durability::Immediate
        } else {
            $redb::Durability::None
        })
    };
}

macro_rules! set4 {
    ($w:ident, $durable:expr, $redb:ident) => {
        $w.set_durability(if $durable {
            $redb::Durability::Immediate
        } else {
            $redb::Durability::None
        })
        .unwrap()
    };
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .expect("usage: redb_versions <scratch dir>");
    for _ in 0..2 {
        run!(redb2, set2, format!("{dir}/redb2.redb"), "redb 2.6.4");
        run!(redb4, set4, format!("{dir}/redb4.redb"), "redb 4.6.0");
    }
}
