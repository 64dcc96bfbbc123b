//! The wire is TLS: a relay the test starts on loopback sees no file name
//! or content, a flipped byte is a transport failure and never data, a
//! relay with a certificate of its own is refused (and cannot pass a
//! client's proof on even when the client trusts it), a wrong pin is
//! refused, and plaintext needs both sides to ask for it.
mod client_util;
mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use client_util::{get, put};
use coda::client::{Client, Config};
use coda::tls::Stream;
use coda::Error;
use common::{TempDir, TestServer};
use parking_lot::Mutex;
use rustls::pki_types::pem::PemObject;

/// What the relay does to the bytes it passes on.
#[derive(Clone)]
enum Mode {
    /// Pass TCP bytes through, recording them.
    Record,
    /// Pass through, flipping one bit of the byte at this offset of a
    /// connection's server-to-client (or client-to-server) stream.
    FlipToClient(u64),
    FlipToServer(u64),
    /// Terminate TLS towards the client with this configuration (its own
    /// certificate) and open TLS of its own to the server.
    Terminate(Arc<rustls::ServerConfig>),
}

/// A TCP relay on a loopback port, one thread per direction.
struct Relay {
    addr: SocketAddr,
    capture: Arc<Mutex<Vec<u8>>>,
    _tcp: common::proxy::Proxy,
}

impl Relay {
    fn start(server: SocketAddr, mode: Mode) -> Relay {
        let capture = Arc::new(Mutex::new(Vec::new()));
        let cap = capture.clone();
        let tcp = common::proxy::Proxy::start(move |c, _| {
            let (cap, mode) = (cap.clone(), mode.clone());
            std::thread::spawn(move || relay_one(c, server, mode, cap));
        });
        Relay {
            addr: tcp.addr,
            capture,
            _tcp: tcp,
        }
    }

    fn captured(&self) -> Vec<u8> {
        self.capture.lock().clone()
    }
}

fn relay_one(client: TcpStream, server: SocketAddr, mode: Mode, cap: Arc<Mutex<Vec<u8>>>) {
    let Ok(up) = TcpStream::connect(server) else {
        return;
    };
    let (c, s, to_client, to_server) = match mode {
        Mode::Terminate(cfg) => {
            let deadline = Instant::now() + Duration::from_secs(10);
            let Ok(c) = Stream::accept(client, cfg, "client", deadline) else {
                return;
            };
            (c, common::raw::tls_over(up), None, None)
        }
        Mode::Record => (Stream::plain(client), Stream::plain(up), None, None),
        Mode::FlipToClient(at) => (Stream::plain(client), Stream::plain(up), Some(at), None),
        Mode::FlipToServer(at) => (Stream::plain(client), Stream::plain(up), None, Some(at)),
    };
    let _ = c.set_read_timeout(None);
    let _ = s.set_read_timeout(None);
    let (c2, s2) = (c.try_clone().unwrap(), s.try_clone().unwrap());
    let cap2 = cap.clone();
    std::thread::spawn(move || pump(s2, c2, cap2, to_client));
    pump(c, s, cap, to_server);
}

/// Copy `from` to `to` until either ends, recording the bytes and
/// flipping the byte at `flip` (an offset into this direction's stream).
fn pump(mut from: Stream, mut to: Stream, cap: Arc<Mutex<Vec<u8>>>, flip: Option<u64>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut seen = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(at) = flip {
            if at >= seen && at < seen + n as u64 {
                buf[(at - seen) as usize] ^= 0x01;
            }
        }
        seen += n as u64;
        cap.lock().extend_from_slice(&buf[..n]);
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

fn config(server: &TestServer, via: SocketAddr, cache: &std::path::Path) -> Config {
    let mut c = client_util::config(server, cache);
    c.set("servers", &via.to_string()).unwrap();
    // Errors come back as errors, not as disconnected operation.
    c.set("disconnected_operation", "false").unwrap();
    c
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

const NAME: &str = "wire-test-payroll-7f3a.txt";
const MARK: &[u8] = b"pay 1000 to account 4711; ";

fn payload(len: usize) -> Vec<u8> {
    MARK.iter().copied().cycle().take(len).collect()
}

#[test]
fn the_wire_carries_no_file_name_or_content() {
    let s = TestServer::start();
    let relay = Relay::start(s.addr(), Mode::Record);
    let d = TempDir::new("wire");
    let a = Client::new(config(&s, relay.addr, &d.path().join("a"))).unwrap();
    put(&a, &format!("/{NAME}"), &payload(100_000));
    let b = Client::new(config(&s, relay.addr, &d.path().join("b"))).unwrap();
    assert_eq!(get(&b, &format!("/{NAME}")), payload(100_000));
    assert!(client_util::names(&b, "/").contains(&NAME.to_string()));
    drop((a, b));
    let cap = relay.captured();
    assert!(cap.len() > 100_000, "the relay saw {} bytes", cap.len());
    assert!(
        !contains(&cap, NAME.as_bytes()),
        "the name crossed in clear"
    );
    assert!(!contains(&cap, MARK), "the content crossed in clear");
}

/// The capture does find them when both sides ask for plaintext: the
/// search above would have seen them.
#[test]
fn insecure_plaintext_on_both_sides_works_and_is_visible() {
    let s = TestServer::start_with(&["--insecure-plaintext"]);
    let relay = Relay::start(s.addr(), Mode::Record);
    let d = TempDir::new("plain");
    let mut cfg = config(&s, relay.addr, &d.path().join("a"));
    cfg.set("insecure_plaintext", "true").unwrap();
    let a = Client::new(cfg).unwrap();
    put(&a, &format!("/{NAME}"), &payload(10_000));
    assert_eq!(get(&a, &format!("/{NAME}")), payload(10_000));
    drop(a);
    let cap = relay.captured();
    assert!(contains(&cap, NAME.as_bytes()));
    assert!(contains(&cap, MARK));
}

#[test]
fn a_flipped_byte_towards_the_client_is_a_transport_error_never_data() {
    let s = TestServer::start();
    let d = TempDir::new("flip");
    let data = payload(1 << 20);
    let direct = client_util::client(&s, &d.path().join("direct"));
    put(&direct, "/f", &data);
    // Only the bulk connection fetching /f carries 600 KB to the client.
    let relay = Relay::start(s.addr(), Mode::FlipToClient(600_000));
    let b = Client::new(config(&s, relay.addr, &d.path().join("b"))).unwrap();
    let e = match b.open("/f", libc::O_RDONLY, 0) {
        Ok(f) => {
            let got = client_util::read_file(&f);
            panic!(
                "a tampered fetch was taken as data ({} bytes, equal: {})",
                got.len(),
                got == data
            );
        }
        Err(e) => e,
    };
    assert!(matches!(&e, Error::Eio(m) if m.contains("TLS")), "{e}");
    // The server's copy is intact.
    let c = client_util::client(&s, &d.path().join("c"));
    assert_eq!(get(&c, "/f"), data);
}

#[test]
fn a_flipped_byte_towards_the_server_changes_nothing_there() {
    let s = TestServer::start();
    let d = TempDir::new("flip2");
    let old = payload(1 << 20);
    let direct = client_util::client(&s, &d.path().join("direct"));
    put(&direct, "/f", &old);
    let relay = Relay::start(s.addr(), Mode::FlipToServer(600_000));
    let b = Client::new(config(&s, relay.addr, &d.path().join("b"))).unwrap();
    let mut f = b
        .open("/f", libc::O_WRONLY | libc::O_TRUNC, 0)
        .expect("open for writing");
    let new = vec![b'x'; 1 << 20];
    let mut off = 0;
    while off < new.len() {
        off += f.write_at(&new[off..], off as u64).unwrap();
    }
    let e = f.close().expect_err("a tampered upload must not be stored");
    assert!(matches!(&e, Error::Eio(_)), "{e}");
    let c = client_util::client(&s, &d.path().join("c"));
    assert_eq!(get(&c, "/f"), old);
}

/// A relay with its own key and certificate (made as `coda-server init`
/// makes them).
fn impostor() -> (TempDir, Arc<rustls::ServerConfig>) {
    let d = TempDir::new("impostor");
    coda::tls::generate(d.path()).unwrap();
    let cfg = coda::tls::server_config(d.path()).unwrap();
    (d, cfg)
}

#[test]
fn a_relay_with_its_own_certificate_is_refused() {
    let s = TestServer::start();
    let (imp, cfg) = impostor();
    let relay = Relay::start(s.addr(), Mode::Terminate(cfg));
    let d = TempDir::new("mitm");
    let e = Client::new(config(&s, relay.addr, &d.path().join("a")))
        .err()
        .expect("the client must refuse the relay's certificate");
    let theirs = std::fs::read_to_string(imp.path().join("server.fingerprint")).unwrap();
    assert_eq!(
        e.to_string(),
        format!(
            "authentication failed: TLS with server {}: the server's certificate {} is not \
             pinned in {} (tls_fingerprint_file)",
            relay.addr,
            theirs.trim(),
            s.fingerprint_file().display()
        )
    );
}

/// Even a client talked into trusting the relay's certificate cannot be
/// relayed: its proof is bound to its TLS session with the relay, and the
/// server checks it against the relay's session with the server.
#[test]
fn a_trusted_relay_cannot_pass_the_clients_proof_on() {
    let s = TestServer::start();
    let (imp, cfg) = impostor();
    let relay = Relay::start(s.addr(), Mode::Terminate(cfg));
    let d = TempDir::new("mitm2");
    let mut c = config(&s, relay.addr, &d.path().join("a"));
    let pin = imp.path().join("server.fingerprint");
    c.set("tls_fingerprint_file", pin.to_str().unwrap())
        .unwrap();
    let e = Client::new(c)
        .err()
        .expect("the relayed proof must not pass");
    // The server's refusal, as it refuses a wrong secret.
    assert!(matches!(e, Error::Auth(_)), "{e}");
    assert_eq!(
        e.to_string(),
        "authentication failed: authentication failed: user \"admin\": unknown user or wrong \
         secret"
    );
}

#[test]
fn a_wrong_pinned_fingerprint_is_refused() {
    let s = TestServer::start();
    let d = TempDir::new("pin");
    let pin = d.path().join("pin");
    std::fs::write(&pin, format!("sha256:{}\n", "ab".repeat(32))).unwrap();
    let mut c = client_util::config(&s, &d.path().join("a"));
    c.set("disconnected_operation", "false").unwrap();
    c.set("tls_fingerprint_file", pin.to_str().unwrap())
        .unwrap();
    let e = Client::new(c).err().expect("a wrong pin is refused");
    let real = std::fs::read_to_string(s.fingerprint_file()).unwrap();
    assert_eq!(
        e.to_string(),
        format!(
            "authentication failed: TLS with server {}: the server's certificate {} is not \
             pinned in {} (tls_fingerprint_file)",
            s.addr(),
            real.trim(),
            pin.display()
        )
    );
    assert!(matches!(e, Error::Auth(_)));
}

#[test]
fn plaintext_on_one_side_only_is_refused_naming_the_setting() {
    // The client asks for plaintext, the server requires TLS.
    let s = TestServer::start();
    let d = TempDir::new("half");
    let mut c = client_util::config(&s, &d.path().join("a"));
    c.set("disconnected_operation", "false").unwrap();
    c.set("insecure_plaintext", "true").unwrap();
    let e = Client::new(c).err().expect("refused");
    assert!(matches!(&e, Error::Protocol(_)), "{e}");
    assert!(
        e.to_string().contains(
            "speaks plaintext but this server requires TLS: the client has \
             insecure_plaintext = true; set it on both sides or on neither"
        ),
        "{e}"
    );
    // The server serves plaintext, the client requires TLS.
    let p = TestServer::start_with(&["--insecure-plaintext"]);
    let mut c = client_util::config(&p, &d.path().join("b"));
    c.set("disconnected_operation", "false").unwrap();
    let e = Client::new(c).err().expect("refused");
    assert_eq!(
        e.to_string(),
        format!(
            "protocol error: server {} speaks plaintext but this client requires TLS: \
             the server runs with --insecure-plaintext; set insecure_plaintext on both sides \
             or on neither",
            p.addr()
        )
    );
}

/// A TLS handshake that starts and never completes is cut by the same
/// deadline as a coda handshake (10 s), and holds nothing meanwhile.
#[test]
fn a_tls_handshake_that_never_completes_is_cut() {
    let s = TestServer::start();
    let mut c = TcpStream::connect(s.addr()).unwrap();
    // A TLS record header announcing a ClientHello that never comes.
    c.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut buf = [0u8; 64];
    let closed = loop {
        match c.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    assert!(closed, "the server never cut an unfinished TLS handshake");
    let mut good = common::raw::Raw::control(s.addr(), &s.secret_file(), [1; 16], 1);
    assert_eq!(good.call(&coda::proto::Msg::Ping), coda::proto::Msg::Pong);
}

/// `tls_ca`: a server certificate issued by a site CA for the address the
/// client dials is accepted; the self-signed one is not.
#[test]
fn a_site_ca_replaces_pinning() {
    let mut s = TestServer::start();
    let d = TempDir::new("ca");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name = rcgen::DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "coda test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let ca_file = d.path().join("ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
    let with_ca = |s: &TestServer, tag: &str| {
        let mut c = client_util::config(s, &d.path().join(tag));
        c.set("disconnected_operation", "false").unwrap();
        c.set("tls_ca", ca_file.to_str().unwrap()).unwrap();
        c
    };
    // The self-signed certificate is not the CA's.
    let e = Client::new(with_ca(&s, "a")).err().expect("refused");
    assert!(
        matches!(&e, Error::Auth(m) if m.contains("certificate refused") && m.contains("UnknownIssuer")),
        "{e}"
    );
    // One the CA issued for 127.0.0.1, in place of it.
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    std::fs::write(coda::tls::cert_path(&s.root()), cert.pem()).unwrap();
    std::fs::write(coda::tls::key_path(&s.root()), key.serialize_pem()).unwrap();
    s.restart();
    let c = Client::new(with_ca(&s, "b")).expect("the CA's certificate is accepted");
    put(&c, "/ca", b"issued");
    assert_eq!(get(&c, "/ca"), b"issued");
}

/// A data directory made before TLS: `serve` says what to run, and
/// `init-tls` makes the key, certificate and fingerprint file.
#[test]
fn a_data_directory_made_before_tls_is_told_how_to_get_a_certificate() {
    let d = TempDir::new("old");
    let root = d.path().join("data");
    let run = |args: &[&str]| {
        std::process::Command::new(common::SERVER_BIN)
            .args(args)
            .arg("--root")
            .arg(&root)
            .output()
            .unwrap()
    };
    assert!(run(&["init"]).status.success());
    std::fs::remove_dir_all(root.join("tls")).unwrap();
    std::fs::remove_file(root.join("server.fingerprint")).unwrap();
    let out = run(&["serve", "--listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "has no TLS key and certificate ({}, {}): run `coda-server init-tls --root {}`",
            coda::tls::key_path(&root).display(),
            coda::tls::cert_path(&root).display(),
            root.display()
        )),
        "{err}"
    );
    let out = run(&["init-tls"]);
    assert!(out.status.success());
    let said = String::from_utf8_lossy(&out.stdout);
    let fp = std::fs::read_to_string(root.join("server.fingerprint")).unwrap();
    assert!(said.contains(fp.trim()), "{said}");
    let der = rustls::pki_types::CertificateDer::from_pem_file(coda::tls::cert_path(&root));
    assert_eq!(coda::tls::fingerprint(&der.unwrap()), fp.trim());
    // A second init-tls does not replace the key clients pinned.
    assert!(!run(&["init-tls"]).status.success());
}
