//! Which user a client id belongs to (SERVER.md "Client identity"). A
//! client id is only a name the client picks; everything the server keys
//! by it (session, store-id watermark, fid reservations, staged uploads,
//! bulk connections) would be another user's to take if any authenticated
//! user could present it. The first user to present an id on a control
//! connection owns it, durably, before that connection is welcomed.
//!
//! The table is bounded: an id whose owner has not presented it for
//! `forget_clients_after` (and whose session is not live) is forgotten by
//! a periodic sweep, with its store-id watermark (SERVER.md "Forgotten
//! client ids").

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableTable};

use super::meta::{CLIENT_OWNERS, CLIENT_SEEN, CLIENT_STORE};
use super::objects;
use super::volume::{ClientId, VolumeStore};
use crate::{Error, Result};

/// Default time after which a client id nobody presented is forgotten.
pub const DEFAULT_FORGET_CLIENTS_AFTER: Duration = Duration::from_secs(180 * 24 * 3600);

/// How stale a last-seen time may get before a handshake rewrites it: a
/// day, or less when ids are forgotten sooner, so that a client connecting
/// every day costs one metadata commit a day, not one per connection.
pub fn refresh_every(forget_after: Duration) -> u64 {
    (forget_after.as_secs() / 4).clamp(1, 24 * 3600)
}

/// Seconds since the epoch (0 on a clock before it).
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl VolumeStore {
    /// Check that `user` may present `client`; on a control connection
    /// (`claim`) an id nobody owns yet becomes `user`'s, committed before
    /// this returns, and its last-seen time is refreshed when older than
    /// `refresh` seconds. A bulk connection never claims: it must join a
    /// control session, which claimed the id already.
    pub fn claim_client(
        &self,
        client: &ClientId,
        user: &str,
        claim: bool,
        refresh: u64,
    ) -> Result<()> {
        self.with_db(|db| claim_in(db, client, user, claim, now_secs(), refresh))
    }

    /// Forget the ids not presented for `forget_after` seconds (as of
    /// `now`), except those in `live` (a session holds them), whose
    /// last-seen time is refreshed instead. An id from before last-seen
    /// times were kept counts as seen now. Returns how many were forgotten.
    pub fn sweep_clients(
        &self,
        live: &HashSet<ClientId>,
        now: u64,
        forget_after: u64,
    ) -> Result<usize> {
        self.with_db(|db| sweep_in(db, live, now, forget_after))
    }
}

fn claim_in(
    db: &Database,
    client: &ClientId,
    user: &str,
    claim: bool,
    now: u64,
    refresh: u64,
) -> Result<()> {
    let (owner, seen) = {
        let txn = db.begin_read()?;
        let owner = match txn.open_table(CLIENT_OWNERS) {
            Ok(t) => t.get(client)?.map(|v| v.value().to_string()),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(e.into()),
        };
        let seen = match txn.open_table(CLIENT_SEEN) {
            Ok(t) => t.get(client)?.map(|v| v.value()),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(e.into()),
        };
        (owner, seen)
    };
    match owner {
        Some(o) if o != user => Err(refused(client)),
        Some(_) if !claim || seen.is_some_and(|s| now.saturating_sub(s) < refresh) => Ok(()),
        None if !claim => Ok(()),
        _ => {
            let txn = db.begin_write()?;
            {
                let mut t = txn.open_table(CLIENT_OWNERS)?;
                // Another handshake may have claimed it since the read.
                let now_owner = t.get(client)?.map(|v| v.value().to_string());
                match now_owner {
                    Some(o) if o != user => return Err(refused(client)),
                    Some(_) => {}
                    None => {
                        t.insert(client, user)?;
                    }
                }
                txn.open_table(CLIENT_SEEN)?.insert(client, now)?;
            }
            txn.commit()?;
            Ok(())
        }
    }
}

fn sweep_in(db: &Database, live: &HashSet<ClientId>, now: u64, forget_after: u64) -> Result<usize> {
    // Read first, write only the changes: most sweeps change nothing and
    // then take no write transaction at all.
    let mut refresh: Vec<ClientId> = Vec::new();
    let mut forget: Vec<ClientId> = Vec::new();
    let mut orphans: Vec<ClientId> = Vec::new();
    {
        let txn = db.begin_read()?;
        let owners = match txn.open_table(CLIENT_OWNERS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        let seen = match txn.open_table(CLIENT_SEEN) {
            Ok(t) => Some(t),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(e.into()),
        };
        let refresh_after = refresh_every(Duration::from_secs(forget_after));
        for item in owners.iter()? {
            let (k, _) = item?;
            let id = *k.value();
            let at = match &seen {
                Some(t) => t.get(&id)?.map(|v| v.value()),
                None => None,
            };
            let age = at.map(|a| now.saturating_sub(a));
            if live.contains(&id) {
                if age.is_none_or(|a| a >= refresh_after) {
                    refresh.push(id);
                }
            } else {
                match age {
                    None => refresh.push(id),
                    Some(a) if a > forget_after => forget.push(id),
                    Some(_) => {}
                }
            }
        }
        // Last-seen rows whose owner went another way (a removed user's
        // ids are dropped from `client_owners` by acl::remove_user).
        if let Some(t) = &seen {
            for item in t.iter()? {
                let (k, _) = item?;
                let id = *k.value();
                if owners.get(&id)?.is_none() {
                    orphans.push(id);
                }
            }
        }
    }
    if refresh.is_empty() && forget.is_empty() && orphans.is_empty() {
        return Ok(0);
    }
    let txn = db.begin_write()?;
    let mut forgotten = 0;
    {
        let mut owners = txn.open_table(CLIENT_OWNERS)?;
        let mut seen = txn.open_table(CLIENT_SEEN)?;
        let mut marks = txn.open_table(CLIENT_STORE)?;
        for id in &refresh {
            if owners.get(id)?.is_some() {
                seen.insert(id, now)?;
            }
        }
        for id in &forget {
            // Presented again since the read: keep it.
            let fresh = seen
                .get(id)?
                .is_some_and(|v| now.saturating_sub(v.value()) <= forget_after);
            if fresh {
                continue;
            }
            owners.remove(id)?;
            seen.remove(id)?;
            // The watermark goes with the owner: whoever presents the id
            // next starts afresh and inherits nothing of the old owner's.
            marks.remove(id)?;
            forgotten += 1;
        }
        for id in &orphans {
            if owners.get(id)?.is_none() {
                seen.remove(id)?;
            }
        }
    }
    txn.commit()?;
    Ok(forgotten)
}

fn refused(client: &ClientId) -> Error {
    // Who owns it is not said: that would tell one user about another.
    Error::Auth(format!(
        "client id {} belongs to another user",
        objects::hex(client)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_is_a_day_at_most_and_a_quarter_of_the_expiry() {
        assert_eq!(refresh_every(DEFAULT_FORGET_CLIENTS_AFTER), 24 * 3600);
        assert_eq!(refresh_every(Duration::from_secs(8)), 2);
        assert_eq!(refresh_every(Duration::from_secs(1)), 1);
    }
}
