//! How many of the FUSE threads wait for the kernel's next request.
//!
//! The kernel hands a request to the thread that has waited longest in
//! read(2) on /dev/fuse, so with all N threads waiting every request lands
//! on the coldest thread, a wake-up and a cache refill each time (on a
//! 2-core machine it doubled the cost of a cached open). The gate keeps
//! `KEEP` threads reading and parks the others after they reply; a thread
//! that takes a request while no other one is left reading (its request
//! may wait for a server) releases a parked one first, so a slow request
//! never holds up the next one, as before. The pool grows only while
//! requests block.

use std::time::Duration;

use parking_lot::{Condvar, Mutex};

/// Threads kept reading after a request that may wait: an open's
/// asynchronous release usually overlaps the next open, so with fewer the
/// last reader would take a request about every time and release a parked
/// thread: the hand-off the gate exists to avoid. (Measured: two still
/// spread a loop of opens over all eight threads, three keep it mostly on
/// three.)
const KEEP: usize = 3;

/// Threads kept reading after a request that waited for nothing (a cached
/// file's open and its release: `Gate::enter_quick`, which also keeps the
/// reading to itself): one, so a web server's stream of them stays on one
/// warm thread, which often finds the next request queued when it replies;
/// with three readers the kernel handed each request to the one that had
/// waited longest, a cold wake-up every time (docs/BENCHMARKS.md, `mopen`:
/// 15 against 22 µs per open+fstat+read+close).
const KEEP_QUICK: usize = 1;

/// How many quick requests in a row (none that may wait in between) make a
/// stream, after which `KEEP_QUICK` applies. Mixed work (a file read once:
/// an open and a read through the client, then a quick release) keeps
/// `KEEP` readers: parking after its releases only to wake a thread again
/// for its next open cost more than the cold wake-ups.
const QUICK_STREAK: u32 = 8;

/// A parked thread goes back to reading after this long even unasked:
/// bounds the wait when the session ends (the kernel then fails every
/// read and the threads exit).
const PARK_LIMIT: Duration = Duration::from_millis(250);

#[derive(Default)]
struct State {
    /// Threads reading (or about to read) the next request.
    idle: usize,
    /// Threads parked in `exit`.
    parked: usize,
    /// Parked threads told to go back to reading (already counted idle).
    woken: usize,
    /// Quick requests since the last one that may wait.
    streak: u32,
}

/// The FUSE threads' gate. Before `set_threads` it does nothing.
#[derive(Default)]
pub struct Gate {
    state: Mutex<State>,
    cv: Condvar,
    on: std::sync::atomic::AtomicBool,
}

/// Held while a request is handled; dropping it (after the reply) may
/// park the thread.
pub struct Pass<'a> {
    gate: Option<&'a Gate>,
    /// `may_block` ran (a parked thread was released if none else reads).
    handed: bool,
}

impl Gate {
    /// The session runs `n` threads, all reading at first.
    pub fn set_threads(&self, n: usize) {
        self.state.lock().idle = n;
        self.on
            .store(n > KEEP, std::sync::atomic::Ordering::Relaxed);
    }

    /// A thread took a request.
    pub fn enter(&self) -> Pass<'_> {
        let mut p = self.enter_quick();
        p.may_block();
        p
    }

    /// A thread took a request it may answer without waiting for anything
    /// (no server, no disk): it keeps the reading to itself, so a loop of
    /// such requests (a cached file's open and release) stays on one warm
    /// thread with no hand-off. It calls `Pass::may_block` before anything
    /// that may wait.
    pub fn enter_quick(&self) -> Pass<'_> {
        if !self.on.load(std::sync::atomic::Ordering::Relaxed) {
            return Pass {
                gate: None,
                handed: true,
            };
        }
        let mut s = self.state.lock();
        s.idle = s.idle.saturating_sub(1);
        s.streak = s.streak.saturating_add(1);
        Pass {
            gate: Some(self),
            handed: false,
        }
    }

    fn exit(&self, quick: bool) {
        let mut s = self.state.lock();
        let keep = if quick && s.streak >= QUICK_STREAK {
            KEEP_QUICK
        } else {
            KEEP
        };
        if s.idle < keep {
            s.idle += 1;
            return;
        }
        s.parked += 1;
        // Bounded: one wait, then back to reading whatever happened.
        if s.woken == 0 {
            self.cv.wait_for(&mut s, PARK_LIMIT);
        }
        s.parked -= 1;
        if s.woken > 0 {
            // Woken (or another's wake-up taken: same count either way).
            s.woken -= 1;
        } else {
            s.idle += 1;
        }
    }
}

impl Pass<'_> {
    /// What follows may wait (for a server): if nobody else reads, release
    /// a parked thread first, so the next request needs no wait for this.
    pub fn may_block(&mut self) {
        if self.handed {
            return;
        }
        self.handed = true;
        let Some(g) = self.gate else {
            return;
        };
        let mut s = g.state.lock();
        s.streak = 0;
        if s.idle == 0 && s.parked > s.woken {
            s.woken += 1;
            s.idle += 1;
            g.cv.notify_one();
        }
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        if let Some(g) = self.gate {
            g.exit(!self.handed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_keep_reading_and_parks_the_rest() {
        let g = Gate::default();
        g.set_threads(KEEP + 1);
        // Two requests at once: the others read on, nobody parks.
        let a = g.enter();
        let b = g.enter();
        assert_eq!(g.state.lock().idle, KEEP - 1);
        drop(a);
        // Finds KEEP others reading and parks (at most PARK_LIMIT here:
        // nobody wakes it), then reads again.
        drop(b);
        let s = g.state.lock();
        assert_eq!((s.idle, s.parked, s.woken), (KEEP + 1, 0, 0));
    }

    #[test]
    fn a_quick_request_keeps_the_reading_and_may_block_hands_it_on() {
        let g = Gate::default();
        g.set_threads(KEEP + 1);
        {
            let mut s = g.state.lock();
            // KEEP reading, one parked (as after a burst).
            s.idle = KEEP;
            s.parked = 1;
        }
        let held: Vec<Pass<'_>> = (0..KEEP - 1).map(|_| g.enter()).collect();
        let mut p = g.enter_quick();
        {
            let s = g.state.lock();
            assert_eq!((s.idle, s.woken), (0, 0), "a quick request wakes nobody");
        }
        p.may_block();
        p.may_block();
        {
            let s = g.state.lock();
            assert_eq!(
                (s.idle, s.woken),
                (1, 1),
                "one parked thread released, once"
            );
            // What the parked thread does when it wakes (it is not real
            // here): it takes its wake-up.
        }
        let mut s = g.state.lock();
        s.parked = 0;
        s.woken = 0;
        drop(s);
        std::mem::forget(p);
        std::mem::forget(held);
    }

    #[test]
    fn a_request_taken_by_the_last_reader_wakes_a_parked_thread() {
        let g = std::sync::Arc::new(Gate::default());
        g.set_threads(KEEP + 1);
        // Thread X: a request that finishes while KEEP others read: parks.
        let g2 = g.clone();
        let x = std::thread::spawn(move || drop(g2.enter()));
        // Wait (bounded) until X parked.
        for _ in 0..1000 {
            if g.state.lock().parked == 1 {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // X is parked, or already back (PARK_LIMIT passed on a very slow
        // machine); both leave the counts consistent. KEEP requests in
        // hand: the last one found no other reader and released X.
        let held: Vec<Pass<'_>> = (0..KEEP).map(|_| g.enter()).collect();
        {
            let s = g.state.lock();
            assert_eq!(s.parked, s.woken, "{} parked {} woken", s.parked, s.woken);
            assert!(s.idle >= 1, "somebody reads the next request");
        }
        x.join().unwrap();
        drop(held);
        let s = g.state.lock();
        assert_eq!(s.idle + s.parked - s.woken, KEEP + 1);
    }
}
