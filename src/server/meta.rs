//! The metadata schema in `meta.redb`: table definitions and the encoding of
//! an object record. Everything that must survive a crash lives here, so
//! that one redb commit is the single point where a batch becomes real.

use redb::TableDefinition;

use crate::proto::codec::{Reader, Writer};
use crate::proto::{Attr, Fid, FileType, MAX_SYMLINK};
use crate::proto::{MAX_XATTR_BYTES, MAX_XATTR_NAME, MAX_XATTR_VALUE};
use crate::{Error, Result};

/// `def` in `txn`, or None when no write ever made it (a new store, or
/// one from before the table existed): read as empty.
pub(crate) fn existing_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &redb::ReadTransaction,
    def: TableDefinition<K, V>,
) -> Result<Option<redb::ReadOnlyTable<K, V>>> {
    match txn.open_table(def) {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// fid bytes → encoded [`ObjectRec`].
pub const OBJECTS: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new("objects");
/// (directory fid bytes, name) → child fid bytes followed by its file type.
pub const DIRENTS: TableDefinition<(&[u8; 16], &str), &[u8; 17]> = TableDefinition::new("dirents");
/// volume id → next vnode number never handed out.
pub const VOLUMES: TableDefinition<u32, u64> = TableDefinition::new("volumes");
/// volume id → its version stamp (see [`VolStamp`]).
pub const VOLSTAMPS: TableDefinition<u32, &[u8]> = TableDefinition::new("volstamps");
/// user name → 32-byte shared secret.
pub const USERS: TableDefinition<&str, &[u8; 32]> = TableDefinition::new("users");
/// client id → highest `store_id` applied for it (idempotent replay).
pub const CLIENT_STORE: TableDefinition<&[u8; 16], u64> = TableDefinition::new("client_store");
/// client id → the user it belongs to: the first user whose authenticated
/// control connection presented it. The id is sent in clear, so state
/// keyed by it (session, replay watermark, reservations, staged uploads)
/// is only safe because no other user may present it.
pub const CLIENT_OWNERS: TableDefinition<&[u8; 16], &str> = TableDefinition::new("client_owners");
/// client id → when its owner last presented it on a control connection
/// (Unix seconds; refreshed at most once per `owners::refresh_every`, and
/// by the sweep while its session lives). An id not seen for the server's
/// `forget_clients_after` is forgotten (owners.rs).
pub const CLIENT_SEEN: TableDefinition<&[u8; 16], u64> = TableDefinition::new("client_seen");
/// (volume, first vnode) → client id (16 bytes) followed by u32 count.
pub const RESERVED: TableDefinition<(u32, u64), &[u8; 20]> = TableDefinition::new("reserved");
/// fids that existed once and were deleted: a reserved fid is usable once.
pub const GRAVES: TableDefinition<&[u8; 16], ()> = TableDefinition::new("graves");
/// volume id → bytes of file data in it (the sizes of its files, each
/// counted once however many names it has). Moves in the same transaction
/// as every batch; computed once at open for data from before it existed.
pub const VOLUSAGE: TableDefinition<u32, u64> = TableDefinition::new("volusage");
/// volume id → quota in bytes; a volume without an entry is unlimited.
pub const QUOTAS: TableDefinition<u32, u64> = TableDefinition::new("quotas");
/// directory fid → its access list (`acl::encode_acl`). Every directory
/// has one: a new directory gets a copy of its parent's.
pub const ACLS: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new("acls");
/// object fid → owner's user id (u32, 0: nobody) followed by the fid of the
/// directory whose access list governs the object (itself for a directory;
/// for a file or symlink the directory it was created in or last renamed
/// into: files do not record a parent, and may have names in several).
pub const OBJ_OWNERS: TableDefinition<&[u8; 16], &[u8; 20]> = TableDefinition::new("obj_owners");
/// user name → numeric user id (from 1, never reused).
pub const USER_IDS: TableDefinition<&str, u32> = TableDefinition::new("user_ids");
/// (group, member) → (); (group, "") marks that the group exists.
pub const GROUPS: TableDefinition<(&str, &str), ()> = TableDefinition::new("groups");
/// (member, group) → (): the reverse of `GROUPS`, for a user's groups.
pub const MEMBERSHIPS: TableDefinition<(&str, &str), ()> = TableDefinition::new("memberships");
/// file fid → the whole content of a small file (1 to [`SMALL_DATA_MAX`]
/// bytes), kept here instead of in an object file: written in the batch's
/// own transaction, so the batch's one commit makes it durable (no data
/// file to create, fsync, rename and name durably). Such a file's record
/// has `has_file == false` and a non-zero size; an empty file has neither
/// a row nor a data file.
pub const SMALL_DATA: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new("small_data");
/// Largest file content kept in [`SMALL_DATA`]; a larger one gets an object
/// file. 16 KiB: covers the small files a build or a checkout writes by
/// the thousand, while a row stays a few redb pages (docs/SERVER.md
/// "Small files").
pub const SMALL_DATA_MAX: u64 = 16 * 1024;
/// Small server-wide values (server id, root fid).
pub const SETTINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("settings");

pub const SERVER_ID_KEY: &str = "server_id";
pub const ROOT_KEY: &str = "root";
/// The next user id to hand out (u32, big-endian).
pub const NEXT_USER_ID_KEY: &str = "next_user_id";
/// Whether `anonymous` may authenticate without a secret (one byte, 0 or 1).
pub const ANONYMOUS_KEY: &str = "anonymous";

/// The root volume and its root directory, created by `coda-server init`.
pub const ROOT_VOLUME: u32 = 1;
/// The root directory's fid (vnode 1 of the root volume), sent in `Welcome`.
pub const ROOT_FID: Fid = Fid::new(ROOT_VOLUME, 1, 1);

/// A volume's version stamp: bumped in the same transaction as every batch
/// that changes the volume. To answer "did any *other* client change it
/// since stamp S" it also keeps the latest changer and the latest stamp by a
/// different client (the largest stamp by anyone other than C is one of
/// the two).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VolStamp {
    pub stamp: u64,
    pub last: ([u8; 16], u64),
    pub other: ([u8; 16], u64),
}

impl VolStamp {
    pub fn bump(&mut self, client: &[u8; 16]) {
        self.stamp += 1;
        if self.last.0 != *client {
            self.other = self.last;
        }
        self.last = (*client, self.stamp);
    }

    /// The latest stamp of a change by a client other than `client`.
    pub fn foreign(&self, client: &[u8; 16]) -> u64 {
        if self.last.0 == *client {
            self.other.1
        } else {
            self.last.1
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u64(self.stamp)
            .bytes_fixed(&self.last.0)
            .u64(self.last.1)
            .bytes_fixed(&self.other.0)
            .u64(self.other.1);
        w.buf
    }

    pub fn decode(b: &[u8]) -> Result<VolStamp> {
        let mut r = Reader::new(b);
        let stamp = r.u64()?;
        let l: [u8; 16] = r.take(16)?.try_into().expect("16 bytes");
        let ls = r.u64()?;
        let o: [u8; 16] = r.take(16)?.try_into().expect("16 bytes");
        let os = r.u64()?;
        r.finish()?;
        Ok(VolStamp {
            stamp,
            last: (l, ls),
            other: (o, os),
        })
    }
}

/// The pseudo-fid that stands for a volume callback: vnode 0 never names
/// an object, so the callback table keeps it like any other fid.
pub fn volume_fid(volume: u32) -> Fid {
    Fid::new(volume, 0, 0)
}

/// What the server keeps per object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRec {
    pub attr: Attr,
    /// Data version: names the object file `<vnode>.<unique>.<dv>`. It only
    /// grows, so a new file never reuses the name of one a reader may hold.
    pub dv: u64,
    /// Whether a data file exists; a file without one is empty, or (size
    /// above 0) small, its bytes in [`SMALL_DATA`].
    pub has_file: bool,
    /// For directories: the parent (the root points to itself). Needed to
    /// refuse moving a directory into its own subtree.
    pub parent: Fid,
    /// For symlinks: the target.
    pub target: String,
    /// Extended attributes, in name order.
    pub xattrs: Vec<(String, Vec<u8>)>,
}

/// Version of the extension an object record carries after its first
/// fields. Records written before it existed (no extension) read as owned
/// by uid/gid 0, with atime = mtime and no device number.
const OBJECT_EXT_V2: u8 = 2;

impl ObjectRec {
    pub fn encode(&self) -> Vec<u8> {
        let a = &self.attr;
        let mut w = Writer::new();
        // The first fields keep the layout of format 1 (an attr of protocol
        // 1); what came later is a versioned extension at the end.
        w.fid(&a.fid)
            .u8(a.ftype as u8)
            .u32(a.mode)
            .u32(a.nlink)
            .u64(a.size)
            .time(&a.mtime)
            .time(&a.ctime)
            .u64(a.version)
            .u64(self.dv)
            .u8(self.has_file as u8)
            .fid(&self.parent)
            .str(&self.target)
            .u8(OBJECT_EXT_V2)
            .u32(a.uid)
            .u32(a.gid)
            .time(&a.atime)
            .u64(a.rdev)
            .u32(self.xattrs.len() as u32);
        for (name, value) in &self.xattrs {
            w.str(name).blob(value);
        }
        w.buf
    }

    pub fn decode(b: &[u8]) -> Result<ObjectRec> {
        let corrupt = |e: Error| Error::Eio(format!("corrupt object record: {e}"));
        let mut r = Reader::new(b);
        let mut rec = (|| -> Result<ObjectRec> {
            let fid = r.fid()?;
            let ftype = r.ftype()?;
            let mode = r.u32()?;
            let nlink = r.u32()?;
            let size = r.u64()?;
            let mtime = r.time()?;
            let ctime = r.time()?;
            let version = r.u64()?;
            Ok(ObjectRec {
                attr: Attr {
                    fid,
                    ftype,
                    mode,
                    nlink,
                    size,
                    mtime,
                    ctime,
                    version,
                    uid: 0,
                    gid: 0,
                    atime: mtime,
                    rdev: 0,
                },
                dv: r.u64()?,
                has_file: r.bool()?,
                parent: r.fid()?,
                target: r.str(MAX_SYMLINK, "symlink target")?,
                xattrs: Vec::new(),
            })
        })()
        .map_err(corrupt)?;
        if r.remaining() > 0 {
            match r.u8().map_err(corrupt)? {
                OBJECT_EXT_V2 => {
                    rec.attr.uid = r.u32().map_err(corrupt)?;
                    rec.attr.gid = r.u32().map_err(corrupt)?;
                    rec.attr.atime = r.time().map_err(corrupt)?;
                    rec.attr.rdev = r.u64().map_err(corrupt)?;
                    let n = r
                        .count(MAX_XATTR_BYTES, 7, "extended attributes")
                        .map_err(corrupt)?;
                    for _ in 0..n {
                        let name = r.str(MAX_XATTR_NAME, "attribute name").map_err(corrupt)?;
                        let value = r
                            .blob(MAX_XATTR_VALUE, "attribute value")
                            .map_err(corrupt)?;
                        rec.xattrs.push((name, value));
                    }
                }
                v => return Err(Error::Eio(format!("object record extension {v} unknown"))),
            }
        }
        r.finish().map_err(corrupt)?;
        Ok(rec)
    }
}

pub fn encode_entry(fid: Fid, ftype: FileType) -> [u8; 17] {
    let mut b = [0u8; 17];
    b[..16].copy_from_slice(&fid.to_bytes());
    b[16] = ftype as u8;
    b
}

pub fn decode_entry(b: &[u8; 17]) -> Result<(Fid, FileType)> {
    let fid = Fid::from_bytes(
        b[..16]
            .try_into()
            .expect("17-byte entry holds a 16-byte fid"),
    );
    let ftype = FileType::from_u8(b[16])
        .ok_or_else(|| Error::Eio(format!("corrupt directory entry type {}", b[16])))?;
    Ok((fid, ftype))
}

pub fn encode_reservation(client: &[u8; 16], count: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[..16].copy_from_slice(client);
    b[16..].copy_from_slice(&count.to_be_bytes());
    b
}

pub fn decode_reservation(b: &[u8; 20]) -> ([u8; 16], u32) {
    let mut c = [0u8; 16];
    c.copy_from_slice(&b[..16]);
    (c, u32::from_be_bytes([b[16], b[17], b[18], b[19]]))
}

/// The tables keyed by variable-width tuples, whose key encoding changed
/// in redb 3: moved aside when a store written by redb 2 is converted
/// (`crate::redb_upgrade`).
pub(crate) const TUPLE_TABLES: [crate::redb_upgrade::Move; 3] = [
    crate::redb_upgrade::Move {
        table: "dirents",
        shape: crate::redb_upgrade::Shape::FidName,
    },
    crate::redb_upgrade::Move {
        table: "groups",
        shape: crate::redb_upgrade::Shape::StrPair,
    },
    crate::redb_upgrade::Move {
        table: "memberships",
        shape: crate::redb_upgrade::Shape::StrPair,
    },
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Timespec;

    #[test]
    fn object_records_round_trip() {
        let rec = ObjectRec {
            attr: Attr {
                fid: Fid::new(1, 7, 1),
                ftype: FileType::Symlink,
                mode: 0o777,
                nlink: 1,
                size: 3,
                mtime: Timespec { sec: 1, nsec: 2 },
                ctime: Timespec { sec: 3, nsec: 4 },
                version: 5,
                uid: 1000,
                gid: 50,
                atime: Timespec { sec: 6, nsec: 7 },
                rdev: 0,
            },
            dv: 9,
            has_file: true,
            parent: ROOT_FID,
            target: "a/b".into(),
            xattrs: vec![("user.a".into(), vec![1, 2]), ("user.b".into(), vec![])],
        };
        assert_eq!(ObjectRec::decode(&rec.encode()).unwrap(), rec);
        assert!(ObjectRec::decode(&rec.encode()[..10]).is_err());
        // A record of format 1 (before owners, atime and rdev) still reads:
        // its fields are the new encoding without the extension.
        let v1 = rec.encode();
        let ext = 1 + 4 + 4 + 12 + 8 + 4 + (2 + 6 + 4 + 2) + (2 + 6 + 4);
        let old = &v1[..v1.len() - ext];
        let back = ObjectRec::decode(old).unwrap();
        assert_eq!((back.attr.uid, back.attr.gid, back.attr.rdev), (0, 0, 0));
        assert_eq!(back.attr.atime, rec.attr.mtime);
        assert_eq!(back.target, rec.target);
        assert!(back.xattrs.is_empty());
        let (c, n) = decode_reservation(&encode_reservation(&[3; 16], 77));
        assert_eq!((c, n), ([3; 16], 77));
    }
}
