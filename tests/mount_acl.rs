//! Issue 13, the mount's half of "who may do what": a mount acting for the
//! coda user bob, its owners shown through `uid_map` (docs/MOUNT.md "Mapped
//! owners"), used by a local non-root user (uid 4242, mapped to bob). The
//! kernel's `default_permissions` lets that user try; the server refuses
//! what bob may not do, and the user sees exactly that errno.

mod client_util;
mod common;
mod mount_util;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use coda::client::{Client, Owner};
use common::{TempDir, TestServer, SERVER_BIN};

/// The local user the test acts as: no such account needs to exist.
const LOCAL_BOB: u32 = 4242;
/// What `unmapped_uid` says owners outside the map show as.
const UNMAPPED: u32 = 4343;

fn coda_server(srv: &TestServer, args: &[&str]) {
    let out = Command::new(SERVER_BIN)
        .args(args)
        .arg("--root")
        .arg(srv.root())
        .output()
        .expect("run coda-server");
    assert!(
        out.status.success(),
        "coda-server {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// Run `f` in a child process that is local uid/gid `uid` (no
/// supplementary groups); returns what `f` returned: 0 or an errno. The
/// child makes only system calls (no allocation after fork).
fn as_user(uid: u32, f: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the child calls only async-signal-safe functions (f is given
    // prepared C strings) and leaves with _exit.
    unsafe {
        let pid = libc::fork();
        assert!(pid >= 0, "fork");
        if pid == 0 {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(uid, uid, uid) != 0
                || libc::setresuid(uid, uid, uid) != 0
            {
                libc::_exit(200);
            }
            libc::_exit(f());
        }
        let mut status = 0;
        assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
        assert!(libc::WIFEXITED(status), "child status {status:#x}");
        let code = libc::WEXITSTATUS(status);
        assert_ne!(code, 200, "could not become uid {uid}");
        code
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(255)
}

/// open(path, flags, 0644): 0 and the descriptor closed, or the errno.
fn open_close(path: &CString, flags: i32) -> i32 {
    // SAFETY: a valid C string; the descriptor is closed here.
    unsafe {
        let fd = libc::open(path.as_ptr(), flags, 0o644);
        if fd < 0 {
            return errno();
        }
        if libc::close(fd) != 0 {
            return errno();
        }
        0
    }
}

/// Write `data` to an existing file and close it: the store happens at
/// close, so its refusal is close's result.
fn write_close(path: &CString, data: &[u8]) -> i32 {
    // SAFETY: a valid C string and buffer; the descriptor is closed here.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY);
        if fd < 0 {
            return errno();
        }
        if libc::write(fd, data.as_ptr().cast(), data.len()) < 0 {
            let e = errno();
            libc::close(fd);
            return e;
        }
        if libc::close(fd) != 0 {
            return errno();
        }
        0
    }
}

fn read_all(path: &CString) -> i32 {
    let mut buf = [0u8; 64];
    // SAFETY: a valid C string and buffer; the descriptor is closed here.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_RDONLY);
        if fd < 0 {
            return errno();
        }
        let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        let e = if n < 0 { errno() } else { 0 };
        libc::close(fd);
        e
    }
}

fn lib_client(srv: &TestServer, dir: &Path) -> Client {
    Client::new(client_util::config(srv, dir)).expect("client connects")
}

#[test]
fn a_mapped_local_user_is_refused_what_its_coda_user_may_not_do() {
    if !mount_util::fuse_available() {
        return;
    }
    let srv = TestServer::start();
    coda_server(&srv, &["user", "add", "bob"]);
    coda_server(&srv, &["user", "add", "carol"]);
    let d = TempDir::new("mount-acl");
    let admin = lib_client(&srv, &d.path().join("admin"));
    let ids = admin
        .user_ids(&[
            "admin".into(),
            "bob".into(),
            "carol".into(),
            "nobody-here".into(),
        ])
        .unwrap();
    assert_eq!(ids, [1, 2, 3, 0], "users get ids in order");
    let (admin_id, bob_id, carol_id) = (ids[0], ids[1], ids[2]);
    let owned = |uid| Owner { uid, gid: 0 };

    // /pub: everyone may write by mode, but the list denies bob i, d, w.
    let root = admin.root_fid().unwrap();
    let pubd = admin
        .mkdir_at_as(root, "pub", 0o777, owned(admin_id))
        .unwrap();
    admin.acl_set("/pub", "System:AnyUser", "rlidw").unwrap();
    admin.acl_set("/pub", "bob", "-idw").unwrap();
    for (name, uid) in [("admin.txt", admin_id), ("carol.txt", carol_id)] {
        let mut f = admin
            .create_at_as(pubd, name, 0o666, libc::O_WRONLY, owned(uid))
            .unwrap();
        f.write_at(b"public", 0).unwrap();
        f.close().unwrap();
    }
    // /bobs: bob's to fill.
    admin
        .mkdir_at_as(root, "bobs", 0o777, owned(admin_id))
        .unwrap();
    admin.acl_set("/bobs", "bob", "rlidw").unwrap();

    let bd = d.path().join("bob");
    std::fs::create_dir_all(&bd).unwrap();
    let secret = srv.root().join("bob.secret").display().to_string();
    let map = format!("bob:{LOCAL_BOB}, admin:0");
    let unmapped = UNMAPPED.to_string();
    let m = mount_util::Mount::start(
        &srv,
        &bd,
        &[
            ("user", "bob"),
            ("secret_file", &secret),
            ("uid_map", &map),
            ("unmapped_uid", &unmapped),
        ],
        &["--allow-other"],
    );
    // The mountpoint's parent must let the local user through.
    for p in [d.path(), bd.as_path()] {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }

    // Owners as local uids: admin is root here, carol is not in the map.
    let uid_of = |rel: &str| std::fs::symlink_metadata(m.path(rel)).unwrap().uid();
    assert_eq!(uid_of("pub/admin.txt"), 0);
    assert_eq!(uid_of("pub/carol.txt"), UNMAPPED);
    // `ls -ln` (readdirplus) shows the same.
    let ls = Command::new("ls")
        .arg("-ln")
        .arg(m.path("pub"))
        .output()
        .unwrap();
    assert!(ls.status.success(), "{ls:?}");
    let owners: Vec<(String, String)> = String::from_utf8_lossy(&ls.stdout)
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[8].to_string(), f[2].to_string())
        })
        .collect();
    assert_eq!(
        owners,
        [
            ("admin.txt".to_string(), "0".to_string()),
            ("carol.txt".to_string(), UNMAPPED.to_string())
        ]
    );

    let p = |rel: &str| cpath(&m.path(rel));
    let (admin_txt, new_txt, new_dir) = (p("pub/admin.txt"), p("pub/new.txt"), p("pub/d"));
    let (mine, mine_dir) = (p("bobs/mine.txt"), p("bobs/sub"));
    // Reading is allowed.
    assert_eq!(as_user(LOCAL_BOB, || read_all(&admin_txt)), 0);
    // Writing, creating, making a directory, removing: the kernel's mode
    // checks pass (0666, 0777); the server refuses bob.
    assert_eq!(
        as_user(LOCAL_BOB, || write_close(&admin_txt, b"bob was here")),
        libc::EACCES,
        "store refused: bob holds -w"
    );
    assert_eq!(
        as_user(LOCAL_BOB, || open_close(
            &new_txt,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL
        )),
        libc::EACCES,
        "create refused: bob holds -i"
    );
    assert_eq!(
        // SAFETY: a valid C string.
        as_user(LOCAL_BOB, || {
            if unsafe { libc::mkdir(new_dir.as_ptr(), 0o755) } == 0 {
                0
            } else {
                errno()
            }
        }),
        libc::EACCES
    );
    assert_eq!(
        // SAFETY: a valid C string.
        as_user(LOCAL_BOB, || {
            if unsafe { libc::unlink(admin_txt.as_ptr()) } == 0 {
                0
            } else {
                errno()
            }
        }),
        libc::EACCES,
        "remove refused: bob holds -d"
    );
    assert_eq!(client_util::get(&admin, "/pub/admin.txt"), b"public");
    assert_eq!(
        client_util::names(&admin, "/pub"),
        ["admin.txt", "carol.txt"]
    );

    // Where bob may write, the local user does, and what it makes is bob's:
    // the server keeps bob's id, the mount shows the mapped uid.
    assert_eq!(
        as_user(LOCAL_BOB, || open_close(
            &mine,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL
        )),
        0
    );
    assert_eq!(as_user(LOCAL_BOB, || write_close(&mine, b"bob's")), 0);
    assert_eq!(
        // SAFETY: a valid C string.
        as_user(LOCAL_BOB, || {
            if unsafe { libc::mkdir(mine_dir.as_ptr(), 0o755) } == 0 {
                0
            } else {
                errno()
            }
        }),
        0
    );
    assert_eq!(uid_of("bobs/mine.txt"), LOCAL_BOB);
    assert_eq!(uid_of("bobs/sub"), LOCAL_BOB);
    for path in ["/bobs/mine.txt", "/bobs/sub"] {
        assert_eq!(admin.lstat(path).unwrap().uid, bob_id, "{path}");
    }
    assert_eq!(client_util::get(&admin, "/bobs/mine.txt"), b"bob's");

    // chown (root's, by the kernel's rule) goes through the map: a uid the
    // map does not name is EINVAL; a mapped one reaches the server, which
    // lets only administrators give objects away.
    let chown = |path: &CString, uid: u32| {
        // SAFETY: a valid C string.
        if unsafe { libc::chown(path.as_ptr(), uid, u32::MAX) } == 0 {
            0
        } else {
            errno()
        }
    };
    assert_eq!(chown(&mine, 1000), libc::EINVAL);
    assert_eq!(chown(&mine, 0), libc::EACCES, "bob is no administrator");
    assert_eq!(chown(&mine, LOCAL_BOB), 0, "to its own owner: no change");
    assert_eq!(admin.lstat("/bobs/mine.txt").unwrap().uid, bob_id);
}

/// `UserIds` (what a mapped mount asks): names to ids for any user, 0 for
/// a name that is no user, refused to anonymous, and too many names at
/// once is a clear error before anything is sent.
#[test]
fn user_ids_answer_users_and_refuse_anonymous() {
    let srv = TestServer::start();
    coda_server(&srv, &["user", "add", "bob"]);
    let d = TempDir::new("user-ids");
    let mut c = client_util::config(&srv, &d.path().join("bob"));
    c.set("user", "bob").unwrap();
    c.set(
        "secret_file",
        srv.root().join("bob.secret").to_str().unwrap(),
    )
    .unwrap();
    let bob = Client::new(c).unwrap();
    assert_eq!(
        bob.user_ids(&["bob".into(), "admin".into(), "carol".into()])
            .unwrap(),
        [2, 1, 0]
    );
    let many: Vec<String> = (0..1025).map(|i| format!("u{i}")).collect();
    let e = bob.user_ids(&many).unwrap_err();
    assert_eq!(e.code(), -libc::EINVAL, "{e}");

    coda_server(&srv, &["anonymous", "on"]);
    let mut c = coda::client::Config::new();
    c.set("servers", &srv.addr().to_string()).unwrap();
    c.set("cache_dir", d.path().join("anon").to_str().unwrap())
        .unwrap();
    c.set("user", "anonymous").unwrap();
    c.set(
        "tls_fingerprint_file",
        srv.fingerprint_file().to_str().unwrap(),
    )
    .unwrap();
    let anon = Client::new(c).unwrap();
    assert_eq!(
        anon.user_ids(&["bob".into()]).unwrap_err().code(),
        -libc::EACCES
    );
}
