//! The kernel's caches of the mount (dentries, attributes, file pages,
//! directory listings), kept coherent with the client: the kernel is given a
//! lifetime only for answers the client gave from a callback it holds, and is
//! told at once (FUSE notify) when the client stops trusting something.
//!
//! The notifications are written to /dev/fuse by one thread of their own:
//! `inval_entry` waits for the directory's lock in the kernel, and
//! `inval_inode` for pages under a read, which a request of ours may hold
//! while it waits for the server. The client tells us of a server's break
//! on a thread of the session's own (not its connection reader, which
//! must go on delivering replies), and that thread only waits, bounded,
//! for the notifier to finish before the break is acknowledged.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use fuser::{INodeNo, Notifier};
use parking_lot::{Mutex, RwLock, RwLockReadGuard};

/// How long the kernel may keep an entry or attribute the client vouched
/// for. Long: every change that matters reaches the kernel as a
/// notification; the lifetime only bounds what a lost notification costs.
pub const TRUSTED_TTL: Duration = Duration::from_secs(60);

/// How long the client's break thread waits for the kernel to drop what a
/// server's break named before it acknowledges the break. Normally
/// microseconds; the kernel may wait for a directory lock or a page under
/// a read held by a request that waits for the server. Half the server's
/// default break timeout (1 s): an ack later than that timeout would cost
/// the session ("declared unreachable") and with it every callback.
const BREAK_WAIT: Duration = Duration::from_millis(500);

/// How many inodes may be marked for fast opens at once (fs.rs keeps at
/// most 1,024 backing files anyway).
const FAST_MAX: usize = 4096;

/// How many inodes' pages may be marked at once. Each mark holds a
/// descriptor of a container of at most 1 MiB, which keeps its disk space
/// if the client evicts it meanwhile: at most 1 GiB, and only for files
/// evicted while still marked.
const PAGED_MAX: usize = 1024;

/// One batch of notifications, in order: inodes (attributes and pages),
/// then entries (parent, name).
struct Job {
    inodes: Vec<u64>,
    entries: Vec<(u64, OsString)>,
    done: Option<Sender<()>>,
}

/// Kernel-cache bookkeeping shared by the FUSE handlers, the client's
/// invalidation hook and the control socket.
pub struct KernelCache {
    /// Bumped (under the write lock) by every invalidation; a reply that
    /// gives the kernel a lifetime checks, under the read lock, that no
    /// invalidation came since it asked the client.
    epoch: RwLock<u64>,
    /// The notifier thread's queue; `None` until the session exists (and
    /// then no lifetimes are given).
    jobs: Mutex<Option<Sender<Job>>>,
    /// Names given to the kernel with a lifetime, per parent inode: what to
    /// drop when the parent's callback breaks.
    entries: Mutex<HashMap<u64, HashSet<OsString>>>,
    /// Inodes the kernel may hold attributes or pages of.
    inodes: Mutex<HashSet<u64>>,
    /// Per inode, the version (and container) whose pages the kernel holds:
    /// an open of the same keeps them (FOPEN_KEEP_CACHE).
    versions: Mutex<HashMap<u64, (u64, u64, u64)>>,
    /// Per inode, the version whose kept container a read-only open may
    /// reuse without the client's open (fs.rs, "fast opens"): set only when
    /// no invalidation came between asking the client and now, dropped by
    /// every invalidation naming the inode (and by all of them at once).
    fast: Mutex<HashMap<u64, u64>>,
    /// Per inode, the version whose pages a read-only page-cache open may
    /// keep (FOPEN_KEEP_CACHE) without the client's open, and a descriptor
    /// of the container holding it (fs.rs, "paged opens"): set like `fast`,
    /// only with no invalidation between asking the client and now, and
    /// dropped by every invalidation naming the inode.
    paged: Mutex<HashMap<u64, (u64, Arc<std::fs::File>)>>,
    /// Per inode, the last version opened read-only (a hint, not a
    /// promise: fs.rs passes a small file's first open of a version
    /// through and serves the later ones from the page cache).
    seen: Mutex<HashMap<u64, u64>>,
    /// The fid-derived inode number of `/` (FUSE calls it 1).
    root: AtomicU64,
}

impl Default for KernelCache {
    fn default() -> Self {
        KernelCache::new()
    }
}

/// Taken before asking the client; see [`KernelCache::ttl`].
#[derive(Clone, Copy)]
pub struct Ticket(u64);

impl KernelCache {
    pub fn new() -> KernelCache {
        KernelCache {
            epoch: RwLock::new(0),
            jobs: Mutex::new(None),
            entries: Mutex::new(HashMap::new()),
            inodes: Mutex::new(HashSet::new()),
            versions: Mutex::new(HashMap::new()),
            fast: Mutex::new(HashMap::new()),
            paged: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
            root: AtomicU64::new(1),
        }
    }

    pub fn set_root(&self, ino: u64) {
        self.root.store(ino, Ordering::Relaxed);
    }

    /// The FUSE inode number of a fid-derived one (the root's is 1).
    pub fn fuse_ino(&self, ino: u64) -> u64 {
        let root = self.root.load(Ordering::Relaxed);
        if ino == root {
            1
        } else if ino == 1 {
            root
        } else {
            ino
        }
    }

    /// Start the notifier thread on the session's notifier: from now on
    /// trusted answers get a lifetime.
    pub fn start(&self, notifier: Notifier) -> std::io::Result<()> {
        let (tx, rx) = unbounded::<Job>();
        std::thread::Builder::new()
            .name("coda-notify".into())
            .spawn(move || notify_loop(notifier, rx))?;
        *self.jobs.lock() = Some(tx);
        Ok(())
    }

    pub fn enabled(&self) -> bool {
        self.jobs.lock().is_some()
    }

    /// Before asking the client for an answer the kernel may keep.
    pub fn ticket(&self) -> Ticket {
        Ticket(*self.epoch.read())
    }

    /// Register `name` in `parent` as possibly cached, before asking the
    /// client about it: an invalidation of the parent that comes while the
    /// question is out then names it too.
    pub fn note_entry(&self, parent: u64, name: &std::ffi::OsStr) {
        if !self.enabled() {
            return;
        }
        let mut e = self.entries.lock();
        let set = e.entry(parent).or_default();
        if !set.contains(name) {
            set.insert(name.to_os_string());
        }
    }

    /// The name `name` of `parent` is gone (this mount removed it, and the
    /// kernel dropped its dentry itself): no break needs to name it.
    pub fn forget_entry(&self, parent: u64, name: &std::ffi::OsStr) {
        let mut e = self.entries.lock();
        if let Some(set) = e.get_mut(&parent) {
            set.remove(name);
            if set.is_empty() {
                e.remove(&parent);
            }
        }
    }

    pub fn note_inode(&self, ino: u64) {
        if self.enabled() {
            self.inodes.lock().insert(ino);
        }
    }

    /// The lifetime for an answer asked with `t`, with the read lock held:
    /// reply while holding the guard, so that an invalidation either comes
    /// after the kernel has the reply (and drops it) or before (and the
    /// reply carries no lifetime).
    pub fn ttl(&self, t: Ticket, trusted: bool) -> (Duration, RwLockReadGuard<'_, u64>) {
        let g = self.epoch.read();
        let ttl = if trusted && *g == t.0 && self.enabled() {
            TRUSTED_TTL
        } else {
            Duration::ZERO
        };
        (ttl, g)
    }

    /// Whether the kernel may keep the pages it has of `ino` for an open of
    /// `version` in container `(dev, ino)`; records it as the one it has.
    pub fn keep_pages(&self, ino: u64, version: (u64, u64, u64)) -> bool {
        let mut v = self.versions.lock();
        v.insert(ino, version) == Some(version)
    }

    /// Mark `ino`'s container for `version` as reusable by read-only opens,
    /// if no invalidation came since `t` was taken (before the client was
    /// asked about it). Under the epoch's read lock, so an invalidation
    /// either comes after (and drops the mark) or before (and none is set).
    pub fn vouch_open(&self, ino: u64, t: Ticket, version: u64) -> bool {
        let g = self.epoch.read();
        if *g != t.0 || !self.enabled() {
            return false;
        }
        let mut f = self.fast.lock();
        if f.len() >= FAST_MAX && !f.contains_key(&ino) {
            // Bounded; whatever is dropped is marked again by its next open.
            f.clear();
        }
        f.insert(ino, version);
        true
    }

    /// The version a read-only open of `ino` may reuse the kept container
    /// of, if it is still marked.
    pub fn fast_version(&self, ino: u64) -> Option<u64> {
        self.fast.lock().get(&ino).copied()
    }

    /// `ino` may no longer be opened without the client.
    pub fn unvouch_open(&self, ino: u64) {
        self.fast.lock().remove(&ino);
    }

    /// Mark the kernel's pages of `ino` (if any) as those of `version`, held
    /// by `container`, if no invalidation came since `t` (taken before the
    /// client was asked). `Some(keep)`: marked, and `keep` says the pages
    /// the kernel may hold are already of that version (the open may keep
    /// them); `None`: not marked (the open must drop them). Under the
    /// epoch's read lock, as `vouch_open`.
    pub fn vouch_pages(
        &self,
        ino: u64,
        t: Ticket,
        version: u64,
        container: impl FnOnce() -> Option<Arc<std::fs::File>>,
    ) -> Option<bool> {
        let g = self.epoch.read();
        if *g != t.0 || !self.enabled() {
            self.paged.lock().remove(&ino);
            return None;
        }
        let mut p = self.paged.lock();
        if let Some((v, _)) = p.get(&ino) {
            if *v == version {
                return Some(true);
            }
        }
        if p.len() >= PAGED_MAX {
            // Bounded; whatever is dropped is marked again by its next open.
            p.clear();
        }
        let c = container()?;
        p.insert(ino, (version, c));
        drop(g);
        Some(false)
    }

    /// Record that `ino` was opened read-only at `version`; whether it was
    /// already (the last such open was of the same version).
    pub fn seen(&self, ino: u64, version: u64) -> bool {
        let mut s = self.seen.lock();
        if s.len() >= FAST_MAX && !s.contains_key(&ino) {
            // Bounded; a hint only.
            s.clear();
        }
        s.insert(ino, version) == Some(version)
    }

    /// The version (and its container) whose pages a read-only open of
    /// `ino` may keep without the client, if still marked.
    pub fn paged(&self, ino: u64) -> Option<(u64, Arc<std::fs::File>)> {
        self.paged.lock().get(&ino).cloned()
    }

    /// The version `ino`'s pages are marked for.
    pub fn paged_version(&self, ino: u64) -> Option<u64> {
        self.paged.lock().get(&ino).map(|(v, _)| *v)
    }

    /// `ino`'s pages are no longer vouched for: the next open drops them.
    pub fn unvouch_pages(&self, ino: u64) {
        self.paged.lock().remove(&ino);
    }

    /// The kernel drops its pages of `ino` at the next open.
    pub fn forget_pages(&self, ino: u64) {
        self.versions.lock().remove(&ino);
    }

    /// The client stopped trusting these inodes (fuse numbers): drop their
    /// attributes, pages and, for directories, the names under them. With
    /// `wait`, returns once the kernel has (or after `BREAK_WAIT`).
    pub fn invalidate(&self, inos: &[u64], wait: bool) {
        *self.epoch.write() += 1;
        let Some(tx) = self.jobs.lock().clone() else {
            return;
        };
        let mut entries = Vec::new();
        {
            let mut e = self.entries.lock();
            for ino in inos {
                if let Some(names) = e.remove(ino) {
                    entries.extend(names.into_iter().map(|n| (*ino, n)));
                }
            }
        }
        {
            let mut v = self.versions.lock();
            for ino in inos {
                v.remove(ino);
            }
        }
        {
            let mut f = self.fast.lock();
            for ino in inos {
                f.remove(ino);
            }
        }
        {
            let mut p = self.paged.lock();
            for ino in inos {
                p.remove(ino);
            }
        }
        self.send(&tx, inos.to_vec(), entries, wait);
    }

    /// Drop everything the kernel may hold (failover, a new session).
    pub fn invalidate_all(&self, wait: bool) {
        *self.epoch.write() += 1;
        self.fast.lock().clear();
        self.paged.lock().clear();
        let Some(tx) = self.jobs.lock().clone() else {
            return;
        };
        let entries: Vec<(u64, OsString)> = std::mem::take(&mut *self.entries.lock())
            .into_iter()
            .flat_map(|(p, names)| names.into_iter().map(move |n| (p, n)))
            .collect();
        let mut inodes: Vec<u64> = self.inodes.lock().iter().copied().collect();
        inodes.push(1);
        self.versions.lock().clear();
        self.send(&tx, inodes, entries, wait);
    }

    fn send(&self, tx: &Sender<Job>, inodes: Vec<u64>, entries: Vec<(u64, OsString)>, wait: bool) {
        if inodes.is_empty() && entries.is_empty() {
            return;
        }
        let (done_tx, done_rx) = bounded(1);
        let job = Job {
            inodes,
            entries,
            done: wait.then_some(done_tx),
        };
        if tx.send(job).is_ok() && wait && done_rx.recv_timeout(BREAK_WAIT).is_err() {
            eprintln!(
                "coda-mount: the kernel took over {} ms to drop invalidated entries; \
                 acknowledging the break anyway",
                BREAK_WAIT.as_millis()
            );
        }
    }
}

fn notify_loop(n: Notifier, rx: Receiver<Job>) {
    for job in rx {
        for ino in &job.inodes {
            // Offset 0, length 0: the attributes and every page. ENOENT
            // (the kernel has forgotten the inode) is the normal case.
            let _ = n.inval_inode(INodeNo(*ino), 0, 0);
        }
        for (parent, name) in &job.entries {
            let _ = n.inval_entry(INodeNo(*parent), name);
        }
        if let Some(d) = job.done {
            let _ = d.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_lifetime_without_a_session_or_after_an_invalidation() {
        let k = KernelCache::new();
        let t = k.ticket();
        assert_eq!(k.ttl(t, true).0, Duration::ZERO, "no notifier yet");
        let (tx, _rx) = unbounded();
        *k.jobs.lock() = Some(tx);
        let t = k.ticket();
        assert_eq!(k.ttl(t, true).0, TRUSTED_TTL);
        assert_eq!(k.ttl(t, false).0, Duration::ZERO, "not vouched for");
        k.invalidate(&[7], false);
        assert_eq!(k.ttl(t, true).0, Duration::ZERO, "an invalidation came");
        assert_eq!(k.ttl(k.ticket(), true).0, TRUSTED_TTL);
    }

    #[test]
    fn fast_opens_are_marked_only_without_an_invalidation_in_between() {
        let k = KernelCache::new();
        let t = k.ticket();
        assert!(!k.vouch_open(5, t, 1), "no notifier yet");
        let (tx, _rx) = unbounded();
        *k.jobs.lock() = Some(tx);
        let t = k.ticket();
        k.invalidate(&[9], false);
        assert!(!k.vouch_open(5, t, 1), "an invalidation came meanwhile");
        assert_eq!(k.fast_version(5), None);
        let t = k.ticket();
        assert!(k.vouch_open(5, t, 1));
        assert!(k.vouch_open(6, t, 2));
        assert_eq!(k.fast_version(5), Some(1));
        k.invalidate(&[5], false);
        assert_eq!(k.fast_version(5), None, "its invalidation drops it");
        assert_eq!(k.fast_version(6), Some(2), "another's does not");
        k.unvouch_open(6);
        assert_eq!(k.fast_version(6), None);
        let t = k.ticket();
        assert!(k.vouch_open(6, t, 3));
        k.invalidate_all(false);
        assert_eq!(k.fast_version(6), None, "failover, a new session");
    }

    #[test]
    fn pages_are_marked_only_without_an_invalidation_and_kept_for_the_same_version() {
        let f = || Some(Arc::new(std::fs::File::open("/dev/null").unwrap()));
        let k = KernelCache::new();
        assert_eq!(k.vouch_pages(5, k.ticket(), 1, f), None, "no notifier yet");
        let (tx, _rx) = unbounded();
        *k.jobs.lock() = Some(tx);
        let t = k.ticket();
        k.invalidate(&[9], false);
        assert_eq!(k.vouch_pages(5, t, 1, f), None, "an invalidation came");
        assert_eq!(k.paged_version(5), None);
        assert_eq!(
            k.vouch_pages(5, k.ticket(), 1, f),
            Some(false),
            "first: drop"
        );
        assert_eq!(k.vouch_pages(5, k.ticket(), 1, f), Some(true), "same: keep");
        assert_eq!(k.paged(5).map(|(v, _)| v), Some(1));
        assert_eq!(
            k.vouch_pages(5, k.ticket(), 2, f),
            Some(false),
            "new version"
        );
        assert_eq!(k.vouch_pages(6, k.ticket(), 7, f), Some(false));
        let t = k.ticket();
        k.invalidate(&[5], false);
        assert_eq!(k.paged_version(5), None, "its invalidation drops it");
        assert_eq!(k.paged_version(6), Some(7), "another's does not");
        assert_eq!(
            k.vouch_pages(6, t, 7, f),
            None,
            "but an open asked before it"
        );
        assert_eq!(k.paged_version(6), None, "is not marked, and unmarks");
        assert_eq!(
            k.vouch_pages(6, k.ticket(), 7, || None),
            None,
            "no descriptor"
        );
        assert_eq!(k.vouch_pages(6, k.ticket(), 7, f), Some(false));
        k.unvouch_pages(6);
        assert_eq!(k.paged_version(6), None);
        assert_eq!(k.vouch_pages(6, k.ticket(), 7, f), Some(false));
        k.invalidate_all(false);
        assert_eq!(k.paged_version(6), None, "failover, a new session");
    }

    #[test]
    fn pages_are_kept_only_for_the_same_version() {
        let k = KernelCache::new();
        assert!(!k.keep_pages(5, (1, 2, 3)), "first open: nothing cached");
        assert!(k.keep_pages(5, (1, 2, 3)));
        assert!(!k.keep_pages(5, (1, 2, 4)), "new version");
        k.forget_pages(5);
        assert!(!k.keep_pages(5, (1, 2, 4)));
    }
}
