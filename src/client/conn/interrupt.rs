//! The one interrupt every blocking wait of the client obeys: failover
//! (sticky until failback) and release (the mode left "connected").

use std::collections::HashMap;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_channel::{bounded, Receiver, Sender};
use parking_lot::Mutex;

use crate::{Error, Result};

// ---------------------------------------------------------------------------
// Interrupts: one place that can make every wait return at once.

thread_local! {
    /// The release generation the current call started in (`enter_call`):
    /// a release after it ends the call's waits.
    static CALL_GEN: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

struct InterruptState {
    /// Dropped to wake every `watch()` receiver (trigger or release).
    tx: Option<Sender<()>>,
    rx: Receiver<()>,
    /// Set while triggered (sticky until `clear`): every call fails.
    triggered: Option<String>,
    /// Bumped by each release; calls that entered before it fail.
    gen: u64,
    released: String,
}

/// Waits select on `watch()`; `trigger` (failover) wakes them all and shuts
/// down every socket registered with `guard` (handshakes, connects and bulk
/// transfers), so blocking reads and writes stop too, until `clear`
/// (failback). `release` (the mode left "connected") does the same once,
/// for the calls that entered (`enter_call`) before it only: they are
/// answered in the new mode, and later calls (the reintegrator's) go on.
pub(crate) struct Interrupt {
    /// Guards the flags above; held only to read or swap them.
    state: Mutex<InterruptState>,
    /// Registered sockets with the generation of the call that registered
    /// them (None: not a caller's); held only to insert, remove, or shut
    /// them down (shutdown never blocks).
    sockets: Mutex<HashMap<u64, (Option<u64>, TcpStream)>>,
    next_socket: AtomicU64,
}

/// Keeps a socket registered with an [`Interrupt`] while it blocks.
pub(crate) struct SocketGuard<'a> {
    owner: &'a Interrupt,
    key: u64,
}

impl Drop for SocketGuard<'_> {
    fn drop(&mut self) {
        self.owner.sockets.lock().remove(&self.key);
    }
}

/// Marks the current thread's call as begun in the generation it read;
/// restores the outer mark when dropped (calls nest).
pub(crate) struct CallGuard {
    outer: Option<u64>,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        CALL_GEN.with(|c| c.set(self.outer));
    }
}

impl Interrupt {
    pub(crate) fn new() -> Interrupt {
        let (tx, rx) = bounded(0);
        Interrupt {
            state: Mutex::new(InterruptState {
                tx: Some(tx),
                rx,
                triggered: None,
                gen: 0,
                released: String::new(),
            }),
            sockets: Mutex::new(HashMap::new()),
            next_socket: AtomicU64::new(0),
        }
    }

    /// Begin a caller's call: a release from now on ends its waits. Read
    /// the mode after this (the mode is set before it releases).
    pub(crate) fn enter_call(&self) -> CallGuard {
        let gen = self.state.lock().gen;
        let outer = CALL_GEN.with(|c| c.replace(Some(c.get().unwrap_or(gen))));
        CallGuard { outer }
    }

    /// Register `s` so an interrupt shuts it down; then check, so an
    /// interrupt that came just before is not missed.
    pub(crate) fn guard(&self, s: &TcpStream) -> Result<SocketGuard<'_>> {
        let key = self.next_socket.fetch_add(1, Ordering::Relaxed);
        if let Ok(c) = s.try_clone() {
            let gen = CALL_GEN.with(|c| c.get());
            self.sockets.lock().insert(key, (gen, c));
        }
        let g = SocketGuard { owner: self, key };
        self.check()?;
        Ok(g)
    }

    /// Ready when this call should stop waiting (look with `check`).
    pub fn watch(&self) -> Receiver<()> {
        let s = self.state.lock();
        if Self::stale(&s) {
            // Released already: a receiver that is ready at once.
            let (_, rx) = bounded(0);
            return rx;
        }
        s.rx.clone()
    }

    fn stale(s: &InterruptState) -> bool {
        CALL_GEN.with(|c| c.get()).is_some_and(|g| g < s.gen)
    }

    pub fn check(&self) -> Result<()> {
        let s = self.state.lock();
        if let Some(r) = &s.triggered {
            return Err(Error::Eio(r.clone()));
        }
        if Self::stale(&s) {
            return Err(Error::Eio(s.released.clone()));
        }
        Ok(())
    }

    pub(crate) fn trigger(&self, reason: &str) {
        {
            let mut s = self.state.lock();
            s.triggered = Some(reason.to_string());
            s.tx = None;
        }
        for (_, s) in self.sockets.lock().values() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// End the waits of every call that entered before now (see the type).
    pub(crate) fn release(&self, reason: &str) {
        let gen = {
            let mut s = self.state.lock();
            s.gen += 1;
            s.released = reason.to_string();
            if s.triggered.is_none() {
                let (tx, rx) = bounded(0);
                s.tx = Some(tx);
                s.rx = rx;
            }
            s.gen
        };
        for (g, s) in self.sockets.lock().values() {
            if g.is_some_and(|g| g < gen) {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }

    pub fn clear(&self) {
        let (tx, rx) = bounded(0);
        let mut s = self.state.lock();
        s.tx = Some(tx);
        s.rx = rx;
        s.triggered = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::time::{Duration, Instant};

    #[test]
    fn an_interrupt_unblocks_waits_and_guarded_sockets_at_once() {
        let i = Interrupt::new();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let _peer = l.accept().unwrap();
        let watch = i.watch();
        let t0 = Instant::now();
        std::thread::scope(|sc| {
            let _g = i.guard(&s).unwrap();
            sc.spawn(|| {
                std::thread::sleep(Duration::from_millis(100));
                i.trigger("failed over");
            });
            // Blocks (the peer sends nothing) until the interrupt shuts it down.
            let mut b = [0u8; 1];
            assert!(matches!(s.read(&mut b), Ok(0) | Err(_)));
        });
        assert!(
            watch.recv_timeout(Duration::from_secs(1)).is_err(),
            "watchers wake"
        );
        assert!(t0.elapsed() < Duration::from_secs(2));
        assert!(matches!(i.check(), Err(Error::Eio(m)) if m == "failed over"));
        i.clear();
        assert!(i.check().is_ok());
    }
}
