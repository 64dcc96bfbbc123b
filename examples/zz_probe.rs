// Scratch measurement (not committed): creates in one directory.
use coda::client::{Client, Config};
use std::time::Instant;
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (addr, secret, cache, n, data) = (
        &a[1],
        &a[2],
        &a[3],
        a[4].parse::<usize>().unwrap(),
        a[5] == "data",
    );
    let mut c = Config::new();
    c.set("servers", addr).unwrap();
    c.set("cache_dir", cache).unwrap();
    c.set("secret_file", secret).unwrap();
    let c = Client::new(c).unwrap();
    let dir = format!("/d{}", std::process::id());
    c.mkdir(&dir, 0o755).unwrap();
    let t0 = Instant::now();
    let mut half = None;
    for i in 0..n {
        let mut f = c
            .open(
                &format!("{dir}/f{i}"),
                libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
                0o644,
            )
            .unwrap();
        if data {
            f.write_at(b"0123456789abcdef", 0).unwrap();
        }
        f.close().unwrap();
        if i + 1 == n / 2 {
            half = Some(t0.elapsed());
        }
    }
    let all = t0.elapsed();
    let h = half.unwrap_or(all);
    println!(
        "n={n} first_half={:?} second_half={:?} ratio={:.3}",
        h,
        all - h,
        (all - h).as_secs_f64() / h.as_secs_f64()
    );
}
