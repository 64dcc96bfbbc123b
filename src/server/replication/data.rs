//! File data between members: a Store's bytes are pushed by the leader to
//! the followers before the entry naming them is proposed, and pulled by a
//! member that missed the push (it was down) before it applies the entry.
//! Both stream in 256 KiB chunks (never whole in memory) followed by the
//! SHA-256 of the bytes; the receiver writes a temporary file, fsyncs it,
//! checks the digest and only then renames it into `DIR/replstage/`.
//!
//! `DIR/replstage/<client hex>-<upload id>` is the name every member's
//! state machine looks a Store's data up by. The leader hard-links the
//! client's staged upload there. The files are kept after the Store (they
//! share the object file's inode, so they cost nothing until the object is
//! replaced): a member that comes back later may need to pull them.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufRead, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use super::transport::{
    dial, read_frame, write_frame, PeerKey, KIND_FETCH, KIND_FILE, KIND_PUSH, KIND_PUSHED,
};
use crate::proto::auth::random_bytes;
use crate::server::objects::{hex, sync_dir};
use crate::tls::Stream;
use crate::{Error, Result};

const CHUNK: usize = 256 * 1024;
/// A transfer stalled this long (no byte moves) fails.
const STALL: Duration = Duration::from_secs(30);

/// The directory of replicated uploads.
pub fn replstage_dir(root: &Path) -> PathBuf {
    root.join("replstage")
}

/// Where a replicated upload lives on every member.
pub fn replstage_path(root: &Path, client: &[u8; 16], upload: u64) -> PathBuf {
    replstage_dir(root).join(format!("{}-{upload}", hex(client)))
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |e| Error::io(what, e)
}

fn header(client: &[u8; 16], upload: u64, len: Option<u64>) -> Vec<u8> {
    let mut b = client.to_vec();
    b.extend_from_slice(&upload.to_be_bytes());
    if let Some(l) = len {
        b.extend_from_slice(&l.to_be_bytes());
    }
    b
}

fn parse_header(body: &[u8], with_len: bool) -> Result<([u8; 16], u64, u64)> {
    let want = if with_len { 32 } else { 24 };
    if body.len() != want {
        return Err(Error::Protocol("bad data header from peer".into()));
    }
    let client: [u8; 16] = body[..16].try_into().expect("16 bytes");
    let upload = u64::from_be_bytes(body[16..24].try_into().expect("8 bytes"));
    let len = if with_len {
        u64::from_be_bytes(body[24..32].try_into().expect("8 bytes"))
    } else {
        0
    };
    Ok((client, upload, len))
}

/// Stream `len` bytes of `f` and their digest.
fn send_bytes<W: Write>(w: &mut W, f: &mut File, len: u64) -> Result<()> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = (left as usize).min(CHUNK);
        f.read_exact(&mut buf[..n])
            .map_err(io("read replicated data"))?;
        h.update(&buf[..n]);
        w.write_all(&buf[..n]).map_err(io("send replicated data"))?;
        left -= n as u64;
    }
    w.write_all(&h.finalize())
        .map_err(io("send replicated data"))?;
    w.flush().map_err(io("send replicated data"))
}

/// Take `len` bytes and their digest into the replstage name, durably.
fn receive_bytes<R: Read>(
    r: &mut R,
    root: &Path,
    client: &[u8; 16],
    upload: u64,
    len: u64,
) -> Result<()> {
    let dir = replstage_dir(root);
    fs::create_dir_all(&dir).map_err(io("create replstage"))?;
    let tmp = dir.join(format!("tmp-{}", hex(&random_bytes::<8>())));
    let result = (|| -> Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("create replicated upload"))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        let mut left = len;
        while left > 0 {
            let n = (left as usize).min(CHUNK);
            r.read_exact(&mut buf[..n])
                .map_err(io("receive replicated data"))?;
            h.update(&buf[..n]);
            f.write_all(&buf[..n])
                .map_err(io("write replicated upload"))?;
            left -= n as u64;
        }
        let mut digest = [0u8; 32];
        r.read_exact(&mut digest)
            .map_err(io("receive replicated data"))?;
        if h.finalize().as_slice() != digest {
            return Err(Error::Eio(
                "replicated data does not match its checksum".into(),
            ));
        }
        f.sync_all().map_err(io("fsync replicated upload"))?;
        fs::rename(&tmp, replstage_path(root, client, upload))
            .map_err(io("rename replicated upload"))?;
        sync_dir(&dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Idle data connections kept per member: a push reuses one instead of
/// paying a connect, a TLS handshake and the group-key proof per file
/// (that was most of a small replicated store's cost).
#[derive(Default)]
pub struct DataPool {
    idle: Mutex<HashMap<u64, Vec<(Stream, Instant)>>>,
}

/// Idle connections kept per member at most (one per push in flight).
const POOL_PER_MEMBER: usize = 8;
/// A pooled connection idle this long is closed rather than reused (well
/// under the 30 s after which the member closes a silent peer connection;
/// those to a removed member go so too).
const POOL_IDLE: Duration = Duration::from_secs(10);

impl DataPool {
    fn take(&self, to: u64) -> Option<Stream> {
        let mut idle = self.idle.lock();
        let list = idle.get_mut(&to)?;
        list.retain(|(_, at)| at.elapsed() < POOL_IDLE);
        list.pop().map(|(s, _)| s)
    }

    fn put(&self, to: u64, s: Stream) {
        let mut idle = self.idle.lock();
        let list = idle.entry(to).or_default();
        if list.len() < POOL_PER_MEMBER {
            list.push((s, Instant::now()));
        }
    }
}

/// Push one upload to member `to`; returns once it is durable there. A
/// pooled connection that fails (the member restarted, or closed it) is
/// dropped and the push made again on a new one; the receiver's rename
/// makes a second copy of the same bytes harmless.
#[allow(clippy::too_many_arguments)] // the upload's names, and where to
pub fn push(
    pool: &DataPool,
    addr: SocketAddr,
    key: &PeerKey,
    me: u64,
    to: u64,
    client: &[u8; 16],
    upload: u64,
    path: &Path,
) -> Result<()> {
    if let Some(s) = pool.take(to) {
        if let Ok(s) = push_on(s, to, client, upload, path) {
            pool.put(to, s);
            return Ok(());
        }
    }
    let s = dial(addr, key, me, to)?;
    s.set_write_timeout(Some(STALL))
        .map_err(io("peer socket"))?;
    s.set_read_timeout(Some(STALL)).map_err(io("peer socket"))?;
    let s = push_on(s, to, client, upload, path)?;
    pool.put(to, s);
    Ok(())
}

/// One push on an open connection; hands the connection back when the
/// member acknowledged (it is then between frames, ready for the next).
fn push_on(mut s: Stream, to: u64, client: &[u8; 16], upload: u64, path: &Path) -> Result<Stream> {
    let mut f = File::open(path).map_err(io("open upload to replicate"))?;
    let len = f.metadata().map_err(io("stat upload to replicate"))?.len();
    {
        let mut w = std::io::BufWriter::with_capacity(CHUNK.min(len as usize + 64), &mut s);
        write_frame(&mut w, KIND_PUSH, &header(client, upload, Some(len)))?;
        send_bytes(&mut w, &mut f, len)?;
    }
    match read_frame(&mut s)? {
        Some((KIND_PUSHED, b)) if b == [0] => Ok(s),
        Some((KIND_PUSHED, b)) => Err(Error::Eio(format!(
            "member {to} could not store the data: {}",
            String::from_utf8_lossy(b.get(1..).unwrap_or_default())
        ))),
        _ => Err(Error::Protocol(format!(
            "member {to} did not acknowledge the data"
        ))),
    }
}

/// Serve a push whose header frame was read.
pub fn serve_push<R: BufRead, W: Write>(
    root: &Path,
    r: &mut R,
    w: &mut W,
    body: &[u8],
) -> Result<()> {
    let (client, upload, len) = parse_header(body, true)?;
    match receive_bytes(r, root, &client, upload, len) {
        Ok(()) => write_frame(w, KIND_PUSHED, &[0]),
        Err(e) => {
            let mut b = vec![1u8];
            b.extend_from_slice(e.to_string().as_bytes());
            let _ = write_frame(w, KIND_PUSHED, &b);
            Err(e)
        }
    }
}

/// Pull one upload from member `from`; `Ok(false)` if it has none.
pub fn fetch(
    addr: SocketAddr,
    key: &PeerKey,
    me: u64,
    from: u64,
    root: &Path,
    client: &[u8; 16],
    upload: u64,
) -> Result<bool> {
    let mut s = dial(addr, key, me, from)?;
    s.set_read_timeout(Some(STALL)).map_err(io("peer socket"))?;
    write_frame(&mut s, KIND_FETCH, &header(client, upload, None))?;
    let mut r = std::io::BufReader::with_capacity(CHUNK, s);
    match read_frame(&mut r)? {
        Some((KIND_FILE, b)) if b.first() == Some(&1) && b.len() == 9 => {
            let len = u64::from_be_bytes(b[1..9].try_into().expect("8 bytes"));
            receive_bytes(&mut r, root, client, upload, len)?;
            Ok(true)
        }
        Some((KIND_FILE, _)) => Ok(false),
        _ => Err(Error::Protocol(format!(
            "member {from} did not answer a fetch"
        ))),
    }
}

/// Serve a fetch whose frame was read.
pub fn serve_fetch<W: Write>(root: &Path, w: &mut W, body: &[u8]) -> Result<()> {
    let (client, upload, _) = parse_header(body, false)?;
    let path = replstage_path(root, &client, upload);
    let Ok(mut f) = File::open(&path) else {
        return write_frame(w, KIND_FILE, &[0]);
    };
    let len = f.metadata().map_err(io("stat replicated upload"))?.len();
    let mut b = vec![1u8];
    b.extend_from_slice(&len.to_be_bytes());
    let mut bw = std::io::BufWriter::with_capacity(CHUNK, w);
    write_frame(&mut bw, KIND_FILE, &b)?;
    send_bytes(&mut bw, &mut f, len)
}
