//! Extended attributes: read with `GetXattrs` and kept in memory with the
//! object version they belong to (valid exactly while the cached attr has
//! that version, so a callback break or any change retires them), changed
//! by `SetXattr` records through the CML like every mutation.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use super::api::Client;
use super::emulation;
use super::inner::Inner;
use crate::proto::RecordOp;
use crate::proto::{Fid, Msg, XattrHow, MAX_XATTR_NAME, MAX_XATTR_VALUE};
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
    fn get(&self, fid: Fid, version: u64) -> Option<XattrList> {
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

impl Inner {
    /// The attributes of `fid` and the object version they belong to.
    fn xattrs(&self, fid: Fid) -> Result<(u64, XattrList)> {
        let attr = self.getattr(fid)?;
        if let Some(l) = self.xattr_cache.get(fid, attr.version) {
            return Ok((attr.version, l));
        }
        self.emulate(
            Some(fid),
            || {
                let s = self.servers.session()?;
                match s.call(&Msg::GetXattrs { fid }, &self.servers.interrupt)? {
                    Msg::Xattrs { version, items } => {
                        let l = Arc::new(items);
                        self.xattr_cache.put(fid, version, l.clone());
                        Ok((version, l))
                    }
                    m => Err(Error::Protocol(format!("GetXattrs answered with {m:?}"))),
                }
            },
            || Err(emulation::uncached(fid)),
        )
    }
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
        if name.is_empty() || name.len() > MAX_XATTR_NAME || name.contains('\0') {
            return Err(Error::Invalid(format!("attribute name {name:?}")));
        }
        if value.len() > MAX_XATTR_VALUE {
            return Err(Error::Invalid(format!(
                "attribute value of {} bytes exceeds {MAX_XATTR_VALUE}",
                value.len()
            )));
        }
        let inner = &self.inner;
        // The flags are checked here first, so a record logged while
        // disconnected is one the server will accept.
        let (v0, before) = inner.xattrs(fid)?;
        let at = before.binary_search_by(|(n, _)| n.as_str().cmp(name));
        let mut after = before.as_ref().clone();
        match (how, at) {
            (XattrHow::Create, Ok(_)) => return Err(Error::Exists(format!("attribute {name:?}"))),
            (XattrHow::Replace | XattrHow::Remove, Err(_)) => {
                return Err(Error::NotFound(format!("attribute {name:?}")))
            }
            (XattrHow::Remove, Ok(i)) => {
                after.remove(i);
            }
            (_, Ok(i)) => after[i].1 = value.to_vec(),
            (_, Err(i)) => after.insert(i, (name.to_string(), value.to_vec())),
        }
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
            inner.xattr_cache.put(fid, attr.version, Arc::new(after));
        }
        Ok(())
    }
}
