//! The tables of the client's index file (`index.redb`) that more than one
//! part writes: the log's records (the CML writes them, and the index
//! writes a log record still waiting in memory with the next transaction:
//! `cache::Index::stage_riders`) and the small durable counters (the
//! log's store-id lease, the fid leases). Defined here, apart from both,
//! so neither module imports the other for them. Every other table belongs
//! to the one module that reads and writes it.

use redb::TableDefinition;

/// The CML: store id → encoded record (`cml.rs`).
pub(crate) const CML: TableDefinition<u64, &[u8]> = TableDefinition::new("cml");

/// Small durable counters of the index (store-id lease, fid leases, what
/// was sent): key → value. Written by `cml.rs` and `fids.rs`.
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
