//! How replies reach the wire (issue 11): a worker sends its reply itself
//! when its connection has nothing else queued, else the connection's
//! writer thread does. Against a real coda-server over TLS: pipelined
//! requests answered once each, in order where the server promises order,
//! on an intact TLS stream; clients that never read do not hold up other
//! sessions' replies.
mod common;

use std::collections::HashSet;
use std::io::Write;
use std::sync::mpsc;
use std::time::Duration;

use coda::proto::frame::encode_frame;
use coda::proto::Msg;
use common::raw::{rec, Raw};
use common::TestServer;

/// Pings (answered by the connection's reader, in order) interleaved with
/// requests answered by workers, all written before any reply is read: each
/// request is answered exactly once with its own kind of reply, the Pongs
/// arrive in the order of their Pings, and every TLS record opens (a record
/// sealed out of order would fail its integrity check and end the stream).
#[test]
fn pipelined_requests_are_answered_once_each_and_pongs_in_order() {
    let s = TestServer::start();
    let mut c = Raw::control(s.addr(), &s.secret_file(), [0x51; 16], 1);
    let root = c.root;
    let fids = c.alloc(64);
    let mut pings = Vec::new();
    let mut others = HashSet::new();
    let mut creates = HashSet::new();
    // Bounded by the server's own flow bounds only through TCP: 600 small
    // frames fit in the socket buffers both ways.
    for i in 0..600u64 {
        match i % 3 {
            0 => pings.push(c.send(&Msg::Ping)),
            1 => {
                others.insert(c.send(&Msg::GetAttrs {
                    fids: vec![root; 8],
                }));
            }
            _ if i % 30 == 2 => {
                let k = (i / 30) as usize;
                let r = rec::create(1000 + k as u64, root, &format!("f{k}"), fids[k]);
                creates.insert(c.send(&Msg::Reintegrate { records: vec![r] }));
            }
            _ => {
                others.insert(c.send(&Msg::ReadDir {
                    fid: root,
                    cursor: 0,
                }));
            }
        }
    }
    let total = 600;
    let mut seen = HashSet::new();
    let mut pong_order = Vec::new();
    for _ in 0..total {
        let (id, m) = c
            .recv()
            .expect("a reply for every request, on a readable stream");
        assert!(seen.insert(id), "request {id} answered twice");
        match m {
            Msg::Pong => pong_order.push(id),
            Msg::Attrs { items } => {
                assert!(others.contains(&id), "Attrs for request {id}");
                assert_eq!(items.len(), 8);
                assert!(items.iter().all(|a| a.is_ok()));
            }
            Msg::DirPage { .. } => assert!(others.contains(&id), "DirPage for request {id}"),
            Msg::Reintegrated { results } => {
                assert!(creates.contains(&id), "Reintegrated for request {id}");
                assert_eq!(results.len(), 1);
            }
            m => panic!("request {id} answered with {m:?}"),
        }
    }
    assert_eq!(pong_order, pings, "Pongs out of their Pings' order");
    // Every create committed: the listing names them all.
    let names: HashSet<String> = c.list(root).into_iter().map(|(n, _)| n).collect();
    for k in 0..creates.len() {
        assert!(names.contains(&format!("f{k}")), "f{k} missing");
    }
}

/// Five clients pipeline requests for 1 MiB replies and never read them,
/// until the server stops reading their requests (its flow bounds) and
/// their sockets are full. Five sessions at four running requests each
/// could hold all sixteen workers if a worker waited on a full socket; a
/// well-behaved client is still answered, calls and batches alike.
#[test]
fn clients_that_never_read_do_not_hold_up_another_sessions_replies() {
    let s = TestServer::start();
    // The good client works in a directory of its own: its creates break
    // no callback the hogs hold (they hold the root's), so the hogs stay
    // connected, jammed, throughout.
    let mut good = Raw::control(s.addr(), &s.secret_file(), [0x70; 16], 1);
    let fids = good.alloc(21);
    let dir = fids[20];
    good.apply(vec![rec::mkdir(1, good.root, "d", dir)]);
    let (tx, rx) = mpsc::channel();
    let mut hogs = Vec::new();
    for h in 0..5u8 {
        let hog = Raw::control(s.addr(), &s.secret_file(), [0x60 + h; 16], 1);
        let n = (coda::proto::MAX_FRAME - 13) / (1 + coda::proto::codec::ATTR_LEN);
        let req = Msg::GetAttrs {
            fids: vec![hog.root; n],
        };
        let frame = encode_frame(req.kind(), 1, &req.encode());
        let mut w = hog.stream.try_clone().unwrap();
        w.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
        let tx = tx.clone();
        std::thread::spawn(move || {
            // Bounded: the server stops reading after a few requests
            // (MAX_QUEUED); 200 would be 200 MiB of replies.
            let mut stuck = false;
            for _ in 0..200 {
                if w.write_all(&frame).is_err() {
                    stuck = true;
                    break;
                }
            }
            let _ = tx.send(stuck);
        });
        hogs.push(hog);
    }
    for _ in 0..5 {
        let stuck = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("a hog's writes end");
        assert!(
            stuck,
            "the server read 200 requests of a client that reads nothing"
        );
    }
    for (i, f) in fids[..20].iter().enumerate() {
        assert!(good.attr(dir).is_ok());
        assert_eq!(good.call(&Msg::Ping), Msg::Pong);
        good.apply(vec![rec::create(2 + i as u64, dir, &format!("g{i}"), *f)]);
    }
    assert_eq!(good.list(dir).len(), 20);
    drop(hogs);
    assert_eq!(good.call(&Msg::Ping), Msg::Pong);
}
