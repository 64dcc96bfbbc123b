//! Access lists and identity: `coda_acl_get`, `coda_acl_set`,
//! `coda_whoami`. They always ask the server: while it does not answer
//! they fail with `-EIO` (or `-ETIMEDOUT`).

use std::ffi::{c_char, c_int, c_void, CString};

use super::client::{client, coda_client};
use super::{boundary, c_str, out_ptr};
use crate::Error;

/// Right `r`: read the files of the directory.
pub const CODA_ACL_READ: u32 = 1;
/// Right `l`: look up, list, get status.
pub const CODA_ACL_LOOKUP: u32 = 2;
/// Right `i`: insert new names.
pub const CODA_ACL_INSERT: u32 = 4;
/// Right `d`: delete names.
pub const CODA_ACL_DELETE: u32 = 8;
/// Right `w`: write files and their attributes.
pub const CODA_ACL_WRITE: u32 = 16;
/// Right `k`: lock.
pub const CODA_ACL_LOCK: u32 = 32;
/// Right `a`: administer the access list.
pub const CODA_ACL_ADMINISTER: u32 = 64;

/// Call `cb` once per entry of the access list of the directory `path`:
/// the user or group name, its rights (`CODA_ACL_*` bits) and whether the
/// entry is negative (1) or positive (0); a non-zero return stops early.
/// Returns the calling user's own rights on the directory (`CODA_ACL_*`
/// bits, >= 0), or a negative errno: `-EACCES` without the `l` right,
/// `-ENOTDIR` for a non-directory.
#[no_mangle]
pub extern "C" fn coda_acl_get(
    client: *mut coda_client,
    path: *const c_char,
    cb: Option<
        extern "C" fn(
            userdata: *mut c_void,
            name: *const c_char,
            rights: u32,
            negative: c_int,
        ) -> c_int,
    >,
    userdata: *mut c_void,
) -> c_int {
    boundary(|| {
        let c = self::client(client)?;
        let path = c_str(path, "path")?;
        let cb = cb.ok_or_else(|| Error::Invalid("acl callback is NULL".into()))?;
        let acl = c.acl_get(path)?;
        for e in &acl.entries {
            let name = CString::new(e.name.as_str())
                .map_err(|_| Error::Protocol("acl name holds NUL".into()))?;
            if cb(
                userdata,
                name.as_ptr(),
                e.rights as u32,
                e.negative as c_int,
            ) != 0
            {
                break;
            }
        }
        Ok(acl.rights as c_int)
    })
}

/// Set `name`'s entry in the access list of the directory `path`. `rights`
/// as `coda setacl` takes them: letters of `rlidwka`, `all`, `read`,
/// `write`, a leading `-` for a negative entry, `none` (`-none`) to remove
/// the positive (negative) entry. Needs the `a` right (`-EACCES`); an
/// unknown user or group is `-ENOENT`, bad rights `-EINVAL`.
#[no_mangle]
pub extern "C" fn coda_acl_set(
    client: *mut coda_client,
    path: *const c_char,
    name: *const c_char,
    rights: *const c_char,
) -> c_int {
    boundary(|| {
        let c = self::client(client)?;
        c.acl_set(
            c_str(path, "path")?,
            c_str(name, "name")?,
            c_str(rights, "rights")?,
        )?;
        Ok(0)
    })
}

/// Copy the name of the user the client authenticates as into `buf` (NUL
/// terminated, truncated to fit `len`); returns the name's full length.
#[no_mangle]
pub extern "C" fn coda_whoami(client: *mut coda_client, buf: *mut c_char, len: usize) -> c_int {
    boundary(|| {
        let c = self::client(client)?;
        let buf = out_ptr(buf, "buf")?;
        if len == 0 {
            return Err(Error::Invalid("buffer length is 0".into()));
        }
        let user = c.whoami()?.user;
        let n = user.len().min(len - 1);
        // SAFETY: the caller gave `len` writable bytes at `buf`.
        unsafe {
            std::ptr::copy_nonoverlapping(user.as_ptr(), buf as *mut u8, n);
            *buf.add(n) = 0;
        }
        Ok(user.len() as c_int)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_c_constants_are_the_wire_bits() {
        use crate::proto::acl::*;
        let c = [
            super::CODA_ACL_READ,
            super::CODA_ACL_LOOKUP,
            super::CODA_ACL_INSERT,
            super::CODA_ACL_DELETE,
            super::CODA_ACL_WRITE,
            super::CODA_ACL_LOCK,
            super::CODA_ACL_ADMINISTER,
        ];
        let w = [READ, LOOKUP, INSERT, DELETE, WRITE, LOCK, ADMINISTER];
        assert_eq!(c.to_vec(), w.iter().map(|b| *b as u32).collect::<Vec<_>>());
    }
}
