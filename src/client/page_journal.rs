//! The client index's redo journal of page writes (`index.journal` beside
//! `index.redb`): what makes a durable index commit one sequential write
//! and one flush instead of an `fdatasync` of the index file, which writes
//! every page the commit changed where it lies (about 16 scattered pages
//! for a write-back close; docs/BENCHMARKS.md, "The client index's page
//! journal").
//!
//! Below redb, invisible to it: `IndexFile` hands every write (and length
//! change) of the index file to `PageLog::record` as it makes it, and when
//! redb asks for a sync, `PageLog::sync` appends everything written since
//! the last sync as one journal record (`crate::journal`: checksummed,
//! chained, torn tails ignored) and syncs the journal, not the index file.
//! After a crash, `replay` writes the records' pages over the index file in
//! order before redb opens it: for every page written since the journal
//! was last reset, the value it had at the last sync that completed, which
//! is what an `fdatasync` of the index file at each sync would have left.
//! Writes after that sync are as a crash leaves them without the journal
//! (redb is built to open such a file).
//!
//! A checkpoint (an `fdatasync` of the index file, then the journal reset
//! durably) bounds the journal: when a record would not fit, when more was
//! written since the last sync than a record may hold (the index's
//! periodic durable commit after many unsynced ones), and at a clean close.
//! A failure of the journal fails the sync (and so redb's commit): the
//! index is opened again, which replays and checkpoints. The index file
//! itself is never synced on its own while the journal holds records, as
//! replaying them over a newer durable file would take it back.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use crate::journal::Journal;

/// The journal's size (written once when created): about 120 write-back
/// closes between checkpoints (a 2 MiB one, checkpointing four times as
/// often, made write-back creates 5-10 % slower).
pub(crate) const CAPACITY: u64 = 8 << 20;

/// A journal is made only on a cache file system with this much free: on
/// a small one its space would be taken from the index and the containers
/// (which then fail for lack of space sooner); there, as on a full one, the
/// index syncs itself, as before the journal.
const FREE_TO_CREATE: u64 = 4 * CAPACITY;

/// Most bytes of writes one record carries; more written between two
/// syncs and the sync is a checkpoint instead.
const RECORD_MAX: usize = (CAPACITY / 4) as usize;

const OP_WRITE: u8 = 1;
const OP_SET_LEN: u8 = 2;

/// The journal's file for the index file at `index`.
pub(crate) fn path(index: &Path) -> PathBuf {
    index.with_extension("journal")
}

/// The writes since the last sync, encoded as the next record will hold
/// them.
#[derive(Default)]
struct Pending {
    ops: Vec<u8>,
    /// More than `RECORD_MAX` was written: the next sync checkpoints.
    overflowed: bool,
}

/// Which index file a record was written for: its inode number and birth
/// time. A record of another file (the index was deleted and made again,
/// or put back from elsewhere) is never replayed over this one.
type FileId = [u8; 20];

/// The journal of one opening of the index file.
pub(crate) struct PageLog {
    /// The index file's identity, at the head of every record.
    id: FileId,
    pending: Mutex<Pending>,
    /// Taken out while it writes or syncs (no lock held across an fsync;
    /// redb makes one sync at a time: its commits are serialised).
    journal: Mutex<Option<Journal>>,
}

impl std::fmt::Debug for PageLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PageLog")
    }
}

impl PageLog {
    /// Open (creating) the journal of the index file `index`, whose open
    /// descriptor is `file`, and apply what it holds to the file (synced,
    /// then the journal reset). `Ok(None)`: no journal could be created
    /// (a full disk) and none exists: the index syncs itself, as before.
    /// The caller holds the index's lock (`index_file::lock`): nothing else
    /// writes the file meanwhile.
    pub(crate) fn open(index: &Path, file: &File) -> io::Result<Option<PageLog>> {
        let jpath = path(index);
        let existed = jpath.exists();
        if !existed && free_bytes(&jpath).is_some_and(|f| f < FREE_TO_CREATE) {
            return Ok(None);
        }
        let (mut journal, records) = match Journal::open(&jpath, CAPACITY) {
            Ok(v) => v,
            Err(e) if !existed => {
                // Never written: nothing to replay, and the index file is
                // synced by itself.
                let _ = std::fs::remove_file(jpath.with_extension("new"));
                log_no_journal(&e);
                return Ok(None);
            }
            Err(e) => return Err(io::Error::other(format!("{e}"))),
        };
        let id = file_id(file)?;
        if !records.is_empty() {
            let applied = replay(file, &id, &records)?;
            if applied < records.len() {
                eprintln!(
                    "coda client: {} of the index journal's records were written for another \
                     index file and are not applied",
                    records.len() - applied
                );
            }
            file.sync_data()?;
            journal
                .reset()
                .map_err(|e| io::Error::other(format!("{e}")))?;
        }
        Ok(Some(PageLog {
            id,
            pending: Mutex::new(Pending::default()),
            journal: Mutex::new(Some(journal)),
        }))
    }

    /// Note a write the index file is being given (call before or under
    /// the same order as the write itself).
    pub(crate) fn record_write(&self, offset: u64, data: &[u8]) {
        let mut p = self.pending.lock();
        if p.overflowed {
            return;
        }
        if p.ops.len() + data.len() + 13 > RECORD_MAX || data.len() > u32::MAX as usize {
            p.overflowed = true;
            p.ops = Vec::new();
            return;
        }
        p.ops.push(OP_WRITE);
        p.ops.extend_from_slice(&offset.to_le_bytes());
        p.ops.extend_from_slice(&(data.len() as u32).to_le_bytes());
        p.ops.extend_from_slice(data);
    }

    /// Note a change of the index file's length.
    pub(crate) fn record_set_len(&self, len: u64) {
        let mut p = self.pending.lock();
        if p.overflowed {
            return;
        }
        p.ops.push(OP_SET_LEN);
        p.ops.extend_from_slice(&len.to_le_bytes());
    }

    /// Make every write noted so far durable: one journal record and one
    /// sync of the journal, or a checkpoint (`sync_file` syncs the index
    /// file itself) when the writes do not fit a record or the journal.
    pub(crate) fn sync(&self, sync_file: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let pending = std::mem::take(&mut *self.pending.lock());
        let Some(mut journal) = self.journal.lock().take() else {
            // Another sync holds it (redb makes none at once) or it went
            // away after a failure: this index opening is to be reopened.
            return Err(io::Error::other("the index journal is busy or gone"));
        };
        let r = (|| {
            if pending.overflowed || !journal.fits(self.id.len() + pending.ops.len()) {
                return checkpoint(&mut journal, sync_file);
            }
            if pending.ops.is_empty() {
                return Ok(());
            }
            let mut rec = Vec::with_capacity(self.id.len() + pending.ops.len());
            rec.extend_from_slice(&self.id);
            rec.extend_from_slice(&pending.ops);
            journal
                .append(&rec)
                .and_then(|()| journal.sync())
                .map_err(|e| io::Error::other(format!("{e}")))
        })();
        if r.is_ok() {
            *self.journal.lock() = Some(journal);
        }
        r
    }

    /// At a clean close: the index file synced and the journal emptied, so
    /// the next opening replays nothing.
    pub(crate) fn close(&self, sync_file: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let Some(mut journal) = self.journal.lock().take() else {
            return Ok(());
        };
        *self.pending.lock() = Pending::default();
        let r = if journal.records() > 0 {
            checkpoint(&mut journal, sync_file)
        } else {
            Ok(())
        };
        *self.journal.lock() = Some(journal);
        r
    }
}

/// The index file synced (everything written to it so far durable), then
/// the journal started again.
fn checkpoint(journal: &mut Journal, sync_file: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
    sync_file()?;
    journal
        .reset()
        .map_err(|e| io::Error::other(format!("{e}")))
}

/// `file`'s identity (`FileId`): inode number and birth time (zero where
/// the file system keeps none).
fn file_id(file: &File) -> io::Result<FileId> {
    use std::os::fd::AsRawFd;
    // SAFETY: a zeroed plain C struct filled by the call; the path is the
    // empty C string with AT_EMPTY_PATH, naming the open descriptor.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_INO | libc::STATX_BTIME,
            &mut st,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut id = [0u8; 20];
    id[..8].copy_from_slice(&st.stx_ino.to_le_bytes());
    if st.stx_mask & libc::STATX_BTIME != 0 {
        id[8..16].copy_from_slice(&st.stx_btime.tv_sec.to_le_bytes());
        id[16..].copy_from_slice(&st.stx_btime.tv_nsec.to_le_bytes());
    }
    Ok(id)
}

/// Apply `records` (each the writes of one sync, in order) to `file`,
/// whose identity is `id`; stops at the first record written for another
/// file. Returns how many were applied.
fn replay(file: &File, id: &FileId, records: &[Vec<u8>]) -> io::Result<usize> {
    let bad = || io::Error::other("the index journal holds a malformed record");
    for (n, rec) in records.iter().enumerate() {
        if rec.get(..id.len()) != Some(&id[..]) {
            return Ok(n);
        }
        let mut r = &rec[id.len()..];
        while let Some((&op, rest)) = r.split_first() {
            r = rest;
            match op {
                OP_WRITE => {
                    if r.len() < 12 {
                        return Err(bad());
                    }
                    let offset = u64::from_le_bytes(r[..8].try_into().expect("8"));
                    let len = u32::from_le_bytes(r[8..12].try_into().expect("4")) as usize;
                    r = &r[12..];
                    if r.len() < len {
                        return Err(bad());
                    }
                    file.write_all_at(&r[..len], offset)?;
                    r = &r[len..];
                }
                OP_SET_LEN => {
                    if r.len() < 8 {
                        return Err(bad());
                    }
                    file.set_len(u64::from_le_bytes(r[..8].try_into().expect("8")))?;
                    r = &r[8..];
                }
                _ => return Err(bad()),
            }
        }
    }
    Ok(records.len())
}

/// Bytes free for an unprivileged user on the file system holding `p`'s
/// directory (None: unknown).
fn free_bytes(p: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let dir = p.parent().filter(|d| !d.as_os_str().is_empty())?;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: a zeroed plain C struct, filled by the call from a valid path.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    Some(s.f_bavail as u64 * s.f_frsize as u64)
}

fn log_no_journal(e: &crate::Error) {
    eprintln!(
        "coda client: the index runs without its journal (each sync writes the index file): {e}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// A fresh directory holding file `f` with `content`, open for writing.
    fn scratch(tag: &str, content: &[u8]) -> (PathBuf, PathBuf, File) {
        let dir = std::env::temp_dir().join(format!("coda-page-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("f");
        std::fs::write(&f, content).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&f)
            .unwrap();
        (dir, f, file)
    }

    fn records(log: &PageLog) -> u64 {
        log.journal.lock().as_ref().expect("journal").records()
    }

    /// A sync is a record while the writes fit; more written between two
    /// syncs than a record holds, or a record the journal has no room
    /// for, is a checkpoint: the file synced, the journal emptied.
    #[test]
    fn writes_too_many_for_a_record_or_the_journal_make_a_checkpoint() {
        let (dir, f, file) = scratch("checkpoint", b"");
        let log = PageLog::open(&f, &file)
            .unwrap()
            .expect("room for a journal");
        let file_syncs = Cell::new(0);
        let sync_file = || {
            file_syncs.set(file_syncs.get() + 1);
            Ok(())
        };
        log.record_write(0, b"a");
        log.sync(sync_file).unwrap();
        assert_eq!((records(&log), file_syncs.get()), (1, 0), "a record");
        log.sync(sync_file).unwrap();
        assert_eq!((records(&log), file_syncs.get()), (1, 0), "nothing new");
        log.record_write(0, &vec![1; RECORD_MAX]);
        log.sync(sync_file).unwrap();
        assert_eq!((records(&log), file_syncs.get()), (0, 1), "overflowed");
        let big = vec![2; RECORD_MAX - 100];
        let mut n = 0;
        while file_syncs.get() == 1 {
            log.record_write(0, &big);
            log.sync(sync_file).unwrap();
            n += 1;
            assert!(
                n <= CAPACITY as usize / big.len(),
                "the journal never filled"
            );
        }
        assert_eq!(records(&log), 0, "the record that did not fit checkpointed");
        // Each record: a frame head, the file id, one write's head, the data.
        use crate::journal::{FRAME_HEAD, HEADER_LEN};
        let frame = FRAME_HEAD as usize + 20 + 13 + big.len();
        let fit = (CAPACITY - HEADER_LEN - FRAME_HEAD) as usize / frame;
        assert!(fit >= 2);
        assert_eq!(n, fit + 1, "the journal took records until one did not fit");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// After a journal sync fails, no later sync of that opening succeeds
    /// (not even a checkpoint): its commits fail until the index is opened
    /// again, and that opening starts from a journal it replayed and reset.
    #[test]
    fn a_failed_journal_sync_fails_every_later_sync_until_reopened() {
        let (dir, f, file) = scratch("failed", b"0123");
        let log = PageLog::open(&f, &file)
            .unwrap()
            .expect("room for a journal");
        log.record_write(0, b"ab");
        log.journal.lock().as_mut().unwrap().fail_next_sync();
        assert!(log.sync(|| Ok(())).is_err());
        log.record_write(0, &vec![1; RECORD_MAX]);
        assert!(
            log.sync(|| Ok(())).is_err(),
            "a checkpoint after the failure"
        );
        log.record_write(0, b"cd");
        assert!(log.sync(|| Ok(())).is_err());
        drop(log);
        let log = PageLog::open(&f, &file)
            .unwrap()
            .expect("the journal is there");
        assert_eq!(records(&log), 0, "replayed and reset at the opening");
        log.record_write(0, b"ef");
        log.sync(|| Ok(())).unwrap();
        assert_eq!(records(&log), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn records_replay_in_order_and_lengths_follow() {
        let (dir, f, file) = scratch("replay", b"0123456789");
        let id = file_id(&file).unwrap();
        let log = PageLog {
            id,
            pending: Mutex::new(Pending::default()),
            journal: Mutex::new(None),
        };
        let take = || [&id[..], &std::mem::take(&mut log.pending.lock().ops)].concat();
        log.record_write(2, b"ab");
        log.record_set_len(20);
        log.record_write(2, b"cd");
        log.record_write(15, b"xyz");
        let first = take();
        log.record_set_len(16);
        let second = take();
        log.record_write(0, b"!");
        let mut other = take();
        other[0] ^= 1; // written for another file
        assert_eq!(replay(&file, &id, &[first, second, other]).unwrap(), 2);
        assert_eq!(std::fs::read(&f).unwrap(), b"01cd456789\0\0\0\0\0x");
        let with_id = |ops: &[u8]| [&id[..], ops].concat();
        assert!(replay(&file, &id, &[with_id(&[OP_WRITE, 1, 2])]).is_err());
        assert!(replay(&file, &id, &[with_id(&[9])]).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
