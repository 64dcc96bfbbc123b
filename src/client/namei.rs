//! Path resolution: absolute paths, component by component through cached
//! directory listings. `..` never climbs above `/`; symlinks in intermediate
//! components (and the last one, when asked) are followed, absolute targets
//! from the file system's root, at most [`MAX_HOPS`] times.

use std::collections::VecDeque;

use crate::proto::{check_name, Fid, FileType};
use crate::{Error, Result};

pub(crate) const MAX_HOPS: usize = 40;
/// Most directory levels `Cache::path_of` climbs.
pub(crate) const MAX_DEPTH_FOR_NAMES: usize = 256;

/// Check a caller's path and split it into components (`.` and empty ones
/// dropped; `..` kept for the walk).
pub(crate) fn split_path(path: &str) -> Result<VecDeque<String>> {
    if !path.starts_with('/') {
        return Err(Error::Invalid(format!("path {path:?} is not absolute")));
    }
    if path.contains('\0') {
        return Err(Error::Invalid(format!("path {path:?} holds NUL")));
    }
    Ok(components(path))
}

fn components(path: &str) -> VecDeque<String> {
    path.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .map(str::to_string)
        .collect()
}

/// What a path walk needs of the client: the root, one lookup, one
/// readlink, and how an error names the path.
pub(crate) trait Tree {
    fn root(&self) -> Result<Fid>;
    fn lookup(&self, dir: Fid, name: &str) -> Result<Option<crate::proto::DirEntry>>;
    fn readlink_fid(&self, fid: Fid) -> Result<String>;
    fn at_path(&self, e: Error, path: &str) -> Error;
}

/// Walk `comps` from the root. Returns the object reached and its type.
fn walk(
    t: &impl Tree,
    path: &str,
    mut comps: VecDeque<String>,
    follow_last: bool,
) -> Result<(Fid, FileType)> {
    let root = t.root()?;
    // The directories we stand in, root first: `..` pops, never past root.
    let mut stack: Vec<Fid> = vec![root];
    let mut here = (root, FileType::Dir);
    let mut hops = 0;
    while let Some(c) = comps.pop_front() {
        if here.1 != FileType::Dir {
            return Err(Error::NotDir(path.to_string()));
        }
        if c == ".." {
            if stack.len() > 1 {
                stack.pop();
            }
            here = (*stack.last().expect("root stays"), FileType::Dir);
            continue;
        }
        if c.len() > crate::proto::MAX_NAME {
            return Err(Error::NameTooLong(path.to_string()));
        }
        let ent = t
            .lookup(here.0, &c)?
            .ok_or_else(|| Error::NotFound(path.to_string()))?;
        if ent.ftype == FileType::Symlink && (follow_last || !comps.is_empty()) {
            hops += 1;
            if hops > MAX_HOPS {
                return Err(Error::Loop(path.to_string()));
            }
            let target = t.readlink_fid(ent.fid)?;
            if target.is_empty() {
                return Err(Error::NotFound(path.to_string()));
            }
            if target.starts_with('/') {
                stack.truncate(1);
                here = (root, FileType::Dir);
            }
            for t in components(&target).into_iter().rev() {
                comps.push_front(t);
            }
            continue;
        }
        if ent.ftype == FileType::Dir {
            stack.push(ent.fid);
        }
        here = (ent.fid, ent.ftype);
    }
    Ok(here)
}

/// The object `path` names (the final symlink followed if `follow`).
pub(crate) fn resolve(t: &impl Tree, path: &str, follow: bool) -> Result<(Fid, FileType)> {
    let comps = split_path(path)?;
    walk(t, path, comps, follow).map_err(|e| t.at_path(e, path))
}

/// The directory that holds `path`'s last component, and that name (for
/// operations that create, remove or rename it).
pub(crate) fn resolve_parent(t: &impl Tree, path: &str) -> Result<(Fid, String)> {
    let mut comps = split_path(path)?;
    let name = comps
        .pop_back()
        .ok_or_else(|| Error::Invalid(format!("{path:?} names the root, not an entry")))?;
    if name == ".." {
        return Err(Error::Invalid(format!("{path:?} ends in ..")));
    }
    check_name(&name)?;
    let (dir, ftype) = walk(t, path, comps, true).map_err(|e| t.at_path(e, path))?;
    if ftype != FileType::Dir {
        return Err(Error::NotDir(path.to_string()));
    }
    Ok((dir, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_and_nul_paths_are_refused() {
        assert!(matches!(split_path("a/b"), Err(Error::Invalid(_))));
        assert!(matches!(split_path(""), Err(Error::Invalid(_))));
        assert!(matches!(split_path("/a\0b"), Err(Error::Invalid(_))));
    }

    #[test]
    fn dots_and_empty_components_are_dropped_but_dotdot_kept() {
        let c: Vec<_> = split_path("//a/./b//../c/").unwrap().into_iter().collect();
        assert_eq!(c, vec!["a", "b", "..", "c"]);
        assert!(split_path("/").unwrap().is_empty());
    }
}
