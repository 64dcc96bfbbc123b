//! The FUSE file system: every kernel request becomes a call on the one
//! `Client` (by path), and opened files are served from the client's
//! container files, through the kernel's FUSE passthrough where it can.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[path = "noopen.rs"]
mod noopen;

use coda::client::{
    Client, ClientState, Fid, File, FileType as CodaType, Owner, SetStatus, Stat, Timespec,
    XattrHow,
};
use coda::Error;
use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use parking_lot::{Condvar, Mutex, MutexGuard};

/// Attribute and entry lifetime in the kernel for answers the client did not
/// give from a callback it holds (and for replies to changes): zero, the
/// `Client` is the judge of validity. Answers it vouched for get
/// `kcache::TRUSTED_TTL` and are dropped by notification when it stops
/// trusting them (see kcache.rs and docs/MOUNT.md, "Caching").
const TTL: Duration = Duration::ZERO;

/// Counters and switches shared with the control socket (`coda status`).
#[derive(Default)]
pub struct Shared {
    /// The kernel granted FUSE passthrough at init.
    pub passthrough: AtomicBool,
    pub passthrough_opens: AtomicU64,
    pub plain_opens: AtomicU64,
    /// Backing files registered with the kernel (an unchanged file's is
    /// kept across opens).
    pub backing_files: AtomicU64,
    pub open_files: AtomicU64,
    /// Read requests the kernel sent (pages it did not have cached).
    pub reads: AtomicU64,
    /// Lookup and getattr requests the kernel sent (what it did not have
    /// cached).
    pub lookups: AtomicU64,
    pub getattrs: AtomicU64,
    /// Opens answered with FOPEN_KEEP_CACHE (the kernel kept its pages).
    pub kept_cache_opens: AtomicU64,
    /// Read-only opens answered from a kept backing file without the
    /// client's open (see `CodaFs::fast_open`).
    pub fast_opens: AtomicU64,
    /// `--no-fast-open`: every open goes through the client.
    pub no_fast_open: AtomicBool,
    /// Opens answered in page-cache mode beside passthrough (see
    /// `CodaFs::take_paged`).
    pub paged_opens: AtomicU64,
    /// `--no-paged-open`: small read-only opens use passthrough too, as
    /// every open did before page-cache opens (a baseline).
    pub no_paged_open: AtomicBool,
    /// `--no-open`: opens answer ENOSYS, so the kernel stops sending open,
    /// release and flush (noopen.rs).
    pub no_open: AtomicBool,
    /// Open and flush requests the kernel sent (with `--no-open`, one
    /// each: the first, answered ENOSYS).
    pub open_requests: AtomicU64,
    pub flush_requests: AtomicU64,
    /// What the kernel caches, and how it is told to drop it.
    pub kcache: crate::kcache::KernelCache,
    /// How many FUSE threads wait for the next request (gate.rs).
    pub gate: crate::gate::Gate,
}

/// One open file: the client's `File` (kept until release, whose close
/// stores a written file back) and, for passthrough, the kernel's backing id.
struct Handle {
    ino: u64,
    writable: bool,
    /// What was opened and how: a written file is stored (closed) at the
    /// first flush (close(2)) and opened again if written once more.
    fid: Fid,
    flags: i32,
    /// The open file; the lock guards only the slot and local reads and
    /// writes of the container, never a refetch (see `file_for`).
    file: Mutex<Option<File>>,
    /// Set while one thread opens the file again; the others wait on
    /// `reopened` without holding `file`.
    reopening: Mutex<bool>,
    reopened: Condvar,
    _backing: Option<Arc<BackingId>>,
    /// Permission bits as last known: what fstat shows once the object is
    /// gone (unlinked or renamed over while open).
    mode: AtomicU32,
    /// The object was removed while open: the handle lives on its
    /// container alone until release, as POSIX keeps an unlinked file.
    gone: AtomicBool,
    /// For a writable open, a descriptor of the open container (a dup of
    /// the `File`'s): its size and times, read without waiting for a store
    /// under way. A read-only open's `File` is never out of its slot (no
    /// store) until release, so it uses the `File`'s own (one dup and close
    /// fewer per open); a fast open has no `File` and shares the kept
    /// backing's descriptor. See `with_container`.
    container: Option<Arc<std::fs::File>>,
    /// Opened in page-cache mode (neither passthrough nor direct I/O):
    /// counted in `CodaFs::paged_opens` until release.
    paged: bool,
    /// For a read-only page-cache open, the version its reads serve as the
    /// kernel's pages were marked for (kcache's `paged`); `None` when not
    /// marked. A read that answers for another version than the mark is
    /// followed by an invalidation of the inode's pages (see `read`).
    pages_of: Option<u64>,
}

impl Handle {
    /// A read-only open answered without the client's open (fast and
    /// page-cache opens): no `File` yet, reads served from `container`.
    fn without_file(ino: u64, fid: Fid, mode: u32, container: Arc<std::fs::File>) -> Handle {
        Handle {
            ino,
            writable: false,
            fid,
            flags: libc::O_RDONLY,
            file: Mutex::new(None),
            reopening: Mutex::new(false),
            reopened: Condvar::new(),
            _backing: None,
            mode: AtomicU32::new(mode),
            gone: AtomicBool::new(false),
            container: Some(container),
            paged: false,
            pages_of: None,
        }
    }
}

/// A client error that says the object no longer exists.
fn is_gone(e: &Error) -> bool {
    matches!(e, Error::NotFound(_) | Error::Stale(_))
}

/// One entry of a readdirplus slice: position, inode, type, name, fid.
type PlusItem = (usize, u64, FileType, String, Option<Fid>);

struct DirSnapshot {
    /// The directory's fid (readdirplus asks about its entries).
    dir: Fid,
    entries: Vec<(u64, FileType, String)>,
    /// The entries' fids, by position (`None` for `.` and `..`).
    fids: Vec<Option<Fid>>,
}

pub struct CodaFs {
    client: Client,
    shared: Arc<Shared>,
    want_passthrough: bool,
    cache_dir: PathBuf,
    uid: u32,
    gid: u32,
    /// The fid-derived inode number of `/` (FUSE calls the root 1).
    root_ino: AtomicU64,
    /// Inode number → fid, learned from lookups; every operation works on
    /// fids (the client's fid API), so a rename moves nothing here.
    fids: Mutex<HashMap<u64, Fid>>,
    /// The root's fid (FUSE inode 1), from `init`.
    root_fid: Mutex<Option<Fid>>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    dirs: Mutex<HashMap<u64, DirSnapshot>>,
    /// Per inode, the backing file shared by its passthrough opens (the
    /// kernel wants one per inode at a time) and which container it is.
    backings: Mutex<HashMap<u64, Backing>>,
    /// Per inode, how many open handles are in page-cache mode. The kernel
    /// fails (EIO) a passthrough open of an inode with such opens and a
    /// page-cache open of one with passthrough opens, so the choice is made
    /// under the `backings` lock (taken first), from both counts.
    paged_opens: Mutex<HashMap<u64, u32>>,
    next_fh: AtomicU64,
    /// Inodes with a store under way: stores of one inode run one after
    /// the other, so the last one to start reads the container last and
    /// the server ends with the latest contents (no lock is held across
    /// a store; the others wait on `stored`).
    storing: Mutex<std::collections::HashSet<u64>>,
    stored: Condvar,
    /// `uid_map` (idmap.rs): owners shown as mapped local uids.
    idmap: Option<Arc<crate::idmap::IdMap>>,
}

/// How many inodes' backing files stay registered with no open using them.
const KEPT_BACKINGS: usize = 1024;
/// The largest container whose backing file is kept (see `Backing`).
const KEPT_MAX_SIZE: u64 = 64 << 10;
/// The largest file a read-only open serves from the kernel's page cache
/// instead of through passthrough (see `CodaFs::take_paged`). Passthrough
/// reads invalidate the inode's atime, so each fstat after a read asks a
/// getattr (nginx: one of three requests per request), and every open needs
/// the backing file; page-cache opens keep their pages across opens and ask
/// nothing. Above this, passthrough wins: a page-cache miss costs a read
/// request per 128 KiB where passthrough reads the container directly, and
/// the pages would be cached twice (the container's and the mount's).
const PAGED_MAX_SIZE: u64 = 1 << 20;

/// An inode's backing file. It stays registered after the last open is
/// released (`kept`), so the next open of an unchanged file costs no
/// reopen of its container and no register/unregister with the kernel;
/// it goes when the kernel forgets the inode, when the container changes
/// and no open uses the old one, or past `KEPT_BACKINGS`. Only files of at
/// most `KEPT_MAX_SIZE` keep theirs.
struct Backing {
    live: Weak<BackingId>,
    which: ContainerId,
    kept: Option<Arc<BackingId>>,
    /// The read-write description of the container registered with the
    /// kernel: what a fast open's handle answers fstat of an unlinked
    /// file from.
    file: Arc<std::fs::File>,
    /// The version of the file this container holds, as the client vouched
    /// for it with no invalidation in between (kcache's mark goes with it):
    /// a read-only open of that version may reuse the kept backing without
    /// the client's open (`CodaFs::fast_open`).
    fast: Option<u64>,
}

/// This thread's turn to store an inode (see `CodaFs::storing`).
struct StoreTurn<'a> {
    fs: &'a CodaFs,
    ino: u64,
}

impl Drop for StoreTurn<'_> {
    fn drop(&mut self) {
        self.fs.storing.lock().remove(&self.ino);
        self.fs.stored.notify_all();
    }
}

fn errno(e: &Error) -> Errno {
    let c = e.code();
    if c < 0 && c > -10000 {
        Errno::from_i32(-c)
    } else {
        Errno::EIO
    }
}

fn to_system_time(t: Timespec) -> SystemTime {
    if t.sec >= 0 {
        UNIX_EPOCH + Duration::new(t.sec as u64, t.nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.sec.unsigned_abs())
    }
}

fn from_system_time(t: SystemTime) -> Timespec {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timespec {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        },
        Err(e) => Timespec {
            sec: -(e.duration().as_secs() as i64),
            nsec: 0,
        },
    }
}

fn kind(t: CodaType) -> FileType {
    match t {
        CodaType::File => FileType::RegularFile,
        CodaType::Dir => FileType::Directory,
        CodaType::Symlink => FileType::Symlink,
        CodaType::Fifo => FileType::NamedPipe,
        CodaType::Socket => FileType::Socket,
        CodaType::CharDev => FileType::CharDevice,
        CodaType::BlockDev => FileType::BlockDevice,
    }
}

fn time_or_now(t: TimeOrNow) -> Timespec {
    match t {
        TimeOrNow::Now => Timespec::now(),
        TimeOrNow::SpecificTime(t) => from_system_time(t),
    }
}

/// Extended attributes kept: the `user.` namespace. The others (security,
/// trusted, system: SELinux labels, capabilities, POSIX ACLs) are the local
/// kernel's business and have no meaning for other clients.
fn xattr_name(name: &OsStr) -> Option<&str> {
    name.to_str().filter(|n| n.starts_with("user."))
}

/// An xattr call's error: "no such attribute" is ENODATA, not ENOENT.
fn xattr_errno(e: &Error) -> Errno {
    match e {
        Error::NotFound(_) => Errno::ENODATA,
        e => errno(e),
    }
}

/// Reply with `data` the way getxattr/listxattr want it: its size when
/// asked with size 0, ERANGE when it does not fit.
fn xattr_reply(reply: ReplyXattr, size: u32, data: &[u8]) {
    if size == 0 {
        reply.size(data.len() as u32)
    } else if data.len() > size as usize {
        reply.error(Errno::ERANGE)
    } else {
        reply.data(data)
    }
}

/// A name FUSE hands us, as the client's fid API takes it.
fn entry_name(name: &OsStr) -> Result<String, Errno> {
    let name = name.to_str().ok_or(Errno::EINVAL)?;
    if name.is_empty() || name.contains('/') {
        return Err(Errno::EINVAL);
    }
    Ok(name.to_string())
}

/// (device, inode) of a container file.
type ContainerId = (u64, u64);

/// Which container an open fd is: what a backing id stands for.
fn file_id(fd: i32) -> Option<ContainerId> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fd is a valid open descriptor owned by a live `File`; st is a
    // properly sized out-buffer.
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some((st.st_dev, st.st_ino))
}

/// `file_id` and the container's size, from one fstat.
fn file_id_size(fd: i32) -> Option<(ContainerId, u64)> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fd is a live descriptor; st is a properly sized out-buffer.
    (unsafe { libc::fstat(fd, &mut st) } == 0)
        .then_some(((st.st_dev, st.st_ino), st.st_size as u64))
}

/// Run `f` on a descriptor of the handle's open container: its own dup
/// (writable), or its `File`'s under the slot lock (read-only; nothing but a
/// local fstat/futimens is done under it). `None` once released.
fn with_container<R>(h: &Handle, f: impl FnOnce(i32) -> R) -> Option<R> {
    if let Some(c) = &h.container {
        return Some(f(c.as_raw_fd()));
    }
    let g = h.file.lock();
    g.as_ref().map(|file| f(file.fd()))
}

/// Ctime of an open container: a change made through it (write,
/// ftruncate, fallocate) is a status change the server has not seen yet.
fn container_ctime(fd: i32) -> Option<SystemTime> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fd is a live descriptor; st is a properly sized out-buffer.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return None;
    }
    Some(to_system_time(Timespec {
        sec: st.st_ctime,
        nsec: st.st_ctime_nsec as u32,
    }))
}

/// Size and mtime of an open container.
fn size_mtime(fd: i32) -> Option<(u64, SystemTime)> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fd is a live descriptor; st is a properly sized out-buffer.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return None;
    }
    let t = to_system_time(Timespec {
        sec: st.st_mtime,
        nsec: st.st_mtime_nsec as u32,
    });
    Some((st.st_size as u64, t))
}

impl CodaFs {
    pub fn new(
        client: Client,
        shared: Arc<Shared>,
        want_passthrough: bool,
        cache_dir: PathBuf,
    ) -> CodaFs {
        CodaFs {
            client,
            shared,
            want_passthrough,
            cache_dir,
            // SAFETY: plain getters without preconditions.
            uid: unsafe { libc::geteuid() },
            gid: unsafe { libc::getegid() },
            root_ino: AtomicU64::new(1),
            fids: Mutex::new(HashMap::new()),
            root_fid: Mutex::new(None),
            handles: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            backings: Mutex::new(HashMap::new()),
            paged_opens: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            storing: Mutex::new(std::collections::HashSet::new()),
            stored: Condvar::new(),
            idmap: None,
        }
    }

    /// Show owners through a `uid_map` (docs/MOUNT.md "Mapped owners").
    pub fn with_idmap(mut self, idmap: Option<Arc<crate::idmap::IdMap>>) -> CodaFs {
        self.idmap = idmap;
        self
    }

    /// After a failover every operation fails with EIO at once (the client
    /// would answer cached objects from memory otherwise). An operator's
    /// `coda disconnect` is not a failover: cached objects stay readable.
    fn guard(&self) -> Result<(), Errno> {
        if self.client.state() == ClientState::FailedOver && !self.client.operator_disconnected() {
            return Err(Errno::EIO);
        }
        Ok(())
    }

    /// The FUSE inode number of an object: its fid-derived number, with the
    /// root's swapped for 1 (what FUSE calls the root).
    fn fuse_ino(&self, ino: u64) -> u64 {
        let root = self.root_ino.load(Ordering::Relaxed);
        if ino == root {
            1
        } else if ino == 1 {
            root
        } else {
            ino
        }
    }

    fn fid_of(&self, ino: INodeNo) -> Result<Fid, Errno> {
        if ino.0 == 1 {
            return (*self.root_fid.lock()).ok_or(Errno::ESTALE);
        }
        self.fids.lock().get(&ino.0).copied().ok_or(Errno::ESTALE)
    }

    /// The directory's fid and the name in it.
    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<(Fid, String), Errno> {
        Ok((self.fid_of(parent)?, entry_name(name)?))
    }

    fn attr(&self, st: &Stat) -> FileAttr {
        let ino = self.fuse_ino(st.ino);
        let mut size = st.size;
        let mut mtime = to_system_time(st.mtime);
        let mut ctime = to_system_time(st.ctime);
        // A file being written here: its container is ahead of the server.
        if st.ftype == CodaType::File {
            // The newest writable open (the latest container), read through
            // its own descriptor: a store under way has the `File` out of
            // its slot, and the server's size is the one before the store.
            let handles = self.handles.lock();
            let newest = handles
                .iter()
                .filter(|(_, h)| h.ino == ino && h.writable)
                .max_by_key(|(fh, _)| **fh);
            if let Some((_, h)) = newest {
                let got = with_container(h, |fd| (size_mtime(fd), container_ctime(fd)));
                if let Some((sm, c)) = got {
                    if let Some((len, t)) = sm {
                        size = len;
                        mtime = t;
                    }
                    if let Some(c) = c {
                        ctime = ctime.max(c);
                    }
                }
            }
        }
        // Run by root, the mount shows the owners the server keeps (and the
        // kernel checks permissions against them); run by a user, every
        // object is that user's, as only that user can reach the mount.
        let (mut uid, gid) = if self.posix_owners() {
            (st.uid, st.gid)
        } else {
            (self.uid, self.gid)
        };
        if let Some(m) = &self.idmap {
            uid = m.attr_uid(st.uid);
        }
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: to_system_time(st.atime),
            mtime,
            ctime,
            crtime: mtime,
            kind: kind(st.ftype),
            perm: (st.mode & 0o7777) as u16,
            nlink: st.nlink.max(1),
            uid,
            gid,
            rdev: st.rdev as u32,
            blksize: 4096,
            flags: 0,
        }
    }

    /// Whether objects show (and get) real owners: the mount runs as root.
    fn posix_owners(&self) -> bool {
        self.uid == 0
    }

    /// The owner of an object `req` creates in `parent`: the caller, with
    /// the group of a set-group-ID directory (POSIX); the mounting user's
    /// own objects when it is not root (see `attr`).
    fn owner_for(&self, req: &Request, parent: Fid) -> Owner {
        let mapped = self.idmap.as_ref().map(|m| m.new_owner());
        if !self.posix_owners() {
            return Owner {
                uid: mapped.map_or(self.uid, |id| id.unwrap_or(0)),
                gid: self.gid,
            };
        }
        let mut owner = Owner {
            uid: req.uid(),
            gid: req.gid(),
        };
        if let Some(id) = mapped {
            // Whoever calls, the mount acts for its coda user.
            owner.uid = id.unwrap_or(0);
        }
        if let Ok(dir) = self.client.getattr_fid(parent) {
            if dir.mode & libc::S_ISGID != 0 {
                owner.gid = dir.gid;
            }
        }
        owner
    }

    /// Mode bits of a new directory in `parent`: a set-group-ID directory
    /// passes the bit on (POSIX).
    fn dir_mode(&self, parent: Fid, mode: u32) -> u32 {
        match self.client.getattr_fid(parent) {
            Ok(dir) if dir.mode & libc::S_ISGID != 0 => mode | libc::S_ISGID,
            _ => mode,
        }
    }

    /// The status of `fid` (a symlink's own), its inode remembered.
    fn stat_fid(&self, fid: Fid) -> Result<FileAttr, Errno> {
        let st = self.client.getattr_fid(fid).map_err(|e| errno(&e))?;
        let attr = self.attr(&st);
        if attr.ino.0 != 1 {
            self.fids.lock().insert(attr.ino.0, fid);
        }
        Ok(attr)
    }

    /// The entry `name` of `parent` (`ENOENT` if none), its status, with whether the client vouched for the answer
    /// (the directory's and the object's callbacks hold): what the kernel
    /// may keep.
    fn stat_child_trusted(&self, parent: Fid, name: &str) -> Result<(FileAttr, bool), Errno> {
        let e = self
            .client
            .lookup_at(parent, name)
            .map_err(|e| errno(&e))?
            .ok_or(Errno::ENOENT)?;
        let attr = self.stat_fid(e.fid)?;
        let trusted = self.client.trusts_cached(parent)
            && self.client.trusts_cached(e.fid)
            && !self.being_written(attr.ino.0);
        self.shared.kcache.note_inode(attr.ino.0);
        Ok((attr, trusted))
    }

    /// Whether `ino` is open for writing here: its size and times are the
    /// container's until the store at close, which the client has not
    /// vouched for, so the kernel gets no lifetime for them.
    fn being_written(&self, ino: u64) -> bool {
        self.handles
            .lock()
            .values()
            .any(|h| h.ino == ino && h.writable)
    }

    /// Whether the reply to a create may give the kernel a lifetime for the
    /// new entry and its attributes: only for a file this create made
    /// (`fresh`, so no other open writes it) in a directory the client
    /// vouches for. The attributes are the ones the create set; the kernel
    /// drops size and times itself at each write through the open file
    /// (FUSE's write paths invalidate them), and the store at close, like
    /// every own change, drops them by notification. Without it the kernel
    /// asks again at once (a getattr for the open's permission check, a
    /// lookup for the next stat or unlink of the name).
    fn create_trusted(&self, fresh: bool, dir: Fid, fid: Fid, ino: u64) -> bool {
        let trusted = fresh
            && !self.being_written(ino)
            && self.client.trusts_cached(dir)
            && self.client.trusts_cached(fid);
        self.shared.kcache.note_inode(ino);
        trusted
    }

    /// The entry reply for an object this mount just made in `dir`.
    fn reply_made(&self, reply: ReplyEntry, t: crate::kcache::Ticket, dir: Fid, fid: Fid) {
        let attr = match self.stat_fid(fid) {
            Ok(a) => a,
            Err(e) => return reply.error(e),
        };
        let trusted = self.client.trusts_cached(dir) && self.client.trusts_cached(fid);
        self.shared.kcache.note_inode(attr.ino.0);
        let (ttl, _g) = self.shared.kcache.ttl(t, trusted);
        reply.entry(&ttl, &attr, Generation(0));
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<Handle>, Errno> {
        self.handles.lock().get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    /// The handle's `File`, opened again if a flush closed it (a write after
    /// close(2) through a duplicated descriptor). The open may refetch from
    /// the server: no lock is held across it; one thread opens, the others
    /// wait for it.
    fn file_for<'a>(&self, h: &'a Handle) -> Result<MutexGuard<'a, Option<File>>, Errno> {
        // Bounded: each turn finds the file, opens it, or waits one slice
        // for the thread that opens it (whose open is itself bounded).
        for _ in 0..12_000 {
            let g = h.file.lock();
            if g.is_some() {
                return Ok(g);
            }
            drop(g);
            {
                let mut busy = h.reopening.lock();
                if *busy {
                    h.reopened
                        .wait_for(&mut busy, std::time::Duration::from_millis(50));
                    continue;
                }
                *busy = true;
            }
            let opened = self.client.open_fid(h.fid, h.flags);
            *h.reopening.lock() = false;
            h.reopened.notify_all();
            let f = opened.map_err(|e| errno(&e))?;
            let mut g = h.file.lock();
            if g.is_none() {
                *g = Some(f);
            }
            return Ok(g);
        }
        Err(Errno::EIO)
    }

    fn new_fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    /// File `h` under a new handle number, counted as an open file until
    /// its release.
    fn register(&self, h: Handle) -> u64 {
        let fh = self.new_fh();
        self.handles.lock().insert(fh, Arc::new(h));
        self.shared.open_files.fetch_add(1, Ordering::Relaxed);
        fh
    }

    /// Client open flags from the kernel's: access mode, append, truncate
    /// (the rest, like O_LARGEFILE or O_NOFOLLOW, is the kernel's business).
    fn open_flags(flags: i32) -> i32 {
        flags & (libc::O_ACCMODE | libc::O_APPEND | libc::O_TRUNC)
    }

    /// Non-passthrough opens use direct I/O while passthrough is on: the
    /// kernel refuses to mix page-cached and passthrough opens of one inode,
    /// and direct I/O opens may sit beside passthrough ones.
    fn plain_flags(&self) -> FopenFlags {
        if self.shared.passthrough.load(Ordering::Relaxed) {
            FopenFlags::FOPEN_DIRECT_IO
        } else {
            FopenFlags::empty()
        }
    }

    /// A backing id for a read-only open of `ino` on `file`'s container:
    /// shared with the inode's other passthrough opens when they use the
    /// same container; `None` (serve it plainly) when they use an older
    /// container, or the kernel refuses.
    fn backing_for(&self, ino: u64, file: &File, reply: &ReplyOpen) -> Option<Arc<BackingId>> {
        self.backing_with(ino, file, |fd| reply.open_backing(fd))
    }

    /// `backing_for` for any reply that can register a backing file (open
    /// or create). The backing file is the container opened read-write
    /// (a new description of the same inode): opens of one inode share it,
    /// and a writable open's writes go through it.
    fn backing_with(
        &self,
        ino: u64,
        file: &File,
        register: impl FnOnce(BorrowedFd) -> std::io::Result<BackingId>,
    ) -> Option<Arc<BackingId>> {
        if !self.shared.passthrough.load(Ordering::Relaxed) {
            return None;
        }
        let (id, size) = file_id_size(file.fd())?;
        // Only small files' backings are kept: a kept one holds its
        // container (disk space too, once the client evicted it), and for a
        // large file the registration is a small part of reading it.
        let keep = size <= KEPT_MAX_SIZE;
        let mut b = self.backings.lock();
        if self.paged_opens.lock().contains_key(&ino) {
            // Page-cache opens of the inode: the kernel would fail this one.
            return None;
        }
        if let Some(e) = b.get_mut(&ino) {
            if let Some(live) = e.live.upgrade() {
                if e.which == id {
                    if e.kept.is_none() && keep {
                        e.kept = Some(live.clone());
                    }
                    return Some(live);
                }
                // Another container: usable once no open uses the old
                // backing (only `live` and the kept reference are left; the
                // kernel let go of it when the last such open was released).
                if Arc::strong_count(&live) > 1 + usize::from(e.kept.is_some()) {
                    return None;
                }
            }
            b.remove(&ino);
        }
        if b.len() >= KEPT_BACKINGS {
            // Bounded: let the kept ones go (opens in use hold their own).
            b.retain(|_, e| {
                e.kept = None;
                e.fast = None;
                e.live.strong_count() > 0
            });
        }
        // A read-write description of the container: a read-only open may
        // register the backing that a later writable open shares.
        let rw = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(format!("/proc/self/fd/{}", file.fd()))
        {
            Ok(f) => f,
            Err(e) => {
                eprintln!("coda-mount: reopening the container of inode {ino}: {e}");
                return None;
            }
        };
        // The kernel takes its own reference to the file.
        match register(rw.as_fd()) {
            Ok(bid) => {
                self.shared.backing_files.fetch_add(1, Ordering::Relaxed);
                let bid = Arc::new(bid);
                b.insert(
                    ino,
                    Backing {
                        live: Arc::downgrade(&bid),
                        which: id,
                        kept: keep.then(|| bid.clone()),
                        file: Arc::new(rw),
                        fast: None,
                    },
                );
                Some(bid)
            }
            Err(e) => {
                eprintln!("coda-mount: passthrough refused for inode {ino}: {e}");
                None
            }
        }
    }

    /// A read-only open of `ino` answered without the client's open: the
    /// kept backing file of a small unchanged file, reused when the mount
    /// marked its container for a version (`vouch_fast`), no invalidation
    /// has named the inode since, and the client still vouches for that
    /// same version (its callback holds on a fresh session, the contents
    /// are current and nothing written here waits to be stored). Saves the
    /// client's open of the container (openat, fstat, close and its cache
    /// bookkeeping); whatever fails a check goes the ordinary way.
    fn fast_open(&self, ino: u64, fid: Fid) -> Option<(u64, Arc<BackingId>)> {
        let marked = self.shared.kcache.fast_version(ino)?;
        // Never waits (an open that must ask goes the ordinary way).
        let (version, mode) = self.client.trusted_data_version_now(fid)?;
        if version != marked {
            return None;
        }
        let (bid, file) = {
            let b = self.backings.lock();
            if self.paged_opens.lock().contains_key(&ino) {
                return None;
            }
            let e = b.get(&ino)?;
            if e.fast != Some(version) {
                return None;
            }
            (e.kept.clone()?, e.file.clone())
        };
        // The kernel reads the backing file itself; a read that still came
        // here would open a `File` (`file_for`).
        let fh = self.register(Handle {
            _backing: Some(bid.clone()),
            ..Handle::without_file(ino, fid, mode, file)
        });
        Some((fh, bid))
    }

    /// After a read-only passthrough open through the client: mark the
    /// inode's kept backing for the version the client vouches for, if it
    /// is the container that open got and no invalidation came since `t`
    /// (taken before the open). The container of a version changes only by
    /// a fetch, which follows an invalidation, so the pair stays right
    /// until one names the inode.
    fn vouch_fast(&self, ino: u64, fid: Fid, file: &File, t: crate::kcache::Ticket) {
        let Some((version, _)) = self.client.trusted_data_version(fid) else {
            return;
        };
        let Some(id) = file_id(file.fd()) else {
            return;
        };
        let mut b = self.backings.lock();
        let Some(e) = b.get_mut(&ino) else {
            return;
        };
        if e.which != id || e.kept.is_none() {
            e.fast = None;
            self.shared.kcache.unvouch_open(ino);
            return;
        }
        // Under the backings lock: a fast open sees both marks or neither
        // matching.
        if self.shared.kcache.vouch_open(ino, t, version) {
            e.fast = Some(version);
        } else {
            e.fast = None;
        }
    }

    /// The inode's live backing file, for an open that could not share it
    /// (its container is not the backing's: the file changed while older
    /// opens of it stay open here). The kernel fails any open of an inode
    /// with a backing file unless it is passthrough on that very file, so
    /// such an open names it too, with direct I/O: its reads and writes
    /// then come to us and are served from its own container; only an
    /// mmap of it would use the backing file.
    fn live_backing(&self, ino: u64) -> Option<Arc<BackingId>> {
        if !self.shared.passthrough.load(Ordering::Relaxed) {
            return None;
        }
        let b = self.backings.lock();
        if self.paged_opens.lock().contains_key(&ino) {
            return None;
        }
        b.get(&ino)?.live.upgrade()
    }

    /// Page-cache flags of a plain open: direct I/O beside passthrough;
    /// otherwise the kernel keeps the pages it has (FOPEN_KEEP_CACHE) when
    /// they are of this very version of the file, per the client (its
    /// callback holds; same version, same container). A writer's open never
    /// keeps them.
    fn cache_flags(&self, ino: u64, fid: Fid, file: &File, writable: bool) -> FopenFlags {
        let flags = self.plain_flags();
        if flags.contains(FopenFlags::FOPEN_DIRECT_IO) || !self.shared.kcache.enabled() {
            return flags;
        }
        let version = (!writable && self.client.trusts_cached(fid))
            .then(|| {
                let st = self.client.getattr_fid(fid).ok()?;
                let (dev, cino) = file_id(file.fd())?;
                Some((st.version, dev, cino))
            })
            .flatten();
        match version {
            Some(v) if self.shared.kcache.keep_pages(ino, v) => {
                self.shared.kept_cache_opens.fetch_add(1, Ordering::Relaxed);
                flags | FopenFlags::FOPEN_KEEP_CACHE
            }
            Some(_) => flags,
            None => {
                self.shared.kcache.forget_pages(ino);
                flags
            }
        }
    }

    /// The client's `File` for an open of `ino`. A truncating open of an
    /// inode that is open here already truncates the container those opens
    /// share, in place, instead of getting a new empty one: every descriptor
    /// of the inode is then one file (as locally), and with passthrough the
    /// open can use the inode's live backing file, without which the kernel
    /// fails the open with EIO (it wants every open of an inode with a
    /// backing file to be passthrough on that same file).
    fn open_file(&self, ino: u64, fid: Fid, cflags: i32) -> Result<File, Errno> {
        let writable = cflags & libc::O_ACCMODE != libc::O_RDONLY;
        let shared = writable
            && cflags & libc::O_TRUNC != 0
            && self
                .open_handle(ino)
                .is_some_and(|h| !h.gone.load(Ordering::Relaxed));
        if !shared {
            return self.client.open_fid(fid, cflags).map_err(|e| errno(&e));
        }
        let mut file = self
            .client
            .open_fid(fid, cflags & !libc::O_TRUNC)
            .map_err(|e| errno(&e))?;
        // An empty write marks the file changed (stored at close, even if
        // it was empty already), as the client's own O_TRUNC does.
        let cut = file.write_at(&[], 0).map_err(|e| errno(&e)).and_then(|_| {
            // SAFETY: the `File`'s live container descriptor.
            if unsafe { libc::ftruncate(file.fd(), 0) } != 0 {
                return Err(Errno::from(std::io::Error::last_os_error()));
            }
            Ok(())
        });
        if let Err(e) = cut {
            file.abandon();
            return Err(e);
        }
        Ok(file)
    }

    fn remember(
        &self,
        ino: u64,
        fid: Fid,
        flags: i32,
        file: File,
        backing: Option<Arc<BackingId>>,
    ) -> Result<u64, Errno> {
        self.remember_as(ino, fid, flags, file, backing, None)
    }

    /// `remember`, for a page-cache open (`paged`: `Some(pages_of)`, the
    /// handle counted by `take_paged`) or not (`None`).
    fn remember_as(
        &self,
        ino: u64,
        fid: Fid,
        flags: i32,
        file: File,
        backing: Option<Arc<BackingId>>,
        paged: Option<Option<u64>>,
    ) -> Result<u64, Errno> {
        let mode = self
            .client
            .getattr_fid(fid)
            .map(|st| st.mode & 0o7777)
            .unwrap_or(0o600);
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let container = if writable {
            // SAFETY: the fd is the live container fd of `file`; dup gives
            // us our own descriptor of it (or -1).
            let dup = unsafe { libc::fcntl(file.fd(), libc::F_DUPFD_CLOEXEC, 0) };
            if dup < 0 {
                if paged.is_some() {
                    self.drop_paged(ino);
                }
                return Err(Errno::from(std::io::Error::last_os_error()));
            }
            // SAFETY: `dup` is a new descriptor nobody else owns.
            Some(Arc::new(unsafe { std::fs::File::from_raw_fd(dup) }))
        } else {
            None
        };
        Ok(self.register(Handle {
            ino,
            writable,
            fid,
            // Reopening must neither create nor truncate again.
            flags: flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC),
            file: Mutex::new(Some(file)),
            reopening: Mutex::new(false),
            reopened: Condvar::new(),
            _backing: backing,
            mode: AtomicU32::new(mode),
            gone: AtomicBool::new(false),
            container,
            paged: paged.is_some(),
            pages_of: paged.flatten(),
        }))
    }
}

/// Page-cache opens: a read-only open of a small file the client vouches
/// for is served from the kernel's page cache (kept across opens while the
/// version is unchanged) rather than through passthrough, so that neither
/// its reads nor the fstat after them ask anything (docs/MOUNT.md,
/// "Page-cache opens").
impl CodaFs {
    /// Count an open of `ino` in page-cache mode, if it may be one: always
    /// when the inode has page-cache opens already (the kernel fails any
    /// passthrough open then; a writer's writes then go through the shared
    /// pages, write-through, so every open here sees them), and when `want`
    /// and no passthrough open of it is live (the kernel fails a page-cache
    /// open then). Decided under the `backings` lock, against which every
    /// passthrough open decides.
    fn take_paged(&self, ino: u64, want: bool) -> bool {
        let b = self.backings.lock();
        let mut p = self.paged_opens.lock();
        if let Some(n) = p.get_mut(&ino) {
            *n += 1;
            return true;
        }
        if !want {
            return false;
        }
        if let Some(e) = b.get(&ino) {
            if let Some(live) = e.live.upgrade() {
                // `live` itself, the kept reference: the rest are opens.
                if Arc::strong_count(&live) > 1 + usize::from(e.kept.is_some()) {
                    return false;
                }
            }
        }
        p.insert(ino, 1);
        true
    }

    /// Whether a read-only page-cache handle of `ino` is open for another
    /// version than `version` (or for one not known).
    fn older_paged(&self, ino: u64, version: Option<u64>) -> bool {
        if !self.paged_opens.lock().contains_key(&ino) {
            return false;
        }
        self.handles.lock().values().any(|h| {
            h.ino == ino && h.paged && !h.writable && (version.is_none() || h.pages_of != version)
        })
    }

    /// A page-cache open of `ino` ended (or was never answered).
    fn drop_paged(&self, ino: u64) {
        let mut p = self.paged_opens.lock();
        if let Some(n) = p.get_mut(&ino) {
            *n -= 1;
            if *n == 0 {
                p.remove(&ino);
            }
        }
    }

    /// Whether a read-only open of `file` should be a page-cache one: a
    /// small file the client vouches for (callback held, contents current,
    /// nothing written here waiting), on a mount that keeps pages.
    fn wants_paged(&self, fid: Fid, file: &File) -> Option<u64> {
        if self.shared.no_paged_open.load(Ordering::Relaxed) || !self.shared.kcache.enabled() {
            return None;
        }
        let (_, size) = file_id_size(file.fd())?;
        if size > PAGED_MAX_SIZE {
            return None;
        }
        Some(self.client.trusted_data_version(fid)?.0)
    }

    /// A read-only open answered without the client's open: the kernel's
    /// pages of `ino` are marked for the version the client still vouches
    /// for (no invalidation named the inode since they were marked), and
    /// no passthrough open of it is live. Its reads (only what the kernel
    /// does not hold) are served from the marked container.
    fn paged_fast_open(&self, ino: u64, fid: Fid) -> Option<u64> {
        let (marked, container) = self.shared.kcache.paged(ino)?;
        // Never waits (an open that must ask goes the ordinary way).
        let (version, mode) = self.client.trusted_data_version_now(fid)?;
        if version != marked || !self.take_paged(ino, true) {
            return None;
        }
        Some(self.register(Handle {
            paged: true,
            pages_of: Some(version),
            ..Handle::without_file(ino, fid, mode, container)
        }))
    }

    /// The slow path's page-cache open of `ino` (counted by `take_paged`),
    /// `file` from the client's open after ticket `t`: mark the kernel's
    /// pages for `version` when the client vouched for it with no
    /// invalidation since `t`; keep the pages the kernel has when they are
    /// already of that version. A writer drops the mark (its writes change
    /// the pages without a new version until its store).
    fn paged_reply(
        &self,
        ino: u64,
        fid: Fid,
        cflags: i32,
        file: File,
        t: crate::kcache::Ticket,
        version: Option<u64>,
    ) -> Result<(u64, FopenFlags), Errno> {
        let writable = cflags & libc::O_ACCMODE != libc::O_RDONLY;
        let mut flags = FopenFlags::empty();
        let mut pages_of = None;
        if writable {
            self.shared.kcache.unvouch_pages(ino);
        } else {
            flags |= FopenFlags::FOPEN_NOFLUSH;
            if let Some(v) = version {
                let fd = file.fd();
                let keep = self.shared.kcache.vouch_pages(ino, t, v, || {
                    // SAFETY: `fd` is the live container descriptor of
                    // `file`; dup gives a descriptor of our own (or -1).
                    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
                    // SAFETY: `dup` is a new descriptor nobody else owns.
                    (dup >= 0).then(|| Arc::new(unsafe { std::fs::File::from_raw_fd(dup) }))
                });
                if keep.is_some() {
                    pages_of = Some(v);
                }
                if keep == Some(true) {
                    flags |= FopenFlags::FOPEN_KEEP_CACHE;
                    self.shared.kept_cache_opens.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let fh = self.remember_as(ino, fid, cflags, file, None, Some(pages_of))?;
        self.shared.paged_opens.fetch_add(1, Ordering::Relaxed);
        Ok((fh, flags))
    }

    /// After a read of a read-only page-cache handle: if the inode's pages
    /// are no longer marked for the version this handle reads (a change
    /// came while it was open, or its open was never marked), the bytes
    /// just given may be older than what later opens keep: drop the
    /// inode's pages. Rare (an open file read after a change); bounded by
    /// the reads.
    fn check_pages(&self, h: &Handle) {
        if h.paged && !h.writable && self.shared.kcache.paged_version(h.ino) != h.pages_of {
            self.shared.kcache.invalidate(&[h.ino], false);
        }
    }
}

/// Open files whose object is gone (unlinked or renamed over while open):
/// POSIX keeps such a file usable through its descriptors until the last
/// close, so these requests are answered from the handle's container.
impl CodaFs {
    /// An open handle of inode `ino`, a writable one if there is one.
    fn open_handle(&self, ino: u64) -> Option<Arc<Handle>> {
        let handles = self.handles.lock();
        let mut found: Option<&Arc<Handle>> = None;
        for h in handles.values().filter(|h| h.ino == ino) {
            if h.writable || found.is_none() {
                found = Some(h);
            }
            if h.writable {
                break;
            }
        }
        found.cloned()
    }

    /// If `ino` is open and its object is gone, the handle to answer from
    /// (every handle of the inode is marked gone).
    fn orphan(&self, ino: u64, fid: Fid) -> Option<Arc<Handle>> {
        let h = self.open_handle(ino)?;
        if !h.gone.load(Ordering::Relaxed) {
            match self.client.getattr_fid(fid) {
                Err(e) if is_gone(&e) => {}
                _ => return None,
            }
            for other in self.handles.lock().values().filter(|o| o.ino == ino) {
                other.gone.store(true, Ordering::Relaxed);
            }
        }
        Some(h)
    }

    /// The status of an open file whose object is gone: its container's
    /// size and times, the last known mode, no links.
    fn orphan_attr(&self, h: &Handle) -> Result<FileAttr, Errno> {
        let (size, mtime) = with_container(h, size_mtime).flatten().ok_or(Errno::EIO)?;
        Ok(FileAttr {
            ino: INodeNo(h.ino),
            size,
            blocks: size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind: FileType::RegularFile,
            perm: h.mode.load(Ordering::Relaxed) as u16,
            nlink: 0,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    /// setattr on an open file whose object is gone: mode and size change
    /// on the handle and its container (nothing is stored anywhere).
    fn orphan_setattr(
        &self,
        h: &Handle,
        mode: Option<u32>,
        size: Option<u64>,
        mtime: Option<TimeOrNow>,
    ) -> Result<FileAttr, Errno> {
        if let Some(m) = mode {
            h.mode.store(m & 0o7777, Ordering::Relaxed);
        }
        if size.is_some() && !h.writable {
            return Err(Errno::EBADF);
        }
        let changed = with_container(h, |fd| -> Result<(), Errno> {
            if let Some(n) = size {
                if !h.writable {
                    return Err(Errno::EBADF);
                }
                // SAFETY: the handle's own live descriptor of the container.
                if unsafe { libc::ftruncate(fd, n as libc::off_t) } != 0 {
                    return Err(Errno::from(std::io::Error::last_os_error()));
                }
            }
            if let Some(t) = mtime {
                let ts = match t {
                    TimeOrNow::Now => Timespec::now(),
                    TimeOrNow::SpecificTime(t) => from_system_time(t),
                };
                let times = [
                    libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_OMIT,
                    },
                    libc::timespec {
                        tv_sec: ts.sec,
                        tv_nsec: ts.nsec as _,
                    },
                ];
                // SAFETY: live fd; `times` holds the two entries futimens reads.
                unsafe { libc::futimens(fd, times.as_ptr()) };
            }
            Ok(())
        });
        changed.unwrap_or(Err(Errno::EBADF))?;
        self.orphan_attr(h)
    }

    /// Store what a writable handle wrote, keeping it open (fsync(2), and
    /// each close(2) of a descriptor copy). Nothing to store once the
    /// object is gone.
    fn sync_handle(&self, h: &Handle) -> Result<(), Errno> {
        if !h.writable || h.gone.load(Ordering::Relaxed) {
            return Ok(());
        }
        let _turn = self.store_turn(h.ino)?;
        match self.with_file_out(h, File::sync).unwrap_or(Ok(())) {
            Ok(()) => Ok(()),
            Err(e) if is_gone(&e) => {
                h.gone.store(true, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                eprintln!("coda-mount: storing {}: {e}", h.fid);
                Err(errno(&e))
            }
        }
    }

    /// Wait (bounded) until no other store of `ino` is under way, and take
    /// the turn.
    fn store_turn(&self, ino: u64) -> Result<StoreTurn<'_>, Errno> {
        let mut busy = self.storing.lock();
        // Bounded: each store is itself bounded by the client's timeouts.
        for _ in 0..12_000 {
            if busy.insert(ino) {
                return Ok(StoreTurn { fs: self, ino });
            }
            self.stored.wait_for(&mut busy, Duration::from_millis(50));
        }
        Err(Errno::EIO)
    }

    /// Run `op` on the handle's `File` taken out of its slot, so no lock is
    /// held across what `op` does (a store talks to the server); the
    /// handle's other users wait in `file_for` meanwhile (as for a reopen).
    /// `None` if the slot was empty.
    fn with_file_out<R>(&self, h: &Handle, op: impl FnOnce(&mut File) -> R) -> Option<R> {
        for _ in 0..12_000 {
            let mut busy = h.reopening.lock();
            if *busy {
                h.reopened.wait_for(&mut busy, Duration::from_millis(50));
                continue;
            }
            *busy = true;
            drop(busy);
            let taken = h.file.lock().take();
            let out = taken.map(|mut f| {
                let r = op(&mut f);
                *h.file.lock() = Some(f);
                r
            });
            *h.reopening.lock() = false;
            h.reopened.notify_all();
            return out;
        }
        None
    }

    /// A write by a process without CAP_FSETID clears set-user-ID, and
    /// set-group-ID when group execute is set, as the kernel does for a
    /// local file (it does not for FUSE direct-I/O writes). Root is taken
    /// as the one holding CAP_FSETID.
    fn kill_privs(&self, req: &Request, h: &Handle) {
        if req.uid() == 0 || h.gone.load(Ordering::Relaxed) {
            return;
        }
        let Ok(st) = self.client.getattr_fid(h.fid) else {
            return;
        };
        let mut m = st.mode & 0o7777;
        let before = m;
        m &= !libc::S_ISUID;
        if m & libc::S_IXGRP != 0 {
            m &= !libc::S_ISGID;
        }
        if m != before {
            if let Err(e) = self.client.setattr_fid(h.fid, Some(m), None, None) {
                eprintln!("coda-mount: clearing set-id bits of {}: {e}", h.fid);
            }
            h.mode.store(m, Ordering::Relaxed);
        }
    }
}

macro_rules! tri {
    ($reply:expr, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return $reply.error(e),
        }
    };
}

impl Filesystem for CodaFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let root = self.client.lstat("/").map_err(std::io::Error::other)?;
        let root_fid = self.client.root_fid().map_err(std::io::Error::other)?;
        self.root_ino.store(root.ino, Ordering::Relaxed);
        *self.root_fid.lock() = Some(root_fid);
        let _ = config.add_capabilities(InitFlags::FUSE_ATOMIC_O_TRUNC);
        self.shared.kcache.set_root(root.ino);
        // Kernel caching (see kcache.rs): listings with attributes (one
        // request for `ls -l`), symlink targets in the page cache, lookups in
        // one directory in parallel. Each is optional: without it the
        // kernel just asks more often.
        for cap in [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_PARALLEL_DIROPS,
        ] {
            let _ = config.add_capabilities(cap);
        }
        if self.want_passthrough
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            // The containers may sit on a stacked file system (overlayfs).
            && config.set_max_stack_depth(2).is_ok()
        {
            self.shared.passthrough.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    fn forget(&self, _req: &Request, ino: INodeNo, _nlookup: u64) {
        // Not through the gate: fuser calls this once per inode of a batch
        // forget, one request, and the gate could park the thread 250 ms
        // after each (at unmount, when the kernel forgets every inode at
        // once and the other threads are gone, for each of them: the
        // session outlived its 5 s). It never waits for a server anyway.
        let mut b = self.backings.lock();
        // The kernel dropped the inode (or a lookup reply it could not use):
        // let a kept backing go; opens still in use hold their own.
        self.shared.kcache.unvouch_open(ino.0);
        // Its pages are gone with it: let the mark's container go too.
        self.shared.kcache.unvouch_pages(ino.0);
        if let Some(e) = b.get_mut(&ino.0) {
            e.kept = None;
            e.fast = None;
            if e.live.strong_count() == 0 {
                b.remove(&ino.0);
            }
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _pass = self.shared.gate.enter();
        tri!(reply, self.guard());
        let (dir, name_s) = tri!(reply, self.child(parent, name));
        self.shared.lookups.fetch_add(1, Ordering::Relaxed);
        // Noted before asking: a break of the directory meanwhile names it.
        self.shared.kcache.note_entry(parent.0, name);
        let t = self.shared.kcache.ticket();
        let (attr, trusted) = tri!(reply, self.stat_child_trusted(dir, &name_s));
        let (ttl, _g) = self.shared.kcache.ttl(t, trusted);
        reply.entry(&ttl, &attr, Generation(0));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let _pass = self.shared.gate.enter();
        if let Err(e) = self.guard() {
            // After failover: a page-cache read of a descriptor opened
            // before it asks for the size when it reaches the end of what
            // the kernel knows; it reads on from its container (as a
            // passthrough read would), so its size comes from there too.
            if let Some(h) = fh.and_then(|fh| self.handle(fh).ok()) {
                if h.paged && !h.writable {
                    let mut attr = tri!(reply, self.orphan_attr(&h));
                    attr.nlink = 1;
                    return reply.attr(&TTL, &attr);
                }
            }
            return reply.error(e);
        }
        self.shared.getattrs.fetch_add(1, Ordering::Relaxed);
        let fid = tri!(reply, self.fid_of(ino));
        let t = self.shared.kcache.ticket();
        let attr = match self.stat_fid(fid) {
            Ok(a) => a,
            // An unlinked open file: its container's status, never kept.
            Err(e) => match self.orphan(ino.0, fid) {
                Some(h) => {
                    let attr = tri!(reply, self.orphan_attr(&h));
                    return reply.attr(&TTL, &attr);
                }
                None => return reply.error(e),
            },
        };
        self.shared.kcache.note_inode(attr.ino.0);
        let trusted = self.client.trusts_cached(fid) && !self.being_written(attr.ino.0);
        let (ttl, _g) = self.shared.kcache.ttl(t, trusted);
        reply.attr(&ttl, &attr);
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _pass = self.shared.gate.enter();
        tri!(reply, self.guard());
        let fid = tri!(reply, self.fid_of(ino));
        // Who may chown, chgrp or set times is the kernel's check
        // (`default_permissions`). A mount run by a user shows everything
        // as that user's and cannot give objects away.
        if !self.posix_owners()
            && (uid.is_some_and(|u| u != self.uid) || gid.is_some_and(|g| g != self.gid))
        {
            return reply.error(Errno::EPERM);
        }
        if let Some(h) = self.orphan(ino.0, fid) {
            let attr = tri!(reply, self.orphan_setattr(&h, mode, size, mtime));
            return reply.attr(&TTL, &attr);
        }
        // Mode, owner, group and times go in one record (one ctime, one
        // version step); a size has its own, below.
        let mut set = SetStatus {
            mode: mode.map(|m| m & 0o7777),
            atime: atime.map(time_or_now),
            mtime: mtime.map(time_or_now),
            ..SetStatus::default()
        };
        if self.posix_owners() {
            set.uid = uid;
            set.gid = gid;
        }
        if let (Some(m), Some(u)) = (&self.idmap, uid) {
            let id = tri!(reply, m.chown_uid(u).map_err(Errno::from_i32));
            // A chown to the owner it has (tar, cp -p) is no chown.
            let same = self.client.getattr_fid(fid).is_ok_and(|st| st.uid == id);
            set.uid = (!same).then_some(id);
        }
        if let Some(m) = mode {
            for h in self.handles.lock().values().filter(|h| h.ino == ino.0) {
                h.mode.store(m & 0o7777, Ordering::Relaxed);
            }
        }
        if let Some(n) = size {
            // Not while a store of this inode is uploading the container:
            // the upload reads the length it announced (writes can only
            // grow the file; a cut is the one change that would starve it).
            let _turn = tri!(reply, self.store_turn(ino.0));
            // ftruncate on a file open for writing: cut the container; the
            // close stores it. Otherwise a truncate record right away.
            let open = fh
                .and_then(|fh| self.handle(fh).ok())
                .filter(|h| h.writable);
            match open {
                Some(h) => {
                    // The handle's own descriptor of the container: no wait
                    // for a store under way (the next flush stores the cut).
                    // SAFETY: a live descriptor owned by the handle.
                    let cut =
                        with_container(&h, |fd| unsafe { libc::ftruncate(fd, n as libc::off_t) });
                    if cut != Some(0) {
                        return reply.error(Errno::from(std::io::Error::last_os_error()));
                    }
                }
                None => tri!(
                    reply,
                    self.client
                        .setattr_fid(fid, None, Some(n), None)
                        .map_err(|e| errno(&e))
                ),
            }
        }
        if let Some(ts) = set.mtime {
            // Times set while the file is open for writing (tar, cp -p):
            // store what was written first, so the store at close does not
            // overwrite them.
            let open: Vec<Arc<Handle>> = self
                .handles
                .lock()
                .values()
                .filter(|h| h.ino == ino.0 && h.writable)
                .cloned()
                .collect();
            for h in open {
                tri!(reply, self.sync_handle(&h));
                // The container shows the same time (fstat before release
                // reads it), and it counts as stored.
                self.with_file_out(&h, |f| f.set_container_mtime(ts));
            }
        }
        if set != SetStatus::default() {
            tri!(
                reply,
                self.client.set_status_fid(fid, &set).map_err(|e| errno(&e))
            );
        }
        let attr = tri!(reply, self.stat_fid(fid));
        reply.attr(&TTL, &attr);
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _pass = self.shared.gate.enter();
        tri!(reply, self.guard());
        let fid = tri!(reply, self.fid_of(ino));
        let t = tri!(reply, self.client.readlink_fid(fid).map_err(|e| errno(&e)));
        reply.data(t.as_bytes());
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let _pass = self.shared.gate.enter();
        tri!(reply, self.guard());
        let (dir, name) = tri!(reply, self.child(parent, name));
        let owner = self.owner_for(req, dir);
        let mode = self.dir_mode(dir, mode & !umask & 0o7777);
        let t = self.shared.kcache.ticket();
        let fid = tri!(
            reply,
            self.client
                .mkdir_at_as(dir, &name, mode, owner)
                .map_err(|e| errno(&e))
        );
        self.reply_made(reply, t, dir, fid);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _pass = self.shared.gate.enter();
        tri!(reply, self.guard());
        let os_name = name;
        let (dir, name) = tri!(reply, self.child(parent, name));
        tri!(
            reply,
            self.client
                .remove_at(dir, &name, false)
                .map_err(|e| errno(&e))
        );
        self.shared.kcache.forget_entry(parent.0, os_name);
        reply.ok();
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _pass = self.shared.gate.enter();
        tri!(reply, self.guard());
        let os_name = name;
        let (dir, name) = tri!(reply, self.child(parent, name));
        tri!(
            reply,
            self.client
                .remove_at(dir, &name, true)
                .map_err(|e| errno(&e))
        );
        self.shared.kcache.forget_entry(parent.0, os_name);
        reply.ok();
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _pass = self.shared.gate.enter();
        tri!(reply, self.guard());
        let (dir, name) = tri!(reply, self.child(parent, link_name));
        let target = tri!(reply, target.to_str().ok_or(Errno::EINVAL));
        let t = self.shared.kcache.ticket();
        let fid = tri!(
            reply,
            self.client
                .symlink_at_as(dir, &name, target, self.owner_for(req, dir))
                .map_err(|e| errno(&e))
        );
        self.reply_made(reply, t, dir, fid);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _pass = self.shared.gate.enter();
        tri!(reply, self.guard());
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            return reply.error(Errno::EINVAL);
        }
        let (sdir, sname) = tri!(reply, self.child(parent, name));
        let (ddir, dname) = tri!(reply, self.child(newparent, newname));
        if flags.contains(RenameFlags::RENAME_NOREPLACE)
            && self
                .client
                .lookup_at(ddir, &dname)
                .is_ok_and(|e| e.is_some())
        {
            return reply.error(Errno::EEXIST);
        }
        tri!(
            reply,
            self.client
                .rename_at(sdir, &sname, ddir, &dname)
                .map_err(|e| errno(&e))
        );
        // Inodes are keyed by fid: a rename moves nothing here.
        reply.ok();
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        // The fast opens below wait for nothing (gate.rs); the rest may.
        let mut pass = self.shared.gate.enter_quick(crate::gate::Kind::Open);
        self.shared.open_requests.fetch_add(1, Ordering::Relaxed);
        if self.no_open() {
            // The kernel takes this for the whole mount (noopen.rs).
            return reply.error(Errno::ENOSYS);
        }
        tri!(reply, self.guard());
        let fid = tri!(reply, self.fid_of(ino));
        let cflags = Self::open_flags(flags.0);
        let writable = cflags & libc::O_ACCMODE != libc::O_RDONLY;
        let passthrough = self.shared.passthrough.load(Ordering::Relaxed);
        let fast = !self.shared.no_fast_open.load(Ordering::Relaxed);
        if cflags == libc::O_RDONLY && fast && !self.shared.no_paged_open.load(Ordering::Relaxed) {
            if let Some(fh) = self.paged_fast_open(ino.0, fid) {
                self.shared.fast_opens.fetch_add(1, Ordering::Relaxed);
                self.shared.paged_opens.fetch_add(1, Ordering::Relaxed);
                self.shared.kept_cache_opens.fetch_add(1, Ordering::Relaxed);
                return reply.opened(
                    FileHandle(fh),
                    FopenFlags::FOPEN_NOFLUSH | FopenFlags::FOPEN_KEEP_CACHE,
                );
            }
        }
        // With page-cache opens on, a small file's later opens are served
        // from the page cache (above or below), not from a kept backing.
        let paging =
            !self.shared.no_paged_open.load(Ordering::Relaxed) && self.shared.kcache.enabled();
        if cflags == libc::O_RDONLY && passthrough && fast && !paging {
            if let Some((fh, b)) = self.fast_open(ino.0, fid) {
                self.shared.fast_opens.fetch_add(1, Ordering::Relaxed);
                self.shared
                    .passthrough_opens
                    .fetch_add(1, Ordering::Relaxed);
                return reply.opened_passthrough(FileHandle(fh), FopenFlags::FOPEN_NOFLUSH, &b);
            }
        }
        pass.may_block();
        // Before the client is asked: see `vouch_fast`.
        let t = self.shared.kcache.ticket();
        let file = tri!(reply, self.open_file(ino.0, fid, cflags));
        if writable {
            // Its writes change the contents before any new version: no
            // open may keep pages marked for the old one meanwhile.
            self.shared.kcache.unvouch_pages(ino.0);
        }
        // A small file's first open of a version is passed through (with
        // passthrough): a file read once then costs no read request; from
        // its second open on, the page cache serves it.
        let version = if writable {
            None
        } else {
            self.wants_paged(fid, &file)
        }
        .filter(|v| !passthrough || self.shared.kcache.seen(ino.0, *v));
        if !writable && self.older_paged(ino.0, version) {
            // Page-cache opens of another version are open: the kernel has
            // one page cache per inode, so this one reads around it (direct
            // I/O, from its own container) and they keep the version they
            // opened, as with passthrough.
            let fh = tri!(reply, self.remember(ino.0, fid, cflags, file, None));
            self.shared.plain_opens.fetch_add(1, Ordering::Relaxed);
            return reply.opened(
                FileHandle(fh),
                FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_NOFLUSH,
            );
        }
        if self.take_paged(ino.0, version.is_some()) {
            let (fh, flags) = tri!(
                reply,
                self.paged_reply(ino.0, fid, cflags, file, t, version)
            );
            return reply.opened(FileHandle(fh), flags);
        }
        // Writable opens use passthrough too when the inode's backing is
        // this container (or free): shared writable mmap (SQLite's WAL)
        // needs it, and writes land in the container the store reads.
        if let Some(b) = self.backing_for(ino.0, &file, &reply) {
            if cflags == libc::O_RDONLY && !self.shared.no_fast_open.load(Ordering::Relaxed) {
                self.vouch_fast(ino.0, fid, &file, t);
            }
            let fh = tri!(
                reply,
                self.remember(ino.0, fid, cflags, file, Some(b.clone()))
            );
            self.shared
                .passthrough_opens
                .fetch_add(1, Ordering::Relaxed);
            // A read-only open has nothing to store at close(2): no flush
            // request (its flush does nothing).
            let flags = if writable {
                FopenFlags::empty()
            } else {
                FopenFlags::FOPEN_NOFLUSH
            };
            return reply.opened_passthrough(FileHandle(fh), flags, &b);
        }
        if let Some(b) = self.live_backing(ino.0) {
            let fh = tri!(
                reply,
                self.remember(ino.0, fid, cflags, file, Some(b.clone()))
            );
            self.shared.plain_opens.fetch_add(1, Ordering::Relaxed);
            return reply.opened_passthrough(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO, &b);
        }
        let flags = self.cache_flags(ino.0, fid, &file, writable);
        let fh = tri!(reply, self.remember(ino.0, fid, cflags, file, None));
        self.shared.plain_opens.fetch_add(1, Ordering::Relaxed);
        reply.opened(FileHandle(fh), flags);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _pass = self.shared.gate.enter();
        self.shared.reads.fetch_add(1, Ordering::Relaxed);
        if fh.0 == 0 && self.no_open() {
            return self.read_by_inode(_ino, offset, size, reply);
        }
        let h = tri!(reply, self.handle(fh));
        if h.paged && h.file.lock().is_none() {
            if let Some(c) = h.container.as_ref().filter(|_| !h.writable) {
                // A fast page-cache open: its marked container holds the
                // version it opened (and outlives an unlink).
                let buf = tri!(reply, pread_upto(c, offset, size));
                reply.data(&buf);
                return self.check_pages(&h);
            }
        }
        let mut g = tri!(reply, self.file_for(&h));
        let f = g.as_mut().expect("file_for fills the slot");
        let buf = tri!(reply, read_upto(f, offset, size));
        reply.data(&buf);
        drop(g);
        self.check_pages(&h);
    }

    fn write(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _pass = self.shared.gate.enter();
        let h = tri!(reply, self.handle(fh));
        self.kill_privs(req, &h);
        let mut g = tri!(reply, self.file_for(&h));
        let f = g.as_mut().expect("file_for fills the slot");
        let mut done = 0;
        while done < data.len() {
            match f.write_at(&data[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) => return reply.error(errno(&e)),
            }
        }
        reply.written(done as u32);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let _pass = self.shared.gate.enter();
        self.shared.flush_requests.fetch_add(1, Ordering::Relaxed);
        if fh.0 == 0 && self.no_open() {
            // Nothing to store (read-only mount): no more flush requests.
            return reply.error(Errno::ENOSYS);
        }
        // close(2) of each copy of a descriptor waits for this (release
        // comes once, after the last): store what was written here, so
        // close returns the store's result and the next opener, here or
        // anywhere, sees the new contents; the file stays open for the
        // other copies (a child's exit must not close the parent's file).
        let Ok(h) = self.handle(fh) else {
            return reply.ok();
        };
        match self.sync_handle(&h) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _pass = self.shared.gate.enter();
        // Durable when this returns: stored on the server (connected), or
        // logged with its container fsynced (disconnected).
        if fh.0 == 0 && self.no_open() {
            return reply.ok(); // a no-open file is never written
        }
        let h = tri!(reply, self.handle(fh));
        match self.sync_handle(&h) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // A fast open's release (no `File`) waits for nothing (gate.rs);
        // a `File`'s close may (a writer stores, the cache may evict).
        let mut pass = self.shared.gate.enter_quick(crate::gate::Kind::Release);
        let h = self.handles.lock().remove(&fh.0);
        let Some(h) = h else {
            return reply.error(Errno::EBADF);
        };
        if h.writable || h.file.lock().is_some() {
            pass.may_block();
        }
        self.shared.open_files.fetch_sub(1, Ordering::Relaxed);
        if h.paged {
            self.drop_paged(h.ino);
        }
        if h.writable {
            // See `open`: the pages may hold what it wrote before its store
            // (which drops them) or without one.
            self.shared.kcache.unvouch_pages(h.ino);
        }
        let f = h.file.lock().take();
        let Some(f) = f else {
            return reply.ok();
        };
        if h.gone.load(Ordering::Relaxed) {
            f.abandon();
            return reply.ok();
        }
        let _turn = if h.writable {
            self.store_turn(h.ino).ok()
        } else {
            None
        };
        // Closing a written file stores what the last flush did not.
        match f.close() {
            Err(e) if !is_gone(&e) => {
                eprintln!("coda-mount: storing inode {} on close: {e}", h.ino);
                reply.error(errno(&e))
            }
            _ => reply.ok(),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _pass = self.shared.gate.enter();
        tri!(reply, self.guard());
        let fid = tri!(reply, self.fid_of(ino));
        let t = self.shared.kcache.ticket();
        let list = tri!(reply, self.client.readdir_fid(fid).map_err(|e| errno(&e)));
        let mut entries = Vec::with_capacity(list.len() + 2);
        entries.push((ino.0, FileType::Directory, ".".to_string()));
        entries.push((ino.0, FileType::Directory, "..".to_string()));
        let mut fids = Vec::with_capacity(list.len() + 2);
        fids.extend([None, None]);
        for e in list {
            entries.push((self.fuse_ino(e.fid.ino()), kind(e.ftype), e.name));
            fids.push(Some(e.fid));
        }
        // The kernel may keep the listing (CACHE_DIR) while the client
        // vouches for the directory, and keep the listing it already has
        // (KEEP_CACHE) when that is of the same version.
        let version = self
            .client
            .trusts_cached(fid)
            .then(|| self.client.getattr_fid(fid).ok())
            .flatten()
            .map(|st| st.version);
        let fh = self.new_fh();
        self.dirs.lock().insert(
            fh,
            DirSnapshot {
                dir: fid,
                entries,
                fids,
            },
        );
        self.shared.kcache.note_inode(ino.0);
        let (ttl, _g) = self.shared.kcache.ttl(t, version.is_some());
        let mut flags = FopenFlags::empty();
        match version {
            Some(v) if !ttl.is_zero() => {
                flags |= FopenFlags::FOPEN_CACHE_DIR;
                if self.shared.kcache.keep_pages(ino.0, (v, 0, 0)) {
                    flags |= FopenFlags::FOPEN_KEEP_CACHE;
                }
            }
            _ => self.shared.kcache.forget_pages(ino.0),
        }
        reply.opened(FileHandle(fh), flags);
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let _pass = self.shared.gate.enter();
        tri!(reply, self.guard());
        // A bounded slice, copied out: the client may ask the server about
        // an entry, and no lock is held across that.
        let (dir, slice): (Fid, Vec<PlusItem>) = {
            let dirs = self.dirs.lock();
            let Some(d) = dirs.get(&fh.0) else {
                return reply.error(Errno::EBADF);
            };
            let slice = d
                .entries
                .iter()
                .zip(&d.fids)
                .enumerate()
                .skip(offset as usize)
                .take(1024)
                .map(|(i, ((ino, k, name), fid))| (i, *ino, *k, name.clone(), *fid))
                .collect();
            (d.dir, slice)
        };
        let t = self.shared.kcache.ticket();
        let dir_trusted = self.client.trusts_cached(dir);
        let dot = tri!(reply, self.stat_fid(dir));
        let mut out = Vec::with_capacity(slice.len());
        for (i, child_ino, _k, name, fid) in slice {
            match fid {
                // `.` and `..`: the kernel links neither; any attributes do.
                None => out.push((
                    i,
                    FileAttr {
                        ino: INodeNo(child_ino),
                        ..dot
                    },
                    name,
                    false,
                )),
                Some(f) => {
                    self.shared.kcache.note_entry(ino.0, OsStr::new(&name));
                    // Gone meanwhile: left out (a lookup will say so).
                    if let Ok(attr) = self.stat_fid(f) {
                        self.shared.kcache.note_inode(attr.ino.0);
                        let trusted = dir_trusted
                            && self.client.trusts_cached(f)
                            && !self.being_written(attr.ino.0);
                        out.push((i, attr, name, trusted));
                    }
                }
            }
        }
        let (ttl, _g) = self.shared.kcache.ttl(t, true);
        for (i, attr, name, trusted) in &out {
            let ttl = if *trusted { ttl } else { Duration::ZERO };
            if reply.add(attr.ino, (*i + 1) as u64, name, &ttl, attr, Generation(0)) {
                break;
            }
        }
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _pass = self.shared.gate.enter();
        tri!(reply, self.guard());
        let dirs = self.dirs.lock();
        let Some(d) = dirs.get(&fh.0) else {
            return reply.error(Errno::EBADF);
        };
        for (i, (ino, k, name)) in d.entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), (i + 1) as u64, *k, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let _pass = self.shared.gate.enter();
        self.dirs.lock().remove(&fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _pass = self.shared.gate.enter();
        // The space that matters locally is the cache's file system.
        let c = std::ffi::CString::new(self.cache_dir.as_os_str().as_encoded_bytes())
            .unwrap_or_default();
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: c is NUL-terminated; s is a properly sized out-buffer.
        if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
            return reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096);
        }
        reply.statfs(
            s.f_blocks,
            s.f_bfree,
            s.f_bavail,
            s.f_files,
            s.f_ffree,
            s.f_bsize as u32,
            255,
            s.f_frsize as u32,
        );
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _pass = self.shared.gate.enter();
        tri!(reply, self.guard());
        let os_name = name;
        let (dir, name) = tri!(reply, self.child(parent, name));
        let cflags = Self::open_flags(flags);
        let owner = self.owner_for(req, dir);
        // Noted before asking: a break of the directory meanwhile names the
        // new entry (see `create_trusted`).
        self.shared.kcache.note_entry(parent.0, os_name);
        let t = self.shared.kcache.ticket();
        let made = self
            .client
            .create_at_as(dir, &name, mode & !umask & 0o7777, cflags, owner);
        let fresh = made.is_ok();
        let file = match made {
            Ok(f) => f,
            // Made meanwhile by someone else: open it, unless O_EXCL.
            Err(Error::Exists(_)) if flags & libc::O_EXCL == 0 => {
                let e = tri!(
                    reply,
                    self.client
                        .lookup_at(dir, &name)
                        .map_err(|e| errno(&e))
                        .and_then(|e| e.ok_or(Errno::ENOENT))
                );
                tri!(
                    reply,
                    self.client.open_fid(e.fid, cflags).map_err(|e| errno(&e))
                )
            }
            Err(e) => return reply.error(errno(&e)),
        };
        let fid = file.fid();
        let attr = match self.stat_fid(fid) {
            Ok(a) => a,
            Err(e) => {
                let _ = file.close();
                return reply.error(e);
            }
        };
        let trusted = self.create_trusted(fresh, dir, fid, attr.ino.0);
        self.shared.kcache.unvouch_pages(attr.ino.0);
        if self.take_paged(attr.ino.0, false) {
            // An existing file opened by a create while it has page-cache
            // opens: its writes go through the shared pages too.
            let fh = tri!(
                reply,
                self.remember_as(attr.ino.0, fid, cflags, file, None, Some(None))
            );
            self.shared.paged_opens.fetch_add(1, Ordering::Relaxed);
            let (ttl, _g) = self.shared.kcache.ttl(t, trusted);
            return reply.created(
                &ttl,
                &attr,
                Generation(0),
                FileHandle(fh),
                FopenFlags::empty(),
            );
        }
        let backing = self.backing_with(attr.ino.0, &file, |fd| reply.open_backing(fd));
        if let Some(b) = backing {
            let fh = tri!(
                reply,
                self.remember(attr.ino.0, fid, cflags, file, Some(b.clone()))
            );
            self.shared
                .passthrough_opens
                .fetch_add(1, Ordering::Relaxed);
            let (ttl, _g) = self.shared.kcache.ttl(t, trusted);
            return reply.created_passthrough(
                &ttl,
                &attr,
                Generation(0),
                FileHandle(fh),
                FopenFlags::empty(),
                &b,
            );
        }
        if let Some(b) = self.live_backing(attr.ino.0) {
            let fh = tri!(
                reply,
                self.remember(attr.ino.0, fid, cflags, file, Some(b.clone()))
            );
            self.shared.plain_opens.fetch_add(1, Ordering::Relaxed);
            let (ttl, _g) = self.shared.kcache.ttl(t, trusted);
            return reply.created_passthrough(
                &ttl,
                &attr,
                Generation(0),
                FileHandle(fh),
                FopenFlags::FOPEN_DIRECT_IO,
                &b,
            );
        }
        let fh = tri!(reply, self.remember(attr.ino.0, fid, cflags, file, None));
        self.shared.plain_opens.fetch_add(1, Ordering::Relaxed);
        let (ttl, _g) = self.shared.kcache.ttl(t, trusted);
        reply.created(
            &ttl,
            &attr,
            Generation(0),
            FileHandle(fh),
            self.plain_flags(),
        );
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let _pass = self.shared.gate.enter();
        tri!(reply, self.guard());
        let (dir, name) = tri!(reply, self.child(parent, name));
        let fid = if mode & libc::S_IFMT == libc::S_IFREG {
            // mknod of a regular file: an empty file.
            let owner = self.owner_for(req, dir);
            let f = tri!(
                reply,
                self.client
                    .create_at_as(dir, &name, mode & !umask & 0o7777, libc::O_RDONLY, owner)
                    .map_err(|e| errno(&e))
            );
            let fid = f.fid();
            tri!(reply, f.close().map_err(|e| errno(&e)));
            fid
        } else {
            let Some(ftype) = CodaType::special_from_mode(mode) else {
                return reply.error(Errno::EINVAL);
            };
            tri!(
                reply,
                self.client
                    .mknod_at(
                        dir,
                        &name,
                        ftype,
                        mode & !umask & 0o7777,
                        u64::from(rdev),
                        self.owner_for(req, dir),
                    )
                    .map_err(|e| errno(&e))
            )
        };
        let attr = tri!(reply, self.stat_fid(fid));
        reply.entry(&TTL, &attr, Generation(0));
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _pass = self.shared.gate.enter();
        tri!(reply, self.guard());
        let fid = tri!(reply, self.fid_of(ino));
        let (dir, name) = tri!(reply, self.child(newparent, newname));
        tri!(
            reply,
            self.client.link_at(fid, dir, &name).map_err(|e| errno(&e))
        );
        let attr = tri!(reply, self.stat_fid(fid));
        reply.entry(&TTL, &attr, Generation(0));
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _pass = self.shared.gate.enter();
        // On the open container, like a write: the close stores it.
        let h = tri!(reply, self.handle(fh));
        if !h.writable {
            return reply.error(Errno::EBADF);
        }
        // The handle's own descriptor of the container, as for ftruncate.
        // SAFETY: a live descriptor owned by the handle.
        let r = with_container(&h, |fd| unsafe {
            libc::fallocate(fd, mode, offset as libc::off_t, length as libc::off_t)
        });
        if r != Some(0) {
            return reply.error(Errno::from(std::io::Error::last_os_error()));
        }
        reply.ok();
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let _pass = self.shared.gate.enter();
        tri!(reply, self.guard());
        let Some(name) = xattr_name(name) else {
            return reply.error(Errno::EOPNOTSUPP);
        };
        let how = match flags & (libc::XATTR_CREATE | libc::XATTR_REPLACE) {
            0 => XattrHow::Set,
            libc::XATTR_CREATE => XattrHow::Create,
            libc::XATTR_REPLACE => XattrHow::Replace,
            _ => return reply.error(Errno::EINVAL),
        };
        if value.len() > coda::proto::MAX_XATTR_VALUE {
            return reply.error(Errno::E2BIG);
        }
        let fid = tri!(reply, self.fid_of(ino));
        tri!(
            reply,
            self.client
                .setxattr_fid(fid, name, value, how)
                .map_err(|e| xattr_errno(&e))
        );
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _pass = self.shared.gate.enter();
        tri!(reply, self.guard());
        // Other namespaces hold nothing here: answered without the client
        // (the kernel asks for security.capability on writes).
        let Some(name) = xattr_name(name) else {
            return reply.error(Errno::ENODATA);
        };
        let fid = tri!(reply, self.fid_of(ino));
        let v = tri!(
            reply,
            self.client
                .getxattr_fid(fid, name)
                .map_err(|e| xattr_errno(&e))
        );
        xattr_reply(reply, size, &v);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _pass = self.shared.gate.enter();
        tri!(reply, self.guard());
        let fid = tri!(reply, self.fid_of(ino));
        let all = tri!(reply, self.client.xattrs_fid(fid).map_err(|e| errno(&e)));
        let mut names = Vec::new();
        for (n, _) in all {
            names.extend_from_slice(n.as_bytes());
            names.push(0);
        }
        xattr_reply(reply, size, &names);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _pass = self.shared.gate.enter();
        tri!(reply, self.guard());
        let Some(name) = xattr_name(name) else {
            return reply.error(Errno::EOPNOTSUPP);
        };
        let fid = tri!(reply, self.fid_of(ino));
        tri!(
            reply,
            self.client
                .setxattr_fid(fid, name, &[], XattrHow::Remove)
                .map_err(|e| xattr_errno(&e))
        );
        reply.ok();
    }
}

/// Up to `size` bytes of `f` from `offset`: short only at the end of the
/// file (a FUSE read answers a short count only there).
pub(crate) fn read_upto(f: &File, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
    let mut buf = vec![0u8; size as usize];
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => return Err(errno(&e)),
        }
    }
    buf.truncate(got);
    Ok(buf)
}

/// `read_upto` on a container descriptor of our own.
fn pread_upto(f: &std::fs::File, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; size as usize];
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => return Err(Errno::from(e)),
        }
    }
    buf.truncate(got);
    Ok(buf)
}
