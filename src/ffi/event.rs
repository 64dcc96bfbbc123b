//! Events for C: pull them with a timeout, or register a callback that runs
//! on a library thread.

use std::ffi::{c_char, c_int, c_void};
use std::sync::Arc;
use std::time::Duration;

use super::client::{client, coda_client};
use super::{boundary, out_ptr};
use crate::client::event::Event;
use crate::Error;

/// A server stopped answering (`detail` names it).
pub const CODA_EVENT_SERVER_DOWN: u32 = 1;
/// A server answers again (`detail` names it).
pub const CODA_EVENT_SERVER_UP: u32 = 2;
/// Failover happened (`detail` is "LINK -> TARGET").
pub const CODA_EVENT_FAILOVER: u32 = 3;
/// Failback happened (`detail` is "LINK -> TARGET").
pub const CODA_EVENT_FAILBACK: u32 = 4;
/// A server broke a callback (`ino` names the object).
pub const CODA_EVENT_CALLBACK_BREAK: u32 = 5;

/// A reintegration batch committed (`detail`: "N records, M left").
pub const CODA_EVENT_REINTEGRATED: u32 = 6;
/// Reintegration found a conflict (`ino` names the object; `detail` is
/// "conflict ID: PATH"; list them with `coda_conflicts_list`).
pub const CODA_EVENT_CONFLICT: u32 = 7;
/// Reintegration is backing off because the server is out of space or the
/// volume's quota is reached; the records stay pending (`ino` is the
/// negative errno's magnitude, ENOSPC or EDQUOT; `detail` is "N records
/// pending, retry in MS ms: MESSAGE").
pub const CODA_EVENT_REINTEGRATION_STALLED: u32 = 8;
/// A replicated group elected a new leader, which the client now talks to
/// (`detail` is "ADDR term T": the leader's group address and term).
pub const CODA_EVENT_LEADER_CHANGED: u32 = 9;
/// The group's leader stopped hearing from a member (`detail` names its
/// group address); the group goes on while a majority answers.
pub const CODA_EVENT_MEMBER_DOWN: u32 = 10;
/// A member of the group answers its leader again (`detail` names it).
pub const CODA_EVENT_MEMBER_UP: u32 = 11;

/// Bytes of `coda_event.detail`, NUL included.
pub const CODA_EVENT_DETAIL_LEN: usize = 256;

/// One event. Plain data: copy it freely.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct coda_event {
    /// One of `CODA_EVENT_*`.
    pub kind: u32,
    /// The object's inode number, for callback breaks; 0 otherwise.
    pub ino: u64,
    /// NUL-terminated detail text (server address, or "LINK -> TARGET"),
    /// truncated to fit.
    pub detail: [c_char; CODA_EVENT_DETAIL_LEN],
}

impl From<&Event> for coda_event {
    fn from(ev: &Event) -> coda_event {
        let (ino, text) = match ev {
            Event::ServerDown { server } | Event::ServerUp { server } => (0, server.clone()),
            Event::LeaderChanged { leader, term } => (0, format!("{leader} term {term}")),
            Event::MemberDown { member } | Event::MemberUp { member } => (0, member.clone()),
            Event::Failover { link, target } | Event::Failback { link, target } => {
                (0, format!("{link} -> {target}"))
            }
            Event::CallbackBreak { fid } => (fid.ino(), fid.to_string()),
            Event::Reintegrated { records, remaining } => {
                (0, format!("{records} records, {remaining} left"))
            }
            Event::Conflict { id, fid, path } => (fid.ino(), format!("conflict {id}: {path}")),
            Event::ReintegrationStalled {
                code,
                message,
                pending,
                retry_ms,
            } => (
                code.unsigned_abs() as u64,
                format!("{pending} records pending, retry in {retry_ms} ms: {message}"),
            ),
        };
        let mut detail = [0 as c_char; CODA_EVENT_DETAIL_LEN];
        let mut n = text.len().min(CODA_EVENT_DETAIL_LEN - 1);
        while !text.is_char_boundary(n) {
            n -= 1;
        }
        for (d, s) in detail.iter_mut().zip(&text.as_bytes()[..n]) {
            *d = *s as c_char;
        }
        coda_event {
            kind: ev.kind_code(),
            ino,
            detail,
        }
    }
}

/// Wait up to `timeout_ms` (0: don't wait; negative: `-EINVAL`) for the
/// client's next event and copy it to `*out`. Returns 0 with an event, or
/// `-EAGAIN` when none came in time. Events are queued (the oldest dropped
/// past 1024) whether or not a callback is registered.
#[no_mangle]
pub extern "C" fn coda_event_next(
    client: *mut coda_client,
    out: *mut coda_event,
    timeout_ms: c_int,
) -> c_int {
    boundary(|| {
        let c = self::client(client)?;
        let out = out_ptr(out, "out")?;
        let ms = u64::try_from(timeout_ms)
            .map_err(|_| Error::Invalid(format!("timeout_ms {timeout_ms} is negative")))?;
        match c.events().next(Duration::from_millis(ms)) {
            Some(ev) => {
                // SAFETY: checked non-NULL above.
                unsafe { *out = coda_event::from(&ev) };
                Ok(0)
            }
            None => Err(Error::Again(format!("no event within {ms} ms"))),
        }
    })
}

struct UserData(*mut c_void);
// SAFETY: the C caller registered `userdata` for use from a library thread.
unsafe impl Send for UserData {}
unsafe impl Sync for UserData {}

/// Register `cb(userdata, event)` to be called for every later event, on a
/// library thread (one at a time, in order); `event` is borrowed for the
/// call. NULL `cb` removes the callback. The callback may call into the
/// library, including this function.
#[no_mangle]
pub extern "C" fn coda_event_set_callback(
    client: *mut coda_client,
    cb: Option<extern "C" fn(userdata: *mut c_void, event: *const coda_event)>,
    userdata: *mut c_void,
) -> c_int {
    boundary(|| {
        let c = self::client(client)?;
        let handler = cb.map(|cb| {
            let ud = UserData(userdata);
            Arc::new(move |ev: &Event| {
                let e = coda_event::from(ev);
                let ud = &ud;
                // A panic must not unwind out of the dispatcher into nothing.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cb(ud.0, &e)));
            }) as crate::client::event::Handler
        });
        c.events().set_handler(handler);
        Ok(0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Fid;

    #[test]
    fn event_codes_match_the_client_events() {
        let s = String::from("s");
        let cases = [
            (
                Event::ServerDown { server: s.clone() },
                CODA_EVENT_SERVER_DOWN,
            ),
            (Event::ServerUp { server: s.clone() }, CODA_EVENT_SERVER_UP),
            (
                Event::Failover {
                    link: s.clone(),
                    target: s.clone(),
                },
                CODA_EVENT_FAILOVER,
            ),
            (
                Event::Failback {
                    link: s.clone(),
                    target: s.clone(),
                },
                CODA_EVENT_FAILBACK,
            ),
            (
                Event::ReintegrationStalled {
                    code: -libc::ENOSPC,
                    message: s.clone(),
                    pending: 1,
                    retry_ms: 1000,
                },
                CODA_EVENT_REINTEGRATION_STALLED,
            ),
            (
                Event::CallbackBreak {
                    fid: Fid::new(1, 2, 1),
                },
                CODA_EVENT_CALLBACK_BREAK,
            ),
        ];
        for (ev, code) in cases {
            assert_eq!(coda_event::from(&ev).kind, code);
        }
        let long = Event::ServerDown {
            server: "é".repeat(300),
        };
        let c = coda_event::from(&long);
        let text = unsafe { std::ffi::CStr::from_ptr(c.detail.as_ptr()) };
        assert!(text.to_str().is_ok(), "truncation keeps UTF-8 whole");
    }
}
