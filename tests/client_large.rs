//! A large file round-trips byte-exact and is streamed, never held whole in
//! memory. (Its own test binary, so the memory check sees no other test.)

mod client_util;
mod common;

use client_util::*;
use common::TempDir;

const SIZE: usize = 64 << 20;
const CHUNK: usize = 1 << 20;

fn pattern(off: usize, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let x = (off + i) as u64;
        *b = (x.wrapping_mul(2654435761) >> 13) as u8;
    }
}

/// Peak resident set size of this process, in bytes.
fn peak_rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

#[test]
fn a_64_mib_file_round_trips_byte_exact_without_being_held_in_memory() {
    let srv = start();
    let (da, db) = (TempDir::new("a"), TempDir::new("b"));
    let (a, b) = (client(&srv, da.path()), client(&srv, db.path()));
    let base = peak_rss();

    let mut f = a
        .open("/big", libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL, 0o644)
        .unwrap();
    let mut buf = vec![0u8; CHUNK];
    for off in (0..SIZE).step_by(CHUNK) {
        pattern(off, &mut buf);
        assert_eq!(f.write_at(&buf, off as u64).unwrap(), CHUNK);
    }
    f.close().unwrap();

    let f = b.open("/big", libc::O_RDONLY, 0).unwrap();
    assert_eq!(b.stats().fetch_bytes, SIZE as u64);
    let mut want = vec![0u8; CHUNK];
    for off in (0..SIZE).step_by(CHUNK) {
        let mut got = 0;
        while got < CHUNK {
            let n = f.read_at(&mut buf[got..], (off + got) as u64).unwrap();
            assert!(n > 0, "short file at {}", off + got);
            got += n;
        }
        pattern(off, &mut want);
        assert!(buf == want, "bytes differ in the chunk at {off}");
    }
    assert_eq!(f.read_at(&mut buf, SIZE as u64).unwrap(), 0);
    f.close().unwrap();
    assert_eq!(b.stat("/big").unwrap().size, SIZE as u64);

    let grew = peak_rss().saturating_sub(base);
    assert!(
        grew < (SIZE as u64) / 2,
        "peak memory grew by {grew} bytes for a {SIZE}-byte file"
    );
}
