//! The fid-based API under the path API: every operation on an object
//! (`getattr_fid`, `open_fid`, `readdir_fid`) or on a name in a directory
//! (`lookup_at`, `mkdir_at`, `remove_at`, `rename_at`, ...). The path
//! operations resolve a path and call these; a program that keeps fids
//! (the mount keys its inodes by them) calls them directly.

use super::api::{Client, DirEntry, Stat};
use super::owner::Owner;
use super::{file, File};
use crate::proto::RecordOp;
use crate::proto::{xattr, Fid, FileType, XattrHow, MAX_SYMLINK};
use crate::{Error, Result};

impl Client {
    /// The fid of `/`.
    pub fn root_fid(&self) -> Result<Fid> {
        self.inner.emulated_root()
    }

    /// The entry `name` in directory `parent`, if there is one.
    pub fn lookup_at(&self, parent: Fid, name: &str) -> Result<Option<DirEntry>> {
        check_name(name)?;
        Ok(self.inner.lookup(parent, name)?.map(|e| DirEntry {
            name: e.name,
            ftype: e.ftype,
            fid: e.fid,
        }))
    }

    /// The status of object `fid` (a symlink's own).
    pub fn getattr_fid(&self, fid: Fid) -> Result<Stat> {
        Ok(Stat::from(&self.inner.getattr(fid)?))
    }

    /// The entries of directory `fid`.
    pub fn readdir_fid(&self, fid: Fid) -> Result<Vec<DirEntry>> {
        Ok(self
            .inner
            .listing(fid)?
            .iter()
            .map(|e| DirEntry {
                name: e.name.clone(),
                ftype: e.ftype,
                fid: e.fid,
            })
            .collect())
    }

    /// The target of symlink `fid`.
    pub fn readlink_fid(&self, fid: Fid) -> Result<String> {
        self.inner.readlink_fid(fid)
    }

    /// Open the file `fid` (flags as `open`, without `O_CREAT`).
    pub fn open_fid(&self, fid: Fid, flags: i32) -> Result<File> {
        if flags & libc::O_CREAT != 0 {
            return Err(Error::Invalid(
                "open_fid does not create; use create_at".into(),
            ));
        }
        file::open_fid(&self.inner, fid, flags, false)
    }

    /// Create the file `name` in `parent` (`Exists` if the name is taken)
    /// and open it with `flags`.
    pub fn create_at(&self, parent: Fid, name: &str, mode: u32, flags: i32) -> Result<File> {
        self.create_at_as(parent, name, mode, flags, Owner::process())
    }

    /// `create_at` giving the new file `owner`.
    pub fn create_at_as(
        &self,
        parent: Fid,
        name: &str,
        mode: u32,
        flags: i32,
        owner: Owner,
    ) -> Result<File> {
        check_name(name)?;
        if self.inner.lookup(parent, name)?.is_some() {
            return Err(Error::Exists(name.to_string()));
        }
        let fid = file::create(&self.inner, parent, name, mode, owner)?;
        file::open_fid(
            &self.inner,
            fid,
            flags & !(libc::O_CREAT | libc::O_EXCL),
            true,
        )
    }

    /// Make the directory `name` in `parent`; returns its fid.
    pub fn mkdir_at(&self, parent: Fid, name: &str, mode: u32) -> Result<Fid> {
        self.mkdir_at_as(parent, name, mode, Owner::process())
    }

    /// `mkdir_at` giving the new directory `owner`.
    pub fn mkdir_at_as(&self, parent: Fid, name: &str, mode: u32, owner: Owner) -> Result<Fid> {
        check_name(name)?;
        let inner = &self.inner;
        if inner.lookup(parent, name)?.is_some() {
            return Err(Error::Exists(name.to_string()));
        }
        inner.create_object(
            parent,
            FileType::Dir,
            |fid, now| RecordOp::Mkdir {
                parent,
                name: name.to_string(),
                fid,
                mode: mode & 0o7777,
                mtime: now,
                uid: owner.uid,
                gid: owner.gid,
            },
            |attr| {
                inner.cache.set_listing(attr, Default::default());
                Ok(())
            },
        )
    }

    /// Make the symlink `name` in `parent` pointing to `target`.
    pub fn symlink_at(&self, parent: Fid, name: &str, target: &str) -> Result<Fid> {
        self.symlink_at_as(parent, name, target, Owner::process())
    }

    /// `symlink_at` giving the new symlink `owner`.
    pub fn symlink_at_as(
        &self,
        parent: Fid,
        name: &str,
        target: &str,
        owner: Owner,
    ) -> Result<Fid> {
        check_name(name)?;
        if target.is_empty() || target.len() > MAX_SYMLINK || target.contains('\0') {
            return Err(Error::Invalid(format!("symlink target {target:?}")));
        }
        let inner = &self.inner;
        if inner.lookup(parent, name)?.is_some() {
            return Err(Error::Exists(name.to_string()));
        }
        inner.create_object(
            parent,
            FileType::Symlink,
            |fid, now| RecordOp::Symlink {
                parent,
                name: name.to_string(),
                fid,
                target: target.to_string(),
                mtime: now,
                uid: owner.uid,
                gid: owner.gid,
            },
            |attr| {
                inner.cache.set_symlink(attr, target.to_string());
                Ok(())
            },
        )
    }

    /// Make the special file `name` in `parent`: a fifo, socket or device
    /// node (`ftype`), kept as metadata only (type, mode, `rdev`, owner);
    /// `Invalid` for another type. Returns its fid.
    pub fn mknod_at(
        &self,
        parent: Fid,
        name: &str,
        ftype: FileType,
        mode: u32,
        rdev: u64,
        owner: Owner,
    ) -> Result<Fid> {
        check_name(name)?;
        if !ftype.is_special() {
            return Err(Error::Invalid(format!("mknod of a {ftype:?}")));
        }
        let inner = &self.inner;
        if inner.lookup(parent, name)?.is_some() {
            return Err(Error::Exists(name.to_string()));
        }
        inner.create_object(
            parent,
            ftype,
            |fid, now| RecordOp::Mknod {
                parent,
                name: name.to_string(),
                fid,
                ftype,
                mode: mode & 0o7777,
                rdev,
                mtime: now,
                uid: owner.uid,
                gid: owner.gid,
            },
            |_| Ok(()),
        )
    }

    /// Add the name `name` in `parent` for the existing object `fid` (a
    /// hard link; `IsDir` for a directory, `Exists` if the name is taken).
    pub fn link_at(&self, fid: Fid, parent: Fid, name: &str) -> Result<()> {
        check_name(name)?;
        self.link_entry(fid, parent, name)
    }

    /// Remove the name `name` from `parent`: a directory (`dir`, which must
    /// be empty) or anything else.
    pub fn remove_at(&self, parent: Fid, name: &str, dir: bool) -> Result<()> {
        check_name(name)?;
        self.remove_entry(parent, name, dir, name)
    }

    /// Rename `src_name` in `src_parent` to `dst_name` in `dst_parent`.
    pub fn rename_at(
        &self,
        src_parent: Fid,
        src_name: &str,
        dst_parent: Fid,
        dst_name: &str,
    ) -> Result<()> {
        check_name(src_name)?;
        check_name(dst_name)?;
        self.rename_entries(
            src_parent, src_name, dst_parent, dst_name, src_name, dst_name,
        )
    }
}

/// A name in a directory: one component, not `.` or `..`.
fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(Error::Invalid(format!("name {name:?}")));
    }
    if name.len() > crate::proto::MAX_NAME {
        return Err(Error::NameTooLong(name.to_string()));
    }
    Ok(())
}

impl Client {
    /// Every extended attribute of `fid` (a symlink's own), in name order.
    pub fn xattrs_fid(&self, fid: Fid) -> Result<Vec<(String, Vec<u8>)>> {
        Ok(self.inner.xattrs(fid)?.1.as_ref().clone())
    }

    /// The value of attribute `name` of `fid`; `NotFound` (ENOENT; the
    /// mount answers ENODATA) if it has none of that name.
    pub fn getxattr_fid(&self, fid: Fid, name: &str) -> Result<Vec<u8>> {
        let (_, l) = self.inner.xattrs(fid)?;
        l.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .ok_or_else(|| Error::NotFound(format!("attribute {name:?}")))
    }

    /// Set (or with `XattrHow::Remove`, remove) attribute `name` of `fid`:
    /// `Create` fails with `Exists` if it exists, `Replace` and `Remove`
    /// with `NotFound` if it does not. One record, logged while
    /// disconnected like any other.
    pub fn setxattr_fid(&self, fid: Fid, name: &str, value: &[u8], how: XattrHow) -> Result<()> {
        xattr::check(name, value)?;
        let inner = &self.inner;
        // The flags are checked here first, so a record logged while
        // disconnected is one the server will accept.
        let (v0, before) = inner.xattrs(fid)?;
        let mut after = before.as_ref().clone();
        xattr::edit(&mut after, name, how, value).map_err(|r| match r {
            xattr::Refused::Exists => Error::Exists(format!("attribute {name:?}")),
            xattr::Refused::Missing => Error::NotFound(format!("attribute {name:?}")),
        })?;
        let tok = inner.callbacks.token(fid);
        let op = RecordOp::SetXattr {
            fid,
            name: name.to_string(),
            how,
            value: if how == XattrHow::Remove {
                Vec::new()
            } else {
                value.to_vec()
            },
        };
        let attr = inner.commit_op(op, None)?;
        inner.object_changed(&attr, tok);
        // Known exactly only if no other change came in between.
        if attr.version == v0 + 1 {
            inner
                .xattr_cache
                .put(fid, attr.version, std::sync::Arc::new(after));
        }
        Ok(())
    }
}
