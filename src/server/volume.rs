//! The volume store: the data directory opened for serving. Read-side
//! operations (attrs, directory pages, data for a fetch), fid reservation and
//! users live here; the one mutation path is in `reintegrate.rs`.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable};

use super::meta::*;
use super::objects;
use crate::error::WireCode;
use crate::proto::{Attr, DirEntry, Fid, FileType, Timespec, MAX_DIR_PAGE};
use crate::{Error, Result};

pub type ClientId = [u8; 16];

/// Most vnodes one AllocFids may reserve.
pub const MAX_ALLOC: u32 = 4096;

pub struct VolumeStore {
    pub(crate) db: Database,
    pub(crate) root: PathBuf,
    server_id: [u8; 16],
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

pub(crate) fn stale(fid: Fid) -> Error {
    Error::Stale(format!("no object {fid}"))
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
        fs::create_dir_all(root).map_err(|e| Error::io(format!("create {}", root.display()), e))?;
        fs::create_dir_all(objects::objects_dir(root, ROOT_VOLUME))
            .map_err(|e| Error::io("create objects directory", e))?;
        fs::create_dir_all(objects::staging_dir(root))
            .map_err(|e| Error::io("create staging directory", e))?;
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
                },
                dv: 0,
                has_file: false,
                parent: ROOT_FID,
                target: String::new(),
            };
            txn.open_table(OBJECTS)?
                .insert(&ROOT_FID.to_bytes(), root_rec.encode().as_slice())?;
            txn.open_table(DIRENTS)?;
            txn.open_table(VOLUMES)?
                .insert(ROOT_VOLUME, ROOT_FID.vnode + 1)?;
            txn.open_table(CLIENT_STORE)?;
            txn.open_table(RESERVED)?;
            txn.open_table(GRAVES)?;
            txn.open_table(USERS)?;
            let mut settings = txn.open_table(SETTINGS)?;
            let id: [u8; 16] = crate::proto::auth::random_bytes();
            settings.insert(SERVER_ID_KEY, id.as_slice())?;
            settings.insert(ROOT_KEY, ROOT_FID.to_bytes().as_slice())?;
        }
        txn.commit()?;
        add_user_to(&db, root, user)
    }

    /// Add a user to an existing data directory (the server may be stopped).
    pub fn add_user(root: &Path, user: &str) -> Result<PathBuf> {
        check_user(user)?;
        let db = open_db(root)?;
        add_user_to(&db, root, user)
    }

    /// Open a data directory for serving, removing leftovers of a crash:
    /// staged uploads and object files no committed record points to.
    pub fn open(root: &Path) -> Result<VolumeStore> {
        let db = open_db(root)?;
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
            db,
            root: root.to_path_buf(),
            server_id,
        };
        objects::clear_staging(root)?;
        store.sweep_objects()?;
        Ok(store)
    }

    /// Delete object files that committed metadata does not reference: the
    /// new file of a batch that crashed before its commit, or the old file of
    /// one that crashed after its commit but before the cleanup.
    fn sweep_objects(&self) -> Result<()> {
        let txn = self.db.begin_read()?;
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

    pub fn server_id(&self) -> [u8; 16] {
        self.server_id
    }

    pub fn root_fid(&self) -> Fid {
        ROOT_FID
    }

    pub fn user_secret(&self, user: &str) -> Result<Option<[u8; 32]>> {
        let txn = self.db.begin_read()?;
        let users = txn.open_table(USERS)?;
        let secret = users.get(user)?.map(|v| *v.value());
        Ok(secret)
    }

    /// Attrs of many fids from one consistent snapshot.
    pub fn get_attrs(&self, fids: &[Fid]) -> Result<Vec<std::result::Result<Attr, WireCode>>> {
        let txn = self.db.begin_read()?;
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

    /// A volume's stamp and the latest stamp of a change by a client other
    /// than `client`. `Stale` for a volume that does not exist.
    pub fn volume_stamp(&self, volume: u32, client: &ClientId) -> Result<(u64, u64)> {
        let txn = self.db.begin_read()?;
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

    /// One page of a directory, in name order; `cursor` counts entries
    /// already returned. Page and attr come from one snapshot.
    pub fn read_dir(&self, fid: Fid, cursor: u32) -> Result<(Attr, Vec<DirEntry>, Option<u32>)> {
        let txn = self.db.begin_read()?;
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

    /// The attr and data of an object for a fetch. The file is opened by its
    /// versioned name; if a commit replaced and deleted it between reading
    /// the record and opening it, read the record again.
    pub fn open_data(&self, fid: Fid) -> Result<(Attr, FetchData)> {
        for _ in 0..8 {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(OBJECTS)?;
            let rec = get_object(&table, fid)?.ok_or_else(|| stale(fid))?;
            match rec.attr.ftype {
                FileType::Dir => return Err(Error::IsDir(format!("fetch of directory {fid}"))),
                FileType::Symlink => {
                    let data = rec.target.clone().into_bytes();
                    return Ok((rec.attr, FetchData::Bytes(data)));
                }
                FileType::File if !rec.has_file => {
                    return Ok((rec.attr, FetchData::Bytes(Vec::new())));
                }
                FileType::File => {}
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

    /// Reserve `count` fresh vnodes in `volume` for `client`, durably.
    pub fn alloc_fids(&self, client: &ClientId, volume: u32, count: u32) -> Result<u64> {
        if count == 0 || count > MAX_ALLOC {
            return Err(Error::Invalid(format!(
                "AllocFids count {count} not in 1..={MAX_ALLOC}"
            )));
        }
        let txn = self.db.begin_write()?;
        let first = {
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
            first
        };
        txn.commit()?;
        Ok(first)
    }
}

fn open_db(root: &Path) -> Result<Database> {
    let path = db_path(root);
    if !path.exists() {
        return Err(Error::NotFound(format!(
            "{} holds no coda server data (run `coda-server init --root {}` first)",
            root.display(),
            root.display()
        )));
    }
    Ok(Database::open(path)?)
}

fn check_user(user: &str) -> Result<()> {
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
fn add_user_to(db: &Database, root: &Path, user: &str) -> Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    {
        let txn = db.begin_read()?;
        if txn.open_table(USERS)?.get(user)?.is_some() {
            return Err(Error::Exists(format!("user {user}")));
        }
    }
    let secret: [u8; 32] = crate::proto::auth::random_bytes();
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
    txn.commit()?;
    Ok(path)
}
