//! The node thread: the only owner of the engine's `RawNode`. It ticks,
//! steps peers' messages, takes proposals, and for every ready makes the
//! log durable (one fsync) before sending what must follow it, then
//! applies committed entries and answers the proposers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use parking_lot::{Condvar, Mutex};
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, Entry, EntryType, Message, MessageType};
use raft::{RawNode, StateRole};

use super::config::{GroupConfig, Member};
use super::peers::Peers;
use super::queue::{QueueRx, QueueTx};
use super::storage::RaftStore;
use super::trace;
use super::transport::{KIND_RAFT, MAX_PEER_FRAME};
use crate::server::log;
use crate::{Error, Result};
use std::os::fd::AsRawFd;

/// One engine tick. Heartbeats go every `HEARTBEAT_TICKS`, and a follower
/// that hears no leader for a random `MIN_ELECTION_TICKS` to
/// `MAX_ELECTION_TICKS` ticks stands.
pub const TICK: Duration = Duration::from_millis(50);
/// Ticks between heartbeats (150 ms).
pub const HEARTBEAT_TICKS: usize = 3;
/// The engine's election timeout in ticks (0.5 s): a member that heard a
/// leader refuses (pre-)votes until it has ticked this often since
/// (`check_quorum`'s in-lease rule, which [`LEASE`] relies on).
pub const ELECTION_TICKS: usize = 10;
/// The fewest ticks without a leader before a follower stands: two past
/// `ELECTION_TICKS`, so the others (whose ticks run in phases of their own,
/// and may run late on a loaded machine) have left the in-lease window when
/// its vote requests arrive. Standing at `ELECTION_TICKS` got it ignored and
/// cost a second round (0.5–1 s then; campaign.rs now retries within 250 ms).
pub const MIN_ELECTION_TICKS: usize = ELECTION_TICKS + 2;
/// The random timeout is drawn below this (so 0.6–1 s).
pub const MAX_ELECTION_TICKS: usize = 2 * ELECTION_TICKS;
/// How long a confirmed heartbeat round lets the leader serve reads, from
/// the moment it asked for the round. A member that answered the round
/// refuses every vote until it has ticked `ELECTION_TICKS` times since
/// (`check_quorum`'s in-lease rule), at least `ELECTION_TICKS - 1` tick
/// intervals (this thread never ticks faster than `TICK`): 450 ms. Any
/// majority that could elect another leader holds such a member, so none
/// is elected within the lease; 150 ms of it is kept as margin for clock
/// drift and scheduling.
pub const LEASE: Duration = Duration::from_millis(300);
/// How long, at least, after the end of a leader's lease another can be
/// elected (450 ms of refused votes minus `LEASE`).
pub const LEASE_SLACK: Duration = Duration::from_millis(150);
/// How often the leader asks for a heartbeat round to renew its lease.
const LEASE_RENEW: Duration = TICK;
/// A round unanswered this long is forgotten and asked again.
const READ_GIVE_UP: Duration = Duration::from_secs(1);

/// What other threads hand the node thread.
pub enum Input {
    /// A message from a peer.
    Raft(Box<Message>),
    /// Append `data` to the log; answered with the state machine's result
    /// once applied here.
    Propose(Vec<u8>, Sender<Result<Applied>>),
    /// As `Propose`, also on a follower (the engine forwards it to the
    /// leader); answered once applied here.
    ProposeAny(Vec<u8>, Sender<Result<Applied>>),
    /// Add (`Some(addr)`) or remove (`None`) member `id`; answered (with
    /// the entry's index) once applied.
    Membership(u64, Option<String>, Sender<Result<Applied>>),
    /// A snapshot of the node's state.
    Status(Sender<NodeStatus>),
    /// An accepted peer connection that carries Raft messages from member
    /// `.0`: this thread reads it from now on (`.2`: plaintext already read
    /// from it past the last whole frame taken).
    Attach(u64, crate::tls::Stream, Vec<u8>),
}

/// A peer connection the node thread reads (see [`Input::Attach`]).
pub(super) struct Inbound {
    from: u64,
    stream: crate::tls::Stream,
    /// Plaintext read but not yet a whole frame.
    buf: Vec<u8>,
    /// When bytes last came.
    last: Instant,
}

/// Connections the node thread reads at most (each member dials each
/// other once; a redialled one ends the old); the oldest goes first.
const MAX_INBOUND: usize = 64;
/// An inbound connection that brings nothing for this long is closed
/// (the dialer sees it and dials again when it has something to send).
const INBOUND_IDLE: Duration = Duration::from_secs(30);

/// The sending side of the node thread's inbox.
pub type InboxTx = QueueTx<Input>;

/// One member's view, for `group status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeStatus {
    /// This node's id.
    pub id: u64,
    /// "leader", "follower", "candidate" or "precandidate".
    pub role: String,
    /// Current term.
    pub term: u64,
    /// The leader it knows of (0: none).
    pub leader: u64,
    /// Highest index known committed.
    pub commit: u64,
    /// Highest index applied here.
    pub applied: u64,
    /// Highest index this member's volume store holds durably, as far as
    /// it knows (a crash re-applies from the log after it).
    pub durable: u64,
    /// Last index in the log here.
    pub last: u64,
    /// Voters of the configuration in force.
    pub voters: Vec<u64>,
    /// On the leader: each member's highest replicated index.
    pub matched: Vec<(u64, u64)>,
    /// On the leader: milliseconds since each other voter's last message
    /// (absent: never heard since this member started).
    pub heard_ms: Vec<(u64, u64)>,
}

impl NodeStatus {
    /// Text form: one `key value` per line.
    pub fn encode(&self) -> String {
        let mut s = format!(
            "id {}\nrole {}\nterm {}\nleader {}\ncommit {}\napplied {}\ndurable {}\nlast {}\nvoters {}\n",
            self.id,
            self.role,
            self.term,
            self.leader,
            self.commit,
            self.applied,
            self.durable,
            self.last,
            self.voters
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(",")
        );
        for (id, m) in &self.matched {
            s.push_str(&format!("matched {id} {m}\n"));
        }
        for (id, ms) in &self.heard_ms {
            s.push_str(&format!("heard {id} {ms}\n"));
        }
        s
    }

    /// Parse [`NodeStatus::encode`]'s text.
    pub fn decode(text: &str) -> Result<NodeStatus> {
        let mut st = NodeStatus::default();
        let bad = || Error::Protocol(format!("bad status reply {text:?}"));
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let num =
                |i: usize| -> Result<u64> { f.get(i).and_then(|v| v.parse().ok()).ok_or_else(bad) };
            match f.first().copied() {
                Some("id") => st.id = num(1)?,
                Some("role") => st.role = f.get(1).ok_or_else(bad)?.to_string(),
                Some("term") => st.term = num(1)?,
                Some("leader") => st.leader = num(1)?,
                Some("commit") => st.commit = num(1)?,
                Some("applied") => st.applied = num(1)?,
                Some("durable") => st.durable = num(1)?,
                Some("last") => st.last = num(1)?,
                Some("voters") => {
                    st.voters = f
                        .get(1)
                        .map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect())
                        .unwrap_or_default()
                }
                Some("matched") => st.matched.push((num(1)?, num(2)?)),
                Some("heard") => st.heard_ms.push((num(1)?, num(2)?)),
                _ => {}
            }
        }
        Ok(st)
    }
}

/// What the node thread publishes for other threads without a round trip.
#[derive(Default)]
pub struct Published {
    /// The leader's node id (0: none known).
    pub leader: AtomicU64,
    /// The current term.
    pub term: AtomicU64,
    /// Set when the node thread stopped for good (its log could not be written).
    pub failed: AtomicBool,
    /// The leader applied an entry of its own term: its store holds
    /// everything committed before it, so it may serve clients.
    pub serving: AtomicBool,
    /// Called when this member stops being the leader.
    pub on_step_down: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
    /// The leader's read lease (see [`LEASE`]).
    pub lease: Mutex<Lease>,
    /// Signalled when the lease is renewed or lost.
    pub lease_changed: Condvar,
}

/// What the leader may do when, as far as its clock and the engine's
/// in-lease rule tell.
#[derive(Default, Debug, Clone, Copy)]
pub struct Lease {
    /// Until when no other member can have been elected: reads (and the
    /// callbacks granted with them) are served only before it.
    pub until: Option<Instant>,
    /// A new leader acknowledges writes only from this instant: clients
    /// of the leader before it may trust their callbacks blind for their
    /// trust window after its last frame, which it sent within its lease.
    pub writes_from: Option<Instant>,
    /// That wait: the clients' trust window plus a margin (set by the server).
    pub write_delay: Duration,
}

/// What an applied entry hands back to its proposer.
pub type Applied = Box<dyn std::any::Any + Send>;

/// Applies committed normal entries (the volume store: machine.rs).
pub trait StateMachine: Send {
    /// Apply entry `index`; the value goes back to the proposer. An error
    /// means this member could not apply what the others did: the node
    /// stops rather than diverge.
    fn apply(&mut self, index: u64, data: &[u8]) -> Result<Applied>;
    /// Apply consecutive entries `(index, data)` in log order, with the
    /// outcome of `apply` on each in turn (one result each); a state
    /// machine may apply them together (one transaction).
    fn apply_many(&mut self, entries: &[(u64, &[u8])]) -> Result<Vec<Applied>> {
        entries.iter().map(|(i, d)| self.apply(*i, d)).collect()
    }
    /// Every entry through `index` is applied (some changed nothing here:
    /// an empty entry, a membership change); `durable`: make that durable
    /// now.
    fn applied_through(&mut self, _index: u64, _durable: bool) -> Result<()> {
        Ok(())
    }
    /// Called on every turn of the node thread: make the applied state
    /// durable when it is due (a periodic checkpoint).
    fn tick(&mut self) -> Result<()> {
        Ok(())
    }
    /// The last index applied durably, as far as the state machine knows
    /// (a restart re-applies from at most there).
    fn durable(&self) -> u64 {
        0
    }
}

pub(super) struct Driver {
    pub node: RawNode<raft::storage::MemStorage>,
    pub store: RaftStore,
    pub inbox: QueueRx<Input>,
    pub peers: Peers,
    pub group: Arc<Mutex<GroupConfig>>,
    pub root: std::path::PathBuf,
    pub published: Arc<Published>,
    pub stopping: Arc<AtomicBool>,
    pub sm: Box<dyn StateMachine>,
    /// Proposals of ours not yet applied: our serial → waiter.
    pub waiting: HashMap<u64, Sender<Result<Applied>>>,
    pub next_serial: u64,
    pub was_leader: bool,
    /// Heartbeat rounds asked for (ReadIndex), by their context: when.
    pub reads_out: HashMap<u64, Instant>,
    pub read_seq: u64,
    pub last_read_ask: Option<Instant>,
    /// Rounds confirmed by a majority: (commit index then, asked at),
    /// granted as lease once this member applied that index.
    pub confirmed: Vec<(u64, Instant)>,
    /// When this member last took a heartbeat from a leader, or the node
    /// thread's start: it answered no heartbeat round asked after this.
    pub heard: Instant,
    /// Votes granted to this member as a candidate: (term, voter) → when
    /// the voter last heard a leader, by our clock, or None if it did not
    /// say (an older member).
    pub grants: HashMap<(u64, u64), Option<Instant>>,
    /// The end of the last lease this member held as leader.
    pub lease_end_ever: Option<Instant>,
    /// Committed entries a follower keeps to apply several together.
    pub deferred: Vec<Entry>,
    /// When the first of them was kept.
    pub deferred_since: Option<Instant>,
    /// How long they may wait: [`DEFER_FOR`], or `CODA_REPL_DEFER_MS` (a
    /// test holds them for long).
    pub defer_for: Duration,
    /// Peer connections this thread reads itself.
    pub inbound: Vec<Inbound>,
    /// A failed election's retry comes soon (campaign.rs).
    pub campaigns: super::campaign::Campaigns,
    /// When each other member's last Raft message arrived: the leader
    /// hears every follower at each heartbeat, so this is how it tells a
    /// member lost from one that answers (`group status`, clients'
    /// member events).
    pub peer_heard: HashMap<u64, Instant>,
}

/// A follower applies committed entries at most this late (see
/// [`DEFER_MAX`]). Its application is off the commit path (the leader's
/// own answers the client), but it shares the machine's cores with the
/// leader's: one transaction of the volume store for several entries
/// costs far less than one each (docs/BENCHMARKS.md `rlean`). Entries of
/// its own proposals, membership changes, a change of role and a stop
/// apply what is kept at once; a crash loses nothing (the log holds the
/// entries, and the store's mark says which it applied).
pub const DEFER_FOR: Duration = Duration::from_millis(10);
/// A follower applies the entries kept once this many wait.
pub const DEFER_MAX: usize = 32;

/// Build the engine over the durable log.
pub(super) fn raw_node(id: u64, store: &RaftStore) -> Result<RawNode<raft::storage::MemStorage>> {
    let cfg = raft::Config {
        id,
        election_tick: ELECTION_TICKS,
        min_election_tick: MIN_ELECTION_TICKS,
        max_election_tick: MAX_ELECTION_TICKS,
        heartbeat_tick: HEARTBEAT_TICKS,
        applied: store.applied(),
        max_size_per_msg: 1 << 20,
        max_inflight_msgs: 256,
        // A leader that stops hearing a majority steps down, and a member
        // cut off and back does not depose a healthy leader.
        check_quorum: true,
        pre_vote: true,
        // A new commit index is not sent on its own (an empty append to
        // each follower and its acknowledgement, per entry): followers
        // learn it with the next append or heartbeat, and apply then. Only
        // the leader's application answers a client; a membership change
        // is still sent at once (the engine's rule).
        skip_bcast_commit: true,
        ..Default::default()
    };
    cfg.validate()
        .map_err(|e| Error::Invalid(format!("raft config: {e}")))?;
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    RawNode::new(&cfg, store.mem(), &logger).map_err(|e| Error::Invalid(format!("raft: {e}")))
}

fn context(node: u64, serial: u64) -> Vec<u8> {
    let mut c = node.to_be_bytes().to_vec();
    c.extend_from_slice(&serial.to_be_bytes());
    c
}

fn parse_context(c: &[u8]) -> Option<(u64, u64)> {
    if c.len() != 16 {
        return None;
    }
    Some((
        u64::from_be_bytes(c[..8].try_into().ok()?),
        u64::from_be_bytes(c[8..].try_into().ok()?),
    ))
}

/// When a new leader may acknowledge writes, from what it can prove:
/// every lease an earlier leader held was confirmed by a majority, which
/// shares a member with the majority that elected this one (itself or a
/// voter). That member answered the lease's round after the round was
/// asked and before its vote, so the lease ended by [`LEASE`] after the
/// latest "last heard a leader" among them (`heard`: this member's;
/// `voters`: each voter's, None if it did not say), or at this member's own
/// last lease end, and the old leader's clients trust their callbacks blind
/// no longer than `trust` after it. None when a voter did not say.
fn proven_writes_from(
    heard: Instant,
    voters: impl IntoIterator<Item = Option<Instant>>,
    own_lease_end: Option<Instant>,
    trust: Duration,
) -> Option<Instant> {
    let mut latest = heard;
    for at in voters {
        latest = latest.max(at?);
    }
    let end = (latest + LEASE).max(own_lease_end.unwrap_or(latest));
    Some(end + trust)
}

/// The whole frames at the start of `buf` (bytes read from member
/// `from`'s connection) as Raft messages, and how many bytes they took;
/// false (with the messages before it) at a frame that is not a Raft
/// message of `from` or whose length is out of bounds.
fn split_frames(buf: &[u8], from: u64) -> (Vec<Message>, usize, bool) {
    let mut out = Vec::new();
    let mut at = 0;
    // Bounded: each turn takes one whole frame, or stops.
    while buf.len() - at >= 5 {
        let len = u32::from_be_bytes(buf[at..at + 4].try_into().expect("4")) as usize;
        if len == 0 || len > MAX_PEER_FRAME {
            return (out, at, false);
        }
        if buf.len() - at < 4 + len {
            break;
        }
        let (kind, body) = (buf[at + 4], &buf[at + 5..at + 4 + len]);
        let m = (kind == KIND_RAFT)
            .then(|| Message::parse_from_bytes(body).ok())
            .flatten();
        match m {
            Some(m) if m.from == from => out.push(m),
            _ => return (out, at, false),
        }
        at += 4 + len;
    }
    (out, at, true)
}

fn role_name(r: StateRole) -> &'static str {
    match r {
        StateRole::Leader => "leader",
        StateRole::Follower => "follower",
        StateRole::Candidate => "candidate",
        StateRole::PreCandidate => "precandidate",
    }
}

impl Driver {
    pub fn run(mut self) {
        let mut next_tick = Instant::now() + TICK;
        let mut unsent = false;
        while !self.stopping.load(Ordering::SeqCst) {
            let mut wait = next_tick.saturating_duration_since(Instant::now());
            if unsent {
                // Bytes a socket did not take: try again soon.
                wait = wait.min(super::peers::RETRY_WRITE);
            }
            if let Some(due) = self.deferred_due() {
                wait = wait.min(due.saturating_duration_since(Instant::now()));
            }
            let mut fds: Vec<libc::pollfd> = self
                .inbound
                .iter()
                .map(|c| libc::pollfd {
                    fd: c.stream.tcp().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            let got = self.inbox.wait_ready(&mut fds, wait);
            self.read_inbound(&fds);
            match got {
                Ok(Some(input)) => {
                    self.take(input);
                    // Take whatever else is queued before one ready: one
                    // fsync covers them all.
                    for _ in 0..256 {
                        match self.inbox.try_recv() {
                            Ok(Some(i)) => self.take(i),
                            _ => break,
                        }
                    }
                }
                Ok(None) => {}
                Err(_) => break,
            }
            if Instant::now() >= next_tick {
                self.node.tick();
                next_tick = Instant::now() + TICK;
            }
            self.renew_lease();
            let r = self.on_ready();
            self.campaigns.after_step(&mut self.node.raft);
            let r = r
                .and_then(|()| {
                    // Due, or no longer a follower's to keep.
                    if self.deferred_due().is_some_and(|d| Instant::now() >= d)
                        || self.node.raft.state != StateRole::Follower
                    {
                        self.apply_deferred()?;
                    }
                    Ok(())
                })
                .and_then(|()| self.sm.tick());
            self.grant_lease();
            unsent = self.peers.flush();
            if let Err(e) = r {
                log::warn(format_args!(
                    "replication: node {} stops: its log cannot be written: {e}",
                    self.node.raft.id
                ));
                self.published.failed.store(true, Ordering::SeqCst);
                break;
            }
        }
        for (_, w) in self.waiting.drain() {
            let _ = w.send(Err(Error::Again("the server is stopping".into())));
        }
        // A clean stop leaves the store durable: nothing to re-apply at start.
        if !self.published.failed.load(Ordering::SeqCst) {
            if let Err(e) = self.apply_deferred() {
                log::warn(format_args!(
                    "replication: committed entries could not be applied at stop: {e}"
                ));
            }
            let applied = self.store.applied();
            if let Err(e) = self.sm.applied_through(applied, true) {
                log::warn(format_args!(
                    "replication: the applied state could not be made durable at stop: {e}"
                ));
            }
            // And the log in raft.redb: nothing to replay from the journal.
            if let Err(e) = self.store.close() {
                log::warn(format_args!(
                    "replication: the log could not be checkpointed at stop: {e}"
                ));
            }
        }
        self.peers.stop();
    }

    fn take(&mut self, input: Input) {
        match input {
            Input::Raft(m) => {
                self.peer_heard.insert(m.from, Instant::now());
                if matches!(
                    m.get_msg_type(),
                    MessageType::MsgAppend | MessageType::MsgAppendResponse
                ) {
                    trace(format_args!(
                        "n{} recv {:?} from {} idx {} n {} commit {}",
                        self.node.raft.id,
                        m.get_msg_type(),
                        m.from,
                        m.index,
                        m.entries.len(),
                        m.commit
                    ));
                }
                match m.get_msg_type() {
                    MessageType::MsgHeartbeat => self.heard = Instant::now(),
                    MessageType::MsgRequestVoteResponse if !m.reject => {
                        // The voter's "heard a leader this long ago" (see
                        // `send`), as an instant of our clock: late by the
                        // message's transit, so never too early.
                        let ago = <[u8; 8]>::try_from(m.context.as_ref())
                            .ok()
                            .map(|b| Duration::from_micros(u64::from_be_bytes(b)));
                        let at = ago.and_then(|a| Instant::now().checked_sub(a));
                        self.grants.retain(|(t, _), _| *t >= m.term);
                        self.grants.insert((m.term, m.from), at);
                    }
                    _ => {}
                }
                // Messages from a node we don't know (removed, or a stale
                // incarnation) are the engine's to ignore.
                let _ = self.node.step(*m);
            }
            Input::Propose(data, done) => {
                trace(format_args!("n{} propose", self.node.raft.id));
                self.propose(data, done, false)
            }
            Input::ProposeAny(data, done) => self.propose(data, done, true),
            Input::Membership(id, addr, done) => {
                if self.node.raft.state != StateRole::Leader {
                    let _ = done.send(Err(self.not_leader()));
                    return;
                }
                self.next_serial += 1;
                let serial = self.next_serial;
                let mut cc = ConfChange {
                    node_id: id,
                    ..Default::default()
                };
                cc.set_change_type(if addr.is_some() {
                    ConfChangeType::AddNode
                } else {
                    ConfChangeType::RemoveNode
                });
                // The context names the proposer and, for an addition, the address.
                let mut ctx = context(self.node.raft.id, serial);
                ctx.extend_from_slice(addr.as_deref().unwrap_or("").as_bytes());
                cc.context = ctx.into();
                match self.node.propose_conf_change(Vec::new(), cc) {
                    Ok(()) => {
                        self.waiting.insert(serial, done);
                    }
                    Err(e) => {
                        let _ = done.send(Err(Error::Again(format!("change refused: {e}"))));
                    }
                }
            }
            Input::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Input::Attach(from, stream, buf) => {
                if stream.tcp().set_nonblocking(true).is_err() {
                    return;
                }
                if self.inbound.len() >= MAX_INBOUND {
                    self.inbound.remove(0);
                }
                self.inbound.push(Inbound {
                    from,
                    stream,
                    buf,
                    last: Instant::now(),
                });
                // Whole frames among the bytes already read.
                let i = self.inbound.len() - 1;
                if !self.take_frames(i) {
                    self.inbound.remove(i);
                }
            }
        }
    }

    /// Read what the inbound connections `fds` reports ready bring, and
    /// step its whole frames; close the ones that ended, failed, broke
    /// the protocol or stayed idle too long.
    fn read_inbound(&mut self, fds: &[libc::pollfd]) {
        let now = Instant::now();
        let mut keep = vec![true; self.inbound.len()];
        for (i, p) in fds.iter().enumerate().take(self.inbound.len()) {
            if p.revents == 0 {
                keep[i] = now.duration_since(self.inbound[i].last) < INBOUND_IDLE;
                continue;
            }
            keep[i] = self.read_one(i) && self.take_frames(i);
        }
        let mut i = 0;
        self.inbound.retain(|_| {
            i += 1;
            keep[i - 1]
        });
    }

    /// Read connection `i` until it would block (bounded); false when it
    /// ended or failed.
    fn read_one(&mut self, i: usize) -> bool {
        let c = &mut self.inbound[i];
        let mut chunk = [0u8; 16 * 1024];
        // Bounded: a turn reads at most 64 chunks; the rest waits for the next.
        for _ in 0..64 {
            match std::io::Read::read(&mut c.stream, &mut chunk) {
                Ok(0) => return false,
                Ok(n) => {
                    c.buf.extend_from_slice(&chunk[..n]);
                    c.last = Instant::now();
                    if c.buf.len() > MAX_PEER_FRAME + 5 {
                        // Whole frames go before more is read.
                        return true;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }

    /// Step the whole frames read from connection `i`; false when one is
    /// not a Raft message of its member (the connection is then closed).
    fn take_frames(&mut self, i: usize) -> bool {
        let from = self.inbound[i].from;
        let buf = std::mem::take(&mut self.inbound[i].buf);
        let (msgs, used, ok) = split_frames(&buf, from);
        for m in msgs {
            self.take(Input::Raft(Box::new(m)));
        }
        if !ok {
            log::warn(format_args!(
                "replication: member {from} sent a bad message; closing its connection"
            ));
            return false;
        }
        self.inbound[i].buf = buf[used..].to_vec();
        true
    }

    /// Take a proposal: on the leader, or with `forward` on a follower
    /// that knows the leader (the engine forwards it there).
    fn propose(&mut self, data: Vec<u8>, done: Sender<Result<Applied>>, forward: bool) {
        if self.node.raft.state != StateRole::Leader && !(forward && self.node.raft.leader_id != 0)
        {
            let _ = done.send(Err(self.not_leader()));
            return;
        }
        self.next_serial += 1;
        let serial = self.next_serial;
        match self.node.propose(context(self.node.raft.id, serial), data) {
            Ok(()) => {
                self.waiting.insert(serial, done);
            }
            Err(e) => {
                let _ = done.send(Err(Error::Again(format!("proposal refused: {e}"))));
            }
        }
    }

    /// On the leader, ask the engine for a heartbeat round (ReadIndex,
    /// `ReadOnlyOption::Safe`) every `LEASE_RENEW`, one at a time.
    fn renew_lease(&mut self) {
        if self.node.raft.state != StateRole::Leader
            || !self.published.serving.load(Ordering::SeqCst)
        {
            return;
        }
        let now = Instant::now();
        self.reads_out
            .retain(|_, at| now.duration_since(*at) < READ_GIVE_UP);
        if !self.reads_out.is_empty()
            || self
                .last_read_ask
                .is_some_and(|t| now.duration_since(t) < LEASE_RENEW)
        {
            return;
        }
        self.read_seq += 1;
        self.reads_out.insert(self.read_seq, now);
        self.last_read_ask = Some(now);
        self.node.read_index(self.read_seq.to_be_bytes().to_vec());
    }

    /// A confirmed round whose commit index is applied here extends the
    /// lease to `LEASE` past the moment the round was asked for.
    fn grant_lease(&mut self) {
        if self.confirmed.is_empty() {
            return;
        }
        let applied = self.store.applied();
        let mut best: Option<Instant> = None;
        self.confirmed.retain(|(index, at)| {
            if *index <= applied {
                best = best.max(Some(*at));
                false
            } else {
                true
            }
        });
        let Some(at) = best else { return };
        if self.node.raft.state != StateRole::Leader {
            return;
        }
        let mut l = self.published.lease.lock();
        l.until = l.until.max(Some(at + LEASE));
        self.lease_end_ever = self.lease_end_ever.max(l.until);
        drop(l);
        self.published.lease_changed.notify_all();
    }

    fn not_leader(&self) -> Error {
        let leader = self.node.raft.leader_id;
        let addr = self.group.lock().addr_of(leader).map(str::to_string);
        match addr {
            Some(a) => Error::Again(format!(
                "not the leader; the leader is member {leader} at {a}"
            )),
            None => Error::Again("not the leader; no leader known".into()),
        }
    }

    fn status(&self) -> NodeStatus {
        let r = &self.node.raft;
        let mut matched: Vec<(u64, u64)> = Vec::new();
        if r.state == StateRole::Leader {
            matched = r.prs().iter().map(|(id, p)| (*id, p.matched)).collect();
            matched.sort_unstable();
        }
        let mut voters: Vec<u64> = r.prs().conf().voters().ids().iter().collect();
        voters.sort_unstable();
        let heard_ms = if r.state == StateRole::Leader {
            voters
                .iter()
                .filter(|v| **v != r.id)
                .filter_map(|v| Some((*v, self.peer_heard.get(v)?.elapsed().as_millis() as u64)))
                .collect()
        } else {
            Vec::new()
        };
        NodeStatus {
            id: r.id,
            role: role_name(r.state).into(),
            term: r.term,
            leader: r.leader_id,
            commit: r.raft_log.committed,
            applied: self.store.applied(),
            durable: self.sm.durable(),
            last: r.raft_log.last_index(),
            voters,
            matched,
            heard_ms,
        }
    }

    fn send(&mut self, msgs: Vec<Message>) {
        for mut m in msgs {
            if m.get_msg_type() == MessageType::MsgRequestVoteResponse && !m.reject {
                // A granted vote says how long ago this member last took
                // a heartbeat (rounded up): it answered no lease round
                // asked since (see `writes_from`). The engine leaves a
                // vote response's context unused.
                let ago = self.heard.elapsed().as_micros() as u64 + 1;
                m.context = ago.to_be_bytes().to_vec().into();
            }
            if matches!(
                m.get_msg_type(),
                MessageType::MsgAppend | MessageType::MsgAppendResponse
            ) {
                trace(format_args!(
                    "n{} send {:?} to {} idx {} n {} commit {}",
                    m.from,
                    m.get_msg_type(),
                    m.to,
                    m.index,
                    m.entries.len(),
                    m.commit
                ));
            }
            self.peers.send(m);
        }
    }

    /// See [`proven_writes_from`], for this member in its current term.
    fn proven_writes_from(&self, trust: Duration) -> Option<Instant> {
        let term = self.node.raft.term;
        let voters = self
            .grants
            .iter()
            .filter(|((t, _), _)| *t == term)
            .map(|(_, at)| *at);
        proven_writes_from(self.heard, voters, self.lease_end_ever, trust)
    }

    fn on_ready(&mut self) -> Result<()> {
        if !self.node.has_ready() {
            return Ok(());
        }
        let mut ready = self.node.ready();
        let id = self.node.raft.id;
        trace(format_args!(
            "n{id} ready ents {} hs {} committed {} msgs {} pmsgs {}",
            ready.entries().len(),
            ready.hs().is_some(),
            ready.committed_entries().len(),
            ready.messages().len(),
            ready.persisted_messages().len()
        ));
        // A leader may send before its own fsync (the engine counts its own
        // vote only once persisted); everything else waits for the disk.
        if !ready.messages().is_empty() {
            let m = ready.take_messages();
            self.send(m);
        }
        if !ready.snapshot().is_empty() {
            return Err(Error::Invalid(
                "a snapshot arrived; this member cannot install one yet".into(),
            ));
        }
        // The log reaches the disk before anything is applied, and the
        // commit index is written (unsynced, in the same file) before the
        // applied mark: any state a crash leaves is a prefix of these
        // writes, so a restart never reads an applied mark ahead of the
        // commit index.
        self.store.persist(ready.entries(), ready.hs())?;
        // What waited for the disk goes now, before the state machine
        // applies: a follower's acknowledgement of new entries must not
        // wait for its application of earlier ones (an fsync of the
        // volume store), which is off the leader's commit path.
        if !ready.persisted_messages().is_empty() {
            let m = ready.take_persisted_messages();
            self.send(m);
        }
        trace(format_args!("n{id} persisted"));
        let committed = ready.take_committed_entries();
        self.apply(committed)?;
        trace(format_args!("n{id} applied"));
        for rs in ready.take_read_states() {
            let seq = <[u8; 8]>::try_from(rs.request_ctx.as_slice()).map(u64::from_be_bytes);
            if let Some(at) = seq.ok().and_then(|s| self.reads_out.remove(&s)) {
                self.confirmed.push((rs.index, at));
            }
        }
        if let Some(ss) = ready.ss() {
            self.published.leader.store(ss.leader_id, Ordering::SeqCst);
            self.published.serving.store(false, Ordering::SeqCst);
            let leader = ss.raft_state == StateRole::Leader;
            {
                // A role change ends the lease; a new leader waits out the
                // trust its predecessor's clients may still place in their
                // callbacks before it acknowledges a write.
                let mut l = self.published.lease.lock();
                l.until = None;
                if leader && !self.was_leader {
                    // The in-lease rule proves that no lease ended later
                    // than LEASE_SLACK before this election; the voters'
                    // "last heard" often prove an earlier end. Either is a
                    // bound: the earlier wins.
                    let now = Instant::now();
                    let full = now + l.write_delay;
                    let proven = self
                        .proven_writes_from(l.write_delay + LEASE_SLACK)
                        .map_or(full, |p| p.clamp(now, full));
                    l.writes_from = Some(proven);
                }
                drop(l);
                self.published.lease_changed.notify_all();
                self.reads_out.clear();
                self.confirmed.clear();
                self.last_read_ask = None;
            }
            if self.was_leader && !leader {
                if let Some(f) = self.published.on_step_down.lock().as_ref() {
                    f();
                }
            }
            self.was_leader = leader;
            if ss.raft_state != StateRole::Leader {
                for (_, w) in self.waiting.drain() {
                    let _ = w.send(Err(Error::Again(
                        "leadership changed before the change was applied; retry".into(),
                    )));
                }
            }
            log::info(format_args!(
                "replication: node {} is {} (leader {}, term {})",
                self.node.raft.id,
                role_name(ss.raft_state),
                ss.leader_id,
                self.node.raft.term
            ));
        }
        if let Some(hs) = ready.hs() {
            self.published.term.store(hs.term, Ordering::SeqCst);
        }
        let mut light = self.node.advance(ready);
        trace(format_args!(
            "n{id} light commit {:?} msgs {} committed {}",
            light.commit_index(),
            light.messages().len(),
            light.committed_entries().len()
        ));
        if let Some(commit) = light.commit_index() {
            self.store.persist_commit(commit)?;
            trace(format_args!("n{id} commit persisted"));
        }
        let m = light.take_messages();
        self.send(m);
        let committed = light.take_committed_entries();
        self.apply(committed)?;
        trace(format_args!("n{id} light applied"));
        self.node.advance_apply();
        Ok(())
    }

    /// Apply committed entries, or, on a follower, keep them for one
    /// application of several (see [`DEFER_FOR`]).
    fn apply(&mut self, entries: Vec<Entry>) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let me = self.node.raft.id;
        let deferrable = self.node.raft.state == StateRole::Follower
            && !self.stopping.load(Ordering::SeqCst)
            && entries.iter().all(|e| {
                e.get_entry_type() == EntryType::EntryNormal
                    && parse_context(&e.context).is_none_or(|(node, _)| node != me)
            });
        if !deferrable {
            self.apply_deferred()?;
            return self.apply_now(entries);
        }
        if self.deferred.is_empty() {
            self.deferred_since = Some(Instant::now());
        }
        self.deferred.extend(entries);
        if self.deferred.len() >= DEFER_MAX {
            self.apply_deferred()?;
        }
        Ok(())
    }

    /// When the entries kept must be applied (None: none are kept).
    fn deferred_due(&self) -> Option<Instant> {
        self.deferred_since.map(|t| t + self.defer_for)
    }

    /// Apply the entries kept, if any.
    fn apply_deferred(&mut self) -> Result<()> {
        if self.deferred.is_empty() {
            return Ok(());
        }
        self.deferred_since = None;
        let entries = std::mem::take(&mut self.deferred);
        self.apply_now(entries)
    }

    fn apply_now(&mut self, entries: Vec<Entry>) -> Result<()> {
        let Some(last) = entries.last().map(|e| e.index) else {
            return Ok(());
        };
        let me = self.node.raft.id;
        let mut conf_changed = false;
        // Results of consecutive normal entries applied together, in order.
        let mut ready: std::collections::VecDeque<Applied> = Default::default();
        for (at, e) in entries.iter().enumerate() {
            if e.term == self.node.raft.term && self.node.raft.state == StateRole::Leader {
                self.published.serving.store(true, Ordering::SeqCst);
            }
            let (mine, result): (_, Applied) = match e.get_entry_type() {
                EntryType::EntryNormal => {
                    let r: Applied = if e.data.is_empty() {
                        Box::new(())
                    } else {
                        if ready.is_empty() {
                            let run: Vec<(u64, &[u8])> = entries[at..]
                                .iter()
                                .take_while(|x| {
                                    x.get_entry_type() == EntryType::EntryNormal
                                        && !x.data.is_empty()
                                })
                                .map(|x| (x.index, &x.data[..]))
                                .collect();
                            ready.extend(self.sm.apply_many(&run)?);
                        }
                        let r = ready.pop_front().ok_or_else(|| {
                            Error::Eio("the state machine returned too few results".into())
                        })?;
                        trace(format_args!("n{me} sm applied {}", e.index));
                        r
                    };
                    (parse_context(&e.context), r)
                }
                EntryType::EntryConfChange => {
                    let cc = ConfChange::parse_from_bytes(&e.data)
                        .map_err(|err| Error::Eio(format!("conf change does not decode: {err}")))?;
                    let cs = self
                        .node
                        .apply_conf_change(&cc)
                        .map_err(|err| Error::Eio(format!("conf change: {err}")))?;
                    self.store.persist_conf(&cs)?;
                    conf_changed = true;
                    let ctx = &cc.context;
                    let addr = ctx
                        .get(16..)
                        .map(|b| String::from_utf8_lossy(b).into_owned())
                        .unwrap_or_default();
                    self.update_members(cc.node_id, cc.get_change_type(), addr)?;
                    (ctx.get(..16).and_then(parse_context), Box::new(e.index))
                }
                EntryType::EntryConfChangeV2 => (None, Box::new(())),
            };
            if let Some((node, serial)) = mine {
                if node == me {
                    if let Some(w) = self.waiting.remove(&serial) {
                        trace(format_args!("n{me} answer {}", e.index));
                        let _ = w.send(Ok(result));
                    }
                }
            }
        }
        // A membership change is re-applied after a crash only if the
        // store's mark lost it: made durable at once (they are rare).
        self.sm.applied_through(last, conf_changed)?;
        self.store.set_applied(last);
        Ok(())
    }

    fn update_members(&mut self, id: u64, change: ConfChangeType, addr: String) -> Result<()> {
        let mut g = self.group.lock();
        match change {
            ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                if !addr.is_empty() {
                    g.members.retain(|m| m.id != id);
                    g.members.push(Member { id, addr });
                    g.members.sort_by_key(|m| m.id);
                }
            }
            ConfChangeType::RemoveNode => {
                if id != g.node {
                    g.members.retain(|m| m.id != id);
                }
                self.peers.forget(id);
            }
        }
        let g2 = g.clone();
        drop(g);
        g2.save(&self.root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRUST: Duration = Duration::from_millis(750);

    #[test]
    fn a_new_leader_waits_from_the_latest_last_heard_of_its_electors() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // Itself last heard a leader at t0, its voter 40 ms later: any
        // earlier lease ended by then + LEASE, trusted TRUST after that.
        assert_eq!(
            proven_writes_from(t0, [Some(t0 + ms(40))], None, TRUST),
            Some(t0 + ms(40) + LEASE + TRUST)
        );
        // Its own last lease as leader, ending later, wins.
        assert_eq!(
            proven_writes_from(t0, [Some(t0)], Some(t0 + ms(900)), TRUST),
            Some(t0 + ms(900) + TRUST)
        );
        // A vote that did not say when its voter heard a leader proves nothing.
        assert_eq!(proven_writes_from(t0, [Some(t0), None], None, TRUST), None);
        // A lone member: its own last hearing (or start) only.
        assert_eq!(
            proven_writes_from(t0, [], None, TRUST),
            Some(t0 + LEASE + TRUST)
        );
    }

    fn frame(kind: u8, m: &Message) -> Vec<u8> {
        let b = m.write_to_bytes().unwrap();
        let mut f = ((b.len() + 1) as u32).to_be_bytes().to_vec();
        f.push(kind);
        f.extend_from_slice(&b);
        f
    }

    fn msg(from: u64, index: u64) -> Message {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppend);
        m.from = from;
        m.to = 1;
        m.index = index;
        m
    }

    #[test]
    fn whole_frames_are_taken_a_cut_one_waits_and_a_foreign_one_ends_the_connection() {
        let mut buf = frame(KIND_RAFT, &msg(2, 7));
        buf.extend(frame(KIND_RAFT, &msg(2, 8)));
        let whole = buf.len();
        let third = frame(KIND_RAFT, &msg(2, 9));
        buf.extend_from_slice(&third[..third.len() - 1]);
        let (msgs, used, ok) = split_frames(&buf, 2);
        assert!(ok);
        assert_eq!(used, whole, "the cut frame waits for its last byte");
        assert_eq!(msgs.iter().map(|m| m.index).collect::<Vec<_>>(), [7, 8]);
        // Completed, it is taken.
        let (msgs, used, ok) = split_frames(&third, 2);
        assert!(ok && used == third.len() && msgs[0].index == 9);
        // A message sent as another member, another kind of frame, or an
        // impossible length ends the connection after what came before.
        for bad in [
            frame(KIND_RAFT, &msg(3, 10)),
            frame(KIND_RAFT + 1, &msg(2, 10)),
            vec![0, 0, 0, 0, KIND_RAFT],
            ((MAX_PEER_FRAME + 1) as u32)
                .to_be_bytes()
                .to_vec()
                .into_iter()
                .chain([1])
                .collect(),
        ] {
            let mut b = frame(KIND_RAFT, &msg(2, 7));
            b.extend(bad);
            let (msgs, used, ok) = split_frames(&b, 2);
            assert!(!ok);
            assert_eq!((msgs.len(), used), (1, frame(KIND_RAFT, &msg(2, 7)).len()));
        }
    }

    #[test]
    fn election_timeouts_start_past_the_in_lease_window() {
        // A candidate standing while the others still refuse votes loses
        // a whole round; two ticks of phase slack keep it out.
        const { assert!(MIN_ELECTION_TICKS >= ELECTION_TICKS + 2) };
        const { assert!(MAX_ELECTION_TICKS > MIN_ELECTION_TICKS) };
        // The lease plus its slack fits in the refused-vote window.
        assert!(LEASE + LEASE_SLACK <= TICK * (ELECTION_TICKS as u32 - 1));
    }
}
