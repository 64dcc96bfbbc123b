//! The TLS layer of every connection (PROTOCOL.md "TLS"): TLS 1.3 with
//! rustls over blocking sockets, the server's key and self-signed
//! certificate made by `coda-server init`, and clients that pin its
//! SHA-256 fingerprint (or trust a site CA).
//!
//! [`Stream`] is a socket that is either plain (`insecure_plaintext` on
//! both sides) or TLS. A TLS stream can be cloned into a reading and a
//! writing half used by two threads: the rustls state sits behind a mutex
//! that is held only while bytes are encrypted or decrypted in memory,
//! never across a socket read or write. Only the writing half sends
//! records (anything the reading half makes rustls queue, such as an
//! answer to a key update, leaves with the next write), so records leave
//! in the order they were sealed as long as one thread writes at a time,
//! which every user of a stream ensures (one writer thread, or a lock
//! around the writer).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// The RFC 9266 exporter label: the channel binding mixed into the
/// handshake's MACs (PROTOCOL.md "Channel binding").
pub const BINDING_LABEL: &[u8] = b"EXPORTER-Channel-Binding";

/// The channel binding of a plaintext connection: nothing to bind to.
pub const NO_BINDING: [u8; 32] = [0; 32];

/// Where `coda-server init` keeps the server's private key (mode 0600).
pub fn key_path(root: &Path) -> PathBuf {
    root.join("tls").join("key.pem")
}

/// Where `coda-server init` keeps the server's certificate (mode 0644).
pub fn cert_path(root: &Path) -> PathBuf {
    root.join("tls").join("cert.pem")
}

/// The file clients pin: the certificate's fingerprint, one line.
pub fn fingerprint_path(root: &Path) -> PathBuf {
    root.join(FINGERPRINT_FILE)
}

/// The name of the fingerprint file, in the server root and (by default)
/// beside a client's secret file.
pub const FINGERPRINT_FILE: &str = "server.fingerprint";

/// Ciphertext read from the socket per step: sixteen full records.
const NET_CHUNK: usize = 256 * 1024;
/// Bytes of sealed records rustls may hold before a write must drain them.
const SEND_BUFFER: usize = 256 * 1024;

fn provider() -> Arc<CryptoProvider> {
    // ring: builds with only a C compiler (aws-lc-rs wants more tools).
    let mut p = rustls::crypto::ring::default_provider();
    // Bulk transfers are bounded by the record cipher. With AES
    // instructions AES-128-GCM is the fastest suite (ten rounds against
    // AES-256's fourteen); without them ChaCha20-Poly1305 is. The client
    // offers them in this order and the server takes the client's choice.
    let aes = cpu_has_aes();
    p.cipher_suites.sort_by_key(|s| suite_rank(s.suite(), aes));
    Arc::new(p)
}

fn suite_rank(s: rustls::CipherSuite, aes: bool) -> u8 {
    use rustls::CipherSuite as C;
    match (s, aes) {
        (C::TLS13_AES_128_GCM_SHA256, true) | (C::TLS13_CHACHA20_POLY1305_SHA256, false) => 0,
        (C::TLS13_AES_256_GCM_SHA384, _) => 1,
        _ => 2,
    }
}

fn cpu_has_aes() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// `sha256:` and the hex SHA-256 of a certificate's DER bytes.
pub fn fingerprint(cert_der: &[u8]) -> String {
    let d = Sha256::digest(cert_der);
    let mut s = String::from("sha256:");
    for b in d {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn write_file(path: &Path, mode: u32, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| Error::io(format!("create {}", path.display()), e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(format!("write {}", path.display()), e))
}

/// Make the server's key and self-signed certificate under `root`
/// (`tls/key.pem` 0600, `tls/cert.pem` 0644) and the fingerprint file
/// clients pin (`server.fingerprint`, 0600 like the rest of the root's
/// files). Returns the fingerprint. Refuses if a key exists.
pub fn generate(root: &Path) -> Result<String> {
    let dir = root.join("tls");
    if key_path(root).exists() || cert_path(root).exists() {
        return Err(Error::Exists(format!(
            "{} already holds a TLS key or certificate",
            dir.display()
        )));
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    let ck = rcgen::generate_simple_self_signed(vec!["coda-server".to_string()])
        .map_err(|e| Error::Invalid(format!("generating a TLS certificate: {e}")))?;
    let fp = fingerprint(ck.cert.der());
    write_file(
        &key_path(root),
        0o600,
        ck.signing_key.serialize_pem().as_bytes(),
    )?;
    write_file(&cert_path(root), 0o644, ck.cert.pem().as_bytes())?;
    write_file(&fingerprint_path(root), 0o600, format!("{fp}\n").as_bytes())?;
    Ok(fp)
}

/// The server's TLS configuration from `root/tls`; an error that says how
/// to make the files when they are missing.
pub fn server_config(root: &Path) -> Result<Arc<rustls::ServerConfig>> {
    let (kp, cp) = (key_path(root), cert_path(root));
    if !kp.exists() || !cp.exists() {
        return Err(Error::Invalid(format!(
            "{} has no TLS key and certificate ({}, {}): run `coda-server init-tls --root {}` \
             to make them, or serve with --insecure-plaintext (clients then need \
             insecure_plaintext = true)",
            root.display(),
            kp.display(),
            cp.display(),
            root.display()
        )));
    }
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cp)
        .and_then(|i| i.collect())
        .map_err(|e| Error::Invalid(format!("{}: {e}", cp.display())))?;
    if certs.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no certificate in it",
            cp.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&kp)
        .map_err(|e| Error::Invalid(format!("{}: {e}", kp.display())))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Invalid(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| Error::Invalid(format!("{}: {e}", cp.display())))?;
    // No resumption: every connection makes a full handshake, and no
    // ticket is sent after it (which only the writing half could send).
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(cfg))
}

/// How a client decides that a server's certificate is the right one.
#[derive(Debug, Clone)]
pub enum Trust {
    /// The certificate's fingerprint must be one of these (read from `file`).
    Pinned {
        /// `sha256:<hex>` values.
        fingerprints: Vec<String>,
        /// Where they came from, for error messages.
        file: PathBuf,
    },
    /// The certificate must chain to a CA in this PEM file and name the host.
    Ca(PathBuf),
}

/// Read a fingerprint file: one `sha256:<64 hex>` per line (blank lines
/// and `#` comments ignored), at least one.
pub fn read_fingerprints(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::Invalid(format!(
            "reading the server fingerprint file {} (tls_fingerprint_file): {e}; copy the \
             server's server.fingerprint there",
            path.display()
        ))
    })?;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let hex = line.strip_prefix("sha256:").unwrap_or("");
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::Invalid(format!(
                "{}: {line:?} is not a fingerprint (sha256: and 64 hex digits)",
                path.display()
            )));
        }
        out.push(format!("sha256:{}", hex.to_ascii_lowercase()));
    }
    if out.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no fingerprint in it",
            path.display()
        )));
    }
    Ok(out)
}

/// The client's TLS configuration for a trust setting.
pub fn client_config(trust: &Trust) -> Result<Arc<rustls::ClientConfig>> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Invalid(format!("TLS: {e}")))?;
    let mut cfg = match trust {
        Trust::Pinned { fingerprints, file } => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned {
                fingerprints: fingerprints.clone(),
                file: file.clone(),
                provider: provider(),
            }))
            .with_no_client_auth(),
        Trust::Ca(path) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(|i| i.collect())
                .map_err(|e| Error::Invalid(format!("tls_ca {}: {e}", path.display())))?;
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| Error::Invalid(format!("tls_ca {}: {e}", path.display())))?;
            }
            if roots.is_empty() {
                return Err(Error::Invalid(format!(
                    "tls_ca {}: no certificate in it",
                    path.display()
                )));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// Accepts exactly the pinned certificates; the handshake's signature is
/// still checked against the certificate's key, so only the holder of the
/// pinned certificate's private key passes.
#[derive(Debug)]
struct Pinned {
    fingerprints: Vec<String>,
    file: PathBuf,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let fp = fingerprint(end_entity);
        if self.fingerprints.contains(&fp) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the server's certificate {fp} is not pinned in {} (tls_fingerprint_file)",
                self.file.display()
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Why a TLS handshake failed, as the crate's error. Certificate and
/// protocol failures are `Auth`/`Protocol` with rustls's reason; a peer
/// that speaks plaintext is named as such, with the setting to change.
fn tls_error(e: rustls::Error, peer: &str) -> Error {
    match e {
        rustls::Error::General(m) => Error::Auth(format!("TLS with {peer}: {m}")),
        e @ rustls::Error::InvalidCertificate(_) => {
            Error::Auth(format!("TLS with {peer}: certificate refused: {e}"))
        }
        e => Error::Protocol(format!("TLS with {peer}: {e}")),
    }
}

/// The error for a peer whose first bytes are not TLS.
fn plaintext_peer(peer: &str, we_are_server: bool) -> Error {
    if we_are_server {
        Error::Protocol(format!(
            "client {peer} speaks plaintext but this server requires TLS: the client has \
             insecure_plaintext = true; set it on both sides or on neither"
        ))
    } else {
        Error::Protocol(format!(
            "{peer} speaks plaintext but this client requires TLS: the server runs \
             with --insecure-plaintext; set insecure_plaintext on both sides or on neither"
        ))
    }
}

/// The error a plaintext server sends a client whose first bytes are a TLS
/// handshake (so the client, reading them as TLS, learns nothing): only
/// the server's log has it.
pub fn tls_client_on_plaintext_server(peer: &str) -> Error {
    Error::Protocol(format!(
        "client {peer} speaks TLS but this server runs with --insecure-plaintext; set \
         insecure_plaintext on both sides or on neither"
    ))
}

/// The first byte of a TLS record carrying a handshake message.
pub const TLS_HANDSHAKE_BYTE: u8 = 0x16;

struct State {
    conn: rustls::Connection,
    /// Ciphertext read from the socket; rustls has taken `pending[at..]`'s
    /// prefix `at`. An offset, not a drain per record: moving the rest of
    /// a 256 KiB read down after every 16 KiB record cost more than the
    /// decryption (it is compacted once per socket read instead).
    pending: Vec<u8>,
    at: usize,
}

impl State {
    /// Hand rustls as much of the buffered ciphertext as it takes and
    /// decrypt what is complete; the rest waits (rustls holds only 16 KiB
    /// of plaintext until the reader takes some).
    fn feed(&mut self) -> io::Result<()> {
        if !self.has_pending() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        let taken = self.take(&pending[self.at..]);
        self.pending = pending;
        self.at += taken?;
        if self.at == self.pending.len() {
            self.pending.clear();
            self.at = 0;
        }
        Ok(())
    }

    fn has_pending(&self) -> bool {
        self.at < self.pending.len()
    }

    /// Copy decrypted bytes into `buf`, feeding buffered ciphertext as the
    /// plaintext drains (rustls holds only 16 KiB of it), so one call
    /// returns as much as is already here, not one record. `None`: nothing
    /// yet (read the socket); `Some(0)`: the end of the stream.
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let mut got = 0;
        // Bounded: each turn copies bytes or ends.
        while got < buf.len() {
            match self.conn.reader().read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => {
                    got += n;
                    if !self.has_pending() {
                        break;
                    }
                    self.feed()?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok((got > 0).then_some(got));
                }
                // The peer closed TCP without close_notify. Frames delimit
                // themselves, so this is just the end of the stream (as a
                // reset would be), never accepted data.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                // What came before is delivered; the error returns next read.
                Err(_) if got > 0 => break,
                Err(e) => return Err(e),
            }
        }
        Ok(Some(got))
    }

    /// Give rustls as much of `bytes` as it takes; returns how much.
    fn take(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let mut rest = bytes;
        // Bounded: each turn consumes bytes or stops.
        while !rest.is_empty() {
            let before = rest.len();
            match self.conn.read_tls(&mut rest) {
                Ok(_) => {}
                // Decrypted data waits for the reader: feed the rest later.
                Err(e) if e.kind() == io::ErrorKind::Other => break,
                Err(e) => return Err(e),
            }
            self.conn
                .process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, TlsFailure(e)))?;
            if before == rest.len() {
                break;
            }
        }
        Ok(bytes.len() - rest.len())
    }
}

/// A rustls error carried inside an `io::Error` (kind `InvalidData`): a
/// record failed its integrity check, or the peer broke the protocol.
#[derive(Debug)]
pub struct TlsFailure(pub rustls::Error);

impl std::fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TLS: {}", self.0)
    }
}

impl std::error::Error for TlsFailure {}

/// A connection's socket: plain, or TLS (see the module comment for how
/// its halves share the TLS state).
pub struct Stream {
    sock: TcpStream,
    tls: Option<Arc<Mutex<State>>>,
    /// Sealed records on their way out (this half's own buffer).
    out: Vec<u8>,
}

impl Stream {
    /// A plaintext stream (`insecure_plaintext`).
    pub fn plain(sock: TcpStream) -> Stream {
        Stream {
            sock,
            tls: None,
            out: Vec::new(),
        }
    }

    /// Whether the stream is encrypted.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Run the client side of a TLS handshake on `sock` (its timeouts
    /// bound each step). `server` names the peer in errors; `name` is the
    /// name its certificate must carry (checked with `tls_ca` only).
    pub fn connect(
        sock: TcpStream,
        cfg: Arc<rustls::ClientConfig>,
        name: &str,
        server: &str,
    ) -> Result<Stream> {
        let sn = ServerName::try_from(name.to_string())
            .or_else(|_| ServerName::try_from("coda-server".to_string()))
            .map_err(|e| Error::Invalid(format!("server name {name:?}: {e}")))?;
        let conn = rustls::ClientConnection::new(cfg, sn)
            .map_err(|e| Error::Protocol(format!("TLS with {server}: {e}")))?;
        Stream::handshake(sock, conn.into(), server, None)
    }

    /// Run the server side of a TLS handshake, all of it by `deadline`.
    pub fn accept(
        sock: TcpStream,
        cfg: Arc<rustls::ServerConfig>,
        peer: &str,
        deadline: Instant,
    ) -> Result<Stream> {
        let conn = rustls::ServerConnection::new(cfg)
            .map_err(|e| Error::Protocol(format!("TLS with {peer}: {e}")))?;
        Stream::handshake(sock, conn.into(), peer, Some(deadline))
    }

    fn handshake(
        mut sock: TcpStream,
        mut conn: rustls::Connection,
        peer: &str,
        deadline: Option<Instant>,
    ) -> Result<Stream> {
        let server_side = matches!(conn, rustls::Connection::Server(_));
        let io_err =
            |what: &str, e: io::Error| Error::io(format!("TLS handshake with {peer}: {what}"), e);
        let mut buf = vec![0u8; NET_CHUNK];
        let mut first = true;
        let mut out = Vec::new();
        // Bounded: every turn reads or writes bytes the handshake needs,
        // and the reads are bounded by the socket timeout or the deadline.
        while conn.is_handshaking() {
            while conn.wants_write() {
                conn.write_tls(&mut out).map_err(|e| io_err("sealing", e))?;
            }
            if !out.is_empty() {
                sock.write_all(&out).map_err(|e| io_err("sending", e))?;
                out.clear();
            }
            if !conn.is_handshaking() {
                break;
            }
            if let Some(at) = deadline {
                let left = at.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io_err(
                        "receiving",
                        io::Error::new(io::ErrorKind::TimedOut, "handshake deadline passed"),
                    ));
                }
                sock.set_read_timeout(Some(left))
                    .map_err(|e| io_err("timeout", e))?;
            }
            let n = loop {
                match sock.read(&mut buf) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e)
                        if deadline.is_some()
                            && matches!(
                                e.kind(),
                                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                            ) =>
                    {
                        return Err(io_err(
                            "receiving",
                            io::Error::new(io::ErrorKind::TimedOut, "handshake deadline passed"),
                        ))
                    }
                    Err(e) => return Err(io_err("receiving", e)),
                }
            };
            if n == 0 {
                return Err(Error::Eio(format!(
                    "{peer} closed the connection during the TLS handshake"
                )));
            }
            if first {
                first = false;
                // A TLS peer's first record is a handshake (or an alert);
                // a coda frame begins with its length's high byte, 0.
                if buf[0] == 0 {
                    if server_side {
                        let e = plaintext_peer(peer, true);
                        let m = crate::proto::Msg::error(&e);
                        let _ = sock.write_all(&crate::proto::frame::encode_frame(
                            m.kind(),
                            0,
                            &m.encode(),
                        ));
                        return Err(e);
                    }
                    return Err(plaintext_peer(peer, false));
                }
            }
            let mut rest = &buf[..n];
            while !rest.is_empty() {
                conn.read_tls(&mut rest)
                    .map_err(|e| io_err("receiving", e))?;
                if let Err(e) = conn.process_new_packets() {
                    // Tell the peer why (the alert rustls queued), then fail.
                    let mut alert = Vec::new();
                    let _ = conn.write_tls(&mut alert);
                    let _ = sock.write_all(&alert);
                    return Err(tls_error(e, peer));
                }
                if !conn.is_handshaking() {
                    break;
                }
            }
            let leftover = rest.to_vec();
            if !conn.is_handshaking() {
                while conn.wants_write() {
                    conn.write_tls(&mut out).map_err(|e| io_err("sealing", e))?;
                }
                if !out.is_empty() {
                    sock.write_all(&out).map_err(|e| io_err("sending", e))?;
                    out.clear();
                }
                conn.set_buffer_limit(Some(SEND_BUFFER));
                let mut st = State {
                    conn,
                    pending: leftover,
                    at: 0,
                };
                st.feed().map_err(|e| io_err("receiving", e))?;
                return Ok(Stream {
                    sock,
                    tls: Some(Arc::new(Mutex::new(st))),
                    out: Vec::new(),
                });
            }
        }
        conn.set_buffer_limit(Some(SEND_BUFFER));
        Ok(Stream {
            sock,
            tls: Some(Arc::new(Mutex::new(State {
                conn,
                pending: Vec::new(),
                at: 0,
            }))),
            out: Vec::new(),
        })
    }

    /// The TLS exporter's channel binding (RFC 9266), or [`NO_BINDING`]
    /// for a plaintext stream. Both ends of one TLS session get the same
    /// value; a relay that terminates TLS towards each side gets two
    /// different ones.
    pub fn channel_binding(&self) -> Result<[u8; 32]> {
        match &self.tls {
            None => Ok(NO_BINDING),
            Some(t) => t
                .lock()
                .conn
                .export_keying_material([0u8; 32], BINDING_LABEL, None)
                .map_err(|e| Error::Protocol(format!("TLS exporter: {e}"))),
        }
    }

    /// Another handle on the same connection (a reading or writing half).
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(Stream {
            sock: self.sock.try_clone()?,
            tls: self.tls.clone(),
            out: Vec::new(),
        })
    }

    /// The socket underneath, for shutting it down from elsewhere.
    pub fn tcp(&self) -> &TcpStream {
        &self.sock
    }

    /// Shut the socket down (no TLS close_notify: this never blocks).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.sock.shutdown(how)
    }

    /// End our sending side in order: TLS close_notify, then FIN.
    pub fn close_write(&mut self) {
        if let Some(t) = &self.tls {
            let mut out = std::mem::take(&mut self.out);
            out.clear();
            {
                let mut st = t.lock();
                st.conn.send_close_notify();
                while st.conn.wants_write() {
                    if st.conn.write_tls(&mut out).is_err() {
                        break;
                    }
                }
            }
            let _ = self.sock.write_all(&out);
        }
        let _ = self.sock.shutdown(Shutdown::Write);
    }

    /// See `TcpStream::set_read_timeout`.
    pub fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        self.sock.set_read_timeout(d)
    }

    /// See `TcpStream::set_write_timeout`.
    pub fn set_write_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        self.sock.set_write_timeout(d)
    }

    /// See `TcpStream::set_nodelay`.
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.sock.set_nodelay(on)
    }

    /// See `TcpStream::peer_addr`.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.sock.peer_addr()
    }

    /// See `TcpStream::local_addr`.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    /// For writers that do their own socket writes (the server's control
    /// writer): append to `out` the sealed records of `plain` and return
    /// true, or return false on a plaintext stream (send `plain` itself).
    pub fn seal(&self, plain: &[u8], out: &mut Vec<u8>) -> io::Result<bool> {
        let Some(t) = &self.tls else {
            return Ok(false);
        };
        let mut st = t.lock();
        let mut rest = plain;
        // Bounded: each turn seals some bytes (the drain makes room).
        while !rest.is_empty() {
            let n = st.conn.writer().write(rest)?;
            rest = &rest[n..];
            while st.conn.wants_write() {
                st.conn.write_tls(out)?;
            }
        }
        Ok(true)
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(t) = &self.tls else {
            return self.sock.read(buf);
        };
        // Bounded: each turn either returns or reads more of the stream
        // (a socket read that ends is EOF, which returns).
        loop {
            // The ciphertext buffer leaves the state while the socket is
            // read (no lock held across it); only the reading half reads.
            let mut net = {
                let mut st = t.lock();
                st.feed()?;
                if let Some(n) = st.fill(buf)? {
                    return Ok(n);
                }
                let mut net = std::mem::take(&mut st.pending);
                // What is left is less than a record: a short move.
                net.drain(..std::mem::replace(&mut st.at, 0));
                net
            };
            let n = read_into_spare(&self.sock, &mut net, NET_CHUNK);
            let mut st = t.lock();
            st.pending = net;
            match n {
                Err(e) => return Err(e),
                Ok(0) => {
                    // Tell rustls the stream ended; what it decrypted is read first.
                    let _ = st.conn.read_tls(&mut &[][..]);
                    return Ok(st.fill(buf).ok().flatten().unwrap_or(0));
                }
                Ok(_) => {}
            }
        }
    }
}

/// Append up to `max` bytes read from `sock` to `buf` (into its spare
/// capacity: no zeroing of a buffer the read overwrites anyway).
fn read_into_spare(sock: &TcpStream, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
    buf.reserve(max);
    let len = buf.len();
    let spare = &mut buf.spare_capacity_mut()[..max];
    // Bounded: retried only when a signal interrupted it.
    loop {
        // SAFETY: the socket is open for the borrow; `spare` is writable
        // memory of `spare.len()` bytes that the kernel fills.
        let n = unsafe { libc::read(sock.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len()) };
        if n >= 0 {
            // SAFETY: the kernel initialised the first n bytes of spare.
            unsafe { buf.set_len(len + n as usize) };
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(t) = &self.tls else {
            return self.sock.write(buf);
        };
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        let n = {
            let mut st = t.lock();
            let n = st.conn.writer().write(buf)?;
            while st.conn.wants_write() {
                st.conn.write_tls(&mut out)?;
            }
            n
        };
        let r = self.sock.write_all(&out);
        self.out = out;
        r.map(|_| n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match &self.tls {
            None => self.sock.flush(),
            Some(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fastest_suite_for_this_cpu_is_offered_first() {
        let p = provider();
        let first = p.cipher_suites[0].suite();
        let want = if cpu_has_aes() {
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        } else {
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
        };
        assert_eq!(first, want);
        // Reordered, none dropped.
        assert_eq!(
            p.cipher_suites.len(),
            rustls::crypto::ring::default_provider().cipher_suites.len()
        );
    }
}
