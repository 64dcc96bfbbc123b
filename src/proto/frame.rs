//! Frames: `u32 length | u8 type | u64 request id | body`, length counting
//! type, id and body. The length is checked against [`MAX_FRAME`] before any
//! allocation, so a hostile peer cannot make us reserve memory.

use std::io::{self, Read, Write};

use super::MAX_FRAME;
use crate::{Error, Result};

/// Bytes before a frame's body: length, type and request id.
pub const HEADER_LEN: usize = 4 + 1 + 8;

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
    if len > MAX_FRAME {
        return Err(Error::Protocol(format!(
            "frame length {len} exceeds limit {MAX_FRAME}"
        )));
    }
    let mut head = [0u8; 9];
    if read_full(r, &mut head)? != 9 {
        return Err(Error::Protocol(
            "connection closed inside a frame header".into(),
        ));
    }
    let mut body = vec![0u8; len - 9];
    if read_full(r, &mut body)? != body.len() {
        return Err(Error::Protocol(
            "connection closed inside a frame body".into(),
        ));
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
