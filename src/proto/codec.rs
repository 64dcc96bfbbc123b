//! Big-endian encoding of message bodies. The reader checks every length
//! against what is left of the body and against its bound before allocating.

use super::types::{Attr, DirEntry, Fid, FileType, Timespec};
use crate::{Error, Result};

/// Builds a message body: big-endian integers and length-prefixed fields.
#[derive(Default)]
pub struct Writer {
    /// The bytes written so far.
    pub buf: Vec<u8>,
}

impl Writer {
    /// An empty body.
    pub fn new() -> Writer {
        Writer::default()
    }
    /// Append a byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }
    /// Append a big-endian u16.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// Append a big-endian u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// Append a big-endian u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// Append a big-endian i64.
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// Append bytes as they are (a fixed-size field).
    pub fn bytes_fixed(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }
    /// A string: u16 length then UTF-8 bytes.
    pub fn str(&mut self, s: &str) -> &mut Self {
        let len = u16::try_from(s.len()).expect("strings on the wire are bounded below 64 KiB");
        self.u16(len);
        self.buf.extend_from_slice(s.as_bytes());
        self
    }
    /// Append a fid (16 bytes).
    pub fn fid(&mut self, f: &Fid) -> &mut Self {
        self.u32(f.volume).u64(f.vnode).u32(f.unique)
    }
    /// Append a time (seconds, nanoseconds).
    pub fn time(&mut self, t: &Timespec) -> &mut Self {
        self.i64(t.sec).u32(t.nsec)
    }
    /// Append attributes (`ATTR_LEN` bytes).
    pub fn attr(&mut self, a: &Attr) -> &mut Self {
        self.fid(&a.fid)
            .u8(a.ftype as u8)
            .u32(a.mode)
            .u32(a.nlink)
            .u64(a.size)
            .time(&a.mtime)
            .time(&a.ctime)
            .u64(a.version)
            .u32(a.uid)
            .u32(a.gid)
            .time(&a.atime)
            .u64(a.rdev)
    }
    /// Append a directory entry.
    pub fn entry(&mut self, e: &DirEntry) -> &mut Self {
        self.str(&e.name).fid(&e.fid).u8(e.ftype as u8)
    }
    /// Append an optional u32 (presence byte, then the value).
    pub fn opt_u32(&mut self, v: Option<u32>) -> &mut Self {
        match v {
            Some(x) => self.u8(1).u32(x),
            None => self.u8(0),
        }
    }
    /// Append an optional u64 (presence byte, then the value).
    pub fn opt_u64(&mut self, v: Option<u64>) -> &mut Self {
        match v {
            Some(x) => self.u8(1).u64(x),
            None => self.u8(0),
        }
    }
    /// Bytes with a u32 length prefix (an extended attribute's value).
    pub fn blob(&mut self, v: &[u8]) -> &mut Self {
        self.u32(v.len() as u32);
        self.buf.extend_from_slice(v);
        self
    }
    /// Append an optional time (presence byte, then the value).
    pub fn opt_time(&mut self, v: Option<Timespec>) -> &mut Self {
        match v {
            Some(x) => self.u8(1).time(&x),
            None => self.u8(0),
        }
    }
}

/// Reads a message body; every read is bounds-checked and a short body is a protocol error.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

fn short() -> Error {
    Error::Protocol("truncated message body".into())
}

impl<'a> Reader<'a> {
    /// A reader at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, pos: 0 }
    }
    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    /// Fails unless the whole body was consumed: trailing bytes are an error.
    pub fn finish(&self) -> Result<()> {
        if self.remaining() != 0 {
            return Err(Error::Protocol(format!(
                "{} trailing bytes after message body",
                self.remaining()
            )));
        }
        Ok(())
    }
    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.remaining() < n {
            return Err(short());
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    /// Read a byte.
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    /// Read a big-endian u16.
    pub fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().unwrap()))
    }
    /// Read a big-endian u32.
    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }
    /// Read a big-endian u64.
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().unwrap()))
    }
    /// Read a big-endian i64.
    pub fn i64(&mut self) -> Result<i64> {
        Ok(i64::from_be_bytes(self.take(8)?.try_into().unwrap()))
    }
    /// Read a fixed-size byte array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().unwrap())
    }
    /// A string of at most `max` bytes, valid UTF-8.
    pub fn str(&mut self, max: usize, what: &str) -> Result<String> {
        let len = self.u16()? as usize;
        if len > max {
            return Err(Error::Protocol(format!(
                "{what} of {len} bytes exceeds limit {max}"
            )));
        }
        let b = self.take(len)?;
        String::from_utf8(b.to_vec()).map_err(|_| Error::Protocol(format!("{what} is not UTF-8")))
    }
    /// A count prefix (u32) checked against `max` and against the bytes left,
    /// given the smallest encoding of one element.
    pub fn count(&mut self, max: usize, min_elem: usize, what: &str) -> Result<usize> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(Error::Protocol(format!("{n} {what} exceeds limit {max}")));
        }
        if n.saturating_mul(min_elem) > self.remaining() {
            return Err(short());
        }
        Ok(n)
    }
    /// Read a boolean (0 or 1; anything else is a protocol error).
    pub fn bool(&mut self) -> Result<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(Error::Protocol(format!("bad boolean {v}"))),
        }
    }
    /// Read a fid.
    pub fn fid(&mut self) -> Result<Fid> {
        Ok(Fid {
            volume: self.u32()?,
            vnode: self.u64()?,
            unique: self.u32()?,
        })
    }
    /// Read a time (nanoseconds below one second).
    pub fn time(&mut self) -> Result<Timespec> {
        let sec = self.i64()?;
        let nsec = self.u32()?;
        if nsec >= 1_000_000_000 {
            return Err(Error::Protocol(format!("bad nanoseconds {nsec}")));
        }
        Ok(Timespec { sec, nsec })
    }
    /// Read a file type.
    pub fn ftype(&mut self) -> Result<FileType> {
        let v = self.u8()?;
        FileType::from_u8(v).ok_or_else(|| Error::Protocol(format!("bad file type {v}")))
    }
    /// Read attributes.
    pub fn attr(&mut self) -> Result<Attr> {
        Ok(Attr {
            fid: self.fid()?,
            ftype: self.ftype()?,
            mode: self.u32()?,
            nlink: self.u32()?,
            size: self.u64()?,
            mtime: self.time()?,
            ctime: self.time()?,
            version: self.u64()?,
            uid: self.u32()?,
            gid: self.u32()?,
            atime: self.time()?,
            rdev: self.u64()?,
        })
    }
    /// Read a directory entry.
    pub fn entry(&mut self) -> Result<DirEntry> {
        Ok(DirEntry {
            name: self.str(super::MAX_NAME, "name")?,
            fid: self.fid()?,
            ftype: self.ftype()?,
        })
    }
    fn opt(&mut self) -> Result<bool> {
        self.bool()
    }
    /// Bytes with a u32 length prefix, at most `max` of them.
    pub fn blob(&mut self, max: usize, what: &str) -> Result<Vec<u8>> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(Error::Protocol(format!(
                "{what} of {len} bytes exceeds limit {max}"
            )));
        }
        Ok(self.take(len)?.to_vec())
    }
    /// Read an optional u32.
    pub fn opt_u32(&mut self) -> Result<Option<u32>> {
        Ok(if self.opt()? { Some(self.u32()?) } else { None })
    }
    /// Read an optional u64.
    pub fn opt_u64(&mut self) -> Result<Option<u64>> {
        Ok(if self.opt()? { Some(self.u64()?) } else { None })
    }
    /// Read an optional time.
    pub fn opt_time(&mut self) -> Result<Option<Timespec>> {
        Ok(if self.opt()? {
            Some(self.time()?)
        } else {
            None
        })
    }
}

/// Smallest encodings, for [`Reader::count`] pre-checks.
pub const FID_LEN: usize = 16;
/// Encoded size of `Attr`.
pub const ATTR_LEN: usize = FID_LEN + 1 + 4 + 4 + 8 + 12 + 12 + 8 + 4 + 4 + 12 + 8;
/// Smallest encoded size of a `DirEntry` (a one-byte name).
pub const ENTRY_MIN_LEN: usize = 2 + 1 + FID_LEN + 1;
