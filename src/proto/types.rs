//! Values shared by messages: fids, attributes, directory entries.

use std::fmt;

/// A file's stable identity: (volume, vnode, uniquifier). Names change, fids don't.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Fid {
    /// The volume holding the object.
    pub volume: u32,
    /// The object's number within the volume.
    pub vnode: u64,
    /// Distinguishes reuses of a vnode number.
    pub unique: u32,
}

impl Fid {
    /// A fid from its parts.
    pub const fn new(volume: u32, vnode: u64, unique: u32) -> Fid {
        Fid {
            volume,
            vnode,
            unique,
        }
    }

    /// A stable inode number derived from the fid (for `stat` and FUSE).
    pub fn ino(&self) -> u64 {
        // vnodes are allocated densely per volume; the volume goes in the high bits.
        ((self.volume as u64) << 48) ^ self.vnode
    }

    /// Fixed 16-byte key form, used in redb tables on both sides.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&self.volume.to_be_bytes());
        b[4..12].copy_from_slice(&self.vnode.to_be_bytes());
        b[12..].copy_from_slice(&self.unique.to_be_bytes());
        b
    }

    /// A fid from its 16-byte wire form.
    pub fn from_bytes(b: &[u8; 16]) -> Fid {
        Fid {
            volume: u32::from_be_bytes(b[..4].try_into().unwrap()),
            vnode: u64::from_be_bytes(b[4..12].try_into().unwrap()),
            unique: u32::from_be_bytes(b[12..].try_into().unwrap()),
        }
    }
}

impl fmt::Display for Fid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}.{:x}.{:x}", self.volume, self.vnode, self.unique)
    }
}

/// What kind of object a fid names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FileType {
    /// A regular file.
    File = 1,
    /// A directory.
    Dir = 2,
    /// A symbolic link.
    Symlink = 3,
    /// A named pipe (metadata only: no data is stored).
    Fifo = 4,
    /// A Unix domain socket's name (metadata only).
    Socket = 5,
    /// A character device node (metadata only: type and `rdev`).
    CharDev = 6,
    /// A block device node (metadata only: type and `rdev`).
    BlockDev = 7,
}

impl FileType {
    /// The type for a wire code; `None` for an unknown one.
    pub fn from_u8(v: u8) -> Option<FileType> {
        match v {
            1 => Some(FileType::File),
            2 => Some(FileType::Dir),
            3 => Some(FileType::Symlink),
            4 => Some(FileType::Fifo),
            5 => Some(FileType::Socket),
            6 => Some(FileType::CharDev),
            7 => Some(FileType::BlockDev),
            _ => None,
        }
    }

    /// The `S_IF*` bits of `st_mode` for this type.
    pub fn mode_bits(self) -> u32 {
        match self {
            FileType::File => libc::S_IFREG,
            FileType::Dir => libc::S_IFDIR,
            FileType::Symlink => libc::S_IFLNK,
            FileType::Fifo => libc::S_IFIFO,
            FileType::Socket => libc::S_IFSOCK,
            FileType::CharDev => libc::S_IFCHR,
            FileType::BlockDev => libc::S_IFBLK,
        }
    }

    /// The type of a special file from the `S_IF*` bits of a mode (what
    /// `mknod` takes); `None` for a file, directory or symlink.
    pub fn special_from_mode(mode: u32) -> Option<FileType> {
        match mode & libc::S_IFMT {
            libc::S_IFIFO => Some(FileType::Fifo),
            libc::S_IFSOCK => Some(FileType::Socket),
            libc::S_IFCHR => Some(FileType::CharDev),
            libc::S_IFBLK => Some(FileType::BlockDev),
            _ => None,
        }
    }

    /// Fifos, sockets and device nodes: metadata only, never data.
    pub fn is_special(self) -> bool {
        matches!(
            self,
            FileType::Fifo | FileType::Socket | FileType::CharDev | FileType::BlockDev
        )
    }
}

/// Seconds and nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, PartialOrd, Ord)]
pub struct Timespec {
    /// Seconds since the epoch.
    pub sec: i64,
    /// Nanoseconds within the second.
    pub nsec: u32,
}

impl Timespec {
    /// The current time.
    pub fn now() -> Timespec {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timespec {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        }
    }
}

/// An object's status as the server keeps it. `version` grows by one with
/// every mutation of the object (for a directory: of its entries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    /// The object.
    pub fid: Fid,
    /// Its type.
    pub ftype: FileType,
    /// Permission bits only (`0o7777`); the type is `ftype`.
    pub mode: u32,
    /// Link count.
    pub nlink: u32,
    /// Size in bytes.
    pub size: u64,
    /// Last modification of the contents.
    pub mtime: Timespec,
    /// Last change of the attributes.
    pub ctime: Timespec,
    /// The object's version on the server.
    pub version: u64,
    /// Numeric owner (plain POSIX metadata, see docs/MOUNT.md "POSIX").
    pub uid: u32,
    /// Numeric group.
    pub gid: u32,
    /// Last access, as set explicitly (the server never moves it on reads).
    pub atime: Timespec,
    /// Device number of a character or block device node; 0 otherwise.
    pub rdev: u64,
}

impl Attr {
    /// POSIX `st_mode`: type bits plus permission bits.
    pub fn st_mode(&self) -> u32 {
        self.ftype.mode_bits() | (self.mode & 0o7777)
    }
}

/// An object's extended attributes: (name, value) pairs in name order.
pub type Xattrs = Vec<(String, Vec<u8>)>;

/// One name in a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// The name (one path component).
    pub name: String,
    /// The object it names.
    pub fid: Fid,
    /// That object's type.
    pub ftype: FileType,
}
