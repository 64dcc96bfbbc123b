//! Volume version stamps and volume callbacks (ARCHITECTURE decision 6).
//!
//! The client remembers, per volume, the stamp read just before its last
//! full revalidation of that volume's cached objects. When it reconnects (or
//! restarts), one `ValidateVolume` per volume asks the server whether any
//! other client changed the volume since: if not, every cached object of the
//! volume is still valid and the client holds a volume callback that stands
//! for all of them, with no per-object request. Otherwise the objects are
//! validated in batches of many fids per `GetAttrs` and the new stamp is
//! remembered. A foreign change breaks the volume callback (the server sends
//! a `CallbackBreak` for the volume's pseudo-fid `volume.0.0`).

use std::collections::{BTreeMap, HashMap};

use parking_lot::Mutex;
use redb::TableDefinition;

use super::cache::{Cache, Index};
use super::callback::Callbacks;
use super::cml::Cml;
use super::conn::{Interrupt, Session};
use super::stats::Counters;
use crate::proto::{Attr, Fid, Msg};
use crate::{Error, Result};

/// volume → the stamp the client's cache of it was last fully valid at.
const STAMPS: TableDefinition<u32, u64> = TableDefinition::new("volume_stamps");

/// The pseudo-fid standing for a volume callback (vnode 0 names no object).
pub(crate) fn volume_fid(volume: u32) -> Fid {
    Fid::new(volume, 0, 0)
}

/// What a volume pass reads and updates besides the stamps themselves.
pub(crate) struct Parts<'a> {
    pub cache: &'a Cache,
    pub cml: &'a Cml,
    pub callbacks: &'a Callbacks,
    pub counters: &'a Counters,
}

/// The stamps the client knows, per volume.
#[derive(Default)]
pub(crate) struct Stamps {
    known: Mutex<HashMap<u32, u64>>,
}

impl Stamps {
    /// Load the stamps a clean shutdown saved, and delete them: if this run
    /// crashes, the index may have lost updates, and a stamp must not vouch
    /// for it.
    pub(crate) fn take_saved(&self, db: &Index) {
        let res: Result<()> = (|| {
            let w = db.begin_write()?;
            {
                let mut t = w.open_table(STAMPS)?;
                let mut m = self.known.lock();
                while let Some((k, v)) = t.pop_first()? {
                    m.insert(k.value(), v.value());
                }
            }
            w.commit()?;
            Ok(())
        })();
        let _ = res;
    }

    /// At a clean shutdown: keep the stamps of volumes nothing went stale in.
    pub(crate) fn save(&self, db: &Index, callbacks: &Callbacks) {
        let stamps = self.known.lock().clone();
        let res: Result<()> = (|| {
            let w = db.begin_write()?;
            {
                let mut t = w.open_table(STAMPS)?;
                for (v, s) in stamps {
                    if !callbacks.is_dirty(v) {
                        t.insert(v, s)?;
                    }
                }
            }
            w.commit()?;
            Ok(())
        })();
        let _ = res;
    }

    /// Validate the cached objects (those without logged changes: they keep
    /// their local state until reintegrated) volume by volume: one
    /// `ValidateVolume` each; where the stamp does not prove the volume
    /// unchanged, `GetAttrs` in batches of many fids, never one per file
    /// (`fetch_attrs` caches what one batch answers).
    pub(crate) fn validate_volumes(
        &self,
        p: &Parts,
        s: &Session,
        interrupt: &Interrupt,
        mut fetch_attrs: impl FnMut(&[Fid]) -> Result<Vec<Result<Attr>>>,
    ) -> Result<()> {
        // The server answers at most 14979 fids per GetAttrs (one reply
        // frame); smaller batches also keep each reply quick.
        const BATCH: usize = 4096;
        let mut by_volume: BTreeMap<u32, Vec<Fid>> = BTreeMap::new();
        // The session's own volume even with nothing cached: an empty
        // cache is trivially valid, and the stamp then covers what follows.
        by_volume.entry(s.root.volume).or_default();
        for f in p.cache.known_fids() {
            if !p.cml.mentions(f) {
                by_volume.entry(f.volume).or_default().push(f);
            }
        }
        for (volume, fids) in by_volume {
            let known = self.known.lock().get(&volume).copied();
            // Something of the volume went stale since: check it all.
            let known = known.filter(|_| !p.callbacks.take_dirty(volume));
            let vf = volume_fid(volume);
            let tok = p.callbacks.token(vf);
            let reply = s.call(
                &Msg::ValidateVolume {
                    volume,
                    stamp: known.unwrap_or(0),
                },
                interrupt,
            );
            let (now, valid) = match reply {
                Ok(Msg::VolumeStamp {
                    volume: v,
                    stamp,
                    valid,
                }) if v == volume => (stamp, valid && known.is_some()),
                Ok(m) => {
                    return Err(Error::Protocol(format!(
                        "ValidateVolume answered with {m:?}"
                    )))
                }
                // A volume the server does not have: check its objects.
                Err(Error::Stale(_)) => (u64::MAX, false),
                Err(e) => return Err(e),
            };
            Counters::add(&p.counters.volume_validations, 1);
            if valid {
                // Every cached object of the volume is as the server has
                // it: trusted under the volume callback until it breaks.
                Counters::add(&p.counters.validations_unchanged, fids.len() as u64);
                p.callbacks.grant_via_volume(vf, tok, &fids);
                self.known.lock().insert(volume, now);
                continue;
            }
            for chunk in fids.chunks(BATCH) {
                fetch_attrs(chunk)?;
            }
            if now != u64::MAX {
                // The stamp read before the pass: a change after it breaks
                // the volume callback registered with it (the token says).
                self.known.lock().insert(volume, now);
                p.callbacks.grant(vf, tok);
            }
        }
        Ok(())
    }
}
