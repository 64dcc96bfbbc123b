//! The main job on an embedded default: start a file server in a temporary
//! directory, then write and read through two clients and show what the
//! callbacks did.
//!
//!   cargo run --example demo              (server log lines hidden)
//!   cargo run --example demo -- --verbose (server log lines on stderr)

use std::time::Duration;

use coda::client::{Client, Config};
use coda::server::{Server, ServerConfig};

fn client(
    server: &Server,
    secret: &std::path::Path,
    cache: &std::path::Path,
) -> coda::Result<Client> {
    let mut cfg = Config::new();
    cfg.set("servers", &server.local_addr().to_string())?;
    cfg.set("secret_file", &secret.display().to_string())?;
    cfg.set("cache_dir", &cache.display().to_string())?;
    Client::new(cfg)
}

fn write(c: &Client, path: &str, text: &str) -> coda::Result<()> {
    let mut f = c.open(path, libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC, 0o644)?;
    f.write_at(text.as_bytes(), 0)?;
    f.close()
}

fn read(c: &Client, path: &str) -> coda::Result<String> {
    let f = c.open(path, libc::O_RDONLY, 0)?;
    let mut buf = vec![0u8; 4096];
    let n = f.read_at(&mut buf, 0)?;
    f.close()?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// The in-process server logs to stderr; the demo's story is stdout. Send
/// stderr to `log` unless asked for it, and hand back the real stderr so an
/// error still reaches the user.
fn hide_stderr(log: &std::path::Path) -> Option<i32> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::create(log).ok()?;
    // SAFETY: dup/dup2 on valid descriptors; the saved one is kept open.
    unsafe {
        let saved = libc::dup(2);
        (saved >= 0 && libc::dup2(f.as_raw_fd(), 2) >= 0).then_some(saved)
    }
}

fn main() {
    let dir = std::env::temp_dir().join(format!("coda-demo-{}", std::process::id()));
    let verbose = std::env::args().any(|a| a == "--verbose" || a == "-v");
    let _ = std::fs::create_dir_all(&dir);
    let saved = if verbose {
        None
    } else {
        hide_stderr(&dir.join("server.log"))
    };
    let result = run(&dir);
    if let Some(fd) = saved {
        // SAFETY: fd is the stderr saved above.
        unsafe { libc::dup2(fd, 2) };
    }
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = result {
        eprintln!("demo failed: {e} (run with --verbose for the server's log)");
        std::process::exit(1);
    }
}

fn run(dir: &std::path::Path) -> coda::Result<()> {
    let root = dir.join("server");
    let secret = coda::server::init(&root, "admin")?;
    let server = Server::start(ServerConfig {
        root: root.clone(),
        listen: "127.0.0.1:0".parse().unwrap(),
        break_timeout: Duration::from_millis(1000),
        idle_timeout: coda::server::DEFAULT_IDLE_TIMEOUT,
        space: Default::default(),
        insecure_plaintext: false,
        forget_clients_after: coda::server::DEFAULT_FORGET_CLIENTS_AFTER,
    })?;
    println!(
        "server: listening on {} with data in {}",
        server.local_addr(),
        root.display()
    );

    let a = client(&server, &secret, &dir.join("cache-a"))?;
    let b = client(&server, &secret, &dir.join("cache-b"))?;

    a.mkdir("/web", 0o755)?;
    write(&a, "/web/index.html", "version 1")?;
    println!("A wrote \"version 1\" to /web/index.html");
    println!(
        "B read {:?} (fetches so far: {})",
        read(&b, "/web/index.html")?,
        b.stats().fetches
    );
    println!(
        "B read {:?} again from its cache (fetches so far: {})",
        read(&b, "/web/index.html")?,
        b.stats().fetches
    );

    write(&a, "/web/index.html", "version 2")?;
    println!(
        "A wrote \"version 2\"; the server broke B's callback before acknowledging A (breaks B received: {})",
        b.stats().breaks_received
    );
    println!(
        "B read {:?} (fetches so far: {})",
        read(&b, "/web/index.html")?,
        b.stats().fetches
    );

    let names: Vec<String> = b.readdir("/web")?.into_iter().map(|e| e.name).collect();
    println!("B lists /web: {names:?}");
    match b.stat("/web/missing.html") {
        Err(e) => println!("B stats /web/missing.html: {e} (errno {})", -e.code()),
        Ok(_) => println!("unexpected: /web/missing.html exists"),
    }

    drop(a);
    drop(b);
    server.shutdown();
    Ok(())
}
