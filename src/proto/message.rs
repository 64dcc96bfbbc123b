//! Every message of the protocol, with its type code, encoding and decoding.
//! Type codes and layouts are normative in docs/PROTOCOL.md.

use super::acl::{check_acl_name, AclEntry, MAX_ACL_ENTRIES, MAX_ACL_NAME};
use super::codec::{Reader, Writer, ATTR_LEN, ENTRY_MIN_LEN, FID_LEN};
use super::frame::Frame;
use super::types::{Attr, DirEntry, Fid, FileType, Timespec};
use super::{MAX_BATCH, MAX_DIR_PAGE, MAX_FIDS, MAX_MESSAGE, MAX_NAME, MAX_SYMLINK, MAX_USER};
use super::{MAX_XATTR_BYTES, MAX_XATTR_NAME, MAX_XATTR_VALUE};
use crate::error::WireCode;
use crate::{Error, Result};

/// Which of a client's two connections this is. Control carries RPCs,
/// heartbeats and callback breaks; bulk carries file data, so a large
/// transfer never delays a heartbeat or a break (ARCHITECTURE decision 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ConnKind {
    /// Requests, replies and callback breaks (wire value 0).
    Control = 0,
    /// `Fetch` and `Upload` with their raw file bytes (wire value 1).
    Bulk = 1,
}

/// One mutation in a reintegration batch. `store_id` is unique per client
/// (it grows), so a batch replayed after a lost reply is recognised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The record's id in the client's log (from 1): the server remembers the
    /// highest it applied per client and applies each id once (replay detection).
    pub store_id: u64,
    /// The mutation itself.
    pub op: RecordOp,
}

/// What a rename expects to find at its destination name: checked by the
/// server, so a rename logged while disconnected cannot silently replace a
/// file another client put there meanwhile (that is a conflict instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replaces {
    /// No check: POSIX semantics, whatever is there is replaced.
    Any,
    /// The name must be free.
    Nothing,
    /// The name must hold this object.
    Object(Fid),
}

/// What a `SetXattr` record does, with the `setxattr(2)` flags' checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XattrHow {
    /// Set, whether or not the attribute exists (wire 0).
    Set = 0,
    /// Set; the attribute must not exist (`XATTR_CREATE`, else `Exists`) (wire 1).
    Create = 1,
    /// Set; the attribute must exist (`XATTR_REPLACE`, else `NotFound`) (wire 2).
    Replace = 2,
    /// Remove; the attribute must exist (else `NotFound`) (wire 3).
    Remove = 3,
}

/// `expected_version` of 0 means "do not check" (connected mode's
/// last-close-wins); any other value must equal the object's version on the
/// server or the whole batch fails with `Conflict`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordOp {
    /// Replace the contents of `fid` with the staged upload `upload_id`.
    Store {
        /// The file whose contents are replaced (must be a file).
        fid: Fid,
        /// The file's version the client last saw; 0 skips the check.
        expected_version: u64,
        /// The staged upload (of this client) that becomes the contents.
        upload_id: u64,
        /// The upload's length; a staged upload of another length is `Invalid`.
        length: u64,
        /// The file's new modification time.
        mtime: Timespec,
    },
    /// Create the empty file `name` in `parent` as `fid`.
    Create {
        /// The directory that gets the new entry.
        parent: Fid,
        /// The new entry's name; it must be free.
        name: String,
        /// The new file's fid: reserved to this client by `AllocFids`, never used.
        fid: Fid,
        /// Permission bits of the new file.
        mode: u32,
        /// Modification time of the new file.
        mtime: Timespec,
        /// Numeric owner of the new file.
        uid: u32,
        /// Numeric group of the new file.
        gid: u32,
    },
    /// Replace the contents of `fid` with `data`, carried in the record
    /// (at most [`MAX_INLINE`](super::MAX_INLINE) bytes): a small store
    /// without a staged upload, so without its round trip.
    StoreInline {
        /// The file whose contents are replaced (must be a file).
        fid: Fid,
        /// The file's version the client last saw; 0 skips the check.
        expected_version: u64,
        /// The file's new modification time.
        mtime: Timespec,
        /// The new contents.
        data: Vec<u8>,
    },
    /// Create the file `name` in `parent` as `fid` holding `data` (at most
    /// [`MAX_INLINE`](super::MAX_INLINE) bytes): a Create and its first
    /// store in one record, applied and committed together.
    CreateWith {
        /// The directory that gets the new entry.
        parent: Fid,
        /// The new entry's name; it must be free.
        name: String,
        /// The new file's fid: reserved to this client by `AllocFids`, never used.
        fid: Fid,
        /// Permission bits of the new file.
        mode: u32,
        /// Modification time of the new file.
        mtime: Timespec,
        /// Numeric owner of the new file.
        uid: u32,
        /// Numeric group of the new file.
        gid: u32,
        /// The new file's contents.
        data: Vec<u8>,
    },
    /// Create the empty directory `name` in `parent` as `fid`.
    Mkdir {
        /// The directory that gets the new entry.
        parent: Fid,
        /// The new entry's name; it must be free.
        name: String,
        /// The new directory's fid: reserved to this client by `AllocFids`, never used.
        fid: Fid,
        /// Permission bits of the new directory.
        mode: u32,
        /// Modification time of the new directory.
        mtime: Timespec,
        /// Numeric owner of the new directory.
        uid: u32,
        /// Numeric group of the new directory.
        gid: u32,
    },
    /// Create the symlink `name` in `parent` as `fid`, pointing at `target`.
    Symlink {
        /// The directory that gets the new entry.
        parent: Fid,
        /// The new entry's name; it must be free.
        name: String,
        /// The new symlink's fid: reserved to this client by `AllocFids`, never used.
        fid: Fid,
        /// What the link points at: non-empty, at most 4096 bytes.
        target: String,
        /// Modification time of the new symlink.
        mtime: Timespec,
        /// Numeric owner of the new symlink.
        uid: u32,
        /// Numeric group of the new symlink.
        gid: u32,
    },
    /// Add the hard link `name` in `parent` to the existing file `fid`.
    Link {
        /// The directory that gets the new entry.
        parent: Fid,
        /// The new entry's name; it must be free.
        name: String,
        /// The file linked to (a directory is `IsDir`, a symlink `Invalid`).
        fid: Fid,
    },
    /// Unlink `name` from `parent`; it must name `fid`.
    Remove {
        /// The directory holding the entry.
        parent: Fid,
        /// The entry removed.
        name: String,
        /// The object the client believes `name` names (not a directory);
        /// another one there is a `Conflict`.
        fid: Fid,
    },
    /// Remove the empty directory `name` from `parent`; it must name `fid`.
    Rmdir {
        /// The directory holding the entry.
        parent: Fid,
        /// The entry removed.
        name: String,
        /// The empty directory the client believes `name` names; another
        /// object there is a `Conflict`.
        fid: Fid,
    },
    /// POSIX rename of `src_name` (which must name `fid`) to `dst_name`,
    /// replacing a file or an empty directory there.
    Rename {
        /// The directory the entry leaves.
        src_parent: Fid,
        /// The entry's current name.
        src_name: String,
        /// The directory the entry moves to (same volume as `src_parent`).
        dst_parent: Fid,
        /// The entry's new name.
        dst_name: String,
        /// The object being moved; `src_name` must name it.
        fid: Fid,
        /// What the client expects at `dst_name`, checked before replacing.
        replaces: Replaces,
    },
    /// Change some of an object's attributes; `None` leaves one as it is.
    SetAttr {
        /// The object changed.
        fid: Fid,
        /// The object's version the client last saw; 0 skips the check.
        expected_version: u64,
        /// New permission bits.
        mode: Option<u32>,
        /// New size (files only): truncates or extends with zeros.
        size: Option<u64>,
        /// New modification time (without it, a size change sets the server's time).
        mtime: Option<Timespec>,
        /// New owner.
        uid: Option<u32>,
        /// New group.
        gid: Option<u32>,
        /// New access time.
        atime: Option<Timespec>,
    },
    /// Set, create, replace or remove one extended attribute of `fid`.
    SetXattr {
        /// The object changed.
        fid: Fid,
        /// The attribute's full name (`user.x`): 1 to 255 bytes.
        name: String,
        /// What to do, and what must hold first.
        how: XattrHow,
        /// The value (at most 64 KiB; empty for a removal).
        value: Vec<u8>,
    },
    /// Create the special file (fifo, socket, device node) `name` in
    /// `parent` as `fid`: metadata only, it never holds data.
    Mknod {
        /// The directory that gets the new entry.
        parent: Fid,
        /// The new entry's name; it must be free.
        name: String,
        /// The new object's fid: reserved to this client by `AllocFids`, never used.
        fid: Fid,
        /// Fifo, Socket, CharDev or BlockDev (anything else is `Invalid`).
        ftype: FileType,
        /// Permission bits.
        mode: u32,
        /// Device number (device nodes; 0 for the others).
        rdev: u64,
        /// Modification time of the new object.
        mtime: Timespec,
        /// Numeric owner.
        uid: u32,
        /// Numeric group.
        gid: u32,
    },
}

impl RecordOp {
    /// The object the record is primarily about (its result attr is this one's).
    pub fn target(&self) -> Fid {
        match self {
            RecordOp::Store { fid, .. }
            | RecordOp::StoreInline { fid, .. }
            | RecordOp::CreateWith { fid, .. }
            | RecordOp::Create { fid, .. }
            | RecordOp::Mkdir { fid, .. }
            | RecordOp::Symlink { fid, .. }
            | RecordOp::Link { fid, .. }
            | RecordOp::Remove { fid, .. }
            | RecordOp::Rmdir { fid, .. }
            | RecordOp::Rename { fid, .. }
            | RecordOp::SetAttr { fid, .. }
            | RecordOp::Mknod { fid, .. }
            | RecordOp::SetXattr { fid, .. } => *fid,
        }
    }
}

/// One protocol message: the body of a frame whose header type code is
/// [`Msg::kind`]. Variants are grouped as in docs/PROTOCOL.md.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    // Handshake, on both connection kinds.
    /// Client's opening message (0x01) on every connection.
    Hello {
        /// Protocol version; only 1 is accepted.
        version: u16,
        /// Whether this connection is the control or a bulk connection.
        kind: ConnKind,
        /// The user whose shared secret authenticates the connection (≤ 64 bytes).
        user: String,
        /// The client's stable identity; the server keys all client state by
        /// `(client_id, epoch)`, never by address.
        client_id: [u8; 16],
        /// Changes when the client restarts; a control `Hello` with a new
        /// epoch drops everything the old one held.
        epoch: u64,
        /// The client's fresh random contribution to the MAC transcript.
        client_nonce: [u8; 32],
    },
    /// Server's answer to `Hello` (0x02), sent even for an unknown user.
    Challenge {
        /// Fresh random per connection, so a recorded handshake cannot be replayed.
        server_nonce: [u8; 32],
    },
    /// Client's proof of the secret (0x03).
    Auth {
        /// HMAC-SHA256(secret, "coda-v1 client" || transcript).
        mac: [u8; 32],
    },
    /// Handshake success (0x04), sent once the connection is attached to its session.
    Welcome {
        /// The server's identity, chosen at random when its data directory was made.
        server_id: [u8; 16],
        /// The fid of the root directory.
        root: Fid,
        /// HMAC-SHA256(secret, "coda-v1 server" || transcript): the server's
        /// proof of the secret, checked by the client.
        server_mac: [u8; 32],
        /// How long the server waits for a callback break's acknowledgement
        /// before it ends the session and drops its promises. A client that
        /// has heard nothing for a good part of this must make a round trip
        /// before it trusts a callback: it may have been cut off unawares.
        break_timeout_ms: u32,
    },
    /// Failure reply to any request (same id), or to the handshake.
    /// `index` names the failing record of a batch, `u32::MAX` otherwise.
    Error {
        /// What went wrong; maps to an errno at the C ABI.
        code: WireCode,
        /// The failing record's position in a `Reintegrate` batch.
        index: u32,
        /// Human-readable detail (≤ 4096 bytes); never names a server path.
        message: String,
    },

    // Control connection.
    /// Heartbeat request (0x10); keeps the control session from being reaped.
    Ping,
    /// Reply to `Ping` (0x11).
    Pong,
    /// Fetch the attrs of these objects (0x12); grants a callback on each found.
    GetAttrs {
        /// The objects asked about (at most 11154, what one reply can hold).
        fids: Vec<Fid>,
    },
    /// One slot per requested fid, in order: the attr, or why not.
    Attrs {
        /// Per fid: its attr, or the error code (`Stale` if it does not exist).
        items: Vec<std::result::Result<Attr, WireCode>>,
    },
    /// Read one page of a directory's entries, in name order (0x14); grants a callback.
    ReadDir {
        /// The directory read.
        fid: Fid,
        /// Where to start: 0 for the first page, else a previous page's `next`.
        cursor: u32,
    },
    /// One page of a directory (0x15).
    DirPage {
        /// The directory's attr; if its version changes between pages the
        /// client restarts from cursor 0.
        attr: Attr,
        /// The page's entries (at most 2048).
        entries: Vec<DirEntry>,
        /// Cursor of the following page; `None` on the last.
        next: Option<u32>,
    },
    /// Reserve fresh vnode numbers for objects the client will create (0x16).
    AllocFids {
        /// The volume to reserve in.
        volume: u32,
        /// How many (at most 4096).
        count: u32,
    },
    /// The reserved range (0x17): vnodes `first_vnode..first_vnode + count`, unique 1.
    FidRange {
        /// The volume reserved in.
        volume: u32,
        /// The first vnode number of the range.
        first_vnode: u64,
        /// How many vnode numbers were reserved.
        count: u32,
    },
    /// Apply a batch of mutations atomically (0x18): all commit or none does.
    Reintegrate {
        /// The mutations, checked and applied in order (at most 4096).
        records: Vec<Record>,
    },
    /// A `Reintegrate` sent before the reply to the client's previous batch
    /// (0x1E): applied only if the client's highest applied store id is at
    /// least `after` (else `Error{NotApplied}`, nothing applied).
    ReintegrateAfter {
        /// The highest store id of the batch sent before this one; 0 is no
        /// condition.
        after: u64,
        /// The mutations, as in `Reintegrate`.
        records: Vec<Record>,
    },
    /// The batch committed: one attr per record, of `record.op.target()` after
    /// it (for Remove/Rmdir of the last link: the attr it had, nlink 0).
    Reintegrated {
        /// One attr per record, in the batch's order.
        results: Vec<Attr>,
    },
    /// Is every object of `volume` the client cached as of `stamp` still
    /// valid, given the client's own changes? Grants a volume callback.
    ValidateVolume {
        /// The volume asked about.
        volume: u32,
        /// The volume stamp the client read before its last full validation.
        stamp: u64,
    },
    /// `valid`: no other client changed the volume after `stamp`; `stamp`
    /// here is the volume's current one.
    VolumeStamp {
        /// The volume answered about.
        volume: u32,
        /// The volume's current stamp, for the client's next validation.
        stamp: u64,
        /// True when no other client's batch committed after the asked stamp.
        valid: bool,
    },
    /// The extended attributes of an object (0x1C).
    GetXattrs {
        /// The object asked about.
        fid: Fid,
    },
    /// Reply to `GetXattrs` (0x1D): the object's version the list belongs
    /// to, and its (name, value) pairs in name order.
    Xattrs {
        /// The object's version when the list was read.
        version: u64,
        /// Every extended attribute of the object.
        items: Vec<(String, Vec<u8>)>,
    },
    /// Server push: the callbacks on these fids are broken. Id chosen by server.
    CallbackBreak {
        /// Objects whose cached copies are no longer current; `(volume, 0, 0)`
        /// breaks a volume callback.
        fids: Vec<Fid>,
    },
    /// Client's acknowledgement of a `CallbackBreak` (0x21), carrying its frame id.
    BreakAck,

    // Bulk connection.
    /// Fetch a file's contents, or a symlink's target (0x30); grants a callback.
    Fetch {
        /// The object fetched.
        fid: Fid,
    },
    /// Followed on the stream by the raw bytes of its extents (not framed).
    FetchReply {
        /// The object's attr matching the bytes that follow.
        attr: Attr,
        /// The file's length: what is not in an extent is a hole (zeros).
        length: u64,
        /// The data extents `(offset, length)`, in order, not overlapping:
        /// their bytes follow, one extent after the other.
        extents: Vec<(u64, u64)>,
    },
    /// Followed on the stream by the raw bytes of its extents (not framed).
    Upload {
        /// The client-chosen id a later `Store` record names; a second upload
        /// with the same id replaces the staged one.
        upload_id: u64,
        /// The file's length: what is not in an extent is a hole (zeros).
        length: u64,
        /// The data extents `(offset, length)`, in order, not overlapping:
        /// their bytes follow, one extent after the other.
        extents: Vec<(u64, u64)>,
    },
    /// The upload is staged and fsynced (0x33).
    Uploaded {
        /// The `upload_id` of the upload now staged.
        upload_id: u64,
    },

    // Access control, on the control connection.
    /// Read a directory's access list (0x40); needs `l` on it.
    GetAcl {
        /// The directory.
        fid: Fid,
    },
    /// A directory's access list (0x41), the answer to `GetAcl` and `SetAcl`.
    AclReply {
        /// The entries, positive and negative, in name order.
        entries: Vec<AclEntry>,
        /// The asking user's rights on the directory, as bits.
        rights: u8,
    },
    /// Set one entry of a directory's access list (0x42); needs `a` on it.
    SetAcl {
        /// The directory.
        fid: Fid,
        /// The user or group the entry is for.
        name: String,
        /// The rights; 0 removes the entry of that sign.
        rights: u8,
        /// Whether the entry is a negative one.
        negative: bool,
    },
    /// Ask who the connection is authenticated as (0x44).
    WhoAmI,
    /// The answer to `WhoAmI` (0x45).
    WhoReply {
        /// The authenticated user.
        user: String,
        /// Its numeric id on the server (0 for `anonymous`).
        id: u32,
        /// The groups it belongs to (`System:AnyUser` included).
        groups: Vec<String>,
    },
    /// Ask the numeric ids of users by name (0x46): how a mount maps owner
    /// numbers to local uids (docs/MOUNT.md "Mapped owners").
    UserIds {
        /// User names, at most [`MAX_USER_IDS`].
        names: Vec<String>,
    },
    /// The answer to `UserIds` (0x47): one id per name, 0 for no such user.
    UserIdsReply {
        /// The ids, in the order of the names asked.
        ids: Vec<u32>,
    },
    /// Ask a replicated group's leader how the group stands (0x48): who
    /// leads, and which members it hears (docs/PROTOCOL.md "Server groups").
    GroupStatus,
    /// The answer to `GroupStatus` (0x49).
    GroupView {
        /// The leader's term.
        term: u64,
        /// The leader's member id.
        leader: u64,
        /// Every voting member, by id (at most [`MAX_GROUP_MEMBERS`]).
        members: Vec<GroupMember>,
    },
}

/// The most members a `GroupView` may name.
pub const MAX_GROUP_MEMBERS: usize = 64;
/// The longest member address a `GroupView` may carry.
pub const MAX_MEMBER_ADDR: usize = 255;

/// One member of a replicated group, as its leader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMember {
    /// The member's id (1-based, as in its group configuration).
    pub id: u64,
    /// Its group address, as the group's configuration lists it.
    pub addr: String,
    /// Whether the leader heard from it lately (the leader itself: true).
    pub up: bool,
}

/// The most names one `UserIds` request may ask about.
pub const MAX_USER_IDS: usize = 1024;

mod code {
    pub const HELLO: u8 = 0x01;
    pub const CHALLENGE: u8 = 0x02;
    pub const AUTH: u8 = 0x03;
    pub const WELCOME: u8 = 0x04;
    pub const ERROR: u8 = 0x05;
    pub const PING: u8 = 0x10;
    pub const PONG: u8 = 0x11;
    pub const GET_ATTRS: u8 = 0x12;
    pub const ATTRS: u8 = 0x13;
    pub const READ_DIR: u8 = 0x14;
    pub const DIR_PAGE: u8 = 0x15;
    pub const ALLOC_FIDS: u8 = 0x16;
    pub const FID_RANGE: u8 = 0x17;
    pub const REINTEGRATE: u8 = 0x18;
    pub const REINTEGRATED: u8 = 0x19;
    pub const VALIDATE_VOLUME: u8 = 0x1A;
    pub const VOLUME_STAMP: u8 = 0x1B;
    pub const GET_XATTRS: u8 = 0x1C;
    pub const XATTRS: u8 = 0x1D;
    pub const REINTEGRATE_AFTER: u8 = 0x1E;
    pub const CALLBACK_BREAK: u8 = 0x20;
    pub const BREAK_ACK: u8 = 0x21;
    pub const FETCH: u8 = 0x30;
    pub const FETCH_REPLY: u8 = 0x31;
    pub const UPLOAD: u8 = 0x32;
    pub const UPLOADED: u8 = 0x33;
    pub const GET_ACL: u8 = 0x40;
    pub const ACL_REPLY: u8 = 0x41;
    pub const SET_ACL: u8 = 0x42;
    pub const WHO_AM_I: u8 = 0x44;
    pub const WHO_REPLY: u8 = 0x45;
    pub const USER_IDS: u8 = 0x46;
    pub const USER_IDS_REPLY: u8 = 0x47;
    pub const GROUP_STATUS: u8 = 0x48;
    pub const GROUP_VIEW: u8 = 0x49;
}

mod rec {
    pub const STORE: u8 = 1;
    pub const CREATE: u8 = 2;
    pub const MKDIR: u8 = 3;
    pub const SYMLINK: u8 = 4;
    pub const LINK: u8 = 5;
    pub const REMOVE: u8 = 6;
    pub const RMDIR: u8 = 7;
    pub const RENAME: u8 = 8;
    pub const SETATTR: u8 = 9;
    pub const MKNOD: u8 = 10;
    pub const SETXATTR: u8 = 11;
    pub const STORE_INLINE: u8 = 12;
    pub const CREATE_WITH: u8 = 13;
}

impl Msg {
    /// Build an error reply from a crate error.
    pub fn error(e: &Error) -> Msg {
        Msg::error_at(e, u32::MAX)
    }

    /// Build an error reply naming the failing record `index` of a batch.
    pub fn error_at(e: &Error, index: u32) -> Msg {
        let mut message = e.to_string();
        truncate_utf8(&mut message, MAX_MESSAGE);
        Msg::Error {
            code: e.wire_code(),
            index,
            message,
        }
    }

    /// The message type code that goes in the frame header.
    pub fn kind(&self) -> u8 {
        use code::*;
        match self {
            Msg::Hello { .. } => HELLO,
            Msg::Challenge { .. } => CHALLENGE,
            Msg::Auth { .. } => AUTH,
            Msg::Welcome { .. } => WELCOME,
            Msg::Error { .. } => ERROR,
            Msg::Ping => PING,
            Msg::Pong => PONG,
            Msg::GetAttrs { .. } => GET_ATTRS,
            Msg::Attrs { .. } => ATTRS,
            Msg::ReadDir { .. } => READ_DIR,
            Msg::DirPage { .. } => DIR_PAGE,
            Msg::AllocFids { .. } => ALLOC_FIDS,
            Msg::FidRange { .. } => FID_RANGE,
            Msg::Reintegrate { .. } => REINTEGRATE,
            Msg::ReintegrateAfter { .. } => REINTEGRATE_AFTER,
            Msg::Reintegrated { .. } => REINTEGRATED,
            Msg::ValidateVolume { .. } => VALIDATE_VOLUME,
            Msg::VolumeStamp { .. } => VOLUME_STAMP,
            Msg::GetXattrs { .. } => GET_XATTRS,
            Msg::Xattrs { .. } => XATTRS,
            Msg::CallbackBreak { .. } => CALLBACK_BREAK,
            Msg::BreakAck => BREAK_ACK,
            Msg::Fetch { .. } => FETCH,
            Msg::FetchReply { .. } => FETCH_REPLY,
            Msg::Upload { .. } => UPLOAD,
            Msg::Uploaded { .. } => UPLOADED,
            Msg::GetAcl { .. } => GET_ACL,
            Msg::AclReply { .. } => ACL_REPLY,
            Msg::SetAcl { .. } => SET_ACL,
            Msg::WhoAmI => WHO_AM_I,
            Msg::WhoReply { .. } => WHO_REPLY,
            Msg::UserIds { .. } => USER_IDS,
            Msg::UserIdsReply { .. } => USER_IDS_REPLY,
            Msg::GroupStatus => GROUP_STATUS,
            Msg::GroupView { .. } => GROUP_VIEW,
        }
    }

    /// Encode the body (without the frame header).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        self.encode_into(&mut w);
        w.buf
    }

    /// Encode a whole frame (header and body) with request id `id`, in one
    /// buffer: no body encoded apart and copied after its header. The
    /// caller checks the length against `MAX_FRAME`.
    pub fn encode_frame(&self, id: u64) -> Vec<u8> {
        let mut w = Writer {
            buf: Vec::with_capacity(64),
        };
        w.buf.extend_from_slice(&[0; 4]);
        w.buf.push(self.kind());
        w.buf.extend_from_slice(&id.to_be_bytes());
        self.encode_into(&mut w);
        let len = (w.buf.len() - 4) as u32;
        w.buf[..4].copy_from_slice(&len.to_be_bytes());
        w.buf
    }

    fn encode_into(&self, w: &mut Writer) {
        match self {
            Msg::Hello {
                version,
                kind,
                user,
                client_id,
                epoch,
                client_nonce,
            } => {
                w.u16(*version)
                    .u8(*kind as u8)
                    .str(user)
                    .bytes_fixed(client_id)
                    .u64(*epoch)
                    .bytes_fixed(client_nonce);
            }
            Msg::Challenge { server_nonce } => {
                w.bytes_fixed(server_nonce);
            }
            Msg::Auth { mac } => {
                w.bytes_fixed(mac);
            }
            Msg::Welcome {
                server_id,
                root,
                server_mac,
                break_timeout_ms,
            } => {
                w.bytes_fixed(server_id)
                    .fid(root)
                    .bytes_fixed(server_mac)
                    .u32(*break_timeout_ms);
            }
            Msg::Error {
                code,
                index,
                message,
            } => {
                w.u16(*code as u16).u32(*index).str(message);
            }
            Msg::Ping | Msg::Pong | Msg::BreakAck => {}
            Msg::GetAttrs { fids } | Msg::CallbackBreak { fids } => {
                w.u32(fids.len() as u32);
                for f in fids {
                    w.fid(f);
                }
            }
            Msg::Attrs { items } => {
                w.u32(items.len() as u32);
                for it in items {
                    match it {
                        Ok(a) => w.u8(0).attr(a),
                        Err(c) => w.u8(1).u16(*c as u16),
                    };
                }
            }
            Msg::ReadDir { fid, cursor } => {
                w.fid(fid).u32(*cursor);
            }
            Msg::DirPage {
                attr,
                entries,
                next,
            } => {
                w.attr(attr).u32(entries.len() as u32);
                for e in entries {
                    w.entry(e);
                }
                w.opt_u32(*next);
            }
            Msg::AllocFids { volume, count } => {
                w.u32(*volume).u32(*count);
            }
            Msg::ValidateVolume { volume, stamp } => {
                w.u32(*volume).u64(*stamp);
            }
            Msg::VolumeStamp {
                volume,
                stamp,
                valid,
            } => {
                w.u32(*volume).u64(*stamp).u8(*valid as u8);
            }
            Msg::GetXattrs { fid } => {
                w.fid(fid);
            }
            Msg::Xattrs { version, items } => {
                w.u64(*version).u32(items.len() as u32);
                for (name, value) in items {
                    w.str(name).blob(value);
                }
            }
            Msg::FidRange {
                volume,
                first_vnode,
                count,
            } => {
                w.u32(*volume).u64(*first_vnode).u32(*count);
            }
            Msg::Reintegrate { records } => {
                w.u32(records.len() as u32);
                for r in records {
                    encode_record(w, r);
                }
            }
            Msg::ReintegrateAfter { after, records } => {
                w.u64(*after).u32(records.len() as u32);
                for r in records {
                    encode_record(w, r);
                }
            }
            Msg::Reintegrated { results } => {
                w.u32(results.len() as u32);
                for a in results {
                    w.attr(a);
                }
            }
            Msg::Fetch { fid } => {
                w.fid(fid);
            }
            Msg::FetchReply {
                attr,
                length,
                extents,
            } => {
                w.attr(attr).u64(*length);
                encode_extents(w, extents);
            }
            Msg::Upload {
                upload_id,
                length,
                extents,
            } => {
                w.u64(*upload_id).u64(*length);
                encode_extents(w, extents);
            }
            Msg::Uploaded { upload_id } => {
                w.u64(*upload_id);
            }
            Msg::GetAcl { fid } => {
                w.fid(fid);
            }
            Msg::AclReply { entries, rights } => {
                w.u32(entries.len() as u32);
                for e in entries {
                    w.str(&e.name).u8(e.rights).u8(e.negative as u8);
                }
                w.u8(*rights);
            }
            Msg::SetAcl {
                fid,
                name,
                rights,
                negative,
            } => {
                w.fid(fid).str(name).u8(*rights).u8(*negative as u8);
            }
            Msg::WhoAmI => {}
            Msg::WhoReply { user, id, groups } => {
                w.str(user).u32(*id).u32(groups.len() as u32);
                for g in groups {
                    w.str(g);
                }
            }
            Msg::UserIds { names } => {
                w.u32(names.len() as u32);
                for n in names {
                    w.str(n);
                }
            }
            Msg::UserIdsReply { ids } => {
                w.u32(ids.len() as u32);
                for id in ids {
                    w.u32(*id);
                }
            }
            Msg::GroupStatus => {}
            Msg::GroupView {
                term,
                leader,
                members,
            } => {
                w.u64(*term).u64(*leader).u32(members.len() as u32);
                for m in members {
                    w.u64(m.id).str(&m.addr).u8(m.up as u8);
                }
            }
        }
    }

    /// Decode a message from its frame. Unknown types, out-of-range values,
    /// oversized counts and trailing bytes are all protocol errors.
    pub fn decode(frame: &Frame) -> Result<Msg> {
        Msg::decode_body(frame.kind, &frame.body)
    }

    /// Decode a body of message type `kind`, as `decode` does for a whole frame.
    pub fn decode_body(kind: u8, body: &[u8]) -> Result<Msg> {
        use code::*;
        let mut r = Reader::new(body);
        let msg = match kind {
            HELLO => {
                let version = r.u16()?;
                let kind = match r.u8()? {
                    0 => ConnKind::Control,
                    1 => ConnKind::Bulk,
                    v => return Err(Error::Protocol(format!("bad connection kind {v}"))),
                };
                Msg::Hello {
                    version,
                    kind,
                    user: r.str(MAX_USER, "user name")?,
                    client_id: r.array()?,
                    epoch: r.u64()?,
                    client_nonce: r.array()?,
                }
            }
            CHALLENGE => Msg::Challenge {
                server_nonce: r.array()?,
            },
            AUTH => Msg::Auth { mac: r.array()? },
            WELCOME => Msg::Welcome {
                server_id: r.array()?,
                root: r.fid()?,
                server_mac: r.array()?,
                break_timeout_ms: r.u32()?,
            },
            ERROR => {
                let c = r.u16()?;
                Msg::Error {
                    code: WireCode::from_u16(c)
                        .ok_or_else(|| Error::Protocol(format!("unknown error code {c}")))?,
                    index: r.u32()?,
                    message: r.str(MAX_MESSAGE, "error message")?,
                }
            }
            PING => Msg::Ping,
            PONG => Msg::Pong,
            BREAK_ACK => Msg::BreakAck,
            GET_ATTRS | CALLBACK_BREAK => {
                let n = r.count(MAX_FIDS, FID_LEN, "fids")?;
                let mut fids = Vec::with_capacity(n);
                for _ in 0..n {
                    fids.push(r.fid()?);
                }
                if kind == GET_ATTRS {
                    Msg::GetAttrs { fids }
                } else {
                    Msg::CallbackBreak { fids }
                }
            }
            ATTRS => {
                let n = r.count(MAX_FIDS, 3, "attrs")?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(match r.u8()? {
                        0 => Ok(r.attr()?),
                        1 => {
                            let c = r.u16()?;
                            Err(WireCode::from_u16(c).ok_or_else(|| {
                                Error::Protocol(format!("unknown error code {c}"))
                            })?)
                        }
                        v => return Err(Error::Protocol(format!("bad attr slot tag {v}"))),
                    });
                }
                Msg::Attrs { items }
            }
            READ_DIR => Msg::ReadDir {
                fid: r.fid()?,
                cursor: r.u32()?,
            },
            DIR_PAGE => {
                let attr = r.attr()?;
                let n = r.count(MAX_DIR_PAGE, ENTRY_MIN_LEN, "directory entries")?;
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    entries.push(r.entry()?);
                }
                Msg::DirPage {
                    attr,
                    entries,
                    next: r.opt_u32()?,
                }
            }
            ALLOC_FIDS => Msg::AllocFids {
                volume: r.u32()?,
                count: r.u32()?,
            },
            VALIDATE_VOLUME => Msg::ValidateVolume {
                volume: r.u32()?,
                stamp: r.u64()?,
            },
            VOLUME_STAMP => Msg::VolumeStamp {
                volume: r.u32()?,
                stamp: r.u64()?,
                valid: r.bool()?,
            },
            GET_XATTRS => Msg::GetXattrs { fid: r.fid()? },
            XATTRS => {
                let version = r.u64()?;
                // The smallest pair: a one-byte name and an empty value.
                let n = r.count(MAX_XATTR_BYTES, 2 + 1 + 4, "extended attributes")?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    let name = r.str(MAX_XATTR_NAME, "attribute name")?;
                    let value = r.blob(MAX_XATTR_VALUE, "attribute value")?;
                    items.push((name, value));
                }
                Msg::Xattrs { version, items }
            }
            FID_RANGE => Msg::FidRange {
                volume: r.u32()?,
                first_vnode: r.u64()?,
                count: r.u32()?,
            },
            REINTEGRATE => {
                let n = r.count(MAX_BATCH, 9, "records")?;
                let mut records = Vec::with_capacity(n);
                for _ in 0..n {
                    records.push(decode_record(&mut r, None)?);
                }
                Msg::Reintegrate { records }
            }
            REINTEGRATE_AFTER => {
                let after = r.u64()?;
                let n = r.count(MAX_BATCH, 9, "records")?;
                let mut records = Vec::with_capacity(n);
                for _ in 0..n {
                    records.push(decode_record(&mut r, None)?);
                }
                Msg::ReintegrateAfter { after, records }
            }
            REINTEGRATED => {
                let n = r.count(MAX_BATCH, ATTR_LEN, "results")?;
                let mut results = Vec::with_capacity(n);
                for _ in 0..n {
                    results.push(r.attr()?);
                }
                Msg::Reintegrated { results }
            }
            FETCH => Msg::Fetch { fid: r.fid()? },
            FETCH_REPLY => {
                let attr = r.attr()?;
                let length = r.u64()?;
                Msg::FetchReply {
                    attr,
                    length,
                    extents: decode_extents(&mut r, length)?,
                }
            }
            UPLOAD => {
                let upload_id = r.u64()?;
                let length = r.u64()?;
                Msg::Upload {
                    upload_id,
                    length,
                    extents: decode_extents(&mut r, length)?,
                }
            }
            UPLOADED => Msg::Uploaded {
                upload_id: r.u64()?,
            },
            GET_ACL => Msg::GetAcl { fid: r.fid()? },
            ACL_REPLY => {
                let n = r.count(MAX_ACL_ENTRIES, 4, "acl entries")?;
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    entries.push(AclEntry {
                        name: r.str(MAX_ACL_NAME, "acl name")?,
                        rights: rights(&mut r)?,
                        negative: r.bool()?,
                    });
                }
                Msg::AclReply {
                    entries,
                    rights: rights(&mut r)?,
                }
            }
            SET_ACL => {
                let fid = r.fid()?;
                let name = r.str(MAX_ACL_NAME, "acl name")?;
                check_acl_name(&name).map_err(|e| Error::Protocol(e.to_string()))?;
                Msg::SetAcl {
                    fid,
                    name,
                    rights: rights(&mut r)?,
                    negative: r.bool()?,
                }
            }
            WHO_AM_I => Msg::WhoAmI,
            WHO_REPLY => {
                let user = r.str(MAX_USER, "user name")?;
                let id = r.u32()?;
                let n = r.count(MAX_ACL_ENTRIES, 4, "groups")?;
                let mut groups = Vec::with_capacity(n);
                for _ in 0..n {
                    groups.push(r.str(MAX_ACL_NAME, "group name")?);
                }
                Msg::WhoReply { user, id, groups }
            }
            USER_IDS => {
                let n = r.count(MAX_USER_IDS, 2, "user names")?;
                let mut names = Vec::with_capacity(n);
                for _ in 0..n {
                    names.push(r.str(MAX_USER, "user name")?);
                }
                Msg::UserIds { names }
            }
            USER_IDS_REPLY => {
                let n = r.count(MAX_USER_IDS, 4, "user ids")?;
                let mut ids = Vec::with_capacity(n);
                for _ in 0..n {
                    ids.push(r.u32()?);
                }
                Msg::UserIdsReply { ids }
            }
            GROUP_STATUS => Msg::GroupStatus,
            GROUP_VIEW => {
                let term = r.u64()?;
                let leader = r.u64()?;
                let n = r.count(MAX_GROUP_MEMBERS, 11, "group members")?;
                let mut members = Vec::with_capacity(n);
                for _ in 0..n {
                    members.push(GroupMember {
                        id: r.u64()?,
                        addr: r.str(MAX_MEMBER_ADDR, "member address")?,
                        up: r.bool()?,
                    });
                }
                Msg::GroupView {
                    term,
                    leader,
                    members,
                }
            }
            other => {
                return Err(Error::Protocol(format!(
                    "unknown message type {other:#04x}"
                )))
            }
        };
        r.finish()?;
        Ok(msg)
    }
}

fn encode_extents(w: &mut Writer, extents: &[(u64, u64)]) {
    w.u32(extents.len() as u32);
    for (off, len) in extents {
        w.u64(*off).u64(*len);
    }
}

/// Extents of a file of `length` bytes: in order, not overlapping, none
/// empty, within the file (anything else is a protocol error).
fn decode_extents(r: &mut Reader, length: u64) -> Result<Vec<(u64, u64)>> {
    let n = r.count(crate::sparse::MAX_EXTENTS, 16, "extents")?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push((r.u64()?, r.u64()?));
    }
    if crate::sparse::check_extents(&out, length).is_none() {
        return Err(Error::Protocol(
            "extents out of order, overlapping, empty or past the end".into(),
        ));
    }
    Ok(out)
}

/// The bytes the extents of a transfer cover (checked when decoded).
pub fn extent_bytes(extents: &[(u64, u64)]) -> u64 {
    extents.iter().map(|e| e.1).sum()
}

fn encode_record(w: &mut Writer, r: &Record) {
    w.u64(r.store_id);
    match &r.op {
        RecordOp::Store {
            fid,
            expected_version,
            upload_id,
            length,
            mtime,
        } => {
            w.u8(rec::STORE)
                .fid(fid)
                .u64(*expected_version)
                .u64(*upload_id)
                .u64(*length)
                .time(mtime);
        }
        RecordOp::Create {
            parent,
            name,
            fid,
            mode,
            mtime,
            uid,
            gid,
        } => {
            w.u8(rec::CREATE)
                .fid(parent)
                .str(name)
                .fid(fid)
                .u32(*mode)
                .time(mtime)
                .u32(*uid)
                .u32(*gid);
        }
        RecordOp::StoreInline {
            fid,
            expected_version,
            mtime,
            data,
        } => {
            w.u8(rec::STORE_INLINE)
                .fid(fid)
                .u64(*expected_version)
                .time(mtime)
                .blob(data);
        }
        RecordOp::CreateWith {
            parent,
            name,
            fid,
            mode,
            mtime,
            uid,
            gid,
            data,
        } => {
            w.u8(rec::CREATE_WITH)
                .fid(parent)
                .str(name)
                .fid(fid)
                .u32(*mode)
                .time(mtime)
                .u32(*uid)
                .u32(*gid)
                .blob(data);
        }
        RecordOp::Mkdir {
            parent,
            name,
            fid,
            mode,
            mtime,
            uid,
            gid,
        } => {
            w.u8(rec::MKDIR)
                .fid(parent)
                .str(name)
                .fid(fid)
                .u32(*mode)
                .time(mtime)
                .u32(*uid)
                .u32(*gid);
        }
        RecordOp::Symlink {
            parent,
            name,
            fid,
            target,
            mtime,
            uid,
            gid,
        } => {
            w.u8(rec::SYMLINK)
                .fid(parent)
                .str(name)
                .fid(fid)
                .str(target)
                .time(mtime)
                .u32(*uid)
                .u32(*gid);
        }
        RecordOp::Link { parent, name, fid } => {
            w.u8(rec::LINK).fid(parent).str(name).fid(fid);
        }
        RecordOp::Remove { parent, name, fid } => {
            w.u8(rec::REMOVE).fid(parent).str(name).fid(fid);
        }
        RecordOp::Rmdir { parent, name, fid } => {
            w.u8(rec::RMDIR).fid(parent).str(name).fid(fid);
        }
        RecordOp::Rename {
            src_parent,
            src_name,
            dst_parent,
            dst_name,
            fid,
            replaces,
        } => {
            w.u8(rec::RENAME)
                .fid(src_parent)
                .str(src_name)
                .fid(dst_parent)
                .str(dst_name)
                .fid(fid);
            match replaces {
                Replaces::Any => w.u8(0),
                Replaces::Nothing => w.u8(1),
                Replaces::Object(f) => w.u8(2).fid(f),
            };
        }
        RecordOp::SetAttr {
            fid,
            expected_version,
            mode,
            size,
            mtime,
            uid,
            gid,
            atime,
        } => {
            w.u8(rec::SETATTR)
                .fid(fid)
                .u64(*expected_version)
                .opt_u32(*mode)
                .opt_u64(*size)
                .opt_time(*mtime)
                .opt_u32(*uid)
                .opt_u32(*gid)
                .opt_time(*atime);
        }
        RecordOp::SetXattr {
            fid,
            name,
            how,
            value,
        } => {
            w.u8(rec::SETXATTR)
                .fid(fid)
                .str(name)
                .u8(*how as u8)
                .blob(value);
        }
        RecordOp::Mknod {
            parent,
            name,
            fid,
            ftype,
            mode,
            rdev,
            mtime,
            uid,
            gid,
        } => {
            w.u8(rec::MKNOD)
                .fid(parent)
                .str(name)
                .fid(fid)
                .u8(*ftype as u8)
                .u32(*mode)
                .u64(*rdev)
                .time(mtime)
                .u32(*uid)
                .u32(*gid);
        }
    }
}

/// A `Reintegrate` body written by protocol 1 (a client log from before
/// owners): creating records get `owner`, SetAttr changes no owner, group
/// or atime. Only for reading such a log once; nothing sends this.
pub fn decode_records_v1(body: &[u8], owner: (u32, u32)) -> Result<Vec<Record>> {
    let mut r = Reader::new(body);
    let n = r.count(MAX_BATCH, 9, "records")?;
    let mut records = Vec::with_capacity(n);
    for _ in 0..n {
        records.push(decode_record(&mut r, Some(owner))?);
    }
    r.finish()?;
    Ok(records)
}

/// One record; `legacy` (protocol 1) gives creating records that owner and
/// reads SetAttr without its owner, group and atime.
fn decode_record(r: &mut Reader, legacy: Option<(u32, u32)>) -> Result<Record> {
    let store_id = r.u64()?;
    let owner = |r: &mut Reader| -> Result<(u32, u32)> {
        match legacy {
            Some(o) => Ok(o),
            None => Ok((r.u32()?, r.u32()?)),
        }
    };
    let name = |r: &mut Reader| r.str(MAX_NAME, "name");
    let op = match r.u8()? {
        rec::STORE => RecordOp::Store {
            fid: r.fid()?,
            expected_version: r.u64()?,
            upload_id: r.u64()?,
            length: r.u64()?,
            mtime: r.time()?,
        },
        rec::CREATE => {
            let (parent, name, fid) = (r.fid()?, name(r)?, r.fid()?);
            let (mode, mtime) = (r.u32()?, r.time()?);
            let (uid, gid) = owner(r)?;
            RecordOp::Create {
                parent,
                name,
                fid,
                mode,
                mtime,
                uid,
                gid,
            }
        }
        rec::MKDIR => {
            let (parent, name, fid) = (r.fid()?, name(r)?, r.fid()?);
            let (mode, mtime) = (r.u32()?, r.time()?);
            let (uid, gid) = owner(r)?;
            RecordOp::Mkdir {
                parent,
                name,
                fid,
                mode,
                mtime,
                uid,
                gid,
            }
        }
        rec::SYMLINK => {
            let (parent, name, fid) = (r.fid()?, name(r)?, r.fid()?);
            let (target, mtime) = (r.str(MAX_SYMLINK, "symlink target")?, r.time()?);
            let (uid, gid) = owner(r)?;
            RecordOp::Symlink {
                parent,
                name,
                fid,
                target,
                mtime,
                uid,
                gid,
            }
        }
        rec::LINK => RecordOp::Link {
            parent: r.fid()?,
            name: name(r)?,
            fid: r.fid()?,
        },
        rec::REMOVE => RecordOp::Remove {
            parent: r.fid()?,
            name: name(r)?,
            fid: r.fid()?,
        },
        rec::RMDIR => RecordOp::Rmdir {
            parent: r.fid()?,
            name: name(r)?,
            fid: r.fid()?,
        },
        rec::RENAME => RecordOp::Rename {
            src_parent: r.fid()?,
            src_name: name(r)?,
            dst_parent: r.fid()?,
            dst_name: name(r)?,
            fid: r.fid()?,
            replaces: match r.u8()? {
                0 => Replaces::Any,
                1 => Replaces::Nothing,
                2 => Replaces::Object(r.fid()?),
                v => return Err(Error::Protocol(format!("bad rename expectation {v}"))),
            },
        },
        rec::SETATTR => RecordOp::SetAttr {
            fid: r.fid()?,
            expected_version: r.u64()?,
            mode: r.opt_u32()?,
            size: r.opt_u64()?,
            mtime: r.opt_time()?,
            uid: if legacy.is_some() { None } else { r.opt_u32()? },
            gid: if legacy.is_some() { None } else { r.opt_u32()? },
            atime: if legacy.is_some() {
                None
            } else {
                r.opt_time()?
            },
        },
        rec::SETXATTR => RecordOp::SetXattr {
            fid: r.fid()?,
            name: r.str(MAX_XATTR_NAME, "attribute name")?,
            how: match r.u8()? {
                0 => XattrHow::Set,
                1 => XattrHow::Create,
                2 => XattrHow::Replace,
                3 => XattrHow::Remove,
                v => return Err(Error::Protocol(format!("bad xattr operation {v}"))),
            },
            value: r.blob(MAX_XATTR_VALUE, "attribute value")?,
        },
        rec::MKNOD => RecordOp::Mknod {
            parent: r.fid()?,
            name: name(r)?,
            fid: r.fid()?,
            ftype: match r.ftype()? {
                t if t.is_special() => t,
                t => return Err(Error::Protocol(format!("mknod of type {t:?}"))),
            },
            mode: r.u32()?,
            rdev: r.u64()?,
            mtime: r.time()?,
            uid: r.u32()?,
            gid: r.u32()?,
        },
        // Inline data is bounded by the frame here; the server refuses
        // more than `MAX_INLINE` with a clear error naming the record.
        rec::STORE_INLINE => RecordOp::StoreInline {
            fid: r.fid()?,
            expected_version: r.u64()?,
            mtime: r.time()?,
            data: r.blob(super::MAX_FRAME, "inline data")?,
        },
        rec::CREATE_WITH => RecordOp::CreateWith {
            parent: r.fid()?,
            name: name(r)?,
            fid: r.fid()?,
            mode: r.u32()?,
            mtime: r.time()?,
            uid: r.u32()?,
            gid: r.u32()?,
            data: r.blob(super::MAX_FRAME, "inline data")?,
        },
        v => return Err(Error::Protocol(format!("unknown record type {v}"))),
    };
    Ok(Record { store_id, op })
}

/// A rights byte: only the seven right bits may be set.
fn rights(r: &mut Reader) -> Result<u8> {
    let v = r.u8()?;
    if v & !super::acl::ALL != 0 {
        return Err(Error::Protocol(format!("bad rights byte {v:#04x}")));
    }
    Ok(v)
}

fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::types::FileType;

    fn attr() -> Attr {
        Attr {
            fid: Fid::new(1, 2, 3),
            ftype: FileType::File,
            mode: 0o644,
            nlink: 1,
            size: 10,
            mtime: Timespec { sec: 5, nsec: 6 },
            ctime: Timespec { sec: 7, nsec: 8 },
            version: 9,
            uid: 1000,
            gid: 100,
            atime: Timespec { sec: 10, nsec: 11 },
            rdev: 0x0801,
        }
    }

    fn samples() -> Vec<Msg> {
        let f = Fid::new(1, 2, 3);
        let t = Timespec { sec: 1, nsec: 2 };
        let ops = vec![
            RecordOp::Store {
                fid: f,
                expected_version: 4,
                upload_id: 5,
                length: 6,
                mtime: t,
            },
            RecordOp::Create {
                parent: f,
                name: "a".into(),
                fid: f,
                mode: 0o600,
                mtime: t,
                uid: 7,
                gid: 8,
            },
            RecordOp::Mkdir {
                parent: f,
                name: "d".into(),
                fid: f,
                mode: 0o755,
                mtime: t,
                uid: 7,
                gid: 8,
            },
            RecordOp::Symlink {
                parent: f,
                name: "s".into(),
                fid: f,
                target: "/x".into(),
                mtime: t,
                uid: 7,
                gid: 8,
            },
            RecordOp::Link {
                parent: f,
                name: "l".into(),
                fid: f,
            },
            RecordOp::Remove {
                parent: f,
                name: "r".into(),
                fid: f,
            },
            RecordOp::Rmdir {
                parent: f,
                name: "r".into(),
                fid: f,
            },
            RecordOp::Rename {
                src_parent: f,
                src_name: "a".into(),
                dst_parent: f,
                dst_name: "b".into(),
                fid: f,
                replaces: Replaces::Object(f),
            },
            RecordOp::Rename {
                src_parent: f,
                src_name: "a".into(),
                dst_parent: f,
                dst_name: "b".into(),
                fid: f,
                replaces: Replaces::Nothing,
            },
            RecordOp::SetAttr {
                fid: f,
                expected_version: 0,
                mode: Some(0o700),
                size: None,
                mtime: Some(t),
                uid: Some(0),
                gid: None,
                atime: Some(t),
            },
            RecordOp::SetXattr {
                fid: f,
                name: "user.k".into(),
                how: XattrHow::Create,
                value: vec![0, 1, 2],
            },
            RecordOp::SetXattr {
                fid: f,
                name: "user.k".into(),
                how: XattrHow::Remove,
                value: vec![],
            },
            RecordOp::Mknod {
                parent: f,
                name: "dev".into(),
                fid: f,
                ftype: FileType::CharDev,
                mode: 0o600,
                rdev: (1 << 8) | 3,
                mtime: t,
                uid: 0,
                gid: 0,
            },
        ];
        vec![
            Msg::Hello {
                version: 1,
                kind: ConnKind::Bulk,
                user: "admin".into(),
                client_id: [7; 16],
                epoch: 99,
                client_nonce: [8; 32],
            },
            Msg::Challenge {
                server_nonce: [1; 32],
            },
            Msg::Auth { mac: [2; 32] },
            Msg::Welcome {
                server_id: [3; 16],
                root: f,
                server_mac: [4; 32],
                break_timeout_ms: 1000,
            },
            Msg::Error {
                code: WireCode::NotFound,
                index: 3,
                message: "gone".into(),
            },
            Msg::Ping,
            Msg::Pong,
            Msg::GetAttrs { fids: vec![f, f] },
            Msg::Attrs {
                items: vec![Ok(attr()), Err(WireCode::Stale)],
            },
            Msg::ReadDir { fid: f, cursor: 7 },
            Msg::DirPage {
                attr: attr(),
                entries: vec![DirEntry {
                    name: "x".into(),
                    fid: f,
                    ftype: FileType::Dir,
                }],
                next: Some(1),
            },
            Msg::AllocFids {
                volume: 1,
                count: 64,
            },
            Msg::FidRange {
                volume: 1,
                first_vnode: 100,
                count: 64,
            },
            Msg::ReintegrateAfter {
                after: 41,
                records: ops
                    .iter()
                    .take(2)
                    .cloned()
                    .enumerate()
                    .map(|(i, op)| Record {
                        store_id: 42 + i as u64,
                        op,
                    })
                    .collect(),
            },
            Msg::Reintegrate {
                records: ops
                    .into_iter()
                    .enumerate()
                    .map(|(i, op)| Record {
                        store_id: i as u64,
                        op,
                    })
                    .collect(),
            },
            Msg::Reintegrated {
                results: vec![attr()],
            },
            Msg::ValidateVolume {
                volume: 1,
                stamp: 7,
            },
            Msg::VolumeStamp {
                volume: 1,
                stamp: 9,
                valid: true,
            },
            Msg::GetXattrs { fid: f },
            Msg::Xattrs {
                version: 3,
                items: vec![("user.a".into(), vec![]), ("user.b".into(), vec![9; 300])],
            },
            Msg::CallbackBreak { fids: vec![f] },
            Msg::BreakAck,
            Msg::Fetch { fid: f },
            Msg::FetchReply {
                attr: attr(),
                length: 1 << 40,
                extents: vec![(0, 10), (1 << 39, 4096)],
            },
            Msg::Upload {
                upload_id: 1,
                length: 2,
                extents: vec![(0, 2)],
            },
            Msg::Uploaded { upload_id: 1 },
            Msg::GetAcl { fid: f },
            Msg::AclReply {
                entries: vec![
                    crate::proto::acl::AclEntry {
                        name: "System:AnyUser".into(),
                        rights: 3,
                        negative: false,
                    },
                    crate::proto::acl::AclEntry {
                        name: "bob".into(),
                        rights: 16,
                        negative: true,
                    },
                ],
                rights: 0x7f,
            },
            Msg::SetAcl {
                fid: f,
                name: "bob".into(),
                rights: 1,
                negative: true,
            },
            Msg::WhoAmI,
            Msg::WhoReply {
                user: "bob".into(),
                id: 2,
                groups: vec!["System:AnyUser".into()],
            },
            Msg::UserIds {
                names: vec!["bob".into(), "admin".into()],
            },
            Msg::UserIdsReply { ids: vec![2, 0] },
            Msg::GroupStatus,
            Msg::GroupView {
                term: 7,
                leader: 2,
                members: vec![
                    GroupMember {
                        id: 1,
                        addr: "10.0.0.1:2432".into(),
                        up: false,
                    },
                    GroupMember {
                        id: 2,
                        addr: "10.0.0.2:2432".into(),
                        up: true,
                    },
                ],
            },
        ]
    }

    #[test]
    fn a_frame_encoded_in_one_buffer_is_the_header_and_the_body() {
        let msgs = [
            Msg::Ping,
            Msg::GetAttrs {
                fids: vec![Fid::new(1, 2, 3); 5],
            },
            Msg::Attrs {
                items: vec![Ok(attr()), Err(WireCode::NotFound)],
            },
        ];
        for m in msgs {
            let want = crate::proto::frame::encode_frame(m.kind(), 77, &m.encode());
            assert_eq!(m.encode_frame(77), want);
            let (f, used) = crate::proto::frame::parse_frame(&want).unwrap();
            assert_eq!((f.id, used), (77, want.len()));
            assert_eq!(Msg::decode(&f).unwrap(), m);
        }
    }

    #[test]
    fn a_protocol_1_log_still_reads() {
        // A Create and a SetAttr as protocol 1 wrote them.
        let f = Fid::new(1, 2, 1);
        let mut w = Writer::new();
        w.u32(2);
        w.u64(1).u8(rec::CREATE).fid(&f).str("a").fid(&f).u32(0o644);
        w.time(&Timespec { sec: 5, nsec: 0 });
        w.u64(2)
            .u8(rec::SETATTR)
            .fid(&f)
            .u64(0)
            .opt_u32(Some(0o600));
        w.opt_u64(None).opt_time(None);
        let recs = decode_records_v1(&w.buf, (7, 8)).unwrap();
        assert!(matches!(
            recs[0].op,
            RecordOp::Create {
                uid: 7,
                gid: 8,
                mode: 0o644,
                ..
            }
        ));
        assert!(matches!(
            recs[1].op,
            RecordOp::SetAttr {
                mode: Some(0o600),
                uid: None,
                gid: None,
                atime: None,
                ..
            }
        ));
        // The same bytes are not a protocol-2 body.
        assert!(Msg::decode_body(code::REINTEGRATE, &w.buf).is_err());
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            let body = m.encode();
            assert_eq!(Msg::decode_body(m.kind(), &body).unwrap(), m);
        }
    }

    #[test]
    fn truncated_or_padded_bodies_are_refused() {
        for m in samples() {
            let body = m.encode();
            for cut in 0..body.len() {
                assert!(
                    Msg::decode_body(m.kind(), &body[..cut]).is_err(),
                    "{m:?} cut {cut}"
                );
            }
            let mut long = body.clone();
            long.push(0);
            assert!(Msg::decode_body(m.kind(), &long).is_err());
        }
    }

    #[test]
    fn unknown_type_and_huge_counts_are_refused() {
        assert!(matches!(
            Msg::decode_body(0xEE, &[]),
            Err(Error::Protocol(_))
        ));
        let body = u32::MAX.to_be_bytes();
        assert!(matches!(
            Msg::decode_body(code::GET_ATTRS, &body),
            Err(Error::Protocol(_))
        ));
        assert!(matches!(
            Msg::decode_body(code::REINTEGRATE, &body),
            Err(Error::Protocol(_))
        ));
    }
}
