//! User, group, anonymous-access and quota administration (`coda-server
//! user`, `group`, `anonymous`, `quota`) while the server runs. redb lets one process open
//! the metadata, so the command goes to the running server over a Unix
//! socket in its data directory (`admin.sock`, mode 0600 in the 0700
//! directory, and the peer must be root or the server's own user); with no
//! server running the command opens the metadata itself. Either way the
//! same function does the work.
//!
//! Wire: one request line of tab-separated words, one reply: `ok` or
//! `err <errno> <message>` on the first line, then the output lines; the
//! server closes after it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use redb::Database;

use super::{acl, log, Shared};
use crate::{Error, Result};

/// The socket's name in the data directory.
pub const SOCKET: &str = "admin.sock";
/// Longest request line.
const MAX_REQUEST: u64 = 64 * 1024;

/// Run one administration command on an open metadata store; returns its
/// output. `root` is the data directory (new users' secret files go there).
pub fn run_command(db: &Database, root: &Path, words: &[String]) -> Result<String> {
    let w: Vec<&str> = words.iter().map(|s| s.as_str()).collect();
    let rest = |n: usize| words[n..].to_vec();
    match w.as_slice() {
        ["user", "add", name] => {
            super::volume::check_user(name)?;
            let path = super::volume::add_user_to(db, root, name)?;
            Ok(format!("added {name}; secret in {}\n", path.display()))
        }
        ["user", "remove", name] => {
            acl::remove_user(db, root, name)?;
            Ok(format!("removed {name}\n"))
        }
        ["user", "list"] => Ok(acl::list_users(db)?
            .into_iter()
            .map(|(u, id)| format!("{u}\t{id}\n"))
            .collect()),
        ["group", "add", group, ..] => {
            acl::group_add(db, group, &rest(3))?;
            Ok(String::new())
        }
        ["group", "remove", group, ..] => {
            acl::group_remove(db, group, &rest(3))?;
            Ok(String::new())
        }
        ["group", "members", group] => Ok(lines(acl::group_members(db, Some(group))?)),
        ["group", "list"] => Ok(lines(acl::group_members(db, None)?)),
        ["anonymous", on @ ("on" | "off")] => {
            acl::set_anonymous(db, *on == "on")?;
            Ok(format!("anonymous access {on}\n"))
        }
        ["quota", volume, set @ ..] if set.len() <= 1 => {
            let v: u32 = volume
                .parse()
                .map_err(|_| Error::Invalid(format!("{volume:?} is not a volume id")))?;
            let set = match set.first() {
                None => None,
                Some(&("none" | "unlimited")) => Some(None),
                Some(b) => {
                    Some(Some(b.parse::<u64>().map_err(|_| {
                        Error::Invalid(format!("{b:?} is not a byte count"))
                    })?))
                }
            };
            Ok(super::volume::volume_quota_in(db, v, set)?.line(v))
        }
        _ => Err(Error::Invalid(format!(
            "unknown administration command {:?}",
            words.join(" ")
        ))),
    }
}

fn lines(v: Vec<String>) -> String {
    v.into_iter().map(|s| s + "\n").collect()
}

/// Run a command for the CLI: through the running server's socket if there
/// is one, else on the metadata directly.
pub fn command(root: &Path, words: &[String]) -> Result<String> {
    match UnixStream::connect(root.join(SOCKET)) {
        Ok(s) => remote(s, words),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            if super::replication::machine::is_replicated_admin(words)
                && super::replication::config::GroupConfig::load(root)?.is_some()
            {
                return Err(Error::Again(format!(
                    "{} is a member of a replicated group: users, groups and quotas change \
                     through a running member (coda-server serve), which puts the change in the log",
                    root.display()
                )));
            }
            super::wal::settle(root)?;
            let db = super::volume::open_db(root)?;
            acl::migrate(&db)?;
            run_command(&db, root, words)
        }
        Err(e) => Err(Error::io(format!("connect to {}", SOCKET), e)),
    }
}

fn remote(mut s: UnixStream, words: &[String]) -> Result<String> {
    let io = |e| Error::io("admin socket", e);
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(io)?;
    let mut line = words.join("\t");
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(io)?;
    let mut reply = String::new();
    s.take(16 << 20).read_to_string(&mut reply).map_err(io)?;
    let (head, body) = reply.split_once('\n').unwrap_or((reply.as_str(), ""));
    if head == "ok" {
        return Ok(body.to_string());
    }
    let mut parts = head.splitn(3, ' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("err"), Some(code), Some(msg)) => Err(from_errno(code.parse().unwrap_or(5), msg)),
        _ => Err(Error::Protocol(format!("admin socket answered {head:?}"))),
    }
}

fn from_errno(code: i32, msg: &str) -> Error {
    let m = msg.to_string();
    match code {
        libc::ENOENT => Error::NotFound(m),
        libc::EEXIST => Error::Exists(m),
        libc::EINVAL => Error::Invalid(m),
        libc::EACCES => Error::Access(m),
        libc::ENOSPC => Error::NoSpace(m),
        _ => Error::Eio(m),
    }
}

/// Bind the socket (replacing a stale one: this process holds the
/// metadata, so no other server serves this directory).
pub fn bind(root: &Path) -> Result<(UnixListener, PathBuf)> {
    let path = root.join(SOCKET);
    let _ = std::fs::remove_file(&path);
    let l = UnixListener::bind(&path).map_err(|e| Error::io(format!("bind {SOCKET}"), e))?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(|e| Error::io(format!("chmod {SOCKET}"), e))?;
    Ok((l, path))
}

/// Serve the socket until the server stops (one request at a time: these
/// are rare operator commands).
pub fn serve(shared: Arc<Shared>, listener: UnixListener) {
    for conn in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let Ok(s) = conn else { continue };
        if !peer_allowed(&s) {
            let _ = (&s).write_all(b"err 13 only root or the server's user may administer it\n");
            continue;
        }
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
        let mut line = String::new();
        if BufReader::new((&s).take(MAX_REQUEST))
            .read_line(&mut line)
            .is_err()
        {
            continue;
        }
        let words: Vec<String> = line
            .trim_end_matches('\n')
            .split('\t')
            .map(str::to_string)
            .collect();
        let res = match &shared.repl {
            // A group's users, groups and quotas change through its log.
            Some(r) if super::replication::machine::is_replicated_admin(&words) => {
                super::replication::machine::admin(r, &words)
            }
            _ => shared
                .store
                .with_db(|db| run_command(db, &shared.root, &words)),
        };
        // Identities are cached per user: users or groups may have moved.
        shared.store.access.changed();
        let reply = match res {
            Ok(out) => {
                log::info(format_args!("admin: {}", words.join(" ")));
                format!("ok\n{out}")
            }
            Err(e) => format!("err {} {}\n", -e.code(), e.to_string().replace('\n', " ")),
        };
        let _ = (&s).write_all(reply.as_bytes());
    }
}

fn peer_allowed(s: &UnixStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    // SAFETY: geteuid has no preconditions.
    r == 0 && (cred.uid == 0 || cred.uid == unsafe { libc::geteuid() })
}
