//! Vice: the file server. It keeps volumes in a data directory (metadata in
//! redb, file data in versioned object files), authenticates clients,
//! grants callbacks on what they read and breaks them before acknowledging
//! another client's mutation. See docs/SERVER.md for the data directory and
//! the crash-consistency argument, docs/PROTOCOL.md for the wire.
//!
//! Threads: one acceptor; per connection a reader (plus a writer thread for
//! control connections); a fixed pool of workers for control requests.

mod bulk;
mod callbacks;
mod control;
mod handshake;
pub(crate) mod log;
mod meta;
mod objects;
mod owners;
mod reintegrate;
mod sessions;
mod volume;
mod wire;
mod workers;

use std::collections::HashMap;
use std::io::BufReader;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;

use crate::proto::ConnKind;
use crate::{Error, Result};
use sessions::Registry;
use volume::VolumeStore;

pub use meta::{ROOT_FID, ROOT_VOLUME};
pub use sessions::{StagedLimits, DEFAULT_STAGED_LIMITS};
pub use volume::{volume_quota, VolumeSpace, DEFAULT_MAX_FILE_SIZE};

/// Bounds on the disk space clients can take outside the volume quotas
/// (see docs/SERVER.md, "Full disk, quotas and staged uploads").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpaceLimits {
    /// Largest file size a Store or truncate may set.
    pub max_file_size: u64,
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
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
const WORKERS: usize = 16;

/// Default silence after which a control connection is reaped.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub root: PathBuf,
    pub listen: SocketAddr,
    pub break_timeout: Duration,
    /// A control connection silent this long is closed and its session
    /// (callbacks included) dropped. Clients ping every `heartbeat_ms`, so
    /// this only reaps clients that vanished without closing (host gone,
    /// cable cut, hung); such a client revalidates when it returns.
    pub idle_timeout: Duration,
    pub space: SpaceLimits,
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
        }
    }
}

/// Create a data directory with the root volume (volume 1, root directory
/// (1, 1, 1), mode 0755) and `user`; returns the path of the user's secret
/// file (`root/<user>.secret`, mode 0600). Refuses an existing server.
pub fn init(root: &Path, user: &str) -> Result<PathBuf> {
    VolumeStore::init(root, user)
}

/// Add a user to an existing data directory; returns its secret file path.
pub fn add_user(root: &Path, user: &str) -> Result<PathBuf> {
    VolumeStore::add_user(root, user)
}

/// What every thread of a running server shares.
pub(crate) struct Shared {
    root: PathBuf,
    store: VolumeStore,
    registry: Registry,
    pool: workers::Pool,
    break_timeout: Duration,
    idle_timeout: Duration,
    stopping: AtomicBool,
    /// Every open connection, so shutdown can cut them all.
    conns: Mutex<HashMap<u64, TcpStream>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    next_conn: AtomicU64,
}

/// A running server. Dropping it without `shutdown` leaves its threads
/// serving until the process exits.
pub struct Server {
    shared: Arc<Shared>,
    addr: SocketAddr,
    acceptor: Option<JoinHandle<()>>,
}

impl Server {
    /// Open the data directory, bind, start the threads; returns at once.
    pub fn start(cfg: ServerConfig) -> Result<Server> {
        let store = VolumeStore::open(&cfg.root, cfg.space.max_file_size)?;
        let listener = TcpListener::bind(cfg.listen)
            .map_err(|e| Error::io(format!("listen on {}", cfg.listen), e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("local address", e))?;
        let pool = workers::Pool::new(WORKERS).map_err(|e| Error::io("start workers", e))?;
        let shared = Arc::new(Shared {
            root: cfg.root.clone(),
            store,
            registry: Registry::with_limits(&cfg.root, cfg.space.staged),
            pool,
            break_timeout: cfg.break_timeout,
            idle_timeout: cfg.idle_timeout,
            stopping: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
            next_conn: AtomicU64::new(1),
        });
        let s2 = Arc::clone(&shared);
        let acceptor = std::thread::Builder::new()
            .name("coda-accept".into())
            .spawn(move || accept_loop(s2, listener))
            .map_err(|e| Error::io("start acceptor", e))?;
        log::info(format_args!(
            "serving {} on {addr} (break timeout {} ms)",
            cfg.root.display(),
            cfg.break_timeout.as_millis()
        ));
        Ok(Server {
            shared,
            addr,
            acceptor: Some(acceptor),
        })
    }

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
        log::info(format_args!("shut down"));
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

fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    for conn in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                log::warn(format_args!("accept: {e}"));
                // e.g. EMFILE: do not spin on it.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let serial = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        if let Ok(c) = stream.try_clone() {
            shared.conns.lock().insert(serial, c);
        }
        let s2 = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name(format!("coda-conn-{serial}"))
            .spawn(move || {
                connection(&s2, stream, serial);
                s2.conns.lock().remove(&serial);
            });
        let mut threads = shared.threads.lock();
        threads.retain(|t| !t.is_finished());
        match spawned {
            Ok(h) => threads.push(h),
            Err(e) => {
                log::warn(format_args!("cannot spawn a connection thread: {e}"));
                if let Some(c) = shared.conns.lock().remove(&serial) {
                    let _ = c.shutdown(Shutdown::Both);
                }
            }
        }
    }
}

/// One accepted connection: handshake under a deadline, then serve it as
/// the kind it declared.
fn connection(shared: &Arc<Shared>, mut stream: TcpStream, serial: u64) {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let _ = stream.set_write_timeout(Some(SEND_TIMEOUT));
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::with_capacity(64 * 1024, read_half);
    let (ident, welcome) = match handshake::accept(&mut reader, &mut stream, &shared.store) {
        Ok(i) => i,
        Err(e) => {
            if !shared.stopping.load(Ordering::SeqCst) {
                log::info(format_args!("handshake from {peer} failed: {e}"));
            }
            wire::close_after_error(&mut stream);
            return;
        }
    };
    let _ = stream.set_read_timeout(None);
    match ident.kind {
        ConnKind::Control => control::serve(Arc::clone(shared), reader, ident, welcome),
        ConnKind::Bulk => bulk::serve(Arc::clone(shared), reader, ident, welcome, serial),
    }
}
