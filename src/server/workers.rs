//! A fixed pool of worker threads for control-connection requests. Readers
//! hand requests here so a request waiting for break acks never stops its
//! connection's reader from answering pings or taking acks.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::thread::JoinHandle;

use crossbeam_channel::{unbounded, Sender};
use parking_lot::Mutex;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Shut down through `&self`: queued jobs hold the server state that owns
/// the pool, so the pool cannot wait to be the last owner of itself.
pub struct Pool {
    tx: Mutex<Option<Sender<Job>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Pool {
    pub fn new(size: usize) -> std::io::Result<Pool> {
        let (tx, rx) = unbounded::<Job>();
        let mut threads = Vec::with_capacity(size);
        for i in 0..size {
            let rx = rx.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("coda-worker-{i}"))
                    .spawn(move || {
                        for job in rx {
                            // A bug in one request must not take a worker
                            // (and with it the server's capacity) down.
                            if catch_unwind(AssertUnwindSafe(job)).is_err() {
                                super::log::warn(format_args!("a request handler panicked"));
                            }
                        }
                    })?,
            );
        }
        Ok(Pool {
            tx: Mutex::new(Some(tx)),
            threads: Mutex::new(threads),
        })
    }

    pub fn submit(&self, job: impl FnOnce() + Send + 'static) {
        if let Some(tx) = &*self.tx.lock() {
            let _ = tx.send(Box::new(job));
        }
    }

    /// Finish queued jobs and join the workers.
    pub fn shutdown(&self) {
        self.tx.lock().take();
        let threads = std::mem::take(&mut *self.threads.lock());
        for t in threads {
            let _ = t.join();
        }
    }
}
