//! Reintegration: replay the CML on the server in batches of bounded size.
//! Each batch applies atomically (PROTOCOL.md); one sent again after a lost
//! reply is recognised by its store ids and not applied twice. A record the
//! server refuses (a version conflict, a name that now exists, ...) leaves
//! the log together with the records that depend on it and becomes a
//! conflict (`conflict.rs`), with the local data preserved; the rest of the
//! log goes on reintegrating.

use std::time::{Duration, Instant};

use super::emulation::space_error;
use super::event::Event;
use super::stats::Counters;
use super::Inner;
use crate::proto::{Msg, RecordOp, MAX_BATCH};
use crate::{Error, Result};

/// Records per batch: bounded so one batch is one bounded transaction on
/// the server and one frame on the wire.
pub(crate) const BATCH_RECORDS: usize = 1024;
/// Encoded bytes of records per batch (one frame is at most 1 MiB).
const BATCH_BYTES: usize = 768 << 10;
/// File data uploaded per batch: beyond this the batch is cut short, so a
/// batch's time stays bounded and progress is committed as it goes.
const BATCH_DATA: u64 = 256 << 20;

impl Inner {
    /// Send the pending log (only records older than `min_age`, if given)
    /// in batches until it is empty, a server cannot be reached (the error),
    /// or the rest is too young.
    pub(crate) fn reintegrate_pending(&self, min_age: Option<Duration>) -> Result<()> {
        let r = self.reintegrate_batches(min_age);
        match &r {
            Ok(()) => self.cml.emu.reset_backoff(),
            Err(e) if space_error(e) => {
                // Keep the records; wait before the next try (the
                // reintegrator skips its turns until then) and say why.
                let wait = self.cml.emu.back_off(e);
                Counters::add(&self.counters.space_refusals, 1);
                self.callbacks.events.emit(Event::ReintegrationStalled {
                    code: e.code(),
                    message: e.to_string(),
                    pending: self.cml.len() as u64,
                    retry_ms: wait.as_millis() as u64,
                });
            }
            Err(_) => {}
        }
        r
    }

    fn reintegrate_batches(&self, min_age: Option<Duration>) -> Result<()> {
        loop {
            match self.one_batch(min_age)? {
                Step::Done => {
                    if self.cml.len() == 0 {
                        self.drop_edited_listings();
                    }
                    return Ok(());
                }
                Step::Next => {}
                // Outside the gate: making a conflict takes it.
                Step::Refused(id, e) => self.make_conflict(id, &e)?,
            }
        }
    }

    fn one_batch(&self, min_age: Option<Duration>) -> Result<Step> {
        {
            let _order = self.cml.gate.lock();
            let older = min_age.and_then(|a| Instant::now().checked_sub(a));
            if min_age.is_some() && older.is_none() {
                return Ok(Step::Done);
            }
            let mut batch =
                self.cml
                    .next_batch(BATCH_RECORDS.min(MAX_BATCH), BATCH_BYTES, older)?;
            if batch.is_empty() {
                return Ok(Step::Done);
            }
            let s = self.servers.session()?;
            // Upload the data of the stores: the container as it is now (a
            // later write would only be stored again by a later record).
            let mut data = 0u64;
            let mut cut = batch.len();
            for (i, r) in batch.iter_mut().enumerate() {
                let RecordOp::Store {
                    fid,
                    upload_id,
                    length,
                    ..
                } = &mut r.op
                else {
                    continue;
                };
                if i > 0 && data >= BATCH_DATA {
                    cut = i;
                    break;
                }
                let path = self.cache.container(*fid);
                let f = match std::fs::File::open(&path) {
                    Ok(f) => f,
                    Err(e) => {
                        // The only copy is gone: say so (as a conflict the
                        // user sees) rather than drop the record silently.
                        return Ok(Step::Refused(
                            r.store_id,
                            Error::io(format!("local copy {}", path.display()), e),
                        ));
                    }
                };
                let len = f
                    .metadata()
                    .map_err(|e| Error::io("sizing a container", e))?
                    .len();
                // Shorter than when it was logged, with nothing since that
                // explains it: its data was lost (a power cut before the
                // container reached the disk). Never send that over the
                // server's copy: keep it as a conflict the user sees.
                let in_use = self.cache.get(*fid).is_some_and(|e| e.open > 0);
                if len < *length && !in_use && !self.cml.resized_after(*fid, r.store_id) {
                    return Ok(Step::Refused(
                        r.store_id,
                        Error::Eio(format!(
                            "local copy {} has {len} of the {} bytes logged: data lost locally \
                             (a crash before it reached the disk); the server's copy is kept",
                            path.display(),
                            *length
                        )),
                    ));
                }
                *length = len;
                s.upload(*upload_id, &f, len, &self.servers.interrupt)?;
                data += len;
            }
            batch.truncate(cut);
            let reply = s.call_raw(
                &Msg::Reintegrate {
                    records: batch.clone(),
                },
                &self.servers.interrupt,
            )?;
            match reply {
                Msg::Reintegrated { results } if results.len() == batch.len() => {
                    let ids: Vec<u64> = batch.iter().map(|r| r.store_id).collect();
                    let applied: Vec<_> = batch
                        .iter()
                        .zip(&results)
                        .map(|(r, a)| (r.op.target(), a.version))
                        .collect();
                    let done = self.cml.finish(&ids, &applied)?;
                    for (r, a) in done.iter().zip(&results) {
                        if let RecordOp::Store { fid, .. } = r.op {
                            if !self.cml.has_store(fid) {
                                self.cache.unpin(fid);
                                if self.cache.get(fid).is_none() {
                                    // Forgotten while pinned: now garbage.
                                    let _ = std::fs::remove_file(self.cache.container(fid));
                                }
                            }
                            // The container is now that version's contents.
                            self.cache.update(None, fid, |e| {
                                if e.data_version == Some(a.version) {
                                    e.dirty = false;
                                }
                            });
                        }
                    }
                    Counters::add(&self.counters.reintegrations, 1);
                    Counters::add(&self.counters.records_reintegrated, ids.len() as u64);
                    self.callbacks.events.emit(Event::Reintegrated {
                        records: ids.len() as u64,
                        remaining: self.cml.len() as u64,
                    });
                    Ok(Step::Next)
                }
                Msg::Error {
                    code,
                    index,
                    message,
                } if (index as usize) < batch.len() => {
                    let id = batch[index as usize].store_id;
                    let e = Error::from_wire(code, message);
                    if space_error(&e) {
                        // Not the record's fault: it stays in the log.
                        return Err(e);
                    }
                    Ok(Step::Refused(id, e))
                }
                Msg::Error { code, message, .. } => Err(Error::from_wire(code, message)),
                m => Err(Error::Protocol(format!("Reintegrate answered with {m:?}"))),
            }
        }
    }
}

enum Step {
    Done,
    Next,
    /// The server refused record `id` (or its data is gone).
    Refused(u64, Error),
}
