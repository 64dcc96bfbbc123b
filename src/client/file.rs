//! Open files: the caller works on the container's own fd at local-disk
//! speed; closing a file that was written stores it back through the CML
//! (write-through on close).

use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;

use super::cache::Cache;
use super::callback::Callbacks;
use crate::proto::Timespec;
use crate::proto::{Attr, DirEntry, Fid, FileType, RecordOp};
use crate::{Error, Result};

/// What an open file needs of the client until it is closed: the cache,
/// the callbacks, and the write path its store goes through.
pub(crate) trait Store: Send + Sync {
    fn cache(&self) -> &Cache;
    fn callbacks(&self) -> &Callbacks;
    fn commit(&self, op: RecordOp, data: Option<&std::fs::File>) -> Result<Attr>;
    /// Make durable the log records not yet durable (the lazily logged
    /// Create of a file this client created: `Cml::log_lazy`).
    fn sync_log(&self) -> Result<()>;
}

/// What opening (and creating) a file needs of the client besides.
pub(crate) trait Opener: Store + 'static {
    fn resolve(&self, path: &str, follow: bool) -> Result<(Fid, FileType)>;
    fn resolve_parent(&self, path: &str) -> Result<(Fid, String)>;
    fn lookup(&self, dir: Fid, name: &str) -> Result<Option<DirEntry>>;
    fn getattr(&self, fid: Fid) -> Result<Attr>;
    /// Make `fid`'s data current in its container, counted as opened.
    fn open_data(&self, fid: Fid) -> Result<Attr>;
    fn create_object(
        &self,
        parent: Fid,
        ftype: FileType,
        build: impl FnOnce(Fid, Timespec) -> RecordOp,
        install: impl FnOnce(&Attr) -> Result<()>,
    ) -> Result<Fid>;
}

/// A file opened through the cache. Owned by one thread at a time.
pub struct File {
    inner: Arc<dyn Store>,
    fid: Fid,
    file: std::fs::File,
    readable: bool,
    writable: bool,
    append: bool,
    /// Contents differ from the server's (written, or truncated at open).
    changed: bool,
    /// The container's (size, mtime) at open, to notice writes made directly
    /// through `fd()`.
    stamp: (u64, i64, i64),
    done: bool,
    /// Opened by its creator: its Create may not be durable yet (logged
    /// lazily in write-back or disconnected mode) until the first close or
    /// fsync, which stores it or else syncs the log.
    created: bool,
}

fn stamp(f: &std::fs::File) -> (u64, i64, i64) {
    f.metadata()
        .map(|m| (m.len(), m.mtime(), m.mtime_nsec()))
        .unwrap_or((0, 0, 0))
}

pub(crate) fn open<C: Opener>(inner: &Arc<C>, path: &str, flags: i32, mode: u32) -> Result<File> {
    let allowed = libc::O_ACCMODE | libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_APPEND;
    let acc = flags & libc::O_ACCMODE;
    if flags & !allowed != 0 || acc == libc::O_ACCMODE {
        return Err(Error::Invalid(format!("open flags {flags:#o} for {path}")));
    }
    if super::namei::split_path(path)?.is_empty() {
        return Err(Error::IsDir(path.to_string()));
    }
    let (parent, name) = inner.resolve_parent(path)?;
    let found = inner.lookup(parent, &name)?;
    let (fid, created) = match found {
        None if flags & libc::O_CREAT != 0 => (
            create(inner, parent, &name, mode, super::owner::Owner::process())?,
            true,
        ),
        None => return Err(Error::NotFound(path.to_string())),
        Some(_) if flags & (libc::O_CREAT | libc::O_EXCL) == libc::O_CREAT | libc::O_EXCL => {
            return Err(Error::Exists(path.to_string()))
        }
        Some(e) => {
            let (fid, t) = match e.ftype {
                FileType::Symlink => inner.resolve(path, true)?,
                t => (e.fid, t),
            };
            if t == FileType::Dir {
                return Err(Error::IsDir(path.to_string()));
            }
            (fid, false)
        }
    };
    open_fid(inner, fid, flags, created)
}

/// Open the object `fid` (a file; `created`: made by this open, its empty
/// container already in place). The fid-based core of `open`.
pub(crate) fn open_fid<C: Opener>(
    inner: &Arc<C>,
    fid: Fid,
    flags: i32,
    created: bool,
) -> Result<File> {
    let acc = flags & libc::O_ACCMODE;
    let allowed = libc::O_ACCMODE | libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_APPEND;
    if flags & !allowed != 0 || acc == libc::O_ACCMODE {
        return Err(Error::Invalid(format!("open flags {flags:#o} for {fid}")));
    }
    let (readable, writable) = (acc != libc::O_WRONLY, acc != libc::O_RDONLY);
    let trunc = writable && flags & libc::O_TRUNC != 0;
    // From here on the cache counts us as an opener (so nothing evicts the
    // container); every failure path must undo that.
    if !created {
        if trunc {
            // Truncating: the old contents are not needed, so no fetch.
            let attr = inner.getattr(fid)?;
            inner.cache().install_empty(&attr, true)?;
        } else {
            inner.open_data(fid)?;
        }
    }
    let container = inner.cache().container(fid);
    // The fd is read-write even for O_WRONLY so the store can read it back;
    // `read_at` still honours the mode the caller asked for.
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .append(writable && flags & libc::O_APPEND != 0)
        .custom_flags(libc::O_CLOEXEC)
        .open(&container);
    let file = match opened {
        Ok(f) => f,
        Err(e) => {
            inner.cache().closed(fid);
            return Err(Error::io(
                format!("opening container {}", container.display()),
                e,
            ));
        }
    };
    // Only a writable fd can change the container behind our back.
    let st = if writable { stamp(&file) } else { (0, 0, 0) };
    Ok(File {
        inner: inner.clone() as Arc<dyn Store>,
        fid,
        file,
        readable,
        writable,
        append: flags & libc::O_APPEND != 0,
        changed: trunc && !created,
        stamp: st,
        done: false,
        created,
    })
}

/// Create an empty file through the CML; its container starts out empty
/// and opened.
pub(crate) fn create<C: Opener>(
    inner: &Arc<C>,
    parent: Fid,
    name: &str,
    mode: u32,
    owner: super::owner::Owner,
) -> Result<Fid> {
    inner.create_object(
        parent,
        FileType::File,
        |fid, now| RecordOp::Create {
            parent,
            name: name.to_string(),
            fid,
            mode: mode & 0o7777,
            mtime: now,
            uid: owner.uid,
            gid: owner.gid,
        },
        |attr| inner.cache().install_new(attr),
    )
}

impl File {
    /// The fid of the open object.
    pub fn fid(&self) -> Fid {
        self.fid
    }

    /// The container file's OS descriptor (valid until close).
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Read into `buf` from offset `off` of the local container, returning
    /// the bytes read (0 at end of file); no server is involved. `BadHandle`
    /// (EBADF) if the file was opened write-only.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<usize> {
        if !self.readable {
            return Err(Error::BadHandle("file not open for reading".into()));
        }
        self.file
            .read_at(buf, off)
            .map_err(|e| Error::io("reading a container", e))
    }

    /// Write at `off`, or at the end when opened with `O_APPEND`.
    pub fn write_at(&mut self, buf: &[u8], off: u64) -> Result<usize> {
        if !self.writable {
            return Err(Error::BadHandle("file not open for writing".into()));
        }
        if !self.changed {
            self.changed = true;
            // In memory only: start-up clears dirty flags anyway, and the
            // store at close saves the entry.
            self.inner
                .cache()
                .change(None, self.fid, |e| e.dirty = true);
        }
        let off = if self.append {
            self.file
                .metadata()
                .map_err(|e| Error::io("sizing a container", e))?
                .len()
        } else {
            off
        };
        self.file
            .write_at(buf, off)
            .map_err(|e| Error::io("writing a container", e))
    }

    /// Store the file now if it was written since it was opened (or last
    /// synced), keeping it open: what fsync(2) and every close(2) of one of
    /// several descriptor copies ask of the mount. Connected, the server
    /// has the data when this returns; disconnected (or in write-back
    /// mode), the record is durable in the local log, holding the bytes of
    /// a file of at most 64 KiB or with the container fsynced first, and so
    /// is the file's Create if this open made it.
    pub fn sync(&mut self) -> Result<()> {
        if self.done || !self.writable {
            return self.settle_create();
        }
        // Taken before the store: a write through `fd()` while it runs
        // changes the stamp again, so the next sync or close stores again.
        let before = stamp(&self.file);
        if !self.changed && before == self.stamp {
            return self.settle_create();
        }
        self.store()?;
        // (The store's durable commit made the Create durable too.)
        self.created = false;
        self.changed = false;
        self.stamp = before;
        Ok(())
    }

    /// A file created by this open and closed or fsynced without a store:
    /// its Create is made durable now (see `created`).
    fn settle_create(&mut self) -> Result<()> {
        if !self.created {
            return Ok(());
        }
        self.created = false;
        self.inner.sync_log()
    }

    /// Set the container's modification time to `t` and take that as the
    /// stored state, when nothing was written since the last store (a
    /// time set on an open file, after `sync`): the times a program sets
    /// before close (tar, cp -p) then survive the close. Returns whether
    /// it did; if the file has unstored writes, the store at close stamps
    /// its own time, as a write after the time was set would.
    pub fn set_container_mtime(&mut self, t: Timespec) -> bool {
        if self.done || !self.writable || self.changed || stamp(&self.file) != self.stamp {
            return false;
        }
        let times = [
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            libc::timespec {
                tv_sec: t.sec,
                tv_nsec: t.nsec as _,
            },
        ];
        // SAFETY: our live descriptor; `times` holds the two entries.
        if unsafe { libc::futimens(self.file.as_raw_fd(), times.as_ptr()) } != 0 {
            return false;
        }
        self.stamp = stamp(&self.file);
        true
    }

    /// Close without storing: the object is gone (removed while open, as
    /// POSIX allows), so what was written has nowhere to go.
    pub fn abandon(mut self) {
        self.done = true;
        self.inner.cache().closed(self.fid);
    }

    /// Store the file back if it was written and return the store's result.
    pub fn close(mut self) -> Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> Result<()> {
        if self.done {
            return Ok(());
        }
        self.done = true;
        let changed = self.writable && (self.changed || stamp(&self.file) != self.stamp);
        let res = if changed {
            self.store()
        } else {
            self.settle_create()
        };
        self.inner.cache().closed(self.fid);
        res
    }

    fn store(&self) -> Result<()> {
        let inner = &self.inner;
        let meta = self
            .file
            .metadata()
            .map_err(|e| Error::io("sizing a container", e))?;
        let len = meta.len();
        // The container's mtime: the last write's time, or what a program
        // set after writing (`cp -p`, `tar`), kept by the store.
        let mtime = Timespec {
            sec: meta.mtime(),
            nsec: meta.mtime_nsec() as u32,
        };
        // Saved once, after the store (and before the record's commit only
        // when a durable record names the container: `make_durable`).
        inner.cache().change(None, self.fid, |e| {
            e.dirty = true;
            e.data_bytes = len;
        });
        let tok = inner.callbacks().token(self.fid);
        let op = RecordOp::Store {
            fid: self.fid,
            expected_version: 0, // connected: last close wins
            upload_id: 0,        // the CML sets it to the record's store id
            length: len,
            mtime,
        };
        match inner.commit(op, Some(&self.file)) {
            Ok(attr) => {
                inner.cache().update(Some(&attr), self.fid, |e| {
                    e.attr = attr.clone();
                    e.data_version = Some(attr.version);
                    e.data_bytes = len;
                    e.dirty = false;
                });
                inner.callbacks().grant(self.fid, tok);
                Ok(())
            }
            Err(err) => {
                // The container no longer matches any server version.
                inner.cache().update(None, self.fid, |e| {
                    e.data_version = None;
                    e.dirty = false;
                });
                inner.callbacks().break_fids(&[self.fid]);
                Err(err)
            }
        }
    }
}

impl Drop for File {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}
