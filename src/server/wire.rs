//! Small helpers for talking on a socket: encoding a reply frame that is
//! guaranteed to fit, and closing a connection after an error so that the
//! error frame reaches the peer instead of being destroyed by a reset.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use crate::proto::frame::encode_frame;
use crate::proto::{Msg, MAX_FRAME};
use crate::{Error, Result};

/// What a control connection's writer thread is asked to do.
pub enum Out {
    Frame(Vec<u8>),
    /// A reply counted against the connection's flow bounds (control.rs).
    Reply(Vec<u8>),
    /// Flush what came before, then stop sending (FIN).
    Close,
}

/// Encode `msg` as a frame with `id`. A reply too big for a frame (which the
/// limits should prevent) becomes an error reply rather than a broken stream.
pub fn frame_for(id: u64, msg: &Msg) -> Vec<u8> {
    let body = msg.encode();
    if 9 + body.len() > MAX_FRAME {
        let e = Error::Invalid(format!(
            "reply of {} bytes exceeds the frame limit",
            body.len()
        ));
        return encode_frame(Msg::error(&e).kind(), id, &Msg::error(&e).encode());
    }
    encode_frame(msg.kind(), id, &body)
}

/// Send one message directly (handshake and bulk connections, which have a
/// single thread writing).
pub fn send(stream: &mut TcpStream, id: u64, msg: &Msg) -> Result<()> {
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
pub fn close_after_error(stream: &mut TcpStream) {
    let _ = stream.flush();
    let _ = stream.shutdown(Shutdown::Write);
    let deadline = Instant::now() + DRAIN_TIME;
    let mut buf = [0u8; 16 * 1024];
    let mut total = 0;
    while total < DRAIN_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
}
