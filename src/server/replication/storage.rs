//! The Raft log and hard state, in `DIR/raft.redb` (its own file, so the
//! log's fsyncs and the volume store's never wait on one lock), made
//! durable through `DIR/raft.journal` (`crate::journal`): each new run of
//! entries and hard state is appended there and fdatasynced (one
//! sequential write into a preallocated file), and that is all the write
//! path does: the records wait in memory and go into redb, in order, with
//! one durable commit when the journal is full (or a membership change
//! commits), after which the journal starts again. At start the journal's
//! records are written into redb again, in order (each replaces the log
//! from its first index, so replaying records redb already holds changes
//! nothing). Reads are served by the engine's `MemStorage`, loaded at
//! start; every write is durable before it reaches memory, so nothing the
//! engine sends on was not on disk.

use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState};
use raft::storage::MemStorage;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::journal::Journal;
use crate::{Error, Result};

/// Log index → the entry, protobuf-encoded.
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
/// "hard" → HardState, "conf" → ConfState, "applied" → u64 (big-endian).
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_state");

/// The file's name in the data directory.
pub const RAFT_DB: &str = "raft.redb";

/// The journal's name in the data directory.
pub const RAFT_JOURNAL: &str = "raft.journal";
/// The journal's size: a small store's two entries take ~5 KiB, so about
/// 800 files between two durable commits of `raft.redb` (each member writes
/// it whole once, at its first start).
const JOURNAL_CAPACITY: u64 = 4 << 20;

/// Path of the Raft log file.
pub fn raft_db_path(root: &Path) -> PathBuf {
    root.join(RAFT_DB)
}

/// A journal record: `u32 n`, n × (`u32 len`, an entry), then optionally
/// `u32 len`, the hard state (all big-endian, protobuf-encoded).
fn encode_record(entries: &[Entry], hs: Option<&HardState>) -> Result<Vec<u8>> {
    let mut b = Vec::new();
    b.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    let put = |b: &mut Vec<u8>, bytes: Vec<u8>| {
        b.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        b.extend_from_slice(&bytes);
    };
    for e in entries {
        put(&mut b, e.write_to_bytes().map_err(pb_err)?);
    }
    if let Some(hs) = hs {
        put(&mut b, hs.write_to_bytes().map_err(pb_err)?);
    }
    Ok(b)
}

fn decode_record(b: &[u8]) -> Result<(Vec<Entry>, Option<HardState>)> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8]> {
        if b.len() < n {
            return Err(Error::Eio("a raft journal record does not decode".into()));
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Ok(head)
    }
    fn len(b: &mut &[u8]) -> Result<usize> {
        Ok(u32::from_be_bytes(take(b, 4)?.try_into().expect("4")) as usize)
    }
    let mut b = b;
    let n = len(&mut b)?;
    let mut entries = Vec::new();
    for _ in 0..n {
        let l = len(&mut b)?;
        entries.push(Entry::parse_from_bytes(take(&mut b, l)?).map_err(pb_err)?);
    }
    let hs = if b.is_empty() {
        None
    } else {
        let l = len(&mut b)?;
        let hs = HardState::parse_from_bytes(take(&mut b, l)?).map_err(pb_err)?;
        if !b.is_empty() {
            return Err(Error::Eio("a raft journal record runs past its end".into()));
        }
        Some(hs)
    };
    Ok((entries, hs))
}

/// Write entries (replacing the log from the first one's index) and a
/// hard state into `txn`.
fn write_log(
    txn: &redb::WriteTransaction,
    entries: &[Entry],
    hs: Option<&HardState>,
) -> Result<()> {
    let mut log = txn.open_table(LOG)?;
    if let Some(first) = entries.first() {
        // A leader's entries win over ours from that index on.
        let stale: Vec<u64> = log
            .range(first.index..)?
            .map(|r| r.map(|(k, _)| k.value()))
            .collect::<std::result::Result<_, _>>()?;
        for k in stale {
            log.remove(k)?;
        }
        for e in entries {
            log.insert(e.index, e.write_to_bytes().map_err(pb_err)?.as_slice())?;
        }
    }
    if let Some(hs) = hs {
        txn.open_table(STATE)?
            .insert("hard", hs.write_to_bytes().map_err(pb_err)?.as_slice())?;
    }
    Ok(())
}

fn pb_err(e: protobuf::ProtobufError) -> Error {
    Error::Eio(format!("raft log record does not decode: {e}"))
}

/// The durable half of the engine's storage plus the in-memory copy it reads.
pub struct RaftStore {
    db: Database,
    journal: Journal,
    /// `CODA_REPL_NO_JOURNAL` (a measurement aid: the baseline of
    /// docs/BENCHMARKS.md `rapply`): every write a durable redb commit.
    no_journal: bool,
    mem: MemStorage,
    applied: u64,
    /// Journal records (as appended) that redb does not hold yet: written
    /// into it at the next durable commit.
    pending: Vec<Vec<u8>>,
    /// The hard state in memory has a commit index redb does not hold.
    commit_unsaved: bool,
}

impl RaftStore {
    /// Create the log of a new member whose group's voters are `voters`.
    pub fn create(root: &Path, voters: &[u64]) -> Result<()> {
        let path = raft_db_path(root);
        if path.exists() {
            return Err(Error::Exists(format!("{} exists", path.display())));
        }
        crate::fsmode::precreate_private_file(&path)?;
        let db = Database::create(&path)?;
        let txn = db.begin_write()?;
        {
            txn.open_table(LOG)?;
            let mut st = txn.open_table(STATE)?;
            let cs = ConfState::from((voters.to_vec(), Vec::<u64>::new()));
            st.insert("conf", cs.write_to_bytes().map_err(pb_err)?.as_slice())?;
            st.insert(
                "hard",
                HardState::default()
                    .write_to_bytes()
                    .map_err(pb_err)?
                    .as_slice(),
            )?;
            st.insert("applied", 0u64.to_be_bytes().as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Open the log and load it into memory.
    pub fn open(root: &Path) -> Result<RaftStore> {
        let path = raft_db_path(root);
        // A log written by an earlier coda (redb 2) is converted first.
        let db = match crate::redb_upgrade::upgraded(&path, &[], || Database::open(&path)) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(Error::Again(format!(
                    "{} is in use by a running coda-server",
                    path.display()
                )))
            }
            Err(e) => return Err(e.into()),
        };
        // What the journal holds since redb's last durable commit goes
        // into redb again, durably, before anything is read.
        let (mut journal, records) = Journal::open(&root.join(RAFT_JOURNAL), JOURNAL_CAPACITY)?;
        if !records.is_empty() {
            let txn = db.begin_write()?;
            // A commit index redb holds (written alone, made durable by a
            // later commit) stays: the journal's may be older.
            let commit = match txn.open_table(STATE)?.get("hard")? {
                Some(v) => {
                    HardState::parse_from_bytes(v.value())
                        .map_err(pb_err)?
                        .commit
                }
                None => 0,
            };
            for r in &records {
                let (entries, mut hs) = decode_record(r)?;
                if let Some(h) = hs.as_mut() {
                    h.commit = h.commit.max(commit);
                }
                write_log(&txn, &entries, hs.as_ref())?;
            }
            txn.commit()?;
            journal.reset()?;
        }
        let mem = MemStorage::new();
        let mut applied;
        {
            let txn = db.begin_read()?;
            let st = txn.open_table(STATE)?;
            let get = |k: &str| -> Result<Vec<u8>> {
                st.get(k)?
                    .map(|v| v.value().to_vec())
                    .ok_or_else(|| Error::Eio(format!("{}: no {k} record", path.display())))
            };
            let hs = HardState::parse_from_bytes(&get("hard")?).map_err(pb_err)?;
            let cs = ConfState::parse_from_bytes(&get("conf")?).map_err(pb_err)?;
            let a = get("applied")?;
            applied = u64::from_be_bytes(
                a.as_slice()
                    .try_into()
                    .map_err(|_| Error::Eio("bad applied record".into()))?,
            );
            let log = txn.open_table(LOG)?;
            let mut entries = Vec::new();
            for item in log.iter()? {
                let (_, v) = item?;
                entries.push(Entry::parse_from_bytes(v.value()).map_err(pb_err)?);
            }
            // Entries may be applied again (the state machine knows them),
            // never applied past what is known committed.
            applied = applied.min(hs.commit);
            let mut core = mem.wl();
            core.append(&entries)
                .map_err(|e| Error::Eio(format!("raft log: {e}")))?;
            core.set_hardstate(hs);
            core.set_conf_state(cs);
        }
        Ok(RaftStore {
            db,
            journal,
            no_journal: std::env::var_os("CODA_REPL_NO_JOURNAL").is_some(),
            mem,
            applied,
            pending: Vec::new(),
            commit_unsaved: false,
        })
    }

    /// The engine's view (cheap clone of a shared handle).
    pub fn mem(&self) -> MemStorage {
        self.mem.clone()
    }

    /// Index of the last entry applied to the state machine.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Make new entries and/or a new hard state durable (one journal
    /// append and fdatasync; nothing written when only the commit index
    /// moved), then visible to the engine. Entries replace any at the same
    /// or later index.
    pub fn persist(&mut self, entries: &[Entry], hs: Option<&HardState>) -> Result<()> {
        if entries.is_empty() && hs.is_none() {
            return Ok(());
        }
        // A new commit index alone is not written: Raft needs the entries,
        // the term and the vote durable, never the commit index (a restart
        // that reads an older one learns the newer from the leader, and
        // re-applies what lies between, as after a lost applied mark). The
        // next durable commit of this file carries it.
        let commit_only = entries.is_empty()
            && hs.is_some_and(|h| {
                let cur = self.mem.rl();
                let cur = cur.hard_state();
                h.term == cur.term && h.vote == cur.vote
            });
        if commit_only {
            self.commit_unsaved = true;
        } else if self.no_journal {
            self.commit_durably(entries, hs)?;
        } else {
            // A record written anyway carries the commit index kept in
            // memory (a few bytes): a crash then loses at most the last.
            let carried = match hs {
                None if self.commit_unsaved => Some(self.mem.rl().hard_state().clone()),
                _ => None,
            };
            let record = encode_record(entries, hs.or(carried.as_ref()))?;
            if !self.journal.fits(record.len()) {
                // Full: everything before goes durable in redb, then the
                // journal starts again (every record in it must be newer
                // than redb's durable state, or a replay would undo it).
                self.checkpoint()?;
            }
            if self.journal.fits(record.len()) {
                self.journal.append(&record)?;
                self.journal.sync()?;
                self.pending.push(record);
                // The record holds it now (and redb will, with the record).
                self.commit_unsaved = false;
            } else {
                // Larger than the whole journal: a durable commit of its
                // own (the journal is empty, so no replay can undo it).
                self.commit_durably(entries, hs)?;
            }
        }
        let mut core = self.mem.wl();
        if !entries.is_empty() {
            core.append(entries)
                .map_err(|e| Error::Eio(format!("raft log: {e}")))?;
        }
        if let Some(hs) = hs {
            core.set_hardstate(hs.clone());
        }
        Ok(())
    }

    /// One durable redb commit of the pending journal records, then
    /// `entries` and `hs`, and the commit index in memory if newer.
    fn commit_durably(&mut self, entries: &[Entry], hs: Option<&HardState>) -> Result<()> {
        let txn = self.db.begin_write()?;
        self.write_pending(&txn)?;
        write_log(&txn, entries, hs)?;
        txn.commit()?;
        self.pending.clear();
        Ok(())
    }

    /// Write the pending journal records into `txn`, in order, and the
    /// hard state in memory when its commit index is not in redb.
    fn write_pending(&mut self, txn: &redb::WriteTransaction) -> Result<()> {
        for r in &self.pending {
            let (entries, hs) = decode_record(r)?;
            write_log(txn, &entries, hs.as_ref())?;
        }
        if self.commit_unsaved {
            let hs = self.mem.rl().hard_state().clone();
            write_log(txn, &[], Some(&hs))?;
            self.commit_unsaved = false;
        }
        Ok(())
    }

    /// Make redb hold everything durably (one fsync), then start the
    /// journal again.
    fn checkpoint(&mut self) -> Result<()> {
        self.commit_durably(&[], None)?;
        self.journal.reset()
    }

    /// At a clean stop: redb holds everything durably, so the next start
    /// replays nothing and knows the last commit index.
    pub fn close(&mut self) -> Result<()> {
        self.checkpoint()
    }

    /// Record a new commit index (from a light ready; in memory only, see
    /// [`RaftStore::persist`]).
    pub fn persist_commit(&mut self, commit: u64) -> Result<()> {
        let mut hs = self.mem.rl().hard_state().clone();
        hs.commit = commit;
        self.persist(&[], Some(&hs))
    }

    /// Record the configuration in force after a membership change
    /// (a durable commit, which carries every earlier one: the journal
    /// starts again).
    pub fn persist_conf(&mut self, cs: &ConfState) -> Result<()> {
        let txn = self.db.begin_write()?;
        self.write_pending(&txn)?;
        txn.open_table(STATE)?
            .insert("conf", cs.write_to_bytes().map_err(pb_err)?.as_slice())?;
        txn.commit()?;
        self.pending.clear();
        self.journal.reset()?;
        self.mem.wl().set_conf_state(cs.clone());
        Ok(())
    }

    /// Record that entries up to `index` are applied, in memory: the
    /// durable applied mark is the volume store's own, in the transaction
    /// of the entry's changes (`machine::APPLIED_KEY`).
    pub fn set_applied(&mut self, index: u64) {
        self.applied = index;
    }

    /// At start: the state machine holds the entries through `mark` (None:
    /// it keeps no mark, and this file's own applied record, written before
    /// the store kept one, stands). Never past the known commit index: the
    /// engine learns the rest from the leader, and the state machine skips
    /// what it holds already.
    pub fn start_from(&mut self, mark: Option<u64>) {
        if let Some(m) = mark {
            self.applied = m.min(self.mem.rl().hard_state().commit);
        }
    }

    /// Write this file's applied record (a test makes a log as an older
    /// member left it).
    #[cfg(test)]
    fn write_applied(&mut self, index: u64) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(STATE)?
            .insert("applied", index.to_be_bytes().as_slice())?;
        txn.commit()?;
        self.applied = index;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;
    use redb::ReadableTableMetadata;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("coda-raftstore-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: data.to_vec().into(),
            ..Default::default()
        }
    }

    #[test]
    fn entries_and_hard_state_survive_a_reopen_a_leader_overwrites_a_tail_and_applied_stays_within_commit(
    ) {
        let d = scratch("reopen");
        RaftStore::create(&d, &[1, 2, 3]).unwrap();
        {
            let mut s = RaftStore::open(&d).unwrap();
            let hs = HardState {
                term: 2,
                vote: 3,
                ..Default::default()
            };
            s.persist(
                &[entry(1, 1, b"a"), entry(2, 1, b"b"), entry(3, 1, b"c")],
                Some(&hs),
            )
            .unwrap();
            // A new leader's entry 2 at term 2 replaces 2 and 3.
            s.persist(&[entry(2, 2, b"x")], None).unwrap();
            s.persist_commit(2).unwrap();
            // The commit index reaches redb with its next durable commit.
            s.checkpoint().unwrap();
            // An applied mark past the commit index (a kill between the two
            // writes) is read back as the commit index.
            s.write_applied(3).unwrap();
        }
        let s = RaftStore::open(&d).unwrap();
        let m = s.mem();
        let st = m.initial_state().unwrap();
        assert_eq!(
            (st.hard_state.term, st.hard_state.vote, st.hard_state.commit),
            (2, 3, 2)
        );
        assert_eq!(st.conf_state.voters, vec![1, 2, 3]);
        assert_eq!(m.last_index().unwrap(), 2);
        assert_eq!(m.term(2).unwrap(), 2);
        let es = m
            .entries(1, 3, None, raft::GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(es[1].data.as_ref(), b"x");
        assert_eq!(s.applied(), 2);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// Entries and hard states since redb's last durable commit are in the
    /// journal only (redb commits them without an fsync): a `raft.redb` as
    /// a crash left it, holding none of them, reads back whole, a leader's
    /// overwrite of a tail included; and a journal replayed over a redb
    /// that holds its records already changes nothing.
    #[test]
    fn the_journal_brings_back_what_redb_lost_and_replays_over_what_it_kept() {
        let d = scratch("journal");
        RaftStore::create(&d, &[1, 2, 3]).unwrap();
        let old = d.join("raft.redb.old");
        {
            let mut s = RaftStore::open(&d).unwrap();
            s.persist(&[entry(1, 1, b"a")], None).unwrap();
            s.checkpoint().unwrap();
            std::fs::copy(d.join(RAFT_DB), &old).unwrap();
            let hs = HardState {
                term: 2,
                vote: 2,
                commit: 3,
                ..Default::default()
            };
            s.persist(
                &[entry(2, 1, b"b"), entry(3, 1, b"c"), entry(4, 1, b"d")],
                None,
            )
            .unwrap();
            s.persist(&[entry(3, 2, b"x")], Some(&hs)).unwrap();
        }
        let check = |d: &Path| {
            let s = RaftStore::open(d).unwrap();
            let m = s.mem();
            let st = m.initial_state().unwrap();
            assert_eq!((st.hard_state.term, st.hard_state.vote), (2, 2));
            assert_eq!(m.last_index().unwrap(), 3);
            let es = m
                .entries(1, 4, None, raft::GetEntriesContext::empty(false))
                .unwrap();
            let data: Vec<&[u8]> = es.iter().map(|e| e.data.as_ref()).collect();
            assert_eq!(data, [&b"a"[..], b"b", b"x"]);
        };
        // Replayed over the redb that holds only the first entry (the
        // records since wait in memory until a durable commit).
        std::fs::copy(d.join(RAFT_JOURNAL), d.join("journal.kept")).unwrap();
        check(&d);
        // Replayed over a redb that holds it all.
        std::fs::copy(d.join("journal.kept"), d.join(RAFT_JOURNAL)).unwrap();
        check(&d);
        // Replayed over the redb of before the journaled writes.
        std::fs::copy(&old, d.join(RAFT_DB)).unwrap();
        std::fs::copy(d.join("journal.kept"), d.join(RAFT_JOURNAL)).unwrap();
        check(&d);
        // Opened again, nothing left to replay, the same.
        check(&d);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A hard state whose commit index alone moved is kept in memory: no
    /// journal record, no redb commit. Lost by a crash, it reads back as
    /// the last one written with the log, and the applied index is
    /// clamped to it; the next record written carries it, and a durable
    /// commit (a full journal, a membership change, a clean stop) writes
    /// it into redb with every pending record.
    #[test]
    fn a_commit_index_alone_writes_nothing_and_a_durable_commit_carries_it() {
        let d = scratch("commit");
        RaftStore::create(&d, &[1, 2, 3]).unwrap();
        let hs = |commit| HardState {
            term: 1,
            vote: 1,
            commit,
            ..Default::default()
        };
        let journal_len = |d: &Path| {
            let (_, records) = Journal::open(&d.join(RAFT_JOURNAL), JOURNAL_CAPACITY).unwrap();
            records.len()
        };
        {
            let mut s = RaftStore::open(&d).unwrap();
            s.persist(&[entry(1, 1, b"a"), entry(2, 1, b"b")], Some(&hs(1)))
                .unwrap();
            s.persist_commit(2).unwrap();
            assert_eq!(s.mem().rl().hard_state().commit, 2);
            assert_eq!(s.pending.len(), 1);
            // redb holds none of it (not even unsynced).
            let txn = s.db.begin_read().unwrap();
            assert_eq!(txn.open_table(LOG).unwrap().len().unwrap(), 0);
            let hard = txn.open_table(STATE).unwrap().get("hard").unwrap().unwrap();
            assert_eq!(HardState::parse_from_bytes(hard.value()).unwrap().commit, 0);
            drop(hard);
            drop(txn);
            // As a crash leaves it: redb untouched, one journal record.
            s.write_applied(2).unwrap();
            drop(s);
            assert_eq!(journal_len(&d), 1);
        }
        {
            let mut s = RaftStore::open(&d).unwrap();
            assert_eq!(s.mem().rl().hard_state().commit, 1);
            assert_eq!(s.mem().last_index().unwrap(), 2);
            assert_eq!(s.applied(), 1);
            // The next record written carries it: a crash after it loses nothing.
            s.persist_commit(2).unwrap();
            s.persist(&[entry(3, 1, b"c")], None).unwrap();
        }
        {
            let mut s = RaftStore::open(&d).unwrap();
            assert_eq!(s.mem().rl().hard_state().commit, 2);
            s.persist_commit(3).unwrap();
            s.close().unwrap();
            assert_eq!(journal_len(&d), 0);
        }
        let s = RaftStore::open(&d).unwrap();
        let st = s.mem().initial_state().unwrap();
        assert_eq!(
            (st.hard_state.commit, s.mem().last_index().unwrap()),
            (3, 3)
        );
        let _ = std::fs::remove_dir_all(&d);
    }
}
