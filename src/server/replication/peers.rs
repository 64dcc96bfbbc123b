//! Outbound peer connections. The node thread writes its messages to each
//! peer's socket itself, without blocking (`MSG_DONTWAIT`): a message
//! reaches the wire in the same turn that made it, with no hand-off to
//! another thread (two of a round's six thread wake-ups were the leader's
//! append and a follower's acknowledgement passing through a sender
//! thread; docs/BENCHMARKS.md `rlean`). Bytes the socket does not take at
//! once wait in the peer's buffer and go first on the next write or turn.
//! Only dialling, which blocks (connect, TLS and the key handshake), runs
//! on a thread of its own per peer; messages wait for it in a bounded
//! list. The engine tolerates lost messages (it resends), so a full buffer
//! or a dead connection drops messages instead of blocking the node
//! thread; a peer that takes no bytes for `SEND_TIMEOUT` is cut and
//! dialled again, and a failed dial is retried no sooner than `RETRY`.

use crate::tls::Stream;
use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use parking_lot::Mutex;
use protobuf::Message as _;
use raft::eraftpb::Message;

use super::config::{resolve, GroupConfig};
use super::transport::PeerKey;
use super::transport::{dial, KIND_RAFT, MAX_PEER_FRAME};
use crate::server::log;

/// Messages kept for one peer while it is dialled, at most.
const QUEUE: usize = 4096;
/// Bytes waiting for one peer's socket, at most (beyond, messages are
/// dropped): the engine's in-flight limit keeps far below it.
const MAX_OUT: usize = 64 << 20;
/// Pause after a failed connect before the next attempt.
const RETRY: Duration = Duration::from_millis(200);
/// A peer that takes no bytes for this long is cut (and redialled).
const SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// How soon the node thread tries again to write bytes a socket did not
/// take (see [`Peers::flush`]).
pub const RETRY_WRITE: Duration = Duration::from_millis(1);

/// Wakes the node thread (a dial finished).
pub type Waker = Arc<dyn Fn() + Send + Sync>;

struct Peer {
    conn: Option<Stream>,
    /// Frames (sealed when TLS) not yet taken by the socket, from `sent` on.
    out: Vec<u8>,
    sent: usize,
    /// When the socket last took bytes, or when bytes began to wait.
    progress: Instant,
    /// Messages waiting for the connection being dialled.
    waiting: Vec<Message>,
    dialer: Dialer,
    dialing: bool,
    next_try: Instant,
    was_down: bool,
}

struct Dialer {
    ask: Sender<()>,
    done: Receiver<crate::Result<Stream>>,
    thread: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

/// Every outbound connection of this member.
pub struct Peers {
    me: u64,
    key: PeerKey,
    group: Arc<Mutex<GroupConfig>>,
    peers: HashMap<u64, Peer>,
    wake: Waker,
}

impl Peers {
    /// No connection is made until there is something to send; `wake` is
    /// called when a dial finishes (the node thread then calls `flush`).
    pub fn new(me: u64, key: PeerKey, group: Arc<Mutex<GroupConfig>>, wake: Waker) -> Peers {
        Peers {
            me,
            key,
            group,
            peers: HashMap::new(),
            wake,
        }
    }

    /// Write a message to its recipient's socket now, as far as the
    /// socket takes it without blocking; the rest waits (see `flush`).
    pub fn send(&mut self, m: Message) {
        let to = m.to;
        if to == self.me || to == 0 {
            return;
        }
        if !self.peers.contains_key(&to) {
            let p = self.spawn(to);
            self.peers.insert(to, p);
        }
        let Some(p) = self.peers.get_mut(&to) else {
            return;
        };
        p.take_dialled(to);
        if p.conn.is_none() {
            if p.waiting.len() < QUEUE {
                p.waiting.push(m);
            }
            p.ask_dial();
            return;
        }
        p.write(to, std::slice::from_ref(&m));
    }

    /// Take finished dials (and write what waited for them) and write
    /// what sockets did not take before. Returns whether bytes still wait
    /// for a socket: the node thread then turns again within
    /// [`RETRY_WRITE`].
    pub fn flush(&mut self) -> bool {
        let mut waiting = false;
        for (id, p) in self.peers.iter_mut() {
            p.take_dialled(*id);
            if p.sent < p.out.len() {
                p.push(*id);
                waiting |= p.sent < p.out.len();
            }
        }
        waiting
    }

    /// Stop talking to a removed member.
    pub fn forget(&mut self, id: u64) {
        if let Some(p) = self.peers.remove(&id) {
            p.dialer.stop.store(true, Ordering::SeqCst);
            let Dialer { ask, thread, .. } = p.dialer;
            drop(ask);
            if let Some(t) = thread {
                let _ = t.join();
            }
        }
    }

    /// Stop every connection and its dialling thread, and wait for them.
    pub fn stop(&mut self) {
        let ids: Vec<u64> = self.peers.keys().copied().collect();
        for id in ids {
            self.forget(id);
        }
    }

    fn spawn(&self, to: u64) -> Peer {
        let (ask, asked) = crossbeam_channel::bounded(1);
        let (done_tx, done) = crossbeam_channel::bounded(1);
        let stop = Arc::new(AtomicBool::new(false));
        let link = Link {
            me: self.me,
            to,
            key: self.key.clone(),
            group: Arc::clone(&self.group),
            stop: Arc::clone(&stop),
            wake: Arc::clone(&self.wake),
        };
        let thread = std::thread::Builder::new()
            .name(format!("coda-peer-{to}"))
            .stack_size(crate::server::SMALL_STACK * 2)
            .spawn(move || link.run(asked, done_tx))
            .ok();
        Peer {
            conn: None,
            out: Vec::new(),
            sent: 0,
            progress: Instant::now(),
            waiting: Vec::new(),
            dialer: Dialer {
                ask,
                done,
                thread,
                stop,
            },
            dialing: false,
            next_try: Instant::now(),
            was_down: false,
        }
    }
}

impl Peer {
    /// Ask for a connection, unless one is being dialled or a failed dial
    /// is too recent.
    fn ask_dial(&mut self) {
        if self.dialing || Instant::now() < self.next_try {
            return;
        }
        if self.dialer.ask.try_send(()).is_ok() {
            self.dialing = true;
        }
    }

    /// Take the outcome of a finished dial, and write what waited for it.
    fn take_dialled(&mut self, to: u64) {
        if !self.dialing {
            return;
        }
        let r = match self.dialer.done.try_recv() {
            Ok(r) => r,
            Err(TryRecvError::Empty) => return,
            Err(TryRecvError::Disconnected) => Err(crate::Error::Again("dialler gone".into())),
        };
        self.dialing = false;
        match r {
            Ok(s) => {
                if self.was_down {
                    log::info(format_args!("replication: reconnected to member {to}"));
                }
                self.was_down = false;
                self.conn = Some(s);
                self.out.clear();
                self.sent = 0;
                let waiting = std::mem::take(&mut self.waiting);
                self.write(to, &waiting);
            }
            Err(e) => {
                if !self.was_down {
                    log::warn(format_args!("replication: cannot reach member {to}: {e}"));
                }
                self.was_down = true;
                self.next_try = Instant::now() + RETRY;
                // Dropped: the engine will resend.
                self.waiting.clear();
            }
        }
    }

    /// Frame (and seal) `msgs` behind what waits, and push.
    fn write(&mut self, to: u64, msgs: &[Message]) {
        let Some(conn) = &self.conn else { return };
        // A member that died (or closed an idle connection) left it
        // half-closed: a write would still succeed and be lost, and a
        // lost vote costs a whole election timeout. Dial again now.
        if self.sent == self.out.len() && closed_by_peer(conn.tcp()) {
            self.cut();
            self.waiting.extend(msgs.iter().cloned());
            self.ask_dial();
            return;
        }
        let mut plain = Vec::new();
        for m in msgs {
            if self.out.len() - self.sent + plain.len() > MAX_OUT {
                break; // dropped: the engine will resend
            }
            match m.write_to_bytes() {
                Ok(b) if b.len() < MAX_PEER_FRAME => {
                    plain.extend_from_slice(&((b.len() + 1) as u32).to_be_bytes());
                    plain.push(KIND_RAFT);
                    plain.extend_from_slice(&b);
                }
                Ok(_) => log::warn(format_args!("replication: a message is too large to send")),
                Err(e) => log::warn(format_args!("replication: message does not encode: {e}")),
            }
        }
        if plain.is_empty() {
            return;
        }
        if self.sent == self.out.len() {
            self.out.clear();
            self.sent = 0;
            self.progress = Instant::now();
        }
        match conn.seal(&plain, &mut self.out) {
            Ok(true) => {}
            Ok(false) => self.out.extend_from_slice(&plain),
            Err(_) => {
                self.cut();
                return;
            }
        }
        self.push(to);
    }

    /// Write waiting bytes while the socket takes them without blocking.
    fn push(&mut self, to: u64) {
        let Some(conn) = &self.conn else { return };
        match crate::server::wire::send_now(conn.tcp(), &self.out[self.sent..]) {
            Ok(0) => {}
            Ok(n) => {
                self.sent += n;
                self.progress = Instant::now();
            }
            Err(()) => {
                self.cut();
                return;
            }
        }
        if self.sent == self.out.len() {
            self.out.clear();
            self.sent = 0;
        } else if self.progress.elapsed() >= SEND_TIMEOUT {
            log::warn(format_args!(
                "replication: member {to} took no bytes for {SEND_TIMEOUT:?}; dialling again"
            ));
            self.cut();
        }
    }

    /// Drop the connection and what waits for it (the engine resends).
    fn cut(&mut self) {
        self.conn = None;
        self.out.clear();
        self.sent = 0;
        self.was_down = true;
        self.next_try = Instant::now() + RETRY;
    }
}

struct Link {
    me: u64,
    to: u64,
    key: PeerKey,
    group: Arc<Mutex<GroupConfig>>,
    stop: Arc<AtomicBool>,
    wake: Waker,
}

impl Link {
    /// Dial each time the node thread asks, hand it the outcome, wake it.
    fn run(self, asked: Receiver<()>, done: Sender<crate::Result<Stream>>) {
        while !self.stop.load(Ordering::SeqCst) {
            match asked.recv_timeout(Duration::from_millis(200)) {
                Ok(()) => {}
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            }
            let r = self.connect();
            if done.send(r).is_err() {
                break;
            }
            (self.wake)();
        }
    }

    fn connect(&self) -> crate::Result<Stream> {
        let addr = self
            .group
            .lock()
            .addr_of(self.to)
            .map(str::to_string)
            .ok_or_else(|| crate::Error::NotFound(format!("no address for member {}", self.to)))?;
        dial(resolve(&addr)?, &self.key, self.me, self.to)
    }
}

/// Whether the other end closed or reset `s`: we never read a connection
/// we dialled after its handshake, so bytes may wait unread in it (a TLS
/// session ticket); `POLLRDHUP` reports the close behind them.
fn closed_by_peer(s: &std::net::TcpStream) -> bool {
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
