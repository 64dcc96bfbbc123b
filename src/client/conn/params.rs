//! Who the client is to every server, and the timing its connections obey.

use std::net::SocketAddr;
use std::time::Duration;

/// How often a wait that cannot select on the interrupt (a lock, a
/// condvar, a connect in progress) looks at it again.
pub(super) const GATE_SLICE: Duration = Duration::from_millis(5);

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
