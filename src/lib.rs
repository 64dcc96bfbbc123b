//! `coda`: a Coda-style distributed file system with a whole-file cache kept
//! valid by server callbacks. See ARCHITECTURE in the README for the words.

pub mod error;
pub mod proto;

pub use error::{Error, Result};
