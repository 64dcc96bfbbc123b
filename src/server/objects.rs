//! Object files on disk: where each object's data lives, staged uploads, and
//! the startup sweep that removes files no committed metadata points to.
//!
//! Layout under the data directory:
//! - `objects/<volume>/<vnode>.<unique>.<dv>`: file data, one file per data
//!   version; a new version always gets a new name, so a fetch that opened
//!   an old one keeps reading a consistent snapshot.
//! - `staging/<client-hex>-<upload_id>`: uploads waiting for a Store record.
//! - `staging/tmp-*`: uploads still arriving.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use crate::proto::Fid;
use crate::{Error, Result};

pub fn objects_dir(root: &Path, volume: u32) -> PathBuf {
    root.join("objects").join(volume.to_string())
}

pub fn object_path(root: &Path, fid: Fid, dv: u64) -> PathBuf {
    objects_dir(root, fid.volume).join(format!("{}.{}.{}", fid.vnode, fid.unique, dv))
}

pub fn staging_dir(root: &Path) -> PathBuf {
    root.join("staging")
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn staged_path(root: &Path, client: &[u8; 16], upload_id: u64) -> PathBuf {
    staging_dir(root).join(format!("{}-{upload_id}", hex(client)))
}

/// Parse an object file name back into (vnode, unique, dv).
pub fn parse_object_name(name: &str) -> Option<(u64, u32, u64)> {
    let mut it = name.split('.');
    let vnode = it.next()?.parse().ok()?;
    let unique = it.next()?.parse().ok()?;
    let dv = it.next()?.parse().ok()?;
    if it.next().is_some() {
        return None;
    }
    Some((vnode, unique, dv))
}

/// A fresh, unique name in `fid`'s objects directory for a data file
/// written ahead of its batch's commit (`prepare_data`). Not an object
/// name (`parse_object_name` refuses it), so a leftover of a crash is
/// removed by the startup sweep.
fn prepared_path(root: &Path, fid: Fid) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    objects_dir(root, fid.volume).join(format!("{}.{}.new{n}", fid.vnode, fid.unique))
}

/// Write `data` to a new file in `fid`'s objects directory, ahead of the
/// commit of the batch that stores it (the caller fsyncs it, see
/// `reintegrate.rs` "Prepared"); the commit then only renames it to its
/// versioned name. On failure nothing is left behind.
pub fn prepare_data(root: &Path, fid: Fid, data: &[u8]) -> Result<PathBuf> {
    let path = prepared_path(root, fid);
    if let Err(e) = write_new(&path, data) {
        remove_quietly(&path);
        return Err(Error::io(format!("write {}", path.display()), e));
    }
    Ok(path)
}

/// Create the object file `path` (it must not exist; owner-only) holding
/// `data`. Not synced: the caller decides when.
pub fn write_new(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(data))
}

/// fsync a directory so the names created or removed in it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("fsync directory {}", dir.display()), e))
}

/// Most fsyncs of a group commit's data files run at once: each waits
/// mostly on the device, and the file system joins concurrent ones into
/// fewer journal commits.
const SYNC_THREADS: usize = 8;

/// fsync the data of every file in `files` (in parallel when there are
/// several); the first error, if any.
pub fn sync_files(files: &[&PathBuf]) -> Result<()> {
    let one = |p: &PathBuf| -> Result<()> {
        File::open(p)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(format!("fsync {}", p.display()), e))
    };
    if files.len() <= 1 {
        return files.iter().try_for_each(|p| one(p));
    }
    let per = files.len().div_ceil(SYNC_THREADS);
    std::thread::scope(|s| {
        let parts: Vec<_> = files
            .chunks(per)
            .map(|part| s.spawn(move || part.iter().try_for_each(|p| one(p))))
            .collect();
        parts.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|_| Err(Error::Eio("an fsync thread panicked".into())))
        })
    })
}

/// Make a group commit's data durable: fsync the data of every file in
/// `files` and every directory in `dirs`, all at once (each mostly waits on
/// the device, and the file system joins concurrent fsyncs into one journal
/// commit, where one after the other costs a commit each). Returns once all
/// are done; the first error, a file's mapped by `file_err`.
pub fn sync_files_and_dirs(
    files: &[&PathBuf],
    dirs: &[&PathBuf],
    file_err: impl Fn(Error) -> Error + Sync,
) -> Result<()> {
    if dirs.is_empty() || files.is_empty() {
        sync_files(files).map_err(&file_err)?;
        return dirs.iter().try_for_each(|d| sync_dir(d));
    }
    std::thread::scope(|s| {
        let dirs_done = s.spawn(|| dirs.iter().try_for_each(|d| sync_dir(d)));
        let f = sync_files(files).map_err(&file_err);
        let d = dirs_done
            .join()
            .unwrap_or_else(|_| Err(Error::Eio("an fsync thread panicked".into())));
        f.and(d)
    })
}

/// Remove a file, ignoring "already gone": used for garbage whose removal is
/// an optimisation (the startup sweep would catch it anyway).
pub fn remove_quietly(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            super::log::warn(format_args!("cannot remove {}: {e}", path.display()));
        }
    }
}

/// Delete every staged or partial upload: staged uploads belong to client
/// sessions, and no session survives a server restart.
pub fn clear_staging(root: &Path) -> Result<()> {
    let dir = staging_dir(root);
    fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    let entries =
        fs::read_dir(&dir).map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
    for ent in entries.flatten() {
        remove_quietly(&ent.path());
    }
    Ok(())
}

/// Every object file present on disk, as (path, fid, dv). Unparseable names
/// are returned with `None` so the sweep can remove them too.
/// An object file found on disk, and what its name says: (fid, dv).
pub type FoundFile = (PathBuf, Option<(Fid, u64)>);

pub fn list_object_files(root: &Path) -> Result<Vec<FoundFile>> {
    let base = root.join("objects");
    fs::create_dir_all(&base).map_err(|e| Error::io(format!("create {}", base.display()), e))?;
    let mut out = Vec::new();
    let vols = fs::read_dir(&base).map_err(|e| Error::io(format!("list {}", base.display()), e))?;
    for vol in vols.flatten() {
        let Some(volume) = vol.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let files = fs::read_dir(vol.path())
            .map_err(|e| Error::io(format!("list {}", vol.path().display()), e))?;
        for f in files.flatten() {
            let parsed = f
                .file_name()
                .to_str()
                .and_then(parse_object_name)
                .map(|(vnode, unique, dv)| (Fid::new(volume, vnode, unique), dv));
            out.push((f.path(), parsed));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_round_trip() {
        let p = object_path(Path::new("/d"), Fid::new(3, 44, 1), 7);
        assert_eq!(p, Path::new("/d/objects/3/44.1.7"));
        let name = p.file_name().unwrap().to_str().unwrap();
        assert_eq!(parse_object_name(name), Some((44, 1, 7)));
        assert_eq!(parse_object_name("44.1"), None);
        assert_eq!(parse_object_name("44.1.7.8"), None);
        assert_eq!(parse_object_name("x.1.7"), None);
        // A data file written ahead of its commit is never taken for one.
        let p = prepared_path(Path::new("/d"), Fid::new(3, 44, 1));
        let name = p.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("44.1.new"), "{name}");
        assert_eq!(parse_object_name(name), None);
    }
}
