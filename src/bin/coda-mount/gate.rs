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
//!
//! The one reading thread of a stream of requests polls for the next one
//! for a few tens of microseconds after it replies, instead of going to
//! sleep in read(2) at once, while such a wait has been paying (`SPIN`).

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

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

/// Default of how long the only reading thread polls /dev/fuse after a
/// reply before it blocks in read(2) (`--spin-us`). A request that arrives
/// meanwhile is read with no sleep and wake-up of a FUSE thread: a cached
/// open's release, which follows its open within microseconds, and the
/// next open of a busy web server (docs/BENCHMARKS.md, `mpoll`). Between
/// polls it yields the CPU to anything else runnable, so it spins only on
/// a CPU nothing else wants.
pub const SPIN: Duration = Duration::from_micros(50);

/// What a thread answered: the gap until the next request is predicted per
/// kind (an open's release follows it within microseconds in a program that
/// reads a small file; the next open may come much later).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// An open.
    Open,
    /// A release.
    Release,
    /// Anything else.
    Other,
}

/// Per kind, a saturating count of how often the next request came within
/// the spin time of such a reply: up on a short gap, down on a long one,
/// whether the thread spun or slept (the gap is measured at the next
/// request either way). It spins while the count is at least `SPIN_AT`:
/// after two misses in a row a stream stops spinning, after two hits it
/// spins again.
const SPIN_MAX: u8 = 3;
const SPIN_AT: u8 = 2;

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
    /// The last reply: when, and of what kind (for the predictor).
    last_exit: Option<(Instant, Kind)>,
    /// The predictor's counts, by `Kind as usize`.
    short: [u8; 3],
}

impl State {
    /// A request came: count the gap since the last reply for its kind.
    fn note_request(&mut self, now: Instant, spin: Duration) {
        if let Some((t, k)) = self.last_exit.take() {
            let c = &mut self.short[k as usize];
            *c = if now.saturating_duration_since(t) <= spin {
                (*c + 1).min(SPIN_MAX)
            } else {
                c.saturating_sub(1)
            };
        }
    }

    /// Whether a reply of `kind` should be followed by a spin.
    fn predicts_soon(&self, kind: Kind) -> bool {
        self.short[kind as usize] >= SPIN_AT
    }
}

/// The FUSE threads' gate. Before `set_threads` it does nothing.
#[derive(Default)]
pub struct Gate {
    state: Mutex<State>,
    cv: Condvar,
    on: std::sync::atomic::AtomicBool,
    /// A descriptor of the session's /dev/fuse, to poll for a queued
    /// request without taking it (fuser's threads do the reading). Unset:
    /// no spinning.
    poll_fd: OnceLock<OwnedFd>,
    /// The spin time; zero: no spinning.
    spin: OnceLock<Duration>,
}

/// Held while a request is handled; dropping it (after the reply) may
/// park the thread.
pub struct Pass<'a> {
    gate: Option<&'a Gate>,
    kind: Kind,
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

    /// Poll `fd` (a duplicate of the session's /dev/fuse descriptor) for
    /// requests for up to `spin` after replies (see `SPIN`); zero: never.
    pub fn set_spin(&self, fd: OwnedFd, spin: Duration) {
        if spin.is_zero() {
            return;
        }
        let _ = self.spin.set(spin);
        let _ = self.poll_fd.set(fd);
    }

    fn spin_time(&self) -> Duration {
        self.spin.get().copied().unwrap_or(Duration::ZERO)
    }

    /// A thread took a request.
    pub fn enter(&self) -> Pass<'_> {
        let mut p = self.enter_quick(Kind::Other);
        p.may_block();
        p
    }

    /// A thread took a request it may answer without waiting for anything
    /// (no server, no disk): it keeps the reading to itself, so a loop of
    /// such requests (a cached file's open and release) stays on one warm
    /// thread with no hand-off. It calls `Pass::may_block` before anything
    /// that may wait.
    pub fn enter_quick(&self, kind: Kind) -> Pass<'_> {
        if !self.on.load(std::sync::atomic::Ordering::Relaxed) {
            return Pass {
                gate: None,
                kind,
                handed: true,
            };
        }
        let mut s = self.state.lock();
        s.idle = s.idle.saturating_sub(1);
        s.streak = s.streak.saturating_add(1);
        let spin = self.spin_time();
        if !spin.is_zero() {
            s.note_request(Instant::now(), spin);
        }
        Pass {
            gate: Some(self),
            kind,
            handed: false,
        }
    }

    fn exit(&self, quick: bool, kind: Kind) {
        let mut s = self.state.lock();
        let spin = self.spin_time();
        if !spin.is_zero() {
            s.last_exit = Some((Instant::now(), kind));
        }
        let keep = if quick && s.streak >= QUICK_STREAK {
            KEEP_QUICK
        } else {
            KEEP
        };
        if s.idle < keep {
            // The only reader, where the next request is due soon: poll for
            // it instead of sleeping in read(2) (the kernel wakes a
            // sleeping reader itself when there is one).
            let soon = s.idle == 0 && s.predicts_soon(kind);
            s.idle += 1;
            drop(s);
            if soon {
                self.poll_for(spin);
            }
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

impl Gate {
    /// Poll for a queued request for at most `spin` (bounded: the clock is
    /// read at every turn), yielding the CPU between polls; fuser's read(2)
    /// takes the request.
    fn poll_for(&self, spin: Duration) {
        let Some(fd) = self.poll_fd.get() else {
            return;
        };
        let start = Instant::now();
        loop {
            let mut p = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd; timeout 0 never sleeps.
            let r = unsafe { libc::poll(&mut p, 1, 0) };
            // Readable, hung up or an error: read(2) will tell.
            if r != 0 || start.elapsed() >= spin {
                return;
            }
            // SAFETY: no arguments; it gives up the CPU only if another
            // task wants it.
            unsafe { libc::sched_yield() };
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
            g.exit(!self.handed, self.kind);
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
        let mut p = g.enter_quick(Kind::Open);
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

    #[test]
    fn spins_after_kinds_whose_next_request_came_soon_and_stops_after_misses() {
        let spin = Duration::from_micros(50);
        let mut s = State::default();
        let t = Instant::now();
        let soon = t + Duration::from_micros(10);
        let late = t + Duration::from_millis(5);
        assert!(
            !s.predicts_soon(Kind::Open),
            "no spinning before any evidence"
        );
        // Opens followed at once (their releases), releases followed late.
        for _ in 0..2 {
            s.last_exit = Some((t, Kind::Open));
            s.note_request(soon, spin);
            s.last_exit = Some((t, Kind::Release));
            s.note_request(late, spin);
        }
        assert!(s.predicts_soon(Kind::Open));
        assert!(!s.predicts_soon(Kind::Release));
        assert!(!s.predicts_soon(Kind::Other));
        // Saturates: after many hits, two misses stop it.
        for _ in 0..10 {
            s.last_exit = Some((t, Kind::Open));
            s.note_request(soon, spin);
        }
        s.last_exit = Some((t, Kind::Open));
        s.note_request(late, spin);
        assert!(s.predicts_soon(Kind::Open), "one miss is tolerated");
        s.last_exit = Some((t, Kind::Open));
        s.note_request(late, spin);
        assert!(!s.predicts_soon(Kind::Open), "two misses stop the spinning");
        // A request with no reply before it (the first) counts nothing.
        s.note_request(soon, spin);
        assert_eq!(s.short, [1, 0, 0]);
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        use std::os::fd::FromRawFd;
        let mut fds = [0; 2];
        // SAFETY: fds is a two-element out-buffer.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both were just made and are owned here alone.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    #[test]
    fn the_only_reader_spins_after_a_predicted_reply_and_stops_when_a_request_is_queued() {
        let g = Gate::default();
        g.set_threads(KEEP + 1);
        let (r, w) = pipe();
        // A long bound: the spin must end because the descriptor is
        // readable (a request queued), long before it.
        g.set_spin(r, Duration::from_secs(600));
        // SAFETY: writes one byte from a valid buffer to our pipe.
        assert_eq!(
            unsafe { libc::write(w.as_raw_fd(), b"x".as_ptr().cast(), 1) },
            1
        );
        {
            let mut s = g.state.lock();
            s.idle = 1;
            s.streak = QUICK_STREAK;
            s.short[Kind::Open as usize] = SPIN_MAX;
        }
        drop(g.enter_quick(Kind::Open));
        let s = g.state.lock();
        assert_eq!((s.idle, s.parked), (1, 0), "it went back to reading");
        assert_eq!(s.last_exit.map(|e| e.1), Some(Kind::Open));
    }

    #[test]
    fn a_spin_with_nothing_queued_ends_at_its_bound() {
        let g = Gate::default();
        let (r, _w) = pipe();
        g.set_spin(r, Duration::from_millis(2));
        // Nothing is ever written: only the bound ends it.
        g.poll_for(g.spin_time());
        // Without a descriptor (spinning off) it returns at once.
        let off = Gate::default();
        let (r2, _w2) = pipe();
        off.set_spin(r2, Duration::ZERO);
        assert!(off.poll_fd.get().is_none() && off.spin_time().is_zero());
        off.poll_for(Duration::from_secs(600));
    }
}
