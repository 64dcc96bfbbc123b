//! The main job on an embedded default: start a file server in a temporary
//! directory, then write and read through two clients and show what the
//! callbacks did.
//!
//!   cargo run --example demo

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

fn main() -> coda::Result<()> {
    let dir = std::env::temp_dir().join(format!("coda-demo-{}", std::process::id()));
    let root = dir.join("server");
    let secret = coda::server::init(&root, "admin")?;
    let server = Server::start(ServerConfig {
        root: root.clone(),
        listen: "127.0.0.1:0".parse().unwrap(),
        break_timeout: Duration::from_millis(1000),
        idle_timeout: coda::server::DEFAULT_IDLE_TIMEOUT,
        space: Default::default(),
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
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
