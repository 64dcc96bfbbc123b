//! The floor of a writable FUSE mount on this machine (issue 11): a file
//! system in this process that serves the web pages of sections 1 and 2
//! from memory and does nothing else. Its open is answered at once, keeps
//! the kernel's pages (`FOPEN_KEEP_CACHE`) and asks for no flush; names and
//! attributes live an hour. Whatever it costs above a local directory is
//! what the kernel's FUSE costs per open and close (an OPEN request
//! answered, a RELEASE sent after the close), which no mount that is told
//! of opens can avoid: coda's figure is to be read against it.
//!
//! Mounted like coda's (FUSE threads with cloned descriptors, as many as
//! coda-mount's default); unmounted when dropped.

use std::ffi::OsStr;
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, ReplyAttr, ReplyData, ReplyEmpty, ReplyEntry, ReplyOpen, Request,
};

const TTL: Duration = Duration::from_secs(3600);
const ROOT: u64 = 1;
const WWW: u64 = 2;
/// Page `i` is inode `FIRST_PAGE + i`.
const FIRST_PAGE: u64 = 100;

struct Pages {
    pages: Vec<Vec<u8>>,
}

impl Pages {
    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let dir = ino == ROOT || ino == WWW;
        let size = if dir {
            0
        } else {
            self.pages.get(ino.checked_sub(FIRST_PAGE)? as usize)?.len() as u64
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: if dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm: if dir { 0o755 } else { 0o644 },
            nlink: if dir { 2 } else { 1 },
            uid: 0,
            gid: 0,
            rdev: 0,
            flags: 0,
            blksize: 4096,
        })
    }
}

impl Filesystem for Pages {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = name.to_str().unwrap_or("");
        let ino = match u64::from(parent) {
            ROOT if name == "www" => Some(WWW),
            WWW => name
                .strip_prefix('f')
                .and_then(|n| n.strip_suffix(".html"))
                .and_then(|n| n.parse::<u64>().ok())
                .map(|i| FIRST_PAGE + i),
            _ => None,
        };
        match ino.and_then(|i| self.attr(i)) {
            Some(a) => reply.entry(&TTL, &a, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.into()) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(
            FileHandle(1),
            FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH,
        );
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let page = u64::from(ino)
            .checked_sub(FIRST_PAGE)
            .and_then(|i| self.pages.get(i as usize));
        match page {
            Some(p) => {
                let from = (offset as usize).min(p.len());
                let to = (from + size as usize).min(p.len());
                reply.data(&p[from..to]);
            }
            None => reply.error(Errno::EISDIR),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }
}

/// The mounted floor file system; unmounted when dropped.
pub struct FuseFloor {
    _session: fuser::BackgroundSession,
}

impl FuseFloor {
    /// Mount it on `mnt` (created) serving `www/f{i}.html` = `pages[i]`,
    /// with `threads` FUSE threads.
    pub fn mount(mnt: &Path, pages: Vec<Vec<u8>>, threads: usize) -> FuseFloor {
        std::fs::create_dir_all(mnt).unwrap();
        let mut cfg = fuser::Config::default();
        cfg.n_threads = Some(threads);
        cfg.clone_fd = true;
        cfg.mount_options
            .push(fuser::MountOption::FSName("coda-bench-floor".into()));
        let session = fuser::spawn_mount(Pages { pages }, mnt, &cfg)
            .unwrap_or_else(|e| panic!("mount bench: the FUSE floor did not mount: {e}"));
        FuseFloor { _session: session }
    }
}
