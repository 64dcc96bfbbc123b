//! FUSE mount benchmarks (issue: coda-mount and the CLI). Ratios against a
//! local file measured in the same run (the machines are shared and noisy).
//!
//!   cargo bench --bench mount        (needs root and /dev/fuse)
//!
//! 1. open+read+close of a cached 4 KiB file through the mount vs a local file;
//! 2. sequential read of a cached 256 MiB file through the mount, with FUSE
//!    passthrough and without (`--no-passthrough`), vs the same local file.
//!
//! Without `--bench` (as `cargo test` runs it) only a tiny smoke version runs.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coda::client::{Client, Config};

mod common;
use common::BenchServer as Server;

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
    let conf = dir.join(format!("{tag}.conf"));
    std::fs::write(
        &conf,
        format!(
            "servers = {addr}\nsecret_file = {}\ncache_dir = {}\ncache_size = 4G\n",
            secret.display(),
            dir.join(format!("{tag}-cache")).display()
        ),
    )
    .unwrap();
    let mnt = dir.join(format!("{tag}-mnt"));
    std::fs::create_dir_all(&mnt).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_coda-mount"))
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

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let smoke = !std::env::args().any(|a| a == "--bench");
    if !Path::new("/dev/fuse").exists() {
        println!("mount bench: SKIPPED (/dev/fuse is absent)");
        return;
    }
    let (rounds, big) = if smoke {
        (50, 1usize << 20)
    } else {
        (5000, 256usize << 20)
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
    let local_small = dir.join("local-small");
    let local_big = dir.join("local-big");
    std::fs::write(&local_small, &small).unwrap();
    std::fs::write(&local_big, &data).unwrap();
    drop(data);

    let pt = mount(&dir, &addr, &secret, "pt", &[]);
    let plain = mount(&dir, &addr, &secret, "plain", &["--no-passthrough"]);
    let status = Command::new(env!("CARGO_BIN_EXE_coda"))
        .arg("--cache-dir")
        .arg(dir.join("pt-cache"))
        .arg("status")
        .output()
        .unwrap();
    let passthrough = String::from_utf8_lossy(&status.stdout).contains("passthrough: on");

    // 1. cached 4 KiB open+read+close, interleaved with the local baseline.
    let msmall = pt.mnt.join("small");
    let mut buf = vec![0u8; 4096];
    open_read_close(&msmall, &mut buf); // fetch into the cache
    let (mut m, mut l) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        m.push(open_read_close(&msmall, &mut buf));
        l.push(open_read_close(&local_small, &mut buf));
    }
    let (m, l) = (median(m), median(l));
    println!(
        "cached open+read+close 4 KiB ({rounds} rounds): mount p50 {:.1} µs, local p50 {:.1} µs, ratio {:.2}x",
        m.as_secs_f64() * 1e6,
        l.as_secs_f64() * 1e6,
        m.as_secs_f64() / l.as_secs_f64()
    );

    // 2. sequential read of the big cached file: passthrough, plain, local.
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
    drop(pt);
    drop(plain);
    let _ = std::fs::remove_dir_all(&dir);
}
