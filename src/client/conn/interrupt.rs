//! The one interrupt every blocking wait of the client obeys: failover
//! (sticky until failback) and release (the mode left "connected").

use std::collections::HashMap;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};

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
    /// Set while triggered (sticky until `clear`): every call fails.
    triggered: Option<String>,
    /// Bumped by each release; calls that entered before it fail.
    gen: u64,
    released: String,
}

/// Waits register a wake-up (`on_interrupt`); `trigger` (failover) wakes them all and shuts
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
    /// Registered wake-ups of waiting calls (`on_interrupt`), with the
    /// generation of the call that registered them; held only to insert,
    /// remove, or call them (each only queues a message, never blocks).
    wakers: Mutex<HashMap<u64, (Option<u64>, Waker)>>,
    next_socket: AtomicU64,
}

/// Wakes one waiting call; must not block.
type Waker = Box<dyn Fn() + Send>;

/// Keeps a wake-up registered with an [`Interrupt`] while its call waits.
pub(crate) struct WakeGuard<'a> {
    owner: &'a Interrupt,
    key: u64,
}

impl Drop for WakeGuard<'_> {
    fn drop(&mut self) {
        self.owner.wakers.lock().remove(&self.key);
    }
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
        Interrupt {
            state: Mutex::new(InterruptState {
                triggered: None,
                gen: 0,
                released: String::new(),
            }),
            sockets: Mutex::new(HashMap::new()),
            wakers: Mutex::new(HashMap::new()),
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

    /// Call `wake` when this call should stop waiting (then look with
    /// `check`), for as long as the guard lives; then check, so an
    /// interrupt that came just before is not missed. For a wait on one
    /// channel of its own: cheaper than selecting on it and `watch()`.
    pub(crate) fn on_interrupt(&self, wake: Waker) -> Result<WakeGuard<'_>> {
        let key = self.next_socket.fetch_add(1, Ordering::Relaxed);
        let gen = CALL_GEN.with(|c| c.get());
        self.wakers.lock().insert(key, (gen, wake));
        let g = WakeGuard { owner: self, key };
        self.check()?;
        Ok(g)
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
        }
        for (_, s) in self.sockets.lock().values() {
            let _ = s.shutdown(Shutdown::Both);
        }
        for (_, w) in self.wakers.lock().values() {
            w();
        }
    }

    /// End the waits of every call that entered before now (see the type).
    pub(crate) fn release(&self, reason: &str) {
        let gen = {
            let mut s = self.state.lock();
            s.gen += 1;
            s.released = reason.to_string();
            s.gen
        };
        for (g, s) in self.sockets.lock().values() {
            if g.is_some_and(|g| g < gen) {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        for (g, w) in self.wakers.lock().values() {
            if g.is_some_and(|g| g < gen) {
                w();
            }
        }
    }

    pub fn clear(&self) {
        self.state.lock().triggered = None;
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
        let (tx, watch) = crossbeam_channel::bounded(1);
        let _wake = i
            .on_interrupt(Box::new(move || {
                let _ = tx.try_send(());
            }))
            .unwrap();
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
            watch.recv_timeout(Duration::from_secs(1)).is_ok(),
            "waiters wake"
        );
        assert!(t0.elapsed() < Duration::from_secs(2));
        assert!(matches!(i.check(), Err(Error::Eio(m)) if m == "failed over"));
        i.clear();
        assert!(i.check().is_ok());
    }

    /// A wake-up registered with `i` and what it sends.
    fn woken(i: &Interrupt) -> Result<(WakeGuard<'_>, crossbeam_channel::Receiver<()>)> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let g = i.on_interrupt(Box::new(move || {
            let _ = tx.try_send(());
        }))?;
        Ok((g, rx))
    }

    #[test]
    fn a_release_wakes_only_the_calls_that_entered_before_it() {
        let i = Interrupt::new();
        let call = i.enter_call();
        let (_g1, early) = woken(&i).unwrap();
        drop(call);
        // Not inside a call (a heartbeat's wait): only a failover ends it.
        let (_g2, outside) = woken(&i).unwrap();
        i.release("disconnected");
        assert!(early.try_recv().is_ok(), "the earlier call is woken");
        assert!(outside.try_recv().is_err(), "a wait outside calls is not");
        // A call entered after the release waits on.
        let _call = i.enter_call();
        let (_g3, late) = woken(&i).unwrap();
        i.release("again");
        assert!(late.try_recv().is_ok());
        // Registering after the release that ends it fails at once.
        assert!(matches!(woken(&i), Err(Error::Eio(m)) if m == "again"));
        i.trigger("failed over");
        assert!(outside.try_recv().is_ok(), "a failover wakes every wait");
    }
}
