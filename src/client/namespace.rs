//! Applying a record to the cached namespace, once: what it does to
//! directory listings and to its target's status, the way the server
//! applies it (`server::Batch::apply`). Pure functions, no cache, no
//! network: live operations (connected or emulated), crash redo
//! (`redo_log_in_cache`) and local application while disconnected
//! (`apply_locally`) all use them.

use std::collections::BTreeMap;

use crate::proto::{Attr, DirEntry, Fid, FileType, RecordOp, Timespec};

/// One change of one directory's listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Edit {
    /// The name now refers to this entry (replacing whatever it named).
    Put(DirEntry),
    /// The name no longer refers to `fid`.
    Drop { name: String, fid: Fid },
}

/// The listing edits `op` makes, per directory, in order. `ftype` is the
/// type of the record's target (what a rename or link moves).
pub(crate) fn listing_edits(op: &RecordOp, ftype: FileType) -> Vec<(Fid, Edit)> {
    let put = |dir: Fid, name: &str, fid: Fid, ftype: FileType| {
        (
            dir,
            Edit::Put(DirEntry {
                name: name.to_string(),
                fid,
                ftype,
            }),
        )
    };
    match op {
        RecordOp::Create {
            parent, name, fid, ..
        }
        | RecordOp::CreateWith {
            parent, name, fid, ..
        } => vec![put(*parent, name, *fid, FileType::File)],
        RecordOp::Mkdir {
            parent, name, fid, ..
        } => vec![put(*parent, name, *fid, FileType::Dir)],
        RecordOp::Symlink {
            parent, name, fid, ..
        } => vec![put(*parent, name, *fid, FileType::Symlink)],
        RecordOp::Mknod {
            parent,
            name,
            fid,
            ftype,
            ..
        } => vec![put(*parent, name, *fid, *ftype)],
        RecordOp::Link { parent, name, fid } => vec![put(*parent, name, *fid, ftype)],
        RecordOp::Remove { parent, name, fid } | RecordOp::Rmdir { parent, name, fid } => {
            vec![(
                *parent,
                Edit::Drop {
                    name: name.clone(),
                    fid: *fid,
                },
            )]
        }
        RecordOp::Rename {
            src_parent,
            src_name,
            dst_parent,
            dst_name,
            fid,
            ..
        } => vec![
            (
                *src_parent,
                Edit::Drop {
                    name: src_name.clone(),
                    fid: *fid,
                },
            ),
            put(*dst_parent, dst_name, *fid, ftype),
        ],
        RecordOp::Store { .. }
        | RecordOp::StoreInline { .. }
        | RecordOp::SetAttr { .. }
        | RecordOp::SetXattr { .. } => vec![],
    }
}

/// A cached directory listing, keyed by name: looking a name up, adding
/// or removing one costs O(log n), never a pass over (or a copy of) the
/// whole listing. Iterates in name order. It also counts its
/// subdirectories, so a directory's link count (2 + subdirectories, as
/// the server keeps it) follows a local edit without a pass either.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Listing {
    entries: BTreeMap<String, DirEntry>,
    subdirs: usize,
}

impl Listing {
    /// The entries as the server listed them (a later duplicate name wins).
    pub fn from_entries(v: Vec<DirEntry>) -> Listing {
        let mut l = Listing::default();
        for e in v {
            l.put(e);
        }
        l
    }

    /// The entry `name`, if there is one.
    pub fn get(&self, name: &str) -> Option<&DirEntry> {
        self.entries.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &DirEntry> + '_ {
        self.entries.values()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The number of entries that are directories.
    pub fn subdirs(&self) -> usize {
        self.subdirs
    }

    /// Make `d` the entry of its name (replacing whatever it named).
    pub fn put(&mut self, d: DirEntry) {
        let is_dir = d.ftype == FileType::Dir;
        if let Some(old) = self.entries.insert(d.name.clone(), d) {
            if old.ftype == FileType::Dir {
                self.subdirs -= 1;
            }
        }
        if is_dir {
            self.subdirs += 1;
        }
    }

    /// Drop the entry `name` if it names `fid`.
    pub fn drop_entry(&mut self, name: &str, fid: Fid) {
        if self.entries.get(name).is_some_and(|x| x.fid == fid) {
            if let Some(old) = self.entries.remove(name) {
                if old.ftype == FileType::Dir {
                    self.subdirs -= 1;
                }
            }
        }
    }
}

impl Edit {
    /// The name this edit changes.
    pub fn name(&self) -> &str {
        match self {
            Edit::Put(d) => &d.name,
            Edit::Drop { name, .. } => name,
        }
    }
}

/// Apply one edit to a listing; idempotent (redo may apply it twice).
pub(crate) fn apply_edit(l: &mut Listing, e: &Edit) {
    match e {
        Edit::Put(d) => {
            if l.get(&d.name) != Some(d) {
                l.put(d.clone());
            }
        }
        Edit::Drop { name, fid } => l.drop_entry(name, *fid),
    }
}

/// Apply the edits of `dir` among `edits`.
pub(crate) fn apply_edits(l: &mut Listing, dir: Fid, edits: &[(Fid, Edit)]) {
    for (d, e) in edits {
        if *d == dir {
            apply_edit(l, e);
        }
    }
}

/// The status the server gives the record's target after applying it:
/// `cached` (the target's cached status; `None` for a new object) changed
/// the same way, its version one step on, or not when `replaced` (the
/// record replaced one the log cancelled). `gone`: a remove that takes the
/// last name. `None` when the target is not cached but must be.
pub(crate) fn target_attr(
    op: &RecordOp,
    cached: Option<Attr>,
    replaced: bool,
    gone: bool,
    now: Timespec,
) -> Option<Attr> {
    let fid = op.target();
    let new = |ftype: FileType, mode: u32, size: u64, mtime: Timespec, owner: (u32, u32)| Attr {
        fid,
        ftype,
        mode: mode & 0o7777,
        nlink: if ftype == FileType::Dir { 2 } else { 1 },
        size,
        mtime,
        ctime: now,
        version: 1,
        uid: owner.0,
        gid: owner.1,
        atime: mtime,
        rdev: 0,
    };
    let mut a = match op {
        RecordOp::Create {
            mode,
            mtime,
            uid,
            gid,
            ..
        } => return Some(new(FileType::File, *mode, 0, *mtime, (*uid, *gid))),
        RecordOp::Mkdir {
            mode,
            mtime,
            uid,
            gid,
            ..
        } => return Some(new(FileType::Dir, *mode, 0, *mtime, (*uid, *gid))),
        RecordOp::Symlink {
            target,
            mtime,
            uid,
            gid,
            ..
        } => {
            let len = target.len() as u64;
            return Some(new(FileType::Symlink, 0o777, len, *mtime, (*uid, *gid)));
        }
        RecordOp::Mknod {
            ftype,
            mode,
            rdev,
            mtime,
            uid,
            gid,
            ..
        } => {
            let mut a = new(*ftype, *mode, 0, *mtime, (*uid, *gid));
            if matches!(ftype, FileType::CharDev | FileType::BlockDev) {
                a.rdev = *rdev;
            }
            return Some(a);
        }
        _ => cached?,
    };
    a.version = a.version + 1 - u64::from(replaced);
    a.ctime = now;
    match op {
        RecordOp::Store { length, mtime, .. } => {
            a.size = *length;
            a.mtime = *mtime;
        }
        RecordOp::SetAttr {
            mode,
            size,
            mtime,
            uid,
            gid,
            atime,
            ..
        } => {
            if let Some(m) = mode {
                a.mode = m & 0o7777;
            }
            if let Some(u) = uid {
                a.uid = *u;
            }
            if let Some(g) = gid {
                a.gid = *g;
            }
            if let Some(t) = atime {
                a.atime = *t;
            }
            if let Some(s) = size {
                if *s != a.size && mtime.is_none() {
                    a.mtime = now;
                }
                a.size = *s;
            }
            if let Some(t) = mtime {
                a.mtime = *t;
            }
        }
        RecordOp::Link { .. } => a.nlink += 1,
        RecordOp::Remove { .. } => a.nlink = if gone { 0 } else { a.nlink.saturating_sub(1) },
        RecordOp::Rmdir { .. } => a.nlink = 0,
        _ => {}
    }
    Some(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Replaces;

    const D: Fid = Fid::new(1, 1, 1);
    const E: Fid = Fid::new(1, 2, 1);
    const F: Fid = Fid::new(1, 3, 1);
    const G: Fid = Fid::new(1, 4, 1);

    fn ent(name: &str, fid: Fid) -> DirEntry {
        DirEntry {
            name: name.into(),
            fid,
            ftype: FileType::File,
        }
    }

    fn names(l: &Listing) -> Vec<(String, Fid)> {
        let mut v: Vec<_> = l.iter().map(|e| (e.name.clone(), e.fid)).collect();
        v.sort();
        v
    }

    #[test]
    fn a_create_puts_its_entry_once_and_a_remove_drops_only_that_object() {
        let t = Timespec::now();
        let create = RecordOp::Create {
            parent: D,
            name: "a".into(),
            fid: F,
            mode: 0o644,
            mtime: t,
            uid: 0,
            gid: 0,
        };
        let mut l = Listing::from_entries(vec![ent("b", G)]);
        let e = listing_edits(&create, FileType::File);
        apply_edits(&mut l, D, &e);
        apply_edits(&mut l, D, &e); // redo after a crash: no second entry
        assert_eq!(names(&l), vec![("a".into(), F), ("b".into(), G)]);
        // A remove of "b" naming another object leaves the entry alone.
        let rm = RecordOp::Remove {
            parent: D,
            name: "b".into(),
            fid: F,
        };
        apply_edits(&mut l, D, &listing_edits(&rm, FileType::File));
        assert_eq!(l.iter().count(), 2);
        let rm = RecordOp::Remove {
            parent: D,
            name: "b".into(),
            fid: G,
        };
        apply_edits(&mut l, D, &listing_edits(&rm, FileType::File));
        assert_eq!(names(&l), vec![("a".into(), F)]);
    }

    #[test]
    fn a_rename_moves_the_entry_and_replaces_the_destination() {
        let ren = RecordOp::Rename {
            src_parent: D,
            src_name: "a".into(),
            dst_parent: E,
            dst_name: "x".into(),
            fid: F,
            replaces: Replaces::Object(G),
        };
        let edits = listing_edits(&ren, FileType::Dir);
        let mut src = Listing::from_entries(vec![ent("a", F), ent("k", Fid::new(1, 9, 1))]);
        let mut dst = Listing::from_entries(vec![ent("x", G)]);
        apply_edits(&mut src, D, &edits);
        apply_edits(&mut dst, E, &edits);
        assert_eq!(names(&src), vec![("k".into(), Fid::new(1, 9, 1))]);
        assert_eq!(dst.iter().count(), 1);
        let x = dst.get("x").unwrap();
        assert_eq!((x.name.as_str(), x.fid), ("x", F));
        assert_eq!(x.ftype, FileType::Dir);
        // Within one directory: the old name goes, the new one replaces.
        let ren = RecordOp::Rename {
            src_parent: D,
            src_name: "a".into(),
            dst_parent: D,
            dst_name: "b".into(),
            fid: F,
            replaces: Replaces::Object(G),
        };
        let mut l = Listing::from_entries(vec![ent("a", F), ent("b", G)]);
        apply_edits(&mut l, D, &listing_edits(&ren, FileType::File));
        assert_eq!(names(&l), vec![("b".into(), F)]);
    }

    #[test]
    fn the_target_status_steps_on_as_the_server_would() {
        let t = Timespec::now();
        let base = Attr {
            fid: F,
            ftype: FileType::File,
            mode: 0o644,
            nlink: 2,
            size: 5,
            mtime: t,
            ctime: t,
            version: 7,
            uid: 0,
            gid: 0,
            atime: t,
            rdev: 0,
        };
        let st = RecordOp::Store {
            fid: F,
            expected_version: 0,
            upload_id: 0,
            length: 9,
            mtime: t,
        };
        let a = target_attr(&st, Some(base.clone()), false, false, t).unwrap();
        assert_eq!((a.size, a.version), (9, 8));
        // A store replacing a cancelled one does not step the version again.
        let a = target_attr(&st, Some(base.clone()), true, false, t).unwrap();
        assert_eq!(a.version, 7);
        let chmod = RecordOp::SetAttr {
            fid: F,
            expected_version: 0,
            mode: Some(0o100600),
            size: None,
            mtime: None,
            uid: None,
            gid: None,
            atime: None,
        };
        let a = target_attr(&chmod, Some(base.clone()), false, false, t).unwrap();
        assert_eq!((a.mode, a.size, a.version), (0o600, 5, 8));
        let rm = RecordOp::Remove {
            parent: D,
            name: "a".into(),
            fid: F,
        };
        assert_eq!(
            target_attr(&rm, Some(base.clone()), false, false, t)
                .unwrap()
                .nlink,
            1
        );
        assert_eq!(
            target_attr(&rm, Some(base), false, true, t).unwrap().nlink,
            0
        );
        assert!(
            target_attr(&rm, None, false, false, t).is_none(),
            "uncached"
        );
        let mk = RecordOp::Mkdir {
            parent: D,
            name: "d".into(),
            fid: G,
            mode: 0o40755,
            mtime: t,
            uid: 0,
            gid: 0,
        };
        let a = target_attr(&mk, None, false, false, t).unwrap();
        assert_eq!(
            (a.ftype, a.mode, a.nlink, a.version),
            (FileType::Dir, 0o755, 2, 1)
        );
    }
}
