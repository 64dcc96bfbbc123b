//! The control socket of a running mount (`cache_dir/control.sock`): the
//! `coda` CLI sends one request line, gets one response (protocol in
//! `coda::client::control` and docs/MOUNT.md). Each connection gets its own
//! thread, so a slow probe never delays a failover.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coda::client::control::{decode_request, Response, MAX_REQUEST};
use coda::client::{
    CachedObject, Client, ClientState, Conflict, Expand, FileType, HoardEntry, Keep,
};
use coda::Error;

use crate::fs::Shared;

/// How long `flush` waits for objects that are open only because the
/// kernel has not yet sent their release: close(2) returns before the
/// kernel's RELEASE reaches the mount, so `cat f; coda flush f` would
/// otherwise often find `f` still open.
const RELEASE_GRACE: Duration = Duration::from_millis(500);

/// `Client::flush`, trying again while something is busy: for one object
/// until `RELEASE_GRACE` has passed; for the whole cache once, after a
/// moment (every pass walks every object, and a file a program keeps open
/// stays busy however long one waits). Objects dropped by an earlier try
/// report nothing to drop on the next, so the counts add up.
fn flush(c: &Client, path: Option<&str>) -> coda::Result<coda::client::FlushReport> {
    let deadline = Instant::now() + RELEASE_GRACE;
    let mut r = c.flush(path)?;
    let mut tries = 0;
    while r.busy > 0 && Instant::now() < deadline && (path.is_some() || tries == 0) {
        std::thread::sleep(Duration::from_millis(if path.is_some() { 10 } else { 50 }));
        let again = c.flush(path)?;
        r.flushed += again.flushed;
        r.busy = again.busy;
        tries += 1;
    }
    Ok(r)
}

/// What the handlers need to know about the mount.
pub struct Ctx {
    pub client: Client,
    pub shared: Arc<Shared>,
    pub mountpoint: PathBuf,
    pub cache_dir: PathBuf,
    pub servers: Vec<String>,
    pub started: Instant,
}

/// Removes the socket file when the mount ends.
pub struct ControlSocket {
    path: PathBuf,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Bind the socket (replacing a stale one nobody listens on) and serve it
/// on a thread of its own.
pub fn start(ctx: Arc<Ctx>, path: &Path) -> std::io::Result<ControlSocket> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is served by another mount", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    // Only the mount's owner may drive it.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    std::thread::Builder::new()
        .name("coda-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let ctx = ctx.clone();
                let _ = std::thread::Builder::new()
                    .name("coda-control-req".into())
                    .spawn(move || serve_one(&ctx, conn));
            }
        })?;
    Ok(ControlSocket {
        path: path.to_path_buf(),
    })
}

fn serve_one(ctx: &Ctx, conn: UnixStream) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    let read = BufReader::new(&conn)
        .take(MAX_REQUEST as u64)
        .read_line(&mut line);
    let resp = match read {
        Ok(_) if line.ends_with('\n') => handle(ctx, &decode_request(&line)),
        _ => Response::Err {
            errno: libc::EINVAL,
            message: "expected one request line".into(),
        },
    };
    let mut conn = conn;
    let _ = conn.write_all(resp.encode().as_bytes());
}

fn fail(e: &Error) -> Response {
    let c = e.code();
    Response::Err {
        errno: if c < 0 && c > -10000 { -c } else { libc::EIO },
        message: e.to_string(),
    }
}

fn usage(msg: &str) -> Response {
    Response::Err {
        errno: libc::EINVAL,
        message: msg.to_string(),
    }
}

fn state_name(client: &Client) -> &'static str {
    if client.operator_disconnected() {
        return "disconnected by operator";
    }
    match client.state() {
        ClientState::Connected => "connected",
        ClientState::Disconnected => "disconnected",
        ClientState::FailedOver => "failed over",
    }
}

/// Handle one request (`args[0]` is the command).
pub fn handle(ctx: &Ctx, args: &[String]) -> Response {
    let c = &ctx.client;
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["status"] => Response::Ok(status(ctx)),
        ["checkservers"] => Response::Ok(check_servers(ctx)),
        ["failover", link, target] => match c.failover(Path::new(link), Path::new(target)) {
            Ok(()) => {
                // Nothing the kernel cached may be served after the swap:
                // dropped before the operator hears the failover is done.
                ctx.shared.kcache.invalidate_all(true);
                Response::Ok(vec![format!("failed over: {link} -> {target}")])
            }
            Err(e) => fail(&e),
        },
        ["failback", link, target] => match c.failback(Path::new(link), Path::new(target)) {
            Ok(()) => Response::Ok(vec![format!("failed back: {link} -> {target}")]),
            Err(e) => fail(&e),
        },
        ["disconnect"] => match c.disconnect() {
            Ok(()) => Response::Ok(vec!["disconnected".into()]),
            Err(e) => fail(&e),
        },
        ["reconnect"] => match c.reconnect() {
            Ok(()) => Response::Ok(vec!["reconnected".into()]),
            Err(e) => fail(&e),
        },
        ["flush"] | ["flush", _] => match flush(c, a.get(1).copied()) {
            Ok(r) => Response::Ok(vec![
                format!("flushed: {}", r.flushed),
                format!("busy: {}", r.busy),
            ]),
            Err(e) => fail(&e),
        },
        ["listcache"] => Response::Ok(c.cached_objects().iter().map(cache_line).collect()),
        ["listconflicts"] => match c.conflicts() {
            Ok(list) => Response::Ok(list.iter().map(|k| conflict_line(ctx, k)).collect()),
            Err(e) => fail(&e),
        },
        ["resolve", id, keep] => {
            let Ok(id) = id.parse::<u64>() else {
                return usage(&format!("resolve: {id:?} is not a conflict id"));
            };
            let keep = match *keep {
                "local" => Keep::Local,
                "server" => Keep::Server,
                k => return usage(&format!("resolve: keep {k:?}: want local or server")),
            };
            match c.resolve_conflict(id, keep) {
                Ok(()) => Response::Ok(vec![format!("resolved {id}: kept {}", a[2])]),
                Err(e) => fail(&e),
            }
        }
        ["reintegrate"] => match c.reintegrate_now() {
            Ok(()) => Response::Ok(vec![format!("pending records: {}", c.pending_records())]),
            Err(e) => fail(&e),
        },
        ["hoard", "add", entry] => match HoardEntry::parse(entry)
            .and_then(|h| c.hoard_add(&h.path, h.priority, h.expand))
        {
            Ok(()) => Response::Ok(vec![format!("hoarding {entry}")]),
            Err(e) => fail(&e),
        },
        ["hoard", "remove", path] => match c.hoard_remove(path) {
            Ok(()) => Response::Ok(vec![format!("no longer hoarding {path}")]),
            Err(e) => fail(&e),
        },
        ["hoard", "list"] => match c.hoard_list() {
            Ok(list) => Response::Ok(list.iter().map(hoard_line).collect()),
            Err(e) => fail(&e),
        },
        ["hoard", "walk"] => match c.hoard_walk() {
            Ok(r) => Response::Ok(vec![
                format!("objects: {}", r.objects),
                format!("fetched: {}", r.fetched),
                format!("fetched_bytes: {}", r.fetched_bytes),
                format!("skipped: {}", r.skipped),
                format!("missing: {}", r.missing),
            ]),
            Err(e) => fail(&e),
        },
        ["listacl", path] => match c.acl_get(path) {
            Ok(acl) => Response::Ok(acl_lines(&acl)),
            Err(e) => fail(&e),
        },
        ["setacl", path, name, rights] => match c.acl_set(path, name, rights) {
            Ok(acl) => Response::Ok(acl_lines(&acl)),
            Err(e) => fail(&e),
        },
        ["whoami"] => match c.whoami() {
            Ok(w) => Response::Ok(vec![
                format!("user: {}", w.user),
                format!("id: {}", w.id),
                format!("groups: {}", w.groups.join(" ")),
            ]),
            Err(e) => fail(&e),
        },
        [cmd, ..] => usage(&format!("unknown command or wrong arguments: {cmd}")),
        [] => usage("empty request"),
    }
}

fn status(ctx: &Ctx) -> Vec<String> {
    let c = &ctx.client;
    let s = c.stats();
    let sh = &ctx.shared;
    let mut out = vec![format!("state: {}", state_name(c))];
    if let Some(r) = c.interrupted() {
        out.push(format!("reason: {r}"));
    }
    out.extend([
        format!("mountpoint: {}", ctx.mountpoint.display()),
        format!("cache_dir: {}", ctx.cache_dir.display()),
        format!("servers: {}", ctx.servers.join(",")),
        format!("pid: {}", std::process::id()),
        format!("uptime_s: {}", ctx.started.elapsed().as_secs()),
        format!(
            "passthrough: {}",
            if sh.passthrough.load(Ordering::Relaxed) {
                "on"
            } else {
                "off"
            }
        ),
        format!("open_files: {}", sh.open_files.load(Ordering::Relaxed)),
        format!(
            "passthrough_opens: {}",
            sh.passthrough_opens.load(Ordering::Relaxed)
        ),
        format!("plain_opens: {}", sh.plain_opens.load(Ordering::Relaxed)),
        format!(
            "backing_files: {}",
            sh.backing_files.load(Ordering::Relaxed)
        ),
        format!("fuse_reads: {}", sh.reads.load(Ordering::Relaxed)),
        format!("fuse_lookups: {}", sh.lookups.load(Ordering::Relaxed)),
        format!("fuse_getattrs: {}", sh.getattrs.load(Ordering::Relaxed)),
        format!(
            "kept_cache_opens: {}",
            sh.kept_cache_opens.load(Ordering::Relaxed)
        ),
        format!("fast_opens: {}", sh.fast_opens.load(Ordering::Relaxed)),
        format!("paged_opens: {}", sh.paged_opens.load(Ordering::Relaxed)),
        format!(
            "no_open: {}",
            if sh.no_open.load(Ordering::Relaxed) {
                "on"
            } else {
                "off"
            }
        ),
        format!(
            "fuse_open_requests: {}",
            sh.open_requests.load(Ordering::Relaxed)
        ),
        format!(
            "fuse_flush_requests: {}",
            sh.flush_requests.load(Ordering::Relaxed)
        ),
        format!("fetches: {}", s.fetches),
        format!("fetch_bytes: {}", s.fetch_bytes),
        format!("breaks_received: {}", s.breaks_received),
        format!("reintegrations: {}", s.reintegrations),
    ]);
    out
}

/// `server ADDR up rtt_ms=N` / `server ADDR down: REASON`. The server of
/// the client's session is asked a real question; the others (and all of
/// them while failed over or disconnected, when the client may not talk
/// to servers) are probed with a TCP connect, which says `reachable`.
fn check_servers(ctx: &Ctx) -> Vec<String> {
    let mut out = Vec::new();
    let mut asked = None;
    if ctx.client.interrupted().is_none() {
        match ctx.client.check_server() {
            Ok((addr, rtt)) => {
                out.push(format!(
                    "server {addr} up rtt_ms={:.3}",
                    rtt.as_secs_f64() * 1e3
                ));
                asked = Some(addr);
            }
            Err(e) => {
                if let [only] = ctx.servers.as_slice() {
                    return vec![format!("server {only} down: {e}")];
                }
            }
        }
    }
    // A group's leader says which members it hears: a stopped member
    // still accepts TCP connections, so its word beats a probe of ours.
    if asked.is_some() && ctx.servers.len() > 1 {
        if let Ok(view) = ctx.client.group_view() {
            if let Some(l) = view.leader() {
                out.push(format!("group leader {} term {}", l.addr, view.term));
            }
            for m in &view.members {
                out.push(format!(
                    "member {} {} {}{}",
                    m.id,
                    m.addr,
                    if m.up { "up" } else { "down" },
                    if m.leader { " leader" } else { "" }
                ));
            }
            return out;
        }
    }
    for addr in &ctx.servers {
        if asked.as_deref() == Some(addr.as_str()) {
            continue;
        }
        out.push(match tcp_probe(addr) {
            Ok(()) => format!("server {addr} reachable (tcp connect)"),
            Err(e) => format!("server {addr} down: {e}"),
        });
    }
    out
}

fn tcp_probe(addr: &str) -> std::io::Result<()> {
    let mut last = std::io::Error::other("no address");
    for a in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, Duration::from_millis(500)) {
            Ok(_) => return Ok(()),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// `ID KIND RECORDS OP | PATH | local: FILE | server: MOUNTED PATH | REASON`:
/// the local version is the kept container, the server's is what the
/// mount shows at the path.
fn conflict_line(ctx: &Ctx, k: &Conflict) -> String {
    let server = if k.path.is_empty() {
        "?".to_string()
    } else {
        ctx.mountpoint
            .join(k.path.trim_start_matches('/'))
            .display()
            .to_string()
    };
    format!(
        "{} {} {} {} | {} | local: {} | server: {} | {}",
        k.id,
        k.kind,
        k.records,
        k.op,
        if k.path.is_empty() { "?" } else { &k.path },
        k.local_copy
            .as_ref()
            .map_or("-".to_string(), |p| p.display().to_string()),
        server,
        k.reason
    )
}

/// A hoard profile line: `PATH PRIORITY[:c|:c+|:d|:d+]`.
fn hoard_line(h: &HoardEntry) -> String {
    let suffix = match h.expand {
        Expand::Itself => "",
        Expand::Children => ":c+",
        Expand::Descendants => ":d+",
    };
    format!("{} {}{suffix}", h.path, h.priority)
}

/// `TYPE SIZE CACHED STATE CALLBACK FLAGS FID PATH` (PATH last: it may hold
/// spaces; `?` when no cached listing names the object).
fn cache_line(o: &CachedObject) -> String {
    let t = match o.ftype {
        FileType::File => "file",
        FileType::Dir => "dir",
        FileType::Symlink => "symlink",
        FileType::Fifo => "fifo",
        FileType::Socket => "socket",
        FileType::CharDev => "chardev",
        FileType::BlockDev => "blockdev",
    };
    let mut flags = Vec::new();
    if o.dirty {
        flags.push("dirty".to_string());
    }
    if o.open > 0 {
        flags.push(format!("open={}", o.open));
    }
    format!(
        "{t} {} {} {} {} {} {} {}",
        o.size,
        o.cached_bytes.map_or("-".into(), |b| b.to_string()),
        if o.current { "current" } else { "stale" },
        if o.callback { "callback" } else { "-" },
        if flags.is_empty() {
            "-".into()
        } else {
            flags.join(",")
        },
        o.fid,
        o.path.as_deref().unwrap_or("?"),
    )
}

/// `coda listacl` lines: `NAME RIGHTS`, a negative entry's rights with a
/// leading `-` (what `coda setacl` takes back).
fn acl_lines(acl: &coda::client::AclInfo) -> Vec<String> {
    acl.entries
        .iter()
        .map(|e| {
            let sign = if e.negative { "-" } else { "" };
            let rights = coda::proto::acl::rights_string(e.rights);
            format!("{} {sign}{rights}", e.name)
        })
        .collect()
}
