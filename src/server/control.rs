//! A control connection: its reader thread answers Ping and takes BreakAck
//! inline (liveness never waits behind work), hands every other request to
//! the worker pool, and the connection's [`Outbox`] puts frames on the wire
//! in order: a reply whose connection has nothing queued or being written
//! is sent by the thread that made it, without waiting (no hand-off); the
//! rest, and whatever a full socket did not take, goes to the connection's
//! writer thread, which alone waits for a slow peer. No worker ever blocks
//! on a socket, and no mutex is held across a socket write.
//!
//! Flow bounds: a connection has at most [`MAX_OUTSTANDING`] requests
//! between read and reply written, and at most about [`MAX_QUEUED`] bytes
//! of requests, promised replies and queued replies. At either bound the
//! reader stops reading until the writer drains, so a client that never
//! reads its replies is held back by TCP itself and costs the server a
//! bounded amount of memory; the writer's send timeout still cuts a peer
//! that takes nothing at all.

use std::io::{BufReader, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use std::collections::VecDeque;
use std::time::Instant;

use super::handshake::Identity;
use super::log;
use super::sessions::{ClientCtx, ControlLink};
use super::wire::{
    close_after_error, error_reply, error_reply_at, frame_for, send_now, tracing, Out, Stamp,
};
use super::Shared;
use crate::proto::codec::ATTR_LEN;
use crate::proto::{read_frame, Msg, MAX_DIR_PAGE, MAX_FRAME, MAX_NAME};
use crate::tls::Stream;
use crate::{Error, Result};

/// Most fids one GetAttrs may name: every slot of the reply must fit in one
/// frame (MAX_FIDS slots would not).
pub const MAX_ATTRS_REPLY: usize = (MAX_FRAME - 9 - 4) / (1 + ATTR_LEN);

/// Most requests of one connection read and not yet answered on the wire.
pub const MAX_OUTSTANDING: usize = 64;
/// Bytes of requests in flight plus replies promised or queued on one
/// connection past which the reader stops reading (it may overshoot by one
/// request and one reply, each at most MAX_FRAME).
pub const MAX_QUEUED: usize = 4 << 20;

#[derive(Default)]
struct FlowState {
    outstanding: usize,
    bytes: usize,
    /// The writer stopped (and why): nothing will drain any more.
    closed: Option<&'static str>,
    /// The reader is held at a bound (not reading).
    paused: bool,
    /// Callback breaks written and not yet acknowledged.
    unacked: usize,
    /// Callback breaks queued to the writer and not yet written.
    queued_breaks: usize,
    /// The writer waits for room in a full socket (the peer takes no bytes).
    blocked: bool,
}

/// One connection's flow bounds, shared by its reader, its writer and the
/// workers answering it.
#[derive(Default)]
struct Flow {
    st: Mutex<FlowState>,
    cv: Condvar,
}

impl Flow {
    /// Wait until the connection is under both bounds; false once the writer
    /// is gone or the server stops.
    fn wait_room(&self, shared: &Shared) -> std::result::Result<(), &'static str> {
        let mut st = self.st.lock();
        while st.closed.is_none() && (st.outstanding >= MAX_OUTSTANDING || st.bytes >= MAX_QUEUED) {
            if shared.stopping.load(std::sync::atomic::Ordering::SeqCst) {
                st.paused = false;
                return Err("server stopping");
            }
            if st.unacked > 0 || st.queued_breaks > 0 {
                // The ack is behind this backlog, and another client's
                // write waits for it: end the session instead (as for an
                // unreachable holder).
                st.paused = false;
                return Err("a callback break waits behind this connection's backlog");
            }
            st.paused = true;
            // Bounded wait: shutdown is noticed even if nobody notifies.
            self.cv.wait_for(&mut st, Duration::from_millis(500));
        }
        st.paused = false;
        match st.closed {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }

    /// Before queueing a callback break: false if the connection is jammed
    /// (the reader held at a bound or the writer blocked on a full socket),
    /// so the ack could not come in time; else counts it queued.
    fn queue_break(&self) -> bool {
        let mut st = self.st.lock();
        if st.paused || st.blocked {
            return false;
        }
        st.queued_breaks += 1;
        true
    }

    /// The writer found the socket full: false (cut the connection) if a
    /// break is queued behind or written and unacknowledged, since another
    /// client's write waits for its ack; else marks the writer blocked.
    fn block(&self) -> bool {
        let mut st = self.st.lock();
        if st.queued_breaks > 0 || st.unacked > 0 {
            return false;
        }
        st.blocked = true;
        true
    }

    fn unblock(&self) {
        self.st.lock().blocked = false;
    }

    /// Before writing a callback break: false if the reader is held at a
    /// bound (the ack could not be read in time); else counts it unacked.
    fn break_sent(&self) -> bool {
        let mut st = self.st.lock();
        st.queued_breaks = st.queued_breaks.saturating_sub(1);
        if st.paused {
            return false;
        }
        st.unacked += 1;
        true
    }

    fn break_acked(&self) {
        let mut st = self.st.lock();
        st.unacked = st.unacked.saturating_sub(1);
    }

    /// Nothing of this connection is between read and on the wire.
    fn idle(&self) -> bool {
        self.st.lock().outstanding == 0
    }

    /// A request of `reserve` bytes (its size plus the most its reply can
    /// take) was read.
    fn start(&self, reserve: usize) {
        let mut st = self.st.lock();
        st.outstanding += 1;
        st.bytes += reserve;
    }

    /// Its reply, `actual` bytes, replaces the reservation in the queue.
    fn replied(&self, reserve: usize, actual: usize) {
        let mut st = self.st.lock();
        st.bytes = st.bytes.saturating_sub(reserve) + actual;
    }

    /// The writer put a reply of `len` bytes on the wire.
    fn sent(&self, len: usize) {
        let mut st = self.st.lock();
        st.outstanding = st.outstanding.saturating_sub(1);
        st.bytes = st.bytes.saturating_sub(len);
        drop(st);
        self.cv.notify_all();
    }

    fn close(&self, why: &'static str) {
        self.st.lock().closed = Some(why);
        self.cv.notify_all();
    }
}

/// Most fids of a `GetAttrs` the connection's reader answers itself.
pub const QUICK_FIDS: usize = 16;

/// A request the connection's reader may answer itself, when nothing else
/// of its session is in flight (`Flow::idle`) and the server is not in a
/// replicated group (confirming the lease may wait): a short read of the
/// metadata store that neither writes, nor syncs, nor waits for anyone's
/// acks, so pings and break acks behind it wait microseconds. Everything
/// else goes to the workers.
fn quick(msg: &Msg) -> bool {
    match msg {
        Msg::GetAttrs { fids } => fids.len() <= QUICK_FIDS,
        Msg::ValidateVolume { .. } | Msg::GetXattrs { .. } | Msg::GetAcl { .. } | Msg::WhoAmI => {
            true
        }
        _ => false,
    }
}

/// The most a reply to `msg` can take on the wire, so the bytes bound
/// holds before the reply exists.
fn reply_bound(msg: &Msg) -> usize {
    let est = match msg {
        Msg::GetAttrs { fids } => 16 + fids.len() * (1 + ATTR_LEN),
        Msg::ReadDir { .. } => 64 + ATTR_LEN + MAX_DIR_PAGE * (MAX_NAME + 32),
        // Names and values, plus at most 6 bytes of lengths per byte of them.
        Msg::GetXattrs { .. } => 64 + 7 * crate::proto::MAX_XATTR_BYTES,
        Msg::Reintegrate { records } | Msg::ReintegrateAfter { records, .. } => {
            64 + records.len() * ATTR_LEN
        }
        _ => 64,
    };
    // An error reply (message up to MAX_MESSAGE) may be the answer instead.
    est.clamp(crate::proto::MAX_MESSAGE + 64, MAX_FRAME + 4)
}

/// Set to `1` in the server's environment to send every reply through the
/// writer thread, as before direct sends: only for measuring what they gain.
pub const NO_DIRECT_ENV: &str = "CODA_SERVER_NO_DIRECT_REPLY";

fn direct_disabled() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var(NO_DIRECT_ENV).is_ok_and(|v| v == "1"))
}

#[derive(Default)]
struct OutState {
    /// Frames waiting for the writer thread, in wire order.
    queue: VecDeque<Out>,
    /// Some thread holds the sending turn: it alone seals (TLS record
    /// numbers follow the sealing order) and writes, so frames go out
    /// whole and in order. A turn, not a lock held across the write: a
    /// worker holding it only makes one non-blocking send.
    writing: bool,
    /// The writer thread stopped: nothing more is sent.
    ended: bool,
    /// Sealed bytes of a direct send, kept for the next one.
    spare: Vec<u8>,
}

/// A control connection's outgoing frames (see the module comment).
pub(crate) struct Outbox {
    st: Mutex<OutState>,
    cv: Condvar,
    /// The sending side, for direct sends (the writer has its own clone).
    sock: Stream,
}

impl Outbox {
    fn new(sock: Stream) -> Outbox {
        Outbox {
            st: Mutex::new(OutState::default()),
            cv: Condvar::new(),
            sock,
        }
    }

    /// Queue a frame for the writer thread (dropped once it has stopped).
    pub(crate) fn send(&self, out: Out) {
        let mut st = self.st.lock();
        if st.ended {
            return;
        }
        st.queue.push_back(out);
        drop(st);
        self.cv.notify_all();
    }

    /// Send a reply from this thread when nothing is queued or being sent
    /// and the socket takes it at once; else (or for what a full socket
    /// left) queue it for the writer thread, in order.
    fn reply(&self, bytes: Vec<u8>, flow: &Flow, stamp: Option<Stamp>) {
        let mut st = self.st.lock();
        if st.ended {
            return;
        }
        if st.writing || !st.queue.is_empty() || direct_disabled() {
            st.queue.push_back(Out::Reply(bytes, stamp));
            drop(st);
            self.cv.notify_all();
            return;
        }
        st.writing = true;
        let mut sealed = std::mem::take(&mut st.spare);
        drop(st);
        sealed.clear();
        let (all, sent): (&[u8], _) = match self.sock.seal(&bytes, &mut sealed) {
            Ok(true) => (&sealed, send_now(self.sock.tcp(), &sealed)),
            Ok(false) => (&bytes, send_now(self.sock.tcp(), &bytes)),
            Err(_) => {
                // Nothing sealed: the writer tries it in its place (and
                // ends the connection when sealing fails again).
                self.requeue_front(Out::Reply(bytes, stamp));
                return;
            }
        };
        let rest = match sent {
            Ok(n) if n == all.len() => None,
            Ok(n) => Some(all[n..].to_vec()),
            // A dead socket: the writer's send of it fails too and cuts.
            Err(_) => Some(all.to_vec()),
        };
        match rest {
            None => {
                flow.sent(bytes.len());
                trace_reply(stamp, true);
                let mut st = self.st.lock();
                st.writing = false;
                st.spare = sealed;
                let wake = !st.queue.is_empty();
                drop(st);
                if wake {
                    self.cv.notify_all();
                }
            }
            // Sealed bytes go out exactly once (a TLS record cannot be
            // sealed again): the writer sends the rest as it is, first.
            Some(rest) => self.requeue_front(Out::Rest(rest, bytes.len(), stamp)),
        }
    }

    /// Give the sending turn back with `out` first in line for the writer.
    fn requeue_front(&self, out: Out) {
        let mut st = self.st.lock();
        st.writing = false;
        if !st.ended {
            st.queue.push_front(out);
        }
        drop(st);
        self.cv.notify_all();
    }

    /// The writer thread's next frame, taking the sending turn; waits
    /// while another thread holds the turn or nothing is queued.
    fn next(&self) -> Out {
        let mut st = self.st.lock();
        // Bounded: the condvar is signalled by every queueing and every
        // end of a direct send; Close ends the writer.
        loop {
            if !st.writing {
                if let Some(out) = st.queue.pop_front() {
                    st.writing = true;
                    return out;
                }
            }
            self.cv.wait(&mut st);
        }
    }

    /// The writer thread has put its frame on the wire (or failed).
    fn done(&self) {
        let mut st = self.st.lock();
        st.writing = false;
    }

    /// The writer thread stopped: later frames are dropped.
    fn end(&self) {
        let mut st = self.st.lock();
        st.ended = true;
        st.queue.clear();
    }
}

/// With `CODA_SERVER_TRACE` set: one line per reply with the time from
/// reading its request to a worker taking it up, the work, and from the
/// reply's encoding to its being on the wire, in µs; `direct`: sent by the
/// worker itself.
fn trace_reply(stamp: Option<Stamp>, direct: bool) {
    let Some(s) = stamp else {
        return;
    };
    let us = |a: Instant, b: Instant| b.saturating_duration_since(a).as_micros();
    let now = Instant::now();
    eprintln!(
        "TRACE reply kind={:#04x} queued={} work={} send={} total={} direct={}",
        s.kind,
        us(s.read, s.started),
        us(s.started, s.answered),
        us(s.answered, now),
        us(s.read, now),
        direct as u8
    );
}

pub fn serve(shared: Arc<Shared>, mut reader: BufReader<Stream>, ident: Identity, welcome: Msg) {
    // A silent connection is reaped (see ServerConfig::idle_timeout).
    let _ = reader.get_ref().set_read_timeout(Some(shared.idle_timeout));
    let mut stream = reader.get_ref().try_clone();
    let (sock_w, sock_o, sock_s) = match (
        reader.get_ref().try_clone(),
        reader.get_ref().try_clone(),
        reader.get_ref().tcp().try_clone(),
    ) {
        (Ok(a), Ok(o), Ok(b)) => (a, o, b),
        _ => {
            log::warn(format_args!("cannot clone a socket; dropping connection"));
            return;
        }
    };
    let out = Arc::new(Outbox::new(sock_o));
    let flow = Arc::new(Flow::default());
    let (flow_w, out_w) = (Arc::clone(&flow), Arc::clone(&out));
    let writer = match std::thread::Builder::new()
        .name("coda-ctl-writer".into())
        .stack_size(super::SMALL_STACK)
        .spawn(move || writer_loop(sock_w, &out_w, &flow_w))
    {
        Ok(h) => h,
        Err(e) => {
            log::warn(format_args!("cannot spawn a writer thread: {e}"));
            return;
        }
    };
    let ctx = shared.registry.open_control(
        ident.client_id,
        ident.epoch,
        ControlLink {
            out: Arc::clone(&out),
            sock: sock_s,
            break_gate: {
                let flow = Arc::clone(&flow);
                Arc::new(move || flow.queue_break())
            },
        },
    );
    // Welcome goes out only now that the session exists (see handshake).
    out.send(Out::Frame(frame_for(0, &welcome)));
    log::info(format_args!(
        "{} (user {}) connected: control from {}",
        ctx.name(),
        ident.user,
        reader
            .get_ref()
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    ));

    let user: Arc<str> = Arc::from(ident.user.as_str());
    let (why, protocol_error) = read_loop(&shared, &mut reader, &ctx, &user, &out, &flow);
    if protocol_error {
        log::info(format_args!("{}: protocol error: {why}", ctx.name()));
    }
    // Callbacks and staged uploads go at once; the socket closes below,
    // after the writer flushed any last error frame.
    shared.registry.leave(&ctx.id, ctx.gen, &why);
    out.send(Out::Close);
    let _ = writer.join();
    if let Ok(s) = stream.as_mut() {
        if protocol_error {
            close_after_error(s);
        } else {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Returns why the connection ended and whether it was the peer's fault.
fn read_loop(
    shared: &Arc<Shared>,
    reader: &mut BufReader<Stream>,
    ctx: &ClientCtx,
    user: &Arc<str>,
    out: &Arc<Outbox>,
    flow: &Arc<Flow>,
) -> (String, bool) {
    let mut lowered = false;
    loop {
        // Over a bound, stop reading: the peer's sends block in TCP.
        if let Err(why) = flow.wait_room(shared) {
            return (why.into(), false);
        }
        let frame = match read_frame(reader) {
            Ok(Some(f)) => f,
            Ok(None) => return ("connection closed".into(), false),
            Err(Error::Io { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                let ms = shared.idle_timeout.as_millis();
                return (format!("silent for {ms} ms"), false);
            }
            Err(Error::Io { source, .. }) => return (format!("connection lost: {source}"), false),
            Err(e) => {
                out.send(Out::Frame(frame_for(0, &error_reply(&e))));
                return (e.to_string(), true);
            }
        };
        if frame.body.len() > super::workers::BULK_FRAME && !lowered {
            // Bulk frames: this reader's TLS decryption and decoding give
            // way to other sessions' under contention, from now on (a
            // thread may not be able to raise itself again).
            lowered = super::workers::set_thread_nice(super::workers::LOW_NICE);
        }
        let id = frame.id;
        let msg = match Msg::decode(&frame) {
            Ok(m) => m,
            Err(e) => {
                out.send(Out::Frame(frame_for(id, &error_reply(&e))));
                return (e.to_string(), true);
            }
        };
        match msg {
            Msg::Ping => {
                // A Pong renews the client's trust in its callbacks: only
                // a leader whose lease holds may send one.
                if let Some(r) = &shared.repl {
                    if let Err(e) = r.confirm_leader(super::replication::LEASE_PATIENCE) {
                        out.send(Out::Frame(frame_for(id, &error_reply(&e))));
                        return (format!("replication: {e}"), false);
                    }
                }
                let pong = frame_for(id, &Msg::Pong);
                flow.start(pong.len());
                out.reply(pong, flow, None);
            }
            Msg::BreakAck => {
                flow.break_acked();
                shared.registry.break_ack(ctx, id)
            }
            m @ (Msg::GetAttrs { .. }
            | Msg::ReadDir { .. }
            | Msg::AllocFids { .. }
            | Msg::ValidateVolume { .. }
            | Msg::GetXattrs { .. }
            | Msg::Reintegrate { .. }
            | Msg::ReintegrateAfter { .. }
            | Msg::GetAcl { .. }
            | Msg::SetAcl { .. }
            | Msg::WhoAmI
            | Msg::UserIds { .. }
            | Msg::GroupStatus) => {
                // A quick read of a session with nothing else in flight is
                // answered here: no worker hop (see `quick`).
                let inline = shared.repl.is_none() && quick(&m) && flow.idle();
                let reserve = frame.body.len() + reply_bound(&m);
                flow.start(reserve);
                let read = tracing().then(Instant::now);
                let (shared2, ctx2, out2, flow2) =
                    (Arc::clone(shared), *ctx, Arc::clone(out), Arc::clone(flow));
                let user2 = Arc::clone(user);
                // Keyed by session generation: requests are served round
                // robin across sessions (workers.rs).
                let heavy = matches!(m, Msg::Reintegrate { .. } | Msg::ReintegrateAfter { .. });
                let kind = m.kind();
                let job = move || {
                    let started = read.map(|_| Instant::now());
                    let reply = match leader_lease(&shared2, &ctx2) {
                        Ok(()) => handle(&shared2, &ctx2, &user2, m),
                        Err(e) => Err(e),
                    }
                    // A read shows only what is durable (`wal::Unsynced`);
                    // a batch's answer comes after its own group's sync.
                    .and_then(|r| match heavy {
                        true => Ok(r),
                        false => shared2.store.durable_for_reply().map(|()| r),
                    })
                    .unwrap_or_else(|e| error_reply(&e));
                    let bytes = frame_for(id, &reply);
                    flow2.replied(reserve, bytes.len());
                    let stamp = read.zip(started).map(|(read, started)| Stamp {
                        kind,
                        read,
                        started,
                        answered: Instant::now(),
                    });
                    out2.reply(bytes, &flow2, stamp);
                };
                if inline {
                    // As in a worker: a bug in one request must not take
                    // the connection's thread down.
                    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                    if run.is_err() {
                        log::warn(format_args!("a request handler panicked"));
                    }
                } else {
                    shared.pool.submit(ctx.gen, heavy, job);
                }
            }
            other => {
                let e = Error::Protocol(format!(
                    "message type {:#04x} is not a control-connection request",
                    other.kind()
                ));
                out.send(Out::Frame(frame_for(id, &error_reply(&e))));
                return (e.to_string(), true);
            }
        }
    }
}

/// In a group, a request is served only by a leader whose lease holds when
/// the request is taken up (node.rs `LEASE`): a leader cut off from the
/// others answers no read it can no longer vouch for. One that cannot
/// confirm its leadership ends the session, which voids the client's
/// callbacks; the client finds the leader and revalidates there.
pub(crate) fn leader_lease(shared: &Shared, ctx: &ClientCtx) -> Result<()> {
    let Some(r) = &shared.repl else {
        return Ok(());
    };
    r.confirm_leader(super::replication::LEASE_PATIENCE)
        .inspect_err(|e| {
            shared
                .registry
                .end_session(&ctx.id, ctx.gen, &format!("replication: {e}"))
        })
}

/// One request on a worker thread.
fn handle(shared: &Shared, ctx: &ClientCtx, user: &str, msg: Msg) -> Result<Msg> {
    // The rights checks (acl.rs) act for the connection's user.
    let who = shared.store.who(user)?;
    // A plain batch is a pipelined one with no condition.
    let msg = match msg {
        Msg::Reintegrate { records } => Msg::ReintegrateAfter { after: 0, records },
        m => m,
    };
    match msg {
        Msg::GetAttrs { fids } => {
            if fids.len() > MAX_ATTRS_REPLY {
                return Err(Error::Invalid(format!(
                    "{} fids in one GetAttrs; at most {MAX_ATTRS_REPLY} fit in a reply",
                    fids.len()
                )));
            }
            // Callback first, then read: a commit after the read is
            // followed by a break (PROTOCOL "Callbacks").
            shared.registry.register(ctx, &fids);
            let mut items = shared.store.get_attrs(&fids)?;
            // Status needs `l` on the object's directory.
            let seen = shared.store.may_lookup(&who, &fids)?;
            for (it, ok) in items.iter_mut().zip(seen) {
                if !ok {
                    *it = Err(crate::error::WireCode::Access);
                }
            }
            let missing: Vec<_> = fids
                .iter()
                .zip(&items)
                .filter(|(_, it)| it.is_err())
                .map(|(f, _)| *f)
                .collect();
            if !missing.is_empty() {
                shared.registry.unregister(ctx, &missing);
            }
            Ok(Msg::Attrs { items })
        }
        Msg::ReadDir { fid, cursor } => {
            shared.store.check_list(&who, fid)?;
            shared.registry.register(ctx, &[fid]);
            match shared.store.read_dir(fid, cursor) {
                Ok((attr, entries, next)) => Ok(Msg::DirPage {
                    attr,
                    entries,
                    next,
                }),
                Err(e) => {
                    shared.registry.unregister(ctx, &[fid]);
                    Err(e)
                }
            }
        }
        Msg::GetXattrs { fid } => {
            // No callback: the reply carries the object's version, and the
            // client keeps the list only while its attr has that version.
            // Extended attributes are status: `l`, as for GetAttrs.
            if !shared.store.may_lookup(&who, &[fid])?[0] {
                return Err(Error::Access(format!("no lookup right on {fid}")));
            }
            let (version, items) = shared.store.get_xattrs(fid)?;
            Ok(Msg::Xattrs { version, items })
        }
        Msg::AllocFids { volume, count } => {
            if who.anonymous() {
                // anonymous never creates: no reservations for it to hoard.
                return Err(Error::Access("anonymous may not reserve fids".into()));
            }
            let first_vnode = match &shared.repl {
                Some(r) => super::replication::machine::alloc_fids(shared, r, ctx, volume, count)?,
                None => shared.store.alloc_fids(&ctx.id, volume, count)?,
            };
            Ok(Msg::FidRange {
                volume,
                first_vnode,
                count,
            })
        }
        Msg::ValidateVolume { volume, stamp } => {
            // Callback first, then read (as for GetAttrs).
            let vf = super::meta::volume_fid(volume);
            shared.registry.register(ctx, &[vf]);
            match shared.store.volume_stamp(volume, &ctx.id) {
                Ok((now, foreign)) => Ok(Msg::VolumeStamp {
                    volume,
                    stamp: now,
                    valid: foreign <= stamp,
                }),
                Err(e) => {
                    shared.registry.unregister(ctx, &[vf]);
                    Err(e)
                }
            }
        }
        Msg::ReintegrateAfter { after, records } => {
            let lookup = |up: u64| shared.registry.staged(ctx, up);
            // Replicated: through the log, `after` inside the entry, so the
            // "after" rule is decided on every member at apply time against
            // the replicated watermark.
            let result = match &shared.repl {
                Some(r) => {
                    super::replication::machine::reintegrate(shared, r, ctx, who, after, &records)
                }
                None => {
                    shared
                        .store
                        .reintegrate_after(&ctx.id, Some(who), after, &records, &lookup)
                }
            };
            match result {
                Ok(out) => {
                    shared.registry.consume_uploads(ctx, &out.consumed_uploads);
                    if !out.replayed {
                        shared.registry.break_callbacks(
                            ctx,
                            &out.changed,
                            &out.deleted,
                            shared.break_timeout,
                        );
                    }
                    // A new group leader acknowledges only once its
                    // predecessor's clients stopped trusting blind (its
                    // own holders were told above, at once).
                    if let Some(r) = &shared.repl {
                        r.wait_writable();
                    }
                    Ok(Msg::Reintegrated {
                        results: out.results,
                    })
                }
                Err(b) => {
                    if matches!(b.error, Error::Io { .. } | Error::Eio(_)) {
                        log::warn(format_args!("{}: batch failed: {}", ctx.name(), b.error));
                    }
                    Ok(error_reply_at(&b.error, b.index))
                }
            }
        }
        Msg::GetAcl { fid } => {
            let (acl, rights) = shared.store.get_acl(&who, fid)?;
            Ok(Msg::AclReply {
                entries: acl.entries,
                rights,
            })
        }
        Msg::SetAcl {
            fid,
            name,
            rights,
            negative,
        } => {
            let (acl, mine, fids) = match &shared.repl {
                Some(r) => super::replication::machine::set_acl(
                    shared, r, ctx, &who, fid, &name, rights, negative,
                )?,
                None => shared
                    .store
                    .set_acl(&who, &ctx.id, fid, &name, rights, negative)?,
            };
            // Other clients' cached listings, status and data under the
            // directory were granted under the old list: they revalidate.
            shared
                .registry
                .break_callbacks(ctx, &fids, &[], shared.break_timeout);
            if let Some(r) = &shared.repl {
                r.wait_writable();
            }
            Ok(Msg::AclReply {
                entries: acl.entries,
                rights: mine,
            })
        }
        Msg::WhoAmI => Ok(Msg::WhoReply {
            user: who.user.clone(),
            id: who.id,
            groups: who.groups.clone(),
        }),
        // Names to ids, so a mount can show owners as local uids; not for
        // anonymous (it has no business learning who exists).
        Msg::UserIds { names } => {
            if who.user == crate::proto::acl::ANONYMOUS {
                return Err(Error::Access("anonymous may not look up users".into()));
            }
            Ok(Msg::UserIdsReply {
                ids: shared.store.user_ids(&names)?,
            })
        }
        Msg::GroupStatus => match &shared.repl {
            Some(r) => super::replication::group_view(r),
            None => Err(Error::Invalid(
                "this server is not a member of a replicated group".into(),
            )),
        },
        other => Err(Error::Protocol(format!(
            "unexpected message {:#04x}",
            other.kind()
        ))),
    }
}

/// Owns the waiting side of sending: writes queued frames in order. A
/// write that fails (peer gone, or stuck past the socket's send timeout)
/// cuts the socket so the reader notices and the session ends.
fn writer_loop(sock: Stream, out: &Outbox, flow: &Flow) {
    let why = write_all_out(sock, out, flow);
    out.end();
    // Wake a reader held by the bounds: nothing drains any more.
    flow.close(why);
}

/// Returns why it stopped.
fn write_all_out(mut sock: Stream, out: &Outbox, flow: &Flow) -> &'static str {
    // Sealed records of the frame being sent (TLS), reused.
    let mut sealed = Vec::new();
    // Bounded: each turn sends one frame or ends; Close (queued when the
    // connection's reader ends) ends it.
    loop {
        let next = out.next();
        let r = match next {
            Out::Frame(bytes) => {
                // A callback break to a peer whose reader is held at its
                // bound: its ack would sit behind its own backlog, and the
                // writer that caused the break would wait for it. Cut it
                // now (as unreachable) instead; it revalidates on return.
                // CallbackBreak is the only frame other threads queue here.
                let kind = Msg::CallbackBreak { fids: Vec::new() }.kind();
                if bytes.get(4) == Some(&kind) && !flow.break_sent() {
                    Err("a callback break found the connection held at its request bounds")
                } else {
                    send_sealed(&sock, &bytes, &mut sealed, flow)
                }
            }
            Out::Reply(bytes, stamp) => send_sealed(&sock, &bytes, &mut sealed, flow).map(|()| {
                flow.sent(bytes.len());
                trace_reply(stamp, false);
            }),
            Out::Rest(rest, len, stamp) => send_all(sock.tcp(), &rest, flow).map(|()| {
                flow.sent(len);
                trace_reply(stamp, true);
            }),
            Out::Close => {
                let _ = sock.flush();
                sock.close_write();
                return "closed";
            }
        };
        out.done();
        if let Err(why) = r {
            let _ = sock.shutdown(Shutdown::Both);
            return why;
        }
    }
}

/// Seal a frame (on a TLS stream) and send it with [`send_all`].
fn send_sealed(
    sock: &Stream,
    frame: &[u8],
    sealed: &mut Vec<u8>,
    flow: &Flow,
) -> std::result::Result<(), &'static str> {
    sealed.clear();
    match sock.seal(frame, sealed) {
        Ok(true) => send_all(sock.tcp(), sealed, flow),
        Ok(false) => send_all(sock.tcp(), frame, flow),
        Err(_) => Err("TLS sealing failed"),
    }
}

/// Write all of `buf`. When the socket is full the writer notes it is
/// blocked (so a callback break for this peer ends the session at once
/// instead of queueing behind bytes nobody takes) and waits for room, at
/// most the send timeout per wait; a break already queued or unacked when
/// the socket fills ends it too.
fn send_all(
    sock: &TcpStream,
    mut buf: &[u8],
    flow: &Flow,
) -> std::result::Result<(), &'static str> {
    use std::os::fd::AsRawFd;
    const TAKEN_TOO_SLOW: &str = "replies not taken";
    const JAMMED: &str = "a callback break found the connection's socket full";
    let fd = sock.as_raw_fd();
    let wait_ms = super::SEND_TIMEOUT.as_millis().min(i32::MAX as u128) as libc::c_int;
    // Bounded: each turn either writes bytes or waits at most wait_ms for
    // room, and a peer taking nothing for that long is cut.
    while !buf.is_empty() {
        let n = send_now(sock, buf).map_err(|()| TAKEN_TOO_SLOW)?;
        buf = &buf[n..];
        if buf.is_empty() {
            break;
        }
        // The socket is full.
        if !flow.block() {
            return Err(JAMMED);
        }
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: poll on one pollfd this frame owns.
        let r = unsafe { libc::poll(&mut p, 1, wait_ms) };
        flow.unblock();
        if r == 0 {
            return Err(TAKEN_TOO_SLOW);
        }
    }
    Ok(())
}

#[cfg(test)]
mod flow_tests {
    use super::*;

    #[test]
    fn only_short_reads_are_answered_by_the_reader() {
        let f = crate::proto::Fid::new(1, 1, 1);
        assert!(quick(&Msg::GetAttrs {
            fids: vec![f; QUICK_FIDS]
        }));
        assert!(!quick(&Msg::GetAttrs {
            fids: vec![f; QUICK_FIDS + 1]
        }));
        assert!(quick(&Msg::WhoAmI));
        assert!(!quick(&Msg::ReadDir { fid: f, cursor: 0 }));
        assert!(!quick(&Msg::Reintegrate {
            records: Vec::new()
        }));
        assert!(!quick(&Msg::AllocFids {
            volume: 1,
            count: 1
        }));
        let flow = Flow::default();
        assert!(flow.idle());
        flow.start(10);
        assert!(!flow.idle());
        flow.sent(10);
        assert!(flow.idle());
    }

    #[test]
    fn a_break_and_a_full_socket_meet_once_whichever_comes_first() {
        // A break queued first: the writer that then finds the socket full
        // gives up on the connection.
        let f = Flow::default();
        assert!(f.queue_break());
        assert!(!f.block());
        // Written (now awaiting its ack): a full socket still ends it.
        assert!(f.break_sent());
        assert!(!f.block());
        f.break_acked();
        // No break around: the writer just waits for room...
        assert!(f.block());
        // ...and a break arriving meanwhile is refused (session to end).
        assert!(!f.queue_break());
        f.unblock();
        assert!(f.queue_break());
        assert!(f.break_sent());
        f.break_acked();
        // A reader held at its bounds refuses a break too.
        f.st.lock().paused = true;
        assert!(!f.queue_break());
    }
}
