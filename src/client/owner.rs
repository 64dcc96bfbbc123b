//! The numeric owner a new object gets: the process's by default, or the
//! one a caller names (the mount creates as the requesting process).

/// The numeric owner and group a new object gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// Numeric user id.
    pub uid: u32,
    /// Numeric group id.
    pub gid: u32,
}

impl Owner {
    /// This process's effective user and group: the owner of objects the
    /// library creates unless a caller (the mount) says otherwise.
    pub fn process() -> Owner {
        // SAFETY: plain getters without preconditions.
        unsafe {
            Owner {
                uid: libc::geteuid(),
                gid: libc::getegid(),
            }
        }
    }
}
