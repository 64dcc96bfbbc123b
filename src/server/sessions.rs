//! Client sessions and the callbacks they hold, under one lock so that
//! "is this session still live" and "register this callback" can never be
//! split by a restart or an unreachable verdict.
//!
//! A session is identified by client id; its epoch and a server-local
//! generation tell a current connection from a replaced one. Nothing here
//! is keyed by network address (decision 4).

use std::collections::{HashMap, HashSet};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TryRecvError};
use parking_lot::Mutex;

use super::callbacks::CallbackTable;
use super::log;
use super::objects;
use super::volume::ClientId;
use super::wire::{frame_for, Out};
use crate::proto::{Fid, Msg, MAX_FIDS};
use crate::{Error, Result};

/// Which session a connection or request belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientCtx {
    pub id: ClientId,
    pub epoch: u64,
    pub gen: u64,
}

impl ClientCtx {
    pub fn name(&self) -> String {
        format!("client {} epoch {}", objects::hex(&self.id), self.epoch)
    }
}

/// The way to a client's control connection: its outgoing frame queue, and
/// the socket itself so the session can be cut from any thread.
pub struct ControlLink {
    pub out: std::sync::Arc<super::control::Outbox>,
    pub sock: TcpStream,
    /// Called before a callback break is queued: false when the connection
    /// is jammed (reader held at its bounds or writer on a full socket).
    pub break_gate: std::sync::Arc<dyn Fn() -> bool + Send + Sync>,
}

struct Session {
    epoch: u64,
    gen: u64,
    control: ControlLink,
    bulk: HashMap<u64, TcpStream>,
    /// Staged upload id → its length in bytes.
    staged: HashMap<u64, u64>,
    /// Bytes of this session's uploads still arriving (admitted, not yet
    /// staged), so concurrent bulk connections cannot pass the bound.
    arriving: u64,
    arriving_count: u32,
    /// Break id → who waits for its ack. Dropping the sender (session end)
    /// releases the waiter at once: a gone client holds no promises.
    pending_breaks: HashMap<u64, Sender<()>>,
}

/// Bounds on uploads staged but not yet consumed by a Store: they hold disk
/// space outside any volume's quota until a batch uses them or the session
/// ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StagedLimits {
    /// Bytes one session may have staged or arriving.
    pub session_bytes: u64,
    /// Uploads one session may have staged or arriving.
    pub session_uploads: u32,
    /// Bytes all sessions together may have staged or arriving.
    pub total_bytes: u64,
}

/// Defaults: a session may stage 4 GiB in 1,024 uploads (a largest file
/// fits), the server 16 GiB in all.
pub const DEFAULT_STAGED_LIMITS: StagedLimits = StagedLimits {
    session_bytes: 4 << 30,
    session_uploads: 1024,
    total_bytes: 16 << 30,
};

impl Default for StagedLimits {
    fn default() -> StagedLimits {
        DEFAULT_STAGED_LIMITS
    }
}

/// A break sent and not yet acknowledged: its holder still trusts the
/// object, so a later writer of the object waits for it too.
struct InFlight {
    holder: ClientId,
    gen: u64,
    /// Done (acked, or the session ended) once it is not `Empty`.
    ack: Receiver<()>,
}

impl InFlight {
    fn pending(&self) -> bool {
        matches!(self.ack.try_recv(), Err(TryRecvError::Empty))
    }
}

#[derive(Default)]
struct Inner {
    sessions: HashMap<ClientId, Session>,
    /// Bytes staged or arriving over all sessions.
    staged_total: u64,
    callbacks: CallbackTable,
    next_gen: u64,
    next_break: u64,
    /// Fid → its breaks not yet acknowledged. Taking a holder out of the
    /// callback table does not make it stop trusting: until its ack, the
    /// next writer of the same object must not be acknowledged either.
    in_flight: HashMap<Fid, Vec<InFlight>>,
}

pub struct Registry {
    root: PathBuf,
    limits: StagedLimits,
    inner: Mutex<Inner>,
}

/// An admitted upload's claim on the staged-bytes bounds. Given back by
/// [`Registry::finish_upload`] (the bytes become staged) or
/// [`Registry::release_upload`] (the transfer failed).
#[derive(Debug)]
pub struct UploadClaim {
    length: u64,
}

impl Registry {
    pub fn with_limits(root: &Path, limits: StagedLimits) -> Registry {
        Registry {
            root: root.to_path_buf(),
            limits,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// A control connection finished its handshake. Any earlier session of
    /// this client (another epoch: it restarted; the same epoch: it
    /// reconnected) is ended first, so its callbacks are void.
    pub fn open_control(&self, id: ClientId, epoch: u64, link: ControlLink) -> ClientCtx {
        let mut g = self.inner.lock();
        if let Some(old) = g.sessions.get(&id) {
            let (old_epoch, old_gen) = (old.epoch, old.gen);
            let why = if old_epoch == epoch {
                "replaced by a new control connection".to_string()
            } else {
                format!("client restarted with epoch {epoch}")
            };
            self.end_locked(&mut g, &id, old_gen, &why, true);
        }
        g.next_gen += 1;
        let gen = g.next_gen;
        g.sessions.insert(
            id,
            Session {
                epoch,
                gen,
                control: link,
                bulk: HashMap::new(),
                staged: HashMap::new(),
                arriving: 0,
                arriving_count: 0,
                pending_breaks: HashMap::new(),
            },
        );
        ClientCtx { id, epoch, gen }
    }

    /// A bulk connection joins the live control session of its (id, epoch).
    pub fn attach_bulk(
        &self,
        id: ClientId,
        epoch: u64,
        serial: u64,
        sock: TcpStream,
    ) -> Result<ClientCtx> {
        let mut g = self.inner.lock();
        match g.sessions.get_mut(&id) {
            Some(s) if s.epoch == epoch => {
                s.bulk.insert(serial, sock);
                Ok(ClientCtx {
                    id,
                    epoch,
                    gen: s.gen,
                })
            }
            _ => Err(Error::Stale(format!(
                "no control session for client {} epoch {epoch}; connect control first",
                objects::hex(&id)
            ))),
        }
    }

    pub fn detach_bulk(&self, ctx: &ClientCtx, serial: u64) {
        let mut g = self.inner.lock();
        if let Some(s) = g.sessions.get_mut(&ctx.id) {
            if s.gen == ctx.gen {
                s.bulk.remove(&serial);
            }
        }
    }

    /// End a session if it is still the one `gen` names: callbacks dropped,
    /// staged uploads deleted, every connection of it cut.
    pub fn end_session(&self, id: &ClientId, gen: u64, why: &str) {
        let mut g = self.inner.lock();
        self.end_locked(&mut g, id, gen, why, true);
    }

    /// End a session from its own control connection, which closes its
    /// socket itself (after flushing a last error frame to the peer).
    pub fn leave(&self, id: &ClientId, gen: u64, why: &str) {
        let mut g = self.inner.lock();
        self.end_locked(&mut g, id, gen, why, false);
    }

    fn end_locked(&self, g: &mut Inner, id: &ClientId, gen: u64, why: &str, cut: bool) {
        match g.sessions.get(id) {
            Some(s) if s.gen == gen => {}
            _ => return,
        }
        let Some(s) = g.sessions.remove(id) else {
            return;
        };
        let dropped = g.callbacks.drop_client(id);
        if cut {
            let _ = s.control.sock.shutdown(Shutdown::Both);
        }
        for b in s.bulk.values() {
            let _ = b.shutdown(Shutdown::Both);
        }
        for up in s.staged.keys() {
            objects::remove_quietly(&objects::staged_path(&self.root, id, *up));
        }
        // Uploads still arriving give their claims back as they fail.
        let held: u64 = s.staged.values().sum();
        g.staged_total = g.staged_total.saturating_sub(held);
        log::info(format_args!(
            "client {} epoch {} session ended ({why}); {dropped} callbacks dropped",
            objects::hex(id),
            s.epoch
        ));
    }

    /// The client ids with a live session (their owners are never
    /// forgotten, owners.rs).
    pub fn live_ids(&self) -> std::collections::HashSet<ClientId> {
        self.inner.lock().sessions.keys().copied().collect()
    }

    /// Cut every session (server shutdown).
    pub fn end_all(&self) {
        let mut g = self.inner.lock();
        let ids: Vec<(ClientId, u64)> = g.sessions.iter().map(|(k, s)| (*k, s.gen)).collect();
        for (id, gen) in ids {
            self.end_locked(&mut g, &id, gen, "server shutting down", true);
        }
    }

    fn live(g: &Inner, ctx: &ClientCtx) -> bool {
        g.sessions.get(&ctx.id).is_some_and(|s| s.gen == ctx.gen)
    }

    /// Grant callbacks; must happen BEFORE the state is read (see PROTOCOL).
    /// A request of an ended session gets none: its client must revalidate.
    pub fn register(&self, ctx: &ClientCtx, fids: &[Fid]) {
        let mut g = self.inner.lock();
        if Self::live(&g, ctx) {
            for &f in fids {
                g.callbacks.add(ctx.id, f);
            }
        }
    }

    pub fn unregister(&self, ctx: &ClientCtx, fids: &[Fid]) {
        let mut g = self.inner.lock();
        for &f in fids {
            g.callbacks.remove(&ctx.id, f);
        }
    }

    /// The staged file of one of this session's uploads.
    pub fn staged(&self, ctx: &ClientCtx, upload_id: u64) -> Option<PathBuf> {
        let g = self.inner.lock();
        match g.sessions.get(&ctx.id) {
            Some(s) if s.gen == ctx.gen && s.staged.contains_key(&upload_id) => {
                Some(objects::staged_path(&self.root, &ctx.id, upload_id))
            }
            _ => None,
        }
    }

    /// Admit an announced upload of `length` bytes against the staged
    /// bounds, before any byte of it is written: `Quota` past the session's
    /// bytes or count, or past the server's total. The claim holds the
    /// bytes until the upload is staged or given back.
    pub fn admit_upload(&self, ctx: &ClientCtx, length: u64) -> Result<UploadClaim> {
        let mut g = self.inner.lock();
        let total = g.staged_total;
        let lim = self.limits;
        let s = match g.sessions.get_mut(&ctx.id) {
            Some(s) if s.gen == ctx.gen => s,
            _ => return Err(Error::Stale("the session of this upload ended".into())),
        };
        let held = s.staged.values().sum::<u64>().saturating_add(s.arriving);
        let count = s.staged.len() as u64 + s.arriving_count as u64;
        if count >= lim.session_uploads as u64 {
            return Err(Error::Quota(format!(
                "{count} uploads already staged by this session (at most {}); store or drop some first",
                lim.session_uploads
            )));
        }
        if held.saturating_add(length) > lim.session_bytes {
            return Err(Error::Quota(format!(
                "upload of {length} bytes: this session has {held} staged, at most {} allowed",
                lim.session_bytes
            )));
        }
        if total.saturating_add(length) > lim.total_bytes {
            return Err(Error::Quota(format!(
                "upload of {length} bytes: the server holds {total} staged bytes, at most {}",
                lim.total_bytes
            )));
        }
        s.arriving += length;
        s.arriving_count += 1;
        g.staged_total += length;
        Ok(UploadClaim { length })
    }

    /// An admitted upload failed: give its claim back.
    pub fn release_upload(&self, ctx: &ClientCtx, claim: UploadClaim) {
        let mut g = self.inner.lock();
        Self::unclaim(&mut g, ctx, claim.length);
        g.staged_total = g.staged_total.saturating_sub(claim.length);
    }

    /// Take a claim off its session's arriving counts (if the session is
    /// still the one that made it).
    fn unclaim(g: &mut Inner, ctx: &ClientCtx, length: u64) {
        if let Some(s) = g.sessions.get_mut(&ctx.id) {
            if s.gen == ctx.gen {
                s.arriving = s.arriving.saturating_sub(length);
                s.arriving_count = s.arriving_count.saturating_sub(1);
            }
        }
    }

    /// An upload is complete and fsynced in `tmp`: give it its staged name,
    /// but only if the session is still live (a dead session's uploads
    /// would never be consumed nor cleaned). Its claim's bytes stay counted
    /// as staged until consumed or the session ends.
    pub fn finish_upload(
        &self,
        ctx: &ClientCtx,
        upload_id: u64,
        tmp: &Path,
        claim: UploadClaim,
    ) -> Result<()> {
        let mut g = self.inner.lock();
        let length = claim.length;
        Self::unclaim(&mut g, ctx, length);
        let mut freed = length;
        let result = match g.sessions.get_mut(&ctx.id) {
            Some(s) if s.gen == ctx.gen => {
                let dst = objects::staged_path(&self.root, &ctx.id, upload_id);
                match std::fs::rename(tmp, &dst) {
                    Ok(()) => {
                        // Re-sending an upload id replaces the staged file.
                        freed = s.staged.insert(upload_id, length).unwrap_or(0);
                        Ok(())
                    }
                    Err(e) => {
                        objects::remove_quietly(tmp);
                        Err(Error::io(format!("stage upload {upload_id}"), e))
                    }
                }
            }
            _ => {
                objects::remove_quietly(tmp);
                Err(Error::Stale("the session of this upload ended".into()))
            }
        };
        g.staged_total = g.staged_total.saturating_sub(freed);
        result
    }

    /// Store records of a committed batch consumed these uploads.
    pub fn consume_uploads(&self, ctx: &ClientCtx, ids: &[u64]) {
        let mut g = self.inner.lock();
        if let Some(s) = g.sessions.get_mut(&ctx.id) {
            if s.gen == ctx.gen {
                let mut freed = 0u64;
                for id in ids {
                    if let Some(len) = s.staged.remove(id) {
                        freed += len;
                        objects::remove_quietly(&objects::staged_path(&self.root, &ctx.id, *id));
                    }
                }
                g.staged_total = g.staged_total.saturating_sub(freed);
            }
        }
    }

    /// A BreakAck arrived on a control connection of `ctx`.
    pub fn break_ack(&self, ctx: &ClientCtx, break_id: u64) {
        let mut g = self.inner.lock();
        if let Some(s) = g.sessions.get_mut(&ctx.id) {
            if s.gen == ctx.gen {
                // Dropped, not sent: every waiter (the writer that broke
                // it and later writers of its objects) sees it done.
                s.pending_breaks.remove(&break_id);
            }
        }
    }

    /// After a batch of `writer` committed: break every other holder's
    /// callbacks on the changed objects and wait (all holders in parallel,
    /// bounded by one `timeout`) for their acks; a holder that stays silent
    /// is declared unreachable and cut. The writer gains callbacks on what
    /// it changed and still exists. Breaks of the same objects sent for an
    /// earlier writer and not yet acknowledged are waited for as well: their
    /// holders still trust what they cached, so this writer's change must
    /// not be acknowledged before they heard of the earlier one.
    pub fn break_callbacks(
        &self,
        writer: &ClientCtx,
        changed: &[Fid],
        deleted: &[Fid],
        timeout: Duration,
    ) {
        let mut waits: Vec<(ClientId, u64, Receiver<()>)> = Vec::new();
        {
            let mut g = self.inner.lock();
            for fid in changed {
                if let Some(list) = g.in_flight.get_mut(fid) {
                    list.retain(InFlight::pending);
                    // (The writer's own unacked break is its reader's
                    // business, not a promise to anyone else.)
                    waits.extend(
                        list.iter()
                            .filter(|f| f.holder != writer.id)
                            .map(|f| (f.holder, f.gen, f.ack.clone())),
                    );
                    if list.is_empty() {
                        g.in_flight.remove(fid);
                    }
                }
            }
            let mut per_holder: HashMap<ClientId, Vec<Fid>> = HashMap::new();
            for &fid in changed {
                for h in g.callbacks.take_holders(fid, &writer.id) {
                    per_holder.entry(h).or_default().push(fid);
                }
            }
            for &fid in deleted {
                g.callbacks.drop_fid(fid);
            }
            let mut jammed = Vec::new();
            for (holder, fids) in per_holder {
                for chunk in fids.chunks(MAX_FIDS) {
                    g.next_break += 1;
                    let break_id = g.next_break;
                    let Some(s) = g.sessions.get_mut(&holder) else {
                        break;
                    };
                    // Its ack would sit behind bytes it does not take: end
                    // the session now rather than wait out the timeout.
                    if !(s.control.break_gate)() {
                        jammed.push((holder, s.gen));
                        break;
                    }
                    let (tx, rx) = bounded(1);
                    s.pending_breaks.insert(break_id, tx);
                    let msg = Msg::CallbackBreak {
                        fids: chunk.to_vec(),
                    };
                    s.control.out.send(Out::Frame(frame_for(break_id, &msg)));
                    let gen = s.gen;
                    for fid in chunk {
                        g.in_flight.entry(*fid).or_default().push(InFlight {
                            holder,
                            gen,
                            ack: rx.clone(),
                        });
                    }
                    waits.push((holder, gen, rx));
                }
            }
            for (holder, gen) in jammed {
                self.end_locked(
                    &mut g,
                    &holder,
                    gen,
                    "a callback break found the connection jammed (requests held at their \
                     bounds or its socket full)",
                    true,
                );
            }
            if Self::live(&g, writer) {
                for &fid in changed {
                    if !deleted.contains(&fid) {
                        g.callbacks.add(writer.id, fid);
                    }
                }
            }
        }
        let deadline = Instant::now() + timeout;
        let mut cut: HashSet<(ClientId, u64)> = HashSet::new();
        for (holder, gen, rx) in waits {
            if cut.contains(&(holder, gen)) {
                continue;
            }
            if let Err(RecvTimeoutError::Timeout) = rx.recv_deadline(deadline) {
                log::info(format_args!(
                    "client {} did not acknowledge a callback break within {} ms: declared unreachable",
                    objects::hex(&holder),
                    timeout.as_millis()
                ));
                self.end_session(&holder, gen, "unreachable: break not acknowledged");
                cut.insert((holder, gen));
            }
        }
        // Every break waited for is done now (acked, or its session ended
        // and dropped the sender): forget them, and any others done.
        let mut g = self.inner.lock();
        for fid in changed {
            if let Some(list) = g.in_flight.get_mut(fid) {
                list.retain(InFlight::pending);
                if list.is_empty() {
                    g.in_flight.remove(fid);
                }
            }
        }
    }
}
