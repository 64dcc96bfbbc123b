//! The client's mode: connected, write-disconnected, emulating (no server
//! answers), held by the operator (`coda disconnect`), or failed over. One
//! value behind one lock, and every transition is a method here.
//!
//! Leaving "connected" releases every call that started while connected at
//! once (`Interrupt::release`): a call waiting for a reply, a handshake or
//! a place at the connect gate ends with `Eio` and is answered in the new
//! mode (emulation serves it from the cache). A failover stops every call,
//! and every later one, until failback (`Interrupt::trigger`).

use std::path::PathBuf;

use parking_lot::Mutex;

use super::conn::Interrupt;
use crate::Error;

/// The one rule for "no server answers (or its answer was lost)", as
/// opposed to a server's refusal or a local failure. The connection layer
/// reports a server's silence, a reset, a refused connect or an interrupt
/// as `Eio` or `Timeout` and nothing else; local store (redb, containers)
/// failures are `Error::Io` and never count. (A server's own I/O error
/// reply also arrives as `Eio`: the server cannot apply now; the record is
/// kept and retried, like a silence.)
pub(crate) fn unreachable(e: &Error) -> bool {
    matches!(e, Error::Eio(_) | Error::Timeout(_))
}

/// The mode as one value (derived from the state below, in this order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ModeKind {
    /// Every mutation goes to the server before the call returns.
    Connected,
    /// Connected, but mutations are only logged and sent in aged batches.
    WriteDisconnected,
    /// No server answers: the cache serves, mutations are logged.
    Emulating,
    /// The operator disconnected the client; nothing is sent until
    /// `Client::reconnect`.
    OperatorHeld,
    /// Failed over: remote operations fail with `Eio` until failback.
    FailedOver,
}

/// Where the link pointed before failover, so failback can restore it.
#[derive(Clone)]
pub(crate) struct FailedOver {
    pub link: PathBuf,
    pub before: PathBuf,
}

#[derive(Default)]
struct State {
    /// Disconnected operation is configured (and no automatic failover).
    enabled: bool,
    /// Serving from the cache (no server answered, or the operator held us).
    emulating: bool,
    /// The operator disconnected us.
    held: bool,
    write_disconnected: bool,
    /// Failed over; with the record of the first failover's link, if any.
    failed_over: bool,
    failback: Option<FailedOver>,
}

/// One lock for the whole mode. It guards only these flags: it is never
/// held across a network wait, an fsync or a link swap.
pub(crate) struct Mode {
    state: Mutex<State>,
}

impl Mode {
    pub fn new(enabled: bool) -> Mode {
        Mode {
            state: Mutex::new(State {
                enabled,
                ..State::default()
            }),
        }
    }

    pub fn kind(&self) -> ModeKind {
        let s = self.state.lock();
        if s.failed_over {
            ModeKind::FailedOver
        } else if s.held {
            ModeKind::OperatorHeld
        } else if s.emulating {
            ModeKind::Emulating
        } else if s.write_disconnected {
            ModeKind::WriteDisconnected
        } else {
            ModeKind::Connected
        }
    }

    /// Configure at start (the config's keys).
    pub fn configure(&self, enabled: bool, write_disconnected: bool) {
        let mut s = self.state.lock();
        s.enabled = enabled;
        s.write_disconnected = write_disconnected;
    }

    pub fn enabled(&self) -> bool {
        self.state.lock().enabled
    }

    /// Serving from the cache (emulating, or held by the operator with
    /// disconnected operation on).
    pub fn emulating(&self) -> bool {
        self.state.lock().emulating
    }

    pub fn write_disconnected(&self) -> bool {
        self.state.lock().write_disconnected
    }

    pub fn held(&self) -> bool {
        self.state.lock().held
    }

    pub fn failed_over(&self) -> bool {
        self.state.lock().failed_over
    }

    /// Remote operations are stopped: failed over, or held by the
    /// operator without disconnected operation.
    pub fn remote_stopped(&self) -> bool {
        let s = self.state.lock();
        s.failed_over || (s.held && !s.enabled)
    }

    pub fn failback_record(&self) -> Option<FailedOver> {
        self.state.lock().failback.clone()
    }

    pub fn set_write_disconnected(&self, on: bool) {
        self.state.lock().write_disconnected = on;
    }

    /// No server answers (a call's network failure, or the prober's
    /// verdict). With disconnected operation on, not failed over, and a
    /// known root (`root_known`), the client emulates from now on; the
    /// calls that started while connected are released into that mode at
    /// once. Returns whether the client emulates.
    pub fn server_lost(&self, root_known: bool, interrupt: &Interrupt) -> bool {
        let mut s = self.state.lock();
        if !s.enabled || s.failed_over || !root_known {
            return false;
        }
        let was = s.emulating;
        s.emulating = true;
        drop(s);
        if !was {
            // After the flag is set: a call that reads the generation
            // after this release reads the mode after it too.
            interrupt.release("the client went disconnected (no server answers)");
        }
        true
    }

    /// A server answers, the log went through and the cache is
    /// revalidated: connected again (unless the operator holds us).
    pub fn reconnected(&self) {
        let mut s = self.state.lock();
        if !s.held {
            s.emulating = false;
        }
    }

    /// Start with the cache: no server answered at start.
    pub fn start_emulating(&self) {
        self.state.lock().emulating = true;
    }

    /// `coda disconnect`. `Err(())` while failed over (failback is the
    /// way back from there). With disconnected operation on, the client
    /// emulates; otherwise every remote operation fails with `Eio` (the
    /// interrupt) until `unhold`.
    pub fn hold(&self, interrupt: &Interrupt, reason: &str) -> Result<(), ()> {
        let mut s = self.state.lock();
        if s.failed_over {
            return Err(());
        }
        s.held = true;
        if s.enabled {
            let was = s.emulating;
            s.emulating = true;
            drop(s);
            if !was {
                interrupt.release(reason);
            }
        } else {
            drop(s);
            interrupt.trigger(reason);
        }
        Ok(())
    }

    /// Undo `hold` (before trying the servers again). Returns whether we
    /// were held; the interrupt of a hold without emulation is cleared.
    pub fn unhold(&self, interrupt: &Interrupt) -> bool {
        let mut s = self.state.lock();
        let was = std::mem::replace(&mut s.held, false);
        if was && !s.enabled && !s.failed_over {
            interrupt.clear();
        }
        was
    }

    /// Whether a failover has happened and not been undone; records the
    /// first failover's link (failback restores it) and stops every call.
    pub fn fail_over(&self, record: Option<FailedOver>, interrupt: &Interrupt, reason: &str) {
        let mut s = self.state.lock();
        s.failed_over = true;
        // A second failover keeps the first one's record: failback
        // restores what the link pointed to before the outage.
        if s.failback.is_none() {
            s.failback = record;
        }
        drop(s);
        interrupt.trigger(reason);
    }

    /// Failback: let remote operations through again.
    pub fn fail_back(&self, interrupt: &Interrupt) {
        let mut s = self.state.lock();
        s.failed_over = false;
        s.failback = None;
        interrupt.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_store_failure_is_never_taken_for_a_lost_server() {
        let redb_failures = [
            redb::Error::DatabaseAlreadyOpen,
            redb::Error::Corrupted("bad page".into()),
            redb::Error::Io(std::io::Error::other("disk")),
            redb::Error::PreviousIo,
        ];
        for e in redb_failures {
            let e = Error::from(e);
            assert!(matches!(e, Error::Io { .. }), "{e:?}");
            assert!(!unreachable(&e), "{e:?}");
            assert_eq!(e.code(), -libc::EIO);
        }
        assert!(!unreachable(&Error::io(
            "reading a cache container",
            std::io::Error::other("x")
        )));
        assert!(unreachable(&Error::Eio("server a: connection lost".into())));
        assert!(unreachable(&Error::Timeout("no reply".into())));
        assert!(!unreachable(&Error::NoSpace("full".into())));
    }

    #[test]
    fn the_mode_is_one_value_and_leaving_connected_releases_calls() {
        let i = Interrupt::new();
        let m = Mode::new(true);
        assert_eq!(m.kind(), ModeKind::Connected);
        m.set_write_disconnected(true);
        assert_eq!(m.kind(), ModeKind::WriteDisconnected);
        m.set_write_disconnected(false);
        let call = i.enter_call();
        assert!(i.check().is_ok());
        assert!(!m.server_lost(false, &i), "no root known: nothing to serve");
        assert!(m.server_lost(true, &i));
        assert_eq!(m.kind(), ModeKind::Emulating);
        assert!(
            i.check().is_err(),
            "a call begun while connected is released"
        );
        drop(call);
        assert!(
            i.check().is_ok(),
            "later calls (the reintegrator's) are not"
        );
        m.reconnected();
        assert_eq!(m.kind(), ModeKind::Connected);
        m.hold(&i, "held").unwrap();
        assert_eq!(m.kind(), ModeKind::OperatorHeld);
        m.reconnected();
        assert!(m.emulating(), "held stays emulating");
        assert!(m.unhold(&i));
        m.fail_over(None, &i, "failed over");
        assert_eq!(m.kind(), ModeKind::FailedOver);
        assert!(!m.server_lost(true, &i), "failed over never emulates");
        assert!(m.hold(&i, "held").is_err());
        m.fail_back(&i);
        assert!(i.check().is_ok());
    }

    #[test]
    fn without_emulation_a_hold_stops_remote_calls_until_unhold() {
        let i = Interrupt::new();
        let m = Mode::new(false);
        assert!(!m.server_lost(true, &i));
        m.hold(&i, "held").unwrap();
        assert!(i.check().is_err());
        assert!(m.unhold(&i));
        assert!(i.check().is_ok());
    }
}
