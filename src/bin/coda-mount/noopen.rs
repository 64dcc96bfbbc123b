//! `--no-open`: read-only serving without a FUSE round trip per open.
//!
//! The kernel sends an open request (and, asynchronously, a release) for
//! every open(2), and a flush for every close(2); for a web server opening a
//! cached 4 KiB file per request those round trips are most of its cost
//! (docs/BENCHMARKS.md, `openfast`, `noopen`). Linux stops sending them only
//! for a whole connection: the first open answered `ENOSYS` sets the
//! connection's `no_open` (from then on every file is opened with handle 0,
//! `FOPEN_KEEP_CACHE`, and no release), the first flush answered `ENOSYS` its
//! `no_flush`. This mode does exactly that, on a read-only mount (the kernel
//! refuses write opens with `EROFS`, since there is no close to store at):
//!
//! - reads the page cache misses arrive with handle 0 and are answered by
//!   inode: the client opens the file (fetching it if it holds no valid
//!   copy), reads, closes;
//! - the kernel keeps a file's pages across opens; the client's
//!   invalidations (kcache.rs: callback breaks, a new session, failover)
//!   drop them, and a read whose answer may predate an invalidation is
//!   followed by one more of its inode;
//! - access: the kernel's mode-bit checks (`default_permissions`) at every
//!   open as in the default mode; the client's own at the read that fills
//!   the pages.

use std::sync::atomic::Ordering;

use fuser::{Errno, INodeNo, ReplyData};

use super::{errno, read_upto, CodaFs, Fid};

impl CodaFs {
    /// `--no-open` is on.
    pub(super) fn no_open(&self) -> bool {
        self.shared.no_open.load(Ordering::Relaxed)
    }

    /// A read of a file the kernel opened without asking (handle 0).
    pub(super) fn read_by_inode(&self, ino: INodeNo, offset: u64, size: u32, reply: ReplyData) {
        if let Err(e) = self.guard() {
            return reply.error(e);
        }
        let fid = match self.fid_of(ino) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        // Taken before the client is asked: an invalidation after it means
        // these bytes may be older than what the kernel was told to drop.
        let t = self.shared.kcache.ticket();
        let data = match self.read_fid(fid, offset, size) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        // Replied under the epoch's read lock: an invalidation either comes
        // after the kernel has these pages (and drops them) or came before
        // the check (and is sent again once they are in).
        let (ttl, g) = self.shared.kcache.ttl(t, true);
        reply.data(&data);
        drop(g);
        if ttl.is_zero() {
            self.shared.kcache.invalidate(&[ino.0], false);
        }
    }

    fn read_fid(&self, fid: Fid, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let f = self
            .client
            .open_fid(fid, libc::O_RDONLY)
            .map_err(|e| errno(&e))?;
        read_upto(&f, offset, size)
    }
}
