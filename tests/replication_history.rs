//! A randomized history test in the style of Jepsen (issue 14): three
//! clients (each its own `Client` with its own cache, in threads of this
//! process) read and write unique values on three files of a replicated
//! group of three real coda-server processes, while a scheduler kills,
//! stops and cuts off members. Every operation is recorded with its
//! invocation and completion times and its outcome; a checker then
//! asserts:
//!
//! 1. every acknowledged write is in the final state unless a later
//!    acknowledged write replaced it;
//! 2. no read returns a value that was never written;
//! 3. a read that starts after another client's write was acknowledged
//!    (both connected) returns that value or a later one.
//!
//! A write counts as acknowledged when `close` returned success and the
//! client's log was empty right after (the group committed it); one that
//! returned with records still logged (disconnected) is "unknown": it may
//! reach the group later. Bounded: about 40 s of operations. The run and
//! the checker are in `tests/replication_util/history.rs`;
//! `cargo bench --bench history` runs the same history for 5 minutes.

mod common;
mod replication_util;

use std::time::Duration;

use replication_util::history;

/// The run under `cargo test` (`benches/history.rs` runs it longer).
const RUN: Duration = Duration::from_secs(40);

#[test]
fn random_histories_under_kills_stops_and_cuts_are_consistent() {
    let seed = history::seed_from_env();
    // CODA_HISTORY_RUN_S: a shorter (or longer) run, to repeat one phase.
    let run = history::run_from_env(RUN);
    let r = history::run(seed, run);
    let (writes, reads) = (r.writes(), r.reads());
    eprintln!(
        "history: {} ops, {writes} acknowledged writes, {reads} reads, faults {:?}",
        r.ops.len(),
        r.faults
    );
    assert!(
        (writes > 20 && reads > 20) || run < RUN,
        "too little happened: {writes} writes, {reads} reads"
    );
    assert!(r.violations.is_empty(), "{}", r.failure());
}
