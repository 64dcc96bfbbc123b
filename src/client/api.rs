//! The public facade: `Client`, the types its calls return, and its calls
//! (paths, files, modes, conflicts, hoarding). Every call goes to the parts
//! the client owns (`Inner`, inner.rs). The fid API (at.rs) and the
//! operator calls (admin.rs) are more `impl Client` blocks over this
//! facade; no other module names `Client`, and none of the parts imports
//! the facade or `Inner`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::bounded;

use super::cache::{self, Cache};
use super::callback::Callbacks;
use super::cml::Cml;
use super::config::Config;
use super::conflict::{describe, Conflict, Keep};
use super::conn::{Identity, Servers, Timing};
use super::event::{EventBus, InvalidationHook};
use super::file::File;
use super::hoard::{entries, parse_profile, Expand, HoardEntry, HoardReport, HOARD};
use super::inner::{secure_cache_dir, Inner};
use super::probe::Health;
use super::stats::{ClientStats, Counters};
use super::{emulation, fids, file, identity, mode, probe, reintegrate};
use crate::proto::{auth, Attr, Fid, FileType, RecordOp, Replaces, Timespec, MAX_FIDS};
use crate::{Error, Result};

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
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

impl Clone for Client {
    fn clone(&self) -> Client {
        self.inner
            .handles
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Client {
            inner: self.inner.clone(),
        }
    }
}

/// `CODA_CLIENT_INDEX_THREAD=off`: callers commit their unsynced index
/// saves themselves, as before the index thread (for measuring it).
const INDEX_THREAD_ENV: &str = "CODA_CLIENT_INDEX_THREAD";

/// How long the index thread lets saves gather before it commits them.
/// Measured (docs/BENCHMARKS.md, "The index thread, riding"): 5 ms left 4
/// writers at 2.2-2.5x one writer's files/s, 25 ms 2.5-2.8x, 50 ms no
/// better; at 2,500 files/s 25 ms gathers about 120 rows, under the 256
/// at which a caller commits them itself.
const SAVE_GATHER: Duration = Duration::from_millis(25);

/// The client's index thread, `coda-index`: every unsynced save of the
/// cache rides (`Cache::background_saves`), and this thread commits those
/// still waiting, whatever gathered in `SAVE_GATHER`, in one transaction;
/// so no caller pays redb's commit on its own path (docs/CLIENT.md "The
/// index thread"). It waits on the index's signal (`RiderSignal`), holding
/// neither the index (whose file stays locked while held) nor the client,
/// which it holds only for a commit; it ends with them, and the client's
/// last durable commit takes along what it had not committed.
fn spawn_index_saver(
    inner: &Arc<Inner>,
    signal: Arc<cache::RiderSignal>,
    stop: crossbeam_channel::Receiver<()>,
) -> Result<()> {
    let weak = Arc::downgrade(inner);
    std::thread::Builder::new()
        .name("coda-index".into())
        .spawn(move || loop {
            let waiting = match signal.wait(Duration::from_millis(50)) {
                // The index is gone with the client.
                None => return,
                Some(w) => w,
            };
            if matches!(
                stop.try_recv(),
                Err(crossbeam_channel::TryRecvError::Disconnected)
            ) {
                return;
            }
            if waiting {
                // A burst's saves gather: one transaction for them all
                // costs little more than one for the first.
                std::thread::sleep(SAVE_GATHER);
                let Some(inner) = weak.upgrade() else { return };
                inner.cache.flush_riders();
            }
        })
        .map_err(|e| Error::io("spawning the index thread", e))?;
    inner.cache.background_saves();
    Ok(())
}

impl Drop for Client {
    fn drop(&mut self) {
        // The last handle: make the index durable here, before the caller
        // goes on (and perhaps exits). The client itself may outlive it for
        // a moment on a thread of its own (the prober or the reintegrator
        // holding it for a turn), whose drop a process exit would cut short,
        // losing every index commit not synced.
        if self
            .inner
            .handles
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1
        {
            self.inner.flush_index();
        }
    }
}

impl Client {
    /// Open (or create) the cache, connect to a server and authenticate.
    pub fn new(cfg: Config) -> Result<Client> {
        let cache_dir = cfg
            .cache_dir
            .clone()
            .ok_or_else(|| Error::Invalid("config: cache_dir is required".into()))?;
        // `anonymous` has no secret (the server must allow it: SERVER.md).
        let secret = match cfg.secret_file.clone() {
            None if cfg.user == crate::proto::acl::ANONYMOUS => [0u8; 32],
            f => auth::read_secret_file(
                &f.ok_or_else(|| Error::Invalid("config: secret_file is required".into()))?,
            )?,
        };
        let tls = super::conn::tls_config(&cfg, cfg.secret_file.as_deref())?;
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
        let rider_signal = db.rider_signal();
        let cml = Cml::open(db, pending)?;
        let timing = Timing {
            rpc_timeout: Duration::from_millis(cfg.rpc_timeout_ms),
            dead_after: Duration::from_millis(cfg.dead_after_ms),
            bind_addr: cfg.bind_addr,
            bulk_max: cfg.bulk_connections.max(1),
            election_wait: Duration::from_millis(cfg.election_wait_ms),
        };
        let ident = Identity {
            client_id,
            epoch,
            user: cfg.user.clone(),
            secret,
            tls,
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
            xattr_cache: super::xattr::XattrCache::default(),
            _stop_probe: stop,
            handles: std::sync::atomic::AtomicUsize::new(1),
        });
        if inner.servers.several() {
            super::group::spawn(Arc::downgrade(&inner), stopped.clone())?;
        }
        if std::env::var(INDEX_THREAD_ENV).map_or(true, |v| v != "off") {
            spawn_index_saver(&inner, rider_signal, stopped.clone())?;
        }
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
    /// synchronously on the thread that learned of it; a server's break is
    /// told on a thread of the session's own, before the break is
    /// acknowledged, so whoever keeps copies (the mount's kernel caches)
    /// drops them before the writer's change is. The client stopped
    /// trusting them already, and its replies keep arriving meanwhile. The
    /// hook must return soon (well within the server's break timeout) and
    /// must not call the client.
    pub fn set_invalidation_hook(&self, hook: Option<InvalidationHook>) {
        self.inner.callbacks.set_hook(hook);
    }

    /// Whether the client answers for `fid` from its cache without asking
    /// the server: its callback holds and the session is fresh. A copy of
    /// such an answer stays right until an invalidation names it.
    pub fn trusts_cached(&self, fid: Fid) -> bool {
        self.inner.trusts(fid)
    }

    /// The version and permission bits of the regular file `fid` when the
    /// client vouches, right now, that its cached container holds that very
    /// version: the callback holds on a fresh session, the contents are
    /// current and nothing written here waits to be stored. `None`
    /// otherwise (then only an open through the client is right). A copy
    /// of a container opened for this version stays right until an
    /// invalidation names `fid`. Never waits for a server.
    pub fn trusted_data_version(&self, fid: Fid) -> Option<(u64, u32)> {
        if !self.inner.trusts(fid) {
            return None;
        }
        self.data_version_if_trusted(fid, || self.inner.trusts(fid))
    }

    /// [`Client::trusted_data_version`] that never asks the server: `None`
    /// also when the session was not heard from within its trust window
    /// (where the other would check with a round trip). For callers that
    /// must not wait at all (the mount's quick opens).
    pub fn trusted_data_version_now(&self, fid: Fid) -> Option<(u64, u32)> {
        let holds = |f| self.inner.callbacks.holds(f);
        if !(holds(fid) && self.inner.servers.fresh_now() && holds(fid)) {
            return None;
        }
        self.data_version_if_trusted(fid, || holds(fid))
    }

    fn data_version_if_trusted(
        &self,
        fid: Fid,
        still: impl FnOnce() -> bool,
    ) -> Option<(u64, u32)> {
        let e = self.inner.cache.get(fid)?;
        let ok = e.attr.ftype == FileType::File && e.data_current() && !e.dirty;
        // Checked again: a break that came while the entry was read.
        (ok && still()).then_some((e.attr.version, e.attr.mode & 0o7777))
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
    pub(crate) fn remove_entry(
        &self,
        parent: Fid,
        name: &str,
        dir: bool,
        path: &str,
    ) -> Result<()> {
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
        // The removed entry and the parent's listing edit are saved in one
        // index transaction (unsynced, after the record's commit, as each
        // was on its own).
        inner.cache.deferred(|| {
            inner.object_changed(&attr, tok);
            inner.after_record(&op, ent.ftype, &[(parent, ptok)], now);
        });
        Ok(())
    }

    /// A hard link: the name `name` in `parent` for `fid` (not a directory).
    pub(super) fn link_entry(&self, fid: Fid, parent: Fid, name: &str) -> Result<()> {
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
        // One index transaction for the object and the listing edit.
        inner.cache.deferred(|| {
            inner.object_changed(&attr, tok);
            inner.after_record(&op, ftype, &[(parent, ptok)], now);
        });
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
    pub(crate) fn rename_entries(
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
        // One index transaction for the object, a replaced directory and
        // both listings' edits.
        inner.cache.deferred(|| {
            inner.object_changed(&attr, tok);
            if let Some(d) = &dst {
                // The replaced object lost a link (or is gone): re-ask next time.
                inner.callbacks.break_fids(&[d.fid]);
                if d.ftype == FileType::Dir {
                    inner.cache.forget(d.fid);
                }
            }
            inner.after_record(&op, src.ftype, &[(sp, stok), (dp, dtok)], now);
        });
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
        // Says too whether the cached contents were the server's then.
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
        // like the server did): a current container stays current, if it
        // was the server's contents all along. After a break (another
        // client stored the file, and its contents were not read here
        // since) the container is an older version's; labelled with the
        // new version it would be served as current. A change applied
        // locally (logged: disconnected, write-back) is this client's view
        // until the log is sent, whatever it held, as for a listing.
        let unbroken = tok.held() && inner.callbacks.token(fid) == tok;
        let local = inner.cml.mentions(fid);
        let container = inner.cache.container(fid);
        inner.cache.update(Some(&attr), fid, |e| {
            if (unbroken || local) && e.data_current() {
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

    /// How the replicated group stands now, as its leader sees it: the
    /// term, the leader, and which members it hears. Asks the leader over
    /// the live session (connecting if there is none); a lone server
    /// answers `Invalid`, and a client that cannot reach the group fails as
    /// any remote call does.
    pub fn group_view(&self) -> Result<super::group::GroupView> {
        let servers = &self.inner.servers;
        let s = servers.session()?;
        super::group::GroupView::from_reply(
            s.call(&crate::proto::Msg::GroupStatus, &servers.interrupt)?,
        )
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

impl Client {
    /// Conflicts found by reintegration and not yet resolved, oldest first.
    pub fn conflicts(&self) -> Result<Vec<Conflict>> {
        let parts = self.inner.conflicts();
        Ok(parts
            .load()?
            .into_iter()
            .map(|(id, s)| {
                let copy = parts.copy_path(id, s.fid);
                Conflict {
                    id,
                    fid: s.fid,
                    path: s.path,
                    op: describe(&s.records[0].op),
                    reason: s.reason,
                    kind: s.kind,
                    records: s.records.len(),
                    local_copy: copy.exists().then_some(copy),
                }
            })
            .collect())
    }

    /// The server's current status of a conflict's object (`None` if it no
    /// longer exists there): the other side of [`Conflict::local_copy`].
    pub fn conflict_server_version(&self, id: u64) -> Result<Option<Stat>> {
        let c = self.find_conflict(id)?;
        match self.inner.fetch_attrs(&[c.fid])?.remove(0) {
            Ok(a) => Ok(Some(Stat::from(&a))),
            Err(Error::Stale(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn find_conflict(&self, id: u64) -> Result<Conflict> {
        self.conflicts()?
            .into_iter()
            .find(|c| c.id == id)
            .ok_or_else(|| Error::NotFound(format!("conflict {id}")))
    }

    /// Resolve conflict `id`. `Keep::Server` discards the local changes.
    /// `Keep::Local` needs a server: it sends the records again without
    /// version checks, first removing what now holds a name the local
    /// version creates (a file, or an empty directory); if they are refused
    /// again, that is a new conflict and this returns `Conflict`.
    pub fn resolve_conflict(&self, id: u64, keep: Keep) -> Result<()> {
        let inner = &self.inner;
        let parts = inner.conflicts();
        let (_, stored) = parts
            .load()?
            .into_iter()
            .find(|(i, _)| *i == id)
            .ok_or_else(|| Error::NotFound(format!("conflict {id}")))?;
        if keep == Keep::Server {
            parts.remove(id, &stored)?;
            parts.forget_local(&stored.records);
            return Ok(());
        }
        if inner.emu.offline() {
            return Err(Error::Timeout(format!(
                "conflict {id}: keeping the local version needs a server"
            )));
        }
        let mut ops = Vec::new();
        let first = &stored.records[0].op;
        if stored.kind == "Exists" {
            let parent = match first {
                RecordOp::Create { parent, name, .. }
                | RecordOp::Mkdir { parent, name, .. }
                | RecordOp::Symlink { parent, name, .. }
                | RecordOp::Mknod { parent, name, .. }
                | RecordOp::Link { parent, name, .. } => Some((*parent, name.clone())),
                _ => None,
            };
            if let Some((parent, name)) = parent {
                inner.callbacks.break_fids(&[parent]);
                if let Some(e) = inner.lookup(parent, &name)? {
                    ops.push(if e.ftype == FileType::Dir {
                        RecordOp::Rmdir {
                            parent,
                            name,
                            fid: e.fid,
                        }
                    } else {
                        RecordOp::Remove {
                            parent,
                            name,
                            fid: e.fid,
                        }
                    });
                }
            }
        }
        let gone_already = matches!(first, RecordOp::Remove { .. } | RecordOp::Rmdir { .. })
            && matches!(stored.kind.as_str(), "NotFound" | "Stale" | "Conflict");
        for (i, r) in stored.records.iter().enumerate() {
            if i == 0 && gone_already {
                continue;
            }
            let mut op = r.op.clone();
            if let RecordOp::Store { fid, .. } = op {
                // Put the preserved contents back where the log reads them.
                let copy = parts.copy_path(id, fid);
                let to = inner.cache.container(fid);
                std::fs::copy(&copy, &to)
                    .map_err(|e| Error::io(format!("restoring {}", copy.display()), e))?;
                inner.cache.update(None, fid, |e| e.data_version = None);
                inner.cache.pin(fid);
            }
            if let RecordOp::StoreInline { fid, data, .. } = &op {
                // The record carries the data; the container, the cache's
                // working copy, gets it back too.
                super::conflict::write_synced(&inner.cache.container(*fid), data)?;
                inner.cache.update(None, *fid, |e| e.data_version = None);
                inner.cache.pin(*fid);
            }
            if let RecordOp::Store {
                expected_version, ..
            }
            | RecordOp::StoreInline {
                expected_version, ..
            }
            | RecordOp::SetAttr {
                expected_version, ..
            } = &mut op
            {
                *expected_version = 0;
            }
            ops.push(op);
        }
        let mut first_new = None;
        for op in ops {
            let l = inner.cml.log(op, None, false, false)?;
            if let Some(r) = l.record {
                first_new.get_or_insert(r.store_id);
            }
        }
        parts.remove(id, &stored)?;
        inner.reintegrate_pending(None)?;
        let mut touched: Vec<Fid> = stored
            .records
            .iter()
            .flat_map(|r| super::cml::mentions(&r.op))
            .collect();
        touched.sort();
        touched.dedup();
        inner.callbacks.break_fids(&touched);
        for chunk in touched.chunks(MAX_FIDS) {
            let _ = inner.fetch_attrs(chunk);
        }
        if let Some(again) = self
            .conflicts()?
            .into_iter()
            .find(|c| first_new.is_some_and(|f| c.id >= f))
        {
            return Err(Error::Conflict(format!(
                "refused again: {} (conflict {})",
                again.reason, again.id
            )));
        }
        Ok(())
    }
}

impl Client {
    /// Add (or replace) a hoard profile entry.
    pub fn hoard_add(&self, path: &str, priority: u32, expand: Expand) -> Result<()> {
        let e = HoardEntry {
            path: path.to_string(),
            priority,
            expand,
        };
        HoardEntry::parse(&format!("{} {}", e.path, e.priority))?; // same checks as a profile line
        let w = self.inner.cml.db.begin_write()?;
        w.open_table(HOARD)?.insert(path, e.pack())?;
        w.commit()?;
        Ok(())
    }

    /// Remove a profile entry; `NotFound` if there is none for `path`.
    pub fn hoard_remove(&self, path: &str) -> Result<()> {
        let w = self.inner.cml.db.begin_write()?;
        let gone = w.open_table(HOARD)?.remove(path)?.is_some();
        w.commit()?;
        if !gone {
            return Err(Error::NotFound(format!("hoard entry {path}")));
        }
        Ok(())
    }

    /// Add every entry of a profile text (see the module docs for the format).
    pub fn hoard_load(&self, profile: &str) -> Result<()> {
        for e in parse_profile(profile)? {
            self.hoard_add(&e.path, e.priority, e.expand)?;
        }
        Ok(())
    }

    /// The profile, highest priority first.
    pub fn hoard_list(&self) -> Result<Vec<HoardEntry>> {
        let mut v = entries(&self.inner.cml.db)?;
        v.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.path.cmp(&b.path)));
        Ok(v)
    }

    /// Walk the profile now: prefetch what it covers (needs a server).
    pub fn hoard_walk(&self) -> Result<HoardReport> {
        if self.inner.emu.offline() {
            return Err(Error::Timeout(
                "disconnected: a hoard walk needs a server".into(),
            ));
        }
        self.inner.hoard_walk()
    }
}
