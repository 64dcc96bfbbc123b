//! `coda-server`: create a data directory, add users, and serve it.
//!
//! ```text
//! coda-server init    --root DIR [--user NAME]
//! coda-server init    --root DIR --node N --group ADDR1,ADDR2,ADDR3 [--user NAME | --from DIR0]
//! coda-server group status --root DIR [--insecure-plaintext]
//! coda-server group add    --root DIR --node N --addr ADDR [--insecure-plaintext]
//! coda-server group remove --root DIR --node N [--insecure-plaintext]
//! coda-server init-tls --root DIR
//! coda-server adduser --root DIR --user NAME
//! coda-server serve   --root DIR [--listen ADDR] [--break-timeout-ms N] [--idle-timeout-ms N]
//!                     [--max-file-size SIZE] [--max-staged SIZE]
//!                     [--max-staged-per-session SIZE] [--max-staged-uploads N]
//!                     [--insecure-plaintext] [--forget-clients-after DURATION]
//! coda-server quota   --root DIR [--volume N] [--bytes SIZE|none]
//! ```
//!
//! SIZE is a byte count with an optional K, M, G or T suffix (powers of
//! 1024). `quota` prints the volume's usage and quota (after setting it);
//! like `user` and `group` it works while the server runs (through
//! DIR/admin.sock) and while it is stopped.
//!
//! `serve` prints `listening on HOST:PORT` as its first stdout line, then
//! runs until SIGTERM or SIGINT and exits 0 after a clean shutdown.

use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use coda::server::{
    self, Server, ServerConfig, SpaceLimits, DEFAULT_BREAK_TIMEOUT, DEFAULT_IDLE_TIMEOUT,
};

const USAGE: &str = "usage:
  coda-server init    --root DIR [--user NAME]
  coda-server init    --root DIR --node N --group ADDR1,ADDR2,ADDR3 [--user NAME | --from DIR0]
  coda-server group status --root DIR   (asks every member of DIR's group)
  coda-server group add    --root DIR --node N --addr ADDR   (N initialised with init --from)
  coda-server group remove --root DIR --node N
      (group status/add/remove: --insecure-plaintext when the members serve so)
  coda-server init-tls --root DIR   (TLS key and certificate for a root made before TLS)
  coda-server adduser --root DIR --user NAME           (same as: user add NAME)
  coda-server user    add|remove NAME --root DIR
  coda-server user    list --root DIR
  coda-server group   add GROUP [USER...] --root DIR   (creates GROUP if new)
  coda-server group   remove GROUP [USER...] --root DIR (no USER: the whole group)
  coda-server group   members GROUP --root DIR | group list --root DIR
  coda-server anonymous on|off --root DIR   (anonymous: no secret, rights rl at most)
  coda-server serve   --root DIR [--listen ADDR] [--break-timeout-ms N] [--idle-timeout-ms N]
                      [--max-file-size SIZE] [--max-staged SIZE]
                      [--max-staged-per-session SIZE] [--max-staged-uploads N]
                      [--insecure-plaintext] [--forget-clients-after DURATION]
  coda-server quota   --root DIR [--volume N] [--bytes SIZE|none]
  coda-server --version | --help
ADDR: HOST:PORT, HOST an address or a name (localhost:2432); default 127.0.0.1:2432
SIZE: bytes, or with a K, M, G or T suffix (powers of 1024)
DURATION: days, or with an s, m, h or d suffix (default 180d)
user, group, anonymous, adduser and quota work while the server runs (through
DIR/admin.sock) and while it is stopped. Group names contain ':' (bob:friends).";

/// Exit codes: 1 = the operation failed, 2 = bad usage.
enum Fail {
    Usage(String),
    Run(String),
}

#[derive(Default)]
struct Args {
    root: Option<PathBuf>,
    user: Option<String>,
    listen: Option<String>,
    break_ms: Option<String>,
    idle_ms: Option<String>,
    max_file_size: Option<String>,
    max_staged: Option<String>,
    max_staged_session: Option<String>,
    max_staged_uploads: Option<String>,
    forget_after: Option<String>,
    volume: Option<String>,
    bytes: Option<String>,
    node: Option<String>,
    group: Option<String>,
    from: Option<String>,
    addr: Option<String>,
    insecure_plaintext: bool,
}

fn parse(cmd: &str, rest: &[String]) -> Result<Args, Fail> {
    let allowed: &[&str] = match cmd {
        "init" => &["--root", "--user", "--node", "--group", "--from"],
        "group status" => &["--root", "--insecure-plaintext"],
        "group add" => &["--root", "--node", "--addr", "--insecure-plaintext"],
        "group remove" => &["--root", "--node", "--insecure-plaintext"],
        "init-tls" => &["--root"],
        "adduser" => &["--root", "--user"],
        "serve" => &[
            "--root",
            "--listen",
            "--break-timeout-ms",
            "--idle-timeout-ms",
            "--max-file-size",
            "--max-staged",
            "--max-staged-per-session",
            "--max-staged-uploads",
            "--insecure-plaintext",
            "--forget-clients-after",
        ],
        "quota" => &["--root", "--volume", "--bytes"],
        _ => return Err(Fail::Usage(format!("unknown command {cmd:?}"))),
    };
    let mut a = Args::default();
    let mut it = rest.iter();
    while let Some(flag) = it.next() {
        if !allowed.contains(&flag.as_str()) {
            return Err(Fail::Usage(format!("{cmd}: unknown option {flag:?}")));
        }
        if flag == "--insecure-plaintext" {
            a.insecure_plaintext = true;
            continue;
        }
        let value = it
            .next()
            .ok_or_else(|| Fail::Usage(format!("{flag} needs a value")))?
            .clone();
        let slot = match flag.as_str() {
            "--root" => {
                a.root = Some(PathBuf::from(&value));
                continue;
            }
            "--user" => &mut a.user,
            "--listen" => &mut a.listen,
            "--idle-timeout-ms" => &mut a.idle_ms,
            "--max-file-size" => &mut a.max_file_size,
            "--max-staged" => &mut a.max_staged,
            "--max-staged-per-session" => &mut a.max_staged_session,
            "--max-staged-uploads" => &mut a.max_staged_uploads,
            "--forget-clients-after" => &mut a.forget_after,
            "--volume" => &mut a.volume,
            "--bytes" => &mut a.bytes,
            "--node" => &mut a.node,
            "--group" => &mut a.group,
            "--from" => &mut a.from,
            "--addr" => &mut a.addr,
            _ => &mut a.break_ms,
        };
        *slot = Some(value);
    }
    if a.root.is_none() {
        return Err(Fail::Usage(format!("{cmd}: --root DIR is required")));
    }
    Ok(a)
}

fn run() -> Result<(), Fail> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = argv.first() else {
        return Err(Fail::Usage("no command given".into()));
    };
    if cmd == "--help" || cmd == "-h" || cmd == "help" {
        println!("{USAGE}");
        return Ok(());
    }
    if cmd == "--version" || cmd == "-V" {
        println!("coda-server {}", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    // `group status` and `group add|remove --node N` manage a replicated
    // group's members; other `group` words manage user groups.
    let replica_words = cmd == "group"
        && (argv.get(1).is_some_and(|w| w == "status")
            || (argv.get(1).is_some_and(|w| w == "add" || w == "remove")
                && argv.iter().any(|w| w == "--node")));
    if replica_words {
        let sub = argv.get(1).map(String::as_str).unwrap_or("");
        let args = parse(&format!("group {sub}"), argv.get(2..).unwrap_or(&[]))?;
        let root = args.root.clone().expect("parse checked --root");
        if sub == "status" {
            return group_status(&root, !args.insecure_plaintext);
        }
        let node: u64 = args
            .node
            .as_deref()
            .ok_or_else(|| Fail::Usage(format!("group {sub}: --node N is required")))?
            .parse()
            .map_err(|_| Fail::Usage("--node: not a member number".into()))?;
        if sub == "add" && args.addr.is_none() {
            return Err(Fail::Usage(
                "group add: --addr HOST:PORT is required".into(),
            ));
        }
        let index = server::replication::change_membership(
            &root,
            node,
            args.addr.as_deref(),
            !args.insecure_plaintext,
        )
        .map_err(|e| Fail::Run(e.to_string()))?;
        println!(
            "member {node} {} at log index {index}",
            if sub == "add" { "added" } else { "removed" }
        );
        return Ok(());
    }
    if matches!(cmd.as_str(), "user" | "group" | "anonymous") {
        return admin(cmd, &argv[1..]);
    }
    let args = parse(cmd, &argv[1..])?;
    let root = args.root.clone().expect("parse checked --root");
    let fail = |e: coda::Error| Fail::Run(e.to_string());
    match cmd.as_str() {
        "init" if args.node.is_some() || args.group.is_some() || args.from.is_some() => {
            let (Some(node), Some(group)) = (&args.node, &args.group) else {
                return Err(Fail::Usage(
                    "init: a group member needs both --node N and --group ADDR1,ADDR2,...".into(),
                ));
            };
            let node: u64 = node
                .parse()
                .map_err(|_| Fail::Usage(format!("--node: {node:?} is not a member number")))?;
            let said = server::replication::init_member(
                &root,
                node,
                group,
                args.user.as_deref(),
                args.from.as_deref().map(std::path::Path::new),
            )
            .map_err(fail)?;
            println!("{said}");
            Ok(())
        }
        "init" => {
            let user = args.user.as_deref().unwrap_or("admin");
            let secret = server::init(&root, user).map_err(fail)?;
            println!(
                "initialised {}; secret of {user} in {}; TLS certificate fingerprint in {} \
                 (copy both to clients)",
                root.display(),
                secret.display(),
                coda::tls::fingerprint_path(&root).display()
            );
            Ok(())
        }
        "init-tls" => {
            let fp = server::init_tls(&root).map_err(fail)?;
            println!(
                "TLS key and certificate in {}; fingerprint {fp} in {} (copy it to clients)",
                root.join("tls").display(),
                coda::tls::fingerprint_path(&root).display()
            );
            Ok(())
        }
        "adduser" => {
            let user = args
                .user
                .as_deref()
                .ok_or_else(|| Fail::Usage("adduser: --user NAME is required".into()))?;
            let words = ["user", "add", user].map(String::from);
            let out = server::admin_command(&root, &words).map_err(fail)?;
            print!("{out}");
            Ok(())
        }
        "quota" => quota(&root, &args),
        _ => serve(root, &args),
    }
}

/// Parse SIZE: a byte count with an optional K/M/G/T suffix (powers of 1024).
/// `user`, `group` and `anonymous`: words and `--root DIR` in any order.
fn admin(cmd: &str, rest: &[String]) -> Result<(), Fail> {
    let mut words = vec![cmd.to_string()];
    let mut root = None;
    let mut it = rest.iter();
    while let Some(w) = it.next() {
        if w == "--root" {
            let v = it
                .next()
                .ok_or_else(|| Fail::Usage("--root needs a value".into()))?;
            root = Some(PathBuf::from(v));
        } else if w.starts_with("--") {
            return Err(Fail::Usage(format!("{cmd}: unknown option {w:?}")));
        } else {
            words.push(w.clone());
        }
    }
    let root = root.ok_or_else(|| Fail::Usage(format!("{cmd}: --root DIR is required")))?;
    let known = matches!(
        words
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice(),
        ["user", "add" | "remove", _]
            | ["user", "list"]
            | ["group", "add" | "remove", _, ..]
            | ["group", "members", _]
            | ["group", "list"]
            | ["anonymous", "on" | "off"]
    );
    if !known {
        return Err(Fail::Usage(format!(
            "{cmd}: cannot understand {:?}",
            words[1..].join(" ")
        )));
    }
    let out = server::admin_command(&root, &words).map_err(|e| Fail::Run(e.to_string()))?;
    print!("{out}");
    Ok(())
}

fn parse_size(flag: &str, v: &str) -> Result<u64, Fail> {
    let bad = || Fail::Usage(format!("{flag}: {v:?} is not a size (e.g. 4096, 100M, 2G)"));
    let (digits, shift) = match v.chars().last() {
        Some('K' | 'k') => (&v[..v.len() - 1], 10),
        Some('M' | 'm') => (&v[..v.len() - 1], 20),
        Some('G' | 'g') => (&v[..v.len() - 1], 30),
        Some('T' | 't') => (&v[..v.len() - 1], 40),
        _ => (v, 0),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// A positive duration: days, or a number with an s, m, h or d suffix.
fn parse_duration(flag: &str, v: &str) -> Result<Duration, Fail> {
    let bad = || {
        Fail::Usage(format!(
            "{flag}: {v:?} is not a duration (e.g. 180d, 12h, 30s)"
        ))
    };
    let (digits, unit) = match v.chars().last() {
        Some('s') => (&v[..v.len() - 1], 1),
        Some('m') => (&v[..v.len() - 1], 60),
        Some('h') => (&v[..v.len() - 1], 3600),
        Some('d') => (&v[..v.len() - 1], 86400),
        _ => (v, 86400),
    };
    let n: u64 = digits.parse().ok().filter(|n| *n > 0).ok_or_else(bad)?;
    n.checked_mul(unit).map(Duration::from_secs).ok_or_else(bad)
}

fn quota(root: &std::path::Path, args: &Args) -> Result<(), Fail> {
    let volume = match &args.volume {
        Some(v) => v
            .parse::<u32>()
            .map_err(|_| Fail::Usage(format!("--volume: {v:?} is not a volume id")))?,
        None => server::ROOT_VOLUME,
    };
    let set = match args.bytes.as_deref() {
        None => None,
        Some("none") | Some("unlimited") => Some(None),
        Some(v) => Some(Some(parse_size("--bytes", v)?)),
    };
    let space = server::volume_quota(root, volume, set).map_err(|e| Fail::Run(e.to_string()))?;
    print!("{}", space.line(volume));
    Ok(())
}

/// `--listen HOST:PORT`, where HOST is an address or a name (`localhost`);
/// a name binds its first address, as a client connecting to it would try.
fn resolve_listen(spec: &str) -> Result<SocketAddr, Fail> {
    if let Ok(a) = spec.parse() {
        return Ok(a);
    }
    if spec
        .rsplit_once(':')
        .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
    {
        return Err(Fail::Usage(format!("--listen: {spec:?} is not HOST:PORT")));
    }
    spec.to_socket_addrs()
        .map_err(|e| Fail::Usage(format!("--listen: cannot resolve {spec:?}: {e}")))?
        .next()
        .ok_or_else(|| Fail::Usage(format!("--listen: {spec:?} has no address")))
}

/// `group status`: every member's view, the leader's first.
fn group_status(root: &std::path::Path, tls: bool) -> Result<(), Fail> {
    let reports =
        server::replication::group_status(root, tls).map_err(|e| Fail::Run(e.to_string()))?;
    let leader = reports
        .iter()
        .filter_map(|r| r.status.as_ref().ok())
        .filter(|s| s.role == "leader")
        .max_by_key(|s| s.term);
    match leader {
        Some(l) => println!("leader {} term {} commit {}", l.id, l.term, l.commit),
        None => println!("leader none"),
    }
    let commit = leader.map(|l| l.commit).unwrap_or(0);
    for r in &reports {
        match &r.status {
            Ok(s) => println!(
                "member {} {} {} term {} applied {} lag {} durable {}",
                r.member.id,
                r.member.addr,
                s.role,
                s.term,
                s.applied,
                commit.saturating_sub(s.applied),
                s.durable
            ),
            Err(e) => println!("member {} {} unreachable ({e})", r.member.id, r.member.addr),
        }
    }
    Ok(())
}

fn serve(root: PathBuf, args: &Args) -> Result<(), Fail> {
    // A group member serves clients and peers on its group address.
    let member = server::replication::config::GroupConfig::load(&root)
        .map_err(|e| Fail::Run(e.to_string()))?
        .map(|g| g.me().addr.clone());
    let listen = resolve_listen(
        args.listen
            .as_deref()
            .or(member.as_deref())
            .unwrap_or("127.0.0.1:2432"),
    )?;
    let break_timeout = match &args.break_ms {
        Some(v) => {
            Duration::from_millis(v.parse::<u64>().ok().filter(|ms| *ms > 0).ok_or_else(|| {
                Fail::Usage(format!(
                    "--break-timeout-ms: {v:?} is not a positive integer"
                ))
            })?)
        }
        None => DEFAULT_BREAK_TIMEOUT,
    };
    // Block the stop signals in every thread (threads inherit the mask), so
    // they stay pending until the main thread takes them with sigwait: no
    // work ever runs inside a signal handler.
    let set = stop_signals();
    // SAFETY: `set` is an initialised sigset_t.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    let idle_timeout = match &args.idle_ms {
        Some(v) => {
            Duration::from_millis(v.parse::<u64>().ok().filter(|ms| *ms > 0).ok_or_else(|| {
                Fail::Usage(format!(
                    "--idle-timeout-ms: {v:?} is not a positive integer"
                ))
            })?)
        }
        None => DEFAULT_IDLE_TIMEOUT,
    };
    let mut space = SpaceLimits::default();
    if let Some(v) = &args.max_file_size {
        space.max_file_size = parse_size("--max-file-size", v)?;
    }
    if let Some(v) = &args.max_staged {
        space.staged.total_bytes = parse_size("--max-staged", v)?;
    }
    if let Some(v) = &args.max_staged_session {
        space.staged.session_bytes = parse_size("--max-staged-per-session", v)?;
    }
    if let Some(v) = &args.max_staged_uploads {
        space.staged.session_uploads = v
            .parse()
            .map_err(|_| Fail::Usage(format!("--max-staged-uploads: {v:?} is not a count")))?;
    }
    let forget_clients_after = match &args.forget_after {
        Some(v) => parse_duration("--forget-clients-after", v)?,
        None => server::DEFAULT_FORGET_CLIENTS_AFTER,
    };
    let server = Server::start(ServerConfig {
        root,
        listen,
        break_timeout,
        idle_timeout,
        space,
        insecure_plaintext: args.insecure_plaintext,
        forget_clients_after,
    })
    .map_err(|e| Fail::Run(e.to_string()))?;
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on {}", server.local_addr());
        let _ = out.flush();
    }
    let mut sig: libc::c_int = 0;
    loop {
        // SAFETY: `set` is initialised, `sig` is a valid out pointer.
        if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
            break;
        }
    }
    eprintln!("coda-server: signal {sig} received, shutting down");
    server.shutdown();
    Ok(())
}

fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the zeroed set before it is used.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail::Usage(m)) => {
            eprintln!("coda-server: {m}\n{USAGE}");
            ExitCode::from(2)
        }
        Err(Fail::Run(m)) => {
            eprintln!("coda-server: {m}");
            ExitCode::from(1)
        }
    }
}
