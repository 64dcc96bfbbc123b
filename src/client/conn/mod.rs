//! Connections to the servers, split by concern: `interrupt.rs` (the one
//! interrupt every blocking wait obeys), `session.rs` (the handshake, the
//! control connection and its reader thread, the bulk connection pool),
//! `servers.rs` (the server list, the current session, connecting on
//! demand), `params.rs` (who we are to a server, and the timing knobs).
//!
//! Rule: no lock is held across a network wait or a connect. Locks here
//! guard maps, flags and the socket writer for the duration of one
//! `write_all` only. A socket is registered with the interrupt before it
//! connects, so a failover or release stops a connect in progress too.

mod interrupt;
mod params;
mod servers;
mod session;

pub(crate) use interrupt::Interrupt;
pub(crate) use params::{tls_config, Identity, Timing};
pub(crate) use servers::Servers;
pub(crate) use session::{Sent, Session};
