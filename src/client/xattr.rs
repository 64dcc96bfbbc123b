//! Extended attributes: read with `GetXattrs` and kept in memory with the
//! object version they belong to (valid exactly while the cached attr has
//! that version, so a callback break or any change retires them), changed
//! by `SetXattr` records through the CML like every mutation (`at.rs`; the
//! list's rules, shared with the server, in `proto/xattr.rs`).

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::proto::Fid;

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
