//! The client index's file as redb sees it (`IndexFile`): redb's own file
//! backend, which also notes that a call on the file failed (`Opened`) and
//! the OS error of the last one that did (`LastError`).
//!
//! Why: after one failed call redb refuses every later use of the database
//! with "Previous I/O error occurred" and no cause, until it is opened
//! again. The failure is often not the caller's own (the index thread's
//! round, the reintegrator's turn), and a transaction waiting for redb's
//! write lock gets it before the failing thread has even returned to say
//! so. The backend sees the error first, before redb releases that lock: a
//! transaction that begins after it can tell that the file must be opened
//! again first, and a refusal can say what happened (a full cache disk
//! stays ENOSPC).

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;

use redb::backends::FileBackend;
use redb::{BackendError, Database, StorageBackend};

use super::page_journal::PageLog;

/// The OS error (errno) of the last failed call on an index file; 0 for
/// none. Shared by every file the index opens: it outlives a reopen, since
/// a transaction begun before the reopen may be refused after it.
#[derive(Debug, Default)]
pub(crate) struct LastError(AtomicI32);

impl LastError {
    pub(crate) fn get(&self) -> Option<i32> {
        match self.0.load(Ordering::Acquire) {
            0 => None,
            code => Some(code),
        }
    }

    #[cfg(test)]
    pub(crate) fn note_for_test(&self, code: i32) {
        self.0.store(code, Ordering::Release);
    }

    fn note(&self, e: &io::Error) {
        // An error without an errno (a short write) is still an I/O error.
        let code = e.raw_os_error().unwrap_or(libc::EIO);
        self.0.store(code, Ordering::Release);
    }
}

/// One opening of the index file: redb's database on it, and whether a
/// call on the file has failed since it was opened (redb then refuses
/// every later use of this `db`).
pub(crate) struct Opened {
    pub(crate) db: Database,
    broken: Arc<AtomicBool>,
}

impl Opened {
    /// Open (creating) the index file at `path` as redb's `Database::create`
    /// does; failures are noted in `last`. A file another client holds
    /// fails with `DatabaseAlreadyOpen`.
    pub(crate) fn open(
        path: &Path,
        last: &Arc<LastError>,
    ) -> std::result::Result<Opened, redb::DatabaseError> {
        // An index written by an earlier coda (redb 2) is converted first.
        crate::redb_upgrade::upgraded(path, &[], || Opened::open_current(path, last))
    }

    fn open_current(
        path: &Path,
        last: &Arc<LastError>,
    ) -> std::result::Result<Opened, redb::DatabaseError> {
        // Before the journal is read: another opening (another client on
        // this cache, or this one's earlier opening not yet dropped) may be
        // writing the file.
        let lock = lock(path)?;
        let file: File = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let pages = PageLog::open(path, &file)?;
        let broken = Arc::new(AtomicBool::new(false));
        let file = IndexFile {
            file: FileBackend::new(file)?,
            broken: Arc::clone(&broken),
            last: Arc::clone(last),
            pages,
            _lock: Some(lock),
        };
        let db = redb::Builder::new().create_with_backend(file)?;
        Ok(Opened { db, broken })
    }

    /// A call on the file failed since it was opened: open it again.
    pub(crate) fn broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    #[cfg(test)]
    pub(crate) fn break_for_test(&self) {
        self.broken.store(true, Ordering::Release);
    }
}

/// The lock of one opening of the index at `index` (`index.lock` beside
/// it, `flock`ed for as long as the opening lives): taken before its journal
/// is replayed, which writes the index file. Held elsewhere:
/// `DatabaseAlreadyOpen`, as redb says of its own lock, taken later.
fn lock(index: &Path) -> std::result::Result<File, redb::DatabaseError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(index.with_extension("lock"))?;
    // SAFETY: a plain system call on an open descriptor.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            redb::DatabaseError::DatabaseAlreadyOpen
        } else {
            e.into()
        });
    }
    Ok(f)
}

#[derive(Debug)]
struct IndexFile {
    file: FileBackend,
    broken: Arc<AtomicBool>,
    last: Arc<LastError>,
    /// The index's journal of page writes (`page_journal.rs`); None: there
    /// is none, and a sync is an `fdatasync` of the file.
    pages: Option<PageLog>,
    /// The opening's lock (`lock`), released when redb drops the backend.
    _lock: Option<File>,
}

impl IndexFile {
    fn watch<T>(&self, r: io::Result<T>) -> io::Result<T> {
        if let Err(e) = &r {
            self.last.note(e);
            self.broken.store(true, Ordering::Release);
        }
        r
    }
}

// The I/O calls are watched; the lock calls (how redb keeps a second
// client off this cache) and `close` go to redb's file backend unchanged.
impl StorageBackend for IndexFile {
    fn len(&self) -> io::Result<u64> {
        self.watch(self.file.len())
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.watch(self.file.read(offset, out))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if let Some(p) = &self.pages {
            p.record_set_len(len);
        }
        self.watch(self.file.set_len(len))
    }

    fn sync_data(&self) -> io::Result<()> {
        match &self.pages {
            Some(p) => self.watch(p.sync(|| self.file.sync_data())),
            None => self.watch(self.file.sync_data()),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        // Noted first: a sync that starts once this write returned finds it.
        if let Some(p) = &self.pages {
            p.record_write(offset, data);
        }
        self.watch(self.file.write(offset, data))
    }

    fn close(&self) -> io::Result<()> {
        if let Some(p) = &self.pages {
            // Best effort: what is not checkpointed is replayed at the next
            // opening.
            let _ = p.close(|| self.file.sync_data());
        }
        self.file.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.file.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.file.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.file.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.file.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.file.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.file.query_lock_range(start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call that fails is remembered by its errno, and a later success
    /// does not erase it (a refusal may come after).
    #[test]
    fn a_failed_call_is_remembered_by_its_errno() {
        let dir = std::env::temp_dir().join(format!("coda-index-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("index.redb");
        std::fs::write(&path, b"0123456789").unwrap();
        let last = Arc::new(LastError::default());
        // A read-only descriptor: writes fail with EBADF.
        let broken = Arc::new(AtomicBool::new(false));
        let ro = IndexFile {
            file: FileBackend::new(File::open(&path).unwrap()).unwrap(),
            broken: Arc::clone(&broken),
            last: Arc::clone(&last),
            pages: None,
            _lock: None,
        };
        assert_eq!(last.get(), None);
        assert!(!broken.load(Ordering::Acquire));
        let mut head = [0u8; 4];
        ro.read(0, &mut head).unwrap();
        assert_eq!(&head, b"0123");
        assert!(ro.write(0, b"x").is_err());
        assert_eq!(last.get(), Some(libc::EBADF));
        assert!(broken.load(Ordering::Acquire), "this opening is broken");
        assert_eq!(ro.len().unwrap(), 10);
        assert_eq!(last.get(), Some(libc::EBADF), "kept after a success");
        drop(ro);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Durable commits after the index file was last synced survive a
    /// crash through the journal alone (the file as it was at the last
    /// checkpoint, the journal as written); a journal left by an index
    /// file that is gone is not applied to a new one; a second opening of
    /// a held index is refused before its journal is touched.
    #[test]
    fn commits_since_the_last_checkpoint_come_back_from_the_journal() {
        use redb::{ReadableDatabase, ReadableTable, TableDefinition};
        use std::os::unix::fs::FileExt;
        const T: TableDefinition<u64, u64> = TableDefinition::new("t");
        let dir = std::env::temp_dir().join(format!("coda-index-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("index.redb");
        let jpath = super::super::page_journal::path(&path);
        let last = Arc::new(LastError::default());
        let put = |o: &Opened, k: u64| {
            let w = o.db.begin_write().unwrap();
            w.open_table(T).unwrap().insert(k, k * 10).unwrap();
            w.commit().unwrap();
        };
        let keys = |o: &Opened| -> Vec<u64> {
            let r = o.db.begin_read().unwrap();
            match r.open_table(T) {
                Ok(t) => t.iter().unwrap().map(|e| e.unwrap().0.value()).collect(),
                Err(redb::TableError::TableDoesNotExist(_)) => Vec::new(),
                Err(e) => panic!("{e}"),
            }
        };
        // A crash after the commits made through `opened`: the index file
        // back to `synced` in place (the same file), the journal as it was.
        let crash = |opened: Opened, synced: &[u8]| {
            let journal = std::fs::read(&jpath).unwrap();
            drop(opened); // its clean close would checkpoint: undone below
            let f = OpenOptions::new().write(true).open(&path).unwrap();
            f.set_len(synced.len() as u64).unwrap();
            f.write_all_at(synced, 0).unwrap();
            std::fs::write(&jpath, journal).unwrap();
        };
        let opened = Opened::open(&path, &last).unwrap();
        put(&opened, 1);
        drop(opened); // a clean close: checkpointed, the journal empty
        let synced = std::fs::read(&path).unwrap();
        let opened = Opened::open(&path, &last).unwrap();
        assert!(matches!(
            Opened::open(&path, &last),
            Err(redb::DatabaseError::DatabaseAlreadyOpen)
        ));
        for k in 2..=40 {
            put(&opened, k);
        }
        crash(opened, &synced);
        let o = Opened::open(&path, &last).unwrap();
        assert_eq!(keys(&o), (1..=40).collect::<Vec<_>>());
        drop(o);

        // The index file lost after a crash: its journal is not applied
        // to the new, empty one, which opens empty.
        let synced = std::fs::read(&path).unwrap();
        let opened = Opened::open(&path, &last).unwrap();
        put(&opened, 41);
        crash(opened, &synced);
        std::fs::remove_file(&path).unwrap();
        let o = Opened::open(&path, &last).unwrap();
        assert_eq!(keys(&o), Vec::<u64>::new());
        drop(o);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// An index written by redb 2.6 (an earlier coda: its log may hold
    /// acknowledged changes not yet sent) opens with every row, and a file
    /// open in one client is refused to a second (`DatabaseAlreadyOpen`,
    /// "cache_dir in use").
    #[test]
    fn an_index_written_by_redb_2_opens_with_its_log() {
        use redb::ReadableDatabase;
        let dir = std::env::temp_dir().join(format!("coda-index-old-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("index.redb");
        {
            let db = redb2::Database::create(&path).unwrap();
            let w = db.begin_write().unwrap();
            {
                let cml: redb2::TableDefinition<u64, &[u8]> = redb2::TableDefinition::new("cml");
                let mut t = w.open_table(cml).unwrap();
                t.insert(7, &b"a logged store"[..]).unwrap();
                let meta: redb2::TableDefinition<&str, u64> = redb2::TableDefinition::new("meta");
                w.open_table(meta)
                    .unwrap()
                    .insert("next_store_id", 8)
                    .unwrap();
            }
            w.commit().unwrap();
        }
        let last = Arc::new(LastError::default());
        let opened = Opened::open(&path, &last).unwrap();
        let r = opened.db.begin_read().unwrap();
        let cml = r.open_table(crate::client::tables::CML).unwrap();
        assert_eq!(cml.get(7).unwrap().unwrap().value(), b"a logged store");
        let meta = r.open_table(crate::client::tables::META).unwrap();
        assert_eq!(meta.get("next_store_id").unwrap().unwrap().value(), 8);
        drop((cml, meta, r));
        assert!(matches!(
            Opened::open(&path, &last),
            Err(redb::DatabaseError::DatabaseAlreadyOpen)
        ));
        assert_eq!(last.get(), None, "no failed call");
        drop(opened);
        drop(Opened::open(&path, &last).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
