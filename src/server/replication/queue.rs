//! A bounded queue read by one thread that waits for items parked
//! (`std::thread::park_timeout`), woken by each sender. A channel's own
//! blocking receive spins and yields before it sleeps: CPU that the
//! members, the client and their threads need on a machine of few cores
//! (the node thread's inbox and the peer threads' queues; measured in
//! docs/BENCHMARKS.md `rround`).

use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, SendTimeoutError, Sender, TryRecvError, TrySendError};

/// The sending side (any number of threads).
pub struct QueueTx<T> {
    tx: Sender<T>,
    bell: Arc<OnceLock<Thread>>,
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
    bell: Arc<OnceLock<Thread>>,
}

/// The receiving thread's senders are all gone.
#[derive(Debug)]
pub struct Disconnected;

/// A queue of at most `cap` items.
pub fn bounded<T>(cap: usize) -> (QueueTx<T>, QueueRx<T>) {
    let (tx, rx) = crossbeam_channel::bounded(cap);
    let bell = Arc::new(OnceLock::new());
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
        if let Some(t) = self.bell.get() {
            t.unpark();
        }
    }
}

impl<T> QueueRx<T> {
    /// The next item, waiting up to `wait` (parked): None when none came.
    pub fn recv_timeout(&self, wait: Duration) -> std::result::Result<Option<T>, Disconnected> {
        let _ = self.bell.set(std::thread::current());
        if let Some(i) = self.try_recv()? {
            return Ok(Some(i));
        }
        // A sender queues before it rings, and the queue is checked after
        // each wake-up, so no item waits for the timeout; a ring consumed
        // by another park on this thread only costs this check.
        std::thread::park_timeout(wait);
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
