//! Fid ranges: the server reserves ranges of vnode numbers per volume for
//! this client (`AllocFids`), so new objects get their final fids even
//! offline. This module alone asks the server for ranges and keeps them.
//!
//! Durability without an fsync per create: the index holds, per volume, the
//! range's end and a *lease* (`fid_next.V`): no vnode at or above the lease
//! has been handed out. A vnode below the lease is handed out at once; the
//! one that reaches it first moves the lease `LEASE` ahead (one durable
//! write per `LEASE` creates). After a crash the client starts at the lease,
//! skipping at most `LEASE` unused vnodes, and never reuses one.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use redb::ReadableTable;

use super::cache::Index;
use super::conn::Servers;
use super::tables::META;
use crate::proto::{Fid, Msg};
use crate::{Error, Result};

/// Fids reserved per AllocFids request.
pub(crate) const FID_BATCH: u32 = 1024;
/// Below this many reserved fids left in a volume, a connected client
/// reserves a fresh range, so creation works for a while offline.
pub(crate) const FID_RESERVE_LOW: u64 = 512;
/// Vnodes handed out per durable write of the lease: a quarter of a
/// range, so the creators of a range wait for the lease write four times
/// (every thread creating meanwhile queues behind it), and a crash skips at
/// most a quarter of it.
const LEASE: u64 = FID_BATCH as u64 / 4;

#[derive(Clone, Copy, Default)]
struct Range {
    next: u64,
    end: u64,
    /// Durable: nothing at or above it was handed out.
    leased: u64,
    /// A thread is writing a new lease.
    leasing: bool,
}

pub(crate) struct Fids {
    db: Arc<Index>,
    /// volume → range. Guards only the numbers: never held while the index
    /// is written or the server asked.
    ranges: Mutex<HashMap<u32, Range>>,
    /// Signalled when a lease write ends.
    leased: Condvar,
}

impl Fids {
    pub fn open(db: Arc<Index>) -> Result<Fids> {
        let mut ranges: HashMap<u32, Range> = HashMap::new();
        let r = db.begin_read()?;
        match r.open_table(META) {
            Ok(meta) => {
                for row in meta.iter()? {
                    let (k, v) = row?;
                    let k = k.value().to_string();
                    let v = v.value();
                    let parse = |p: &str| k.strip_prefix(p).and_then(|s| s.parse::<u32>().ok());
                    if let Some(vol) = parse("fid_next.") {
                        let e = ranges.entry(vol).or_default();
                        e.next = v;
                        e.leased = v;
                    } else if let Some(vol) = parse("fid_end.") {
                        ranges.entry(vol).or_default().end = v;
                    }
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(redb::Error::from(e).into()),
        }
        Ok(Fids {
            db,
            ranges: Mutex::new(ranges),
            leased: Condvar::new(),
        })
    }

    /// A fresh fid in `volume` from our reserved range. Connected
    /// (`may_reserve`), reserves more first if it ran out; otherwise with
    /// none left: `NoSpace`.
    pub fn new_fid(&self, servers: &Servers, volume: u32, may_reserve: bool) -> Result<Fid> {
        // Bounded: each turn hands out a fid, fails, or (at most once
        // per range) reserves a new range.
        for _ in 0..8 {
            match self.take(volume)? {
                Some(vnode) => return Ok(Fid::new(volume, vnode, 1)),
                None if !may_reserve => {
                    return Err(Error::NoSpace(format!(
                        "disconnected and no reserved fids left in volume {volume}"
                    )))
                }
                None => self.reserve(servers, volume)?,
            }
        }
        Err(Error::Again(format!(
            "no fid could be reserved in volume {volume}"
        )))
    }

    /// The range of `volume` as it stands: the next vnode it hands out and
    /// its end (exclusive); `None` without one.
    pub fn window(&self, volume: u32) -> Option<(u64, u64)> {
        let g = self.ranges.lock();
        g.get(&volume).map(|r| (r.next, r.end))
    }

    /// Take the next vnode of the range, once it is covered by a durable
    /// lease; `None` if the range is used up.
    fn take(&self, volume: u32) -> Result<Option<u64>> {
        let mut g = self.ranges.lock();
        let Some(r) = g.get_mut(&volume) else {
            return Ok(None);
        };
        if r.next >= r.end {
            return Ok(None);
        }
        let vnode = r.next;
        r.next += 1;
        // Bounded: each turn either finds the lease written by another
        // thread (waits are short: one index write) or writes it.
        loop {
            let r = g.get_mut(&volume).expect("ranges are never removed");
            if vnode < r.leased {
                return Ok(Some(vnode));
            }
            if r.leasing {
                self.leased.wait_for(&mut g, Duration::from_millis(50));
                continue;
            }
            r.leasing = true;
            let lease = (vnode + LEASE).min(r.end.max(vnode + 1));
            drop(g);
            let res = self.put_meta(&[(format!("fid_next.{volume}"), lease)]);
            g = self.ranges.lock();
            let r = g.get_mut(&volume).expect("ranges are never removed");
            r.leasing = false;
            if res.is_ok() && lease > r.leased {
                r.leased = lease;
            }
            self.leased.notify_all();
            res?;
        }
    }

    /// Fids left in our reserved range of `volume`.
    pub fn left(&self, volume: u32) -> u64 {
        self.ranges
            .lock()
            .get(&volume)
            .map(|r| r.end.saturating_sub(r.next))
            .unwrap_or(0)
    }

    /// Ask the server for a fresh range (replacing what is left of ours).
    pub fn reserve(&self, servers: &Servers, volume: u32) -> Result<()> {
        // No lock held while we ask the server or write the index.
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
                self.ranges.lock().insert(
                    volume,
                    Range {
                        next: first_vnode,
                        end,
                        leased: first_vnode,
                        leasing: false,
                    },
                );
                Ok(())
            }
            m => Err(Error::Protocol(format!("AllocFids answered with {m:?}"))),
        }
    }

    fn put_meta(&self, kv: &[(String, u64)]) -> Result<()> {
        self.db.put_meta(kv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_durable_write_per_lease_and_no_vnode_reused_after_a_restart() {
        let dir = std::env::temp_dir().join(format!("coda-fids-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = Arc::new(Index::at(&dir.join("i.redb")));
        let f = Fids::open(db.clone()).unwrap();
        f.put_meta(&[("fid_next.7".into(), 100), ("fid_end.7".into(), 1124)])
            .unwrap();
        drop(f);
        let f = Fids::open(db.clone()).unwrap();
        let n = LEASE + 6;
        let got: Vec<u64> = (0..n).map(|_| f.take(7).unwrap().unwrap()).collect();
        assert_eq!(got, (100..100 + n).collect::<Vec<_>>());
        drop(f);
        // A "crash": the lease says 100 + 2 * LEASE; nothing below it again.
        let f = Fids::open(db.clone()).unwrap();
        assert_eq!(f.take(7).unwrap(), Some(100 + 2 * LEASE));
        assert_eq!(f.left(7), 1124 - (100 + 2 * LEASE) - 1);
        assert_eq!(f.take(8).unwrap(), None, "no range: the caller reserves");
        drop(f);
        drop(db);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
