//! The client id and where it is kept (CLIENT.md "Client identity").
//!
//! The server numbers nothing for a client: it remembers the highest store
//! id it applied per client id and answers any record at or below it as a
//! replay, without applying it. So a client id and the store-id counter in
//! `index.redb` must never part: an old id with a fresh counter would have
//! its next stores silently dropped. The id is therefore kept in the index
//! too, and the index is what decides:
//! - the index has an id: it wins; `cache_dir/client_id` is rewritten from
//!   it if missing or different;
//! - the index has no id but has numbered records (made by a version that
//!   kept the id only in the file): the file's id carries on with them;
//! - the index is new (deleted, or never used): a fresh id, so the new
//!   counter starts on a watermark of 0.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use redb::TableDefinition;

use super::cache::Index;

use crate::proto::auth;
use crate::{Error, Result};

const IDENTITY: TableDefinition<&str, &[u8]> = TableDefinition::new("identity");
const CLIENT_ID_KEY: &str = "client_id";

/// The id this cache runs under, settled between `index.redb` and
/// `cache_dir/client_id` as described above. Prints one line on stderr when
/// it had to repair or replace something.
pub(crate) fn settle(cache_dir: &Path, db: &Index) -> Result<[u8; 16]> {
    let path = cache_dir.join("client_id");
    let in_file = match std::fs::read(&path) {
        Ok(b) => <[u8; 16]>::try_from(b.as_slice()).ok(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    };
    let in_index = {
        let r = db.begin_read()?;
        match r.open_table(IDENTITY) {
            Ok(t) => t
                .get(CLIENT_ID_KEY)?
                .and_then(|v| <[u8; 16]>::try_from(v.value()).ok()),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(e.into()),
        }
    };
    let say = |m: String| eprintln!("coda client: {}: {m}", cache_dir.display());
    if let Some(id) = in_index {
        if in_file != Some(id) {
            write_id_file(cache_dir, &id)?;
            say(format!(
                "client_id was missing or damaged; rewritten from index.redb ({})",
                hex(&id)
            ));
        }
        return Ok(id);
    }
    let id = match in_file {
        Some(old) if super::cml::has_numbered_records(db)? => old,
        Some(old) => {
            let new = auth::random_bytes::<16>();
            say(format!(
                "index.redb is new but client_id {} is not: taking the fresh client id {} \
                 (the server has seen the old id's store ids and would drop the new ones \
                 as replays)",
                hex(&old),
                hex(&new)
            ));
            new
        }
        None => auth::random_bytes::<16>(),
    };
    // The index first: once it holds the id, the id is decided, and a crash
    // before the file is written is repaired from it by the next start.
    let w = db.begin_write()?;
    w.open_table(IDENTITY)?
        .insert(CLIENT_ID_KEY, id.as_slice())?;
    w.commit()?;
    if in_file != Some(id) {
        write_id_file(cache_dir, &id)?;
    }
    Ok(id)
}

/// Write `cache_dir/client_id` durably: a temporary file (0600) written and
/// fsynced, renamed over the old name, the directory fsynced, so a power
/// cut leaves the old id or the new one, never an empty file.
fn write_id_file(cache_dir: &Path, id: &[u8; 16]) -> Result<()> {
    let p = cache_dir.join("client_id");
    let tmp = cache_dir.join("client_id.tmp");
    let io = |what: &str, e| Error::io(format!("{what} {}", tmp.display()), e);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io("creating", e))?;
    f.write_all(id)
        .and_then(|_| f.sync_all())
        .map_err(|e| io("writing", e))?;
    drop(f);
    std::fs::rename(&tmp, &p).map_err(|e| Error::io(format!("renaming to {}", p.display()), e))?;
    std::fs::File::open(cache_dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("fsync {}", cache_dir.display()), e))
}

fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("coda-ident-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_index_decides_the_id() {
        let d = dir("decide");
        let file = d.join("client_id");
        // Fresh: a new id, in both places.
        let a = {
            let db = Index::at(&d.join("index.redb"));
            let a = settle(&d, &db).unwrap();
            assert_eq!(std::fs::read(&file).unwrap(), a);
            // The index wins over a damaged or missing file.
            std::fs::write(&file, b"short").unwrap();
            assert_eq!(settle(&d, &db).unwrap(), a);
            std::fs::remove_file(&file).unwrap();
            assert_eq!(settle(&d, &db).unwrap(), a);
            assert_eq!(std::fs::read(&file).unwrap(), a);
            a
        };
        // The index is lost, the file stays: a fresh id.
        std::fs::remove_file(d.join("index.redb")).unwrap();
        let db = Index::at(&d.join("index.redb"));
        let b = settle(&d, &db).unwrap();
        assert_ne!(a, b);
        assert_eq!(std::fs::read(&file).unwrap(), b);
        drop(db);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn an_index_with_records_but_no_id_keeps_the_file_id() {
        let d = dir("upgrade");
        let old = [7u8; 16];
        std::fs::write(d.join("client_id"), old).unwrap();
        let db = Index::at(&d.join("index.redb"));
        // What an older version's CML leaves: a numbered record, no id.
        let meta: TableDefinition<&str, u64> = TableDefinition::new("meta");
        let w = db.begin_write().unwrap();
        w.open_table(meta)
            .unwrap()
            .insert("next_store_id", 12)
            .unwrap();
        w.commit().unwrap();
        assert_eq!(settle(&d, &db).unwrap(), old);
        drop(db);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
