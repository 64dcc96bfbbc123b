//! The handshake, malformed input and clean shutdown, against a real
//! coda-server process.
mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use coda::error::WireCode;
use coda::proto::auth::{client_mac, random_bytes, read_secret_file, Transcript};
use coda::proto::frame::encode_frame;
use coda::proto::{ConnKind, Fid, Msg};
use common::raw::{hello, rec, Raw};
use common::TestServer;

const ID: [u8; 16] = [1; 16];

fn code_of(m: &Msg) -> WireCode {
    match m {
        Msg::Error { code, .. } => *code,
        m => panic!("expected an error, got {m:?}"),
    }
}

#[test]
fn good_secret_gets_welcome_and_pong() {
    let s = TestServer::start();
    let mut c = Raw::control(s.addr(), &s.secret_file(), ID, 1);
    assert_eq!(c.root, Fid::new(1, 1, 1));
    assert_eq!(c.call(&Msg::Ping), Msg::Pong);
}

#[test]
fn wrong_secret_and_unknown_user_get_auth_error_and_close() {
    let s = TestServer::start();
    let secret = read_secret_file(&s.secret_file()).unwrap();
    let mut wrong = secret;
    wrong[0] ^= 1;
    for (user, key) in [("admin", wrong), ("nobody", secret)] {
        let err = Raw::connect(s.addr(), user, &key, ConnKind::Control, ID, 1)
            .err()
            .expect("handshake must fail");
        assert_eq!(code_of(&err), WireCode::Auth, "{user}");
    }
    // The connection is closed after the refusal.
    let mut raw = RawConn::connect(&s);
    raw.send(0, &hello(ConnKind::Control, "admin", ID, 1, [0; 32]));
    assert!(matches!(raw.recv(), Some(Msg::Challenge { .. })));
    raw.send(0, &Msg::Auth { mac: [0; 32] });
    assert_eq!(code_of(&raw.recv().unwrap()), WireCode::Auth);
    assert!(raw.recv().is_none(), "closed after Error{{Auth}}");
    // And the server still serves.
    Raw::control(s.addr(), &s.secret_file(), ID, 1);
}

#[test]
fn a_replayed_auth_fails_against_a_new_challenge() {
    let s = TestServer::start();
    let secret = read_secret_file(&s.secret_file()).unwrap();
    let nonce: [u8; 32] = random_bytes();
    let h = hello(ConnKind::Control, "admin", ID, 7, nonce);
    // Record a good handshake.
    let mut first = RawConn::connect(&s);
    first.send(0, &h);
    let Some(Msg::Challenge { server_nonce }) = first.recv() else {
        panic!("no challenge")
    };
    let t = Transcript {
        user: "admin",
        client_id: &ID,
        epoch: 7,
        kind: ConnKind::Control,
        client_nonce: &nonce,
        server_nonce: &server_nonce,
        binding: &first.0.channel_binding().unwrap(),
    };
    let auth = Msg::Auth {
        mac: client_mac(&secret, &t),
    };
    first.send(0, &auth);
    assert!(matches!(first.recv(), Some(Msg::Welcome { .. })));
    // Replay the same Hello and Auth on a new connection.
    let mut replay = RawConn::connect(&s);
    replay.send(0, &h);
    let Some(Msg::Challenge { server_nonce: n2 }) = replay.recv() else {
        panic!("no challenge")
    };
    assert_ne!(n2, server_nonce, "every connection gets a fresh nonce");
    replay.send(0, &auth);
    assert_eq!(code_of(&replay.recv().unwrap()), WireCode::Auth);
    assert!(replay.recv().is_none());
}

#[test]
fn bad_version_and_bulk_without_control_are_refused() {
    let s = TestServer::start();
    let mut c = RawConn::connect(&s);
    let Msg::Hello {
        kind,
        user,
        client_id,
        epoch,
        client_nonce,
        ..
    } = hello(ConnKind::Control, "admin", ID, 1, [0; 32])
    else {
        unreachable!()
    };
    c.send(
        0,
        &Msg::Hello {
            version: 99,
            kind,
            user,
            client_id,
            epoch,
            client_nonce,
        },
    );
    assert_eq!(code_of(&c.recv().unwrap()), WireCode::Protocol);
    assert!(c.recv().is_none());
    let secret = read_secret_file(&s.secret_file()).unwrap();
    let err = Raw::connect(s.addr(), "admin", &secret, ConnKind::Bulk, [9; 16], 1)
        .err()
        .unwrap();
    assert_eq!(code_of(&err), WireCode::Stale);
    // With the control session live, bulk attaches; with another epoch it does not.
    let _ctl = Raw::control(s.addr(), &s.secret_file(), [9; 16], 1);
    Raw::bulk(s.addr(), &s.secret_file(), [9; 16], 1);
    let err = Raw::connect(s.addr(), "admin", &secret, ConnKind::Bulk, [9; 16], 2)
        .err()
        .unwrap();
    assert_eq!(code_of(&err), WireCode::Stale);
}

/// Each kind of malformed frame gets Error{Protocol} and a closed
/// connection, and other connections are undisturbed.
#[test]
fn malformed_frames_get_protocol_error_and_close() {
    let s = TestServer::start();
    let mut bystander = Raw::control(s.addr(), &s.secret_file(), [2; 16], 1);
    let mut oversized = (2u32 << 20).to_be_bytes().to_vec();
    oversized.extend_from_slice(&[0x10; 9]);
    let unknown_type = encode_frame(0xEE, 5, &[]);
    let trailing = encode_frame(0x10, 6, &[1, 2, 3]); // Ping with a body
    let truncated = encode_frame(0x12, 7, &[0, 0, 0, 2]); // GetAttrs of 2 fids, none sent
    let fetch_on_control = encode_frame(
        Msg::Fetch {
            fid: Fid::new(1, 1, 1),
        }
        .kind(),
        8,
        &Msg::Fetch {
            fid: Fid::new(1, 1, 1),
        }
        .encode(),
    );
    for (what, bytes) in [
        ("oversized length", oversized),
        ("unknown type", unknown_type),
        ("trailing bytes", trailing),
        ("truncated body", truncated),
        ("bulk message on control", fetch_on_control),
    ] {
        let mut c = Raw::control(s.addr(), &s.secret_file(), [3; 16], 1);
        c.send_bytes(&bytes).unwrap();
        match c.recv() {
            Some((_, m)) => assert_eq!(code_of(&m), WireCode::Protocol, "{what}"),
            None => panic!("{what}: closed without an error"),
        }
        assert!(c.is_closed(), "{what}: connection closed");
        assert_eq!(
            bystander.call(&Msg::Ping),
            Msg::Pong,
            "{what}: others undisturbed"
        );
    }
    // A frame cut off mid-way, then the peer closes: nothing breaks.
    let mut c = Raw::control(s.addr(), &s.secret_file(), [3; 16], 1);
    c.send_bytes(&encode_frame(0x12, 9, &[0, 0, 0, 1, 0, 0])[..10])
        .unwrap();
    drop(c);
    // Garbage before any handshake.
    let mut g = RawConn::connect(&s);
    g.0.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(code_of(&g.recv().unwrap()), WireCode::Protocol);
    assert!(g.recv().is_none());
    assert_eq!(bystander.call(&Msg::Ping), Msg::Pong);
    // A second connection works afterwards.
    let mut fresh = Raw::control(s.addr(), &s.secret_file(), [4; 16], 1);
    assert_eq!(fresh.call(&Msg::Ping), Msg::Pong);
}

#[test]
fn bad_names_in_create_are_invalid_without_closing() {
    let s = TestServer::start();
    let mut c = Raw::control(s.addr(), &s.secret_file(), ID, 1);
    let f = c.alloc(1);
    for bad in ["..", "a/b"] {
        let m = c.reintegrate(vec![rec::create(1, c.root, bad, f[0])]);
        assert_eq!(code_of(&m), WireCode::Invalid, "{bad}");
    }
    assert_eq!(c.call(&Msg::Ping), Msg::Pong);
}

#[test]
fn a_connection_closing_mid_upload_loses_only_that_upload() {
    let s = TestServer::start();
    let mut c = Raw::control(s.addr(), &s.secret_file(), ID, 1);
    let mut b = Raw::bulk(s.addr(), &s.secret_file(), ID, 1);
    b.send(&common::raw::dense_upload(3, 1000));
    b.send_bytes(&[7; 100]).unwrap();
    drop(b);
    let f = c.alloc(1);
    c.apply(vec![rec::create(1, c.root, "f", f[0])]);
    let m = c.reintegrate(vec![rec::store(2, f[0], 0, 3, 1000)]);
    assert_eq!(code_of(&m), WireCode::NotFound);
    let mut b = Raw::bulk(s.addr(), &s.secret_file(), ID, 1);
    assert!(matches!(b.upload(3, &[7; 1000]), Msg::Uploaded { .. }));
    c.apply(vec![rec::store(3, f[0], 0, 3, 1000)]);
}

#[test]
fn a_stalled_handshake_does_not_block_others() {
    let s = TestServer::start();
    let _silent = TcpStream::connect(s.addr()).unwrap();
    let mut half = RawConn::connect(&s);
    half.send(0, &hello(ConnKind::Control, "admin", ID, 1, [0; 32]));
    let mut c = Raw::control(s.addr(), &s.secret_file(), [5; 16], 1);
    assert_eq!(c.call(&Msg::Ping), Msg::Pong);
}

#[test]
fn sigterm_exits_zero_promptly() {
    let mut s = TestServer::start();
    let mut c = Raw::control(s.addr(), &s.secret_file(), ID, 1);
    let _b = Raw::bulk(s.addr(), &s.secret_file(), ID, 1);
    let _idle = TcpStream::connect(s.addr()).unwrap();
    assert_eq!(c.call(&Msg::Ping), Msg::Pong);
    let t = Instant::now();
    assert!(s.stop(), "clean exit with status 0");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    assert!(c.is_closed());
}

/// A bare TLS connection for driving the handshake by hand.
struct RawConn(coda::tls::Stream);

impl RawConn {
    fn connect(s: &TestServer) -> RawConn {
        let c = common::raw::tls_stream(s.addr());
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        RawConn(c)
    }
    fn send(&mut self, id: u64, m: &Msg) {
        self.0
            .write_all(&encode_frame(m.kind(), id, &m.encode()))
            .unwrap();
    }
    fn recv(&mut self) -> Option<Msg> {
        match coda::proto::read_frame(&mut self.0) {
            Ok(Some(f)) => Some(Msg::decode(&f).unwrap()),
            _ => None,
        }
    }
}
