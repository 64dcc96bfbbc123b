//! Frames: `u32 length | u8 type | u64 request id | body`, length counting
//! type, id and body. The length is checked against a limit ([`MAX_FRAME`],
//! or [`MAX_HANDSHAKE_FRAME`] before authentication) before anything is
//! read, and the body buffer grows only as its bytes arrive, so a peer that
//! announces a large frame and stops makes us hold nothing it did not send.

use std::io::{self, Read, Write};

use super::MAX_FRAME;
use crate::{Error, Result};

/// Bytes before a frame's body: length, type and request id.
pub const HEADER_LEN: usize = 4 + 1 + 8;

/// Largest frame accepted before a connection has authenticated: Hello and
/// Auth are a few hundred bytes at most (user name ≤ MAX_USER).
pub const MAX_HANDSHAKE_FRAME: usize = 1024;

/// Body bytes read per step; the buffer never runs ahead of the stream by
/// more than this.
const BODY_STEP: usize = 64 * 1024;

/// One frame of the wire format: a message type, a request id and its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The message type.
    pub kind: u8,
    /// The request id (a reply carries its request's).
    pub id: u64,
    /// The message's fields, encoded.
    pub body: Vec<u8>,
}

/// Read one frame. `Ok(None)` is a clean end of stream before a frame began;
/// a stream ending inside a frame is a protocol error.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Option<Frame>> {
    read_frame_max(r, MAX_FRAME)
}

/// [`read_frame`] with a smaller length limit (the handshake's).
pub fn read_frame_max<R: Read>(r: &mut R, max: usize) -> Result<Option<Frame>> {
    let mut len = [0u8; 4];
    match read_full(r, &mut len)? {
        0 => return Ok(None),
        4 => {}
        _ => {
            return Err(Error::Protocol(
                "connection closed inside a frame header".into(),
            ))
        }
    }
    let len = u32::from_be_bytes(len) as usize;
    if len < 9 {
        return Err(Error::Protocol(format!(
            "frame length {len} below minimum 9"
        )));
    }
    let max = max.min(MAX_FRAME);
    if len > max {
        return Err(Error::Protocol(format!(
            "frame length {len} exceeds limit {max}"
        )));
    }
    let mut head = [0u8; 9];
    if read_full(r, &mut head)? != 9 {
        return Err(Error::Protocol(
            "connection closed inside a frame header".into(),
        ));
    }
    let want = len - 9;
    let mut body = Vec::with_capacity(want.min(BODY_STEP));
    while body.len() < want {
        let have = body.len();
        let step = (want - have).min(BODY_STEP);
        body.resize(have + step, 0);
        let got = read_full(r, &mut body[have..])?;
        if got != step {
            return Err(Error::Protocol(
                "connection closed inside a frame body".into(),
            ));
        }
    }
    Ok(Some(Frame {
        kind: head[0],
        id: u64::from_be_bytes(head[1..9].try_into().unwrap()),
        body,
    }))
}

/// Decode one frame from the front of a byte slice (for fuzzing and tests):
/// returns the frame and how many bytes it used.
pub fn parse_frame(buf: &[u8]) -> Result<(Frame, usize)> {
    let mut cur = io::Cursor::new(buf);
    match read_frame(&mut cur)? {
        Some(f) => Ok((f, cur.position() as usize)),
        None => Err(Error::Protocol("empty input".into())),
    }
}

/// Encode a frame into bytes (header and body), for one `write_all`.
pub fn encode_frame(kind: u8, id: u64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&((9 + body.len()) as u32).to_be_bytes());
    out.push(kind);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Write one frame in a single `write_all`, so frames from threads that share
/// a locked writer never interleave.
pub fn write_frame<W: Write>(w: &mut W, kind: u8, id: u64, body: &[u8]) -> Result<()> {
    if 9 + body.len() > MAX_FRAME {
        return Err(Error::Invalid(format!(
            "frame of {} bytes exceeds limit {MAX_FRAME}",
            9 + body.len()
        )));
    }
    w.write_all(&encode_frame(kind, id, body))
        .map_err(|e| Error::io("sending frame", e))
}

/// Write `msg` as one frame with `id` in a single `write_all`, encoded in
/// one buffer (`Msg::encode_frame`).
pub fn write_msg<W: Write>(w: &mut W, id: u64, msg: &super::Msg) -> Result<()> {
    let frame = msg.encode_frame(id);
    if frame.len() - 4 > MAX_FRAME {
        return Err(Error::Invalid(format!(
            "frame of {} bytes exceeds limit {MAX_FRAME}",
            frame.len() - 4
        )));
    }
    w.write_all(&frame)
        .map_err(|e| Error::io("sending frame", e))
}

/// Read until `buf` is full or end of stream; returns bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io("receiving frame", e)),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trips() {
        let bytes = encode_frame(7, 42, b"hello");
        let (f, used) = parse_frame(&bytes).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(
            f,
            Frame {
                kind: 7,
                id: 42,
                body: b"hello".to_vec()
            }
        );
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let mut bytes = u32::MAX.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0; 9]);
        assert!(matches!(parse_frame(&bytes), Err(Error::Protocol(_))));
    }

    #[test]
    fn handshake_limit_refuses_a_large_frame() {
        let bytes = encode_frame(1, 0, &[0u8; 2000]);
        let mut r = io::Cursor::new(&bytes);
        assert!(matches!(
            read_frame_max(&mut r, MAX_HANDSHAKE_FRAME),
            Err(Error::Protocol(_))
        ));
        let mut r = io::Cursor::new(&bytes);
        assert_eq!(read_frame(&mut r).unwrap().unwrap().body.len(), 2000);
    }

    #[test]
    fn a_large_body_arriving_in_steps_round_trips() {
        let body: Vec<u8> = (0..(3 * BODY_STEP + 17)).map(|i| i as u8).collect();
        let bytes = encode_frame(2, 9, &body);
        let (f, used) = parse_frame(&bytes).unwrap();
        assert_eq!((f.body, used), (body, bytes.len()));
    }

    #[test]
    fn truncated_frames_are_protocol_errors() {
        let bytes = encode_frame(1, 1, b"abcdef");
        for cut in 1..bytes.len() {
            assert!(
                matches!(parse_frame(&bytes[..cut]), Err(Error::Protocol(_))),
                "cut {cut}"
            );
        }
        let mut r = io::Cursor::new(Vec::<u8>::new());
        assert!(read_frame(&mut r).unwrap().is_none());
    }
}
