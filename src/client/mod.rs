//! Venus: the client cache manager a program embeds.
//!
//! A [`Client`](crate::client::Client) keeps whole files in a local cache (`cache`), trusts them
//! while the server's callbacks hold (`callback`), talks to the server over
//! a control and bulk connections (`conn`), and sends every mutation through
//! the client modification log (`cml`). See docs/CLIENT.md.

mod acl;
mod admin;
mod api;
mod at;
mod cache;
mod callback;
mod cml;
mod config;
mod conflict;
mod conn;
pub mod control;
mod emulation;
pub mod event;
pub mod failover;
mod fids;
mod file;
mod group;
mod hoard;
mod identity;
mod index_file;
mod inner;
mod mailbox;
mod mode;
mod namei;
mod namespace;
mod owner;
mod page_journal;
mod probe;
mod reintegrate;
mod spares;
mod stamps;
mod stats;
mod tables;
mod xattr;

pub use acl::{AclInfo, WhoAmI};
pub use admin::{CachedObject, FlushReport};
pub use api::{Client, ClientState, DirEntry, SetStatus, Stat};
pub use config::Config;
pub use conflict::{Conflict, Keep};
pub use event::{Event, EventBus, Invalidation, InvalidationHook};
pub use file::File;
pub use group::{GroupMember, GroupView};
pub use hoard::{Expand, HoardEntry, HoardReport};
pub use owner::Owner;
pub use stats::ClientStats;

pub use crate::proto::{Fid, FileType, Timespec, XattrHow};
