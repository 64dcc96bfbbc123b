//! Errors come back as the one `Error` type with the right errno.

mod client_util;
mod common;

use client_util::*;
use coda::client::{Client, Config};
use coda::Error;
use common::TempDir;

#[test]
fn file_system_errors_map_to_the_posix_ones() {
    let srv = start();
    let d = TempDir::new("c");
    let c = client(&srv, d.path());
    put(&c, "/file", b"x");
    c.mkdir("/dir", 0o755).unwrap();
    put(&c, "/dir/inner", b"y");

    assert!(matches!(c.stat("/nope"), Err(Error::NotFound(_))));
    assert!(matches!(
        c.open("/nope", libc::O_RDONLY, 0),
        Err(Error::NotFound(_))
    ));
    let e = c
        .open(
            "/file",
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
            0o644,
        )
        .err()
        .unwrap();
    assert!(matches!(e, Error::Exists(_)));
    assert_eq!(e.code(), -libc::EEXIST);
    assert!(matches!(c.mkdir("/dir", 0o755), Err(Error::Exists(_))));
    assert!(matches!(c.stat("/file/x"), Err(Error::NotDir(_))));
    assert!(matches!(c.mkdir("/file/sub", 0o755), Err(Error::NotDir(_))));
    assert!(matches!(c.readdir("/file"), Err(Error::NotDir(_))));
    assert!(matches!(c.rmdir("/file"), Err(Error::NotDir(_))));
    assert!(matches!(
        c.open("/dir", libc::O_RDWR, 0),
        Err(Error::IsDir(_))
    ));
    assert!(matches!(c.unlink("/dir"), Err(Error::IsDir(_))));
    let e = c.rmdir("/dir").unwrap_err();
    assert!(matches!(e, Error::NotEmpty(_)), "{e}");
    assert_eq!(e.code(), -libc::ENOTEMPTY);
    assert!(matches!(
        c.open("/file", libc::O_RDONLY | libc::O_DIRECTORY, 0),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(c.stat("file"), Err(Error::Invalid(_))));
    assert!(matches!(c.stat("/fi\0le"), Err(Error::Invalid(_))));
    assert!(matches!(c.mkdir("/", 0o755), Err(Error::Invalid(_))));
    // The failed mutations left everything as it was.
    assert_eq!(names(&c, "/"), vec!["dir", "file"]);
    assert_eq!(get(&c, "/dir/inner"), b"y");
}

#[test]
fn dotdot_stays_inside_the_file_system_and_symlinks_resolve_from_its_root() {
    let srv = start();
    let d = TempDir::new("c");
    let c = client(&srv, d.path());
    put(&c, "/file", b"top");
    c.mkdir("/dir", 0o755).unwrap();
    put(&c, "/dir/inner", b"in");

    assert_eq!(get(&c, "/dir/../file"), b"top");
    assert_eq!(get(&c, "/../../../file"), b"top", ".. never climbs above /");
    assert_eq!(get(&c, "/./dir/./inner"), b"in");
    assert_eq!(c.stat("/..").unwrap().fid, c.stat("/").unwrap().fid);

    c.symlink("/dir", "/abs").unwrap();
    c.symlink("dir/inner", "/rel").unwrap();
    c.symlink("../../../file", "/dir/up").unwrap();
    assert_eq!(get(&c, "/abs/inner"), b"in");
    assert_eq!(get(&c, "/rel"), b"in");
    assert_eq!(
        get(&c, "/dir/up"),
        b"top",
        "a relative target cannot escape either"
    );
    assert_eq!(c.readlink("/rel").unwrap(), "dir/inner");

    c.symlink("/loop2", "/loop1").unwrap();
    c.symlink("/loop1", "/loop2").unwrap();
    let e = c.stat("/loop1").unwrap_err();
    assert!(matches!(e, Error::Loop(_)), "{e}");
    assert_eq!(e.code(), -libc::ELOOP);
    assert!(matches!(
        c.open("/loop1/x", libc::O_RDONLY, 0),
        Err(Error::Loop(_))
    ));
    assert!(
        c.lstat("/loop1").is_ok(),
        "lstat does not follow the last link"
    );
}

#[test]
fn bad_config_and_wrong_secret_are_refused() {
    let mut cfg = Config::new();
    let e = cfg.set("no_such_key", "1").unwrap_err();
    assert!(matches!(&e, Error::Invalid(m) if m.contains("no_such_key")));
    assert!(
        matches!(Client::new(Config::new()), Err(Error::Invalid(_))),
        "cache_dir is required"
    );

    let srv = start();
    let d = TempDir::new("c");
    let wrong = d.path().join("wrong.secret");
    std::fs::write(&wrong, format!("{}\n", "ab".repeat(32))).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut cfg = config(&srv, &d.path().join("cache"));
    cfg.set("secret_file", wrong.to_str().unwrap()).unwrap();
    let e = Client::new(cfg).err().expect("a wrong secret is refused");
    assert!(matches!(e, Error::Auth(_)), "{e}");

    // A server that is not there: the error names it, promptly.
    let gone = TempDir::new("g");
    let mut cfg = config(&srv, gone.path());
    cfg.set("servers", "127.0.0.1:1").unwrap();
    let e = Client::new(cfg).err().expect("no server");
    assert!(
        matches!(e, Error::Eio(ref m) if m.contains("127.0.0.1:1")),
        "{e}"
    );
}
