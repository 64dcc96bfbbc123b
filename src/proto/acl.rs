//! Access rights as both sides name them: Coda's seven rights letters, the
//! special group names, and one entry of a directory's access list.
//! Evaluation (whose rights are what) is the server's (`server::acl`).

use crate::{Error, Result};

/// `r`: read the contents of the directory's files.
pub const READ: u8 = 1;
/// `l`: look up names in the directory, list it, get status of its objects.
pub const LOOKUP: u8 = 2;
/// `i`: insert new names (create, mkdir, symlink, link, rename into).
pub const INSERT: u8 = 4;
/// `d`: delete names (remove, rmdir, rename out of).
pub const DELETE: u8 = 8;
/// `w`: write the directory's files and change their attributes.
pub const WRITE: u8 = 16;
/// `k`: lock (kept for Coda compatibility; nothing takes locks yet).
pub const LOCK: u8 = 32;
/// `a`: administer the directory's access list.
pub const ADMINISTER: u8 = 64;
/// All seven rights.
pub const ALL: u8 = 0x7f;

/// The letters in their canonical order, with their bits.
const LETTERS: [(char, u8); 7] = [
    ('r', READ),
    ('l', LOOKUP),
    ('i', INSERT),
    ('d', DELETE),
    ('w', WRITE),
    ('k', LOCK),
    ('a', ADMINISTER),
];

/// The group whose members may do anything, everywhere.
pub const ADMINISTRATORS: &str = "System:Administrators";
/// The group every authenticated user (and `anonymous`) belongs to.
pub const ANY_USER: &str = "System:AnyUser";
/// The user that authenticates without a secret when the server allows it;
/// it never holds more than `rl`.
pub const ANONYMOUS: &str = "anonymous";

/// Longest user or group name in an access list.
pub const MAX_ACL_NAME: usize = 128;
/// Most entries one directory's access list holds.
pub const MAX_ACL_ENTRIES: usize = 256;

/// One entry of a directory's access list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclEntry {
    /// A user name, or a group name (group names contain `:`).
    pub name: String,
    /// The rights granted (or, when `negative`, taken away), as bits.
    pub rights: u8,
    /// A negative entry removes its rights from whatever the positive
    /// entries grant: negative beats positive.
    pub negative: bool,
}

/// Rights bits as letters in canonical order (`rlidwka`), or `none`.
pub fn rights_string(bits: u8) -> String {
    let s: String = LETTERS
        .iter()
        .filter(|(_, b)| bits & b != 0)
        .map(|(c, _)| *c)
        .collect();
    if s.is_empty() {
        "none".into()
    } else {
        s
    }
}

/// Parse what `coda setacl` takes: letters (`rl`), `all`, `read` (`rl`),
/// `write` (`rlidwk`) or `none`; a leading `-` makes it a negative entry.
/// Returns the bits (0 for `none`: remove the entry) and the sign.
pub fn parse_rights(spec: &str) -> Result<(u8, bool)> {
    let (negative, body) = match spec.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, spec),
    };
    let bits = match body {
        "none" => 0,
        "all" => ALL,
        "read" => READ | LOOKUP,
        "write" => READ | LOOKUP | INSERT | DELETE | WRITE | LOCK,
        "" => return Err(Error::Invalid("empty rights (use none to remove)".into())),
        letters => {
            let mut bits = 0;
            for ch in letters.chars() {
                let Some((_, b)) = LETTERS.iter().find(|(c, _)| *c == ch) else {
                    return Err(Error::Invalid(format!(
                        "rights {spec:?}: {ch:?} is not one of r l i d w k a"
                    )));
                };
                bits |= b;
            }
            bits
        }
    };
    Ok((bits, negative))
}

/// Check a name an access-list entry may carry: a user name or a group name
/// (`owner:group`, `System:...`), at most [`MAX_ACL_NAME`] bytes of
/// letters, digits, `_`, `-`, `.`, `:`.
pub fn check_acl_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_ACL_NAME
        && !name.starts_with(['.', ':'])
        && !name.ends_with(':')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "name {name:?}: a user or group name (letters, digits, '_', '-', '.', ':')"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rights_parse_and_print() {
        assert_eq!(parse_rights("rl").unwrap(), (READ | LOOKUP, false));
        assert_eq!(parse_rights("-w").unwrap(), (WRITE, true));
        assert_eq!(parse_rights("none").unwrap(), (0, false));
        assert_eq!(parse_rights("-none").unwrap(), (0, true));
        assert_eq!(parse_rights("all").unwrap(), (ALL, false));
        assert_eq!(parse_rights("read").unwrap().0, READ | LOOKUP);
        assert_eq!(rights_string(parse_rights("write").unwrap().0), "rlidwk");
        assert_eq!(rights_string(parse_rights("alr").unwrap().0), "rla");
        assert_eq!(rights_string(0), "none");
        assert_eq!(rights_string(ALL), "rlidwka");
        assert!(parse_rights("rx").is_err());
        assert!(parse_rights("").is_err());
        assert!(parse_rights("-").is_err());
    }

    #[test]
    fn acl_names() {
        for ok in ["bob", ADMINISTRATORS, ANY_USER, "bob:friends", "a.b-c_d"] {
            assert!(check_acl_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ":x", "x:", ".x", "a b", "a/b", &"x".repeat(129)] {
            assert!(check_acl_name(bad).is_err(), "{bad:?}");
        }
    }
}
