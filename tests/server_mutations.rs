//! Mutations through Reintegrate, checked through GetAttrs, ReadDir and
//! Fetch against a real coda-server process.
mod common;

use coda::error::WireCode;
use coda::proto::{FileType, Msg};
use common::raw::{rec, Raw};
use common::TestServer;

const A: [u8; 16] = [0xa; 16];

fn clients(s: &TestServer) -> (Raw, Raw) {
    let c = Raw::control(s.addr(), &s.secret_file(), A, 1);
    let b = Raw::bulk(s.addr(), &s.secret_file(), A, 1);
    (c, b)
}

fn error_of(m: Msg) -> (WireCode, u32) {
    match m {
        Msg::Error { code, index, .. } => (code, index),
        m => panic!("expected an error, got {m:?}"),
    }
}

#[test]
fn create_store_fetch_and_list() {
    let s = TestServer::start();
    let (mut c, mut b) = clients(&s);
    let root = c.root;
    let f = c.alloc(4);
    assert!(matches!(
        b.upload(7, b"hello world"),
        Msg::Uploaded { upload_id: 7 }
    ));
    let res = c.apply(vec![
        rec::create(1, root, "a.txt", f[0]),
        rec::store(2, f[0], 0, 7, 11),
        rec::mkdir(3, root, "dir", f[1]),
        rec::symlink(4, f[1], "ln", f[2], "../a.txt"),
    ]);
    assert_eq!(res.len(), 4);
    assert_eq!(res[1].size, 11);
    assert_eq!(res[1].version, 2, "created at 1, stored once");
    let (attr, data) = b.fetch(f[0]).unwrap();
    assert_eq!(data, b"hello world");
    assert_eq!(attr.size, 11);
    let (_, target) = b.fetch(f[2]).unwrap();
    assert_eq!(target, b"../a.txt");
    let names: Vec<String> = c.list(root).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, vec!["a.txt", "dir"]);
    assert_eq!(c.list(f[1]), vec![("ln".to_string(), f[2])]);
    let dir = c.attr(root).unwrap();
    assert_eq!(dir.ftype, FileType::Dir);
    assert_eq!(dir.nlink, 3, "root gained one subdirectory");
    assert_eq!(dir.size, 2);
}

#[test]
fn link_remove_rename_rmdir_setattr() {
    let s = TestServer::start();
    let (mut c, mut b) = clients(&s);
    let root = c.root;
    let f = c.alloc(8);
    assert!(matches!(b.upload(1, b"0123456789"), Msg::Uploaded { .. }));
    c.apply(vec![
        rec::create(1, root, "x", f[0]),
        rec::store(2, f[0], 0, 1, 10),
        rec::link(3, root, "y", f[0]),
        rec::mkdir(4, root, "d", f[1]),
        rec::mkdir(5, root, "e", f[2]),
    ]);
    assert_eq!(c.attr(f[0]).unwrap().nlink, 2);
    c.apply(vec![rec::remove(6, root, "x", f[0])]);
    assert_eq!(c.attr(f[0]).unwrap().nlink, 1);
    assert_eq!(
        b.fetch(f[0]).unwrap().1,
        b"0123456789",
        "data survives via the other link"
    );
    c.apply(vec![rec::rename(7, root, "y", f[1], "z", f[0])]);
    assert_eq!(c.list(f[1]), vec![("z".to_string(), f[0])]);
    // A directory moved into its own subtree is refused.
    assert_eq!(
        error_of(c.reintegrate(vec![rec::rename(8, root, "d", f[1], "d2", f[1])])).0,
        WireCode::Invalid
    );
    // A dir cannot replace a non-empty dir; it replaces an empty one.
    assert_eq!(
        error_of(c.reintegrate(vec![rec::rename(9, root, "e", root, "d", f[2])])).0,
        WireCode::NotEmpty
    );
    let gone = c.apply(vec![rec::remove(20, f[1], "z", f[0])]);
    assert_eq!(gone[0].nlink, 0, "the last link went");
    c.apply(vec![rec::rename(21, root, "e", root, "d", f[2])]);
    assert_eq!(c.attr(f[1]), Err(WireCode::Stale));
    c.apply(vec![rec::create(22, f[2], "g", f[3])]);
    assert_eq!(
        error_of(c.reintegrate(vec![rec::rmdir(23, root, "d", f[2])])).0,
        WireCode::NotEmpty
    );
    c.apply(vec![
        rec::remove(24, f[2], "g", f[3]),
        rec::rmdir(25, root, "d", f[2]),
    ]);
    assert_eq!(c.attr(f[2]), Err(WireCode::Stale));
    assert_eq!(c.attr(f[0]), Err(WireCode::Stale));
    assert!(b.fetch(f[0]).is_err());
    // setattr: truncate and chmod.
    assert!(matches!(b.upload(2, b"abcdef"), Msg::Uploaded { .. }));
    c.apply(vec![
        rec::create(26, root, "t", f[4]),
        rec::store(27, f[4], 0, 2, 6),
        rec::truncate(28, f[4], 3),
    ]);
    assert_eq!(b.fetch(f[4]).unwrap().1, b"abc");
    c.apply(vec![rec::truncate(29, f[4], 5)]);
    assert_eq!(b.fetch(f[4]).unwrap().1, b"abc\0\0");
    let v = c.attr(f[4]).unwrap().version;
    let a = c.apply(vec![rec::chmod(30, f[4], v, 0o600)]);
    assert_eq!(a[0].mode, 0o600);
    c.apply(vec![rec::truncate(31, f[4], 0)]);
    assert_eq!(b.fetch(f[4]).unwrap().1, b"");
}

#[test]
fn a_batch_whose_third_record_fails_applies_nothing() {
    let s = TestServer::start();
    let (mut c, mut b) = clients(&s);
    let root = c.root;
    let f = c.alloc(4);
    assert!(matches!(b.upload(5, b"data"), Msg::Uploaded { .. }));
    let m = c.reintegrate(vec![
        rec::create(1, root, "one", f[0]),
        rec::store(2, f[0], 0, 5, 4),
        rec::create(3, root, "one", f[1]), // name taken by record 1
        rec::create(4, root, "two", f[2]),
    ]);
    assert_eq!(error_of(m), (WireCode::Exists, 2));
    assert!(c.list(root).is_empty(), "nothing of the batch is visible");
    assert_eq!(c.attr(f[0]), Err(WireCode::Stale));
    // The upload is still staged: the corrected batch can use it.
    c.apply(vec![
        rec::create(1, root, "one", f[0]),
        rec::store(2, f[0], 0, 5, 4),
    ]);
    assert_eq!(b.fetch(f[0]).unwrap().1, b"data");
}

#[test]
fn a_replayed_batch_is_not_applied_twice() {
    let s = TestServer::start();
    let (mut c, mut b) = clients(&s);
    let root = c.root;
    let f = c.alloc(2);
    assert!(matches!(b.upload(1, b"v1"), Msg::Uploaded { .. }));
    let batch = vec![
        rec::create(10, root, "f", f[0]),
        rec::store(11, f[0], 0, 1, 2),
    ];
    let first = c.apply(batch.clone());
    let again = c.apply(batch);
    assert_eq!(first[1], again[1], "same attrs, no second application");
    assert_eq!(c.attr(f[0]).unwrap().version, first[1].version);
    assert_eq!(c.list(root).len(), 1);
}

#[test]
fn expected_version_mismatch_is_a_conflict() {
    let s = TestServer::start();
    let (mut c, mut b) = clients(&s);
    let root = c.root;
    let f = c.alloc(1);
    let created = c.apply(vec![rec::create(1, root, "f", f[0])]);
    assert!(matches!(b.upload(1, b"x"), Msg::Uploaded { .. }));
    let stale_version = created[0].version + 5;
    assert_eq!(
        error_of(c.reintegrate(vec![rec::store(2, f[0], stale_version, 1, 1)])),
        (WireCode::Conflict, 0)
    );
    assert_eq!(
        error_of(c.reintegrate(vec![rec::chmod(3, f[0], stale_version, 0o600)])),
        (WireCode::Conflict, 0)
    );
    c.apply(vec![rec::store(4, f[0], created[0].version, 1, 1)]);
}

#[test]
fn bad_names_and_unreserved_fids_are_refused() {
    let s = TestServer::start();
    let (mut c, _b) = clients(&s);
    let root = c.root;
    let f = c.alloc(1);
    for bad in ["..", ".", "a/b", ""] {
        let (code, index) = error_of(c.reintegrate(vec![rec::create(1, root, bad, f[0])]));
        assert_eq!((code, index), (WireCode::Invalid, 0), "{bad:?}");
    }
    let foreign = coda::proto::Fid::new(1, 999_999, 1);
    assert_eq!(
        error_of(c.reintegrate(vec![rec::create(1, root, "n", foreign)])).0,
        WireCode::Invalid
    );
    let other_volume = coda::proto::Fid::new(2, f[0].vnode, 1);
    assert_eq!(
        error_of(c.reintegrate(vec![rec::create(1, root, "n", other_volume)])).0,
        WireCode::Invalid
    );
    // Another client cannot use A's reserved fid.
    let mut other = Raw::control(s.addr(), &s.secret_file(), [0xb; 16], 1);
    assert_eq!(
        error_of(other.reintegrate(vec![rec::create(1, root, "n", f[0])])).0,
        WireCode::Invalid
    );
    // A reserved fid is usable once, even after its object is gone.
    c.apply(vec![
        rec::create(1, root, "n", f[0]),
        rec::remove(2, root, "n", f[0]),
    ]);
    assert_eq!(
        error_of(c.reintegrate(vec![rec::create(3, root, "n", f[0])])).0,
        WireCode::Exists
    );
    assert!(c.list(root).is_empty());
}

#[test]
fn a_store_needs_its_upload_with_the_right_length() {
    let s = TestServer::start();
    let (mut c, mut b) = clients(&s);
    let root = c.root;
    let f = c.alloc(1);
    c.apply(vec![rec::create(1, root, "f", f[0])]);
    assert_eq!(
        error_of(c.reintegrate(vec![rec::store(2, f[0], 0, 42, 3)])).0,
        WireCode::NotFound
    );
    assert!(matches!(b.upload(42, b"abc"), Msg::Uploaded { .. }));
    assert_eq!(
        error_of(c.reintegrate(vec![rec::store(3, f[0], 0, 42, 4)])).0,
        WireCode::Invalid
    );
    c.apply(vec![rec::store(4, f[0], 0, 42, 3)]);
    // Consumed: a second Store of the same upload finds nothing.
    assert_eq!(
        error_of(c.reintegrate(vec![rec::store(5, f[0], 0, 42, 3)])).0,
        WireCode::NotFound
    );
    assert_eq!(
        error_of(c.reintegrate(vec![rec::store(6, root, 0, 42, 3)])).0,
        WireCode::IsDir
    );
}

#[test]
fn a_large_file_round_trips_and_directories_page() {
    let s = TestServer::start();
    let (mut c, mut b) = clients(&s);
    let root = c.root;
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let f = c.alloc(2100);
    assert!(matches!(b.upload(1, &data), Msg::Uploaded { .. }));
    c.apply(vec![
        rec::create(1, root, "big", f[0]),
        rec::store(2, f[0], 0, 1, data.len() as u64),
    ]);
    assert!(b.fetch(f[0]).unwrap().1 == data);
    let records = (1..2100)
        .map(|i| rec::create(10 + i as u64, root, &format!("n{i:05}"), f[i]))
        .collect();
    c.apply(records);
    let all = c.list(root);
    assert_eq!(all.len(), 2100, "more than one page, all entries once");
    let mut names: Vec<_> = all.iter().map(|(n, _)| n.clone()).collect();
    names.dedup();
    assert_eq!(names.len(), 2100);
}

/// A rename states what it expects at its destination; a name that holds
/// something else by then (another client's create while the renamer was
/// disconnected) refuses the batch instead of being silently replaced.
#[test]
fn a_rename_onto_a_name_that_changed_meanwhile_is_refused() {
    use coda::proto::Replaces;
    let s = TestServer::start();
    let (mut c, _b) = clients(&s);
    let root = c.root;
    let f = c.alloc(4);
    c.apply(vec![
        rec::create(1, root, "a", f[0]),
        rec::create(2, root, "taken", f[1]),
        rec::create(3, root, "b", f[2]),
    ]);
    let refused = |c: &mut common::raw::Raw, id, dst: &str, r| {
        error_of(c.reintegrate(vec![rec::rename_expecting(
            id, root, "a", root, dst, f[0], r,
        )]))
        .0
    };
    assert_eq!(
        refused(&mut c, 4, "taken", Replaces::Nothing),
        WireCode::Exists
    );
    assert_eq!(
        refused(&mut c, 5, "taken", Replaces::Object(f[2])),
        WireCode::Conflict
    );
    assert_eq!(
        refused(&mut c, 6, "free", Replaces::Object(f[1])),
        WireCode::Conflict
    );
    let names = |c: &mut common::raw::Raw| {
        let mut n: Vec<String> = c.list(root).into_iter().map(|(n, _)| n).collect();
        n.sort();
        n
    };
    assert_eq!(names(&mut c), ["a", "b", "taken"], "nothing was applied");
    c.apply(vec![rec::rename_expecting(
        7,
        root,
        "a",
        root,
        "taken",
        f[0],
        Replaces::Object(f[1]),
    )]);
    c.apply(vec![rec::rename_expecting(
        8,
        root,
        "b",
        root,
        "fresh",
        f[2],
        Replaces::Nothing,
    )]);
    assert_eq!(names(&mut c), ["fresh", "taken"]);
    assert_eq!(
        c.attr(f[1]),
        Err(WireCode::Stale),
        "the expected victim was replaced"
    );
}
