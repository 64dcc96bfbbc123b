//! The fid-based API under the path API: the same operations by directory
//! fid and name, and by object fid, agree with the path API.

mod client_util;
mod common;

use client_util::*;
use coda::client::FileType;
use coda::Error;
use common::TempDir;

#[test]
fn operations_by_fid_and_name_agree_with_the_path_api() {
    let srv = start();
    let d = TempDir::new("c");
    let c = client(&srv, d.path());
    let root = c.root_fid().unwrap();
    let dir = c.mkdir_at(root, "d", 0o755).unwrap();
    assert_eq!(c.stat("/d").unwrap().ino, c.getattr_fid(dir).unwrap().ino);
    let mut f = c
        .create_at(dir, "f", 0o644, libc::O_WRONLY)
        .expect("create");
    f.write_at(b"by fid", 0).unwrap();
    f.close().unwrap();
    let e = c.lookup_at(dir, "f").unwrap().expect("found");
    assert_eq!(e.ftype, FileType::File);
    let f = c.open_fid(e.fid, libc::O_RDONLY).unwrap();
    let mut buf = [0u8; 16];
    let n = f.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..n], b"by fid");
    assert_eq!(get(&c, "/d/f"), b"by fid");
    let l = c.symlink_at(dir, "l", "/d/f").unwrap();
    assert_eq!(c.readlink_fid(l).unwrap(), "/d/f");
    c.rename_at(dir, "f", root, "g").unwrap();
    assert_eq!(get(&c, "/g"), b"by fid");
    let mut names: Vec<String> = c
        .readdir_fid(dir)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    names.sort();
    assert_eq!(names, vec!["l"]);
    c.remove_at(dir, "l", false).unwrap();
    c.remove_at(root, "d", true).unwrap();
    assert!(c.lookup_at(root, "d").unwrap().is_none());
    // Names are one component; creating over a name is refused.
    for bad in ["", ".", "..", "a/b"] {
        assert!(
            matches!(c.mkdir_at(root, bad, 0o755), Err(Error::Invalid(_))),
            "{bad:?}"
        );
    }
    assert!(matches!(
        c.mkdir_at(root, "g", 0o755),
        Err(Error::Exists(_))
    ));
    assert!(matches!(
        c.open_fid(root, libc::O_RDONLY | libc::O_CREAT),
        Err(Error::Invalid(_))
    ));
    // Another client sees what the fid API did.
    let d2 = TempDir::new("c2");
    let other = client(&srv, d2.path());
    assert_eq!(names_of(&other), vec!["g"]);
}

fn names_of(c: &coda::client::Client) -> Vec<String> {
    let mut v = names(c, "/");
    v.sort();
    v
}
