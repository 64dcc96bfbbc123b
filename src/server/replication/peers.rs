//! Outbound peer connections: one thread and one bounded queue per other
//! member. The engine tolerates lost messages (it resends), so a full queue
//! or a dead connection drops messages instead of blocking the node thread;
//! a failed connection is retried no sooner than `RETRY` later.

use crate::tls::Stream;
use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::TrySendError;
use parking_lot::Mutex;
use protobuf::Message as _;
use raft::eraftpb::Message;

use super::config::{resolve, GroupConfig};
use super::queue::{bounded, QueueRx, QueueTx};
use super::transport::PeerKey;
use super::transport::{dial, write_frame, KIND_RAFT};
use crate::server::log;

/// Messages queued for one peer at most.
const QUEUE: usize = 4096;
/// Pause after a failed connect before the next attempt.
const RETRY: Duration = Duration::from_millis(200);
/// A peer that takes no bytes for this long is cut (and redialled).
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

struct Peer {
    tx: QueueTx<Message>,
    thread: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

/// Every outbound connection of this member.
pub struct Peers {
    me: u64,
    key: PeerKey,
    group: Arc<Mutex<GroupConfig>>,
    peers: HashMap<u64, Peer>,
}

impl Peers {
    /// No connection is made until there is something to send.
    pub fn new(me: u64, key: PeerKey, group: Arc<Mutex<GroupConfig>>) -> Peers {
        Peers {
            me,
            key,
            group,
            peers: HashMap::new(),
        }
    }

    /// Queue a message for its recipient (dropped if its queue is full).
    pub fn send(&mut self, m: Message) {
        let to = m.to;
        if to == self.me || to == 0 {
            return;
        }
        if !self.peers.contains_key(&to) {
            let p = self.spawn(to);
            self.peers.insert(to, p);
        }
        if let Some(p) = self.peers.get(&to) {
            match p.tx.try_send(m) {
                Ok(()) | Err(TrySendError::Full(_)) => {}
                Err(TrySendError::Disconnected(_)) => {
                    self.peers.remove(&to);
                }
            }
        }
    }

    /// Stop talking to a removed member.
    pub fn forget(&mut self, id: u64) {
        if let Some(mut p) = self.peers.remove(&id) {
            p.stop.store(true, Ordering::SeqCst);
            drop(p.tx);
            if let Some(t) = p.thread.take() {
                let _ = t.join();
            }
        }
    }

    /// Stop every connection thread and wait for them.
    pub fn stop(&mut self) {
        let ids: Vec<u64> = self.peers.keys().copied().collect();
        for id in ids {
            self.forget(id);
        }
    }

    fn spawn(&self, to: u64) -> Peer {
        let (tx, rx) = bounded(QUEUE);
        let stop = Arc::new(AtomicBool::new(false));
        let link = Link {
            me: self.me,
            to,
            key: self.key.clone(),
            group: Arc::clone(&self.group),
            stop: Arc::clone(&stop),
        };
        let thread = std::thread::Builder::new()
            .name(format!("coda-peer-{to}"))
            .stack_size(crate::server::SMALL_STACK * 2)
            .spawn(move || link.run(rx))
            .ok();
        Peer { tx, thread, stop }
    }
}

struct Link {
    me: u64,
    to: u64,
    key: PeerKey,
    group: Arc<Mutex<GroupConfig>>,
    stop: Arc<AtomicBool>,
}

impl Link {
    fn run(self, rx: QueueRx<Message>) {
        let mut conn: Option<Stream> = None;
        let mut next_try = Instant::now();
        let mut was_down = false;
        while !self.stop.load(Ordering::SeqCst) {
            let first = match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(_) => break,
            };
            let mut batch = vec![first];
            while batch.len() < 256 {
                match rx.try_recv() {
                    Ok(Some(m)) => batch.push(m),
                    _ => break,
                }
            }
            // A member that died (or closed an idle connection) left it
            // half-closed: a write would still succeed and be lost, and a
            // lost vote costs a whole election timeout. Dial again now.
            if conn.as_ref().is_some_and(|s| closed_by_peer(s.tcp())) {
                conn = None;
            }
            if conn.is_none() {
                if Instant::now() < next_try {
                    continue; // dropped: the engine will resend
                }
                match self.connect() {
                    Ok(s) => {
                        if was_down {
                            log::info(format_args!(
                                "replication: reconnected to member {}",
                                self.to
                            ));
                        }
                        was_down = false;
                        conn = Some(s);
                    }
                    Err(e) => {
                        if !was_down {
                            log::warn(format_args!(
                                "replication: cannot reach member {}: {e}",
                                self.to
                            ));
                        }
                        was_down = true;
                        next_try = Instant::now() + RETRY;
                        continue;
                    }
                }
            }
            let mut buf = Vec::new();
            for m in &batch {
                match m.write_to_bytes() {
                    Ok(b) => {
                        let _ = write_frame(&mut buf, KIND_RAFT, &b);
                    }
                    Err(e) => log::warn(format_args!("replication: message does not encode: {e}")),
                }
            }
            let s = conn.as_mut().expect("connected above");
            if s.write_all(&buf).is_err() {
                conn = None;
                was_down = true;
                next_try = Instant::now() + RETRY;
            }
        }
    }

    fn connect(&self) -> crate::Result<Stream> {
        let addr = self
            .group
            .lock()
            .addr_of(self.to)
            .map(str::to_string)
            .ok_or_else(|| crate::Error::NotFound(format!("no address for member {}", self.to)))?;
        let s = dial(resolve(&addr)?, &self.key, self.me, self.to)?;
        let _ = s.set_write_timeout(Some(SEND_TIMEOUT));
        Ok(s)
    }
}

/// Whether the other end closed or reset `s`: we never read a connection
/// we dialled after its handshake, so bytes may wait unread in it (a TLS
/// session ticket); `POLLRDHUP` reports the close behind them.
fn closed_by_peer(s: &std::net::TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one pollfd we own, no wait.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

#[cfg(test)]
mod tests {
    use super::closed_by_peer;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn a_connection_the_other_end_closed_is_seen_before_a_write_is_lost() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut theirs, _) = l.accept().unwrap();
        assert!(!closed_by_peer(&ours), "open and idle");
        theirs.write_all(b"t").unwrap();
        // Bytes waiting (a TLS session ticket, say) are not a close.
        ours.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut b = [0u8; 1];
        assert_eq!(ours.peek(&mut b).unwrap(), 1, "the byte arrived");
        assert!(!closed_by_peer(&ours), "bytes pending");
        drop(theirs);
        // Our write would still succeed now; the close is seen behind the
        // unread byte.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !closed_by_peer(&ours) {
            assert!(
                std::time::Instant::now() < deadline,
                "the close was never seen"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}
