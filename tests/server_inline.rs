//! Records that carry their data inline (`StoreInline`, `CreateWith`),
//! spoken on a raw socket to a real coda-server: applied in one batch and
//! one commit, refused cleanly when the name is taken or the data too big,
//! and durable once acknowledged (kill -9 right after).
mod common;

use coda::error::WireCode;
use coda::proto::{Fid, Msg, Record, RecordOp, MAX_INLINE};
use common::raw::{rec, Raw};
use common::TestServer;

const A: [u8; 16] = [0x1c; 16];

fn create_with(id: u64, parent: Fid, name: &str, fid: Fid, data: &[u8]) -> Record {
    Record {
        store_id: id,
        op: RecordOp::CreateWith {
            parent,
            name: name.into(),
            fid,
            mode: 0o640,
            mtime: rec::t(),
            uid: 1234,
            gid: 5678,
            data: data.to_vec(),
        },
    }
}

fn store_inline(id: u64, fid: Fid, expected_version: u64, data: &[u8]) -> Record {
    Record {
        store_id: id,
        op: RecordOp::StoreInline {
            fid,
            expected_version,
            mtime: rec::t(),
            data: data.to_vec(),
        },
    }
}

fn error_of(m: Msg) -> (WireCode, u32, String) {
    match m {
        Msg::Error {
            code,
            index,
            message,
        } => (code, index, message),
        m => panic!("expected an error, got {m:?}"),
    }
}

#[test]
fn create_with_makes_the_file_with_its_contents_in_one_record() {
    let s = TestServer::start();
    let mut c = Raw::control(s.addr(), &s.secret_file(), A, 1);
    let mut b = Raw::bulk(s.addr(), &s.secret_file(), A, 1);
    let root = c.root;
    let f = c.alloc(3);
    let res = c.apply(vec![
        create_with(1, root, "small", f[0], b"inline contents"),
        create_with(2, root, "empty", f[1], b""),
    ]);
    assert_eq!(res.len(), 2);
    assert_eq!(
        (res[0].size, res[0].mode, res[0].uid, res[0].gid),
        (15, 0o640, 1234, 5678)
    );
    assert_eq!(res[0].version, 2, "created at 1, stored once");
    assert_eq!(res[0].mtime, rec::t());
    let (attr, data) = b.fetch(f[0]).unwrap();
    assert_eq!(data, b"inline contents");
    assert_eq!(attr.size, 15);
    assert_eq!(b.fetch(f[1]).unwrap().1, b"");
    let names: Vec<String> = c.list(root).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, vec!["empty", "small"]);

    // StoreInline replaces the contents, with the version check.
    let res = c.apply(vec![store_inline(3, f[0], 2, b"second")]);
    assert_eq!((res[0].size, res[0].version), (6, 3));
    assert_eq!(b.fetch(f[0]).unwrap().1, b"second");
    let (code, index, _) = error_of(c.reintegrate(vec![store_inline(4, f[0], 2, b"stale")]));
    assert_eq!((code, index), (WireCode::Conflict, 0));
    assert_eq!(
        b.fetch(f[0]).unwrap().1,
        b"second",
        "a refused store changes nothing"
    );
    // A store into a directory is refused like a staged one.
    let (code, _, _) = error_of(c.reintegrate(vec![store_inline(5, root, 0, b"x")]));
    assert_eq!(code, WireCode::IsDir);
}

#[test]
fn create_with_refuses_a_taken_name_and_applies_nothing_of_its_batch() {
    let s = TestServer::start();
    let mut c = Raw::control(s.addr(), &s.secret_file(), A, 1);
    let mut b = Raw::bulk(s.addr(), &s.secret_file(), A, 1);
    let root = c.root;
    let f = c.alloc(3);
    c.apply(vec![create_with(1, root, "taken", f[0], b"first")]);
    let (code, index, _) = error_of(c.reintegrate(vec![
        rec::mkdir(2, root, "d", f[1]),
        create_with(3, root, "taken", f[2], b"second"),
    ]));
    assert_eq!((code, index), (WireCode::Exists, 1));
    assert_eq!(b.fetch(f[0]).unwrap().1, b"first");
    let names: Vec<String> = c.list(root).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, vec!["taken"], "the batch applied nothing");
    assert_eq!(c.attr(f[2]), Err(WireCode::Stale), "never created");
}

#[test]
fn oversized_inline_data_is_refused_with_a_clear_error_and_disturbs_nothing() {
    let s = TestServer::start();
    let mut c = Raw::control(s.addr(), &s.secret_file(), A, 1);
    let mut b = Raw::bulk(s.addr(), &s.secret_file(), A, 1);
    let root = c.root;
    let f = c.alloc(3);
    let big = vec![7u8; MAX_INLINE + 1];
    let (code, index, message) = error_of(c.reintegrate(vec![
        rec::mkdir(1, root, "d", f[1]),
        create_with(2, root, "big", f[0], &big),
    ]));
    assert_eq!((code, index), (WireCode::Invalid, 1));
    assert!(message.contains("inline data of 65537 bytes"), "{message}");
    assert!(c.list(root).is_empty(), "the batch applied nothing");
    let (code, index, message) = error_of(c.reintegrate(vec![store_inline(3, f[0], 0, &big)]));
    assert_eq!((code, index), (WireCode::Invalid, 0));
    assert!(message.contains("inline data"), "{message}");
    // The session goes on: exactly MAX_INLINE is accepted.
    let max = vec![9u8; MAX_INLINE];
    c.apply(vec![create_with(4, root, "max", f[2], &max)]);
    assert_eq!(b.fetch(f[2]).unwrap().1, max);
}

#[test]
fn an_acknowledged_create_with_survives_kill_9() {
    let mut s = TestServer::start();
    let (root, f) = {
        let mut c = Raw::control(s.addr(), &s.secret_file(), A, 1);
        let root = c.root;
        let f = c.alloc(20);
        let recs = (0..20)
            .map(|i| {
                let data = format!("file {i} ").repeat(100 + i);
                create_with(i as u64 + 1, root, &format!("f{i}"), f[i], data.as_bytes())
            })
            .collect();
        c.apply(recs);
        (root, f)
    };
    s.restart();
    let mut c = Raw::control(s.addr(), &s.secret_file(), A, 2);
    let mut b = Raw::bulk(s.addr(), &s.secret_file(), A, 2);
    assert_eq!(c.list(root).len(), 20);
    for (i, fid) in f.iter().enumerate() {
        let want = format!("file {i} ").repeat(100 + i);
        assert_eq!(b.fetch(*fid).unwrap().1, want.as_bytes(), "file {i}");
    }
}
