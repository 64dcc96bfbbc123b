//! Which user a client id belongs to (SERVER.md "Client identity"). A
//! client id is only a name the client picks; everything the server keys
//! by it (session, store-id watermark, fid reservations, staged uploads,
//! bulk connections) would be another user's to take if any authenticated
//! user could present it. The first user to present an id on a control
//! connection owns it, durably, before that connection is welcomed.

use redb::{Database, ReadableTable};

use super::meta::CLIENT_OWNERS;
use super::objects;
use super::volume::{ClientId, VolumeStore};
use crate::{Error, Result};

impl VolumeStore {
    /// Check that `user` may present `client`; on a control connection
    /// (`claim`) an id nobody owns yet becomes `user`'s, committed before
    /// this returns. A bulk connection never claims: it must join a control
    /// session, which claimed the id already.
    pub fn claim_client(&self, client: &ClientId, user: &str, claim: bool) -> Result<()> {
        self.with_db(|db| claim_in(db, client, user, claim))
    }
}

fn claim_in(db: &Database, client: &ClientId, user: &str, claim: bool) -> Result<()> {
    let owner = {
        let txn = db.begin_read()?;
        match txn.open_table(CLIENT_OWNERS) {
            Ok(t) => t.get(client)?.map(|v| v.value().to_string()),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(e.into()),
        }
    };
    match owner {
        Some(o) if o == user => Ok(()),
        Some(_) => Err(refused(client)),
        None if !claim => Ok(()),
        None => {
            let txn = db.begin_write()?;
            {
                let mut t = txn.open_table(CLIENT_OWNERS)?;
                // Another handshake may have claimed it since the read.
                let now = t.get(client)?.map(|v| v.value().to_string());
                match now {
                    Some(o) if o == user => {}
                    Some(_) => return Err(refused(client)),
                    None => {
                        t.insert(client, user)?;
                    }
                }
            }
            txn.commit()?;
            Ok(())
        }
    }
}

fn refused(client: &ClientId) -> Error {
    // Who owns it is not said: that would tell one user about another.
    Error::Auth(format!(
        "client id {} belongs to another user",
        objects::hex(client)
    ))
}
