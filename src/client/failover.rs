//! Failover: repoint a symlink from the remote tree to a local copy in one
//! atomic step (ARCHITECTURE decision 8).
//!
//! The swap is a new symlink under a temporary name in the same directory,
//! renamed over the old link: `rename(2)` replaces it atomically, so a reader
//! of the link sees the old target or the new one, never a missing link.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::conn::Interrupt;
use super::event::{Event, EventBus};
use super::mode::{FailedOver, Mode};
use crate::{Error, Result};

/// Swap `link` to `target`, then fail every pending and later remote
/// operation with `Eio` (`mode` interrupts what waits on `interrupt`).
/// Takes no lock a network wait holds, so it returns at once even while a
/// server hangs.
pub(crate) fn fail_over(
    mode: &Mode,
    interrupt: &Interrupt,
    events: &EventBus,
    link: &Path,
    target: &Path,
) -> Result<()> {
    // No lock held across the swap (it fsyncs the directory).
    let before = std::fs::read_link(link).ok();
    swap_link(link, target)?;
    let record = before.map(|before| FailedOver {
        link: link.to_path_buf(),
        before,
    });
    mode.fail_over(
        record,
        interrupt,
        &format!("failed over: {} -> {}", link.display(), target.display()),
    );
    events.emit(Event::Failover {
        link: link.display().to_string(),
        target: target.display().to_string(),
    });
    Ok(())
}

/// The end of a failback, once a server answered and the cache is
/// revalidated: swap `link` to `target`, let remote operations through
/// again, and say so. `mark_up` runs between the two, as the prober's
/// health must be up before the event tells anyone.
pub(crate) fn finish_fail_back(
    mode: &Mode,
    interrupt: &Interrupt,
    events: &EventBus,
    link: &Path,
    target: &Path,
    mark_up: impl FnOnce(),
) -> Result<()> {
    swap_link(link, target)?;
    mode.fail_back(interrupt);
    mark_up();
    events.emit(Event::Failback {
        link: link.display().to_string(),
        target: target.display().to_string(),
    });
    Ok(())
}

/// Atomically make the symlink `link` point to `target`. Refuses (`Invalid`)
/// to replace anything that is not a symlink, and `NotFound` if `link` does
/// not exist: failover repoints a link an operator set up, it never clobbers
/// a real file or directory.
pub fn swap_link(link: &Path, target: &Path) -> Result<()> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let meta = std::fs::symlink_metadata(link)
        .map_err(|e| Error::io(format!("failover link {}", link.display()), e))?;
    if !meta.file_type().is_symlink() {
        return Err(Error::Invalid(format!(
            "failover link {} is not a symlink; refusing to replace it",
            link.display()
        )));
    }
    let name = link
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("failover link {} has no name", link.display())))?;
    let dir = match link.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(
        ".{}.coda-swap.{}.{}",
        name.to_string_lossy(),
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    symlink(target, &tmp).map_err(|e| Error::io(format!("making {}", tmp.display()), e))?;
    if let Err(e) = std::fs::rename(&tmp, link) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(format!("renaming over {}", link.display()), e));
    }
    // Make the new link survive a crash of the host.
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("coda-swap-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    #[test]
    fn swap_repoints_a_symlink_and_leaves_no_temporary() {
        let d = scratch("ok");
        let link = d.join("web");
        symlink("remote", &link).unwrap();
        swap_link(&link, Path::new("local")).unwrap();
        assert_eq!(std::fs::read_link(&link).unwrap(), PathBuf::from("local"));
        let names: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("web")]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn swap_refuses_files_directories_and_missing_links() {
        let d = scratch("refuse");
        std::fs::write(d.join("file"), b"x").unwrap();
        std::fs::create_dir(d.join("dir")).unwrap();
        assert!(matches!(
            swap_link(&d.join("file"), Path::new("t")),
            Err(Error::Invalid(_))
        ));
        assert!(matches!(
            swap_link(&d.join("dir"), Path::new("t")),
            Err(Error::Invalid(_))
        ));
        assert_eq!(
            swap_link(&d.join("none"), Path::new("t"))
                .unwrap_err()
                .code(),
            -libc::ENOENT
        );
        assert_eq!(std::fs::read(d.join("file")).unwrap(), b"x");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
