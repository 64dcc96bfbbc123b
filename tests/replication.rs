//! Replicated servers (issue 14): three real coda-server processes on
//! loopback. No timing thresholds: outcomes are asserted, waits are bounds.

mod client_util;
mod common;
mod replication_util;

use std::process::Command;
use std::time::{Duration, Instant};

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
        assert!(line.contains(" lag 0 durable "), "{text}");
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
    let mut raw = g.raw_control(l, 4, false);
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

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use client_util::try_put;
use coda::client::Client;

/// Bring a client's log to the group (bounded), so what it acknowledged
/// while cut off is on the servers too.
fn drain(c: &Client) {
    wait_until("the client's log reaches the group", 60, || {
        let _ = c.reintegrate_now();
        (c.pending_records() == 0).then_some(())
    });
}

/// A write the group acknowledged: `close` succeeded and nothing stayed in
/// the client's log (a write logged while no leader answered is the
/// client's, not yet the group's).
fn committed_put(c: &Client, path: &str, data: &[u8]) -> Option<bool> {
    try_put(c, path, data).ok()?;
    Some(c.pending_records() == 0)
}

#[test]
fn kill_9_of_the_leader_while_two_clients_write_loses_no_acknowledged_write() {
    let mut g = Group::start(3);
    let l = g.wait_leader(&[0, 1, 2]);
    let caches = common::TempDir::new("repl-clients");
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..2 {
        let cfg = g.client_config(&caches.path().join(format!("c{w}")));
        let stop = Arc::clone(&stop);
        let progress = Arc::clone(&progress);
        writers.push(std::thread::spawn(move || {
            let c = Client::new(cfg).expect("client connects");
            // Per file, every value in write order, and whether the group acknowledged it.
            let mut writes: Vec<(String, String, bool)> = Vec::new();
            for i in 0..400 {
                if stop.load(Ordering::SeqCst) && i % 10 == 0 {
                    break;
                }
                let path = format!("/w{w}-{}", i % 10);
                let data = format!("writer {w} write {i}\n").repeat(1 + i % 7);
                if let Some(acked) = committed_put(&c, &path, data.as_bytes()) {
                    if acked {
                        progress.fetch_add(1, Ordering::SeqCst);
                    } else {
                        // Logged while no leader answered: wait until the
                        // log reached the group before writing on, so each
                        // write's outcome is known here (writing on meanwhile
                        // is tests/client_backlog_writes.rs's subject).
                        drain(&c);
                    }
                    writes.push((path, data, acked));
                }
            }
            drain(&c);
            (c, writes)
        }));
    }
    wait_until("both writers under way", 60, || {
        (progress.load(Ordering::SeqCst) >= 20).then_some(())
    });
    g.kill9(l);
    let rest: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    let l2 = g.wait_leader(&rest);
    // Acknowledged writes resume after the failover.
    let after = progress.load(Ordering::SeqCst);
    wait_until("acknowledged writes after the failover", 60, || {
        (progress.load(Ordering::SeqCst) >= after + 20).then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    let reader = Client::new(g.client_config(&caches.path().join("reader"))).unwrap();
    for t in writers {
        let (_c, writes) = t.join().expect("writer");
        let paths: std::collections::BTreeSet<&String> = writes.iter().map(|w| &w.0).collect();
        for p in paths {
            let got = String::from_utf8(client_util::get(&reader, p)).unwrap();
            let of_p: Vec<&(String, String, bool)> = writes.iter().filter(|w| &w.0 == p).collect();
            // The last acknowledged write, or one written after it.
            let last_acked = of_p.iter().rposition(|w| w.2);
            let Some(k) = last_acked else { continue };
            assert!(
                of_p[k..].iter().any(|w| w.1 == got),
                "{p} on the new leader (member {}) is {got:?}, older than the acknowledged {:?}",
                g.members[l2].id,
                of_p[k].1
            );
        }
    }
}

#[test]
fn a_follower_killed_and_restarted_catches_up_file_data_included() {
    let mut g = Group::start(3);
    let l = g.wait_leader(&[0, 1, 2]);
    let f = (l + 1) % 3;
    let caches = common::TempDir::new("repl-catchup");
    let c = Client::new(g.client_config(&caches.path().join("c"))).unwrap();
    client_util::put(&c, "/before", b"written while all three ran\n");
    g.kill9(f);
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    client_util::put(&c, "/while-down", &big);
    c.mkdir("/dir", 0o755).unwrap();
    client_util::put(&c, "/dir/small", b"small file while member was down\n");
    assert!(!g.has_object(f, b"small file while member was down\n")); // killed: its file as it was
    g.serve(f);
    g.wait_caught_up(&[0, 1, 2]);
    assert!(g.holds(f, b"written while all three ran\n"));
    assert!(g.holds(f, b"small file while member was down\n"));
    assert!(
        g.holds(f, &big),
        "the 3 MB file reached the returning member"
    );
}

#[test]
fn all_three_killed_and_restarted_keep_every_acknowledged_write() {
    let mut g = Group::start(3);
    g.wait_leader(&[0, 1, 2]);
    let caches = common::TempDir::new("repl-restart");
    let c = Client::new(g.client_config(&caches.path().join("c"))).unwrap();
    let mut acked = Vec::new();
    for i in 0..20 {
        let data = format!("acknowledged write {i}\n").repeat(i + 1);
        client_util::put(&c, &format!("/f{}", i % 7), data.as_bytes());
        acked.push((format!("/f{}", i % 7), data));
    }
    drop(c);
    for i in 0..3 {
        g.kill9(i);
    }
    for i in 0..3 {
        g.serve(i);
    }
    g.wait_caught_up(&[0, 1, 2]);
    let reader = Client::new(g.client_config(&caches.path().join("reader"))).unwrap();
    let last: std::collections::HashMap<_, _> = acked.into_iter().collect();
    for (p, d) in &last {
        assert_eq!(
            String::from_utf8(client_util::get(&reader, p)).unwrap(),
            *d,
            "{p}"
        );
    }
}

#[test]
fn sigstop_of_the_leader_while_a_client_writes_loses_nothing_and_writes_resume() {
    let g = Group::start(3);
    let l = g.wait_leader(&[0, 1, 2]);
    let caches = common::TempDir::new("repl-sigstop");
    let c = Client::new(g.client_config(&caches.path().join("c"))).unwrap();
    client_util::put(&c, "/before", b"before the stop\n");
    g.sigstop(l);
    let rest: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    g.wait_leader(&rest);
    // The client's session to the stopped leader is judged dead; the write
    // is acknowledged (connected to the new leader, or logged and then
    // reintegrated there).
    try_put(&c, "/during", b"while the old leader is stopped\n").unwrap();
    drain(&c);
    g.sigcont(l);
    g.wait_caught_up(&[0, 1, 2]);
    let reader = Client::new(g.client_config(&caches.path().join("reader"))).unwrap();
    assert_eq!(client_util::get(&reader, "/before"), b"before the stop\n");
    assert_eq!(
        client_util::get(&reader, "/during"),
        b"while the old leader is stopped\n"
    );
    assert!(g.holds(l, b"while the old leader is stopped\n"));
}

#[test]
fn members_are_added_removed_and_a_wiped_one_replaced_online() {
    let mut g = Group::start(3);
    let l = g.wait_leader(&[0, 1, 2]);
    let caches = common::TempDir::new("repl-members");
    let c = Client::new(g.client_config(&caches.path().join("c"))).unwrap();
    client_util::put(&c, "/a", b"written by three members\n");
    // A fourth member, made while the group runs, catches up from the log.
    let four = g.join(4, l);
    let out = g.membership(
        l,
        &[
            "add",
            "--node",
            "4",
            "--addr",
            &g.members[four].addr.to_string(),
        ],
    );
    assert!(out.starts_with("member 4 added at log index "), "{out}");
    let all = [0, 1, 2, four];
    g.wait_caught_up(&all);
    assert_eq!(g.status(l).unwrap().voters, vec![1, 2, 3, 4]);
    assert!(g.holds(four, b"written by three members\n"));
    client_util::put(&c, "/b", b"written by four members\n");
    wait_until("member 4 has the new file", 30, || {
        g.has_object(four, b"written by four members\n")
            .then_some(())
    });
    // A follower's disk is lost: it is removed, wiped, and replaced by a
    // new member 5 built from the initial store and the log.
    let lost = (0..3).find(|&i| i != l).unwrap();
    let lost_id = g.members[lost].id;
    g.kill9(lost);
    std::fs::remove_dir_all(&g.members[lost].root).unwrap();
    let out = g.membership(l, &["remove", "--node", &lost_id.to_string()]);
    assert!(
        out.starts_with(&format!("member {lost_id} removed")),
        "{out}"
    );
    let five = g.join(5, l);
    g.membership(
        l,
        &[
            "add",
            "--node",
            "5",
            "--addr",
            &g.members[five].addr.to_string(),
        ],
    );
    let live: Vec<usize> = (0..g.members.len())
        .filter(|&i| g.members[i].running())
        .collect();
    g.wait_caught_up(&live);
    let mut voters = vec![1, 2, 3, 4, 5];
    voters.retain(|v| *v != lost_id);
    assert_eq!(g.status(l).unwrap().voters, voters);
    assert!(g.holds(five, b"written by three members\n"));
    assert!(g.holds(five, b"written by four members\n"));
    // Writes go on, and reach the new member.
    client_util::put(&c, "/c", b"after the replacement\n");
    wait_until("member 5 has the newest file", 30, || {
        g.has_object(five, b"after the replacement\n").then_some(())
    });
}

#[test]
fn a_leader_cut_off_from_the_others_acknowledges_no_write_and_rejoins() {
    use common::raw::rec;
    let (g, cutter) = Group::start_behind_proxies(3);
    let l = g.wait_leader(&[0, 1, 2]);
    let mut raw = g.raw_control(l, 9, true);
    let fids = raw.alloc(2);
    let root = raw.root;
    cutter.cut(g.members[l].id);
    // The cut-off leader cannot commit: the batch is not acknowledged.
    raw.send(&Msg::Reintegrate {
        records: vec![rec::create(1, root, "from-the-minority", fids[0])],
    });
    match raw.recv() {
        None | Some((_, Msg::Error { .. })) => {}
        Some((_, m)) => panic!("a minority leader answered {m:?}"),
    }
    // The majority elects a leader of its own and takes writes.
    let rest: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    let l2 = g.wait_leader(&rest);
    let caches = common::TempDir::new("repl-cut");
    let mut cfg = g.client_config(&caches.path().join("c"));
    cfg.set("servers", &g.members[l2].addr.to_string()).unwrap();
    let c = Client::new(cfg).unwrap();
    client_util::put(
        &c,
        "/from-the-majority",
        b"written while member was cut off\n",
    );
    // Healed, the old leader follows and catches up; the minority's batch
    // was never applied anywhere.
    cutter.heal(g.members[l].id);
    g.wait_caught_up(&[0, 1, 2]);
    assert_eq!(g.status(l).unwrap().role, "follower");
    assert!(g.holds(l, b"written while member was cut off\n"));
    let names: Vec<String> = c
        .readdir("/")
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert!(
        names.contains(&"from-the-majority".to_string()),
        "{names:?}"
    );
    assert!(
        !names.contains(&"from-the-minority".to_string()),
        "{names:?}"
    );
}

/// A leader cut off from the others stops answering reads before the
/// majority can acknowledge a write (its lease): no ReadDir sent to it
/// after the new leader acknowledged a create is answered with the listing
/// from before, and the old leader ends the session rather than answer.
#[test]
fn a_cut_off_leader_answers_no_read_once_the_majority_took_a_write() {
    let (g, cutter) = Group::start_behind_proxies(3);
    let l = g.wait_leader(&[0, 1, 2]);
    let mut raw = g.raw_control(l, 10, true);
    let root = raw.root;
    assert!(!raw.list(root).iter().any(|(n, _)| n == "after-the-cut"));
    // Reads on the old leader, back to back, each with the instant it was
    // sent, until it stops answering (bounded).
    let reader = std::thread::spawn(move || {
        let mut answered = Vec::new();
        let end = Instant::now() + Duration::from_secs(60);
        while Instant::now() < end {
            let sent = Instant::now();
            let id = raw.send(&Msg::ReadDir {
                fid: root,
                cursor: 0,
            });
            let reply = loop {
                match raw.recv() {
                    Some((rid, m)) if rid == id => break Some(m),
                    Some(_) => continue, // a callback break
                    None => break None,
                }
            };
            match reply {
                Some(Msg::DirPage { entries, .. }) => {
                    let has = entries.iter().any(|e| e.name == "after-the-cut");
                    answered.push((sent, has));
                }
                other => return (answered, other),
            }
        }
        (answered, None)
    });
    cutter.cut(g.members[l].id);
    let rest: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    let l2 = g.wait_leader(&rest);
    let caches = common::TempDir::new("repl-lease");
    let mut cfg = g.client_config(&caches.path().join("c"));
    cfg.set("servers", &g.members[l2].addr.to_string()).unwrap();
    let c = wait_until("a client of the new leader", 30, || {
        Client::new(cfg.clone()).ok()
    });
    let acked = wait_until("the majority acknowledges a create", 30, || {
        (committed_put(&c, "/after-the-cut", b"new\n") == Some(true)).then(Instant::now)
    });
    let (answered, last) = reader.join().unwrap();
    assert!(
        matches!(last, None | Some(Msg::Error { .. })),
        "the old leader's last answer: {last:?}"
    );
    let stale = answered
        .iter()
        .filter(|(sent, has)| *sent > acked && !has)
        .count();
    assert_eq!(
        stale,
        0,
        "{stale} of {} reads sent to the old leader after the majority's write were answered \
         without it",
        answered.len()
    );
    cutter.heal(g.members[l].id);
}

/// A Store naming an upload the leader does not hold (a client staged it
/// with a leader before this one) is refused at its record with NotFound,
/// as a lone server refuses it, and nothing is proposed: a log entry
/// naming data on no member would hold every member waiting for it. The
/// group goes on committing.
#[test]
fn a_store_of_an_upload_not_staged_on_the_leader_is_refused_and_the_group_goes_on() {
    use common::raw::rec;
    let g = Group::start(3);
    let l = g.wait_leader(&[0, 1, 2]);
    let mut raw = g.raw_control(l, 11, false);
    let fids = raw.alloc(2);
    let root = raw.root;
    let made = raw.apply(vec![rec::create(1, root, "f", fids[0])]);
    match raw.reintegrate(vec![rec::store(2, fids[0], made[0].version, 77, 5)]) {
        Msg::Error { code, index, .. } => {
            assert_eq!(code, coda::error::WireCode::NotFound);
            assert_eq!(index, 0);
        }
        m => panic!("a Store of an upload never staged answered {m:?}"),
    }
    raw.apply(vec![rec::create(3, root, "g", fids[1])]);
    g.wait_caught_up(&[0, 1, 2]);
    let names: Vec<String> = raw.list(root).into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"g".to_string()), "{names:?}");
}

/// A replicated batch is checked against the rights of the user it acts
/// for on every member, not only on the leader: a create the leader
/// refuses (bob has no insert right in the root) exists on no member, so
/// the next leader does not show it either. An access list change made on
/// the leader is there on the next one. A user and a group added through
/// any member's administration socket reach every member.
#[test]
fn a_batch_refused_for_its_user_is_refused_on_every_member() {
    use common::raw::rec;
    let mut g = Group::start(3);
    let l = g.wait_leader(&[0, 1, 2]);
    // Users and groups go through the log: bob is added through a
    // follower's administration socket (it forwards the entry to the
    // leader), and every member stores the one secret the entry carries.
    let f = (0..3).find(|&i| i != l).unwrap();
    let admin_cmd = |i: usize, words: &[&str]| {
        let out = Command::new(SERVER_BIN)
            .args(words)
            .arg("--root")
            .arg(&g.members[i].root)
            .output()
            .unwrap();
        assert!(out.status.success(), "{words:?} on member {i}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    admin_cmd(f, &["user", "add", "bob"]);
    let bob = wait_until("bob's one secret on every member", 20, || {
        let s: Vec<_> = g
            .members
            .iter()
            .map(|m| coda::proto::auth::read_secret_file(&m.root.join("bob.secret")).ok())
            .collect();
        (s.iter().all(|x| x.is_some() && *x == s[0])).then(|| s[0].unwrap())
    });
    // Added again on another member: refused there, as on a lone server.
    let again = Command::new(SERVER_BIN)
        .args(["user", "add", "bob", "--root"])
        .arg(&g.members[l].root)
        .output()
        .unwrap();
    assert!(!again.status.success(), "{again:?}");
    admin_cmd(l, &["group", "add", "admin:friends", "bob"]);
    for i in 0..3 {
        // A member that has not applied the entry yet has no such group:
        // asked again until it has.
        wait_until("the group on every member", 20, || {
            let out = Command::new(SERVER_BIN)
                .args(["group", "members", "admin:friends", "--root"])
                .arg(&g.members[i].root)
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|x| x.split_whitespace().any(|w| w == "bob"))
                .then_some(())
        });
    }
    let mut raw = wait_until("the leader takes bob's control connection", 10, || {
        Raw::connect(
            g.members[l].addr,
            "bob",
            &bob,
            ConnKind::Control,
            [5; 16],
            1,
        )
        .ok()
    });
    let fids = raw.alloc(1);
    let root = raw.root;
    match raw.reintegrate(vec![rec::create(1, root, "bobs-file", fids[0])]) {
        Msg::Error { code, .. } => assert_eq!(code, coda::error::WireCode::Access),
        m => panic!("bob's create in the root answered {m:?}"),
    }
    drop(raw);
    let admin = coda::proto::auth::read_secret_file(&g.secret_file()).unwrap();
    let admin_on = |addr| {
        wait_until("a leader takes the admin's connection", 20, || {
            Raw::connect(addr, "admin", &admin, ConnKind::Control, [6; 16], 1).ok()
        })
    };
    let names = |raw: &mut Raw| {
        raw.list(raw.root)
            .into_iter()
            .map(|(n, _)| n)
            .collect::<Vec<_>>()
    };
    // An access list change goes through the log too.
    let bob_rights = |raw: &mut Raw| match raw.call(&Msg::GetAcl { fid: raw.root }) {
        Msg::AclReply { entries, .. } => entries
            .into_iter()
            .find(|e| e.name == "bob" && !e.negative)
            .map(|e| e.rights),
        m => panic!("GetAcl: {m:?}"),
    };
    let rli = coda::proto::acl::READ | coda::proto::acl::LOOKUP | coda::proto::acl::INSERT;
    let mut a = admin_on(g.members[l].addr);
    assert!(!names(&mut a).contains(&"bobs-file".to_string()));
    let root = a.root;
    match a.call(&Msg::SetAcl {
        fid: root,
        name: "bob".into(),
        rights: rli,
        negative: false,
    }) {
        Msg::AclReply { .. } => {}
        m => panic!("SetAcl: {m:?}"),
    }
    assert_eq!(bob_rights(&mut a), Some(rli));
    drop(a);
    // The followers applied the same entry: make one of them the leader.
    g.wait_caught_up(&[0, 1, 2]);
    g.kill9(l);
    let rest: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    let l2 = g.wait_leader(&rest);
    let mut a = admin_on(g.members[l2].addr);
    let seen = names(&mut a);
    assert!(
        !seen.contains(&"bobs-file".to_string()),
        "a follower applied the refused create: {seen:?}"
    );
    assert_eq!(
        bob_rights(&mut a),
        Some(rli),
        "the new leader lost the access list change"
    );
}

/// A pipelined batch (`ReintegrateAfter`) goes through the log with its
/// `after`, and the rule is decided on every member: one sent ahead of the
/// client's watermark is refused `NotApplied` and applied by no member (the
/// next leader does not show it), one whose predecessor applied is applied
/// everywhere. A quota set through a follower's administration socket
/// reaches every member, so the next leader refuses the same growth.
#[test]
fn a_pipelined_batch_and_a_quota_are_decided_alike_on_every_member() {
    use coda::error::WireCode;
    use common::raw::rec;
    let mut g = Group::start(3);
    let l = g.wait_leader(&[0, 1, 2]);
    let secret = coda::proto::auth::read_secret_file(&g.secret_file()).unwrap();
    let connect = |addr| {
        wait_until("a leader takes a control connection", 20, || {
            Raw::connect(addr, "admin", &secret, ConnKind::Control, [12; 16], 1).ok()
        })
    };
    let mut raw = connect(g.members[l].addr);
    let root = raw.root;
    let f = raw.alloc(4);
    match raw.call(&Msg::ReintegrateAfter {
        after: 5,
        records: vec![rec::create(6, root, "early", f[0])],
    }) {
        Msg::Error { code, .. } => assert_eq!(code, WireCode::NotApplied),
        m => panic!("a batch ahead of its predecessor answered {m:?}"),
    }
    raw.apply(vec![rec::create(1, root, "a", f[1])]);
    match raw.call(&Msg::ReintegrateAfter {
        after: 1,
        records: vec![rec::create(2, root, "b", f[2])],
    }) {
        Msg::Reintegrated { .. } => {}
        m => panic!("a batch after its applied predecessor answered {m:?}"),
    }
    drop(raw);
    let fo = (0..3).find(|&i| i != l).unwrap();
    let quota = |i: usize, bytes: Option<&str>| {
        let mut cmd = Command::new(SERVER_BIN);
        cmd.args(["quota", "--volume", "1", "--root"])
            .arg(&g.members[i].root);
        if let Some(b) = bytes {
            cmd.args(["--bytes", b]);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "quota on member {i}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    quota(fo, Some("100"));
    for i in 0..3 {
        wait_until("the quota on every member", 20, || {
            quota(i, None).contains("quota 100").then_some(())
        });
    }
    g.wait_caught_up(&[0, 1, 2]);
    g.kill9(l);
    let rest: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    let l2 = g.wait_leader(&rest);
    let mut raw = connect(g.members[l2].addr);
    let names: Vec<String> = raw.list(root).into_iter().map(|(n, _)| n).collect();
    assert!(
        names.contains(&"a".to_string()) && names.contains(&"b".to_string()),
        "{names:?}"
    );
    assert!(
        !names.contains(&"early".to_string()),
        "a member applied the NotApplied batch: {names:?}"
    );
    match raw.reintegrate(vec![rec::truncate(3, f[1], 4096)]) {
        Msg::Error { code, .. } => assert_eq!(code, WireCode::Quota),
        m => panic!("growth past the replicated quota answered {m:?}"),
    }
}

/// In a group as on a lone server: a writer's reply waits for the breaks
/// of its objects sent for an earlier writer and not yet acknowledged (the
/// history test's stale reads after the merge of inline data: two inline
/// stores of one file committed close together, and the second writer
/// heard "done" while a holder still trusted its copy of the first).
#[test]
fn a_leader_answers_a_writer_only_after_earlier_breaks_of_its_objects_are_acknowledged() {
    use coda::proto::{Record, RecordOp};
    use common::raw::rec;
    let inline = |id: u64, fid, data: &[u8]| Record {
        store_id: id,
        op: RecordOp::StoreInline {
            fid,
            expected_version: 0,
            mtime: rec::t(),
            data: data.to_vec(),
        },
    };
    // A break timeout far beyond the test's own waits: nobody is cut.
    let g = Group::start_with(3, &["--break-timeout-ms", "4000"]);
    let l = g.wait_leader(&[0, 1, 2]);
    let connect = |id: u8| g.raw_control(l, id, false);
    let mut b = connect(0xb);
    let f = b.alloc(1)[0];
    let root = b.root;
    b.apply(vec![rec::create(1, root, "f", f), inline(2, f, b"one")]);
    let mut c = connect(0xc);
    c.auto_ack = false;
    assert!(c.attr(f).is_ok()); // C holds a callback on f
    let mut a = connect(0xa);
    let b_id = b.send(&Msg::Reintegrate {
        records: vec![inline(3, f, b"from B")],
    });
    let c_break = match c.recv() {
        Some((bid, Msg::CallbackBreak { fids })) => {
            assert_eq!(fids, vec![f]);
            bid
        }
        other => panic!("expected a break at C, got {other:?}"),
    };
    let a_id = a.send(&Msg::Reintegrate {
        records: vec![inline(1, f, b"from A")],
    });
    match b.recv() {
        Some((bid, Msg::CallbackBreak { fids })) => {
            assert!(fids.contains(&f), "{fids:?}");
            b.send_id(bid, &Msg::BreakAck);
        }
        other => panic!("expected A's break at B, got {other:?}"),
    }
    a.stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let early = a.recv();
    assert!(
        early.is_none(),
        "A heard {early:?} while C still trusted its copy of f"
    );
    a.stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    c.send_id(c_break, &Msg::BreakAck);
    match a.recv() {
        Some((rid, Msg::Reintegrated { results })) => {
            assert_eq!(rid, a_id);
            assert_eq!(results[0].size, 6);
        }
        other => panic!("expected A's Reintegrated, got {other:?}"),
    }
    match b.recv() {
        Some((rid, Msg::Reintegrated { .. })) => assert_eq!(rid, b_id),
        other => panic!("expected B's Reintegrated, got {other:?}"),
    }
    assert!(c.attr(f).is_ok(), "C was not cut");
}

/// A client whose leader stops keeps asking the group while it elects
/// another, and its write completes connected there: it never reports the
/// servers down and never logs the write. The election is held back (one
/// follower's peer links cut) until well after the client judged its
/// session dead, longer than the prober's own connect timeout (what is
/// left of `dead_after`), so only the client's election patience keeps it
/// connected.
#[test]
fn a_write_issued_while_the_leader_is_stopped_completes_connected_on_the_next_leader() {
    let (g, cutter) = Group::start_behind_proxies(3);
    let l = g.wait_leader(&[0, 1, 2]);
    let rest: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    let caches = common::TempDir::new("repl-patience");
    let mut cfg = g.client_config(&caches.path().join("c"));
    // Room for a slow election on a loaded machine: the heal below comes
    // 1.2 s after the client judged the leader dead, and the election
    // after it must end within the client's wait.
    cfg.set("election_wait_ms", "20000").unwrap();
    let c = std::sync::Arc::new(Client::new(cfg).unwrap());
    client_util::put(&c, "/before", b"before the stop\n");
    while c.events().next(Duration::ZERO).is_some() {}
    // No leader can be elected while one of the two others is cut off.
    cutter.cut(g.members[rest[0]].id);
    g.sigstop(l);
    let writer = {
        let c = std::sync::Arc::clone(&c);
        std::thread::spawn(move || {
            let r = try_put(&c, "/during", b"written during the election\n");
            (r, c.pending_records())
        })
    };
    wait_until("the client judges its session dead", 30, || {
        (c.state() != coda::client::ClientState::Connected).then_some(())
    });
    // Past the prober's connect timeout (at most `dead_after`, 1 s here),
    // well within the client's `election_wait_ms`.
    std::thread::sleep(Duration::from_millis(1200));
    cutter.heal(g.members[rest[0]].id);
    let (r, pending) = writer.join().unwrap();
    let mut events = Vec::new();
    while let Some(ev) = c.events().next(Duration::ZERO) {
        events.push(ev);
    }
    r.expect("the write completes");
    assert_eq!(
        pending, 0,
        "the write was logged, not sent to the new leader; events {events:?}"
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, coda::client::Event::ServerDown { .. })),
        "the client reported the servers down: {events:?}"
    );
    let l2 = g.wait_leader(&rest);
    assert!(g.holds(l2, b"written during the election\n"));
    g.sigcont(l);
}

/// Small stores the group acknowledged, then kill -9 of the members
/// `victims` picks (given the leader) right after. Members apply entries
/// without the volume store's fsync (the Raft log holds them durably), and
/// the periodic checkpoint is held off here, so the killed members' stores
/// hold durably only what came before a large store in the middle (a data
/// file: that commit is durable, its mark with it): each restarts from its
/// store's mark and re-applies the rest from its log, each entry once.
/// Every acknowledged store is read back, and the stopped members' stores
/// are the same, row for row.
fn small_stores_survive_a_kill_9_of(victims: impl Fn(usize) -> Vec<usize>) {
    let mut g = Group::start_with_env(3, &[], &[("CODA_REPL_CHECKPOINT_MS", "3600000")]);
    let l = g.wait_leader(&[0, 1, 2]);
    let caches = common::TempDir::new("repl-lazy");
    let c = Client::new(g.client_config(&caches.path().join("c"))).unwrap();
    let mut last = std::collections::BTreeMap::new();
    for i in 0..24 {
        if i == 12 {
            let big = vec![b'L'; 100_000];
            client_util::put(&c, "/large", &big);
            last.insert("/large".to_string(), big);
        }
        let path = format!("/small{}", i % 16);
        let data = format!("small store {i} ").repeat(300).into_bytes();
        client_util::put(&c, &path, &data);
        assert_eq!(c.pending_records(), 0, "{path} acknowledged by the group");
        last.insert(path, data);
    }
    drop(c);
    let commit = g.wait_caught_up(&[0, 1, 2]);
    let victims = victims(l);
    for &v in &victims {
        g.kill9(v);
    }
    for &v in &victims {
        let st = replication_util::store_state(&g.members[v].root);
        assert!(
            st.applied.is_some_and(|a| a < commit),
            "member {}'s store holds the log through {:?} durably, the group committed {commit}: \
             the stores were expected in its log only",
            g.members[v].id,
            st.applied
        );
    }
    for &v in &victims {
        g.serve(v);
    }
    g.wait_leader(&[0, 1, 2]);
    let reader = Client::new(g.client_config(&caches.path().join("reader"))).unwrap();
    for (p, d) in &last {
        assert!(client_util::get(&reader, p) == *d, "{p} after the restart");
    }
    drop(reader);
    let commit = g.wait_caught_up(&[0, 1, 2]);
    let states = stopped_stores_agree(&mut g, commit);
    let objects = &states[0].tables[0].1;
    assert!(objects.len() > 16, "the stores hold the files: {objects:?}");
}

#[test]
fn a_follower_killed_right_after_acknowledged_small_stores_reapplies_them_and_converges() {
    small_stores_survive_a_kill_9_of(|l| vec![(l + 1) % 3]);
}

#[test]
fn the_leader_killed_right_after_acknowledged_small_stores_reapplies_them_and_converges() {
    small_stores_survive_a_kill_9_of(|l| vec![l]);
}

#[test]
fn the_whole_group_killed_right_after_acknowledged_small_stores_loses_none() {
    small_stores_survive_a_kill_9_of(|_| vec![0, 1, 2]);
}

/// A follower keeps committed entries to apply several in one transaction
/// (held here for an hour: `CODA_REPL_DEFER_MS`). Killed with -9 while it
/// keeps them, its store holds none of them; restarted, it re-applies from
/// its store's mark, and after a clean stop (which applies what it kept)
/// every member's tables are the same, row for row, each entry applied once.
#[test]
fn a_follower_killed_while_it_defers_applies_reapplies_exactly_them_and_converges() {
    let mut g = Group::start_with_env(
        3,
        &[],
        &[
            ("CODA_REPL_DEFER_MS", "3600000"),
            ("CODA_REPL_CHECKPOINT_MS", "3600000"),
        ],
    );
    let l = g.wait_leader(&[0, 1, 2]);
    let f = (l + 1) % 3;
    let caches = common::TempDir::new("repl-defer");
    let c = Client::new(g.client_config(&caches.path().join("c"))).unwrap();
    // Applied before the test's writes: what the follower held already.
    let before = g.status(f).expect("the follower's status").applied;
    let mut last = std::collections::BTreeMap::new();
    for i in 0..6 {
        let path = format!("/deferred{i}");
        let data = format!("deferred store {i} ").repeat(200).into_bytes();
        client_util::put(&c, &path, &data);
        assert_eq!(c.pending_records(), 0, "{path} acknowledged by the group");
        last.insert(path, data);
    }
    drop(c);
    let commit = g.status(l).expect("the leader's status").commit;
    // The follower has the entries in its log and knows them committed,
    // and has applied none of the test's.
    let st = replication_util::wait_until("the follower learned the commit", 30, || {
        g.status(f)
            .filter(|s| s.commit >= commit && s.last >= commit)
    });
    assert!(
        st.applied <= before && st.applied < commit,
        "the follower applied through {} (held {before} before, the group committed {commit}): \
         its applications were expected deferred",
        st.applied
    );
    g.kill9(f);
    let held = replication_util::store_state(&g.members[f].root).applied;
    // None: it never made a mark (it applied nothing since it began).
    assert!(
        held.is_none_or(|a| a < commit),
        "the killed follower's store holds the log through {held:?}, the group committed {commit}"
    );
    g.serve(f);
    g.wait_leader(&[0, 1, 2]);
    replication_util::wait_until("the restarted follower learned the commit", 30, || {
        g.status(f).filter(|s| s.commit >= commit)
    });
    let reader = Client::new(g.client_config(&caches.path().join("reader"))).unwrap();
    for (p, d) in &last {
        assert!(client_util::get(&reader, p) == *d, "{p} after the restart");
    }
    drop(reader);
    let states = stopped_stores_agree(&mut g, commit);
    let names = &states[f].tables[1].1;
    for p in last.keys() {
        let name = p.trim_start_matches('/');
        assert!(
            names
                .iter()
                .filter(|r| r.contains(&format!("{name:?}")))
                .count()
                == 1,
            "{name} once in the follower's directory: {names:?}"
        );
    }
}

/// Add `bob` through the leader's administration socket (a log entry) and
/// return his secret once every member holds it.
fn add_bob(g: &Group, via: usize) -> [u8; 32] {
    let out = Command::new(SERVER_BIN)
        .args(["user", "add", "bob", "--root"])
        .arg(&g.members[via].root)
        .output()
        .unwrap();
    assert!(out.status.success(), "user add bob: {out:?}");
    wait_until("bob's one secret on every member", 20, || {
        let s: Vec<_> = g
            .members
            .iter()
            .map(|m| coda::proto::auth::read_secret_file(&m.root.join("bob.secret")).ok())
            .collect();
        (s.iter().all(|x| x.is_some() && *x == s[0])).then(|| s[0].unwrap())
    })
}

fn refused_as_anothers<T>(r: &Result<T, Msg>) -> bool {
    matches!(r, Err(Msg::Error { code: coda::error::WireCode::Auth, message, .. })
        if message.contains("belongs to another user"))
}

/// `user`'s control connection with `[id; 16]` to member `i`, waited for
/// (bounded) past the refusals of a member that is not (yet) a serving
/// leader; a refusal as another user's id is returned, not waited out.
#[allow(clippy::result_large_err)] // a refusal is the message itself
fn control_as(g: &Group, i: usize, user: &str, secret: &[u8; 32], id: u8) -> Result<Raw, Msg> {
    wait_until("a leader answers the control connection", 20, || {
        let r = Raw::connect(
            g.members[i].addr,
            user,
            secret,
            ConnKind::Control,
            [id; 16],
            1,
        );
        (r.is_ok() || refused_as_anothers(&r)).then_some(r)
    })
}

/// Stop every member cleanly and return their stores' states, each
/// applied through at least `commit` and with every table the same, row
/// for row, as member 0's.
fn stopped_stores_agree(g: &mut Group, commit: u64) -> Vec<replication_util::StoreState> {
    // Entries may have been committed after `commit` (a client's AllocFids
    // when it connected, say): a clean stop applies what its member knows
    // committed, so first every member must know of the last commit, or
    // one that learned of it later than the others stops a prefix short
    // and the tables differ by that entry.
    let last = replication_util::wait_until("a commit index after the last change", 30, || {
        (0..g.members.len())
            .filter_map(|i| g.status(i))
            .map(|s| s.commit)
            .max()
    });
    replication_util::wait_until("every member to know the last commit", 30, || {
        (0..g.members.len())
            .all(|i| g.status(i).is_some_and(|s| s.commit >= last))
            .then_some(())
    });
    for i in 0..g.members.len() {
        g.stop(i);
    }
    let states: Vec<_> = (0..g.members.len())
        .map(|i| replication_util::store_state(&g.members[i].root))
        .collect();
    for (i, st) in states.iter().enumerate() {
        assert!(
            st.applied.is_some_and(|a| a >= commit),
            "member {} stopped with its store through {:?}, the group committed {commit}",
            g.members[i].id,
            st.applied
        );
        for (t, rows) in &st.tables {
            let first = &states[0].tables.iter().find(|(n, _)| n == t).unwrap().1;
            assert!(
                rows == first,
                "table {t} of member {} differs from member {}'s:\n{rows:?}\n{first:?}",
                g.members[i].id,
                g.members[0].id
            );
        }
    }
    states
}

/// Stop every member cleanly and return their stores' `table` rows, which
/// must be the same on every member.
fn same_rows_on_every_member(g: &mut Group, tables: &[&str]) -> Vec<Vec<String>> {
    for i in 0..g.members.len() {
        g.stop(i);
    }
    let states: Vec<_> = (0..g.members.len())
        .map(|i| replication_util::store_state(&g.members[i].root))
        .collect();
    tables
        .iter()
        .map(|t| {
            let rows = |st: &replication_util::StoreState| {
                st.tables.iter().find(|(n, _)| n == t).unwrap().1.clone()
            };
            for (i, st) in states.iter().enumerate() {
                assert_eq!(
                    rows(st),
                    rows(&states[0]),
                    "table {t} of member {} differs from member {}'s",
                    g.members[i].id,
                    g.members[0].id
                );
            }
            rows(&states[0])
        })
        .collect()
}

/// A client id's owner is replicated state (SERVER.md "Client identity"):
/// admin's id, claimed on the leader, is refused to bob on the next
/// leader after a `kill -9` of the first, as a lone server refuses it, and
/// admin keeps it there. Every member holds the same owner rows.
#[test]
fn a_client_id_claimed_on_a_killed_leader_is_refused_to_another_user_on_the_next() {
    use common::raw::rec;
    const X: u8 = 0x41;
    let mut g = Group::start(3);
    let l = g.wait_leader(&[0, 1, 2]);
    let bob = add_bob(&g, l);
    let admin = coda::proto::auth::read_secret_file(&g.secret_file()).unwrap();
    let mut a = control_as(&g, l, "admin", &admin, X).expect("admin's id on the leader");
    let f = a.alloc(1)[0];
    let root = a.root;
    a.apply(vec![rec::create(1, root, "from-admin", f)]);
    drop(a);
    g.kill9(l);
    let rest: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    let l2 = g.wait_leader(&rest);
    let r = control_as(&g, l2, "bob", &bob, X);
    assert!(
        refused_as_anothers(&r),
        "bob presenting admin's id to the next leader: {:?}",
        r.map(|_| "welcomed")
    );
    // Bob is refused for the id only; admin keeps it, and its store id 1
    // is a replay there, not a second create.
    control_as(&g, l2, "bob", &bob, 0x42).expect("bob's own id");
    let mut a = control_as(&g, l2, "admin", &admin, X).expect("admin keeps the id");
    let f2 = a.alloc(1)[0];
    a.apply(vec![rec::create(1, root, "again", f2)]);
    let names: Vec<String> = a.list(root).into_iter().map(|(n, _)| n).collect();
    assert!(
        names.contains(&"from-admin".to_string()) && !names.contains(&"again".to_string()),
        "{names:?}"
    );
    drop(a);
    g.serve(l);
    g.wait_caught_up(&[0, 1, 2]);
    let rows = same_rows_on_every_member(&mut g, &["client_owners", "client_seen"]);
    let x = format!("{:?}", [X; 16]);
    assert!(
        rows[0]
            .iter()
            .any(|r| r.starts_with(&x) && r.ends_with("\"admin\"")),
        "{:?}",
        rows[0]
    );
}

/// The sweep of forgotten ids is the leader's, one log entry applied by
/// every member: an id not presented for the expiry is forgotten with its
/// store-id watermark on every member (bob then claims it and starts
/// afresh), one held by a live session is
/// kept, and the members' owner, last-seen and watermark rows stay the same.
#[test]
fn the_leader_forgets_an_unseen_id_with_its_watermark_on_every_member_but_never_a_live_one() {
    use common::raw::rec;
    const LIVE: u8 = 0x51;
    const GONE: u8 = 0x52;
    let mut g = Group::start_with(3, &["--forget-clients-after", "3s"]);
    let l = g.wait_leader(&[0, 1, 2]);
    let bob = add_bob(&g, l);
    let admin = coda::proto::auth::read_secret_file(&g.secret_file()).unwrap();
    let mut setup = control_as(&g, l, "admin", &admin, 0x53).expect("admin");
    let root = setup.root;
    let d = setup.alloc(1)[0];
    setup.apply(vec![rec::mkdir(1, root, "shared", d)]);
    let (rights, negative) = coda::proto::acl::parse_rights("rlidw").unwrap();
    match setup.call(&Msg::SetAcl {
        fid: d,
        name: "bob".into(),
        rights,
        negative,
    }) {
        Msg::AclReply { .. } => {}
        m => panic!("setacl: {m:?}"),
    }
    drop(setup);
    let mut live = control_as(&g, l, "admin", &admin, LIVE).expect("admin's live id");
    let mut gone = control_as(&g, l, "admin", &admin, GONE).expect("admin's second id");
    let f = gone.alloc(1)[0];
    gone.apply(vec![rec::create(5, d, "from-admin", f)]);
    drop(gone);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut b = loop {
        match control_as(&g, l, "bob", &bob, GONE) {
            Ok(c) => break c,
            Err(_) => {
                assert!(
                    Instant::now() < deadline,
                    "admin's unused id not forgotten within 60 s"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    assert!(
        refused_as_anothers(&control_as(&g, l, "bob", &bob, LIVE).map(|_| ())),
        "an id with a live session is never forgotten"
    );
    match live.call(&Msg::WhoAmI) {
        Msg::WhoReply { user, .. } => assert_eq!(user, "admin"),
        m => panic!("admin's live session: {m:?}"),
    }
    // The watermark went with the owner: bob's store id 1 is applied.
    let g2 = b.alloc(1)[0];
    b.apply(vec![rec::create(1, d, "from-bob", g2)]);
    let names: Vec<String> = b.list(d).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["from-admin", "from-bob"]);
    drop(b);
    // The members are compared once no sweep can change anything: served
    // again with an expiry nothing reaches, each applies the whole log.
    for i in 0..3 {
        g.stop(i);
    }
    drop(live);
    g.extra.clear();
    for i in 0..3 {
        g.serve(i);
    }
    g.wait_caught_up(&[0, 1, 2]);
    same_rows_on_every_member(&mut g, &["client_owners", "client_seen", "client_store"]);
}

/// A group whose members wrote owner rows locally (as servers did before
/// claims were log entries): the first leader running the new code
/// proposes its rows once, so a member that never had them refuses the
/// id to another user, and every member records that it was done.
#[test]
fn owner_rows_a_leader_held_only_locally_reach_every_member() {
    use redb::{ReadableDatabase, TableDefinition};
    const OWNERS: TableDefinition<&[u8; 16], &str> = TableDefinition::new("client_owners");
    const SEEN: TableDefinition<&[u8; 16], u64> = TableDefinition::new("client_seen");
    const SETTINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("settings");
    const X: u8 = 0x61;
    let mut g = Group::start(3);
    let l = g.wait_leader(&[0, 1, 2]);
    let bob = add_bob(&g, l);
    g.wait_caught_up(&[0, 1, 2]);
    for i in 0..3 {
        g.stop(i);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let logged = |root: &std::path::Path| {
        let db = redb::Database::open(root.join("meta.redb")).unwrap();
        let txn = db.begin_read().unwrap();
        let t = txn.open_table(SETTINGS).unwrap();
        let found = t.get("client_owners_logged").unwrap().is_some();
        drop(t);
        found
    };
    for i in 0..3 {
        assert!(
            logged(&g.members[i].root),
            "a new group's member {i} has no local-only rows"
        );
        let db = redb::Database::open(g.members[i].root.join("meta.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(SETTINGS)
            .unwrap()
            .remove("client_owners_logged")
            .unwrap();
        // Members 0 and 1 (one of them leads next) hold admin's X; 2 does not.
        if i < 2 {
            txn.open_table(OWNERS)
                .unwrap()
                .insert(&[X; 16], "admin")
                .unwrap();
            txn.open_table(SEEN).unwrap().insert(&[X; 16], now).unwrap();
        }
        txn.commit().unwrap();
    }
    g.serve(0);
    g.serve(1);
    g.wait_leader(&[0, 1]);
    g.serve(2);
    g.wait_caught_up(&[0, 1, 2]);
    // Member 2 checks the id against its own table, leader or not: it
    // redirects bob until it applied the adoption, then refuses him.
    wait_until("member 2 refuses admin's id to bob", 20, || {
        let r = Raw::connect(
            g.members[2].addr,
            "bob",
            &bob,
            ConnKind::Control,
            [X; 16],
            1,
        );
        assert!(r.is_err(), "member 2 welcomed bob with admin's id");
        refused_as_anothers(&r).then_some(())
    });
    for i in 0..3 {
        g.stop(i);
    }
    for i in 0..3 {
        assert!(
            logged(&g.members[i].root),
            "member {i} did not record the adoption"
        );
    }
    let rows = same_rows_on_every_member(&mut g, &["client_owners"]);
    assert!(
        rows[0]
            .iter()
            .any(|r| r.starts_with(&format!("{:?}", [X; 16]))),
        "{:?}",
        rows[0]
    );
}

/// Issue 14's events: a client of the group hears of a new leader, of a
/// member lost and of its return (docs/CLIENT.md "Group events"), and
/// `group_view` shows the same.
#[test]
fn a_client_hears_of_a_new_leader_and_of_a_member_lost_and_back() {
    use coda::client::{Client, Event};
    let mut g = Group::start(3);
    let l = g.wait_leader(&[0, 1, 2]);
    let caches = common::TempDir::new("repl-events");
    let c = Client::new(g.client_config(&caches.path().join("c"))).unwrap();
    let addrs: Vec<String> = g.members.iter().map(|m| m.addr.to_string()).collect();
    let v = wait_until("a view of three members, all up", 30, || {
        c.group_view()
            .ok()
            .filter(|v| v.members.len() == 3 && v.members.iter().all(|m| m.up))
    });
    assert_eq!(v.leader().map(|m| m.addr.as_str()), Some(addrs[l].as_str()));
    // The watcher's baseline must be a view like that one: wait for a
    // view of its own taken after it, then forget the events so far.
    let seen = c.stats().group_views;
    wait_until("the group watcher's next view", 30, || {
        (c.stats().group_views > seen).then_some(())
    });
    while c.events().next(Duration::ZERO).is_some() {}
    let mut got: Vec<Event> = Vec::new();
    let take = |got: &mut Vec<Event>| {
        while let Some(e) = c.events().next(Duration::from_millis(20)) {
            got.push(e);
        }
    };

    g.kill9(l);
    let rest: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    let l2 = g.wait_leader(&rest);
    wait_until(
        "LeaderChanged to the new leader and MemberDown of the old",
        30,
        || {
            take(&mut got);
            let led = got
                .iter()
                .any(|e| matches!(e, Event::LeaderChanged { leader, .. } if *leader == addrs[l2]));
            let lost = got.contains(&Event::MemberDown {
                member: addrs[l].clone(),
            });
            (led && lost).then_some(())
        },
    );
    let v = c.group_view().unwrap();
    assert_eq!(
        v.leader().map(|m| m.addr.as_str()),
        Some(addrs[l2].as_str())
    );
    assert!(
        v.members.iter().any(|m| m.addr == addrs[l] && !m.up),
        "{v:?}"
    );
    assert!(
        !got.iter().any(|e| matches!(e, Event::MemberUp { .. })),
        "{got:?}"
    );

    g.serve(l);
    wait_until("MemberUp of the restarted member", 30, || {
        take(&mut got);
        got.contains(&Event::MemberUp {
            member: addrs[l].clone(),
        })
        .then_some(())
    });
    let v = c.group_view().unwrap();
    assert!(v.members.iter().all(|m| m.up), "{v:?}");
    // A lone server is no group.
    let srv = client_util::start();
    let d = common::TempDir::new("repl-events-lone");
    let lone = client_util::client(&srv, d.path());
    assert_eq!(lone.group_view().unwrap_err().code(), -libc::EINVAL);
}

/// The group watcher of a client that lists several servers which are no
/// group (here a lone server and an address nothing answers on) is told
/// so once and then asks once a minute, not every 500 ms.
#[test]
fn the_group_watcher_asks_lone_servers_once_a_minute() {
    let srv = client_util::start();
    let d = common::TempDir::new("repl-watch-lone");
    let mut cfg = client_util::config(&srv, d.path());
    let nobody = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let spare = nobody.local_addr().unwrap().to_string();
    drop(nobody);
    cfg.servers.push(spare);
    let c = coda::client::Client::new(cfg).unwrap();
    wait_until("the watcher told the servers are no group", 30, || {
        (c.stats().group_refusals >= 1).then_some(())
    });
    // Without the back-off it would ask four more times in 2 s.
    std::thread::sleep(Duration::from_secs(2));
    let st = c.stats();
    assert_eq!((st.group_refusals, st.group_views), (1, 0), "{st:?}");
}
