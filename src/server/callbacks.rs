//! The callback table: which client holds a promise on which fid. Indexed
//! both ways, because a mutation asks "who holds this fid" and a departing
//! client asks "drop everything I hold".
//!
//! Keyed by client id only (decision 4): a client has at most one live
//! session, and a new epoch drops the old one's callbacks before it starts.

use std::collections::{HashMap, HashSet};

use super::volume::ClientId;
use crate::proto::Fid;

#[derive(Default)]
pub struct CallbackTable {
    by_fid: HashMap<Fid, HashSet<ClientId>>,
    by_client: HashMap<ClientId, HashSet<Fid>>,
}

impl CallbackTable {
    pub fn add(&mut self, client: ClientId, fid: Fid) {
        self.by_fid.entry(fid).or_default().insert(client);
        self.by_client.entry(client).or_default().insert(fid);
    }

    pub fn remove(&mut self, client: &ClientId, fid: Fid) {
        if let Some(set) = self.by_fid.get_mut(&fid) {
            set.remove(client);
            if set.is_empty() {
                self.by_fid.remove(&fid);
            }
        }
        if let Some(set) = self.by_client.get_mut(client) {
            set.remove(&fid);
            if set.is_empty() {
                self.by_client.remove(client);
            }
        }
    }

    /// Remove and return every holder of `fid` other than `except` (the
    /// writer keeps its own callback).
    pub fn take_holders(&mut self, fid: Fid, except: &ClientId) -> Vec<ClientId> {
        let holders: Vec<ClientId> = match self.by_fid.get(&fid) {
            Some(set) => set.iter().filter(|c| *c != except).copied().collect(),
            None => return Vec::new(),
        };
        for h in &holders {
            self.remove(h, fid);
        }
        holders
    }

    /// The object is gone: nobody holds a callback on it any more.
    pub fn drop_fid(&mut self, fid: Fid) {
        if let Some(set) = self.by_fid.remove(&fid) {
            for c in set {
                if let Some(fids) = self.by_client.get_mut(&c) {
                    fids.remove(&fid);
                    if fids.is_empty() {
                        self.by_client.remove(&c);
                    }
                }
            }
        }
    }

    /// The client is gone or restarted: all its promises are void.
    pub fn drop_client(&mut self, client: &ClientId) -> usize {
        let Some(fids) = self.by_client.remove(client) else {
            return 0;
        };
        let n = fids.len();
        for fid in fids {
            if let Some(set) = self.by_fid.get_mut(&fid) {
                set.remove(client);
                if set.is_empty() {
                    self.by_fid.remove(&fid);
                }
            }
        }
        n
    }

    #[cfg(test)]
    pub fn holds(&self, client: &ClientId, fid: Fid) -> bool {
        self.by_fid.get(&fid).is_some_and(|s| s.contains(client))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_are_taken_except_the_writer() {
        let (a, b, w) = ([1; 16], [2; 16], [3; 16]);
        let f = Fid::new(1, 5, 1);
        let mut t = CallbackTable::default();
        t.add(a, f);
        t.add(b, f);
        t.add(w, f);
        let mut got = t.take_holders(f, &w);
        got.sort();
        assert_eq!(got, vec![a, b]);
        assert!(t.holds(&w, f) && !t.holds(&a, f));
        assert!(t.take_holders(f, &w).is_empty());
    }

    #[test]
    fn dropping_a_client_or_fid_forgets_both_directions() {
        let (a, b) = ([1; 16], [2; 16]);
        let (f, g) = (Fid::new(1, 5, 1), Fid::new(1, 6, 1));
        let mut t = CallbackTable::default();
        t.add(a, f);
        t.add(a, g);
        t.add(b, g);
        assert_eq!(t.drop_client(&a), 2);
        assert!(!t.holds(&a, f) && t.holds(&b, g));
        t.drop_fid(g);
        assert!(!t.holds(&b, g));
        assert!(t.by_fid.is_empty() && t.by_client.is_empty());
    }
}
