//! Disconnected operation for C: reintegrate on demand, list the conflicts
//! reintegration found, and resolve them (keep the local or the server's
//! version).

use std::ffi::{c_char, c_int, c_void, CString};

use super::boundary;
use super::client::{client, coda_client};
use crate::client::Keep;
use crate::Error;

/// `coda_conflict_resolve`: send the local version again, replacing the server's.
pub const CODA_KEEP_LOCAL: c_int = 1;
/// `coda_conflict_resolve`: discard the local version; the server's stays.
pub const CODA_KEEP_SERVER: c_int = 2;

/// One conflict, borrowed for the duration of a `coda_conflicts_list`
/// callback: copy what you keep.
#[repr(C)]
pub struct coda_conflict {
    /// Pass to `coda_conflict_resolve`.
    pub id: u64,
    /// Inode number of the object the refused change is about.
    pub ino: u64,
    /// Its path when the conflict was found ("" if unknown).
    pub path: *const c_char,
    /// What the refused change did, e.g. "store", "create \"a\"".
    pub op: *const c_char,
    /// Why the server refused it.
    pub reason: *const c_char,
    /// The server's error kind: "Conflict" (changed on the server),
    /// "Exists" (name taken), "NotFound", "Stale"...
    pub kind: *const c_char,
    /// A file holding the local contents, or NULL if no file was stored.
    pub local_copy: *const c_char,
    /// Changes held with it (the refused one and those depending on it).
    pub records: u32,
}

fn cstring(s: &str) -> CString {
    CString::new(s.replace('\0', "?")).expect("NULs replaced")
}

/// Call `cb(userdata, conflict)` for each unresolved conflict, oldest first;
/// a non-zero return stops early. Returns the number passed to `cb`.
#[no_mangle]
pub extern "C" fn coda_conflicts_list(
    client: *mut coda_client,
    cb: Option<extern "C" fn(userdata: *mut c_void, conflict: *const coda_conflict) -> c_int>,
    userdata: *mut c_void,
) -> c_int {
    boundary(|| {
        let c = self::client(client)?;
        let cb = cb.ok_or_else(|| Error::Invalid("conflict callback is NULL".into()))?;
        let mut n = 0;
        for x in c.conflicts()? {
            let (path, op, reason, kind) = (
                cstring(&x.path),
                cstring(&x.op),
                cstring(&x.reason),
                cstring(&x.kind),
            );
            let copy = x
                .local_copy
                .as_ref()
                .map(|p| cstring(&p.display().to_string()));
            let item = coda_conflict {
                id: x.id,
                ino: x.fid.ino(),
                path: path.as_ptr(),
                op: op.as_ptr(),
                reason: reason.as_ptr(),
                kind: kind.as_ptr(),
                local_copy: copy.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
                records: x.records as u32,
            };
            n += 1;
            if cb(userdata, &item) != 0 {
                break;
            }
        }
        Ok(n)
    })
}

/// Resolve conflict `id`: `CODA_KEEP_LOCAL` (needs a server; `CODA_ECONFLICT`
/// if the server refuses again, which is then a new conflict) or
/// `CODA_KEEP_SERVER`. `-ENOENT` for an unknown id.
#[no_mangle]
pub extern "C" fn coda_conflict_resolve(client: *mut coda_client, id: u64, keep: c_int) -> c_int {
    boundary(|| {
        let c = self::client(client)?;
        let keep = match keep {
            CODA_KEEP_LOCAL => Keep::Local,
            CODA_KEEP_SERVER => Keep::Server,
            k => return Err(Error::Invalid(format!("keep {k}"))),
        };
        c.resolve_conflict(id, keep)?;
        Ok(0)
    })
}

/// Send every logged change now (whatever its age), reconnecting if
/// disconnected. Returns 0 once the log is empty (conflicts set aside), or
/// `-EIO`/`-ETIMEDOUT` if no server answers (the log is kept).
#[no_mangle]
pub extern "C" fn coda_reintegrate(client: *mut coda_client) -> c_int {
    boundary(|| {
        self::client(client)?.reintegrate_now()?;
        Ok(0)
    })
}

/// Changes logged and not yet on the server (0 when connected and idle).
#[no_mangle]
pub extern "C" fn coda_pending_records(client: *mut coda_client) -> i64 {
    super::boundary_i64(|| Ok(self::client(client)?.pending_records() as i64))
}
