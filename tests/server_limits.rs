//! Bounded resources and fairness (issue 9 §4), against real coda-server
//! processes attacked by real sockets: unread replies, dribbled and oversized
//! handshakes, a thousand idle connections, and batch floods.
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coda::error::WireCode;
use coda::proto::frame::encode_frame;
use coda::proto::{ConnKind, Fid, Msg};
use common::raw::{hello, rec, Raw};
use common::{TempDir, TestServer, SERVER_BIN};

/// A field of /proc/<pid>/status, in KiB.
fn status_kib(pid: i32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status is needed for this test: {e}"));
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

fn mib(kib: u64) -> u64 {
    kib / 1024
}

fn raise_own_nofile(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    assert!(
        lim.rlim_max >= want,
        "this test needs RLIMIT_NOFILE hard limit >= {want} (have {})",
        lim.rlim_max
    );
    if lim.rlim_cur < want {
        lim.rlim_cur = want;
        assert_eq!(
            unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) },
            0,
            "raise the test's own descriptor limit"
        );
    }
}

/// Whether the server has closed `s` (EOF or reset), without waiting.
fn closed_now(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut s = s;
    let mut b = [0u8; 256];
    let r = loop {
        match s.read(&mut b) {
            Ok(0) => break true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break false,
            Err(_) => break true,
        }
    };
    s.set_nonblocking(false).unwrap();
    r
}

/// A server process started with a given descriptor limit (soft, hard), so
/// the test does not depend on the limits of the machine it runs on.
struct LimitedServer {
    _dir: TempDir,
    child: Child,
    addr: SocketAddr,
    secret: std::path::PathBuf,
}

impl LimitedServer {
    fn start(soft: u64, hard: u64) -> LimitedServer {
        let dir = TempDir::new("limits");
        let root = dir.path().join("data");
        let out = Command::new(SERVER_BIN)
            .args(["init", "--root"])
            .arg(&root)
            .output()
            .expect("run coda-server init");
        assert!(out.status.success(), "coda-server init failed");
        let mut cmd = Command::new(SERVER_BIN);
        cmd.args(["serve", "--root"])
            .arg(&root)
            .args(["--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        // SAFETY: setrlimit is async-signal-safe; nothing else runs here.
        unsafe {
            cmd.pre_exec(move || {
                let lim = libc::rlimit {
                    rlim_cur: soft,
                    rlim_max: hard,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn coda-server serve");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .expect("read coda-server's first line");
        let addr = match line.trim().strip_prefix("listening on ") {
            Some(a) => a.parse().unwrap(),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("unexpected first line from coda-server: {line:?}");
            }
        };
        LimitedServer {
            secret: root.join("admin.secret"),
            _dir: dir,
            child,
            addr,
        }
    }
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for LimitedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client that sends requests and never reads a reply is held back by
/// the server (which stops reading it) instead of growing the server's
/// memory without bound; another client keeps getting answers.
#[test]
fn unread_replies_do_not_grow_server_memory() {
    let s = TestServer::start();
    let mut hog = Raw::control(s.addr(), &s.secret_file(), [0x41; 16], 1);
    let root = hog.root;
    // Each request of ~240 KB asks for a reply of ~1 MiB.
    let n = (coda::proto::MAX_FRAME - 13) / (1 + coda::proto::codec::ATTR_LEN);
    let req = Msg::GetAttrs {
        fids: vec![root; n],
    };
    let frame = encode_frame(req.kind(), 1, &req.encode());
    hog.stream
        .set_write_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let until = Instant::now() + Duration::from_secs(60);
    let mut sent = 0;
    // Bounded: 400 requests (~400 MiB of replies), or until the server
    // stops taking them (a write times out), or 60 s.
    while sent < 400 && Instant::now() < until {
        if hog.stream.write_all(&frame).is_err() {
            break;
        }
        sent += 1;
    }
    let peak = status_kib(s.pid(), "VmHWM");
    assert!(
        mib(peak) < 256,
        "server peak RSS {} MiB after {sent} unread 1 MiB replies (bound 256 MiB)",
        mib(peak)
    );
    assert!(sent < 400, "the server kept reading all {sent} requests");
    // A well-behaved client is served meanwhile.
    let mut good = Raw::control(s.addr(), &s.secret_file(), [0x42; 16], 1);
    assert!(good.attr(good.root).is_ok());
    assert_eq!(good.call(&Msg::Ping), Msg::Pong);
    drop(hog);
    assert_eq!(good.call(&Msg::Ping), Msg::Pong);
}

/// One deadline covers the whole handshake: a peer sending one byte a
/// second (each read well within the deadline) is cut long before its
/// Hello is complete.
#[test]
fn a_dribbled_handshake_is_cut_at_the_deadline() {
    let s = TestServer::start();
    let h = hello(ConnKind::Control, "admin", [0x43; 16], 1, [0; 32]);
    let bytes = encode_frame(h.kind(), 0, &h.encode());
    // ~80 bytes at one a second: 8 times the 10 s deadline.
    assert!(bytes.len() > 60);
    // Inside TLS (one record per byte), as a client that passed TLS would.
    let mut c = common::raw::tls_stream(s.addr());
    let mut cut_after = None;
    for (i, b) in bytes.iter().enumerate() {
        if c.write_all(&[*b]).is_err() || closed_now(c.tcp()) {
            cut_after = Some(i);
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(
        cut_after.is_some(),
        "a handshake dribbled over {} s was never cut",
        bytes.len()
    );
    // And the server still serves.
    let mut good = Raw::control(s.addr(), &s.secret_file(), [0x44; 16], 1);
    assert_eq!(good.call(&Msg::Ping), Msg::Pong);
}

/// Before authentication a frame is at most 1 KiB: a peer announcing a
/// 1 MiB Hello is refused at once with Error{Protocol}, not waited for.
#[test]
fn an_oversized_handshake_frame_is_refused_at_once() {
    let s = TestServer::start();
    let mut peers = Vec::new();
    // As many as one address may hold in the handshake at once: more would
    // (rightly) close this address's oldest handshake without an answer.
    for _ in 0..coda::server::MAX_HANDSHAKING_PER_IP {
        let mut c = common::raw::tls_stream(s.addr());
        let mut head = ((1u32 << 20) - 100).to_be_bytes().to_vec();
        head.push(Msg::Ping.kind());
        head.extend_from_slice(&0u64.to_be_bytes());
        c.write_all(&head).unwrap();
        peers.push(c);
    }
    for c in &mut peers {
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let f = coda::proto::read_frame(c)
            .expect("a frame before the close")
            .expect("an Error frame, not a silent close");
        match Msg::decode(&f).unwrap() {
            Msg::Error { code, .. } => assert_eq!(code, WireCode::Protocol),
            m => panic!("expected Error{{Protocol}}, got {m:?}"),
        }
    }
}

/// Authenticated peers announcing 1 MiB frames and sending only a little
/// do not make the server reserve the announced size.
#[test]
fn announced_frames_are_not_reserved_before_their_bytes_arrive() {
    let s = TestServer::start();
    const PEERS: usize = 100;
    let mut conns: Vec<Raw> = (0..PEERS)
        .map(|i| {
            let mut id = [0x50; 16];
            id[0] = i as u8;
            Raw::control(s.addr(), &s.secret_file(), id, 1)
        })
        .collect();
    for c in &mut conns {
        assert_eq!(c.call(&Msg::Ping), Msg::Pong);
    }
    let before = status_kib(s.pid(), "VmData");
    for c in &mut conns {
        let mut head = ((1u32 << 20) - 100).to_be_bytes().to_vec();
        head.push(Msg::GetAttrs { fids: vec![] }.kind());
        head.extend_from_slice(&7u64.to_be_bytes());
        head.extend_from_slice(&[0u8; 1024]);
        c.send_bytes(&head).unwrap();
    }
    // Wait (bounded) until the server has read what we sent: a fresh
    // connection's Ping is answered after those reads were scheduled.
    std::thread::sleep(Duration::from_millis(500));
    let mut probe = Raw::control(s.addr(), &s.secret_file(), [0x60; 16], 1);
    assert_eq!(probe.call(&Msg::Ping), Msg::Pong);
    let after = status_kib(s.pid(), "VmData");
    let grew = after.saturating_sub(before);
    assert!(
        mib(grew) < (PEERS as u64) / 2,
        "server data grew by {} MiB for {PEERS} peers announcing 1 MiB each",
        mib(grew)
    );
}

/// With a descriptor limit of 1024 (soft and hard, so raising cannot help),
/// 1,000 idle unauthenticated connections do not lock out a real client:
/// it connects, authenticates and stats a file while they sit there (before
/// the 10 s handshake deadline would have freed them).
#[test]
fn a_thousand_idle_connections_do_not_lock_out_a_real_client() {
    raise_own_nofile(1500);
    let s = LimitedServer::start(1024, 1024);
    let mut idle = Vec::new();
    let first_open = Instant::now();
    for _ in 0..1000 {
        if let Ok(c) = TcpStream::connect_timeout(&s.addr, Duration::from_secs(5)) {
            idle.push(c);
        }
    }
    assert!(idle.len() >= 900, "opened only {} idle sockets", idle.len());
    let (tx, rx) = std::sync::mpsc::channel();
    let (addr, secret) = (s.addr, s.secret.clone());
    std::thread::spawn(move || {
        let r = Raw::connect(
            addr,
            "admin",
            &coda::proto::auth::read_secret_file(&secret).unwrap(),
            ConnKind::Control,
            [0x45; 16],
            1,
        );
        let ok = r.map(|mut c| c.attr(c.root).is_ok()).unwrap_or(false);
        let _ = tx.send(ok);
    });
    // Bounded by the handshake deadline at which the server would free the
    // idle connections' descriptors anyway (less a second): the client must
    // get in while they are all still there.
    let there_until = first_open + coda::server::HANDSHAKE_TIMEOUT - Duration::from_secs(1);
    let got = rx.recv_timeout(there_until.saturating_duration_since(Instant::now()));
    assert_eq!(
        got,
        Ok(true),
        "a real client could not authenticate and stat while 1,000 idle connections sat there"
    );
    drop(idle);
}

/// At start the server raises its soft descriptor limit to the hard one.
#[test]
fn the_soft_descriptor_limit_is_raised_to_the_hard_one() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    assert!(
        lim.rlim_max >= 2048,
        "this test needs RLIMIT_NOFILE hard limit >= 2048 (have {})",
        lim.rlim_max
    );
    let s = LimitedServer::start(1024, 2048);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", s.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files in /proc/<pid>/limits");
    let nums: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(nums, ["2048", "2048"], "{line}");
}

/// One client pipelining many 4,096-record batches slows only itself:
/// another client's ReadDir and GetAttrs are answered while most of the
/// flood is still unanswered.
#[test]
fn a_batch_flood_does_not_starve_another_session() {
    let s = TestServer::start();
    let mut setup = Raw::control(s.addr(), &s.secret_file(), [0x46; 16], 1);
    let f = setup.alloc(1)[0];
    setup.apply(vec![rec::create(1, setup.root, "target", f)]);
    drop(setup);

    const BATCHES: usize = 100;
    let mut flood = Raw::control(s.addr(), &s.secret_file(), [0x47; 16], 1);
    let mut w = flood.stream.try_clone().unwrap();
    let frames = chmod_flood(BATCHES, f, 2, 1);
    let writer = std::thread::spawn(move || {
        for fr in frames {
            if w.write_all(&fr).is_err() {
                return;
            }
        }
    });
    let replies = Arc::new(AtomicUsize::new(0));
    let r2 = Arc::clone(&replies);
    let reader = std::thread::spawn(move || {
        flood
            .stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        while r2.load(Ordering::SeqCst) < BATCHES {
            match flood.recv() {
                Some((_, Msg::Reintegrated { .. })) => {
                    r2.fetch_add(1, Ordering::SeqCst);
                }
                Some((_, m)) => panic!("flood batch refused: {m:?}"),
                None => return,
            }
        }
    });
    // Bounded wait for the flood to be under way.
    let until = Instant::now() + Duration::from_secs(120);
    while replies.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < until, "the flood never got a reply");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut good = Raw::control(s.addr(), &s.secret_file(), [0x48; 16], 1);
    let names = good.list(good.root);
    assert!(names.iter().any(|(n, _)| n == "target"));
    assert!(good.attr(Fid::new(1, 1, 1)).is_ok());
    let done = replies.load(Ordering::SeqCst);
    assert!(
        done < BATCHES / 2,
        "another client's ReadDir waited for {done} of {BATCHES} flood batches"
    );
    writer.join().unwrap();
    reader.join().unwrap();
    assert_eq!(replies.load(Ordering::SeqCst), BATCHES);
}

/// A client that holds a callback (on the volume, as every writer does) and
/// keeps its pipeline full of batches cannot take a break in time: its ack
/// would sit behind its own backlog. Another client's write is answered at
/// once and the backlogged session is ended, instead of the writer waiting
/// (here the break timeout is 30 s) for an ack that cannot come.
#[test]
fn a_backlogged_callback_holder_does_not_hold_up_another_writer() {
    let s = TestServer::start_with(&["--break-timeout-ms", "30000"]);
    const BATCHES: usize = 100;
    let mut h = Raw::control(s.addr(), &s.secret_file(), [0x72; 16], 1);
    let fids = h.alloc(2);
    let (f, g) = (fids[0], fids[1]);
    // H writes, so it holds callbacks (the volume's among them) that W's
    // write breaks; W holds none, so H's own writes wait for nobody.
    h.apply(vec![
        rec::create(1, h.root, "f", f),
        rec::create(2, h.root, "g", g),
    ]);
    let mut w = Raw::control(s.addr(), &s.secret_file(), [0x71; 16], 1);
    let mut hw = h.stream.try_clone().unwrap();
    let frames = chmod_flood(BATCHES, f, 3, 100);
    let writer = std::thread::spawn(move || {
        for fr in frames {
            if hw.write_all(&fr).is_err() {
                return;
            }
        }
    });
    // H reads its replies (and never acks a break) until the server closes it.
    let replies = Arc::new(AtomicUsize::new(0));
    let r2 = Arc::clone(&replies);
    let (closed_tx, closed_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        h.stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        loop {
            match h.recv() {
                Some((_, Msg::Reintegrated { .. })) => {
                    r2.fetch_add(1, Ordering::SeqCst);
                }
                Some(_) => {}
                None => {
                    let _ = closed_tx.send(());
                    return;
                }
            }
        }
    });
    let until = Instant::now() + Duration::from_secs(120);
    while replies.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < until, "H's flood never got a reply");
        std::thread::sleep(Duration::from_millis(5));
    }
    // W's write breaks H's volume callback; W's reply must not wait for
    // H's ack. Bounded wait well under the 30 s break timeout.
    let (wtx, wrx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = w.reintegrate(vec![rec::chmod(1, g, 0, 0o640)]);
        let _ = wtx.send(r);
    });
    match wrx.recv_timeout(Duration::from_secs(15)) {
        Ok(Msg::Reintegrated { .. }) => {}
        Ok(m) => panic!("W's write refused: {m:?}"),
        Err(_) => panic!("W's write waited for the backlogged holder's ack"),
    }
    assert!(
        closed_rx.recv_timeout(Duration::from_secs(15)).is_ok(),
        "the backlogged holder's session was not ended"
    );
    let _ = writer.join();
}

/// A TCP connection to `dst` from the loopback address `src` (any of
/// 127/8 is local on Linux), so one test can speak from two addresses.
fn connect_from(src: std::net::Ipv4Addr, dst: SocketAddr) -> TcpStream {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(dst) = dst else {
        panic!("the test server listens on IPv4 loopback")
    };
    let sin = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor this function owns until
    // it is handed to TcpStream.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let s = TcpStream::from_raw_fd(fd);
        let from = sin(src, 0);
        let r = libc::bind(fd, &from as *const _ as *const libc::sockaddr, len);
        assert_eq!(r, 0, "bind {src}: {}", std::io::Error::last_os_error());
        let to = sin(*dst.ip(), dst.port());
        let r = libc::connect(fd, &to as *const _ as *const libc::sockaddr, len);
        assert_eq!(
            r,
            0,
            "connect from {src}: {}",
            std::io::Error::last_os_error()
        );
        s
    }
}

/// One address opening far more handshakes than the server's whole
/// unauthenticated budget (256) evicts only its own: another address's
/// handshake in progress still completes.
#[test]
fn one_address_cannot_evict_other_addresses_handshakes() {
    use coda::proto::auth::{client_mac, random_bytes, read_secret_file, Transcript};
    use coda::proto::read_frame;
    let s = TestServer::start();
    let secret = read_secret_file(&s.secret_file()).unwrap();
    // A: from 127.0.0.1, halfway through its handshake (Challenge read).
    let mut a = common::raw::tls_stream(s.addr());
    a.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let (id, nonce): ([u8; 16], [u8; 32]) = ([0x47; 16], random_bytes());
    let h = hello(ConnKind::Control, "admin", id, 1, nonce);
    a.write_all(&encode_frame(h.kind(), 0, &h.encode()))
        .unwrap();
    let f = read_frame(&mut a).unwrap().expect("challenge frame");
    let Ok(Msg::Challenge { server_nonce }) = Msg::decode(&f) else {
        panic!("expected a Challenge")
    };
    // 300 idle connections from 127.0.0.2.
    let flood: Vec<TcpStream> = (0..300)
        .map(|_| connect_from([127, 0, 0, 2].into(), s.addr()))
        .collect();
    // A client accepted after the flood: the acceptor has taken (and
    // evicted for) every flood connection before it.
    let mut c = Raw::control(s.addr(), &s.secret_file(), [0x48; 16], 1);
    assert!(c.attr(c.root).is_ok());
    // A finishes its handshake: it was not evicted.
    let t = Transcript {
        user: "admin",
        client_id: &id,
        epoch: 1,
        kind: ConnKind::Control,
        client_nonce: &nonce,
        server_nonce: &server_nonce,
        binding: &a.channel_binding().unwrap(),
    };
    let auth = Msg::Auth {
        mac: client_mac(&secret, &t),
    };
    a.write_all(&encode_frame(auth.kind(), 0, &auth.encode()))
        .unwrap();
    let f = read_frame(&mut a)
        .ok()
        .flatten()
        .expect("A's handshake was cut: another address's flood evicted it");
    assert!(matches!(Msg::decode(&f), Ok(Msg::Welcome { .. })));
    // The flood lost its own oldest: all but the last 32 are closed
    // (bounded wait for the FINs to be seen).
    let flood = flood;
    let until = Instant::now() + Duration::from_secs(10);
    let mut open: Vec<usize> = (0..268).collect();
    while !open.is_empty() && Instant::now() < until {
        open.retain(|&i| !closed_now(&flood[i]));
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        open.is_empty(),
        "{} of the oldest flood handshakes still open",
        open.len()
    );
}

/// A callback holder that stops reading while its replies pile up (its
/// writer stuck on a full socket, its reader held at the bounds) is cut
/// when another client's write breaks its callback: the write is answered
/// without waiting for the break timeout (ten minutes here).
#[test]
fn a_holder_that_stops_reading_is_cut_at_once_by_a_break() {
    let s = TestServer::start_with(&["--break-timeout-ms", "600000"]);
    let mut h = Raw::control(s.addr(), &s.secret_file(), [0x73; 16], 1);
    let root = h.root;
    // H holds a callback on the root directory.
    assert!(h.attr(root).is_ok());
    // A small receive buffer, so H's unread replies fill the socket and
    // the server's writer for H blocks (rather than the reader only
    // pausing at the bounds with everything written).
    {
        use std::os::fd::AsRawFd;
        let small: libc::c_int = 4096;
        // SAFETY: setsockopt on a descriptor H's stream owns.
        let r = unsafe {
            libc::setsockopt(
                h.stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                &small as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
    }
    // Then H asks for about 1 MiB replies, many of them, and reads none.
    let big = Msg::GetAttrs {
        fids: vec![root; coda::server::MAX_ATTRS_REPLY],
    };
    let frames: Vec<Vec<u8>> = (0..100)
        .map(|i| encode_frame(big.kind(), 1000 + i, &big.encode()))
        .collect();
    let mut hw = h.stream.try_clone().unwrap();
    let (sent_tx, sent_rx) = std::sync::mpsc::channel();
    let sender = std::thread::spawn(move || {
        for fr in frames {
            if hw.write_all(&fr).is_err() {
                break;
            }
            let _ = sent_tx.send(());
        }
    });
    // Far more replies than the socket holds are on their way before W
    // writes, so the break is queued behind a writer stuck on them.
    for _ in 0..16 {
        sent_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("H's requests are taken");
    }
    // Wait (bounded) until the server's socket to H holds over 1 MiB H has
    // not taken: its writer is then on a full socket, with more replies
    // queued behind (the break will queue behind them).
    let h_port = h.stream.local_addr().unwrap().port();
    let until = Instant::now() + Duration::from_secs(60);
    while unsent_to(s.addr().port(), h_port) < 1 << 20 {
        assert!(
            Instant::now() < until,
            "the server's socket to H never filled"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut w = Raw::control(s.addr(), &s.secret_file(), [0x74; 16], 1);
    let f = w.alloc(1)[0];
    let (wtx, wrx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = w.reintegrate(vec![rec::create(1, root, "f", f)]);
        let _ = wtx.send(r);
    });
    match wrx.recv_timeout(Duration::from_secs(120)) {
        Ok(Msg::Reintegrated { .. }) => {}
        Ok(m) => panic!("W's write refused: {m:?}"),
        Err(_) => panic!("W's write waited for the non-reading holder's ack"),
    }
    // H's session was ended: draining what it was sent ends in a close.
    h.stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut drained = 0usize;
    loop {
        match h.stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => drained += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("H's connection was not closed: {e}"),
        }
        assert!(drained < 1 << 30, "H's connection was never closed");
    }
    let _ = sender.join();
}

/// Bytes in the send queue of the loopback TCP socket from `local_port` to
/// `remote_port` (/proc/net/tcp's tx_queue), 0 if not found.
fn unsent_to(local_port: u16, remote_port: u16) -> u64 {
    let text = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    let port = |a: &str| {
        a.rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 4 && port(f[1]) == Some(local_port) && port(f[2]) == Some(remote_port) {
            let tx = f[4].split(':').next().unwrap_or("0");
            return u64::from_str_radix(tx, 16).unwrap_or(0);
        }
    }
    0
}

/// `batches` Reintegrate frames of MAX_BATCH chmods of `f` each, store ids
/// from `first_store` on, request ids from `first_id` on: a batch flood.
fn chmod_flood(batches: usize, f: Fid, first_store: u64, first_id: u64) -> Vec<Vec<u8>> {
    let mut next_store = first_store;
    (0..batches)
        .map(|b| {
            let records = (0..coda::proto::MAX_BATCH)
                .map(|i| {
                    let r = rec::chmod(next_store, f, 0, 0o600 | (i as u32 & 0o77));
                    next_store += 1;
                    r
                })
                .collect();
            let m = Msg::Reintegrate { records };
            encode_frame(m.kind(), first_id + b as u64, &m.encode())
        })
        .collect()
}

/// (thread name, nice value) of every thread of `pid`.
fn thread_nices(pid: i32) -> Vec<(String, i64)> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/task is needed for this test: {e}"));
    let mut out = Vec::new();
    for e in dir.flatten() {
        let Ok(s) = std::fs::read_to_string(e.path().join("stat")) else {
            continue; // the thread ended meanwhile
        };
        let (head, rest) = s.rsplit_once(')').unwrap();
        let name = head.split_once('(').unwrap().1.to_string();
        // After the name: state is field 3, nice field 19.
        let nice = rest.split_whitespace().nth(16).unwrap().parse().unwrap();
        out.push((name, nice));
    }
    out
}

/// Nice values of the server's connection threads, sorted.
fn conn_nices(pid: i32) -> Vec<i64> {
    let mut v: Vec<i64> = thread_nices(pid)
        .into_iter()
        .filter(|(n, _)| n.starts_with("coda-conn"))
        .map(|(_, nice)| nice)
        .collect();
    v.sort();
    v
}

/// Whether a thread of this process may lower itself and go back to nice
/// 0 (root or CAP_SYS_NICE): the server, our child, can then too.
fn can_renice() -> bool {
    std::thread::spawn(|| unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 1) == 0
            && libc::setpriority(libc::PRIO_PROCESS, tid, 0) == 0
    })
    .join()
    .unwrap()
}

/// Work no well-behaved client waits on yields the CPU (SERVER.md "CPU
/// priority"): a connection still in its handshake is served at nice 10
/// (when the server can raise the thread again once the peer is proven),
/// and so is, from its first bulk frame on, the reader of a control
/// connection that sends a 4,096-record batch; an authenticated
/// connection sending small requests stays at 0.
#[test]
fn handshakes_and_bulk_readers_run_at_low_cpu_priority() {
    const LOW: i64 = 10;
    let s = TestServer::start();
    let renice = can_renice();
    let mut good = Raw::control(s.addr(), &s.secret_file(), [0x61; 16], 1);
    assert_eq!(conn_nices(s.pid()), [0], "an authenticated connection");

    // TLS done, Hello not sent: the server's thread waits in the handshake.
    let pending =
        common::raw::try_tls_over(TcpStream::connect(s.addr()).unwrap()).expect("TLS handshake");
    let want = if renice { vec![0, LOW] } else { vec![0, 0] };
    let until = Instant::now() + Duration::from_secs(30);
    while conn_nices(s.pid()) != want {
        assert!(
            Instant::now() < until,
            "connection threads at {:?}, expected {want:?}",
            conn_nices(s.pid())
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(pending);

    let mut flood = Raw::control(s.addr(), &s.secret_file(), [0x62; 16], 1);
    let f = flood.alloc(1)[0];
    flood.apply(vec![rec::create(1, flood.root, "target", f)]);
    let until = Instant::now() + Duration::from_secs(30);
    while conn_nices(s.pid()) != [0, 0] {
        assert!(
            Instant::now() < until,
            "after the handshake ended and another was proven: {:?}",
            conn_nices(s.pid())
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // One large batch: its reader is lowered, for good.
    let frame = chmod_flood(1, f, 2, 100).pop().unwrap();
    flood.stream.write_all(&frame).unwrap();
    match flood.recv() {
        Some((100, Msg::Reintegrated { .. })) => {}
        m => panic!("the large batch: {m:?}"),
    }
    assert_eq!(conn_nices(s.pid()), [0, LOW]);
    // The small client's thread is untouched and still serves.
    assert!(good.attr(good.root).is_ok());
    assert_eq!(conn_nices(s.pid()), [0, LOW]);
}
