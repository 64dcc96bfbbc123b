//! The client modification log: every mutation becomes a `Record`, persisted
//! (durably) in `index.redb` before it is sent, then reintegrated. Connected,
//! reintegration happens at once and the caller waits for the server's
//! commit; the record then leaves the log. Also keeps the fid ranges the
//! server reserved for us, so new objects have final fids even offline.

use std::collections::HashMap;
use std::fs::File;
use std::sync::Arc;

use parking_lot::Mutex;
use redb::{Database, Durability, ReadableTable, TableDefinition};

use super::conn::Servers;
use super::stats::Counters;
use crate::proto::{Attr, Fid, Msg, Record, RecordOp};
use crate::{Error, Result};

const CML: TableDefinition<u64, &[u8]> = TableDefinition::new("cml");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const NEXT_STORE_ID: &str = "next_store_id";
/// Fids reserved per AllocFids request.
const FID_BATCH: u32 = 256;

/// Whether a record whose reintegration failed for lack of a server stays
/// in the log. Disconnected operation (a later issue) turns this on; until
/// then the caller gets the error and the record is dropped.
const KEEP_WHEN_UNREACHABLE: bool = false;

pub(crate) struct Cml {
    db: Arc<Database>,
    /// Serialises reintegration. The server treats a batch whose store ids
    /// are all at or below the highest it applied as a replay, so batches
    /// must reach it in store-id order: one at a time.
    gate: Mutex<()>,
    /// volume → (next vnode, end) of the reserved range, mirrored in META.
    fids: Mutex<HashMap<u32, (u64, u64)>>,
}

fn encode_record(r: &Record) -> Vec<u8> {
    Msg::Reintegrate {
        records: vec![r.clone()],
    }
    .encode()
}

fn decode_record(b: &[u8]) -> Result<Record> {
    let kind = Msg::Reintegrate { records: vec![] }.kind();
    match Msg::decode_body(kind, b)? {
        Msg::Reintegrate { mut records } if records.len() == 1 => Ok(records.remove(0)),
        _ => Err(Error::Protocol("bad CML row".into())),
    }
}

/// Failures that say "the server was not reached (or its answer was lost)",
/// as opposed to the server refusing the record.
fn unreachable(e: &Error) -> bool {
    matches!(e, Error::Timeout(_) | Error::Eio(_) | Error::Io { .. })
}

impl Cml {
    pub fn open(db: Arc<Database>) -> Result<Cml> {
        let w = db.begin_write()?;
        let mut fids = HashMap::new();
        {
            w.open_table(CML)?;
            let meta = w.open_table(META)?;
            for row in meta.iter()? {
                let (k, v) = row?;
                let k = k.value().to_string();
                let v = v.value();
                let parse = |p: &str| k.strip_prefix(p).and_then(|s| s.parse::<u32>().ok());
                if let Some(vol) = parse("fid_next.") {
                    fids.entry(vol).or_insert((0, 0)).0 = v;
                } else if let Some(vol) = parse("fid_end.") {
                    fids.entry(vol).or_insert((0, 0)).1 = v;
                }
            }
        }
        w.commit()?;
        Ok(Cml {
            db,
            gate: Mutex::new(()),
            fids: Mutex::new(fids),
        })
    }

    /// Records not yet known to be on the server, in order.
    pub fn pending(&self) -> Result<Vec<Record>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(CML)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (_, v) = row?;
            out.push(decode_record(v.value())?);
        }
        Ok(out)
    }

    /// Give `op` the next store id and persist it, durably, in one transaction.
    fn append(&self, mut op: RecordOp) -> Result<Record> {
        let mut w = self.db.begin_write()?;
        w.set_durability(Durability::Immediate);
        let rec;
        {
            let mut meta = w.open_table(META)?;
            let mut cml = w.open_table(CML)?;
            let from_meta = meta.get(NEXT_STORE_ID)?.map(|v| v.value()).unwrap_or(1);
            let from_log = cml.last()?.map(|(k, _)| k.value() + 1).unwrap_or(1);
            let store_id = from_meta.max(from_log);
            if let RecordOp::Store { upload_id, .. } = &mut op {
                *upload_id = store_id;
            }
            rec = Record { store_id, op };
            cml.insert(store_id, &encode_record(&rec)[..])?;
            meta.insert(NEXT_STORE_ID, store_id + 1)?;
        }
        w.commit()?;
        Ok(rec)
    }

    fn remove(&self, store_id: u64) -> Result<()> {
        let w = self.db.begin_write()?;
        w.open_table(CML)?.remove(store_id)?;
        w.commit()?;
        Ok(())
    }

    /// A fresh fid in `volume` from our reserved range, reserving more first
    /// if it ran out.
    pub fn new_fid(&self, servers: &Servers, volume: u32) -> Result<Fid> {
        loop {
            {
                let mut f = self.fids.lock();
                if let Some((next, end)) = f.get_mut(&volume) {
                    if *next < *end {
                        let vnode = *next;
                        *next += 1;
                        let n = *next;
                        drop(f);
                        self.put_meta(&[(format!("fid_next.{volume}"), n)])?;
                        return Ok(Fid::new(volume, vnode, 1));
                    }
                }
            }
            // No lock held while we ask the server.
            let s = servers.session()?;
            match s.call(
                &Msg::AllocFids {
                    volume,
                    count: FID_BATCH,
                },
                &servers.interrupt,
            )? {
                Msg::FidRange {
                    volume: v,
                    first_vnode,
                    count,
                } if v == volume && count > 0 => {
                    let end = first_vnode + count as u64;
                    self.put_meta(&[
                        (format!("fid_next.{volume}"), first_vnode),
                        (format!("fid_end.{volume}"), end),
                    ])?;
                    self.fids.lock().insert(volume, (first_vnode, end));
                }
                m => return Err(Error::Protocol(format!("AllocFids answered with {m:?}"))),
            }
        }
    }

    fn put_meta(&self, kv: &[(String, u64)]) -> Result<()> {
        let w = self.db.begin_write()?;
        {
            let mut meta = w.open_table(META)?;
            for (k, v) in kv {
                meta.insert(k.as_str(), *v)?;
            }
        }
        w.commit()?;
        Ok(())
    }

    /// The one write path: log `op`, upload `data` first if it is a Store,
    /// reintegrate, and return the attr of the record's target after the
    /// server committed it.
    pub fn commit(
        &self,
        servers: &Servers,
        counters: &Counters,
        op: RecordOp,
        data: Option<&File>,
    ) -> Result<Attr> {
        let _order = self.gate.lock();
        let rec = self.append(op)?;
        let result = self.reintegrate(servers, &rec, data);
        let keep = matches!(&result, Err(e) if unreachable(e)) && KEEP_WHEN_UNREACHABLE;
        if !keep {
            self.remove(rec.store_id)?;
        }
        if result.is_ok() {
            Counters::add(&counters.reintegrations, 1);
        }
        result
    }

    /// Send, in order, what a crashed run logged but may not have seen
    /// committed. The server recognises records it already applied by their
    /// store ids and does not apply them twice. A store whose container no
    /// longer has the logged length cannot be replayed and is dropped.
    pub fn replay(
        &self,
        servers: &Servers,
        counters: &Counters,
        container: impl Fn(Fid) -> std::path::PathBuf,
    ) -> Result<()> {
        let _order = self.gate.lock();
        for rec in self.pending()? {
            let data = match &rec.op {
                RecordOp::Store { fid, length, .. } => match File::open(container(*fid)) {
                    Ok(f) if f.metadata().map(|m| m.len()).ok() == Some(*length) => Some(f),
                    _ => {
                        self.remove(rec.store_id)?;
                        continue;
                    }
                },
                _ => None,
            };
            match self.reintegrate(servers, &rec, data.as_ref()) {
                Ok(_) => Counters::add(&counters.reintegrations, 1),
                Err(e) if unreachable(&e) => return Err(e),
                Err(_) => {} // refused: it cannot apply any more; nobody waits for it
            }
            self.remove(rec.store_id)?;
        }
        Ok(())
    }

    fn reintegrate(&self, servers: &Servers, rec: &Record, data: Option<&File>) -> Result<Attr> {
        let s = servers.session()?;
        if let RecordOp::Store {
            upload_id, length, ..
        } = &rec.op
        {
            let f = data.ok_or_else(|| Error::Invalid("a store needs its container".into()))?;
            s.upload(*upload_id, f, *length, &servers.interrupt)?;
        }
        match s.call(
            &Msg::Reintegrate {
                records: vec![rec.clone()],
            },
            &servers.interrupt,
        )? {
            Msg::Reintegrated { mut results } if results.len() == 1 => Ok(results.remove(0)),
            m => Err(Error::Protocol(format!("Reintegrate answered with {m:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Timespec;

    #[test]
    fn store_ids_grow_across_restarts_and_records_round_trip() {
        let dir = std::env::temp_dir().join(format!("coda-cml-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let f = Fid::new(1, 5, 1);
        let op = RecordOp::Store {
            fid: f,
            expected_version: 0,
            upload_id: 0,
            length: 3,
            mtime: Timespec::now(),
        };
        let first = {
            let cml = Cml::open(Arc::new(Database::create(dir.join("i.redb")).unwrap())).unwrap();
            let a = cml.append(op.clone()).unwrap();
            let b = cml.append(op.clone()).unwrap();
            assert_eq!(b.store_id, a.store_id + 1);
            assert!(matches!(b.op, RecordOp::Store { upload_id, .. } if upload_id == b.store_id));
            cml.remove(a.store_id).unwrap();
            cml.remove(b.store_id).unwrap();
            b.store_id
        };
        let cml = Cml::open(Arc::new(Database::create(dir.join("i.redb")).unwrap())).unwrap();
        assert!(cml.pending().unwrap().is_empty());
        let c = cml.append(op).unwrap();
        assert!(
            c.store_id > first,
            "the server would take a reused id for a replay"
        );
        assert_eq!(cml.pending().unwrap(), vec![c]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
