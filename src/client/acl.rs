//! Access lists and identity (docs/CLIENT.md "Access control"): what
//! `coda listacl`, `coda setacl` and `coda whoami` call. The server is the
//! authority, so these always ask it: while no server answers they fail
//! (`EIO`, or `ETIMEDOUT` for a server that stopped answering) instead of
//! answering from the cache.

use super::{Client, FileType};
use crate::proto::acl::{parse_rights, AclEntry};
use crate::proto::{Fid, Msg};
use crate::{Error, Result};

/// A directory's access list, as `coda listacl` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclInfo {
    /// The directory's entries, positive ones first, each group by name.
    pub entries: Vec<AclEntry>,
    /// This client's user's rights on the directory (`proto::acl` bits).
    pub rights: u8,
}

/// Who the client is on its server, as `coda whoami` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WhoAmI {
    /// The authenticated user.
    pub user: String,
    /// Its numeric id on the server (0 for `anonymous`).
    pub id: u32,
    /// Its groups, `System:AnyUser` included.
    pub groups: Vec<String>,
}

impl Client {
    /// The access list of the directory at `path` (a symlink is followed).
    /// Needs the `l` right on it.
    pub fn acl_get(&self, path: &str) -> Result<AclInfo> {
        let fid = self.acl_dir(path)?;
        self.acl_call(&Msg::GetAcl { fid })
    }

    /// Set `name`'s entry in the access list of the directory at `path`:
    /// `rights` as `coda setacl` takes them (`rl`, `all`, `-w` for a
    /// negative entry, `none` / `-none` to remove one). Needs the `a`
    /// right. Returns the new list. The server breaks every other client's
    /// callbacks on the directory and its entries; this client drops its
    /// own, so the next access revalidates under the new rights.
    pub fn acl_set(&self, path: &str, name: &str, rights: &str) -> Result<AclInfo> {
        let (bits, negative) = parse_rights(rights)?;
        crate::proto::acl::check_acl_name(name)?;
        let fid = self.acl_dir(path)?;
        let info = self.acl_call(&Msg::SetAcl {
            fid,
            name: name.to_string(),
            rights: bits,
            negative,
        })?;
        let mut fids = vec![fid];
        if let Some(listing) = self.inner.cache.get(fid).and_then(|e| e.listing_shared()) {
            fids.extend(listing.iter().map(|e| e.fid));
        }
        self.inner.callbacks.break_fids(&fids);
        Ok(info)
    }

    /// The user this client authenticates as, its id and its groups.
    pub fn whoami(&self) -> Result<WhoAmI> {
        let servers = &self.inner.servers;
        let s = self.acl_session()?;
        match s.call(&Msg::WhoAmI, &servers.interrupt)? {
            Msg::WhoReply { user, id, groups } => Ok(WhoAmI { user, id, groups }),
            m => Err(Error::Protocol(format!("WhoAmI answered with {m:?}"))),
        }
    }

    /// The numeric ids of users by name, as the server keeps them (0 for a
    /// name that is no user): the numbers a mapped mount reads owners as
    /// (docs/MOUNT.md "Mapped owners"). Asks the server, as `whoami` does.
    pub fn user_ids(&self, names: &[String]) -> Result<Vec<u32>> {
        if names.len() > crate::proto::message::MAX_USER_IDS {
            return Err(Error::Invalid(format!(
                "{} user names; at most {} at once",
                names.len(),
                crate::proto::message::MAX_USER_IDS
            )));
        }
        let servers = &self.inner.servers;
        let s = self.acl_session()?;
        match s.call(
            &Msg::UserIds {
                names: names.to_vec(),
            },
            &servers.interrupt,
        )? {
            Msg::UserIdsReply { ids } if ids.len() == names.len() => Ok(ids),
            m => Err(Error::Protocol(format!("UserIds answered with {m:?}"))),
        }
    }

    fn acl_dir(&self, path: &str) -> Result<Fid> {
        match self.inner.resolve(path, true)? {
            (fid, FileType::Dir) => Ok(fid),
            _ => Err(Error::NotDir(format!(
                "{path}: access lists are on directories"
            ))),
        }
    }

    /// The server's session, unless the client serves from its cache
    /// (disconnected, or held by `coda disconnect`): rights are the
    /// server's to say.
    fn acl_session(&self) -> Result<std::sync::Arc<super::conn::Session>> {
        if self.inner.emu.mode.emulating() {
            return Err(Error::Eio(
                "access lists need the server; the client is disconnected".into(),
            ));
        }
        self.inner.servers.session()
    }

    fn acl_call(&self, msg: &Msg) -> Result<AclInfo> {
        let servers = &self.inner.servers;
        let s = self.acl_session()?;
        match s.call(msg, &servers.interrupt)? {
            Msg::AclReply { entries, rights } => Ok(AclInfo { entries, rights }),
            m => Err(Error::Protocol(format!(
                "{:#04x} answered with {m:?}",
                msg.kind()
            ))),
        }
    }
}
