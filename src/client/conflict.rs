//! Conflicts: records the server refused at reintegration (the object
//! changed on the server since the client cached it, a name now exists, the
//! object is gone...). The server's version stays; the client's is kept
//! here: the refused record, the records that depend on it, and a copy of
//! every file they stored, under `cache_dir/conflicts/`. Nothing is dropped
//! until the user decides: keep the local version (the records are sent
//! again, overriding the server's) or keep the server's (the local one is
//! discarded).

use std::path::PathBuf;

use redb::{ReadableTable, TableDefinition};

use super::cache::Cache;
use super::callback::Callbacks;
use super::cml::Cml;
use super::event::Event;

use crate::proto::codec::{Reader, Writer};
use crate::proto::{Fid, Record, RecordOp};
use crate::{Error, Result};

/// conflict id (the refused record's store id) → encoded [`Stored`].
const CONFLICTS: TableDefinition<u64, &[u8]> = TableDefinition::new("conflicts");

/// Which version a resolution keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Send the local changes again, replacing what the server has.
    Local,
    /// Discard the local changes; the server's version stays.
    Server,
}

/// A conflict, as [`Client::conflicts`](crate::client::Client::conflicts) lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// Stable id (the refused record's store id): pass it to resolve.
    pub id: u64,
    /// The object the refused record is about.
    pub fid: Fid,
    /// Its path when the conflict was found (best effort; empty if unknown).
    pub path: String,
    /// What the refused record did, e.g. `store`, `create "a"`.
    pub op: String,
    /// Why the server refused it (its error message).
    pub reason: String,
    /// The error kind the server gave: `Conflict`, `Exists`, `NotFound`...
    pub kind: String,
    /// Records held with it (the refused one and those depending on it).
    pub records: usize,
    /// The local contents of the file, if the records stored it: read it
    /// to see the local version.
    pub local_copy: Option<PathBuf>,
}

pub(crate) struct Stored {
    pub(crate) fid: Fid,
    pub(crate) path: String,
    pub(crate) reason: String,
    pub(crate) kind: String,
    pub(crate) records: Vec<Record>,
}

impl Stored {
    fn encode(&self) -> Vec<u8> {
        let recs = super::cml::encode_records(&self.records);
        let mut w = Writer::new();
        w.fid(&self.fid)
            .str(&self.path)
            .str(&self.reason)
            .str(&self.kind)
            .u64(recs.len() as u64)
            .bytes_fixed(&recs);
        w.buf
    }

    fn decode(b: &[u8]) -> Result<Stored> {
        let mut r = Reader::new(b);
        let fid = r.fid()?;
        let path = r.str(u16::MAX as usize, "path")?;
        let reason = r.str(u16::MAX as usize, "reason")?;
        let kind = r.str(64, "kind")?;
        let n = r.u64()? as usize;
        let rest = r.take(n)?;
        r.finish()?;
        Ok(Stored {
            fid,
            path,
            reason,
            kind,
            records: super::cml::decode_records(rest)?,
        })
    }
}

pub(crate) fn describe(op: &RecordOp) -> String {
    match op {
        RecordOp::Store { .. } | RecordOp::StoreInline { .. } => "store".into(),
        RecordOp::Create { name, .. } | RecordOp::CreateWith { name, .. } => {
            format!("create {name:?}")
        }
        RecordOp::Mkdir { name, .. } => format!("mkdir {name:?}"),
        RecordOp::Symlink { name, .. } => format!("symlink {name:?}"),
        RecordOp::Link { name, .. } => format!("link {name:?}"),
        RecordOp::Remove { name, .. } => format!("remove {name:?}"),
        RecordOp::Rmdir { name, .. } => format!("rmdir {name:?}"),
        RecordOp::Rename {
            src_name, dst_name, ..
        } => format!("rename {src_name:?} to {dst_name:?}"),
        RecordOp::SetAttr { .. } => "setattr".into(),
        RecordOp::Mknod { name, .. } => format!("mknod {name:?}"),
        RecordOp::SetXattr { name, .. } => format!("set attribute {name:?}"),
    }
}

fn kind_name(e: &Error) -> String {
    format!("{:?}", e.wire_code())
}

/// The parts conflicts are kept in and act on: the cache (containers,
/// names), the log (its records and the table of conflicts) and the
/// callbacks (what the client must no longer trust).
pub(crate) struct Conflicts<'a> {
    pub cache: &'a Cache,
    pub cml: &'a Cml,
    pub callbacks: &'a Callbacks,
}

impl Conflicts<'_> {
    pub(crate) fn conflicts_dir(&self) -> PathBuf {
        self.cache.dir().join("conflicts")
    }

    pub(crate) fn copy_path(&self, id: u64, fid: Fid) -> PathBuf {
        self.conflicts_dir().join(format!("{id}-{fid}"))
    }

    /// The record `id` was refused with `err`: move it and the records that
    /// depend on it out of the log into a conflict, keeping a copy of every
    /// file they store; show the server's version from now on.
    pub(crate) fn make(&self, id: u64, err: &Error) -> Result<()> {
        // Called by reintegration, which holds the outbox's token.
        let ids = self.cml.dependents(id);
        let pending = self.cml.pending();
        let records: Vec<Record> = pending
            .into_iter()
            .filter(|r| ids.contains(&r.store_id))
            .collect();
        let Some(first) = records.first() else {
            return Ok(());
        };
        let fid = first.op.target();
        std::fs::create_dir_all(self.conflicts_dir())
            .map_err(|e| Error::io("creating the conflicts directory", e))?;
        for r in &records {
            if let RecordOp::Store { fid, .. } = r.op {
                let to = self.copy_path(id, fid);
                // Copy, not move: the file may be open.
                if std::fs::copy(self.cache.container(fid), &to).is_ok() {
                    if let Ok(f) = std::fs::File::open(&to) {
                        let _ = f.sync_all();
                    }
                }
            }
        }
        let stored = Stored {
            fid,
            path: self.cache.path_of(fid).unwrap_or_default(),
            reason: err.to_string(),
            kind: kind_name(err),
            records: records.clone(),
        };
        {
            let w = self.cml.db.begin_write()?;
            w.open_table(CONFLICTS)?.insert(id, &stored.encode()[..])?;
            w.commit()?;
        }
        self.cml.finish(&ids, &[])?;
        self.forget_local(&records);
        self.callbacks.events.emit(Event::Conflict {
            id,
            fid,
            path: stored.path.clone(),
        });
        Ok(())
    }

    /// Stop trusting the local state of what `records` touched: the
    /// server's version is what the client shows now.
    pub(crate) fn forget_local(&self, records: &[Record]) {
        let mut fids = Vec::new();
        for r in records {
            if let Some(f) = super::cml::created(&r.op) {
                if !self.cml.mentions(f) {
                    self.cache.unpin(f);
                    self.cache.forget(f);
                }
            }
            fids.extend(super::cml::mentions(&r.op));
        }
        fids.sort();
        fids.dedup();
        for f in &fids {
            // Listings: reread (the local edits of the refused records are
            // in them). Contents: the server's, unless a pending store still
            // needs the container.
            let keep_data = self.cml.has_store(*f);
            if !keep_data {
                self.cache.unpin(*f);
            }
            self.cache.update(None, *f, |e| {
                if !keep_data {
                    e.data_version = None;
                    e.dirty = false;
                }
                e.clear_listing();
            });
        }
        self.callbacks.break_fids(&fids);
    }

    pub(crate) fn load(&self) -> Result<Vec<(u64, Stored)>> {
        let r = self.cml.db.begin_read()?;
        let t = match r.open_table(CONFLICTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(vec![]),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push((k.value(), Stored::decode(v.value())?));
        }
        Ok(out)
    }

    pub(crate) fn remove(&self, id: u64, s: &Stored) -> Result<()> {
        let w = self.cml.db.begin_write()?;
        w.open_table(CONFLICTS)?.remove(id)?;
        w.commit()?;
        for r in &s.records {
            if let RecordOp::Store { fid, .. } = r.op {
                let _ = std::fs::remove_file(self.copy_path(id, fid));
            }
        }
        Ok(())
    }
}
