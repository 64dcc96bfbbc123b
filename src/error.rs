//! The crate's one error type and the one place errno values are decided.
//!
//! Every failure inside the crate is an [`Error`]; the wire carries a stable
//! [`WireCode`](crate::error::WireCode) for it, and the C ABI turns it into a negative errno (or a
//! `CODA_E*` code at or below -10000 for what only this library can produce).

use std::fmt;
use std::io;

/// Library-specific codes, all at or below -10000 so they never collide with
/// an errno. A code is never reused for another meaning.
pub const CODA_ECONFLICT: i32 = -10001;
/// The server or a peer broke the protocol (a malformed or unexpected message).
pub const CODA_EPROTO: i32 = -10002;
/// A panic inside the library was caught at the C boundary.
pub const CODA_EPANIC: i32 = -10003;

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// What went wrong, with a human-readable detail (which path, which server).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The path or object does not exist (`ENOENT`).
    #[error("no such file or directory: {0}")]
    NotFound(String),
    /// The name is taken already (`EEXIST`).
    #[error("already exists: {0}")]
    Exists(String),
    /// A path component is not a directory (`ENOTDIR`).
    #[error("not a directory: {0}")]
    NotDir(String),
    /// A directory where a file was wanted (`EISDIR`).
    #[error("is a directory: {0}")]
    IsDir(String),
    /// The directory is not empty (`ENOTEMPTY`).
    #[error("directory not empty: {0}")]
    NotEmpty(String),
    /// A bad argument or configuration value (`EINVAL`).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// Not allowed (`EACCES`).
    #[error("permission denied: {0}")]
    Access(String),
    /// A name or path beyond the limits (`ENAMETOOLONG`).
    #[error("name too long: {0}")]
    NameTooLong(String),
    /// Too many symbolic links on the way (`ELOOP`).
    #[error("too many levels of symbolic links: {0}")]
    Loop(String),
    /// No space left on the server or in the cache (`ENOSPC`).
    #[error("no space left: {0}")]
    NoSpace(String),
    /// A volume's quota (or a per-session bound on staged uploads) would be
    /// exceeded: `EDQUOT`, distinct from a full disk.
    #[error("quota exceeded: {0}")]
    Quota(String),
    /// A reintegration conflict (`CODA_ECONFLICT`).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The protocol was broken (`CODA_EPROTO`).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Authentication failed (`EACCES`).
    #[error("authentication failed: {0}")]
    Auth(String),
    /// The object changed or vanished under a handle (`ESTALE`).
    #[error("stale file handle: {0}")]
    Stale(String),
    /// No answer in time (`ETIMEDOUT`).
    #[error("timed out: {0}")]
    Timeout(String),
    /// Temporarily impossible; retry (`EAGAIN`).
    #[error("try again: {0}")]
    Again(String),
    /// A pipelined batch was not applied because the batch it was sent
    /// after did not apply (`EAGAIN`: the client sends it again).
    #[error("not applied: {0}")]
    NotApplied(String),
    /// Remote operations are failed on purpose (failover) or the server is gone.
    #[error("I/O error: {0}")]
    Eio(String),
    /// A closed or unknown handle (`EBADF`).
    #[error("bad file handle: {0}")]
    BadHandle(String),
    /// A panic caught inside the library (`CODA_EPANIC`).
    #[error("panic inside the library: {0}")]
    Panic(String),
    /// An operating-system error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done (which file, which step).
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// Wrap an OS error with what we were doing when it happened.
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The positive errno (or negative `CODA_E*` code) for this error; the C ABI
    /// returns `-errno()` for errno values and the code itself otherwise.
    pub fn code(&self) -> i32 {
        use libc::*;
        match self {
            Error::NotFound(_) => -ENOENT,
            Error::Exists(_) => -EEXIST,
            Error::NotDir(_) => -ENOTDIR,
            Error::IsDir(_) => -EISDIR,
            Error::NotEmpty(_) => -ENOTEMPTY,
            Error::Invalid(_) => -EINVAL,
            Error::Access(_) => -EACCES,
            Error::NameTooLong(_) => -ENAMETOOLONG,
            Error::Loop(_) => -ELOOP,
            Error::NoSpace(_) => -ENOSPC,
            Error::Quota(_) => -EDQUOT,
            Error::Conflict(_) => CODA_ECONFLICT,
            Error::Protocol(_) => CODA_EPROTO,
            Error::Auth(_) => -EACCES,
            Error::Stale(_) => -ESTALE,
            Error::Timeout(_) => -ETIMEDOUT,
            Error::Again(_) | Error::NotApplied(_) => -EAGAIN,
            Error::Eio(_) => -EIO,
            Error::BadHandle(_) => -EBADF,
            Error::Panic(_) => CODA_EPANIC,
            Error::Io { source, .. } => match source.raw_os_error() {
                Some(e) if e > 0 => -e,
                _ => match source.kind() {
                    io::ErrorKind::NotFound => -ENOENT,
                    io::ErrorKind::PermissionDenied => -EACCES,
                    io::ErrorKind::AlreadyExists => -EEXIST,
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => -ETIMEDOUT,
                    io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData => -EINVAL,
                    _ => -EIO,
                },
            },
        }
    }

    /// The stable code this error travels under on the wire.
    pub fn wire_code(&self) -> WireCode {
        match self {
            Error::NotFound(_) => WireCode::NotFound,
            Error::Exists(_) => WireCode::Exists,
            Error::NotDir(_) => WireCode::NotDir,
            Error::IsDir(_) => WireCode::IsDir,
            Error::NotEmpty(_) => WireCode::NotEmpty,
            Error::Invalid(_) => WireCode::Invalid,
            Error::Access(_) => WireCode::Access,
            Error::NameTooLong(_) => WireCode::NameTooLong,
            Error::Loop(_) => WireCode::Invalid,
            Error::NoSpace(_) => WireCode::NoSpace,
            Error::Quota(_) => WireCode::Quota,
            Error::Conflict(_) => WireCode::Conflict,
            Error::Protocol(_) => WireCode::Protocol,
            Error::Auth(_) => WireCode::Auth,
            Error::Stale(_) => WireCode::Stale,
            Error::Timeout(_) | Error::Again(_) => WireCode::Busy,
            Error::NotApplied(_) => WireCode::NotApplied,
            Error::Eio(_) | Error::BadHandle(_) | Error::Panic(_) => WireCode::Io,
            Error::Io { source, .. } => match source.raw_os_error() {
                Some(libc::ENOSPC) => WireCode::NoSpace,
                Some(libc::EDQUOT) => WireCode::Quota,
                _ => WireCode::Io,
            },
        }
    }

    /// Rebuild an error received from a peer.
    pub fn from_wire(code: WireCode, message: String) -> Error {
        match code {
            WireCode::NotFound => Error::NotFound(message),
            WireCode::Exists => Error::Exists(message),
            WireCode::NotDir => Error::NotDir(message),
            WireCode::IsDir => Error::IsDir(message),
            WireCode::NotEmpty => Error::NotEmpty(message),
            WireCode::Invalid => Error::Invalid(message),
            WireCode::Access => Error::Access(message),
            WireCode::NameTooLong => Error::NameTooLong(message),
            WireCode::NoSpace => Error::NoSpace(message),
            WireCode::Conflict => Error::Conflict(message),
            WireCode::Protocol => Error::Protocol(message),
            WireCode::Auth => Error::Auth(message),
            WireCode::Stale => Error::Stale(message),
            WireCode::Busy => Error::Again(message),
            WireCode::Io => Error::Eio(message),
            WireCode::Quota => Error::Quota(message),
            WireCode::NotApplied => Error::NotApplied(message),
        }
    }

    /// Static text for a code as returned by [`Error::code`] (for `coda_strerror`).
    pub fn describe(code: i32) -> &'static str {
        match code {
            0 => "success",
            CODA_ECONFLICT => "conflict: the object changed on the server",
            CODA_EPROTO => "protocol error",
            CODA_EPANIC => "internal panic in the coda library",
            c if c < 0 && c > -4096 => errno_text(-c),
            _ => "unknown error code",
        }
    }
}

fn errno_text(e: i32) -> &'static str {
    use libc::*;
    match e {
        ENOENT => "no such file or directory",
        EEXIST => "file exists",
        ENOTDIR => "not a directory",
        EISDIR => "is a directory",
        ENOTEMPTY => "directory not empty",
        EINVAL => "invalid argument",
        EACCES => "permission denied",
        EPERM => "operation not permitted",
        ENAMETOOLONG => "file name too long",
        ELOOP => "too many levels of symbolic links",
        ENOSPC => "no space left on device",
        EDQUOT => "disk quota exceeded",
        ESTALE => "stale file handle",
        ETIMEDOUT => "timed out (server unreachable)",
        EAGAIN => "resource temporarily unavailable",
        EIO => "input/output error",
        EBADF => "bad file handle",
        ENOMEM => "out of memory",
        ERANGE => "result too large",
        ECONNREFUSED => "connection refused",
        EXDEV => "cross-volume link",
        EROFS => "read-only file system",
        EFBIG => "file too large",
        _ => "system error",
    }
}

/// Error codes as they travel on the wire (see docs/PROTOCOL.md). Stable numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum WireCode {
    /// `Error::NotFound`.
    NotFound = 1,
    /// `Error::Exists`.
    Exists = 2,
    /// `Error::NotDir`.
    NotDir = 3,
    /// `Error::IsDir`.
    IsDir = 4,
    /// `Error::NotEmpty`.
    NotEmpty = 5,
    /// `Error::Invalid`.
    Invalid = 6,
    /// `Error::Access`.
    Access = 7,
    /// `Error::NameTooLong`.
    NameTooLong = 8,
    /// `Error::NoSpace`.
    NoSpace = 9,
    /// `Error::Conflict`.
    Conflict = 10,
    /// `Error::Protocol`.
    Protocol = 11,
    /// `Error::Auth`.
    Auth = 12,
    /// `Error::Stale`.
    Stale = 13,
    /// The object is busy (`Error::Again` on the client).
    Busy = 14,
    /// A server-side I/O error (details stay on the server).
    Io = 15,
    /// `Error::Quota`.
    Quota = 16,
    /// `Error::NotApplied`: a `ReintegrateAfter` whose predecessor did not
    /// apply.
    NotApplied = 17,
}

impl WireCode {
    /// The code for a number read off the wire; `None` for an unknown one.
    pub fn from_u16(v: u16) -> Option<WireCode> {
        use WireCode::*;
        Some(match v {
            1 => NotFound,
            2 => Exists,
            3 => NotDir,
            4 => IsDir,
            5 => NotEmpty,
            6 => Invalid,
            7 => Access,
            8 => NameTooLong,
            9 => NoSpace,
            10 => Conflict,
            11 => Protocol,
            12 => Auth,
            13 => Stale,
            14 => Busy,
            15 => Io,
            16 => Quota,
            17 => NotApplied,
            _ => return None,
        })
    }
}

impl fmt::Display for WireCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

/// The context of an I/O failure inside the metadata store: the server
/// reopens the store after one (redb refuses every later write until then).
pub const METADATA_IO: &str = "metadata store";

/// redb refused because an earlier operation failed (not this one).
#[derive(Debug)]
pub(crate) struct PreviousIo;

impl fmt::Display for PreviousIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an earlier write failed; the store must be reopened")
    }
}

impl std::error::Error for PreviousIo {}

impl Error {
    /// The metadata store refused because of an earlier failure.
    pub(crate) fn is_previous_io(&self) -> bool {
        matches!(self, Error::Io { source, .. }
            if source.get_ref().is_some_and(|e| e.is::<PreviousIo>()))
    }
}

impl From<redb::Error> for Error {
    fn from(e: redb::Error) -> Error {
        match e {
            // Kept as an OS error so ENOSPC stays ENOSPC.
            redb::Error::Io(source) => Error::io(METADATA_IO, source),
            redb::Error::PreviousIo => Error::io(METADATA_IO, io::Error::other(PreviousIo)),
            // A local store failure, never `Eio`: the client reads `Eio` as
            // "the server is unreachable" (client/mode.rs `unreachable`).
            e => Error::io("metadata store error", io::Error::other(e.to_string())),
        }
    }
}

macro_rules! redb_into_error {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Error {
                Error::from(redb::Error::from(e))
            }
        }
    )*};
}
redb_into_error!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_wire_code_round_trips() {
        for v in 1..=17u16 {
            let c = WireCode::from_u16(v).unwrap();
            assert_eq!(c as u16, v);
            let e = Error::from_wire(c, "x".into());
            assert_eq!(e.wire_code(), c);
        }
        assert!(WireCode::from_u16(0).is_none());
        assert!(WireCode::from_u16(18).is_none());
    }

    #[test]
    fn library_codes_sit_below_minus_10000() {
        for c in [CODA_ECONFLICT, CODA_EPROTO, CODA_EPANIC] {
            assert!(c <= -10000);
            assert_ne!(Error::describe(c), "unknown error code");
        }
        assert_eq!(Error::NotFound("x".into()).code(), -libc::ENOENT);
        assert_eq!(Error::Eio("x".into()).code(), -libc::EIO);
    }
}
