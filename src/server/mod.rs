//! Vice: the file server. It keeps volumes in a data directory (metadata in
//! redb, file data in versioned object files), authenticates clients,
//! grants callbacks on what they read and breaks them before acknowledging
//! another client's mutation. See docs/SERVER.md for the data directory and
//! the crash-consistency argument, docs/PROTOCOL.md for the wire.
//!
//! Threads: one acceptor; per connection a reader (plus a writer thread for
//! control connections), on small stacks; a fixed pool of workers for
//! control requests, shared round robin by the sessions (workers.rs).
//!
//! Limits (docs/SERVER.md "Limits"): the whole handshake has one deadline;
//! at most `max_handshaking` connections may be unauthenticated at once (a
//! new one evicts the oldest), and at most `per_ip` from one source address
//! (a new one evicts that address's oldest); the soft RLIMIT_NOFILE is raised to the hard
//! limit at start, connections are capped below it, and one spare
//! descriptor is kept so a full descriptor table never wedges accept(2).

mod acl;
mod admin;
mod bulk;
mod callbacks;
mod control;
mod handshake;
pub(crate) mod log;
pub(crate) mod meta;
mod objects;
mod owners;
mod reintegrate;
pub mod replication;
mod sessions;
mod volume;
mod wal;
mod wire;
mod workers;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::proto::ConnKind;
use crate::tls::Stream;
use crate::{Error, Result};
use sessions::Registry;
use volume::VolumeStore;

pub use control::MAX_ATTRS_REPLY;
pub use meta::{ROOT_FID, ROOT_VOLUME, SMALL_DATA_MAX};
pub use owners::DEFAULT_FORGET_CLIENTS_AFTER;
pub use sessions::{StagedLimits, DEFAULT_STAGED_LIMITS};
pub use volume::{volume_quota, VolumeSpace, DEFAULT_MAX_FILE_SIZE};

/// Bounds on the disk space clients can take outside the volume quotas
/// (see docs/SERVER.md, "Full disk, quotas and staged uploads").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpaceLimits {
    /// Largest file size a Store or truncate may set.
    pub max_file_size: u64,
    /// Bounds on uploads staged (or arriving) and not yet consumed by a Store.
    pub staged: StagedLimits,
}

impl Default for SpaceLimits {
    fn default() -> SpaceLimits {
        SpaceLimits {
            max_file_size: DEFAULT_MAX_FILE_SIZE,
            staged: DEFAULT_STAGED_LIMITS,
        }
    }
}

/// Default time a callback holder gets to acknowledge a break.
pub const DEFAULT_BREAK_TIMEOUT: Duration = Duration::from_millis(1000);
/// A connection that has not finished its handshake by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A peer that does not take our bytes for this long is cut.
pub(crate) const SEND_TIMEOUT: Duration = Duration::from_secs(30);
const WORKERS: usize = 16;
/// Stack of a connection thread: it runs the handshake and the bulk
/// transfers, nothing deep; small so a thousand connections cost little.
const CONN_STACK: usize = 512 * 1024;
/// Stack of a control connection's writer thread (it only writes).
pub(crate) const SMALL_STACK: usize = 128 * 1024;
/// Most unauthenticated connections, whatever the descriptor limit.
const MAX_HANDSHAKING: usize = 256;
/// Most unauthenticated connections from one source address, so one
/// address cannot evict everyone else's handshakes.
pub const MAX_HANDSHAKING_PER_IP: usize = 32;
/// Descriptors one connection may hold (the socket and its clones).
const FDS_PER_CONN: usize = 6;
/// Descriptors kept out of connections' reach (data files, redb, logs).
const FD_RESERVE: usize = 64;

/// Default silence after which a control connection is reaped.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Everything `Server::start` needs; `ServerConfig::new` fills in the defaults.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The data directory (meta.redb, secrets, object files) made by `coda-server init`.
    pub root: PathBuf,
    /// Address to accept control and bulk connections on (port 0: any free port).
    pub listen: SocketAddr,
    /// How long a writer's reply waits for a holder to acknowledge a callback
    /// break before that holder is declared unreachable and its session dropped.
    pub break_timeout: Duration,
    /// A control connection silent this long is closed and its session
    /// (callbacks included) dropped. Clients ping every `heartbeat_ms`, so
    /// this only reaps clients that vanished without closing (host gone,
    /// cable cut, hung); such a client revalidates when it returns.
    pub idle_timeout: Duration,
    /// Largest file size and bounds on staged uploads.
    pub space: SpaceLimits,
    /// Serve without TLS (`--insecure-plaintext`): only clients that say
    /// `insecure_plaintext = true` too can talk to it. Off (the default),
    /// every connection is TLS 1.3 with the key and certificate under
    /// `root/tls` (docs/SERVER.md "TLS").
    pub insecure_plaintext: bool,
    /// A client id its owner has not presented for this long (and whose
    /// session is not live) is forgotten, with its store-id watermark, so
    /// the ownership table stays bounded (docs/SERVER.md "Forgotten client
    /// ids").
    pub forget_clients_after: Duration,
}

impl ServerConfig {
    /// A configuration with the default timeouts.
    pub fn new(root: PathBuf, listen: SocketAddr) -> ServerConfig {
        ServerConfig {
            root,
            listen,
            break_timeout: DEFAULT_BREAK_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            space: SpaceLimits::default(),
            insecure_plaintext: false,
            forget_clients_after: DEFAULT_FORGET_CLIENTS_AFTER,
        }
    }
}

/// Create a data directory with the root volume (volume 1, root directory
/// (1, 1, 1), mode 0755) and `user`, and the server's TLS key and
/// certificate (`tls::generate`); returns the path of the user's secret
/// file (`root/<user>.secret`, mode 0600). Refuses an existing server.
pub fn init(root: &Path, user: &str) -> Result<PathBuf> {
    let secret = VolumeStore::init(root, user)?;
    crate::tls::generate(root)?;
    Ok(secret)
}

/// Give an existing data directory (made before TLS) its TLS key and
/// certificate; returns the fingerprint clients pin.
pub fn init_tls(root: &Path) -> Result<String> {
    if !root.join("meta.redb").exists() {
        return Err(Error::NotFound(format!(
            "{} holds no coda server (run coda-server init)",
            root.display()
        )));
    }
    crate::tls::generate(root)
}

/// Add a user to an existing data directory; returns its secret file path.
/// With the server stopped only; [`admin_command`] works either way.
pub fn add_user(root: &Path, user: &str) -> Result<PathBuf> {
    VolumeStore::add_user(root, user)
}

/// Run an administration command (`user add NAME`, `user remove NAME`,
/// `user list`, `group add GROUP [USER...]`, `group remove GROUP [USER...]`,
/// `group members GROUP`, `group list`, `anonymous on|off`, `quota VOLUME
/// [BYTES|none]`) on the data
/// directory `root`: through the running server's administration socket,
/// or on the metadata directly when no server runs. Returns its output.
pub fn admin_command(root: &Path, words: &[String]) -> Result<String> {
    admin::command(root, words)
}

/// What every thread of a running server shares.
pub(crate) struct Shared {
    root: PathBuf,
    /// None: `insecure_plaintext`.
    tls: Option<Arc<rustls::ServerConfig>>,
    store: Arc<VolumeStore>,
    registry: Registry,
    pool: workers::Pool,
    break_timeout: Duration,
    idle_timeout: Duration,
    forget_clients_after: Duration,
    stopping: AtomicBool,
    /// Every open connection, so shutdown can cut them all.
    conns: Mutex<HashMap<u64, TcpStream>>,
    /// The connections still in their handshake, oldest first.
    handshaking: Mutex<Handshakes>,
    max_handshaking: usize,
    /// Of those, most from one source address.
    per_ip: usize,
    max_conns: usize,
    threads: Mutex<Vec<JoinHandle<()>>>,
    next_conn: AtomicU64,
    /// The Raft node of a group member (None: a lone server).
    repl: Option<replication::Replicator>,
}

/// A running server. Dropping it without `shutdown` leaves its threads
/// serving until the process exits.
pub struct Server {
    shared: Arc<Shared>,
    addr: SocketAddr,
    acceptor: Option<JoinHandle<()>>,
    /// The administration socket's thread and path (admin.rs).
    admin: Option<(JoinHandle<()>, PathBuf)>,
}

impl Server {
    /// Open the data directory, bind, start the threads; returns at once.
    pub fn start(cfg: ServerConfig) -> Result<Server> {
        let tls = if cfg.insecure_plaintext {
            None
        } else {
            Some(crate::tls::server_config(&cfg.root)?)
        };
        let store = Arc::new(VolumeStore::open(&cfg.root, cfg.space.max_file_size)?);
        let repl = replication::Replicator::start(&cfg.root, &store, tls.is_some())?;
        if let Some(r) = &repl {
            // Clients trust callbacks blind for half the break timeout
            // after a frame (client/conn/session.rs). The old leader sent
            // its last frame within its lease, which ended at least
            // LEASE_SLACK before this member's election: a new leader
            // waits out the rest, plus a margin for frames still on their
            // way.
            r.set_write_delay(
                (cfg.break_timeout / 2 + replication::WRITE_DELAY_MARGIN)
                    .saturating_sub(replication::node::LEASE_SLACK),
            );
        }
        let listener = TcpListener::bind(cfg.listen)
            .map_err(|e| Error::io(format!("listen on {}", cfg.listen), e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("local address", e))?;
        let pool = workers::Pool::new(WORKERS).map_err(|e| Error::io("start workers", e))?;
        let nofile = raise_nofile();
        let max_conns = (nofile.saturating_sub(FD_RESERVE) / FDS_PER_CONN).max(8);
        let max_handshaking = (max_conns / 4).clamp(4, MAX_HANDSHAKING);
        let plaintext = tls.is_none();
        let shared = Arc::new(Shared {
            root: cfg.root.clone(),
            tls,
            store,
            registry: Registry::with_limits(&cfg.root, cfg.space.staged),
            pool,
            break_timeout: cfg.break_timeout,
            idle_timeout: cfg.idle_timeout,
            forget_clients_after: cfg.forget_clients_after,
            stopping: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            handshaking: Mutex::new(Handshakes::default()),
            max_handshaking,
            per_ip: (max_handshaking / 2).clamp(1, MAX_HANDSHAKING_PER_IP),
            max_conns,
            threads: Mutex::new(Vec::new()),
            next_conn: AtomicU64::new(1),
            repl,
        });
        if let Some(r) = &shared.repl {
            // A deposed leader drops its clients: they find the new one.
            let weak = Arc::downgrade(&shared);
            r.on_step_down(Box::new(move || {
                if let Some(sh) = weak.upgrade() {
                    sh.registry.end_all();
                }
            }));
        }
        let s2 = Arc::clone(&shared);
        let acceptor = std::thread::Builder::new()
            .name("coda-accept".into())
            .spawn(move || accept_loop(s2, listener))
            .map_err(|e| Error::io("start acceptor", e))?;
        // In a replicated group only the leader sweeps, through the log:
        // forgetting an id drops its store-id watermark, replicated state
        // that every member must keep alike (docs/SERVER.md "Forgotten
        // client ids").
        {
            let s4 = Arc::clone(&shared);
            let sweeper = std::thread::Builder::new()
                .name("coda-sweep".into())
                .stack_size(SMALL_STACK)
                .spawn(move || sweep_loop(s4))
                .map_err(|e| Error::io("start sweeper", e))?;
            shared.threads.lock().push(sweeper);
        }
        // Users and groups change while serving through this socket; a
        // server without it still serves (the commands then say why).
        let admin = match admin::bind(&cfg.root) {
            Ok((l, path)) => {
                let s3 = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name("coda-admin".into())
                    .stack_size(SMALL_STACK)
                    .spawn(move || admin::serve(s3, l))
                    .ok()
                    .map(|h| (h, path))
            }
            Err(e) => {
                log::warn(format_args!("no administration socket: {e}"));
                None
            }
        };
        log::info(format_args!(
            "serving {} on {addr} ({}; break timeout {} ms; {nofile} descriptors, \
             at most {max_conns} connections, {max_handshaking} unauthenticated)",
            cfg.root.display(),
            if plaintext {
                "INSECURE PLAINTEXT".to_string()
            } else {
                format!(
                    "TLS 1.3, certificate {}",
                    crate::tls::cert_path(&cfg.root).display()
                )
            },
            cfg.break_timeout.as_millis()
        ));
        Ok(Server {
            shared,
            addr,
            acceptor: Some(acceptor),
            admin,
        })
    }

    /// The address actually bound (useful when `listen` had port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop accepting, close every connection, join every thread.
    pub fn shutdown(mut self) {
        let sh = &self.shared;
        sh.stopping.store(true, Ordering::SeqCst);
        // Wake the acceptor out of accept(2) with a connection of our own.
        let _ = TcpStream::connect_timeout(&wake_addr(self.addr), Duration::from_secs(1));
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        if let Some(r) = &sh.repl {
            r.stop();
        }
        if let Some((h, path)) = self.admin.take() {
            // Wake it out of accept(2); it sees `stopping` and ends.
            let _ = std::os::unix::net::UnixStream::connect(&path);
            let _ = h.join();
            let _ = std::fs::remove_file(&path);
        }
        sh.registry.end_all();
        for s in sh.conns.lock().values() {
            let _ = s.shutdown(Shutdown::Both);
        }
        let threads: Vec<_> = std::mem::take(&mut *sh.threads.lock());
        for t in threads {
            let _ = t.join();
        }
        // Workers finish what is queued (their replies go nowhere now).
        sh.pool.shutdown();
        sh.store.checkpoint();
        log::info(format_args!("shut down"));
    }
}

/// Forget client ids not presented for `forget_clients_after` (owners.rs):
/// at start, then every quarter of that time (an hour at most). Sleeps in
/// short steps so shutdown never waits for it. A group member sweeps only
/// while it is the leader (it proposes the changes as log entries), and
/// first, once per group, logs the owner rows it held only locally.
fn sweep_loop(shared: Arc<Shared>) {
    let every = Duration::from_secs(owners::refresh_every(shared.forget_clients_after))
        .min(Duration::from_secs(3600));
    let forget_after = shared.forget_clients_after.as_secs();
    let mut next = Instant::now();
    let mut leading = false;
    // When this leader next tries to log its local owner rows (None: done).
    let mut adopt_at: Option<Instant> = None;
    while !shared.stopping.load(Ordering::SeqCst) {
        let lead_now = shared.repl.as_ref().is_none_or(|r| r.is_leader());
        if lead_now && !leading {
            // A new leadership: sweep at once (the last leader's sweeps
            // stopped with it).
            next = Instant::now();
            adopt_at = shared.repl.as_ref().map(|_| Instant::now());
        }
        leading = lead_now;
        if let (Some(r), Some(at)) = (&shared.repl, adopt_at) {
            if leading && Instant::now() >= at {
                adopt_at = match replication::machine::adopt_owners(r, &shared.store) {
                    Ok(_) => None,
                    Err(e) => {
                        log::warn(format_args!("logging the local client-id owners: {e}"));
                        Some(Instant::now() + Duration::from_secs(5))
                    }
                };
            }
        }
        if leading && Instant::now() >= next {
            let live = shared.registry.live_ids();
            let now = owners::now_secs();
            let swept = match &shared.repl {
                Some(r) => {
                    replication::machine::sweep_clients(r, &shared.store, &live, now, forget_after)
                }
                None => shared.store.sweep_clients(&live, now, forget_after),
            };
            match swept {
                Ok(0) => {}
                Ok(n) => log::info(format_args!(
                    "forgot {n} client id(s) not seen for {forget_after} s"
                )),
                Err(e) => log::warn(format_args!("sweeping client ids: {e}")),
            }
            next = Instant::now() + every;
        }
        if shared.repl.is_none() {
            shared.store.checkpoint_if_idle();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The address to connect to for waking the acceptor: a wildcard listen
/// address is reached through loopback.
fn wake_addr(addr: SocketAddr) -> SocketAddr {
    let mut a = addr;
    if a.ip().is_unspecified() {
        a.set_ip(match a {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    a
}

/// Raise the soft descriptor limit to the hard one (a server's connections
/// are descriptors); returns the soft limit now in force.
fn raise_nofile() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    if lim.rlim_cur < lim.rlim_max {
        let want = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        } else {
            log::warn(format_args!(
                "cannot raise the descriptor limit from {} to {}",
                lim.rlim_cur, lim.rlim_max
            ));
        }
    }
    // RLIM_INFINITY and other huge values: what matters is "plenty".
    usize::try_from(lim.rlim_cur)
        .unwrap_or(usize::MAX)
        .min(1 << 20)
}

/// A descriptor held in reserve: when accept(2) fails for want of
/// descriptors, it is released so the waiting connection can be taken
/// and closed instead of sitting in the backlog forever.
fn spare_fd() -> Option<File> {
    File::open("/dev/null").ok()
}

fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let mut spare = spare_fd();
    loop {
        let conn = listener.accept();
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let (stream, ip) = match conn {
            Ok((s, a)) => (s, a.ip().to_canonical()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) => {
                log::warn(format_args!("accept: {e}; shedding one connection"));
                evict_oldest_handshake(&shared);
                spare.take();
                if let Ok((s, _)) = listener.accept() {
                    drop(s);
                }
                spare = spare_fd();
                if spare.is_none() {
                    // Still no descriptor: do not spin on it.
                    std::thread::sleep(Duration::from_millis(50));
                }
                continue;
            }
            Err(e) => {
                log::warn(format_args!("accept: {e}"));
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if !admit(&shared) {
            // Every slot is an authenticated connection: refuse the new one.
            drop(stream);
            continue;
        }
        let serial = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        if let Ok(c) = stream.try_clone() {
            shared.conns.lock().insert(serial, c);
        }
        let evicted = {
            let mut h = shared.handshaking.lock();
            let ev = h.to_evict(ip, shared.max_handshaking, shared.per_ip);
            if let Some(old) = ev {
                h.remove(old);
            }
            h.insert(serial, ip);
            ev
        };
        if let Some(old) = evicted {
            cut(&shared, old);
        }
        let s2 = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name(format!("coda-conn-{serial}"))
            .stack_size(CONN_STACK)
            .spawn(move || {
                connection(&s2, stream, serial);
                s2.handshaking.lock().remove(serial);
                s2.conns.lock().remove(&serial);
            });
        let mut threads = shared.threads.lock();
        threads.retain(|t| !t.is_finished());
        match spawned {
            Ok(h) => threads.push(h),
            Err(e) => {
                log::warn(format_args!("cannot spawn a connection thread: {e}"));
                shared.handshaking.lock().remove(serial);
                if let Some(c) = shared.conns.lock().remove(&serial) {
                    let _ = c.shutdown(Shutdown::Both);
                }
            }
        }
    }
}

/// Room for one more connection: under the cap, or made by evicting the
/// oldest unauthenticated one (a real client finishes its handshake in one
/// round trip; idle or dribbling peers are the ones that sit there).
fn admit(shared: &Shared) -> bool {
    if shared.conns.lock().len() < shared.max_conns {
        return true;
    }
    evict_oldest_handshake(shared)
}

fn evict_oldest_handshake(shared: &Shared) -> bool {
    let oldest = shared.handshaking.lock().pop_first();
    match oldest {
        Some(old) => {
            cut(shared, old);
            true
        }
        None => false,
    }
}

/// The connections in their handshake: serial (in accept order) → source
/// address, with a count per address.
#[derive(Default)]
struct Handshakes {
    order: BTreeMap<u64, IpAddr>,
    per_ip: HashMap<IpAddr, usize>,
}

impl Handshakes {
    fn insert(&mut self, serial: u64, ip: IpAddr) {
        if self.order.insert(serial, ip).is_none() {
            *self.per_ip.entry(ip).or_default() += 1;
        }
    }

    fn remove(&mut self, serial: u64) {
        if let Some(ip) = self.order.remove(&serial) {
            self.uncount(ip);
        }
    }

    fn uncount(&mut self, ip: IpAddr) {
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
    }

    fn pop_first(&mut self) -> Option<u64> {
        let (serial, ip) = self.order.pop_first()?;
        self.uncount(ip);
        Some(serial)
    }

    /// The handshake to close so a new one from `ip` fits: that address's
    /// oldest once it holds `per_ip`, else the oldest of all at `max`.
    fn to_evict(&self, ip: IpAddr, max: usize, per_ip: usize) -> Option<u64> {
        if self.per_ip.get(&ip).copied().unwrap_or(0) >= per_ip {
            return self.order.iter().find(|(_, a)| **a == ip).map(|(s, _)| *s);
        }
        if self.order.len() >= max {
            return self.order.keys().next().copied();
        }
        None
    }
}

/// Cut a connection by serial; its thread sees the error and ends.
fn cut(shared: &Shared, serial: u64) {
    if let Some(c) = shared.conns.lock().get(&serial) {
        let _ = c.shutdown(Shutdown::Both);
    }
}

/// The handshake's reader: one deadline for the whole handshake, not one
/// per read, so a peer sending a byte now and then is cut on time.
struct Deadline<'a> {
    inner: &'a mut BufReader<Stream>,
    at: Instant,
}

impl Deadline<'_> {
    fn arm(&self) -> std::io::Result<()> {
        let left = self.at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "handshake deadline passed",
            ));
        }
        self.inner.get_ref().set_read_timeout(Some(left))
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.arm()?;
        self.inner.read(buf)
    }
}

impl BufRead for Deadline<'_> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        self.arm()?;
        self.inner.fill_buf()
    }
    fn consume(&mut self, n: usize) {
        self.inner.consume(n)
    }
}

/// One accepted connection: TLS and coda handshakes under one deadline,
/// then serve it as the kind it declared.
fn connection(shared: &Arc<Shared>, stream: TcpStream, serial: u64) {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let _ = stream.set_write_timeout(Some(SEND_TIMEOUT));
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    // Until the peer is proven, its TLS and coda handshakes yield the CPU
    // to authenticated work (SERVER.md "CPU priority").
    let lowered = workers::lower_for_handshake();
    let quiet = |e: &Error| {
        if !shared.stopping.load(Ordering::SeqCst) {
            log::info(format_args!("handshake from {peer} failed: {e}"));
        }
    };
    let mut stream = match &shared.tls {
        Some(cfg) => match Stream::accept(stream, Arc::clone(cfg), &peer, deadline) {
            Ok(s) => s,
            Err(e) => return quiet(&e),
        },
        None => {
            let mut first = [0u8; 1];
            let tls_hello = matches!(stream.peek(&mut first), Ok(1) if first[0] == crate::tls::TLS_HANDSHAKE_BYTE);
            let mut stream = Stream::plain(stream);
            if tls_hello {
                // Answered in plaintext: the client sees a non-TLS reply
                // and says which setting differs (tls.rs).
                let e = crate::tls::tls_client_on_plaintext_server(&peer);
                quiet(&e);
                let _ = wire::send(&mut stream, 0, &wire::error_reply(&e));
                wire::close_after_error(&mut stream);
                return;
            }
            stream
        }
    };
    let binding = match stream.channel_binding() {
        Ok(b) => b,
        Err(e) => return quiet(&e),
    };
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::with_capacity(64 * 1024, read_half);
    if let Some(r) = &shared.repl {
        // Peers share the port: their first byte is not a frame's.
        let first = Deadline {
            inner: &mut reader,
            at: Instant::now() + HANDSHAKE_TIMEOUT,
        }
        .fill_buf()
        .ok()
        .and_then(|b| b.first().copied());
        if first.is_some_and(replication::is_peer_start) {
            shared.handshaking.lock().remove(serial);
            r.serve_peer(reader, stream);
            return;
        }
    }
    let mut timed = Deadline {
        inner: &mut reader,
        at: deadline,
    };
    let accepted = handshake::accept(
        &mut timed,
        &mut stream,
        &shared.store,
        binding,
        shared.break_timeout,
        owners::refresh_every(shared.forget_clients_after),
        shared.repl.is_none(),
    );
    workers::restore_priority(lowered);
    shared.handshaking.lock().remove(serial);
    let (ident, welcome) = match accepted {
        Ok(i) => i,
        Err(e) => {
            quiet(&e);
            wire::close_after_error(&mut stream);
            return;
        }
    };
    let _ = stream.set_read_timeout(None);
    if let (Some(r), ConnKind::Control) = (&shared.repl, ident.kind) {
        // Only the leader serves, and only while a majority confirms it.
        // The client id is claimed through the log, once the leadership
        // is confirmed: every member learns its owner before the welcome.
        let ok = if r.is_leader() {
            r.confirm_leader(replication::LEASE_PATIENCE)
                .and_then(|()| {
                    replication::machine::claim_client(
                        r,
                        &shared.store,
                        &ident.client_id,
                        &ident.user,
                        owners::refresh_every(shared.forget_clients_after),
                    )
                })
        } else {
            Err(r.redirect())
        };
        if let Err(e) = ok {
            let _ = wire::send(&mut stream, 0, &wire::error_reply(&e));
            wire::close_after_error(&mut stream);
            return;
        }
    }
    match ident.kind {
        ConnKind::Control => control::serve(Arc::clone(shared), reader, ident, welcome),
        ConnKind::Bulk => bulk::serve(Arc::clone(shared), reader, ident, welcome, serial),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_evicts_only_its_own_handshakes() {
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let mut h = Handshakes::default();
        h.insert(1, a);
        // b fills its share: from then on each new b evicts b's oldest.
        for s in 2..6 {
            assert_eq!(h.to_evict(b, 8, 4), None);
            h.insert(s, b);
        }
        assert_eq!(h.to_evict(b, 8, 4), Some(2));
        h.remove(2);
        h.insert(6, b);
        assert_eq!(h.to_evict(b, 8, 4), Some(3));
        // Another address still gets in without evicting anyone...
        assert_eq!(h.to_evict(a, 8, 4), None);
        for s in 7..10 {
            h.insert(s, a);
        }
        // ...until the total is full: then the oldest of all goes.
        assert_eq!(h.order.len(), 8);
        assert_eq!(h.to_evict("10.0.0.3".parse().unwrap(), 8, 4), Some(1));
        assert_eq!(h.pop_first(), Some(1));
        assert_eq!(h.per_ip[&a], 3);
        for s in 3..10 {
            h.remove(s);
        }
        assert!(h.order.is_empty() && h.per_ip.is_empty());
    }
}
