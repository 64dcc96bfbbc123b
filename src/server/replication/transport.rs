//! Peer connections between members (docs/PROTOCOL.md "Peer connections").
//!
//! A peer connection arrives on the member's one listening port. It starts
//! with the 8 bytes `CODARFT1` (a client's first frame starts with a zero
//! byte, so the two never mix), then the dialer's node id, the node id it
//! wants and a fresh nonce. The acceptor answers with its own nonce and an
//! HMAC-SHA256 under the group key over both ids and nonces; the dialer
//! checks it and sends its own HMAC. Only then does either side read a
//! frame: `u32 length | u8 kind | body`.
//!
//! When the member serves TLS (the default) a peer connection is TLS
//! first: the dialer pins the fingerprints in its own data directory's
//! `server.fingerprint` (every member has the first member's certificate,
//! copied by `init --from`), and the magic and everything after it travel
//! inside TLS. With `--insecure-plaintext` they travel in clear.
//!
//! Raft messages flow one way on a connection (each member dials every
//! other and sends its messages on its own connection), so the engine's
//! messages need no reply path. Node id 0 is the `group status` command:
//! it sends one status request and reads one reply.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::proto::auth::random_bytes;
use crate::tls::{Stream, Trust};
use crate::{Error, Result};

/// What a member needs to dial another: the group key, and the TLS
/// settings (None: plaintext, the member serves `--insecure-plaintext`).
#[derive(Clone)]
pub struct PeerKey {
    /// The group key both sides prove they hold.
    pub secret: [u8; 32],
    /// The client side of TLS, pinned to the group's certificate.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// The peer key of a data directory: its group key, and TLS pinned to
/// its `server.fingerprint` when `tls`.
pub fn peer_key(root: &Path, tls: bool) -> Result<PeerKey> {
    let secret = super::config::read_key(root)?;
    let tls = if tls {
        let file = crate::tls::fingerprint_path(root);
        let fingerprints = crate::tls::read_fingerprints(&file)?;
        Some(crate::tls::client_config(&Trust::Pinned {
            fingerprints,
            file,
        })?)
    } else {
        None
    };
    Ok(PeerKey { secret, tls })
}

/// First bytes of every peer connection.
pub const MAGIC: &[u8; 8] = b"CODARFT1";
/// Largest peer frame (a batch of entries; file data never travels here).
pub const MAX_PEER_FRAME: usize = 64 << 20;
/// Frame kinds.
pub const KIND_RAFT: u8 = 1;
/// A status request (from `group status`, node id 0).
pub const KIND_STATUS_REQ: u8 = 2;
/// The reply: text lines `key value`.
pub const KIND_STATUS: u8 = 3;
/// A Store's data pushed to a follower: header, then the bytes and their SHA-256.
pub const KIND_PUSH: u8 = 4;
/// The follower's answer to a push: 0 = durable, 1 + text = failed.
pub const KIND_PUSHED: u8 = 5;
/// A request for a replicated upload (client id, upload id).
pub const KIND_FETCH: u8 = 6;
/// The answer: 0 = none, or 1 + length, then the bytes and their SHA-256.
pub const KIND_FILE: u8 = 7;
/// A membership change from `group add/remove` (node id 0): text
/// `add ID ADDR` or `remove ID`.
pub const KIND_MEMBERSHIP_REQ: u8 = 8;
/// Its answer: `ok INDEX` or `error TEXT`.
pub const KIND_MEMBERSHIP: u8 = 9;
/// How long connecting and the peer handshake may take.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(2);

type HmacSha256 = Hmac<Sha256>;

fn mac(
    key: &[u8; 32],
    label: &[u8],
    from: u64,
    to: u64,
    nc: &[u8; 32],
    ns: &[u8; 32],
) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    m.update(label);
    m.update(&from.to_be_bytes());
    m.update(&to.to_be_bytes());
    m.update(nc);
    m.update(ns);
    m
}

const LABEL_ACCEPTOR: &[u8] = b"coda-raft acceptor";
const LABEL_DIALER: &[u8] = b"coda-raft dialer";

fn io(what: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(what.to_string(), e)
}

/// Connect to a member and prove we hold the group key (and that it does).
pub fn dial(addr: SocketAddr, peer_key: &PeerKey, from: u64, to: u64) -> Result<Stream> {
    let key = &peer_key.secret;
    let s = TcpStream::connect_timeout(&addr, DIAL_TIMEOUT).map_err(io("connect to peer"))?;
    let _ = s.set_nodelay(true);
    s.set_read_timeout(Some(DIAL_TIMEOUT))
        .map_err(io("peer socket"))?;
    s.set_write_timeout(Some(DIAL_TIMEOUT))
        .map_err(io("peer socket"))?;
    let mut s = match &peer_key.tls {
        Some(cfg) => Stream::connect(s, Arc::clone(cfg), "coda-server", &addr.to_string())?,
        None => Stream::plain(s),
    };
    let nc: [u8; 32] = random_bytes();
    let mut hello = Vec::with_capacity(56);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&from.to_be_bytes());
    hello.extend_from_slice(&to.to_be_bytes());
    hello.extend_from_slice(&nc);
    s.write_all(&hello).map_err(io("peer hello"))?;
    s.flush().map_err(io("peer hello"))?;
    let mut answer = [0u8; 64];
    s.read_exact(&mut answer).map_err(io("peer challenge"))?;
    let ns: [u8; 32] = answer[..32].try_into().expect("32 bytes");
    mac(key, LABEL_ACCEPTOR, from, to, &nc, &ns)
        .verify_slice(&answer[32..])
        .map_err(|_| Error::Auth(format!("member at {addr} does not hold our group key")))?;
    let proof = mac(key, LABEL_DIALER, from, to, &nc, &ns)
        .finalize()
        .into_bytes();
    s.write_all(&proof).map_err(io("peer proof"))?;
    s.flush().map_err(io("peer proof"))?;
    s.set_read_timeout(None).map_err(io("peer socket"))?;
    Ok(s)
}

/// The acceptor's half, after the magic was seen: returns the dialer's node id.
pub fn accept<R: Read>(r: &mut R, w: &mut Stream, key: &[u8; 32], me: u64) -> Result<u64> {
    let mut hello = [0u8; 56];
    r.read_exact(&mut hello).map_err(io("peer hello"))?;
    if &hello[..8] != MAGIC {
        return Err(Error::Protocol("not a peer connection".into()));
    }
    let from = u64::from_be_bytes(hello[8..16].try_into().expect("8 bytes"));
    let to = u64::from_be_bytes(hello[16..24].try_into().expect("8 bytes"));
    let nc: [u8; 32] = hello[24..56].try_into().expect("32 bytes");
    if to != me && to != 0 {
        return Err(Error::Invalid(format!(
            "peer {from} dialled member {to}, this is member {me}"
        )));
    }
    let ns: [u8; 32] = random_bytes();
    let proof = mac(key, LABEL_ACCEPTOR, from, to, &nc, &ns)
        .finalize()
        .into_bytes();
    let mut answer = Vec::with_capacity(64);
    answer.extend_from_slice(&ns);
    answer.extend_from_slice(&proof);
    w.write_all(&answer).map_err(io("peer challenge"))?;
    w.flush().map_err(io("peer challenge"))?;
    let mut theirs = [0u8; 32];
    r.read_exact(&mut theirs).map_err(io("peer proof"))?;
    mac(key, LABEL_DIALER, from, to, &nc, &ns)
        .verify_slice(&theirs)
        .map_err(|_| Error::Auth(format!("peer claiming node {from} has a wrong group key")))?;
    Ok(from)
}

/// Write one frame.
pub fn write_frame<W: Write>(w: &mut W, kind: u8, body: &[u8]) -> Result<()> {
    let len = u32::try_from(body.len() + 1)
        .ok()
        .filter(|l| *l as usize <= MAX_PEER_FRAME)
        .ok_or_else(|| Error::Invalid("peer frame too large".into()))?;
    let mut buf = Vec::with_capacity(body.len() + 5);
    buf.extend_from_slice(&len.to_be_bytes());
    buf.push(kind);
    buf.extend_from_slice(body);
    w.write_all(&buf)
        .and_then(|()| w.flush())
        .map_err(io("send to peer"))
}

/// Read one frame; `Ok(None)` at a clean end of stream.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Option<(u8, Vec<u8>)>> {
    let mut len = [0u8; 4];
    match r.read(&mut len[..1]) {
        Ok(0) => return Ok(None),
        Ok(_) => {}
        Err(e) => return Err(Error::io("read from peer", e)),
    }
    r.read_exact(&mut len[1..]).map_err(io("read from peer"))?;
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > MAX_PEER_FRAME {
        return Err(Error::Protocol(format!("peer frame length {len}")));
    }
    let mut kind = [0u8; 1];
    r.read_exact(&mut kind).map_err(io("read from peer"))?;
    // Grow as bytes arrive, so an announced length costs nothing unsent.
    let mut body = Vec::new();
    let got = r
        .take(len as u64 - 1)
        .read_to_end(&mut body)
        .map_err(io("read from peer"))?;
    if got != len - 1 {
        return Err(Error::Protocol("peer closed inside a frame".into()));
    }
    Ok(Some((kind[0], body)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn members_with_the_same_key_connect_and_a_wrong_key_is_refused() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let mut out = Vec::new();
            for _ in 0..2 {
                let (s, _) = l.accept().unwrap();
                let mut s = Stream::plain(s);
                let mut r = s.try_clone().unwrap();
                let res = accept(&mut r, &mut s, &[7; 32], 2);
                if let Ok(from) = res {
                    let f = read_frame(&mut r).unwrap().unwrap();
                    out.push((from, f));
                } else {
                    out.push((0, (0, Vec::new())));
                }
            }
            out
        });
        let key = |b| PeerKey {
            secret: [b; 32],
            tls: None,
        };
        let mut s = dial(addr, &key(7), 1, 2).unwrap();
        write_frame(&mut s, KIND_RAFT, b"hello").unwrap();
        assert!(matches!(dial(addr, &key(8), 3, 2), Err(Error::Auth(_))));
        let got = t.join().unwrap();
        assert_eq!(got[0], (1, (KIND_RAFT, b"hello".to_vec())));
        assert_eq!(got[1].0, 0);
    }
}
