//! `coda-mount`: mount the coda file system with FUSE, so unmodified
//! programs read and write it under a path (what `/coda` is for Coda).
//!
//! ```text
//! coda-mount --config FILE [--daemon] [--no-passthrough] [--no-kernel-cache]
//!            [--no-fast-open] [--no-paged-open] [--no-open] [--allow-other] [--threads N]
//!            [--spin-us N] [--nonempty] MOUNTPOINT
//! ```
//!
//! One `Client` inside does all the work. Prints `mounted on MOUNTPOINT`
//! once the mount is ready; unmounts cleanly on SIGTERM, SIGINT or SIGHUP.
//! A control socket in `cache_dir` lets the `coda` CLI drive it.
//! Exit codes: 0 clean unmount, 1 failure, 2 usage. See docs/MOUNT.md.

mod control;
mod fs;
mod gate;
mod idmap;
mod kcache;

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coda::client::{Client, Invalidation};
use crossbeam_channel::{bounded, select};

const USAGE: &str = "usage: coda-mount --config FILE [--daemon] [--no-passthrough] \
[--no-kernel-cache] [--no-fast-open] [--no-paged-open] [--no-open] [--allow-other] [--threads N] \
[--spin-us N] [--nonempty] MOUNTPOINT
       coda-mount --help | --version";

const HELP: &str = "\
Mount the coda file system on MOUNTPOINT with FUSE. Prints \"mounted on MOUNTPOINT\"
once ready; SIGTERM, SIGINT or SIGHUP unmounts. The `coda` command drives it
through a control socket in cache_dir.

options:
  --config FILE      client configuration: servers, cache_dir, secret_file, ...
                     (one `key = value` a line; keys as for coda_config_set)
  --daemon           go to the background once mounted; log to cache_dir/coda-mount.log
  --no-passthrough   serve reads through this process instead of FUSE passthrough
  --no-kernel-cache  give the kernel no lifetimes for names, attributes, listings
                     or pages: every lookup and stat asks this process
  --no-fast-open     open every file through the client, even an unchanged cached
                     one whose kept backing file could be reused (a baseline)
  --no-paged-open    serve small read-only opens through passthrough too, not
                     from the kernel's page cache (a baseline)
  --no-open          read-only serving (a web root): the kernel opens and closes
                     files without asking this process (no open, release or
                     flush requests), keeping their pages until the client
                     drops them; the mount is read-only (writes: EROFS).
                     Not with --no-kernel-cache. See docs/MOUNT.md, \"No-open mode\"
  --allow-other      let users other than the mounting one use the mount
                     (non-root: needs user_allow_other in /etc/fuse.conf)
  --threads N        FUSE worker threads, 1 to 256 (default 8)
  --spin-us N        after a reply, the one waiting thread polls for the next
                     request up to N microseconds before it sleeps, while
                     requests have been coming that soon (0 to 1000, default 50;
                     0: never). See docs/MOUNT.md, --threads
  --nonempty         mount over a directory that is not empty (hides its contents)
  -h, --help         this text
  -V, --version      the version

MOUNTPOINT must be an existing empty directory that is not already a mount.
Needs /dev/fuse, and root or fusermount3 (Debian: apt install fuse3).
Exit codes: 0 clean unmount, 1 failure, 2 usage. See docs/MOUNT.md.";

struct Args {
    config: PathBuf,
    mountpoint: PathBuf,
    daemon: bool,
    passthrough: bool,
    kernel_cache: bool,
    fast_open: bool,
    paged_open: bool,
    no_open: bool,
    allow_other: bool,
    nonempty: bool,
    threads: usize,
    spin_us: u64,
}

fn usage(msg: &str) -> ! {
    eprintln!("coda-mount: {msg}\n{USAGE}");
    std::process::exit(2);
}

fn parse_args() -> Args {
    let mut config = None;
    let mut mountpoint = None;
    let mut a = Args {
        config: PathBuf::new(),
        mountpoint: PathBuf::new(),
        daemon: false,
        passthrough: true,
        kernel_cache: true,
        fast_open: true,
        paged_open: true,
        no_open: false,
        allow_other: false,
        nonempty: false,
        threads: 8,
        spin_us: gate::SPIN.as_micros() as u64,
    };
    let mut it = std::env::args_os().skip(1);
    while let Some(arg) = it.next() {
        match arg.to_str() {
            Some("--config") => {
                config = Some(PathBuf::from(
                    it.next().unwrap_or_else(|| usage("--config needs a file")),
                ))
            }
            Some("--daemon") => a.daemon = true,
            Some("--no-passthrough") => a.passthrough = false,
            Some("--no-kernel-cache") => a.kernel_cache = false,
            Some("--no-fast-open") => a.fast_open = false,
            Some("--no-paged-open") => a.paged_open = false,
            Some("--no-open") => a.no_open = true,
            Some("--allow-other") => a.allow_other = true,
            Some("--nonempty") => a.nonempty = true,
            Some("--threads") => {
                a.threads = it
                    .next()
                    .and_then(|v| v.to_str().and_then(|v| v.parse().ok()))
                    .filter(|&n: &usize| (1..=256).contains(&n))
                    .unwrap_or_else(|| usage("--threads needs a number from 1 to 256"))
            }
            Some("--spin-us") => {
                a.spin_us = it
                    .next()
                    .and_then(|v| v.to_str().and_then(|v| v.parse().ok()))
                    .filter(|&n: &u64| n <= 1000)
                    .unwrap_or_else(|| usage("--spin-us needs a number from 0 to 1000"))
            }
            Some("-h" | "--help") => {
                println!("{USAGE}\n\n{HELP}");
                std::process::exit(0);
            }
            Some("-V" | "--version") => {
                println!("coda-mount {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            Some(s) if s.starts_with('-') => usage(&format!("unknown option {s}")),
            _ if mountpoint.is_none() => mountpoint = Some(PathBuf::from(arg)),
            _ => usage("more than one mountpoint"),
        }
    }
    a.config = config.unwrap_or_else(|| usage("--config FILE is required"));
    a.mountpoint = mountpoint.unwrap_or_else(|| usage("MOUNTPOINT is required"));
    // Without open requests the kernel keeps every file's pages: only the
    // client's invalidations keep them true.
    if a.no_open && !a.kernel_cache {
        usage("--no-open needs the kernel cache: not with --no-kernel-cache");
    }
    a
}

/// Where the outcome of starting goes: stdout, or the parent waiting in
/// the foreground when `--daemon` forked us.
enum Report {
    Stdout,
    Parent(std::fs::File),
}

impl Report {
    fn ready(self, mountpoint: &std::path::Path) {
        let msg = format!("mounted on {}\n", mountpoint.display());
        match self {
            Report::Stdout => {
                print!("{msg}");
                let _ = std::io::stdout().flush();
            }
            Report::Parent(mut f) => {
                let _ = f.write_all(msg.as_bytes());
            }
        }
    }

    fn fail(self, msg: &str) -> ! {
        if let Report::Parent(mut f) = self {
            let _ = f.write_all(format!("error: {msg}\n").as_bytes());
        }
        eprintln!("coda-mount: {msg}");
        std::process::exit(1);
    }
}

/// Fork before any thread exists. The parent waits for the child's first
/// line and exits 0 (printing it) or 1; the child starts a new session with
/// stdin/stdout on /dev/null and stderr in `cache_dir/coda-mount.log`.
fn daemonize(log: &std::path::Path) -> Report {
    let mut fds = [0; 2];
    // SAFETY: fds is a two-element out-buffer.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        eprintln!("coda-mount: pipe: {}", std::io::Error::last_os_error());
        std::process::exit(1);
    }
    // SAFETY: the pipe fds were just made and are owned here alone.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: no other thread exists yet, so the child may run Rust freely.
    match unsafe { libc::fork() } {
        -1 => {
            eprintln!("coda-mount: fork: {}", std::io::Error::last_os_error());
            std::process::exit(1);
        }
        0 => {
            drop(r);
            // SAFETY: plain syscalls on fds we own or standard ones.
            unsafe {
                libc::setsid();
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                if null >= 0 {
                    libc::dup2(null, 0);
                    libc::dup2(null, 1);
                    libc::close(null);
                }
            }
            if let Ok(f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
            {
                use std::os::fd::AsRawFd;
                // SAFETY: both fds are valid; dup2 replaces stderr.
                unsafe { libc::dup2(f.as_raw_fd(), 2) };
            }
            Report::Parent(std::fs::File::from(w))
        }
        _ => {
            drop(w);
            let mut out = String::new();
            let _ = std::fs::File::from(r).read_to_string(&mut out);
            match out.lines().next() {
                Some(l) if l.starts_with("mounted on ") => {
                    println!("{l}");
                    std::process::exit(0);
                }
                Some(l) => {
                    eprintln!("coda-mount: {}", l.trim_start_matches("error: "));
                    std::process::exit(1);
                }
                None => {
                    eprintln!("coda-mount: the daemon exited before mounting");
                    std::process::exit(1);
                }
            }
        }
    }
}

/// Block the termination signals in every thread (threads inherit the
/// mask), so one thread can take them with `sigwait`.
fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

enum Stop {
    Signal(i32),
    Ended(Option<String>),
}

/// Whether `path` is the mount point of some mount (per /proc/self/mountinfo,
/// whose fifth field is the mount point with spaces and the like octal-escaped).
fn is_mount_point(path: &Path) -> bool {
    let want = path.display().to_string();
    let want = want
        .replace('\\', "\\134")
        .replace(' ', "\\040")
        .replace('\t', "\\011")
        .replace('\n', "\\012");
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// Refuse a mountpoint FUSE would take badly or a user would regret: not a
/// directory, already mounted (stacking hides the first mount), or holding
/// files that the mount would hide (unless `--nonempty`). Also name
/// /dev/fuse when it cannot be used, instead of a bare errno from the mount.
fn check_mountpoint(args: &Args) -> Result<(), String> {
    let mp = &args.mountpoint;
    let meta = std::fs::metadata(mp).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            format!(
                "mountpoint {} does not exist (create it: mkdir -p {0})",
                mp.display()
            )
        } else {
            format!("mountpoint {}: {e}", mp.display())
        }
    })?;
    if !meta.is_dir() {
        return Err(format!("mountpoint {} is not a directory", mp.display()));
    }
    let canon =
        std::fs::canonicalize(mp).map_err(|e| format!("mountpoint {}: {e}", mp.display()))?;
    if is_mount_point(&canon) {
        return Err(format!(
            "{} is already a mount point (unmount it first: umount {0})",
            canon.display()
        ));
    }
    if !args.nonempty {
        let mut entries =
            std::fs::read_dir(mp).map_err(|e| format!("mountpoint {}: {e}", mp.display()))?;
        if entries.next().is_some() {
            return Err(format!(
                "mountpoint {} is not empty (--nonempty mounts over it, hiding what is there)",
                mp.display()
            ));
        }
    }
    let dev = c"/dev/fuse";
    if !Path::new("/dev/fuse").exists() {
        return Err(
            "/dev/fuse does not exist: load the fuse kernel module (modprobe fuse), \
or in a container pass the device in (--device /dev/fuse)"
                .into(),
        );
    }
    // SAFETY: plain syscalls on a NUL-terminated path.
    let (root, usable) = unsafe {
        (
            libc::geteuid() == 0,
            libc::access(dev.as_ptr(), libc::R_OK | libc::W_OK) == 0,
        )
    };
    if !root && !usable && !on_path("fusermount3") {
        return Err("no access to /dev/fuse and no fusermount3: run as root, \
or install fuse3 (apt install fuse3) for the setuid fusermount3"
            .into());
    }
    Ok(())
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// Raise the soft descriptor limit to the hard one: each kept backing file
/// (up to 1,024, fs.rs) holds a descriptor of its container beside those of
/// the open files.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write `lim`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn main() {
    let args = parse_args();
    raise_nofile();
    if let Err(msg) = check_mountpoint(&args) {
        eprintln!("coda-mount: {msg}");
        std::process::exit(1);
    }
    let (cfg, mount_keys) = idmap::load_config(&args.config).unwrap_or_else(|e| {
        eprintln!("coda-mount: {e}");
        std::process::exit(1)
    });
    let Some(cache_dir) = cfg.cache_dir.clone() else {
        eprintln!(
            "coda-mount: {}: cache_dir is required",
            args.config.display()
        );
        std::process::exit(1);
    };
    if let Err(e) = std::fs::create_dir_all(&cache_dir) {
        eprintln!("coda-mount: creating {}: {e}", cache_dir.display());
        std::process::exit(1);
    }
    let report = if args.daemon {
        daemonize(&cache_dir.join("coda-mount.log"))
    } else {
        Report::Stdout
    };
    let sigset = block_signals();
    let servers = cfg.servers.clone();
    let client = match Client::new(cfg) {
        Ok(c) => c,
        Err(e) => report.fail(&format!("starting the client: {e}")),
    };
    let shared = Arc::new(fs::Shared::default());
    let idmap = idmap::IdMap::new(&mount_keys, &cache_dir).map(Arc::new);
    if let Some(m) = &idmap {
        if let Err(e) = m.resolve(&client) {
            eprintln!("coda-mount: uid_map: cannot ask the server for user ids yet: {e}");
            idmap::IdMap::resolve_later(Arc::clone(m), client.clone());
        }
    }
    shared
        .no_fast_open
        .store(!args.fast_open, std::sync::atomic::Ordering::Relaxed);
    shared
        .no_paged_open
        .store(!args.paged_open, std::sync::atomic::Ordering::Relaxed);
    shared
        .no_open
        .store(args.no_open, std::sync::atomic::Ordering::Relaxed);
    let filesystem = fs::CodaFs::new(
        client.clone(),
        shared.clone(),
        // Passthrough is granted in an open reply, which no-open never sends.
        args.passthrough && !args.no_open,
        cache_dir.clone(),
    )
    .with_idmap(idmap);
    let mut fcfg = fuser::Config::default();
    fcfg.mount_options = vec![
        fuser::MountOption::FSName("coda".into()),
        fuser::MountOption::Subtype("coda".into()),
        fuser::MountOption::DefaultPermissions,
    ];
    if args.no_open {
        // Writes need an open (the store at close); the kernel refuses
        // every write open of a read-only mount with EROFS before asking us.
        fcfg.mount_options.push(fuser::MountOption::RO);
    }
    if args.allow_other {
        fcfg.acl = fuser::SessionACL::All;
    }
    // Several threads: one request waiting for a server never stalls the
    // others (reads of cached files answer at once).
    fcfg.n_threads = Some(args.threads);
    shared.gate.set_threads(args.threads);
    fcfg.clone_fd = true;
    let mut session = match fuser::Session::new(filesystem, &args.mountpoint, &fcfg) {
        Ok(s) => s,
        Err(e) => {
            let hint = match e.raw_os_error() {
                Some(libc::EACCES | libc::EPERM) => {
                    " (no permission to mount: needs root, or access to /dev/fuse and fusermount3)"
                }
                _ => "",
            };
            report.fail(&format!(
                "mounting on {}: {e}{hint}",
                args.mountpoint.display()
            ))
        }
    };
    // The gate's reader polls the session's /dev/fuse (gate.rs, `SPIN`).
    if args.spin_us > 0 {
        use std::os::fd::{AsFd, AsRawFd};
        // SAFETY: fcntl duplicates a descriptor the session holds open.
        let fd = unsafe { libc::fcntl(session.as_fd().as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
        if fd >= 0 {
            // SAFETY: fd was just made here and is owned by nobody else.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            shared
                .gate
                .set_spin(fd, Duration::from_micros(args.spin_us));
        }
    }
    // Kernel caching: notifications go out through the session's channel;
    // the client tells us (synchronously) what it stops trusting.
    if args.kernel_cache {
        if let Err(e) = shared.kcache.start(session.notifier()) {
            eprintln!("coda-mount: no kernel caching (notifier thread: {e})");
        }
    }
    let hook_shared = shared.clone();
    client.set_invalidation_hook(Some(Arc::new(move |inv: &Invalidation| {
        let kc = &hook_shared.kcache;
        match inv {
            Invalidation::Fids { fids, from_server } => {
                let inos: Vec<u64> = fids.iter().map(|f| kc.fuse_ino(f.ino())).collect();
                kc.invalidate(&inos, *from_server);
            }
            Invalidation::All => kc.invalidate_all(false),
        }
    })));
    let mut unmounter = session.unmount_callable();
    let (tx, rx) = bounded::<Stop>(4);
    let ended = tx.clone();
    std::thread::Builder::new()
        .name("coda-fuse".into())
        .spawn(move || {
            let r = session.run();
            let _ = ended.send(Stop::Ended(r.err().map(|e| e.to_string())));
        })
        .unwrap_or_else(|e| {
            eprintln!("coda-mount: spawning the session: {e}");
            std::process::exit(1)
        });
    let ctx = Arc::new(control::Ctx {
        client: client.clone(),
        shared,
        mountpoint: args.mountpoint.clone(),
        cache_dir: cache_dir.clone(),
        servers,
        started: Instant::now(),
    });
    let socket = coda::client::control::socket_path(&cache_dir);
    let control = match control::start(ctx, &socket) {
        Ok(c) => c,
        Err(e) => {
            let _ = unmounter.unmount();
            report.fail(&format!("control socket {}: {e}", socket.display()))
        }
    };
    std::thread::Builder::new()
        .name("coda-signals".into())
        .spawn(move || loop {
            let mut sig = 0;
            // SAFETY: sigset is initialised; sig is an out-parameter.
            if unsafe { libc::sigwait(&sigset, &mut sig) } == 0 {
                let _ = tx.send(Stop::Signal(sig));
            }
        })
        .expect("spawn the signal thread");
    report.ready(&args.mountpoint);

    let stop = rx.recv().expect("a stop reason");
    drop(control);
    match stop {
        Stop::Ended(err) => {
            if let Some(e) = err {
                eprintln!("coda-mount: session ended: {e}");
                std::process::exit(1);
            }
            eprintln!("coda-mount: {} was unmounted", args.mountpoint.display());
        }
        Stop::Signal(sig) => {
            eprintln!(
                "coda-mount: signal {sig}: unmounting {}",
                args.mountpoint.display()
            );
            if unmounter.unmount().is_err() {
                // Busy (a process still has a file open): detach now; the
                // kernel finishes when the last user lets go.
                let c = std::ffi::CString::new(args.mountpoint.as_os_str().as_encoded_bytes())
                    .unwrap_or_default();
                // SAFETY: c is a NUL-terminated path.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
            select! {
                recv(rx) -> _ => {}
                default(Duration::from_secs(5)) => {
                    eprintln!("coda-mount: the session did not end in 5 s; exiting");
                }
            }
        }
    }
    drop(client);
    std::process::exit(0);
}
