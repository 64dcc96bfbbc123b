//! Reintegration: replay the CML on the server in batches of bounded size.
//! Each batch applies atomically (PROTOCOL.md); one sent again after a lost
//! reply is recognised by its store ids and not applied twice. A record the
//! server refuses (a version conflict, a name that now exists, ...) leaves
//! the log together with the records that depend on it and becomes a
//! conflict (`conflict.rs`), with the local data preserved; the rest of the
//! log goes on reintegrating.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::cache::Cache;
use super::callback::Callbacks;
use super::cml::Cml;
use super::conflict::Conflicts;
use super::conn::{Servers, Session};
use super::event::Event;
use super::mailbox::{Mailbox, Woken};
use super::mode::Mode;
use super::stats::Counters;
use crate::error::WireCode;
use crate::proto::{Attr, Msg, Record, RecordOp, MAX_BATCH, MAX_INLINE};
use crate::{Error, Result};

// ---------------------------------------------------------------------------
// The outbox: who may send now, and the connected records waiting to go.
//
// The server treats a batch whose store ids are all at or below the highest
// it applied as a replay, so records must reach it in store-id order. One
// *token* says who sends: a connected writer that leads, or a backlog
// reintegration. No lock is held while it sends: the token is a flag.
// Connected writers upload their data first (in parallel, under upload ids
// of their own), then log the record and queue it; whoever holds the token
// sends every queued record at the head of the log in one Reintegrate (a
// group commit) and gives the token back as soon as the request is written:
// up to `MAX_IN_FLIGHT` connected batches are in flight at once, each
// waited for by its own sender, which hands each writer its result.
//
// A batch sent while others are in flight is a `ReintegrateAfter` naming
// the highest store id of the batch sent before it: the server applies it
// only if that one applied (PROTOCOL.md "Pipelined batches"). Once a batch
// fails, nothing more is sent until every batch in flight has its answer;
// then the records not applied go again from the head of the log. Backlog
// reintegration takes the token only with nothing in flight and keeps it
// for its whole run (one batch at a time).
//
// Before it sends, a leader holds its batch, at most a recent round trip,
// for the records of the other writer threads active lately (`Hold`), so
// concurrent writers share one server commit instead of alternating in
// halves.

/// A waiting connected writer's mailbox: its outcome once settled, or a
/// nudge when it is told to lead (the token is free and its record queued).
type Mail = Mailbox<Result<Attr>>;

/// Wait up to `d` for the outcome; `None` when told to lead meanwhile (or
/// already before) or when the time is up.
fn wait_outcome(mail: &Mail, d: Duration) -> Option<Result<Attr>> {
    match mail.wait_until(Instant::now() + d) {
        Woken::Value(r) => Some(r),
        Woken::Nudged | Woken::TimedOut => None,
    }
}

struct Queued {
    /// The session its data was uploaded on (staged uploads die with it).
    staged_on: Option<Arc<Session>>,
    /// A small store's data, read at its commit and not uploaded: it goes
    /// inline in the record.
    inline: Option<Vec<u8>>,
    /// Where its writer waits for its outcome.
    mail: Arc<Mail>,
}

/// Most connected batches sent and not yet answered. The server takes a
/// session's batches in order and groups them into its commits, so a few
/// in flight let every writer's record go at once instead of in turns.
pub(crate) const MAX_IN_FLIGHT: usize = 8;

/// Records a batch sent while another is in flight must carry at least.
const SHARED_BATCH: usize = 2;

/// Set to a number from 1 to `MAX_IN_FLIGHT` in the client's environment
/// to allow fewer batches in flight (1: one at a time, as before
/// pipelining): only for measuring what pipelining gains.
pub(crate) const MAX_IN_FLIGHT_ENV: &str = "CODA_CLIENT_MAX_IN_FLIGHT";

/// How a writer that leads holds its batch before sending it (see
/// `Outbox::hold`).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Hold {
    /// Until every writer thread active lately has its record queued, at
    /// most one recent round trip (the default).
    Active,
    /// Send at once (the client before holding).
    Off,
    /// Until this many records are queued, at most this long (measuring).
    Fixed(usize, Duration),
}

/// Set in the client's environment (read when it starts) to `off` to send
/// each batch at once, as before batches were held, or to `N:US` to wait
/// for `N` queued records, at most `US` µs (up to 10,000): only for
/// measuring what holding gains (BENCHMARKS.md "`pratio`").
pub(crate) const HOLD_ENV: &str = "CODA_CLIENT_HOLD";

fn hold_from_env() -> Hold {
    std::env::var(HOLD_ENV).map_or(Hold::Active, |v| parse_hold(&v))
}

/// `off`, or `N:US` (N at least 2) as records and a duration of at most
/// 10 ms; anything else is the default.
fn parse_hold(v: &str) -> Hold {
    if v.trim() == "off" {
        return Hold::Off;
    }
    let fixed = || {
        let (n, us) = v.split_once(':')?;
        let n = n.trim().parse::<usize>().ok().filter(|n| *n > 1)?;
        let us = us.trim().parse::<u64>().ok()?.min(10_000);
        Some(Hold::Fixed(n.min(MAX_BATCH), Duration::from_micros(us)))
    };
    fixed().unwrap_or(Hold::Active)
}

/// The writers' concurrency (the most connected records outstanding at
/// once: each writer has at most one) is remembered for this many recent
/// round trips (so writers that stopped are waited for by a few batches at
/// most) ...
const ACTIVE_ROUND_TRIPS: u32 = 4;
/// ... within these bounds.
const ACTIVE_MIN: Duration = Duration::from_millis(1);
const ACTIVE_MAX: Duration = Duration::from_millis(50);
/// The longest a batch is held, whatever the round trip.
const HOLD_MAX: Duration = Duration::from_millis(2);

/// The recent peak of records outstanding at once (`peak`, last reached
/// at `at`) after `outstanding` were counted at `now`: a new or equal peak
/// is taken; a peak older than `window` gives way to the current count.
fn recent_peak(
    (peak, at): (usize, Instant),
    outstanding: usize,
    now: Instant,
    window: Duration,
) -> (usize, Instant) {
    if outstanding >= peak || now.saturating_duration_since(at) > window {
        (outstanding, now)
    } else {
        (peak, at)
    }
}

struct OutState {
    /// The token: someone is choosing and writing a batch, or a backlog
    /// reintegration runs.
    sending: bool,
    /// Logged connected records waiting for a Reintegrate, by store id.
    queue: BTreeMap<u64, Queued>,
    /// Connected batches sent, not yet answered.
    in_flight: usize,
    /// Store ids of their records (the next batch starts after them).
    flying: BTreeSet<u64>,
    /// Highest store id of the last batch sent (what the next one sent
    /// while it is in flight must come after).
    last_top: u64,
    /// A batch failed: nothing is sent until `in_flight` is 0.
    halted: bool,
    /// `MAX_IN_FLIGHT`, or less (`MAX_IN_FLIGHT_ENV`).
    max_in_flight: usize,
    /// How a leader holds its batch (`HOLD_ENV`).
    hold: Hold,
    /// The most connected records outstanding at once lately (queued or
    /// in flight: as many writers were waiting), and when it was last
    /// reached (`recent_peak`).
    peak: (usize, Instant),
    /// Recent round trip of a connected batch (a moving average), from
    /// its write to its answer; None before the first.
    round_trip: Option<Duration>,
    /// A leader holds its batch until this many records are queued
    /// (`Outbox::hold`): the queuer that reaches it wakes the leader, and
    /// the ones before it do not (each futile wake-up is a context switch
    /// on the writers' critical path).
    holding_for: Option<usize>,
}

impl OutState {
    /// A connected record was just queued: count the records outstanding.
    fn note_outstanding(&mut self) {
        let outstanding = self.queue.len() + self.flying.len();
        self.peak = recent_peak(self.peak, outstanding, Instant::now(), self.window());
    }

    /// How long a peak of concurrency is remembered.
    fn window(&self) -> Duration {
        self.round_trip
            .map_or(ACTIVE_MIN, |rt| rt * ACTIVE_ROUND_TRIPS)
            .clamp(ACTIVE_MIN, ACTIVE_MAX)
    }

    /// A connected writer may take the token and send a batch now. With a
    /// batch already in flight, another goes only if it would carry several
    /// records: a lone record waits for the answer and then goes with
    /// whatever queued behind it, so concurrent writers share requests
    /// (one apply and one reply for several records) instead of each
    /// sending its own.
    fn may_send(&self) -> bool {
        !self.sending
            && !self.halted
            && self.in_flight < self.max_in_flight
            && (self.in_flight == 0 || self.queue.len() >= SHARED_BATCH)
    }
}

pub(crate) struct Outbox {
    /// Guards the token, the queue and the batches in flight; held only to
    /// look at or change them, never across I/O.
    state: Mutex<OutState>,
    /// Signalled when the token is given back or a batch is answered.
    free: Condvar,
    /// Signalled when the queue reaches the count a holding leader waits
    /// for (`OutState::holding_for`).
    queued: Condvar,
    /// Upload ids of connected writers: high bit set, so they never meet
    /// the store ids that logged records upload under.
    next_upload: AtomicU64,
}

/// The right to send; given back when dropped.
pub(crate) struct Token<'a> {
    out: &'a Outbox,
}

impl Drop for Token<'_> {
    fn drop(&mut self) {
        self.out.state.lock().sending = false;
        self.out.free.notify_all();
        self.out.kick();
    }
}

/// How long a waiting writer sleeps before it looks again by itself (a
/// safety net: hand-offs wake it at once).
const WAIT_SLICE: Duration = Duration::from_millis(50);

impl Outbox {
    pub fn new() -> Outbox {
        let start = u64::from_ne_bytes(crate::proto::auth::random_bytes::<8>()) >> 24;
        let max_in_flight = std::env::var(MAX_IN_FLIGHT_ENV)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .map_or(MAX_IN_FLIGHT, |n| n.clamp(1, MAX_IN_FLIGHT));
        Outbox {
            state: Mutex::new(OutState {
                sending: false,
                queue: BTreeMap::new(),
                in_flight: 0,
                flying: BTreeSet::new(),
                last_top: 0,
                halted: false,
                max_in_flight,
                hold: hold_from_env(),
                peak: (0, Instant::now()),
                round_trip: None,
                holding_for: None,
            }),
            free: Condvar::new(),
            queued: Condvar::new(),
            next_upload: AtomicU64::new((1 << 63) | start),
        }
    }

    fn upload_id(&self) -> u64 {
        self.next_upload.fetch_add(1, Ordering::Relaxed) | (1 << 63)
    }

    /// Take the token with no connected batch in flight (backlog
    /// reintegration sends one batch at a time), waiting at most `timeout`
    /// (`Again` after it).
    pub fn token(&self, timeout: Duration) -> Result<Token<'_>> {
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock();
        // Bounded by the deadline.
        loop {
            if !st.sending && st.in_flight == 0 {
                st.sending = true;
                return Ok(Token { out: self });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Again(
                    "another reintegration kept the log busy".into(),
                ));
            }
            self.free
                .wait_for(&mut st, (deadline - now).min(WAIT_SLICE));
        }
    }

    /// Before a leader sends: wait (holding the token, no lock) until as
    /// many records are queued as were outstanding at once lately, at most
    /// one recent round trip (`HOLD_MAX` at most). Concurrent writers then
    /// share one batch, and one server commit, instead of alternating in
    /// halves (BENCHMARKS.md "`pratio`"); a lone writer, or one program
    /// writing through several threads in turn (FUSE), never waits.
    fn hold(&self) {
        let mut st = self.state.lock();
        let now = Instant::now();
        let (n, most) = match st.hold {
            Hold::Off => return,
            Hold::Fixed(n, most) => (n, most),
            Hold::Active => {
                let Some(rt) = st.round_trip else {
                    return;
                };
                let (peak, at) = st.peak;
                if now.saturating_duration_since(at) > st.window() {
                    return;
                }
                (peak, rt.min(HOLD_MAX))
            }
        };
        let end = now + most;
        st.holding_for = Some(n);
        // Bounded by `end`.
        while st.queue.len() < n && !self.queued.wait_until(&mut st, end).timed_out() {}
        st.holding_for = None;
    }

    /// Fold a connected batch's round trip into the recent figure.
    fn note_round_trip(&self, rt: Duration) {
        let mut st = self.state.lock();
        st.round_trip = Some(st.round_trip.map_or(rt, |r| (r * 3 + rt) / 4));
    }

    /// The token for a connected writer, if a batch may be sent now.
    fn try_token(&self) -> Option<Token<'_>> {
        let mut st = self.state.lock();
        if !st.may_send() {
            return None;
        }
        st.sending = true;
        Some(Token { out: self })
    }

    /// A batch may be sent and records wait: tell the first writers to
    /// lead (one of them takes the token; a writer busy waiting for its
    /// own batch's answer does not answer at once, so a few are told).
    fn kick(&self) {
        let st = self.state.lock();
        if st.may_send() {
            for q in st.queue.values().take(MAX_IN_FLIGHT) {
                q.mail.nudge();
            }
        }
    }
}

/// The server refused for lack of space or quota: retrying at once would
/// only be refused again (and upload the same bytes again).
pub(crate) fn space_error(e: &Error) -> bool {
    matches!(e, Error::NoSpace(_) | Error::Quota(_))
}

/// Why the connected write path left a record to the log, or did not send.
pub(crate) enum Deferred {
    /// The record (this store id) was logged, its send failed for lack of a
    /// server: it stays in the log.
    Unreachable(u64),
    /// Nothing logged: the data could not be uploaded (no server), or
    /// records logged earlier wait (this one must not overtake them).
    NotLogged(Option<Error>),
}

/// The first wait after a refusal for space, and the longest.
pub(crate) const BACKOFF_FIRST: Duration = Duration::from_secs(1);
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Set while the server refuses reintegration for lack of space or quota:
/// no batch is sent before it ends.
#[derive(Default)]
pub(crate) struct Backoff {
    state: Mutex<BackoffState>,
}

#[derive(Default)]
struct BackoffState {
    /// When the next reintegration may be tried, and the last refusal
    /// (quota or not, and its message).
    until: Option<(Instant, bool, String)>,
    step: Option<Duration>,
}

impl Backoff {
    /// The refusal that started the current back-off, while it lasts.
    pub fn current(&self) -> Option<Error> {
        let b = self.state.lock();
        match &b.until {
            Some((t, quota, m)) if Instant::now() < *t => Some(if *quota {
                Error::Quota(m.clone())
            } else {
                Error::NoSpace(m.clone())
            }),
            _ => None,
        }
    }

    /// Start (or lengthen: doubling, capped) the back-off after `e`;
    /// returns how long it is.
    pub fn start(&self, e: &Error) -> Duration {
        let mut b = self.state.lock();
        let step = b.step.map_or(BACKOFF_FIRST, |s| (s * 2).min(BACKOFF_MAX));
        b.step = Some(step);
        let (quota, m) = match e {
            Error::Quota(m) => (true, m.clone()),
            Error::NoSpace(m) => (false, m.clone()),
            e => (false, e.to_string()),
        };
        b.until = Some((Instant::now() + step, quota, m));
        step
    }

    /// A reintegration went through, or the user asked for one now.
    pub fn reset(&self) {
        *self.state.lock() = BackoffState::default();
    }
}

/// Records per batch: bounded so one batch is one bounded transaction on
/// the server and one frame on the wire.
pub(crate) const BATCH_RECORDS: usize = 1024;
/// Encoded bytes of records per batch (one frame is at most 1 MiB).
const BATCH_BYTES: usize = 768 << 10;
/// File data uploaded per batch: beyond this the batch is cut short, so a
/// batch's time stays bounded and progress is committed as it goes.
const BATCH_DATA: u64 = 256 << 20;
/// Set (to anything) in the client's environment to send no inline data:
/// every store uploaded, no Create merged with its Store (the client as it
/// was before inline records): only for measuring what they gain.
pub(crate) const NO_INLINE_ENV: &str = "CODA_CLIENT_NO_INLINE";

/// Small stores go inline (unless `NO_INLINE_ENV` is set).
pub(crate) fn inline_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os(NO_INLINE_ENV).is_none())
}

/// Most bytes of file data carried inline by one batch's records (the
/// rest upload): the batch stays well inside one frame.
const INLINE_BATCH: u64 = 512 << 10;

/// The inline data a batch of `records` may carry: `INLINE_BATCH`, less
/// whatever the records themselves take beyond half a frame (names,
/// attribute values), so the batch always fits in one frame.
fn inline_room(records: &[Record]) -> u64 {
    let own = super::cml::encode_records(records).len() as u64;
    let frame = crate::proto::MAX_FRAME as u64;
    INLINE_BATCH.min((frame - (64 << 10)).saturating_sub(own))
}

/// The wire form of the records of a batch: small stores carry their data
/// (`StoreInline`), and a Create followed at once by such a store of the
/// same file goes as one `CreateWith` (adjacent only: the merged record
/// then sits where both did, so the order of everything else holds).
/// Returns the wire records and, for each record of `batch`, the index of
/// the wire record that carries it.
pub(crate) fn merge_creates(batch: &[Record]) -> (Vec<Record>, Vec<usize>) {
    let mut wire: Vec<Record> = Vec::with_capacity(batch.len());
    let mut carried_by = Vec::with_capacity(batch.len());
    for r in batch {
        if let (
            RecordOp::StoreInline {
                fid: sf,
                mtime,
                data,
                ..
            },
            Some(w),
        ) = (&r.op, wire.len().checked_sub(1))
        {
            if let RecordOp::Create {
                parent,
                name,
                fid,
                mode,
                uid,
                gid,
                ..
            } = &wire[w].op
            {
                if fid == sf {
                    wire[w].op = RecordOp::CreateWith {
                        parent: *parent,
                        name: name.clone(),
                        fid: *fid,
                        mode: *mode,
                        mtime: *mtime,
                        uid: *uid,
                        gid: *gid,
                        data: data.clone(),
                    };
                    // It carries the store's (higher) id: the server's
                    // watermark then ends where the log's records do.
                    wire[w].store_id = r.store_id;
                    carried_by.push(w);
                    continue;
                }
            }
        }
        carried_by.push(wire.len());
        wire.push(r.clone());
    }
    (wire, carried_by)
}

/// Told when a reintegration emptied the log (emulation.rs rereads the
/// listings it edited meanwhile).
pub(crate) trait OnEmpty {
    fn log_emptied(&self);
}

/// The one sender of records: the parts it reads and updates, borrowed for
/// one call.
pub(crate) struct Reintegrator<'a> {
    pub outbox: &'a Outbox,
    pub servers: &'a Servers,
    pub cml: &'a Cml,
    pub cache: &'a Cache,
    pub callbacks: &'a Callbacks,
    pub counters: &'a Counters,
    pub mode: &'a Mode,
    pub backoff: &'a Backoff,
    pub on_empty: &'a dyn OnEmpty,
}

impl Reintegrator<'_> {
    /// The connected write path: upload the data (no lock held, in
    /// parallel with other writers), log the record durably, queue it, and
    /// wait until it is sent (by this writer or the one leading) and the
    /// server committed it. Returns the target's attr.
    pub(crate) fn commit_connected(
        &self,
        mut op: RecordOp,
        data: Option<&std::fs::File>,
    ) -> Result<std::result::Result<Attr, Deferred>> {
        let out = &self.outbox;
        if self.cml.has_backlog() {
            return Ok(Err(Deferred::NotLogged(None)));
        }
        let mut staged_on = None;
        let mut inline = None;
        if let RecordOp::Store {
            upload_id, length, ..
        } = &mut op
        {
            let f = data.ok_or_else(|| Error::Invalid("a store needs its container".into()))?;
            *upload_id = out.upload_id();
            // A small file's data rides in the record (`send_connected`):
            // no upload, so one round trip. The upload id stays set for a
            // resend from the log.
            if *length <= MAX_INLINE as u64 && inline_enabled() {
                let mut buf = vec![0u8; *length as usize];
                std::os::unix::fs::FileExt::read_exact_at(f, &mut buf, 0)
                    .map_err(|e| Error::io("reading a container", e))?;
                inline = Some(buf);
            }
        }
        if let (
            RecordOp::Store {
                upload_id, length, ..
            },
            Some(f),
            None,
        ) = (&mut op, data, &inline)
        {
            let sent = self.servers.session().and_then(|s| {
                s.upload(*upload_id, f, *length, &self.servers.interrupt)
                    .map(|_| s)
            });
            match sent {
                Ok(s) => staged_on = Some(s),
                Err(e) if super::mode::unreachable(&e) => {
                    return Ok(Err(Deferred::NotLogged(Some(e))))
                }
                Err(e) => return Err(e),
            }
        }
        let store_fid = match &op {
            RecordOp::Store { fid, .. } => Some(*fid),
            _ => None,
        };
        let rec = self.cml.log_connected(op)?;
        let id = rec.store_id;
        let mail = Arc::new(Mail::default());
        let complete = {
            let mut st = out.state.lock();
            st.queue.insert(
                id,
                Queued {
                    staged_on,
                    inline,
                    mail: mail.clone(),
                },
            );
            st.note_outstanding();
            st.holding_for.is_some_and(|n| st.queue.len() >= n)
        };
        if complete {
            // The leader holding its batch waited for this record.
            out.queued.notify_all();
        }
        let result = self.await_sent(id, &mail);
        match result {
            Ok(a) => Ok(Ok(a)),
            Err(e) if super::mode::unreachable(&e) && self.keeps_unreachable() => {
                // The server's commit was to be the durable copy; without
                // it the record and its container are, and the container
                // reaches the disk first (a durable record over a lost
                // container would send an empty file later).
                if let (Some(fid), Some(f)) = (store_fid, data) {
                    self.cache.make_durable(fid, f)?;
                }
                // Never cancel it: the server may have applied it already.
                // This durable commit also makes the record itself durable.
                self.cml.persist_sent_upto()?;
                Ok(Err(Deferred::Unreachable(id)))
            }
            Err(e) => {
                // Refused (or no emulation): the record leaves the log.
                self.cml.finish(&[id], &[])?;
                out.kick();
                Err(e)
            }
        }
    }

    /// A connected record whose send failed for lack of a server stays in
    /// the log (disconnected operation), unless emulation is off or the
    /// client failed over.
    fn keeps_unreachable(&self) -> bool {
        self.mode.enabled() && !self.mode.failed_over()
    }

    /// Wait for record `id`'s outcome, leading whenever a batch may be sent.
    /// Bounded: past the deadline a record still queued is taken out and
    /// reported unreachable; one being sent is waited for (its send is
    /// bounded by the RPC timeout).
    fn await_sent(&self, id: u64, mail: &Mail) -> Result<Attr> {
        let out = &self.outbox;
        let t = self.servers.timing();
        let deadline = Instant::now() + 2 * t.rpc_timeout + t.dead_after;
        loop {
            if let Some(r) = mail.take() {
                return r;
            }
            if let Some(token) = out.try_token() {
                self.lead(token);
                if let Some(r) = mail.take() {
                    return r;
                }
            }
            if Instant::now() >= deadline {
                // Its batch is in flight (or comes back to the queue, not
                // applied after an earlier failure: then it is taken out).
                let end = Instant::now() + t.rpc_timeout + t.dead_after;
                // Bounded by `end`.
                loop {
                    if out.state.lock().queue.remove(&id).is_some() {
                        return Err(Error::Timeout(
                            "the record waited too long for its turn to be sent".into(),
                        ));
                    }
                    let left = end.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Error::Timeout("no outcome for the record's send".into()));
                    }
                    if let Some(r) = wait_outcome(mail, left.min(WAIT_SLICE)) {
                        return r;
                    }
                }
            }
            // Otherwise told to lead, or look again after the slice.
            if let Some(r) = wait_outcome(mail, WAIT_SLICE) {
                return r;
            }
        }
    }

    /// Holding the token: send the queued connected records at the head of
    /// the log (past those in flight) as one batch, give the token back
    /// once it is written, wait for its answer and settle it. A backlog
    /// record at the head is sent by backlog reintegration (under the same
    /// token) once nothing is in flight.
    fn lead(&self, token: Token<'_>) {
        let out = &self.outbox;
        out.hold();
        // One look at the queue: the batch and its writers (taken out
        // together, so a writer giving up meanwhile cannot shift them).
        let (batch, backlog, waiters, after) = {
            let mut st = out.state.lock();
            let (batch, backlog) = {
                let queued = |id: u64| st.queue.contains_key(&id);
                let flying = |id: u64| st.flying.contains(&id);
                self.cml.connected_head(queued, flying)
            };
            if batch.is_empty() {
                (batch, backlog && st.in_flight == 0, Vec::new(), 0)
            } else {
                let waiters: Vec<(u64, Queued)> = batch
                    .iter()
                    .filter_map(|r| st.queue.remove(&r.store_id).map(|q| (r.store_id, q)))
                    .collect();
                // Sent while another is unanswered: only after it.
                let after = if st.in_flight > 0 { st.last_top } else { 0 };
                st.in_flight += 1;
                st.flying.extend(batch.iter().map(|r| r.store_id));
                st.last_top = batch.iter().map(|r| r.store_id).max().unwrap_or(0);
                (batch, false, waiters, after)
            }
        };
        if batch.is_empty() {
            if backlog {
                if let Err(e) = self.reintegrate_holding(&token, None) {
                    // The records queued behind the backlog cannot go
                    // either: their writers hear why now (no server:
                    // they keep their records; a full server: the
                    // back-off's error), instead of leading again and
                    // again into the same failure.
                    let queued: Vec<Queued> = std::mem::take(&mut out.state.lock().queue)
                        .into_values()
                        .collect();
                    for q in queued {
                        q.mail.put(Err(dup(&e)));
                    }
                }
            }
            // A backlog behind batches in flight: the last answer kicks.
            return;
        }
        let ids: Vec<u64> = batch.iter().map(|r| r.store_id).collect();
        let answer = match self.servers.session() {
            Err(e) => Err((None, e)),
            Ok(s) => match self.send_connected(&s, &batch, &waiters, after) {
                Err(e) => Err(e),
                Ok(sent) => {
                    Counters::add(&self.counters.batches_sent, 1);
                    // Written: the next batch may go while this one is
                    // answered.
                    drop(token);
                    let written = Instant::now();
                    let reply = sent.wait(&self.servers.interrupt);
                    if reply.is_ok() {
                        out.note_round_trip(written.elapsed());
                    }
                    Self::answer(reply, batch.len(), after)
                }
            },
        };
        self.settle(&ids, waiters, answer);
    }

    /// Upload again the data of records staged on an earlier session, then
    /// write one Reintegrate of connected records (a `ReintegrateAfter` if
    /// `after` is not 0).
    fn send_connected<'s>(
        &self,
        s: &'s Session,
        batch: &[Record],
        waiters: &[(u64, Queued)],
        after: u64,
    ) -> std::result::Result<super::conn::Sent<'s>, (Option<usize>, Error)> {
        let mut records = batch.to_vec();
        let mut inline_bytes = 0u64;
        let room = inline_room(batch);
        for (r, (_, q)) in records.iter_mut().zip(waiters) {
            let RecordOp::Store {
                fid,
                upload_id,
                length,
                ..
            } = &r.op
            else {
                continue;
            };
            if q.staged_on.as_ref().is_some_and(|x| std::ptr::eq(&**x, s)) {
                continue;
            }
            if let Some(data) = q
                .inline
                .as_ref()
                .filter(|d| d.len() as u64 == *length && inline_bytes + *length <= room)
            {
                inline_bytes += *length;
                if let RecordOp::Store {
                    fid,
                    expected_version,
                    mtime,
                    ..
                } = r.op
                {
                    r.op = RecordOp::StoreInline {
                        fid,
                        expected_version,
                        mtime,
                        data: data.clone(),
                    };
                }
                continue;
            }
            let f = std::fs::File::open(self.cache.container(*fid))
                .map_err(|e| (None, Error::io("reopening a container", e)))?;
            s.upload(*upload_id, &f, *length, &self.servers.interrupt)
                .map_err(|e| (None, e))?;
        }
        let msg = if after == 0 {
            Msg::Reintegrate { records }
        } else {
            Msg::ReintegrateAfter { after, records }
        };
        s.send_raw(&msg, &self.servers.interrupt)
            .map_err(|e| (None, e))
    }

    /// The inline form of a Store: its container's first `length` bytes
    /// carried in the record (None for another record).
    fn inline_store(&self, op: &RecordOp) -> Result<Option<RecordOp>> {
        let RecordOp::Store {
            fid,
            expected_version,
            length,
            mtime,
            ..
        } = op
        else {
            return Ok(None);
        };
        let f = std::fs::File::open(self.cache.container(*fid))
            .map_err(|e| Error::io("reopening a container", e))?;
        let mut data = Vec::with_capacity(*length as usize);
        std::io::Read::read_to_end(&mut std::io::Read::take(&f, *length), &mut data)
            .map_err(|e| Error::io("reading a container", e))?;
        if data.len() as u64 != *length {
            return Err(Error::Eio(format!(
                "container of {fid} holds {} of the {length} bytes to store",
                data.len()
            )));
        }
        Ok(Some(RecordOp::StoreInline {
            fid: *fid,
            expected_version: *expected_version,
            mtime: *mtime,
            data,
        }))
    }

    /// The server's answer to a batch of `n` connected records:
    /// `Err((index, e))` when it refused record `index`; `Ok(None)` when a
    /// pipelined batch was not applied because the one before it was not.
    fn answer(
        reply: Result<Msg>,
        n: usize,
        after: u64,
    ) -> std::result::Result<Option<Vec<Attr>>, (Option<usize>, Error)> {
        match reply.map_err(|e| (None, e))? {
            Msg::Reintegrated { results } if results.len() == n => Ok(Some(results)),
            Msg::Error {
                code: WireCode::NotApplied,
                ..
            } if after != 0 => Ok(None),
            Msg::Error {
                code,
                index,
                message,
            } if (index as usize) < n => {
                Err((Some(index as usize), Error::from_wire(code, message)))
            }
            Msg::Error { code, message, .. } => Err((None, Error::from_wire(code, message))),
            m => Err((
                None,
                Error::Protocol(format!("Reintegrate answered with {m:?}")),
            )),
        }
    }

    /// Hand the writers of a batch its answer: applied, each its attr; not
    /// applied (after an earlier failure), all go again; a refused record's
    /// writer hears why and the others go again (the batch is atomic);
    /// no answer, all hear the error. After any failure nothing more is sent
    /// until every batch in flight is answered.
    fn settle(
        &self,
        ids: &[u64],
        waiters: Vec<(u64, Queued)>,
        answer: std::result::Result<Option<Vec<Attr>>, (Option<usize>, Error)>,
    ) {
        let out = &self.outbox;
        if let Ok(Some(attrs)) = &answer {
            // If this fails the records stay logged and are sent again
            // later: the server answers them as replays. Done before the
            // batch leaves the flight, so the next batch never starts at a
            // record still in the log as if unsent.
            let applied: Vec<(crate::proto::Fid, u64)> =
                attrs.iter().map(|a| (a.fid, a.version)).collect();
            let _ = self.cml.finish_acked(ids, &applied);
            Counters::add(&self.counters.reintegrations, 1);
            Counters::add(&self.counters.records_reintegrated, ids.len() as u64);
        }
        let mut tell: Vec<(Queued, Result<Attr>)> = Vec::new();
        {
            let mut st = out.state.lock();
            st.in_flight -= 1;
            for id in ids {
                st.flying.remove(id);
            }
            match answer {
                Ok(Some(results)) => {
                    for ((_, q), a) in waiters.into_iter().zip(results) {
                        tell.push((q, Ok(a)));
                    }
                }
                Ok(None) => {
                    Counters::add(&self.counters.batches_not_applied, 1);
                    st.halted = true;
                    for (id, q) in waiters {
                        st.queue.insert(id, q);
                    }
                }
                Err((Some(index), e)) => {
                    // The refused record heads the log until its writer
                    // removes it (and kicks).
                    st.halted = true;
                    for (i, (id, q)) in waiters.into_iter().enumerate() {
                        if i == index {
                            tell.push((q, Err(dup(&e))));
                        } else {
                            st.queue.insert(id, q);
                        }
                    }
                }
                Err((None, e)) => {
                    st.halted = true;
                    for (_, q) in waiters {
                        tell.push((q, Err(dup(&e))));
                    }
                }
            }
            if st.in_flight == 0 {
                st.halted = false;
            }
        }
        for (q, r) in tell {
            q.mail.put(r);
        }
        out.free.notify_all();
        out.kick();
    }

    /// Send the pending log (only records older than `min_age`, if given)
    /// in batches until it is empty, a server cannot be reached (the error),
    /// or the rest is too young.
    pub(crate) fn reintegrate_pending(&self, min_age: Option<Duration>) -> Result<()> {
        let token = self.outbox.token(self.servers.timing().rpc_timeout)?;
        self.reintegrate_holding(&token, min_age)
    }

    /// As `reintegrate_pending`, for the holder of the token.
    fn reintegrate_holding(&self, _token: &Token<'_>, min_age: Option<Duration>) -> Result<()> {
        let r = self.reintegrate_batches(min_age);
        match &r {
            Ok(()) => self.backoff.reset(),
            Err(e) if space_error(e) => {
                // Keep the records; wait before the next try (the
                // reintegrator skips its turns until then) and say why.
                let wait = self.backoff.start(e);
                Counters::add(&self.counters.space_refusals, 1);
                self.callbacks.events.emit(Event::ReintegrationStalled {
                    code: e.code(),
                    message: e.to_string(),
                    pending: self.cml.len() as u64,
                    retry_ms: wait.as_millis() as u64,
                });
            }
            Err(_) => {}
        }
        r
    }

    fn reintegrate_batches(&self, min_age: Option<Duration>) -> Result<()> {
        // The records due are those logged before the turn began: a cut-off
        // taken again for each batch would chase the records a busy writer
        // logs meanwhile, one or two per round trip, each batch with its
        // two durable log commits (write-back `tar -x`: hundreds of batches
        // a second, their syncs queued with the writer's own). What ages
        // during the turn goes at the next one, within the bound.
        let older = match min_age.map(|a| Instant::now().checked_sub(a)) {
            // The clock has not run that long: nothing is due yet.
            Some(None) => return Ok(()),
            cut => cut.flatten(),
        };
        loop {
            match self.one_batch(older)? {
                Step::Done => {
                    if self.cml.len() == 0 {
                        self.on_empty.log_emptied();
                    }
                    return Ok(());
                }
                Step::Next => {}
                Step::Refused(id, e) => Conflicts {
                    cache: self.cache,
                    cml: self.cml,
                    callbacks: self.callbacks,
                }
                .make(id, &e)?,
            }
        }
    }

    /// Send one batch of the records logged before `older` (all if None).
    fn one_batch(&self, older: Option<Instant>) -> Result<Step> {
        {
            let mut batch =
                self.cml
                    .next_batch(BATCH_RECORDS.min(MAX_BATCH), BATCH_BYTES, older)?;
            if batch.is_empty() {
                return Ok(Step::Done);
            }
            let s = self.servers.session()?;
            // Upload the data of the stores: the container as it is now (a
            // later write would only be stored again by a later record).
            let mut data = 0u64;
            let mut inline_bytes = 0u64;
            let room = inline_room(&batch);
            let mut inlined = BTreeSet::new();
            let mut cut = batch.len();
            for (i, r) in batch.iter_mut().enumerate() {
                let RecordOp::Store {
                    fid,
                    upload_id,
                    length,
                    ..
                } = &mut r.op
                else {
                    continue;
                };
                if i > 0 && data >= BATCH_DATA {
                    cut = i;
                    break;
                }
                let path = self.cache.container(*fid);
                let f = match std::fs::File::open(&path) {
                    Ok(f) => f,
                    Err(e) => {
                        // The only copy is gone: say so (as a conflict the
                        // user sees) rather than drop the record silently.
                        return Ok(Step::Refused(
                            r.store_id,
                            Error::io(format!("local copy {}", path.display()), e),
                        ));
                    }
                };
                let len = f
                    .metadata()
                    .map_err(|e| Error::io("sizing a container", e))?
                    .len();
                // Shorter than when it was logged, with nothing since that
                // explains it: its data was lost (a power cut before the
                // container reached the disk). Never send that over the
                // server's copy: keep it as a conflict the user sees.
                let in_use = self.cache.get(*fid).is_some_and(|e| e.open > 0);
                if len < *length && !in_use && !self.cml.resized_after(*fid, r.store_id) {
                    return Ok(Step::Refused(
                        r.store_id,
                        Error::Eio(format!(
                            "local copy {} has {len} of the {} bytes logged: data lost locally \
                             (a crash before it reached the disk); the server's copy is kept",
                            path.display(),
                            *length
                        )),
                    ));
                }
                *length = len;
                if len <= MAX_INLINE as u64 && inline_bytes + len <= room && inline_enabled() {
                    // Carried in the record: no upload round trip.
                    inline_bytes += len;
                    inlined.insert(r.store_id);
                    continue;
                }
                s.upload(*upload_id, &f, len, &self.servers.interrupt)?;
                data += len;
            }
            batch.truncate(cut);
            let mut wire = Vec::with_capacity(batch.len());
            for r in &batch {
                let op = match &r.op {
                    RecordOp::Store { .. } if inlined.contains(&r.store_id) => {
                        match self.inline_store(&r.op) {
                            Ok(op) => op.expect("a store"),
                            Err(e) => return Ok(Step::Refused(r.store_id, e)),
                        }
                    }
                    op => op.clone(),
                };
                wire.push(Record {
                    store_id: r.store_id,
                    op,
                });
            }
            let (wire, carried_by) = merge_creates(&wire);
            let reply = s.call_raw(
                &Msg::Reintegrate {
                    records: wire.clone(),
                },
                &self.servers.interrupt,
            )?;
            // Back to one answer per record of the log.
            let reply = match reply {
                Msg::Reintegrated { results } if results.len() == wire.len() => Msg::Reintegrated {
                    results: carried_by.iter().map(|w| results[*w].clone()).collect(),
                },
                Msg::Error {
                    code,
                    index,
                    message,
                } if (index as usize) < wire.len() => Msg::Error {
                    code,
                    index: carried_by
                        .iter()
                        .position(|w| *w == index as usize)
                        .unwrap_or(0) as u32,
                    message,
                },
                m => m,
            };
            match reply {
                Msg::Reintegrated { results } if results.len() == batch.len() => {
                    let ids: Vec<u64> = batch.iter().map(|r| r.store_id).collect();
                    let applied: Vec<_> = batch
                        .iter()
                        .zip(&results)
                        .map(|(r, a)| (r.op.target(), a.version))
                        .collect();
                    let done = self.cml.finish(&ids, &applied)?;
                    for (r, a) in done.iter().zip(&results) {
                        if let Some(fid) = super::cml::stored(&r.op) {
                            if !self.cml.has_store(fid) {
                                self.cache.unpin(fid);
                                if self.cache.get(fid).is_none() {
                                    // Forgotten while pinned: now garbage.
                                    let _ = std::fs::remove_file(self.cache.container(fid));
                                }
                            }
                            // The container is now that version's contents.
                            // In memory only: start-up clears every dirty
                            // flag anyway, and an index transaction per
                            // record here was most of a backlog's cost.
                            self.cache.change(None, fid, |e| {
                                if e.data_version == Some(a.version) {
                                    e.dirty = false;
                                }
                            });
                        }
                    }
                    Counters::add(&self.counters.reintegrations, 1);
                    Counters::add(&self.counters.records_reintegrated, ids.len() as u64);
                    self.callbacks.events.emit(Event::Reintegrated {
                        records: ids.len() as u64,
                        remaining: self.cml.len() as u64,
                    });
                    Ok(Step::Next)
                }
                Msg::Error {
                    code,
                    index,
                    message,
                } if (index as usize) < batch.len() => {
                    let id = batch[index as usize].store_id;
                    let e = Error::from_wire(code, message);
                    if space_error(&e) {
                        // Not the record's fault: it stays in the log.
                        return Err(e);
                    }
                    Ok(Step::Refused(id, e))
                }
                Msg::Error { code, message, .. } => Err(Error::from_wire(code, message)),
                m => Err(Error::Protocol(format!("Reintegrate answered with {m:?}"))),
            }
        }
    }
}

enum Step {
    Done,
    Next,
    /// The server refused record `id` (or its data is gone).
    Refused(u64, Error),
}

/// The same error again, for each writer of a batch that failed as one.
fn dup(e: &Error) -> Error {
    match e {
        Error::Io { context, source } => Error::io(
            context.clone(),
            std::io::Error::new(source.kind(), source.to_string()),
        ),
        Error::NotFound(m) => Error::NotFound(m.clone()),
        Error::Exists(m) => Error::Exists(m.clone()),
        Error::NotDir(m) => Error::NotDir(m.clone()),
        Error::IsDir(m) => Error::IsDir(m.clone()),
        Error::NotEmpty(m) => Error::NotEmpty(m.clone()),
        Error::Invalid(m) => Error::Invalid(m.clone()),
        Error::Access(m) => Error::Access(m.clone()),
        Error::NameTooLong(m) => Error::NameTooLong(m.clone()),
        Error::Loop(m) => Error::Loop(m.clone()),
        Error::NoSpace(m) => Error::NoSpace(m.clone()),
        Error::Quota(m) => Error::Quota(m.clone()),
        Error::Conflict(m) => Error::Conflict(m.clone()),
        Error::Protocol(m) => Error::Protocol(m.clone()),
        Error::Auth(m) => Error::Auth(m.clone()),
        Error::Stale(m) => Error::Stale(m.clone()),
        Error::Timeout(m) => Error::Timeout(m.clone()),
        Error::Again(m) => Error::Again(m.clone()),
        Error::NotApplied(m) => Error::NotApplied(m.clone()),
        Error::Eio(m) => Error::Eio(m.clone()),
        Error::BadHandle(m) => Error::BadHandle(m.clone()),
        Error::Panic(m) => Error::Panic(m.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Fid, Timespec};

    fn create(id: u64, fid: Fid) -> Record {
        Record {
            store_id: id,
            op: RecordOp::Create {
                parent: Fid::new(1, 1, 1),
                name: format!("n{id}"),
                fid,
                mode: 0o600,
                mtime: Timespec { sec: 1, nsec: 0 },
                uid: 5,
                gid: 6,
            },
        }
    }

    fn inline(id: u64, fid: Fid, data: &[u8]) -> Record {
        Record {
            store_id: id,
            op: RecordOp::StoreInline {
                fid,
                expected_version: 0,
                mtime: Timespec { sec: 9, nsec: 0 },
                data: data.to_vec(),
            },
        }
    }

    #[test]
    fn the_hold_knob_is_off_or_records_and_microseconds_bounded() {
        assert_eq!(
            parse_hold("4:600"),
            Hold::Fixed(4, Duration::from_micros(600))
        );
        assert_eq!(
            parse_hold(" 3 : 99999"),
            Hold::Fixed(3, Duration::from_millis(10))
        );
        assert_eq!(parse_hold("off"), Hold::Off);
        assert_eq!(parse_hold("1:600"), Hold::Active, "one record is no hold");
        assert_eq!(parse_hold("4"), Hold::Active);
        assert_eq!(parse_hold("x:1"), Hold::Active);
    }

    #[test]
    fn the_recent_peak_of_outstanding_records_is_kept_for_its_window() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let w = Duration::from_millis(4);
        // Writers in turn never have more than one record outstanding.
        let mut p = (0, t0);
        for ms in 0..10 {
            p = recent_peak(p, 1, at(ms), w);
        }
        assert_eq!(p.0, 1);
        // Four at once: kept while lower counts follow within the window...
        p = recent_peak(p, 4, at(10), w);
        p = recent_peak(p, 2, at(12), w);
        assert_eq!(p, (4, at(10)));
        // ... and renewed whenever reached again ...
        p = recent_peak(p, 4, at(13), w);
        p = recent_peak(p, 1, at(16), w);
        assert_eq!(p, (4, at(13)));
        // ... and given up once older than the window.
        p = recent_peak(p, 1, at(18), w);
        assert_eq!(p, (1, at(18)));
    }

    #[test]
    fn inline_data_never_takes_a_batch_past_one_frame() {
        assert_eq!(inline_room(&[]), INLINE_BATCH);
        let xattr = |id: u64| Record {
            store_id: id,
            op: RecordOp::SetXattr {
                fid: Fid::new(1, 10, 1),
                name: "user.big".into(),
                how: crate::proto::XattrHow::Set,
                value: vec![0; 64 << 10],
            },
        };
        let heavy: Vec<Record> = (1..=12).map(xattr).collect();
        let own = crate::client::cml::encode_records(&heavy).len() as u64;
        let room = inline_room(&heavy);
        assert!(room < INLINE_BATCH);
        assert!(own + room + (64 << 10) <= crate::proto::MAX_FRAME as u64);
    }

    #[test]
    fn a_create_and_the_inline_store_right_after_it_merge_into_one_record() {
        let (a, b, c) = (Fid::new(1, 10, 1), Fid::new(1, 11, 1), Fid::new(1, 12, 1));
        let batch = vec![
            create(1, a),
            inline(2, a, b"aa"),
            create(3, b),
            create(4, c),
            inline(5, c, b"cc"),
            // Not right after its create: kept apart.
            inline(6, b, b"bb"),
            // A store of a file the server has stays a store.
            inline(7, a, b"again"),
        ];
        let (wire, carried_by) = merge_creates(&batch);
        assert_eq!(carried_by, vec![0, 0, 1, 2, 2, 3, 4]);
        assert_eq!(wire.len(), 5);
        match &wire[0].op {
            RecordOp::CreateWith {
                fid,
                name,
                mode,
                mtime,
                uid,
                gid,
                data,
                ..
            } => {
                assert_eq!(
                    (*fid, name.as_str(), *mode, *uid, *gid),
                    (a, "n1", 0o600, 5, 6)
                );
                assert_eq!(mtime.sec, 9, "the store's time");
                assert_eq!(data, b"aa");
            }
            op => panic!("{op:?}"),
        }
        assert_eq!(
            wire[0].store_id, 2,
            "the store's id: the highest of the two"
        );
        assert!(matches!(wire[1].op, RecordOp::Create { fid, .. } if fid == b));
        assert!(
            matches!(&wire[2].op, RecordOp::CreateWith { fid, data, .. } if *fid == c && data == b"cc")
        );
        assert_eq!(wire[2].store_id, 5);
        assert!(matches!(wire[3].op, RecordOp::StoreInline { fid, .. } if fid == b));
        assert!(matches!(wire[4].op, RecordOp::StoreInline { fid, .. } if fid == a));
        let ids: Vec<u64> = wire.iter().map(|r| r.store_id).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    }
}
