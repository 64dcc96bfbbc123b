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
    /// None: `insecure_plaintext`.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

/// The TLS configuration a client config asks for: `None` with
/// `insecure_plaintext`; else `tls_ca` if set, else the fingerprints in
/// `tls_fingerprint_file` (default: `server.fingerprint` beside the secret
/// file, where it is copied with the secret).
pub(crate) fn tls_config(
    cfg: &crate::client::Config,
    secret_file: Option<&std::path::Path>,
) -> crate::Result<Option<std::sync::Arc<rustls::ClientConfig>>> {
    use crate::tls;
    if cfg.insecure_plaintext {
        return Ok(None);
    }
    let trust = match &cfg.tls_ca {
        Some(ca) => tls::Trust::Ca(ca.clone()),
        None => {
            let file = match (&cfg.tls_fingerprint_file, secret_file) {
                (Some(f), _) => f.clone(),
                (None, Some(s)) => s
                    .parent()
                    .unwrap_or(std::path::Path::new("."))
                    .join(tls::FINGERPRINT_FILE),
                // `anonymous` has no secret file to find it beside.
                (None, None) => return Err(crate::Error::Invalid(
                    "config: tls_fingerprint_file (or tls_ca) is required without a secret_file"
                        .into(),
                )),
            };
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
    /// How long a reconnect waits out a group's election
    /// (`election_wait_ms`).
    pub election_wait: Duration,
}
