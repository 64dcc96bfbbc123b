//! Server replication (issue 14): a group of coda-servers agreeing on a log
//! through Raft. The engine is the `raft` crate (TiKV's): it is sans-I/O —
//! a `RawNode` we tick and feed, handing back what to persist and send —
//! so it runs on our own threads and sockets with no async runtime, which
//! the library must not have (openraft needs one).
//!
//! Parts: `config` (the group file and key), `storage` (the log and hard
//! state in `DIR/raft.redb`, fsynced before anything that depends on them
//! is sent), `transport` (the peer handshake and frames on the member's one
//! listening port), `peers` (outbound connections with bounded queues and
//! reconnect), `node` (the thread that owns the engine), `campaign` (a
//! failed election's retry comes soon).
//!
//! See docs/SERVER.md "Replication" for what is replicated so far.

mod campaign;
pub mod config;
mod data;
pub(crate) mod machine;
pub mod node;
mod peers;
mod queue;
pub mod storage;
pub mod transport;

use crate::tls::Stream;
use std::fs;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, TrySendError};
use parking_lot::Mutex;
use protobuf::Message as _;

use self::config::{GroupConfig, Member};
use self::node::{Driver, Input, NodeStatus, Published};
use self::storage::RaftStore;
use self::transport::{PeerKey, KIND_RAFT, KIND_STATUS, KIND_STATUS_REQ};
use crate::proto::{GroupMember, Msg};
use crate::server::log;
use crate::{Error, Result};

/// Measurement aid: with `CODA_REPL_TRACE` set, each step of a proposal
/// (taken, sent, made durable, acknowledged, committed, applied, answered)
/// prints a line to stderr with its time in µs (docs/BENCHMARKS.md,
/// "Where a small store's time goes in a group").
pub(crate) fn trace(args: std::fmt::Arguments) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("CODA_REPL_TRACE").is_some()) {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros();
        eprintln!("TRACE {t} {args}");
    }
}

/// Inputs queued for the node thread at most; peers' messages beyond it are
/// dropped (the engine resends).
const INBOX: usize = 8192;
/// A peer connection silent this long is closed (heartbeats come every 150 ms).
const PEER_IDLE: Duration = Duration::from_secs(30);

/// How long a client's request waits for the leader to confirm its lease
/// before the session ends (the client then looks for the leader).
pub const LEASE_PATIENCE: Duration = Duration::from_secs(2);
/// Added to the clients' blind-trust window before a new leader
/// acknowledges writes: a frame the previous leader sent within its lease
/// may reach (and be read by) its client this much later.
pub const WRITE_DELAY_MARGIN: Duration = Duration::from_millis(250);

/// The volume store as it was made by `init`, kept by every member: a
/// member added later starts from it and replays the whole log (there is no
/// log compaction yet, so the log holds every change since).
pub const INITIAL_STORE: &str = "initial.redb";

/// Initialise member `node` of the group whose addresses are `group` (in
/// node order). The first member (`from` = None) creates the volume store
/// with `user` and the group key; the others copy both from `from`, a data
/// directory of another member: one not yet served for a member of the
/// initial group, any (even running) for a member added later, which
/// starts from the initial store and catches up from the log once
/// `coda-server group add` made it a member. Returns what to tell the
/// operator.
pub fn init_member(
    root: &Path,
    node: u64,
    group: &str,
    user: Option<&str>,
    from: Option<&Path>,
) -> Result<String> {
    let mut cfg = GroupConfig::from_list(node, group)?;
    if crate::server::volume::db_path(root).exists() {
        return Err(Error::Exists(format!(
            "{} already holds a coda server",
            root.display()
        )));
    }
    let said = match from {
        None => {
            let secret = crate::server::init(root, user.unwrap_or("admin"))?;
            config::generate_key(root)?;
            let bytes = fs::read(crate::server::volume::db_path(root))
                .map_err(|e| Error::io("read the new store", e))?;
            config::write_file_durably(&root.join(INITIAL_STORE), &bytes, 0o600)?;
            format!(
                "initialised {} as member {node} of {}; secret of {} in {}; \
                 initialise the other members with --from {}",
                root.display(),
                cfg.members.len(),
                user.unwrap_or("admin"),
                secret.display(),
                root.display()
            )
        }
        Some(src) => {
            if user.is_some() {
                return Err(Error::Invalid(
                    "--user is for the first member; --from copies its users".into(),
                ));
            }
            let joining = copy_from(src, root, &mut cfg)?;
            let how = if joining {
                "; add it with `coda-server group add` on a running member"
            } else {
                ""
            };
            format!(
                "initialised {} as member {node} (volume store, users, group key and TLS certificate copied from {}){how}",
                root.display(),
                src.display()
            )
        }
    };
    RaftStore::create(root, &cfg.initial)?;
    cfg.save(root)?;
    Ok(said)
}

/// Copy another member's store, user secrets and group key: every member
/// starts from the same state (same server id, root fid and users).
/// Returns whether `cfg`'s member joins a running group.
fn copy_from(src: &Path, root: &Path, cfg: &mut GroupConfig) -> Result<bool> {
    let theirs = GroupConfig::load(src)?.ok_or_else(|| {
        Error::Invalid(format!(
            "{} is not a group member's data directory",
            src.display()
        ))
    })?;
    let joining = !theirs.initial.contains(&cfg.node);
    if joining {
        if theirs.members.iter().any(|m| m.id == cfg.node) {
            return Err(Error::Invalid(format!(
                "member {} exists already; a replacement gets a new node id",
                cfg.node
            )));
        }
        let me = cfg.me().clone();
        cfg.members = theirs.members.clone();
        cfg.members.push(me);
        cfg.members.sort_by_key(|m| m.id);
        cfg.initial = theirs.initial.clone();
    } else {
        let addrs = |g: &GroupConfig| g.members.iter().map(|m| m.addr.clone()).collect::<Vec<_>>();
        if addrs(&theirs) != addrs(cfg) {
            return Err(Error::Invalid(format!(
                "{} was initialised for the group {}, not {}",
                src.display(),
                addrs(&theirs).join(","),
                addrs(cfg).join(",")
            )));
        }
        let served = match RaftStore::open(src) {
            Ok(s) => s.mem().rl().hard_state().term > 0,
            Err(Error::Again(_)) => true,
            Err(e) => return Err(e),
        };
        if served {
            return Err(Error::Invalid(format!(
                "{} has served already: member {} of the initial group can no longer be made \
                 from it (a replacement gets a new node id and joins with `coda-server group add`)",
                src.display(),
                cfg.node
            )));
        }
    }
    crate::fsmode::create_private_dir(root)?;
    fs::create_dir_all(crate::server::objects::objects_dir(
        root,
        crate::server::ROOT_VOLUME,
    ))
    .map_err(|e| Error::io("create objects directory", e))?;
    fs::create_dir_all(crate::server::objects::staging_dir(root))
        .map_err(|e| Error::io("create staging directory", e))?;
    let entries = fs::read_dir(src).map_err(|e| Error::io(format!("read {}", src.display()), e))?;
    for e in entries {
        let e = e.map_err(|e| Error::io("read directory", e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let copy = name == INITIAL_STORE
            || name == config::KEY_FILE
            || name.ends_with(".secret")
            || (name == "meta.redb" && !joining);
        if copy {
            let bytes = fs::read(e.path())
                .map_err(|err| Error::io(format!("read {}", e.path().display()), err))?;
            config::write_file_durably(&root.join(&name), &bytes, 0o600)?;
        }
    }
    // The group's one certificate: clients pin one fingerprint file for
    // every member, and members pin it for each other.
    let tls_dir = root.join("tls");
    fs::create_dir_all(&tls_dir).map_err(|e| Error::io("create the tls directory", e))?;
    for (from, to, mode) in [
        (crate::tls::key_path(src), crate::tls::key_path(root), 0o600),
        (
            crate::tls::cert_path(src),
            crate::tls::cert_path(root),
            0o644,
        ),
        (
            crate::tls::fingerprint_path(src),
            crate::tls::fingerprint_path(root),
            0o600,
        ),
    ] {
        let bytes = fs::read(&from).map_err(|e| {
            Error::io(
                format!(
                    "read {} (the group's TLS files; run `coda-server init-tls` on {} first)",
                    from.display(),
                    src.display()
                ),
                e,
            )
        })?;
        config::write_file_durably(&to, &bytes, mode)?;
    }
    if joining {
        let bytes = fs::read(root.join(INITIAL_STORE))
            .map_err(|e| Error::io("read the initial store", e))?;
        config::write_file_durably(&crate::server::volume::db_path(root), &bytes, 0o600)?;
    }
    Ok(joining)
}

/// A running member's replication: the node thread and its handles.
pub struct Replicator {
    inbox: node::InboxTx,
    group: Arc<Mutex<GroupConfig>>,
    key: PeerKey,
    me: u64,
    root: PathBuf,
    published: Arc<Published>,
    stopping: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Open data connections to the other members, reused by pushes.
    data_pool: Arc<data::DataPool>,
    /// The last status asked for clients' `GroupStatus`, and when: every
    /// client asks twice a second, and one node-thread round answers all
    /// that ask within [`VIEW_REUSE`].
    view_status: Mutex<Option<(std::time::Instant, NodeStatus)>>,
}

/// How long one status of the node thread answers clients' `GroupStatus`.
const VIEW_REUSE: Duration = Duration::from_millis(100);

/// `CODA_REPL_PEER_THREADS=1`: a thread per accepted peer connection
/// hands each message to the node thread, as before the node thread read
/// them itself (a measurement aid: the baseline in docs/BENCHMARKS.md
/// `rlean`).
fn peer_threads() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("CODA_REPL_PEER_THREADS").is_some())
}

impl Replicator {
    /// Start replication if `root` is a group member; `None` for a lone
    /// server. `tls`: peer connections use TLS (the server serves TLS).
    pub fn start(
        root: &Path,
        volumes: &Arc<crate::server::volume::VolumeStore>,
        tls: bool,
    ) -> Result<Option<Replicator>> {
        let Some(cfg) = GroupConfig::load(root)? else {
            return Ok(None);
        };
        let key = transport::peer_key(root, tls)?;
        let mut store = RaftStore::open(root)?;
        let me = cfg.node;
        let group = Arc::new(Mutex::new(cfg));
        let sm = machine::Machine::new(
            Arc::clone(volumes),
            PathBuf::from(root),
            key.clone(),
            me,
            Arc::clone(&group),
        )?;
        store.start_from(machine::store_mark(volumes)?);
        log::info(format_args!(
            "replication: member {me}: the store holds the log through {}, the log is committed \
             through {} (re-applied from {} on)",
            sm.start_mark,
            store.mem().rl().hard_state().commit,
            store.applied() + 1
        ));
        let node = node::raw_node(me, &store)?;
        let (tx, rx) = queue::bounded(INBOX);
        let published = Arc::new(Published::default());
        let stopping = Arc::new(AtomicBool::new(false));
        let driver = Driver {
            node,
            store,
            inbox: rx,
            peers: {
                let bell = tx.clone();
                peers::Peers::new(
                    me,
                    key.clone(),
                    Arc::clone(&group),
                    Arc::new(move || bell.ring()),
                )
            },
            group: Arc::clone(&group),
            root: PathBuf::from(root),
            published: Arc::clone(&published),
            stopping: Arc::clone(&stopping),
            sm: Box::new(sm),
            waiting: Default::default(),
            // Entries name their proposer's serial: a restarted member
            // replaying its old entries must not take one of them for a
            // new proposal of its own, so serials never restart from 0.
            next_serial: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0),
            was_leader: false,
            reads_out: Default::default(),
            read_seq: 0,
            last_read_ask: None,
            confirmed: Vec::new(),
            heard: std::time::Instant::now(),
            grants: Default::default(),
            lease_end_ever: None,
            deferred: Vec::new(),
            deferred_since: None,
            inbound: Vec::new(),
            peer_heard: Default::default(),
            campaigns: campaign::Campaigns::new(
                me ^ std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64),
            ),
            defer_for: std::env::var("CODA_REPL_DEFER_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .map_or(node::DEFER_FOR, std::time::Duration::from_millis),
        };
        let thread = std::thread::Builder::new()
            .name("coda-raft".into())
            .spawn(move || driver.run())
            .map_err(|e| Error::io("start the raft node thread", e))?;
        log::info(format_args!("replication: member {me} started"));
        Ok(Some(Replicator {
            inbox: tx,
            group,
            key,
            me,
            root: PathBuf::from(root),
            published,
            stopping,
            thread: Mutex::new(Some(thread)),
            data_pool: Arc::default(),
            view_status: Mutex::new(None),
        }))
    }

    /// This member's node id.
    pub fn id(&self) -> u64 {
        self.me
    }

    /// Whether this member is the leader as far as it knows.
    pub fn is_leader(&self) -> bool {
        self.published.leader.load(Ordering::SeqCst) == self.me
            && self.published.serving.load(Ordering::SeqCst)
            && !self.published.failed.load(Ordering::SeqCst)
    }

    /// Serve a client's request only as a leader whose lease holds (a
    /// majority confirmed a heartbeat round asked for within the last
    /// [`node::LEASE`], and this member applied what was committed then):
    /// waits up to `patience` for one. Otherwise `Again`, naming the leader
    /// if another is known: the caller ends the client's session, which
    /// voids its callbacks, and the client finds the leader.
    pub fn confirm_leader(&self, patience: Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + patience;
        let mut l = self.published.lease.lock();
        loop {
            if self.published.leader.load(Ordering::SeqCst) != self.me
                || self.published.failed.load(Ordering::SeqCst)
            {
                drop(l);
                return Err(self.redirect());
            }
            let now = std::time::Instant::now();
            if l.until.is_some_and(|u| u > now) {
                return Ok(());
            }
            if now >= deadline {
                return Err(Error::Again(format!(
                    "member {} could not confirm its leadership with a majority within {} ms",
                    self.me,
                    patience.as_millis()
                )));
            }
            // Woken by a renewal or a role change; looks again at least
            // every 50 ms (the leader id changes without a signal).
            let slice = (deadline - now).min(Duration::from_millis(50));
            self.published.lease_changed.wait_for(&mut l, slice);
        }
    }

    /// The error a member that is not (or no longer) the leader answers.
    pub fn redirect(&self) -> Error {
        match self.leader().filter(|(id, _)| *id != self.me) {
            Some((id, addr)) => Error::Again(format!(
                "not the leader; the leader is member {id} at {addr}"
            )),
            None => Error::Again("not the leader; no leader elected yet".into()),
        }
    }

    /// How long a new leader waits, from its election, before it
    /// acknowledges a write (see [`node::Lease::writes_from`]).
    pub fn set_write_delay(&self, d: Duration) {
        self.published.lease.lock().write_delay = d;
    }

    /// Block until this leader may acknowledge writes (bounded by the
    /// write delay).
    pub fn wait_writable(&self) {
        let l = *self.published.lease.lock();
        if let Some(at) = l.writes_from {
            let left = at.saturating_duration_since(std::time::Instant::now());
            std::thread::sleep(left.min(l.write_delay));
        }
    }

    /// The leader's node id and address, if one is known.
    pub fn leader(&self) -> Option<(u64, String)> {
        let id = self.published.leader.load(Ordering::SeqCst);
        let addr = self.group.lock().addr_of(id).map(str::to_string)?;
        Some((id, addr))
    }

    /// The node's state (asks the node thread; bounded wait).
    pub fn status(&self) -> Result<NodeStatus> {
        let (tx, rx) = bounded(1);
        self.inbox
            .send_timeout(Input::Status(tx), Duration::from_secs(2))
            .map_err(|_| Error::Again("the raft node is not running".into()))?;
        rx.recv_timeout(Duration::from_secs(2))
            .map_err(|_| Error::Timeout("the raft node did not answer".into()))
    }

    /// Append `data` to the replicated log; returns its index once a
    /// majority has it and this member applied it. Only the leader takes
    /// proposals (others answer `Again` naming the leader).
    pub fn propose(&self, data: Vec<u8>, timeout: Duration) -> Result<node::Applied> {
        let (tx, rx) = bounded(1);
        self.inbox
            .send_timeout(Input::Propose(data, tx), timeout)
            .map_err(|_| Error::Again("the raft node is not running".into()))?;
        rx.recv_timeout(timeout)
            .map_err(|_| Error::Timeout("no majority applied the change in time".into()))?
    }

    /// As [`Replicator::propose`], from any member: a follower forwards
    /// the entry to the leader and answers once it applied it itself.
    pub fn propose_from_any_member(
        &self,
        data: Vec<u8>,
        timeout: Duration,
    ) -> Result<node::Applied> {
        let (tx, rx) = bounded(1);
        self.inbox
            .send_timeout(Input::ProposeAny(data, tx), timeout)
            .map_err(|_| Error::Again("the raft node is not running".into()))?;
        rx.recv_timeout(timeout)
            .map_err(|_| Error::Timeout("no majority applied the change in time".into()))?
    }

    /// Add member `id` at `addr` (`Some`) or remove it (`None`), through the log.
    pub fn change_membership(
        &self,
        id: u64,
        addr: Option<String>,
        timeout: Duration,
    ) -> Result<u64> {
        let (tx, rx) = bounded(1);
        self.inbox
            .send_timeout(Input::Membership(id, addr, tx), timeout)
            .map_err(|_| Error::Again("the raft node is not running".into()))?;
        let applied = rx.recv_timeout(timeout).map_err(|_| {
            Error::Timeout("the membership change was not applied in time".into())
        })??;
        applied
            .downcast::<u64>()
            .map(|b| *b)
            .map_err(|_| Error::Eio("membership change result of an unexpected type".into()))
    }

    /// `add ID ADDR` or `remove ID` from `group add/remove`.
    fn membership_request(&self, text: &str) -> Result<u64> {
        let f: Vec<&str> = text.split_whitespace().collect();
        let id = |s: &str| {
            s.parse::<u64>()
                .ok()
                .filter(|i| *i > 0)
                .ok_or_else(|| Error::Invalid(format!("{s:?} is not a node id")))
        };
        let timeout = Duration::from_secs(20);
        match f.as_slice() {
            ["add", n, addr] => {
                config::resolve(addr)?;
                self.change_membership(id(n)?, Some(addr.to_string()), timeout)
            }
            ["remove", n] => self.change_membership(id(n)?, None, timeout),
            _ => Err(Error::Invalid(format!("bad membership request {text:?}"))),
        }
    }

    /// Call `f` whenever this member stops being the leader.
    pub fn on_step_down(&self, f: Box<dyn Fn() + Send + Sync>) {
        *self.published.on_step_down.lock() = Some(f);
    }

    /// Stop the node thread (and its peer connections).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }

    /// Serve an accepted connection whose first byte says it is a peer's.
    pub fn serve_peer(&self, mut reader: BufReader<Stream>, mut stream: Stream) {
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        let from = match transport::accept(&mut reader, &mut stream, &self.key.secret, self.me) {
            Ok(f) => f,
            Err(e) => {
                log::info(format_args!(
                    "replication: peer handshake from {peer} failed: {e}"
                ));
                return;
            }
        };
        let _ = stream.set_read_timeout(Some(PEER_IDLE));
        loop {
            let frame = match transport::read_frame(&mut reader) {
                Ok(Some(f)) => f,
                Ok(None) => return,
                Err(_) => return,
            };
            match frame {
                (KIND_RAFT, body) if from != 0 => {
                    let Ok(m) = raft::eraftpb::Message::parse_from_bytes(&body) else {
                        log::warn(format_args!("replication: bad message from member {from}"));
                        return;
                    };
                    if m.from != from {
                        log::warn(format_args!(
                            "replication: member {from} sent a message as {}",
                            m.from
                        ));
                        return;
                    }
                    match self.inbox.try_send(Input::Raft(Box::new(m))) {
                        Ok(()) | Err(TrySendError::Full(_)) => {}
                        Err(TrySendError::Disconnected(_)) => return,
                    }
                    // A connection of Raft messages: the node thread reads
                    // it from now on, without a wake-up of this thread
                    // and a hand-off per message (docs/SERVER.md "Peers").
                    if !peer_threads() {
                        let buffered = reader.buffer().to_vec();
                        let _ =
                            self.inbox
                                .try_send(Input::Attach(from, reader.into_inner(), buffered));
                        return;
                    }
                }
                (transport::KIND_PUSH, body) if from != 0 => {
                    if let Err(e) = data::serve_push(&self.root, &mut reader, &mut stream, &body) {
                        log::warn(format_args!("replication: data from member {from}: {e}"));
                        return;
                    }
                }
                (transport::KIND_FETCH, body) if from != 0 => {
                    if data::serve_fetch(&self.root, &mut stream, &body).is_err() {
                        return;
                    }
                }
                (transport::KIND_MEMBERSHIP_REQ, body) if from == 0 => {
                    let text = String::from_utf8_lossy(&body).into_owned();
                    let reply = match self.membership_request(&text) {
                        Ok(index) => format!("ok {index}"),
                        Err(e) => format!("error {e}"),
                    };
                    if transport::write_frame(
                        &mut stream,
                        transport::KIND_MEMBERSHIP,
                        reply.as_bytes(),
                    )
                    .is_err()
                    {
                        return;
                    }
                }
                (KIND_STATUS_REQ, _) => {
                    let text = match self.status() {
                        Ok(s) => s.encode(),
                        Err(e) => format!("error {e}\n"),
                    };
                    if transport::write_frame(&mut stream, KIND_STATUS, text.as_bytes()).is_err() {
                        return;
                    }
                }
                _ => return,
            }
        }
    }
}

/// Whether the first byte of a connection marks a peer (clients' frames
/// start with the high byte of a small length: zero).
pub fn is_peer_start(first: u8) -> bool {
    first == transport::MAGIC[0]
}

/// One member's answer to `group status`.
#[derive(Debug, Clone)]
pub struct MemberReport {
    /// The member as the group file lists it.
    pub member: Member,
    /// Its status, or why it could not be had.
    pub status: std::result::Result<NodeStatus, String>,
}

/// Ask every member listed in `root`'s group file for its status.
/// `tls`: over TLS pinned to `root`'s `server.fingerprint` (the members
/// serve TLS).
pub fn group_status(root: &Path, tls: bool) -> Result<Vec<MemberReport>> {
    let cfg = GroupConfig::load(root)?.ok_or_else(|| {
        Error::Invalid(format!(
            "{} is not a group member's data directory",
            root.display()
        ))
    })?;
    let key = transport::peer_key(root, tls)?;
    let mut out = Vec::new();
    let members = cfg.members.clone();
    for m in members {
        let status = ask_status(&m.addr, m.id, &key).map_err(|e| e.to_string());
        out.push(MemberReport { member: m, status });
    }
    Ok(out)
}

/// A member the leader has heard nothing from for this long counts as down
/// in a [`group_view`]: about six heartbeat rounds, well past a slow
/// answer, and shorter than an election, so a client hears of a lost
/// follower about when it would hear of a lost leader.
pub const MEMBER_SILENT_AFTER: Duration = Duration::from_millis(1000);

/// The leader's answer to a client's `GroupStatus`: the term, itself, and
/// every voter with whether it was heard within [`MEMBER_SILENT_AFTER`].
/// A member that is not the leader (any more) answers `Again`, as to a
/// write: the client asks the leader it finds next.
pub(crate) fn group_view(r: &Replicator) -> Result<Msg> {
    let cached = r
        .view_status
        .lock()
        .as_ref()
        .filter(|(at, _)| at.elapsed() < VIEW_REUSE)
        .map(|(_, st)| st.clone());
    let st = match cached {
        Some(st) => st,
        None => {
            // Asked without the lock held (the node thread may be slow).
            let st = r.status()?;
            *r.view_status.lock() = Some((std::time::Instant::now(), st.clone()));
            st
        }
    };
    if st.role != "leader" {
        return Err(Error::Again(
            "not the leader; ask the group's leader".into(),
        ));
    }
    let heard: std::collections::HashMap<u64, u64> = st.heard_ms.iter().copied().collect();
    let g = r.group.lock();
    let members = st
        .voters
        .iter()
        .map(|id| GroupMember {
            id: *id,
            addr: g.addr_of(*id).unwrap_or_default().to_string(),
            up: *id == st.id
                || heard
                    .get(id)
                    .is_some_and(|ms| *ms < MEMBER_SILENT_AFTER.as_millis() as u64),
        })
        .collect();
    Ok(Msg::GroupView {
        term: st.term,
        leader: st.id,
        members,
    })
}

/// `group add` (`Some(addr)`) or `group remove` (`None`) of member `id`:
/// asks every member `root`'s group file lists until the leader takes it.
/// Returns the log index of the change.
/// `tls` as for [`group_status`].
pub fn change_membership(root: &Path, id: u64, addr: Option<&str>, tls: bool) -> Result<u64> {
    let cfg = GroupConfig::load(root)?.ok_or_else(|| {
        Error::Invalid(format!(
            "{} is not a group member's data directory",
            root.display()
        ))
    })?;
    let key = transport::peer_key(root, tls)?;
    let req = match addr {
        Some(a) => format!("add {id} {a}"),
        None => format!("remove {id}"),
    };
    let mut last = Error::Again("no member answered".into());
    for m in &cfg.members {
        let attempt = (|| -> Result<u64> {
            let mut s = transport::dial(config::resolve(&m.addr)?, &key, 0, m.id)?;
            s.set_read_timeout(Some(Duration::from_secs(30)))
                .map_err(|e| Error::io("peer socket", e))?;
            transport::write_frame(&mut s, transport::KIND_MEMBERSHIP_REQ, req.as_bytes())?;
            match transport::read_frame(&mut s)? {
                Some((transport::KIND_MEMBERSHIP, body)) => {
                    let text = String::from_utf8_lossy(&body).into_owned();
                    match text.strip_prefix("ok ") {
                        Some(i) => i
                            .trim()
                            .parse()
                            .map_err(|_| Error::Protocol(format!("bad reply {text:?}"))),
                        None => Err(Error::Again(
                            text.strip_prefix("error ").unwrap_or(&text).to_string(),
                        )),
                    }
                }
                _ => Err(Error::Protocol("no membership reply".into())),
            }
        })();
        match attempt {
            Ok(i) => return Ok(i),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Ask one member for its status over a peer connection (node id 0).
pub fn ask_status(addr: &str, id: u64, key: &PeerKey) -> Result<NodeStatus> {
    let mut s = transport::dial(config::resolve(addr)?, key, 0, id)?;
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| Error::io("peer socket", e))?;
    transport::write_frame(&mut s, KIND_STATUS_REQ, &[])?;
    let mut r = BufReader::new(s.try_clone().map_err(|e| Error::io("peer socket", e))?);
    match transport::read_frame(&mut r)? {
        Some((KIND_STATUS, body)) => {
            let text = String::from_utf8_lossy(&body).into_owned();
            if let Some(err) = text.strip_prefix("error ") {
                return Err(Error::Again(err.trim().to_string()));
            }
            NodeStatus::decode(&text)
        }
        _ => Err(Error::Protocol("no status reply".into())),
    }
}
