//! Reintegration: apply a batch of CML records in ONE redb write
//! transaction, checking each record against the state the previous ones
//! left. Either the commit happens and every record is applied, or nothing
//! is (decision 1 and 9). Batches of several sessions that arrive during a
//! commit share the next transaction (group commit, docs/SERVER.md); each
//! is still all-or-nothing on its own.
//!
//! Data files follow the metadata: a Store hard-links the staged upload to a
//! fresh versioned object name and a truncate writes a fresh file; their
//! directory is fsynced before the commit, and the files they replace are
//! deleted only after it. A crash at any point leaves the committed record
//! pointing at a complete file; the other files are garbage the startup
//! sweep removes.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use redb::{Database, ReadableDatabase, ReadableTable, Table, WriteTransaction};

use super::meta::*;
use super::objects;
use super::volume::{get_object, is_store_failure, stale, CarriesError, ClientId, VolumeStore};
use crate::proto::{check_name, Attr, Fid, FileType, Record, RecordOp, Replaces, Timespec};
use crate::proto::{xattr, XattrHow, MAX_XATTR_BYTES};
use crate::{Error, Result};

/// Finds the staged file of an upload of the reintegrating client.
pub type StagedLookup<'a> = &'a dyn Fn(u64) -> Option<PathBuf>;

/// A committed (or replayed) batch.
#[derive(Debug, Default)]
pub struct Outcome {
    /// One attr per record, of the record's target after it.
    pub results: Vec<Attr>,
    /// Objects and directories the batch changed (callbacks to break).
    pub changed: Vec<Fid>,
    /// Objects the batch deleted (their callbacks are void for everyone).
    pub deleted: Vec<Fid>,
    /// Uploads consumed by Store records; their staged names can go.
    pub consumed_uploads: Vec<u64>,
    /// The batch had been applied before; nothing was done now.
    pub replayed: bool,
}

/// Why a batch was refused: the error and the index of the failing record
/// (`u32::MAX` when no single record is to blame).
#[derive(Debug)]
pub struct BatchError {
    pub error: Error,
    pub index: u32,
}

impl CarriesError for BatchError {
    fn error_mut(&mut self) -> &mut Error {
        &mut self.error
    }
}

impl From<Error> for BatchError {
    fn from(error: Error) -> BatchError {
        BatchError {
            error,
            index: u32::MAX,
        }
    }
}

/// Most directory levels walked when checking a rename for a cycle; a
/// deeper chain means corrupt parents, and refusing is the safe answer.
const MAX_DEPTH: usize = 1 << 16;

/// How far above the highest store id applied for a client a new record's
/// id may be. A client numbers its records 1, 2, 3, ... and never skips
/// more than the records it cancelled locally, so a real log stays far
/// below this; an id beyond it could only make the watermark leap and the
/// client's later records be taken as replays and silently dropped.
pub const MAX_STORE_ID_AHEAD: u64 = 1 << 32;

/// Refuse a batch whose not-yet-applied records would move the watermark
/// more than [`MAX_STORE_ID_AHEAD`] past `highest` (the record's index is
/// reported; nothing is applied).
pub fn check_ahead(highest: u64, records: &[Record]) -> std::result::Result<(), BatchError> {
    let limit = highest.saturating_add(MAX_STORE_ID_AHEAD);
    for (i, r) in records.iter().enumerate() {
        if r.store_id > limit {
            return Err(BatchError {
                error: Error::Invalid(format!(
                    "store id {} is more than {MAX_STORE_ID_AHEAD} above the last one applied \
                     for this client ({highest})",
                    r.store_id
                )),
                index: i as u32,
            });
        }
    }
    Ok(())
}

/// One replicated entry's batch for [`VolumeStore::reintegrate_entries`].
pub(crate) struct LoggedBatch {
    /// The client whose batch it is.
    pub client: ClientId,
    /// The user its records are checked against.
    pub who: Option<Arc<super::acl::Who>>,
    /// Applied only if the client's watermark is at least this; 0: always.
    pub after: u64,
    /// The batch's records.
    pub records: Vec<Record>,
    /// The staged files of its Store records, by upload id.
    pub staged: HashMap<u64, PathBuf>,
    /// The time its leader stamped it with.
    pub now: Option<Timespec>,
    /// Its log index.
    pub log_index: u64,
}

/// One batch waiting for (or inside) a group commit. Owns its input, so
/// whichever worker leads the group can apply it.
struct Job {
    client: ClientId,
    /// Applied only if the client's watermark is at least this (a
    /// pipelined batch names its predecessor's highest store id); 0: always.
    after: u64,
    records: Vec<Record>,
    /// The staged files of the batch's Store records, looked up by the
    /// submitting worker (the lookup belongs to its session).
    staged: HashMap<u64, PathBuf>,
    /// The time to stamp changes with (a replicated batch carries the
    /// leader's, so every member writes the same ctimes); None: now.
    now: Option<Timespec>,
    /// The user whose rights each record is checked against (`acl.rs`);
    /// None only for in-crate callers that check nothing.
    who: Option<Arc<super::acl::Who>>,
    /// Per record: its inline data already written and fsynced to a file
    /// of its own (`Prepared`), for the commit to rename into place. Set
    /// before the batch is ready in the queue (`Waiting::ready`).
    prepared: std::sync::OnceLock<Vec<Option<PathBuf>>>,
    /// A replicated member's apply: the log index written in the batch's
    /// own transaction (`replication::machine`), whose commit may then skip
    /// its fsync (the Raft log holds the entry durably). None: a lone
    /// server's batch, committed durably.
    log_index: Option<u64>,
}

/// Most records of one batch whose inline data is written ahead of the
/// commit; the rest are written inside it, as before. Connected writers
/// send a record or two per batch; a large replay batch keeps the group's
/// parallel fsyncs.
const PREPARE_MAX: usize = 8;

/// The inline data of a batch's first records, each written to a file of
/// its own and fsynced by the batch's worker after the batch took its
/// place in the group queue and before it is ready there (docs/SERVER.md
/// "Group commit"). Creating and syncing a new file is the slowest step of
/// applying an inline store; done here it runs beside other batches' work
/// (also the same session's next batches: its place is fixed, so they may
/// start) instead of inside the group's one writer, and the commit only
/// renames the file to its versioned name
/// (the objects directory's fsync, which the commit makes anyway, makes
/// that name durable). A file the commit did not take (the batch failed,
/// was a replay, or its group started again) is removed when this drops.
struct Prepared(Vec<Option<PathBuf>>);

impl Prepared {
    /// Whether any of `records` carries inline data to prepare.
    fn wanted(records: &[Record]) -> bool {
        records.iter().any(|r| {
            matches!(&r.op, RecordOp::StoreInline { data, .. } | RecordOp::CreateWith { data, .. }
                if needs_file(data))
        })
    }

    fn new(root: &std::path::Path, records: &[Record]) -> Prepared {
        let mut paths: Vec<Option<PathBuf>> = Vec::with_capacity(records.len());
        let mut tried = 0;
        for r in records {
            let data = match &r.op {
                RecordOp::StoreInline { fid, data, .. }
                | RecordOp::CreateWith { fid, data, .. }
                    if needs_file(data) =>
                {
                    Some((*fid, data))
                }
                _ => None,
            };
            paths.push(match data {
                // A failure here (a full disk) is met again, and
                // reported, when the commit writes the data itself.
                Some((fid, data)) if tried < PREPARE_MAX => {
                    tried += 1;
                    objects::prepare_data(root, fid, data).ok()
                }
                _ => None,
            });
        }
        let mut p = Prepared(paths);
        let files: Vec<&PathBuf> = p.0.iter().flatten().collect();
        if !files.is_empty() && objects::sync_files(&files).is_err() {
            p.remove();
        }
        p
    }

    fn remove(&mut self) {
        for p in self.0.iter_mut().filter_map(Option::take) {
            objects::remove_quietly(&p);
        }
    }
}

/// Inline data that goes to an object file: above `SMALL_DATA_MAX` (a
/// small file's bytes go into its row in the commit itself), and within
/// `MAX_INLINE` (more is refused).
fn needs_file(data: &[u8]) -> bool {
    data.len() as u64 > SMALL_DATA_MAX && data.len() <= crate::proto::MAX_INLINE
}

impl Drop for Prepared {
    fn drop(&mut self) {
        // Renamed by a commit: already gone (quietly ignored).
        self.remove();
    }
}

type JobResult = std::result::Result<Outcome, BatchError>;

/// Group commit: batches that arrive while a commit is in progress are
/// applied together in the next write transaction, with one fsync. The
/// first waiting worker that finds no commit in progress leads the next
/// group; the others sleep until their result is filed. Large batches are
/// kept from costing small ones their wait (see [`select`]).
pub(crate) struct GroupCommit {
    state: Mutex<GroupState>,
    cv: Condvar,
    /// Most batches per transaction; 1 turns grouping off (bench knob).
    max_group: usize,
}

/// A batch in the queue.
struct Waiting {
    ticket: u64,
    job: Arc<Job>,
    /// When it was queued; a large batch yields only until
    /// `since + MAX_DEFER`.
    since: Instant,
    /// Its inline data is prepared (`Prepared`): until then neither it nor
    /// a later batch of its client is taken.
    ready: bool,
}

#[derive(Default)]
struct GroupState {
    /// In ticket order (arrival order; a yielded batch goes back to its
    /// place).
    queue: VecDeque<Waiting>,
    busy: bool,
    done: HashMap<u64, JobResult>,
    next_ticket: u64,
    /// When a small batch was last queued: a large one waits for a lull.
    last_small: Option<Instant>,
    /// Set when a large batch commits (see `PACE`).
    paced: Option<Paced>,
    /// The last group was a starving large batch.
    forced_last: bool,
    /// When the last group's commit ended (for `CODA_SERVER_TRACE`'s
    /// `idle`: how long the group commit waited before this group).
    last_end: Option<Instant>,
}

/// Set to `1` in the server's environment to commit every batch alone
/// (one fsync each): only for measuring what grouping gains.
pub const NO_GROUP_COMMIT_ENV: &str = "CODA_SERVER_NO_GROUP_COMMIT";

/// Largest group; the worker pool (16) bounds it anyway.
const MAX_GROUP: usize = 64;

/// A batch of more records than this is large: it commits in a
/// transaction of its own, after the small batches waiting, and yields to
/// small batches that arrive while it is applied. A client's ordinary
/// writes are batches of one or a few records; a log replayed after a
/// disconnection comes in batches of up to `MAX_BATCH` (4,096).
pub const SMALL_BATCH: usize = 64;

/// The starvation bound: a large batch yields (and waits for a lull) at
/// most this long after it was queued; then it is applied next, whole.
pub const MAX_DEFER: Duration = Duration::from_millis(500);

/// A large batch starts only once no small batch was queued for this long
/// (or at `MAX_DEFER`), so it rarely has to yield halfway.
const LULL: Duration = Duration::from_millis(5);

/// Large batches (of all clients together, so a flood cannot take more
/// by reconnecting under new ids) take at most 1/(1 + PACE) of the write
/// transaction's time while small batches keep coming: after one that
/// took `t` to apply and commit, the next large batch waits `PACE * t`
/// (unless no small batch was queued meanwhile, or `MAX_DEFER` passed).
const PACE: u32 = 8;

/// Records a yielding large batch applies between looks at the queue.
const YIELD_EVERY: usize = 64;

/// Longest a read's reply waits for the journal sync of a group it could
/// have seen (`VolumeStore::durable_for_reply`): one sync takes well under
/// a millisecond; this long means the disk is failing.
const READ_DURABLE_WAIT: Duration = Duration::from_secs(10);

/// When `journal_record` makes its record durable.
#[derive(Clone, Copy)]
enum JournalSync {
    /// Before it returns (the transaction then commits behind it).
    Now,
    /// Written and on its way to the disk; the caller commits the
    /// transaction, then syncs (`sync_journaled`).
    AfterCommit,
}

fn is_large(job: &Job) -> bool {
    job.records.len() > SMALL_BATCH
}

/// What the leader does next.
#[derive(Debug, PartialEq)]
enum Pick {
    /// Apply these queue positions (in order) in one transaction;
    /// `yielding`: the one large batch gives way to small ones.
    Group {
        at: Vec<usize>,
        yielding: bool,
    },
    /// Only large batches wait and none may start before this.
    WaitUntil(Instant),
    Nothing,
}

/// The leader's choice (pure, so it is unit-tested). A client's batches
/// are applied in the order they were queued, so a batch is taken only if
/// every earlier batch of its client is taken before it in the same group.
/// In this order:
/// 1. a large batch that has waited `MAX_DEFER`, alone and not yielding
///    (the starvation bound), unless the last group was one too and small
///    batches wait;
/// 2. the small batches, in arrival order, at most `max_group`;
/// 3. the oldest large batch, alone and yielding, once small batches left
///    a lull of `LULL` and its client's share allows it (`PACE`); else
///    wait for the first of those moments or a `MAX_DEFER`.
fn select(
    queue: &VecDeque<Waiting>,
    now: Instant,
    last_small: Option<Instant>,
    paced: Option<Paced>,
    forced_last: bool,
    max_group: usize,
) -> Pick {
    let mut behind: Vec<ClientId> = Vec::new();
    let small_waits = queue.iter().any(|w| w.ready && !is_large(&w.job));
    for (i, w) in queue.iter().enumerate() {
        // Starving large batches alternate with groups of small ones.
        if forced_last && small_waits {
            break;
        }
        if behind.contains(&w.job.client) {
            continue;
        }
        if !w.ready {
            behind.push(w.job.client);
            continue;
        }
        if is_large(&w.job) && now >= w.since + MAX_DEFER {
            return Pick::Group {
                at: vec![i],
                yielding: false,
            };
        }
        behind.push(w.job.client);
    }
    behind.clear();
    let mut at = Vec::new();
    for (i, w) in queue.iter().enumerate() {
        if at.len() >= max_group {
            break;
        }
        if behind.contains(&w.job.client) {
            continue;
        }
        if is_large(&w.job) || !w.ready {
            behind.push(w.job.client);
        } else {
            at.push(i);
        }
    }
    if !at.is_empty() {
        return Pick::Group {
            at,
            yielding: false,
        };
    }
    // Every client's first batch is large: the oldest that may start
    // goes; else wait for the first moment one may.
    let mut wake: Option<Instant> = None;
    behind.clear();
    for (i, w) in queue.iter().enumerate() {
        if behind.contains(&w.job.client) {
            continue;
        }
        behind.push(w.job.client);
        if !w.ready {
            continue;
        }
        let mut from = last_small.map_or(now, |t| t + LULL);
        if let Some(p) = paced {
            // The share applies only while small batches keep coming.
            if last_small.is_some_and(|t| t > p.set) {
                from = from.max(p.until);
            }
        }
        if now >= from {
            return Pick::Group {
                at: vec![i],
                yielding: true,
            };
        }
        let at = from.min(w.since + MAX_DEFER);
        wake = Some(wake.map_or(at, |t: Instant| t.min(at)));
    }
    wake.map_or(Pick::Nothing, Pick::WaitUntil)
}

/// When the next large batch may start (see `PACE`).
#[derive(Clone, Copy, Debug)]
struct Paced {
    /// When its last large batch committed.
    set: Instant,
    until: Instant,
}

impl GroupCommit {
    pub(crate) fn from_env() -> GroupCommit {
        let off = std::env::var(NO_GROUP_COMMIT_ENV).is_ok_and(|v| v == "1");
        GroupCommit {
            state: Mutex::new(GroupState::default()),
            cv: Condvar::new(),
            max_group: if off { 1 } else { MAX_GROUP },
        }
    }

    /// Whether the large batch of `client` queued at `since` should give
    /// way now: a small batch of another client waits and the large one
    /// is not yet past its starvation bound.
    fn should_yield(&self, client: &ClientId, since: Instant) -> bool {
        if Instant::now() >= since + MAX_DEFER {
            return false;
        }
        let g = self.state.lock();
        g.queue
            .iter()
            .any(|w| w.job.client != *client && !is_large(&w.job))
    }
}

/// The group commit held by a thread that is not applying batches (a
/// journal checkpoint): batches wait for it as for a group in progress.
pub(crate) struct Held<'a>(&'a GroupCommit);

impl GroupCommit {
    /// Hold the group commit if no group is in progress (and, with
    /// `idle_only`, no batch waits); None otherwise.
    pub(crate) fn try_hold(&self, idle_only: bool) -> Option<Held<'_>> {
        let mut g = self.state.lock();
        if g.busy || (idle_only && !g.queue.is_empty()) {
            return None;
        }
        g.busy = true;
        Some(Held(self))
    }

    /// Hold the group commit, waiting for a group in progress to end.
    pub(crate) fn hold(&self) -> Held<'_> {
        self.take_turn();
        Held(self)
    }

    /// Wait for a group in progress to end, then take the turn; the caller
    /// gives it back (`Held`, `LeaderGuard`).
    fn take_turn(&self) {
        let mut g = self.state.lock();
        // Bounded: each wake-up follows the end of another group's commit
        // (groups are bounded: one transaction each).
        while g.busy {
            self.cv.wait(&mut g);
        }
        g.busy = true;
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.state.lock().busy = false;
        self.0.cv.notify_all();
    }
}

/// Marks a queued batch ready (`Waiting::ready`) when dropped.
struct MarkReady<'a> {
    group: &'a GroupCommit,
    ticket: u64,
}

impl Drop for MarkReady<'_> {
    fn drop(&mut self) {
        let mut g = self.group.state.lock();
        if let Some(w) = g.queue.iter_mut().find(|w| w.ticket == self.ticket) {
            w.ready = true;
        }
        drop(g);
        self.group.cv.notify_all();
    }
}

/// Gives the group commit's turn back when dropped armed: if the leader's
/// thread unwinds mid-group, the other workers of the group get an error
/// instead of sleeping forever.
struct LeaderGuard<'a> {
    group: &'a GroupCommit,
    tickets: Vec<u64>,
    /// The leader's own ticket: nobody waits for it then.
    own: u64,
    armed: bool,
}

impl Drop for LeaderGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut g = self.group.state.lock();
        g.busy = false;
        for t in self.tickets.iter().filter(|t| **t != self.own) {
            g.done.insert(
                *t,
                Err(Error::Eio("the server failed while committing the batch".into()).into()),
            );
        }
        self.group.cv.notify_all();
    }
}

/// A batch applied inside the group's transaction, not yet committed.
struct Applied {
    outcome: Outcome,
    created: Vec<PathBuf>,
    replaced: Vec<PathBuf>,
    sync_dirs: BTreeSet<PathBuf>,
    /// Stored data not yet fsynced (an upload is not synced on arrival).
    sync_files: Vec<PathBuf>,
    /// The time the batch stamped its changes with (journaled with it).
    now: Timespec,
}

/// A batch that failed inside the group's transaction. `wrote`: it had
/// already changed the transaction, so the group must start again without
/// it (its own object files are already removed).
struct Failed {
    error: BatchError,
    wrote: bool,
    /// It stopped to give way to small batches (not an error of its own).
    gave_way: bool,
}

impl VolumeStore {
    /// Apply a batch, grouped with the batches of other sessions that
    /// arrive meanwhile; returns once its commit is durable. A failure of
    /// the metadata store itself (a full disk) fails the group and the
    /// store is reopened (see `with_db`).
    #[cfg(test)]
    pub fn reintegrate(
        &self,
        client: &ClientId,
        records: &[Record],
        staged: StagedLookup,
    ) -> std::result::Result<Outcome, BatchError> {
        self.reintegrate_after(client, None, 0, records, staged)
    }

    /// `reintegrate`, each record checked against `who`'s rights (a record
    /// it may not apply fails the batch with `Access`); for a pipelined
    /// batch (`ReintegrateAfter`) nothing is applied, with `NotApplied`,
    /// unless the client's highest applied store id is at least `after`
    /// when the batch's turn comes in its transaction (0: no condition).
    pub fn reintegrate_after(
        &self,
        client: &ClientId,
        who: Option<Arc<super::acl::Who>>,
        after: u64,
        records: &[Record],
        staged: StagedLookup,
    ) -> std::result::Result<Outcome, BatchError> {
        self.reintegrate_logged(client, who, after, records, staged, None, None)
    }

    /// [`VolumeStore::reintegrate_after`] stamping changes with `now` when
    /// given (replication applies a batch with the time its leader chose),
    /// and for a replicated log entry: with `log_index`, the index goes in
    /// the batch's transaction and the commit skips its fsync when it
    /// touches no object file (see `commit_durability`).
    #[allow(clippy::too_many_arguments)] // reintegrate_after's, the time and the index
    pub(crate) fn reintegrate_logged(
        &self,
        client: &ClientId,
        who: Option<Arc<super::acl::Who>>,
        after: u64,
        records: &[Record],
        staged: StagedLookup,
        now: Option<Timespec>,
        log_index: Option<u64>,
    ) -> std::result::Result<Outcome, BatchError> {
        let mut files = HashMap::new();
        for r in records {
            if let RecordOp::Store { upload_id, .. } = r.op {
                if let Some(p) = staged(upload_id) {
                    files.insert(upload_id, p);
                }
            }
        }
        let job = Arc::new(Job {
            client: *client,
            after,
            records: records.to_vec(),
            staged: files,
            now,
            who,
            prepared: std::sync::OnceLock::new(),
            log_index,
        });
        let wanted = Prepared::wanted(records);
        let group = &self.group;
        let large = is_large(&job);
        let mut g = group.state.lock();
        let ticket = g.next_ticket;
        g.next_ticket += 1;
        let now = Instant::now();
        if !large {
            g.last_small = Some(now);
        }
        g.queue.push_back(Waiting {
            ticket,
            job: job.clone(),
            since: now,
            ready: !wanted,
        });
        drop(g);
        // Its place among its session's batches is fixed now: the
        // session's next batch may go to a worker and queue behind it.
        super::workers::release_heavy();
        // Removes what the commit did not take, whatever the outcome.
        let _prepared = wanted.then(|| {
            // Ready even if preparing unwinds (the commit then writes).
            let _ready = MarkReady { group, ticket };
            let p = Prepared::new(&self.root, &job.records);
            let _ = job.prepared.set(p.0.clone());
            p
        });
        drop(job);
        let mut g = group.state.lock();
        // Bounded: each turn finds the result, leads a group, or sleeps
        // until a leader files results, a large batch's lull or starvation
        // bound comes, or (a safety net) a short while passes.
        loop {
            if let Some(r) = g.done.remove(&ticket) {
                return r;
            }
            if g.busy {
                group.cv.wait(&mut g);
                continue;
            }
            let pick = select(
                &g.queue,
                Instant::now(),
                g.last_small,
                g.paced,
                g.forced_last,
                group.max_group,
            );
            let (at, yielding) = match pick {
                Pick::Group { at, yielding } => (at, yielding),
                Pick::WaitUntil(t) => {
                    group.cv.wait_until(&mut g, t);
                    continue;
                }
                Pick::Nothing => {
                    group.cv.wait_for(&mut g, Duration::from_millis(100));
                    continue;
                }
            };
            g.busy = true;
            let idle = g.last_end.map(|t| t.elapsed());
            g.forced_last = at.len() == 1 && !yielding && is_large(&g.queue[at[0]].job);
            let mut jobs: Vec<Waiting> = Vec::with_capacity(at.len());
            for &i in at.iter().rev() {
                jobs.extend(g.queue.remove(i));
            }
            jobs.reverse();
            drop(g);
            let mut guard = LeaderGuard {
                group,
                tickets: jobs.iter().map(|w| w.ticket).collect(),
                own: ticket,
                armed: true,
            };
            let only: Vec<Arc<Job>> = jobs.iter().map(|w| w.job.clone()).collect();
            let give_way = || group.should_yield(&jobs[0].job.client, jobs[0].since);
            let started = Instant::now();
            let results = self.commit_group_or_yield(&only, yielding.then_some(&give_way as _));
            let now = Instant::now();
            if super::wire::tracing() {
                let records: usize = only.iter().map(|j| j.records.len()).sum();
                eprintln!(
                    "TRACE group batches={} records={records} idle={} busy={}",
                    only.len(),
                    idle.map_or(-1, |d| d.as_micros() as i64),
                    (now - started).as_micros()
                );
            }
            g = group.state.lock();
            g.last_end = Some(now);
            guard.armed = false;
            g.busy = false;
            match results {
                Some(results) => {
                    if jobs.len() == 1 && is_large(&jobs[0].job) {
                        let until = now + (now - started) * PACE;
                        g.paced = Some(Paced { set: now, until });
                    }
                    for (w, r) in jobs.into_iter().zip(results) {
                        g.done.insert(w.ticket, r);
                    }
                }
                None => {
                    // It gave way: back to its place, to start again later.
                    for w in jobs {
                        let pos = g.queue.iter().position(|q| q.ticket > w.ticket);
                        let pos = pos.unwrap_or(g.queue.len());
                        g.queue.insert(pos, w);
                    }
                }
            }
            group.cv.notify_all();
        }
    }

    /// Several replicated entries' batches, in log order, in one
    /// transaction (a follower's deferred applications, `replication`):
    /// each result is what [`VolumeStore::reintegrate_logged`] would have
    /// returned for it applied alone after the ones before it (the group
    /// commit's rule). The highest index is the store's applied mark. A
    /// list with inline data to prepare in a file goes one by one.
    pub(crate) fn reintegrate_entries(
        &self,
        batches: Vec<LoggedBatch>,
    ) -> Vec<std::result::Result<Outcome, BatchError>> {
        if batches.len() < 2 || batches.iter().any(|b| Prepared::wanted(&b.records)) {
            return batches
                .into_iter()
                .map(|b| {
                    let staged = b.staged;
                    self.reintegrate_logged(
                        &b.client,
                        b.who,
                        b.after,
                        &b.records,
                        &|up| staged.get(&up).cloned(),
                        b.now,
                        Some(b.log_index),
                    )
                })
                .collect();
        }
        let jobs: Vec<Arc<Job>> = batches
            .into_iter()
            .map(|b| {
                Arc::new(Job {
                    client: b.client,
                    after: b.after,
                    records: b.records,
                    staged: b.staged,
                    now: b.now,
                    who: b.who,
                    prepared: std::sync::OnceLock::new(),
                    log_index: Some(b.log_index),
                })
            })
            .collect();
        // The group commit's turn, as a group's leader takes it.
        let group = &self.group;
        group.take_turn();
        // Gives the turn back when done (or unwinding); nobody else waits
        // for these jobs.
        let _turn = LeaderGuard {
            group,
            tickets: Vec::new(),
            own: 0,
            armed: true,
        };
        self.commit_group_or_yield(&jobs, None).unwrap_or_else(|| {
            // Only a group that may give way returns None.
            jobs.iter()
                .map(|_| Err(Error::Eio("a group gave way".into()).into()))
                .collect()
        })
    }

    /// Commit `jobs` in one transaction (retrying without a batch that
    /// failed after writing); one result per job, in order.
    #[cfg(test)]
    fn commit_group(&self, jobs: &[Arc<Job>]) -> Vec<JobResult> {
        self.commit_group_or_yield(jobs, None)
            .expect("a group that may not yield is settled")
    }

    /// As `commit_group`, for a group whose one (large) batch gives way
    /// when `give_way` says so: then nothing is committed and `None` is
    /// returned.
    fn commit_group_or_yield(
        &self,
        jobs: &[Arc<Job>],
        give_way: Option<&dyn Fn() -> bool>,
    ) -> Option<Vec<JobResult>> {
        match self.with_db(|db| self.group_in(db, jobs, give_way)) {
            Ok(v) => v,
            // The store itself failed: nothing of the group was committed.
            Err(e) => Some(
                jobs.iter()
                    .map(|_| Err(BatchError::from(same_error(&e))))
                    .collect(),
            ),
        }
    }

    fn group_in(
        &self,
        db: &Database,
        jobs: &[Arc<Job>],
        give_way: Option<&dyn Fn() -> bool>,
    ) -> Result<Option<Vec<JobResult>>> {
        let mut out: Vec<Option<JobResult>> = jobs.iter().map(|_| None).collect();
        // Each round that does not commit settles at least one more job.
        for _round in 0..=jobs.len() {
            let t_begin = Instant::now();
            let mut txn = db.begin_write()?;
            let mut applied: Vec<(usize, Applied)> = Vec::new();
            let mut restart = false;
            let mut fatal = None;
            for (i, job) in jobs.iter().enumerate() {
                if out[i].is_some() {
                    continue;
                }
                match self.apply_job(&txn, job, give_way) {
                    Ok(a) => applied.push((i, a)),
                    Err(f) if f.gave_way => {
                        let _ = txn.abort();
                        for (_, a) in &applied {
                            a.created.iter().for_each(|p| objects::remove_quietly(p));
                        }
                        return Ok(None);
                    }
                    Err(f) if is_store_failure(&f.error.error) => {
                        fatal = Some(f.error.error);
                        break;
                    }
                    Err(f) => {
                        out[i] = Some(Err(f.error));
                        if f.wrote {
                            restart = true;
                            break;
                        }
                    }
                }
            }
            let discard = |applied: &[(usize, Applied)]| {
                for (_, a) in applied {
                    a.created.iter().for_each(|p| objects::remove_quietly(p));
                }
            };
            if let Some(e) = fatal {
                let _ = txn.abort();
                discard(&applied);
                return Err(e);
            }
            if restart {
                let _ = txn.abort();
                discard(&applied);
                continue;
            }
            if let Err(e) = commit_durability(&mut txn, jobs, &applied) {
                let _ = txn.abort();
                discard(&applied);
                return Err(e);
            }
            let dirs: BTreeSet<&PathBuf> = applied.iter().flat_map(|(_, a)| &a.sync_dirs).collect();
            let files: Vec<&PathBuf> = applied.iter().flat_map(|(_, a)| &a.sync_files).collect();
            // Metadata and small data only: durable in the journal
            // (docs/SERVER.md "Commit journal"). A replicated entry's
            // durable copy is the Raft log (`commit_durability`), never
            // this journal.
            let t_applied = Instant::now();
            let entries = jobs.iter().any(|j| j.log_index.is_some());
            let journaled = !entries
                && files.is_empty()
                && dirs.is_empty()
                && self.journal_group(&txn, jobs, &applied)?;
            if journaled {
                txn.set_durability(redb::Durability::None)?;
            }
            let t_journaled = Instant::now();
            let mut t_committed = t_journaled;
            let mut committed = false;
            let commit = (|| -> Result<()> {
                // Durable before acknowledged: the stored data and the
                // new names (at once), then the metadata that points at
                // them.
                let dirs: Vec<&PathBuf> = dirs.into_iter().collect();
                objects::sync_files_and_dirs(&files, &dirs, super::volume::clear_space_error)?;
                // A journaled group's record is on its way to the disk
                // while redb commits; replies that could show the group
                // wait for its sync (`wal::Unsynced`).
                let _visible = journaled.then(|| self.wal.unsynced.begin());
                txn.commit()?;
                committed = true;
                t_committed = Instant::now();
                if journaled {
                    self.sync_journaled(db)?;
                }
                Ok(())
            })();
            if let Err(e) = commit {
                if journaled && !committed {
                    // Not committed: its record must not be replayed.
                    self.cancel_journaled();
                }
                discard(&applied);
                return Err(e);
            }
            let t_synced = Instant::now();
            if !entries {
                self.after_commit(db, journaled);
            }
            if super::wire::tracing() {
                let us = |a: Instant, b: Instant| b.saturating_duration_since(a).as_micros();
                eprintln!(
                    "TRACE commit apply={} journal={} commit={} sync={} after={} journaled={}",
                    us(t_begin, t_applied),
                    us(t_applied, t_journaled),
                    us(t_journaled, t_committed),
                    us(t_committed, t_synced),
                    us(t_synced, Instant::now()),
                    journaled as u8
                );
            }
            for (i, a) in applied {
                // Committed: the replaced files are unreferenced now.
                a.replaced.iter().for_each(|p| objects::remove_quietly(p));
                out[i] = Some(Ok(a.outcome));
            }
            break;
        }
        Ok(Some(
            out.into_iter()
                .map(|r| r.unwrap_or_else(|| Err(Error::Eio("batch not settled".into()).into())))
                .collect(),
        ))
    }

    /// Apply one batch inside the group's transaction: all of it, or (on
    /// failure) nothing the caller keeps.
    fn apply_job(
        &self,
        txn: &WriteTransaction,
        job: &Job,
        give_way: Option<&dyn Fn() -> bool>,
    ) -> std::result::Result<Applied, Failed> {
        let early = |e: BatchError| Failed {
            error: e,
            wrote: false,
            gave_way: false,
        };
        let client = &job.client;
        let records = &job.records[..];
        let highest = (|| -> Result<u64> {
            let t = txn.open_table(CLIENT_STORE)?;
            let v = t.get(client)?.map(|v| v.value());
            Ok(v.unwrap_or(0))
        })()
        .map_err(|e| early(e.into()))?;
        let already = |r: &Record| highest > 0 && r.store_id <= highest;
        // Read in this transaction, after the batches before this one in
        // it (an earlier batch of the client that failed is not among
        // them): exactly "the batch sent before this one applied".
        if job.after > highest {
            return Err(early(
                Error::NotApplied(format!(
                    "the batch before it (up to store id {}) was not applied; this client's \
                     last applied store id is {highest}",
                    job.after
                ))
                .into(),
            ));
        }
        check_ahead(highest, records).map_err(early)?;
        if !records.is_empty() && records.iter().all(already) {
            // The reply to this batch was lost: answer again, apply nothing.
            let results = (|| -> Result<Vec<Attr>> {
                let objects = txn.open_table(OBJECTS)?;
                records
                    .iter()
                    .map(|r| current_attr(&objects, r.op.target()))
                    .collect()
            })()
            .map_err(|e| early(e.into()))?;
            return Ok(Applied {
                outcome: Outcome {
                    results,
                    replayed: true,
                    ..Outcome::default()
                },
                created: Vec::new(),
                replaced: Vec::new(),
                sync_dirs: BTreeSet::new(),
                sync_files: Vec::new(),
                now: job.now.unwrap_or_default(),
            });
        }
        let lookup = |up: u64| job.staged.get(&up).cloned();
        let mut batch = Batch::open(txn, self, client, &lookup, job.who.clone())
            .map_err(|e| early(e.into()))?;
        if let Some(now) = job.now {
            batch.now = now;
        }
        let mut results = Vec::with_capacity(records.len());
        let mut failure = None;
        let mut gave_way = false;
        for (i, r) in records.iter().enumerate() {
            if i % YIELD_EVERY == YIELD_EVERY - 1 && give_way.is_some_and(|f| f()) {
                gave_way = true;
                break;
            }
            // A record applied by an earlier batch (the client merged the
            // rest of a half-acknowledged log into a new one) is skipped.
            let step = if already(r) {
                current_attr(&batch.objects, r.op.target())
            } else {
                batch.prepared = job.prepared.get().and_then(|p| p.get(i).cloned().flatten());
                batch.apply(&r.op)
            };
            match step {
                Ok(a) => results.push(a),
                Err(e) => {
                    failure = Some(BatchError {
                        error: e,
                        index: i as u32,
                    });
                    break;
                }
            }
        }
        let wrote = batch.wrote;
        let created = std::mem::take(&mut batch.created);
        let fail = |error: BatchError, wrote: bool| {
            created.iter().for_each(|p| objects::remove_quietly(p));
            Failed {
                error,
                wrote,
                gave_way,
            }
        };
        if gave_way {
            drop(batch);
            return Err(fail(Error::Again("gave way".into()).into(), true));
        }
        if let Some(f) = failure {
            drop(batch);
            return Err(fail(f, wrote));
        }
        let replaced = std::mem::take(&mut batch.replaced);
        let changed = std::mem::take(&mut batch.changed);
        let deleted = std::mem::take(&mut batch.deleted);
        let consumed = std::mem::take(&mut batch.consumed);
        let sync_dirs = std::mem::take(&mut batch.sync_dirs);
        let sync_files = std::mem::take(&mut batch.sync_files);
        let now = batch.now;
        drop(batch);
        let top = records.iter().map(|r| r.store_id).max().unwrap_or(0);
        let volumes: BTreeSet<u32> = changed.iter().map(|f| f.volume).collect();
        let marks = (|| -> Result<()> {
            if top > highest {
                txn.open_table(CLIENT_STORE)?.insert(client, top)?;
            }
            // The volume stamps move in the same transaction as the batch.
            let mut vs = txn.open_table(VOLSTAMPS)?;
            for v in &volumes {
                let mut s = match vs.get(*v)? {
                    Some(b) => VolStamp::decode(b.value())?,
                    None => VolStamp::default(),
                };
                s.bump(client);
                vs.insert(*v, &s.encode()[..])?;
            }
            Ok(())
        })();
        if let Err(e) = marks {
            return Err(fail(e.into(), true));
        }
        // Holders of a volume callback hear of every change to the volume.
        let changed = changed
            .into_iter()
            .chain(volumes.into_iter().map(volume_fid))
            .collect();
        Ok(Applied {
            outcome: Outcome {
                results,
                changed,
                deleted: deleted.into_iter().collect(),
                consumed_uploads: consumed,
                replayed: false,
            },
            created,
            replaced,
            sync_dirs,
            sync_files,
            now,
        })
    }
}

impl VolumeStore {
    /// Journal the group applied in `txn` (docs/SERVER.md "Commit
    /// journal") when it touched no object file and its record fits:
    /// append it, sync, and note its sequence number in `txn`. Returns
    /// whether it is durable in the journal (then `txn` may commit without
    /// a sync); false: commit durably, as without a journal.
    fn journal_group(
        &self,
        txn: &WriteTransaction,
        jobs: &[Arc<Job>],
        applied: &[(usize, Applied)],
    ) -> Result<bool> {
        let files = |a: &Applied| {
            !(a.created.is_empty()
                && a.replaced.is_empty()
                && a.sync_files.is_empty()
                && a.sync_dirs.is_empty())
        };
        if applied.iter().any(|(_, a)| files(a)) {
            return Ok(false);
        }
        // A batch answered again changed nothing: nothing to journal.
        let live: Vec<&(usize, Applied)> = applied
            .iter()
            .filter(|(_, a)| !a.outcome.replayed)
            .collect();
        // A Store's bytes come from a staged upload, gone after the
        // commit: replay could not read them again.
        let staged = |i: usize| {
            jobs[i]
                .records
                .iter()
                .any(|r| matches!(r.op, RecordOp::Store { .. }))
        };
        if live.is_empty() || live.iter().any(|(i, _)| staged(*i)) {
            return Ok(false);
        }
        let payload = super::wal::encode_group(live.iter().map(|(i, a)| {
            let job = &jobs[*i];
            super::wal::EntryRef {
                client: &job.client,
                after: job.after,
                records: &job.records,
                now: a.now,
                who: job.who.as_deref(),
            }
        }));
        self.journal_record(txn, &payload, JournalSync::AfterCommit)
    }

    /// Before a reply that read the store (anything but a batch's own
    /// answer): wait until every group it could have seen is durable
    /// (`wal::Unsynced`), at most `READ_DURABLE_WAIT`.
    pub(crate) fn durable_for_reply(&self) -> Result<()> {
        if self.wal.unsynced.wait_durable(READ_DURABLE_WAIT) {
            Ok(())
        } else {
            Err(Error::Timeout(format!(
                "the server's disk has not confirmed a commit for {} s",
                READ_DURABLE_WAIT.as_secs()
            )))
        }
    }

    /// Make a group's journal record durable once redb committed the
    /// group (its write started before the commit: `Journal::write_out`).
    /// If the sync fails, a durable redb commit covers the group instead,
    /// and the journal starts again (`checkpoint_locked`).
    fn sync_journaled(&self, db: &Database) -> Result<()> {
        let r = self.wal.with_journal(|journal| match journal.sync() {
            Ok(()) => Ok(()),
            Err(e) => {
                super::log::warn(format_args!(
                    "commit journal sync failed ({e}); making the group durable in redb"
                ));
                self.checkpoint_locked(db, journal)
            }
        });
        r.unwrap_or_else(|| Err(Error::Eio("the commit journal went away mid-group".into())))
    }

    /// Append `payload` to the journal and write it (synced now, or after
    /// the commit as `sync` says), noting its sequence number in `txn`.
    /// Returns whether the journal holds it (then `txn` may commit without
    /// a sync); false when there is no journal, it is broken, or the
    /// record does not fit: commit durably. The caller holds the group
    /// commit.
    fn journal_record(
        &self,
        txn: &WriteTransaction,
        payload: &[u8],
        sync: JournalSync,
    ) -> Result<bool> {
        let journaled = self.wal.with_journal(|journal| -> Result<bool> {
            if journal.is_broken() || !journal.fits(payload.len()) {
                return Ok(false);
            }
            let seq = journal.next_seq();
            txn.open_table(SETTINGS)?
                .insert(super::wal::JOURNAL_SEQ_KEY, seq.to_le_bytes().as_slice())?;
            let written = journal.append(payload).and_then(|()| match sync {
                JournalSync::Now => journal.sync(),
                JournalSync::AfterCommit => journal.write_out(),
            });
            if let Err(e) = written {
                super::log::warn(format_args!(
                    "commit journal failed ({e}); committing durably until it is reset"
                ));
                return Ok(false);
            }
            Ok(true)
        });
        let journaled = journaled.transpose()?.unwrap_or(false);
        if journaled {
            self.wal.since.lock().get_or_insert_with(Instant::now);
        }
        Ok(journaled)
    }

    /// Commit a handshake's claim of a client id (`owners::claim_txn`),
    /// durable before it returns: in the journal when this server keeps
    /// one (so a claim needs no space in redb, and a new client connects
    /// to a server whose disk is full), else in redb.
    pub(crate) fn commit_claim(&self, claim: &super::wal::Claim) -> Result<()> {
        // The journal is used by whoever holds the group commit.
        let _held = self.group.hold();
        self.with_db(|db| {
            let mut txn = db.begin_write()?;
            super::owners::claim_txn(&txn, &claim.client, &claim.user, claim.now)?;
            let journaled =
                self.journal_record(&txn, &super::wal::encode_claim(claim), JournalSync::Now)?;
            if journaled {
                txn.set_durability(redb::Durability::None)?;
            }
            if let Err(e) = txn.commit() {
                if journaled {
                    self.cancel_journaled();
                }
                return Err(e.into());
            }
            self.after_commit(db, journaled);
            Ok(())
        })
    }

    /// The group just journaled did not commit: its record is not to be
    /// replayed. If even this fails, a restart applies it (its client,
    /// told it failed, sends it again and finds it applied).
    fn cancel_journaled(&self) {
        let r = self.wal.with_journal(|journal| {
            journal
                .append(&super::wal::encode_cancel())
                .and_then(|()| journal.sync())
        });
        if let Some(Err(e)) = r {
            super::log::warn(format_args!("cannot cancel a journaled group: {e}"));
        }
    }

    /// After a group's commit: a durable one covers everything journaled
    /// (the journal starts again); past half the journal, checkpoint.
    fn after_commit(&self, db: &Database, journaled: bool) {
        let r = self.wal.with_journal(|journal| {
            if journaled {
                let full = journal.used() > journal.room() / 2;
                if !full && journal.records() < super::wal::CHECKPOINT_GROUPS {
                    return Ok(());
                }
                // A full disk: the journal keeps the groups while it has
                // room (a group that does not fit commits durably, and
                // fails for lack of space by itself).
                if self.wal.checkpoints_deferred() {
                    return Ok(());
                }
                self.checkpoint_locked(db, journal)
            } else if journal.records() > 0 || journal.is_broken() {
                self.reset_journal(journal)
            } else {
                Ok(())
            }
        });
        if let Some(Err(e)) = r {
            super::log::warn(format_args!("commit journal checkpoint failed: {e}"));
        }
    }

    /// Make every commit durable (an empty durable commit covers the
    /// earlier non-durable ones) and start the journal again. When that
    /// fails for lack of space, checkpoints wait (`Wal::defer_checkpoints`):
    /// the journal still holds every group durably, and redb, refusing
    /// transactions after the failure, is reopened by the next request.
    pub(crate) fn checkpoint_locked(
        &self,
        db: &Database,
        journal: &mut crate::journal::Journal,
    ) -> Result<()> {
        let synced = db
            .begin_write()
            .map_err(Error::from)
            .and_then(|txn| txn.commit().map_err(Error::from));
        if let Err(e) = synced {
            if super::volume::is_out_of_space(&e) {
                self.wal.defer_checkpoints();
            }
            return Err(e);
        }
        self.reset_journal(journal)
    }

    /// Start the journal again after a durable commit (a checkpoint's, or
    /// a group's that could not be journaled): redb holds everything, and
    /// the disk had room for it, so a later failure for lack of space
    /// waits `SPACE_RETRY` again.
    fn reset_journal(&self, journal: &mut crate::journal::Journal) -> Result<()> {
        self.wal.checkpoint_done();
        journal.reset()?;
        *self.wal.since.lock() = None;
        Ok(())
    }

    /// (Re)open the journal and apply the groups it holds that redb does
    /// not (the store was reopened, or the server stopped without a
    /// checkpoint), in order and as first applied, then checkpoint if
    /// `checkpoint` (a reopen on a full disk does not: `replayed`). The
    /// journal is used from then on if `Wal::wanted`.
    pub(crate) fn replay_in(&self, db: &Database, checkpoint: bool) -> Result<()> {
        // Out of its slot while it is replayed and synced (no lock held
        // across the fsyncs); groups meanwhile commit durably.
        drop(self.wal.journal.lock().take());
        let keep = self.wal.wanted;
        let path = super::wal::path(&self.root);
        if !keep && !path.exists() {
            return Ok(());
        }
        let existed = path.exists();
        let (mut journal, found) =
            match crate::journal::Journal::open(&path, super::wal::capacity()) {
                Ok(v) => v,
                // No journal could be made (a full disk): serve without one,
                // every group committing durably.
                Err(e) if !existed => {
                    super::log::warn(format_args!("serving without a commit journal: {e}"));
                    let _ = std::fs::remove_file(path.with_extension("new"));
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
        let applied = {
            let txn = db.begin_read()?;
            let settings = txn.open_table(SETTINGS)?;
            let v = settings.get(super::wal::JOURNAL_SEQ_KEY)?;
            v.and_then(|v| v.value().try_into().ok())
                .map_or(0, u64::from_le_bytes)
        };
        let groups = super::wal::pending(&found, journal.start_seq(), applied)?;
        let n = groups.len();
        for (seq, p) in groups {
            match p {
                super::wal::Pending::Group(entries) => self.replay_group(db, seq, entries)?,
                super::wal::Pending::Claim(c) => self.replay_claim(db, seq, &c)?,
            }
        }
        if checkpoint && (!found.is_empty() || journal.is_broken()) {
            self.checkpoint_locked(db, &mut journal)?;
        } else if !found.is_empty() {
            // Kept for a later checkpoint (the idle one, at the latest).
            self.wal.since.lock().get_or_insert_with(Instant::now);
        }
        if n > 0 {
            super::log::info(format_args!(
                "applied {n} group(s) of batches from the commit journal"
            ));
        }
        if keep {
            *self.wal.journal.lock() = Some(journal);
        }
        Ok(())
    }

    /// One journaled claim, applied again. It held when journaled, on the
    /// same state; if it no longer does, say so and go on.
    fn replay_claim(&self, db: &Database, seq: u64, c: &super::wal::Claim) -> Result<()> {
        let mut txn = db.begin_write()?;
        txn.set_durability(redb::Durability::None)?;
        match super::owners::claim_txn(&txn, &c.client, &c.user, c.now) {
            Ok(()) => {}
            Err(e) if is_store_failure(&e) => return Err(e),
            Err(e) => {
                txn.abort()?;
                super::log::warn(format_args!(
                    "journal record {seq}: a claim no longer applies: {e}"
                ));
                txn = db.begin_write()?;
                txn.set_durability(redb::Durability::None)?;
            }
        }
        txn.open_table(SETTINGS)?
            .insert(super::wal::JOURNAL_SEQ_KEY, seq.to_le_bytes().as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// One journaled group, applied again in one transaction.
    fn replay_group(&self, db: &Database, seq: u64, entries: Vec<super::wal::Entry>) -> Result<()> {
        let jobs: Vec<Job> = entries
            .into_iter()
            .map(|e| Job {
                client: e.client,
                after: e.after,
                records: e.records,
                staged: HashMap::new(),
                now: Some(e.now),
                who: e.who.map(Arc::new),
                prepared: std::sync::OnceLock::new(),
                log_index: None,
            })
            .collect();
        let mut skip = vec![false; jobs.len()];
        // Each round that does not commit skips one more batch.
        for _round in 0..=jobs.len() {
            let mut txn = db.begin_write()?;
            txn.set_durability(redb::Durability::None)?;
            let mut restart = false;
            for (i, job) in jobs.iter().enumerate() {
                if skip[i] {
                    continue;
                }
                match self.apply_job(&txn, job, None) {
                    Ok(_) => {}
                    Err(f) if is_store_failure(&f.error.error) => return Err(f.error.error),
                    Err(f) => {
                        // It applied when journaled, on the same state:
                        // say so loudly, keep the others.
                        super::log::warn(format_args!(
                            "journal record {seq}: a batch no longer applies: {}",
                            f.error.error
                        ));
                        skip[i] = true;
                        if f.wrote {
                            restart = true;
                            break;
                        }
                    }
                }
            }
            if restart {
                let _ = txn.abort();
                continue;
            }
            txn.open_table(SETTINGS)?
                .insert(super::wal::JOURNAL_SEQ_KEY, seq.to_le_bytes().as_slice())?;
            txn.commit()?;
            return Ok(());
        }
        Err(Error::Eio(format!("journal record {seq} did not settle")))
    }
}

/// A replicated entry's batch (every job of the group carries its log
/// index) writes the index in its transaction, and commits without an
/// fsync unless it touches an object file: the Raft log holds the entry
/// durably, and a crash re-applies it from there (docs/SERVER.md
/// "Replication"). A commit that creates, replaces or syncs a file stays
/// durable: the files it replaces are deleted right after it, so the
/// durable state must not name them.
fn commit_durability(
    txn: &mut WriteTransaction,
    jobs: &[Arc<Job>],
    applied: &[(usize, Applied)],
) -> Result<()> {
    // The mark goes with the entry's changes whatever else shares the
    // transaction; the fsync is skipped only if every batch is an entry.
    if let Some(top) = jobs.iter().filter_map(|j| j.log_index).max() {
        txn.open_table(SETTINGS)?.insert(
            super::replication::machine::APPLIED_KEY,
            top.to_be_bytes().as_slice(),
        )?;
    }
    if jobs.iter().any(|j| j.log_index.is_none()) {
        return Ok(());
    }
    let files = applied.iter().any(|(_, a)| {
        !(a.created.is_empty()
            && a.replaced.is_empty()
            && a.sync_files.is_empty()
            && a.sync_dirs.is_empty()
            && a.outcome.consumed_uploads.is_empty())
    });
    if !files {
        txn.set_durability(redb::Durability::None)?;
    }
    Ok(())
}

/// The same failure again, for every batch of a group the store failed.
/// Inline data past `MAX_INLINE` is refused with the record's index, like
/// any other bad record: the batch applies nothing.
fn check_inline(data: &[u8]) -> Result<()> {
    if data.len() > crate::proto::MAX_INLINE {
        return Err(Error::Invalid(format!(
            "inline data of {} bytes (at most {} in one record; larger files go as a \
             staged upload and a Store)",
            data.len(),
            crate::proto::MAX_INLINE
        )));
    }
    Ok(())
}

/// A regular file whose bytes are in its `SMALL_DATA` row.
fn is_small(rec: &ObjectRec) -> bool {
    rec.attr.ftype == FileType::File && !rec.has_file && rec.attr.size > 0
}

fn same_error(e: &Error) -> Error {
    match e {
        Error::Io { context, source } => Error::io(
            context.clone(),
            match source.raw_os_error() {
                Some(n) => std::io::Error::from_raw_os_error(n),
                None => std::io::Error::new(source.kind(), source.to_string()),
            },
        ),
        Error::NoSpace(m) => Error::NoSpace(m.clone()),
        other => Error::Eio(other.to_string()),
    }
}

/// The attr of an object now, or for one since deleted a placeholder with
/// nlink 0 (the reply to a replayed Remove).
fn current_attr<T: ReadableTable<&'static [u8; 16], &'static [u8]>>(
    objects: &T,
    fid: Fid,
) -> Result<Attr> {
    Ok(match get_object(objects, fid)? {
        Some(rec) => rec.attr,
        None => Attr {
            fid,
            ftype: FileType::File,
            mode: 0,
            nlink: 0,
            size: 0,
            mtime: Timespec::default(),
            ctime: Timespec::default(),
            version: 0,
            uid: 0,
            gid: 0,
            atime: Timespec::default(),
            rdev: 0,
        },
    })
}

/// What a creating record makes (Create, Mkdir, Symlink, Mknod).
struct New<'a> {
    ftype: FileType,
    mode: u32,
    target: &'a str,
    mtime: Timespec,
    uid: u32,
    gid: u32,
    rdev: u64,
}

impl New<'static> {
    /// A regular file (Create, and the create half of CreateWith).
    fn file(mode: u32, mtime: Timespec, uid: u32, gid: u32) -> Self {
        New {
            ftype: FileType::File,
            mode,
            target: "",
            mtime,
            uid,
            gid,
            rdev: 0,
        }
    }
}

struct Batch<'t, 's> {
    objects: Table<'t, &'static [u8; 16], &'static [u8]>,
    dirents: Table<'t, (&'static [u8; 16], &'static str), &'static [u8; 17]>,
    reserved: Table<'t, (u32, u64), &'static [u8; 20]>,
    graves: Table<'t, &'static [u8; 16], ()>,
    usage: Table<'t, u32, u64>,
    quotas: Table<'t, u32, u64>,
    /// Small files' bytes (`SMALL_DATA`).
    small: Table<'t, &'static [u8; 16], &'static [u8]>,
    store: &'s VolumeStore,
    client: &'s ClientId,
    staged: StagedLookup<'s>,
    /// Rights checks, owners and access lists (`acl.rs`).
    guard: super::acl::Guard<'t>,
    now: Timespec,
    /// Object files made by this batch: removed if it aborts.
    created: Vec<PathBuf>,
    /// Object files this batch stops referencing: removed once it commits.
    replaced: Vec<PathBuf>,
    changed: BTreeSet<Fid>,
    deleted: BTreeSet<Fid>,
    sync_dirs: BTreeSet<PathBuf>,
    /// Object files linked from uploads, whose data must be fsynced
    /// before the commit (an upload is not synced when it arrives).
    sync_files: Vec<PathBuf>,
    consumed: Vec<u64>,
    /// The record being applied's inline data, already written and
    /// fsynced (`Prepared`): renamed into place instead of written.
    prepared: Option<PathBuf>,
    /// Something was written to the transaction (a failure then spoils it
    /// for the rest of the group).
    wrote: bool,
}

impl<'t, 's> Batch<'t, 's> {
    fn open(
        txn: &'t WriteTransaction,
        store: &'s VolumeStore,
        client: &'s ClientId,
        staged: StagedLookup<'s>,
        who: Option<Arc<super::acl::Who>>,
    ) -> Result<Batch<'t, 's>> {
        Ok(Batch {
            objects: txn.open_table(OBJECTS)?,
            dirents: txn.open_table(DIRENTS)?,
            reserved: txn.open_table(RESERVED)?,
            graves: txn.open_table(GRAVES)?,
            usage: txn.open_table(VOLUSAGE)?,
            quotas: txn.open_table(QUOTAS)?,
            small: txn.open_table(SMALL_DATA)?,
            store,
            client,
            staged,
            guard: super::acl::Guard::open(txn, who)?,
            now: Timespec::now(),
            created: Vec::new(),
            replaced: Vec::new(),
            changed: BTreeSet::new(),
            deleted: BTreeSet::new(),
            sync_dirs: BTreeSet::new(),
            sync_files: Vec::new(),
            consumed: Vec::new(),
            prepared: None,
            wrote: false,
        })
    }

    fn apply(&mut self, op: &RecordOp) -> Result<Attr> {
        self.guard.authorize(&self.objects, &self.dirents, op)?;
        match op {
            RecordOp::Store {
                fid,
                expected_version,
                upload_id,
                length,
                mtime,
            } => self.store(*fid, *expected_version, *upload_id, *length, *mtime),
            RecordOp::StoreInline {
                fid,
                expected_version,
                mtime,
                data,
            } => {
                check_inline(data)?;
                self.store_inline(*fid, *expected_version, *mtime, data)
            }
            RecordOp::CreateWith {
                parent,
                name,
                fid,
                mode,
                mtime,
                uid,
                gid,
                data,
            } => {
                check_inline(data)?;
                self.create(*parent, name, *fid, New::file(*mode, *mtime, *uid, *gid))?;
                // The creator stores into its own new file: the create's
                // rights check covers it (as a Store of a virgin file).
                self.store_inline(*fid, 0, *mtime, data)
            }
            RecordOp::Create {
                parent,
                name,
                fid,
                mode,
                mtime,
                uid,
                gid,
            } => self.create(*parent, name, *fid, New::file(*mode, *mtime, *uid, *gid)),
            RecordOp::Mkdir {
                parent,
                name,
                fid,
                mode,
                mtime,
                uid,
                gid,
            } => self.create(
                *parent,
                name,
                *fid,
                New {
                    ftype: FileType::Dir,
                    mode: *mode,
                    target: "",
                    mtime: *mtime,
                    uid: *uid,
                    gid: *gid,
                    rdev: 0,
                },
            ),
            RecordOp::Symlink {
                parent,
                name,
                fid,
                target,
                mtime,
                uid,
                gid,
            } => self.create(
                *parent,
                name,
                *fid,
                New {
                    ftype: FileType::Symlink,
                    mode: 0o777,
                    target,
                    mtime: *mtime,
                    uid: *uid,
                    gid: *gid,
                    rdev: 0,
                },
            ),
            RecordOp::SetXattr {
                fid,
                name,
                how,
                value,
            } => self.set_xattr(*fid, name, *how, value),
            RecordOp::Mknod {
                parent,
                name,
                fid,
                ftype,
                mode,
                rdev,
                mtime,
                uid,
                gid,
            } => {
                if !ftype.is_special() {
                    return Err(Error::Invalid(format!("mknod of a {ftype:?}")));
                }
                let rdev = match ftype {
                    FileType::CharDev | FileType::BlockDev => *rdev,
                    _ => 0,
                };
                self.create(
                    *parent,
                    name,
                    *fid,
                    New {
                        ftype: *ftype,
                        mode: *mode,
                        target: "",
                        mtime: *mtime,
                        uid: *uid,
                        gid: *gid,
                        rdev,
                    },
                )
            }
            RecordOp::Link { parent, name, fid } => self.link(*parent, name, *fid),
            RecordOp::Remove { parent, name, fid } => self.remove(*parent, name, *fid, false),
            RecordOp::Rmdir { parent, name, fid } => self.remove(*parent, name, *fid, true),
            RecordOp::Rename {
                src_parent,
                src_name,
                dst_parent,
                dst_name,
                fid,
                replaces,
            } => self.rename(
                *src_parent,
                src_name,
                *dst_parent,
                dst_name,
                *fid,
                *replaces,
            ),
            RecordOp::SetAttr {
                fid,
                expected_version,
                mode,
                size,
                mtime,
                uid,
                gid,
                atime,
            } => self.setattr(
                *fid,
                *expected_version,
                *mode,
                *size,
                *mtime,
                (*uid, *gid, *atime),
            ),
        }
    }

    // ---- state access -------------------------------------------------

    fn obj(&self, fid: Fid) -> Result<ObjectRec> {
        get_object(&self.objects, fid)?.ok_or_else(|| stale(fid))
    }

    fn dir(&self, fid: Fid) -> Result<ObjectRec> {
        let rec = self.obj(fid)?;
        if rec.attr.ftype != FileType::Dir {
            return Err(Error::NotDir(format!("{fid}")));
        }
        Ok(rec)
    }

    fn put(&mut self, rec: &ObjectRec) -> Result<()> {
        self.wrote = true;
        self.objects
            .insert(&rec.attr.fid.to_bytes(), rec.encode().as_slice())?;
        self.changed.insert(rec.attr.fid);
        Ok(())
    }

    fn lookup(&self, dir: Fid, name: &str) -> Result<Option<(Fid, FileType)>> {
        match self.dirents.get((&dir.to_bytes(), name))? {
            Some(v) => Ok(Some(decode_entry(v.value())?)),
            None => Ok(None),
        }
    }

    fn is_empty_dir(&self, dir: Fid) -> Result<bool> {
        let key = dir.to_bytes();
        let mut range = self.dirents.range((&key, "")..)?;
        Ok(match range.next() {
            Some(item) => item?.0.value().0 != &key,
            None => true,
        })
    }

    /// A directory's entries changed: one version step, new times, and the
    /// entry and subdirectory counts (size and nlink) adjusted.
    fn touch_dir(&mut self, dir: Fid, entries: i64, subdirs: i64) -> Result<()> {
        let mut rec = self.obj(dir)?;
        rec.attr.size = rec.attr.size.saturating_add_signed(entries);
        rec.attr.nlink = (rec.attr.nlink as i64 + subdirs).max(2) as u32;
        rec.attr.mtime = self.now;
        self.bump(&mut rec);
        self.put(&rec)
    }

    /// A file in `volume` goes from `old` to `new` bytes: move the volume's
    /// usage (in this transaction), refusing growth past its quota.
    fn charge(&mut self, volume: u32, old: u64, new: u64) -> Result<()> {
        let used = self.usage.get(volume)?.map(|v| v.value()).unwrap_or(0);
        let next = used.saturating_sub(old).saturating_add(new);
        if new > old {
            if let Some(quota) = self.quotas.get(volume)?.map(|v| v.value()) {
                if next > quota {
                    return Err(Error::Quota(format!(
                        "volume {volume} would hold {next} bytes, over its quota of {quota}"
                    )));
                }
            }
        }
        self.wrote = true;
        self.usage.insert(volume, next)?;
        Ok(())
    }

    /// A file may not grow past the server's largest file size: a sparse
    /// file that big would be fetched whole by every reader.
    fn check_size(&self, size: u64) -> Result<()> {
        let max = self.store.max_file_size;
        if size > max {
            return Err(Error::Invalid(format!(
                "file size {size} exceeds the server's maximum file size {max}"
            )));
        }
        Ok(())
    }

    fn bump(&self, rec: &mut ObjectRec) {
        rec.attr.version += 1;
        rec.attr.ctime = self.now;
    }

    /// The object lost its last name: forget it, keep its fid from being
    /// reused, and drop its data file after the commit.
    fn delete(&mut self, mut rec: ObjectRec) -> Result<Attr> {
        let fid = rec.attr.fid;
        if rec.attr.ftype == FileType::File {
            self.charge(fid.volume, rec.attr.size, 0)?;
        }
        self.wrote = true;
        self.objects.remove(&fid.to_bytes())?;
        self.graves.insert(&fid.to_bytes(), ())?;
        self.guard.deleted(fid)?;
        self.drop_data(&rec)?;
        self.changed.insert(fid);
        self.deleted.insert(fid);
        rec.attr.nlink = 0;
        self.bump(&mut rec);
        Ok(rec.attr)
    }

    fn check_version(rec: &ObjectRec, expected: u64) -> Result<()> {
        if expected != 0 && expected != rec.attr.version {
            return Err(Error::Conflict(format!(
                "{} is at version {}, record expected {expected}",
                rec.attr.fid, rec.attr.version
            )));
        }
        Ok(())
    }

    /// A new object's fid must be in a range reserved to this client, in the
    /// parent's volume, with unique 1, and never used before.
    fn check_new_fid(&self, parent: Fid, fid: Fid) -> Result<()> {
        if fid.volume != parent.volume {
            return Err(Error::Invalid(format!(
                "new fid {fid} is not in the parent's volume {}",
                parent.volume
            )));
        }
        if fid.unique != 1 {
            return Err(Error::Invalid(format!("new fid {fid} must have unique 1")));
        }
        let key = fid.to_bytes();
        if self.objects.get(&key)?.is_some() || self.graves.get(&key)?.is_some() {
            return Err(Error::Exists(format!("fid {fid} is already used")));
        }
        let mut below = self.reserved.range(..=(fid.volume, fid.vnode))?;
        let owned = match below.next_back() {
            Some(item) => {
                let (k, v) = item?;
                let (vol, first) = k.value();
                let (owner, count) = decode_reservation(v.value());
                vol == fid.volume && fid.vnode < first + count as u64 && &owner == self.client
            }
            None => false,
        };
        if !owned {
            return Err(Error::Invalid(format!(
                "fid {fid} is not reserved to this client (use AllocFids)"
            )));
        }
        Ok(())
    }

    fn same_volume(a: Fid, b: Fid) -> Result<()> {
        if a.volume != b.volume {
            return Err(Error::Invalid(format!(
                "{a} and {b} are in different volumes"
            )));
        }
        Ok(())
    }

    /// Write a new data file for `rec` holding its first `size` bytes
    /// (zero-extended), for a truncate.
    fn truncated_copy(&mut self, rec: &ObjectRec, size: u64) -> Result<PathBuf> {
        let small = if is_small(rec) {
            let mut b = self.small_bytes(rec)?;
            b.truncate(size as usize);
            Some(b)
        } else {
            None
        };
        let fid = rec.attr.fid;
        let path = objects::object_path(&self.store.root, fid, rec.dv + 1);
        let _ = fs::remove_file(&path); // a leftover of an aborted batch
        let out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::io(format!("create {}", path.display()), e))?;
        self.created.push(path.clone());
        if let Some(b) = small {
            (&out)
                .write_all(&b)
                .map_err(|e| Error::io(format!("write {}", path.display()), e))?;
        } else if rec.has_file {
            // Data extents only: a hole (or a file grown by truncate) is
            // not written out as zeros.
            let old = objects::object_path(&self.store.root, fid, rec.dv);
            let src = fs::File::open(&old)
                .map_err(|e| Error::io(format!("open {}", old.display()), e))?;
            crate::sparse::copy_sparse(&src, &out, size)
                .map_err(|e| Error::io(format!("copy into {}", path.display()), e))?;
        }
        out.set_len(size)
            .and_then(|_| out.sync_all())
            .map_err(|e| Error::io(format!("write {}", path.display()), e))?;
        self.sync_dirs
            .insert(objects::objects_dir(&self.store.root, fid.volume));
        Ok(path)
    }

    /// Up to the first `size` bytes of `rec`'s data file (for a truncate
    /// that leaves a small file).
    fn read_head(&self, rec: &ObjectRec, size: u64) -> Result<Vec<u8>> {
        use std::io::Read;
        let path = objects::object_path(&self.store.root, rec.attr.fid, rec.dv);
        let mut b = Vec::with_capacity(size as usize);
        fs::File::open(&path)
            .and_then(|f| f.take(size).read_to_end(&mut b))
            .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
        Ok(b)
    }

    // ---- records --------------------------------------------------------

    fn store(
        &mut self,
        fid: Fid,
        expected: u64,
        upload_id: u64,
        length: u64,
        mtime: Timespec,
    ) -> Result<Attr> {
        let rec = self.store_target(fid, expected)?;
        let staged = match (self.staged)(upload_id) {
            Some(p) if !self.consumed.contains(&upload_id) => p,
            _ => return Err(Error::NotFound(format!("upload {upload_id} is not staged"))),
        };
        let len = fs::metadata(&staged)
            .map_err(|e| Error::io(format!("staged upload {upload_id}"), e))?
            .len();
        if len != length {
            return Err(Error::Invalid(format!(
                "upload {upload_id} holds {len} bytes, record says {length}"
            )));
        }
        if length <= SMALL_DATA_MAX {
            let clear_setid = self.check_store(fid, &rec, length)?;
            let data = fs::read(&staged)
                .map_err(|e| Error::io(format!("read staged upload {upload_id}"), e))?;
            self.consumed.push(upload_id);
            return self.finish_small(rec, &data, mtime, clear_setid);
        }
        let (clear_setid, path) = self.next_data_file(fid, &rec, length)?;
        // A hard link, not a rename: if the batch aborts, the upload is
        // still staged for the client's next attempt.
        fs::hard_link(&staged, &path)
            .map_err(|e| Error::io(format!("link {}", path.display()), e))?;
        self.created.push(path.clone());
        self.sync_files.push(path);
        self.consumed.push(upload_id);
        self.finish_store(fid, rec, length, mtime, clear_setid)
    }

    /// The file a store replaces: a regular file at the version the client
    /// had.
    fn store_target(&self, fid: Fid, expected: u64) -> Result<ObjectRec> {
        let rec = self.obj(fid)?;
        match rec.attr.ftype {
            FileType::File => {}
            FileType::Dir => return Err(Error::IsDir(format!("store into directory {fid}"))),
            t => return Err(Error::Invalid(format!("store into {t:?} {fid}"))),
        }
        Self::check_version(&rec, expected)?;
        Ok(rec)
    }

    /// Checks a store of `length` bytes against the quota and the largest
    /// file, and names its data file (the object's next version; a leftover
    /// of an aborted batch there is removed). Also says whether the store
    /// clears the file's set-id bits.
    fn next_data_file(
        &mut self,
        fid: Fid,
        rec: &ObjectRec,
        length: u64,
    ) -> Result<(bool, std::path::PathBuf)> {
        let clear_setid = self.check_store(fid, rec, length)?;
        let path = objects::object_path(&self.store.root, fid, rec.dv + 1);
        let _ = fs::remove_file(&path);
        Ok((clear_setid, path))
    }

    /// Checks a store of `length` bytes against the quota and the largest
    /// file; says whether it clears the file's set-id bits.
    fn check_store(&mut self, fid: Fid, rec: &ObjectRec, length: u64) -> Result<bool> {
        let clear_setid = self.guard.store_clears_setid(&self.objects, fid)?;
        self.charge(fid.volume, rec.attr.size, length)?;
        self.check_size(length)?;
        Ok(clear_setid)
    }

    /// The bytes of small file `rec`, as this transaction has them.
    fn small_bytes(&self, rec: &ObjectRec) -> Result<Vec<u8>> {
        let row = self
            .small
            .get(&rec.attr.fid.to_bytes())?
            .map(|v| v.value().to_vec());
        super::volume::check_small(rec, row)
    }

    /// Forget `rec`'s current data: its small row now, its object file
    /// once the batch commits.
    fn drop_data(&mut self, rec: &ObjectRec) -> Result<()> {
        let fid = rec.attr.fid;
        if rec.has_file {
            self.replaced
                .push(objects::object_path(&self.store.root, fid, rec.dv));
        } else if is_small(rec) {
            self.wrote = true;
            self.small.remove(&fid.to_bytes())?;
        }
        Ok(())
    }

    /// The object's status with `data` (at most `SMALL_DATA_MAX` bytes) as
    /// its whole content, kept in its row: no data file, nothing to fsync
    /// but the commit. The previous content is dropped.
    fn finish_small(
        &mut self,
        mut rec: ObjectRec,
        data: &[u8],
        mtime: Timespec,
        clear_setid: bool,
    ) -> Result<Attr> {
        let fid = rec.attr.fid;
        self.drop_data(&rec)?;
        if !data.is_empty() {
            self.wrote = true;
            self.small.insert(&fid.to_bytes(), data)?;
        }
        rec.dv += 1;
        rec.has_file = false;
        rec.attr.size = data.len() as u64;
        rec.attr.mtime = mtime;
        if clear_setid {
            rec.attr.mode &= !0o6000;
        }
        self.bump(&mut rec);
        self.put(&rec)?;
        Ok(rec.attr)
    }

    /// The object's status after its next data file is in place: the
    /// previous one replaced (removed after the commit), a new version.
    fn finish_store(
        &mut self,
        fid: Fid,
        mut rec: ObjectRec,
        length: u64,
        mtime: Timespec,
        clear_setid: bool,
    ) -> Result<Attr> {
        self.sync_dirs
            .insert(objects::objects_dir(&self.store.root, fid.volume));
        self.drop_data(&rec)?;
        rec.dv += 1;
        rec.has_file = true;
        rec.attr.size = length;
        rec.attr.mtime = mtime;
        if clear_setid {
            rec.attr.mode &= !0o6000;
        }
        self.bump(&mut rec);
        self.put(&rec)?;
        Ok(rec.attr)
    }

    /// Store `data` carried in the record: written to the object's next
    /// data file here, fsynced with the batch's commit (`sync_files`), as a
    /// staged upload's link is.
    fn store_inline(
        &mut self,
        fid: Fid,
        expected: u64,
        mtime: Timespec,
        data: &[u8],
    ) -> Result<Attr> {
        let rec = self.store_target(fid, expected)?;
        let length = data.len() as u64;
        if length <= SMALL_DATA_MAX {
            let clear_setid = self.check_store(fid, &rec, length)?;
            return self.finish_small(rec, data, mtime, clear_setid);
        }
        let (clear_setid, path) = self.next_data_file(fid, &rec, length)?;
        // Written and fsynced ahead (`Prepared`): only its name is new.
        // Gone (taken by an earlier round of a group that started again):
        // written here, as it always was.
        let ready = self
            .prepared
            .take()
            .is_some_and(|p| fs::rename(p, &path).is_ok());
        if ready {
            self.created.push(path);
        } else {
            let written = objects::write_new(&path, data);
            self.created.push(path.clone());
            written.map_err(|e| Error::io(format!("write {}", path.display()), e))?;
            self.sync_files.push(path);
        }
        self.finish_store(fid, rec, length, mtime, clear_setid)
    }

    fn create(&mut self, parent: Fid, name: &str, fid: Fid, new: New) -> Result<Attr> {
        let New {
            ftype,
            mode,
            target,
            mtime,
            uid,
            gid,
            rdev,
        } = new;
        check_name(name)?;
        self.dir(parent)?;
        if self.lookup(parent, name)?.is_some() {
            return Err(Error::Exists(format!("{name:?} in {parent}")));
        }
        if ftype == FileType::Symlink && target.is_empty() {
            return Err(Error::Invalid("empty symlink target".into()));
        }
        self.check_new_fid(parent, fid)?;
        let is_dir = ftype == FileType::Dir;
        let rec = ObjectRec {
            attr: Attr {
                fid,
                ftype,
                mode: mode & 0o7777,
                nlink: if is_dir { 2 } else { 1 },
                size: target.len() as u64,
                mtime,
                ctime: self.now,
                version: 1,
                uid,
                gid,
                atime: mtime,
                rdev,
            },
            dv: 0,
            has_file: false,
            parent: if is_dir { parent } else { Fid::default() },
            target: target.to_string(),
            xattrs: Vec::new(),
        };
        self.put(&rec)?;
        self.wrote = true;
        self.dirents
            .insert((&parent.to_bytes(), name), &encode_entry(fid, ftype))?;
        self.guard.created(fid, ftype, parent)?;
        self.touch_dir(parent, 1, is_dir as i64)?;
        Ok(rec.attr)
    }

    /// One extended attribute set, created, replaced or removed, with the
    /// `setxattr(2)` flags' checks; the object's version and ctime move.
    fn set_xattr(&mut self, fid: Fid, name: &str, how: XattrHow, value: &[u8]) -> Result<Attr> {
        xattr::check(name, value)?;
        let mut rec = self.obj(fid)?;
        xattr::edit(&mut rec.xattrs, name, how, value).map_err(|r| match r {
            xattr::Refused::Exists => Error::Exists(format!("attribute {name:?} of {fid}")),
            xattr::Refused::Missing => Error::NotFound(format!("attribute {name:?} of {fid}")),
        })?;
        let total: usize = rec.xattrs.iter().map(|(n, v)| n.len() + v.len()).sum();
        if total > MAX_XATTR_BYTES {
            return Err(Error::Invalid(format!(
                "extended attributes of {fid} would take {total} bytes, over {MAX_XATTR_BYTES}"
            )));
        }
        self.bump(&mut rec);
        self.put(&rec)?;
        Ok(rec.attr)
    }

    fn link(&mut self, parent: Fid, name: &str, fid: Fid) -> Result<Attr> {
        check_name(name)?;
        self.dir(parent)?;
        let mut rec = self.obj(fid)?;
        // Any object but a directory may have several names (POSIX link(2)
        // of a symlink links the symlink itself).
        if rec.attr.ftype == FileType::Dir {
            return Err(Error::IsDir(format!("hard link to directory {fid}")));
        }
        Self::same_volume(parent, fid)?;
        if self.lookup(parent, name)?.is_some() {
            return Err(Error::Exists(format!("{name:?} in {parent}")));
        }
        rec.attr.nlink += 1;
        self.bump(&mut rec);
        self.put(&rec)?;
        self.wrote = true;
        self.dirents.insert(
            (&parent.to_bytes(), name),
            &encode_entry(fid, rec.attr.ftype),
        )?;
        self.touch_dir(parent, 1, 0)?;
        Ok(rec.attr)
    }

    /// The entry `name` in `dir` must exist and name `fid`; otherwise the
    /// client's view of the directory is out of date.
    fn expect_entry(&self, dir: Fid, name: &str, fid: Fid) -> Result<FileType> {
        match self.lookup(dir, name)? {
            None => Err(Error::NotFound(format!("{name:?} in {dir}"))),
            Some((f, t)) if f == fid => Ok(t),
            Some((f, _)) => Err(Error::Conflict(format!(
                "{name:?} in {dir} names {f}, record expected {fid}"
            ))),
        }
    }

    /// Drop one link to `rec` (a file or symlink); deletes it at zero.
    fn unlink(&mut self, mut rec: ObjectRec) -> Result<Attr> {
        if rec.attr.nlink <= 1 {
            return self.delete(rec);
        }
        rec.attr.nlink -= 1;
        self.bump(&mut rec);
        self.put(&rec)?;
        Ok(rec.attr)
    }

    fn remove(&mut self, parent: Fid, name: &str, fid: Fid, rmdir: bool) -> Result<Attr> {
        check_name(name)?;
        self.dir(parent)?;
        self.expect_entry(parent, name, fid)?;
        let rec = self.obj(fid)?;
        let is_dir = rec.attr.ftype == FileType::Dir;
        if rmdir && !is_dir {
            return Err(Error::NotDir(format!("rmdir of non-directory {fid}")));
        }
        if !rmdir && is_dir {
            return Err(Error::IsDir(format!("remove of directory {fid}")));
        }
        if is_dir && !self.is_empty_dir(fid)? {
            return Err(Error::NotEmpty(format!("{name:?} in {parent}")));
        }
        self.wrote = true;
        self.dirents.remove((&parent.to_bytes(), name))?;
        self.touch_dir(parent, -1, -(is_dir as i64))?;
        if is_dir {
            self.delete(rec)
        } else {
            self.unlink(rec)
        }
    }

    fn rename(
        &mut self,
        src_parent: Fid,
        src_name: &str,
        dst_parent: Fid,
        dst_name: &str,
        fid: Fid,
        replaces: Replaces,
    ) -> Result<Attr> {
        check_name(src_name)?;
        check_name(dst_name)?;
        self.dir(src_parent)?;
        self.dir(dst_parent)?;
        Self::same_volume(src_parent, dst_parent)?;
        self.expect_entry(src_parent, src_name, fid)?;
        // The destination must be what the client believed it was.
        match (replaces, self.lookup(dst_parent, dst_name)?) {
            (Replaces::Any, _) | (Replaces::Nothing, None) => {}
            (Replaces::Object(want), Some((have, _))) if want == have => {}
            (Replaces::Nothing, Some(_)) => {
                return Err(Error::Exists(format!(
                    "rename target {dst_name:?} in {dst_parent} was created meanwhile"
                )))
            }
            (Replaces::Object(_), _) => {
                return Err(Error::Conflict(format!(
                    "rename target {dst_name:?} in {dst_parent} changed meanwhile"
                )))
            }
        }
        let mut rec = self.obj(fid)?;
        let is_dir = rec.attr.ftype == FileType::Dir;
        if is_dir {
            self.refuse_cycle(fid, dst_parent)?;
        }
        let mut replaced_any = false;
        let mut replaced_dir = false;
        if let Some((old, old_type)) = self.lookup(dst_parent, dst_name)? {
            if old == fid {
                // Two names of one object: POSIX says rename does nothing.
                return Ok(rec.attr);
            }
            let victim = self.obj(old)?;
            if is_dir {
                if old_type != FileType::Dir {
                    return Err(Error::NotDir(format!("{dst_name:?} in {dst_parent}")));
                }
                if !self.is_empty_dir(old)? {
                    return Err(Error::NotEmpty(format!("{dst_name:?} in {dst_parent}")));
                }
                self.delete(victim)?;
                replaced_dir = true;
            } else {
                if old_type == FileType::Dir {
                    return Err(Error::IsDir(format!("{dst_name:?} in {dst_parent}")));
                }
                self.unlink(victim)?;
            }
            replaced_any = true;
        }
        self.wrote = true;
        self.dirents.remove((&src_parent.to_bytes(), src_name))?;
        self.wrote = true;
        self.dirents.insert(
            (&dst_parent.to_bytes(), dst_name),
            &encode_entry(fid, rec.attr.ftype),
        )?;
        // Entry counts: the source loses a name, the destination gains one
        // unless it replaced one. One step when they are the same directory,
        // so its version moves by exactly one per record.
        let (sub, gone, gone_dir) = (is_dir as i64, replaced_any as i64, replaced_dir as i64);
        if src_parent == dst_parent {
            self.touch_dir(src_parent, -gone, -gone_dir)?;
        } else {
            self.touch_dir(src_parent, -1, -sub)?;
            self.touch_dir(dst_parent, 1 - gone, sub - gone_dir)?;
        }
        rec.parent = if is_dir { dst_parent } else { rec.parent };
        self.guard.moved(fid, rec.attr.ftype, dst_parent)?;
        self.bump(&mut rec);
        self.put(&rec)?;
        Ok(rec.attr)
    }

    /// Refuse to move directory `fid` under `dst_parent` if `dst_parent` is
    /// `fid` or lies beneath it: that would cut the subtree off the root.
    fn refuse_cycle(&self, fid: Fid, dst_parent: Fid) -> Result<()> {
        let mut cur = dst_parent;
        for _ in 0..MAX_DEPTH {
            if cur == fid {
                return Err(Error::Invalid(format!(
                    "cannot move directory {fid} into its own subtree"
                )));
            }
            let up = self.obj(cur)?.parent;
            if up == cur || up == Fid::default() {
                return Ok(());
            }
            cur = up;
        }
        Err(Error::Eio(format!(
            "directory chain above {dst_parent} too deep"
        )))
    }

    fn setattr(
        &mut self,
        fid: Fid,
        expected: u64,
        mode: Option<u32>,
        size: Option<u64>,
        mtime: Option<Timespec>,
        (uid, gid, atime): (Option<u32>, Option<u32>, Option<Timespec>),
    ) -> Result<Attr> {
        let mut rec = self.obj(fid)?;
        Self::check_version(&rec, expected)?;
        if let Some(m) = mode {
            rec.attr.mode = m & 0o7777;
        }
        if let Some(u) = uid {
            rec.attr.uid = u;
        }
        if let Some(g) = gid {
            rec.attr.gid = g;
        }
        if let Some(t) = atime {
            rec.attr.atime = t;
        }
        if let Some(size) = size {
            match rec.attr.ftype {
                FileType::File => {}
                FileType::Dir => return Err(Error::IsDir(format!("truncate of directory {fid}"))),
                t => return Err(Error::Invalid(format!("truncate of {t:?} {fid}"))),
            }
            if size != rec.attr.size {
                self.charge(fid.volume, rec.attr.size, size)?;
                self.check_size(size)?;
                // An empty file needs no data at all; a small one keeps
                // its bytes in its row, a larger one a data file.
                let small = if size == 0 {
                    None
                } else if size <= SMALL_DATA_MAX {
                    let mut b = if is_small(&rec) {
                        self.small_bytes(&rec)?
                    } else if rec.has_file {
                        self.read_head(&rec, size)?
                    } else {
                        Vec::new()
                    };
                    b.resize(size as usize, 0);
                    Some(b)
                } else {
                    self.truncated_copy(&rec, size)?;
                    None
                };
                self.drop_data(&rec)?;
                if let Some(b) = &small {
                    self.wrote = true;
                    self.small.insert(&fid.to_bytes(), b.as_slice())?;
                }
                rec.dv += 1;
                rec.has_file = size > SMALL_DATA_MAX;
                rec.attr.size = size;
                rec.attr.mtime = self.now;
            }
        }
        if let Some(t) = mtime {
            rec.attr.mtime = t;
        }
        self.bump(&mut rec);
        self.put(&rec)?;
        Ok(rec.attr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inline data big enough for an object file of its own.
    const BIG_DATA: usize = SMALL_DATA_MAX as usize + 1;

    fn recs(ids: &[u64]) -> Vec<Record> {
        ids.iter()
            .map(|&store_id| Record {
                store_id,
                op: RecordOp::Remove {
                    parent: ROOT_FID,
                    name: "x".into(),
                    fid: Fid::new(1, 2, 1),
                },
            })
            .collect()
    }

    fn create(store_id: u64, name: &str, fid: Fid) -> Record {
        Record {
            store_id,
            op: RecordOp::Create {
                parent: ROOT_FID,
                name: name.into(),
                fid,
                mode: 0o644,
                mtime: Timespec::default(),
                uid: 0,
                gid: 0,
            },
        }
    }

    fn job(client: ClientId, records: Vec<Record>) -> Arc<Job> {
        job_after(client, 0, records)
    }

    fn job_after(client: ClientId, after: u64, records: Vec<Record>) -> Arc<Job> {
        Arc::new(Job {
            client,
            after,
            records,
            staged: HashMap::new(),
            now: None,
            who: None,
            prepared: std::sync::OnceLock::new(),
            log_index: None,
        })
    }

    fn fids(store: &VolumeStore, client: &ClientId, n: u32) -> Vec<Fid> {
        let first = store.alloc_fids(client, ROOT_VOLUME, n).unwrap();
        (0..n as u64).map(|i| Fid::new(1, first + i, 1)).collect()
    }

    fn watermark(store: &VolumeStore, client: &ClientId) -> u64 {
        store
            .with_db(|db| -> Result<u64> {
                let txn = db.begin_read()?;
                let t = txn.open_table(CLIENT_STORE)?;
                let v = t.get(client)?.map(|v| v.value());
                Ok(v.unwrap_or(0))
            })
            .unwrap()
    }

    /// A scratch directory removed when the test ends (the crate keeps
    /// no temp-dir dependency: see Cargo.toml).
    struct TestDir(std::path::PathBuf);

    impl TestDir {
        fn new() -> TestDir {
            use std::sync::atomic::{AtomicU32, Ordering};
            static SERIAL: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "coda-unit-reint-{}-{}",
                std::process::id(),
                SERIAL.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            TestDir(p)
        }

        fn path(&self) -> &std::path::Path {
            &self.0
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// One group holding good batches, a batch that fails after writing
    /// (the group restarts without it), one that fails before writing, and
    /// one refused because of an earlier batch of the same group: each
    /// outcome is exactly what applying them one by one would give.
    #[test]
    fn a_failing_batch_leaves_nothing_and_fails_no_other_batch_of_its_group() {
        let dir = TestDir::new();
        let root = dir.path().join("data");
        VolumeStore::init(&root, "admin").unwrap();
        let store = VolumeStore::open(&root, u64::MAX).unwrap();
        let (a, b, c, d, e) = ([1u8; 16], [2u8; 16], [3u8; 16], [4u8; 16], [5u8; 16]);
        let (fa, fb, fc, fe) = (
            fids(&store, &a, 2),
            fids(&store, &b, 2),
            fids(&store, &c, 1),
            fids(&store, &e, 1),
        );
        let ghost = Record {
            store_id: 2,
            op: RecordOp::Remove {
                parent: ROOT_FID,
                name: "ghost".into(),
                fid: Fid::new(1, 999, 1),
            },
        };
        let jobs = vec![
            job(a, vec![create(1, "a1", fa[0]), create(2, "a2", fa[1])]),
            // Writes b1, then fails at its second record.
            job(b, vec![create(1, "b1", fb[0]), ghost.clone()]),
            job(c, vec![create(7, "c1", fc[0])]),
            // Fails at its first record, before writing anything.
            job(
                d,
                vec![Record {
                    store_id: 1,
                    ..ghost
                }],
            ),
            // "a1" was created by the first batch of this very group.
            job(e, vec![create(1, "a1", fe[0])]),
        ];
        let out = store.commit_group(&jobs);
        assert_eq!(out.len(), 5);
        let ok: Vec<bool> = out.iter().map(|r| r.is_ok()).collect();
        assert_eq!(ok, [true, false, true, false, false]);
        let err = |i: usize| out[i].as_ref().unwrap_err();
        assert!(matches!(err(1).error, Error::NotFound(_)) && err(1).index == 1);
        assert!(matches!(err(3).error, Error::NotFound(_)) && err(3).index == 0);
        assert!(matches!(err(4).error, Error::Exists(_)) && err(4).index == 0);
        let done = out[0].as_ref().unwrap();
        assert_eq!(done.results.len(), 2);
        assert!(!done.replayed);

        let (attr, entries, _) = store.read_dir(ROOT_FID, 0).unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["a1", "a2", "c1"]);
        // Three creates, one version step each; nothing of b's batch.
        assert_eq!(attr.version, 1 + 3);
        assert_eq!(attr.size, 3);
        let attrs = store.get_attrs(&[fb[0], fa[0]]).unwrap();
        assert!(attrs[0].is_err(), "b1 left nothing");
        assert_eq!(attrs[1].as_ref().unwrap().fid, fa[0]);
        // The replay watermark moved for the committed batches only.
        assert_eq!(watermark(&store, &a), 2);
        assert_eq!(watermark(&store, &b), 0);
        assert_eq!(watermark(&store, &c), 7);
        assert_eq!(watermark(&store, &d), 0);
        assert_eq!(watermark(&store, &e), 0);
        // b's fid is still its own to use: its batch, fixed, commits.
        let again = store.commit_group(&[job(b, vec![create(1, "b1", fb[0])])]);
        assert!(again[0].is_ok());
        // a's batch resent (its reply lost) is answered, not applied again.
        let replay = store.commit_group(&[job(a, vec![create(1, "a1", fa[0])])]);
        assert!(replay[0].as_ref().unwrap().replayed);
        assert_eq!(store.read_dir(ROOT_FID, 0).unwrap().0.version, 1 + 4);
    }

    /// Pipelined batches (`ReintegrateAfter`): a batch applies only if the
    /// one its client sent before it did, judged inside the transaction,
    /// so a group that restarts without a failed batch refuses that
    /// batch's successors, and a successor applied out of turn (before
    /// its predecessor, e.g. over a new connection) is refused too.
    #[test]
    fn a_pipelined_batch_applies_only_after_its_predecessor() {
        let dir = TestDir::new();
        let root = dir.path().join("data");
        VolumeStore::init(&root, "admin").unwrap();
        let store = VolumeStore::open(&root, u64::MAX).unwrap();
        let (a, b, c) = ([1u8; 16], [2u8; 16], [3u8; 16]);
        let (fa, fb, fc) = (
            fids(&store, &a, 6),
            fids(&store, &b, 2),
            fids(&store, &c, 2),
        );
        let ghost = |store_id| Record {
            store_id,
            op: RecordOp::Remove {
                parent: ROOT_FID,
                name: "ghost".into(),
                fid: Fid::new(1, 999, 1),
            },
        };
        let not_applied = |r: &JobResult| {
            matches!(
                r,
                Err(BatchError {
                    error: Error::NotApplied(_),
                    index: u32::MAX
                })
            )
        };
        let jobs = vec![
            // c: a good batch and its successor, around a failure of b
            // that makes the group start again.
            job(c, vec![create(1, "c1", fc[0])]),
            // a's first batch writes a1, then fails at its second record.
            job(a, vec![create(1, "a1", fa[0]), ghost(2)]),
            job(b, vec![create(1, "b1", fb[0]), ghost(2)]),
            job_after(c, 1, vec![create(2, "c2", fc[1])]),
            // a's successors: the chain stops at the failure.
            job_after(a, 2, vec![create(3, "a3", fa[2])]),
            job_after(a, 3, vec![create(4, "a4", fa[3])]),
        ];
        let out = store.commit_group(&jobs);
        assert!(out[0].is_ok() && out[3].is_ok(), "{out:?}");
        assert!(matches!(&out[1], Err(e) if matches!(e.error, Error::NotFound(_)) && e.index == 1));
        assert!(matches!(&out[2], Err(e) if matches!(e.error, Error::NotFound(_)) && e.index == 1));
        assert!(not_applied(&out[4]) && not_applied(&out[5]), "{out:?}");
        let names = |store: &VolumeStore| -> Vec<String> {
            let (_, entries, _) = store.read_dir(ROOT_FID, 0).unwrap();
            entries.into_iter().map(|e| e.name).collect()
        };
        assert_eq!(names(&store), ["c1", "c2"]);
        // No store id of a refused batch counts as applied.
        assert_eq!(watermark(&store, &a), 0);
        assert_eq!(watermark(&store, &b), 0);
        assert_eq!(watermark(&store, &c), 2);

        // The client sends the records not applied again, in order, as one
        // plain batch, then pipelines again after it (another group).
        let again = store.commit_group(&[
            job(
                a,
                vec![
                    create(1, "a1", fa[0]),
                    create(3, "a3", fa[2]),
                    create(4, "a4", fa[3]),
                ],
            ),
            job_after(a, 4, vec![create(5, "a5", fa[4])]),
        ]);
        assert!(again.iter().all(|r| r.is_ok()), "{again:?}");
        assert_eq!(watermark(&store, &a), 5);
        // A successor that overtakes its predecessor is refused, applies
        // nothing, and may follow once the predecessor applied.
        let early = store.commit_group(&[job_after(a, 6, vec![create(7, "a7", fa[5])])]);
        assert!(not_applied(&early[0]));
        assert_eq!(watermark(&store, &a), 5);
        let pair = store.commit_group(&[
            job(a, vec![ghost(6)]),
            job_after(a, 6, vec![create(7, "a7", fa[5])]),
        ]);
        assert!(matches!(&pair[0], Err(e) if matches!(e.error, Error::NotFound(_))));
        assert!(not_applied(&pair[1]));
        assert_eq!(watermark(&store, &a), 5);
        // A successor resent after its reply was lost is a replay.
        let replay = store.commit_group(&[job_after(a, 4, vec![create(5, "a5", fa[4])])]);
        assert!(replay[0].as_ref().is_ok_and(|o| o.replayed));
        assert_eq!(names(&store), ["a1", "a3", "a4", "a5", "c1", "c2"]);
    }

    /// Inline data written ahead of the commit (`Prepared`) lands under
    /// the object's versioned name with its bytes, also when its group
    /// starts again without a failed batch (the file renamed in the first
    /// round went with that round and is written again in the next), a
    /// stored file's old version goes, and no prepared file is left
    /// behind by a commit, a failure or a replay.
    #[test]
    fn inline_data_written_ahead_lands_whole_and_leaves_no_file_behind() {
        assert!(!needs_file(b"small"), "small data is not written ahead");
        let dir = TestDir::new();
        let root = dir.path().join("data");
        VolumeStore::init(&root, "admin").unwrap();
        let store = VolumeStore::open(&root, u64::MAX).unwrap();
        let (a, b) = ([1u8; 16], [2u8; 16]);
        let (fa, fb) = (fids(&store, &a, 1), fids(&store, &b, 1));
        let ghost = Record {
            store_id: 2,
            op: RecordOp::Remove {
                parent: ROOT_FID,
                name: "ghost".into(),
                fid: Fid::new(1, 999, 1),
            },
        };
        // Past the small-file limit: small data goes into the commit.
        let first = vec![1u8; BIG_DATA];
        let ra = vec![create_with(1, "a1", fa[0], first.clone())];
        // Writes b1, then fails at its second record: the group restarts.
        let rb = vec![create_with(1, "b1", fb[0], vec![2u8; BIG_DATA]), ghost];
        let (pa, pb) = (
            Prepared::new(&store.root, &ra),
            Prepared::new(&store.root, &rb),
        );
        assert!(pa.0[0].as_ref().is_some_and(|p| p.exists()));
        assert!(pb.0[0].is_some() && pb.0[1].is_none());
        let with_prepared = |client, records, p: &Prepared| {
            let j = job(client, records);
            j.prepared.set(p.0.clone()).unwrap();
            j
        };
        let out = store.commit_group(&[with_prepared(a, ra, &pa), with_prepared(b, rb, &pb)]);
        assert!(out[0].is_ok());
        assert_eq!(out[1].as_ref().unwrap_err().index, 1);
        drop((pa, pb));
        assert_eq!(
            fs::read(objects::object_path(&root, fa[0], 1)).unwrap(),
            first
        );
        assert!(!objects::object_path(&root, fb[0], 1).exists());
        // The whole path: a new version stored, then its replay.
        let again = vec![Record {
            store_id: 2,
            op: RecordOp::StoreInline {
                fid: fa[0],
                expected_version: 0,
                mtime: Timespec::default(),
                data: vec![3u8; BIG_DATA],
            },
        }];
        assert!(!store.reintegrate(&a, &again, &|_| None).unwrap().replayed);
        assert!(store.reintegrate(&a, &again, &|_| None).unwrap().replayed);
        assert_eq!(
            fs::read(objects::object_path(&root, fa[0], 2)).unwrap(),
            vec![3u8; BIG_DATA]
        );
        assert!(!objects::object_path(&root, fa[0], 1).exists());
        let names: Vec<String> = fs::read_dir(objects::objects_dir(&root, fa[0].volume))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".new")), "{names:?}");
    }

    /// What a fetch of `fid` serves now: its bytes, and whether they came
    /// from an object file.
    fn fetched(store: &VolumeStore, fid: Fid) -> (Vec<u8>, bool) {
        use std::io::Read;
        match store.open_data(fid).unwrap().1 {
            super::super::volume::FetchData::Bytes(b) => (b, false),
            super::super::volume::FetchData::File(mut f, len) => {
                let mut b = Vec::new();
                f.read_to_end(&mut b).unwrap();
                b.resize(len as usize, 0);
                (b, true)
            }
        }
    }

    /// Names in a volume's objects directory.
    fn object_names(root: &std::path::Path) -> Vec<String> {
        fs::read_dir(objects::objects_dir(root, 1))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }

    /// Rows in `SMALL_DATA`.
    fn small_rows(store: &VolumeStore) -> u64 {
        store
            .with_db(|db| -> Result<u64> {
                let txn = db.begin_read()?;
                Ok(redb::ReadableTableMetadata::len(
                    &txn.open_table(SMALL_DATA)?,
                )?)
            })
            .unwrap()
    }

    /// Records in the store's commit journal since its last reset.
    fn journaled(store: &VolumeStore) -> u64 {
        store.wal.journal.lock().as_ref().map_or(0, |j| j.records())
    }

    /// A copy of data directory `root` as a crash leaves it, at `to`: the
    /// files as they are (redb's unsynced commits only in them, the
    /// journal's records), the store never closed (a close would make its
    /// commits durable; forgotten, it still holds `root`'s lock, hence a
    /// copy).
    fn crash_copy(store: VolumeStore, root: &std::path::Path, to: &std::path::Path) {
        std::mem::forget(store);
        let st = std::process::Command::new("cp")
            .arg("-a")
            .arg(root)
            .arg(to)
            .status()
            .expect("cp runs");
        assert!(st.success(), "cp -a {} {}", root.display(), to.display());
    }

    fn create_with(store_id: u64, name: &str, fid: Fid, data: Vec<u8>) -> Record {
        Record {
            store_id,
            op: RecordOp::CreateWith {
                parent: ROOT_FID,
                name: name.into(),
                fid,
                mode: 0o644,
                mtime: Timespec::default(),
                uid: 0,
                gid: 0,
                data,
            },
        }
    }

    /// Every batch of a group applied.
    fn all_ok(results: Vec<JobResult>) {
        results
            .into_iter()
            .for_each(|r| assert!(r.is_ok(), "{r:?}"));
    }

    #[test]
    fn only_groups_without_object_files_go_to_the_journal_and_a_durable_commit_resets_it() {
        let dir = TestDir::new();
        let root = dir.path().join("data");
        VolumeStore::init(&root, "admin").unwrap();
        let store = VolumeStore::open(&root, u64::MAX).unwrap();
        let a = [1u8; 16];
        let f = fids(&store, &a, 4);
        all_ok(store.commit_group(&[job(a, vec![create(1, "x", f[0])])]));
        assert_eq!(journaled(&store), 1);
        all_ok(store.commit_group(&[
            job(a, vec![create_with(2, "y", f[1], vec![1; 4096])]),
            job([2u8; 16], vec![]),
        ]));
        assert_eq!(journaled(&store), 2, "one record per group");
        // Past SMALL_DATA_MAX: an object file, so a durable commit, which
        // makes everything before it durable too.
        all_ok(store.commit_group(&[job(a, vec![create_with(3, "z", f[2], vec![2; BIG_DATA])])]));
        assert_eq!(journaled(&store), 0, "the durable commit reset the journal");
        all_ok(store.commit_group(&[job(a, vec![create(4, "w", f[3])])]));
        assert_eq!(journaled(&store), 1);
    }

    /// A group whose journal sync fails after its redb commit is made
    /// durable in redb instead: it is answered as applied, nothing waits
    /// on it, and the journal starts again and takes the next group.
    #[test]
    fn a_group_whose_journal_sync_fails_is_made_durable_in_redb() {
        let dir = TestDir::new();
        let root = dir.path().join("data");
        VolumeStore::init(&root, "admin").unwrap();
        let store = VolumeStore::open(&root, u64::MAX).unwrap();
        let a = [1u8; 16];
        let f = fids(&store, &a, 3);
        all_ok(store.commit_group(&[job(a, vec![create(1, "x", f[0])])]));
        assert_eq!(journaled(&store), 1);
        store.wal.with_journal(|j| j.fail_next_sync()).unwrap();
        all_ok(store.commit_group(&[job(a, vec![create(2, "y", f[1])])]));
        assert_eq!(journaled(&store), 0, "a durable commit took the group");
        assert!(store.wal.unsynced.wait_durable(Duration::ZERO));
        assert!(store.get_attrs(&f[..2]).unwrap().iter().all(|r| r.is_ok()));
        all_ok(store.commit_group(&[job(a, vec![create(3, "z", f[2])])]));
        assert_eq!(journaled(&store), 1, "the journal works again");
    }

    #[test]
    fn a_claim_goes_to_the_journal_and_a_crash_keeps_it() {
        let dir = TestDir::new();
        let root = dir.path().join("data");
        VolumeStore::init(&root, "admin").unwrap();
        let store = VolumeStore::open(&root, u64::MAX).unwrap();
        let (a, b) = ([0xa1u8; 16], [0xb2u8; 16]);
        store.claim_client(&a, "admin", true, 3600).unwrap();
        assert_eq!(journaled(&store), 1, "the claim is durable in the journal");
        // Claimed already, seen just now: nothing to write.
        store.claim_client(&a, "admin", true, 3600).unwrap();
        assert_eq!(journaled(&store), 1);
        // A crash: redb holds the claim unsynced.
        let crashed = dir.path().join("crashed");
        crash_copy(store, &root, &crashed);
        let store = VolumeStore::open(&crashed, u64::MAX).unwrap();
        assert_eq!(journaled(&store), 0, "replayed and checkpointed");
        // Still admin's: another user is refused it; a fresh id is free.
        let e = store.claim_client(&a, "bob", true, 3600).unwrap_err();
        assert!(matches!(e, Error::Auth(_)), "{e}");
        store.claim_client(&b, "bob", true, 3600).unwrap();
    }

    #[test]
    fn a_journaled_claim_that_no_longer_applies_is_skipped_and_the_store_opens() {
        let dir = TestDir::new();
        let root = dir.path().join("data");
        VolumeStore::init(&root, "admin").unwrap();
        let store = VolumeStore::open(&root, u64::MAX).unwrap();
        let a = [0xa1u8; 16];
        store.claim_client(&a, "admin", true, 3600).unwrap();
        assert_eq!(journaled(&store), 1);
        // A crash, then the id found durably another user's (as no server
        // writes it: the claim checked it was free), the journal not yet
        // applied.
        let crashed = dir.path().join("crashed");
        crash_copy(store, &root, &crashed);
        {
            let db = redb::Database::open(crashed.join("meta.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(CLIENT_OWNERS)
                .unwrap()
                .insert(&a, "bob")
                .unwrap();
            txn.commit().unwrap();
        }
        let store = VolumeStore::open(&crashed, u64::MAX).unwrap();
        assert_eq!(
            journaled(&store),
            0,
            "replayed (the claim skipped) and checkpointed"
        );
        // Still bob's: admin is refused it.
        let e = store.claim_client(&a, "admin", true, 3600).unwrap_err();
        assert!(matches!(e, Error::Auth(_)), "{e}");
        store.claim_client(&a, "bob", true, 3600).unwrap();
    }

    #[test]
    fn a_store_reopened_after_losing_its_unsynced_commits_gets_them_back_identical() {
        let dir = TestDir::new();
        let root = dir.path().join("data");
        VolumeStore::init(&root, "admin").unwrap();
        let store = VolumeStore::open(&root, u64::MAX).unwrap();
        let a = [1u8; 16];
        let f = fids(&store, &a, 3);
        let mut before = Vec::new();
        for (i, fid) in f.iter().enumerate() {
            let name = format!("f{i}");
            let r = create_with(i as u64 + 1, &name, *fid, vec![i as u8; 100]);
            let out = store
                .commit_group(&[job(a, vec![r])])
                .pop()
                .unwrap()
                .unwrap();
            before.push(out.results[0].clone());
        }
        let r = Record {
            store_id: 4,
            op: RecordOp::Rename {
                src_parent: ROOT_FID,
                src_name: "f0".into(),
                dst_parent: ROOT_FID,
                dst_name: "g0".into(),
                fid: f[0],
                replaces: Replaces::Nothing,
            },
        };
        ok_one(store.commit_group(&[job(a, vec![r])]));
        assert_eq!(journaled(&store), 4);
        // A crash: its last durable commit (AllocFids') is all a new open
        // finds in meta.redb. Two copies: one loses the journal too.
        let (lost, crashed) = (dir.path().join("lost"), dir.path().join("crashed"));
        crash_copy(store, &root, &crashed);
        let st = std::process::Command::new("cp")
            .arg("-a")
            .arg(&crashed)
            .arg(&lost)
            .status()
            .expect("cp runs");
        assert!(st.success());
        fs::remove_file(lost.join(super::super::wal::JOURNAL_FILE)).unwrap();
        let copy = VolumeStore::open(&lost, u64::MAX).unwrap();
        assert!(
            copy.get_attrs(&f).unwrap().iter().all(|r| r.is_err()),
            "without the journal the creates are gone"
        );
        drop(copy);
        let store = VolumeStore::open(&crashed, u64::MAX).unwrap();
        assert_eq!(journaled(&store), 0, "replayed and checkpointed");
        let after = store.get_attrs(&f).unwrap();
        for (i, (b, got)) in before.iter().zip(&after).enumerate() {
            let got = got.as_ref().unwrap();
            // The same times as first stamped (the rename moved f0's ctime
            // on, in its own replayed group).
            if i > 0 {
                assert_eq!(got, b, "f{i}");
            }
            assert_eq!(fetched(&store, f[i]), (vec![i as u8; 100], false));
        }
        let names: Vec<String> = store
            .read_dir(ROOT_FID, 0)
            .unwrap()
            .1
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, ["f1", "f2", "g0"]);
        assert_eq!(watermark(&store, &a), 4);
    }

    fn ok_one(mut r: Vec<JobResult>) {
        assert!(r.pop().unwrap().is_ok());
    }

    #[test]
    fn a_small_file_lives_in_the_index_moves_to_a_data_file_and_back_and_survives_a_reopen() {
        let dir = TestDir::new();
        let root = dir.path().join("data");
        VolumeStore::init(&root, "admin").unwrap();
        let mut store = VolumeStore::open(&root, u64::MAX).unwrap();
        let a = [1u8; 16];
        let f = fids(&store, &a, 1)[0];
        let mut id = 0;
        let mut apply = |store: &VolumeStore, op: RecordOp, staged: StagedLookup| {
            id += 1;
            let r = Record { store_id: id, op };
            store.reintegrate(&a, &[r], staged).unwrap().results[0].clone()
        };
        let inline = |data: &[u8]| RecordOp::StoreInline {
            fid: f,
            expected_version: 0,
            mtime: Timespec::default(),
            data: data.to_vec(),
        };
        let truncate = |size| RecordOp::SetAttr {
            fid: f,
            expected_version: 0,
            mode: None,
            size: Some(size),
            mtime: None,
            uid: None,
            gid: None,
            atime: None,
        };
        // Small: its bytes in its row, no object file.
        let small = vec![7u8; SMALL_DATA_MAX as usize];
        let attr = apply(
            &store,
            RecordOp::CreateWith {
                parent: ROOT_FID,
                name: "f".into(),
                fid: f,
                mode: 0o644,
                mtime: Timespec::default(),
                uid: 0,
                gid: 0,
                data: small.clone(),
            },
            &|_| None,
        );
        assert_eq!(attr.size, SMALL_DATA_MAX);
        assert_eq!(fetched(&store, f), (small.clone(), false));
        assert!(object_names(&root).is_empty(), "{:?}", object_names(&root));
        assert_eq!(small_rows(&store), 1);

        // Grown past the limit: a data file, the row gone.
        let big = vec![9u8; BIG_DATA];
        apply(&store, inline(&big), &|_| None);
        assert_eq!(fetched(&store, f), (big.clone(), true));
        assert_eq!(small_rows(&store), 0);
        assert_eq!(object_names(&root).len(), 1);

        // Shrunk back by a store: the row again, the data file removed.
        apply(&store, inline(b"tiny"), &|_| None);
        assert_eq!(fetched(&store, f), (b"tiny".to_vec(), false));
        assert!(object_names(&root).is_empty(), "{:?}", object_names(&root));

        // Truncated up to 64 KiB (a data file of the bytes and zeros),
        // then down to 3 bytes (a row of its head).
        apply(&store, truncate(65536), &|_| None);
        let mut want = b"tiny".to_vec();
        want.resize(65536, 0);
        assert_eq!(fetched(&store, f), (want, true));
        assert_eq!(small_rows(&store), 0);
        apply(&store, truncate(3), &|_| None);
        assert_eq!(fetched(&store, f), (b"tin".to_vec(), false));
        assert!(object_names(&root).is_empty(), "{:?}", object_names(&root));
        // Extended while small: zeros after the bytes, still a row.
        apply(&store, truncate(5), &|_| None);
        assert_eq!(fetched(&store, f), (b"tin\0\0".to_vec(), false));

        // A small staged upload is read into the row too.
        let up = dir.path().join("upload");
        fs::write(&up, b"from an upload").unwrap();
        let store_op = RecordOp::Store {
            fid: f,
            expected_version: 0,
            upload_id: 5,
            length: 14,
            mtime: Timespec::default(),
        };
        apply(&store, store_op, &|n| (n == 5).then(|| up.clone()));
        assert_eq!(fetched(&store, f), (b"from an upload".to_vec(), false));

        // Reopened (as after a restart): the row is served, and the sweep
        // takes nothing for missing.
        drop(store);
        store = VolumeStore::open(&root, u64::MAX).unwrap();
        assert_eq!(fetched(&store, f), (b"from an upload".to_vec(), false));
        assert_eq!(small_rows(&store), 1);

        // Removed: the row goes with the object.
        apply(
            &store,
            RecordOp::Remove {
                parent: ROOT_FID,
                name: "f".into(),
                fid: f,
            },
            &|_| None,
        );
        assert!(matches!(store.open_data(f), Err(Error::Stale(_))));
        assert_eq!(small_rows(&store), 0);
        assert!(object_names(&root).is_empty(), "{:?}", object_names(&root));
    }

    /// A large batch that gives way keeps its place: a successor of its
    /// client that were applied meanwhile would be refused; once the large
    /// batch commits whole, the successor applies.
    #[test]
    fn a_successor_of_a_large_batch_that_gave_way_waits_for_it() {
        let dir = TestDir::new();
        let root = dir.path().join("data");
        VolumeStore::init(&root, "admin").unwrap();
        let store = VolumeStore::open(&root, u64::MAX).unwrap();
        let client = [9u8; 16];
        let fs = fids(&store, &client, BIG as u32 + 1);
        let records: Vec<Record> = fs[..BIG]
            .iter()
            .enumerate()
            .map(|(i, f)| create(i as u64 + 1, &format!("n{i}"), *f))
            .collect();
        let large = [job(client, records)];
        let next = || {
            [job_after(
                client,
                BIG as u64,
                vec![create(BIG as u64 + 1, "last", fs[BIG])],
            )]
        };
        let yes = || true;
        assert!(store.commit_group_or_yield(&large, Some(&yes)).is_none());
        let early = store.commit_group(&next());
        assert!(matches!(&early[0], Err(e) if matches!(e.error, Error::NotApplied(_))));
        let never = || false;
        let out = store.commit_group_or_yield(&large, Some(&never)).unwrap();
        assert!(out[0].is_ok());
        assert!(store.commit_group(&next())[0].is_ok());
        assert_eq!(watermark(&store, &client), BIG as u64 + 1);
        assert_eq!(store.read_dir(ROOT_FID, 0).unwrap().0.size, BIG as u64 + 1);
    }

    fn waiting(ticket: u64, client: u8, records: usize, since: Instant) -> Waiting {
        let ids: Vec<u64> = (1..=records as u64).collect();
        Waiting {
            ticket,
            job: job([client; 16], recs(&ids)),
            since,
            ready: true,
        }
    }

    const BIG: usize = SMALL_BATCH + 1;

    /// At most `PREPARE_MAX` records of a batch are prepared (the first
    /// ones with inline data); the files go when the `Prepared` drops.
    #[test]
    fn a_batch_prepares_its_first_inline_records_only() {
        let dir = TestDir::new();
        let root = dir.path().join("data");
        VolumeStore::init(&root, "admin").unwrap();
        let store = VolumeStore::open(&root, u64::MAX).unwrap();
        let mut records = recs(&[1]);
        records.extend((2..=PREPARE_MAX as u64 + 3).map(|id| Record {
            store_id: id,
            op: RecordOp::StoreInline {
                fid: Fid::new(1, id, 1),
                expected_version: 0,
                mtime: Timespec::default(),
                data: vec![id as u8; BIG_DATA],
            },
        }));
        let p = Prepared::new(&store.root, &records);
        let made: Vec<bool> = p.0.iter().map(Option::is_some).collect();
        let mut want = vec![false];
        want.extend((0..PREPARE_MAX + 2).map(|i| i < PREPARE_MAX));
        assert_eq!(made, want);
        let kept: Vec<PathBuf> = p.0.iter().flatten().cloned().collect();
        assert_eq!(fs::read(&kept[0]).unwrap(), vec![2u8; BIG_DATA]);
        drop(p);
        assert!(kept.iter().all(|k| !k.exists()));
    }

    /// A batch whose inline data is still being written is not taken, nor
    /// any later batch of its client (their order holds); other clients'
    /// batches go.
    #[test]
    fn a_batch_not_ready_holds_back_its_client_only() {
        let t = Instant::now();
        let mut q: VecDeque<Waiting> = [
            waiting(0, 1, 1, t),
            waiting(1, 1, 1, t),
            waiting(2, 1, 1, t),
            waiting(3, 2, 1, t),
            waiting(4, 3, BIG, t),
        ]
        .into();
        q[1].ready = false;
        q[4].ready = false;
        let pick = select(&q, t, Some(t), None, false, MAX_GROUP);
        assert_eq!(
            pick,
            Pick::Group {
                at: vec![0, 3],
                yielding: false
            }
        );
        // Only a large batch not ready: nothing to do yet.
        let q: VecDeque<Waiting> = [Waiting {
            ready: false,
            ..waiting(4, 3, BIG, t)
        }]
        .into();
        assert_eq!(
            select(&q, t + MAX_DEFER, None, None, false, MAX_GROUP),
            Pick::Nothing
        );
    }

    #[test]
    fn small_batches_go_first_and_a_large_one_alone() {
        let t = Instant::now();
        let q: VecDeque<Waiting> = [
            waiting(0, 1, BIG, t),
            waiting(1, 2, 1, t),
            waiting(2, 3, SMALL_BATCH, t),
        ]
        .into();
        // Queued before them, the large batch still waits for the small.
        let pick = select(&q, t, Some(t), None, false, MAX_GROUP);
        assert_eq!(
            pick,
            Pick::Group {
                at: vec![1, 2],
                yielding: false
            }
        );
        // Alone once the small ones left a lull, and it gives way.
        let q: VecDeque<Waiting> = [waiting(0, 1, BIG, t), waiting(3, 4, BIG, t)].into();
        let pick = select(&q, t + LULL, Some(t), None, false, MAX_GROUP);
        assert_eq!(
            pick,
            Pick::Group {
                at: vec![0],
                yielding: true
            }
        );
        // No group commit: one batch per transaction.
        let q: VecDeque<Waiting> = [waiting(1, 2, 1, t), waiting(2, 3, 1, t)].into();
        let pick = select(&q, t, None, None, false, 1);
        assert_eq!(
            pick,
            Pick::Group {
                at: vec![0],
                yielding: false
            }
        );
    }

    #[test]
    fn a_clients_batches_keep_their_order() {
        let t = Instant::now();
        // Client 1's small batch is behind its own large one: not taken.
        let q: VecDeque<Waiting> = [
            waiting(0, 1, 1, t),
            waiting(1, 1, BIG, t),
            waiting(2, 1, 1, t),
            waiting(3, 2, 1, t),
            waiting(4, 2, 1, t),
        ]
        .into();
        let pick = select(&q, t, Some(t), None, false, MAX_GROUP);
        assert_eq!(
            pick,
            Pick::Group {
                at: vec![0, 3, 4],
                yielding: false
            }
        );
        // A starving large batch behind its client's large one waits too.
        let old = t - MAX_DEFER;
        let q: VecDeque<Waiting> = [waiting(0, 1, BIG, t), waiting(1, 1, BIG, old)].into();
        let pick = select(&q, t, Some(t), None, false, MAX_GROUP);
        assert_eq!(pick, Pick::WaitUntil(t + LULL));
    }

    #[test]
    fn a_large_batch_waits_for_a_lull_and_its_share_but_not_past_its_bound() {
        let t = Instant::now();
        let q: VecDeque<Waiting> = [waiting(0, 1, BIG, t)].into();
        // Small batches came just now: wait for the lull.
        assert_eq!(
            select(&q, t, Some(t), None, false, MAX_GROUP),
            Pick::WaitUntil(t + LULL)
        );
        // A large batch committed and small ones kept coming: its share.
        let paced = Some(Paced {
            set: t,
            until: t + Duration::from_millis(100),
        });
        let later = t + Duration::from_millis(10);
        assert_eq!(
            select(&q, later, Some(later), paced, false, MAX_GROUP),
            Pick::WaitUntil(t + Duration::from_millis(100))
        );
        // Nobody else wrote since: the share does not hold it back.
        assert!(matches!(
            select(&q, later, Some(t), paced, false, MAX_GROUP),
            Pick::Group { yielding: true, .. }
        ));
        // Past MAX_DEFER it goes first, whole, before small batches; then
        // the small ones get their turn before the next starving one.
        let old = t - MAX_DEFER;
        let q: VecDeque<Waiting> = [
            waiting(0, 1, BIG, old),
            waiting(1, 3, BIG, old),
            waiting(2, 2, 1, t),
        ]
        .into();
        assert_eq!(
            select(&q, t, Some(t), paced, false, MAX_GROUP),
            Pick::Group {
                at: vec![0],
                yielding: false
            }
        );
        assert_eq!(
            select(&q, t, Some(t), paced, true, MAX_GROUP),
            Pick::Group {
                at: vec![2],
                yielding: false
            }
        );
        assert_eq!(
            select(&VecDeque::new(), t, None, None, false, MAX_GROUP),
            Pick::Nothing
        );
    }

    /// A large batch that gives way leaves nothing behind, and applied
    /// later it commits whole.
    #[test]
    fn a_large_batch_that_gives_way_leaves_nothing_then_commits_whole() {
        let dir = TestDir::new();
        let root = dir.path().join("data");
        VolumeStore::init(&root, "admin").unwrap();
        let store = VolumeStore::open(&root, u64::MAX).unwrap();
        let client = [9u8; 16];
        let fs = fids(&store, &client, BIG as u32);
        let records: Vec<Record> = fs
            .iter()
            .enumerate()
            .map(|(i, f)| create(i as u64 + 1, &format!("n{i}"), *f))
            .collect();
        let jobs = [job(client, records)];
        let asked = std::sync::atomic::AtomicUsize::new(0);
        let give_way = || {
            asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            true
        };
        assert!(store
            .commit_group_or_yield(&jobs, Some(&give_way))
            .is_none());
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);
        let (attr, entries, _) = store.read_dir(ROOT_FID, 0).unwrap();
        assert!(entries.is_empty() && attr.version == 1);
        assert_eq!(watermark(&store, &client), 0);
        let never = || false;
        let out = store.commit_group_or_yield(&jobs, Some(&never)).unwrap();
        assert_eq!(out[0].as_ref().unwrap().results.len(), BIG);
        assert_eq!(store.read_dir(ROOT_FID, 0).unwrap().0.size, BIG as u64);
        assert_eq!(watermark(&store, &client), BIG as u64);
    }

    /// Many threads reintegrating at once through the grouping: every batch
    /// is answered and applied exactly once.
    #[test]
    fn concurrent_batches_all_commit() {
        let dir = TestDir::new();
        let root = dir.path().join("data");
        VolumeStore::init(&root, "admin").unwrap();
        let store = VolumeStore::open(&root, u64::MAX).unwrap();
        const THREADS: u8 = 8;
        const EACH: u64 = 20;
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let store = &store;
                s.spawn(move || {
                    let client = [t + 1; 16];
                    let fs = fids(store, &client, EACH as u32);
                    let none = |_: u64| None;
                    for (i, fid) in fs.into_iter().enumerate() {
                        let r = create(i as u64 + 1, &format!("t{t}_{i}"), fid);
                        let out = store.reintegrate(&client, &[r], &none).unwrap();
                        assert_eq!(out.results[0].fid, fid);
                    }
                });
            }
        });
        let mut n = 0;
        let mut cursor = 0;
        for _ in 0..1000 {
            let (_, entries, next) = store.read_dir(ROOT_FID, cursor).unwrap();
            n += entries.len();
            match next {
                Some(c) => cursor = c,
                None => break,
            }
        }
        assert_eq!(n, THREADS as usize * EACH as usize);
        let attr = store.read_dir(ROOT_FID, 0).unwrap().0;
        assert_eq!(attr.version, 1 + THREADS as u64 * EACH);
        for t in 0..THREADS {
            assert_eq!(watermark(&store, &[t + 1; 16]), EACH);
        }
    }

    #[test]
    fn store_ids_may_not_leap_past_the_watermark() {
        // A new client's first records, and a long log after a watermark.
        assert!(check_ahead(0, &recs(&[1, 2, 3])).is_ok());
        assert!(check_ahead(0, &recs(&[MAX_STORE_ID_AHEAD])).is_ok());
        assert!(check_ahead(1000, &recs(&[990, 1001, 1000 + MAX_STORE_ID_AHEAD])).is_ok());
        // One id too far, anywhere in the batch, is blamed by index.
        let e = check_ahead(0, &recs(&[1, 2, 1 << 62])).unwrap_err();
        assert_eq!(e.index, 2);
        assert!(matches!(e.error, Error::Invalid(_)));
        let e = check_ahead(7, &recs(&[8 + MAX_STORE_ID_AHEAD])).unwrap_err();
        assert_eq!(e.index, 0);
        // No overflow near the top of the range.
        assert!(check_ahead(u64::MAX - 1, &recs(&[u64::MAX])).is_ok());
    }
}
