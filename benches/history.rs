//! The longer run of issue 14's randomized history test: the same history
//! as `tests/replication_history.rs` (three clients reading and writing
//! unique values on three files of a group of three real coda-server
//! processes while a scheduler kills, stops and cuts off members), run for
//! minutes instead of 40 s, and checked by the same checker.
//!
//!   cargo bench --bench history                      (5 minutes)
//!   CODA_BENCH_QUICK=1 cargo bench --bench history   (60 s)
//!
//! `CODA_HISTORY_RUN_S=N` sets the run length, `CODA_HISTORY_SEED` repeats
//! a seed (both printed). A violation prints the test's failure report and
//! exits non-zero, so a long run is a real check. Under `cargo test` (no
//! `--bench` argument) a smoke run of 2 s of faults, whatever the
//! environment says about the length.

use std::time::Duration;

// The group, the run and the checker are the test's own code.
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/replication_util/mod.rs"]
mod replication_util;

use replication_util::history;

fn main() {
    let quick = std::env::var_os("CODA_BENCH_QUICK").is_some();
    // `cargo test --benches` runs benches with --bench absent: stay tiny then.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let run = if smoke {
        Duration::from_secs(2)
    } else {
        history::run_from_env(Duration::from_secs(if quick { 60 } else { 300 }))
    };
    let seed = history::seed_from_env();
    let r = history::run(seed, run);
    let ((wa, wf, wu), (ra, rf)) = r.outcomes();
    let [kills, stops, cuts] = r.faults_by_kind();
    let [p1, p2, p3] = r.violations_by_property();
    let secs = r.operating.as_secs_f64();
    println!(
        "history under faults: seed {seed}, run {} s: {secs:.1} s of operations under faults \
         ({:.1} s in all), {} operations ({:.1}/s)",
        r.run.as_secs(),
        r.elapsed.as_secs_f64(),
        r.ops.len(),
        r.ops.len() as f64 / secs
    );
    println!(
        "  writes {}: {wa} acknowledged, {wf} failed, {wu} unknown (logged while disconnected)",
        wa + wf + wu
    );
    println!("  reads {}: {ra} answered, {rf} failed", ra + rf);
    println!(
        "  faults {}: {kills} kill -9, {stops} SIGSTOP, {cuts} cut off",
        r.faults.len()
    );
    println!(
        "  leader's term {} -> {} (at most {} leader changes)",
        r.terms.0,
        r.terms.1,
        r.terms.1.saturating_sub(r.terms.0)
    );
    println!(
        "  violations {}: property 1 (acknowledged writes kept) {p1}, 2 (reads of written values) {p2}, \
         3 (no stale read after an acknowledged write) {p3}",
        r.violations.len()
    );
    if !r.violations.is_empty() {
        eprintln!("{}", r.failure());
        std::process::exit(1);
    }
    // As the test: a run of the test's length or longer must have done
    // something, or it checked nothing.
    if run >= Duration::from_secs(40) && (r.writes() <= 20 || r.reads() <= 20) {
        eprintln!(
            "too little happened: {} writes, {} reads",
            r.writes(),
            r.reads()
        );
        std::process::exit(1);
    }
    println!("  verdict: consistent");
}
