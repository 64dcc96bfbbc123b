//! Callback validity: which cached objects the server has promised to tell us
//! about before they change, and the break generations that let a break
//! arriving during a fetch win over the fetched copy.
//!
//! Only this small table is touched by the connection reader when a break
//! arrives, under one short lock that no caller ever holds across a network
//! wait, so the break is acknowledged at once.

use std::collections::{HashMap, HashSet};

use std::sync::Arc;

use parking_lot::Mutex;

use super::event::{EventBus, Invalidation, InvalidationHook};

use crate::proto::Fid;

/// Taken before a request that would grant a callback; the grant is honoured
/// only if no break for the fid (and no new session) happened in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Token {
    session: u64,
    generation: u64,
    /// The callback held when the token was taken (see `keep`).
    held: bool,
}

impl Token {
    /// Whether the callback held when the token was taken: a cached copy
    /// this client then changes itself as the server did is the server's
    /// only if so (and no break came since, which `grant` checks).
    pub fn held(&self) -> bool {
        self.held
    }
}

#[derive(Default)]
struct Table {
    /// Bumped on every new server session: all callbacks die with a session.
    session: u64,
    /// Per-fid count of breaks received (only for fids ever broken).
    generation: HashMap<Fid, u64>,
    valid: HashSet<Fid>,
    /// Callbacks that stand only on a volume callback (the volume's
    /// pseudo-fid `volume.0.0`): a break of that breaks them all.
    via_volume: HashMap<Fid, Vec<Fid>>,
    /// Volumes with an object whose callback broke since `take_dirty`: the
    /// cache may hold something stale there, so a volume stamp alone must
    /// not vouch for it.
    dirty_volumes: HashSet<u32>,
}

#[derive(Default)]
pub(crate) struct Callbacks {
    table: Mutex<Table>,
    /// Breaks are reported here (and other client events ride along).
    pub events: Arc<EventBus>,
    /// Told synchronously of every invalidation (see `Invalidation`).
    hook: Mutex<Option<InvalidationHook>>,
}

impl Callbacks {
    pub fn token(&self, fid: Fid) -> Token {
        let t = self.table.lock();
        Token {
            session: t.session,
            generation: t.generation.get(&fid).copied().unwrap_or(0),
            held: t.valid.contains(&fid),
        }
    }

    /// After this client's own change of `fid`, applied to the cached copy
    /// by this client (a listing edited as the server edited it): that copy
    /// is the server's only if it was trusted when `token` was taken and no
    /// break came since. `grant` alone is not enough here: a break that
    /// arrived before the token (between the lookup that trusted the
    /// listing and the token) leaves the generation equal, and the edited
    /// listing would lack the other client's change while trusted.
    /// Returns whether the callback holds.
    pub fn keep(&self, fid: Fid, token: Token) -> bool {
        token.held() && self.grant(fid, token)
    }

    /// Record a callback the server granted, unless a break overtook it.
    /// Returns whether the callback now holds.
    pub fn grant(&self, fid: Fid, token: Token) -> bool {
        let mut t = self.table.lock();
        let now = t.generation.get(&fid).copied().unwrap_or(0);
        if t.session != token.session || now != token.generation {
            return false;
        }
        t.valid.insert(fid);
        true
    }

    /// A volume callback (`volume_fid`, with the token taken before asking)
    /// makes `fids` trusted until it breaks. Returns whether it holds.
    pub fn grant_via_volume(&self, volume_fid: Fid, token: Token, fids: &[Fid]) -> bool {
        let mut t = self.table.lock();
        let now = t.generation.get(&volume_fid).copied().unwrap_or(0);
        if t.session != token.session || now != token.generation {
            return false;
        }
        t.valid.insert(volume_fid);
        for f in fids {
            // Only fids not broken since the token was taken... the token
            // is the volume's: a per-fid break after it is caught by the
            // server breaking the volume callback too.
            t.valid.insert(*f);
        }
        t.via_volume.entry(volume_fid).or_default().extend(fids);
        true
    }

    /// Whether a callback of `volume` broke since the last call (and reset).
    pub fn take_dirty(&self, volume: u32) -> bool {
        self.table.lock().dirty_volumes.remove(&volume)
    }

    pub fn is_dirty(&self, volume: u32) -> bool {
        self.table.lock().dirty_volumes.contains(&volume)
    }

    pub fn holds(&self, fid: Fid) -> bool {
        self.table.lock().valid.contains(&fid)
    }

    /// We dropped these callbacks ourselves.
    pub fn break_fids(&self, fids: &[Fid]) {
        self.forget(fids, false);
    }

    /// The server broke these callbacks: they stop holding now. Returns
    /// what the subscriber must hear before the caller acknowledges the
    /// break (`tell`), when there is a subscriber: the connection reader
    /// hands that to a thread of its own, so it keeps reading replies
    /// while the subscriber waits (the mount's kernel may wait for a
    /// request whose reply this reader has to deliver).
    pub fn server_broke(&self, fids: &[Fid]) -> Option<Invalidation> {
        let gone = self.drop_valid(fids);
        (!gone.is_empty() && self.hook.lock().is_some()).then_some(Invalidation::Fids {
            fids: gone,
            from_server: true,
        })
    }

    fn forget(&self, fids: &[Fid], from_server: bool) {
        let gone = self.drop_valid(fids);
        if !gone.is_empty() {
            self.tell(&Invalidation::Fids {
                fids: gone,
                from_server,
            });
        }
    }

    /// Drop these callbacks (and those standing on a broken volume
    /// callback) from the table; returns the objects no longer trusted.
    fn drop_valid(&self, fids: &[Fid]) -> Vec<Fid> {
        let mut gone: Vec<Fid> = Vec::new();
        {
            let mut t = self.table.lock();
            for f in fids {
                t.valid.remove(f);
                *t.generation.entry(*f).or_insert(0) += 1;
                if f.vnode != 0 {
                    t.dirty_volumes.insert(f.volume);
                    gone.push(*f);
                }
                if let Some(covered) = t.via_volume.remove(f) {
                    for c in covered {
                        t.valid.remove(&c);
                        *t.generation.entry(c).or_insert(0) += 1;
                        gone.push(c);
                    }
                }
            }
        }
        gone
    }

    /// Install (or remove) the invalidation subscriber.
    pub fn set_hook(&self, hook: Option<InvalidationHook>) {
        *self.hook.lock() = hook;
    }

    /// Run the subscriber, outside every lock of ours.
    pub fn tell(&self, inv: &Invalidation) {
        let hook = self.hook.lock().clone();
        if let Some(h) = hook {
            h(inv);
        }
    }

    /// A new session with the server: no earlier promise holds any more.
    pub fn new_session(&self) {
        let mut t = self.table.lock();
        t.session += 1;
        t.valid.clear();
        t.via_volume.clear();
        drop(t);
        self.tell(&Invalidation::All);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_break_during_a_fetch_wins() {
        let cb = Callbacks::default();
        let f = Fid::new(1, 2, 1);
        let tok = cb.token(f);
        cb.break_fids(&[f]);
        assert!(
            !cb.grant(f, tok),
            "the reply raced with a break: no callback"
        );
        assert!(!cb.holds(f));
        let tok = cb.token(f);
        assert!(cb.grant(f, tok));
        assert!(cb.holds(f));
        cb.break_fids(&[f]);
        assert!(!cb.holds(f));
    }

    #[test]
    fn an_own_edit_keeps_a_callback_only_if_it_held_when_the_token_was_taken() {
        let cb = Callbacks::default();
        let d = Fid::new(1, 1, 1);
        assert!(cb.grant(d, cb.token(d)));
        let tok = cb.token(d);
        assert!(
            cb.keep(d, tok),
            "held throughout: the edited copy is current"
        );
        // Another client's change broke it before our token: our edit of
        // the cached copy misses that change.
        cb.break_fids(&[d]);
        let tok = cb.token(d);
        assert!(!cb.keep(d, tok));
        assert!(!cb.holds(d));
        assert!(cb.grant(d, tok), "a fetched copy is granted as before");
        // Held at the token, broken after it: no.
        let tok = cb.token(d);
        cb.break_fids(&[d]);
        assert!(!cb.keep(d, tok));
    }

    #[test]
    fn a_new_session_voids_every_callback_and_pending_grant() {
        let cb = Callbacks::default();
        let (a, b) = (Fid::new(1, 1, 1), Fid::new(1, 2, 1));
        assert!(cb.grant(a, cb.token(a)));
        let tok = cb.token(b);
        cb.new_session();
        assert!(!cb.holds(a));
        assert!(!cb.grant(b, tok));
    }
}
