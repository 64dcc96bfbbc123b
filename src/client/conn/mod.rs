//! Connections to the servers, split by concern: `interrupt.rs` (the one
//! interrupt every blocking wait obeys), `session.rs` (the handshake, the
//! control connection and its reader thread, the bulk connection pool),
//! `servers.rs` (the server list, the current session, connecting on
//! demand).
//!
//! Rule: no lock is held across a network wait or a connect. Locks here
//! guard maps, flags and the socket writer for the duration of one
//! `write_all` only. A socket is registered with the interrupt before it
//! connects, so a failover or release stops a connect in progress too.

mod interrupt;
mod servers;
mod session;

use std::net::SocketAddr;
use std::time::Duration;

pub(crate) use interrupt::Interrupt;
pub(crate) use servers::Servers;
pub(crate) use session::Session;

/// How often a wait that cannot select on the interrupt (a lock, a
/// condvar, a connect in progress) looks at it again.
const GATE_SLICE: Duration = Duration::from_millis(5);

/// Who we are to every server: persistent id, per-start epoch, credentials.
pub(crate) struct Identity {
    pub client_id: [u8; 16],
    pub epoch: u64,
    pub user: String,
    pub secret: [u8; 32],
}

/// Timing knobs taken from the config.
#[derive(Clone, Copy)]
pub(crate) struct Timing {
    pub rpc_timeout: Duration,
    pub dead_after: Duration,
    pub bind_addr: Option<SocketAddr>,
    /// Most bulk connections of a session at once (`bulk_connections`).
    pub bulk_max: usize,
}
