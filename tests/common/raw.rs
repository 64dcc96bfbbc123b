//! A raw protocol client for tests: speaks the wire format frame by frame
//! with no policy, so tests can send exactly what they mean (including
//! garbage) and see exactly what the server answers.
// The error of a raw call is the server's reply itself (a whole `Msg`,
// large since attrs carry owners and times): tests match on it.
#![allow(clippy::result_large_err)]

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use coda::tls::Stream;

use coda::error::WireCode;
use coda::proto::auth::{
    client_mac, mac_eq, random_bytes, read_secret_file, server_mac, Transcript,
};
use coda::proto::frame::encode_frame;
use coda::proto::{read_frame, Attr, ConnKind, Fid, Msg, Record, RecordOp, Replaces, Timespec};

pub struct Raw {
    /// TLS, as every test server speaks it; a clone writes from another
    /// thread while `recv` reads.
    pub stream: Stream,
    reader: BufReader<Stream>,
    next_id: u64,
    pub root: Fid,
    pub client_id: [u8; 16],
    pub epoch: u64,
    /// Answer CallbackBreak with BreakAck while waiting in `call`.
    pub auto_ack: bool,
    /// Every CallbackBreak seen: (break id, fids).
    pub breaks: Vec<(u64, Vec<Fid>)>,
}

/// The Hello a client sends, for tests that drive the handshake by hand.
pub fn hello(kind: ConnKind, user: &str, client_id: [u8; 16], epoch: u64, nonce: [u8; 32]) -> Msg {
    Msg::Hello {
        version: coda::proto::PROTOCOL_VERSION,
        kind,
        user: user.into(),
        client_id,
        epoch,
        client_nonce: nonce,
    }
}

impl Raw {
    /// Connect and handshake; `Err(msg)` is the server's refusal (an Error
    /// message) or a closed connection.
    pub fn connect(
        addr: SocketAddr,
        user: &str,
        secret: &[u8; 32],
        kind: ConnKind,
        client_id: [u8; 16],
        epoch: u64,
    ) -> Result<Raw, Msg> {
        Raw::connect_over(tls_stream(addr), user, secret, kind, client_id, epoch)
    }

    /// [`Raw::connect`] without TLS (a server run `--insecure-plaintext`).
    pub fn connect_plain(
        addr: SocketAddr,
        user: &str,
        secret: &[u8; 32],
        kind: ConnKind,
        client_id: [u8; 16],
        epoch: u64,
    ) -> Result<Raw, Msg> {
        let tcp = TcpStream::connect(addr).map_err(|_| closed())?;
        Raw::connect_over(Stream::plain(tcp), user, secret, kind, client_id, epoch)
    }

    fn connect_over(
        stream: Stream,
        user: &str,
        secret: &[u8; 32],
        kind: ConnKind,
        client_id: [u8; 16],
        epoch: u64,
    ) -> Result<Raw, Msg> {
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let binding = stream.channel_binding().expect("channel binding");
        let mut raw = Raw {
            reader: BufReader::new(stream.try_clone().unwrap()),
            stream,
            next_id: 1,
            root: Fid::default(),
            client_id,
            epoch,
            auto_ack: true,
            breaks: Vec::new(),
        };
        let client_nonce: [u8; 32] = random_bytes();
        raw.send_id(0, &hello(kind, user, client_id, epoch, client_nonce));
        let server_nonce = match raw.recv() {
            Some((_, Msg::Challenge { server_nonce })) => server_nonce,
            Some((_, m)) => return Err(m),
            None => return Err(closed()),
        };
        let t = Transcript {
            user,
            client_id: &client_id,
            epoch,
            kind,
            client_nonce: &client_nonce,
            server_nonce: &server_nonce,
            binding: &binding,
        };
        raw.send_id(
            0,
            &Msg::Auth {
                mac: client_mac(secret, &t),
            },
        );
        match raw.recv() {
            Some((
                _,
                Msg::Welcome {
                    root,
                    server_mac: m,
                    ..
                },
            )) => {
                assert!(
                    mac_eq(&m, &server_mac(secret, &t)),
                    "server MAC must verify"
                );
                raw.root = root;
                Ok(raw)
            }
            Some((_, m)) => Err(m),
            None => Err(closed()),
        }
    }

    /// A control connection as `admin` with the test server's secret.
    pub fn control(addr: SocketAddr, secret_file: &Path, client_id: [u8; 16], epoch: u64) -> Raw {
        let secret = read_secret_file(secret_file).expect("read secret");
        Raw::connect(addr, "admin", &secret, ConnKind::Control, client_id, epoch)
            .expect("control handshake")
    }

    pub fn bulk(addr: SocketAddr, secret_file: &Path, client_id: [u8; 16], epoch: u64) -> Raw {
        let secret = read_secret_file(secret_file).expect("read secret");
        Raw::connect(addr, "admin", &secret, ConnKind::Bulk, client_id, epoch)
            .expect("bulk handshake")
    }

    pub fn send_id(&mut self, id: u64, msg: &Msg) {
        self.stream
            .write_all(&encode_frame(msg.kind(), id, &msg.encode()))
            .expect("send frame");
    }

    pub fn send(&mut self, msg: &Msg) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.send_id(id, msg);
        id
    }

    /// Like `send`, but a dead connection is an error, not a panic (for
    /// tests that kill the server under a client).
    pub fn try_send(&mut self, msg: &Msg) -> std::io::Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        self.stream
            .write_all(&encode_frame(msg.kind(), id, &msg.encode()))?;
        Ok(id)
    }

    pub fn send_bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Next frame as (id, message); `None` when the server closed.
    pub fn recv(&mut self) -> Option<(u64, Msg)> {
        match read_frame(&mut self.reader) {
            Ok(Some(f)) => Some((f.id, Msg::decode(&f).expect("server sent a valid message"))),
            _ => None,
        }
    }

    /// Read raw bytes following a FetchReply.
    pub fn recv_raw(&mut self, len: u64) -> Vec<u8> {
        let mut buf = vec![0u8; len as usize];
        self.reader.read_exact(&mut buf).expect("raw bytes");
        buf
    }

    /// Whether the server closes the connection (EOF or reset) within `d`,
    /// skipping whatever it sends first; a read that times out is `false`.
    pub fn closed_within(&mut self, d: Duration) -> bool {
        self.stream.set_read_timeout(Some(d)).unwrap();
        let deadline = std::time::Instant::now() + d;
        loop {
            match read_frame(&mut self.reader) {
                Ok(Some(f)) if std::time::Instant::now() < deadline => {
                    // Keep the breaks that arrive meanwhile, as `call` does.
                    if let Ok(Msg::CallbackBreak { fids }) = Msg::decode(&f) {
                        self.breaks.push((f.id, fids));
                    }
                }
                Ok(Some(_)) => return false,
                Ok(None) => return true,
                Err(coda::Error::Io { source, .. }) => {
                    return !matches!(
                        source.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    )
                }
                Err(_) => return true,
            }
        }
    }

    /// True once the server has closed the connection (EOF or reset)
    /// within 10 s; a connection still open then is `false`, not a hang.
    pub fn is_closed(&mut self) -> bool {
        self.closed_within(Duration::from_secs(10))
    }

    /// Send a request and wait for its reply, noting (and acking, if
    /// `auto_ack`) callback breaks that arrive meanwhile.
    pub fn call(&mut self, msg: &Msg) -> Msg {
        let id = self.send(msg);
        loop {
            match self.recv() {
                Some((bid, Msg::CallbackBreak { fids })) => {
                    self.breaks.push((bid, fids));
                    if self.auto_ack {
                        self.send_id(bid, &Msg::BreakAck);
                    }
                }
                Some((rid, m)) if rid == id => return m,
                Some((rid, m)) => panic!("unexpected frame id {rid}: {m:?}"),
                None => panic!("server closed the connection while we waited for reply {id}"),
            }
        }
    }

    /// Reserve `n` vnodes in volume 1; returns the fids.
    pub fn alloc(&mut self, n: u32) -> Vec<Fid> {
        match self.call(&Msg::AllocFids {
            volume: 1,
            count: n,
        }) {
            Msg::FidRange {
                volume,
                first_vnode,
                count,
            } => (0..count as u64)
                .map(|i| Fid::new(volume, first_vnode + i, 1))
                .collect(),
            m => panic!("AllocFids failed: {m:?}"),
        }
    }

    pub fn reintegrate(&mut self, records: Vec<Record>) -> Msg {
        self.call(&Msg::Reintegrate { records })
    }

    /// Send a batch and wait for its answer, acknowledging the callback
    /// breaks that other writers' commits send meanwhile. `None`: the
    /// connection died (for tests and benches that kill the server or run
    /// until it stops). Bounded by the server: each frame is a break or
    /// the reply.
    pub fn try_reintegrate(&mut self, records: Vec<Record>) -> Option<Msg> {
        let id = self.try_send(&Msg::Reintegrate { records }).ok()?;
        loop {
            match self.recv()? {
                (bid, Msg::CallbackBreak { .. }) => {
                    let ack = Msg::BreakAck;
                    self.stream
                        .write_all(&encode_frame(ack.kind(), bid, &ack.encode()))
                        .ok()?;
                }
                (rid, m) if rid == id => return Some(m),
                (rid, m) => panic!("unexpected frame {rid}: {m:?}"),
            }
        }
    }

    /// Apply a batch that must succeed; returns its result attrs.
    pub fn apply(&mut self, records: Vec<Record>) -> Vec<Attr> {
        match self.reintegrate(records) {
            Msg::Reintegrated { results } => results,
            m => panic!("batch refused: {m:?}"),
        }
    }

    pub fn attr(&mut self, fid: Fid) -> Result<Attr, WireCode> {
        match self.call(&Msg::GetAttrs { fids: vec![fid] }) {
            Msg::Attrs { mut items } => items.remove(0),
            m => panic!("GetAttrs: {m:?}"),
        }
    }

    /// Every entry of a directory as (name, fid).
    pub fn list(&mut self, dir: Fid) -> Vec<(String, Fid)> {
        let mut out = Vec::new();
        let mut cursor = 0;
        loop {
            match self.call(&Msg::ReadDir { fid: dir, cursor }) {
                Msg::DirPage { entries, next, .. } => {
                    out.extend(entries.into_iter().map(|e| (e.name, e.fid)));
                    match next {
                        Some(c) => cursor = c,
                        None => return out,
                    }
                }
                m => panic!("ReadDir: {m:?}"),
            }
        }
    }

    /// On a bulk connection: upload bytes (one dense extent), expect Uploaded.
    pub fn upload(&mut self, upload_id: u64, data: &[u8]) -> Msg {
        let id = self.send(&dense_upload(upload_id, data.len() as u64));
        self.stream.write_all(data).expect("upload bytes");
        match self.recv() {
            Some((rid, m)) if rid == id => m,
            other => panic!("upload reply: {other:?}"),
        }
    }

    /// On a bulk connection: upload a file of `length` bytes holding only
    /// the given extents (the rest holes), expect Uploaded.
    pub fn upload_sparse(&mut self, upload_id: u64, length: u64, extents: &[(u64, &[u8])]) -> Msg {
        let id = self.send(&Msg::Upload {
            upload_id,
            length,
            extents: extents.iter().map(|(o, d)| (*o, d.len() as u64)).collect(),
        });
        for (_, d) in extents {
            self.stream.write_all(d).expect("upload bytes");
        }
        match self.recv() {
            Some((rid, m)) if rid == id => m,
            other => panic!("upload reply: {other:?}"),
        }
    }

    /// On a bulk connection: fetch an object; Ok((attr, data)) or the error.
    /// The data is the whole file, holes filled with zeros.
    pub fn fetch(&mut self, fid: Fid) -> Result<(Attr, Vec<u8>), Msg> {
        let (attr, length, extents) = self.fetch_extents(fid)?;
        let mut data = vec![0u8; length as usize];
        for (off, bytes) in extents {
            data[off as usize..off as usize + bytes.len()].copy_from_slice(&bytes);
        }
        Ok((attr, data))
    }

    /// On a bulk connection: fetch an object as the server sends it: its
    /// attr, length and data extents with their bytes.
    #[allow(clippy::type_complexity)]
    pub fn fetch_extents(&mut self, fid: Fid) -> Result<(Attr, u64, Vec<(u64, Vec<u8>)>), Msg> {
        let id = self.send(&Msg::Fetch { fid });
        match self.recv() {
            Some((
                rid,
                Msg::FetchReply {
                    attr,
                    length,
                    extents,
                },
            )) if rid == id => {
                let parts = extents
                    .iter()
                    .map(|(o, l)| (*o, self.recv_raw(*l)))
                    .collect();
                Ok((attr, length, parts))
            }
            Some((_, m)) => Err(m),
            None => Err(closed()),
        }
    }
}

/// An Upload of `length` bytes sent as one dense extent (none when empty).
pub fn dense_upload(upload_id: u64, length: u64) -> Msg {
    Msg::Upload {
        upload_id,
        length,
        extents: if length == 0 {
            vec![]
        } else {
            vec![(0, length)]
        },
    }
}

/// A TLS connection to a test server, before any coda message. The test
/// client trusts whatever certificate the server presents: the tests that
/// need the client's pinning use the real client (tests/wire_tls.rs).
pub fn tls_stream(addr: SocketAddr) -> Stream {
    let tcp = TcpStream::connect(addr).expect("connect to server");
    tls_over(tcp)
}

/// TLS over an already connected socket (see [`tls_stream`]).
pub fn tls_over(tcp: TcpStream) -> Stream {
    try_tls_over(tcp).expect("TLS handshake")
}

/// [`tls_over`], with `None` when the handshake fails (a server cutting
/// hostile connections).
pub fn try_tls_over(tcp: TcpStream) -> Option<Stream> {
    tcp.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    Stream::connect(tcp, any_cert(), "coda-server", "test server").ok()
}

fn any_cert() -> Arc<rustls::ClientConfig> {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};
    #[derive(Debug)]
    struct Any(Arc<rustls::crypto::CryptoProvider>);
    impl ServerCertVerifier for Any {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::General("no TLS 1.2".into()))
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let p = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Any(p)))
        .with_no_client_auth();
    Arc::new(cfg)
}

fn closed() -> Msg {
    Msg::Error {
        code: WireCode::Io,
        index: u32::MAX,
        message: "connection closed".into(),
    }
}

/// Record builders, so tests read like the operations they perform.
pub mod rec {
    use super::*;

    pub fn t() -> Timespec {
        Timespec {
            sec: 1_700_000_000,
            nsec: 0,
        }
    }
    pub fn create(id: u64, parent: Fid, name: &str, fid: Fid) -> Record {
        Record {
            store_id: id,
            op: RecordOp::Create {
                parent,
                name: name.into(),
                fid,
                mode: 0o644,
                mtime: t(),
                uid: 0,
                gid: 0,
            },
        }
    }
    pub fn mkdir(id: u64, parent: Fid, name: &str, fid: Fid) -> Record {
        Record {
            store_id: id,
            op: RecordOp::Mkdir {
                parent,
                name: name.into(),
                fid,
                mode: 0o755,
                mtime: t(),
                uid: 0,
                gid: 0,
            },
        }
    }
    pub fn symlink(id: u64, parent: Fid, name: &str, fid: Fid, target: &str) -> Record {
        Record {
            store_id: id,
            op: RecordOp::Symlink {
                parent,
                name: name.into(),
                fid,
                target: target.into(),
                mtime: t(),
                uid: 0,
                gid: 0,
            },
        }
    }
    pub fn link(id: u64, parent: Fid, name: &str, fid: Fid) -> Record {
        Record {
            store_id: id,
            op: RecordOp::Link {
                parent,
                name: name.into(),
                fid,
            },
        }
    }
    pub fn remove(id: u64, parent: Fid, name: &str, fid: Fid) -> Record {
        Record {
            store_id: id,
            op: RecordOp::Remove {
                parent,
                name: name.into(),
                fid,
            },
        }
    }
    pub fn rmdir(id: u64, parent: Fid, name: &str, fid: Fid) -> Record {
        Record {
            store_id: id,
            op: RecordOp::Rmdir {
                parent,
                name: name.into(),
                fid,
            },
        }
    }
    pub fn rename(id: u64, sp: Fid, sn: &str, dp: Fid, dn: &str, fid: Fid) -> Record {
        rename_expecting(id, sp, sn, dp, dn, fid, Replaces::Any)
    }
    pub fn rename_expecting(
        id: u64,
        sp: Fid,
        sn: &str,
        dp: Fid,
        dn: &str,
        fid: Fid,
        replaces: Replaces,
    ) -> Record {
        Record {
            store_id: id,
            op: RecordOp::Rename {
                src_parent: sp,
                src_name: sn.into(),
                dst_parent: dp,
                dst_name: dn.into(),
                fid,
                replaces,
            },
        }
    }
    pub fn store(id: u64, fid: Fid, expected_version: u64, upload_id: u64, length: u64) -> Record {
        Record {
            store_id: id,
            op: RecordOp::Store {
                fid,
                expected_version,
                upload_id,
                length,
                mtime: t(),
            },
        }
    }
    pub fn truncate(id: u64, fid: Fid, size: u64) -> Record {
        Record {
            store_id: id,
            op: RecordOp::SetAttr {
                fid,
                expected_version: 0,
                mode: None,
                size: Some(size),
                mtime: None,
                uid: None,
                gid: None,
                atime: None,
            },
        }
    }
    /// Any status change, as the mount's setattr sends it.
    #[allow(clippy::too_many_arguments)]
    pub fn setattr(
        id: u64,
        fid: Fid,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        atime: Option<Timespec>,
        mtime: Option<Timespec>,
    ) -> Record {
        Record {
            store_id: id,
            op: RecordOp::SetAttr {
                fid,
                expected_version: 0,
                mode,
                size: None,
                mtime,
                uid,
                gid,
                atime,
            },
        }
    }
    #[allow(clippy::too_many_arguments)]
    pub fn mknod(
        id: u64,
        parent: Fid,
        name: &str,
        fid: Fid,
        ftype: coda::proto::FileType,
        rdev: u64,
        uid: u32,
        gid: u32,
    ) -> Record {
        Record {
            store_id: id,
            op: RecordOp::Mknod {
                parent,
                name: name.into(),
                fid,
                ftype,
                mode: 0o640,
                rdev,
                mtime: t(),
                uid,
                gid,
            },
        }
    }
    pub fn create_as(id: u64, parent: Fid, name: &str, fid: Fid, uid: u32, gid: u32) -> Record {
        Record {
            store_id: id,
            op: RecordOp::Create {
                parent,
                name: name.into(),
                fid,
                mode: 0o644,
                mtime: t(),
                uid,
                gid,
            },
        }
    }
    pub fn chmod(id: u64, fid: Fid, expected_version: u64, mode: u32) -> Record {
        Record {
            store_id: id,
            op: RecordOp::SetAttr {
                fid,
                expected_version,
                mode: Some(mode),
                size: None,
                mtime: None,
                uid: None,
                gid: None,
                atime: None,
            },
        }
    }
}
