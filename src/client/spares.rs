//! Empty containers made ahead of time by a thread off the callers' path.
//! On ext4 a small file's create is mostly the allocation of an inode and
//! the edits of directories; the pool does those before a caller needs them.
//!
//! Two kinds:
//! - **Named containers**, already at their final names in `containers/`
//!   for the fids this client hands out next (`expect`, told by the fid
//!   ranges): a new file's container is then in place with no system call
//!   (`take_named`). The rename of a spare, which it replaces, took both
//!   directories' locks and the file system's rename lock, and was a fifth
//!   of a client's CPU in a create (docs/BENCHMARKS.md, session 16).
//! - **Spares** in `cache_dir/spares/`, renamed into place for any other
//!   empty container: a new file whose fid was not prepared, a truncating
//!   open of an existing file.
//!
//! Neither is a container the index knows until a caller takes it. A
//! named container whose fid went to a directory, a symlink or a special
//! file, or to a file the server refused, is removed by the thread at once
//! (`forget`: no container is ever installed under such a fid); whatever
//! is left (a stop, a create whose outcome is unknown) is removed by the
//! start-up sweep of `containers/` (`Cache::sweep_unused_containers`, which
//! removes names the index does not hold). The thread never removes a name
//! on a guess, as a create running late could install its container there
//! meanwhile. A spare is never in `containers/`. Both are 0600, empty, one
//! link. Making a container durable is unchanged (`Cache::make_durable`
//! syncs the file and `containers/`).

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::proto::Fid;

/// Spares the pool keeps ready, and the level below which its thread
/// refills it: a burst of creates between refills takes them all, and the
/// rest fall back to creating their own.
pub(super) const SPARES_TARGET: usize = 48;
const SPARES_LOW: usize = 16;
/// Named containers kept ready past the next fid of a volume, and the
/// level below which the thread makes more.
const NAMED_AHEAD: u64 = 32;
const NAMED_LOW: u64 = 16;
/// The pool thread's waits after a failed create (a full disk, no inodes,
/// an unusable directory): doubled per failure up to the maximum.
const SPARES_BACKOFF_MIN: Duration = Duration::from_millis(50);
const SPARES_BACKOFF_MAX: Duration = Duration::from_secs(5);

pub(super) struct Spares {
    /// `cache_dir/spares/`.
    dir: PathBuf,
    /// `cache_dir/containers/`, where named containers are made.
    containers: PathBuf,
    target: usize,
    /// Guards the pool's bookkeeping only: no file is made, linked or
    /// removed while it is held.
    pool: Mutex<Pool>,
    /// Wakes the thread when there is work (spares below `SPARES_LOW`,
    /// named containers below `NAMED_LOW` ahead, ones to remove), or to
    /// stop.
    wake: Condvar,
}

#[derive(Default)]
struct Pool {
    ready: Vec<PathBuf>,
    /// Refilling spares up to `target` (from below `SPARES_LOW`).
    refilling: bool,
    /// Fids whose empty container is at its final name, not yet taken.
    named: HashSet<Fid>,
    /// Per volume: what the fid range told (`expect`).
    ahead: HashMap<u32, Ahead>,
    /// The named container the thread is making (no lock held), and
    /// whether a caller wanted that fid meanwhile: it then made its own,
    /// and the thread's (replaced, or refused as existing) is not named.
    making: Option<Fid>,
    making_wanted: bool,
    /// The one being made went to another kind of object (`forget`).
    making_forgotten: bool,
    /// Named containers whose fids went to other objects: to remove.
    discard: Vec<Fid>,
    stop: bool,
}

#[derive(Clone, Copy)]
struct Ahead {
    /// The next vnode the client hands out in this volume.
    next: u64,
    /// The end of its reserved range (exclusive).
    end: u64,
    /// The first vnode not yet made (or being made).
    made: u64,
}

impl Ahead {
    /// Named containers ready or being made past `next`.
    fn lead(&self) -> u64 {
        self.made.saturating_sub(self.next)
    }
}

/// What the thread does next.
enum Job {
    Named(Fid),
    Spare,
    Remove(Vec<Fid>),
}

/// Make an empty 0600 file at `path` (in `dir`) as an unnamed inode
/// (`O_TMPFILE`) then linked in: the inode's allocation, most of a
/// create's cost on ext4, then holds no lock of `dir` (a create holds its
/// directory's lock throughout, where a caller's rename into `dir` would
/// wait for it). Never replaces a name (`AlreadyExists`); falls back to a
/// plain exclusive create where `O_TMPFILE` is not supported.
fn make_empty(dir: &Path, path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::io::AsRawFd;
    let plain = || {
        std::fs::File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map(drop)
    };
    let f = match std::fs::File::options()
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(0o600)
        .open(dir)
    {
        Ok(f) => f,
        // A missing directory is the caller's to handle; anything else
        // (EOPNOTSUPP, EISDIR from an old kernel) means no O_TMPFILE here.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(e),
        Err(_) => return plain(),
    };
    let from = std::ffi::CString::new(format!("/proc/self/fd/{}", f.as_raw_fd()))
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let to = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: two NUL-terminated paths that outlive the call.
    let r = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EEXIST) => Err(e),
        // Anything else (no /proc to name the inode by, a file system that
        // refuses the link): a plain create, which reports its own error.
        _ => plain(),
    }
}

impl Spares {
    /// Take up the spares an earlier run left: an empty regular file with
    /// one link is as good as a new one; anything else (a power cut may
    /// leave a renamed spare's old name too) is removed.
    /// Never fails: without its directory the pool stays empty and every
    /// create makes its own container, as before there was a pool.
    pub(super) fn open(dir: &Path, containers: &Path, target: usize) -> Arc<Spares> {
        let _ = crate::fsmode::create_private_dir(dir);
        // Every name is judged before any is removed: removing one of two
        // names of a file must not make the other look reusable.
        let (ready, junk): (Vec<_>, Vec<_>) = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|d| {
                let reusable = d.file_name().to_string_lossy().starts_with("spare.")
                    && std::fs::symlink_metadata(d.path())
                        .is_ok_and(|m| m.is_file() && m.len() == 0 && m.nlink() == 1);
                (d.path(), reusable)
            })
            .partition(|(_, reusable)| *reusable);
        for (p, _) in junk {
            let _ = std::fs::remove_file(p);
        }
        let ready: Vec<PathBuf> = ready.into_iter().map(|(p, _)| p).collect();
        Arc::new(Spares {
            dir: dir.to_path_buf(),
            containers: containers.to_path_buf(),
            target,
            pool: Mutex::new(Pool {
                ready,
                ..Pool::default()
            }),
            wake: Condvar::new(),
        })
    }

    /// A spare's path, renamed into place by the caller.
    pub(super) fn take(&self) -> Option<PathBuf> {
        let mut p = self.pool.lock();
        let s = p.ready.pop();
        if p.ready.len() < SPARES_LOW {
            self.wake.notify_one();
        }
        s
    }

    /// Whether `fid`'s empty container is at its final name, made ahead;
    /// the caller then owns it. Only for a new object's container: each
    /// fid is created once.
    pub(super) fn take_named(&self, fid: Fid) -> bool {
        let mut p = self.pool.lock();
        if p.named.remove(&fid) {
            return true;
        }
        if p.making == Some(fid) {
            p.making_wanted = true;
        }
        false
    }

    /// `fid` will never hold a file's container (it went to a directory, a
    /// symlink or a special file, or the server refused the file's
    /// create): its named container, if made, is removed.
    pub(super) fn forget(&self, fid: Fid) {
        let mut p = self.pool.lock();
        if p.named.remove(&fid) {
            p.discard.push(fid);
            self.wake.notify_one();
        } else if p.making == Some(fid) {
            p.making_forgotten = true;
        }
    }

    /// The fid range of `volume` now hands out `next` and ends at `end`:
    /// keep named containers ready for the fids after it.
    pub(super) fn expect(&self, volume: u32, next: u64, end: u64) {
        if self.target == 0 {
            return; // no thread
        }
        let mut p = self.pool.lock();
        let a = match p.ahead.get_mut(&volume) {
            // Creators tell in any order: the range only moves forward.
            Some(a) if a.end == end && next <= a.next => return,
            Some(a) if a.end == end => {
                a.next = next;
                a.made = a.made.max(next);
                *a
            }
            // The first look at this volume, or a new range.
            _ => {
                let a = Ahead {
                    next,
                    end,
                    made: next,
                };
                p.ahead.insert(volume, a);
                a
            }
        };
        if a.lead() < NAMED_LOW && a.made < end {
            self.wake.notify_one();
        }
    }

    /// Spares ready now (tests).
    #[cfg(test)]
    pub(super) fn ready(&self) -> Vec<PathBuf> {
        self.pool.lock().ready.clone()
    }

    /// Named containers ready now (tests).
    #[cfg(test)]
    pub(super) fn named(&self) -> Vec<Fid> {
        let mut v: Vec<Fid> = self.pool.lock().named.iter().copied().collect();
        v.sort_by_key(|f| (f.volume, f.vnode));
        v
    }

    pub(super) fn stop(&self) {
        self.pool.lock().stop = true;
        self.wake.notify_all();
    }

    /// One new empty spare (no lock held: it allocates an inode).
    fn make_spare(&self) -> std::io::Result<PathBuf> {
        let n: u64 = u64::from_ne_bytes(crate::proto::auth::random_bytes::<8>());
        let path = self.dir.join(format!("spare.{n:016x}"));
        match make_empty(&self.dir, &path) {
            // The directory could not be made at start (a full disk).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                crate::fsmode::create_private_dir(&self.dir)
                    .map_err(|_| std::io::Error::from(std::io::ErrorKind::NotFound))?;
                make_empty(&self.dir, &path)?;
            }
            r => r?,
        }
        Ok(path)
    }

    /// The next job, taken under the pool's lock; `None` to wait.
    fn next_job(&self, p: &mut Pool) -> Option<Job> {
        // Named containers no file will take first: an inode each.
        if !p.discard.is_empty() {
            return Some(Job::Remove(std::mem::take(&mut p.discard)));
        }
        // Spares first while the pool is low: a create whose named container
        // is not ready (the thread fell behind: a slow disk, ext4's search
        // for a free inode after many deletions) takes a spare instead of
        // allocating an inode on its own path.
        if p.ready.len() < SPARES_LOW.min(self.target) {
            p.refilling = true;
            return Some(Job::Spare);
        }
        // Then the named containers a create takes with no system call.
        for (&volume, a) in p.ahead.iter_mut() {
            let vnode = a.made.max(a.next);
            if vnode < a.end && vnode < a.next + NAMED_AHEAD {
                a.made = vnode + 1;
                let fid = Fid::new(volume, vnode, 1);
                p.making = Some(fid);
                p.making_wanted = false;
                p.making_forgotten = false;
                return Some(Job::Named(fid));
            }
        }
        if p.refilling && p.ready.len() < self.target {
            return Some(Job::Spare);
        }
        p.refilling = false;
        None
    }

    /// The pool thread: named containers kept `NAMED_AHEAD` past each
    /// volume's next fid, spares refilled to `target` whenever below
    /// `SPARES_LOW`; after a failed create it waits (bounded, doubling)
    /// before trying again, whatever takes happen meanwhile. Ends on
    /// `stop`; what it made stays for the next run (spares are reused,
    /// named containers swept).
    pub(super) fn run(&self) {
        let mut backoff = SPARES_BACKOFF_MIN;
        let mut retry_at: Option<Instant> = None;
        loop {
            let job = {
                let mut p = self.pool.lock();
                if let Some(at) = retry_at.take() {
                    while !p.stop && Instant::now() < at {
                        self.wake.wait_until(&mut p, at);
                    }
                }
                loop {
                    if p.stop {
                        return;
                    }
                    if let Some(job) = self.next_job(&mut p) {
                        break job;
                    }
                    self.wake.wait(&mut p);
                }
            };
            let made = match job {
                Job::Remove(fids) => {
                    for f in fids {
                        let _ = std::fs::remove_file(self.containers.join(f.to_string()));
                    }
                    Ok(())
                }
                Job::Named(fid) => {
                    let made = make_empty(&self.containers, &self.containers.join(fid.to_string()));
                    let mut p = self.pool.lock();
                    p.making = None;
                    let (wanted, forgotten) = (
                        std::mem::take(&mut p.making_wanted),
                        std::mem::take(&mut p.making_forgotten),
                    );
                    match &made {
                        // A caller that wanted it meanwhile made its own,
                        // which replaced this one or was there first.
                        Ok(()) if wanted => {}
                        // Its fid went to another kind of object.
                        Ok(()) if forgotten => p.discard.push(fid),
                        Ok(()) => {
                            p.named.insert(fid);
                        }
                        // Already there: not ours to name or remove.
                        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                        Err(_) => {
                            // Tried again after the back-off.
                            if let Some(a) = p.ahead.get_mut(&fid.volume) {
                                a.made = a.made.min(fid.vnode);
                            }
                        }
                    }
                    made.map(drop).or_else(|e| match e.kind() {
                        std::io::ErrorKind::AlreadyExists => Ok(()),
                        _ => Err(e),
                    })
                }
                Job::Spare => self
                    .make_spare()
                    .map(|path| self.pool.lock().ready.push(path)),
            };
            match made {
                Ok(()) => backoff = SPARES_BACKOFF_MIN,
                Err(_) => {
                    retry_at = Some(Instant::now() + backoff);
                    backoff = (backoff * 2).min(SPARES_BACKOFF_MAX);
                }
            }
        }
    }
}
