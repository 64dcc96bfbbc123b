//! Venus: the client cache manager a program embeds.
//!
//! A [`Client`](crate::client::Client) keeps whole files in a local cache (`cache`), trusts them
//! while the server's callbacks hold (`callback`), talks to the server over
//! a control and bulk connections (`conn`), and sends every mutation through
//! the client modification log (`cml`). See docs/CLIENT.md.

mod admin;
mod at;
mod cache;
mod callback;
mod cml;
mod config;
mod conflict;
mod conn;
pub mod control;
mod emulation;
pub mod event;
pub mod failover;
mod fids;
mod file;
mod hoard;
mod identity;
mod mode;
mod namei;
mod namespace;
mod probe;
mod reintegrate;
mod stamps;
mod stats;
mod xattr;

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, Sender};

pub use admin::{CachedObject, FlushReport};
pub use config::Config;
pub use conflict::{Conflict, Keep};
pub use event::{Event, EventBus, Invalidation, InvalidationHook};
pub use file::File;
pub use hoard::{Expand, HoardEntry, HoardReport};
pub use stats::ClientStats;

use crate::proto::{auth, Attr, Msg, RecordOp, Replaces, MAX_SYMLINK};
pub use crate::proto::{Fid, FileType, Timespec, XattrHow};
use crate::{Error, Result};

use cache::Cache;
use callback::{Callbacks, Token};
use cml::Cml;
use conn::{Identity, Interrupt, Servers, Session, Timing};
use probe::Health;
use stats::Counters;

/// An object's status, as `stat` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// The object's file identifier: volume, vnode and uniquifier.
    pub fid: Fid,
    /// File, directory or symlink.
    pub ftype: FileType,
    /// POSIX `st_mode`: type bits and permission bits.
    pub mode: u32,
    /// Number of directory entries naming the object.
    pub nlink: u32,
    /// Length in bytes (a symlink's: its target's length).
    pub size: u64,
    /// Last modification time, as the server (or the local log) set it.
    pub mtime: Timespec,
    /// Derived from the fid: stable for the object's life.
    pub ino: u64,
    /// The object's version on the server: grows with every change.
    pub version: u64,
    /// Numeric owner.
    pub uid: u32,
    /// Numeric group.
    pub gid: u32,
    /// Last access time, as last set explicitly (reads do not move it).
    pub atime: Timespec,
    /// Last status change.
    pub ctime: Timespec,
    /// Device number of a device node; 0 otherwise.
    pub rdev: u64,
}

/// The numeric owner and group a new object gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// Numeric user id.
    pub uid: u32,
    /// Numeric group id.
    pub gid: u32,
}

impl Owner {
    /// This process's effective user and group: the owner of objects the
    /// library creates unless a caller (the mount) says otherwise.
    pub fn process() -> Owner {
        // SAFETY: plain getters without preconditions.
        unsafe {
            Owner {
                uid: libc::geteuid(),
                gid: libc::getegid(),
            }
        }
    }
}

/// A status change: each `Some` field is set, in one record (so the
/// object's ctime and version move once).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetStatus {
    /// Permission bits (`& 0o7777`).
    pub mode: Option<u32>,
    /// Size (files only): cut or zero-extended.
    pub size: Option<u64>,
    /// Modification time.
    pub mtime: Option<Timespec>,
    /// Access time.
    pub atime: Option<Timespec>,
    /// Numeric owner.
    pub uid: Option<u32>,
    /// Numeric group.
    pub gid: Option<u32>,
}

impl From<&Attr> for Stat {
    fn from(a: &Attr) -> Stat {
        Stat {
            fid: a.fid,
            ftype: a.ftype,
            mode: a.st_mode(),
            nlink: a.nlink,
            size: a.size,
            mtime: a.mtime,
            ino: a.fid.ino(),
            version: a.version,
            uid: a.uid,
            gid: a.gid,
            atime: a.atime,
            ctime: a.ctime,
            rdev: a.rdev,
        }
    }
}

/// What the client can do right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    /// A server session is up.
    Connected,
    /// No server answers at the moment.
    Disconnected,
    /// Failed over: every remote operation returns EIO until failback.
    FailedOver,
}

/// One entry of a directory listing (never `.` or `..`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// The entry's name within its directory.
    pub name: String,
    /// The type of the object it names, known without a `stat`.
    pub ftype: FileType,
    /// The object it names.
    pub fid: Fid,
}

/// The cache manager. Cheap to clone and share: every method takes `&self`
/// and may be called from many threads at once.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    servers: Arc<Servers>,
    callbacks: Arc<Callbacks>,
    counters: Arc<Counters>,
    cache: Cache,
    /// The persisted log and its optimiser (no network, no mode).
    cml: Cml,
    /// Fid ranges reserved by the server.
    fids: fids::Fids,
    /// Who sends now; connected records waiting for their Reintegrate.
    outbox: reintegrate::Outbox,
    /// The mode, and the reintegrator thread's wake-up.
    emu: Arc<emulation::EmuState>,
    health: Health,
    /// Extended attributes read or set, by object version (xattr.rs).
    xattr_cache: xattr::XattrCache,
    /// Dropped with the client: stops the prober thread.
    _stop_probe: Sender<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The client is going: its reintegrator thread must stop.
        self.emu.stop();
        self.servers.shutdown();
        self.cache.flush_lru();
        self.emu.stamps.save(&self.cml.db, &self.callbacks);
    }
}

/// Make `cache_dir` private: the directory 0700 and every file the cache
/// keeps 0600 (CLIENT.md "File modes"). Containers are copies of files the
/// mount may show only to some users; the cache must not hand them to
/// every local user. Looser modes left by an older version are fixed, with
/// one message.
fn secure_cache_dir(cache_dir: &Path) -> Result<()> {
    use crate::fsmode::{create_private_dir, Fixed, DIR_MODE};
    create_private_dir(cache_dir)?;
    let mut fixed = Fixed::default();
    fixed.set(cache_dir, DIR_MODE)?;
    fixed.files_in(cache_dir)?;
    fixed.files_in(&cache_dir.join("containers"))?;
    fixed.files_in(&cache_dir.join("conflicts"))?;
    if let Some(m) = fixed.message() {
        eprintln!("coda client: cache_dir {}: {m}", cache_dir.display());
    }
    Ok(())
}

impl Client {
    /// Open (or create) the cache, connect to a server and authenticate.
    pub fn new(cfg: Config) -> Result<Client> {
        let cache_dir = cfg
            .cache_dir
            .clone()
            .ok_or_else(|| Error::Invalid("config: cache_dir is required".into()))?;
        let secret_file = cfg
            .secret_file
            .clone()
            .ok_or_else(|| Error::Invalid("config: secret_file is required".into()))?;
        let secret = auth::read_secret_file(&secret_file)?;
        secure_cache_dir(&cache_dir)?;
        let index = cache_dir.join("index.redb");
        crate::fsmode::precreate_private_file(&index)?;
        let epoch = u64::from_ne_bytes(auth::random_bytes::<8>());
        let db = cache::Index::open(&index).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => Error::Again(format!(
                "cache_dir {} is in use by another client",
                cache_dir.display()
            )),
            e => Error::from(e),
        })?;
        // Decided by the index, which holds the store-id counter too.
        let client_id = identity::settle(&cache_dir, &db)?;
        let db = Arc::new(db);
        let callbacks = Arc::new(Callbacks::default());
        let counters = Arc::new(Counters::default());
        let cache = Cache::open(&cache_dir, db.clone(), cfg.cache_size)?;
        let pending = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let emu = Arc::new(emulation::EmuState::new(
            cfg.disconnected_operation,
            pending.clone(),
        ));
        let fids = fids::Fids::open(db.clone())?;
        let cml = Cml::open(db, pending)?;
        let timing = Timing {
            rpc_timeout: Duration::from_millis(cfg.rpc_timeout_ms),
            dead_after: Duration::from_millis(cfg.dead_after_ms),
            bind_addr: cfg.bind_addr,
            bulk_max: cfg.bulk_connections.max(1),
        };
        let ident = Identity {
            client_id,
            epoch,
            user: cfg.user.clone(),
            secret,
        };
        let servers = Arc::new(Servers::new(
            cfg.servers.clone(),
            ident,
            timing,
            callbacks.clone(),
            counters.clone(),
        ));
        // No server: disconnected operation may still serve the cache.
        let first = servers.session().map(|_| ());

        let (stop, stopped) = bounded::<()>(0);
        let inner = Arc::new(Inner {
            servers,
            callbacks,
            counters,
            cache,
            cml,
            fids,
            outbox: reintegrate::Outbox::new(),
            emu,
            health: Health::new(&cfg),
            xattr_cache: xattr::XattrCache::default(),
            _stop_probe: stop,
        });
        probe::spawn(&inner, stopped)?;
        // Reintegrates what a crashed run logged (the server recognises
        // records it already applied by their store ids), then revalidates.
        inner.start_emulation(first, &cfg)?;
        Ok(Client { inner })
    }

    /// Connected, disconnected, or failed over.
    pub fn state(&self) -> ClientState {
        use mode::ModeKind;
        match self.inner.emu.mode.kind() {
            ModeKind::FailedOver => ClientState::FailedOver,
            // Without disconnected operation a hold stops remote calls the
            // way a failover does, and shows as one (as it always has).
            ModeKind::OperatorHeld if !self.inner.emu.mode.enabled() => ClientState::FailedOver,
            ModeKind::OperatorHeld | ModeKind::Emulating => ClientState::Disconnected,
            ModeKind::Connected | ModeKind::WriteDisconnected => {
                if self.inner.health.is_up() && self.inner.servers.is_connected() {
                    ClientState::Connected
                } else {
                    ClientState::Disconnected
                }
            }
        }
    }

    /// Events (server down/up, failover, failback, callback breaks), to pull
    /// or to hand to a handler.
    pub fn events(&self) -> &EventBus {
        &self.inner.callbacks.events
    }

    /// Subscribe (or with `None`, unsubscribe) to invalidations: every
    /// callback the client stops trusting, and every new session. Runs
    /// synchronously on the thread that learned of it; for a server's break
    /// that is before the break is acknowledged, so whoever keeps copies
    /// (the mount's kernel caches) drops them before the writer's change is.
    /// The hook must return soon and must not call the client.
    pub fn set_invalidation_hook(&self, hook: Option<InvalidationHook>) {
        self.inner.callbacks.set_hook(hook);
    }

    /// Whether the client answers for `fid` from its cache without asking
    /// the server: its callback holds and the session is fresh. A copy of
    /// such an answer stays right until an invalidation names it.
    pub fn trusts_cached(&self, fid: Fid) -> bool {
        self.inner.trusts(fid)
    }

    /// Atomically repoint the symlink `link` to `target` (the local copy),
    /// then make every pending and later remote operation fail with `Eio`
    /// until [`Client::failback`]. Never waits for a server.
    pub fn failover(&self, link: &Path, target: &Path) -> Result<()> {
        self.inner.fail_over(link, target)
    }

    /// Undo a failover: once a server answers and the cache is revalidated,
    /// repoint `link` to `target` (the remote tree) and let remote
    /// operations through again. `Again` while no server answers (the client
    /// then stays failed over).
    pub fn failback(&self, link: &Path, target: &Path) -> Result<()> {
        self.inner.fail_back(link, target)
    }

    /// Status of the object at `path`, following a final symlink. Served from
    /// the cache while its callback holds; `NotFound` (ENOENT) if no entry,
    /// `Timeout` (ETIMEDOUT) if it is not cached and no server answers.
    pub fn stat(&self, path: &str) -> Result<Stat> {
        let (fid, _) = self.inner.resolve(path, true)?;
        let a = self.inner.getattr(fid);
        Ok(Stat::from(&a.map_err(|e| self.inner.at_path(e, path))?))
    }

    /// Like [`Client::stat`] but a final symlink is reported itself, not
    /// followed.
    pub fn lstat(&self, path: &str) -> Result<Stat> {
        let (fid, _) = self.inner.resolve(path, false)?;
        let a = self.inner.getattr(fid);
        Ok(Stat::from(&a.map_err(|e| self.inner.at_path(e, path))?))
    }

    /// The entries of the directory at `path` (never `.` or `..`), from the
    /// cached listing when it is current. `NotDir` (ENOTDIR) if `path` is not
    /// a directory.
    pub fn readdir(&self, path: &str) -> Result<Vec<DirEntry>> {
        let (fid, t) = self.inner.resolve(path, true)?;
        if t != FileType::Dir {
            return Err(Error::NotDir(path.to_string()));
        }
        self.readdir_fid(fid)
            .map_err(|e| self.inner.at_path(e, path))
    }

    /// Open the file at `path` with POSIX `flags` (access mode plus
    /// `O_CREAT`, `O_EXCL`, `O_TRUNC`, `O_APPEND`; anything else is `Invalid`,
    /// EINVAL), creating it with permission bits `mode` under `O_CREAT`. The
    /// whole file is fetched into the cache first; writes go to the local
    /// copy and are stored at [`File::close`]. `IsDir` (EISDIR) for a
    /// directory, `NotFound` (ENOENT) without `O_CREAT`, `Exists` (EEXIST)
    /// under `O_CREAT|O_EXCL`.
    pub fn open(&self, path: &str, flags: i32, mode: u32) -> Result<File> {
        file::open(&self.inner, path, flags, mode).map_err(|e| self.inner.at_path(e, path))
    }

    /// Create the directory `path` with permission bits `mode`. `Exists`
    /// (EEXIST) if the name is taken; while disconnected the creation is
    /// logged and reintegrated later.
    pub fn mkdir(&self, path: &str, mode: u32) -> Result<()> {
        let (parent, name) = self.inner.free_name(path)?;
        self.mkdir_at(parent, &name, mode)?;
        Ok(())
    }

    /// Remove the empty directory at `path`. `NotDir` (ENOTDIR) if it is not
    /// a directory, `NotEmpty` (ENOTEMPTY) if it has entries.
    pub fn rmdir(&self, path: &str) -> Result<()> {
        self.remove(path, true)
    }

    /// Remove the entry `path` naming a file or symlink. `IsDir` (EISDIR) for
    /// a directory (use [`Client::rmdir`]).
    pub fn unlink(&self, path: &str) -> Result<()> {
        self.remove(path, false)
    }

    fn remove(&self, path: &str, dir: bool) -> Result<()> {
        let (parent, name) = self.inner.resolve_parent(path)?;
        self.remove_entry(parent, &name, dir, path)
    }

    /// `remove` of the entry `name` in `parent` (`path` names it in errors).
    fn remove_entry(&self, parent: Fid, name: &str, dir: bool, path: &str) -> Result<()> {
        let inner = &self.inner;
        let name = name.to_string();
        let ent = inner
            .lookup(parent, &name)?
            .ok_or_else(|| Error::NotFound(path.to_string()))?;
        match (dir, ent.ftype == FileType::Dir) {
            (true, false) => return Err(Error::NotDir(path.to_string())),
            (false, true) => return Err(Error::IsDir(path.to_string())),
            _ => {}
        }
        let now = Timespec::now();
        let ptok = inner.callbacks.token(parent);
        let tok = inner.callbacks.token(ent.fid);
        let fid = ent.fid;
        let op = if dir {
            RecordOp::Rmdir {
                parent,
                name: name.clone(),
                fid,
            }
        } else {
            RecordOp::Remove {
                parent,
                name: name.clone(),
                fid,
            }
        };
        let attr = inner.commit(op.clone(), None)?;
        inner.object_changed(&attr, tok);
        inner.after_record(&op, ent.ftype, &[(parent, ptok)], now);
        Ok(())
    }

    /// A hard link: the name `name` in `parent` for `fid` (not a directory).
    fn link_entry(&self, fid: Fid, parent: Fid, name: &str) -> Result<()> {
        let inner = &self.inner;
        let ftype = inner.getattr(fid)?.ftype;
        if ftype == FileType::Dir {
            return Err(Error::IsDir(format!("hard link to directory {fid}")));
        }
        if inner.lookup(parent, name)?.is_some() {
            return Err(Error::Exists(name.to_string()));
        }
        let now = Timespec::now();
        let ptok = inner.callbacks.token(parent);
        let tok = inner.callbacks.token(fid);
        let op = RecordOp::Link {
            parent,
            name: name.to_string(),
            fid,
        };
        let attr = inner.commit(op.clone(), None)?;
        inner.object_changed(&attr, tok);
        inner.after_record(&op, ftype, &[(parent, ptok)], now);
        Ok(())
    }

    /// Move the entry `from` to `to`, replacing what `to` names, with POSIX
    /// rules: a directory only replaces a directory and a non-directory only
    /// a non-directory (`NotDir`/`IsDir`, ENOTDIR/EISDIR, otherwise), and
    /// renaming an object onto itself does nothing.
    /// Logged with what `to` held, so a replay refuses to clobber an object
    /// another client put there meanwhile.
    pub fn rename(&self, from: &str, to: &str) -> Result<()> {
        let (sp, sn) = self.inner.resolve_parent(from)?;
        let (dp, dn) = self.inner.resolve_parent(to)?;
        self.rename_entries(sp, &sn, dp, &dn, from, to)
    }

    /// `rename` of entries given by directory and name (`from` and `to`
    /// name them in errors).
    fn rename_entries(
        &self,
        sp: Fid,
        sn: &str,
        dp: Fid,
        dn: &str,
        from: &str,
        to: &str,
    ) -> Result<()> {
        let inner = &self.inner;
        let (sn, dn) = (sn.to_string(), dn.to_string());
        let src = inner
            .lookup(sp, &sn)?
            .ok_or_else(|| Error::NotFound(from.to_string()))?;
        let dst = inner.lookup(dp, &dn)?;
        if let Some(d) = &dst {
            if d.fid == src.fid {
                return Ok(()); // POSIX: renaming a file onto itself does nothing
            }
            match (src.ftype == FileType::Dir, d.ftype == FileType::Dir) {
                (true, false) => return Err(Error::NotDir(to.to_string())),
                (false, true) => return Err(Error::IsDir(to.to_string())),
                _ => {}
            }
        }
        let now = Timespec::now();
        let (stok, dtok, tok) = (
            inner.callbacks.token(sp),
            inner.callbacks.token(dp),
            inner.callbacks.token(src.fid),
        );
        let op = RecordOp::Rename {
            src_parent: sp,
            src_name: sn.clone(),
            dst_parent: dp,
            dst_name: dn.clone(),
            fid: src.fid,
            // What we saw there: if the server holds something else by the
            // time this applies (another client's create while we were
            // disconnected), the record is refused, not silently replacing.
            replaces: dst
                .as_ref()
                .map_or(Replaces::Nothing, |d| Replaces::Object(d.fid)),
        };
        let attr = inner.commit(op.clone(), None)?;
        inner.object_changed(&attr, tok);
        if let Some(d) = &dst {
            // The replaced object lost a link (or is gone): re-ask next time.
            inner.callbacks.break_fids(&[d.fid]);
            if d.ftype == FileType::Dir {
                inner.cache.forget(d.fid);
            }
        }
        inner.after_record(&op, src.ftype, &[(sp, stok), (dp, dtok)], now);
        Ok(())
    }

    /// Create a symlink at `linkpath` whose contents are `target` (not
    /// resolved or checked to exist). `Exists` (EEXIST) if `linkpath` is
    /// taken, `Invalid` (EINVAL) for an empty or over-long target.
    pub fn symlink(&self, target: &str, linkpath: &str) -> Result<()> {
        let (parent, name) = self.inner.free_name(linkpath)?;
        self.symlink_at(parent, &name, target)?;
        Ok(())
    }

    /// The target stored in the symlink at `path` (a final symlink is not
    /// followed). `Invalid` (EINVAL) if `path` is not a symlink.
    pub fn readlink(&self, path: &str) -> Result<String> {
        let (fid, t) = self.inner.resolve(path, false)?;
        if t != FileType::Symlink {
            return Err(Error::Invalid(format!("{path} is not a symlink")));
        }
        self.inner.readlink_fid(fid)
    }

    /// Set the permission bits of `path` (following symlinks) to
    /// `mode & 0o7777`; the type bits of `mode` are ignored.
    pub fn chmod(&self, path: &str, mode: u32) -> Result<()> {
        self.setattr(path, Some(mode & 0o7777), None, None)
    }

    /// Cut or zero-extend the file at `path` to `size` bytes; a cached copy
    /// is resized in place rather than fetched again. `IsDir` (EISDIR) for a
    /// directory.
    pub fn truncate(&self, path: &str, size: u64) -> Result<()> {
        self.setattr(path, None, Some(size), None)
    }

    /// Set the modification time of `path` (following symlinks). `Invalid`
    /// (EINVAL) if `mtime.nsec` is not below one second.
    pub fn utimes(&self, path: &str, mtime: Timespec) -> Result<()> {
        if mtime.nsec >= 1_000_000_000 {
            return Err(Error::Invalid(format!(
                "nanoseconds {} out of range",
                mtime.nsec
            )));
        }
        self.setattr(path, None, None, Some(mtime))
    }

    fn setattr(
        &self,
        path: &str,
        mode: Option<u32>,
        size: Option<u64>,
        mtime: Option<Timespec>,
    ) -> Result<()> {
        let (fid, t) = self.inner.resolve(path, true)?;
        if size.is_some() && t == FileType::Dir {
            return Err(Error::IsDir(path.to_string()));
        }
        self.setattr_fid(fid, mode, size, mtime)
    }

    /// Change the status of object `fid`: mode, size (a file's), mtime.
    pub fn setattr_fid(
        &self,
        fid: Fid,
        mode: Option<u32>,
        size: Option<u64>,
        mtime: Option<Timespec>,
    ) -> Result<()> {
        self.set_status_fid(
            fid,
            &SetStatus {
                mode,
                size,
                mtime,
                ..SetStatus::default()
            },
        )
    }

    /// Change any part of the status of object `fid` (a symlink's own) in
    /// one record: mode, size (a file's), times, owner, group. Permission
    /// to do so is the caller's business (the mount's kernel checks).
    pub fn set_status_fid(&self, fid: Fid, set: &SetStatus) -> Result<()> {
        let inner = &self.inner;
        let SetStatus {
            mode,
            size,
            mtime,
            atime,
            uid,
            gid,
        } = *set;
        for t in [mtime, atime].into_iter().flatten() {
            if t.nsec >= 1_000_000_000 {
                return Err(Error::Invalid(format!(
                    "nanoseconds {} out of range",
                    t.nsec
                )));
            }
        }
        let mode = mode.map(|m| m & 0o7777);
        let tok = inner.callbacks.token(fid);
        let op = RecordOp::SetAttr {
            fid,
            expected_version: 0,
            mode,
            size,
            mtime,
            uid,
            gid,
            atime,
        };
        let attr = inner.commit(op, None)?;
        // Status changes leave the contents as they were (or cut/extended
        // like the server did): a current container stays current.
        let container = inner.cache.container(fid);
        inner.cache.update(Some(&attr), fid, |e| {
            if e.data_current() {
                if let Some(n) = size {
                    match std::fs::OpenOptions::new()
                        .write(true)
                        .open(&container)
                        .and_then(|f| f.set_len(n))
                    {
                        Ok(()) => {
                            e.data_bytes = n;
                            e.data_version = Some(attr.version);
                        }
                        Err(_) => e.data_version = None,
                    }
                } else {
                    e.data_version = Some(attr.version);
                }
            }
            e.attr = attr.clone();
        });
        inner.callbacks.grant(fid, tok);
        Ok(())
    }

    /// A snapshot of this client's counters (fetches, RPCs, callback breaks,
    /// reintegrations) since it was started.
    pub fn stats(&self) -> ClientStats {
        self.inner.counters.snapshot()
    }

    /// The 16-byte identity this client presents to servers, kept in the
    /// cache index so it survives restarts; servers track callbacks and
    /// reintegration per client id.
    pub fn client_id(&self) -> [u8; 16] {
        self.inner.servers.ident().client_id
    }
}

/// Path walks (namei.rs) go through the cache and, where it misses, the
/// server or the emulation.
impl namei::Tree for Inner {
    fn root(&self) -> Result<Fid> {
        Inner::root(self)
    }
    fn lookup(&self, dir: Fid, name: &str) -> Result<Option<crate::proto::DirEntry>> {
        Inner::lookup(self, dir, name)
    }
    fn readlink_fid(&self, fid: Fid) -> Result<String> {
        Inner::readlink_fid(self, fid)
    }
    fn at_path(&self, e: Error, path: &str) -> Error {
        Inner::at_path(self, e, path)
    }
}

/// A hoard walk (hoard.rs) reaches objects as the client's callers do.
impl hoard::Source for Inner {
    fn resolve(&self, path: &str) -> Result<(Fid, FileType)> {
        Inner::resolve(self, path, true)
    }
    fn listing(&self, dir: Fid) -> Result<Arc<Vec<crate::proto::DirEntry>>> {
        Inner::listing(self, dir)
    }
    fn readlink_fid(&self, fid: Fid) -> Result<String> {
        Inner::readlink_fid(self, fid)
    }
    fn getattr(&self, fid: Fid) -> Result<Attr> {
        Inner::getattr(self, fid)
    }
    fn fetch(&self, fid: Fid) -> Result<()> {
        self.open_data(fid)?;
        self.cache.closed(fid);
        Ok(())
    }
}

/// Reintegration (reintegrate.rs) rereads the listings emulation edited.
impl reintegrate::OnEmpty for Inner {
    fn log_emptied(&self) {
        self.drop_edited_listings();
    }
}

impl Inner {
    /// The parts the one sender of records works with (reintegrate.rs).
    fn reintegrator(&self) -> reintegrate::Reintegrator<'_> {
        reintegrate::Reintegrator {
            outbox: &self.outbox,
            servers: &self.servers,
            cml: &self.cml,
            cache: &self.cache,
            callbacks: &self.callbacks,
            counters: &self.counters,
            mode: &self.emu.mode,
            backoff: &self.emu.backoff,
            on_empty: self,
        }
    }

    /// The connected write path (reintegrate.rs).
    pub(crate) fn commit_connected(
        &self,
        op: RecordOp,
        data: Option<&std::fs::File>,
    ) -> Result<std::result::Result<Attr, reintegrate::Deferred>> {
        self.reintegrator().commit_connected(op, data)
    }

    /// Send the pending log (reintegrate.rs).
    pub(crate) fn reintegrate_pending(&self, min_age: Option<Duration>) -> Result<()> {
        self.reintegrator().reintegrate_pending(min_age)
    }

    /// The parts conflicts live in (conflict.rs).
    pub(crate) fn conflicts(&self) -> conflict::Conflicts<'_> {
        conflict::Conflicts {
            cache: &self.cache,
            cml: &self.cml,
            callbacks: &self.callbacks,
        }
    }

    /// Walk the hoard profile now (hoard.rs).
    pub(crate) fn hoard_walk(&self) -> Result<HoardReport> {
        hoard::walk(
            &self.cml.db,
            &self.cache,
            &self.callbacks,
            &self.counters,
            self,
        )
    }

    /// The object `path` names (the final symlink followed if `follow`).
    pub(crate) fn resolve(&self, path: &str, follow: bool) -> Result<(Fid, FileType)> {
        namei::resolve(self, path, follow)
    }

    /// The directory that holds `path`'s last component, and that name.
    pub(crate) fn resolve_parent(&self, path: &str) -> Result<(Fid, String)> {
        namei::resolve_parent(self, path)
    }

    /// Swap `link` to `target` and fail remote operations (failover.rs).
    pub(crate) fn fail_over(&self, link: &Path, target: &Path) -> Result<()> {
        failover::fail_over(
            &self.emu.mode,
            &self.servers.interrupt,
            &self.callbacks.events,
            link,
            target,
        )
    }

    /// Undo a failover: find a server through the prober's path (callers
    /// stay failed over meanwhile), revalidate the cache, and only then swap
    /// `link` to `target` and let remote operations through. `Again` while no
    /// server answers.
    pub(crate) fn fail_back(&self, link: &Path, target: &Path) -> Result<()> {
        let again = |e: Error| Error::Again(format!("no server answers, staying failed over: {e}"));
        let int = &self.health.interrupt;
        let s = self
            .servers
            .probe_session(int, self.servers.timing().rpc_timeout)
            .map_err(again)?;
        self.revalidate_on(&s, int).map_err(again)?;
        failover::finish_fail_back(
            &self.emu.mode,
            &self.servers.interrupt,
            &self.callbacks.events,
            link,
            target,
            || self.health.mark_up(&self.callbacks.events, &s.server),
        )
    }

    /// The parent directory and last name of `path`, which must not exist
    /// yet (`Exists` otherwise): where mkdir and symlink make their object.
    fn free_name(&self, path: &str) -> Result<(Fid, String)> {
        let (parent, name) = self.resolve_parent(path)?;
        if self.lookup(parent, &name)?.is_some() {
            return Err(Error::Exists(path.to_string()));
        }
        Ok((parent, name))
    }

    /// Make a new object `name` in `parent` through the CML: a fresh fid,
    /// the record `build` makes for it, `install` to cache what the server
    /// answered, a callback on it, and the entry in the parent's listing.
    /// The one path of create, mkdir and symlink.
    pub(crate) fn create_object(
        &self,
        parent: Fid,
        ftype: FileType,
        build: impl FnOnce(Fid, Timespec) -> RecordOp,
        install: impl FnOnce(&Attr) -> Result<()>,
    ) -> Result<Fid> {
        let fid = self
            .fids
            .new_fid(&self.servers, parent.volume, !self.emu.offline())?;
        let now = Timespec::now();
        let ptok = self.callbacks.token(parent);
        let tok = self.callbacks.token(fid);
        let op = build(fid, now);
        let attr = self.commit(op.clone(), None)?;
        install(&attr)?;
        // A new object has no extended attributes: known without asking,
        // even while its creation is only in the log.
        self.xattr_cache.put(fid, attr.version, Default::default());
        self.callbacks.grant(fid, tok);
        self.after_record(&op, ftype, &[(parent, ptok)], now);
        Ok(fid)
    }

    fn root(&self) -> Result<Fid> {
        self.emulated_root()
    }

    fn commit(&self, op: RecordOp, data: Option<&std::fs::File>) -> Result<Attr> {
        let fid = op.target();
        let attr = self.commit_op(op, data)?;
        // None of these records touches extended attributes.
        self.xattr_cache.carry(fid, attr.version);
        Ok(attr)
    }

    /// Revalidate every cached object with a few `GetAttrs` (many fids each)
    /// instead of refetching: after a restart, unchanged objects are reused.
    fn revalidate_all(&self) -> Result<()> {
        let s = self.servers.session()?;
        self.revalidate_on(&s, &self.servers.interrupt)
    }

    /// As `revalidate_all`, on a given session and interrupt (the prober
    /// revalidates while callers are still failed over).
    fn revalidate_on(&self, s: &Session, interrupt: &Interrupt) -> Result<()> {
        // One ValidateVolume per volume; objects of a volume whose stamp
        // does not prove it unchanged are checked in batches (stamps.rs).
        let parts = stamps::Parts {
            cache: &self.cache,
            cml: &self.cml,
            callbacks: &self.callbacks,
            counters: &self.counters,
        };
        self.emu
            .stamps
            .validate_volumes(&parts, s, interrupt, |fids| {
                self.fetch_attrs_on(s, interrupt, fids)
            })
    }

    /// `GetAttrs` for `fids`: caches what came back and takes the callbacks
    /// the server granted (unless a break overtook them). Objects that are
    /// gone are forgotten.
    fn fetch_attrs(&self, fids: &[Fid]) -> Result<Vec<Result<Attr>>> {
        let s = self.servers.session()?;
        self.fetch_attrs_on(&s, &self.servers.interrupt, fids)
    }

    fn fetch_attrs_on(
        &self,
        s: &Session,
        interrupt: &Interrupt,
        fids: &[Fid],
    ) -> Result<Vec<Result<Attr>>> {
        let tokens: Vec<Token> = fids.iter().map(|f| self.callbacks.token(*f)).collect();
        let reply = s.call(
            &Msg::GetAttrs {
                fids: fids.to_vec(),
            },
            interrupt,
        )?;
        Counters::add(&self.counters.getattr_rpcs, 1);
        let Msg::Attrs { items } = reply else {
            return Err(Error::Protocol(format!("GetAttrs answered with {reply:?}")));
        };
        if items.len() != fids.len() {
            return Err(Error::Protocol(
                "GetAttrs answered with the wrong count".into(),
            ));
        }
        let mut out = Vec::with_capacity(fids.len());
        for ((fid, tok), item) in fids.iter().zip(tokens).zip(items) {
            match item {
                Ok(attr) => {
                    let unchanged = self
                        .cache
                        .get(*fid)
                        .is_some_and(|e| e.data_version == Some(attr.version));
                    if unchanged {
                        Counters::add(&self.counters.validations_unchanged, 1);
                    }
                    self.cache.set_attr(&attr);
                    self.callbacks.grant(*fid, tok);
                    out.push(Ok(attr));
                }
                Err(code) => {
                    self.cache.forget(*fid);
                    out.push(Err(Error::from_wire(code, format!("object {fid}"))));
                }
            }
        }
        Ok(out)
    }

    /// Whether the cached copy of `fid` may be used without asking: the
    /// callback holds and the session is fresh (heard from within
    /// `dead_after`; a client that was itself stopped, or cut off by a break
    /// timeout it has not noticed yet, cannot know what it missed).
    fn trusts(&self, fid: Fid) -> bool {
        self.callbacks.holds(fid) && self.servers.fresh()
    }

    /// Status of `fid`: from the cache while the callback holds, else asked.
    fn getattr(&self, fid: Fid) -> Result<Attr> {
        if self.trusts(fid) {
            if let Some(e) = self.cache.get(fid) {
                return Ok(e.attr);
            }
        }
        self.emulate(
            Some(fid),
            || self.fetch_attrs(&[fid])?.remove(0),
            || self.cached_attr(fid),
        )
    }

    /// A directory's entries: cached while the callback holds, else read
    /// page by page (restarting if the directory changes between pages).
    fn listing(&self, dir: Fid) -> Result<Arc<Vec<crate::proto::DirEntry>>> {
        if self.trusts(dir) {
            if let Some(l) = self.cache.get(dir).and_then(|e| e.listing_shared()) {
                return Ok(l);
            }
        }
        let offline = || {
            self.cache
                .get(dir)
                .and_then(|e| e.listing_shared())
                .ok_or_else(|| emulation::uncached(dir))
        };
        self.emulate(Some(dir), || self.read_dir(dir).map(Arc::new), offline)
    }

    fn read_dir(&self, dir: Fid) -> Result<Vec<crate::proto::DirEntry>> {
        let tok = self.callbacks.token(dir);
        let s = self.servers.session()?;
        let mut restarts = 0;
        'again: loop {
            let mut cursor = 0;
            let mut entries = Vec::new();
            let mut version = None;
            loop {
                let reply = s.call(&Msg::ReadDir { fid: dir, cursor }, &self.servers.interrupt)?;
                Counters::add(&self.counters.readdir_rpcs, 1);
                let Msg::DirPage {
                    attr,
                    entries: page,
                    next,
                } = reply
                else {
                    return Err(Error::Protocol(format!("ReadDir answered with {reply:?}")));
                };
                if attr.ftype != FileType::Dir {
                    return Err(Error::NotDir(format!("object {dir}")));
                }
                if version.is_some_and(|v| v != attr.version) {
                    restarts += 1;
                    if restarts > 100 {
                        return Err(Error::Again(format!("directory {dir} keeps changing")));
                    }
                    continue 'again;
                }
                version = Some(attr.version);
                entries.extend(page);
                match next {
                    Some(n) => cursor = n,
                    None => {
                        self.cache.set_listing(&attr, entries.clone());
                        self.callbacks.grant(dir, tok);
                        return Ok(entries);
                    }
                }
            }
        }
    }

    fn lookup(&self, dir: Fid, name: &str) -> Result<Option<crate::proto::DirEntry>> {
        Ok(self.listing(dir)?.iter().find(|e| e.name == name).cloned())
    }

    /// A symlink's target: fetched once, then cached for the fid's life (a
    /// symlink never changes its target).
    fn readlink_fid(&self, fid: Fid) -> Result<String> {
        if let Some(t) = self.cache.get(fid).and_then(|e| e.symlink) {
            return Ok(t);
        }
        if self.emu.offline() {
            return Err(emulation::uncached(fid));
        }
        let tmp = self.cache.temp_container(fid);
        let res = (|| {
            let mut f = std::fs::File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| Error::io("creating a temporary container", e))?;
            let tok = self.callbacks.token(fid);
            let (attr, len) =
                self.servers
                    .session()?
                    .fetch(fid, &mut f, &self.servers.interrupt)?;
            Counters::add(&self.counters.fetches, 1);
            Counters::add(&self.counters.fetch_bytes, len);
            if attr.ftype != FileType::Symlink || len > MAX_SYMLINK as u64 {
                return Err(Error::Invalid(format!("object {fid} is not a symlink")));
            }
            let target = std::fs::read_to_string(&tmp)
                .map_err(|_| Error::Protocol(format!("symlink {fid} target is not UTF-8")))?;
            self.cache.set_symlink(&attr, target.clone());
            self.callbacks.grant(fid, tok);
            Ok(target)
        })();
        let _ = std::fs::remove_file(&tmp);
        res
    }

    /// Make the container of file `fid` hold its current contents and count
    /// an opener: trusted under a callback, revalidated by version when the
    /// callback is gone, fetched whole otherwise.
    fn open_data(&self, fid: Fid) -> Result<Attr> {
        let offline = || {
            self.cache
                .try_open(fid)
                .ok_or_else(|| emulation::uncached(fid))
        };
        self.emulate(Some(fid), || self.open_data_online(fid), offline)
    }

    fn open_data_online(&self, fid: Fid) -> Result<Attr> {
        if self.trusts(fid) {
            if let Some(a) = self.cache.try_open(fid) {
                return Ok(a);
            }
        } else if self
            .cache
            .get(fid)
            .is_some_and(|e| e.data_version.is_some())
        {
            self.fetch_attrs(&[fid])?.remove(0)?;
            if self.callbacks.holds(fid) {
                if let Some(a) = self.cache.try_open(fid) {
                    return Ok(a);
                }
            }
        }
        self.fetch_file(fid)
    }

    fn fetch_file(&self, fid: Fid) -> Result<Attr> {
        let tok = self.callbacks.token(fid);
        let tmp = self.cache.temp_container(fid);
        let res = (|| {
            let mut f = std::fs::File::options()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| Error::io("creating a temporary container", e))?;
            let (attr, len) =
                self.servers
                    .session()?
                    .fetch(fid, &mut f, &self.servers.interrupt)?;
            Counters::add(&self.counters.fetches, 1);
            Counters::add(&self.counters.fetch_bytes, len);
            if attr.ftype == FileType::Dir {
                return Err(Error::IsDir(format!("object {fid}")));
            }
            let attr = Attr { size: len, ..attr };
            self.cache.install(&attr, &tmp, true)?;
            self.callbacks.grant(fid, tok);
            Ok(attr)
        })();
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res
    }

    /// After a record changed `attr.fid`: cache its new status (or forget it
    /// when its last link went) and keep the callback the writer holds.
    fn object_changed(&self, attr: &Attr, tok: Token) {
        if attr.nlink == 0 {
            self.callbacks.break_fids(&[attr.fid]);
            self.cache.forget(attr.fid);
        } else {
            self.cache.set_attr(attr);
            self.callbacks.grant(attr.fid, tok);
        }
    }

    /// After `op` committed (or was applied locally): edit each directory
    /// it changed the way the server did (`namespace::listing_edits`), one
    /// `after_dir_change` per directory, with the token taken for it before.
    fn after_record(&self, op: &RecordOp, ftype: FileType, toks: &[(Fid, Token)], now: Timespec) {
        let edits = namespace::listing_edits(op, ftype);
        let mut dirs: Vec<Fid> = edits.iter().map(|(d, _)| *d).collect();
        dirs.dedup();
        for dir in dirs {
            let Some((_, tok)) = toks.iter().find(|(d, _)| *d == dir) else {
                continue;
            };
            self.after_dir_change(dir, *tok, now, |l| namespace::apply_edits(l, dir, &edits));
        }
    }

    /// After a record changed `dir`'s entries: edit the cached listing the
    /// same way and bump its version by one, as the server did. If the
    /// listing was not current, or a break overtook us, drop the callback so
    /// the next lookup rereads it.
    fn after_dir_change(
        &self,
        dir: Fid,
        tok: Token,
        mtime: Timespec,
        edit: impl FnOnce(&mut Vec<crate::proto::DirEntry>),
    ) {
        let edited = self.cache.update(None, dir, |e| {
            let version = e.attr.version;
            match &mut e.listing {
                Some((v, l)) if *v == version => {
                    edit(Arc::make_mut(l));
                    // As the server counts them: entries, and 2 + subdirectories.
                    e.attr.size = l.len() as u64;
                    e.attr.nlink = 2 + l.iter().filter(|d| d.ftype == FileType::Dir).count() as u32;
                    *v += 1;
                    e.attr.version += 1;
                    e.attr.mtime = mtime;
                    e.attr.ctime = mtime;
                    true
                }
                _ => false,
            }
        });
        // A directory with logged changes is served from the cache anyway.
        let local = self.cml.mentions(dir);
        if edited != Some(true) || (!self.callbacks.grant(dir, tok) && !local) {
            self.callbacks.break_fids(&[dir]);
        }
    }
}

/// Disconnected operation (emulation.rs keeps its state and the local
/// helpers; these need the whole client).
impl Inner {
    /// Configure and start disconnected operation: decide whether the client
    /// starts connected, pin the containers the log needs, reintegrate what
    /// a previous run left (connected), and start the reintegrator thread.
    pub(crate) fn start_emulation(
        self: &Arc<Inner>,
        first: Result<()>,
        cfg: &Config,
    ) -> Result<()> {
        let emu = &self.emu;
        // Automatic failover is the other answer to a dead server (remote
        // calls fail with EIO, programs use the local copy): with it
        // configured, the client does not emulate.
        let auto_failover = cfg.failover_link.is_some() && cfg.failover_target.is_some();
        emu.mode.configure(
            cfg.disconnected_operation && !auto_failover,
            cfg.write_disconnected,
        );
        emu.set_periods(cfg.reintegration_age_ms, cfg.hoard_walk_ms);
        emu.set_root(emulation::load_root(&self.cml.db));
        emu.stamps.take_saved(&self.cml.db);
        for fid in self.cml.stored_fids() {
            self.cache.pin(fid);
        }
        self.cache.sweep_unused_containers();
        emulation::redo_log_in_cache(&self.cache, &self.cml);
        for r in self.cml.pending() {
            self.emu.note_edited(&r.op);
        }
        match first {
            Ok(()) => {
                self.remember_root()?;
                self.reintegrate_pending(None)?;
                self.revalidate_all()?;
                self.top_up_fids();
            }
            // Never connected with this cache: nothing to serve offline.
            Err(e) if !emu.enabled() || emu.root().is_none() || !mode::unreachable(&e) => {
                return Err(e)
            }
            Err(_) => emu.mode.start_emulating(),
        }
        let period = Duration::from_millis(cfg.heartbeat_ms.max(10));
        let weak = Arc::downgrade(self);
        let state = self.emu.clone();
        emulation::spawn_reintegrator(weak, state, period)
    }

    /// Keep the root fid of the session, so a restart without a server can
    /// still walk paths.
    fn remember_root(&self) -> Result<()> {
        let root = self.servers.session()?.root;
        if self.emu.root() == Some(root) {
            return Ok(());
        }
        emulation::store_root(&self.cml.db, root)?;
        self.emu.set_root(Some(root));
        Ok(())
    }

    /// The root fid: the session's, or offline the one remembered.
    pub(crate) fn emulated_root(&self) -> Result<Fid> {
        let online = || self.servers.session().map(|s| s.root);
        let offline = || {
            self.emu
                .root()
                .ok_or_else(|| Error::Timeout("disconnected: the root is not known".into()))
        };
        self.emulate(None, online, offline)
    }

    /// Keep enough reserved fids that creating works for a while offline.
    fn top_up_fids(&self) {
        if let Some(root) = self.emu.root() {
            if self.fids.left(root.volume) < fids::FID_RESERVE_LOW {
                let _ = self.fids.reserve(&self.servers, root.volume);
            }
        }
    }

    /// Run `online`; when the client is disconnected (or becomes so because
    /// `online` could not reach a server), or `fid` has local changes not yet
    /// on the server, run `offline` (the cache) instead.
    pub(crate) fn emulate<T>(
        &self,
        fid: Option<Fid>,
        online: impl FnOnce() -> Result<T>,
        offline: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let emu = &self.emu;
        // Entered before the mode is read: if the mode leaves "connected"
        // after this, the release ends `online`'s waits at once.
        let _call = self.servers.interrupt.enter_call();
        if emu.offline() {
            return offline();
        }
        // (A refused or reset connection fails a call at once; a hung
        // server is judged by the prober after `dead_after_ms`, which
        // switches the mode and releases this call.)
        if let Some(f) = fid {
            if emu.pending() > 0 && self.cml.mentions(f) && self.cache.get(f).is_some() {
                return offline();
            }
        }
        match online() {
            Err(e) if self.went_offline(&e) => offline(),
            r => r,
        }
    }

    /// After `e` from the network: switch to disconnected operation if it
    /// says no server answers (and emulation is on, and we are not failed
    /// over, which must fail with EIO). Returns whether we are offline now.
    pub(crate) fn went_offline(&self, e: &Error) -> bool {
        // Local failures (`Io`: the index, a container) are not a
        // server's silence.
        if !mode::unreachable(e) {
            return false;
        }
        self.server_lost()
    }

    /// No server answers: emulate (if the mode allows), releasing the
    /// calls that started while connected. Returns whether we emulate.
    pub(crate) fn server_lost(&self) -> bool {
        let emu = &self.emu;
        let root_known = emu.root().is_some();
        if !emu.mode.server_lost(root_known, &self.servers.interrupt) {
            return false;
        }
        emu.wake();
        true
    }

    /// Name the caller's path in an error of disconnected operation (a
    /// `Timeout` while the mode is emulating: nothing else times out then).
    pub(crate) fn at_path(&self, e: Error, path: &str) -> Error {
        match e {
            Error::Timeout(m) if self.emu.offline() => Error::Timeout(format!("{path}: {m}")),
            e => e,
        }
    }

    /// Cached status, offline.
    pub(crate) fn cached_attr(&self, fid: Fid) -> Result<Attr> {
        self.cache
            .get(fid)
            .map(|e| e.attr)
            .ok_or_else(|| emulation::uncached(fid))
    }

    /// The write path. Connected with an empty log: log, send, wait for the
    /// server's commit (decision 1). Disconnected, in write-disconnected
    /// mode, or while older records wait: log (with the optimisations) and
    /// apply locally; the reintegrator sends it later.
    pub(crate) fn commit_op(&self, op: RecordOp, data: Option<&std::fs::File>) -> Result<Attr> {
        let emu = &self.emu;
        // Before the mode is read (see `emulate`).
        let _call = self.servers.interrupt.enter_call();
        let mut connected = !emu.offline() && !emu.write_disconnected();
        if connected {
            let (cached, check) = emulation::version_for(&self.cache, &op);
            // Behind records the server refused for space: this one would
            // wait behind them, so the caller hears why now.
            if emu.pending() > 0 {
                if let Some(e) = emu.backing_off() {
                    return Err(e);
                }
            }
            match self.commit_connected(op.clone(), data)? {
                Ok(attr) => return Ok(attr),
                Err(reintegrate::Deferred::Unreachable(id)) => {
                    // (commit_connected made the container and the record
                    // durable, in that order.)
                    // Kept in the log; the server may or may not have it
                    // (if it does, its store id makes the replay a no-op).
                    // Sent later, it checks the version we had.
                    self.cml.check_kept(id, if check { cached } else { None })?;
                    self.went_offline(&Error::Eio("the server stopped answering".into()));
                    emulation::pin_if_store(&self.cache, &op);
                    let attr = emulation::apply_locally(&self.cache, &op, &[], false)?;
                    emulation::keep_contents_current(&self.cache, &op, &attr);
                    return Ok(attr);
                }
                Err(reintegrate::Deferred::NotLogged(Some(e))) => {
                    // The data could not be uploaded: no server. Logged
                    // below as a disconnected record (or the error, without
                    // emulation).
                    if !self.went_offline(&e) {
                        return Err(e);
                    }
                    connected = false;
                }
                Err(reintegrate::Deferred::NotLogged(None)) => {
                    // Records logged earlier go first (store-id order):
                    // this one waits its turn in the log like theirs.
                }
            }
        }
        emulation::check_locally(&self.cache, &op)?;
        // The record about to be logged is acknowledged at once and sends
        // the container later: its data must be on disk before the record
        // is (after a power cut, a durable record over a lost container
        // would send an empty file over the server's copy).
        emulation::make_data_durable(&self.cache, &op, data)?;
        self.emu.note_edited(&op);
        let (cached, check) = emulation::version_for(&self.cache, &op);
        let last_link = self
            .cache
            .get(op.target())
            .is_none_or(|e| e.attr.nlink <= 1);
        let logged = self
            .cml
            .log_with(op.clone(), cached, true, check && !connected, last_link)?;
        emulation::pin_if_store(&self.cache, &op);
        let attr =
            emulation::apply_locally(&self.cache, &op, &logged.cancelled, logged.record.is_none())?;
        emulation::keep_contents_current(&self.cache, &op, &attr);
        if connected {
            // Connected semantics: return once the server has it.
            if let Err(e) = self.reintegrate_pending(None) {
                if !self.went_offline(&e) {
                    return Err(e);
                }
            }
        } else {
            emu.wake();
        }
        Ok(attr)
    }

    /// The log is empty: drop every listing edited locally (see `edited`)
    /// so it is reread, and refresh those objects' status from the server
    /// (their predicted versions may be off), many fids per request.
    pub(crate) fn drop_edited_listings(&self) {
        let fids: Vec<Fid> = self.emu.take_edited();
        for f in &fids {
            self.cache.update(None, *f, |e| e.listing = None);
        }
        let known: Vec<Fid> = fids
            .iter()
            .copied()
            .filter(|f| self.cache.get(*f).is_some())
            .collect();
        for chunk in known.chunks(4096) {
            if self.fetch_attrs(chunk).is_err() {
                self.callbacks.break_fids(chunk);
            }
        }
    }

    /// A server answers again: reintegrate the log, revalidate the cache,
    /// and only then serve callers from the server again. Callers keep being
    /// served from the cache meanwhile.
    fn reconnect(&self) -> Result<()> {
        self.remember_root()?;
        if self.emu.backing_off().is_none() {
            match self.reintegrate_pending(None) {
                // The server answers but has no room: serve it again; the
                // records stay logged and are retried after the back-off.
                Err(e) if reintegrate::space_error(&e) => {}
                r => r?,
            }
        }
        // Objects the log still holds changes for are skipped.
        self.revalidate_all()?;
        self.top_up_fids();
        self.emu.mode.reconnected();
        Ok(())
    }

    /// One turn of the reintegrator while connected: send what is due.
    fn send_due(&self) -> Result<()> {
        let emu = &self.emu;
        let age = if emu.write_disconnected() {
            Some(emu.age())
        } else {
            None
        };
        self.reintegrate_pending(age)
    }
}

/// Open files (file.rs) store through the client's write path.
impl file::Store for Inner {
    fn cache(&self) -> &Cache {
        &self.cache
    }
    fn callbacks(&self) -> &Callbacks {
        &self.callbacks
    }
    fn commit(&self, op: RecordOp, data: Option<&std::fs::File>) -> Result<Attr> {
        Inner::commit(self, op, data)
    }
}

impl file::Opener for Inner {
    fn resolve(&self, path: &str, follow: bool) -> Result<(Fid, FileType)> {
        Inner::resolve(self, path, follow)
    }
    fn resolve_parent(&self, path: &str) -> Result<(Fid, String)> {
        Inner::resolve_parent(self, path)
    }
    fn lookup(&self, dir: Fid, name: &str) -> Result<Option<crate::proto::DirEntry>> {
        Inner::lookup(self, dir, name)
    }
    fn getattr(&self, fid: Fid) -> Result<Attr> {
        Inner::getattr(self, fid)
    }
    fn open_data(&self, fid: Fid) -> Result<Attr> {
        Inner::open_data(self, fid)
    }
    fn create_object(
        &self,
        parent: Fid,
        ftype: FileType,
        build: impl FnOnce(Fid, Timespec) -> RecordOp,
        install: impl FnOnce(&Attr) -> Result<()>,
    ) -> Result<Fid> {
        Inner::create_object(self, parent, ftype, build, install)
    }
}

/// The prober's view of the client (probe.rs).
impl probe::Watched for Inner {
    fn health(&self) -> &Health {
        &self.health
    }
    fn servers(&self) -> &Servers {
        &self.servers
    }
    fn events(&self) -> &EventBus {
        &self.callbacks.events
    }
    fn mode(&self) -> &mode::Mode {
        &self.emu.mode
    }
    fn pending(&self) -> usize {
        self.emu.pending()
    }
    fn server_lost(&self) -> bool {
        Inner::server_lost(self)
    }
    fn revalidate_on(&self, s: &Session, interrupt: &Interrupt) -> Result<()> {
        Inner::revalidate_on(self, s, interrupt)
    }
    fn fail_over(&self, link: &Path, target: &Path) -> Result<()> {
        Inner::fail_over(self, link, target)
    }
    fn fail_back(&self, link: &Path, target: &Path) -> Result<()> {
        Inner::fail_back(self, link, target)
    }
}

/// The reintegrator thread's turns (emulation.rs).
impl emulation::Turns for Inner {
    fn health_up(&self) -> bool {
        self.health.is_up()
    }
    fn reconnect(&self) -> Result<()> {
        Inner::reconnect(self)
    }
    fn went_offline(&self, e: &Error) -> bool {
        Inner::went_offline(self, e)
    }
    fn send_due(&self) -> Result<()> {
        Inner::send_due(self)
    }
    fn hoard_walk(&self) -> Result<HoardReport> {
        Inner::hoard_walk(self)
    }
}

impl Client {
    /// Records logged and not yet on the server.
    pub fn pending_records(&self) -> usize {
        self.inner.cml.len()
    }

    /// Send the whole log now (also in write-disconnected mode, whatever the
    /// records' age), reconnecting first if disconnected. Returns once the
    /// log is empty (conflicts set aside); `Eio`/`Timeout` if no server
    /// answers, and the log stays as it was.
    pub fn reintegrate_now(&self) -> Result<()> {
        let inner = &self.inner;
        // Asked for explicitly (space was freed, say): no waiting.
        inner.emu.reset_backoff();
        if inner.emu.offline() || !inner.health.is_up() {
            let s = inner.servers.session()?;
            inner.reconnect().inspect_err(|e| {
                inner.went_offline(e);
            })?;
            // The log went through and the cache is revalidated: as good a
            // proof that the server is up as the prober's pings.
            inner.health.mark_up(&inner.callbacks.events, &s.server);
            return Ok(());
        }
        inner.reintegrate_pending(None).inspect_err(|e| {
            inner.went_offline(e);
        })
    }

    /// Turn write-disconnected mode on (mutations are logged and sent in
    /// batches once older than `reintegration_age_ms`) or off (back to
    /// write-through; what is logged is sent at once).
    pub fn set_write_disconnected(&self, on: bool) {
        let emu = &self.inner.emu;
        emu.mode.set_write_disconnected(on);
        emu.wake();
    }

    /// Whether write-disconnected mode is on (see
    /// [`Client::set_write_disconnected`]).
    pub fn write_disconnected(&self) -> bool {
        self.inner.emu.write_disconnected()
    }
}
