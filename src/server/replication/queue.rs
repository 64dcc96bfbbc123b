//! A bounded queue read by one thread that waits for items parked
//! (`std::thread::park_timeout`), woken by each sender. A channel's own
//! blocking receive spins and yields before it sleeps: CPU that the
//! members, the client and their threads need on a machine of few cores
//! (the node thread's inbox and the peer threads' queues; measured in
//! docs/BENCHMARKS.md `rround`). The receiver may also wait for the queue
//! and for descriptors at once (`wait_ready`: the node thread reads its
//! peers' sockets itself), woken then through an eventfd.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, SendTimeoutError, Sender, TryRecvError, TrySendError};

/// The sending side (any number of threads).
pub struct QueueTx<T> {
    tx: Sender<T>,
    bell: Arc<Bell>,
}

/// How senders wake the receiver.
#[derive(Default)]
struct Bell {
    /// The receiving thread (it parks in `recv_timeout`).
    thread: OnceLock<Thread>,
    /// An eventfd it polls in `wait_ready`, made on first use.
    event: OnceLock<OwnedFd>,
    /// Set while it waits in `wait_ready`: a sender then writes the eventfd
    /// (one write per wait, none while the receiver is busy).
    polling: AtomicBool,
}

impl<T> Clone for QueueTx<T> {
    fn clone(&self) -> Self {
        QueueTx {
            tx: self.tx.clone(),
            bell: Arc::clone(&self.bell),
        }
    }
}

/// The receiving side: one thread.
pub struct QueueRx<T> {
    rx: Receiver<T>,
    bell: Arc<Bell>,
}

/// The receiving thread's senders are all gone.
#[derive(Debug)]
pub struct Disconnected;

/// A queue of at most `cap` items.
pub fn bounded<T>(cap: usize) -> (QueueTx<T>, QueueRx<T>) {
    let (tx, rx) = crossbeam_channel::bounded(cap);
    let bell = Arc::new(Bell::default());
    (
        QueueTx {
            tx,
            bell: Arc::clone(&bell),
        },
        QueueRx { rx, bell },
    )
}

impl<T> QueueTx<T> {
    /// Queue `item`, waiting up to `timeout` for room.
    pub fn send_timeout(
        &self,
        item: T,
        timeout: Duration,
    ) -> std::result::Result<(), SendTimeoutError<T>> {
        self.tx.send_timeout(item, timeout)?;
        self.ring();
        Ok(())
    }

    /// Queue `item` if there is room.
    pub fn try_send(&self, item: T) -> std::result::Result<(), TrySendError<T>> {
        self.tx.try_send(item)?;
        self.ring();
        Ok(())
    }

    /// Wake the receiving thread (if it waits), with nothing queued.
    pub fn ring(&self) {
        if self.bell.polling.swap(false, Ordering::SeqCst) {
            if let Some(fd) = self.bell.event.get() {
                let one = 1u64.to_ne_bytes();
                // SAFETY: an eventfd we own, 8 readable bytes. A full
                // counter (never: the receiver reads it) only fails.
                let _ = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), 8) };
            }
        }
        if let Some(t) = self.bell.thread.get() {
            t.unpark();
        }
    }
}

impl<T> QueueRx<T> {
    /// The next item, waiting up to `wait` (parked): None when none came.
    pub fn recv_timeout(&self, wait: Duration) -> std::result::Result<Option<T>, Disconnected> {
        let _ = self.bell.thread.set(std::thread::current());
        if let Some(i) = self.try_recv()? {
            return Ok(Some(i));
        }
        // A sender queues before it rings, and the queue is checked after
        // each wake-up, so no item waits for the timeout; a ring consumed
        // by another park on this thread only costs this check.
        std::thread::park_timeout(wait);
        self.try_recv()
    }

    /// The next item, waiting up to `wait` for one or for an event on
    /// `fds` (their `revents` tell which): None when no item came.
    pub fn wait_ready(
        &self,
        fds: &mut Vec<libc::pollfd>,
        wait: Duration,
    ) -> std::result::Result<Option<T>, Disconnected> {
        if let Some(i) = self.try_recv()? {
            return Ok(Some(i));
        }
        let event = match self.bell.event.get() {
            Some(fd) => Some(fd.as_raw_fd()),
            None => {
                // SAFETY: no pointers; a new descriptor or -1.
                let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
                // SAFETY: a descriptor just made and owned by nobody else.
                (fd >= 0).then(|| {
                    self.bell
                        .event
                        .get_or_init(|| unsafe { OwnedFd::from_raw_fd(fd) })
                        .as_raw_fd()
                })
            }
        };
        let Some(event) = event else {
            // No eventfd: the descriptors are looked at after the wait.
            return self.recv_timeout(wait.min(Duration::from_millis(1)));
        };
        self.bell.polling.store(true, Ordering::SeqCst);
        // A sender that queued before `polling` was set did not write the
        // eventfd: look again now.
        if let Some(i) = self.try_recv()? {
            self.bell.polling.store(false, Ordering::SeqCst);
            return Ok(Some(i));
        }
        fds.push(libc::pollfd {
            fd: event,
            events: libc::POLLIN,
            revents: 0,
        });
        let ts = libc::timespec {
            tv_sec: wait.as_secs() as libc::time_t,
            tv_nsec: wait.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `fds` is a live array of `fds.len()` pollfds; no signal mask.
        let _ = unsafe {
            libc::ppoll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                &ts,
                std::ptr::null(),
            )
        };
        let ev = fds.pop().expect("pushed above");
        self.bell.polling.store(false, Ordering::SeqCst);
        if ev.revents & libc::POLLIN != 0 {
            let mut b = [0u8; 8];
            // SAFETY: our eventfd, 8 writable bytes; it resets the counter.
            let _ = unsafe { libc::read(event, b.as_mut_ptr().cast(), 8) };
        }
        self.try_recv()
    }

    /// The next item if one is queued.
    pub fn try_recv(&self) -> std::result::Result<Option<T>, Disconnected> {
        match self.rx.try_recv() {
            Ok(i) => Ok(Some(i)),
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => Err(Disconnected),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A receiver waiting in `wait_ready` is woken by an item, and by a
    /// descriptor that became readable (its `revents` say so).
    #[test]
    fn a_receiver_polling_descriptors_wakes_for_an_item_and_for_a_ready_descriptor() {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let (tx, rx) = bounded::<u32>(4);
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            tx.try_send(5).unwrap();
            tx
        });
        let start = std::time::Instant::now();
        let mut got = None;
        while got.is_none() {
            got = rx
                .wait_ready(&mut Vec::new(), Duration::from_secs(600))
                .unwrap();
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the item never woke it"
            );
        }
        assert_eq!(got, Some(5));
        let _tx = t.join().unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        a.write_all(b"x").unwrap();
        let mut fds = vec![libc::pollfd {
            fd: b.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let start = std::time::Instant::now();
        // Bounded: the byte is readable at once; each wait ends when it is.
        while fds[0].revents & libc::POLLIN == 0 {
            assert_eq!(
                rx.wait_ready(&mut fds, Duration::from_secs(600)).unwrap(),
                None
            );
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the descriptor never woke it"
            );
        }
        assert_eq!(
            fds.len(),
            1,
            "the queue's own descriptor is taken off again"
        );
    }

    /// Items sent from other threads, before and while the receiver is
    /// parked, all arrive, in order, long before the wait's end; the
    /// receiver sees the senders gone.
    #[test]
    fn a_parked_receiver_takes_every_item_and_sees_the_senders_go() {
        let (tx, rx) = bounded::<u32>(4);
        tx.try_send(0).unwrap();
        let t = std::thread::spawn(move || {
            for i in 1..100 {
                tx.send_timeout(i, Duration::from_secs(10)).unwrap();
                if i % 10 == 0 {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        });
        let mut got = Vec::new();
        let start = std::time::Instant::now();
        while got.len() < 100 {
            if let Some(i) = rx.recv_timeout(Duration::from_secs(600)).unwrap() {
                got.push(i);
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "items were left waiting"
            );
        }
        assert_eq!(got, (0..100).collect::<Vec<_>>());
        t.join().unwrap();
        assert!(rx.recv_timeout(Duration::from_millis(1)).is_err());
    }
}
