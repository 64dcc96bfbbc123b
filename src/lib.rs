//! `coda`: a Coda-style distributed file system with a whole-file cache kept
//! valid by server callbacks.
//!
//! - [`proto`]: the wire format (docs/PROTOCOL.md is normative).
//! - [`server`]: Vice, the file server behind `coda-server`.
//! - [`client`]: Venus, the cache manager a program embeds.
//! - [`ffi`]: the C ABI over the client (`include/coda.h`).

/// cbindgen:ignore
pub mod client;
/// cbindgen:ignore
pub mod error;
pub mod ffi;
mod fsmode;
/// cbindgen:ignore
pub mod proto;
/// cbindgen:ignore
pub mod server;

pub use error::{Error, Result};
