//! A fixed pool of worker threads for control-connection requests. Readers
//! hand requests here so a request waiting for break acks never stops its
//! connection's reader from answering pings or taking acks.
//!
//! Fairness: every session has its own queue and the workers serve the
//! sessions with queued work round robin, one request per turn, with at
//! most [`PER_SESSION`] of a session's requests running at once. A client
//! that pipelines hundreds of heavy batches therefore waits behind itself,
//! while another client's request starts at the next free worker. Heavy
//! requests (reintegration batches, which all serialize on the store's one
//! write transaction) run one at a time per session, so a session never has
//! more than one batch waiting for that transaction ahead of others.
//! A heavy job that has fixed its order among its session's heavy jobs
//! (a batch queued for the group commit, reintegrate.rs) calls
//! [`release_heavy`]: the session's next heavy job may then start, so a
//! client's pipelined batches can join one group commit, still in order.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::sync::OnceLock;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Nice value of a thread doing work nobody well-behaved is waiting on
/// (SERVER.md "CPU priority"): unauthenticated handshakes, and the reader
/// of a control connection that sends bulk frames. Under CPU contention
/// such threads get a small share; on an idle machine they run at full
/// speed all the same.
pub const LOW_NICE: i32 = 10;

/// A control frame larger than this is bulk work (a large batch, a
/// GetAttrs of thousands of fids): its connection's reader is lowered.
pub const BULK_FRAME: usize = 64 * 1024;

/// Set to `1` in the server's environment to keep every thread at its
/// normal priority: only for measuring what lowering gains.
pub const NO_NICE_ENV: &str = "CODA_SERVER_NO_NICE";

fn nice_disabled() -> bool {
    static OFF: OnceLock<bool> = OnceLock::new();
    *OFF.get_or_init(|| std::env::var(NO_NICE_ENV).is_ok_and(|v| v == "1"))
}

/// Set the calling thread's nice value (Linux: nice is per thread).
/// Returns whether the OS took it.
pub fn set_thread_nice(n: i32) -> bool {
    if nice_disabled() {
        return false;
    }
    // SAFETY: gettid and setpriority on the calling thread's own id.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, n) == 0
    }
}

/// Whether a thread may go back to nice 0 after lowering itself (root, or
/// CAP_SYS_NICE, or an RLIMIT_NICE that allows it). Tried once, on a
/// thread of its own, so no serving thread is ever left lowered by the
/// test.
pub fn can_renice() -> bool {
    static CAN: OnceLock<bool> = OnceLock::new();
    *CAN.get_or_init(|| {
        std::thread::Builder::new()
            .name("coda-nicetest".into())
            .stack_size(64 * 1024)
            .spawn(|| set_thread_nice(1) && set_thread_nice(0))
            .ok()
            .and_then(|h| h.join().ok())
            .unwrap_or(false)
    })
}

/// Lower the calling thread for an unauthenticated handshake, if it can be
/// raised again once the peer is proven (else it stays as it is: the same
/// thread goes on to serve the connection). Returns whether it lowered.
pub fn lower_for_handshake() -> bool {
    can_renice() && set_thread_nice(LOW_NICE)
}

/// Back to normal priority after [`lower_for_handshake`] returned true.
pub fn restore_priority(lowered: bool) {
    if lowered && !set_thread_nice(0) {
        super::log::warn(format_args!("could not restore a thread's priority"));
    }
}

/// Most requests of one session running at once.
pub const PER_SESSION: usize = 4;

#[derive(Default)]
struct Queue {
    /// (heavy, job), in arrival order; served in that order.
    jobs: VecDeque<(bool, Job)>,
    running: usize,
    heavy_running: bool,
    /// Whether the key is in `State::ready` (each key at most once).
    ready: bool,
}

#[derive(Default)]
struct State {
    queues: HashMap<u64, Queue>,
    /// Keys with queued work and a free slot, in turn order.
    ready: VecDeque<u64>,
    closed: bool,
}

impl State {
    /// Put `key` in the ring if it has work and room; drop an idle queue so
    /// the map holds only live sessions.
    fn requeue(&mut self, key: u64) {
        let Some(q) = self.queues.get_mut(&key) else {
            return;
        };
        let runnable = match q.jobs.front() {
            Some((heavy, _)) => q.running < PER_SESSION && !(*heavy && q.heavy_running),
            None => false,
        };
        if q.jobs.is_empty() && q.running == 0 {
            self.queues.remove(&key);
        } else if !q.ready && runnable {
            q.ready = true;
            self.ready.push_back(key);
        }
    }

    /// The next job in turn, or `None` when there is none now.
    fn take(&mut self) -> Option<(u64, bool, Job)> {
        let key = self.ready.pop_front()?;
        let q = self.queues.get_mut(&key).expect("ready key has a queue");
        q.ready = false;
        let (heavy, job) = q.jobs.pop_front().expect("ready queue has a job");
        q.running += 1;
        q.heavy_running |= heavy;
        // Back of the ring: the others get their turn first.
        self.requeue(key);
        Some((key, heavy, job))
    }

    /// The session's running heavy job no longer holds its heavy slot.
    fn release_heavy(&mut self, key: u64) {
        if let Some(q) = self.queues.get_mut(&key) {
            q.heavy_running = false;
        }
        self.requeue(key);
    }

    fn done(&mut self, key: u64, heavy: bool) {
        if let Some(q) = self.queues.get_mut(&key) {
            q.running -= 1;
            if heavy {
                q.heavy_running = false;
            }
        }
        self.requeue(key);
    }

    fn push(&mut self, key: u64, heavy: bool, job: Job) {
        self.queues
            .entry(key)
            .or_default()
            .jobs
            .push_back((heavy, job));
        self.requeue(key);
    }
}

struct Inner {
    state: Mutex<State>,
    cv: Condvar,
}

thread_local! {
    /// The pool and session of the heavy job this worker runs, while the
    /// job holds its session's heavy slot.
    static HEAVY: RefCell<Option<(Arc<Inner>, u64)>> = const { RefCell::new(None) };
}

/// Called from inside a heavy job (on its worker thread): its order among
/// its session's heavy jobs is fixed, so the session's next heavy job may
/// start while this one still runs. Does nothing on any other thread, or
/// the second time.
pub fn release_heavy() {
    let Some((inner, key)) = HEAVY.with(|h| h.borrow_mut().take()) else {
        return;
    };
    inner.state.lock().release_heavy(key);
    inner.cv.notify_one();
}

/// Shut down through `&self`: queued jobs hold the server state that owns
/// the pool, so the pool cannot wait to be the last owner of itself.
pub struct Pool {
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Pool {
    pub fn new(size: usize) -> std::io::Result<Pool> {
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
        });
        let mut threads = Vec::with_capacity(size);
        for i in 0..size {
            let inner = Arc::clone(&inner);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("coda-worker-{i}"))
                    .spawn(move || work(&inner))?,
            );
        }
        Ok(Pool {
            inner,
            threads: Mutex::new(threads),
        })
    }

    /// Queue `job` for the session `key`; a `heavy` one waits for the
    /// session's previous heavy job (see the module comment).
    pub fn submit(&self, key: u64, heavy: bool, job: impl FnOnce() + Send + 'static) {
        let mut st = self.inner.state.lock();
        if st.closed {
            return;
        }
        st.push(key, heavy, Box::new(job));
        drop(st);
        self.inner.cv.notify_one();
    }

    /// Finish queued jobs and join the workers.
    pub fn shutdown(&self) {
        self.inner.state.lock().closed = true;
        self.inner.cv.notify_all();
        let threads = std::mem::take(&mut *self.threads.lock());
        for t in threads {
            let _ = t.join();
        }
    }
}

fn work(inner: &Arc<Inner>) {
    let mut st = inner.state.lock();
    loop {
        let Some((key, heavy, job)) = st.take() else {
            if st.closed && st.queues.values().all(|q| q.jobs.is_empty()) {
                return;
            }
            inner.cv.wait(&mut st);
            continue;
        };
        drop(st);
        if heavy {
            HEAVY.with(|h| *h.borrow_mut() = Some((Arc::clone(inner), key)));
        }
        // A bug in one request must not take a worker (and with it the
        // server's capacity) down.
        if catch_unwind(AssertUnwindSafe(job)).is_err() {
            super::log::warn(format_args!("a request handler panicked"));
        }
        // Still heavy unless the job released its slot.
        let heavy = HEAVY.with(|h| h.borrow_mut().take()).is_some();
        st = inner.state.lock();
        st.done(key, heavy);
        // A finished job may have made its session's next one runnable:
        // wake a worker for it (only then: a worker woken for nothing costs
        // two futex calls and a context switch per request). When closing,
        // idle workers must see whether all is done.
        if st.closed {
            inner.cv.notify_all();
        } else if !st.ready.is_empty() {
            inner.cv.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn noop() -> Job {
        Box::new(|| {})
    }

    fn nice_of_this_thread() -> i32 {
        // SAFETY: getpriority on the calling thread's own id.
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::getpriority(libc::PRIO_PROCESS, tid)
        }
    }

    #[test]
    fn a_handshake_thread_is_lowered_only_when_it_can_be_restored() {
        std::thread::spawn(|| {
            let lowered = lower_for_handshake();
            assert_eq!(lowered, can_renice());
            let want = if lowered { LOW_NICE } else { 0 };
            assert_eq!(nice_of_this_thread(), want);
            restore_priority(lowered);
            assert_eq!(nice_of_this_thread(), 0);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn sessions_take_turns() {
        let mut st = State::default();
        for _ in 0..10 {
            st.push(1, false, noop());
        }
        st.push(2, false, noop());
        // Session 1 queued ten first, yet session 2 runs second.
        let (a, _, _) = st.take().unwrap();
        let (b, _, _) = st.take().unwrap();
        assert_eq!((a, b), (1, 2));
    }

    #[test]
    fn a_session_runs_at_most_per_session_at_once() {
        let mut st = State::default();
        for _ in 0..10 {
            st.push(7, false, noop());
        }
        for _ in 0..PER_SESSION {
            assert_eq!(st.take().unwrap().0, 7);
        }
        assert!(st.take().is_none());
        st.done(7, false);
        assert_eq!(st.take().unwrap().0, 7);
    }

    #[test]
    fn a_session_runs_one_heavy_job_at_a_time_in_order() {
        let mut st = State::default();
        st.push(5, true, noop());
        st.push(5, true, noop());
        st.push(5, false, noop());
        st.push(6, true, noop());
        let (k, heavy, _) = st.take().unwrap();
        assert_eq!((k, heavy), (5, true));
        // Session 5's next is heavy too: it waits, session 6 runs.
        assert_eq!(st.take().unwrap().0, 6);
        assert!(st.take().is_none());
        st.done(5, true);
        assert_eq!(st.take().unwrap().0, 5);
    }

    #[test]
    fn a_released_heavy_job_lets_the_next_one_start_while_it_runs() {
        let mut st = State::default();
        st.push(5, true, noop());
        st.push(5, true, noop());
        let (k, heavy, _) = st.take().unwrap();
        assert_eq!((k, heavy), (5, true));
        assert!(st.take().is_none());
        // The first has fixed its order (queued for the group commit).
        st.release_heavy(5);
        assert_eq!(st.take().unwrap().0, 5);
        // The first ends without its slot; the second still holds one.
        st.done(5, false);
        st.push(5, true, noop());
        assert!(st.take().is_none());
        st.done(5, true);
        assert_eq!(st.take().unwrap().0, 5);
    }

    #[test]
    fn idle_sessions_leave_no_queue() {
        let mut st = State::default();
        st.push(3, true, noop());
        let (k, heavy, _) = st.take().unwrap();
        st.done(k, heavy);
        assert!(st.queues.is_empty() && st.ready.is_empty());
    }

    #[test]
    fn pool_runs_everything_and_shuts_down() {
        let pool = Pool::new(3).unwrap();
        let n = Arc::new(AtomicUsize::new(0));
        for i in 0..100u64 {
            let n = Arc::clone(&n);
            pool.submit(i % 5, i % 2 == 0, move || {
                n.fetch_add(1, Ordering::SeqCst);
            });
        }
        pool.shutdown();
        assert_eq!(n.load(Ordering::SeqCst), 100);
    }
}
