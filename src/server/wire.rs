//! Small helpers for talking on a socket: encoding a reply frame that is
//! guaranteed to fit, and closing a connection after an error so that the
//! error frame reaches the peer instead of being destroyed by a reset.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};

use crate::proto::frame::encode_frame;
use crate::proto::{Msg, MAX_FRAME};
use crate::tls::Stream;
use crate::{Error, Result};

/// What a control connection's writer thread is asked to do.
pub enum Out {
    Frame(Vec<u8>),
    /// A reply counted against the connection's flow bounds (control.rs),
    /// with its trace stamps when `CODA_SERVER_TRACE` is on.
    Reply(Vec<u8>, Option<Stamp>),
    /// The unsent rest of a reply a worker began sending itself, already
    /// sealed (TLS), and the length of the whole reply frame for the flow
    /// bounds.
    Rest(Vec<u8>, usize, Option<Stamp>),
    /// Flush what came before, then stop sending (FIN).
    Close,
}

/// When a request was read, taken up by a worker, and answered (its reply
/// encoded): with `CODA_SERVER_TRACE` set, each reply's way prints one line
/// (control.rs `trace_reply`).
#[derive(Debug, Clone, Copy)]
pub struct Stamp {
    pub kind: u8,
    pub read: Instant,
    pub started: Instant,
    pub answered: Instant,
}

/// Whether `CODA_SERVER_TRACE` is set (read once).
pub fn tracing() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("CODA_SERVER_TRACE").is_some())
}

/// The one way the server turns an [`Error`] into an Error message for a
/// client. An OS error's detail names server paths (`.../staging/tmp-...`),
/// which are no client's business: the client gets the code and the errno
/// text, and the server log gets the whole story.
pub fn error_reply(e: &Error) -> Msg {
    error_reply_at(e, u32::MAX)
}

/// [`error_reply`] blaming record `index` of a batch.
pub fn error_reply_at(e: &Error, index: u32) -> Msg {
    match e {
        Error::Io { source, .. } => {
            super::log::warn(format_args!("error sent to a client as generic: {e}"));
            let text = match source.raw_os_error() {
                Some(n) => std::io::Error::from_raw_os_error(n).to_string(),
                None => source.kind().to_string(),
            };
            Msg::Error {
                code: e.wire_code(),
                index,
                message: format!("server storage error: {text}"),
            }
        }
        _ => Msg::error_at(e, index),
    }
}

/// Encode `msg` as a frame with `id`. A reply too big for a frame (which the
/// limits should prevent) becomes an error reply rather than a broken stream.
pub fn frame_for(id: u64, msg: &Msg) -> Vec<u8> {
    // Header and body in one buffer (no body encoded apart and copied).
    let frame = msg.encode_frame(id);
    if frame.len() - 4 > MAX_FRAME {
        let e = Error::Invalid(format!(
            "reply of {} bytes exceeds the frame limit",
            frame.len() - 13
        ));
        let m = error_reply(&e);
        return encode_frame(m.kind(), id, &m.encode());
    }
    frame
}

/// Send one message directly (handshake and bulk connections, which have a
/// single thread writing).
pub fn send(stream: &mut Stream, id: u64, msg: &Msg) -> Result<()> {
    stream
        .write_all(&frame_for(id, msg))
        .map_err(|e| Error::io("sending frame", e))
}

/// How long a closing connection's leftover input is read and discarded.
const DRAIN_TIME: Duration = Duration::from_millis(500);
const DRAIN_BYTES: usize = 4 << 20;

/// Close after an error reply: stop sending (FIN after the error frame),
/// then read and discard what the peer still sends for a short while.
/// Closing with unread input would make the kernel send a reset, which can
/// destroy the error frame before the peer reads it.
pub fn close_after_error(stream: &mut Stream) {
    let _ = stream.flush();
    stream.close_write();
    let deadline = Instant::now() + DRAIN_TIME;
    let mut buf = [0u8; 16 * 1024];
    let mut total = 0;
    while total < DRAIN_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            break;
        }
        // The raw socket: what is left is discarded, not decrypted.
        match stream.tcp().read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
}

/// One non-blocking send: how much of `buf` the socket took before it
/// would block (a control connection's replies, a peer's Raft messages);
/// `Err` when the connection failed.
pub fn send_now(sock: &std::net::TcpStream, buf: &[u8]) -> std::result::Result<usize, ()> {
    use std::os::fd::AsRawFd;
    let mut done = 0;
    // Bounded: each turn writes bytes or ends.
    while done < buf.len() {
        // SAFETY: a plain send of a live buffer on an open socket;
        // MSG_NOSIGNAL keeps a closed peer from raising SIGPIPE.
        let n = unsafe {
            libc::send(
                sock.as_raw_fd(),
                buf[done..].as_ptr().cast(),
                buf.len() - done,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n > 0 {
            done += n as usize;
            continue;
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) if n < 0 => break,
            _ => return Err(()),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::WireCode;

    #[test]
    fn os_errors_reach_clients_without_paths() {
        let e = Error::io(
            "create /srv/coda/staging/tmp-00-1",
            std::io::Error::from_raw_os_error(libc::ENOSPC),
        );
        match error_reply_at(&e, 3) {
            Msg::Error {
                code,
                index,
                message,
            } => {
                assert_eq!((code, index), (WireCode::NoSpace, 3));
                assert!(message.starts_with("server storage error: "), "{message}");
                assert!(!message.contains('/'), "{message}");
            }
            m => panic!("{m:?}"),
        }
        // Other errors keep their (path-free) detail.
        let e = Error::Exists("name x".into());
        assert!(matches!(error_reply(&e),
            Msg::Error { code: WireCode::Exists, message, .. } if message.contains("name x")));
    }
}
