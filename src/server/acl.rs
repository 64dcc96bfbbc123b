//! Who may do what (docs/SERVER.md "Users, groups and access"): directory
//! access lists with Coda's rights, evaluated for the authenticated user
//! and its groups, and the per-request and per-record checks. The rules
//! themselves are the pure functions at the top (unit-tested below); the
//! rest reads and keeps the tables they need (`meta.rs`: ACLS, OBJ_OWNERS,
//! USER_IDS, GROUPS, MEMBERSHIPS).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use redb::{Database, ReadableDatabase, ReadableTable, Table, WriteTransaction};

use super::meta::*;
use super::volume::{get_object, VolumeStore};
use crate::proto::acl::*;
use crate::proto::codec::{Reader, Writer};
use crate::proto::{Fid, FileType, RecordOp};
use crate::{Error, Result};

/// A directory's access list: positive and negative entries, kept sorted
/// (positive first, then by name) so its encoding is canonical.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    pub entries: Vec<AclEntry>,
}

impl Acl {
    /// Coda's default for a new volume's root: administrators hold every
    /// right, everyone else may read and list.
    pub fn default_root() -> Acl {
        let mut a = Acl::default();
        a.set(ADMINISTRATORS, ALL, false).expect("fits");
        a.set(ANY_USER, READ | LOOKUP, false).expect("fits");
        a
    }

    /// Set the entry of `name` with this sign; `rights` 0 removes it.
    pub fn set(&mut self, name: &str, rights: u8, negative: bool) -> Result<()> {
        check_acl_name(name)?;
        self.entries
            .retain(|e| !(e.name == name && e.negative == negative));
        if rights != 0 {
            if self.entries.len() >= MAX_ACL_ENTRIES {
                return Err(Error::Invalid(format!(
                    "an access list holds at most {MAX_ACL_ENTRIES} entries"
                )));
            }
            self.entries.push(AclEntry {
                name: name.to_string(),
                rights: rights & ALL,
                negative,
            });
        }
        self.entries
            .sort_by(|a, b| (a.negative, &a.name).cmp(&(b.negative, &b.name)));
        Ok(())
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u32(self.entries.len() as u32);
        for e in &self.entries {
            w.str(&e.name).u8(e.rights).u8(e.negative as u8);
        }
        w.buf
    }

    pub fn decode(b: &[u8]) -> Result<Acl> {
        let corrupt = |e: Error| Error::Eio(format!("corrupt access list: {e}"));
        let mut r = Reader::new(b);
        let n = r
            .count(MAX_ACL_ENTRIES, 4, "acl entries")
            .map_err(corrupt)?;
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            entries.push(AclEntry {
                name: r.str(MAX_ACL_NAME, "acl name").map_err(corrupt)?,
                rights: r.u8().map_err(corrupt)? & ALL,
                negative: r.bool().map_err(corrupt)?,
            });
        }
        r.finish().map_err(corrupt)?;
        Ok(Acl { entries })
    }
}

/// The authenticated user as the checks see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Who {
    pub user: String,
    /// Numeric id (owners are kept by id); 0 for `anonymous` and for a
    /// user without one, which then owns nothing.
    pub id: u32,
    /// Its groups, `System:AnyUser` included.
    pub groups: Vec<String>,
}

impl Who {
    /// Members of `System:Administrators` pass every check.
    pub fn admin(&self) -> bool {
        self.groups.iter().any(|g| g == ADMINISTRATORS)
    }

    pub fn anonymous(&self) -> bool {
        self.user == ANONYMOUS
    }

    fn is(&self, name: &str) -> bool {
        name == self.user || self.groups.iter().any(|g| g == name)
    }

    /// Whether `owner` (an object's owner id) is this user.
    pub fn owns(&self, owner: u32) -> bool {
        owner != 0 && owner == self.id
    }

    /// The rights an access list gives this user: the union of the positive
    /// entries naming it or one of its groups, minus the union of the
    /// negative ones (negative beats positive). Administrators hold all;
    /// `anonymous` never more than `rl`.
    pub fn rights(&self, acl: &Acl) -> u8 {
        if self.admin() {
            return ALL;
        }
        let (mut plus, mut minus) = (0u8, 0u8);
        for e in acl.entries.iter().filter(|e| self.is(&e.name)) {
            if e.negative {
                minus |= e.rights;
            } else {
                plus |= e.rights;
            }
        }
        let r = plus & !minus;
        if self.anonymous() {
            r & (READ | LOOKUP)
        } else {
            r
        }
    }
}

/// What the file checks need to know about an object.
#[derive(Debug, Clone, Copy)]
pub struct ObjInfo {
    pub fid: Fid,
    pub ftype: FileType,
    pub mode: u32,
    pub owner: u32,
    /// Never stored to since its creation (Coda's "virgin" file): its owner
    /// may write it once without `w`, which is how a file created with only
    /// `i` gets its first contents.
    pub virgin: bool,
}

fn denied(what: String) -> Error {
    Error::Access(what)
}

/// `want` (all of its bits) must be among `rights` on directory `dir`.
pub fn need(who: &Who, rights: u8, want: u8, dir: Fid, what: &str) -> Result<()> {
    if who.admin() || rights & want == want {
        return Ok(());
    }
    Err(denied(format!(
        "{what} needs right '{}' on directory {dir} (user {} holds '{}')",
        rights_string(want & !rights),
        who.user,
        rights_string(rights)
    )))
}

/// Fetch of a file's data: `r` on its directory, and for anyone but its
/// owner the owner's read bit (mode 0400). A symlink's target needs `l`.
pub fn may_fetch(who: &Who, rights: u8, obj: &ObjInfo, dir: Fid) -> Result<()> {
    if who.admin() {
        return Ok(());
    }
    match obj.ftype {
        FileType::Symlink => need(who, rights, LOOKUP, dir, "reading a symlink"),
        FileType::Dir => need(who, rights, LOOKUP, dir, "reading a directory"),
        // Special files have no data: their (empty) fetch is status.
        FileType::Fifo | FileType::Socket | FileType::CharDev | FileType::BlockDev => {
            need(who, rights, LOOKUP, dir, "reading a special file")
        }
        FileType::File => {
            need(who, rights, READ | LOOKUP, dir, "reading a file")?;
            if !who.owns(obj.owner) && obj.mode & 0o400 == 0 {
                return Err(denied(format!(
                    "{} has no owner read bit (mode {:o})",
                    obj.fid, obj.mode
                )));
            }
            Ok(())
        }
    }
}

/// Store of new contents: `w` on the file's directory (or, for its owner,
/// a virgin file), and for anyone but its owner the owner's write bit.
pub fn may_store(who: &Who, rights: u8, obj: &ObjInfo, dir: Fid) -> Result<()> {
    if who.admin() || (who.owns(obj.owner) && obj.virgin) {
        return Ok(());
    }
    need(who, rights, WRITE, dir, "writing a file")?;
    if !who.owns(obj.owner) && obj.mode & 0o200 == 0 {
        return Err(denied(format!(
            "{} has no owner write bit (mode {:o})",
            obj.fid, obj.mode
        )));
    }
    Ok(())
}

/// SetAttr: `w` on the governing directory (a directory: any of `i`, `d`,
/// `w` on its own list);
/// a mode change only by the owner or a holder of `a`; a truncate by anyone
/// but the owner needs the owner's write bit. The owner of a virgin file
/// passes (as for Store).
pub fn may_setattr(
    who: &Who,
    rights: u8,
    obj: &ObjInfo,
    dir: Fid,
    chmod: bool,
    truncate: bool,
) -> Result<()> {
    if who.admin() || (who.owns(obj.owner) && obj.virgin) {
        return Ok(());
    }
    if obj.ftype == FileType::Dir {
        // Coda asks i or d of a directory's own list; w is enough too.
        if rights & (INSERT | DELETE | WRITE) == 0 {
            return Err(denied(format!(
                "changing attributes needs right 'i', 'd' or 'w' on directory {dir}"
            )));
        }
    } else {
        need(who, rights, WRITE, dir, "changing attributes")?;
    }
    if chmod && !who.owns(obj.owner) && rights & ADMINISTER == 0 {
        return Err(denied(format!(
            "chmod of {} needs its owner or right 'a' on directory {dir}",
            obj.fid
        )));
    }
    if truncate && !who.owns(obj.owner) && obj.mode & 0o200 == 0 {
        return Err(denied(format!(
            "{} has no owner write bit (mode {:o})",
            obj.fid, obj.mode
        )));
    }
    // (A change of the numeric owner is refused before this for anyone
    // but administrators: `Guard::authorize`.)
    Ok(())
}

/// A Store by anyone other than the owner (administrators excepted) clears
/// the setuid and setgid bits, so nobody can plant code that runs as
/// another user.
pub fn store_clears_setid(who: &Who, obj: &ObjInfo) -> bool {
    !who.admin() && !who.owns(obj.owner) && obj.mode & 0o6000 != 0
}

// ---- tables ---------------------------------------------------------------

pub fn encode_owner(owner: u32, dir: Fid) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[..4].copy_from_slice(&owner.to_be_bytes());
    b[4..].copy_from_slice(&dir.to_bytes());
    b
}

pub fn decode_owner(b: &[u8; 20]) -> (u32, Fid) {
    let owner = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    let dir = Fid::from_bytes(b[4..].try_into().expect("16 bytes"));
    (owner, dir)
}

pub fn load_acl<T: ReadableTable<&'static [u8; 16], &'static [u8]>>(
    t: &T,
    dir: Fid,
) -> Result<Acl> {
    match t.get(&dir.to_bytes())? {
        Some(v) => Acl::decode(v.value()),
        // Every directory gets one at creation or migration; none means
        // no rights for anyone but administrators.
        None => Ok(Acl::default()),
    }
}

/// An object's owner and the directory whose list governs it. An object
/// without a record (none should lack one after migration) is owned by
/// nobody and governed by the volume's root.
pub fn load_owner<T: ReadableTable<&'static [u8; 16], &'static [u8; 20]>>(
    t: &T,
    fid: Fid,
    is_dir: bool,
) -> Result<(u32, Fid)> {
    Ok(match t.get(&fid.to_bytes())? {
        Some(v) => {
            let (o, d) = decode_owner(v.value());
            (o, if is_dir { fid } else { d })
        }
        None if is_dir => (0, fid),
        None => (0, Fid::new(fid.volume, 1, 1)),
    })
}

fn who_in<M, U>(memberships: &M, ids: &U, user: &str) -> Result<Who>
where
    M: ReadableTable<(&'static str, &'static str), ()>,
    U: ReadableTable<&'static str, u32>,
{
    let mut groups = vec![ANY_USER.to_string()];
    if user != ANONYMOUS {
        for item in memberships.range((user, "")..)? {
            let (k, _) = item?;
            let (m, g) = k.value();
            if m != user {
                break;
            }
            if !g.is_empty() && g != ANY_USER {
                groups.push(g.to_string());
            }
        }
    }
    let id = if user == ANONYMOUS {
        0
    } else {
        ids.get(user)?.map(|v| v.value()).unwrap_or(0)
    };
    Ok(Who {
        user: user.to_string(),
        id,
        groups,
    })
}

/// Per-store state: who each user is, cached until users or groups change.
#[derive(Default)]
pub struct AccessState {
    gen: AtomicU64,
    who: Mutex<HashMap<String, (u64, Arc<Who>)>>,
}

/// Most users whose identity is cached; past it the cache starts over.
const MAX_WHO_CACHE: usize = 4096;

impl AccessState {
    /// Users or groups changed: every cached identity is stale.
    pub fn changed(&self) {
        self.gen.fetch_add(1, Ordering::SeqCst);
    }
}

/// The tables and identity a batch's records are checked against; also
/// keeps owners and access lists in step with what the records create,
/// move and delete. `who` None: an in-crate caller that checks nothing.
pub(super) struct Guard<'t> {
    acls: Table<'t, &'static [u8; 16], &'static [u8]>,
    owners: Table<'t, &'static [u8; 16], &'static [u8; 20]>,
    who: Option<Arc<Who>>,
}

type Objects<'t> = Table<'t, &'static [u8; 16], &'static [u8]>;
type Dirents<'t> = Table<'t, (&'static [u8; 16], &'static str), &'static [u8; 17]>;

impl<'t> Guard<'t> {
    pub fn open(txn: &'t WriteTransaction, who: Option<Arc<Who>>) -> Result<Guard<'t>> {
        Ok(Guard {
            acls: txn.open_table(ACLS)?,
            owners: txn.open_table(OBJ_OWNERS)?,
            who,
        })
    }

    fn rights_on(&self, who: &Who, dir: Fid) -> Result<u8> {
        if who.admin() {
            return Ok(ALL);
        }
        Ok(who.rights(&load_acl(&self.acls, dir)?))
    }

    /// The object's facts and governing directory; None if it does not
    /// exist (the record then fails on its own with `Stale`).
    fn info(&self, objects: &Objects, fid: Fid) -> Result<Option<(ObjInfo, Fid)>> {
        let Some(rec) = get_object(objects, fid)? else {
            return Ok(None);
        };
        let is_dir = rec.attr.ftype == FileType::Dir;
        let (owner, dir) = load_owner(&self.owners, fid, is_dir)?;
        Ok(Some((
            ObjInfo {
                fid,
                ftype: rec.attr.ftype,
                mode: rec.attr.mode,
                owner,
                virgin: rec.attr.ftype == FileType::File && rec.dv == 0 && !rec.has_file,
            },
            dir,
        )))
    }

    /// The rights check of one record, before it is applied.
    pub fn authorize(&self, objects: &Objects, dirents: &Dirents, op: &RecordOp) -> Result<()> {
        let Some(who) = self.who.as_deref() else {
            return Ok(());
        };
        if who.admin() {
            return Ok(());
        }
        let on = |dir: Fid| self.rights_on(who, dir);
        match op {
            RecordOp::Create { parent, .. }
            | RecordOp::CreateWith { parent, .. }
            | RecordOp::Mkdir { parent, .. }
            | RecordOp::Symlink { parent, .. }
            | RecordOp::Mknod { parent, .. } => {
                need(who, on(*parent)?, INSERT, *parent, "creating")
            }
            RecordOp::Link { parent, fid, .. } => {
                need(who, on(*parent)?, INSERT, *parent, "linking")?;
                match self.info(objects, *fid)? {
                    Some((_, dir)) => need(who, on(dir)?, LOOKUP, dir, "linking"),
                    None => Ok(()),
                }
            }
            RecordOp::Remove { parent, .. } | RecordOp::Rmdir { parent, .. } => {
                need(who, on(*parent)?, DELETE, *parent, "removing")
            }
            RecordOp::Rename {
                src_parent,
                dst_parent,
                dst_name,
                ..
            } => {
                need(who, on(*src_parent)?, DELETE, *src_parent, "renaming")?;
                let replaces = dirents.get((&dst_parent.to_bytes(), dst_name.as_str()))?;
                let want = if replaces.is_some() {
                    INSERT | DELETE
                } else {
                    INSERT
                };
                need(who, on(*dst_parent)?, want, *dst_parent, "renaming")
            }
            RecordOp::Store { fid, .. } | RecordOp::StoreInline { fid, .. } => {
                match self.info(objects, *fid)? {
                    Some((obj, dir)) => may_store(who, on(dir)?, &obj, dir),
                    None => Ok(()),
                }
            }
            RecordOp::SetAttr {
                fid,
                mode,
                size,
                uid,
                ..
            } => match self.info(objects, *fid)? {
                Some((obj, dir)) => {
                    // Giving an object to another numeric owner (chown) is
                    // for administrators only (returned above for them).
                    if uid.is_some() {
                        return Err(denied(format!(
                            "changing the owner of {fid} is for System:Administrators"
                        )));
                    }
                    may_setattr(who, on(dir)?, &obj, dir, mode.is_some(), size.is_some())
                }
                None => Ok(()),
            },
            // Extended attributes are attributes: as a SetAttr without
            // chmod or truncation.
            RecordOp::SetXattr { fid, .. } => match self.info(objects, *fid)? {
                Some((obj, dir)) => may_setattr(who, on(dir)?, &obj, dir, false, false),
                None => Ok(()),
            },
        }
    }

    /// A Store is about to change `fid`: whether it must clear setuid/gid.
    pub fn store_clears_setid(&self, objects: &Objects, fid: Fid) -> Result<bool> {
        let Some(who) = self.who.as_deref() else {
            return Ok(false);
        };
        Ok(match self.info(objects, fid)? {
            Some((obj, _)) => store_clears_setid(who, &obj),
            None => false,
        })
    }

    /// A new object: its creator owns it; a new directory starts with a
    /// copy of its parent's access list.
    pub fn created(&mut self, fid: Fid, ftype: FileType, parent: Fid) -> Result<()> {
        let owner = self.who.as_ref().map(|w| w.id).unwrap_or(0);
        let dir = if ftype == FileType::Dir { fid } else { parent };
        self.owners
            .insert(&fid.to_bytes(), &encode_owner(owner, dir))?;
        if ftype == FileType::Dir {
            let acl = load_acl(&self.acls, parent)?;
            self.acls.insert(&fid.to_bytes(), acl.encode().as_slice())?;
        }
        Ok(())
    }

    /// A file or symlink moved to `dst_parent`: that directory governs it
    /// now. A directory keeps its own list.
    pub fn moved(&mut self, fid: Fid, ftype: FileType, dst_parent: Fid) -> Result<()> {
        if ftype == FileType::Dir {
            return Ok(());
        }
        let (owner, _) = load_owner(&self.owners, fid, false)?;
        self.owners
            .insert(&fid.to_bytes(), &encode_owner(owner, dst_parent))?;
        Ok(())
    }

    /// The object is gone: so are its owner and (for a directory) its list.
    pub fn deleted(&mut self, fid: Fid) -> Result<()> {
        self.owners.remove(&fid.to_bytes())?;
        self.acls.remove(&fid.to_bytes())?;
        Ok(())
    }
}

// ---- the store: identities, reads, access lists, migration ----------------

impl VolumeStore {
    /// The numeric ids of users by name (0 for a name that is no user):
    /// the `UserIds` request, with which a mount maps owners.
    pub fn user_ids(&self, names: &[String]) -> Result<Vec<u32>> {
        self.with_db(|db| {
            let txn = db.begin_read()?;
            let ids = txn.open_table(USER_IDS)?;
            let mut out = Vec::with_capacity(names.len());
            for n in names {
                out.push(ids.get(n.as_str())?.map(|v| v.value()).unwrap_or(0));
            }
            Ok(out)
        })
    }

    /// The user as the checks see it: id and groups, cached until users or
    /// groups change.
    pub fn who(&self, user: &str) -> Result<Arc<Who>> {
        let gen = self.access.gen.load(Ordering::SeqCst);
        if let Some((g, w)) = self.access.who.lock().get(user) {
            if *g == gen {
                return Ok(Arc::clone(w));
            }
        }
        let who = Arc::new(self.with_db(|db| {
            let txn = db.begin_read()?;
            // A user removed (or anonymous access turned off) while its
            // connections are open: every further request is refused.
            let exists = if user == ANONYMOUS {
                let on = txn.open_table(SETTINGS)?.get(ANONYMOUS_KEY)?;
                on.is_some_and(|v| v.value() == [1])
            } else {
                txn.open_table(USERS)?.get(user)?.is_some()
            };
            if !exists {
                return Err(Error::Auth(format!("user {user} no longer exists")));
            }
            who_in(
                &txn.open_table(MEMBERSHIPS)?,
                &txn.open_table(USER_IDS)?,
                user,
            )
        })?);
        let mut cache = self.access.who.lock();
        if cache.len() >= MAX_WHO_CACHE {
            cache.clear();
        }
        cache.insert(user.to_string(), (gen, Arc::clone(&who)));
        Ok(who)
    }

    /// For each fid of a GetAttrs, whether `who` may see its status (`l` on
    /// its directory). A fid that does not exist passes (it reads as Stale).
    pub fn may_lookup(&self, who: &Who, fids: &[Fid]) -> Result<Vec<bool>> {
        if who.admin() {
            return Ok(vec![true; fids.len()]);
        }
        self.with_db(|db| {
            let txn = db.begin_read()?;
            let objects = txn.open_table(OBJECTS)?;
            let owners = txn.open_table(OBJ_OWNERS)?;
            let acls = txn.open_table(ACLS)?;
            let mut memo: HashMap<Fid, u8> = HashMap::new();
            let mut out = Vec::with_capacity(fids.len());
            for &fid in fids {
                let Some(rec) = get_object(&objects, fid)? else {
                    out.push(true);
                    continue;
                };
                let is_dir = rec.attr.ftype == FileType::Dir;
                let (_, dir) = load_owner(&owners, fid, is_dir)?;
                let rights = match memo.get(&dir) {
                    Some(r) => *r,
                    None => {
                        let r = who.rights(&load_acl(&acls, dir)?);
                        memo.insert(dir, r);
                        r
                    }
                };
                out.push(rights & LOOKUP != 0);
            }
            Ok(out)
        })
    }

    /// ReadDir of `dir` needs `l` on it.
    pub fn check_list(&self, who: &Who, dir: Fid) -> Result<()> {
        if who.admin() {
            return Ok(());
        }
        let rights = self.with_db(|db| {
            let txn = db.begin_read()?;
            Ok::<_, Error>(who.rights(&load_acl(&txn.open_table(ACLS)?, dir)?))
        })?;
        need(who, rights, LOOKUP, dir, "listing")
    }

    /// Fetch of `fid` (see [`may_fetch`]). A fid that does not exist passes
    /// (the fetch answers Stale).
    pub fn check_fetch(&self, who: &Who, fid: Fid) -> Result<()> {
        if who.admin() {
            return Ok(());
        }
        self.with_db(|db| {
            let txn = db.begin_read()?;
            let objects = txn.open_table(OBJECTS)?;
            let Some(rec) = get_object(&objects, fid)? else {
                return Ok(());
            };
            let is_dir = rec.attr.ftype == FileType::Dir;
            let (owner, dir) = load_owner(&txn.open_table(OBJ_OWNERS)?, fid, is_dir)?;
            let rights = who.rights(&load_acl(&txn.open_table(ACLS)?, dir)?);
            let obj = ObjInfo {
                fid,
                ftype: rec.attr.ftype,
                mode: rec.attr.mode,
                owner,
                virgin: false,
            };
            may_fetch(who, rights, &obj, dir)
        })
    }

    /// A directory's list and `who`'s rights on it; needs `l`.
    pub fn get_acl(&self, who: &Who, dir: Fid) -> Result<(Acl, u8)> {
        let (acl, rights) = self.with_db(|db| {
            let txn = db.begin_read()?;
            let rec = get_object(&txn.open_table(OBJECTS)?, dir)?
                .ok_or_else(|| super::volume::stale(dir))?;
            if rec.attr.ftype != FileType::Dir {
                return Err(Error::NotDir(format!("{dir} has no access list")));
            }
            let acl = load_acl(&txn.open_table(ACLS)?, dir)?;
            let rights = who.rights(&acl);
            Ok((acl, rights))
        })?;
        need(who, rights, LOOKUP, dir, "reading the access list")?;
        Ok((acl, rights))
    }

    /// Set one entry of a directory's list (needs `a`); the name must be a
    /// known user or group. Commits (fsynced) before it returns, with the
    /// directory's version and its volume's stamp moved on, so cached
    /// copies revalidate. Returns the new list, `who`'s rights on it and
    /// the fids whose callbacks to break: the directory, its entries and
    /// the volume.
    pub fn set_acl(
        &self,
        who: &Who,
        client: &super::volume::ClientId,
        dir: Fid,
        name: &str,
        rights: u8,
        negative: bool,
    ) -> Result<(Acl, u8, Vec<Fid>)> {
        check_acl_name(name)?;
        self.with_db(|db| {
            let txn = db.begin_write()?;
            let out = {
                let mut objects = txn.open_table(OBJECTS)?;
                let mut rec =
                    get_object(&objects, dir)?.ok_or_else(|| super::volume::stale(dir))?;
                if rec.attr.ftype != FileType::Dir {
                    return Err(Error::NotDir(format!("{dir} has no access list")));
                }
                let mut acls = txn.open_table(ACLS)?;
                let mut acl = load_acl(&acls, dir)?;
                need(
                    who,
                    who.rights(&acl),
                    ADMINISTER,
                    dir,
                    "changing the access list",
                )?;
                if !name_known(&txn, name)? {
                    return Err(Error::NotFound(format!("no user or group {name:?}")));
                }
                acl.set(name, rights, negative)?;
                acls.insert(&dir.to_bytes(), acl.encode().as_slice())?;
                rec.attr.version += 1;
                rec.attr.ctime = crate::proto::Timespec::now();
                objects.insert(&dir.to_bytes(), rec.encode().as_slice())?;
                let mut vs = txn.open_table(VOLSTAMPS)?;
                let mut s = match vs.get(dir.volume)? {
                    Some(b) => VolStamp::decode(b.value())?,
                    None => VolStamp::default(),
                };
                s.bump(client);
                vs.insert(dir.volume, &s.encode()[..])?;
                let mut fids = vec![dir, volume_fid(dir.volume)];
                let key = dir.to_bytes();
                let dirents = txn.open_table(DIRENTS)?;
                let owners = txn.open_table(OBJ_OWNERS)?;
                let now = crate::proto::Timespec::now();
                // Bounded by the directory's size.
                for item in dirents.range((&key, "")..)? {
                    let (k, v) = item?;
                    if k.value().0 != &key {
                        break;
                    }
                    let (child, ftype) = decode_entry(v.value())?;
                    // The files this list governs change status: their
                    // version moves on, so a client that cached their
                    // contents under the old list fetches (and is checked)
                    // again instead of serving its copy. Subdirectories
                    // keep their own lists.
                    if ftype != FileType::Dir && load_owner(&owners, child, false)?.1 == dir {
                        if let Some(mut c) = get_object(&objects, child)? {
                            c.attr.version += 1;
                            c.attr.ctime = now;
                            objects.insert(&child.to_bytes(), c.encode().as_slice())?;
                        }
                    }
                    if fids.len() < crate::proto::MAX_FIDS {
                        fids.push(child);
                    }
                }
                let mine = who.rights(&acl);
                (acl, mine, fids)
            };
            txn.commit()?;
            Ok(out)
        })
    }
}

/// The secret `anonymous` authenticates with: public, so the handshake
/// proves nothing but that the server allows anonymous access.
pub const ANONYMOUS_SECRET: [u8; 32] = [0; 32];

fn name_known(txn: &WriteTransaction, name: &str) -> Result<bool> {
    if name == ANY_USER || name == ADMINISTRATORS || name == ANONYMOUS {
        return Ok(true);
    }
    if txn.open_table(USERS)?.get(name)?.is_some() {
        return Ok(true);
    }
    Ok(txn.open_table(GROUPS)?.get((name, ""))?.is_some())
}

/// Make the access tables exist and fill what an older data directory
/// lacks (run at every open; does work only once): the root gets Coda's
/// default list and every other directory a copy of it, every object an
/// owner record (owner nobody, governed by the directory naming it), every
/// user an id, and `System:Administrators` members: the user `admin` if
/// there is one, else every user (review with `coda-server group members`).
pub fn migrate(db: &Database) -> Result<()> {
    {
        let txn = db.begin_read()?;
        let done = match txn.open_table(ACLS) {
            Ok(t) => t.get(&ROOT_FID.to_bytes())?.is_some(),
            Err(redb::TableError::TableDoesNotExist(_)) => false,
            Err(e) => return Err(e.into()),
        };
        if done {
            return Ok(());
        }
    }
    let txn = db.begin_write()?;
    {
        let objects = txn.open_table(OBJECTS)?;
        let dirents = txn.open_table(DIRENTS)?;
        let mut acls = txn.open_table(ACLS)?;
        let mut owners = txn.open_table(OBJ_OWNERS)?;
        let root_acl = Acl::default_root().encode();
        for item in objects.iter()? {
            let (k, v) = item?;
            let rec = ObjectRec::decode(v.value())?;
            if rec.attr.ftype == FileType::Dir {
                acls.insert(k.value(), root_acl.as_slice())?;
                owners.insert(k.value(), &encode_owner(0, rec.attr.fid))?;
            }
        }
        for item in dirents.iter()? {
            let (k, v) = item?;
            let (parent, _) = k.value();
            let (child, ftype) = decode_entry(v.value())?;
            if ftype != FileType::Dir && owners.get(&child.to_bytes())?.is_none() {
                owners.insert(&child.to_bytes(), &encode_owner(0, Fid::from_bytes(parent)))?;
            }
        }
        let users: Vec<String> = txn
            .open_table(USERS)?
            .iter()?
            .map(|i| i.map(|(k, _)| k.value().to_string()))
            .collect::<std::result::Result<_, _>>()?;
        let mut ids = txn.open_table(USER_IDS)?;
        let mut settings = txn.open_table(SETTINGS)?;
        let mut next = next_user_id(&settings)?;
        for u in &users {
            if ids.get(u.as_str())?.is_none() {
                ids.insert(u.as_str(), next)?;
                next += 1;
            }
        }
        settings.insert(NEXT_USER_ID_KEY, next.to_be_bytes().as_slice())?;
        drop((ids, settings));
        let mut groups = txn.open_table(GROUPS)?;
        let mut members = txn.open_table(MEMBERSHIPS)?;
        if groups.get((ADMINISTRATORS, ""))?.is_none() {
            groups.insert((ADMINISTRATORS, ""), ())?;
            let admins: Vec<&String> = if users.iter().any(|u| u == "admin") {
                users.iter().filter(|u| *u == "admin").collect()
            } else {
                users.iter().collect()
            };
            for u in admins {
                groups.insert((ADMINISTRATORS, u.as_str()), ())?;
                members.insert((u.as_str(), ADMINISTRATORS), ())?;
            }
        }
    }
    txn.commit()?;
    Ok(())
}

fn next_user_id<T: ReadableTable<&'static str, &'static [u8]>>(settings: &T) -> Result<u32> {
    Ok(match settings.get(NEXT_USER_ID_KEY)? {
        Some(v) => {
            let b: [u8; 4] = v
                .value()
                .try_into()
                .map_err(|_| Error::Eio("corrupt next user id".into()))?;
            u32::from_be_bytes(b)
        }
        None => 1,
    })
}

// ---- users and groups (the admin socket and the offline commands) --------

/// Give `user` (just added to USERS) the next id.
pub fn assign_user_id(txn: &WriteTransaction, user: &str) -> Result<u32> {
    let mut settings = txn.open_table(SETTINGS)?;
    let id = next_user_id(&settings)?;
    settings.insert(NEXT_USER_ID_KEY, (id + 1).to_be_bytes().as_slice())?;
    txn.open_table(USER_IDS)?.insert(user, id)?;
    Ok(id)
}

/// Remove a user: its secret, id, memberships and client ids (ACL entries
/// naming it stay; objects it owns keep its old id, which is never handed
/// out again). Its open connections get `Auth` for every further request.
pub fn remove_user(db: &Database, root: &std::path::Path, user: &str) -> Result<()> {
    let txn = db.begin_write()?;
    {
        if txn.open_table(USERS)?.remove(user)?.is_none() {
            return Err(Error::NotFound(format!("user {user}")));
        }
        txn.open_table(USER_IDS)?.remove(user)?;
        let mut members = txn.open_table(MEMBERSHIPS)?;
        let mut groups = txn.open_table(GROUPS)?;
        let mut mine: Vec<String> = Vec::new();
        for item in members.range((user, "")..)? {
            let (k, _) = item?;
            let (m, g) = k.value();
            if m != user {
                break;
            }
            mine.push(g.to_string());
        }
        for g in &mine {
            members.remove((user, g.as_str()))?;
            groups.remove((g.as_str(), user))?;
        }
        // Its client ids are free again: a later user of the same name
        // must not take over their sessions' state.
        let mut owners = txn.open_table(CLIENT_OWNERS)?;
        let ids: Vec<[u8; 16]> = owners
            .iter()?
            .filter_map(|i| match i {
                Ok((k, v)) if v.value() == user => Some(Ok(*k.value())),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            })
            .collect::<std::result::Result<_, _>>()?;
        for id in &ids {
            owners.remove(id)?;
        }
    }
    txn.commit()?;
    let _ = std::fs::remove_file(root.join(format!("{user}.secret")));
    Ok(())
}

/// Every user with its id, in name order.
pub fn list_users(db: &Database) -> Result<Vec<(String, u32)>> {
    let txn = db.begin_read()?;
    let ids = txn.open_table(USER_IDS)?;
    let mut out = Vec::new();
    for item in txn.open_table(USERS)?.iter()? {
        let (k, _) = item?;
        let id = ids.get(k.value())?.map(|v| v.value()).unwrap_or(0);
        out.push((k.value().to_string(), id));
    }
    Ok(out)
}

fn check_group(group: &str) -> Result<()> {
    check_acl_name(group)?;
    if !group.contains(':') {
        return Err(Error::Invalid(format!(
            "group {group:?}: group names contain ':' (e.g. bob:friends)"
        )));
    }
    if group == ANY_USER {
        return Err(Error::Invalid(format!(
            "{ANY_USER} is every user; it has no member list"
        )));
    }
    Ok(())
}

/// Create `group` if it is new and add `members` (users) to it.
pub fn group_add(db: &Database, group: &str, members: &[String]) -> Result<()> {
    check_group(group)?;
    let txn = db.begin_write()?;
    {
        let users = txn.open_table(USERS)?;
        let mut groups = txn.open_table(GROUPS)?;
        let mut ms = txn.open_table(MEMBERSHIPS)?;
        groups.insert((group, ""), ())?;
        for m in members {
            if users.get(m.as_str())?.is_none() {
                return Err(Error::NotFound(format!("user {m}")));
            }
            groups.insert((group, m.as_str()), ())?;
            ms.insert((m.as_str(), group), ())?;
        }
    }
    txn.commit()?;
    Ok(())
}

/// Remove `members` from `group`, or with none the whole group.
/// `System:Administrators` itself cannot go, nor lose its last member.
pub fn group_remove(db: &Database, group: &str, members: &[String]) -> Result<()> {
    check_group(group)?;
    let txn = db.begin_write()?;
    {
        let mut groups = txn.open_table(GROUPS)?;
        let mut ms = txn.open_table(MEMBERSHIPS)?;
        if groups.get((group, ""))?.is_none() {
            return Err(Error::NotFound(format!("group {group}")));
        }
        let all = members_in(&groups, group)?;
        let gone: Vec<String> = if members.is_empty() {
            if group == ADMINISTRATORS {
                return Err(Error::Invalid(format!(
                    "{ADMINISTRATORS} cannot be removed"
                )));
            }
            all.clone()
        } else {
            for m in members {
                if !all.contains(m) {
                    return Err(Error::NotFound(format!("{m} is not in {group}")));
                }
            }
            members.to_vec()
        };
        if group == ADMINISTRATORS && gone.len() >= all.len() {
            return Err(Error::Invalid(format!(
                "{ADMINISTRATORS} must keep at least one member"
            )));
        }
        for m in &gone {
            groups.remove((group, m.as_str()))?;
            ms.remove((m.as_str(), group))?;
        }
        if members.is_empty() {
            groups.remove((group, ""))?;
        }
    }
    txn.commit()?;
    Ok(())
}

fn members_in<T: ReadableTable<(&'static str, &'static str), ()>>(
    t: &T,
    group: &str,
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for item in t.range((group, "")..)? {
        let (k, _) = item?;
        let (g, m) = k.value();
        if g != group {
            break;
        }
        if !m.is_empty() {
            out.push(m.to_string());
        }
    }
    Ok(out)
}

/// A group's members, or with `None` every group's name.
pub fn group_members(db: &Database, group: Option<&str>) -> Result<Vec<String>> {
    let txn = db.begin_read()?;
    let groups = txn.open_table(GROUPS)?;
    match group {
        Some(g) => {
            if groups.get((g, ""))?.is_none() {
                return Err(Error::NotFound(format!("group {g}")));
            }
            members_in(&groups, g)
        }
        None => {
            let mut out = Vec::new();
            for item in groups.iter()? {
                let (k, _) = item?;
                let (g, m) = k.value();
                if m.is_empty() {
                    out.push(g.to_string());
                }
            }
            Ok(out)
        }
    }
}

/// Allow or refuse `anonymous`.
pub fn set_anonymous(db: &Database, on: bool) -> Result<()> {
    let txn = db.begin_write()?;
    txn.open_table(SETTINGS)?
        .insert(ANONYMOUS_KEY, [on as u8].as_slice())?;
    txn.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(user: &str, groups: &[&str]) -> Who {
        let mut g = vec![ANY_USER.to_string()];
        g.extend(groups.iter().map(|s| s.to_string()));
        Who {
            user: user.into(),
            id: 7,
            groups: g,
        }
    }

    fn acl(entries: &[(&str, &str)]) -> Acl {
        let mut a = Acl::default();
        for (n, r) in entries {
            let (bits, neg) = parse_rights(r).unwrap();
            a.set(n, bits, neg).unwrap();
        }
        a
    }

    #[test]
    fn rights_are_the_union_of_entries_minus_negative_ones() {
        let a = acl(&[
            (ANY_USER, "rl"),
            ("bob", "idw"),
            ("web:editors", "rlidwk"),
            ("bob", "-d"),
        ]);
        assert_eq!(rights_string(who("bob", &[]).rights(&a)), "rliw");
        assert_eq!(
            rights_string(who("bob", &["web:editors"]).rights(&a)),
            "rliwk",
            "negative beats positive, even one granted through a group"
        );
        assert_eq!(rights_string(who("carol", &[]).rights(&a)), "rl");
        assert_eq!(who("root", &[ADMINISTRATORS]).rights(&Acl::default()), ALL);
        let anon = Who {
            user: ANONYMOUS.into(),
            id: 0,
            groups: vec![ANY_USER.into()],
        };
        assert_eq!(rights_string(anon.rights(&acl(&[(ANY_USER, "all")]))), "rl");
        assert_eq!(
            rights_string(who("x", &[]).rights(&acl(&[(ANY_USER, "all"), (ANY_USER, "-w")]))),
            "rlidka"
        );
    }

    #[test]
    fn acls_encode_canonically_and_set_replaces_or_removes() {
        let mut a = Acl::default_root();
        assert_eq!(Acl::decode(&a.encode()).unwrap(), a);
        a.set("bob", WRITE, true).unwrap();
        a.set("bob", READ, false).unwrap();
        a.set("bob", READ | LOOKUP, false).unwrap();
        let names: Vec<_> = a
            .entries
            .iter()
            .map(|e| (e.name.as_str(), rights_string(e.rights), e.negative))
            .collect();
        assert_eq!(
            names,
            vec![
                (ADMINISTRATORS, "rlidwka".to_string(), false),
                (ANY_USER, "rl".to_string(), false),
                ("bob", "rl".to_string(), false),
                ("bob", "w".to_string(), true),
            ]
        );
        a.set("bob", 0, false).unwrap();
        a.set("bob", 0, true).unwrap();
        assert_eq!(a, Acl::default_root());
        assert!(Acl::decode(&a.encode()[..5]).is_err());
    }

    fn file(owner: u32, mode: u32, virgin: bool) -> ObjInfo {
        ObjInfo {
            fid: Fid::new(1, 5, 1),
            ftype: FileType::File,
            mode,
            owner,
            virgin,
        }
    }

    #[test]
    fn owner_bits_further_restrict_other_users() {
        let d = Fid::new(1, 1, 1);
        let bob = who("bob", &[]);
        let rl = READ | LOOKUP;
        assert!(may_fetch(&bob, rl, &file(9, 0o644, false), d).is_ok());
        assert!(matches!(
            may_fetch(&bob, rl, &file(9, 0o044, false), d),
            Err(Error::Access(_))
        ));
        // Its owner (id 7) reads it all the same.
        assert!(may_fetch(&bob, rl, &file(7, 0o044, false), d).is_ok());
        assert!(may_fetch(&bob, LOOKUP, &file(7, 0o644, false), d).is_err());
        let rlw = rl | WRITE;
        assert!(may_store(&bob, rlw, &file(9, 0o644, false), d).is_ok());
        assert!(may_store(&bob, rlw, &file(9, 0o444, false), d).is_err());
        assert!(may_store(&bob, rl, &file(9, 0o644, false), d).is_err());
        // A file bob created with only `i` gets its first contents.
        assert!(may_store(&bob, INSERT, &file(7, 0o644, true), d).is_ok());
        assert!(may_store(&bob, INSERT, &file(7, 0o644, false), d).is_err());
        // chmod: owner or `a`; truncate by others needs the owner w bit.
        assert!(may_setattr(&bob, rlw, &file(7, 0o644, false), d, true, false).is_ok());
        assert!(may_setattr(&bob, rlw, &file(9, 0o644, false), d, true, false).is_err());
        assert!(may_setattr(
            &bob,
            rlw | ADMINISTER,
            &file(9, 0o644, false),
            d,
            true,
            false
        )
        .is_ok());
        assert!(may_setattr(&bob, rlw, &file(9, 0o444, false), d, false, true).is_err());
        assert!(may_setattr(&bob, rlw, &file(9, 0o644, false), d, false, true).is_ok());
        let dir = ObjInfo {
            ftype: FileType::Dir,
            ..file(7, 0o755, false)
        };
        assert!(may_setattr(&bob, INSERT, &dir, d, true, false).is_ok());
        assert!(may_setattr(&bob, READ | LOOKUP, &dir, d, false, false).is_err());
        assert!(store_clears_setid(&bob, &file(9, 0o4755, false)));
        assert!(!store_clears_setid(&bob, &file(7, 0o4755, false)));
        assert!(!store_clears_setid(
            &who("root", &[ADMINISTRATORS]),
            &file(9, 0o4755, false)
        ));
    }

    #[test]
    fn an_old_data_directory_gets_the_default_list_and_keeps_its_admin() {
        use crate::proto::{Attr, Timespec};
        let dir = std::env::temp_dir().join(format!("coda-acl-migrate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = Database::create(dir.join("meta.redb")).unwrap();
        let rec = |fid: Fid, ftype| ObjectRec {
            attr: Attr {
                fid,
                ftype,
                mode: 0o755,
                nlink: 1,
                size: 0,
                mtime: Timespec::default(),
                ctime: Timespec::default(),
                version: 1,
                uid: 0,
                gid: 0,
                atime: Timespec::default(),
                rdev: 0,
            },
            dv: 0,
            has_file: false,
            parent: ROOT_FID,
            target: String::new(),
            xattrs: Vec::new(),
        };
        let (sub, file) = (Fid::new(1, 2, 1), Fid::new(1, 3, 1));
        // What a data directory from before access control holds.
        let txn = db.begin_write().unwrap();
        {
            let mut o = txn.open_table(OBJECTS).unwrap();
            o.insert(
                &ROOT_FID.to_bytes(),
                rec(ROOT_FID, FileType::Dir).encode().as_slice(),
            )
            .unwrap();
            o.insert(&sub.to_bytes(), rec(sub, FileType::Dir).encode().as_slice())
                .unwrap();
            o.insert(
                &file.to_bytes(),
                rec(file, FileType::File).encode().as_slice(),
            )
            .unwrap();
            let mut d = txn.open_table(DIRENTS).unwrap();
            d.insert(
                (&ROOT_FID.to_bytes(), "sub"),
                &encode_entry(sub, FileType::Dir),
            )
            .unwrap();
            d.insert((&sub.to_bytes(), "f"), &encode_entry(file, FileType::File))
                .unwrap();
            let mut u = txn.open_table(USERS).unwrap();
            u.insert("admin", &[1; 32]).unwrap();
            u.insert("bob", &[2; 32]).unwrap();
            txn.open_table(SETTINGS).unwrap();
        }
        txn.commit().unwrap();
        migrate(&db).unwrap();
        migrate(&db).unwrap(); // once only: a second open changes nothing
        let txn = db.begin_read().unwrap();
        let acls = txn.open_table(ACLS).unwrap();
        assert_eq!(load_acl(&acls, ROOT_FID).unwrap(), Acl::default_root());
        assert_eq!(load_acl(&acls, sub).unwrap(), Acl::default_root());
        let owners = txn.open_table(OBJ_OWNERS).unwrap();
        assert_eq!(load_owner(&owners, file, false).unwrap(), (0, sub));
        let who = |u| {
            who_in(
                &txn.open_table(MEMBERSHIPS).unwrap(),
                &txn.open_table(USER_IDS).unwrap(),
                u,
            )
            .unwrap()
        };
        assert!(who("admin").admin(), "upgrading keeps admin's access");
        assert!(!who("bob").admin());
        assert_eq!((who("admin").id, who("bob").id), (1, 2));
        drop((acls, owners, txn, db));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn owner_records_round_trip() {
        let (o, d) = decode_owner(&encode_owner(42, Fid::new(1, 9, 1)));
        assert_eq!((o, d), (42, Fid::new(1, 9, 1)));
    }
}
