//! FUSE mount benchmarks (issue 11): coda's mount against a local directory
//! and bindfs (a plain FUSE pass-through over a local directory) measured in
//! the same run, rounds interleaved, each figure also as a ratio to local
//! (the machines are shared and noisy: compare ratios, not absolutes).
//!
//!   cargo bench --bench mount                      (needs root, /dev/fuse, bindfs, nginx)
//!   CODA_BENCH_QUICK=1 cargo bench --bench mount   (fewer files, shorter runs)
//!   CODA_BENCH_FILES=N ...                         (N files for 3, 4 and 5)
//!   CODA_BENCH_ONLY=read ...                       (only 1 and 2: the cached read path)
//!   CODA_BENCH_MOUNT_BASE=PATH ...                 (1, 2 and 6 also on that coda-mount binary)
//!
//! 1. nginx serving 1,000 small (4 KiB) files, 16 keep-alive connections
//!    (the load generator is in this file): requests/s and p99;
//! 2. cached 4 KiB open+read+close;
//! 3. 10,000 4 KiB files in 100 directories: create, stat, read, delete;
//! 4. `tar -x` of a generated 10,000-file tree;
//! 5. one directory of 10,000 files: create, `ls -l`, stat all, `rm -r`;
//! 6. write-back mode (`write_back_ms`): create and delete of 4 KiB files and
//!    `tar -x`, against local and the connected mount in the same round,
//!    and the same creates and deletes counted until the server has them;
//! 7. the large-file figures: sequential read of a cached 256 MiB file with
//!    FUSE passthrough and without;
//! 8. large-file writes: a sequential 256 MiB write and 2,000 random 4 KiB
//!    writes into it, each ended by fsync and close, local, bindfs and coda.
//!
//! 1, 2, 3 and 5 also run on a second coda mount with `--no-kernel-cache` (the
//! mount as it was before kernel caching), the baseline for that change.
//! 1 and 2 also on a third with `--no-paged-open` (small read-only opens
//! through passthrough, as before page-cache opens), the baseline for them,
//! and on a fourth with `--no-open` (read-only: no FUSE open, release or
//! flush at all), serving the files the `coda` target wrote. 1 and 2 also
//! on "FUSE floor", a file system in this process that serves the same
//! pages from memory and does nothing at open (`common/fuse_floor.rs`):
//! what the kernel's FUSE alone costs a mount that is told of opens.
//!
//! Without `--bench` (as `cargo test` runs it) only a tiny smoke version runs.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coda::client::{Client, Config};

mod common;
use common::BenchServer as Server;
#[path = "common/fuse_floor.rs"]
mod fuse_floor;

struct Mount {
    child: Child,
    mnt: PathBuf,
    cache: PathBuf,
}

impl Drop for Mount {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(&self.mnt)
            .stderr(Stdio::null())
            .status();
    }
}

fn first_line(c: &mut Child) -> String {
    let mut line = String::new();
    BufReader::new(c.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    line.trim().to_string()
}

fn mount(dir: &Path, addr: &str, secret: &Path, tag: &str, args: &[&str]) -> Mount {
    mount_with(dir, addr, secret, tag, args, "")
}

/// `mount` with extra lines for the config file (`write_back_ms = N`).
fn mount_with(
    dir: &Path,
    addr: &str,
    secret: &Path,
    tag: &str,
    args: &[&str],
    conf_extra: &str,
) -> Mount {
    let conf = dir.join(format!("{tag}.conf"));
    std::fs::write(
        &conf,
        format!(
            "servers = {addr}\nsecret_file = {}\ncache_dir = {}\ncache_size = 4G\n{conf_extra}",
            secret.display(),
            dir.join(format!("{tag}-cache")).display()
        ),
    )
    .unwrap();
    let mnt = dir.join(format!("{tag}-mnt"));
    std::fs::create_dir_all(&mnt).unwrap();
    // CODA_BENCH_MOUNT_BASE: another build's coda-mount (the "base" mounts
    // of section 6), for before/after in one run.
    let bin = match std::env::var("CODA_BENCH_MOUNT_BASE") {
        Ok(b) if tag.ends_with("base") => b,
        _ => env!("CARGO_BIN_EXE_coda-mount").to_string(),
    };
    let mut child = Command::new(bin)
        .arg("--config")
        .arg(&conf)
        .args(args)
        .arg(&mnt)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let l = first_line(&mut child);
    assert!(l.starts_with("mounted on"), "{l}");
    Mount {
        child,
        mnt,
        cache: dir.join(format!("{tag}-cache")),
    }
}

fn open_read_close(p: &Path, buf: &mut [u8]) -> Duration {
    let t = Instant::now();
    let mut f = std::fs::File::open(p).unwrap();
    let n = f.read(buf).unwrap();
    drop(f);
    let d = t.elapsed();
    assert_eq!(n, buf.len());
    d
}

fn seq_read(p: &Path) -> Duration {
    let mut buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    let mut f = std::fs::File::open(p).unwrap();
    while f.read(&mut buf).unwrap() > 0 {}
    t.elapsed()
}

/// Writes `len` bytes to a new file at `p` in 1 MiB chunks, then fsync and close.
fn seq_write(p: &Path, len: usize) -> Duration {
    let chunk: Vec<u8> = (0..1usize << 20).map(|i| (i % 253) as u8).collect();
    let t = Instant::now();
    let mut f = std::fs::File::create(p).unwrap();
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len());
        f.write_all(&chunk[..n]).unwrap();
        left -= n;
    }
    f.sync_all().unwrap();
    drop(f);
    t.elapsed()
}

/// `n` 4 KiB writes at pseudo-random 4 KiB-aligned offsets of the `len`-byte
/// file at `p` (the same offsets for every target of a round), then fsync and close.
fn rand_write(p: &Path, len: usize, n: usize, seed: u64) -> Duration {
    use std::os::unix::fs::FileExt;
    let block = [0x5au8; 4096];
    let blocks = (len / 4096).max(1) as u64;
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let t = Instant::now();
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    for _ in 0..n {
        // xorshift64: cheap and repeatable.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        f.write_all_at(&block, (x % blocks) * 4096).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    t.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// bindfs over `src` on `mnt`, unmounted on drop.
struct Bindfs {
    mnt: PathBuf,
}

impl Bindfs {
    fn mount(src: &Path, mnt: &Path) -> Bindfs {
        std::fs::create_dir_all(src).unwrap();
        std::fs::create_dir_all(mnt).unwrap();
        let st = Command::new("bindfs")
            .arg(src)
            .arg(mnt)
            .status()
            .unwrap_or_else(|e| {
                panic!("mount bench needs bindfs (Debian: apt-get install bindfs; `make deps` installs it): {e}")
            });
        assert!(
            st.success(),
            "bindfs {} {}: {st}",
            src.display(),
            mnt.display()
        );
        Bindfs {
            mnt: mnt.to_path_buf(),
        }
    }
}

impl Drop for Bindfs {
    fn drop(&mut self) {
        let _ = Command::new("fusermount")
            .arg("-u")
            .arg(&self.mnt)
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mnt)
            .stderr(Stdio::null())
            .status();
    }
}

/// One file system under test: a name and a scratch directory on it.
struct Target {
    name: &'static str,
    root: PathBuf,
}

/// Figures of one workload, per target (same order as the targets).
fn report(what: &str, unit: &str, higher_is_better: bool, vals: &[(&str, f64)]) {
    let local = vals[0].1;
    let mut line = format!("{what}:");
    for (name, v) in vals {
        let ratio = if higher_is_better {
            v / local
        } else {
            local / v
        };
        // Ratios are fractions of local speed: above 1 is faster than local.
        let prec = if *v >= 100.0 {
            0
        } else if *v >= 1.0 {
            2
        } else {
            4
        };
        if *name == "local" {
            line.push_str(&format!(" local {v:.prec$} {unit};"));
        } else {
            line.push_str(&format!(
                " {name} {v:.prec$} {unit} ({ratio:.3}x local speed);"
            ));
        }
    }
    println!("{}", line.trim_end_matches(';'));
}

/// CPU time (s) of all threads of process `pid` so far (schedstat: ns).
fn proc_cpu(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .sum::<f64>()
        / 1e9
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

fn page(i: usize) -> Vec<u8> {
    let mut v = format!("<html>file {i}</html>\n").into_bytes();
    v.resize(4096, b'.');
    v
}

/// Files/s for create, stat, read, delete of `n` 4 KiB files in 100 dirs.
fn small_files(root: &Path, n: usize) -> [f64; 4] {
    let base = root.join("small");
    std::fs::create_dir_all(&base).unwrap();
    let path = |i: usize| base.join(format!("d{:02}/f{i}", i % 100));
    let data = page(0);
    let t = Instant::now();
    for d in 0..100.min(n) {
        std::fs::create_dir(base.join(format!("d{d:02}"))).unwrap();
    }
    for i in 0..n {
        std::fs::write(path(i), &data).unwrap();
    }
    let create = n as f64 / secs(t);
    let t = Instant::now();
    for i in 0..n {
        std::fs::metadata(path(i)).unwrap();
    }
    let stat = n as f64 / secs(t);
    let t = Instant::now();
    let mut buf = vec![0u8; 8192];
    for i in 0..n {
        let mut f = std::fs::File::open(path(i)).unwrap();
        while f.read(&mut buf).unwrap() > 0 {}
    }
    let read = n as f64 / secs(t);
    let t = Instant::now();
    for i in 0..n {
        std::fs::remove_file(path(i)).unwrap();
    }
    for d in 0..100.min(n) {
        std::fs::remove_dir(base.join(format!("d{d:02}"))).unwrap();
    }
    let delete = n as f64 / secs(t);
    std::fs::remove_dir(&base).unwrap();
    [create, stat, read, delete]
}

/// `write_back_ms` of the write-back mount: long enough that a run's
/// records are sent in batches behind the calls, as in a bulk load.
const WRITE_BACK_MS: u64 = 2000;

/// Files/s for create (and write 4 KiB, close) and for delete of `n` files
/// in 100 directories (the directories' own mkdir and rmdir not timed).
fn create_delete(root: &Path, n: usize) -> (f64, f64) {
    create_delete_drained(root, n, &|| 0.0)
}

/// `create_delete`, with `drain()` (seconds) counted in after each part.
fn create_delete_drained(root: &Path, n: usize, drain: &dyn Fn() -> f64) -> (f64, f64) {
    let base = root.join("cd");
    std::fs::create_dir_all(&base).unwrap();
    let path = |i: usize| base.join(format!("d{:02}/f{i}", i % 100));
    for d in 0..100.min(n) {
        std::fs::create_dir(base.join(format!("d{d:02}"))).unwrap();
    }
    drain();
    let data = page(0);
    let t = Instant::now();
    for i in 0..n {
        std::fs::write(path(i), &data).unwrap();
    }
    let create = n as f64 / (secs(t) + drain());
    let t = Instant::now();
    for i in 0..n {
        std::fs::remove_file(path(i)).unwrap();
    }
    let delete = n as f64 / (secs(t) + drain());
    for d in 0..100.min(n) {
        std::fs::remove_dir(base.join(format!("d{d:02}"))).unwrap();
    }
    std::fs::remove_dir(&base).unwrap();
    (create, delete)
}

/// Seconds for create, `ls -l`, stat all, `rm -r` of one directory of `n`.
fn one_dir(root: &Path, n: usize) -> [f64; 4] {
    let dir = root.join("onedir");
    std::fs::create_dir(&dir).unwrap();
    let t = Instant::now();
    for i in 0..n {
        std::fs::File::create(dir.join(format!("file-{i:05}"))).unwrap();
    }
    let create = secs(t);
    let t = Instant::now();
    let out = Command::new("ls").arg("-l").arg(&dir).output().unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout.iter().filter(|&&c| c == b'\n').count(), n + 1);
    let ls = secs(t);
    let t = Instant::now();
    for i in 0..n {
        std::fs::metadata(dir.join(format!("file-{i:05}"))).unwrap();
    }
    let stat = secs(t);
    let t = Instant::now();
    let st = Command::new("rm").arg("-r").arg(&dir).status().unwrap();
    assert!(st.success());
    [create, ls, stat, secs(t)]
}

/// Seconds to write `n` records of 256 bytes one after another into a file
/// made ahead (in place, as the server's journal does), each followed by
/// `fdatasync`: what `n` durable small changes cost this disk at least.
fn flushed_records(path: &Path, n: usize) -> f64 {
    use std::os::unix::fs::FileExt;
    let rec = [0x5au8; 256];
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    f.write_all_at(&vec![0u8; n * rec.len()], 0).unwrap();
    f.sync_all().unwrap();
    let t = Instant::now();
    for i in 0..n {
        f.write_all_at(&rec, (i * rec.len()) as u64).unwrap();
        f.sync_data().unwrap();
    }
    let s = secs(t);
    drop(f);
    let _ = std::fs::remove_file(path);
    s
}

/// A tar file of `n` small files in a nested tree (like a source tree).
fn make_tar(dir: &Path, n: usize) -> PathBuf {
    let src = dir.join("tar-src");
    for i in 0..n {
        let d = src.join(format!("m{}/s{}", i % 10, i % 97));
        if i < 970 {
            std::fs::create_dir_all(&d).unwrap();
        }
        let len = 200 + (i * 7919) % 6000;
        std::fs::write(d.join(format!("f{i}.c")), vec![b'x'; len]).unwrap();
    }
    let tar = dir.join("tree.tar");
    let st = Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(&src)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    let _ = std::fs::remove_dir_all(&src);
    tar
}

/// Seconds for `tar -x` of `tar` into `root/tar` (removed afterwards, untimed).
fn untar(root: &Path, tar: &Path) -> f64 {
    let to = root.join("tar");
    std::fs::create_dir(&to).unwrap();
    let t = Instant::now();
    let st = Command::new("tar")
        .arg("-xf")
        .arg(tar)
        .arg("-C")
        .arg(&to)
        .status()
        .unwrap();
    assert!(st.success(), "tar -x into {}", to.display());
    let s = secs(t);
    let st = Command::new("rm").arg("-r").arg(&to).status().unwrap();
    assert!(st.success());
    s
}

/// nginx as our child, serving `root` on a free loopback port.
struct Nginx {
    child: Child,
    addr: SocketAddr,
}

impl Nginx {
    fn start(prefix: &Path, root: &Path) -> Nginx {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        std::fs::create_dir_all(prefix.join("tmp")).unwrap();
        let p = prefix.display();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\n\
             error_log {p}/error.log;\npid {p}/nginx.pid;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 1000000;\n\
               client_body_temp_path {p}/tmp/body;\n  proxy_temp_path {p}/tmp/proxy;\n\
               fastcgi_temp_path {p}/tmp/fastcgi;\n  uwsgi_temp_path {p}/tmp/uwsgi;\n\
               scgi_temp_path {p}/tmp/scgi;\n\
               server {{\n    listen 127.0.0.1:{port};\n    root {};\n\
                 location / {{ }}\n  }}\n}}\n",
            root.display()
        );
        let cpath = prefix.join("nginx.conf");
        std::fs::write(&cpath, conf).unwrap();
        let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("nginx");
        let child = Command::new(nginx)
            .arg("-p")
            .arg(format!("{p}/"))
            .arg("-c")
            .arg(&cpath)
            .arg("-e")
            .arg(prefix.join("error.log"))
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("mount bench needs nginx (Debian: apt-get install nginx): {e}")
            });
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        // Owned at once, so a failure below still kills and reaps it.
        let n = Nginx { child, addr };
        for _ in 0..500 {
            if TcpStream::connect(addr).is_ok() {
                return n;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("nginx did not listen on {addr}");
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One keep-alive GET; the body's length.
fn get(s: &mut BufReader<TcpStream>, path: &str) -> std::io::Result<usize> {
    s.get_mut()
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n").as_bytes())?;
    let mut len = None;
    let mut status = String::new();
    s.read_line(&mut status)?;
    if !status.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("GET {path}: {status:?}")));
    }
    loop {
        let mut h = String::new();
        if s.read_line(&mut h)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if h == "\r\n" {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().ok();
        }
    }
    let len = len.ok_or_else(|| std::io::Error::other("no content-length"))?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok(len)
}

/// `conns` keep-alive connections asking for random files among `files`
/// for `dur`: requests/s and p99 latency.
fn load(addr: SocketAddr, files: usize, conns: usize, dur: Duration) -> (f64, Duration) {
    let start = Instant::now();
    let threads: Vec<_> = (0..conns)
        .map(|c| {
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                let mut s = BufReader::new(TcpStream::connect(addr).unwrap());
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (c as u64 + 1);
                while start.elapsed() < dur {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let path = format!("/f{}.html", x as usize % files);
                    let t = Instant::now();
                    let n = get(&mut s, &path).unwrap();
                    assert_eq!(n, 4096);
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut all: Vec<Duration> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let elapsed = start.elapsed().as_secs_f64();
    all.sort();
    let p99 = all[(all.len() * 99 / 100).min(all.len() - 1)];
    (all.len() as f64 / elapsed, p99)
}

fn main() {
    let smoke = !std::env::args().any(|a| a == "--bench");
    let quick = smoke || std::env::var_os("CODA_BENCH_QUICK").is_some();
    if !Path::new("/dev/fuse").exists() {
        panic!("mount bench: /dev/fuse is absent (FUSE needed)");
    }
    let (rounds, big, nfiles, ndir, ntar, web_secs) = if smoke {
        (50, 1usize << 20, 200, 200, 200, 1)
    } else if quick {
        (2000, 16usize << 20, 1000, 1000, 1000, 2)
    } else {
        (5000, 256usize << 20, 10_000, 10_000, 10_000, 5)
    };
    // CODA_BENCH_FILES=N: N files for the small-file, tar and one-directory runs.
    let (nfiles, ndir, ntar) = match std::env::var("CODA_BENCH_FILES")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        Some(n) if n > 0 => (n, n, n),
        _ => (nfiles, ndir, ntar),
    };
    let dir = std::env::temp_dir().join(format!("coda-bench-mount-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();

    let srv = Server::start(&dir);
    let addr = srv.addr.clone();
    let secret = srv.secret();

    // Seed the files through a client of its own.
    let small: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
    let data: Vec<u8> = (0..big).map(|i| (i % 251) as u8).collect();
    {
        let mut c = Config::new();
        c.set("servers", &addr).unwrap();
        c.set("secret_file", secret.to_str().unwrap()).unwrap();
        c.set("cache_dir", dir.join("seed-cache").to_str().unwrap())
            .unwrap();
        c.set("cache_size", "4G").unwrap();
        let c = Client::new(c).unwrap();
        for (p, d) in [("/small", &small), ("/big", &data)] {
            let mut f = c
                .open(p, libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC, 0o644)
                .unwrap();
            for (i, chunk) in d.chunks(1 << 20).enumerate() {
                f.write_at(chunk, (i << 20) as u64).unwrap();
            }
            f.close().unwrap();
        }
    }
    let local_big = dir.join("local-big");
    std::fs::write(&local_big, &data).unwrap();
    drop(data);

    let pt = mount(&dir, &addr, &secret, "pt", &[]);
    let plain = mount(&dir, &addr, &secret, "plain", &["--no-passthrough"]);
    // The mount as it was before kernel caching: the baseline for it.
    let nocache = mount(&dir, &addr, &secret, "nocache", &["--no-kernel-cache"]);
    // Small read-only opens through passthrough (the default before
    // page-cache opens): their baseline (sections 1 and 2).
    let nofast = mount(&dir, &addr, &secret, "nofast", &["--no-paged-open"]);
    // Read-only serving without open requests (sections 1 and 2).
    let noopen = mount(&dir, &addr, &secret, "noopen", &["--no-open"]);
    let status = Command::new(env!("CARGO_BIN_EXE_coda"))
        .arg("--cache-dir")
        .arg(dir.join("pt-cache"))
        .arg("status")
        .output()
        .unwrap();
    let passthrough = String::from_utf8_lossy(&status.stdout).contains("passthrough: on");
    let bind = Bindfs::mount(&dir.join("bindfs-src"), &dir.join("bindfs-mnt"));
    let local_root = dir.join("local");
    std::fs::create_dir_all(&local_root).unwrap();
    std::fs::create_dir_all(pt.mnt.join("bench")).unwrap();
    let targets = [
        Target {
            name: "local",
            root: local_root,
        },
        Target {
            name: "bindfs",
            root: bind.mnt.clone(),
        },
        Target {
            name: "coda",
            root: pt.mnt.join("bench"),
        },
    ];
    // All but tar also on the mount without kernel caching (same server).
    std::fs::create_dir_all(nocache.mnt.join("bench-nc")).unwrap();
    let nc = Target {
        name: "coda --no-kernel-cache",
        root: nocache.mnt.join("bench-nc"),
    };
    let read_targets = [&targets[0], &targets[1], &targets[2], &nc];
    std::fs::create_dir_all(nofast.mnt.join("bench-nf")).unwrap();
    let nf = Target {
        name: "coda --no-paged-open",
        root: nofast.mnt.join("bench-nf"),
    };
    // Read-only: it serves what the `coda` target writes (same server).
    let no = Target {
        name: "coda --no-open",
        root: noopen.mnt.join("bench"),
    };
    // CODA_BENCH_MOUNT_BASE: that build's default mount too (sections 1, 2).
    let webbase = std::env::var_os("CODA_BENCH_MOUNT_BASE")
        .map(|_| mount(&dir, &addr, &secret, "webbase", &[]));
    let wb_target = webbase.as_ref().map(|m| {
        std::fs::create_dir_all(m.mnt.join("bench-base")).unwrap();
        Target {
            name: "coda (base build)",
            root: m.mnt.join("bench-base"),
        }
    });
    // The floor of a writable FUSE mount: the same pages from memory.
    let floor_mount =
        fuse_floor::FuseFloor::mount(&dir.join("floor-mnt"), (0..1000).map(page).collect(), 8);
    let floor = Target {
        name: "FUSE floor",
        root: dir.join("floor-mnt"),
    };
    let mut web_targets = vec![&targets[0], &targets[1], &targets[2], &nc, &nf, &no, &floor];
    if let Some(t) = &wb_target {
        web_targets.push(t);
    }
    println!(
        "mount bench ({}): coda passthrough {}; targets local, bindfs, coda (connected, durable)",
        if quick { "quick" } else { "full" },
        if passthrough { "on" } else { "off" }
    );

    // 1. nginx on 1,000 small files, 16 connections. The --no-open mount
    // and the floor serve files written elsewhere.
    let written = |t: &&&Target| t.name != no.name && t.name != floor.name;
    for t in web_targets.iter().filter(written) {
        let www = t.root.join("www");
        std::fs::create_dir_all(&www).unwrap();
        for i in 0..1000 {
            std::fs::write(www.join(format!("f{i}.html")), page(i)).unwrap();
        }
    }
    // The other mounts wrote their files (so hold them); the --no-open one
    // fetches each at its first read: read them all once first.
    for i in 0..1000 {
        std::fs::read(no.root.join(format!("www/f{i}.html"))).unwrap();
    }
    let mut rps = Vec::new();
    let mut p99 = Vec::new();
    // The coda-mount serving each target, for its CPU under the load.
    let mount_of = |name: &str| -> Option<u32> {
        let m = match name {
            // In this process, with the load generator: not measured apart.
            n if n == floor.name => return None,
            "coda" => &pt,
            "coda --no-kernel-cache" => &nocache,
            "coda --no-paged-open" => &nofast,
            "coda --no-open" => &noopen,
            _ => webbase.as_ref()?,
        };
        (!name.starts_with("local") && !name.starts_with("bindfs")).then(|| m.child.id())
    };
    let mut cpu = Vec::new();
    for (i, t) in web_targets.iter().enumerate() {
        let n = Nginx::start(&dir.join(format!("nginx-{i}")), &t.root.join("www"));
        load(n.addr, 1000, 16, Duration::from_millis(300)); // warm up
        let pid = mount_of(t.name);
        let (c0, t0) = (pid.map(proc_cpu), Instant::now());
        let (r, p) = load(n.addr, 1000, 16, Duration::from_secs(web_secs));
        if let (Some(pid), Some(c0)) = (pid, c0) {
            let used = proc_cpu(pid) - c0;
            cpu.push(format!(
                " {} {:.1} µs/request ({:.0}% of a core);",
                t.name,
                used / (r * secs(t0)) * 1e6,
                used / secs(t0) * 100.0
            ));
        }
        rps.push((t.name, r));
        p99.push((t.name, p.as_secs_f64() * 1e3));
    }
    report(
        "nginx 1,000 x 4 KiB, 16 connections: requests",
        "req/s",
        true,
        &rps,
    );
    report("nginx p99 latency", "ms", false, &p99);
    println!(
        "coda-mount CPU under nginx:{}",
        cpu.concat().trim_end_matches(';')
    );

    // 2. cached 4 KiB open+read+close, interleaved.
    let mut buf = vec![0u8; 4096];
    let files: Vec<PathBuf> = web_targets
        .iter()
        .map(|t| t.root.join("www/f1.html"))
        .collect();
    for f in &files {
        open_read_close(f, &mut buf);
    }
    let mut lat: Vec<Vec<Duration>> = vec![Vec::new(); web_targets.len()];
    for _ in 0..rounds {
        for (i, f) in files.iter().enumerate() {
            lat[i].push(open_read_close(f, &mut buf));
        }
    }
    let vals: Vec<(&str, f64)> = web_targets
        .iter()
        .zip(lat)
        .map(|(t, l)| (t.name, median(l).as_secs_f64() * 1e6))
        .collect();
    report(
        &format!("cached open+read+close 4 KiB, p50 of {rounds}"),
        "µs",
        false,
        &vals,
    );
    for t in web_targets.iter().filter(written) {
        let _ = Command::new("rm")
            .arg("-r")
            .arg(t.root.join("www"))
            .status();
    }
    drop(floor_mount);
    if std::env::var("CODA_BENCH_ONLY").as_deref() == Ok("read") {
        println!("CODA_BENCH_ONLY=read: sections 3 to 7 skipped");
        // Unmounted first, then the scratch directory goes, as at the end.
        drop((bind, pt, plain, nocache, nofast, noopen));
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }

    // 3. small files in 100 directories.
    let res: Vec<[f64; 4]> = read_targets
        .iter()
        .map(|t| small_files(&t.root, nfiles))
        .collect();
    for (k, what) in ["create", "stat", "read", "delete"].iter().enumerate() {
        let vals: Vec<(&str, f64)> = read_targets
            .iter()
            .zip(&res)
            .map(|(t, r)| (t.name, r[k]))
            .collect();
        report(
            &format!("{nfiles} x 4 KiB in 100 dirs: {what}"),
            "files/s",
            true,
            &vals,
        );
    }

    // 4. tar -x of a generated tree.
    let tar = make_tar(&dir, ntar);
    let vals: Vec<(&str, f64)> = targets
        .iter()
        .map(|t| (t.name, untar(&t.root, &tar)))
        .collect();
    report(&format!("tar -x of {ntar} files"), "s", false, &vals);

    // 5. one directory.
    let res: Vec<[f64; 4]> = read_targets
        .iter()
        .map(|t| one_dir(&t.root, ndir))
        .collect();
    for (k, what) in ["create", "ls -l", "stat all", "rm -r"].iter().enumerate() {
        let vals: Vec<(&str, f64)> = read_targets
            .iter()
            .zip(&res)
            .map(|(t, r)| (t.name, r[k]))
            .collect();
        report(
            &format!("one directory of {ndir}: {what}"),
            "s",
            false,
            &vals,
        );
    }
    // The floor of `rm -r` when each unlink is durable before it returns
    // (durable before acknowledged): bindfs's `rm -r` (the
    // FUSE round trips and a local unlink) plus one small record written
    // and flushed to this disk per unlink, whoever writes it.
    let flushed = flushed_records(&dir.join("flush-floor"), ndir);
    report(
        &format!("one directory of {ndir}: rm -r, the floor with durable unlinks (bindfs + one flushed record each)"),
        "s",
        false,
        &[
            ("local", res[0][3]),
            ("bindfs", res[1][3]),
            ("bindfs + flushes", res[1][3] + flushed),
        ],
    );

    // 6. write-back mode: close returns once the change is durable in the
    // local log; "until on the server" adds the wait for the log to drain
    // (`coda reintegrate` right after the last call), the honest figure
    // for how long the server took to have it all.
    let wb = mount_with(
        &dir,
        &addr,
        &secret,
        "wb",
        &[],
        &format!("write_back_ms = {WRITE_BACK_MS}\n"),
    );
    std::fs::create_dir_all(wb.mnt.join("bench-wb")).unwrap();
    let wbt = Target {
        name: "coda write-back",
        root: wb.mnt.join("bench-wb"),
    };
    // The same on another build's coda-mount, if named (before/after).
    let wb_base = std::env::var_os("CODA_BENCH_MOUNT_BASE").map(|_| {
        mount_with(
            &dir,
            &addr,
            &secret,
            "wbbase",
            &[],
            &format!("write_back_ms = {WRITE_BACK_MS}\n"),
        )
    });
    // A directory of its own: two write-back clients making the same new
    // name at once is a conflict for the later one to reintegrate (its
    // tree is then kept aside, and its next creates in it find nothing).
    let wbt_base = wb_base.as_ref().map(|m| {
        std::fs::create_dir_all(m.mnt.join("bench-wb-base")).unwrap();
        Target {
            name: "coda write-back (base build)",
            root: m.mnt.join("bench-wb-base"),
        }
    });
    let drain_of = |cache: &Path| {
        let t = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_coda"))
            .arg("--cache-dir")
            .arg(cache)
            .arg("reintegrate")
            .output()
            .unwrap();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("records: 0"),
            "coda reintegrate: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        secs(t)
    };
    let mut cr = Vec::new();
    let mut del = Vec::new();
    let mut tarv = Vec::new();
    let mut onedir = Vec::new();
    let mut wb_targets = vec![&targets[0], &targets[2], &wbt];
    wb_targets.extend(wbt_base.as_ref());
    for t in wb_targets {
        let (c, d) = create_delete(&t.root, nfiles);
        let x = untar(&t.root, &tar);
        let cache = match t.name {
            "coda write-back" => Some(&wb.cache),
            "coda write-back (base build)" => wb_base.as_ref().map(|m| &m.cache),
            _ => None,
        };
        if let Some(cache) = cache {
            // Logged only: the drain is what the server still had to take.
            let (c2, d2) = create_delete_drained(&t.root, nfiles, &|| drain_of(cache));
            println!(
                "{} ({WRITE_BACK_MS} ms), until on the server: create {:.0} files/s, delete {:.0} files/s",
                t.name, c2, d2
            );
        }
        if t.name != "coda" {
            onedir.push((t.name, one_dir(&t.root, ndir)));
        }
        cr.push((t.name, c));
        del.push((t.name, d));
        tarv.push((t.name, x));
    }
    report(
        &format!("write-back: {nfiles} x 4 KiB in 100 dirs: create"),
        "files/s",
        true,
        &cr,
    );
    report(
        &format!("write-back: {nfiles} x 4 KiB in 100 dirs: delete"),
        "files/s",
        true,
        &del,
    );
    report(
        &format!("write-back: tar -x of {ntar} files"),
        "s",
        false,
        &tarv,
    );
    for (k, what) in ["create", "ls -l", "stat all", "rm -r"].iter().enumerate() {
        let vals: Vec<(&str, f64)> = onedir.iter().map(|(n, r)| (*n, r[k])).collect();
        report(
            &format!("write-back: one directory of {ndir}: {what}"),
            "s",
            false,
            &vals,
        );
    }
    drop(wb);
    drop(wb_base);

    // 7. sequential read of the big cached file: passthrough, plain, local.
    let mb = big as f64 / (1 << 20) as f64;
    for (name, mnt) in [
        (
            if passthrough {
                "passthrough"
            } else {
                "passthrough (kernel lacks it: plain)"
            },
            &pt,
        ),
        ("plain read path", &plain),
    ] {
        let p = mnt.mnt.join("big");
        seq_read(&p); // fetch into the cache
                      // The same bytes read directly from the container file: same file,
                      // same page cache, so only the mount's own cost differs. (A copy
                      // written separately can sit in the page cache differently and
                      // swing the ratio by ±30% on its own.)
        let container = std::fs::read_dir(mnt.cache.join("containers"))
            .ok()
            .and_then(|rd| {
                rd.flatten().map(|e| e.path()).find(|p| {
                    std::fs::metadata(p)
                        .map(|m| m.len() as usize == big)
                        .unwrap_or(false)
                })
            })
            .unwrap_or_else(|| local_big.clone());
        let (mut m, mut c, mut l) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..9 {
            m.push(seq_read(&p));
            c.push(seq_read(&container));
            l.push(seq_read(&local_big));
        }
        let (m, c, l) = (median(m), median(c), median(l));
        println!(
            "sequential read {mb:.0} MiB, {name}: mount {:.0} MiB/s; its container read directly {:.0} MiB/s, time ratio {:.2}x; a separately written local copy {:.0} MiB/s, time ratio {:.2}x",
            mb / m.as_secs_f64(),
            mb / c.as_secs_f64(),
            m.as_secs_f64() / c.as_secs_f64(),
            mb / l.as_secs_f64(),
            m.as_secs_f64() / l.as_secs_f64()
        );
    }
    // 8. large-file writes: a sequential write of the big file and random
    // 4 KiB writes into it, each ended by fsync and close (what a program
    // waits for before it can count on the data), local, bindfs and coda.
    let nrand = if smoke { 50 } else { 2000 };
    let roots = [
        ("local", dir.join("local")),
        ("bindfs", bind.mnt.clone()),
        ("coda", pt.mnt.join("bench")),
    ];
    let mut seq_w: Vec<(&str, Vec<Duration>)> = roots.iter().map(|r| (r.0, Vec::new())).collect();
    let mut rand_w = seq_w.clone();
    for round in 0..3 {
        for (i, (_, root)) in roots.iter().enumerate() {
            let p = root.join(format!("bigw-{round}"));
            seq_w[i].1.push(seq_write(&p, big));
            rand_w[i].1.push(rand_write(&p, big, nrand, round as u64));
            let _ = std::fs::remove_file(&p);
        }
    }
    let mbs: Vec<(&str, f64)> = seq_w
        .into_iter()
        .map(|(n, v)| (n, mb / median(v).as_secs_f64()))
        .collect();
    report(
        &format!("sequential write {mb:.0} MiB + fsync + close"),
        "MiB/s",
        true,
        &mbs,
    );
    let rates: Vec<(&str, f64)> = rand_w
        .into_iter()
        .map(|(n, v)| (n, nrand as f64 / median(v).as_secs_f64()))
        .collect();
    report(
        &format!("random 4 KiB writes into it ({nrand}) + fsync + close"),
        "writes/s",
        true,
        &rates,
    );

    drop(bind);
    drop(pt);
    drop(plain);
    drop(nocache);
    drop(nofast);
    drop(noopen);
    let _ = std::fs::remove_dir_all(&dir);
}
