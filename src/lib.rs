//! `coda`: a Coda-style distributed file system with a whole-file cache kept
//! valid by server callbacks.
//!
//! - [`proto`]: the wire format (docs/PROTOCOL.md is normative).
//! - [`server`]: Vice, the file server behind `coda-server`.
//! - [`client`]: Venus, the cache manager a program embeds.
//! - [`ffi`]: the C ABI over the client (`include/coda.h`).
// Every public item is documented, client included; a new undocumented item
// fails `cargo clippy -- -D warnings`.
#![warn(missing_docs)]

/// Venus: the client cache manager a program embeds.
///
/// cbindgen:ignore
pub mod client;
/// The crate's error type and the one place errno values are decided.
///
/// cbindgen:ignore
pub mod error;
pub mod ffi;
mod fsmode;
/// The write-ahead journal under the server's group commit (generic).
pub(crate) mod journal;
/// The wire format: frames, messages, handshake and limits.
///
/// cbindgen:ignore
pub mod proto;
/// Files of the redb version this crate used before, converted on open.
mod redb_upgrade;
/// Vice: the file server behind `coda-server`.
///
/// cbindgen:ignore
pub mod server;
/// Data extents of sparse files.
///
/// cbindgen:ignore
mod sparse;
/// The TLS layer under every connection.
///
/// cbindgen:ignore
pub mod tls;

pub use error::{Error, Result};
