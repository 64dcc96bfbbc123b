//! File modes of what the server and the client keep on disk. Both hold
//! data other local users must not read (secrets, other users' file
//! contents), so their directories are 0700 and their files 0600 whatever
//! the umask. A tree made by an older version is fixed at start, with one
//! message naming what changed, rather than refused: an operator upgrading
//! should not be locked out (SERVER.md / CLIENT.md "File modes").

use std::fs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::{Error, Result};

pub(crate) const DIR_MODE: u32 = 0o700;
pub(crate) const FILE_MODE: u32 = 0o600;

/// What a start-time check changed, for its one message.
#[derive(Default)]
pub(crate) struct Fixed {
    pub(crate) items: Vec<String>,
    pub(crate) count: usize,
}

/// Most paths named in the message; the rest are counted.
const NAMED: usize = 8;

impl Fixed {
    /// Give `path` exactly the permission bits `want` (following a symlink,
    /// so a cache_dir that is a link is fixed where it points). Missing is
    /// fine: there is nothing to protect.
    pub(crate) fn set(&mut self, path: &Path, want: u32) -> Result<()> {
        let meta = match fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(format!("stat {}", path.display()), e)),
        };
        let have = meta.permissions().mode() & 0o7777;
        if have == want {
            return Ok(());
        }
        fs::set_permissions(path, fs::Permissions::from_mode(want))
            .map_err(|e| Error::io(format!("chmod {:o} {}", want, path.display()), e))?;
        self.count += 1;
        if self.items.len() < NAMED {
            self.items
                .push(format!("{} {:o} -> {:o}", path.display(), have, want));
        }
        Ok(())
    }

    /// Every regular file directly inside `dir` gets `FILE_MODE`.
    pub(crate) fn files_in(&mut self, dir: &Path) -> Result<()> {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(format!("list {}", dir.display()), e)),
        };
        for ent in entries.flatten() {
            if ent.file_type().is_ok_and(|t| t.is_file()) {
                self.set(&ent.path(), FILE_MODE)?;
            }
        }
        Ok(())
    }

    /// The one message, or `None` when nothing had to change.
    pub(crate) fn message(&self) -> Option<String> {
        if self.count == 0 {
            return None;
        }
        let mut m = format!(
            "tightened the modes of {} path(s) others could read: {}",
            self.count,
            self.items.join(", ")
        );
        if self.count > self.items.len() {
            m.push_str(&format!(" and {} more", self.count - self.items.len()));
        }
        Some(m)
    }
}

/// Create `dir` (and its parents) if missing; `dir` itself ends up 0700
/// whatever the umask. Parents made here are left to the umask: they may
/// be shared.
pub(crate) fn create_private_dir(dir: &Path) -> Result<()> {
    if let Some(parent) = dir.parent() {
        if !parent.as_os_str().is_empty() {
            fs::create_dir_all(parent)
                .map_err(|e| Error::io(format!("create {}", parent.display()), e))?;
        }
    }
    match fs::DirBuilder::new().mode(DIR_MODE).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io(format!("create {}", dir.display()), e)),
    }
    Ok(())
}

/// Make sure a file exists with mode 0600 before a library (redb) opens
/// it, so it is never readable by others even for a moment.
pub(crate) fn precreate_private_file(path: &Path) -> Result<()> {
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
    {
        Ok(f) => {
            // `mode` passes through the umask; state it exactly.
            f.set_permissions(fs::Permissions::from_mode(FILE_MODE))
                .map_err(|e| Error::io(format!("chmod {}", path.display()), e))?;
            // The new name must survive a power cut with what goes in it.
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| Error::io(format!("fsync {}", dir.display()), e))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::io(format!("create {}", path.display()), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixes_modes_and_names_them() {
        let d = std::env::temp_dir().join(format!("coda-fsmode-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        create_private_dir(&d).unwrap();
        let f = d.join("f");
        fs::write(&f, b"x").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();
        let mut fixed = Fixed::default();
        fixed.set(&d, DIR_MODE).unwrap();
        fixed.files_in(&d).unwrap();
        fixed.set(&d.join("missing"), FILE_MODE).unwrap();
        assert_eq!(fixed.count, 1);
        assert!(fixed.message().unwrap().contains("644 -> 600"));
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&d), 0o700);
        assert_eq!(mode(&f), 0o600);
        let p = d.join("db");
        precreate_private_file(&p).unwrap();
        assert_eq!(mode(&p), 0o600);
        fs::remove_dir_all(&d).unwrap();
    }
}
