//! The library API that examples and benches use: init, start in-process,
//! serve, shut down cleanly with clients still connected.
mod common;

use std::time::{Duration, Instant};

use coda::proto::Msg;
use coda::server::{self, Server, ServerConfig};
use common::raw::{rec, Raw};
use common::TempDir;

#[test]
fn start_serve_and_shutdown_in_process() {
    let dir = TempDir::new("inproc");
    let root = dir.path().join("data");
    let secret = server::init(&root, "admin").unwrap();
    assert!(
        server::init(&root, "admin").is_err(),
        "init refuses an existing server"
    );
    let bob = server::add_user(&root, "bob").unwrap();
    assert!(server::add_user(&root, "bob").is_err());
    let srv = Server::start(ServerConfig {
        root: root.clone(),
        listen: "127.0.0.1:0".parse().unwrap(),
        break_timeout: Duration::from_millis(500),
        idle_timeout: coda::server::DEFAULT_IDLE_TIMEOUT,
        space: Default::default(),
        insecure_plaintext: false,
        forget_clients_after: coda::server::DEFAULT_FORGET_CLIENTS_AFTER,
    })
    .unwrap();
    let addr = srv.local_addr();
    let mut c = Raw::control(addr, &secret, [1; 16], 1);
    let mut b = Raw::bulk(addr, &secret, [1; 16], 1);
    let f = c.alloc(1)[0];
    assert!(matches!(b.upload(1, b"in process"), Msg::Uploaded { .. }));
    c.apply(vec![
        rec::create(1, c.root, "f", f),
        rec::store(2, f, 0, 1, 10),
    ]);
    let bob_secret = coda::proto::auth::read_secret_file(&bob).unwrap();
    let mut other = Raw::connect(
        addr,
        "bob",
        &bob_secret,
        coda::proto::ConnKind::Control,
        [2; 16],
        1,
    )
    .unwrap();
    other.auto_ack = false;
    assert_eq!(other.attr(f).unwrap().size, 10);
    let t = Instant::now();
    srv.shutdown();
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "shutdown took {:?}",
        t.elapsed()
    );
    assert!(c.is_closed() && b.is_closed() && other.is_closed());
    // The data is there for the next start.
    let srv = Server::start(ServerConfig {
        root,
        listen: "127.0.0.1:0".parse().unwrap(),
        break_timeout: Duration::from_millis(500),
        idle_timeout: coda::server::DEFAULT_IDLE_TIMEOUT,
        space: Default::default(),
        insecure_plaintext: false,
        forget_clients_after: coda::server::DEFAULT_FORGET_CLIENTS_AFTER,
    })
    .unwrap();
    let key = coda::proto::auth::read_secret_file(&secret).unwrap();
    let refused = Raw::connect(
        srv.local_addr(),
        "admin",
        &key,
        coda::proto::ConnKind::Bulk,
        [1; 16],
        2,
    );
    assert!(refused.is_err(), "bulk without control is refused");
    let _c = Raw::control(srv.local_addr(), &secret, [1; 16], 2);
    let mut b = Raw::bulk(srv.local_addr(), &secret, [1; 16], 2);
    assert_eq!(b.fetch(f).unwrap().1, b"in process");
    srv.shutdown();
}
