//! Write-disconnected mode: connected, but mutations are logged (with the
//! log optimisations) and sent in batches once they are old enough.

mod client_util;
mod common;
mod disco_util;

use client_util::*;
use coda::client::Client;
use common::TempDir;

#[test]
fn records_wait_for_their_age_are_optimised_and_then_reach_the_server() {
    let srv = start();
    let (d, o) = (TempDir::new("c"), TempDir::new("o"));
    let mut cfg = config(&srv, d.path());
    cfg.set("write_disconnected", "true").unwrap();
    cfg.set("reintegration_age_ms", "3600000").unwrap();
    let c = Client::new(cfg).unwrap();
    assert!(c.write_disconnected());
    let other = client(&srv, o.path());

    for i in 0..10 {
        put(&c, "/a", format!("write {i}").as_bytes());
    }
    c.mkdir("/d", 0o755).unwrap();
    c.chmod("/a", 0o600).unwrap();
    c.chmod("/a", 0o640).unwrap();
    // Create, one store (nine cancelled), mkdir, one chmod (one cancelled).
    assert_eq!(c.pending_records(), 4);
    assert_eq!(get(&c, "/a"), b"write 9", "the writer sees its own changes");
    assert!(names(&other, "/").is_empty(), "held back: too young");

    let before = c.stats().records_reintegrated;
    c.reintegrate_now().unwrap();
    assert_eq!(c.pending_records(), 0);
    assert_eq!(c.stats().records_reintegrated - before, 4);
    assert_eq!(names(&other, "/"), vec!["a", "d"]);
    assert_eq!(get(&other, "/a"), b"write 9");
    assert_eq!(other.stat("/a").unwrap().mode & 0o7777, 0o640);

    // Back to write-through: the call returns with the server holding it.
    c.set_write_disconnected(false);
    put(&c, "/b", b"through");
    assert_eq!(c.pending_records(), 0);
    assert_eq!(get(&other, "/b"), b"through");
}

#[test]
fn aged_records_are_sent_by_the_reintegrator_on_its_own() {
    let srv = start();
    let (d, o) = (TempDir::new("c"), TempDir::new("o"));
    let mut cfg = config(&srv, d.path());
    cfg.set("write_disconnected", "true").unwrap();
    cfg.set("reintegration_age_ms", "100").unwrap();
    cfg.set("heartbeat_ms", "50").unwrap();
    let c = Client::new(cfg).unwrap();
    put(&c, "/x", b"slow link");
    disco_util::wait_reintegrated(&c);
    let other = client(&srv, o.path());
    assert_eq!(get(&other, "/x"), b"slow link");
}
