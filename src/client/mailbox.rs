//! Where one thread waits for a value another thread leaves: a request's
//! reply (the connection's reader leaves it), a connected writer's outcome
//! (the reintegrator leaves it). Besides the value, a nudge: the waiter
//! should look elsewhere and decide (an interrupt came; its turn to lead
//! a batch came).
//!
//! A mutex and a condvar, not a channel: a channel's blocking receive
//! spins and calls `sched_yield` before it sleeps, and on 2 busy cores
//! that handed the CPU away at every wait (docs/BENCHMARKS.md `pratio`).

use std::time::Instant;

use parking_lot::{Condvar, Mutex};

pub(crate) struct Mailbox<T> {
    /// Guards only the value and the nudge; never held across anything
    /// else, and released before the waiter is woken.
    st: Mutex<State<T>>,
    cv: Condvar,
}

struct State<T> {
    value: Option<T>,
    nudged: bool,
}

/// How a wait ended.
pub(crate) enum Woken<T> {
    Value(T),
    /// Nudged (now, or before the wait began) and no value yet.
    Nudged,
    TimedOut,
}

impl<T> Default for Mailbox<T> {
    fn default() -> Self {
        Mailbox {
            st: Mutex::new(State {
                value: None,
                nudged: false,
            }),
            cv: Condvar::new(),
        }
    }
}

impl<T> Mailbox<T> {
    /// Leave the value (the first one left wins) and wake the waiter.
    pub fn put(&self, v: T) {
        let mut st = self.st.lock();
        if st.value.is_none() {
            st.value = Some(v);
        }
        drop(st);
        self.cv.notify_one();
    }

    /// Wake the waiter to look elsewhere.
    pub fn nudge(&self) {
        self.st.lock().nudged = true;
        self.cv.notify_one();
    }

    /// The value, if left (without waiting).
    pub fn take(&self) -> Option<T> {
        self.st.lock().value.take()
    }

    /// Wait until `deadline` for the value. A value wins over a nudge; a
    /// nudge is consumed by the wait it ends.
    pub fn wait_until(&self, deadline: Instant) -> Woken<T> {
        let mut st = self.st.lock();
        // Bounded by the deadline.
        loop {
            if let Some(v) = st.value.take() {
                return Woken::Value(v);
            }
            if std::mem::take(&mut st.nudged) {
                return Woken::Nudged;
            }
            if self.cv.wait_until(&mut st, deadline).timed_out() {
                return match st.value.take() {
                    Some(v) => Woken::Value(v),
                    None => Woken::TimedOut,
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn soon(ms: u64) -> Instant {
        Instant::now() + Duration::from_millis(ms)
    }

    #[test]
    fn a_value_a_nudge_and_a_timeout_end_a_wait_each() {
        let m = Arc::new(Mailbox::<u32>::default());
        assert!(matches!(m.wait_until(soon(1)), Woken::TimedOut));
        // A nudge before the wait ends it at once, and only that one.
        m.nudge();
        assert!(matches!(m.wait_until(soon(60_000)), Woken::Nudged));
        assert!(matches!(m.wait_until(soon(1)), Woken::TimedOut));
        // The first value left wins, and wins over a nudge.
        m.put(1);
        m.put(2);
        m.nudge();
        assert!(matches!(m.wait_until(soon(60_000)), Woken::Value(1)));
        assert!(m.take().is_none());
        assert!(matches!(m.wait_until(soon(60_000)), Woken::Nudged));
        // A value left while the waiter sleeps wakes it.
        let m2 = m.clone();
        let t = std::thread::spawn(move || m2.wait_until(soon(60_000)));
        m.put(7);
        assert!(matches!(t.join().unwrap(), Woken::Value(7)));
    }
}
