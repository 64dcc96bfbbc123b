//! Replicated servers (issue 14): three real coda-server processes on
//! loopback. No timing thresholds: outcomes are asserted, waits are bounds.

mod common;
mod replication_util;

use std::process::Command;

use coda::proto::ConnKind;
use coda::proto::Msg;
use common::raw::Raw;
use common::SERVER_BIN;
use replication_util::{wait_until, Group};

#[test]
fn a_group_elects_one_leader_and_group_status_shows_every_member() {
    let g = Group::start(3);
    let l = g.wait_leader(&[0, 1, 2]);
    let commit = g.wait_caught_up(&[0, 1, 2]);
    let out = Command::new(SERVER_BIN)
        .args(["group", "status", "--root"])
        .arg(&g.members[1].root)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with(&format!("leader {} term ", g.members[l].id)),
        "{text}"
    );
    assert_eq!(lines.len(), 4, "{text}");
    for (i, m) in g.members.iter().enumerate() {
        let role = if i == l { "leader" } else { "follower" };
        let line = lines[i + 1];
        assert!(
            line.starts_with(&format!("member {} {} {role} term ", m.id, m.addr)),
            "{text}"
        );
        assert!(line.ends_with(" lag 0"), "{text}");
        assert!(line.contains(&format!(" applied {commit} ")), "{text}");
    }
}

#[test]
fn kill_9_of_the_leader_elects_another_and_the_old_one_catches_up_on_return() {
    let mut g = Group::start(3);
    let l = g.wait_leader(&[0, 1, 2]);
    let old_term = g.status(l).unwrap().term;
    g.kill9(l);
    let rest: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    let l2 = g.wait_leader(&rest);
    assert_ne!(l2, l);
    let st = g.status(l2).unwrap();
    assert!(st.term > old_term, "{st:?}");
    // The dead member shows as unreachable, the others lag nothing.
    let out = Command::new(SERVER_BIN)
        .args(["group", "status", "--root"])
        .arg(&g.members[l2].root)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "member {} {} unreachable",
            g.members[l].id, g.members[l].addr
        )),
        "{text}"
    );
    g.serve(l);
    let commit = g.wait_caught_up(&[0, 1, 2]);
    let back = g.status(l).unwrap();
    assert_eq!(back.role, "follower");
    assert!(back.applied >= commit && back.term >= st.term, "{back:?}");
}

#[test]
fn sigstop_of_the_leader_elects_another_and_the_stopped_one_follows_after_sigcont() {
    let g = Group::start(3);
    let l = g.wait_leader(&[0, 1, 2]);
    let old_term = g.status(l).unwrap().term;
    g.sigstop(l);
    let rest: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    let l2 = g.wait_leader(&rest);
    assert_ne!(l2, l);
    g.sigcont(l);
    g.wait_caught_up(&[0, 1, 2]);
    let st = g.status(l).unwrap();
    assert_eq!(st.role, "follower", "{st:?}");
    assert!(st.term > old_term);
}

#[test]
fn a_follower_refuses_a_client_naming_the_leader_and_the_leader_serves_it() {
    let g = Group::start(3);
    let l = g.wait_leader(&[0, 1, 2]);
    let f = (l + 1) % 3;
    let secret = coda::proto::auth::read_secret_file(&g.secret_file()).unwrap();
    let refused = Raw::connect(
        g.members[f].addr,
        "admin",
        &secret,
        ConnKind::Control,
        [3; 16],
        1,
    )
    .err()
    .expect("a follower refuses a control connection");
    match refused {
        Msg::Error { message, .. } => assert!(
            message.contains(&format!(
                "the leader is member {} at {}",
                g.members[l].id, g.members[l].addr
            )),
            "{message}"
        ),
        m => panic!("expected an error naming the leader, got {m:?}"),
    }
    let mut raw = wait_until("the leader takes a control connection", 10, || {
        Raw::connect(
            g.members[l].addr,
            "admin",
            &secret,
            ConnKind::Control,
            [4; 16],
            1,
        )
        .ok()
    });
    assert!(raw.alloc(1).len() == 1);
}

#[test]
fn init_refuses_a_bad_group_and_a_served_source() {
    let g = Group::start(3);
    g.wait_leader(&[0, 1, 2]);
    let list: Vec<String> = g.members.iter().map(|m| m.addr.to_string()).collect();
    let fresh = g.dir.path().join("late");
    // m1 has served: copying it now would fork the store.
    let out = Command::new(SERVER_BIN)
        .args(["init", "--root"])
        .arg(&fresh)
        .args(["--node", "3", "--group", &list.join(","), "--from"])
        .arg(&g.members[0].root)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("has served already") || err.contains("in use"),
        "{err}"
    );
    let out = Command::new(SERVER_BIN)
        .args(["init", "--root"])
        .arg(&fresh)
        .args(["--node", "4", "--group", &list.join(",")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("the group has members 1 to 3"));
    assert!(!fresh.join("meta.redb").exists());
}
