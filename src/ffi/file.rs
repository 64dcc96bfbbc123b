//! `coda_file`: an open file, backed by its container in the cache.

use std::ffi::{c_char, c_int, c_void};

use super::client::{client, coda_client};
use super::{boundary, boundary_i64, c_str, handle, handle_mut, out_ptr};
use crate::client::File;
use crate::Error;

/// An open file. Belongs to one thread at a time.
pub struct coda_file {
    inner: File,
}

/// Open `path` with the host's `O_*` flags (`O_RDONLY`, `O_WRONLY`, `O_RDWR`,
/// `O_CREAT`, `O_EXCL`, `O_TRUNC`, `O_APPEND`); `mode` applies on create.
/// The whole file is fetched into the cache (or found valid there).
#[no_mangle]
pub extern "C" fn coda_open(
    client: *mut coda_client,
    path: *const c_char,
    flags: c_int,
    mode: u32,
    out: *mut *mut coda_file,
) -> c_int {
    boundary(|| {
        let c = self::client(client)?;
        let path = c_str(path, "path")?;
        let out = out_ptr(out, "out")?;
        let f = c.open(path, flags, mode)?;
        // SAFETY: checked non-NULL above.
        unsafe { *out = Box::into_raw(Box::new(coda_file { inner: f })) };
        Ok(0)
    })
}

/// The OS file descriptor of the cached container: reads and writes on it
/// run at local-disk speed. Owned by the file: do not close it.
#[no_mangle]
pub extern "C" fn coda_file_fd(file: *const coda_file) -> c_int {
    boundary(|| Ok(handle(file, "file")?.inner.fd()))
}

fn check_buf(p: *const c_void, len: usize) -> Result<usize, Error> {
    if p.is_null() && len > 0 {
        return Err(Error::Invalid("buffer is NULL".into()));
    }
    // A count must fit the i64 return value.
    Ok(len.min(isize::MAX as usize))
}

/// Read up to `len` bytes at `offset`; returns the bytes read (0 at end of
/// file) or a negative code.
#[no_mangle]
pub extern "C" fn coda_read(
    file: *mut coda_file,
    buf: *mut c_void,
    len: usize,
    offset: u64,
) -> i64 {
    boundary_i64(|| {
        let f = handle(file as *const coda_file, "file")?;
        let len = check_buf(buf, len)?;
        if len == 0 {
            return Ok(0);
        }
        // SAFETY: the caller gave `len` writable bytes at `buf`.
        let b = unsafe { std::slice::from_raw_parts_mut(buf as *mut u8, len) };
        Ok(f.inner.read_at(b, offset)? as i64)
    })
}

/// Write `len` bytes at `offset` (at the end with `O_APPEND`); returns the
/// bytes written or a negative code. The file is stored back on close.
#[no_mangle]
pub extern "C" fn coda_write(
    file: *mut coda_file,
    buf: *const c_void,
    len: usize,
    offset: u64,
) -> i64 {
    boundary_i64(|| {
        let f = handle_mut(file, "file")?;
        let len = check_buf(buf, len)?;
        if len == 0 {
            return Ok(0);
        }
        // SAFETY: the caller gave `len` readable bytes at `buf`.
        let b = unsafe { std::slice::from_raw_parts(buf as *const u8, len) };
        Ok(f.inner.write_at(b, offset)? as i64)
    })
}

/// Close the file, storing it back to the server if it was written, and
/// free it (always, even on failure). Returns the store's result. NULL is
/// `-EINVAL`.
#[no_mangle]
pub extern "C" fn coda_close(file: *mut coda_file) -> c_int {
    boundary(|| {
        if file.is_null() {
            return Err(Error::Invalid("file is NULL".into()));
        }
        // SAFETY: made by coda_open, not closed before (caller's contract).
        let f = unsafe { Box::from_raw(file) };
        f.inner.close()?;
        Ok(0)
    })
}
