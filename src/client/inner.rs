//! `Inner`: the parts a client owns, bundled, and the orchestration that
//! needs them all (the write path's entry `commit_op`, emulation,
//! reconnecting, revalidation, failback, hoard walks), with the small
//! traits the modules reach it through (`Tree`, `Source`, `OnEmpty`,
//! `Turns`, `Watched`, `Store`, `Opener`). The public facade is `api.rs`;
//! no module below imports either.

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;

use super::cache::Cache;
use super::callback::{Callbacks, Token};
use super::cml::Cml;
use super::config::Config;
use super::conn::{Interrupt, Servers, Session};
use super::event::EventBus;
use super::hoard::HoardReport;
use super::probe::Health;
use super::stats::Counters;
use super::{
    conflict, emulation, failover, fids, file, hoard, mode, namei, namespace, probe, reintegrate,
    stamps,
};
use crate::proto::{Attr, Fid, FileType, Msg, RecordOp, Timespec, MAX_SYMLINK};
use crate::{Error, Result};

pub(crate) struct Inner {
    pub(crate) servers: Arc<Servers>,
    pub(crate) callbacks: Arc<Callbacks>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) cache: Cache,
    /// The persisted log and its optimiser (no network, no mode).
    pub(crate) cml: Cml,
    /// Fid ranges reserved by the server.
    pub(crate) fids: fids::Fids,
    /// Who sends now; connected records waiting for their Reintegrate.
    pub(crate) outbox: reintegrate::Outbox,
    /// The mode, and the reintegrator thread's wake-up.
    pub(crate) emu: Arc<emulation::EmuState>,
    pub(crate) health: Health,
    /// Extended attributes read or set, by object version (xattr.rs).
    pub(crate) xattr_cache: super::xattr::XattrCache,
    /// Dropped with the client: stops the prober thread.
    pub(crate) _stop_probe: Sender<()>,
    /// `Client` handles alive (api.rs): the last one to go makes the index
    /// durable itself (`flush_index`).
    pub(crate) handles: std::sync::atomic::AtomicUsize,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The client is going: its reintegrator thread must stop.
        self.emu.stop();
        self.servers.shutdown();
        self.flush_index();
    }
}

impl Inner {
    /// One durable commit of the index: the LRU positions and volume stamps
    /// not saved yet, and every earlier commit not synced (redb keeps a
    /// commit not synced only in memory until a synced one follows).
    pub(crate) fn flush_index(&self) {
        self.cache.flush_lru();
        self.emu.stamps.save(&self.cml.db, &self.callbacks);
    }
}

/// Make `cache_dir` private: the directory 0700 and every file the cache
/// keeps 0600 (CLIENT.md "File modes"). Containers are copies of files the
/// mount may show only to some users; the cache must not hand them to
/// every local user. Looser modes left by an older version are fixed, with
/// one message.
pub(crate) fn secure_cache_dir(cache_dir: &Path) -> Result<()> {
    use crate::fsmode::{create_private_dir, Fixed, DIR_MODE};
    create_private_dir(cache_dir)?;
    let mut fixed = Fixed::default();
    fixed.set(cache_dir, DIR_MODE)?;
    fixed.files_in(cache_dir)?;
    fixed.files_in(&cache_dir.join("containers"))?;
    fixed.files_in(&cache_dir.join("spares"))?;
    fixed.files_in(&cache_dir.join("conflicts"))?;
    if let Some(m) = fixed.message() {
        eprintln!("coda client: cache_dir {}: {m}", cache_dir.display());
    }
    Ok(())
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
    fn listing(&self, dir: Fid) -> Result<Arc<namespace::Listing>> {
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
    pub(crate) fn reintegrator(&self) -> reintegrate::Reintegrator<'_> {
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
    pub(crate) fn free_name(&self, path: &str) -> Result<(Fid, String)> {
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
        // The next new files' containers are made ahead at their names.
        if let Some((next, end)) = self.fids.window(fid.volume) {
            self.cache.expect_creates(fid.volume, next, end);
        }
        if ftype != FileType::File {
            self.cache.not_a_file(fid);
        }
        let now = Timespec::now();
        let ptok = self.callbacks.token(parent);
        let tok = self.callbacks.token(fid);
        let op = build(fid, now);
        let attr = match self.commit(op.clone(), None) {
            Ok(attr) => attr,
            Err(e) => {
                // Refused: the fid is never used. Not when the outcome is
                // unknown (the server may have made the file, and a fetch
                // would install its container under that name).
                if !super::mode::unreachable(&e) {
                    self.cache.not_a_file(fid);
                }
                return Err(e);
            }
        };
        // The new entry and the parent's listing edit are saved in one
        // index transaction (unsynced, after the record's commit, as each
        // was on its own).
        self.cache.deferred(|| {
            install(&attr)?;
            // A new object has no extended attributes: known without asking,
            // even while its creation is only in the log.
            self.xattr_cache.put(fid, attr.version, Default::default());
            self.callbacks.grant(fid, tok);
            self.after_record(&op, ftype, &[(parent, ptok)], now);
            Ok(fid)
        })
    }

    pub(crate) fn root(&self) -> Result<Fid> {
        self.emulated_root()
    }

    pub(crate) fn commit(&self, op: RecordOp, data: Option<&std::fs::File>) -> Result<Attr> {
        let fid = op.target();
        let attr = self.commit_op(op, data)?;
        // None of these records touches extended attributes.
        self.xattr_cache.carry(fid, attr.version);
        Ok(attr)
    }

    /// Revalidate every cached object with a few `GetAttrs` (many fids each)
    /// instead of refetching: after a restart, unchanged objects are reused.
    pub(crate) fn revalidate_all(&self) -> Result<()> {
        let s = self.servers.session()?;
        self.revalidate_on(&s, &self.servers.interrupt)
    }

    /// As `revalidate_all`, on a given session and interrupt (the prober
    /// revalidates while callers are still failed over).
    pub(crate) fn revalidate_on(&self, s: &Session, interrupt: &Interrupt) -> Result<()> {
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
    pub(crate) fn fetch_attrs(&self, fids: &[Fid]) -> Result<Vec<Result<Attr>>> {
        let s = self.servers.session()?;
        self.fetch_attrs_on(&s, &self.servers.interrupt, fids)
    }

    pub(crate) fn fetch_attrs_on(
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
    /// session is fresh and the callback holds. The callback is looked at
    /// again after `fresh`: a client that was itself stopped, or cut off by
    /// a break timeout it has not noticed yet, learns of the breaks it
    /// missed in `fresh`'s round trip (the first look only spares that trip
    /// for objects with no callback anyway).
    pub(crate) fn trusts(&self, fid: Fid) -> bool {
        self.callbacks.holds(fid) && self.servers.fresh() && self.callbacks.holds(fid)
    }

    /// Status of `fid`: from the cache while the callback holds, else asked.
    pub(crate) fn getattr(&self, fid: Fid) -> Result<Attr> {
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
    pub(crate) fn listing(&self, dir: Fid) -> Result<Arc<namespace::Listing>> {
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
        match self.emulate(Some(dir), || self.read_dir(dir), offline) {
            // Connected, with changes in `dir` still in the log (write-back
            // mode, or records queued behind others), and its listing not
            // cached (dropped to be reread when the log last emptied): the
            // server must have those changes before it lists the
            // directory, so send the log first instead of failing.
            Err(Error::Timeout(_)) if !self.emu.offline() && self.emu.pending() > 0 => {
                self.reintegrate_pending(None)?;
                self.emulate(Some(dir), || self.read_dir(dir), offline)
            }
            r => r,
        }
    }

    pub(crate) fn read_dir(&self, dir: Fid) -> Result<Arc<namespace::Listing>> {
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
                        let l = Arc::new(namespace::Listing::from_entries(entries));
                        let l = self.cache.install_fetched_listing(&attr, l);
                        self.callbacks.grant(dir, tok);
                        return Ok(l);
                    }
                }
            }
        }
    }

    pub(crate) fn lookup(&self, dir: Fid, name: &str) -> Result<Option<crate::proto::DirEntry>> {
        Ok(self.listing(dir)?.get(name).cloned())
    }

    /// A symlink's target: fetched once, then cached for the fid's life (a
    /// symlink never changes its target).
    pub(crate) fn readlink_fid(&self, fid: Fid) -> Result<String> {
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
    pub(crate) fn open_data(&self, fid: Fid) -> Result<Attr> {
        let offline = || {
            self.cache
                .try_open(fid)
                .ok_or_else(|| emulation::uncached(fid))
        };
        self.emulate(Some(fid), || self.open_data_online(fid), offline)
    }

    pub(crate) fn open_data_online(&self, fid: Fid) -> Result<Attr> {
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

    pub(crate) fn fetch_file(&self, fid: Fid) -> Result<Attr> {
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
    pub(crate) fn object_changed(&self, attr: &Attr, tok: Token) {
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
    pub(crate) fn after_record(
        &self,
        op: &RecordOp,
        ftype: FileType,
        toks: &[(Fid, Token)],
        now: Timespec,
    ) {
        let edits = namespace::listing_edits(op, ftype);
        let mut dirs: Vec<Fid> = edits.iter().map(|(d, _)| *d).collect();
        dirs.dedup();
        for dir in dirs {
            let Some((_, tok)) = toks.iter().find(|(d, _)| *d == dir) else {
                continue;
            };
            self.after_dir_change(dir, *tok, now, &edits);
        }
    }

    /// After a record changed `dir`'s entries: edit the cached listing the
    /// same way and bump its version by one, as the server did. If the
    /// listing was not current, or a break overtook us, drop the callback so
    /// the next lookup rereads it.
    pub(crate) fn after_dir_change(
        &self,
        dir: Fid,
        tok: Token,
        mtime: Timespec,
        edits: &[(Fid, namespace::Edit)],
    ) {
        let edited = self.cache.update(None, dir, |e| {
            if e.listing_current().is_none() {
                return false;
            }
            e.edit_listing(dir, edits);
            // As the server counts them: entries, and 2 + subdirectories.
            if let Some((n, subdirs)) = e.listing_current().map(|l| (l.len(), l.subdirs())) {
                e.attr.size = n as u64;
                e.attr.nlink = 2 + subdirs as u32;
            }
            e.attr.version += 1;
            e.set_listing_version(e.attr.version);
            e.attr.mtime = mtime;
            e.attr.ctime = mtime;
            true
        });
        // A directory with logged changes is served from the cache anyway.
        // Otherwise the edited listing is trusted only if it was current
        // when the token was taken (`keep`).
        let local = self.cml.mentions(dir);
        if edited != Some(true) || (!self.callbacks.keep(dir, tok) && !local) {
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
        // Write-back mode is write-disconnected mode with a bound: a record
        // is sent once half the bound old, and the reintegrator looks at
        // least every quarter of it, so it reaches the server within the
        // bound (plus the send itself).
        let write_back = cfg.write_back_ms > 0;
        emu.mode.configure(
            cfg.disconnected_operation && !auto_failover,
            cfg.write_disconnected || write_back,
        );
        let age = if write_back {
            cfg.write_back_ms / 2
        } else {
            cfg.reintegration_age_ms
        };
        emu.set_periods(age, cfg.hoard_walk_ms);
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
        let mut period = cfg.heartbeat_ms;
        if write_back {
            period = period.min(cfg.write_back_ms / 4);
        }
        let period = Duration::from_millis(period.max(10));
        // Nearly every call logs a record in these modes: the cache's
        // unsynced saves ride in the log's transactions.
        self.cache.set_riding(cfg.write_disconnected || write_back);
        let weak = Arc::downgrade(self);
        let state = self.emu.clone();
        emulation::spawn_reintegrator(weak, state, period)
    }

    /// Keep the root fid of the session, so a restart without a server can
    /// still walk paths.
    pub(crate) fn remember_root(&self) -> Result<()> {
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
    pub(crate) fn top_up_fids(&self) {
        if let Some(root) = self.emu.root() {
            if self.fids.left(root.volume) < fids::FID_RESERVE_LOW {
                let _ = self.fids.reserve(&self.servers, root.volume);
            }
        }
    }

    /// Run `online`; when the client is disconnected (or becomes so because
    /// `online` could not reach a server), or `fid` has local changes not yet
    /// on the server, run `offline` (the cache) instead. A call that failed
    /// only because its connection was lost (the server ended the session,
    /// say, after a break this client was too stopped to acknowledge) runs
    /// once more on the new session: the cache may be stale by then.
    pub(crate) fn emulate<T>(
        &self,
        fid: Option<Fid>,
        online: impl Fn() -> Result<T>,
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
            Err(e) if mode::unreachable(&e) && self.servers.fresh() => match online() {
                Err(e) if self.went_offline(&e) => offline(),
                r => r,
            },
            r => r,
        }
    }

    /// After `e` from the network: switch to disconnected operation if it
    /// says no server answers (and emulation is on, and we are not failed
    /// over, which must fail with EIO). Returns whether we are offline now.
    /// A lost connection alone is no such proof: unless the prober already
    /// judged the server down, a server that answers a Ping now (on the
    /// current session or a new one) keeps us connected.
    pub(crate) fn went_offline(&self, e: &Error) -> bool {
        // Local failures (`Io`: the index, a container) are not a
        // server's silence.
        if !mode::unreachable(e) {
            return false;
        }
        if !self.emu.offline() && self.server_answers() {
            return false;
        }
        self.server_lost()
    }

    /// Whether a server answers a Ping now. A round trip, not just a
    /// session: the current one may not have noticed yet that its server
    /// died. If the current session turns out closed (the server ended it),
    /// one new session is tried; a session that merely timed out is not
    /// (its server is hung, and the prober judges that).
    fn server_answers(&self) -> bool {
        for attempt in 0..2 {
            let Ok(s) = self.servers.session() else {
                return false;
            };
            match s.sync(&self.servers.interrupt) {
                Ok(()) => return true,
                Err(_) if attempt == 0 && s.is_dead() => continue,
                Err(_) => return false,
            }
        }
        false
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
        if let Err(e) = emulation::check_locally(&self.cache, &op) {
            // Connected (write-back mode, or records queued behind others)
            // and what the check needs is not cached (a listing dropped to
            // be reread when the log last emptied): send the log, read it
            // from the server, and check again, instead of failing.
            if !matches!(e, Error::Timeout(_)) || emu.offline() {
                return Err(e);
            }
            self.reintegrate_pending(None)?;
            let fid = op.target();
            match &op {
                RecordOp::Rmdir { .. } => {
                    self.listing(fid)?;
                }
                _ => {
                    self.getattr(fid)?;
                }
            }
            emulation::check_locally(&self.cache, &op)?;
        }
        // The record about to be logged is acknowledged at once. A small
        // store carries its bytes inside it (`StoreInline`): its one
        // durable commit is the data's durable copy, and the container,
        // the cache's working copy, needs no fsync. Any other store sends
        // its container later, so the data must be on disk before the
        // record is (after a power cut, a durable record over a lost
        // container would send an empty file over the server's copy).
        let op = match emulation::inline_form(&self.cml, &op, data) {
            Some(inline) => inline,
            None => {
                emulation::make_data_durable(&self.cache, &op, data)?;
                op
            }
        };
        self.emu.note_edited(&op);
        let (cached, check) = emulation::version_for(&self.cache, &op);
        let last_link = self
            .cache
            .get(op.target())
            .is_none_or(|e| e.attr.nlink <= 1);
        // In write-back (or write-disconnected) mode, opted into as a
        // trade, the Create of a file (always opened by its creator:
        // `at.rs`) is made durable by the file's first close or fsync
        // (`file.rs`), so a new small file's create, write and close cost
        // one log commit. Disconnected operation, which nobody opts into,
        // keeps the rule: durable before the call returns.
        let lazy_create = !connected && !emu.offline() && emu.write_disconnected();
        let logged = if lazy_create && matches!(op, RecordOp::Create { .. }) {
            self.cml.log_lazy(op.clone(), cached, check)?
        } else {
            self.cml
                .log_with(op.clone(), cached, true, check && !connected, last_link)?
        };
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
        // One index transaction for all the entries changed here (not one
        // per directory and per refreshed status).
        self.cache.deferred(|| {
            for f in &fids {
                self.cache.update(None, *f, |e| e.clear_listing());
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
        })
    }

    /// A server answers again: reintegrate the log, revalidate the cache,
    /// and only then serve callers from the server again. Callers keep being
    /// served from the cache meanwhile.
    pub(crate) fn reconnect(&self) -> Result<()> {
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
    pub(crate) fn send_due(&self) -> Result<()> {
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
impl Inner {
    /// The extended attributes of `fid` and the object version they belong
    /// to: the in-memory list (xattr.rs) if it is of the cached version,
    /// else the server's (with this client's logged changes applied).
    pub(crate) fn xattrs(&self, fid: Fid) -> Result<(u64, super::xattr::XattrList)> {
        let attr = self.getattr(fid)?;
        if let Some(l) = self.xattr_cache.get(fid, attr.version) {
            return Ok((attr.version, l));
        }
        if !self.emu.offline() && self.emu.pending() > 0 && self.cml.mentions(fid) {
            // Connected (write-back) with changes of `fid` in the log (an
            // entry made in a directory, a store) and its list not cached:
            // the server's list with the log's own SetXattr records of
            // `fid` applied is the list as this client changed it.
            let logged = self.cml.records_about(fid);
            let online = || {
                let s = self.servers.session()?;
                match s.call(&Msg::GetXattrs { fid }, &self.servers.interrupt)? {
                    Msg::Xattrs { mut items, .. } => {
                        for r in &logged {
                            if let RecordOp::SetXattr {
                                fid: f,
                                name,
                                how,
                                value,
                            } = &r.op
                            {
                                if *f == fid {
                                    crate::proto::xattr::apply(&mut items, name, *how, value);
                                }
                            }
                        }
                        let l = Arc::new(items);
                        self.xattr_cache.put(fid, attr.version, l.clone());
                        Ok((attr.version, l))
                    }
                    m => Err(Error::Protocol(format!("GetXattrs answered with {m:?}"))),
                }
            };
            return self.emulate(None, online, || Err(super::emulation::uncached(fid)));
        }
        self.emulate(
            Some(fid),
            || {
                let s = self.servers.session()?;
                match s.call(&Msg::GetXattrs { fid }, &self.servers.interrupt)? {
                    Msg::Xattrs { version, items } => {
                        let l = Arc::new(items);
                        self.xattr_cache.put(fid, version, l.clone());
                        Ok((version, l))
                    }
                    m => Err(Error::Protocol(format!("GetXattrs answered with {m:?}"))),
                }
            },
            || Err(super::emulation::uncached(fid)),
        )
    }
}

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
    fn sync_log(&self) -> Result<()> {
        self.cml.sync_lazy()
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
    fn counters(&self) -> &super::stats::Counters {
        &self.counters
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
    fn sync_log(&self) {
        // A failure leaves the records lazy; the next turn tries again.
        let _ = self.cml.sync_lazy();
        // Saves waiting to ride wait no longer than a turn.
        self.cache.flush_riders();
    }
}
