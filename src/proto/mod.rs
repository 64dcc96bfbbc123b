//! The wire format: frames, messages, handshake and limits. No I/O policy
//! lives here; `docs/PROTOCOL.md` is the normative description.

pub mod acl;
pub mod auth;
pub mod codec;
pub mod frame;
pub mod handshake;
pub mod message;
pub mod types;
pub mod xattr;

pub use frame::{read_frame, write_frame, Frame};
pub use message::{extent_bytes, ConnKind, GroupMember, Msg, Record, RecordOp, Replaces, XattrHow};
pub use types::{Attr, DirEntry, Fid, FileType, Timespec, Xattrs};

/// Version carried in `Hello`; a server refuses any other.
pub const PROTOCOL_VERSION: u16 = 2;
/// Largest frame (type + id + body) accepted, checked before allocating.
pub const MAX_FRAME: usize = 1 << 20;
/// Largest name of a directory entry, in bytes.
pub const MAX_NAME: usize = 255;
/// Largest symlink target, in bytes.
pub const MAX_SYMLINK: usize = 4096;
/// Largest user name, in bytes.
pub const MAX_USER: usize = 64;
/// Most records in one reintegration batch.
pub const MAX_BATCH: usize = 4096;
/// Most fids in one GetAttrs or CallbackBreak.
pub const MAX_FIDS: usize = 16384;
/// Most entries in one ReadDir page.
pub const MAX_DIR_PAGE: usize = 2048;
/// Largest extended attribute name, in bytes (as Linux).
pub const MAX_XATTR_NAME: usize = 255;
/// Largest extended attribute value, in bytes (as Linux's `XATTR_SIZE_MAX`).
pub const MAX_XATTR_VALUE: usize = 65536;
/// Most bytes (names and values) of all extended attributes of one object.
pub const MAX_XATTR_BYTES: usize = 65536;
/// Most bytes of data one `StoreInline` or `CreateWith` record carries.
pub const MAX_INLINE: usize = 65536;
/// Largest error message carried on the wire.
pub const MAX_MESSAGE: usize = 4096;
/// Chunk size for raw bulk data on the bulk connection.
pub const BULK_CHUNK: usize = 256 * 1024;
/// The default port of coda-server.
pub const DEFAULT_PORT: u16 = 2432;

/// Check a directory-entry name: non-empty, at most [`MAX_NAME`] bytes, no
/// `/`, no NUL, not `.` or `..`. Servers refuse any other name, so no name can
/// climb out of its directory or volume.
pub fn check_name(name: &str) -> crate::Result<()> {
    use crate::Error;
    if name.is_empty() || name == "." || name == ".." {
        return Err(Error::Invalid(format!("bad name {name:?}")));
    }
    if name.len() > MAX_NAME {
        return Err(Error::NameTooLong(format!(
            "{} bytes, limit {MAX_NAME}",
            name.len()
        )));
    }
    if name.bytes().any(|b| b == b'/' || b == 0) {
        return Err(Error::Invalid(format!("name {name:?} holds '/' or NUL")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_that_could_escape_are_refused() {
        for bad in ["", ".", "..", "a/b", "/", "a\0b"] {
            assert!(super::check_name(bad).is_err(), "{bad:?}");
        }
        assert!(super::check_name(&"x".repeat(256)).is_err());
        assert!(super::check_name(&"x".repeat(255)).is_ok());
        assert!(super::check_name("...").is_ok());
    }
}
