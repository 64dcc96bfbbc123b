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

use super::cache::{Cache, Index};
use super::cml::Cml;
use super::mode::Mode;
use super::namespace;
use super::reintegrate::Backoff;
use crate::proto::{Attr, Fid, FileType, RecordOp, Timespec};
use crate::{Error, Result};

/// Small values disconnected operation must find after a restart without a
/// server (the root fid).
const EMU: TableDefinition<&str, &[u8]> = TableDefinition::new("emulation");
const ROOT_KEY: &str = "root";

/// The mode and the reintegrator's wake-up channel. Kept apart from
/// the client so the reintegrator thread can watch it without keeping the
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

    /// The reintegration age and the hoard walk period (config).
    pub fn set_periods(&self, age_ms: u64, hoard_every_ms: u64) {
        self.age_ms.store(age_ms, Ordering::Relaxed);
        self.hoard_every.store(hoard_every_ms, Ordering::Relaxed);
    }

    /// The root fid known (the session's, or remembered by a run before).
    pub fn root(&self) -> Option<Fid> {
        *self.root.lock()
    }

    pub fn set_root(&self, root: Option<Fid>) {
        *self.root.lock() = root;
    }

    /// The listings edited locally since the log was last empty; forgotten.
    pub fn take_edited(&self) -> Vec<Fid> {
        self.edited.lock().drain().collect()
    }

    /// Listings a record edits locally: reread once the log is empty.
    pub fn note_edited(&self, op: &RecordOp) {
        self.edited.lock().extend(super::cml::mentions(op));
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

/// "Object not cached while disconnected"; `at_path` (mod.rs) later names
/// the path the caller used.
pub(crate) fn uncached(fid: Fid) -> Error {
    Error::Timeout(format!(
        "disconnected: object {fid} is not cached (no server answers)"
    ))
}

/// A rename, link or remove, a status change that sets no size (mode,
/// owner, times) and an extended attribute bump the object's version
/// without changing its contents (or entries): what the cache holds stays
/// the current version's, so it can still be served offline.
pub(crate) fn keep_contents_current(cache: &Cache, op: &RecordOp, attr: &Attr) {
    if !matches!(
        op,
        RecordOp::Rename { .. }
            | RecordOp::Link { .. }
            | RecordOp::Remove { .. }
            | RecordOp::SetAttr { size: None, .. }
            | RecordOp::SetXattr { .. }
    ) || attr.nlink == 0
    {
        return;
    }
    cache.update(None, attr.fid, |e| {
        if e.data_current() {
            e.data_version = Some(attr.version);
        }
        if e.listing_current().is_some() {
            e.set_listing_version(attr.version);
        }
        e.attr = attr.clone();
    });
}

pub(crate) fn make_data_durable(
    cache: &Cache,
    op: &RecordOp,
    data: Option<&std::fs::File>,
) -> Result<()> {
    match (op, data) {
        (RecordOp::Store { fid, .. }, Some(f)) => cache.make_durable(*fid, f),
        _ => Ok(()),
    }
}

pub(crate) fn pin_if_store(cache: &Cache, op: &RecordOp) {
    if let RecordOp::Store { fid, .. } = op {
        cache.pin(*fid);
    }
}

/// The cached version of the record's target and whether the record
/// should be checked against it (files only: directories change under
/// everyone's creates, and name conflicts catch what matters there).
pub(crate) fn version_for(cache: &Cache, op: &RecordOp) -> (Option<u64>, bool) {
    let fid = op.target();
    match cache.get(fid) {
        Some(e) => (Some(e.attr.version), e.attr.ftype == FileType::File),
        None => (None, false),
    }
}

/// What the server would refuse, refused locally before logging.
pub(crate) fn check_locally(cache: &Cache, op: &RecordOp) -> Result<()> {
    match op {
        RecordOp::Create { .. }
        | RecordOp::Mkdir { .. }
        | RecordOp::Symlink { .. }
        | RecordOp::Mknod { .. } => Ok(()),
        RecordOp::Rmdir { fid, name, .. } => {
            let e = cache.get(*fid).ok_or_else(|| uncached(*fid))?;
            match e.listing_current().map(|l| l.is_empty()) {
                Some(true) => Ok(()),
                Some(false) => Err(Error::NotEmpty(name.clone())),
                None => Err(uncached(*fid)),
            }
        }
        op => {
            let fid = op.target();
            cache.get(fid).map(|_| ()).ok_or_else(|| uncached(fid))
        }
    }
}

/// The attr the server would give the record's target after applying
/// it: the cached one changed the same way, its version one step on (or
/// not, when the record replaced one the log cancelled).
pub(crate) fn apply_locally(
    cache: &Cache,
    op: &RecordOp,
    cancelled: &[crate::proto::Record],
    gone: bool,
) -> Result<Attr> {
    let fid = op.target();
    let replaced = cancelled.iter().any(|r| {
        r.op.target() == fid && std::mem::discriminant(&r.op) == std::mem::discriminant(op)
    });
    let cached = cache.get(fid).map(|e| e.attr);
    namespace::target_attr(op, cached, replaced, gone, Timespec::now()).ok_or_else(|| uncached(fid))
}

/// Make the cached namespace show every pending record. The index is
/// written with eventual durability after the record (which is durable),
/// so a crash of the client can lose a listing edit whose record is in
/// the log; redoing the edits (idempotently) restores it, so the next
/// run neither loses sight of the change nor makes it twice.
pub(crate) fn redo_log_in_cache(cache: &Cache, cml: &Cml) {
    for r in cml.pending() {
        let op = &r.op;
        if super::cml::created(op).is_some() {
            if let Ok(attr) = apply_locally(cache, op, &[], false) {
                let ftype = attr.ftype;
                cache.update(Some(&attr), op.target(), |e| {
                    if let RecordOp::Symlink { target, .. } = op {
                        e.symlink = Some(target.clone());
                    }
                    if ftype == FileType::Dir && !e.has_listing() {
                        e.set_listing(e.attr.version, Default::default());
                    }
                });
            } else {
                continue;
            }
        }
        let ftype = cache
            .get(op.target())
            .map_or(FileType::File, |e| e.attr.ftype);
        let edits = namespace::listing_edits(op, ftype);
        for (dir, _) in &edits {
            cache.update(None, *dir, |e| e.edit_listing(*dir, &edits));
        }
    }
}

/// The root fid remembered by an earlier run, if any.
pub(crate) fn load_root(db: &Index) -> Option<Fid> {
    let r = db.begin_read().ok()?;
    let t = r.open_table(EMU).ok()?;
    let v = t.get(ROOT_KEY).ok()??;
    let b: [u8; 16] = v.value().try_into().ok()?;
    Some(Fid::from_bytes(&b))
}

/// Remember `root` for a restart without a server.
pub(crate) fn store_root(db: &Index, root: Fid) -> Result<()> {
    let w = db.begin_write()?;
    w.open_table(EMU)?.insert(ROOT_KEY, &root.to_bytes()[..])?;
    w.commit()?;
    Ok(())
}

/// What the reintegrator thread asks of the client, one turn at a time.
pub(crate) trait Turns: Send + Sync + 'static {
    /// The prober says a server is up (enough good pings, revalidated).
    fn health_up(&self) -> bool;
    /// Reintegrate, revalidate and serve from the server again.
    fn reconnect(&self) -> Result<()>;
    /// Judge `e`: switch to emulation if no server answers.
    fn went_offline(&self, e: &Error) -> bool;
    /// Send the records that are due (write-disconnected: the aged ones).
    fn send_due(&self) -> Result<()>;
    fn hoard_walk(&self) -> Result<super::hoard::HoardReport>;
}

/// Start the reintegrator thread; it holds only `weak`, so dropping the
/// client ends it.
pub(crate) fn spawn_reintegrator<C: Turns>(
    weak: Weak<C>,
    state: Arc<EmuState>,
    period: Duration,
) -> Result<()> {
    std::thread::Builder::new()
        .name("coda-reintegrator".into())
        .spawn(move || reintegrator(weak, state, period))
        .map_err(|e| Error::io("spawning the reintegrator thread", e))?;
    Ok(())
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
fn reintegrator<C: Turns>(weak: Weak<C>, state: Arc<EmuState>, period: Duration) {
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
            if !inner.health_up() {
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
