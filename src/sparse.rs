//! Holes stay holes: the data extents of a file (SEEK_DATA/SEEK_HOLE), so
//! transfers and copies move only the bytes that are there. A file system
//! without SEEK_DATA, or a file in too many pieces, is treated as one
//! extent (dense), which is always correct.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

/// Most extents one transfer names (16 bytes each on the wire); a file in
/// more pieces is sent densely.
pub const MAX_EXTENTS: usize = 4096;

/// The data extents `(offset, length)` of the first `length` bytes of `f`,
/// in order, not overlapping, none empty. The file offset of `f` is not
/// moved (it is restored).
pub fn data_extents(f: &File, length: u64) -> Vec<(u64, u64)> {
    if length == 0 {
        return Vec::new();
    }
    let dense = vec![(0, length)];
    let fd = f.as_raw_fd();
    // SAFETY: lseek on a descriptor owned by `f`, alive for this call.
    let saved = unsafe { libc::lseek(fd, 0, libc::SEEK_CUR) };
    let mut out = Vec::new();
    let mut pos = 0u64;
    let mut ok = true;
    // Bounded: each turn adds an extent or ends.
    while pos < length {
        // SAFETY: as above.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: no data after pos (a hole to the end). Anything else:
            // SEEK_DATA unsupported; send it all.
            ok = std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
            break;
        }
        let data = data as u64;
        if data >= length {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            ok = false;
            break;
        }
        let end = (hole as u64).min(length);
        if end <= data || out.len() == MAX_EXTENTS {
            ok = false;
            break;
        }
        out.push((data, end - data));
        pos = end;
    }
    if saved >= 0 {
        // SAFETY: as above.
        unsafe { libc::lseek(fd, saved, libc::SEEK_SET) };
    }
    if ok {
        out
    } else {
        dense
    }
}

/// Whether `extents` are what `data_extents` makes for a file of `length`
/// bytes: in order, not overlapping, none empty, within the file, at most
/// [`MAX_EXTENTS`]. The bytes they cover.
pub fn check_extents(extents: &[(u64, u64)], length: u64) -> Option<u64> {
    if extents.len() > MAX_EXTENTS {
        return None;
    }
    let mut end = 0u64;
    let mut total = 0u64;
    for &(off, len) in extents {
        let stop = off.checked_add(len)?;
        if len == 0 || off < end || stop > length {
            return None;
        }
        end = stop;
        total += len;
    }
    Some(total)
}

/// Make `dst` a copy of the first `length` bytes of `src` with the same
/// holes: `dst` is cut to `length` and only data extents are written.
pub fn copy_sparse(src: &File, dst: &File, length: u64) -> std::io::Result<()> {
    let src_len = src.metadata()?.len().min(length);
    dst.set_len(0)?;
    dst.set_len(length)?;
    let mut buf = vec![0u8; 256 * 1024];
    for (off, len) in data_extents(src, src_len) {
        let mut done = 0u64;
        while done < len {
            let want = (len - done).min(buf.len() as u64) as usize;
            let n = src.read_at(&mut buf[..want], off + done)?;
            if n == 0 {
                break; // the source shrank: the rest stays a hole
            }
            dst.write_all_at(&buf[..n], off + done)?;
            done += n as u64;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> (std::path::PathBuf, File) {
        let p = std::env::temp_dir().join(format!("coda-sparse-{tag}-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        (p, f)
    }

    #[test]
    fn holes_are_found_and_copied_as_holes() {
        let (p, f) = tmp("src");
        let len = 64 << 20;
        f.set_len(len).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"tail", len - 4).unwrap();
        let ext = data_extents(&f, len);
        assert_eq!(
            check_extents(&ext, len),
            Some(ext.iter().map(|e| e.1).sum())
        );
        let covered: u64 = ext.iter().map(|e| e.1).sum();
        // Where SEEK_DATA works (ext4, xfs, tmpfs, btrfs) only the two
        // written blocks are data; otherwise one dense extent.
        assert!(covered < 1 << 20 || ext == vec![(0, len)], "{ext:?}");
        let (q, g) = tmp("dst");
        copy_sparse(&f, &g, len).unwrap();
        let mut b = [0u8; 4];
        g.read_exact_at(&mut b, 0).unwrap();
        assert_eq!(&b, b"head");
        g.read_exact_at(&mut b, len - 4).unwrap();
        assert_eq!(&b, b"tail");
        g.read_exact_at(&mut b, len / 2).unwrap();
        assert_eq!(b, [0; 4]);
        use std::os::unix::fs::MetadataExt;
        let (a, c) = (
            f.metadata().unwrap().blocks(),
            g.metadata().unwrap().blocks(),
        );
        assert!(c <= a + 16, "the copy is no denser: {c} blocks vs {a}");
        let _ = std::fs::remove_file(p);
        let _ = std::fs::remove_file(q);
    }

    #[test]
    fn bad_extents_are_refused() {
        assert_eq!(check_extents(&[], 0), Some(0));
        assert_eq!(check_extents(&[(0, 5), (10, 5)], 15), Some(10));
        assert_eq!(check_extents(&[(0, 5), (4, 5)], 15), None, "overlap");
        assert_eq!(check_extents(&[(10, 5), (0, 5)], 15), None, "order");
        assert_eq!(check_extents(&[(0, 0)], 15), None, "empty");
        assert_eq!(check_extents(&[(10, 6)], 15), None, "past the end");
        assert_eq!(check_extents(&[(u64::MAX, 2)], u64::MAX), None);
    }
}
