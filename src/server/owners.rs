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
//!
//! A lone server claims and sweeps with one local commit each. In a
//! replicated group both are log entries (replication/machine.rs): the
//! leader decides from its tables (`claim_due`, `sweep_plan`) and every
//! member writes the same rows (`claim_txn`, `sweep_txn`, `adopt_txn`).

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable};

use super::meta::{existing_table, CLIENT_OWNERS, CLIENT_SEEN, CLIENT_STORE};
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
        let now = now_secs();
        if !self.with_db(|db| claim_due(db, client, user, claim, now, refresh))? {
            return Ok(());
        }
        self.commit_claim(&super::wal::Claim {
            client: *client,
            user: user.to_string(),
            now,
        })
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

/// Whether `user` presenting `client` has a claim to write (the id is
/// nobody's yet, or its last-seen time is `refresh` seconds old), read
/// only: `Auth` if it is another user's; never due when not `claim`.
pub(crate) fn claim_due(
    db: &Database,
    client: &ClientId,
    user: &str,
    claim: bool,
    now: u64,
    refresh: u64,
) -> Result<bool> {
    let txn = db.begin_read()?;
    let owner = match existing_table(&txn, CLIENT_OWNERS)? {
        Some(t) => t.get(client)?.map(|v| v.value().to_string()),
        None => None,
    };
    let seen = match existing_table(&txn, CLIENT_SEEN)? {
        Some(t) => t.get(client)?.map(|v| v.value()),
        None => None,
    };
    match owner {
        Some(o) if o != user => Err(refused(client)),
        _ if !claim => Ok(false),
        Some(_) => Ok(seen.is_none_or(|s| now.saturating_sub(s) >= refresh)),
        None => Ok(true),
    }
}

/// Write a claim in `txn`: the id becomes `user`'s if nobody's, and its
/// last-seen time `now` (never moved back). `Auth` if another user owns
/// it. Applied twice, the second changes nothing.
pub(crate) fn claim_txn(
    txn: &redb::WriteTransaction,
    client: &ClientId,
    user: &str,
    now: u64,
) -> Result<()> {
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
    let mut seen = txn.open_table(CLIENT_SEEN)?;
    let was = seen.get(client)?.map(|v| v.value());
    seen.insert(client, was.map_or(now, |w| w.max(now)))?;
    Ok(())
}

fn sweep_in(db: &Database, live: &HashSet<ClientId>, now: u64, forget_after: u64) -> Result<usize> {
    // Read first, write only the changes: most sweeps change nothing and
    // then take no write transaction at all.
    let plan = sweep_plan(db, live, now, forget_after)?;
    if plan.is_empty() {
        return Ok(0);
    }
    let txn = db.begin_write()?;
    let forgotten = sweep_txn(&txn, &plan, now, forget_after)?;
    txn.commit()?;
    Ok(forgotten)
}

/// What a sweep changes: ids whose last-seen time is refreshed, ids
/// forgotten, last-seen rows without an owner dropped.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct SweepPlan {
    pub refresh: Vec<ClientId>,
    pub forget: Vec<ClientId>,
    pub orphans: Vec<ClientId>,
}

impl SweepPlan {
    /// Nothing to change.
    pub fn is_empty(&self) -> bool {
        self.refresh.is_empty() && self.forget.is_empty() && self.orphans.is_empty()
    }
}

/// Decide a sweep from the tables as they are (read only).
pub(crate) fn sweep_plan(
    db: &Database,
    live: &HashSet<ClientId>,
    now: u64,
    forget_after: u64,
) -> Result<SweepPlan> {
    let mut plan = SweepPlan::default();
    let txn = db.begin_read()?;
    let Some(owners) = existing_table(&txn, CLIENT_OWNERS)? else {
        return Ok(plan);
    };
    let seen = existing_table(&txn, CLIENT_SEEN)?;
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
                plan.refresh.push(id);
            }
        } else {
            match age {
                None => plan.refresh.push(id),
                Some(a) if a > forget_after => plan.forget.push(id),
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
                plan.orphans.push(id);
            }
        }
    }
    Ok(plan)
}

/// Carry out `plan` in `txn`, checking each change again against the
/// tables as they are now (a handshake may have presented an id since the
/// plan was made); returns how many ids were forgotten. The outcome
/// depends only on the tables, `plan`, `now` and `forget_after`, so every
/// member of a group that applies the same entry changes the same rows.
pub(crate) fn sweep_txn(
    txn: &redb::WriteTransaction,
    plan: &SweepPlan,
    now: u64,
    forget_after: u64,
) -> Result<usize> {
    let mut forgotten = 0;
    let mut owners = txn.open_table(CLIENT_OWNERS)?;
    let mut seen = txn.open_table(CLIENT_SEEN)?;
    let mut marks = txn.open_table(CLIENT_STORE)?;
    for id in &plan.refresh {
        if owners.get(id)?.is_some() {
            let was = seen.get(id)?.map(|v| v.value());
            seen.insert(id, was.map_or(now, |w| w.max(now)))?;
        }
    }
    for id in &plan.forget {
        // Presented again since the read: keep it.
        let fresh = seen
            .get(id)?
            .is_some_and(|v| now.saturating_sub(v.value()) <= forget_after);
        if fresh || owners.get(id)?.is_none() {
            continue;
        }
        owners.remove(id)?;
        seen.remove(id)?;
        // The watermark goes with the owner: whoever presents the id
        // next starts afresh and inherits nothing of the old owner's.
        marks.remove(id)?;
        forgotten += 1;
    }
    for id in &plan.orphans {
        if owners.get(id)?.is_none() {
            seen.remove(id)?;
        }
    }
    Ok(forgotten)
}

/// Every owner row with its last-seen time (None: never stamped).
pub(crate) fn owner_rows(db: &Database) -> Result<Vec<(ClientId, String, Option<u64>)>> {
    let txn = db.begin_read()?;
    let Some(owners) = existing_table(&txn, CLIENT_OWNERS)? else {
        return Ok(Vec::new());
    };
    let seen = existing_table(&txn, CLIENT_SEEN)?;
    let mut rows = Vec::new();
    for item in owners.iter()? {
        let (k, v) = item?;
        let id = *k.value();
        let at = match &seen {
            Some(t) => t.get(&id)?.map(|v| v.value()),
            None => None,
        };
        rows.push((id, v.value().to_string(), at));
    }
    Ok(rows)
}

/// Take in owner rows another member held only locally (written before
/// claims were log entries): an id nobody owns here becomes the row's
/// user's, with its last-seen time; an owned one keeps its owner (the
/// first owner in the log wins, as for a claim); a row of the same owner
/// keeps the later last-seen time.
pub(crate) fn adopt_txn(
    txn: &redb::WriteTransaction,
    rows: &[(ClientId, String, Option<u64>)],
) -> Result<()> {
    let mut owners = txn.open_table(CLIENT_OWNERS)?;
    let mut seen = txn.open_table(CLIENT_SEEN)?;
    for (id, user, at) in rows {
        let owner = owners.get(id)?.map(|v| v.value().to_string());
        match owner {
            Some(o) if o != *user => continue,
            Some(_) => {}
            None => {
                owners.insert(id, user.as_str())?;
            }
        }
        if let Some(at) = at {
            let was = seen.get(id)?.map(|v| v.value());
            seen.insert(id, was.map_or(*at, |w| w.max(*at)))?;
        }
    }
    Ok(())
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
