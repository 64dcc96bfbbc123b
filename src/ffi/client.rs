//! `coda_client` and the path operations on it.

use std::ffi::{c_char, c_int, c_void, CString};

use super::config::coda_config;
use super::{boundary, boundary_void, c_str, handle, out_ptr};
use crate::client::{Client, ClientState, Stat};
use crate::proto::FileType;
use crate::{Error, Result};

/// A connected client (Venus). Safe to use from many threads at once.
pub struct coda_client {
    pub(crate) inner: Client,
}

/// Connected to at least one server.
pub const CODA_STATE_CONNECTED: c_int = 1;
/// No server answers; cached objects are served, others fail.
pub const CODA_STATE_DISCONNECTED: c_int = 2;
/// Failed over: every remote operation returns -EIO until failback.
pub const CODA_STATE_FAILED_OVER: c_int = 3;

/// Entry types passed to the readdir callback: a regular file.
pub const CODA_TYPE_FILE: u32 = 1;
/// A directory.
pub const CODA_TYPE_DIR: u32 = 2;
/// A symbolic link.
pub const CODA_TYPE_SYMLINK: u32 = 3;
/// A special file: fifo, socket or device node (metadata only).
pub const CODA_TYPE_SPECIAL: u32 = 4;

/// What `coda_stat` reports. Fixed-width fields; `mode` is POSIX `st_mode`
/// with the type bits; `ino` is derived from the fid and stable.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct coda_stat_t {
    /// Size in bytes.
    pub size: u64,
    /// POSIX `st_mode`: type and permission bits.
    pub mode: u32,
    /// Link count.
    pub nlink: u32,
    /// Modification time, seconds since the epoch.
    pub mtime_sec: i64,
    /// Modification time, nanoseconds within the second.
    pub mtime_nsec: u32,
    /// Inode number, derived from the fid and stable.
    pub ino: u64,
    /// The object's version on the server (grows with every change).
    pub version: u64,
}

impl From<&Stat> for coda_stat_t {
    fn from(s: &Stat) -> coda_stat_t {
        coda_stat_t {
            size: s.size,
            mode: s.mode,
            nlink: s.nlink,
            mtime_sec: s.mtime.sec,
            mtime_nsec: s.mtime.nsec,
            ino: s.ino,
            version: s.version,
        }
    }
}

pub(crate) fn client<'a>(p: *mut coda_client) -> Result<&'a Client> {
    Ok(&handle(p as *const coda_client, "client")?.inner)
}

/// Connect and authenticate with the options in `cfg` (which stays the
/// caller's). `cache_dir` and `secret_file` must be set (`secret_file`
/// not with `user` = `anonymous`).
#[no_mangle]
pub extern "C" fn coda_client_new(cfg: *const coda_config, out: *mut *mut coda_client) -> c_int {
    boundary(|| {
        let cfg = handle(cfg, "cfg")?;
        let out = out_ptr(out, "out")?;
        let c = Client::new(cfg.inner.clone())?;
        // SAFETY: checked non-NULL above.
        unsafe { *out = Box::into_raw(Box::new(coda_client { inner: c })) };
        Ok(0)
    })
}

/// Disconnect and free the client. NULL is allowed. No other thread may be
/// using the client.
#[no_mangle]
pub extern "C" fn coda_client_free(client: *mut coda_client) {
    boundary_void(|| {
        if !client.is_null() {
            // SAFETY: made by coda_client_new, not freed before (caller's contract).
            drop(unsafe { Box::from_raw(client) });
        }
    })
}

/// The client's state: one of `CODA_STATE_*`.
#[no_mangle]
pub extern "C" fn coda_client_state(client: *mut coda_client) -> c_int {
    boundary(|| {
        Ok(match self::client(client)?.state() {
            ClientState::Connected => CODA_STATE_CONNECTED,
            ClientState::Disconnected => CODA_STATE_DISCONNECTED,
            ClientState::FailedOver => CODA_STATE_FAILED_OVER,
        })
    })
}

fn stat_with(
    client: *mut coda_client,
    path: *const c_char,
    out: *mut coda_stat_t,
    follow: bool,
) -> c_int {
    boundary(|| {
        let c = self::client(client)?;
        let path = c_str(path, "path")?;
        let out = out_ptr(out, "out")?;
        let st = if follow {
            c.stat(path)?
        } else {
            c.lstat(path)?
        };
        // SAFETY: checked non-NULL above.
        unsafe { *out = coda_stat_t::from(&st) };
        Ok(0)
    })
}

/// Status of `path`, following a final symlink.
#[no_mangle]
pub extern "C" fn coda_stat(
    client: *mut coda_client,
    path: *const c_char,
    out: *mut coda_stat_t,
) -> c_int {
    stat_with(client, path, out, true)
}

/// Status of `path` itself (a final symlink is not followed).
#[no_mangle]
pub extern "C" fn coda_lstat(
    client: *mut coda_client,
    path: *const c_char,
    out: *mut coda_stat_t,
) -> c_int {
    stat_with(client, path, out, false)
}

/// Call `cb(userdata, name, type)` for each entry of the directory `path`
/// (no "." or ".."), `type` one of `CODA_TYPE_*`. `name` is borrowed for the
/// call. A non-zero return from `cb` stops early. Returns the number of
/// entries passed to `cb`.
#[no_mangle]
pub extern "C" fn coda_readdir(
    client: *mut coda_client,
    path: *const c_char,
    cb: Option<extern "C" fn(userdata: *mut c_void, name: *const c_char, ftype: u32) -> c_int>,
    userdata: *mut c_void,
) -> c_int {
    boundary(|| {
        let c = self::client(client)?;
        let path = c_str(path, "path")?;
        let cb = cb.ok_or_else(|| Error::Invalid("readdir callback is NULL".into()))?;
        let mut n = 0;
        for e in c.readdir(path)? {
            let name =
                CString::new(e.name).map_err(|_| Error::Protocol("entry name holds NUL".into()))?;
            let t = match e.ftype {
                FileType::File => CODA_TYPE_FILE,
                FileType::Dir => CODA_TYPE_DIR,
                FileType::Symlink => CODA_TYPE_SYMLINK,
                _ => CODA_TYPE_SPECIAL,
            };
            n += 1;
            if cb(userdata, name.as_ptr(), t) != 0 {
                break;
            }
        }
        Ok(n)
    })
}

/// Make the directory `path` with permission bits `mode`.
#[no_mangle]
pub extern "C" fn coda_mkdir(client: *mut coda_client, path: *const c_char, mode: u32) -> c_int {
    boundary(|| {
        self::client(client)?.mkdir(c_str(path, "path")?, mode)?;
        Ok(0)
    })
}

/// Remove the empty directory `path`.
#[no_mangle]
pub extern "C" fn coda_rmdir(client: *mut coda_client, path: *const c_char) -> c_int {
    boundary(|| {
        self::client(client)?.rmdir(c_str(path, "path")?)?;
        Ok(0)
    })
}

/// Remove the file or symlink `path`.
#[no_mangle]
pub extern "C" fn coda_unlink(client: *mut coda_client, path: *const c_char) -> c_int {
    boundary(|| {
        self::client(client)?.unlink(c_str(path, "path")?)?;
        Ok(0)
    })
}

/// Rename `from` to `to`, replacing a file or an empty directory at `to`.
#[no_mangle]
pub extern "C" fn coda_rename(
    client: *mut coda_client,
    from: *const c_char,
    to: *const c_char,
) -> c_int {
    boundary(|| {
        self::client(client)?.rename(c_str(from, "from")?, c_str(to, "to")?)?;
        Ok(0)
    })
}

/// Make a symlink at `linkpath` pointing to `target`.
#[no_mangle]
pub extern "C" fn coda_symlink(
    client: *mut coda_client,
    target: *const c_char,
    linkpath: *const c_char,
) -> c_int {
    boundary(|| {
        self::client(client)?.symlink(c_str(target, "target")?, c_str(linkpath, "linkpath")?)?;
        Ok(0)
    })
}

/// Copy the target of the symlink `path` into `buf` (NUL-terminated,
/// truncated to `len - 1` bytes) and return the target's full length.
#[no_mangle]
pub extern "C" fn coda_readlink(
    client: *mut coda_client,
    path: *const c_char,
    buf: *mut c_char,
    len: usize,
) -> c_int {
    boundary(|| {
        let c = self::client(client)?;
        let path = c_str(path, "path")?;
        let buf = out_ptr(buf, "buf")?;
        if len == 0 {
            return Err(Error::Invalid("buffer length is 0".into()));
        }
        let t = c.readlink(path)?;
        let n = t.len().min(len - 1);
        // SAFETY: the caller gave `len` writable bytes at `buf`.
        unsafe {
            std::ptr::copy_nonoverlapping(t.as_ptr(), buf as *mut u8, n);
            *buf.add(n) = 0;
        }
        Ok(t.len() as c_int)
    })
}

/// Set the permission bits of `path`.
#[no_mangle]
pub extern "C" fn coda_chmod(client: *mut coda_client, path: *const c_char, mode: u32) -> c_int {
    boundary(|| {
        self::client(client)?.chmod(c_str(path, "path")?, mode)?;
        Ok(0)
    })
}

/// Set the size of the file `path`.
#[no_mangle]
pub extern "C" fn coda_truncate(client: *mut coda_client, path: *const c_char, size: u64) -> c_int {
    boundary(|| {
        self::client(client)?.truncate(c_str(path, "path")?, size)?;
        Ok(0)
    })
}
