//! The volume store: the data directory opened for serving. Read-side
//! operations (attrs, directory pages, data for a fetch), fid reservation and
//! users live here; the one mutation path is in `reintegrate.rs`.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use parking_lot::{RwLock, RwLockReadGuard};
use redb::{Database, ReadableDatabase, ReadableTable};

use super::log;
use super::meta::*;
use super::objects;
use crate::error::{WireCode, METADATA_IO};
use crate::proto::{Attr, DirEntry, Fid, FileType, Timespec, MAX_DIR_PAGE};
use crate::{Error, Result};

pub type ClientId = [u8; 16];

/// Most vnodes one AllocFids may reserve.
pub const MAX_ALLOC: u32 = 4096;

/// Largest file the server stores unless configured otherwise (4 GiB): a
/// Store or truncate past it is refused with `Invalid` (EFBIG-like).
pub const DEFAULT_MAX_FILE_SIZE: u64 = 4 << 30;

pub struct VolumeStore {
    /// The open metadata store, swapped for a fresh handle after an I/O
    /// failure (see [`VolumeStore::with_db`]).
    db: RwLock<DbSlot>,
    pub(crate) root: PathBuf,
    server_id: [u8; 16],
    pub(crate) max_file_size: u64,
    /// Batches waiting for the next shared commit (`reintegrate.rs`).
    pub(crate) group: super::reintegrate::GroupCommit,
    /// Cached identities for the rights checks (`acl.rs`).
    pub(crate) access: super::acl::AccessState,
    /// The commit journal of a lone server (`wal.rs`).
    pub(crate) wal: super::wal::Wal,
}

/// The metadata store handle and how many times it was (re)opened, so
/// that of several threads that saw one failure only the first reopens.
/// `None` while a reopen failed (disk still full): the next request tries
/// again.
struct DbSlot {
    db: Option<Database>,
    gen: u64,
}

/// A request's error type that carries an [`Error`] (so `with_db` can see
/// a storage failure and make its message clear).
pub(crate) trait CarriesError {
    fn error_mut(&mut self) -> &mut Error;
}

impl CarriesError for Error {
    fn error_mut(&mut self) -> &mut Error {
        self
    }
}

/// An I/O failure inside redb: after one, redb refuses every later write
/// ("Previous I/O error") until the database is closed and reopened.
pub(crate) fn is_store_failure(e: &Error) -> bool {
    matches!(e, Error::Io { context, .. } if context == METADATA_IO)
}

/// Whether `e` is a full disk (or a file-system quota of the server's own
/// user).
pub(crate) fn is_out_of_space(e: &Error) -> bool {
    match e {
        Error::Io { source, .. } => {
            matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
        }
        Error::NoSpace(_) => true,
        _ => false,
    }
}

/// A full disk (or a file-system quota of the server's own user) becomes a
/// clear `NoSpace` that names no server path; anything else is unchanged.
pub(crate) fn clear_space_error(e: Error) -> Error {
    match &e {
        Error::Io { .. } if is_out_of_space(&e) => {
            Error::NoSpace("the server's disk is full; retry when space is freed".into())
        }
        _ => e,
    }
}

/// What a fetch streams: an open object file (read without any lock held,
/// since the file under that name never changes), or small bytes.
pub enum FetchData {
    File(File, u64),
    Bytes(Vec<u8>),
}

pub fn db_path(root: &Path) -> PathBuf {
    root.join("meta.redb")
}

pub(crate) fn get_object<T: ReadableTable<&'static [u8; 16], &'static [u8]>>(
    table: &T,
    fid: Fid,
) -> Result<Option<ObjectRec>> {
    match table.get(&fid.to_bytes())? {
        Some(v) => Ok(Some(ObjectRec::decode(v.value())?)),
        None => Ok(None),
    }
}

/// The content of small file `rec` (its row in `SMALL_DATA`), in a read
/// transaction. A data directory from before small files has no such
/// table: then no file is small.
pub(crate) fn read_small(txn: &redb::ReadTransaction, rec: &ObjectRec) -> Result<Vec<u8>> {
    let fid = rec.attr.fid;
    let row = match txn.open_table(SMALL_DATA) {
        Ok(t) => t.get(&fid.to_bytes())?.map(|v| v.value().to_vec()),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(e.into()),
    };
    check_small(rec, row)
}

/// A small file's row checked against its record: a file whose record
/// says it holds bytes must have them, all of them.
pub(crate) fn check_small(rec: &ObjectRec, row: Option<Vec<u8>>) -> Result<Vec<u8>> {
    let data = row.unwrap_or_default();
    if data.len() as u64 != rec.attr.size {
        return Err(Error::Eio(format!(
            "{} has size {} but {} bytes of small data",
            rec.attr.fid,
            rec.attr.size,
            data.len()
        )));
    }
    Ok(data)
}

pub(crate) fn stale(fid: Fid) -> Error {
    Error::Stale(format!("no object {fid}"))
}

impl Drop for VolumeStore {
    fn drop(&mut self) {
        // A clean close: everything durable in redb, the journal empty,
        // so the next open has nothing to replay.
        if self.wal.journal.lock().is_some() {
            self.checkpoint();
        }
    }
}

impl VolumeStore {
    /// Create a data directory with the root volume and one user; returns the
    /// path of the user's secret file.
    pub fn init(root: &Path, user: &str) -> Result<PathBuf> {
        check_user(user)?;
        if db_path(root).exists() {
            return Err(Error::Exists(format!(
                "{} already holds a coda server",
                root.display()
            )));
        }
        crate::fsmode::create_private_dir(root)?;
        // A directory the operator made beforehand is made private too.
        fs::set_permissions(root, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(|e| Error::io(format!("chmod 700 {}", root.display()), e))?;
        fs::create_dir_all(objects::objects_dir(root, ROOT_VOLUME))
            .map_err(|e| Error::io("create objects directory", e))?;
        fs::create_dir_all(objects::staging_dir(root))
            .map_err(|e| Error::io("create staging directory", e))?;
        // meta.redb holds every user's secret: 0600 from its first byte.
        crate::fsmode::precreate_private_file(&db_path(root))?;
        let db = Database::create(db_path(root))?;
        let now = Timespec::now();
        let txn = db.begin_write()?;
        {
            let root_rec = ObjectRec {
                attr: Attr {
                    fid: ROOT_FID,
                    ftype: FileType::Dir,
                    mode: 0o755,
                    nlink: 2,
                    size: 0,
                    mtime: now,
                    ctime: now,
                    version: 1,
                    // Whoever ran `init` owns the root (plain POSIX metadata).
                    // SAFETY: plain getters without preconditions.
                    uid: unsafe { libc::geteuid() },
                    gid: unsafe { libc::getegid() },
                    atime: now,
                    rdev: 0,
                },
                dv: 0,
                has_file: false,
                parent: ROOT_FID,
                target: String::new(),
                xattrs: Vec::new(),
            };
            txn.open_table(OBJECTS)?
                .insert(&ROOT_FID.to_bytes(), root_rec.encode().as_slice())?;
            txn.open_table(DIRENTS)?;
            txn.open_table(VOLUMES)?
                .insert(ROOT_VOLUME, ROOT_FID.vnode + 1)?;
            txn.open_table(CLIENT_STORE)?;
            txn.open_table(CLIENT_OWNERS)?;
            txn.open_table(RESERVED)?;
            txn.open_table(GRAVES)?;
            txn.open_table(SMALL_DATA)?;
            txn.open_table(USERS)?;
            let mut settings = txn.open_table(SETTINGS)?;
            let id: [u8; 16] = crate::proto::auth::random_bytes();
            settings.insert(SERVER_ID_KEY, id.as_slice())?;
            settings.insert(ROOT_KEY, ROOT_FID.to_bytes().as_slice())?;
            // A new store has no owner row written outside a group's log.
            settings.insert(
                super::replication::machine::OWNERS_LOGGED_KEY,
                [1u8].as_slice(),
            )?;
        }
        txn.commit()?;
        // Root's default list; the init user is the first administrator.
        super::acl::migrate(&db)?;
        let path = add_user_to(&db, root, user)?;
        super::acl::group_add(&db, crate::proto::acl::ADMINISTRATORS, &[user.to_string()])?;
        Ok(path)
    }

    /// Add a user to an existing data directory (the server may be stopped).
    pub fn add_user(root: &Path, user: &str) -> Result<PathBuf> {
        check_user(user)?;
        super::wal::settle(root)?;
        let db = open_db(root)?;
        super::acl::migrate(&db)?;
        add_user_to(&db, root, user)
    }

    /// Open a data directory for serving, removing leftovers of a crash:
    /// staged uploads and object files no committed record points to.
    /// `max_file_size` bounds the size a Store or truncate may set.
    pub fn open(root: &Path, max_file_size: u64) -> Result<VolumeStore> {
        secure_data_dir(root)?;
        let db = open_db(root)?;
        ensure_usage(&db)?;
        super::acl::migrate(&db)?;
        let server_id = {
            let txn = db.begin_read()?;
            let settings = txn.open_table(SETTINGS)?;
            let v = settings
                .get(SERVER_ID_KEY)?
                .ok_or_else(|| Error::Eio("metadata has no server id".into()))?;
            v.value()
                .try_into()
                .map_err(|_| Error::Eio("metadata server id is not 16 bytes".into()))?
        };
        let store = VolumeStore {
            db: RwLock::new(DbSlot { db: None, gen: 1 }),
            root: root.to_path_buf(),
            server_id,
            max_file_size,
            group: super::reintegrate::GroupCommit::from_env(),
            access: Default::default(),
            wal: super::wal::Wal::new(super::wal::wanted(root)),
        };
        // What the journal holds beyond redb's last durable commit is
        // applied before anything reads the store.
        let db = store.replayed(db)?;
        store.db.write().db = Some(db);
        objects::clear_staging(root)?;
        store.sweep_objects()?;
        Ok(store)
    }

    /// Delete object files that committed metadata does not reference: the
    /// new file of a batch that crashed before its commit, or the old file of
    /// one that crashed after its commit but before the cleanup.
    fn sweep_objects(&self) -> Result<()> {
        self.with_db(|db| self.sweep_objects_in(db))
    }

    fn sweep_objects_in(&self, db: &Database) -> Result<()> {
        let txn = db.begin_read()?;
        let table = txn.open_table(OBJECTS)?;
        let mut removed = 0;
        for (path, parsed) in objects::list_object_files(&self.root)? {
            let keep = match parsed {
                Some((fid, dv)) => match get_object(&table, fid)? {
                    Some(rec) => rec.has_file && rec.dv == dv,
                    None => false,
                },
                None => false,
            };
            if !keep {
                objects::remove_quietly(&path);
                removed += 1;
            }
        }
        if removed > 0 {
            super::log::info(format_args!("removed {removed} unreferenced object files"));
        }
        Ok(())
    }

    /// Run `f` on the metadata store. Concurrent requests share the handle
    /// (read lock); after `f` hits an I/O failure of the store, the handle
    /// is dropped and the database reopened (redb recovers from its last
    /// commit), so only the request that hit the failure fails, and the
    /// next one works as soon as the disk has room again. The failed
    /// request's error becomes a clear `NoSpace` when the disk was full.
    ///
    /// A request refused only because of an EARLIER failure (redb's
    /// "previous I/O error", seen by a request that raced the failing one)
    /// is run once more on the reopened store: it did nothing the first
    /// time.
    pub(crate) fn with_db<T, E: CarriesError + From<Error>>(
        &self,
        f: impl Fn(&Database) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let guard = self.read_db()?;
            let gen = guard.gen;
            let db = guard.db.as_ref().expect("read_db returns an open store");
            let result = f(db);
            drop(guard);
            let mut e = match result {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let err = e.error_mut();
            if is_store_failure(err) {
                if !err.is_previous_io() {
                    log::warn(format_args!("metadata store failed: {err}; reopening it"));
                }
                let reopened = self.reopen(gen).is_ok();
                if err.is_previous_io() && reopened && attempt < 2 {
                    continue;
                }
            }
            let taken = std::mem::replace(err, Error::Eio(String::new()));
            *err = clear_space_error(taken);
            return Err(e);
        }
    }

    /// A read guard on an open store, reopening it first if an earlier
    /// reopen failed. Bounded: two attempts, then the open error.
    fn read_db(&self) -> Result<RwLockReadGuard<'_, DbSlot>> {
        let mut last = None;
        for _ in 0..2 {
            let g = self.db.read();
            if g.db.is_some() {
                return Ok(g);
            }
            let gen = g.gen;
            drop(g);
            if let Err(e) = self.reopen(gen) {
                last = Some(e);
            }
        }
        Err(clear_space_error(last.unwrap_or_else(|| {
            Error::Eio("metadata store unavailable".into())
        })))
    }

    /// Drop the store handle seen at generation `seen` and open it again,
    /// unless another thread already did. Holds the write lock throughout:
    /// redb locks the file, so the old handle (and every transaction on
    /// it) must be gone before the new open.
    fn reopen(&self, seen: u64) -> Result<()> {
        let mut g = self.db.write();
        if g.gen != seen && g.db.is_some() {
            return Ok(());
        }
        g.db = None;
        g.gen += 1;
        // Redb comes back at its last durable commit: the journaled
        // commits after it are applied again first.
        let opened = open_db(&self.root).and_then(|db| self.replayed(db));
        match opened {
            Ok(db) => {
                log::info(format_args!("metadata store reopened"));
                g.db = Some(db);
                Ok(())
            }
            Err(e) => {
                log::warn(format_args!("cannot reopen the metadata store yet: {e}"));
                Err(e)
            }
        }
    }

    /// `db`, just opened, with the journal's groups applied again and, if
    /// the disk has room, checkpointed. On a full disk the checkpoint
    /// fails, and redb refuses every transaction after that: the store is
    /// opened once more and the groups applied without one, so reads and
    /// journaled changes go on while the journal holds them durably.
    fn replayed(&self, db: Database) -> Result<Database> {
        match self.replay_in(&db, true) {
            Ok(()) => return Ok(db),
            Err(e) if is_out_of_space(&e) => {
                log::warn(format_args!(
                    "no checkpoint of the commit journal ({e}): it keeps its groups until \
                     the disk has room"
                ));
            }
            Err(e) => return Err(e),
        }
        // redb holds its file's lock until the handle is gone.
        drop(db);
        let db = open_db(&self.root)?;
        self.replay_in(&db, false)?;
        Ok(db)
    }

    pub fn server_id(&self) -> [u8; 16] {
        self.server_id
    }

    pub fn root_fid(&self) -> Fid {
        ROOT_FID
    }

    pub fn user_secret(&self, user: &str) -> Result<Option<[u8; 32]>> {
        self.with_db(|db| {
            let txn = db.begin_read()?;
            let users = txn.open_table(USERS)?;
            let secret = users.get(user)?.map(|v| *v.value());
            if secret.is_none() && user == crate::proto::acl::ANONYMOUS {
                let on = txn.open_table(SETTINGS)?.get(ANONYMOUS_KEY)?;
                if on.is_some_and(|v| v.value() == [1]) {
                    return Ok(Some(super::acl::ANONYMOUS_SECRET));
                }
            }
            Ok(secret)
        })
    }

    /// Attrs of many fids from one consistent snapshot.
    pub fn get_attrs(&self, fids: &[Fid]) -> Result<Vec<std::result::Result<Attr, WireCode>>> {
        self.with_db(|db| get_attrs_in(db, fids))
    }

    /// A volume's stamp and the latest stamp of a change by a client other
    /// than `client`. `Stale` for a volume that does not exist.
    pub fn volume_stamp(&self, volume: u32, client: &ClientId) -> Result<(u64, u64)> {
        self.with_db(|db| volume_stamp_in(db, volume, client))
    }

    /// One page of a directory, in name order; `cursor` counts entries
    /// already returned. Page and attr come from one snapshot.
    pub fn read_dir(&self, fid: Fid, cursor: u32) -> Result<(Attr, Vec<DirEntry>, Option<u32>)> {
        self.with_db(|db| read_dir_in(db, fid, cursor))
    }

    /// The attr and data of an object for a fetch. The file is opened by its
    /// versioned name; if a commit replaced and deleted it between reading
    /// the record and opening it, read the record again.
    pub fn open_data(&self, fid: Fid) -> Result<(Attr, FetchData)> {
        self.with_db(|db| self.open_data_in(db, fid))
    }

    /// The extended attributes of `fid` and the object's version.
    pub fn get_xattrs(&self, fid: Fid) -> Result<(u64, crate::proto::Xattrs)> {
        self.with_db(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(OBJECTS)?;
            let rec = get_object(&table, fid)?.ok_or_else(|| stale(fid))?;
            Ok((rec.attr.version, rec.xattrs))
        })
    }

    /// Reserve `count` fresh vnodes in `volume` for `client`, durably.
    pub fn alloc_fids(&self, client: &ClientId, volume: u32, count: u32) -> Result<u64> {
        self.with_db(|db| alloc_fids_in(db, client, volume, count))
    }

    fn open_data_in(&self, db: &Database, fid: Fid) -> Result<(Attr, FetchData)> {
        for _ in 0..8 {
            let txn = db.begin_read()?;
            let table = txn.open_table(OBJECTS)?;
            let rec = get_object(&table, fid)?.ok_or_else(|| stale(fid))?;
            match rec.attr.ftype {
                FileType::Dir => return Err(Error::IsDir(format!("fetch of directory {fid}"))),
                FileType::Symlink => {
                    let data = rec.target.clone().into_bytes();
                    return Ok((rec.attr, FetchData::Bytes(data)));
                }
                // Special files are metadata only: they fetch as empty.
                t if t.is_special() => {
                    return Ok((rec.attr, FetchData::Bytes(Vec::new())));
                }
                // Empty, or small: its bytes come from the same snapshot
                // as its attr.
                FileType::File if !rec.has_file => {
                    let data = if rec.attr.size == 0 {
                        Vec::new()
                    } else {
                        read_small(&txn, &rec)?
                    };
                    return Ok((rec.attr, FetchData::Bytes(data)));
                }
                _ => {}
            }
            let path = objects::object_path(&self.root, fid, rec.dv);
            match File::open(&path) {
                Ok(f) => {
                    let size = rec.attr.size;
                    return Ok((rec.attr, FetchData::File(f, size)));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(format!("open {}", path.display()), e)),
            }
        }
        Err(Error::Again(format!("{fid} keeps changing; fetch again")))
    }
}

fn get_attrs_in(db: &Database, fids: &[Fid]) -> Result<Vec<std::result::Result<Attr, WireCode>>> {
    let txn = db.begin_read()?;
    let table = txn.open_table(OBJECTS)?;
    let mut out = Vec::with_capacity(fids.len());
    for &fid in fids {
        out.push(match get_object(&table, fid)? {
            Some(rec) => Ok(rec.attr),
            None => Err(WireCode::Stale),
        });
    }
    Ok(out)
}

fn volume_stamp_in(db: &Database, volume: u32, client: &ClientId) -> Result<(u64, u64)> {
    let txn = db.begin_read()?;
    if txn.open_table(VOLUMES)?.get(volume)?.is_none() {
        return Err(Error::Stale(format!("no volume {volume}")));
    }
    let s = match txn.open_table(VOLSTAMPS) {
        Ok(t) => match t.get(volume)? {
            Some(b) => VolStamp::decode(b.value())?,
            None => VolStamp::default(),
        },
        Err(redb::TableError::TableDoesNotExist(_)) => VolStamp::default(),
        Err(e) => return Err(e.into()),
    };
    Ok((s.stamp, s.foreign(client)))
}

fn read_dir_in(db: &Database, fid: Fid, cursor: u32) -> Result<(Attr, Vec<DirEntry>, Option<u32>)> {
    let txn = db.begin_read()?;
    let table = txn.open_table(OBJECTS)?;
    let rec = get_object(&table, fid)?.ok_or_else(|| stale(fid))?;
    if rec.attr.ftype != FileType::Dir {
        return Err(Error::NotDir(format!("{fid}")));
    }
    let dirents = txn.open_table(DIRENTS)?;
    let key = fid.to_bytes();
    let mut entries = Vec::new();
    let mut next = None;
    let range = dirents.range((&key, "")..)?;
    for (i, item) in range.enumerate() {
        let (k, v) = item?;
        let (dir, name) = k.value();
        if dir != &key {
            break; // past this directory's entries
        }
        let Ok(i) = u32::try_from(i) else { break };
        if i < cursor {
            continue;
        }
        if entries.len() == MAX_DIR_PAGE {
            next = Some(i);
            break;
        }
        let (child, ftype) = decode_entry(v.value())?;
        entries.push(DirEntry {
            name: name.to_string(),
            fid: child,
            ftype,
        });
    }
    Ok((rec.attr, entries, next))
}

fn alloc_fids_in(db: &Database, client: &ClientId, volume: u32, count: u32) -> Result<u64> {
    check_alloc_count(count)?;
    let txn = db.begin_write()?;
    let first = reserve_vnodes(&txn, client, volume, count)?;
    txn.commit()?;
    Ok(first)
}

/// An AllocFids count is 1..=`MAX_ALLOC`.
pub(crate) fn check_alloc_count(count: u32) -> Result<()> {
    if count == 0 || count > MAX_ALLOC {
        return Err(Error::Invalid(format!(
            "AllocFids count {count} not in 1..={MAX_ALLOC}"
        )));
    }
    Ok(())
}

/// Reserve `count` vnodes of `volume` for `client` in `txn`: the volume's
/// next vnode moves past them and the reservation is recorded. Returns the
/// first. Shared by a lone server and a group's applied AllocFids entry.
pub(crate) fn reserve_vnodes(
    txn: &redb::WriteTransaction,
    client: &ClientId,
    volume: u32,
    count: u32,
) -> Result<u64> {
    let mut vols = txn.open_table(VOLUMES)?;
    let first = vols
        .get(volume)?
        .map(|v| v.value())
        .ok_or_else(|| Error::NotFound(format!("volume {volume}")))?;
    let end = first
        .checked_add(count as u64)
        .ok_or_else(|| Error::NoSpace(format!("volume {volume} out of vnodes")))?;
    vols.insert(volume, end)?;
    txn.open_table(RESERVED)?
        .insert((volume, first), &encode_reservation(client, count))?;
    Ok(first)
}

/// Give every volume without a usage record one, computed from its files
/// (a data directory from before usage was kept). Done once: later batches
/// keep it up to date in their own transaction.
fn ensure_usage(db: &Database) -> Result<()> {
    let missing: Vec<u32> = {
        let txn = db.begin_read()?;
        let vols = txn.open_table(VOLUMES)?;
        let usage = match txn.open_table(VOLUSAGE) {
            Ok(t) => Some(t),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(e.into()),
        };
        let mut missing = Vec::new();
        for item in vols.iter()? {
            let v = item?.0.value();
            let known = match &usage {
                Some(t) => t.get(v)?.is_some(),
                None => false,
            };
            if !known {
                missing.push(v);
            }
        }
        missing
    };
    if missing.is_empty() {
        return Ok(());
    }
    let txn = db.begin_write()?;
    {
        let mut sums: std::collections::BTreeMap<u32, u64> =
            missing.iter().map(|v| (*v, 0)).collect();
        let objects = txn.open_table(OBJECTS)?;
        for item in objects.iter()? {
            let (_, v) = item?;
            let rec = ObjectRec::decode(v.value())?;
            if rec.attr.ftype == FileType::File {
                if let Some(sum) = sums.get_mut(&rec.attr.fid.volume) {
                    *sum = sum.saturating_add(rec.attr.size);
                }
            }
        }
        drop(objects);
        let mut usage = txn.open_table(VOLUSAGE)?;
        for (v, sum) in sums {
            usage.insert(v, sum)?;
        }
        txn.open_table(QUOTAS)?;
    }
    txn.commit()?;
    Ok(())
}

/// A volume's usage and quota, as kept in the metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeSpace {
    /// Bytes of file data the volume holds now, counted against its quota.
    pub used: u64,
    /// The most file bytes the volume may hold; `None` means no quota.
    pub quota: Option<u64>,
}

/// Read (and with `set`, change) a volume's quota: through the running
/// server's administration socket when one serves `root`, else on the
/// metadata directly (admin.rs).
pub fn volume_quota(root: &Path, volume: u32, set: Option<Option<u64>>) -> Result<VolumeSpace> {
    let mut words = vec!["quota".to_string(), volume.to_string()];
    match set {
        None => {}
        Some(None) => words.push("none".into()),
        Some(Some(b)) => words.push(b.to_string()),
    }
    let out = super::admin::command(root, &words)?;
    parse_space(&out)
        .ok_or_else(|| Error::Protocol(format!("quota command answered {:?}", out.trim_end())))
}

/// The quota command's output line, as [`VolumeSpace::line`] writes it.
fn parse_space(line: &str) -> Option<VolumeSpace> {
    let rest = line.trim_end().split_once(": ")?.1;
    let (used, quota) = rest.split_once(" bytes used, quota ")?;
    Some(VolumeSpace {
        used: used.parse().ok()?,
        quota: match quota {
            "unlimited" => None,
            q => Some(q.parse().ok()?),
        },
    })
}

impl VolumeSpace {
    /// `volume N: USED bytes used, quota Q|unlimited` (the command's output).
    pub fn line(&self, volume: u32) -> String {
        let quota = match self.quota {
            Some(q) => q.to_string(),
            None => "unlimited".into(),
        };
        format!("volume {volume}: {} bytes used, quota {quota}\n", self.used)
    }
}

/// Read (and with `set`, change) a volume's quota in an open metadata
/// store. A change commits before this returns; the next batch's
/// transaction reads it (quotas are not cached), so a running server
/// applies it from its next batch on.
pub(crate) fn volume_quota_in(
    db: &Database,
    volume: u32,
    set: Option<Option<u64>>,
) -> Result<VolumeSpace> {
    ensure_usage(db)?;
    if let Some(quota) = set {
        let txn = db.begin_write()?;
        {
            if txn.open_table(VOLUMES)?.get(volume)?.is_none() {
                return Err(Error::NotFound(format!("volume {volume}")));
            }
            let mut q = txn.open_table(QUOTAS)?;
            match quota {
                Some(b) => q.insert(volume, b)?,
                None => q.remove(volume)?,
            };
        }
        txn.commit()?;
    }
    let txn = db.begin_read()?;
    if txn.open_table(VOLUMES)?.get(volume)?.is_none() {
        return Err(Error::NotFound(format!("volume {volume}")));
    }
    let used = txn
        .open_table(VOLUSAGE)?
        .get(volume)?
        .map(|v| v.value())
        .unwrap_or(0);
    let quota = txn.open_table(QUOTAS)?.get(volume)?.map(|v| v.value());
    Ok(VolumeSpace { used, quota })
}

/// The data directory 0700; meta.redb, the secret files and every object
/// file 0600 (SERVER.md "File modes"). Fixes what an older version or a
/// loose umask left, with one message.
fn secure_data_dir(root: &Path) -> Result<()> {
    use crate::fsmode::{Fixed, DIR_MODE};
    if !db_path(root).exists() {
        return Ok(()); // open_db says what is wrong
    }
    let mut fixed = Fixed::default();
    fixed.set(root, DIR_MODE)?;
    fixed.files_in(root)?; // meta.redb, <user>.secret
    fixed.files_in(&objects::staging_dir(root))?;
    let base = root.join("objects");
    if let Ok(vols) = fs::read_dir(&base) {
        for vol in vols.flatten() {
            if vol.file_type().is_ok_and(|t| t.is_dir()) {
                fixed.files_in(&vol.path())?;
            }
        }
    }
    if let Some(m) = fixed.message() {
        super::log::warn(format_args!("data directory {}: {m}", root.display()));
    }
    Ok(())
}

pub(crate) fn open_db(root: &Path) -> Result<Database> {
    let path = db_path(root);
    if !path.exists() {
        return Err(Error::NotFound(format!(
            "{} holds no coda server data (run `coda-server init --root {}` first)",
            root.display(),
            root.display()
        )));
    }
    // A store written by an earlier coda (redb 2) is converted first.
    match crate::redb_upgrade::upgraded(&path, &TUPLE_TABLES, || Database::open(&path)) {
        Ok(db) => {
            crate::redb_upgrade::finish(&db, &TUPLE_TABLES)?;
            Ok(db)
        }
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => Err(Error::Again(format!(
            "{} is in use by a running coda-server: stop it first",
            root.display()
        ))),
        Err(e) => Err(e.into()),
    }
}

pub(crate) fn check_user(user: &str) -> Result<()> {
    if user == crate::proto::acl::ANONYMOUS {
        return Err(Error::Invalid(format!(
            "{user:?} is reserved (see coda-server anonymous)"
        )));
    }
    let ok = !user.is_empty()
        && user.len() <= crate::proto::MAX_USER
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        && !user.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "user name {user:?}: use 1-64 letters, digits, '_', '-', '.' (not leading)"
        )))
    }
}

/// Store a fresh secret for `user` and write it to `root/<user>.secret`
/// (mode 0600). The file is written first: a user whose secret nobody can
/// read would be useless.
pub(crate) fn add_user_to(db: &Database, root: &Path, user: &str) -> Result<PathBuf> {
    add_user_with(db, root, user, crate::proto::auth::random_bytes())
}

/// [`add_user_to`] with a given secret (a replicated group: every member
/// stores the one its leader drew).
pub(crate) fn add_user_with(
    db: &Database,
    root: &Path,
    user: &str,
    secret: [u8; 32],
) -> Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    {
        let txn = db.begin_read()?;
        if txn.open_table(USERS)?.get(user)?.is_some() {
            return Err(Error::Exists(format!("user {user}")));
        }
    }
    let path = root.join(format!("{user}.secret"));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| Error::io(format!("create {}", path.display()), e))?;
    f.write_all(format!("{}\n", crate::proto::auth::encode_secret(&secret)).as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(format!("write {}", path.display()), e))?;
    let txn = db.begin_write()?;
    txn.open_table(USERS)?.insert(user, &secret)?;
    super::acl::assign_user_id(&txn, user)?;
    txn.commit()?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_failures_are_recognised_and_a_full_disk_reads_as_no_space() {
        let full = Error::from(redb::Error::Io(std::io::Error::from_raw_os_error(
            libc::ENOSPC,
        )));
        assert!(is_store_failure(&full));
        assert!(!full.is_previous_io());
        let e = clear_space_error(full);
        assert!(matches!(e, Error::NoSpace(_)), "{e}");
        assert!(!e.to_string().contains('/'), "names no path: {e}");

        let earlier = Error::from(redb::Error::PreviousIo);
        assert!(is_store_failure(&earlier));
        assert!(earlier.is_previous_io());

        // An object file's ENOSPC is a clear NoSpace too, but not a store
        // failure: the store needs no reopen for it.
        let obj = Error::io(
            "link /srv/objects/1/2.1.3",
            std::io::Error::from_raw_os_error(libc::ENOSPC),
        );
        assert!(!is_store_failure(&obj));
        assert!(matches!(clear_space_error(obj), Error::NoSpace(_)));
        let other = clear_space_error(Error::Conflict("x".into()));
        assert!(matches!(other, Error::Conflict(_)));
    }
}
