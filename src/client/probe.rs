//! Liveness: the prober thread owns the answer to "is a server up?".
//!
//! It heartbeats the live session, judges silence against `dead_after`, and
//! turns a reset connection into a verdict at once by reconnecting: refused
//! (or silent until the deadline) means down now. While down it dials every
//! `heartbeat` through its own interrupt (so it keeps looking while failed
//! over) and declares the server up only after [`UP_AFTER_PINGS`] good pings
//! in a row and a revalidation of the cache. Server up/down events are
//! emitted here only, once per transition; automatic failover and failback
//! are started here too. The exact rule is in docs/CLIENT.md.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver};

use super::config::Config;
use super::conn::{Interrupt, Servers, Session};
use super::event::{Event, EventBus};
use super::mode::Mode;
use crate::proto::Msg;
use crate::{Error, Result};

/// Consecutive good pings before a server that was down counts as up: one
/// answer from a flapping server or a half-restarted host proves little.
pub(crate) const UP_AFTER_PINGS: u32 = 3;

/// What the prober needs of the client: its parts, and the steps that
/// involve the whole client (revalidation, the switch to emulation,
/// failover and failback).
pub(crate) trait Watched: Send + Sync + 'static {
    fn health(&self) -> &Health;
    fn servers(&self) -> &Servers;
    fn events(&self) -> &EventBus;
    fn mode(&self) -> &Mode;
    fn counters(&self) -> &super::stats::Counters;
    /// Records logged and not yet on the server.
    fn pending(&self) -> usize;
    /// No server answers: emulate if the mode allows.
    fn server_lost(&self) -> bool;
    fn revalidate_on(&self, s: &Session, interrupt: &Interrupt) -> Result<()>;
    fn fail_over(&self, link: &Path, target: &Path) -> Result<()>;
    fn fail_back(&self, link: &Path, target: &Path) -> Result<()>;
}

/// Liveness state shared by the prober and the client's calls (the
/// prober's verdict; the mode is `mode.rs`).
pub(crate) struct Health {
    up: AtomicBool,
    /// The prober's own interrupt: failover stops callers, never the prober.
    pub interrupt: Interrupt,
    heartbeat: Duration,
    dead_after: Duration,
    auto_failover: Option<(PathBuf, PathBuf)>,
    failback_after: Option<Duration>,
}

impl Health {
    pub fn new(cfg: &Config) -> Health {
        Health {
            up: AtomicBool::new(true),
            interrupt: Interrupt::new(),
            heartbeat: Duration::from_millis(cfg.heartbeat_ms),
            dead_after: Duration::from_millis(cfg.dead_after_ms),
            auto_failover: cfg.failover_link.clone().zip(cfg.failover_target.clone()),
            failback_after: cfg.failback_after_ms.map(Duration::from_millis),
        }
    }

    /// Whether the prober last judged a server up.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    /// Record that a server answers and the cache is revalidated; reports
    /// `ServerUp` only on the transition.
    pub fn mark_up(&self, events: &EventBus, server: &str) {
        if !self.up.swap(true, Ordering::SeqCst) {
            events.emit(Event::ServerUp {
                server: server.to_string(),
            });
        }
    }

    fn mark_down(&self, inner: &impl Watched, server: &str) {
        if self.up.swap(false, Ordering::SeqCst) {
            inner.events().emit(Event::ServerDown {
                server: server.to_string(),
            });
        }
        // The mode leaves "connected" now (with disconnected operation):
        // calls blocked on the dead server, in a handshake or at the
        // connect gate are answered from the cache at once.
        inner.server_lost();
    }
}

/// Start the prober. It holds the client only weakly, and ends when `stop`
/// is dropped (with the client).
pub(crate) fn spawn<C: Watched>(inner: &Arc<C>, stop: Receiver<()>) -> Result<()> {
    let weak: Weak<C> = Arc::downgrade(inner);
    let lost = inner.servers().lost_signal();
    let mut p = Prober {
        seen: inner.servers().current(),
        good: 0,
        up_since: Some(Instant::now()),
        last_tick: Instant::now(),
        planned: inner.health().heartbeat,
    };
    let period = inner.health().heartbeat;
    std::thread::Builder::new()
        .name("coda-probe".into())
        .spawn(move || loop {
            select! {
                recv(stop) -> _ => return,
                recv(lost) -> _ => {}
                default(p.planned) => {}
            }
            let Some(inner) = weak.upgrade() else { return };
            p.tick(&*inner);
            p.planned = next_wait(&*inner, period);
        })
        .map_err(|e| Error::io("spawning the prober thread", e))?;
    Ok(())
}

/// How long the prober sleeps before its next tick: a heartbeat, or less
/// while up, so that it wakes just as the live session's silence passes
/// `dead_after`. Judging only at heartbeat ticks would declare a hung
/// server dead up to a heartbeat late, and keep the calls blocked on it
/// (released only then) that much longer.
fn next_wait(inner: &impl Watched, period: Duration) -> Duration {
    let h = inner.health();
    if !h.is_up() {
        return period;
    }
    match inner.servers().current() {
        Some(s) if !s.is_dead() => {
            let left = h.dead_after.saturating_sub(s.silent_for());
            (left + Duration::from_millis(1)).min(period)
        }
        _ => period,
    }
}

struct Prober {
    /// The session the prober last looked at: a different one means a new
    /// session, whose callbacks must be regained by revalidation.
    seen: Option<Arc<Session>>,
    /// Consecutive good pings while down.
    good: u32,
    /// When the server was last declared up (None while down).
    up_since: Option<Instant>,
    /// When the prober last ran, and how long it meant to sleep after: a
    /// tick more than a heartbeat later than planned means this process (or
    /// this thread) was stopped or starved, and the server's silence
    /// meanwhile proves nothing.
    last_tick: Instant,
    planned: Duration,
}

fn same(a: &Option<Arc<Session>>, b: &Arc<Session>) -> bool {
    a.as_ref().is_some_and(|a| Arc::ptr_eq(a, b))
}

impl Prober {
    fn tick(&mut self, inner: &impl Watched) {
        let late = self.last_tick.elapsed().saturating_sub(self.planned);
        let stalled = late > inner.health().heartbeat;
        self.last_tick = Instant::now();
        if inner.health().is_up() {
            self.watch(inner, stalled);
        } else {
            self.search(inner);
        }
        self.maybe_fail_back(inner);
    }

    fn server_name(&self) -> String {
        self.seen
            .as_ref()
            .map_or_else(|| "servers".to_string(), |s| s.server.clone())
    }

    /// Up: heartbeat, judge silence, and answer a lost connection with an
    /// immediate reconnect.
    fn watch(&mut self, inner: &impl Watched, stalled: bool) {
        let h = inner.health();
        match inner.servers().current() {
            Some(s) if !s.is_dead() && stalled && s.silent_for() > h.dead_after => {
                // This process was stopped: the silence is ours, and the
                // server may be fine. Ask it now; a Pong means the session
                // stands (and every break sent before it is applied). A
                // server that ended the session meanwhile closed the
                // connection: the next tick reconnects, and only that
                // failing means down. No answer at all within `dead_after`
                // of our own running time is a verdict.
                if s.sync(&h.interrupt).is_err() && !s.is_dead() {
                    s.kill(&format!(
                        "no reply within {} ms after this client resumed",
                        h.dead_after.as_millis()
                    ));
                    self.down(inner);
                }
            }
            Some(s) if !s.is_dead() => {
                if !same(&self.seen, &s) {
                    // A caller reconnected: regain the callbacks the old
                    // session's death voided, in a few batches.
                    self.seen = Some(s.clone());
                    let _ = inner.revalidate_on(&s, &h.interrupt);
                }
                let silent = s.silent_for();
                // Frames waiting in the socket mean the reader, not the
                // server, is behind (this thread may have been descheduled
                // or stopped between its lateness check and here). The
                // reader's writes are bounded, so this grace is too.
                let reader_behind = s.has_unread() && silent < 2 * h.dead_after;
                if silent > h.dead_after && !reader_behind {
                    s.kill(&format!("no reply for {} ms", silent.as_millis()));
                    // In a group, a hung leader (stopped, cut off) is not
                    // the loss of the servers: one reconnect first, which
                    // waits out an election the others report (the silent
                    // one is tried last), as after a reset.
                    if inner.servers().several() {
                        if let Ok(s) = inner.servers().probe_session(&h.interrupt, h.dead_after) {
                            self.seen = Some(s.clone());
                            let _ = inner.revalidate_on(&s, &h.interrupt);
                            return;
                        }
                    }
                    self.down(inner);
                } else {
                    s.ping();
                }
            }
            dead => {
                // Reset or closed. One reconnect now: a refusal proves the
                // server is gone; success means only the connection was (a
                // restart, or a server that cut us after a break timeout).
                let left = dead
                    .map_or(h.dead_after, |s| {
                        h.dead_after.saturating_sub(s.silent_for())
                    })
                    .max(h.heartbeat);
                match inner.servers().probe_session(&h.interrupt, left) {
                    Ok(s) => {
                        self.seen = Some(s.clone());
                        let _ = inner.revalidate_on(&s, &h.interrupt);
                    }
                    Err(_) => self.down(inner),
                }
            }
        }
    }

    fn down(&mut self, inner: &impl Watched) {
        self.good = 0;
        self.up_since = None;
        inner.health().mark_down(inner, &self.server_name());
        self.auto_failover(inner);
    }

    fn auto_failover(&self, inner: &impl Watched) {
        let Some((link, target)) = &inner.health().auto_failover else {
            return;
        };
        if !inner.mode().failed_over() {
            // A failure (link missing, not a symlink) is retried next tick.
            let _ = inner.fail_over(link, target);
        }
    }

    /// Down: look for a server; count good pings; revalidate; then up.
    fn search(&mut self, inner: &impl Watched) {
        let h = inner.health();
        let s = match inner.servers().probe_session(&h.interrupt, h.dead_after) {
            Ok(s) => s,
            Err(_) => {
                self.good = 0;
                self.auto_failover(inner);
                return;
            }
        };
        if !same(&self.seen, &s) {
            self.seen = Some(s.clone());
            self.good = 0;
        }
        match s.call_within(&Msg::Ping, &h.interrupt, h.dead_after) {
            Ok(Msg::Pong) => self.good += 1,
            _ => {
                self.good = 0;
                return;
            }
        }
        if self.good < UP_AFTER_PINGS {
            return;
        }
        if inner.revalidate_on(&s, &h.interrupt).is_err() {
            self.good = 0;
            return;
        }
        self.up_since = Some(Instant::now());
        // The cache is revalidated: with nothing logged, connected again
        // now (before ServerUp); otherwise the reintegrator sends the log
        // first and then switches.
        if inner.pending() == 0 && !inner.mode().failed_over() {
            inner.mode().reconnected();
        }
        h.mark_up(inner.events(), &s.server);
    }

    fn maybe_fail_back(&self, inner: &impl Watched) {
        let (Some(after), Some(since)) = (inner.health().failback_after, self.up_since) else {
            return;
        };
        if since.elapsed() < after {
            return;
        }
        if let Some(f) = inner.mode().failback_record() {
            let _ = inner.fail_back(&f.link, &f.before);
        }
    }
}
