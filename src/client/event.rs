//! Events: how a program learns of state changes (server down/up, failover,
//! failback, callback breaks) without polling the state.
//!
//! Two ways to receive them, both fed by [`EventBus::emit`]: a bounded queue
//! that callers pull from with a timeout (what ctypes users prefer), and at
//! most one registered handler, run on a dedicated dispatcher thread so a slow
//! or re-entrant handler never stalls the library's connection threads.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex};

use crate::proto::Fid;

/// Most events kept for pulling; past this the oldest are dropped (and
/// counted), so a program that never pulls costs bounded memory.
pub const QUEUE_LIMIT: usize = 1024;

/// A state change the client reports; [`Event::kind_code`] gives its
/// `CODA_EVENT_*` number at the C ABI. New kinds are added over time (the
/// replicated group's came later): match with a wildcard arm.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The prober (or a failed call) found the server unreachable; sent once
    /// per up-to-down transition, as the client leaves connected mode.
    ServerDown {
        /// The server's address as configured.
        server: String,
    },
    /// The server answers again; sent once per down-to-up transition.
    ServerUp {
        /// The server's address as configured.
        server: String,
    },
    /// `Client::failover` swapped `link` to a local tree: remote operations
    /// now fail with EIO until failback.
    Failover {
        /// The symlink that was repointed.
        link: String,
        /// Where it points now (the local tree).
        target: String,
    },
    /// `Client::failback` finished: `link` points at the remote tree again
    /// and remote operations go through.
    Failback {
        /// The symlink that was repointed.
        link: String,
        /// Where it points now (the remote tree).
        target: String,
    },
    /// The server broke the callback on `fid`: the cached copy is no longer
    /// trusted and is revalidated on next use.
    CallbackBreak {
        /// The object whose cached state may be stale.
        fid: Fid,
    },
    /// A reintegration batch committed on the server.
    Reintegrated {
        /// Log records the batch carried.
        records: u64,
        /// Records still in the log after it.
        remaining: u64,
    },
    /// The server refused a record at reintegration: see `Client::conflicts`.
    Conflict {
        /// The conflict's id, for `Client::conflicts` and its resolution.
        id: u64,
        /// The object the refused record touched.
        fid: Fid,
        /// Its path when the record was logged.
        path: String,
    },
    /// Reintegration stopped because the server is out of space or the
    /// volume's quota is reached (`code` is `-ENOSPC` or `-EDQUOT`): the
    /// records stay in the log (`pending`) and are tried again after
    /// `retry_ms` (doubling up to a minute), or at `reintegrate_now`.
    ReintegrationStalled {
        /// `-ENOSPC` or `-EDQUOT`.
        code: i32,
        /// The server's message.
        message: String,
        /// Records waiting in the log.
        pending: u64,
        /// Milliseconds until the next attempt.
        retry_ms: u64,
    },
    /// A replicated group has a new leader, which this client now talks
    /// to (docs/CLIENT.md "Group events").
    LeaderChanged {
        /// The new leader's group address.
        leader: String,
        /// Its term (grows with each election).
        term: u64,
    },
    /// The group's leader stopped hearing from a member (killed, stopped,
    /// cut off): the group goes on while a majority answers.
    MemberDown {
        /// The member's group address.
        member: String,
    },
    /// A member the leader had stopped hearing from answers again.
    MemberUp {
        /// The member's group address.
        member: String,
    },
}

impl Event {
    /// Stable numbers for the C ABI (`CODA_EVENT_*`).
    pub fn kind_code(&self) -> u32 {
        match self {
            Event::ServerDown { .. } => 1,
            Event::ServerUp { .. } => 2,
            Event::Failover { .. } => 3,
            Event::Failback { .. } => 4,
            Event::CallbackBreak { .. } => 5,
            Event::Reintegrated { .. } => 6,
            Event::Conflict { .. } => 7,
            Event::ReintegrationStalled { .. } => 8,
            Event::LeaderChanged { .. } => 9,
            Event::MemberDown { .. } => 10,
            Event::MemberUp { .. } => 11,
        }
    }
}

/// What the client stopped trusting, told synchronously to the
/// invalidation subscriber ([`crate::client::Client::set_invalidation_hook`]):
/// a program that keeps its own copy of cached state (the mount's kernel
/// caches) drops it here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// The callbacks on these objects are gone (including objects that were
    /// trusted only through a broken volume callback).
    Fids {
        /// The objects whose cached state may be stale.
        fids: Vec<Fid>,
        /// A break sent by the server (the subscriber runs on the session's
        /// break thread, before the break is acknowledged, while replies
        /// keep arriving); otherwise the client dropped them itself (its
        /// own change, a conflict, a flush).
        from_server: bool,
    },
    /// Every promise is void: a new session with the server (after a
    /// reconnection the client revalidates everything it cached).
    All,
}

/// An invalidation subscriber; runs on the thread that learned of the
/// invalidation, so it must return soon (bounded) and not call the client.
pub type InvalidationHook = Arc<dyn Fn(&Invalidation) + Send + Sync>;

/// An event callback; run on the bus's dispatcher thread, never on a
/// connection thread, so it may block or call back into the client.
pub type Handler = Arc<dyn Fn(&Event) + Send + Sync>;

struct Queue {
    events: VecDeque<Event>,
    dropped: u64,
}

/// Fans events out to the pull queue and the registered handler; one per
/// client.
pub struct EventBus {
    queue: Mutex<Queue>,
    ready: Condvar,
    handler: Arc<Mutex<Option<Handler>>>,
    dispatch: Mutex<Option<Sender<Event>>>,
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus::new()
    }
}

impl EventBus {
    /// An empty bus with no handler; the dispatcher thread starts only when
    /// a handler is installed.
    pub fn new() -> EventBus {
        EventBus {
            queue: Mutex::new(Queue {
                events: VecDeque::new(),
                dropped: 0,
            }),
            ready: Condvar::new(),
            handler: Arc::new(Mutex::new(None)),
            dispatch: Mutex::new(None),
        }
    }

    /// Deliver `ev` to the handler (if any) and append it to the queue,
    /// dropping the oldest event when [`QUEUE_LIMIT`] is reached. Never
    /// blocks on the handler.
    pub fn emit(&self, ev: Event) {
        if let Some(tx) = self.dispatch.lock().as_ref() {
            let _ = tx.send(ev.clone());
        }
        let mut q = self.queue.lock();
        if q.events.len() >= QUEUE_LIMIT {
            q.events.pop_front();
            q.dropped += 1;
        }
        q.events.push_back(ev);
        drop(q);
        self.ready.notify_one();
    }

    /// Take the oldest queued event, waiting up to `timeout` for one.
    pub fn next(&self, timeout: Duration) -> Option<Event> {
        let deadline = Instant::now() + timeout;
        let mut q = self.queue.lock();
        loop {
            if let Some(ev) = q.events.pop_front() {
                return Some(ev);
            }
            if self.ready.wait_until(&mut q, deadline).timed_out() {
                return q.events.pop_front();
            }
        }
    }

    /// Events dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.queue.lock().dropped
    }

    /// Install (or with `None`, remove) the handler. The first install starts
    /// the dispatcher thread; it ends when the bus is dropped.
    pub fn set_handler(&self, h: Option<Handler>) {
        *self.handler.lock() = h;
        let mut d = self.dispatch.lock();
        if d.is_none() {
            let (tx, rx): (Sender<Event>, Receiver<Event>) = crossbeam_channel::unbounded();
            let handler = self.handler.clone();
            let spawned = std::thread::Builder::new()
                .name("coda-events".into())
                .spawn(move || {
                    for ev in rx {
                        // Call outside the lock, so a handler may replace itself.
                        let h = handler.lock().clone();
                        if let Some(h) = h {
                            h(&ev);
                        }
                    }
                });
            if spawned.is_ok() {
                *d = Some(tx);
            }
        }
    }
}

impl Drop for EventBus {
    fn drop(&mut self) {
        // Closing the channel ends the dispatcher thread.
        self.dispatch.lock().take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pulled_events_come_in_order_and_the_queue_is_bounded() {
        let bus = EventBus::new();
        assert_eq!(bus.next(Duration::from_millis(5)), None);
        for i in 0..(QUEUE_LIMIT + 3) {
            bus.emit(Event::ServerDown {
                server: i.to_string(),
            });
        }
        assert_eq!(bus.dropped(), 3);
        assert_eq!(
            bus.next(Duration::ZERO),
            Some(Event::ServerDown { server: "3".into() })
        );
    }

    #[test]
    fn handler_runs_on_another_thread() {
        let bus = EventBus::new();
        let (tx, rx) = crossbeam_channel::unbounded();
        let me = std::thread::current().id();
        bus.set_handler(Some(Arc::new(move |ev| {
            tx.send((ev.clone(), std::thread::current().id())).unwrap();
        })));
        bus.emit(Event::ServerUp { server: "s".into() });
        let (ev, tid) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(ev, Event::ServerUp { server: "s".into() });
        assert_ne!(tid, me);
    }
}
