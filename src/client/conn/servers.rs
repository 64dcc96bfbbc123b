//! The servers we know, the current session, and connecting on demand
//! (one caller's handshake at a time, no lock held across it).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use parking_lot::{Condvar, Mutex};

use super::interrupt::Interrupt;
use super::params::{Identity, Timing, GATE_SLICE};
use super::session::Session;
use crate::client::callback::Callbacks;
use crate::client::stats::Counters;
use crate::{Error, Result};

/// Pause between rounds of asking a group's members while none is leader.
const LEADER_WAIT: Duration = Duration::from_millis(50);

// ---------------------------------------------------------------------------
// The servers we know, the current session, and reconnecting on demand.

pub(crate) struct Servers {
    addrs: Vec<String>,
    ident: Arc<Identity>,
    timing: Timing,
    callbacks: Arc<Callbacks>,
    counters: Arc<Counters>,
    /// The current session; held only to read or replace it.
    current: Mutex<Option<Arc<Session>>>,
    /// Whether a caller is connecting: the others queue behind its one
    /// bounded handshake instead of each opening a session of their own.
    /// The lock guards only the flag (never held while connecting); the
    /// waiters poll the interrupt, so a failover or release frees them.
    connecting: Mutex<bool>,
    connect_done: Condvar,
    sessions: AtomicU64,
    lost: (Sender<()>, Receiver<()>),
    pub interrupt: Interrupt,
}

/// The turn to connect; handed on when dropped.
struct ConnectTurn<'a> {
    servers: &'a Servers,
}

impl Drop for ConnectTurn<'_> {
    fn drop(&mut self) {
        *self.servers.connecting.lock() = false;
        self.servers.connect_done.notify_all();
    }
}

impl Servers {
    pub fn new(
        addrs: Vec<String>,
        ident: Identity,
        timing: Timing,
        callbacks: Arc<Callbacks>,
        counters: Arc<Counters>,
    ) -> Servers {
        Servers {
            addrs,
            ident: Arc::new(ident),
            timing,
            callbacks,
            counters,
            current: Mutex::new(None),
            connecting: Mutex::new(false),
            connect_done: Condvar::new(),
            sessions: AtomicU64::new(0),
            lost: bounded(1),
            interrupt: Interrupt::new(),
        }
    }

    pub fn ident(&self) -> &Identity {
        &self.ident
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// Ready whenever a session's connection died (reset, EOF, write error).
    pub fn lost_signal(&self) -> Receiver<()> {
        self.lost.1.clone()
    }

    /// The current session, dead or alive, without connecting.
    pub fn current(&self) -> Option<Arc<Session>> {
        self.current.lock().clone()
    }

    /// The live session, connecting (a new session: every callback void) if
    /// there is none or it died.
    pub fn session(&self) -> Result<Arc<Session>> {
        self.interrupt.check()?;
        if let Some(s) = self.live() {
            return Ok(s);
        }
        let _turn = self.connect_turn(&self.interrupt, self.timing.rpc_timeout)?;
        // A failover while we queued must not start a handshake.
        self.interrupt.check()?;
        self.connect_gated(&self.interrupt, self.timing.rpc_timeout)
    }

    /// The prober's way in: obeys its own interrupt (not the failover one, so
    /// it can find a server again while failed over), never waits at the
    /// connect gate longer than `timeout`, and bounds the handshake by it.
    pub fn probe_session(&self, interrupt: &Interrupt, timeout: Duration) -> Result<Arc<Session>> {
        interrupt.check()?;
        if let Some(s) = self.live() {
            return Ok(s);
        }
        let _turn = self.connect_turn(interrupt, timeout)?;
        self.connect_gated(interrupt, timeout)
    }

    /// Wait (at most `timeout`; an interrupt or release ends it at once)
    /// until no other caller is connecting, and take the turn. No lock is
    /// held while the turn's holder connects.
    fn connect_turn(&self, interrupt: &Interrupt, timeout: Duration) -> Result<ConnectTurn<'_>> {
        let deadline = Instant::now() + timeout;
        let mut busy = self.connecting.lock();
        loop {
            interrupt.check()?;
            if !*busy {
                *busy = true;
                return Ok(ConnectTurn { servers: self });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout("another connect is in progress".into()));
            }
            // Interrupts do not signal the condvar: look again shortly.
            self.connect_done
                .wait_for(&mut busy, (deadline - now).min(GATE_SLICE));
        }
    }

    /// The current session if it is alive and fresh. One silent for longer
    /// than `dead_after` is killed here rather than used: the prober may not
    /// have run yet (say this process was stopped), and the server may have
    /// cut us off meanwhile.
    fn live(&self) -> Option<Arc<Session>> {
        let s = self.current.lock().clone()?;
        if s.is_dead() {
            return None;
        }
        let silent = s.silent_for();
        // (Unread frames: the reader is behind, not the server; see the prober.)
        if silent > self.timing.dead_after
            && !(s.has_unread() && silent < 2 * self.timing.dead_after)
        {
            s.kill(&format!(
                "no reply for {} ms",
                self.timing.dead_after.as_millis()
            ));
            return None;
        }
        Some(s)
    }

    /// Whether callbacks may be trusted now: the session is live and was
    /// heard from within its trust window (see `Session::heard_recently`),
    /// or it answers a round trip now, which applies every break the server
    /// sent before the answer. Check the callback after this, not before.
    /// A round trip slower than the trust window proves nothing (the
    /// answer vouches only for a moment after the Ping was written).
    pub fn fresh(&self) -> bool {
        let Some(s) = self.live() else {
            return false;
        };
        s.heard_recently() || (s.sync(&self.interrupt).is_ok() && s.heard_recently())
    }

    /// `fresh` without the round trip: only whether the live session was
    /// heard from within its trust window. Never waits.
    pub fn fresh_now(&self) -> bool {
        self.live().is_some_and(|s| s.heard_recently())
    }

    /// Connect to the first server that answers; the caller holds the gate.
    ///
    /// With several servers (a replicated group, docs/SERVER.md
    /// "Replication"): the server whose session just died is tried last (a
    /// stopped server accepts TCP and then says nothing until the timeout);
    /// a refusal naming the leader is followed at once; and while the
    /// others answer that no leader is elected yet they are asked again,
    /// within `timeout` or `election_wait`, whichever is longer,
    /// before the suspect.
    fn connect_gated(&self, interrupt: &Interrupt, timeout: Duration) -> Result<Arc<Session>> {
        if let Some(s) = self.live() {
            return Ok(s);
        }
        let suspect = self
            .current
            .lock()
            .as_ref()
            .filter(|s| s.is_dead())
            .map(|s| s.server().to_string())
            .filter(|_| self.addrs.len() > 1);
        let start = Instant::now();
        let mut deadline = start + timeout;
        let mut last = Error::Invalid("no servers configured".into());
        // Bounded by the deadline: each round sleeps a slice at least.
        loop {
            let mut no_leader = false;
            for addr in self.addrs.iter().filter(|a| Some(*a) != suspect.as_ref()) {
                let e = match self.try_server(addr, interrupt, timeout) {
                    Ok(s) => return Ok(s),
                    Err(e @ Error::Auth(_)) => return Err(e),
                    Err(e) => e,
                };
                let msg = e.to_string();
                if let Some(leader) = msg.split("; the leader is member ").nth(1) {
                    let to = leader.split(" at ").nth(1).unwrap_or("").trim();
                    if !to.is_empty() && Some(to) != suspect.as_deref() && to != addr {
                        match self.try_server(to, interrupt, timeout) {
                            Ok(s) => return Ok(s),
                            Err(e @ Error::Auth(_)) => return Err(e),
                            Err(e) => last = e,
                        }
                        continue;
                    }
                }
                no_leader |=
                    msg.contains("no leader elected yet") || msg.contains("not the leader");
                last = e;
            }
            // While members answer that they are electing a leader, wait
            // for it at least `election_wait` (default 3 s), whatever our
            // own timeout (the prober's is what is left of `dead_after`):
            // the group answers, so this is not the loss of the servers,
            // and an election takes 0.6–1 s after the last heartbeat,
            // 100–250 ms more per round a split vote adds.
            if no_leader {
                deadline = deadline.max(start + self.timing.election_wait);
            }
            if !no_leader || Instant::now() + LEADER_WAIT >= deadline {
                break;
            }
            interrupt.check()?;
            std::thread::sleep(LEADER_WAIT);
        }
        if let Some(addr) = &suspect {
            match self.try_server(addr, interrupt, timeout) {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// One connection attempt; the new session becomes the current one.
    fn try_server(
        &self,
        addr: &str,
        interrupt: &Interrupt,
        timeout: Duration,
    ) -> Result<Arc<Session>> {
        self.sessions.fetch_add(1, Ordering::Relaxed);
        // Void old promises before a grant of the new session can land.
        self.callbacks.new_session();
        let s = Session::connect(
            addr,
            self.ident.clone(),
            self.timing,
            self.callbacks.clone(),
            self.counters.clone(),
            interrupt,
            timeout,
            self.lost.0.clone(),
        )?;
        if let Some(old) = self.current.lock().replace(s.clone()) {
            old.close("replaced by a new session");
        }
        Ok(s)
    }

    /// Whether several servers are configured (a replicated group).
    pub fn several(&self) -> bool {
        self.addrs.len() > 1
    }

    /// Whether a live session exists right now (no network traffic).
    pub fn is_connected(&self) -> bool {
        self.current.lock().as_ref().is_some_and(|s| !s.is_dead())
    }

    pub fn shutdown(&self) {
        if let Some(s) = self.current.lock().take() {
            s.close("client shut down");
        }
    }
}
