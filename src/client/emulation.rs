//! Disconnected operation (emulation): when no server answers, the client
//! serves the volume from its cache. Reads of cached objects succeed;
//! mutations go through the same write path (the CML) but stay in the log
//! and are applied to the cache the way the server would apply them;
//! anything that needs an object that is not cached fails at once with
//! `Timeout` naming it, never waiting for a server.
//!
//! A background thread (the reintegrator) probes for a server while the
//! client is disconnected and, once one answers, reintegrates the log
//! (`reintegrate.rs`), revalidates the cache and goes back to connected
//! operation. In `write_disconnected` mode the client stays connected but
//! mutations are only logged, and the same thread sends the records older
//! than `reintegration_age_ms` in batches.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender};
use parking_lot::Mutex;
use redb::TableDefinition;

use super::mode::{unreachable, Mode};
use super::namespace;
use super::reintegrate::{space_error, Backoff, Deferred};
use super::Inner;
use crate::proto::{Attr, Fid, FileType, RecordOp, Timespec};
use crate::{Error, Result};

/// Small values disconnected operation must find after a restart without a
/// server (the root fid).
const EMU: TableDefinition<&str, &[u8]> = TableDefinition::new("emulation");
const ROOT_KEY: &str = "root";

/// The mode and the reintegrator's wake-up channel. Kept apart from
/// `Inner` so the reintegrator thread can watch it without keeping the
/// client alive.
pub(crate) struct EmuState {
    /// Connected, write-disconnected, emulating, held or failed over.
    pub(crate) mode: Mode,
    age_ms: AtomicU64,
    /// Pending records, shared with the log (which keeps it current).
    pending: Arc<AtomicUsize>,
    stopped: AtomicBool,
    wake_tx: Sender<()>,
    wake_rx: Receiver<()>,
    root: Mutex<Option<Fid>>,
    /// Objects whose cached listing was edited locally. Their predicted
    /// versions can coincide with the server's even though the entries
    /// differ (a cancelled create bumped ours, someone else's create bumped
    /// the server's), so once the log is empty their listings are reread.
    edited: Mutex<std::collections::HashSet<Fid>>,
    /// Hoard walk period (0: on demand only) and when the last one ran.
    hoard_every: AtomicU64,
    last_walk: Mutex<Option<std::time::Instant>>,
    /// volume → stamp the cache of it was last fully valid at (stamps.rs).
    pub(crate) stamps: super::stamps::Stamps,
    /// Set while the server refuses reintegration for lack of space or
    /// quota: no batch is sent before it ends.
    pub(crate) backoff: Backoff,
}

impl EmuState {
    pub fn new(enabled: bool, pending: Arc<AtomicUsize>) -> EmuState {
        let (wake_tx, wake_rx) = bounded(1);
        EmuState {
            mode: Mode::new(enabled),
            age_ms: AtomicU64::new(0),
            pending,
            stopped: AtomicBool::new(false),
            wake_tx,
            wake_rx,
            root: Mutex::new(None),
            edited: Mutex::new(Default::default()),
            stamps: Default::default(),
            hoard_every: AtomicU64::new(0),
            last_walk: Mutex::new(None),
            backoff: Backoff::default(),
        }
    }

    /// The refusal that started the current back-off, while it lasts.
    pub fn backing_off(&self) -> Option<Error> {
        self.backoff.current()
    }

    /// A reintegration went through, or the user asked for one now.
    pub fn reset_backoff(&self) {
        self.backoff.reset()
    }

    pub fn enabled(&self) -> bool {
        self.mode.enabled()
    }

    /// Serving from the cache (no server answers, or held by the operator).
    pub fn offline(&self) -> bool {
        self.mode.emulating()
    }

    pub fn write_disconnected(&self) -> bool {
        self.mode.write_disconnected()
    }

    pub fn age(&self) -> Duration {
        Duration::from_millis(self.age_ms.load(Ordering::Relaxed))
    }

    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    pub fn wake(&self) {
        let _ = self.wake_tx.try_send(());
    }

    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        self.wake();
    }
}

/// "Object not cached while disconnected"; `Inner::at_path` later names
/// the path the caller used.
pub(crate) fn uncached(fid: Fid) -> Error {
    Error::Timeout(format!(
        "disconnected: object {fid} is not cached (no server answers)"
    ))
}

impl Inner {
    /// Configure and start disconnected operation: decide whether the client
    /// starts connected, pin the containers the log needs, reintegrate what
    /// a previous run left (connected), and start the reintegrator thread.
    pub(crate) fn start_emulation(
        self: &Arc<Inner>,
        first: Result<()>,
        cfg: &super::Config,
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
        emu.age_ms
            .store(cfg.reintegration_age_ms, Ordering::Relaxed);
        emu.hoard_every.store(cfg.hoard_walk_ms, Ordering::Relaxed);
        *emu.root.lock() = self.load_root();
        emu.stamps.take_saved(&self.cml.db);
        for fid in self.cml.stored_fids() {
            self.cache.pin(fid);
        }
        self.cache.sweep_unused_containers();
        self.redo_log_in_cache();
        for r in self.cml.pending() {
            self.note_edited(&r.op);
        }
        match first {
            Ok(()) => {
                self.remember_root()?;
                self.reintegrate_pending(None)?;
                self.revalidate_all()?;
                self.top_up_fids();
            }
            // Never connected with this cache: nothing to serve offline.
            Err(e) if !emu.enabled() || emu.root.lock().is_none() || !unreachable(&e) => {
                return Err(e)
            }
            Err(_) => emu.mode.start_emulating(),
        }
        let period = Duration::from_millis(cfg.heartbeat_ms.max(10));
        let weak = Arc::downgrade(self);
        let state = self.emu.clone();
        std::thread::Builder::new()
            .name("coda-reintegrator".into())
            .spawn(move || reintegrator(weak, state, period))
            .map_err(|e| Error::io("spawning the reintegrator thread", e))?;
        Ok(())
    }

    /// Make the cached namespace show every pending record. The index is
    /// written with eventual durability after the record (which is durable),
    /// so a crash of the client can lose a listing edit whose record is in
    /// the log; redoing the edits (idempotently) restores it, so the next
    /// run neither loses sight of the change nor makes it twice.
    fn redo_log_in_cache(&self) {
        for r in self.cml.pending() {
            let op = &r.op;
            if super::cml::created(op).is_some() {
                if let Ok(attr) = self.apply_locally(op, &[], false) {
                    let ftype = attr.ftype;
                    self.cache.update(Some(&attr), op.target(), |e| {
                        if let RecordOp::Symlink { target, .. } = op {
                            e.symlink = Some(target.clone());
                        }
                        if ftype == FileType::Dir && e.listing.is_none() {
                            e.listing = Some((e.attr.version, Arc::new(Vec::new())));
                        }
                    });
                } else {
                    continue;
                }
            }
            let ftype = self
                .cache
                .get(op.target())
                .map_or(FileType::File, |e| e.attr.ftype);
            let edits = namespace::listing_edits(op, ftype);
            for (dir, _) in &edits {
                self.cache.update(None, *dir, |e| {
                    if let Some((_, l)) = &mut e.listing {
                        namespace::apply_edits(Arc::make_mut(l), *dir, &edits);
                    }
                });
            }
        }
    }

    fn load_root(&self) -> Option<Fid> {
        let r = self.cml.db.begin_read().ok()?;
        let t = r.open_table(EMU).ok()?;
        let v = t.get(ROOT_KEY).ok()??;
        let b: [u8; 16] = v.value().try_into().ok()?;
        Some(Fid::from_bytes(&b))
    }

    /// Keep the root fid of the session, so a restart without a server can
    /// still walk paths.
    fn remember_root(&self) -> Result<()> {
        let root = self.servers.session()?.root;
        if *self.emu.root.lock() == Some(root) {
            return Ok(());
        }
        let w = self.cml.db.begin_write()?;
        w.open_table(EMU)?.insert(ROOT_KEY, &root.to_bytes()[..])?;
        w.commit()?;
        *self.emu.root.lock() = Some(root);
        Ok(())
    }

    /// The root fid: the session's, or offline the one remembered.
    pub(crate) fn emulated_root(&self) -> Result<Fid> {
        let online = || self.servers.session().map(|s| s.root);
        let offline = || {
            self.emu
                .root
                .lock()
                .ok_or_else(|| Error::Timeout("disconnected: the root is not known".into()))
        };
        self.emulate(None, online, offline)
    }

    /// Keep enough reserved fids that creating works for a while offline.
    fn top_up_fids(&self) {
        if let Some(root) = *self.emu.root.lock() {
            if self.fids.left(root.volume) < super::fids::FID_RESERVE_LOW {
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
        if !unreachable(e) {
            return false;
        }
        self.server_lost()
    }

    /// No server answers: emulate (if the mode allows), releasing the
    /// calls that started while connected. Returns whether we emulate.
    pub(crate) fn server_lost(&self) -> bool {
        let emu = &self.emu;
        let root_known = emu.root.lock().is_some();
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
            .ok_or_else(|| uncached(fid))
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
            let (cached, check) = self.version_for(&op);
            // Behind records the server refused for space: this one would
            // wait behind them, so the caller hears why now.
            if emu.pending() > 0 {
                if let Some(e) = emu.backing_off() {
                    return Err(e);
                }
            }
            match self.commit_connected(op.clone(), data)? {
                Ok(attr) => return Ok(attr),
                Err(Deferred::Unreachable(id)) => {
                    // The server's ack was to be the durable copy; without
                    // it the container is, so it reaches the disk before
                    // the caller hears success.
                    self.make_data_durable(&op, data)?;
                    // Kept in the log; the server may or may not have it
                    // (if it does, its store id makes the replay a no-op).
                    // Sent later, it checks the version we had.
                    self.cml.check_kept(id, if check { cached } else { None })?;
                    self.went_offline(&Error::Eio("the server stopped answering".into()));
                    self.pin_if_store(&op);
                    let attr = self.apply_locally(&op, &[], false)?;
                    self.keep_contents_current(&op, &attr);
                    return Ok(attr);
                }
                Err(Deferred::NotLogged(Some(e))) => {
                    // The data could not be uploaded: no server. Logged
                    // below as a disconnected record (or the error, without
                    // emulation).
                    if !self.went_offline(&e) {
                        return Err(e);
                    }
                    connected = false;
                }
                Err(Deferred::NotLogged(None)) => {
                    // Records logged earlier go first (store-id order):
                    // this one waits its turn in the log like theirs.
                }
            }
        }
        self.check_locally(&op)?;
        // The record about to be logged is acknowledged at once and sends
        // the container later: its data must be on disk before the record
        // is (after a power cut, a durable record over a lost container
        // would send an empty file over the server's copy).
        self.make_data_durable(&op, data)?;
        self.note_edited(&op);
        let (cached, check) = self.version_for(&op);
        let last_link = self
            .cache
            .get(op.target())
            .is_none_or(|e| e.attr.nlink <= 1);
        let logged = self
            .cml
            .log_with(op.clone(), cached, true, check && !connected, last_link)?;
        self.pin_if_store(&op);
        let attr = self.apply_locally(&op, &logged.cancelled, logged.record.is_none())?;
        self.keep_contents_current(&op, &attr);
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

    /// A rename, link or remove bumps the object's version without
    /// changing its contents (or entries): what the cache holds stays the
    /// current version's, so it can still be served offline.
    fn keep_contents_current(&self, op: &RecordOp, attr: &Attr) {
        if !matches!(
            op,
            RecordOp::Rename { .. } | RecordOp::Link { .. } | RecordOp::Remove { .. }
        ) || attr.nlink == 0
        {
            return;
        }
        self.cache.update(None, attr.fid, |e| {
            if e.data_current() {
                e.data_version = Some(attr.version);
            }
            if e.listing_current().is_some() {
                if let Some((v, _)) = &mut e.listing {
                    *v = attr.version;
                }
            }
            e.attr = attr.clone();
        });
    }

    fn note_edited(&self, op: &RecordOp) {
        self.emu.edited.lock().extend(super::cml::mentions(op));
    }

    /// The log is empty: drop every listing edited locally (see `edited`)
    /// so it is reread, and refresh those objects' status from the server
    /// (their predicted versions may be off), many fids per request.
    pub(crate) fn drop_edited_listings(&self) {
        let fids: Vec<Fid> = self.emu.edited.lock().drain().collect();
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

    fn make_data_durable(&self, op: &RecordOp, data: Option<&std::fs::File>) -> Result<()> {
        match (op, data) {
            (RecordOp::Store { fid, .. }, Some(f)) => self.cache.make_durable(*fid, f),
            _ => Ok(()),
        }
    }

    fn pin_if_store(&self, op: &RecordOp) {
        if let RecordOp::Store { fid, .. } = op {
            self.cache.pin(*fid);
        }
    }

    /// The cached version of the record's target and whether the record
    /// should be checked against it (files only: directories change under
    /// everyone's creates, and name conflicts catch what matters there).
    fn version_for(&self, op: &RecordOp) -> (Option<u64>, bool) {
        let fid = op.target();
        match self.cache.get(fid) {
            Some(e) => (Some(e.attr.version), e.attr.ftype == FileType::File),
            None => (None, false),
        }
    }

    /// What the server would refuse, refused locally before logging.
    fn check_locally(&self, op: &RecordOp) -> Result<()> {
        match op {
            RecordOp::Create { .. } | RecordOp::Mkdir { .. } | RecordOp::Symlink { .. } => Ok(()),
            RecordOp::Rmdir { fid, name, .. } => {
                let e = self.cache.get(*fid).ok_or_else(|| uncached(*fid))?;
                match e.listing_current() {
                    Some([]) => Ok(()),
                    Some(_) => Err(Error::NotEmpty(name.clone())),
                    None => Err(uncached(*fid)),
                }
            }
            op => {
                let fid = op.target();
                self.cache.get(fid).map(|_| ()).ok_or_else(|| uncached(fid))
            }
        }
    }

    /// The attr the server would give the record's target after applying
    /// it: the cached one changed the same way, its version one step on (or
    /// not, when the record replaced one the log cancelled).
    fn apply_locally(
        &self,
        op: &RecordOp,
        cancelled: &[crate::proto::Record],
        gone: bool,
    ) -> Result<Attr> {
        let fid = op.target();
        let replaced = cancelled.iter().any(|r| {
            r.op.target() == fid && std::mem::discriminant(&r.op) == std::mem::discriminant(op)
        });
        let cached = self.cache.get(fid).map(|e| e.attr);
        namespace::target_attr(op, cached, replaced, gone, Timespec::now())
            .ok_or_else(|| uncached(fid))
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
                Err(e) if space_error(&e) => {}
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

/// A periodic hoard walk is due (the first one right after start).
fn walk_due(state: &EmuState) -> bool {
    let every = state.hoard_every.load(Ordering::Relaxed);
    every > 0
        && state.pending() == 0
        && state
            .last_walk
            .lock()
            .is_none_or(|t| t.elapsed() >= Duration::from_millis(every))
}

/// The reintegrator thread: while disconnected, waits for the prober
/// (probe.rs) to declare a server up, then reintegrates; sends aged records
/// in write-disconnected mode. It holds the client only while it works, so
/// dropping the client ends it.
fn reintegrator(weak: Weak<Inner>, state: Arc<EmuState>, period: Duration) {
    loop {
        let _ = state.wake_rx.recv_timeout(period);
        if state.stopped.load(Ordering::Relaxed) {
            return;
        }
        if state.mode.remote_stopped() {
            // Failed over (until failback), or held without disconnected
            // operation (until reconnect): remote operations stay off.
            continue;
        }
        if state.offline() {
            if state.mode.held() {
                continue; // disconnected by the operator: wait for reconnect
            }
            let Some(inner) = weak.upgrade() else { return };
            // Up after enough good pings and a revalidation (the prober's
            // rule), so a flapping server does not start a reintegration.
            if !inner.health.is_up() {
                continue;
            }
            if let Err(e) = inner.reconnect() {
                inner.went_offline(&e);
            }
        } else if walk_due(&state) {
            let Some(inner) = weak.upgrade() else { return };
            *state.last_walk.lock() = Some(std::time::Instant::now());
            // Failures (a server that went away) only wait for the next turn.
            let _ = inner.hoard_walk();
        } else if state.pending() > 0 {
            if state.backing_off().is_some() {
                continue; // the server had no room: wait out the back-off
            }
            let Some(inner) = weak.upgrade() else { return };
            if let Err(e) = inner.send_due() {
                inner.went_offline(&e);
            }
            if state.write_disconnected() && state.pending() > 0 {
                // Records not yet aged: look again after a while, not at once.
                std::thread::sleep(period);
            }
        }
    }
}

impl super::Client {
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
            inner.health.mark_up(inner, &s.server);
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

    pub fn write_disconnected(&self) -> bool {
        self.inner.emu.write_disconnected()
    }
}
