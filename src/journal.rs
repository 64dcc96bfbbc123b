//! A write-ahead journal: one fixed-capacity file of checksummed records,
//! appended sequentially and made durable by one `fdatasync` for everything
//! appended since the last one (group commit). Generic on purpose: the
//! server's group commit uses it, and other logs may.
//!
//! Layout (little-endian):
//! - bytes 0..4096: the header, twice (at 0 and at 512) so a reset torn by
//!   a crash leaves one whole copy: magic, version, capacity, the sequence
//!   number of the first record, a CRC32C of those;
//! - from 4096: frames `len u32 | seq u64 | crc u32 | payload`, where `seq`
//!   rises by one per record and `crc` is the CRC32C of the previous
//!   frame's crc (the first: of the start sequence), `len`, `seq` and the
//!   payload, so only the exact chain written since the last reset reads
//!   back. Every write ends with a zeroed frame head, where a scan stops.
//!
//! The file is created once at its full size by writing zeros (not
//! `fallocate`: unwritten extents would make each `fdatasync` a metadata
//! update too), so appends are overwrites of allocated blocks.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Bytes before the first frame (the header block).
pub(crate) const HEADER_LEN: u64 = 4096;
/// A frame's head: length, sequence number, checksum.
pub(crate) const FRAME_HEAD: u64 = 16;
/// Smallest capacity accepted: the header and a few frames.
pub(crate) const MIN_CAPACITY: u64 = HEADER_LEN + 4096;

const MAGIC: &[u8; 8] = b"CODAJNL1";
const VERSION: u32 = 1;
/// Where the second copy of the header sits.
const HEADER_COPY: u64 = 512;
/// magic, version, capacity, start seq, crc.
const HEADER_BYTES: usize = 8 + 4 + 8 + 8 + 4;

/// An open journal. Not shared: its user serialises appends and syncs.
#[derive(Debug)]
pub(crate) struct Journal {
    file: File,
    path: PathBuf,
    capacity: u64,
    /// Offset of the next frame to write (after the frames in `buf`).
    pos: u64,
    /// Offset where `buf` goes (the end of what was written).
    written: u64,
    /// Sequence number of the first record since the last reset.
    start_seq: u64,
    next_seq: u64,
    /// The chain's last checksum.
    prev_crc: u32,
    /// Frames appended since the last sync.
    buf: Vec<u8>,
    /// Records since the last reset (synced or not).
    records: u64,
    /// A write or sync failed: the file's tail is unknown until a reset.
    broken: bool,
    /// Frames were written (`write_out`) and not yet synced.
    unsynced: bool,
    /// The next `sync` fails as a disk would (tests of the callers'
    /// fallbacks).
    #[cfg(test)]
    fail_next_sync: bool,
}

impl Journal {
    /// Open the journal at `path`, creating it with `capacity` bytes (its
    /// size, header included) when missing. Returns it and the payloads of
    /// the records since its last reset, in order: the scan stops at the
    /// first short, torn or corrupt frame, or one whose sequence number
    /// does not continue. New appends go after the last valid record; a
    /// caller that made those records durable elsewhere calls `reset`.
    pub(crate) fn open(path: &Path, capacity: u64) -> Result<(Journal, Vec<Vec<u8>>)> {
        if !path.exists() {
            create(path, capacity)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(format!("open journal {}", path.display()), e))?;
        let mut head = vec![0u8; HEADER_LEN as usize];
        file.read_exact_at(&mut head, 0)
            .map_err(|e| Error::io(format!("read journal header {}", path.display()), e))?;
        let copies = [
            parse_header(&head[..HEADER_BYTES]),
            parse_header(&head[HEADER_COPY as usize..HEADER_COPY as usize + HEADER_BYTES]),
        ];
        // The newer whole copy wins (a torn reset leaves the older one).
        let (capacity, start_seq) = copies
            .into_iter()
            .flatten()
            .max_by_key(|(_, seq)| *seq)
            .ok_or_else(|| Error::Eio(format!("journal {} has no valid header", path.display())))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io(format!("stat journal {}", path.display()), e))?
            .len();
        if len < capacity {
            return Err(Error::Eio(format!(
                "journal {} is {len} bytes, its header says {capacity}",
                path.display()
            )));
        }
        let mut j = Journal {
            file,
            path: path.to_path_buf(),
            capacity,
            pos: HEADER_LEN,
            written: HEADER_LEN,
            start_seq,
            next_seq: start_seq,
            prev_crc: seed(start_seq),
            buf: Vec::new(),
            records: 0,
            broken: false,
            unsynced: false,
            #[cfg(test)]
            fail_next_sync: false,
        };
        let records = j.scan()?;
        Ok((j, records))
    }

    /// Read the valid chain from the first frame; leaves the writer after
    /// it. Bounded by the capacity: every frame moves forward.
    fn scan(&mut self) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        let mut pos = HEADER_LEN;
        let mut seq = self.start_seq;
        let mut prev = seed(seq);
        // Read in large pieces: one syscall per chunk, not per frame.
        let mut chunk: Vec<u8> = Vec::new();
        let mut chunk_at = pos;
        let read = |at: u64, n: u64, chunk: &mut Vec<u8>, chunk_at: &mut u64| -> Result<()> {
            let want = n.max(1 << 20).min(self.capacity - at) as usize;
            chunk.resize(want, 0);
            self.file
                .read_exact_at(chunk, at)
                .map_err(|e| Error::io(format!("read journal {}", self.path.display()), e))?;
            *chunk_at = at;
            Ok(())
        };
        while pos + FRAME_HEAD <= self.capacity {
            let have = |n: u64, chunk: &Vec<u8>, chunk_at: u64| {
                pos >= chunk_at && pos + n <= chunk_at + chunk.len() as u64
            };
            if !have(FRAME_HEAD, &chunk, chunk_at) {
                read(pos, FRAME_HEAD, &mut chunk, &mut chunk_at)?;
            }
            let at = (pos - chunk_at) as usize;
            let h = &chunk[at..at + FRAME_HEAD as usize];
            let len = u32::from_le_bytes(h[0..4].try_into().expect("4")) as u64;
            let fseq = u64::from_le_bytes(h[4..12].try_into().expect("8"));
            let crc = u32::from_le_bytes(h[12..16].try_into().expect("4"));
            if fseq != seq || pos + FRAME_HEAD + len > self.capacity {
                break;
            }
            let total = FRAME_HEAD + len;
            if !have(total, &chunk, chunk_at) {
                read(pos, total, &mut chunk, &mut chunk_at)?;
            }
            let at = (pos - chunk_at) as usize;
            let head = &chunk[at..at + 12];
            let payload = &chunk[at + 16..at + total as usize];
            if frame_crc(prev, head, payload) != crc {
                break;
            }
            out.push(payload.to_vec());
            prev = crc;
            seq += 1;
            pos += total;
        }
        self.pos = pos;
        self.written = pos;
        self.next_seq = seq;
        self.prev_crc = prev;
        self.records = out.len() as u64;
        Ok(out)
    }

    /// Whether a record of `len` bytes fits after what is appended.
    pub(crate) fn fits(&self, len: usize) -> bool {
        // Room for its frame and the terminating zeroed head.
        self.pos + FRAME_HEAD + len as u64 + FRAME_HEAD <= self.capacity
    }

    /// Add a record (buffered; durable after the next `sync`). A record
    /// that does not fit is refused with `NoSpace`: reset first.
    pub(crate) fn append(&mut self, payload: &[u8]) -> Result<()> {
        if self.broken {
            return Err(self.broken_error());
        }
        if !self.fits(payload.len()) || payload.len() > u32::MAX as usize {
            return Err(Error::NoSpace(format!(
                "journal {} is full ({} of {} bytes used)",
                self.path.display(),
                self.pos,
                self.capacity
            )));
        }
        let mut head = [0u8; FRAME_HEAD as usize];
        head[0..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        head[4..12].copy_from_slice(&self.next_seq.to_le_bytes());
        let crc = frame_crc(self.prev_crc, &head[..12], payload);
        head[12..16].copy_from_slice(&crc.to_le_bytes());
        self.buf.extend_from_slice(&head);
        self.buf.extend_from_slice(payload);
        self.prev_crc = crc;
        self.next_seq += 1;
        self.pos += FRAME_HEAD + payload.len() as u64;
        self.records += 1;
        Ok(())
    }

    /// Write what was appended and make it durable: one write and one
    /// `fdatasync` for all of it (`write_out`, then the sync). After a
    /// failure the journal refuses appends until `reset` succeeds (its
    /// tail is unknown).
    pub(crate) fn sync(&mut self) -> Result<()> {
        self.write_out()?;
        if !self.unsynced {
            return Ok(());
        }
        #[cfg(test)]
        let r = match std::mem::take(&mut self.fail_next_sync) {
            true => Err(std::io::Error::from_raw_os_error(libc::EIO)),
            false => self.file.sync_data(),
        };
        #[cfg(not(test))]
        let r = self.file.sync_data();
        if let Err(e) = r {
            self.broken = true;
            return Err(Error::io(
                format!("sync journal {}", self.path.display()),
                e,
            ));
        }
        self.unsynced = false;
        Ok(())
    }

    /// Make the next `sync` fail with EIO (tests).
    #[cfg(test)]
    pub(crate) fn fail_next_sync(&mut self) {
        self.fail_next_sync = true;
    }

    /// Write what was appended and start the device's write of it
    /// (`sync_file_range`, which does not wait), without making it durable:
    /// the caller does other work (the group commit's unsynced redb commit)
    /// while the disk writes, and its `sync` then waits only for the rest.
    /// Nothing written this way is durable before `sync` returns.
    pub(crate) fn write_out(&mut self) -> Result<()> {
        if self.broken {
            return Err(self.broken_error());
        }
        if self.buf.is_empty() {
            return Ok(());
        }
        // The zeroed head after the last frame stops a scan there.
        self.buf.extend_from_slice(&[0u8; FRAME_HEAD as usize]);
        let r = self.file.write_all_at(&self.buf, self.written);
        let len = self.buf.len() as u64;
        self.buf.clear();
        if let Err(e) = r {
            self.broken = true;
            return Err(Error::io(
                format!("write journal {}", self.path.display()),
                e,
            ));
        }
        start_write_back(&self.file, self.written, len);
        self.written = self.pos;
        self.unsynced = true;
        Ok(())
    }

    /// Start again at the first frame, durably: records appended before
    /// are never read back (sequence numbers keep rising, so an older
    /// frame beyond the new tail does not continue the chain). Call once
    /// what they recorded is durable elsewhere. Unsynced appends are
    /// dropped.
    pub(crate) fn reset(&mut self) -> Result<()> {
        let start = self.next_seq;
        let mut block = vec![0u8; (HEADER_LEN + FRAME_HEAD) as usize];
        let h = header_bytes(self.capacity, start);
        block[..HEADER_BYTES].copy_from_slice(&h);
        block[HEADER_COPY as usize..HEADER_COPY as usize + HEADER_BYTES].copy_from_slice(&h);
        self.buf.clear();
        let r = self
            .file
            .write_all_at(&block, 0)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = r {
            // The header may say either start now: appending after it
            // could write where a scan never looks.
            self.broken = true;
            return Err(Error::io(
                format!("reset journal {}", self.path.display()),
                e,
            ));
        }
        self.start_seq = start;
        self.prev_crc = seed(start);
        self.pos = HEADER_LEN;
        self.written = HEADER_LEN;
        self.records = 0;
        self.broken = false;
        self.unsynced = false;
        Ok(())
    }

    /// Sequence number of the first record since the last reset: the
    /// records `open` returned are numbered from it.
    pub(crate) fn start_seq(&self) -> u64 {
        self.start_seq
    }

    /// The sequence number the next `append` gets.
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Bytes of frames since the last reset (synced or not).
    pub(crate) fn used(&self) -> u64 {
        self.pos - HEADER_LEN
    }

    /// Room for frames in all (the file's size less its header).
    pub(crate) fn room(&self) -> u64 {
        self.capacity - HEADER_LEN
    }

    /// Records since the last reset (synced or not).
    pub(crate) fn records(&self) -> u64 {
        self.records
    }

    /// A write or sync failed and no reset has succeeded since.
    pub(crate) fn is_broken(&self) -> bool {
        self.broken
    }

    fn broken_error(&self) -> Error {
        Error::Eio(format!(
            "journal {} failed a write; it is unusable until reset",
            self.path.display()
        ))
    }
}

/// Create the file at its full size, zeros written (see the module doc),
/// under a temporary name renamed into place once synced, so a crash
/// never leaves a journal without its header.
fn create(path: &Path, capacity: u64) -> Result<()> {
    if capacity < MIN_CAPACITY {
        return Err(Error::Invalid(format!(
            "journal capacity {capacity} is below {MIN_CAPACITY} bytes"
        )));
    }
    let tmp = path.with_extension("new");
    let ctx = |what: &str| format!("{what} journal {}", tmp.display());
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| Error::io(ctx("create"), e))?;
    let zeros = vec![0u8; 1 << 20];
    let mut left = capacity;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        f.write_all(&zeros[..n])
            .map_err(|e| Error::io(ctx("fill"), e))?;
        left -= n as u64;
    }
    let h = header_bytes(capacity, 1);
    f.write_all_at(&h, 0)
        .and_then(|()| f.write_all_at(&h, HEADER_COPY))
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(ctx("write header of"), e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| Error::io(ctx("rename"), e))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("sync directory {}", dir.display()), e))
}

/// Ask the kernel to start writing `len` bytes of `f` at `offset` to the
/// device now, without waiting (`SYNC_FILE_RANGE_WRITE`). Only a head
/// start for the `fdatasync` that follows, which is what makes them
/// durable; a failure here is found again by that sync.
fn start_write_back(f: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain system call on an open descriptor; no memory is
    // passed.
    unsafe {
        libc::sync_file_range(
            f.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

fn header_bytes(capacity: u64, start_seq: u64) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[0..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..20].copy_from_slice(&capacity.to_le_bytes());
    h[20..28].copy_from_slice(&start_seq.to_le_bytes());
    let crc = crc32c(0, &h[..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// (capacity, start seq) of a whole header copy.
fn parse_header(h: &[u8]) -> Option<(u64, u64)> {
    if &h[0..8] != MAGIC || u32::from_le_bytes(h[8..12].try_into().ok()?) != VERSION {
        return None;
    }
    if crc32c(0, &h[..28]) != u32::from_le_bytes(h[28..32].try_into().ok()?) {
        return None;
    }
    let capacity = u64::from_le_bytes(h[12..20].try_into().ok()?);
    let start = u64::from_le_bytes(h[20..28].try_into().ok()?);
    (capacity >= MIN_CAPACITY).then_some((capacity, start))
}

/// The chain's first "previous checksum", from the start sequence.
fn seed(start_seq: u64) -> u32 {
    crc32c(0, &start_seq.to_le_bytes())
}

fn frame_crc(prev: u32, head12: &[u8], payload: &[u8]) -> u32 {
    let c = crc32c(0, &prev.to_le_bytes());
    let c = crc32c(c, head12);
    crc32c(c, payload)
}

/// CRC32C (Castagnoli), continuing from `crc` (0 to start).
pub(crate) fn crc32c(crc: u32, data: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("sse4.2") {
            // SAFETY: the CPU has SSE4.2 (checked just above).
            return unsafe { crc32c_sse42(crc, data) };
        }
    }
    crc32c_table(crc, data)
}

/// Reflected Castagnoli polynomial.
const POLY: u32 = 0x82F6_3B78;

const TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

fn crc32c_table(crc: u32, data: &[u8]) -> u32 {
    let mut c = !crc;
    for &b in data {
        c = TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
unsafe fn crc32c_sse42(crc: u32, data: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u64, _mm_crc32_u8};
    let mut c = !crc as u64;
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        c = _mm_crc32_u64(c, u64::from_le_bytes(w.try_into().expect("8")));
    }
    let mut c = c as u32;
    for &b in words.remainder() {
        c = _mm_crc32_u8(c, b);
    }
    !c
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Dir {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "coda-journal-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
        fn file(&self) -> PathBuf {
            self.0.join("journal")
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn rec(i: u32, len: usize) -> Vec<u8> {
        (0..len).map(|k| (i as usize * 31 + k) as u8).collect()
    }

    #[test]
    fn crc32c_matches_the_standard_check_value_both_ways() {
        // The check value of CRC-32C over "123456789" (RFC 3720).
        assert_eq!(crc32c_table(0, b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(0, b"123456789"), 0xE306_9283);
        let data = rec(7, 1000);
        assert_eq!(crc32c(0, &data), crc32c_table(0, &data));
        // Continuing equals one pass.
        assert_eq!(
            crc32c(crc32c(0, &data[..333]), &data[333..]),
            crc32c(0, &data)
        );
    }

    #[test]
    fn records_round_trip_across_reopens() {
        let d = Dir::new("rt");
        let (mut j, got) = Journal::open(&d.file(), 64 << 10).unwrap();
        assert!(got.is_empty());
        assert_eq!(std::fs::metadata(d.file()).unwrap().len(), 64 << 10);
        for i in 0..5 {
            j.append(&rec(i, 100 + i as usize)).unwrap();
        }
        j.sync().unwrap();
        j.append(&rec(5, 0)).unwrap();
        j.sync().unwrap();
        drop(j);
        let (mut j, got) = Journal::open(&d.file(), 64 << 10).unwrap();
        let want: Vec<Vec<u8>> = (0..5)
            .map(|i| rec(i, 100 + i as usize))
            .chain([Vec::new()])
            .collect();
        assert_eq!(got, want);
        assert_eq!((j.start_seq(), j.next_seq()), (1, 7));
        // Appends continue the chain after the records read back.
        j.append(&rec(9, 10)).unwrap();
        j.sync().unwrap();
        drop(j);
        let (_, got) = Journal::open(&d.file(), 64 << 10).unwrap();
        assert_eq!(got.len(), 7);
        assert_eq!(got[6], rec(9, 10));
    }

    #[test]
    fn unsynced_appends_are_not_read_back() {
        let d = Dir::new("unsynced");
        let (mut j, _) = Journal::open(&d.file(), 64 << 10).unwrap();
        j.append(&rec(1, 10)).unwrap();
        j.sync().unwrap();
        j.append(&rec(2, 10)).unwrap();
        drop(j);
        let (_, got) = Journal::open(&d.file(), 64 << 10).unwrap();
        assert_eq!(got, vec![rec(1, 10)]);
    }

    /// A record written out (its device write started) and synced later
    /// reads back like one synced at once, and appends after it continue
    /// the chain; a second sync with nothing new writes nothing.
    #[test]
    fn a_record_written_out_then_synced_reads_back_and_the_chain_goes_on() {
        let d = Dir::new("writeout");
        let (mut j, _) = Journal::open(&d.file(), 64 << 10).unwrap();
        j.append(&rec(1, 300)).unwrap();
        j.write_out().unwrap();
        assert!(j.unsynced, "written, not yet durable");
        j.sync().unwrap();
        assert!(!j.unsynced);
        j.sync().unwrap();
        j.append(&rec(2, 20)).unwrap();
        j.write_out().unwrap();
        j.append(&rec(3, 30)).unwrap();
        j.sync().unwrap();
        drop(j);
        let (_, got) = Journal::open(&d.file(), 64 << 10).unwrap();
        assert_eq!(got, vec![rec(1, 300), rec(2, 20), rec(3, 30)]);
    }

    #[test]
    fn a_torn_last_record_is_ignored_and_the_rest_read_back() {
        let d = Dir::new("torn");
        let (mut j, _) = Journal::open(&d.file(), 64 << 10).unwrap();
        for i in 0..3 {
            j.append(&rec(i, 200)).unwrap();
        }
        j.sync().unwrap();
        drop(j);
        // Tear the last record: its second half never reached the disk.
        let last_end = HEADER_LEN + 3 * (FRAME_HEAD + 200);
        let f = OpenOptions::new().write(true).open(d.file()).unwrap();
        f.write_all_at(&[0u8; 100], last_end - 100).unwrap();
        drop(f);
        let (mut j, got) = Journal::open(&d.file(), 64 << 10).unwrap();
        assert_eq!(got, vec![rec(0, 200), rec(1, 200)]);
        // New records replace the torn one and read back after the rest.
        j.append(&rec(7, 50)).unwrap();
        j.sync().unwrap();
        drop(j);
        let (_, got) = Journal::open(&d.file(), 64 << 10).unwrap();
        assert_eq!(got, vec![rec(0, 200), rec(1, 200), rec(7, 50)]);
        // A flipped byte inside a record ends the chain there too.
        let f = OpenOptions::new().write(true).open(d.file()).unwrap();
        f.write_all_at(&[0xff], HEADER_LEN + FRAME_HEAD + 200 + FRAME_HEAD + 5)
            .unwrap();
        drop(f);
        let (_, got) = Journal::open(&d.file(), 64 << 10).unwrap();
        assert_eq!(got, vec![rec(0, 200)]);
    }

    #[test]
    fn after_a_reset_old_records_never_come_back() {
        let d = Dir::new("reset");
        let (mut j, _) = Journal::open(&d.file(), 64 << 10).unwrap();
        for i in 0..4 {
            j.append(&rec(i, 300)).unwrap();
        }
        j.sync().unwrap();
        j.reset().unwrap();
        assert_eq!((j.used(), j.records()), (0, 0));
        drop(j);
        let (mut j, got) = Journal::open(&d.file(), 64 << 10).unwrap();
        assert!(got.is_empty(), "nothing since the reset");
        // A shorter record at the start: the old ones beyond it (lower
        // sequence numbers, another chain) stay dead.
        j.append(&rec(8, 300)).unwrap();
        j.sync().unwrap();
        drop(j);
        let (_, got) = Journal::open(&d.file(), 64 << 10).unwrap();
        assert_eq!(got, vec![rec(8, 300)]);
        // Numbering went on from before the reset.
        assert_eq!(j2_start(&d), 5);
        // A reset torn by a crash (one header copy destroyed) keeps the
        // other copy.
        let f = OpenOptions::new().write(true).open(d.file()).unwrap();
        f.write_all_at(&[0u8; 32], 0).unwrap();
        drop(f);
        let (_, got) = Journal::open(&d.file(), 64 << 10).unwrap();
        assert_eq!(got, vec![rec(8, 300)]);
    }

    fn j2_start(d: &Dir) -> u64 {
        Journal::open(&d.file(), 64 << 10).unwrap().0.start_seq()
    }

    #[test]
    fn a_full_journal_refuses_until_reset() {
        let d = Dir::new("full");
        let cap = MIN_CAPACITY;
        let (mut j, _) = Journal::open(&d.file(), cap).unwrap();
        let mut n = 0;
        while j.fits(1000) {
            j.append(&rec(n, 1000)).unwrap();
            n += 1;
        }
        assert_eq!(n, 4, "4 KiB of room holds 4 frames of 1,016 bytes");
        let e = j.append(&rec(99, 1000)).unwrap_err();
        assert!(matches!(e, Error::NoSpace(_)), "{e:?}");
        j.sync().unwrap();
        drop(j);
        let (mut j, got) = Journal::open(&d.file(), cap).unwrap();
        assert_eq!(got.len(), 4);
        assert!(!j.fits(1000));
        j.reset().unwrap();
        assert!(j.fits(1000));
        j.append(&rec(50, 1000)).unwrap();
        j.sync().unwrap();
        drop(j);
        let (_, got) = Journal::open(&d.file(), cap).unwrap();
        assert_eq!(got, vec![rec(50, 1000)]);
    }

    #[test]
    fn a_journal_without_a_valid_header_is_an_error_not_empty() {
        let d = Dir::new("header");
        let (j, _) = Journal::open(&d.file(), 64 << 10).unwrap();
        drop(j);
        let f = OpenOptions::new().write(true).open(d.file()).unwrap();
        f.write_all_at(&[0u8; 1024], 0).unwrap();
        drop(f);
        let e = Journal::open(&d.file(), 64 << 10).unwrap_err();
        assert!(e.to_string().contains("no valid header"), "{e}");
    }
}
