//! `coda-mount`: mount the coda file system with FUSE, so unmodified
//! programs read and write it under a path (what `/coda` is for Coda).
//!
//! ```text
//! coda-mount --config FILE [--daemon] [--no-passthrough] [--allow-other]
//!            [--threads N] MOUNTPOINT
//! ```
//!
//! One `Client` inside does all the work. Prints `mounted on MOUNTPOINT`
//! once the mount is ready; unmounts cleanly on SIGTERM, SIGINT or SIGHUP.
//! A control socket in `cache_dir` lets the `coda` CLI drive it.
//! Exit codes: 0 clean unmount, 1 failure, 2 usage. See docs/MOUNT.md.

mod control;
mod fs;

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coda::client::{Client, Config};
use crossbeam_channel::{bounded, select};

const USAGE: &str = "usage: coda-mount --config FILE [--daemon] [--no-passthrough] \
[--allow-other] [--threads N] MOUNTPOINT";

struct Args {
    config: PathBuf,
    mountpoint: PathBuf,
    daemon: bool,
    passthrough: bool,
    allow_other: bool,
    threads: usize,
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
        allow_other: false,
        threads: 8,
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
            Some("--allow-other") => a.allow_other = true,
            Some("--threads") => {
                a.threads = it
                    .next()
                    .and_then(|v| v.to_str().and_then(|v| v.parse().ok()))
                    .filter(|&n: &usize| (1..=256).contains(&n))
                    .unwrap_or_else(|| usage("--threads needs a number from 1 to 256"))
            }
            Some("-h" | "--help") => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            Some(s) if s.starts_with('-') => usage(&format!("unknown option {s}")),
            _ if mountpoint.is_none() => mountpoint = Some(PathBuf::from(arg)),
            _ => usage("more than one mountpoint"),
        }
    }
    a.config = config.unwrap_or_else(|| usage("--config FILE is required"));
    a.mountpoint = mountpoint.unwrap_or_else(|| usage("MOUNTPOINT is required"));
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

fn main() {
    let args = parse_args();
    let cfg = Config::from_file(&args.config).unwrap_or_else(|e| {
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
    let filesystem = fs::CodaFs::new(
        client.clone(),
        shared.clone(),
        args.passthrough,
        cache_dir.clone(),
    );
    let mut fcfg = fuser::Config::default();
    fcfg.mount_options = vec![
        fuser::MountOption::FSName("coda".into()),
        fuser::MountOption::Subtype("coda".into()),
        fuser::MountOption::DefaultPermissions,
    ];
    if args.allow_other {
        fcfg.acl = fuser::SessionACL::All;
    }
    // Several threads: one request waiting for a server never stalls the
    // others (reads of cached files answer at once).
    fcfg.n_threads = Some(args.threads);
    fcfg.clone_fd = true;
    let mut session = match fuser::Session::new(filesystem, &args.mountpoint, &fcfg) {
        Ok(s) => s,
        Err(e) => report.fail(&format!("mounting on {}: {e}", args.mountpoint.display())),
    };
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
