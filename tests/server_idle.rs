//! A control connection that goes silent is reaped by the server (its
//! session and callbacks dropped); one that pings stays.
mod common;

use std::time::{Duration, Instant};

use coda::proto::Msg;
use common::raw::Raw;
use common::TestServer;

#[test]
fn a_silent_control_connection_is_closed_and_a_pinging_one_stays() {
    let s = TestServer::start_with(&["--idle-timeout-ms", "400"]);
    let mut silent = Raw::control(s.addr(), &s.secret_file(), [1; 16], 1);
    let mut pinging = Raw::control(s.addr(), &s.secret_file(), [2; 16], 1);
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1500) {
        assert_eq!(pinging.call(&Msg::Ping), Msg::Pong);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        silent.is_closed(),
        "the silent connection should have been closed"
    );
    assert_eq!(pinging.call(&Msg::Ping), Msg::Pong);
}

#[test]
fn a_bad_idle_timeout_is_a_usage_error() {
    let out = std::process::Command::new(common::SERVER_BIN)
        .args(["serve", "--root", "/nonexistent", "--idle-timeout-ms", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--idle-timeout-ms"));
}
