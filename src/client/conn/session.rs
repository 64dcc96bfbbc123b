//! A session: the handshake, one authenticated control connection with its
//! reader thread (replies demultiplexed by request id, callback breaks
//! acked at once), and the bulk connections that stream file data.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use parking_lot::{Condvar, Mutex};

use super::interrupt::{Interrupt, SocketGuard};
use super::params::{Identity, Timing, GATE_SLICE};
use crate::client::callback::Callbacks;
use crate::client::event::{Event, Invalidation};
use crate::client::mailbox::{Mailbox, Woken};
use crate::client::stats::Counters;
use crate::proto::auth;
use crate::proto::frame::{read_frame, write_msg};
use crate::proto::{Attr, ConnKind, Fid, Msg, BULK_CHUNK};
use crate::tls::Stream;
use crate::{Error, Result};

// ---------------------------------------------------------------------------
// Handshake (both connection kinds).

fn dial(
    addr: SocketAddr,
    kind: ConnKind,
    t: &Timing,
    interrupt: &Interrupt,
) -> std::io::Result<TcpStream> {
    // A configured port is for the control connection only: bulk connections
    // to the same server from the same port would be the same TCP 4-tuple.
    let local = match (t.bind_addr, kind) {
        (Some(a), ConnKind::Bulk) => Some(SocketAddr::new(a.ip(), 0)),
        (a, _) => a,
    };
    let s = connect_interruptible(local, addr, t.rpc_timeout, interrupt)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(t.rpc_timeout))?;
    s.set_write_timeout(Some(t.rpc_timeout))?;
    Ok(s)
}

fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*v4.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is large and aligned enough for any sockaddr.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in, sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: as above.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in6, sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// Connect to `remote` (from `local` if given, with `SO_REUSEADDR`: std
/// cannot bind before connecting), within `timeout`. The socket is
/// registered with the interrupt before it connects, and the connect is
/// non-blocking, watched in short slices: a failover or release ends it at
/// once instead of after `timeout`.
fn connect_interruptible(
    local: Option<SocketAddr>,
    remote: SocketAddr,
    timeout: Duration,
    interrupt: &Interrupt,
) -> std::io::Result<TcpStream> {
    use std::os::unix::io::{AsRawFd, FromRawFd};
    let interrupted = |e: Error| std::io::Error::new(std::io::ErrorKind::ConnectionAborted, e);
    let family = if remote.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket calls on an fd we own; it is wrapped in TcpStream
    // (which closes it) as soon as it exists.
    let stream = unsafe {
        let fd = libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        );
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        TcpStream::from_raw_fd(fd)
    };
    let fd = stream.as_raw_fd();
    if let Some(local) = local {
        let one: libc::c_int = 1;
        let (l, llen) = sockaddr(local);
        // SAFETY: valid fd, option and address buffers of the given sizes.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                &one as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
            if libc::bind(fd, &l as *const _ as *const libc::sockaddr, llen) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    let _guard = interrupt.guard(&stream).map_err(interrupted)?;
    let (r, rlen) = sockaddr(remote);
    // SAFETY: valid fd and address buffer.
    if unsafe { libc::connect(fd, &r as *const _ as *const libc::sockaddr, rlen) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
        let deadline = Instant::now() + timeout;
        // Bounded by the deadline; each turn waits at most one slice.
        loop {
            interrupt.check().map_err(interrupted)?;
            let now = Instant::now();
            if now >= deadline {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connect timed out after {} ms", timeout.as_millis()),
                ));
            }
            let slice = (deadline - now).min(GATE_SLICE);
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, slice.as_millis().max(1) as libc::c_int) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n > 0 {
                break;
            }
        }
        // An interrupt shuts the socket down, which ends the connect with a
        // reset: report the interrupt, not the reset.
        interrupt.check().map_err(interrupted)?;
        if let Some(e) = stream.take_error()? {
            return Err(e);
        }
    }
    stream.set_nonblocking(false)?;
    Ok(stream)
}

fn send(s: &mut Stream, id: u64, m: &Msg) -> Result<()> {
    write_msg(s, id, m)
}

/// The control connection's sending side. Frames go on the wire in the
/// order they are handed in, written by whichever caller holds the sending
/// turn (a flag, not a lock held across the write): a caller that finds
/// the turn taken leaves its frame queued and goes on, and the holder
/// writes it after its own. So no caller waits for a mutex while another
/// is inside a socket write (a full socket blocks only the holder, up to
/// the write timeout; killing the session shuts the socket down).
struct FrameSender {
    /// Sealed through `Stream::seal` (TLS state locked only while
    /// encrypting), written to its socket directly.
    stream: Stream,
    st: Mutex<SendState>,
}

#[derive(Default)]
struct SendState {
    /// A caller is writing: frames queued meanwhile are its to write.
    writing: bool,
    queue: std::collections::VecDeque<Vec<u8>>,
    /// A write failed: the stream's state is unknown, nothing more goes.
    failed: Option<String>,
}

impl FrameSender {
    fn new(stream: Stream) -> FrameSender {
        FrameSender {
            stream,
            st: Mutex::new(SendState::default()),
        }
    }

    /// Hand in a frame `Msg::encode_frame` made. `Ok` once it is written
    /// or queued behind the writer in turn; an error when this caller's
    /// turn failed to write (what it wrote for others included) or an
    /// earlier one did: the caller then kills the session, which fails
    /// every call whose request may not have gone.
    fn send(&self, frame: Vec<u8>) -> Result<()> {
        if frame.len() - 4 > crate::proto::MAX_FRAME {
            return Err(Error::Invalid(format!(
                "frame of {} bytes exceeds limit {}",
                frame.len() - 4,
                crate::proto::MAX_FRAME
            )));
        }
        let mut st = self.st.lock();
        if let Some(e) = &st.failed {
            let e = std::io::Error::new(std::io::ErrorKind::BrokenPipe, e.clone());
            return Err(Error::io("sending frame", e));
        }
        st.queue.push_back(frame);
        if st.writing {
            return Ok(());
        }
        st.writing = true;
        let mut sealed = Vec::new();
        // Bounded: each turn writes what was queued; callers queue only
        // while it writes, and a failure ends it.
        loop {
            let batch: Vec<Vec<u8>> = st.queue.drain(..).collect();
            if batch.is_empty() {
                st.writing = false;
                return Ok(());
            }
            drop(st);
            let r = self.write_batch(&batch, &mut sealed);
            st = self.st.lock();
            if let Err(e) = r {
                st.failed = Some(e.to_string());
                st.queue.clear();
                st.writing = false;
                return Err(Error::io("sending frame", e));
            }
        }
    }

    /// Seal (or, in plaintext, copy) the frames in order and write them in
    /// one go.
    fn write_batch(&self, batch: &[Vec<u8>], sealed: &mut Vec<u8>) -> std::io::Result<()> {
        sealed.clear();
        for f in batch {
            if !self.stream.seal(f, sealed)? {
                sealed.extend_from_slice(f);
            }
        }
        let mut sock = self.stream.tcp();
        sock.write_all(sealed)
    }
}

fn recv(s: &mut Stream, server: &str, timeout: Duration) -> Result<Msg> {
    match read_frame(s) {
        Ok(Some(f)) => Msg::decode(&f),
        Ok(None) => Err(Error::Eio(format!("server {server} closed the connection"))),
        Err(e) => Err(net_error(e, server, timeout)),
    }
}

/// A socket read that timed out is `Timeout`; other socket failures mean the
/// server (or the path to it) is gone: `Eio`, naming the server. A record
/// that fails TLS's integrity check is such a failure too: the connection
/// is dropped, nothing of it is taken as data.
fn net_error(e: Error, server: &str, timeout: Duration) -> Error {
    match e {
        Error::Io { source, .. }
            if matches!(
                source.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Error::Timeout(format!(
                "no reply from server {server} within {} ms",
                timeout.as_millis()
            ))
        }
        Error::Io { context, source } => {
            Error::Eio(format!("server {server}: {context}: {source}"))
        }
        other => other,
    }
}

fn reply_error(m: Msg, server: &str, what: &str) -> Error {
    match m {
        Msg::Error { code, message, .. } => Error::from_wire(code, message),
        other => Error::Protocol(format!("server {server} answered {what} with {other:?}")),
    }
}

/// What the server's Welcome told us.
struct Welcomed {
    root: Fid,
    break_timeout: Duration,
}

/// Open and authenticate one connection; returns it with what the Welcome said.
fn handshake(
    server: &str,
    kind: ConnKind,
    id: &Identity,
    t: &Timing,
    interrupt: &Interrupt,
) -> Result<(Stream, Welcomed)> {
    let addr = server
        .to_socket_addrs()
        .map_err(|e| Error::Eio(format!("server {server}: cannot resolve: {e}")))?
        .next()
        .ok_or_else(|| Error::Eio(format!("server {server}: no address")))?;
    let s = dial(addr, kind, t, interrupt).map_err(|e| {
        if matches!(
            e.kind(),
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
        ) {
            Error::Timeout(format!("connecting to server {server}: {e}"))
        } else {
            Error::Eio(format!("connecting to server {server}: {e}"))
        }
    })?;
    let _guard = interrupt.guard(&s)?;
    let mut s = match &id.tls {
        Some(cfg) => {
            let host = server.rsplit_once(':').map_or(server, |(h, _)| h);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            Stream::connect(s, cfg.clone(), host, &format!("server {server}"))
                .map_err(|e| net_error(e, server, t.rpc_timeout))?
        }
        None => Stream::plain(s),
    };
    let binding = s.channel_binding()?;
    let (mut hs, hello) = crate::proto::handshake::ClientHandshake::start(
        &id.user,
        id.client_id,
        id.epoch,
        kind,
        id.secret,
        auth::random_bytes::<32>(),
        binding,
    );
    let mut out = hello;
    // Bounded: the machine ends after at most two received messages.
    loop {
        send(&mut s, 0, &out).map_err(|e| net_error(e, server, t.rpc_timeout))?;
        let reply = recv(&mut s, server, t.rpc_timeout)?;
        match hs.receive(reply).map_err(|f| f.into_error(server))? {
            crate::proto::handshake::ClientStep::Send(m) => out = m,
            crate::proto::handshake::ClientStep::Welcome {
                root,
                break_timeout,
                ..
            } => {
                return Ok((
                    s,
                    Welcomed {
                        root,
                        break_timeout,
                    },
                ))
            }
        }
    }
}

// ---------------------------------------------------------------------------
// A session: one authenticated control connection and its bulk connections.

struct Control {
    server: String,
    /// A clone used only to shut the socket down, so killing the connection
    /// never waits for a writer stuck on a full socket.
    sock: TcpStream,
    /// Requests, pings and acks, in order (see `FrameSender`).
    out: FrameSender,
    pending: Mutex<HashMap<u64, Arc<Slot>>>,
    dead: Mutex<Option<String>>,
    last_heard: Mutex<Instant>,
    /// When each request still unanswered was written (calls and pings).
    asked: Mutex<HashMap<u64, Instant>>,
    /// When the latest request whose reply has been read was written: the
    /// server answered it at some moment after this, so its callbacks stood
    /// then. Blind trust counts from here, not from the reply's arrival: a
    /// reply held up on its way (a server stopped between taking a request
    /// and answering it, a deposed group leader resumed) vouches only for
    /// that earlier moment, and the breaks that followed may never come on
    /// this connection (they go to the new leader's sessions).
    vouched: Mutex<Instant>,
    /// Wakes the prober at once when the connection dies (reset, EOF), so a
    /// refused reconnect can declare the server down without waiting a tick.
    lost: Sender<()>,
}

impl Control {
    /// Declare the connection dead: fail every pending call at once, unblock
    /// the reader, and tell the prober (which decides whether the server is
    /// down: events are its job, so they are transition-accurate).
    fn kill(&self, reason: &str) {
        if self.close(reason) {
            let _ = self.lost.try_send(());
        }
    }

    /// As `kill`, without reporting the server down (we are the ones
    /// leaving). Returns whether this call closed the connection.
    fn close(&self, reason: &str) -> bool {
        {
            let mut d = self.dead.lock();
            if d.is_some() {
                return false;
            }
            *d = Some(reason.to_string());
        }
        let _ = self.sock.shutdown(Shutdown::Both);
        let waiters: Vec<_> = self.pending.lock().drain().collect();
        for (_, slot) in waiters {
            slot.put(Err(Error::Eio(format!("server {}: {reason}", self.server))));
        }
        true
    }

    /// Note when request `id` is written (just before: the server cannot
    /// answer it earlier). Bounded: requests never answered (pings to a
    /// server that went silent) are forgotten past a few thousand, which
    /// only costs trust, never grants it.
    fn note_asked(&self, id: u64) {
        let mut a = self.asked.lock();
        if a.len() >= 4096 {
            a.clear();
        }
        a.insert(id, Instant::now());
    }

    fn dead_error(&self) -> Option<Error> {
        self.dead
            .lock()
            .as_ref()
            .map(|r| Error::Eio(format!("server {}: {r}", self.server)))
    }
}

/// Where a request's reply is left for its caller: left once (by the
/// reader, or a kill with the connection's error); an interrupt nudges.
type Slot = Mailbox<Result<Msg>>;

/// A request written on the control connection, its reply not yet read.
/// Dropping it forgets the request (a late reply is then dropped).
pub(crate) struct Sent<'a> {
    session: &'a Session,
    id: u64,
    slot: Arc<Slot>,
    timeout: Duration,
    deadline: Instant,
}

impl Drop for Sent<'_> {
    fn drop(&mut self) {
        self.session.ctl.pending.lock().remove(&self.id);
        self.session.ctl.asked.lock().remove(&self.id);
    }
}

impl Sent<'_> {
    /// The reply (a server `Error` comes back as the message), or the
    /// timeout, the connection's death or an interrupt, whichever is first.
    pub fn wait(self, interrupt: &Interrupt) -> Result<Msg> {
        let server = &self.session.server;
        let slot = Arc::clone(&self.slot);
        let _wake = interrupt.on_interrupt(Box::new(move || slot.nudge()))?;
        // Bounded: each turn ends by the deadline, or by an interrupt or
        // release (a release that is not ours wakes us once per release).
        loop {
            match self.slot.wait_until(self.deadline) {
                Woken::Value(r) => return r,
                Woken::Nudged => interrupt.check()?,
                Woken::TimedOut => {
                    return Err(Error::Timeout(format!(
                        "no reply from server {server} within {} ms",
                        self.timeout.as_millis()
                    )))
                }
            }
        }
    }
}

pub(crate) struct Session {
    pub root: Fid,
    pub server: String,
    /// How long after the writing of the last request the server answered
    /// its callbacks may be trusted blind. The server ends a session whose client leaves
    /// a break unacknowledged for its break timeout; a client that was
    /// stopped (or starved of CPU) that long cannot tell from its own state
    /// whether that happened, so past this window it makes a round trip
    /// first (`sync`).
    trust_window: Duration,
    ctl: Arc<Control>,
    next_id: AtomicU64,
    ident: Arc<Identity>,
    timing: Timing,
    bulk_pool: Mutex<Vec<Stream>>,
    /// Clones of bulk sockets in use, so an interrupt can shut them down.
    bulk_active: Mutex<HashMap<u64, TcpStream>>,
    /// Bulk connections taken (in use or being opened): at most
    /// `timing.bulk_max`, so N concurrent opens never become N server
    /// connections (and N server threads).
    bulk_taken: Mutex<usize>,
    bulk_free: Condvar,
}

fn reader_loop(
    ctl: Arc<Control>,
    mut stream: Stream,
    callbacks: Arc<Callbacks>,
    counters: Arc<Counters>,
) {
    let mut breaker: Option<Sender<BreakJob>> = None;
    loop {
        let frame = match read_frame(&mut stream) {
            Ok(Some(f)) => f,
            Ok(None) => return ctl.kill("connection closed by server"),
            Err(e) => return ctl.kill(&format!("connection lost: {e}")),
        };
        *ctl.last_heard.lock() = Instant::now();
        match Msg::decode(&frame) {
            Ok(Msg::CallbackBreak { fids }) => {
                // The callbacks stop holding before any later reply is
                // handed over (a fetch racing with the break loses).
                let tell = callbacks.server_broke(&fids);
                // A volume callback's pseudo-fid (vnode 0) is no object:
                // not counted or reported as one.
                let fids: Vec<Fid> = fids.into_iter().filter(|f| f.vnode != 0).collect();
                Counters::add(&counters.breaks_received, fids.len() as u64);
                let job = BreakJob {
                    tell,
                    ack: Msg::BreakAck.encode_frame(frame.id),
                    fids,
                };
                // With a subscriber (the mount), it runs and the break is
                // acknowledged on a thread of their own, in arrival order:
                // the subscriber may wait (bounded) for the kernel, which
                // may wait for a request whose reply only this reader
                // delivers. Without one, the ack goes at once.
                if job.tell.is_some() && breaker.is_none() {
                    breaker = spawn_breaker(&ctl, &callbacks);
                }
                let job = match &breaker {
                    // (The breaker only ends after this reader.)
                    Some(tx) => match tx.send(job) {
                        Ok(()) => continue,
                        Err(back) => back.0,
                    },
                    None => job,
                };
                if !acknowledge(&ctl, &callbacks, job) {
                    return;
                }
            }
            Ok(m) => {
                // A reply (a break's id is the server's own, never one of
                // ours): before it is handed over, so a caller granting
                // callbacks with it finds the session vouched for from the
                // request's writing.
                if let Some(at) = ctl.asked.lock().remove(&frame.id) {
                    let mut v = ctl.vouched.lock();
                    *v = (*v).max(at);
                }
                // Replies nobody waits for (heartbeat Pongs, timed-out calls)
                // are dropped. The table's lock is released before the send:
                // the woken caller's first act is to take it (`Sent::drop`),
                // and finding it held would cost both threads a futex round.
                let waiter = ctl.pending.lock().remove(&frame.id);
                if let Some(slot) = waiter {
                    slot.put(Ok(m));
                }
            }
            Err(e) => {
                let _ = ctl.out.send(Msg::error(&e).encode_frame(frame.id));
                return ctl.kill(&format!("protocol error: {e}"));
            }
        }
    }
}

/// A server's break, once the callback table has dropped what it named:
/// what the invalidation subscriber must hear first, and the ack.
struct BreakJob {
    tell: Option<Invalidation>,
    ack: Vec<u8>,
    fids: Vec<Fid>,
}

/// The thread that tells the subscriber of breaks and acknowledges them,
/// in order; it ends when the reader drops its queue. `None` if it could
/// not be started (the reader then does the job itself).
fn spawn_breaker(ctl: &Arc<Control>, callbacks: &Arc<Callbacks>) -> Option<Sender<BreakJob>> {
    let (tx, rx) = crossbeam_channel::unbounded::<BreakJob>();
    let (ctl, callbacks) = (ctl.clone(), callbacks.clone());
    std::thread::Builder::new()
        .name(format!("coda-brk-{}", ctl.server))
        .spawn(move || {
            for job in rx {
                if !acknowledge(&ctl, &callbacks, job) {
                    return;
                }
            }
        })
        .ok()
        .map(|_| tx)
}

/// Tell the subscriber, then acknowledge the break and report it. Returns
/// false when the connection is gone.
fn acknowledge(ctl: &Control, callbacks: &Callbacks, job: BreakJob) -> bool {
    if let Some(inv) = &job.tell {
        callbacks.tell(inv);
    }
    if let Err(e) = ctl.out.send(job.ack) {
        ctl.kill(&format!("sending BreakAck: {e}"));
        return false;
    }
    for fid in job.fids {
        callbacks.events.emit(Event::CallbackBreak { fid });
    }
    true
}

/// A bulk connection taken from the pool; goes back only after a transfer
/// that left the stream at a frame boundary.
pub(crate) struct Bulk<'a> {
    session: &'a Session,
    stream: Option<Stream>,
    key: u64,
    _interruptible: SocketGuard<'a>,
}

impl Drop for Bulk<'_> {
    fn drop(&mut self) {
        self.session.bulk_active.lock().remove(&self.key);
        self.session.give_back_slot();
    }
}

impl Bulk<'_> {
    fn stream(&mut self) -> &mut Stream {
        self.stream
            .as_mut()
            .expect("bulk stream present until released")
    }

    fn release(mut self) {
        if let Some(s) = self.stream.take() {
            self.session.bulk_pool.lock().push(s);
        }
    }
}

impl Session {
    // Plain data handed down from `Servers`; a struct for it would only be
    // unpacked here again.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn connect(
        server: &str,
        ident: Arc<Identity>,
        timing: Timing,
        callbacks: Arc<Callbacks>,
        counters: Arc<Counters>,
        interrupt: &Interrupt,
        connect_timeout: Duration,
        lost: Sender<()>,
    ) -> Result<Arc<Session>> {
        let hs_timing = Timing {
            rpc_timeout: connect_timeout,
            ..timing
        };
        // The Welcome vouches for the session from before the Hello.
        let asked_at = Instant::now();
        let (s, welcomed) = handshake(server, ConnKind::Control, &ident, &hs_timing, interrupt)?;
        // The reader blocks without a deadline; the heartbeat judges silence.
        s.set_read_timeout(None)
            .map_err(|e| Error::io("control socket", e))?;
        let reader = s.try_clone().map_err(|e| Error::io("control socket", e))?;
        let sock = s
            .tcp()
            .try_clone()
            .map_err(|e| Error::io("control socket", e))?;
        let ctl = Arc::new(Control {
            server: server.to_string(),
            sock,
            out: FrameSender::new(s),
            pending: Mutex::new(HashMap::new()),
            dead: Mutex::new(None),
            last_heard: Mutex::new(Instant::now()),
            asked: Mutex::new(HashMap::new()),
            vouched: Mutex::new(asked_at),
            lost,
        });
        let c2 = ctl.clone();
        std::thread::Builder::new()
            .name(format!("coda-ctl-{server}"))
            .spawn(move || reader_loop(c2, reader, callbacks, counters))
            .map_err(|e| Error::io("spawning the connection reader", e))?;
        Ok(Arc::new(Session {
            root: welcomed.root,
            // Half the server's break timeout: the other half is margin for
            // scheduling delays and clocks that run at different rates.
            trust_window: (welcomed.break_timeout / 2).min(timing.dead_after),
            server: server.to_string(),
            ctl,
            next_id: AtomicU64::new(1),
            ident,
            timing,
            bulk_pool: Mutex::new(Vec::new()),
            bulk_active: Mutex::new(HashMap::new()),
            bulk_taken: Mutex::new(0),
            bulk_free: Condvar::new(),
        }))
    }

    pub fn is_dead(&self) -> bool {
        self.ctl.dead.lock().is_some()
    }

    /// The server address this session was opened to.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The server is dead: fail pending calls and stop bulk transfers too
    /// (a fetch from a hung server would otherwise wait out its timeout).
    pub fn kill(&self, reason: &str) {
        self.ctl.kill(reason);
        for s in self.bulk_active.lock().values() {
            let _ = s.shutdown(Shutdown::Both);
        }
        // Callers waiting for a bulk connection fail now, not at their deadline.
        self.bulk_free.notify_all();
    }

    /// Close without reporting the server down.
    pub fn close(&self, reason: &str) {
        self.ctl.close(reason);
        for (_, s) in self.bulk_active.lock().drain() {
            let _ = s.shutdown(Shutdown::Both);
        }
        self.bulk_pool.lock().clear();
        self.bulk_free.notify_all();
    }

    /// One request on the control connection; waits for its reply, the
    /// timeout, the connection's death or an interrupt, whichever is first.
    pub fn call(&self, msg: &Msg, interrupt: &Interrupt) -> Result<Msg> {
        self.call_within(msg, interrupt, self.timing.rpc_timeout)
    }

    /// As `call`, but a server `Error` reply comes back as the message, so
    /// the caller can read its record index (reintegration does).
    pub fn call_raw(&self, msg: &Msg, interrupt: &Interrupt) -> Result<Msg> {
        self.call_raw_within(msg, interrupt, self.timing.rpc_timeout)
    }

    /// As `call`, with its own bound on the wait (the prober's pings).
    pub fn call_within(&self, msg: &Msg, interrupt: &Interrupt, timeout: Duration) -> Result<Msg> {
        match self.call_raw_within(msg, interrupt, timeout)? {
            m @ Msg::Error { .. } => Err(reply_error(m, &self.server, "")),
            m => Ok(m),
        }
    }

    fn call_raw_within(&self, msg: &Msg, interrupt: &Interrupt, timeout: Duration) -> Result<Msg> {
        self.send_raw_within(msg, interrupt, timeout)?
            .wait(interrupt)
    }

    /// Send a request without waiting for its reply: the reintegrator keeps
    /// several batches in flight. Requests are written in the order of the
    /// calls (`FrameSender`); `Sent::wait` then reads the reply as
    /// `call_raw` would, within the RPC timeout counted from now.
    pub fn send_raw(&self, msg: &Msg, interrupt: &Interrupt) -> Result<Sent<'_>> {
        self.send_raw_within(msg, interrupt, self.timing.rpc_timeout)
    }

    fn send_raw_within(
        &self,
        msg: &Msg,
        interrupt: &Interrupt,
        timeout: Duration,
    ) -> Result<Sent<'_>> {
        interrupt.check()?;
        if let Some(e) = self.ctl.dead_error() {
            return Err(e);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(Slot::default());
        self.ctl.pending.lock().insert(id, Arc::clone(&slot));
        // From here on, dropping `sent` forgets the request.
        let sent = Sent {
            session: self,
            id,
            slot,
            timeout,
            deadline: Instant::now() + timeout,
        };
        // A kill that drained the table just before our insert would leave
        // us waiting for the timeout: look again.
        if let Some(e) = self.ctl.dead_error() {
            return Err(e);
        }
        self.ctl.note_asked(id);
        let written = self.ctl.out.send(msg.encode_frame(id));
        if let Err(e) = written {
            let e = net_error(e, &self.server, self.timing.rpc_timeout);
            self.ctl.kill(&e.to_string());
            return Err(e);
        }
        Ok(sent)
    }

    /// Send a Ping without waiting: the reader notes any frame as life.
    pub fn ping(&self) {
        if self.is_dead() {
            return;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let m = Msg::Ping;
        self.ctl.note_asked(id);
        if let Err(e) = self.ctl.out.send(m.encode_frame(id)) {
            self.ctl.kill(&format!("sending Ping: {e}"));
        }
    }

    pub fn silent_for(&self) -> Duration {
        self.ctl.last_heard.lock().elapsed()
    }

    /// Whether the control socket holds bytes (or its end) that the reader
    /// has not taken yet. Then the silence is ours, not the server's: this
    /// process was stopped or starved and its reader has not caught up.
    pub fn has_unread(&self) -> bool {
        use std::os::fd::AsRawFd;
        let mut p = libc::pollfd {
            fd: self.ctl.sock.as_raw_fd(),
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call; no wait.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n > 0 && p.revents != 0
    }

    /// Whether the server answered a request written recently enough that
    /// it cannot have dropped our callbacks without our having read why
    /// (counted from the request's writing: see `Control::vouched`).
    pub fn heard_recently(&self) -> bool {
        self.ctl.vouched.lock().elapsed() < self.trust_window
    }

    /// A Ping answered: frames are read in order, so every callback break
    /// the server sent before its Pong has been applied when this returns
    /// Ok, and a server that ended the session has closed the connection,
    /// which this reports as an error (and the session as dead).
    pub fn sync(&self, interrupt: &Interrupt) -> Result<()> {
        let timeout = self.timing.rpc_timeout.min(self.timing.dead_after);
        match self.call_within(&Msg::Ping, interrupt, timeout)? {
            Msg::Pong => Ok(()),
            other => Err(Error::Protocol(format!(
                "server {} answered Ping with message kind {:#04x}",
                self.server,
                other.kind()
            ))),
        }
    }

    /// Wait (bounded by the RPC timeout; a failover or the session's death
    /// ends the wait at once) until fewer than `bulk_max` bulk connections
    /// are taken, and take one.
    fn take_slot(&self, interrupt: &Interrupt) -> Result<()> {
        let deadline = Instant::now() + self.timing.rpc_timeout;
        let mut taken = self.bulk_taken.lock();
        loop {
            interrupt.check()?;
            if let Some(e) = self.ctl.dead_error() {
                return Err(e);
            }
            if *taken < self.timing.bulk_max {
                *taken += 1;
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                // Not `Timeout`: the server answers, this client is busy.
                return Err(Error::Again(format!(
                    "all {} bulk connections to server {} stayed busy for {} ms",
                    self.timing.bulk_max,
                    self.server,
                    self.timing.rpc_timeout.as_millis()
                )));
            }
            // Interrupts do not signal the condvar: look again every 5 ms
            // (a failover releases waiters within that).
            let slice = (deadline - now).min(GATE_SLICE);
            self.bulk_free.wait_for(&mut taken, slice);
        }
    }

    fn give_back_slot(&self) {
        let mut taken = self.bulk_taken.lock();
        *taken = taken.saturating_sub(1);
        drop(taken);
        self.bulk_free.notify_one();
    }

    fn bulk<'a>(&'a self, interrupt: &'a Interrupt) -> Result<Bulk<'a>> {
        self.take_slot(interrupt)?;
        let pooled = self.bulk_pool.lock().pop();
        let stream = match pooled {
            Some(s) => s,
            None => match handshake(
                &self.server,
                ConnKind::Bulk,
                &self.ident,
                &self.timing,
                interrupt,
            ) {
                Ok((s, _)) => s,
                Err(e) => {
                    self.give_back_slot();
                    return Err(e);
                }
            },
        };
        let key = self.next_id.fetch_add(1, Ordering::Relaxed);
        if let Ok(c) = stream.tcp().try_clone() {
            self.bulk_active.lock().insert(key, c);
        }
        // Registered for kill (above) and for interrupts (here): either
        // shuts the socket down and unblocks the transfer at once.
        let guard = match interrupt.guard(stream.tcp()) {
            Ok(g) => g,
            Err(e) => {
                self.bulk_active.lock().remove(&key);
                self.give_back_slot();
                return Err(e);
            }
        };
        // From here the Bulk's drop gives the slot back.
        Ok(Bulk {
            session: self,
            stream: Some(stream),
            key,
            _interruptible: guard,
        })
    }

    fn bulk_error(&self, e: Error, interrupt: &Interrupt) -> Error {
        if let Err(i) = interrupt.check() {
            return i;
        }
        net_error(e, &self.server, self.timing.rpc_timeout)
    }

    /// Fetch a whole file (or symlink target) into `dest`, streaming chunk by
    /// chunk; each chunk must arrive within the RPC timeout.
    pub fn fetch(&self, fid: Fid, dest: &mut File, interrupt: &Interrupt) -> Result<(Attr, u64)> {
        let mut b = self.bulk(interrupt)?;
        let server = self.server.clone();
        send(b.stream(), 1, &Msg::Fetch { fid }).map_err(|e| self.bulk_error(e, interrupt))?;
        let (attr, length, extents) = match recv(b.stream(), &server, self.timing.rpc_timeout)
            .map_err(|e| self.bulk_error(e, interrupt))?
        {
            Msg::FetchReply {
                attr,
                length,
                extents,
            } => (attr, length, extents),
            m @ Msg::Error { .. } => {
                let e = reply_error(m, &server, "Fetch");
                b.release();
                return Err(e);
            }
            m => return Err(reply_error(m, &server, "Fetch")),
        };
        // Holes stay holes: the container gets its length, and each
        // extent's bytes are written where they belong.
        let start = dest
            .stream_position()
            .map_err(|e| Error::io("positioning a cache container", e))?;
        dest.set_len(start + length)
            .map_err(|e| Error::io("sizing a cache container", e))?;
        let mut buf = vec![0u8; BULK_CHUNK];
        for &(at, len) in &extents {
            let mut left = len;
            while left > 0 {
                let want = left.min(BULK_CHUNK as u64) as usize;
                let n = match b.stream().read(&mut buf[..want]) {
                    Ok(0) => {
                        return Err(self.bulk_error(
                            Error::Eio(format!(
                                "server {server}: connection ended inside fetched data"
                            )),
                            interrupt,
                        ))
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        return Err(self.bulk_error(Error::io("receiving file data", e), interrupt))
                    }
                };
                dest.write_all_at(&buf[..n], start + at + (len - left))
                    .map_err(|e| Error::io("writing a cache container", e))?;
                left -= n as u64;
            }
        }
        dest.seek(std::io::SeekFrom::Start(start + length))
            .map_err(|e| Error::io("positioning a cache container", e))?;
        b.release();
        Ok((attr, length))
    }

    /// Upload `length` bytes of `src` (from offset 0) as staged upload
    /// `upload_id`, streaming; returns once the server has fsynced it.
    pub fn upload(
        &self,
        upload_id: u64,
        src: &File,
        length: u64,
        interrupt: &Interrupt,
    ) -> Result<()> {
        let mut b = self.bulk(interrupt)?;
        let server = self.server.clone();
        // Holes stay holes: only the container's data extents travel.
        let extents = crate::sparse::data_extents(src, length);
        send(
            b.stream(),
            1,
            &Msg::Upload {
                upload_id,
                length,
                extents: extents.clone(),
            },
        )
        .map_err(|e| self.bulk_error(e, interrupt))?;
        let mut buf = vec![0u8; BULK_CHUNK];
        for (at, len) in extents {
            let (mut off, length) = (at, at + len);
            while off < length {
                let want = (length - off).min(BULK_CHUNK as u64) as usize;
                let n = src
                    .read_at(&mut buf[..want], off)
                    .map_err(|e| Error::io("reading a cache container", e))?;
                if n == 0 {
                    return Err(Error::Eio(format!(
                        "container shrank to {off} bytes while storing {length}"
                    )));
                }
                b.stream()
                    .write_all(&buf[..n])
                    .map_err(|e| self.bulk_error(Error::io("sending file data", e), interrupt))?;
                off += n as u64;
            }
        }
        match recv(b.stream(), &server, self.timing.rpc_timeout)
            .map_err(|e| self.bulk_error(e, interrupt))?
        {
            Msg::Uploaded { upload_id: u } if u == upload_id => {
                b.release();
                Ok(())
            }
            m @ Msg::Error { .. } => Err(reply_error(m, &server, "Upload")),
            m => Err(reply_error(m, &server, "Upload")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::io::FromRawFd;

    /// A listener whose accept queue is full: a further connect stays in
    /// SYN_SENT (its SYNs are dropped), as toward a host that went away.
    fn full_listener() -> (std::net::TcpListener, Vec<TcpStream>) {
        // SAFETY: plain socket calls; the fd is owned by the TcpListener.
        let l = unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0);
            let (a, len) = sockaddr("127.0.0.1:0".parse().unwrap());
            assert_eq!(
                libc::bind(fd, &a as *const _ as *const libc::sockaddr, len),
                0
            );
            assert_eq!(libc::listen(fd, 0), 0);
            std::net::TcpListener::from_raw_fd(fd)
        };
        let addr = l.local_addr().unwrap();
        // Fill the queue (never accepted); stop at the first that hangs.
        let mut held = Vec::new();
        for _ in 0..8 {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                Ok(s) => held.push(s),
                Err(_) => break,
            }
        }
        (l, held)
    }

    #[test]
    fn an_interrupt_ends_a_connect_in_progress_at_once() {
        let (l, _held) = full_listener();
        let addr = l.local_addr().unwrap();
        let i = Interrupt::new();
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::scope(|sc| {
            sc.spawn(|| {
                let r = connect_interruptible(None, addr, Duration::from_secs(60), &i);
                tx.send(r.map(|_| ()).map_err(|e| e.kind())).unwrap();
            });
            // Still connecting (the queue is full): nothing came back.
            assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
            i.trigger("failed over");
            let r = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("the connect ends when the interrupt fires, not after 60 s");
            assert_eq!(r, Err(std::io::ErrorKind::ConnectionAborted));
        });
    }
}
