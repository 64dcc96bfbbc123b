//! The client modification log: every mutation becomes a `Record`, persisted
//! (durably) in `index.redb` before it is sent or before the mutating call
//! returns. Connected, reintegration happens at once and the caller waits for
//! the server's commit; the record then leaves the log. Disconnected (or in
//! write-disconnected mode) the record waits here, after the log
//! optimisations, until `reintegrate.rs` sends it in batches. Also keeps the
//! fid ranges the server reserved for us, so new objects have final fids even
//! offline.
//!
//! An in-memory mirror of the log (`Log`) answers "which records mention this
//! fid" without decoding the table, so optimisations stay cheap with tens of
//! thousands of records.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};
use redb::{Durability, ReadableTable, TableDefinition};

use super::cache::Index;
use super::tables::{CML, META};
use crate::proto::{Fid, Msg, Record, RecordOp, MAX_BATCH};
use crate::{Error, Result};

/// fid → the server's version of the object before the pending records that
/// change it: what the first of them expects (conflict detection).
const BASE: TableDefinition<&[u8], u64> = TableDefinition::new("cml_base");

/// The end of the store-id lease: every id below it may have been used,
/// by a record that is on disk or by a connected record that a power cut
/// took before its commit reached the disk (connected records are not
/// fsynced: see `log_connected`). A restarted client starts at it, so an id
/// the server may have applied is never used again.
const NEXT_STORE_ID: &str = "next_store_id";
/// Store ids leased per durable write of `NEXT_STORE_ID`. Large: the
/// write's fsync holds every writer of the log (redb commits one at a
/// time), and ids skipped after a crash cost nothing (a u64 counter).
const STORE_ID_LEASE: u64 = 1024;
/// Records with store ids up to this may have reached the server (a batch
/// was sent and its reply may have been lost): they are never cancelled by
/// an optimisation, since the server may already have applied them.
pub(crate) const SENT_UPTO: &str = "sent_upto";

/// Most bytes of file data the log holds inside `StoreInline` records (its
/// mirror keeps them in memory); past it, small stores are logged as plain
/// Stores of their fsynced containers, as large ones are.
pub(crate) const LOG_INLINE_MAX: u64 = 32 << 20;

/// The in-memory mirror of the `cml` table.
#[derive(Default)]
struct Log {
    /// Bytes of file data inside the pending `StoreInline` records.
    inline_bytes: u64,
    recs: BTreeMap<u64, Record>,
    /// fid → store ids of the pending records that mention it (as target,
    /// parent or new object).
    by_fid: HashMap<Fid, BTreeSet<u64>>,
    base: HashMap<Fid, u64>,
    sent_upto: u64,
    /// When each record was logged (this run; older ones count as old).
    logged_at: HashMap<u64, Instant>,
    /// Records of connected writers still waiting for their Reintegrate
    /// (in memory only: after a restart every record is backlog). Backlog
    /// reintegration stops at them; their writers send them.
    connected: BTreeSet<u64>,
    /// Connected records kept in the mirror only, not (yet) in the table
    /// (`log_connected`): written by the next durable commit of the log,
    /// or never, if their batch is acknowledged first.
    unwritten: BTreeSet<u64>,
    /// A change is committed (or committing) and not yet applied here.
    applying: bool,
    /// A record logged with `log_lazy` is not yet durable: no durable
    /// commit of the log came after it.
    lazy: bool,
    /// The next store id to hand out, and the durable lease end
    /// (`NEXT_STORE_ID`) it must stay below without a durable commit.
    next_id: u64,
    lease_end: u64,
    /// The versions the server said our own acknowledged records gave
    /// their targets, and when. A record about an object with no pending
    /// record takes its base from the cache, and a status the server sent
    /// before that acknowledgement (a `GetAttrs` answered while the batch
    /// was in flight, a revalidation) may have set the cached version back
    /// meanwhile: the base is never below what the server said it reached.
    /// Kept [`ACKED_KEEP`], well past any reply still on its way.
    acked: HashMap<Fid, (u64, Instant)>,
    /// `acked` is pruned when it grows past this (twice what the last
    /// pruning kept, at least [`ACKED_PRUNE_AT`]): a pass over it per
    /// acknowledgement would cost every connected write O(entries).
    acked_prune_len: usize,
}

/// How long an acknowledged version guards the next base (see `acked`):
/// a reply comes within the RPC timeout or not at all.
const ACKED_KEEP: Duration = Duration::from_secs(120);
/// Past this many acknowledged versions kept, the old ones are dropped
/// (see `acked_prune_len`).
const ACKED_PRUNE_AT: usize = 4096;

/// Every fid a record mentions.
pub(crate) fn mentions(op: &RecordOp) -> Vec<Fid> {
    match op {
        RecordOp::Store { fid, .. }
        | RecordOp::StoreInline { fid, .. }
        | RecordOp::SetAttr { fid, .. }
        | RecordOp::SetXattr { fid, .. } => vec![*fid],
        RecordOp::Create { parent, fid, .. }
        | RecordOp::CreateWith { parent, fid, .. }
        | RecordOp::Mkdir { parent, fid, .. }
        | RecordOp::Symlink { parent, fid, .. }
        | RecordOp::Mknod { parent, fid, .. }
        | RecordOp::Link { parent, fid, .. }
        | RecordOp::Remove { parent, fid, .. }
        | RecordOp::Rmdir { parent, fid, .. } => vec![*parent, *fid],
        RecordOp::Rename {
            src_parent,
            dst_parent,
            fid,
            ..
        } => vec![*src_parent, *dst_parent, *fid],
    }
}

/// The file a record stores (a Store, or a StoreInline carrying its data).
pub(crate) fn stored(op: &RecordOp) -> Option<Fid> {
    match op {
        RecordOp::Store { fid, .. } | RecordOp::StoreInline { fid, .. } => Some(*fid),
        _ => None,
    }
}

/// Bytes of file data a record carries inside itself.
fn inline_len(op: &RecordOp) -> u64 {
    match op {
        RecordOp::StoreInline { data, .. } | RecordOp::CreateWith { data, .. } => data.len() as u64,
        _ => 0,
    }
}

/// The fid a record creates, if it creates one.
pub(crate) fn created(op: &RecordOp) -> Option<Fid> {
    match op {
        RecordOp::Create { fid, .. }
        | RecordOp::CreateWith { fid, .. }
        | RecordOp::Mkdir { fid, .. }
        | RecordOp::Symlink { fid, .. }
        | RecordOp::Mknod { fid, .. } => Some(*fid),
        _ => None,
    }
}

fn expected_mut(op: &mut RecordOp) -> Option<&mut u64> {
    match op {
        RecordOp::Store {
            expected_version, ..
        }
        | RecordOp::StoreInline {
            expected_version, ..
        }
        | RecordOp::SetAttr {
            expected_version, ..
        } => Some(expected_version),
        _ => None,
    }
}

/// Which attributes a SetAttr sets: setattrs of the same kind cancel.
fn setattr_kind(op: &RecordOp) -> Option<(Fid, [bool; 6])> {
    match op {
        RecordOp::SetAttr {
            fid,
            mode,
            size,
            mtime,
            uid,
            gid,
            atime,
            ..
        } => Some((
            *fid,
            [
                mode.is_some(),
                size.is_some(),
                mtime.is_some(),
                uid.is_some(),
                gid.is_some(),
                atime.is_some(),
            ],
        )),
        _ => None,
    }
}

/// Stage in `w` the rows of the connected records held in memory only
/// (`Log::unwritten`), but those in `except` (which `w` removes): the
/// caller's commit is durable, and redb's durable commit carries every
/// earlier one to disk, so the log on disk holds every record logged
/// before it, as when each record was written at once. Returns the ids
/// staged, for `Log::wrote` once committed.
fn stage_unwritten(log: &Log, w: &redb::WriteTransaction, except: &[u64]) -> Result<Vec<u64>> {
    let ids: Vec<u64> = log
        .unwritten
        .iter()
        .copied()
        .filter(|id| !except.contains(id))
        .collect();
    if ids.is_empty() {
        return Ok(ids);
    }
    let mut cml = w.open_table(CML)?;
    for id in &ids {
        if let Some(r) = log.recs.get(id) {
            cml.insert(*id, &encode_record(r)[..])?;
        }
    }
    Ok(ids)
}

impl Log {
    /// The server says records of ours took these objects to these versions.
    fn note_acked(&mut self, applied: &[(Fid, u64)]) {
        let now = Instant::now();
        for (fid, v) in applied {
            let e = self.acked.entry(*fid).or_insert((*v, now));
            *e = (e.0.max(*v), now);
        }
        if self.acked.len() > self.acked_prune_len.max(ACKED_PRUNE_AT) {
            self.acked.retain(|_, (_, at)| at.elapsed() < ACKED_KEEP);
            self.acked_prune_len = 2 * self.acked.len();
        }
    }

    /// The version a new base for `fid` starts from: the cached one, or
    /// the one our own last acknowledged change reached if that is later.
    fn base_from(&self, fid: Fid, cached: u64) -> u64 {
        self.acked.get(&fid).map_or(cached, |(v, _)| cached.max(*v))
    }

    /// The records `ids` are in the table now.
    fn wrote(&mut self, ids: &[u64]) {
        for id in ids {
            self.unwritten.remove(id);
        }
    }

    fn insert(&mut self, r: Record) {
        for f in mentions(&r.op) {
            self.by_fid.entry(f).or_default().insert(r.store_id);
        }
        self.inline_bytes += inline_len(&r.op);
        if let Some(old) = self.recs.insert(r.store_id, r) {
            self.inline_bytes -= inline_len(&old.op);
        }
    }

    fn take(&mut self, id: u64) -> Option<Record> {
        let r = self.recs.remove(&id)?;
        self.inline_bytes -= inline_len(&r.op);
        for f in mentions(&r.op) {
            if let Some(s) = self.by_fid.get_mut(&f) {
                s.remove(&id);
                if s.is_empty() {
                    self.by_fid.remove(&f);
                }
            }
        }
        self.logged_at.remove(&id);
        self.connected.remove(&id);
        self.unwritten.remove(&id);
        Some(r)
    }

    fn about(&self, fid: Fid) -> impl Iterator<Item = &Record> {
        self.by_fid
            .get(&fid)
            .into_iter()
            .flatten()
            .filter_map(|id| self.recs.get(id))
    }

    /// A pending record created `fid` (it does not exist on the server yet).
    fn created_here(&self, fid: Fid) -> Option<u64> {
        self.about(fid)
            .find(|r| created(&r.op) == Some(fid))
            .map(|r| r.store_id)
    }

    /// Store ids the optimisations cancel when `op` is logged, and whether
    /// `op` itself is cancelled too (a remove of an object that only ever
    /// existed in this log). Records that may have reached the server are
    /// never touched.
    fn cancellations(&self, op: &RecordOp, last_link: bool) -> (Vec<u64>, bool) {
        let movable = |id: &u64| *id > self.sent_upto;
        match op {
            RecordOp::Store { fid, .. } | RecordOp::StoreInline { fid, .. } => {
                let ids = self
                    .about(*fid)
                    .filter(|r| stored(&r.op) == Some(*fid))
                    .map(|r| r.store_id)
                    .filter(movable)
                    .collect();
                (ids, false)
            }
            RecordOp::SetAttr { fid, .. } => {
                let kind = setattr_kind(op);
                let ids = self
                    .about(*fid)
                    .filter(|r| setattr_kind(&r.op) == kind)
                    .map(|r| r.store_id)
                    .filter(movable)
                    .collect();
                (ids, false)
            }
            RecordOp::Remove { fid, .. } | RecordOp::Rmdir { fid, .. } => {
                let Some(made) = self.created_here(*fid) else {
                    // An object the server has: removing its last name makes
                    // its logged stores and setattrs pointless (and their
                    // container goes with the object).
                    if !last_link {
                        return (vec![], false);
                    }
                    let ids = self
                        .about(*fid)
                        .filter(|r| {
                            stored(&r.op) == Some(*fid)
                                || matches!(&r.op, RecordOp::SetAttr { fid: f, .. } if f == fid)
                        })
                        .map(|r| r.store_id)
                        .filter(movable)
                        .collect();
                    return (ids, false);
                };
                let all: Vec<&Record> = self.about(*fid).collect();
                // Only records about the object itself, created in place:
                // a link or rename of it, or an entry made inside the
                // directory, would leave traces on the server the cancel
                // would lose.
                let only_own = all.iter().all(|r| {
                    r.store_id == made
                        || stored(&r.op).is_some()
                        || matches!(&r.op, RecordOp::SetAttr { .. })
                });
                if !only_own || !all.iter().all(|r| movable(&r.store_id)) {
                    return (vec![], false);
                }
                (all.iter().map(|r| r.store_id).collect(), true)
            }
            _ => (vec![], false),
        }
    }
}

fn encode_record(r: &Record) -> Vec<u8> {
    Msg::Reintegrate {
        records: vec![r.clone()],
    }
    .encode()
}

pub(crate) fn decode_record(b: &[u8]) -> Result<Record> {
    let mut records = decode_records(b)?;
    match records.len() {
        1 => Ok(records.remove(0)),
        _ => Err(Error::Protocol("bad CML row".into())),
    }
}

pub(crate) fn encode_records(r: &[Record]) -> Vec<u8> {
    Msg::Reintegrate {
        records: r.to_vec(),
    }
    .encode()
}

pub(crate) fn decode_records(b: &[u8]) -> Result<Vec<Record>> {
    let kind = Msg::Reintegrate { records: vec![] }.kind();
    match Msg::decode_body(kind, b) {
        Ok(Msg::Reintegrate { records }) => Ok(records),
        Ok(_) => Err(Error::Protocol("bad record list".into())),
        // A log written before owners (protocol 1): its creations are the
        // process's, as they were then.
        Err(e) => {
            let me = super::owner::Owner::process();
            crate::proto::message::decode_records_v1(b, (me.uid, me.gid)).map_err(|_| e)
        }
    }
}

/// When a logged record reaches the disk.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sync {
    /// Durable before `log` returns (acknowledged at once).
    Now,
    /// A connected writer's record: the server's commit is the durable
    /// copy (see `log_inner`).
    Connected,
    /// With the next durable commit of the log (`log_lazy`).
    Lazy,
}

/// What logging a mutation did.
pub(crate) struct Logged {
    /// The record, or `None` when an optimisation cancelled it too.
    pub record: Option<Record>,
    /// Earlier records it cancelled.
    pub cancelled: Vec<Record>,
}

pub(crate) struct Cml {
    pub(crate) db: Arc<Index>,
    /// The in-memory mirror. Guards the mirror only: never held while the
    /// index commits (see `begin` and `commit`).
    log: Mutex<Log>,
    /// Signalled when a committed change has been applied to the mirror.
    applied: Condvar,
    /// How many records are pending, for readers that must not take the
    /// log's lock (the reintegrator thread's turns).
    pending: Arc<AtomicUsize>,
}

impl Cml {
    pub fn open(db: Arc<Index>, pending: Arc<AtomicUsize>) -> Result<Cml> {
        let w = db.begin_write()?;
        let mut log = Log::default();
        {
            let cml = w.open_table(CML)?;
            for row in cml.iter()? {
                let (_, v) = row?;
                log.insert(decode_record(v.value())?);
            }
            let base = w.open_table(BASE)?;
            for row in base.iter()? {
                let (k, v) = row?;
                if let Ok(b) = <[u8; 16]>::try_from(k.value()) {
                    log.base.insert(Fid::from_bytes(&b), v.value());
                }
            }
            let meta = w.open_table(META)?;
            for row in meta.iter()? {
                let (k, v) = row?;
                if k.value() == SENT_UPTO {
                    log.sent_upto = v.value();
                }
                if k.value() == NEXT_STORE_ID {
                    log.lease_end = v.value();
                }
            }
        }
        w.commit()?;
        // Ids below the lease end may have gone to the server in records
        // this index lost: start past them (and past every logged record).
        let after_log = log.recs.keys().next_back().map_or(1, |id| id + 1);
        log.next_id = log.lease_end.max(after_log).max(1);
        pending.store(log.recs.len(), Ordering::Relaxed);
        Ok(Cml {
            db,
            log: Mutex::new(log),
            applied: Condvar::new(),
            pending,
        })
    }

    /// Records logged while disconnected, write-disconnected or behind
    /// others: a connected writer must queue behind them.
    pub fn has_backlog(&self) -> bool {
        let l = self.log.lock();
        l.recs.len() > l.connected.len()
    }

    /// The connected records at the head of the log that `ready` accepts,
    /// in order, stopping at the first other record; marked as possibly
    /// sent (in memory: optimisations never touch them). Records at the
    /// very head that are `in_flight` (sent in a batch not yet answered)
    /// are passed over. Also says whether the head of the log (past those)
    /// is backlog.
    pub fn connected_head(
        &self,
        ready: impl Fn(u64) -> bool,
        in_flight: impl Fn(u64) -> bool,
    ) -> (Vec<Record>, bool) {
        let mut l = self.log.lock();
        let mut out = Vec::new();
        let mut backlog = false;
        for (id, r) in &l.recs {
            if !l.connected.contains(id) {
                backlog = out.is_empty();
                break;
            }
            if out.is_empty() && in_flight(*id) {
                continue;
            }
            if !ready(*id) || out.len() >= MAX_BATCH {
                break;
            }
            out.push(r.clone());
        }
        if let Some(last) = out.last() {
            l.sent_upto = l.sent_upto.max(last.store_id);
        }
        (out, backlog)
    }

    /// Make the in-memory `sent_upto` durable (a connected record is kept
    /// after its send failed: the server may have applied it). The commit
    /// is durable, so it also makes every earlier connected record durable
    /// (redb persists non-durable commits with the next durable one).
    pub fn persist_sent_upto(&self) -> Result<()> {
        let v = self.log.lock().sent_upto;
        self.put_sent_upto(v)
    }

    /// Write `sent_upto` in one durable commit of the log, with the
    /// connected records held in memory only (`unwritten`).
    fn put_sent_upto(&self, v: u64) -> Result<()> {
        let (mut w, log) = self.begin()?;
        w.set_durability(Durability::Immediate)?;
        w.open_table(META)?.insert(SENT_UPTO, v)?;
        let staged = stage_unwritten(&log, &w, &[])?;
        let mut log = self.commit(w, log, &[])?;
        log.wrote(&staged);
        Ok(())
    }

    /// Records not yet known to be on the server, in order.
    pub fn pending(&self) -> Vec<Record> {
        self.log.lock().recs.values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.log.lock().recs.len()
    }

    /// A pending record mentions `fid`: its local state is ahead of the
    /// server's, so the cached copy is what the client serves.
    pub fn mentions(&self, fid: Fid) -> bool {
        self.log.lock().by_fid.contains_key(&fid)
    }

    /// Fids with a pending Store: their containers hold the only copy of
    /// the data and must never be evicted.
    pub fn stored_fids(&self) -> Vec<Fid> {
        let l = self.log.lock();
        let mut v: Vec<Fid> = l.recs.values().filter_map(|r| stored(&r.op)).collect();
        v.dedup();
        v
    }

    /// A pending record after `id` stores or resizes `fid` (so its
    /// container may legitimately differ from what record `id` logged).
    pub fn resized_after(&self, fid: Fid, id: u64) -> bool {
        self.log.lock().about(fid).any(|r| {
            r.store_id > id
                && match &r.op {
                    RecordOp::Store { fid: f, .. } | RecordOp::StoreInline { fid: f, .. } => {
                        *f == fid
                    }
                    RecordOp::SetAttr { fid: f, size, .. } => *f == fid && size.is_some(),
                    _ => false,
                }
        })
    }

    pub fn has_store(&self, fid: Fid) -> bool {
        self.log
            .lock()
            .about(fid)
            .any(|r| stored(&r.op) == Some(fid))
    }

    /// The pending records that mention `fid`, in order.
    pub fn records_about(&self, fid: Fid) -> Vec<Record> {
        let l = self.log.lock();
        let mut v: Vec<Record> = l.about(fid).cloned().collect();
        v.sort_by_key(|r| r.store_id);
        v
    }

    /// Whether `len` more bytes of file data may go inside a log record
    /// (`LOG_INLINE_MAX`).
    pub fn inline_room(&self, len: u64) -> bool {
        self.log.lock().inline_bytes + len <= LOG_INLINE_MAX
    }

    /// Log `op` durably. With `optimise`, apply the log optimisations
    /// (a store cancels earlier stores of the file, a setattr earlier ones of
    /// the same kind, removing an object created in this log cancels its
    /// creation and everything about it). `cached_version` is the version of
    /// the target this client knows: with `check`, a Store or SetAttr of an
    /// object the server has carries the server's version from before the
    /// pending records as its expected version, so reintegration detects a
    /// conflicting change by someone else.
    pub fn log(
        &self,
        op: RecordOp,
        cached_version: Option<u64>,
        optimise: bool,
        check: bool,
    ) -> Result<Logged> {
        self.log_with(op, cached_version, optimise, check, true)
    }

    /// As `log`; `last_link` says a Remove takes the object's last name.
    pub fn log_with(
        &self,
        op: RecordOp,
        cached_version: Option<u64>,
        optimise: bool,
        check: bool,
        last_link: bool,
    ) -> Result<Logged> {
        self.log_inner(op, cached_version, optimise, check, last_link, Sync::Now)
    }

    /// As `log` (optimised), but not made durable now: the record becomes
    /// durable with the next durable commit of the log (redb keeps commits
    /// in order, so a crash loses it only together with everything logged
    /// after it), at the latest with `sync_lazy`. For the Create of a file
    /// the caller holds open: its close or fsync logs the file's first
    /// store, whose commit makes both durable with one sync.
    pub fn log_lazy(
        &self,
        op: RecordOp,
        cached_version: Option<u64>,
        check: bool,
    ) -> Result<Logged> {
        {
            // A record that creates an object cancels nothing and checks no
            // version: with its id inside the durable lease it needs no
            // transaction of its own. It waits in the index's riders
            // (`Index::push_log_rider`), which the next transaction of the
            // log or the cache writes, before the cache's saves about it
            // made meanwhile; so what a crash can find is as with an
            // unsynced commit of its own: the record with or without the
            // saves after it, never those saves without it.
            let mut log = self.settled()?;
            let store_id = log
                .next_id
                .max(log.recs.keys().next_back().map_or(1, |id| id + 1));
            let (cancel, gone) = log.cancellations(&op, true);
            if created(&op).is_some() && cancel.is_empty() && !gone && store_id < log.lease_end {
                let r = Record { store_id, op };
                self.db.push_log_rider(store_id, encode_record(&r));
                log.next_id = store_id + 1;
                log.logged_at.insert(store_id, Instant::now());
                log.lazy = true;
                log.insert(r.clone());
                self.pending.store(log.recs.len(), Ordering::Relaxed);
                return Ok(Logged {
                    record: Some(r),
                    cancelled: vec![],
                });
            }
        }
        self.log_inner(op, cached_version, true, check, true, Sync::Lazy)
    }

    /// Make the records logged with `log_lazy` durable, if a durable commit
    /// has not already.
    pub fn sync_lazy(&self) -> Result<()> {
        {
            // Nothing lazy, and no change being committed that may be.
            let l = self.log.lock();
            if !l.lazy && !l.applying {
                return Ok(());
            }
        }
        let (mut w, log) = self.begin()?;
        if !log.lazy {
            return Ok(());
        }
        w.set_durability(Durability::Immediate)?;
        let staged = stage_unwritten(&log, &w, &[])?;
        let mut log = self.commit(w, log, &[])?;
        log.wrote(&staged);
        log.lazy = false;
        Ok(())
    }

    /// Log the record of a connected writer (unoptimised, unchecked), which
    /// sends it itself (`reintegrate.rs`); backlog reintegration leaves it.
    ///
    /// Kept in the mirror only (no index transaction) while its id is
    /// inside the durable lease: a commit that is not fsynced reaches the
    /// disk only with a later durable one, and the usual end of a
    /// connected record is its acknowledgement, which removes it again, so
    /// writing it and removing it are two commits of the one index (whose
    /// writer redb runs one at a time) that nothing needs. Every durable
    /// commit of the log writes the records still held so
    /// (`stage_unwritten`), so what a crash can find in the log is as
    /// before: the kept record of a server that stopped answering
    /// (`persist_sent_upto`), and the records logged before a durable
    /// record.
    pub fn log_connected(&self, op: RecordOp) -> Result<Record> {
        {
            let mut log = self.settled()?;
            let store_id = log
                .next_id
                .max(log.recs.keys().next_back().map_or(1, |id| id + 1));
            if store_id < log.lease_end {
                let mut op = op;
                if let RecordOp::Store { upload_id, .. } = &mut op {
                    if *upload_id == 0 {
                        *upload_id = store_id;
                    }
                }
                let r = Record { store_id, op };
                log.next_id = store_id + 1;
                log.logged_at.insert(store_id, Instant::now());
                log.connected.insert(store_id);
                log.unwritten.insert(store_id);
                log.insert(r.clone());
                self.pending.store(log.recs.len(), Ordering::Relaxed);
                return Ok(r);
            }
        }
        // Past the lease: one durable commit extends it (and writes this
        // record and the others held in memory).
        let l = self.log_inner(op, None, false, false, true, Sync::Connected)?;
        Ok(l.record.expect("an unoptimised record is never cancelled"))
    }

    fn log_inner(
        &self,
        mut op: RecordOp,
        cached_version: Option<u64>,
        optimise: bool,
        check: bool,
        last_link: bool,
        sync: Sync,
    ) -> Result<Logged> {
        let connected = sync == Sync::Connected;
        let (mut w, log) = self.begin()?;
        let (cancel, self_cancelled) = if optimise {
            log.cancellations(&op, last_link)
        } else {
            (vec![], false)
        };
        let target = op.target();
        let fresh = log.created_here(target).is_some() || created(&op).is_some();
        let new_base = match cached_version {
            Some(v) if !fresh && !log.base.contains_key(&target) => Some(log.base_from(target, v)),
            _ => None,
        };
        let base = new_base.or_else(|| log.base.get(&target).copied());
        if let Some(e) = expected_mut(&mut op) {
            *e = match (check, fresh, base) {
                (true, false, Some(b)) => b,
                _ => 0,
            };
        }
        // Bases no record will target once the cancelled ones are gone.
        let gone_bases: Vec<Fid> = {
            let mut fids: Vec<Fid> = cancel
                .iter()
                .filter_map(|id| log.recs.get(id).map(|r| r.op.target()))
                .collect();
            fids.sort();
            fids.dedup();
            fids.into_iter()
                .filter(|f| {
                    // (The new record keeps its own target's base.)
                    let kept_by_new = *f == target && !self_cancelled;
                    log.base.contains_key(f)
                        && !kept_by_new
                        && !log
                            .about(*f)
                            .any(|r| r.op.target() == *f && !cancel.contains(&r.store_id))
                })
                .collect()
        };

        // A connected writer's record needs no fsync: it waits for the
        // server's commit, which is the durable copy; if the server stops
        // answering, `keep_connected` makes it durable before the writer is
        // told anything. Every other record is acknowledged once logged.
        // Either way the store-id lease is extended durably before an id
        // past it is used, so no id is ever handed out twice.
        let store_id = log
            .next_id
            .max(log.recs.keys().next_back().map_or(1, |id| id + 1));
        let extend = !self_cancelled && store_id >= log.lease_end;
        let new_lease = store_id + STORE_ID_LEASE;
        let durable = sync == Sync::Now || extend;
        w.set_durability(if durable {
            Durability::Immediate
        } else {
            Durability::None
        })?;
        let rec;
        {
            let mut meta = w.open_table(META)?;
            let mut cml = w.open_table(CML)?;
            let mut bt = w.open_table(BASE)?;
            for id in &cancel {
                cml.remove(*id)?;
            }
            for f in &gone_bases {
                bt.remove(&f.to_bytes()[..])?;
            }
            if self_cancelled {
                rec = None;
            } else {
                // A connected writer uploaded first, under an id of its own.
                if let RecordOp::Store { upload_id, .. } = &mut op {
                    if *upload_id == 0 {
                        *upload_id = store_id;
                    }
                }
                let r = Record { store_id, op };
                cml.insert(store_id, &encode_record(&r)[..])?;
                if extend {
                    meta.insert(NEXT_STORE_ID, new_lease)?;
                }
                if let Some(b) = new_base {
                    bt.insert(&target.to_bytes()[..], b)?;
                }
                rec = Some(r);
            }
        }
        let staged = if durable {
            stage_unwritten(&log, &w, &cancel)?
        } else {
            Vec::new()
        };
        let mut log = self.commit(w, log, &cancel)?;
        log.wrote(&staged);
        if durable {
            log.lazy = false;
        } else if sync == Sync::Lazy {
            log.lazy = true;
        }
        if !self_cancelled {
            log.next_id = store_id + 1;
            if extend {
                log.lease_end = new_lease;
            }
        }
        let cancelled: Vec<Record> = cancel.iter().filter_map(|id| log.take(*id)).collect();
        for f in &gone_bases {
            log.base.remove(f);
        }
        if let Some(r) = &rec {
            if let Some(b) = new_base {
                log.base.insert(target, b);
            }
            log.logged_at.insert(r.store_id, Instant::now());
            if connected {
                log.connected.insert(r.store_id);
            }
            log.insert(r.clone());
        }
        self.pending.store(log.recs.len(), Ordering::Relaxed);
        Ok(Logged {
            record: rec,
            cancelled,
        })
    }

    /// Begin a change of the log: the write transaction first (redb runs
    /// one at a time), then the mirror's lock, once the previous writer has
    /// applied its committed change to it. The caller plans under the lock
    /// and stages its rows in the transaction, then calls `commit`.
    fn begin(&self) -> Result<(redb::WriteTransaction, MutexGuard<'_, Log>)> {
        let w = self.db.begin_write()?;
        Ok((w, self.settled()?))
    }

    /// The mirror's lock, once no committed change is waiting to be
    /// applied to it: a change of the mirror alone (`log_connected`,
    /// `finish_acked` of records held in memory) takes its place in the
    /// commit order here.
    fn settled(&self) -> Result<MutexGuard<'_, Log>> {
        let mut log = self.log.lock();
        // Bounded: the previous writer has committed and needs only this
        // lock to apply; a minute without it means something is wrong.
        for _ in 0..1200 {
            if !log.applying {
                return Ok(log);
            }
            self.applied.wait_for(&mut log, Duration::from_millis(50));
        }
        Err(Error::Again(
            "the log's previous change was never applied".into(),
        ))
    }

    /// Commit `w` with the mirror's lock released (no lock is held across
    /// the fsync), then take the lock again to apply the change. Readers
    /// meanwhile see the log as it was, and the next writer waits in
    /// `begin` until this change is applied, so the mirror follows the
    /// table in commit order. On failure nothing is applied.
    fn commit<'a>(
        &'a self,
        w: redb::WriteTransaction,
        mut log: MutexGuard<'a, Log>,
        removing: &[u64],
    ) -> Result<MutexGuard<'a, Log>> {
        // The cache's saves waiting for a transaction ride in this one
        // (`Cache::set_riding`): one commit instead of one more each.
        let riders = self.db.stage_riders(&w, removing)?;
        log.applying = true;
        drop(log);
        let r = w.commit();
        if r.is_err() {
            self.db.riders_failed(riders);
        }
        let mut log = self.log.lock();
        log.applying = false;
        self.applied.notify_all();
        r.map_err(|e| self.db.report(e.into()))?;
        Ok(log)
    }

    /// The last record stays in the log because the server stopped
    /// answering: from now on it is a disconnected record, so it checks the
    /// version this client had (if its target is a file the server has).
    pub fn check_kept(&self, id: u64, cached_version: Option<u64>) -> Result<()> {
        let (w, mut log) = self.begin()?;
        log.connected.remove(&id);
        let Some(r) = log.recs.get(&id) else {
            return Ok(());
        };
        let mut r = r.clone();
        let target = r.op.target();
        let mut base = None;
        if let (Some(v), Some(e)) = (cached_version, expected_mut(&mut r.op)) {
            if log.created_here(target).is_none() {
                let b = log
                    .base
                    .get(&target)
                    .copied()
                    .unwrap_or_else(|| log.base_from(target, v));
                *e = b;
                base = Some(b);
            }
        }
        // A backlog record from now on: in the table, whatever it checks.
        if base.is_none() && !log.unwritten.contains(&id) {
            return Ok(());
        }
        let staged = {
            w.open_table(CML)?.insert(id, &encode_record(&r)[..])?;
            if let Some(b) = base {
                w.open_table(BASE)?.insert(&target.to_bytes()[..], b)?;
            }
            stage_unwritten(&log, &w, &[id])?
        };
        let mut log = self.commit(w, log, &[])?;
        log.wrote(&staged);
        log.unwritten.remove(&id);
        if let Some(b) = base {
            log.base.entry(target).or_insert(b);
        }
        log.recs.insert(id, r);
        Ok(())
    }

    /// Remove connected records the server acknowledged (`applied`: the
    /// versions it gave their targets). Not fsynced: a crash before the
    /// index reaches the disk leaves them logged, and their replay is
    /// answered "already applied" by their store ids.
    pub fn finish_acked(&self, ids: &[u64], applied: &[(Fid, u64)]) -> Result<()> {
        {
            // Held in memory only (the usual case): nothing to remove from
            // the table.
            let mut log = self.settled()?;
            if ids
                .iter()
                .all(|id| !log.recs.contains_key(id) || log.unwritten.contains(id))
            {
                for id in ids {
                    log.take(*id);
                }
                log.note_acked(applied);
                self.pending.store(log.recs.len(), Ordering::Relaxed);
                return Ok(());
            }
        }
        let (mut w, log) = self.begin()?;
        w.set_durability(Durability::None)?;
        {
            let mut cml = w.open_table(CML)?;
            for id in ids {
                cml.remove(*id)?;
            }
        }
        let mut log = self.commit(w, log, ids)?;
        for id in ids {
            log.take(*id);
        }
        log.note_acked(applied);
        self.pending.store(log.recs.len(), Ordering::Relaxed);
        Ok(())
    }

    /// Take the records leaving the log (applied, or moved to a conflict)
    /// and, for the applied ones, the server's new versions of their
    /// targets: later records on those objects now expect these.
    pub fn finish(&self, ids: &[u64], applied: &[(Fid, u64)]) -> Result<Vec<Record>> {
        let (w, log) = self.begin()?;
        let leaving: BTreeSet<u64> = ids
            .iter()
            .copied()
            .filter(|id| log.recs.contains_key(id))
            .collect();
        let mut touched: Vec<Fid> = leaving
            .iter()
            .filter_map(|id| log.recs.get(id).map(|r| r.op.target()))
            .collect();
        touched.sort();
        touched.dedup();
        let mut bases: HashMap<Fid, Option<u64>> = HashMap::new();
        {
            let mut cml = w.open_table(CML)?;
            let mut bt = w.open_table(BASE)?;
            for id in ids {
                cml.remove(*id)?;
            }
            for f in touched {
                let still = log
                    .about(f)
                    .any(|r| r.op.target() == f && !leaving.contains(&r.store_id));
                if !still {
                    bt.remove(&f.to_bytes()[..])?;
                    bases.insert(f, None);
                } else if let Some(v) = log.base.get(&f) {
                    // A batch may change an object more than once: the
                    // version after its last change (versions only grow).
                    let v = applied
                        .iter()
                        .filter(|(a, _)| *a == f)
                        .map(|(_, v)| *v)
                        .max()
                        .unwrap_or(*v);
                    bt.insert(&f.to_bytes()[..], v)?;
                    bases.insert(f, Some(v));
                }
            }
        }
        let staged = stage_unwritten(&log, &w, ids)?;
        let mut log = self.commit(w, log, ids)?;
        log.wrote(&staged);
        let out: Vec<Record> = ids.iter().filter_map(|id| log.take(*id)).collect();
        log.note_acked(applied);
        for (fid, v) in applied {
            if let Some(b) = log.base.get_mut(fid) {
                *b = (*b).max(*v);
            }
        }
        for (f, b) in bases {
            match b {
                None => {
                    log.base.remove(&f);
                }
                Some(v) => {
                    log.base.insert(f, v);
                }
            }
        }
        self.pending.store(log.recs.len(), Ordering::Relaxed);
        Ok(out)
    }

    /// The next batch to send: up to `max` records (and `max_bytes` of
    /// encoded records, so it fits one frame), only those logged before
    /// `older_than` if given. Expected versions are set for sending: the
    /// first record about an object in the batch expects the base version,
    /// later ones check nothing (the batch is atomic, so the first check
    /// covers them). Marks the batch as possibly sent, durably, first.
    pub fn next_batch(
        &self,
        max: usize,
        max_bytes: usize,
        older_than: Option<Instant>,
    ) -> Result<Vec<Record>> {
        let mut log = self.log.lock();
        let mut out: Vec<Record> = Vec::new();
        let mut bytes = 0;
        let mut seen = std::collections::HashSet::new();
        for r in log.recs.values() {
            if out.len() >= max || log.connected.contains(&r.store_id) {
                break;
            }
            if let Some(t) = older_than {
                if log.logged_at.get(&r.store_id).is_some_and(|at| *at > t) {
                    break;
                }
            }
            let n = encode_record(r).len();
            if !out.is_empty() && bytes + n > max_bytes {
                break;
            }
            bytes += n;
            let mut r = r.clone();
            let target = r.op.target();
            let first = seen.insert(target);
            let base = log.base.get(&target).copied();
            if let Some(e) = expected_mut(&mut r.op) {
                if *e != 0 {
                    *e = if first { base.unwrap_or(*e) } else { 0 };
                }
            }
            out.push(r);
        }
        let raise = out
            .last()
            .map(|r| r.store_id)
            .filter(|id| *id > log.sent_upto);
        if let Some(id) = raise {
            // In memory first (optimisations stop touching them now), then
            // durably, without the lock, before anything is sent.
            log.sent_upto = id;
            drop(log);
            self.put_sent_upto(id)?;
        }
        Ok(out)
    }

    /// Records of the pending log that depend on the record `id` (which is
    /// leaving it): those about the same objects, the object it creates, or
    /// objects inside a directory it creates; transitively.
    pub fn dependents(&self, id: u64) -> Vec<u64> {
        let log = self.log.lock();
        let Some(first) = log.recs.get(&id) else {
            return vec![];
        };
        let mut tainted: BTreeSet<Fid> = BTreeSet::new();
        tainted.insert(first.op.target());
        let mut out = vec![id];
        for (sid, r) in log.recs.range(id + 1..) {
            // A record about a tainted object, or an entry in a tainted
            // directory, depends on it.
            if mentions(&r.op).iter().any(|f| tainted.contains(f)) {
                tainted.insert(r.op.target());
                out.push(*sid);
            }
        }
        out
    }
}

/// Whether this index has ever numbered a record: an index that has not
/// must not carry on an old client id, whose store ids the server has
/// already seen (see `identity.rs`).
pub(crate) fn has_numbered_records(db: &Index) -> Result<bool> {
    let r = db.begin_read()?;
    match r.open_table(META) {
        Ok(t) => Ok(t.get(NEXT_STORE_ID)?.is_some()),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Timespec;

    fn tmp(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("coda-cml-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn open(dir: &std::path::Path) -> Cml {
        Cml::open(
            Arc::new(Index::at(&dir.join("i.redb"))),
            Arc::new(AtomicUsize::new(0)),
        )
        .unwrap()
    }

    fn store(fid: Fid) -> RecordOp {
        RecordOp::Store {
            fid,
            expected_version: 0,
            upload_id: 0,
            length: 3,
            mtime: Timespec::now(),
        }
    }

    fn setattr(fid: Fid, mode: Option<u32>, size: Option<u64>) -> RecordOp {
        RecordOp::SetAttr {
            fid,
            expected_version: 0,
            mode,
            size,
            mtime: None,
            uid: None,
            gid: None,
            atime: None,
        }
    }

    const DIR: Fid = Fid::new(1, 1, 1);

    fn create(fid: Fid, name: &str) -> RecordOp {
        RecordOp::Create {
            parent: DIR,
            name: name.into(),
            fid,
            mode: 0o644,
            mtime: Timespec::now(),
            uid: 0,
            gid: 0,
        }
    }

    #[test]
    fn store_ids_grow_across_restarts_and_records_round_trip() {
        let dir = tmp("ids");
        let f = Fid::new(1, 5, 1);
        let first = {
            let cml = open(&dir);
            let a = cml
                .log(store(f), None, false, false)
                .unwrap()
                .record
                .unwrap();
            let b = cml
                .log(store(f), None, false, false)
                .unwrap()
                .record
                .unwrap();
            assert_eq!(b.store_id, a.store_id + 1);
            assert!(matches!(b.op, RecordOp::Store { upload_id, .. } if upload_id == b.store_id));
            cml.finish(&[a.store_id, b.store_id], &[]).unwrap();
            b.store_id
        };
        let cml = open(&dir);
        assert!(cml.pending().is_empty());
        let c = cml
            .log(store(f), None, false, false)
            .unwrap()
            .record
            .unwrap();
        assert!(
            c.store_id > first,
            "the server would take a reused id for a replay"
        );
        drop(cml);
        assert_eq!(open(&dir).pending(), vec![c], "the log is durable");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Connected records are committed without an fsync, so a power cut
    /// can take one the server already applied. Ids come from a durable
    /// lease: a restarted client starts past every id it may have used.
    #[test]
    fn connected_records_take_ids_from_a_durable_lease_never_reused_after_a_restart() {
        let dir = tmp("lease");
        let f = Fid::new(1, 5, 1);
        let used = {
            let cml = open(&dir);
            let ids: Vec<u64> = (0..3)
                .map(|_| cml.log_connected(store(f)).unwrap().store_id)
                .collect();
            assert_eq!(ids, vec![1, 2, 3], "consecutive within a run");
            cml.finish_acked(&ids, &[]).unwrap();
            3
        };
        let cml = open(&dir);
        let next = cml.log_connected(store(f)).unwrap().store_id;
        assert!(
            next > used && next >= STORE_ID_LEASE,
            "a restart starts at the lease end ({STORE_ID_LEASE}), got {next}"
        );
        // Crossing the lease end extends it: ids keep growing by one.
        let more: Vec<u64> = (0..STORE_ID_LEASE + 2)
            .map(|_| cml.log_connected(store(f)).unwrap().store_id)
            .collect();
        assert!(more.windows(2).all(|w| w[1] == w[0] + 1));
        let top = *more.last().unwrap();
        drop(cml);
        let cml = open(&dir);
        assert!(cml.log_connected(store(f)).unwrap().store_id > top);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The store ids whose rows are in the log's table now.
    fn rows(cml: &Cml) -> Vec<u64> {
        let r = cml.db.begin_read().unwrap();
        let t = r.open_table(CML).unwrap();
        t.iter()
            .unwrap()
            .map(|row| row.unwrap().0.value())
            .collect()
    }

    /// A connected record inside the lease is held in memory only: its
    /// acknowledgement leaves no transaction behind, and the next durable
    /// commit of the log writes those still held (a kept record after the
    /// server stopped answering, a record logged durably behind them), so
    /// a restart finds them.
    #[test]
    fn connected_records_stay_in_memory_until_a_durable_commit_writes_them() {
        let dir = tmp("unwritten");
        let f = Fid::new(1, 5, 1);
        let (a, b, c, d) = {
            let cml = open(&dir);
            // The first one extends the lease: one durable commit.
            let a = cml.log_connected(store(f)).unwrap().store_id;
            assert_eq!(rows(&cml), vec![a]);
            let b = cml.log_connected(store(f)).unwrap().store_id;
            let c = cml
                .log_connected(create(Fid::new(1, 6, 1), "c"))
                .unwrap()
                .store_id;
            assert_eq!(rows(&cml), vec![a], "held in memory only");
            assert_eq!(cml.len(), 3);
            cml.finish_acked(&[a, b], &[]).unwrap();
            assert_eq!(rows(&cml), Vec::<u64>::new(), "the written one removed");
            assert_eq!(cml.len(), 1);
            // The server stopped answering: the durable commit writes it.
            cml.persist_sent_upto().unwrap();
            assert_eq!(rows(&cml), vec![c]);
            // Another held record, then a record logged durably behind it.
            let d = cml.log_connected(store(f)).unwrap().store_id;
            assert_eq!(rows(&cml), vec![c]);
            let e = log_setattr(&cml);
            assert_eq!(rows(&cml), vec![c, d, e]);
            (a, b, c, d)
        };
        let cml = open(&dir);
        let ids: Vec<u64> = cml.pending().iter().map(|r| r.store_id).collect();
        assert_eq!(ids.len(), 3);
        assert_eq!(&ids[..2], &[c, d]);
        assert!(!ids.contains(&a) && !ids.contains(&b));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Log a chmod of a fixed fid durably; its store id.
    fn log_setattr(cml: &Cml) -> u64 {
        let logged = cml.log(
            setattr(Fid::new(1, 7, 1), Some(0o600), None),
            Some(1),
            false,
            false,
        );
        logged.unwrap().record.unwrap().store_id
    }

    /// A lazily logged create inside the lease takes no transaction of its
    /// own: it waits in the index's riders and the next transaction writes
    /// it (here the file's durable inline store, one commit for both); a
    /// remove that cancels it before then leaves no row; one still waiting
    /// when the client dies is lost, as an unsynced commit would be, and
    /// nothing logged before it.
    #[test]
    fn a_lazy_create_waits_for_the_next_transaction_of_the_log() {
        let dir = tmp("lazy");
        let (first, a, s) = {
            let cml = open(&dir);
            // The first record extends the lease (a durable commit).
            let first = log_setattr(&cml);
            let f = Fid::new(1, 8, 1);
            let a = cml.log_lazy(create(f, "a"), None, false).unwrap();
            let a = a.record.unwrap().store_id;
            assert_eq!(rows(&cml), vec![first], "no transaction");
            assert_eq!(cml.len(), 2);
            let s = cml.log(inline(f, b"abc"), None, true, false).unwrap();
            let s = s.record.unwrap().store_id;
            assert_eq!(rows(&cml), vec![first, a, s]);
            let g = Fid::new(1, 9, 1);
            cml.log_lazy(create(g, "b"), None, false).unwrap();
            let rm = RecordOp::Remove {
                parent: DIR,
                name: "b".into(),
                fid: g,
            };
            let l = cml.log(rm, None, true, false).unwrap();
            assert!(l.record.is_none());
            assert_eq!(l.cancelled.len(), 1);
            assert_eq!(rows(&cml), vec![first, a, s], "cancelled unwritten");
            cml.log_lazy(create(Fid::new(1, 10, 1), "c"), None, false)
                .unwrap();
            assert_eq!(cml.len(), 4);
            (first, a, s)
        };
        let cml = open(&dir);
        let ids: Vec<u64> = cml.pending().iter().map(|r| r.store_id).collect();
        assert_eq!(ids, vec![first, a, s]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A kept record (the server stopped answering) is written by
    /// `check_kept` even when it checks no version (a file created in the
    /// log), and a refused one held in memory leaves with `finish`.
    #[test]
    fn a_kept_connected_record_is_written_and_a_refused_one_leaves() {
        let dir = tmp("kept");
        {
            let cml = open(&dir);
            let first = cml
                .log_connected(store(Fid::new(1, 4, 1)))
                .unwrap()
                .store_id;
            cml.finish_acked(&[first], &[]).unwrap();
            let made = Fid::new(1, 8, 1);
            let k = cml.log_connected(create(made, "k")).unwrap().store_id;
            let r = cml
                .log_connected(store(Fid::new(1, 9, 1)))
                .unwrap()
                .store_id;
            cml.check_kept(k, Some(3)).unwrap();
            assert_eq!(
                rows(&cml),
                vec![k, r],
                "the kept record and the one before the commit"
            );
            cml.finish(&[r], &[]).unwrap();
            assert_eq!(rows(&cml), vec![k]);
            assert!(cml.has_backlog(), "the kept record is backlog now");
        }
        let cml = open(&dir);
        assert_eq!(cml.len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The next connected batch starts past the records in flight at the
    /// head of the log, takes the queued ones in order, and stops at the
    /// first record not queued (its writer has not queued it yet, or it
    /// was refused and is leaving).
    #[test]
    fn connected_head_passes_over_records_in_flight_and_stops_at_a_gap() {
        let dir = tmp("head");
        let cml = open(&dir);
        let ids: Vec<u64> = (0..6u64)
            .map(|i| {
                cml.log_connected(create(Fid::new(1, 10 + i, 1), &format!("n{i}")))
                    .unwrap()
                    .store_id
            })
            .collect();
        let ids_of = |b: Vec<Record>| b.iter().map(|r| r.store_id).collect::<Vec<_>>();
        // 0 and 1 in flight; 2 and 3 queued; 4 not queued; 5 queued.
        let flying = |id: u64| id == ids[0] || id == ids[1];
        let queued = |id: u64| [ids[2], ids[3], ids[5]].contains(&id);
        let (b, backlog) = cml.connected_head(queued, flying);
        assert_eq!((ids_of(b), backlog), (vec![ids[2], ids[3]], false));
        // In flight only at the head: a record in flight after a queued
        // one ends the batch there (never sent out of order).
        let (b, _) = cml.connected_head(|id| id == ids[0], |id| id == ids[1]);
        assert_eq!(ids_of(b), vec![ids[0]]);
        // Nothing in flight: from the head.
        let (b, _) = cml.connected_head(|_| true, |_| false);
        assert_eq!(ids_of(b), ids);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_store_cancels_earlier_stores_of_the_same_file_and_keeps_the_base_version() {
        let dir = tmp("store");
        let cml = open(&dir);
        let (f, g) = (Fid::new(1, 5, 1), Fid::new(1, 6, 1));
        cml.log(store(f), Some(7), true, true).unwrap();
        cml.log(store(g), Some(3), true, true).unwrap();
        let l = cml.log(store(f), Some(8), true, true).unwrap();
        assert_eq!(l.cancelled.len(), 1);
        let p = cml.pending();
        assert_eq!(p.len(), 2);
        assert!(matches!(p[1].op, RecordOp::Store { fid, expected_version: 7, .. } if fid == f));
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn inline(fid: Fid, data: &[u8]) -> RecordOp {
        RecordOp::StoreInline {
            fid,
            expected_version: 0,
            mtime: Timespec::now(),
            data: data.to_vec(),
        }
    }

    /// A store logged with its data inside (write-back, disconnected) is a
    /// store to every optimisation: it cancels earlier stores of the file,
    /// plain or inline, and is cancelled by later ones and by the remove of
    /// a file created in the log; it checks the base version; the bytes the
    /// log holds inline are counted, and survive a restart.
    #[test]
    fn an_inline_store_is_a_store_to_the_optimisations_and_keeps_its_bytes() {
        let dir = tmp("inline");
        let (f, g) = (Fid::new(1, 5, 1), Fid::new(1, 80, 1));
        {
            let cml = open(&dir);
            cml.log(store(f), Some(7), true, true).unwrap();
            let l = cml.log(inline(f, b"abcd"), Some(8), true, true).unwrap();
            assert_eq!(l.cancelled.len(), 1, "the plain store went");
            assert!(cml.has_store(f) && cml.stored_fids() == vec![f]);
            assert!(matches!(
                &cml.pending()[..],
                [Record { op: RecordOp::StoreInline { expected_version: 7, data, .. }, .. }] if data == b"abcd"
            ));
            let l = cml.log(inline(f, b"xy"), Some(9), true, true).unwrap();
            assert_eq!(l.cancelled.len(), 1, "the older inline store went");
            assert_eq!(cml.log.lock().inline_bytes, 2);
            assert!(cml.inline_room(LOG_INLINE_MAX - 2) && !cml.inline_room(LOG_INLINE_MAX - 1));
            // A file made in the log and removed: nothing of it is left.
            cml.log(create(g, "g"), None, true, true).unwrap();
            assert!(cml.log.lock().created_here(g).is_some());
            cml.log(inline(g, b"gg"), Some(1), true, true).unwrap();
            let rm = RecordOp::Remove {
                parent: DIR,
                name: "g".into(),
                fid: g,
            };
            let l = cml.log(rm, Some(2), true, true).unwrap();
            assert!(l.record.is_none() && l.cancelled.len() == 2);
            assert_eq!(cml.log.lock().inline_bytes, 2);
            assert!(cml.log.lock().created_here(g).is_none());
        }
        let cml = open(&dir);
        assert_eq!(cml.log.lock().inline_bytes, 2, "counted again at open");
        let p = cml.pending();
        assert!(
            matches!(&p[..], [Record { op: RecordOp::StoreInline { data, .. }, .. }] if data == b"xy")
        );
        // A plain store replaces the inline one.
        let l = cml.log(store(f), Some(9), true, true).unwrap();
        assert_eq!(l.cancelled.len(), 1);
        assert_eq!(cml.log.lock().inline_bytes, 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn setattrs_of_the_same_kind_cancel_and_other_kinds_stay() {
        let dir = tmp("setattr");
        let cml = open(&dir);
        let f = Fid::new(1, 5, 1);
        cml.log(setattr(f, Some(0o600), None), Some(2), true, true)
            .unwrap();
        cml.log(setattr(f, None, Some(0)), Some(3), true, true)
            .unwrap();
        let l = cml
            .log(setattr(f, Some(0o644), None), Some(4), true, true)
            .unwrap();
        assert_eq!(l.cancelled.len(), 1);
        let p = cml.pending();
        assert_eq!(p.len(), 2);
        assert!(matches!(
            p[0].op,
            RecordOp::SetAttr {
                size: Some(0),
                expected_version: 2,
                ..
            }
        ));
        assert!(matches!(
            p[1].op,
            RecordOp::SetAttr {
                mode: Some(0o644),
                ..
            }
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn removing_a_file_created_in_the_log_cancels_everything_about_it() {
        let dir = tmp("remove");
        let cml = open(&dir);
        let (f, other) = (Fid::new(1, 50, 1), Fid::new(1, 51, 1));
        cml.log(create(f, "a"), None, true, true).unwrap();
        cml.log(create(other, "b"), None, true, true).unwrap();
        cml.log(store(f), Some(1), true, true).unwrap();
        cml.log(setattr(f, Some(0o600), None), Some(2), true, true)
            .unwrap();
        let l = cml
            .log(
                RecordOp::Remove {
                    parent: DIR,
                    name: "a".into(),
                    fid: f,
                },
                Some(3),
                true,
                true,
            )
            .unwrap();
        assert!(l.record.is_none(), "the remove itself is cancelled");
        assert_eq!(l.cancelled.len(), 3);
        let p = cml.pending();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].op.target(), other);
        assert!(!cml.mentions(f));
        // Offline-created objects are checked by nobody: expected stays 0.
        cml.log(store(other), Some(1), true, true).unwrap();
        assert!(matches!(
            cml.pending()[1].op,
            RecordOp::Store {
                expected_version: 0,
                ..
            }
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn removing_the_last_name_of_a_server_file_cancels_its_stores_and_setattrs() {
        let dir = tmp("remove-old");
        let cml = open(&dir);
        let f = Fid::new(1, 70, 1);
        cml.log(store(f), Some(4), true, true).unwrap();
        cml.log(setattr(f, Some(0o600), None), Some(5), true, true)
            .unwrap();
        let rm = RecordOp::Remove {
            parent: DIR,
            name: "old".into(),
            fid: f,
        };
        let l = cml
            .log_with(rm.clone(), Some(6), true, true, false)
            .unwrap();
        assert!(l.cancelled.is_empty(), "another name remains: kept");
        cml.finish(&[l.record.unwrap().store_id], &[]).unwrap();
        let l = cml.log(rm, Some(6), true, true).unwrap();
        assert_eq!(l.cancelled.len(), 2);
        assert!(matches!(&cml.pending()[..], [r] if matches!(r.op, RecordOp::Remove { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn removing_an_empty_directory_made_in_the_log_cancels_the_mkdir() {
        let dir = tmp("rmdir");
        let cml = open(&dir);
        let d = Fid::new(1, 60, 1);
        let mkdir = RecordOp::Mkdir {
            parent: DIR,
            name: "d".into(),
            fid: d,
            mode: 0o755,
            mtime: Timespec::now(),
            uid: 0,
            gid: 0,
        };
        cml.log(mkdir, None, true, true).unwrap();
        let rmdir = RecordOp::Rmdir {
            parent: DIR,
            name: "d".into(),
            fid: d,
        };
        let l = cml.log(rmdir.clone(), Some(1), true, true).unwrap();
        assert!(l.record.is_none());
        assert!(cml.pending().is_empty());
        // A directory that once held an entry of its own keeps its records.
        let d2 = Fid::new(1, 61, 1);
        let mk2 = RecordOp::Mkdir {
            parent: DIR,
            name: "e".into(),
            fid: d2,
            mode: 0o755,
            mtime: Timespec::now(),
            uid: 0,
            gid: 0,
        };
        cml.log(mk2, None, true, true).unwrap();
        let x = Fid::new(1, 62, 1);
        let made_inside = RecordOp::Create {
            parent: d2,
            name: "x".into(),
            fid: x,
            mode: 0o644,
            mtime: Timespec::now(),
            uid: 0,
            gid: 0,
        };
        cml.log(made_inside, None, true, true).unwrap();
        let ren = RecordOp::Rename {
            src_parent: d2,
            src_name: "x".into(),
            dst_parent: DIR,
            dst_name: "x".into(),
            fid: x,
            replaces: crate::proto::Replaces::Nothing,
        };
        cml.log(ren, Some(1), true, true).unwrap();
        let rm2 = RecordOp::Rmdir {
            parent: DIR,
            name: "e".into(),
            fid: d2,
        };
        let l = cml.log(rm2, Some(3), true, true).unwrap();
        assert!(l.record.is_some() && l.cancelled.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn records_that_may_have_been_sent_are_never_cancelled() {
        let dir = tmp("sent");
        let cml = open(&dir);
        let f = Fid::new(1, 5, 1);
        cml.log(store(f), Some(4), true, true).unwrap();
        let batch = cml.next_batch(10, 1 << 20, None).unwrap();
        assert_eq!(batch.len(), 1);
        let l = cml.log(store(f), Some(5), true, true).unwrap();
        assert!(l.cancelled.is_empty(), "in flight: kept");
        // In one batch, only the first record about an object checks.
        let b = cml.next_batch(10, 1 << 20, None).unwrap();
        assert!(matches!(
            b[0].op,
            RecordOp::Store {
                expected_version: 4,
                ..
            }
        ));
        assert!(matches!(
            b[1].op,
            RecordOp::Store {
                expected_version: 0,
                ..
            }
        ));
        // After the first is applied (server now at 5), the second expects 5.
        cml.finish(&[b[0].store_id], &[(f, 5)]).unwrap();
        drop(cml);
        let cml = open(&dir);
        let b = cml.next_batch(10, 1 << 20, None).unwrap();
        assert!(matches!(
            b[0].op,
            RecordOp::Store {
                expected_version: 5,
                ..
            }
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn expects(r: &Record) -> u64 {
        match r.op {
            RecordOp::Store {
                expected_version, ..
            } => expected_version,
            _ => panic!("{r:?}"),
        }
    }

    #[test]
    fn a_batch_that_changed_an_object_twice_leaves_the_later_version_as_base() {
        let dir = tmp("twice");
        let cml = open(&dir);
        let f = Fid::new(1, 5, 1);
        cml.log(store(f), Some(4), true, true).unwrap();
        let first = cml.next_batch(10, 1 << 20, None).unwrap();
        // Logged while the first is in flight: not cancelled, sent after it.
        cml.log(store(f), Some(5), true, true).unwrap();
        let both = cml.next_batch(10, 1 << 20, None).unwrap();
        assert_eq!((first.len(), both.len()), (1, 2));
        // A third, logged before the two are acknowledged together.
        cml.log(store(f), Some(6), true, true).unwrap();
        let ids: Vec<u64> = both.iter().map(|r| r.store_id).collect();
        cml.finish(&ids, &[(f, 5), (f, 6)]).unwrap();
        let b = cml.next_batch(10, 1 << 20, None).unwrap();
        assert_eq!(b.len(), 1);
        assert_eq!(expects(&b[0]), 6, "the server is at 6, not 5");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_base_is_never_below_the_version_our_own_acknowledged_change_reached() {
        let dir = tmp("acked");
        let cml = open(&dir);
        let f = Fid::new(1, 5, 1);
        cml.log(store(f), Some(4), true, true).unwrap();
        let b = cml.next_batch(10, 1 << 20, None).unwrap();
        cml.finish(&[b[0].store_id], &[(f, 5)]).unwrap();
        // The cache was set back to 4 by a status the server sent before
        // it applied the store: the next record still expects 5.
        cml.log(store(f), Some(4), true, true).unwrap();
        let b = cml.next_batch(10, 1 << 20, None).unwrap();
        assert_eq!(expects(&b[0]), 5);
        // A later version someone else made (the cache revalidated) wins.
        cml.finish(&[b[0].store_id], &[(f, 6)]).unwrap();
        cml.log(store(f), Some(9), true, true).unwrap();
        let b = cml.next_batch(10, 1 << 20, None).unwrap();
        assert_eq!(expects(&b[0]), 9);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn acknowledged_versions_are_pruned_once_old_and_not_at_every_acknowledgement() {
        let mut log = Log::default();
        let old = Instant::now() - ACKED_KEEP - Duration::from_secs(1);
        for v in 0..ACKED_PRUNE_AT as u64 {
            log.acked.insert(Fid::new(1, v + 10, 1), (v, old));
        }
        let recent = |v: u64| Fid::new(2, v, 1);
        log.note_acked(&[(recent(0), 1)]);
        assert_eq!(log.acked.len(), 1, "past the limit the old ones go");
        log.note_acked(&[(recent(1), 1)]);
        assert_eq!(log.acked.len(), 2);
        // Recent ones are kept, and the next pass waits for the map to
        // double.
        for v in 2..(ACKED_PRUNE_AT as u64 + 10) {
            log.note_acked(&[(recent(v), 1)]);
        }
        assert_eq!(log.acked.len(), ACKED_PRUNE_AT + 10);
        assert_eq!(log.acked_prune_len, 2 * (ACKED_PRUNE_AT + 1));
        assert_eq!(log.base_from(recent(5), 0), 1);
    }
}
