//! The lone server's commit journal (docs/SERVER.md "Commit journal"): a
//! group of small batches (metadata and small inline data, no object file)
//! is made durable by appending it to `commit.journal` and one
//! `fdatasync`, then committed to redb without a sync of its own
//! (`Durability::None`). A later durable redb commit makes those commits
//! durable too, and the journal starts again (a checkpoint). At open, the
//! groups journaled after the last durable commit are applied again, in
//! order, through the same apply code.
//!
//! Which records are still needed is decided by redb itself: each
//! journaled group writes its journal sequence number into the settings
//! table in its own transaction, so the durable store says exactly up to
//! which record it already holds, whatever commit (a checkpoint, an ACL
//! change, an AllocFids) made it durable.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::acl::Who;
use super::volume::{ClientId, VolumeStore};
use crate::journal::Journal;
use crate::proto::{Msg, Record, Timespec};
use crate::{Error, Result};

/// The journal's file in the data directory.
pub const JOURNAL_FILE: &str = "commit.journal";

/// Its size when created (4 MiB: a group of 64 batches of 16 KiB fits in
/// half of it).
pub const DEFAULT_CAPACITY: u64 = 4 << 20;

/// A checkpoint after this many journaled groups (or past half the
/// journal): it bounds how many groups a restart applies again, and how
/// much one checkpoint's sync writes (redb 4 reuses, in an unsynced commit,
/// the pages an earlier unsynced one wrote and nothing needs any more, so
/// that is the pages changed since the last one, not a copy per commit).
pub const CHECKPOINT_GROUPS: u64 = 256;

/// Set in the server's environment to the journal's size in bytes when it
/// is created (tests use a small one to make checkpoints frequent).
pub const CAPACITY_ENV: &str = "CODA_SERVER_JOURNAL_BYTES";

/// Set to `1` in the server's environment to commit every group durably
/// in redb, as before the journal (measuring what it gains).
pub const NO_JOURNAL_ENV: &str = "CODA_SERVER_NO_JOURNAL";

/// A journal holding records this long is checkpointed once the server
/// is idle.
pub const IDLE_CHECKPOINT: Duration = Duration::from_secs(1);

/// Set in the server's environment to another idle delay in milliseconds
/// (tests that look at the journal before a restart set a long one).
pub const IDLE_ENV: &str = "CODA_SERVER_JOURNAL_IDLE_MS";

fn idle_checkpoint() -> Duration {
    static IDLE: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *IDLE.get_or_init(|| {
        std::env::var(IDLE_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(IDLE_CHECKPOINT, Duration::from_millis)
    })
}

/// The settings key of the last journal sequence number applied.
pub(crate) const JOURNAL_SEQ_KEY: &str = "journal_seq";

const KIND_GROUP: u8 = 1;
/// The group journaled just before failed to commit: not to be replayed.
const KIND_CANCEL: u8 = 2;
/// A client id claimed (or its last-seen time refreshed) by a handshake.
const KIND_CLAIM: u8 = 3;

/// One applied batch, everything needed to apply it again identically.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    pub client: ClientId,
    pub after: u64,
    pub records: Vec<Record>,
    /// The time the apply stamped changes with.
    pub now: Timespec,
    /// The user its rights were checked against (None: none checked).
    pub who: Option<Who>,
}

/// A handshake's claim of a client id (`owners::claim_txn`): the id,
/// its user, and the time it was seen, in seconds.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Claim {
    pub client: ClientId,
    pub user: String,
    pub now: u64,
}

/// What a journal record applies again (`pending`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Pending {
    Group(Vec<Entry>),
    Claim(Claim),
}

/// A journal record read back.
#[derive(Debug, PartialEq)]
pub(crate) enum Decoded {
    Record(Pending),
    /// The record before it is not to be applied.
    Cancel,
}

/// `u8 KIND_CLAIM`, client id, `u64 now`, `u16 len | user`.
pub(crate) fn encode_claim(c: &Claim) -> Vec<u8> {
    let mut b = vec![KIND_CLAIM];
    b.extend_from_slice(&c.client);
    b.extend_from_slice(&c.now.to_le_bytes());
    put_str(&mut b, &c.user);
    b
}

/// `u8 KIND_GROUP | u32 count`, then per batch: client id, `i64 sec |
/// u32 nsec`, `u8` has-user (then the user as `u16 len | name`, `u32 id`,
/// `u16 count`, each group `u16 len | name`), `u8` message kind, `u32 len |
/// ReintegrateAfter body` (the wire encoding of `after` and the records).
pub(crate) fn encode_group<'a>(entries: impl ExactSizeIterator<Item = EntryRef<'a>>) -> Vec<u8> {
    let mut b = vec![KIND_GROUP];
    b.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        b.extend_from_slice(e.client);
        b.extend_from_slice(&e.now.sec.to_le_bytes());
        b.extend_from_slice(&e.now.nsec.to_le_bytes());
        match e.who {
            None => b.push(0),
            Some(w) => {
                b.push(1);
                put_str(&mut b, &w.user);
                b.extend_from_slice(&w.id.to_le_bytes());
                let n = w.groups.len().min(u16::MAX as usize);
                b.extend_from_slice(&(n as u16).to_le_bytes());
                for g in &w.groups[..n] {
                    put_str(&mut b, g);
                }
            }
        }
        let msg = Msg::ReintegrateAfter {
            after: e.after,
            records: e.records.to_vec(),
        };
        let body = msg.encode();
        b.push(msg.kind());
        b.extend_from_slice(&(body.len() as u32).to_le_bytes());
        b.extend_from_slice(&body);
    }
    b
}

/// A batch to encode, borrowed from the group being committed.
pub(crate) struct EntryRef<'a> {
    pub client: &'a ClientId,
    pub after: u64,
    pub records: &'a [Record],
    pub now: Timespec,
    pub who: Option<&'a Who>,
}

pub(crate) fn encode_cancel() -> Vec<u8> {
    vec![KIND_CANCEL]
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    let s = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    b.extend_from_slice(&(s.len() as u16).to_le_bytes());
    b.extend_from_slice(s);
}

/// Reads the fields of a journal record; every short read is an error.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(Error::Eio("a commit journal record is cut short".into()));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    /// Every byte was read.
    fn end(&self) -> Result<()> {
        if !self.0.is_empty() {
            return Err(Error::Eio(
                "a commit journal record has trailing bytes".into(),
            ));
        }
        Ok(())
    }
    fn str(&mut self) -> Result<String> {
        let n = self.u16()? as usize;
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| Error::Eio("a commit journal record holds a bad name".into()))
    }
}

pub(crate) fn decode(payload: &[u8]) -> Result<Decoded> {
    let mut r = Reader(payload);
    match r.take(1)?[0] {
        KIND_CANCEL => return Ok(Decoded::Cancel),
        KIND_CLAIM => {
            let client: ClientId = r.take(16)?.try_into().expect("16");
            let now = u64::from_le_bytes(r.take(8)?.try_into().expect("8"));
            let user = r.str()?;
            r.end()?;
            return Ok(Decoded::Record(Pending::Claim(Claim { client, user, now })));
        }
        KIND_GROUP => {}
        k => return Err(Error::Eio(format!("commit journal record of kind {k}"))),
    }
    let n = r.u32()?;
    let mut out = Vec::new();
    for _ in 0..n {
        let client: ClientId = r.take(16)?.try_into().expect("16");
        let sec = i64::from_le_bytes(r.take(8)?.try_into().expect("8"));
        let nsec = r.u32()?;
        let who = match r.take(1)?[0] {
            0 => None,
            _ => {
                let user = r.str()?;
                let id = r.u32()?;
                let count = r.u16()?;
                let mut groups = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    groups.push(r.str()?);
                }
                Some(Who { user, id, groups })
            }
        };
        let kind = r.take(1)?[0];
        let len = r.u32()? as usize;
        let body = r.take(len)?;
        let (after, records) = match Msg::decode_body(kind, body)? {
            Msg::ReintegrateAfter { after, records } => (after, records),
            _ => return Err(Error::Eio("a commit journal batch does not decode".into())),
        };
        out.push(Entry {
            client,
            after,
            records,
            now: Timespec { sec, nsec },
            who,
        });
    }
    r.end()?;
    Ok(Decoded::Record(Pending::Group(out)))
}

/// The groups and claims of `records` (numbered from `first_seq`) that
/// redb does not hold yet (sequence above `applied`), in order, cancelled
/// ones left out.
pub(crate) fn pending(
    records: &[Vec<u8>],
    first_seq: u64,
    applied: u64,
) -> Result<Vec<(u64, Pending)>> {
    let mut out: Vec<(u64, Pending)> = Vec::new();
    for (i, payload) in records.iter().enumerate() {
        let seq = first_seq + i as u64;
        match decode(payload)? {
            Decoded::Cancel => {
                if out.last().is_some_and(|(s, _)| *s + 1 == seq) {
                    out.pop();
                }
            }
            Decoded::Record(p) if seq > applied => out.push((seq, p)),
            Decoded::Record(_) => {}
        }
    }
    Ok(out)
}

/// The journal of a lone server (None: off, for a replicated member or
/// by `NO_JOURNAL_ENV`). Its lock guards only the slot: the journal is
/// taken out for its writes and syncs (`with_journal`), by the thread that
/// holds the group commit (`GroupState::busy`) or the store's (re)open.
pub(crate) struct Wal {
    pub(crate) journal: Mutex<Option<Journal>>,
    /// When the first record since the last checkpoint was appended
    /// (apart from `journal`: the idle check reads it without waiting).
    pub(crate) since: Mutex<Option<Instant>>,
    /// Whether this server journals (`wanted`, at open): a reopen of the
    /// store opens the journal again from its file, whatever became of
    /// the one in the slot.
    pub(crate) wanted: bool,
    /// No checkpoint is tried before this time, and the wait after the
    /// next failure: the last one failed for lack of space
    /// (`defer_checkpoints`).
    retry: Mutex<(Option<Instant>, Duration)>,
    /// Groups committed in redb before their journal record is durable.
    pub(crate) unsynced: Unsynced,
}

/// After a checkpoint failed for lack of space, the next is tried this much
/// later (or at a clean shutdown), twice as long after each failure in a
/// row, up to `SPACE_RETRY_MAX`. A failed durable commit leaves redb
/// refusing every transaction until it is reopened and the journal
/// applied again, so trying at every group would reopen the store at
/// every group while the disk stays full.
pub(crate) const SPACE_RETRY: Duration = Duration::from_secs(1);
pub(crate) const SPACE_RETRY_MAX: Duration = Duration::from_secs(30);

impl Wal {
    /// No journal yet (`replay_in` opens it); one is kept if `wanted`.
    pub(crate) fn new(wanted: bool) -> Wal {
        Wal {
            journal: Mutex::new(None),
            since: Mutex::new(None),
            wanted,
            retry: Mutex::new((None, SPACE_RETRY)),
            unsynced: Unsynced::default(),
        }
    }

    /// A checkpoint failed for lack of space: the journal keeps its groups
    /// (they are durable there) and groups keep going to it while it has
    /// room; the next checkpoint waits (`SPACE_RETRY`, doubling).
    pub(crate) fn defer_checkpoints(&self) {
        let mut r = self.retry.lock();
        let wait = r.1;
        *r = (Some(Instant::now() + wait), (wait * 2).min(SPACE_RETRY_MAX));
    }

    /// A checkpoint succeeded: the next failure waits `SPACE_RETRY` again.
    pub(crate) fn checkpoint_done(&self) {
        *self.retry.lock() = (None, SPACE_RETRY);
    }

    /// Whether checkpoints wait (`defer_checkpoints`).
    pub(crate) fn checkpoints_deferred(&self) -> bool {
        self.retry.lock().0.is_some_and(|t| Instant::now() < t)
    }

    /// Run `f` on the journal taken out of its slot, so no lock is held
    /// across its writes and fsyncs, and put it back; `None` when there is
    /// none (off, or out meanwhile: its users hold the group commit, so
    /// that does not happen, and a group that finds none commits durably).
    pub(crate) fn with_journal<T>(&self, f: impl FnOnce(&mut Journal) -> T) -> Option<T> {
        let mut journal = self.journal.lock().take()?;
        let out = f(&mut journal);
        *self.journal.lock() = Some(journal);
        Some(out)
    }

    /// Whether the journal holds records and the first is older than
    /// `IDLE_CHECKPOINT` (or `IDLE_ENV`).
    fn idle_due(&self) -> bool {
        self.since
            .lock()
            .is_some_and(|t| t.elapsed() >= idle_checkpoint())
    }
}

/// The size a new journal gets.
pub(crate) fn capacity() -> u64 {
    std::env::var(CAPACITY_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(DEFAULT_CAPACITY)
        .max(crate::journal::MIN_CAPACITY)
}

pub(crate) fn path(root: &Path) -> PathBuf {
    root.join(JOURNAL_FILE)
}

/// Whether this process journals: a lone server, unless switched off.
pub(crate) fn wanted(root: &Path) -> bool {
    let off = std::env::var(NO_JOURNAL_ENV).is_ok_and(|v| v == "1");
    !off && !super::replication::config::group_path(root).exists()
}

/// Apply what the journal of `root` holds to its redb, for a command that
/// opens the metadata itself while no server runs (so it neither misses
/// nor reorders journaled batches).
pub(crate) fn settle(root: &Path) -> Result<()> {
    if !path(root).exists() {
        return Ok(());
    }
    // Opening replays and checkpoints; dropping closes.
    drop(VolumeStore::open(root, u64::MAX)?);
    Ok(())
}

impl VolumeStore {
    /// Checkpoint when the journal has held records for
    /// `IDLE_CHECKPOINT` and no batch waits (the server's sweeper calls
    /// this every 100 ms), so a quiet server's redb is durable by itself.
    pub fn checkpoint_if_idle(&self) {
        if !self.wal.idle_due() || self.wal.checkpoints_deferred() {
            return;
        }
        if let Some(_held) = self.group.try_hold(true) {
            self.checkpoint_held();
        }
    }

    /// Checkpoint now (clean shutdown): waits, bounded, for a group in
    /// progress to end.
    pub fn checkpoint(&self) {
        for _ in 0..100 {
            if let Some(_held) = self.group.try_hold(false) {
                self.checkpoint_held();
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        super::log::warn(format_args!(
            "no journal checkpoint: the group commit stayed busy"
        ));
    }

    fn checkpoint_held(&self) {
        let r = self.with_db(|db| {
            let r = self.wal.with_journal(|journal| {
                if journal.records() > 0 || journal.is_broken() {
                    self.checkpoint_locked(db, journal)
                } else {
                    Ok(())
                }
            });
            r.unwrap_or(Ok(()))
        });
        if let Err(e) = r {
            super::log::warn(format_args!("commit journal checkpoint failed: {e}"));
        }
    }
}

/// A journaled group's redb commit runs while the disk writes its journal
/// record (`Journal::write_out`), so for a moment the group is visible in
/// redb and not yet durable. Its own writers hear of it only after the
/// sync, and so do the holders of callbacks it breaks; anything else that
/// could show it (a read's reply) waits for that sync too
/// (`wait_durable`), so no client ever sees state a crash could take back.
#[derive(Default)]
pub(crate) struct Unsynced {
    /// Groups whose redb commit may be visible: counted before the commit.
    visible: AtomicU64,
    /// Groups whose journal record is durable (or that failed: nothing of
    /// them is kept unsynced). Read without a lock when nothing waits to
    /// be synced (every read's reply looks); moved under `moving`.
    durable: AtomicU64,
    /// Taken to move `durable` and to wait for it, so no wake-up is lost.
    moving: Mutex<()>,
    /// Signalled when `durable` moves.
    moved: Condvar,
}

/// A group between its redb commit and its journal sync; ends (durable or
/// failed) when dropped.
pub(crate) struct Visible<'a> {
    of: &'a Unsynced,
    seq: u64,
}

impl Drop for Visible<'_> {
    fn drop(&mut self) {
        let _g = self.of.moving.lock();
        self.of.durable.fetch_max(self.seq, Ordering::SeqCst);
        self.of.moved.notify_all();
    }
}

impl Unsynced {
    /// Before a group's unsynced redb commit.
    pub(crate) fn begin(&self) -> Visible<'_> {
        Visible {
            of: self,
            seq: self.visible.fetch_add(1, Ordering::SeqCst) + 1,
        }
    }

    /// Wait until every group visible now is durable, at most `limit`;
    /// false if that did not happen in time. A read calls it after reading
    /// and before it replies: whatever it read was visible by then.
    pub(crate) fn wait_durable(&self, limit: Duration) -> bool {
        let want = self.visible.load(Ordering::SeqCst);
        let synced = || self.durable.load(Ordering::SeqCst) >= want;
        if synced() {
            return true;
        }
        let end = Instant::now() + limit;
        let mut g = self.moving.lock();
        // Bounded by `end`.
        while !synced() {
            if self.moved.wait_until(&mut g, end).timed_out() {
                return synced();
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Fid, RecordOp};

    /// A read that could see a group between its redb commit and its
    /// journal sync waits for the sync; with nothing visible it does not
    /// wait; a sync that never comes is a timeout, not a hang.
    #[test]
    fn a_read_waits_for_the_sync_of_a_visible_group_and_no_longer() {
        let u = std::sync::Arc::new(Unsynced::default());
        assert!(u.wait_durable(Duration::ZERO), "nothing visible");
        let visible = u.begin();
        assert!(!u.wait_durable(Duration::from_millis(20)), "never synced");
        let synced = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (u, synced) = (u.clone(), synced.clone());
            std::thread::spawn(move || {
                assert!(u.wait_durable(Duration::from_secs(10)));
                synced.load(Ordering::SeqCst)
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        synced.store(true, Ordering::SeqCst);
        drop(visible);
        assert!(reader.join().unwrap(), "the read went on before the sync");
        // A later group: an earlier read's wait is not extended by it.
        let later = u.begin();
        assert!(!u.wait_durable(Duration::ZERO));
        drop(later);
        assert!(u.wait_durable(Duration::ZERO));
    }

    fn entry(store_id: u64, who: Option<Who>) -> Entry {
        Entry {
            client: [store_id as u8; 16],
            after: store_id.saturating_sub(1),
            records: vec![Record {
                store_id,
                op: RecordOp::StoreInline {
                    fid: Fid {
                        volume: 1,
                        vnode: 7,
                        unique: 9,
                    },
                    expected_version: 3,
                    mtime: Timespec { sec: 5, nsec: 6 },
                    data: vec![1, 2, 3],
                },
            }],
            now: Timespec {
                sec: 1_700_000_000,
                nsec: 42,
            },
            who,
        }
    }

    fn encode(entries: &[Entry]) -> Vec<u8> {
        encode_group(entries.iter().map(|e| EntryRef {
            client: &e.client,
            after: e.after,
            records: &e.records,
            now: e.now,
            who: e.who.as_ref(),
        }))
    }

    #[test]
    fn a_group_round_trips_and_cancels_drop_their_group() {
        let who = Who {
            user: "alice".into(),
            id: 1001,
            groups: vec!["System:AnyUser".into(), "staff".into()],
        };
        let g1 = vec![entry(1, Some(who)), entry(2, None)];
        let g2 = vec![entry(3, None)];
        let b1 = encode(&g1);
        assert_eq!(
            decode(&b1).unwrap(),
            Decoded::Record(Pending::Group(g1.clone()))
        );
        // A cut record is an error, not a shorter group.
        assert!(decode(&b1[..b1.len() - 1]).is_err());
        let recs = vec![b1.clone(), encode(&g2), encode_cancel(), b1];
        // Numbered from 10; redb already holds up to 9: all but the
        // cancelled one come back, in order.
        let p = pending(&recs, 10, 9).unwrap();
        assert_eq!(
            p,
            vec![
                (10, Pending::Group(g1.clone())),
                (13, Pending::Group(g1.clone()))
            ]
        );
        // Redb holds up to 12: only the last one.
        assert_eq!(
            pending(&recs, 10, 12).unwrap(),
            vec![(13, Pending::Group(g1))]
        );
    }

    #[test]
    fn checkpoints_wait_longer_after_each_failure_for_space_until_one_succeeds() {
        let w = Wal::new(false);
        assert!(!w.checkpoints_deferred());
        w.defer_checkpoints();
        assert!(w.checkpoints_deferred());
        let waits: Vec<Duration> = (0..7)
            .map(|_| {
                w.defer_checkpoints();
                w.retry.lock().1
            })
            .collect();
        assert_eq!(waits[0], SPACE_RETRY * 4, "1 s, then 2 s, then 4 s");
        assert_eq!(*waits.last().unwrap(), SPACE_RETRY_MAX, "bounded");
        w.checkpoint_done();
        assert!(!w.checkpoints_deferred());
        assert_eq!(w.retry.lock().1, SPACE_RETRY);
    }

    #[test]
    fn a_claim_round_trips_and_a_cancel_drops_it() {
        let c = Claim {
            client: [7u8; 16],
            user: "alice".into(),
            now: 1_700_000_123,
        };
        let b = encode_claim(&c);
        assert_eq!(
            decode(&b).unwrap(),
            Decoded::Record(Pending::Claim(c.clone()))
        );
        assert!(decode(&b[..b.len() - 1]).is_err(), "cut short");
        let mut long = b.clone();
        long.push(0);
        assert!(decode(&long).is_err(), "trailing bytes");
        let g = vec![entry(1, None)];
        let recs = vec![
            encode_claim(&c),
            encode(&g),
            encode_claim(&c),
            encode_cancel(),
        ];
        assert_eq!(
            pending(&recs, 1, 0).unwrap(),
            vec![(1, Pending::Claim(c)), (2, Pending::Group(g))]
        );
    }
}
