//! Extended attributes: read with `GetXattrs` and kept in memory with the
//! object version they belong to (valid exactly while the cached attr has
//! that version, so a callback break or any change retires them), changed
//! by `SetXattr` records through the CML like every mutation.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::proto::{Fid, XattrHow, MAX_XATTR_NAME, MAX_XATTR_VALUE};
use crate::{Error, Result};

/// One object's attributes, in name order.
pub(crate) type XattrList = Arc<Vec<(String, Vec<u8>)>>;

/// fid → (object version, its attributes).
#[derive(Default)]
pub(crate) struct XattrCache {
    map: Mutex<HashMap<Fid, (u64, XattrList)>>,
}

/// Bounds the in-memory lists: past it, the oldest are simply refetched.
const MAX_CACHED: usize = 4096;

impl XattrCache {
    pub(crate) fn get(&self, fid: Fid, version: u64) -> Option<XattrList> {
        match self.map.lock().get(&fid) {
            Some((v, l)) if *v == version => Some(l.clone()),
            _ => None,
        }
    }

    /// The object moved one version by a change of ours that left its
    /// attributes alone: a list of the version before is still exact.
    pub(crate) fn carry(&self, fid: Fid, version: u64) {
        let mut m = self.map.lock();
        if let Some((v, _)) = m.get_mut(&fid) {
            if *v + 1 == version {
                *v = version;
            }
        }
    }

    pub(crate) fn put(&self, fid: Fid, version: u64, list: XattrList) {
        let mut m = self.map.lock();
        if m.len() >= MAX_CACHED && !m.contains_key(&fid) {
            m.clear();
        }
        m.insert(fid, (version, list));
    }
}

/// `how` applied to a list sorted by name (as the server applies it, once
/// checked).
pub(crate) fn apply(list: &mut Vec<(String, Vec<u8>)>, name: &str, how: XattrHow, value: &[u8]) {
    match (how, list.binary_search_by(|(n, _)| n.as_str().cmp(name))) {
        (XattrHow::Remove, Ok(i)) => {
            list.remove(i);
        }
        (XattrHow::Remove, Err(_)) => {}
        (_, Ok(i)) => list[i].1 = value.to_vec(),
        (_, Err(i)) => list.insert(i, (name.to_string(), value.to_vec())),
    }
}

/// A name and value `setxattr` may set (the server checks the same).
pub(crate) fn check(name: &str, value: &[u8]) -> Result<()> {
    if name.is_empty() || name.len() > MAX_XATTR_NAME || name.contains('\0') {
        return Err(Error::Invalid(format!("attribute name {name:?}")));
    }
    if value.len() > MAX_XATTR_VALUE {
        return Err(Error::Invalid(format!(
            "attribute value of {} bytes exceeds {MAX_XATTR_VALUE}",
            value.len()
        )));
    }
    Ok(())
}

/// The list `before` with `how` applied to `name`, or why `how` fails:
/// `Create` of a name there, `Replace` or `Remove` of one missing.
pub(crate) fn edited(
    before: &[(String, Vec<u8>)],
    name: &str,
    value: &[u8],
    how: XattrHow,
) -> Result<Vec<(String, Vec<u8>)>> {
    let at = before.binary_search_by(|(n, _)| n.as_str().cmp(name));
    match (how, at) {
        (XattrHow::Create, Ok(_)) => return Err(Error::Exists(format!("attribute {name:?}"))),
        (XattrHow::Replace | XattrHow::Remove, Err(_)) => {
            return Err(Error::NotFound(format!("attribute {name:?}")))
        }
        _ => {}
    }
    let mut after = before.to_vec();
    apply(&mut after, name, how, value);
    Ok(after)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(names: &[&str]) -> Vec<(String, Vec<u8>)> {
        names
            .iter()
            .map(|n| (n.to_string(), n.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn an_edit_keeps_the_list_in_name_order_and_refuses_what_the_flags_forbid() {
        let before = list(&["user.a", "user.c"]);
        let after = edited(&before, "user.b", b"x", XattrHow::Create).unwrap();
        let names: Vec<&str> = after.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["user.a", "user.b", "user.c"]);
        let after = edited(&before, "user.c", b"new", XattrHow::Replace).unwrap();
        assert_eq!(after[1].1, b"new");
        let after = edited(&before, "user.a", b"", XattrHow::Remove).unwrap();
        assert_eq!(after, list(&["user.c"]));
        assert!(matches!(
            edited(&before, "user.a", b"x", XattrHow::Create),
            Err(Error::Exists(_))
        ));
        for how in [XattrHow::Replace, XattrHow::Remove] {
            assert!(matches!(
                edited(&before, "user.z", b"x", how),
                Err(Error::NotFound(_))
            ));
        }
        // Set: either way.
        assert_eq!(
            edited(&before, "user.z", b"z", XattrHow::Set)
                .unwrap()
                .len(),
            3
        );
        assert_eq!(
            edited(&before, "user.a", b"z", XattrHow::Set).unwrap()[0].1,
            b"z"
        );
    }

    #[test]
    fn names_and_values_are_checked_before_anything_is_logged() {
        assert!(check("user.ok", b"v").is_ok());
        assert!(matches!(check("", b"v"), Err(Error::Invalid(_))));
        assert!(matches!(check("user.\0", b"v"), Err(Error::Invalid(_))));
        let long = "u".repeat(MAX_XATTR_NAME + 1);
        assert!(matches!(check(&long, b"v"), Err(Error::Invalid(_))));
        let big = vec![0u8; MAX_XATTR_VALUE + 1];
        assert!(matches!(check("user.big", &big), Err(Error::Invalid(_))));
    }
}
