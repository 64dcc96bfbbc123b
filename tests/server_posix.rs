//! POSIX metadata kept by a real coda-server: owners, atime, ctime,
//! special files, hard links of any non-directory, and the refusal of a
//! protocol-1 peer.
mod common;

use coda::error::WireCode;
use coda::proto::{ConnKind, FileType, Msg, Record, RecordOp, Timespec, XattrHow};
use common::raw::{hello, rec, Raw};
use common::TestServer;

const A: [u8; 16] = [0xb; 16];

fn clients(s: &TestServer) -> (Raw, Raw) {
    let c = Raw::control(s.addr(), &s.secret_file(), A, 1);
    let b = Raw::bulk(s.addr(), &s.secret_file(), A, 1);
    (c, b)
}

fn ts(sec: i64, nsec: u32) -> Timespec {
    Timespec { sec, nsec }
}

#[test]
fn creating_records_keep_the_owner_they_carry() {
    let s = TestServer::start();
    let (mut c, _b) = clients(&s);
    let root = c.root;
    let f = c.alloc(2);
    let res = c.apply(vec![
        rec::create_as(1, root, "mine", f[0], 1000, 100),
        rec::create_as(2, root, "theirs", f[1], 65534, 65534),
    ]);
    assert_eq!((res[0].uid, res[0].gid), (1000, 100));
    assert_eq!((res[1].uid, res[1].gid), (65534, 65534));
    let a = c.attr(f[0]).unwrap();
    assert_eq!((a.uid, a.gid), (1000, 100));
    assert_eq!(a.atime, a.mtime, "a new object's atime is its mtime");
    assert_eq!(a.rdev, 0);
}

#[test]
fn setattr_changes_owner_group_and_times_exactly_and_moves_ctime() {
    let s = TestServer::start();
    let (mut c, _b) = clients(&s);
    let root = c.root;
    let f = c.alloc(1);
    let made = c.apply(vec![rec::create_as(1, root, "f", f[0], 1000, 100)]);
    let ctime0 = made[0].ctime;
    let (atime, mtime) = (
        ts(1_000_000_000, 123_456_789),
        ts(1_100_000_000, 987_654_321),
    );
    let r = c.apply(vec![rec::setattr(
        2,
        f[0],
        None,
        Some(0),
        None,
        Some(atime),
        Some(mtime),
    )]);
    assert_eq!((r[0].uid, r[0].gid), (0, 100), "uid changed, gid kept");
    assert_eq!(r[0].atime, atime, "atime to the nanosecond");
    assert_eq!(r[0].mtime, mtime, "mtime to the nanosecond");
    assert_ne!(
        r[0].ctime, r[0].mtime,
        "ctime is the change's time, not mtime"
    );
    assert!(r[0].ctime >= ctime0);
    assert_eq!(r[0].version, made[0].version + 1, "one record, one version");
    // Group only, with the mode: nothing else moves.
    let r = c.apply(vec![rec::setattr(
        3,
        f[0],
        Some(0o2755),
        None,
        Some(50),
        None,
        None,
    )]);
    assert_eq!((r[0].uid, r[0].gid, r[0].mode), (0, 50, 0o2755));
    assert_eq!((r[0].atime, r[0].mtime), (atime, mtime));
    let a = c.attr(f[0]).unwrap();
    assert_eq!((a.uid, a.gid, a.atime, a.mtime), (0, 50, atime, mtime));
}

#[test]
fn special_files_are_metadata_with_their_type_and_device_number() {
    let s = TestServer::start();
    let (mut c, mut b) = clients(&s);
    let root = c.root;
    let f = c.alloc(4);
    let dev = (8 << 8) | 1;
    let res = c.apply(vec![
        rec::mknod(1, root, "fifo", f[0], FileType::Fifo, dev, 1, 2),
        rec::mknod(2, root, "sock", f[1], FileType::Socket, 0, 1, 2),
        rec::mknod(3, root, "chr", f[2], FileType::CharDev, dev, 1, 2),
        rec::mknod(4, root, "blk", f[3], FileType::BlockDev, dev, 1, 2),
    ]);
    let kinds: Vec<(FileType, u64, u32)> = res.iter().map(|a| (a.ftype, a.rdev, a.mode)).collect();
    assert_eq!(
        kinds,
        vec![
            (FileType::Fifo, 0, 0o640),
            (FileType::Socket, 0, 0o640),
            (FileType::CharDev, dev, 0o640),
            (FileType::BlockDev, dev, 0o640),
        ],
        "a fifo or socket has no device number"
    );
    let listed: Vec<(String, FileType)> = {
        let Msg::DirPage { entries, .. } = c.call(&Msg::ReadDir {
            fid: root,
            cursor: 0,
        }) else {
            panic!("no page")
        };
        entries.into_iter().map(|e| (e.name, e.ftype)).collect()
    };
    assert!(listed.contains(&("chr".into(), FileType::CharDev)));
    assert!(listed.contains(&("fifo".into(), FileType::Fifo)));
    let (attr, data) = b.fetch(f[2]).unwrap();
    assert_eq!((attr.ftype, data.len()), (FileType::CharDev, 0));
    // No data can be stored into one, and no size set.
    assert!(matches!(b.upload(9, b"x"), Msg::Uploaded { .. }));
    match c.reintegrate(vec![rec::store(5, f[0], 0, 9, 1)]) {
        Msg::Error { code, .. } => assert_eq!(code, WireCode::Invalid),
        m => panic!("store into a fifo: {m:?}"),
    }
    match c.reintegrate(vec![rec::truncate(6, f[0], 3)]) {
        Msg::Error { code, .. } => assert_eq!(code, WireCode::Invalid),
        m => panic!("truncate of a fifo: {m:?}"),
    }
}

#[test]
fn hard_links_count_names_of_any_non_directory() {
    let s = TestServer::start();
    let (mut c, _b) = clients(&s);
    let root = c.root;
    let f = c.alloc(4);
    c.apply(vec![
        rec::mkdir(1, root, "d", f[0]),
        rec::symlink(2, root, "ln", f[1], "/nowhere"),
        rec::mknod(3, root, "p", f[2], FileType::Fifo, 0, 0, 0),
        rec::link(4, f[0], "ln2", f[1]),
        rec::link(5, f[0], "p2", f[2]),
    ]);
    assert_eq!(c.attr(f[1]).unwrap().nlink, 2, "a symlink with two names");
    assert_eq!(c.attr(f[2]).unwrap().nlink, 2, "a fifo with two names");
    let listed = c.list(f[0]);
    assert!(listed.contains(&("ln2".to_string(), f[1])));
    // The entry keeps the object's type, not "file".
    let Msg::DirPage { entries, .. } = c.call(&Msg::ReadDir {
        fid: f[0],
        cursor: 0,
    }) else {
        panic!("no page")
    };
    let ln2 = entries.iter().find(|e| e.name == "ln2").unwrap();
    assert_eq!(ln2.ftype, FileType::Symlink);
    // Renaming one name over the other name of the same object does
    // nothing; removing one keeps the other.
    c.apply(vec![rec::rename(6, root, "ln", f[0], "ln2", f[1])]);
    assert_eq!(c.attr(f[1]).unwrap().nlink, 2);
    c.apply(vec![rec::remove(7, root, "ln", f[1])]);
    assert_eq!(c.attr(f[1]).unwrap().nlink, 1);
    // A directory cannot be linked.
    match c.reintegrate(vec![rec::link(8, root, "d2", f[0])]) {
        Msg::Error { code, .. } => assert_eq!(code, WireCode::IsDir),
        m => panic!("link to a directory: {m:?}"),
    }
    // A directory's link count: 2 + its subdirectories.
    let g = c.alloc(2);
    c.apply(vec![
        rec::mkdir(9, f[0], "s1", g[0]),
        rec::mkdir(10, f[0], "s2", g[1]),
    ]);
    assert_eq!(c.attr(f[0]).unwrap().nlink, 4);
}

#[test]
fn a_protocol_1_client_is_refused_with_a_version_error() {
    let s = TestServer::start();
    let mut sock = common::raw::tls_stream(s.addr());
    let mut h = hello(ConnKind::Control, "admin", A, 1, [1; 32]);
    if let Msg::Hello { version, .. } = &mut h {
        *version = 1;
    }
    coda::proto::write_frame(&mut sock, h.kind(), 0, &h.encode()).unwrap();
    let frame = coda::proto::read_frame(&mut sock)
        .unwrap()
        .expect("a reply");
    match Msg::decode(&frame).unwrap() {
        Msg::Error { code, message, .. } => {
            assert_eq!(code, WireCode::Protocol);
            assert!(
                message.contains("protocol version 1 not supported"),
                "{message}"
            );
        }
        m => panic!("expected a version error, got {m:?}"),
    }
}

fn setx(id: u64, fid: coda::proto::Fid, name: &str, how: XattrHow, value: &[u8]) -> Record {
    Record {
        store_id: id,
        op: RecordOp::SetXattr {
            fid,
            name: name.into(),
            how,
            value: value.to_vec(),
        },
    }
}

fn xattrs(c: &mut Raw, fid: coda::proto::Fid) -> (u64, Vec<(String, Vec<u8>)>) {
    match c.call(&Msg::GetXattrs { fid }) {
        Msg::Xattrs { version, items } => (version, items),
        m => panic!("GetXattrs: {m:?}"),
    }
}

#[test]
fn extended_attributes_are_kept_per_object_with_create_and_replace_checks() {
    let s = TestServer::start();
    let (mut c, _b) = clients(&s);
    let root = c.root;
    let f = c.alloc(1);
    c.apply(vec![rec::create(1, root, "f", f[0])]);
    assert_eq!(xattrs(&mut c, f[0]).1, vec![]);
    let r = c.apply(vec![
        setx(2, f[0], "user.b", XattrHow::Set, b"2"),
        setx(3, f[0], "user.a", XattrHow::Create, b"1"),
        setx(4, f[0], "user.b", XattrHow::Replace, b"22"),
    ]);
    let (version, items) = xattrs(&mut c, f[0]);
    assert_eq!(version, r[2].version, "the list comes with its version");
    assert_eq!(
        items,
        vec![
            ("user.a".into(), b"1".to_vec()),
            ("user.b".into(), b"22".to_vec())
        ],
        "in name order"
    );
    let code = |m: Msg| match m {
        Msg::Error { code, .. } => code,
        m => panic!("expected an error, got {m:?}"),
    };
    assert_eq!(
        code(c.reintegrate(vec![setx(5, f[0], "user.a", XattrHow::Create, b"x")])),
        WireCode::Exists
    );
    assert_eq!(
        code(c.reintegrate(vec![setx(6, f[0], "user.c", XattrHow::Replace, b"x")])),
        WireCode::NotFound
    );
    assert_eq!(
        code(c.reintegrate(vec![setx(7, f[0], "user.c", XattrHow::Remove, b"")])),
        WireCode::NotFound
    );
    // Names and values of one object: 64 KiB together at most.
    assert_eq!(
        code(c.reintegrate(vec![
            setx(8, f[0], "user.big1", XattrHow::Set, &[1; 40_000]),
            setx(9, f[0], "user.big2", XattrHow::Set, &[1; 40_000]),
        ])),
        WireCode::Invalid
    );
    c.apply(vec![setx(10, f[0], "user.a", XattrHow::Remove, b"")]);
    assert_eq!(
        xattrs(&mut c, f[0]).1,
        vec![("user.b".into(), b"22".to_vec())]
    );
    // They survive a restart of the server.
    drop(c);
    let mut s = s;
    s.restart();
    let (mut c, _b) = clients(&s);
    assert_eq!(
        xattrs(&mut c, f[0]).1,
        vec![("user.b".into(), b"22".to_vec())]
    );
}

/// Bytes of disk the files under `dir` take (holes take none).
fn disk_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let md = e.metadata().unwrap();
        total += if md.is_dir() {
            disk_bytes(&e.path())
        } else {
            md.blocks() * 512
        };
    }
    total
}

#[test]
fn sparse_files_keep_their_holes_in_uploads_objects_truncates_and_fetches() {
    let s = TestServer::start();
    let (mut c, mut b) = clients(&s);
    let root = c.root;
    let f = c.alloc(1);
    let gib: u64 = 1 << 30;
    let m = b.upload_sparse(1, gib, &[(0, b"head"), (gib / 2, b"middle")]);
    assert!(matches!(m, Msg::Uploaded { .. }), "{m:?}");
    c.apply(vec![
        rec::create(1, root, "sparse", f[0]),
        rec::store(2, f[0], 0, 1, gib),
    ]);
    let objects = s.root().join("objects");
    assert!(
        disk_bytes(&objects) < 8 << 20,
        "a 1 GiB file with 10 bytes of data takes {} bytes on the server",
        disk_bytes(&objects)
    );
    // The fetch sends the data extents only.
    let (attr, length, parts) = b.fetch_extents(f[0]).unwrap();
    assert_eq!((attr.size, length), (gib, gib));
    let sent: usize = parts.iter().map(|(_, d)| d.len()).sum();
    assert!(sent < 1 << 20, "{sent} bytes sent for 10 bytes of data");
    let at = |off: u64, n: usize| -> Vec<u8> {
        let mut out = vec![0u8; n];
        for (o, d) in &parts {
            for (i, byte) in out.iter_mut().enumerate() {
                let p = off + i as u64;
                if p >= *o && p < o + d.len() as u64 {
                    *byte = d[(p - o) as usize];
                }
            }
        }
        out
    };
    assert_eq!(at(0, 4), b"head");
    assert_eq!(at(gib / 2, 6), b"middle");
    assert_eq!(at(gib / 4, 4), [0; 4]);
    // Growing by truncate, and cutting, keep the holes.
    c.apply(vec![rec::truncate(3, f[0], 3 * gib)]);
    assert!(disk_bytes(&objects) < 8 << 20, "the grown copy is sparse");
    c.apply(vec![rec::truncate(4, f[0], gib / 2 + 3)]);
    let (_, length, parts) = b.fetch_extents(f[0]).unwrap();
    assert_eq!(length, gib / 2 + 3);
    let tail = parts
        .iter()
        .find(|(o, d)| o + d.len() as u64 == length)
        .unwrap();
    assert!(tail.1.ends_with(b"mid"), "cut inside the data");
    // Extents that overlap, run backwards or past the end are a protocol
    // error that closes only that connection.
    let _ = b.send(&Msg::Upload {
        upload_id: 2,
        length: 100,
        extents: vec![(50, 10), (40, 5)],
    });
    match b.recv() {
        Some((_, Msg::Error { code, .. })) => assert_eq!(code, WireCode::Protocol),
        m => panic!("expected a protocol error, got {m:?}"),
    }
    assert!(c.attr(f[0]).is_ok(), "the control connection goes on");
}
