//! Opening a file written by the redb this crate used before (redb 2.6,
//! file format v2) with the one it uses now (redb 4, format v3).
//!
//! redb 4 refuses an old file (`DatabaseError::UpgradeRequired`), and redb
//! 2.6 converts one in place (`Database::upgrade`). But since redb 3 a key
//! of a variable-width tuple type is encoded differently, and redb 4 cannot
//! read the old encoding. So such tables are first moved, by redb 2.6, into
//! staging tables (`upgrade.NAME`) of plain bytes; then redb 2.6 converts
//! the file; then redb 4 moves the rows back into their tuple tables
//! (`finish`). Each step is one transaction, and every open redoes what a
//! crash interrupted: a staged table is never staged twice (its old table
//! is gone), and `finish` runs on every open of a file that has moves.
//!
//! Files of the server (`meta.redb`, `raft.redb`) and of a client
//! (`index.redb`, whose log holds acknowledged changes not yet sent) are
//! all opened through `upgraded`.

use std::path::Path;

use redb::ReadableTable;
use redb2::ReadableTable as _;

use crate::{Error, Result};

/// A table keyed by a variable-width tuple, and its shape.
pub(crate) struct Move {
    pub table: &'static str,
    pub shape: Shape,
}

/// The tuple tables this crate has (`server::meta`).
#[derive(Clone, Copy)]
pub(crate) enum Shape {
    /// `(&[u8; 16], &str)` to `&[u8; 17]` (`dirents`).
    FidName,
    /// `(&str, &str)` to `()` (`groups`, `memberships`).
    StrPair,
}

type Staging<'a> = (&'a str, Vec<(Vec<u8>, Vec<u8>)>);

fn staging_name(table: &str) -> String {
    format!("upgrade.{table}")
}

/// `open` the file at `path`; if it is of the old format, convert it
/// first (moving the tables of `moves`) and open it again. The caller then
/// runs `finish` on what it opened when it has moves. Errors are `open`'s
/// kind: a file in use is `DatabaseAlreadyOpen`, a failed conversion an
/// I/O error that says so.
pub(crate) fn upgraded<T>(
    path: &Path,
    moves: &[Move],
    open: impl Fn() -> std::result::Result<T, redb::DatabaseError>,
) -> std::result::Result<T, redb::DatabaseError> {
    match open() {
        Err(redb::DatabaseError::UpgradeRequired(_)) => {
            convert(path, moves)?;
            open()
        }
        r => r,
    }
}

fn old(e: impl std::fmt::Display, path: &Path) -> redb::DatabaseError {
    redb::DatabaseError::Storage(redb::StorageError::Io(std::io::Error::other(format!(
        "converting {} from redb 2's format: {e}",
        path.display()
    ))))
}

/// With redb 2.6: stage the tuple tables, then convert the file.
fn convert(path: &Path, moves: &[Move]) -> std::result::Result<(), redb::DatabaseError> {
    let mut db = match redb2::Database::open(path) {
        Ok(db) => db,
        Err(redb2::DatabaseError::DatabaseAlreadyOpen) => {
            return Err(redb::DatabaseError::DatabaseAlreadyOpen)
        }
        Err(e) => return Err(old(e, path)),
    };
    if !moves.is_empty() {
        let w = db.begin_write().map_err(|e| old(e, path))?;
        let present: Vec<String> = w
            .list_tables()
            .map_err(|e| old(e, path))?
            .map(|h| redb2::TableHandle::name(&h).to_string())
            .collect();
        for m in moves {
            if present.iter().any(|n| n == m.table) {
                stage(&w, m).map_err(|e| old(e, path))?;
            }
        }
        w.commit().map_err(|e| old(e, path))?;
    }
    db.upgrade().map_err(|e| old(e, path))?;
    Ok(())
}

/// Move `m`'s rows (redb 2.6 encoding) into its staging table.
#[allow(clippy::result_large_err)] // redb 2's own error, once per table
fn stage(w: &redb2::WriteTransaction, m: &Move) -> std::result::Result<(), redb2::Error> {
    let rows: Vec<(Vec<u8>, Vec<u8>)> = match m.shape {
        Shape::FidName => {
            let def: redb2::TableDefinition<(&[u8; 16], &str), &[u8; 17]> =
                redb2::TableDefinition::new(m.table);
            let rows = {
                let t = w.open_table(def)?;
                let mut rows = Vec::new();
                for r in t.iter()? {
                    let (k, v) = r?;
                    let (fid, name) = k.value();
                    rows.push(([&fid[..], name.as_bytes()].concat(), v.value().to_vec()));
                }
                rows
            };
            w.delete_table(def)?;
            rows
        }
        Shape::StrPair => {
            let def: redb2::TableDefinition<(&str, &str), ()> =
                redb2::TableDefinition::new(m.table);
            let rows = {
                let t = w.open_table(def)?;
                let mut rows = Vec::new();
                for r in t.iter()? {
                    let (k, _) = r?;
                    let (a, b) = k.value();
                    rows.push((str_pair(a, b), Vec::new()));
                }
                rows
            };
            w.delete_table(def)?;
            rows
        }
    };
    let name = staging_name(m.table);
    let staged: redb2::TableDefinition<&[u8], &[u8]> = redb2::TableDefinition::new(&name);
    let mut t = w.open_table(staged)?;
    for (k, v) in &rows {
        t.insert(k.as_slice(), v.as_slice())?;
    }
    Ok(())
}

/// `(a, b)` as bytes: `a`'s length (u32, big-endian), `a`, `b`.
fn str_pair(a: &str, b: &str) -> Vec<u8> {
    let mut k = (a.len() as u32).to_be_bytes().to_vec();
    k.extend_from_slice(a.as_bytes());
    k.extend_from_slice(b.as_bytes());
    k
}

fn split_str_pair(k: &[u8]) -> Option<(&str, &str)> {
    let n = u32::from_be_bytes(k.get(..4)?.try_into().ok()?) as usize;
    let a = std::str::from_utf8(k.get(4..4 + n)?).ok()?;
    let b = std::str::from_utf8(k.get(4 + n..)?).ok()?;
    Some((a, b))
}

/// With redb 4: move staged rows back into their tuple tables, if any are
/// staged (a file converted now, or by an open a crash interrupted).
pub(crate) fn finish(db: &redb::Database, moves: &[Move]) -> Result<()> {
    if moves.is_empty() {
        return Ok(());
    }
    let w = db.begin_write()?;
    let present: Vec<String> = w
        .list_tables()?
        .map(|h| redb::TableHandle::name(&h).to_string())
        .collect();
    let mut moved = false;
    for m in moves {
        let name = staging_name(m.table);
        if !present.contains(&name) {
            continue;
        }
        let staged: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new(&name);
        let rows: Staging = {
            let t = w.open_table(staged)?;
            let mut rows = Vec::new();
            for r in t.iter()? {
                let (k, v) = r?;
                rows.push((k.value().to_vec(), v.value().to_vec()));
            }
            (m.table, rows)
        };
        unstage(&w, m.shape, rows)?;
        w.delete_table(staged)?;
        moved = true;
    }
    if moved {
        w.commit()?;
    } else {
        w.abort()?;
    }
    Ok(())
}

fn unstage(w: &redb::WriteTransaction, shape: Shape, (table, rows): Staging) -> Result<()> {
    let bad = |what: &str| {
        Error::Eio(format!(
            "converting {table}: a staged row is not {what}; the file is left as it is"
        ))
    };
    match shape {
        Shape::FidName => {
            let def: redb::TableDefinition<(&[u8; 16], &str), &[u8; 17]> =
                redb::TableDefinition::new(table);
            let mut t = w.open_table(def)?;
            for (k, v) in &rows {
                let fid: &[u8; 16] = k
                    .get(..16)
                    .and_then(|f| f.try_into().ok())
                    .ok_or_else(|| bad("a fid and a name"))?;
                let name = std::str::from_utf8(&k[16..]).map_err(|_| bad("a fid and a name"))?;
                let v: &[u8; 17] = v.as_slice().try_into().map_err(|_| bad("17 bytes"))?;
                t.insert((fid, name), v)?;
            }
        }
        Shape::StrPair => {
            let def: redb::TableDefinition<(&str, &str), ()> = redb::TableDefinition::new(table);
            let mut t = w.open_table(def)?;
            for (k, _) in &rows {
                let (a, b) = split_str_pair(k).ok_or_else(|| bad("two names"))?;
                t.insert((a, b), ())?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::meta::{DIRENTS, GROUPS, MEMBERSHIPS, OBJECTS, RESERVED, TUPLE_TABLES};
    use redb::{ReadableDatabase, ReadableTableMetadata};

    const OLD_DIRENTS: redb2::TableDefinition<(&[u8; 16], &str), &[u8; 17]> =
        redb2::TableDefinition::new("dirents");
    const OLD_GROUPS: redb2::TableDefinition<(&str, &str), ()> =
        redb2::TableDefinition::new("groups");
    const OLD_MEMBERSHIPS: redb2::TableDefinition<(&str, &str), ()> =
        redb2::TableDefinition::new("memberships");
    const OLD_RESERVED: redb2::TableDefinition<(u32, u64), &[u8; 20]> =
        redb2::TableDefinition::new("reserved");
    const OLD_OBJECTS: redb2::TableDefinition<&[u8; 16], &[u8]> =
        redb2::TableDefinition::new("objects");

    fn scratch(tag: &str) -> std::path::PathBuf {
        let d =
            std::env::temp_dir().join(format!("coda-redb-upgrade-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn fid(n: u8) -> [u8; 16] {
        [n; 16]
    }

    /// A store as redb 2.6 wrote it: two directories' entries (names of
    /// several lengths, one not ASCII), groups and memberships, a reserved
    /// range (a fixed-width tuple) and an object.
    fn write_old(path: &Path) {
        let db = redb2::Database::create(path).unwrap();
        let w = db.begin_write().unwrap();
        {
            let mut d = w.open_table(OLD_DIRENTS).unwrap();
            for (dir, name, v) in [(1, "a", 1), (1, "b-longer", 2), (2, "été", 3), (2, "z", 4)] {
                d.insert((&fid(dir), name), &[v; 17]).unwrap();
            }
            let mut g = w.open_table(OLD_GROUPS).unwrap();
            g.insert(("web", ""), ()).unwrap();
            g.insert(("web", "bob"), ()).unwrap();
            w.open_table(OLD_MEMBERSHIPS)
                .unwrap()
                .insert(("bob", "web"), ())
                .unwrap();
            w.open_table(OLD_RESERVED)
                .unwrap()
                .insert((1, 1000), &[7; 20])
                .unwrap();
            w.open_table(OLD_OBJECTS)
                .unwrap()
                .insert(&fid(1), &b"object"[..])
                .unwrap();
        }
        w.commit().unwrap();
    }

    /// Open `path` as a store does (converted if it is old, staged rows
    /// moved), check it holds the rows in the new format, and close it.
    fn open_checked(path: &Path) {
        let db = upgraded(path, &TUPLE_TABLES, || redb::Database::open(path)).unwrap();
        finish(&db, &TUPLE_TABLES).unwrap();
        check_new(&db);
    }

    fn check_new(db: &redb::Database) {
        let r = db.begin_read().unwrap();
        let d = r.open_table(DIRENTS).unwrap();
        let dir2: Vec<(String, u8)> = d
            .range((&fid(2), "")..)
            .unwrap()
            .map(|e| {
                let (k, v) = e.unwrap();
                (k.value().1.to_string(), v.value()[0])
            })
            .collect();
        // Names in byte order: "z" (0x7a) before "été" (0xc3 0xa9 ...).
        assert_eq!(dir2, [("z".to_string(), 4), ("été".to_string(), 3)]);
        assert_eq!(d.len().unwrap(), 4);
        assert_eq!(
            d.get((&fid(1), "b-longer")).unwrap().unwrap().value(),
            &[2; 17]
        );
        let g = r.open_table(GROUPS).unwrap();
        assert!(g.get(("web", "bob")).unwrap().is_some());
        assert!(g.get(("web", "")).unwrap().is_some());
        assert_eq!(g.len().unwrap(), 2);
        let m = r.open_table(MEMBERSHIPS).unwrap();
        assert!(m.get(("bob", "web")).unwrap().is_some());
        let res = r.open_table(RESERVED).unwrap();
        assert_eq!(res.get((1, 1000)).unwrap().unwrap().value(), &[7; 20]);
        let o = r.open_table(OBJECTS).unwrap();
        assert_eq!(o.get(&fid(1)).unwrap().unwrap().value(), b"object");
        let names: Vec<String> = r
            .list_tables()
            .unwrap()
            .map(|h| redb::TableHandle::name(&h).to_string())
            .collect();
        assert!(
            !names.iter().any(|n| n.starts_with("upgrade.")),
            "{names:?}"
        );
    }

    /// redb 4 refuses the old file; `upgraded` converts it, `finish` puts
    /// the tuple tables back, and every row reads as before (ranges too).
    /// A second open finds nothing to do.
    #[test]
    fn a_store_written_by_redb_2_opens_with_every_row() {
        let dir = scratch("store");
        let path = dir.join("meta.redb");
        write_old(&path);
        assert!(matches!(
            redb::Database::open(&path),
            Err(redb::DatabaseError::UpgradeRequired(_))
        ));
        open_checked(&path);
        open_checked(&path);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A conversion interrupted after the staging commit (still the old
    /// format), or after the format's conversion (rows still staged), is
    /// finished by the next open.
    #[test]
    fn an_interrupted_conversion_is_finished_by_the_next_open() {
        let dir = scratch("interrupted");
        let path = dir.join("meta.redb");
        write_old(&path);
        {
            let db = redb2::Database::open(&path).unwrap();
            let w = db.begin_write().unwrap();
            for m in &TUPLE_TABLES {
                stage(&w, m).unwrap();
            }
            w.commit().unwrap();
        }
        open_checked(&path);

        let path = dir.join("meta2.redb");
        write_old(&path);
        convert(&path, &TUPLE_TABLES).unwrap();
        open_checked(&path);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A staged row that is not what its table holds (a damaged file) is
    /// refused with an error naming the table, and nothing is moved: the
    /// staged rows stay for a later look.
    #[test]
    fn a_damaged_staged_row_is_refused_and_nothing_moves() {
        let dir = scratch("damaged");
        let path = dir.join("meta.redb");
        let db = redb::Database::create(&path).unwrap();
        let staged: redb::TableDefinition<&[u8], &[u8]> =
            redb::TableDefinition::new("upgrade.dirents");
        let w = db.begin_write().unwrap();
        // A fid of 16 bytes and a name, but a value of 3 bytes, not 17.
        w.open_table(staged)
            .unwrap()
            .insert(&[[1u8; 16].as_slice(), b"a"].concat()[..], &[1u8, 2, 3][..])
            .unwrap();
        w.commit().unwrap();
        let e = finish(&db, &TUPLE_TABLES).unwrap_err();
        assert!(e.to_string().contains("converting dirents"), "{e}");
        let r = db.begin_read().unwrap();
        assert_eq!(r.open_table(staged).unwrap().len().unwrap(), 1, "kept");
        assert!(r.open_table(DIRENTS).is_err(), "nothing moved");
        drop((r, db));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_str_pair_splits_back_whatever_its_names() {
        for (a, b) in [("", ""), ("web", ""), ("", "bob"), ("a\0b", "été")] {
            assert_eq!(split_str_pair(&str_pair(a, b)), Some((a, b)));
        }
        assert_eq!(split_str_pair(&[0, 0, 0, 9, b'a']), None);
    }
}
