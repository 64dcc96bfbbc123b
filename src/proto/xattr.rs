//! Extended attributes as both sides keep them: a list sorted by name, the
//! checks of a name and a value, and a `setxattr(2)` change applied with
//! its flags' rules. The server applies a `SetXattr` record with these; the
//! client checks the same before it logs one, so a record logged while
//! disconnected is one the server accepts.

use super::{XattrHow, MAX_XATTR_NAME, MAX_XATTR_VALUE};
use crate::{Error, Result};

/// One object's attributes: (name, value), sorted by name.
pub type XattrList = Vec<(String, Vec<u8>)>;

/// Why a change's flags refuse it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `Create` of a name the list has (`XATTR_CREATE`: EEXIST).
    Exists,
    /// `Replace` or `Remove` of a name it lacks (ENODATA).
    Missing,
}

/// A name and value a `SetXattr` may carry.
pub fn check(name: &str, value: &[u8]) -> Result<()> {
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

/// Apply `how` to `name` in `list`, after its flags' checks; on a refusal
/// the list is unchanged.
pub fn edit(
    list: &mut XattrList,
    name: &str,
    how: XattrHow,
    value: &[u8],
) -> std::result::Result<(), Refused> {
    let at = list.binary_search_by(|(n, _)| n.as_str().cmp(name));
    match (how, at) {
        (XattrHow::Create, Ok(_)) => Err(Refused::Exists),
        (XattrHow::Replace | XattrHow::Remove, Err(_)) => Err(Refused::Missing),
        _ => {
            apply(list, name, how, value);
            Ok(())
        }
    }
}

/// Apply `how` to `name` in `list` without the flags' checks (a change
/// already accepted: a `Remove` of a name gone meanwhile does nothing, any
/// other sets the value).
pub fn apply(list: &mut XattrList, name: &str, how: XattrHow, value: &[u8]) {
    match (how, list.binary_search_by(|(n, _)| n.as_str().cmp(name))) {
        (XattrHow::Remove, Ok(i)) => {
            list.remove(i);
        }
        (XattrHow::Remove, Err(_)) => {}
        (_, Ok(i)) => list[i].1 = value.to_vec(),
        (_, Err(i)) => list.insert(i, (name.to_string(), value.to_vec())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(names: &[&str]) -> XattrList {
        names
            .iter()
            .map(|n| (n.to_string(), n.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn an_edit_keeps_the_list_in_name_order_and_refuses_what_the_flags_forbid() {
        let mut l = list(&["user.a", "user.c"]);
        edit(&mut l, "user.b", XattrHow::Create, b"x").unwrap();
        let names: Vec<&str> = l.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["user.a", "user.b", "user.c"]);
        edit(&mut l, "user.c", XattrHow::Replace, b"new").unwrap();
        assert_eq!(l[2].1, b"new");
        edit(&mut l, "user.a", XattrHow::Remove, b"").unwrap();
        assert_eq!(l.len(), 2);
        let before = l.clone();
        assert_eq!(
            edit(&mut l, "user.b", XattrHow::Create, b"y"),
            Err(Refused::Exists)
        );
        for how in [XattrHow::Replace, XattrHow::Remove] {
            assert_eq!(edit(&mut l, "user.z", how, b"z"), Err(Refused::Missing));
        }
        assert_eq!(l, before, "a refusal changes nothing");
        // Set: either way.
        edit(&mut l, "user.z", XattrHow::Set, b"z").unwrap();
        edit(&mut l, "user.b", XattrHow::Set, b"w").unwrap();
        assert_eq!(
            l,
            vec![
                ("user.b".to_string(), b"w".to_vec()),
                ("user.c".to_string(), b"new".to_vec()),
                ("user.z".to_string(), b"z".to_vec()),
            ]
        );
        // Unchecked: a Create of a name there sets it, a Remove of one
        // missing does nothing.
        apply(&mut l, "user.b", XattrHow::Create, b"v");
        apply(&mut l, "user.q", XattrHow::Remove, b"");
        assert_eq!(l[0].1, b"v");
        assert_eq!(l.len(), 3);
    }

    #[test]
    fn names_and_values_are_checked() {
        assert!(check("user.ok", b"v").is_ok());
        assert!(matches!(check("", b"v"), Err(Error::Invalid(_))));
        assert!(matches!(check("user.\0", b"v"), Err(Error::Invalid(_))));
        let long = "u".repeat(MAX_XATTR_NAME + 1);
        assert!(matches!(check(&long, b"v"), Err(Error::Invalid(_))));
        let big = vec![0u8; MAX_XATTR_VALUE + 1];
        assert!(matches!(check("user.big", &big), Err(Error::Invalid(_))));
    }
}
