//! Counters a program (or a test) reads to see what the cache manager did.

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of the client's counters since `Client::new`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Whole-file fetches (files and symlink targets) over the bulk connection.
    pub fetches: u64,
    /// Bytes those fetches brought into the cache.
    pub fetch_bytes: u64,
    /// `GetAttrs` requests sent (one request may carry many fids).
    pub getattr_rpcs: u64,
    /// `ReadDir` pages requested.
    pub readdir_rpcs: u64,
    /// Fids whose callbacks the server broke.
    pub breaks_received: u64,
    /// `Reintegrate` batches the server committed.
    pub reintegrations: u64,
    /// Cached objects found unchanged by a version check instead of a refetch.
    pub validations_unchanged: u64,
    /// CML records the server committed (a batch carries many).
    pub records_reintegrated: u64,
    /// `ValidateVolume` requests (one per volume on reconnect or restart).
    pub volume_validations: u64,
    /// Reintegrations the server refused for lack of space or quota (each
    /// starts or lengthens the back-off).
    pub space_refusals: u64,
    /// Connected `Reintegrate` batches written to the server (several may
    /// be in flight at once; each is answered once).
    pub batches_sent: u64,
    /// Pipelined batches the server answered `NotApplied` (the batch before
    /// them did not apply); their records were sent again.
    pub batches_not_applied: u64,
    /// Views of a replicated group its leader gave the client's group
    /// watcher (asked every 500 ms; docs/CLIENT.md "Group events").
    pub group_views: u64,
    /// Times the group watcher was told the servers are no group (lone
    /// servers listed) or do not know the request (an older server): it
    /// then asks once a minute instead of every 500 ms.
    pub group_refusals: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub fetches: AtomicU64,
    pub fetch_bytes: AtomicU64,
    pub getattr_rpcs: AtomicU64,
    pub readdir_rpcs: AtomicU64,
    pub breaks_received: AtomicU64,
    pub reintegrations: AtomicU64,
    pub validations_unchanged: AtomicU64,
    pub records_reintegrated: AtomicU64,
    pub volume_validations: AtomicU64,
    pub space_refusals: AtomicU64,
    pub batches_sent: AtomicU64,
    pub batches_not_applied: AtomicU64,
    pub group_views: AtomicU64,
    pub group_refusals: AtomicU64,
}

impl Counters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> ClientStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ClientStats {
            fetches: g(&self.fetches),
            fetch_bytes: g(&self.fetch_bytes),
            getattr_rpcs: g(&self.getattr_rpcs),
            readdir_rpcs: g(&self.readdir_rpcs),
            breaks_received: g(&self.breaks_received),
            reintegrations: g(&self.reintegrations),
            validations_unchanged: g(&self.validations_unchanged),
            records_reintegrated: g(&self.records_reintegrated),
            volume_validations: g(&self.volume_validations),
            space_refusals: g(&self.space_refusals),
            batches_sent: g(&self.batches_sent),
            batches_not_applied: g(&self.batches_not_applied),
            group_views: g(&self.group_views),
            group_refusals: g(&self.group_refusals),
        }
    }
}
