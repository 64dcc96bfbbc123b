//! `coda`: the operator's command line (what `cfs` is for Coda). Talks to
//! the running `coda-mount` of a cache directory over its control socket.
//!
//! Exit codes: 0 done, 1 the operation failed (message on stderr), 2 bad
//! usage, 3 no running mount for that cache (except `failover`, which then
//! only swaps the link). See docs/MOUNT.md.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::exit;
use std::time::Duration;

use coda::client::control::{self, Response};
use coda::client::Config;

const USAGE: &str = "\
usage: coda (--cache-dir DIR | --config FILE) COMMAND [ARGS]
       coda help | --help | --version
commands:
  status                              state of the mount and its client
  checkservers                        probe the servers (exit 1 if one is down)
  failover --link L --target T        repoint L to T, fail remote operations with EIO
  failback --link L --target T        repoint L to T once a server answers again
  disconnect                          leave the servers on purpose
  reconnect                           undo disconnect
  flush [PATH]                        drop cached data of PATH (or everything)
  listcache                           list cached objects:
                                      TYPE SIZE CACHED STATE CALLBACK FLAGS FID PATH
  listconflicts                       list reintegration conflicts: ID KIND RECORDS OP |
                                      PATH | local: FILE | server: PATH | REASON
  resolve ID --keep local|server      settle a conflict (local: resend the local version)
  reintegrate                         send logged changes now
  hoard add PATH PRIORITY[:c+|:d+]    keep PATH cached (c+: its entries, d+: everything below)
  hoard remove PATH                   stop hoarding PATH
  hoard list                          the hoard profile
  hoard walk                          fetch what the profile covers now
  listacl PATH                        a directory's access list: NAME RIGHTS (-RIGHTS: negative)
  setacl PATH NAME RIGHTS             set NAME's entry: rlidwka letters, all, read, write,
                                      -RIGHTS for a negative entry, none / -none to remove
  whoami                              the user the mount acts for, its id and groups";

const EXIT_FAILED: i32 = 1;
const EXIT_USAGE: i32 = 2;
const EXIT_NO_MOUNT: i32 = 3;

fn usage(msg: &str) -> ! {
    eprintln!("coda: {msg}\n{USAGE}");
    exit(EXIT_USAGE);
}

/// `--link L --target T`, in any order. A relative link is made absolute
/// here (the mount runs in another directory); the target is kept as
/// written, because a symlink's target is text, relative to its directory.
fn link_target(cmd: &str, rest: &[String]) -> (String, String) {
    let (mut link, mut target) = (None, None);
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        let v = || {
            it.clone()
                .next()
                .cloned()
                .unwrap_or_else(|| usage(&format!("{cmd}: {a} needs a value")))
        };
        match a.as_str() {
            "--link" => link = Some(v()),
            "--target" => target = Some(v()),
            _ => usage(&format!("{cmd}: unexpected argument {a}")),
        }
        it.next();
    }
    let link = link.unwrap_or_else(|| usage(&format!("{cmd}: --link is required")));
    let target = target.unwrap_or_else(|| usage(&format!("{cmd}: --target is required")));
    let link = if Path::new(&link).is_absolute() {
        link
    } else {
        std::env::current_dir()
            .map(|d| d.join(&link).display().to_string())
            .unwrap_or(link)
    };
    (link, target)
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut cache_dir: Option<PathBuf> = None;
    let mut i = 0;
    while i < argv.len() && argv[i].starts_with('-') {
        match argv[i].as_str() {
            "--cache-dir" => {
                let v = argv
                    .get(i + 1)
                    .unwrap_or_else(|| usage("--cache-dir needs a directory"));
                cache_dir = Some(PathBuf::from(v));
                i += 2;
            }
            "--config" => {
                let v = argv
                    .get(i + 1)
                    .unwrap_or_else(|| usage("--config needs a file"));
                let cfg = Config::from_file(Path::new(v)).unwrap_or_else(|e| {
                    eprintln!("coda: {e}");
                    exit(EXIT_USAGE)
                });
                cache_dir = Some(
                    cfg.cache_dir
                        .unwrap_or_else(|| usage(&format!("{v}: cache_dir is not set"))),
                );
                i += 2;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                exit(0);
            }
            "-V" | "--version" => {
                println!("coda {}", env!("CARGO_PKG_VERSION"));
                exit(0);
            }
            o => usage(&format!("unknown option {o}")),
        }
    }
    // `coda help` needs no mount to ask.
    if argv.get(i).map(String::as_str) == Some("help") {
        println!("{USAGE}");
        exit(0);
    }
    let cache_dir = cache_dir.unwrap_or_else(|| usage("--cache-dir DIR is required"));
    let Some(cmd) = argv.get(i) else {
        usage("a command is required")
    };
    let rest = &argv[i + 1..];
    let request: Vec<String> = match (cmd.as_str(), rest) {
        ("status" | "checkservers" | "disconnect" | "reconnect" | "listcache", []) => {
            vec![cmd.clone()]
        }
        ("listconflicts" | "reintegrate", []) => vec![cmd.clone()],
        ("resolve", [id, flag, keep]) if flag == "--keep" => {
            if id.parse::<u64>().is_err() {
                usage(&format!("resolve: {id:?} is not a conflict id"));
            }
            if keep != "local" && keep != "server" {
                usage("resolve: --keep local or --keep server");
            }
            vec![cmd.clone(), id.clone(), keep.clone()]
        }
        ("resolve", _) => usage("resolve ID --keep local|server"),
        ("hoard", [sub, path, prio]) if sub == "add" => {
            vec![cmd.clone(), sub.clone(), format!("{path} {prio}")]
        }
        ("hoard", [sub, path]) if sub == "remove" => vec![cmd.clone(), sub.clone(), path.clone()],
        ("hoard", [sub]) if sub == "list" || sub == "walk" => vec![cmd.clone(), sub.clone()],
        ("hoard", _) => usage("hoard add PATH PRIORITY[:c+|:d+] | remove PATH | list | walk"),
        ("listacl", [p]) => vec![cmd.clone(), fs_path(&cache_dir, p)],
        ("setacl", [p, name, rights]) => {
            if let Err(e) = coda::proto::acl::parse_rights(rights) {
                usage(&format!("setacl: {e}"));
            }
            vec![
                cmd.clone(),
                fs_path(&cache_dir, p),
                name.clone(),
                rights.clone(),
            ]
        }
        ("whoami", []) => vec![cmd.clone()],
        ("listacl", _) => usage("listacl PATH"),
        ("setacl", _) => usage("setacl PATH NAME RIGHTS"),
        ("flush", []) => vec![cmd.clone()],
        ("flush", [p]) => vec![cmd.clone(), fs_path(&cache_dir, p)],
        ("failover" | "failback", r) => {
            let (l, t) = link_target(cmd, r);
            vec![cmd.clone(), l, t]
        }
        (
            "status" | "checkservers" | "disconnect" | "reconnect" | "listcache" | "flush"
            | "listconflicts" | "reintegrate" | "whoami",
            _,
        ) => usage(&format!("{cmd}: too many arguments")),
        (c, _) => usage(&format!("unknown command {c}")),
    };
    let socket = control::socket_path(&cache_dir);
    let fields: Vec<&str> = request.iter().map(String::as_str).collect();
    match control::call(&socket, &fields, Duration::from_secs(60)) {
        Ok(Response::Ok(lines)) => {
            // A reader that stops early (`| head`) is not our failure.
            let mut out = std::io::stdout().lock();
            for l in &lines {
                if writeln!(out, "{l}").is_err() {
                    break;
                }
            }
            if cmd == "checkservers" && lines.iter().any(|l| l.contains(" down")) {
                exit(EXIT_FAILED);
            }
        }
        Ok(Response::Err { errno, message }) => {
            eprintln!("coda: {cmd}: {message} (errno {errno})");
            exit(EXIT_FAILED);
        }
        Err(e) if no_mount(&e) => {
            if cmd == "failover" {
                // Nobody to tell: a script still gets the link swapped.
                let (link, target) = (&request[1], &request[2]);
                match coda::client::failover::swap_link(Path::new(link), Path::new(target)) {
                    Ok(()) => {
                        println!("failed over: {link} -> {target} (no running mount: link only)");
                        exit(0);
                    }
                    Err(e) => {
                        eprintln!("coda: failover: {e}");
                        exit(EXIT_FAILED);
                    }
                }
            }
            eprintln!(
                "coda: no running mount for cache {} ({}: {e})",
                cache_dir.display(),
                socket.display()
            );
            exit(EXIT_NO_MOUNT);
        }
        Err(e) => {
            eprintln!("coda: {cmd}: {}: {e}", socket.display());
            exit(EXIT_FAILED);
        }
    }
}

fn no_mount(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
    )
}

/// `flush`, `listacl` and `setacl` take a path in the file system (`/web/index.html`); a path
/// under the mountpoint is translated (the mount says where it is).
fn fs_path(cache_dir: &Path, p: &str) -> String {
    if !p.starts_with('/') {
        usage("PATH must be absolute (in the file system, or under the mountpoint)");
    }
    let socket = control::socket_path(cache_dir);
    if let Ok(Response::Ok(lines)) = control::call(&socket, &["status"], Duration::from_secs(10)) {
        if let Some(mp) = lines.iter().find_map(|l| l.strip_prefix("mountpoint: ")) {
            let mp = mp.trim_end_matches('/');
            if p == mp {
                return "/".into();
            }
            if let Some(rest) = p.strip_prefix(&format!("{mp}/")) {
                return format!("/{rest}");
            }
        }
    }
    p.to_string()
}
