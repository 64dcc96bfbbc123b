//! `coda`: a Coda-style distributed file system with a whole-file cache kept
//! valid by server callbacks.
//!
//! - [`proto`]: the wire format (docs/PROTOCOL.md is normative).
//! - [`server`]: Vice, the file server behind `coda-server`.
//! - [`client`]: Venus, the cache manager a program embeds.

pub mod client;
pub mod error;
pub mod proto;
pub mod server;

pub use error::{Error, Result};
