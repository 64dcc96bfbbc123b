//! The replicated state machine: today's volume store. The leader turns a
//! client's Reintegrate batch or AllocFids request into a log entry; every
//! member applies the entry to its own store in log order, so all stores
//! go through the same states. The leader answers the client with the
//! result of its own application, after the entry committed (a majority
//! has it durably) and its callbacks were broken, as for a lone server.
//!
//! Determinism: a batch carries the time the leader stamped it with, its
//! Store records' data is in `replstage/` on every member that applies it
//! (pushed before the proposal, pulled if missed), and the store-id replay
//! rule lives in the store, so a client's retry on a new leader changes
//! nothing twice.
//!
//! Durability: the Raft log holds every committed entry durably, so the
//! store's own commit of an entry skips its fsync (unless it touches an
//! object file). The store keeps the last log index it applied
//! ([`APPLIED_KEY`]) in the same transaction as the entry's changes, so
//! whatever state a crash leaves, the store knows exactly which entries it
//! holds: a restart re-applies the ones after it, each once. A durable
//! checkpoint every [`CHECKPOINT_EVERY`] (and at a clean stop) bounds that
//! replay, and lets redb reuse the pages the unsynced commits freed.

use std::any::Any;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use redb::{ReadableDatabase, ReadableTable};

use super::config::{resolve, GroupConfig};
use super::data::{fetch, push, replstage_dir, replstage_path};
use super::node::StateMachine;
use super::transport::PeerKey;
use super::Replicator;
use crate::proto::{Fid, Msg, Record, RecordOp, Timespec};
use crate::server::acl::Who;
use crate::server::meta::{existing_table, CLIENT_STORE, SETTINGS};
use crate::server::owners::{self, SweepPlan};
use crate::server::reintegrate::{BatchError, LoggedBatch, Outcome};
use crate::server::sessions::ClientCtx;
use crate::server::volume::{
    check_alloc_count, is_store_failure, reserve_vnodes, ClientId, VolumeStore,
};
use crate::server::{log, objects, Shared};
use crate::{Error, Result};

const OP_REINTEGRATE: u8 = 1;
const OP_ALLOC: u8 = 2;
const OP_SET_ACL: u8 = 3;
const OP_ADMIN: u8 = 4;
/// A client id's claim (or last-seen refresh) by the user who presented it.
const OP_CLAIM: u8 = 5;
/// The leader's sweep of forgotten client ids.
const OP_SWEEP: u8 = 6;
/// Owner rows a leader held only locally (written before claims were
/// entries), taken in by every member.
const OP_ADOPT: u8 = 7;
/// The settings key set by the last entry of a leader's [`OP_ADOPT`]: no
/// later leader needs to propose its rows again.
pub(crate) const OWNERS_LOGGED_KEY: &str = "client_owners_logged";
/// Most ids (or rows) one sweep or adoption entry carries.
const IDS_PER_ENTRY: usize = 1000;
/// The settings key of the last log index an AllocFids applied.
const ALLOC_INDEX_KEY: &str = "raft_alloc_index";
/// The settings key of the last log index whose effects the store holds,
/// written in the same transaction as them (big-endian u64).
pub(crate) const APPLIED_KEY: &str = "raft_applied";
/// How often, at most, the store's applied state is made durable (one
/// fsync); `CODA_REPL_CHECKPOINT_MS` sets another interval (tests).
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// Entries applied without an fsync after which a checkpoint comes early.
const CHECKPOINT_ENTRIES: u64 = 1000;
/// How long a member that missed a Store's data keeps asking the others.
const FETCH_PATIENCE: Duration = Duration::from_secs(60);
/// How long a client's request waits for its entry to commit and apply.
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(20);

/// What an applied entry hands back to its proposer.
pub type Applied = Box<dyn Any + Send>;

/// The volume store as a state machine.
pub struct Machine {
    pub(super) store: Arc<VolumeStore>,
    pub(super) root: PathBuf,
    pub(super) key: PeerKey,
    pub(super) me: u64,
    pub(super) group: Arc<Mutex<GroupConfig>>,
    /// The store's [`APPLIED_KEY`] at start: entries up to it are in the
    /// store already and are not applied again.
    pub(super) start_mark: u64,
    /// The last index whose effects are in the store (in memory).
    pub(super) applied: u64,
    /// The last index written as [`APPLIED_KEY`].
    pub(super) marked: u64,
    /// The last index the store holds durably, as far as this member made it so.
    pub(super) durable: u64,
    /// When the last checkpoint was made.
    pub(super) checkpointed: std::time::Instant,
    /// See [`CHECKPOINT_EVERY`].
    pub(super) checkpoint_every: Duration,
}

/// A batch's entry carries its `after` (0: none) as the message
/// `ReintegrateAfter`; entries written before pipelining hold `Reintegrate`
/// and apply as `after` 0.
fn encode_reintegrate(
    client: &ClientId,
    now: Timespec,
    who: &Who,
    after: u64,
    records: &[Record],
) -> Vec<u8> {
    let msg = Msg::ReintegrateAfter {
        after,
        records: records.to_vec(),
    };
    let mut b = vec![OP_REINTEGRATE];
    b.extend_from_slice(client);
    b.extend_from_slice(&now.sec.to_be_bytes());
    b.extend_from_slice(&now.nsec.to_be_bytes());
    encode_who(&mut b, who);
    b.push(msg.kind());
    b.extend_from_slice(&msg.encode());
    b
}

fn encode_alloc(client: &ClientId, volume: u32, count: u32) -> Vec<u8> {
    let mut b = vec![OP_ALLOC];
    b.extend_from_slice(client);
    b.extend_from_slice(&volume.to_be_bytes());
    b.extend_from_slice(&count.to_be_bytes());
    b
}

/// A claim: `u64 now` (the leader's clock, seconds), then the user's name.
fn encode_claim(client: &ClientId, user: &str, now: u64) -> Vec<u8> {
    let mut b = vec![OP_CLAIM];
    b.extend_from_slice(client);
    b.extend_from_slice(&now.to_be_bytes());
    b.extend_from_slice(user.as_bytes());
    b
}

/// A sweep: `u64 now`, `u64 forget_after`, then the refreshed, forgotten
/// and orphaned ids, each list as `u32 count | ids`.
fn encode_sweep(plan: &SweepPlan, now: u64, forget_after: u64) -> Vec<u8> {
    let mut b = vec![OP_SWEEP];
    b.extend_from_slice(&[0u8; 16]);
    b.extend_from_slice(&now.to_be_bytes());
    b.extend_from_slice(&forget_after.to_be_bytes());
    for ids in [&plan.refresh, &plan.forget, &plan.orphans] {
        b.extend_from_slice(&(ids.len() as u32).to_be_bytes());
        for id in ids {
            b.extend_from_slice(id);
        }
    }
    b
}

fn decode_sweep(b: &[u8]) -> Result<(SweepPlan, u64, u64)> {
    let (head, mut b) = (b.len() >= 16)
        .then(|| b.split_at(16))
        .ok_or_else(bad_entry)?;
    let now = u64::from_be_bytes(head[..8].try_into().expect("8"));
    let forget_after = u64::from_be_bytes(head[8..].try_into().expect("8"));
    let mut lists: [Vec<ClientId>; 3] = Default::default();
    for list in &mut lists {
        let n = b.get(..4).ok_or_else(bad_entry)?;
        let n = u32::from_be_bytes(n.try_into().expect("4")) as usize;
        let ids = b
            .get(4..4 + n.checked_mul(16).ok_or_else(bad_entry)?)
            .ok_or_else(bad_entry)?;
        *list = ids
            .chunks_exact(16)
            .map(|c| c.try_into().expect("16"))
            .collect();
        b = &b[4 + ids.len()..];
    }
    let [refresh, forget, orphans] = lists;
    Ok((
        SweepPlan {
            refresh,
            forget,
            orphans,
        },
        now,
        forget_after,
    ))
}

/// An adoption: `u8 last`, then each row as `id | u64 seen+1 (0: none) |
/// u16 len | user`.
fn encode_adopt(rows: &[(ClientId, String, Option<u64>)], last: bool) -> Vec<u8> {
    let mut b = vec![OP_ADOPT];
    b.extend_from_slice(&[0u8; 16]);
    b.push(last as u8);
    for (id, user, seen) in rows {
        b.extend_from_slice(id);
        b.extend_from_slice(&seen.map_or(0, |s| s.saturating_add(1)).to_be_bytes());
        let u = &user.as_bytes()[..user.len().min(u16::MAX as usize)];
        b.extend_from_slice(&(u.len() as u16).to_be_bytes());
        b.extend_from_slice(u);
    }
    b
}

type OwnerRows = Vec<(ClientId, String, Option<u64>)>;

fn decode_adopt(b: &[u8]) -> Result<(OwnerRows, bool)> {
    let (&last, mut b) = b.split_first().ok_or_else(bad_entry)?;
    let mut rows = Vec::new();
    while !b.is_empty() {
        let head = b.get(..26).ok_or_else(bad_entry)?;
        let id: ClientId = head[..16].try_into().expect("16");
        let seen = u64::from_be_bytes(head[16..24].try_into().expect("8"));
        let len = u16::from_be_bytes([head[24], head[25]]) as usize;
        let user = b.get(26..26 + len).ok_or_else(bad_entry)?;
        let user = String::from_utf8(user.to_vec()).map_err(|_| bad_entry())?;
        rows.push((id, user, seen.checked_sub(1)));
        b = &b[26 + len..];
    }
    Ok((rows, last != 0))
}

/// The user a batch acts for, as the leader resolved it: every member
/// checks the batch's rights against the same user, id and groups, whatever
/// its own user table says. `u16 len | name`, `u32 id`, `u16 count`, then
/// each group as `u16 len | name`.
fn encode_who(b: &mut Vec<u8>, who: &Who) {
    let put = |b: &mut Vec<u8>, s: &str| {
        let s = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
        b.extend_from_slice(&(s.len() as u16).to_be_bytes());
        b.extend_from_slice(s);
    };
    put(b, &who.user);
    b.extend_from_slice(&who.id.to_be_bytes());
    let n = who.groups.len().min(u16::MAX as usize);
    b.extend_from_slice(&(n as u16).to_be_bytes());
    for g in &who.groups[..n] {
        put(b, g);
    }
}

/// Decode [`encode_who`] from the front of `b`; returns it and the rest.
fn decode_who(b: &[u8]) -> Result<(Who, &[u8])> {
    fn take(b: &[u8], n: usize) -> Result<(&[u8], &[u8])> {
        (b.len() >= n).then(|| b.split_at(n)).ok_or_else(bad_entry)
    }
    fn string(b: &[u8]) -> Result<(String, &[u8])> {
        let (len, b) = take(b, 2)?;
        let (s, b) = take(b, u16::from_be_bytes([len[0], len[1]]) as usize)?;
        let s = String::from_utf8(s.to_vec()).map_err(|_| bad_entry())?;
        Ok((s, b))
    }
    let (user, b) = string(b)?;
    let (id, b) = take(b, 4)?;
    let id = u32::from_be_bytes(id.try_into().expect("4"));
    let (n, mut b) = take(b, 2)?;
    let n = u16::from_be_bytes([n[0], n[1]]);
    let mut groups = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let (g, rest) = string(b)?;
        groups.push(g);
        b = rest;
    }
    Ok((Who { user, id, groups }, b))
}

/// A SetAcl: the user it acts for, the directory, the entry.
fn encode_set_acl(
    client: &ClientId,
    who: &Who,
    dir: Fid,
    name: &str,
    rights: u8,
    negative: bool,
) -> Vec<u8> {
    let mut b = vec![OP_SET_ACL];
    b.extend_from_slice(client);
    encode_who(&mut b, who);
    b.extend_from_slice(&dir.volume.to_be_bytes());
    b.extend_from_slice(&dir.vnode.to_be_bytes());
    b.extend_from_slice(&dir.unique.to_be_bytes());
    b.push(rights);
    b.push(negative as u8);
    b.extend_from_slice(name.as_bytes());
    b
}

/// What SetAcl answers: the new list, the caller's rights, the fids whose
/// callbacks break.
pub(crate) type AclChange = (super::super::acl::Acl, u8, Vec<Fid>);

/// A Reintegrate entry's leader time, user, condition and records.
fn decode_reintegrate(data: &[u8]) -> Result<(Timespec, Who, u64, Vec<Record>)> {
    let b = data.get(17..).ok_or_else(bad_entry)?;
    if b.len() < 12 {
        return Err(bad_entry());
    }
    let now = Timespec {
        sec: i64::from_be_bytes(b[..8].try_into().expect("8")),
        nsec: u32::from_be_bytes(b[8..12].try_into().expect("4")),
    };
    let (who, b) = decode_who(&b[12..])?;
    let (&kind, body) = b.split_first().ok_or_else(bad_entry)?;
    let (after, records) = match Msg::decode_body(kind, body)? {
        Msg::Reintegrate { records } => (0, records),
        Msg::ReintegrateAfter { after, records } => (after, records),
        _ => return Err(bad_entry()),
    };
    Ok((now, who, after, records))
}

/// The client an entry is for (bytes 1..17 of every entry).
fn entry_client(data: &[u8]) -> Result<ClientId> {
    Ok(data
        .get(1..17)
        .ok_or_else(bad_entry)?
        .try_into()
        .expect("16"))
}

/// A Reintegrate entry refused for a failure of this member's store (not
/// for its records, which every member judges alike): another member may
/// have applied it, so this one stops rather than diverge.
fn failed_here_only(index: u64, res: &std::result::Result<Outcome, BatchError>) -> Result<()> {
    match res {
        Err(b) if is_store_failure(&b.error) || matches!(b.error, Error::Io { .. }) => Err(
            Error::Eio(format!("entry {index} failed here only: {}", b.error)),
        ),
        _ => Ok(()),
    }
}

fn bad_entry() -> Error {
    Error::Eio("a replicated log entry does not decode".into())
}

impl StateMachine for Machine {
    fn apply(&mut self, index: u64, data: &[u8]) -> Result<Applied> {
        if index <= self.start_mark {
            // In the store already: its changes committed with this mark.
            // Nobody waits for it (proposers' serials are new at start).
            return Ok(Box::new(()));
        }
        let r = self.apply_entry(index, data);
        if r.is_ok() {
            self.applied = index;
        }
        r
    }

    fn apply_many(&mut self, entries: &[(u64, &[u8])]) -> Result<Vec<Applied>> {
        let mut out = Vec::with_capacity(entries.len());
        let mut i = 0;
        // Bounded: each turn takes at least one entry.
        while i < entries.len() {
            let run = entries[i..]
                .iter()
                .take_while(|(index, data)| {
                    *index > self.start_mark && data.first() == Some(&OP_REINTEGRATE)
                })
                .count();
            if run >= 2 {
                out.extend(self.apply_reintegrates(&entries[i..i + run])?);
                i += run;
            } else {
                let (index, data) = entries[i];
                out.push(self.apply(index, data)?);
                i += 1;
            }
        }
        Ok(out)
    }

    fn applied_through(&mut self, index: u64, durable: bool) -> Result<()> {
        self.applied = self.applied.max(index);
        if self.marked < self.applied || (durable && self.durable < self.applied) {
            self.write_mark(durable)?;
        }
        Ok(())
    }

    fn tick(&mut self) -> Result<()> {
        let behind = self.applied.saturating_sub(self.durable);
        if behind > 0
            && (behind >= CHECKPOINT_ENTRIES
                || self.checkpointed.elapsed() >= self.checkpoint_every)
        {
            self.write_mark(true)?;
        }
        Ok(())
    }

    fn durable(&self) -> u64 {
        self.durable
    }
}

impl Machine {
    /// A member's state machine over `store`, which holds the entries up to
    /// its [`APPLIED_KEY`] (see [`store_mark`]).
    pub(super) fn new(
        store: Arc<VolumeStore>,
        root: PathBuf,
        key: PeerKey,
        me: u64,
        group: Arc<Mutex<GroupConfig>>,
    ) -> Result<Machine> {
        let mark = store_mark(&store)?.unwrap_or(0);
        let every = std::env::var("CODA_REPL_CHECKPOINT_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(CHECKPOINT_EVERY, Duration::from_millis);
        Ok(Machine {
            store,
            root,
            key,
            me,
            group,
            start_mark: mark,
            applied: mark,
            marked: mark,
            durable: mark,
            checkpointed: std::time::Instant::now(),
            checkpoint_every: every,
        })
    }

    /// Write [`APPLIED_KEY`] = the applied index, with an fsync if `durable`
    /// (which makes every earlier unsynced commit durable too).
    fn write_mark(&mut self, durable: bool) -> Result<()> {
        let index = self.applied;
        self.store.with_db(|db| -> Result<()> {
            let mut txn = db.begin_write()?;
            if !durable {
                txn.set_durability(redb::Durability::None)?;
            }
            txn.open_table(SETTINGS)?
                .insert(APPLIED_KEY, index.to_be_bytes().as_slice())?;
            txn.commit()?;
            Ok(())
        })?;
        self.marked = index;
        if durable {
            self.durable = index;
            self.checkpointed = std::time::Instant::now();
        }
        Ok(())
    }

    fn apply_entry(&mut self, index: u64, data: &[u8]) -> Result<Applied> {
        let client = entry_client(data)?;
        match data[0] {
            OP_REINTEGRATE => {
                let (now, who, after, records) = decode_reintegrate(data)?;
                self.ensure_data(&client, after, &records)?;
                let root = self.root.clone();
                let lookup = move |up: u64| {
                    let p = replstage_path(&root, &client, up);
                    p.exists().then_some(p)
                };
                let res = self.store.reintegrate_logged(
                    &client,
                    Some(Arc::new(who)),
                    after,
                    &records,
                    &lookup,
                    Some(now),
                    Some(index),
                );
                failed_here_only(index, &res)?;
                // Committed with the mark, the batch's changes or not.
                self.marked = index;
                Ok(Box::new(res))
            }
            OP_ALLOC => {
                let b = data.get(17..25).ok_or_else(bad_entry)?;
                let volume = u32::from_be_bytes(b[..4].try_into().expect("4"));
                let count = u32::from_be_bytes(b[4..].try_into().expect("4"));
                let res = alloc_at(&self.store, index, &client, volume, count);
                if let Err(e) = &res {
                    if is_store_failure(e) {
                        return Err(Error::Eio(format!("entry {index} failed here only: {e}")));
                    }
                } else {
                    self.marked = index;
                }
                Ok(Box::new(res))
            }
            OP_SET_ACL => {
                let (who, b) = decode_who(data.get(17..).ok_or_else(bad_entry)?)?;
                if b.len() < 18 {
                    return Err(bad_entry());
                }
                let dir = Fid {
                    volume: u32::from_be_bytes(b[..4].try_into().expect("4")),
                    vnode: u64::from_be_bytes(b[4..12].try_into().expect("8")),
                    unique: u32::from_be_bytes(b[12..16].try_into().expect("4")),
                };
                let name = std::str::from_utf8(&b[18..]).map_err(|_| bad_entry())?;
                // Setting an entry is idempotent: applied again, it changes nothing.
                let res: Result<AclChange> =
                    self.store
                        .set_acl(&who, &client, dir, name, b[16], b[17] != 0);
                if let Err(e) = &res {
                    if is_store_failure(e) {
                        return Err(Error::Eio(format!("entry {index} failed here only: {e}")));
                    }
                }
                Ok(Box::new(res))
            }
            OP_ADMIN => {
                let b = data.get(17..).ok_or_else(bad_entry)?;
                if b.len() < 32 {
                    return Err(bad_entry());
                }
                let secret: [u8; 32] = b[..32].try_into().expect("32");
                let line = std::str::from_utf8(&b[32..]).map_err(|_| bad_entry())?;
                let words: Vec<String> = line.split('\t').map(str::to_string).collect();
                let res: Result<String> = self.store.with_db(|db| match words.as_slice() {
                    [u, a, name] if u == "user" && a == "add" => {
                        crate::server::volume::check_user(name)?;
                        let path =
                            crate::server::volume::add_user_with(db, &self.root, name, secret)?;
                        Ok(format!("added {name}; secret in {}\n", path.display()))
                    }
                    _ => crate::server::admin::run_command(db, &self.root, &words),
                });
                // Identities are cached per user: users or groups may have moved.
                self.store.access.changed();
                if let Err(e) = &res {
                    if is_store_failure(e) || matches!(e, Error::Io { .. }) {
                        return Err(Error::Eio(format!("entry {index} failed here only: {e}")));
                    }
                }
                Ok(Box::new(res))
            }
            OP_CLAIM => {
                let b = data.get(17..).ok_or_else(bad_entry)?;
                if b.len() < 8 {
                    return Err(bad_entry());
                }
                let now = u64::from_be_bytes(b[..8].try_into().expect("8"));
                let user = std::str::from_utf8(&b[8..]).map_err(|_| bad_entry())?;
                // A refusal (another user's id) changes nothing and is the
                // proposer's answer; anything else committed with the mark.
                let res =
                    self.commit_with_mark(index, |txn| owners::claim_txn(txn, &client, user, now))?;
                Ok(Box::new(res))
            }
            OP_SWEEP => {
                let (plan, now, forget_after) =
                    decode_sweep(data.get(17..).ok_or_else(bad_entry)?)?;
                let res = self.commit_with_mark(index, |txn| {
                    owners::sweep_txn(txn, &plan, now, forget_after)
                })?;
                Ok(Box::new(res))
            }
            OP_ADOPT => {
                let (rows, last) = decode_adopt(data.get(17..).ok_or_else(bad_entry)?)?;
                let res = self.commit_with_mark(index, |txn| {
                    owners::adopt_txn(txn, &rows)?;
                    if last {
                        txn.open_table(SETTINGS)?
                            .insert(OWNERS_LOGGED_KEY, [1u8].as_slice())?;
                    }
                    Ok(())
                })?;
                Ok(Box::new(res))
            }
            _ => Err(bad_entry()),
        }
    }

    /// Consecutive Reintegrate entries (`OP_REINTEGRATE`, past the start
    /// mark) in one transaction of the store: the outcome of
    /// `apply_entry` on each in turn.
    fn apply_reintegrates(&mut self, entries: &[(u64, &[u8])]) -> Result<Vec<Applied>> {
        let mut batches = Vec::with_capacity(entries.len());
        for (index, data) in entries {
            let client = entry_client(data)?;
            let (now, who, after, records) = decode_reintegrate(data)?;
            self.ensure_data(&client, after, &records)?;
            let mut staged = std::collections::HashMap::new();
            for r in &records {
                if let RecordOp::Store { upload_id, .. } = r.op {
                    let p = replstage_path(&self.root, &client, upload_id);
                    if p.exists() {
                        staged.insert(upload_id, p);
                    }
                }
            }
            batches.push(LoggedBatch {
                client,
                who: Some(Arc::new(who)),
                after,
                records,
                staged,
                now: Some(now),
                log_index: *index,
            });
        }
        let results = self.store.reintegrate_entries(batches);
        let mut out: Vec<Applied> = Vec::with_capacity(results.len());
        for ((index, _), res) in entries.iter().zip(results) {
            failed_here_only(*index, &res)?;
            // Committed with the mark, the batch's changes or not.
            self.marked = *index;
            self.applied = *index;
            out.push(Box::new(res));
        }
        Ok(out)
    }

    /// Commit `f`'s changes with [`APPLIED_KEY`] = `index`, without an
    /// fsync (the log holds the entry durably), so a restart applies the
    /// entry again exactly when its changes are not in the store. An error
    /// of `f` commits nothing and is returned; a failure of the store
    /// itself stops this member (`Eio`) rather than let it diverge.
    fn commit_with_mark<T>(
        &mut self,
        index: u64,
        f: impl Fn(&redb::WriteTransaction) -> Result<T>,
    ) -> Result<Result<T>> {
        let res = self.store.with_db(|db| -> Result<T> {
            let mut txn = db.begin_write()?;
            txn.set_durability(redb::Durability::None)?;
            let v = f(&txn)?;
            txn.open_table(SETTINGS)?
                .insert(APPLIED_KEY, index.to_be_bytes().as_slice())?;
            txn.commit()?;
            Ok(v)
        });
        match res {
            Ok(v) => {
                self.marked = index;
                Ok(Ok(v))
            }
            Err(e) if is_store_failure(&e) || matches!(e, Error::Io { .. }) => {
                Err(Error::Eio(format!("entry {index} failed here only: {e}")))
            }
            Err(e) => Ok(Err(e)),
        }
    }
}

/// The administration commands that change users, groups, anonymous
/// access or a volume's quota: in a group they are log entries (a quota is
/// checked by every member's batches, so all must hold the same one).
pub(crate) fn is_replicated_admin(words: &[String]) -> bool {
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    matches!(
        w.as_slice(),
        ["user", "add" | "remove", ..]
            | ["group", "add" | "remove", ..]
            | ["anonymous", ..]
            | ["quota", _, _]
    )
}

/// An administration command through the log: every member applies it to
/// its own store (a new user's secret, drawn here, goes in the entry, so
/// every member writes the same secret file). Any member takes it; a
/// follower forwards it to the leader. Answers with this member's result.
pub(crate) fn admin(repl: &Replicator, words: &[String]) -> Result<String> {
    if words.iter().any(|w| w.contains('\t') || w.contains('\n')) {
        return Err(Error::Invalid(
            "a word of the command holds a tab or newline".into(),
        ));
    }
    let secret: [u8; 32] = crate::proto::auth::random_bytes();
    let mut b = vec![OP_ADMIN];
    b.extend_from_slice(&[0u8; 16]);
    b.extend_from_slice(&secret);
    b.extend_from_slice(words.join("\t").as_bytes());
    let applied = repl.propose_from_any_member(b, COMMIT_TIMEOUT)?;
    applied
        .downcast::<Result<String>>()
        .map(|b| *b)
        .map_err(|_| Error::Eio("replicated result of an unexpected type".into()))?
}

/// The leader's SetAcl: through the log, so every member keeps the same
/// access lists.
#[allow(clippy::too_many_arguments)] // SetAcl's own fields, plus its session
pub(crate) fn set_acl(
    shared: &Shared,
    repl: &Replicator,
    ctx: &ClientCtx,
    who: &Who,
    dir: Fid,
    name: &str,
    rights: u8,
    negative: bool,
) -> Result<AclChange> {
    let data = encode_set_acl(&ctx.id, who, dir, name, rights, negative);
    match propose::<Result<AclChange>>(repl, data) {
        Ok(r) => r,
        Err(e) => {
            leadership_lost(shared, ctx, &e);
            Err(e)
        }
    }
}

impl Machine {
    /// Make sure the data of every not-yet-applied Store of the batch is
    /// here, pulling what this member missed from the others.
    fn ensure_data(&self, client: &ClientId, after: u64, records: &[Record]) -> Result<()> {
        let highest = self.store.with_db(|db| -> Result<u64> {
            let txn = db.begin_read()?;
            let t = txn.open_table(CLIENT_STORE)?;
            let v = t.get(client)?.map(|v| v.value());
            Ok(v.unwrap_or(0))
        })?;
        if after > highest {
            // The store refuses it (NotApplied) on every member, the
            // watermark being replicated: its data is not needed.
            return Ok(());
        }
        for r in records {
            let RecordOp::Store { upload_id, .. } = r.op else {
                continue;
            };
            if r.store_id <= highest || replstage_path(&self.root, client, upload_id).exists() {
                continue;
            }
            // Members come and go (killed, stopped, cut off): ask them all
            // in rounds for a while before giving up.
            let deadline = std::time::Instant::now() + FETCH_PATIENCE;
            let mut got = false;
            while !got && std::time::Instant::now() < deadline {
                let members = self.group.lock().members.clone();
                for m in members.iter().filter(|m| m.id != self.me) {
                    let Ok(addr) = resolve(&m.addr) else { continue };
                    match fetch(
                        addr, &self.key, self.me, m.id, &self.root, client, upload_id,
                    ) {
                        Ok(true) => {
                            got = true;
                            break;
                        }
                        Ok(false) => {}
                        Err(e) => log::info(format_args!(
                            "replication: fetching upload {upload_id} from member {}: {e}",
                            m.id
                        )),
                    }
                }
                if !got {
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
            if !got {
                return Err(Error::Eio(format!(
                    "the data of upload {upload_id} of client {} is on no reachable member",
                    objects::hex(client)
                )));
            }
        }
        Ok(())
    }
}

/// AllocFids as an entry: exactly once per index (its own mark, kept from
/// before [`APPLIED_KEY`], still guards it). Committed without an fsync,
/// with [`APPLIED_KEY`], like a batch.
fn alloc_at(
    store: &VolumeStore,
    index: u64,
    client: &ClientId,
    volume: u32,
    count: u32,
) -> Result<u64> {
    check_alloc_count(count)?;
    store.with_db(|db| -> Result<u64> {
        let mut txn = db.begin_write()?;
        txn.set_durability(redb::Durability::None)?;
        let first = {
            let mut settings = txn.open_table(SETTINGS)?;
            let done = settings
                .get(ALLOC_INDEX_KEY)?
                .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            if done >= index {
                return Err(Error::Again(format!("entry {index} was applied before")));
            }
            settings.insert(ALLOC_INDEX_KEY, index.to_be_bytes().as_slice())?;
            settings.insert(APPLIED_KEY, index.to_be_bytes().as_slice())?;
            drop(settings);
            reserve_vnodes(&txn, client, volume, count)?
        };
        txn.commit()?;
        Ok(first)
    })
}

/// The store's [`APPLIED_KEY`]: None for a store that never applied an
/// entry with it (new, or written before it existed).
pub(crate) fn store_mark(store: &VolumeStore) -> Result<Option<u64>> {
    store.with_db(|db| -> Result<Option<u64>> {
        let txn = db.begin_read()?;
        let Some(settings) = existing_table(&txn, SETTINGS)? else {
            return Ok(None);
        };
        let v = settings.get(APPLIED_KEY)?;
        Ok(v.and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
            .map(u64::from_be_bytes))
    })
}

/// Propose, wait for this member's application, and unwrap its result.
fn propose<T: 'static>(repl: &Replicator, data: Vec<u8>) -> Result<T> {
    let applied = repl.propose(data, COMMIT_TIMEOUT)?;
    applied
        .downcast::<T>()
        .map(|b| *b)
        .map_err(|_| Error::Eio("replicated result of an unexpected type".into()))
}

/// A client's session on a leader that could not get its request committed
/// is ended, so the client looks for the new leader and retries there (the
/// replay rule keeps a batch that did commit from applying twice).
fn leadership_lost(shared: &Shared, ctx: &ClientCtx, e: &Error) {
    if matches!(e, Error::Again(_) | Error::Timeout(_)) {
        shared
            .registry
            .end_session(&ctx.id, ctx.gen, &format!("replication: {e}"));
    }
}

/// The leader's claim of `client` for `user`, whose handshake is proven
/// (SERVER.md "Client identity"): when due (a new id, or a stale last-seen
/// time) it is an entry, applied by every member, committed before this
/// returns and so before the connection is welcomed. `Auth` if the id is
/// another user's, here or when the entry applies.
pub(crate) fn claim_client(
    repl: &Replicator,
    store: &VolumeStore,
    client: &ClientId,
    user: &str,
    refresh: u64,
) -> Result<()> {
    let now = owners::now_secs();
    if !store.with_db(|db| owners::claim_due(db, client, user, true, now, refresh))? {
        return Ok(());
    }
    propose::<Result<()>>(repl, encode_claim(client, user, now))?
}

/// The leader's sweep of client ids (owners.rs): decided from its own
/// tables and its live sessions, carried out by every member as entries
/// (at most [`IDS_PER_ENTRY`] ids each) stamped with the leader's `now`.
/// Returns how many ids were forgotten.
pub(crate) fn sweep_clients(
    repl: &Replicator,
    store: &VolumeStore,
    live: &std::collections::HashSet<ClientId>,
    now: u64,
    forget_after: u64,
) -> Result<usize> {
    let mut rest = store.with_db(|db| owners::sweep_plan(db, live, now, forget_after))?;
    let mut forgotten = 0;
    // Bounded: each entry takes at least one id off the plan.
    while !rest.is_empty() {
        let mut part = SweepPlan::default();
        let mut room = IDS_PER_ENTRY;
        for (from, to) in [
            (&mut rest.refresh, &mut part.refresh),
            (&mut rest.forget, &mut part.forget),
            (&mut rest.orphans, &mut part.orphans),
        ] {
            let n = from.len().min(room);
            *to = from.drain(..n).collect();
            room -= n;
        }
        forgotten += propose::<Result<usize>>(repl, encode_sweep(&part, now, forget_after))??;
    }
    Ok(forgotten)
}

/// Once per group, by its first leader running this code: the owner rows
/// it holds, written locally by a server that did not log claims, become
/// entries every member takes in (`owners::adopt_txn`); the last sets
/// [`OWNERS_LOGGED_KEY`] on every member. Returns whether it proposed.
pub(crate) fn adopt_owners(repl: &Replicator, store: &VolumeStore) -> Result<bool> {
    let done = store.with_db(|db| -> Result<bool> {
        let txn = db.begin_read()?;
        Ok(match existing_table(&txn, SETTINGS)? {
            Some(t) => t.get(OWNERS_LOGGED_KEY)?.is_some(),
            None => false,
        })
    })?;
    if done {
        return Ok(false);
    }
    let rows = store.with_db(owners::owner_rows)?;
    let chunks: Vec<&[(ClientId, String, Option<u64>)]> = if rows.is_empty() {
        vec![&[]]
    } else {
        rows.chunks(IDS_PER_ENTRY).collect()
    };
    let last = chunks.len() - 1;
    for (i, c) in chunks.into_iter().enumerate() {
        propose::<Result<()>>(repl, encode_adopt(c, i == last))??;
    }
    Ok(true)
}

/// The leader's AllocFids.
pub(crate) fn alloc_fids(
    shared: &Shared,
    repl: &Replicator,
    ctx: &ClientCtx,
    volume: u32,
    count: u32,
) -> Result<u64> {
    match propose::<Result<u64>>(repl, encode_alloc(&ctx.id, volume, count)) {
        Ok(r) => r,
        Err(e) => {
            leadership_lost(shared, ctx, &e);
            Err(e)
        }
    }
}

/// The leader's Reintegrate: data to a majority, then the entry. A
/// pipelined batch's `after` is not checked here but when the entry is
/// applied, on every member against the replicated watermark, so a
/// NotApplied batch is refused alike everywhere (its predecessor may be in
/// the log ahead of it, not yet applied).
pub(crate) fn reintegrate(
    shared: &Shared,
    repl: &Replicator,
    ctx: &ClientCtx,
    who: Arc<Who>,
    after: u64,
    records: &[Record],
) -> std::result::Result<Outcome, BatchError> {
    super::trace(format_args!("reintegrate enter"));
    let fail = |e: Error| {
        leadership_lost(shared, ctx, &e);
        BatchError::from(e)
    };
    let highest = shared.store.with_db(|db| -> Result<u64> {
        let txn = db.begin_read()?;
        let t = txn.open_table(CLIENT_STORE)?;
        let v = t.get(&ctx.id)?.map(|v| v.value());
        Ok(v.unwrap_or(0))
    })?;
    let mut files = Vec::new();
    for (i, r) in records.iter().enumerate() {
        if let RecordOp::Store { upload_id, .. } = r.op {
            match shared.registry.staged(ctx, upload_id) {
                Some(p) => files.push((upload_id, p)),
                // A replayed record is skipped by every member; a new one
                // whose data is not staged here (the client's upload went
                // to a leader before this one) is refused as a lone server
                // refuses it. Proposed, it would name data on no member,
                // and every member would wait for it.
                None if r.store_id > highest => {
                    return Err(BatchError {
                        error: Error::NotFound(format!("upload {upload_id} is not staged")),
                        index: i as u32,
                    });
                }
                None => {}
            }
        }
    }
    if !files.is_empty() {
        let dir = replstage_dir(&shared.root);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("create replstage", e))?;
        for (up, p) in &files {
            let dst = replstage_path(&shared.root, &ctx.id, *up);
            let _ = std::fs::remove_file(&dst);
            std::fs::hard_link(p, &dst).map_err(|e| Error::io("link upload into replstage", e))?;
        }
        objects::sync_dir(&dir)?;
        super::trace(format_args!("reintegrate linked"));
        push_to_majority(repl, &ctx.id, &files).map_err(fail)?;
        super::trace(format_args!("reintegrate pushed"));
    }
    let data = encode_reintegrate(&ctx.id, Timespec::now(), &who, after, records);
    super::trace(format_args!(
        "reintegrate propose {} records",
        records.len()
    ));
    let r = match propose::<std::result::Result<Outcome, BatchError>>(repl, data) {
        Ok(r) => r,
        Err(e) => Err(fail(e)),
    };
    super::trace(format_args!("reintegrate done"));
    r
}

/// Push the batch's files to the followers; returns once, counting this
/// member, a majority of the voters holds every one durably.
fn push_to_majority(repl: &Replicator, client: &ClientId, files: &[(u64, PathBuf)]) -> Result<()> {
    let st = repl.status()?;
    let others: Vec<(u64, String)> = {
        let g = repl.group.lock();
        st.voters
            .iter()
            .filter(|v| **v != repl.me)
            .filter_map(|v| g.addr_of(*v).map(|a| (*v, a.to_string())))
            .collect()
    };
    let need = st.voters.len() / 2; // besides this member
    if need == 0 {
        return Ok(());
    }
    let (tx, rx) = crossbeam_channel::unbounded();
    for (id, addr) in others {
        let tx = tx.clone();
        let key = repl.key.clone();
        let me = repl.me;
        let client = *client;
        let files = files.to_vec();
        let pool = Arc::clone(&repl.data_pool);
        // Detached: a slow member finishes (or times out) on its own.
        let _ = std::thread::Builder::new()
            .name(format!("coda-push-{id}"))
            .spawn(move || {
                let r = resolve(&addr).and_then(|a| {
                    files
                        .iter()
                        .try_for_each(|(up, p)| push(&pool, a, &key, me, id, &client, *up, p))
                });
                let _ = tx.send((id, r));
            });
    }
    drop(tx);
    let mut ok = 0;
    let mut last = None;
    while let Ok((id, r)) = rx.recv() {
        match r {
            Ok(()) => {
                ok += 1;
                if ok >= need {
                    return Ok(());
                }
            }
            Err(e) => last = Some(format!("member {id}: {e}")),
        }
    }
    Err(Error::Again(format!(
        "the data reached no majority of the group ({})",
        last.unwrap_or_default()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::meta::ROOT_FID;

    fn machine(root: &std::path::Path) -> Machine {
        let store = Arc::new(VolumeStore::open(root, u64::MAX).unwrap());
        let group = GroupConfig::from_list(1, "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3").unwrap();
        let key = PeerKey {
            secret: [7; 32],
            tls: None,
        };
        Machine::new(store, root.into(), key, 1, Arc::new(Mutex::new(group))).unwrap()
    }

    fn create(client: &ClientId, who: &Who, store_id: u64, name: &str, vnode: u64) -> Vec<u8> {
        let rec = Record {
            store_id,
            op: RecordOp::Create {
                parent: ROOT_FID,
                name: name.into(),
                fid: Fid::new(1, vnode, 1),
                mode: 0o644,
                mtime: Timespec::default(),
                uid: 0,
                gid: 0,
            },
        };
        encode_reintegrate(client, Timespec::now(), who, 0, &[rec])
    }

    /// Each entry's changes commit with the store's mark; a member that
    /// starts again over that store skips the entries the mark covers (an
    /// AllocFids or a batch applied twice would reserve or create twice)
    /// and applies the next one.
    #[test]
    fn the_store_keeps_its_applied_index_with_each_entry_and_a_restart_applies_none_twice() {
        let dir = std::env::temp_dir().join(format!("coda-unit-machine-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let root = dir.join("data");
        VolumeStore::init(&root, "admin").unwrap();
        let client = [9u8; 16];
        let alloc = encode_alloc(&client, 1, 4);
        let first = {
            let mut m = machine(&root);
            assert_eq!(store_mark(&m.store).unwrap(), None);
            let who = m.store.who("admin").unwrap();
            let r = m.apply(5, &alloc).unwrap();
            let first = (*r.downcast::<Result<u64>>().unwrap()).unwrap();
            assert_eq!(store_mark(&m.store).unwrap(), Some(5));
            let r = m.apply(6, &create(&client, &who, 1, "a", first)).unwrap();
            let out = r
                .downcast::<std::result::Result<Outcome, BatchError>>()
                .unwrap();
            assert!(!out.unwrap().replayed);
            assert_eq!(store_mark(&m.store).unwrap(), Some(6));
            // An empty entry changes nothing but the mark.
            m.applied_through(7, false).unwrap();
            assert_eq!(store_mark(&m.store).unwrap(), Some(7));
            assert_eq!(m.durable(), 0);
            m.applied_through(7, true).unwrap();
            assert_eq!(m.durable(), 7);
            first
        };
        let mut m = machine(&root);
        assert_eq!((m.start_mark, m.durable()), (7, 7));
        let who = m.store.who("admin").unwrap();
        // Applied again after a restart: skipped, nothing reserved or created.
        assert!(m
            .apply(5, &alloc)
            .unwrap()
            .downcast::<Result<u64>>()
            .is_err());
        let again = create(&client, &who, 2, "b", first + 1);
        assert!(m.apply(6, &again).unwrap().is::<()>());
        assert!(m
            .store
            .read_dir(ROOT_FID, 0)
            .unwrap()
            .1
            .iter()
            .all(|e| e.name != "b"));
        // The next entry applies.
        let r = m.apply(8, &alloc).unwrap();
        let next = (*r.downcast::<Result<u64>>().unwrap()).unwrap();
        assert_eq!(next, first + 4);
        assert_eq!(store_mark(&m.store).unwrap(), Some(8));
        drop(m);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn owner(m: &Machine, id: &ClientId) -> Option<(String, Option<u64>)> {
        let rows = m.store.with_db(owners::owner_rows).unwrap();
        rows.into_iter()
            .find(|(i, _, _)| i == id)
            .map(|(_, u, s)| (u, s))
    }

    /// A claim is an entry: the first user's, refused to another when it
    /// applies, a refresh never moves the time back, applied again after
    /// a restart it changes nothing; a sweep entry forgets by the entry's
    /// time (with the watermark), and an adoption keeps an owned id's owner.
    #[test]
    fn claims_sweeps_and_adoptions_apply_alike_and_once() {
        let dir = std::env::temp_dir().join(format!("coda-unit-claims-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let root = dir.join("data");
        VolumeStore::init(&root, "admin").unwrap();
        let (x, y, z) = ([1u8; 16], [2u8; 16], [3u8; 16]);
        let claimed = |r: Applied| *r.downcast::<Result<()>>().unwrap();
        {
            let mut m = machine(&root);
            assert!(claimed(m.apply(3, &encode_claim(&x, "admin", 100)).unwrap()).is_ok());
            assert_eq!(store_mark(&m.store).unwrap(), Some(3));
            let r = claimed(m.apply(4, &encode_claim(&x, "bob", 101)).unwrap());
            assert!(matches!(r, Err(Error::Auth(_))), "{r:?}");
            assert!(claimed(m.apply(5, &encode_claim(&x, "admin", 90)).unwrap()).is_ok());
            assert_eq!(owner(&m, &x), Some(("admin".into(), Some(100))));
            assert!(claimed(m.apply(6, &encode_claim(&y, "bob", 100)).unwrap()).is_ok());
        }
        let mut m = machine(&root);
        // After the restart the entries up to the mark are skipped.
        assert!(m
            .apply(4, &encode_claim(&x, "bob", 101))
            .unwrap()
            .is::<()>());
        // y's watermark, then a sweep at 200 with a 50 s expiry: x (live)
        // is refreshed, y forgotten with its watermark, z (never owned)
        // changes nothing.
        m.store
            .with_db(|db| -> Result<()> {
                let txn = db.begin_write()?;
                txn.open_table(CLIENT_STORE)?.insert(&y, 9)?;
                txn.commit()?;
                Ok(())
            })
            .unwrap();
        let plan = SweepPlan {
            refresh: vec![x],
            forget: vec![y, z],
            orphans: vec![],
        };
        let entry = encode_sweep(&plan, 200, 50);
        assert_eq!(decode_sweep(&entry[17..]).unwrap(), (plan, 200, 50));
        let r = m.apply(7, &entry).unwrap();
        assert_eq!((*r.downcast::<Result<usize>>().unwrap()).unwrap(), 1);
        assert_eq!(owner(&m, &x), Some(("admin".into(), Some(200))));
        assert_eq!(owner(&m, &y), None);
        let mark = m
            .store
            .with_db(|db| -> Result<Option<u64>> {
                let txn = db.begin_read()?;
                let t = txn.open_table(CLIENT_STORE)?;
                Ok(t.get(&y)?.map(|v| v.value()))
            })
            .unwrap();
        assert_eq!(mark, None);
        // An adoption: x stays admin's, z becomes carol's.
        let rows = vec![(x, "bob".to_string(), Some(300)), (z, "carol".into(), None)];
        let entry = encode_adopt(&rows, true);
        assert_eq!(decode_adopt(&entry[17..]).unwrap(), (rows, true));
        assert!(claimed(m.apply(8, &entry).unwrap()).is_ok());
        assert_eq!(owner(&m, &x), Some(("admin".into(), Some(200))));
        assert_eq!(owner(&m, &z), Some(("carol".into(), None)));
        assert!(adopt_done(&m.store));
        drop(m);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn adopt_done(store: &VolumeStore) -> bool {
        store
            .with_db(|db| -> Result<bool> {
                let txn = db.begin_read()?;
                let t = txn.open_table(SETTINGS)?;
                Ok(t.get(OWNERS_LOGGED_KEY)?.is_some())
            })
            .unwrap()
    }

    #[test]
    fn the_user_of_an_entry_decodes_as_encoded_and_a_cut_one_is_refused() {
        let who = Who {
            user: "bob".into(),
            id: 7,
            groups: vec!["System:AnyUser".into(), "bob:friends".into()],
        };
        let mut b = Vec::new();
        encode_who(&mut b, &who);
        b.extend_from_slice(b"rest");
        let (back, rest) = decode_who(&b).unwrap();
        assert_eq!(back, who);
        assert_eq!(rest, b"rest");
        for cut in 0..b.len() - 4 {
            assert!(decode_who(&b[..cut]).is_err(), "cut at {cut}");
        }
    }
}
