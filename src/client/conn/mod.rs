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
    /// None: `insecure_plaintext`.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

/// The TLS configuration a client config asks for: `None` with
/// `insecure_plaintext`; else `tls_ca` if set, else the fingerprints in
/// `tls_fingerprint_file` (default: `server.fingerprint` beside the secret
/// file, where it is copied with the secret).
pub(crate) fn tls_config(
    cfg: &crate::client::Config,
    secret_file: &std::path::Path,
) -> crate::Result<Option<std::sync::Arc<rustls::ClientConfig>>> {
    use crate::tls;
    if cfg.insecure_plaintext {
        return Ok(None);
    }
    let trust = match &cfg.tls_ca {
        Some(ca) => tls::Trust::Ca(ca.clone()),
        None => {
            let file = cfg.tls_fingerprint_file.clone().unwrap_or_else(|| {
                secret_file
                    .parent()
                    .unwrap_or(std::path::Path::new("."))
                    .join(tls::FINGERPRINT_FILE)
            });
            tls::Trust::Pinned {
                fingerprints: tls::read_fingerprints(&file)?,
                file,
            }
        }
    };
    tls::client_config(&trust).map(Some)
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
