//! The cache: container files (one per cached file, named by fid) under
//! `cache_dir/containers/`, and an index in `cache_dir/index.redb` mapping
//! each fid to its status, the version its container holds, its last use,
//! and for directories their entries. Least recently used containers are
//! evicted to keep within `cache_size`; open or dirty ones never are.
//!
//! Whether cached status may be *trusted* is not decided here but by the
//! callback table; the cache only remembers versions so that an untrusted
//! entry can be revalidated with one `GetAttrs` instead of a refetch.
//!
//! New files take an empty container made ahead of time by a thread off
//! the callers' path (`spares.rs`).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};
use redb::{
    Durability, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};

use super::index_file::{LastError, Opened};
use super::namespace::{Edit, Listing};
use super::spares::{Spares, SPARES_TARGET};
use super::tables::{CML, META};
use crate::proto::codec::{Reader, Writer};
use crate::proto::{Attr, DirEntry, Fid, MAX_SYMLINK};
use crate::{Error, Result};

const OBJECTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("objects");
/// Directory entries of cached listings, one row per name: key = the
/// directory's fid (16 bytes) followed by the name, value = the entry.
/// Adding or removing a name writes one row, not the whole listing.
const ENTRIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("entries");

/// The key range of `dir`'s rows in `ENTRIES`: names are UTF-8, which
/// never contains the byte 0xFF, so every name sorts below it.
fn entries_range(dir: Fid) -> (Vec<u8>, Vec<u8>) {
    let start = dir.to_bytes().to_vec();
    let mut end = start.clone();
    end.push(0xFF);
    (start, end)
}

fn entry_key(dir: Fid, name: &str) -> Vec<u8> {
    let mut k = dir.to_bytes().to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

/// What of a directory's listing changed since its rows were last saved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum Journal {
    #[default]
    Clean,
    /// These names (their rows are rewritten or removed).
    Names(BTreeSet<String>),
    /// The listing was replaced or dropped: all its rows are rewritten.
    Whole,
}

/// How `persist` saves one directory's rows (taken from its journal).
enum SaveRows {
    Nothing,
    Clear,
    Whole(Arc<Listing>),
    Names(Vec<(String, Option<DirEntry>)>),
}

/// What we know about one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub attr: Attr,
    /// The version whose contents the container holds, if there is one.
    pub data_version: Option<u64>,
    /// Bytes the container takes (counted against `cache_size`).
    pub data_bytes: u64,
    pub last_use: u64,
    /// Written locally and not yet stored on the server.
    pub dirty: bool,
    /// Directories: entries as of a version. Shared, so copying an entry
    /// (every `get`) never copies a large listing; edits go through the
    /// methods below, which note what to save (`journal`).
    listing: Option<(u64, Arc<Listing>)>,
    /// The listing's changes not saved to the index yet (not persisted).
    journal: Journal,
    /// Symlinks: the target (immutable for the life of the fid).
    pub symlink: Option<String>,
    /// Open `File`s on the container (not persisted: nothing is open after a restart).
    pub open: u32,
}

impl Entry {
    fn new(attr: Attr) -> Entry {
        Entry {
            attr,
            data_version: None,
            data_bytes: 0,
            last_use: 0,
            dirty: false,
            listing: None,
            journal: Journal::Clean,
            symlink: None,
            open: 0,
        }
    }

    /// The container holds the contents of the version we know of.
    pub fn data_current(&self) -> bool {
        self.data_version == Some(self.attr.version)
    }

    /// The cached listing belongs to the version we know of.
    pub fn listing_current(&self) -> Option<&Listing> {
        match &self.listing {
            Some((v, l)) if *v == self.attr.version => Some(l),
            _ => None,
        }
    }

    /// As `listing_current`, shared (no copy).
    pub fn listing_shared(&self) -> Option<Arc<Listing>> {
        match &self.listing {
            Some((v, l)) if *v == self.attr.version => Some(l.clone()),
            _ => None,
        }
    }

    /// The cached listing of whatever version (for names in reports).
    pub fn any_listing(&self) -> Option<&Listing> {
        self.listing.as_ref().map(|(_, l)| &**l)
    }

    pub fn has_listing(&self) -> bool {
        self.listing.is_some()
    }

    /// Replace the listing: `l` as of `version`.
    pub fn set_listing(&mut self, version: u64, l: Arc<Listing>) {
        self.listing = Some((version, l));
        self.journal = Journal::Whole;
    }

    /// Forget the listing (it is reread when needed).
    pub fn clear_listing(&mut self) {
        if self.listing.take().is_some() {
            self.journal = Journal::Whole;
        }
    }

    /// The listing (if any) now holds the contents of `version`.
    pub fn set_listing_version(&mut self, version: u64) {
        if let Some((v, _)) = &mut self.listing {
            *v = version;
        }
    }

    /// Apply the edits of directory `dir` among `edits` to the listing (of
    /// whatever version); false if there is none.
    pub fn edit_listing(&mut self, dir: Fid, edits: &[(Fid, Edit)]) -> bool {
        let Some((_, l)) = &mut self.listing else {
            return false;
        };
        super::namespace::apply_edits(Arc::make_mut(l), dir, edits);
        let names = edits
            .iter()
            .filter(|(d, _)| *d == dir)
            .map(|(_, e)| e.name());
        match &mut self.journal {
            Journal::Whole => {}
            Journal::Names(set) => set.extend(names.map(str::to_string)),
            j @ Journal::Clean => *j = Journal::Names(names.map(str::to_string).collect()),
        }
        true
    }

    /// What `persist` must write of the listing's rows; the journal is
    /// clean afterwards.
    fn take_rows(&mut self) -> SaveRows {
        match (std::mem::take(&mut self.journal), &self.listing) {
            (Journal::Clean, _) => SaveRows::Nothing,
            (_, None) => SaveRows::Clear,
            (Journal::Whole, Some((_, l))) => SaveRows::Whole(l.clone()),
            (Journal::Names(n), Some((_, l))) => SaveRows::Names(
                n.into_iter()
                    .map(|name| {
                        let e = l.get(&name).cloned();
                        (name, e)
                    })
                    .collect(),
            ),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.attr(&self.attr)
            .opt_u64(self.data_version)
            .u64(self.data_bytes)
            .u64(self.last_use)
            .u8(self.dirty as u8);
        // The entries themselves are rows of `ENTRIES`.
        match &self.listing {
            Some((v, _)) => {
                w.u8(2).u64(*v);
            }
            None => {
                w.u8(0);
            }
        }
        match &self.symlink {
            Some(t) => w.u8(1).str(t),
            None => w.u8(0),
        };
        w.buf
    }

    fn decode(b: &[u8]) -> Result<Entry> {
        let mut r = Reader::new(b);
        let mut e = Entry::new(r.attr()?);
        e.data_version = r.opt_u64()?;
        e.data_bytes = r.u64()?;
        e.last_use = r.u64()?;
        e.dirty = r.bool()?;
        match r.u8()? {
            0 => {}
            // Written by an older version: the entries inline. Saved as
            // rows the next time the entry is saved.
            1 => {
                let v = r.u64()?;
                let n = r.count(usize::MAX, 20, "cached entries")?;
                let mut l = Vec::with_capacity(n);
                for _ in 0..n {
                    l.push(r.entry()?);
                }
                e.set_listing(v, Arc::new(Listing::from_entries(l)));
            }
            // Rows of `ENTRIES`, filled in by `Cache::open`.
            2 => e.listing = Some((r.u64()?, Arc::new(Listing::default()))),
            n => return Err(Error::Protocol(format!("cached listing tag {n}"))),
        }
        if r.bool()? {
            e.symlink = Some(r.str(MAX_SYMLINK, "symlink target")?);
        }
        r.finish()?;
        Ok(e)
    }
}

struct State {
    map: HashMap<Fid, Entry>,
    clock: u64,
    bytes: u64,
    /// Entries whose only unsaved change is their LRU position. Saving them
    /// on every close would put an index write on the cached-open hot path;
    /// recency is only a hint, so it is saved in one batch by `flush_lru`
    /// (on shutdown) and whenever the entry is saved for another reason.
    lru_unsaved: HashSet<Fid>,
}

impl State {
    /// The rows saving `fid` as it is now (its listing's journal taken).
    fn row(&mut self, fid: Fid) -> Row {
        match self.map.get_mut(&fid) {
            Some(e) => Row {
                fid,
                entry: Some(e.encode()),
                rows: e.take_rows(),
            },
            None => Row {
                fid,
                entry: None,
                rows: SaveRows::Clear,
            },
        }
    }
}

/// One entry's save, made (encoded) but not yet written: its object row
/// (`None`: removed) and its listing's rows.
pub(crate) struct Row {
    fid: Fid,
    entry: Option<Vec<u8>>,
    rows: SaveRows,
}

/// A row waiting in the index for the next transaction (`Cache::ride`,
/// `Index::push_log_rider`).
pub(crate) enum Rider {
    /// A cache save (`Cache::ride`).
    Cache(Row),
    /// A log record held in memory (`Cml::log_lazy`): its store id and
    /// encoding.
    Log(u64, Vec<u8>),
}

/// Write the riders in `w`, in order; a log record in `removing` (which
/// `w` removes from the log) is left out.
fn write_riders(w: &WriteTransaction, riders: &[Rider], removing: &[u64]) -> Result<()> {
    let mut rows = Vec::new();
    for r in riders {
        match r {
            Rider::Cache(row) => rows.push(row),
            Rider::Log(id, bytes) => {
                // The cache rows that follow a record are about it, and
                // all are written by this one transaction: order within it
                // does not matter.
                if !removing.contains(id) {
                    w.open_table(CML)?.insert(*id, &bytes[..])?;
                }
            }
        }
    }
    write_rows(w, rows)
}

/// Write `rows` in `w`, in order.
fn write_rows<'r>(w: &WriteTransaction, rows: impl IntoIterator<Item = &'r Row>) -> Result<()> {
    let mut rows = rows.into_iter().peekable();
    if rows.peek().is_none() {
        return Ok(());
    }
    let mut t = w.open_table(OBJECTS)?;
    let mut ents = w.open_table(ENTRIES)?;
    for Row { fid, entry, rows } in rows {
        let k = fid.to_bytes();
        match entry {
            Some(r) => {
                t.insert(&k[..], &r[..])?;
            }
            None => {
                t.remove(&k[..])?;
            }
        }
        match rows {
            SaveRows::Nothing => {}
            SaveRows::Clear | SaveRows::Whole(_) => {
                let (a, b) = entries_range(*fid);
                ents.retain_in::<&[u8], _>(&a[..]..&b[..], |_, _| false)?;
                if let SaveRows::Whole(l) = rows {
                    for d in l.iter() {
                        let mut v = Writer::new();
                        v.entry(d);
                        ents.insert(&entry_key(*fid, &d.name)[..], &v.buf[..])?;
                    }
                }
            }
            SaveRows::Names(names) => {
                for (name, d) in names {
                    let key = entry_key(*fid, name);
                    match d {
                        Some(d) => {
                            let mut v = Writer::new();
                            v.entry(d);
                            ents.insert(&key[..], &v.buf[..])?;
                        }
                        None => {
                            ents.remove(&key[..])?;
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// Most saves that wait to ride (`Cache::ride`) before the cache commits
/// them itself.
const RIDERS_MAX: usize = 256;

/// Index commits are not fsynced (`Durability::None`): everything in the
/// index but the log can be lost and revalidated. Every this many commits
/// one is durable (also: every durable log or lease commit, and shutdown),
/// which bounds what a crash loses and what that commit's sync writes.
const DURABLE_EVERY: u32 = 256;

thread_local! {
    /// Saves held back by `Cache::deferred` on this thread: per frame, the
    /// cache (by address) and the fids to save at the frame's end.
    static DEFERRED: std::cell::RefCell<Vec<(usize, Vec<Fid>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

pub(crate) struct Cache {
    dir: PathBuf,
    containers: PathBuf,
    /// Containers that hold the only copy of data the CML still has to
    /// store: never evicted (disconnected operation).
    pinned: Mutex<std::collections::HashSet<Fid>>,
    /// Hoard priorities of the objects the last hoard walk reached
    /// (hoard.rs); eviction takes low priority first, then least recent.
    priorities: Mutex<HashMap<Fid, u32>>,
    db: Arc<Index>,
    limit: u64,
    state: Mutex<State>,
    /// Containers put in place (renamed into `containers/`) since the
    /// directory was last fsynced: their names may not survive a power cut
    /// yet, so the first record naming one syncs the directory.
    unsynced_names: Mutex<HashSet<Fid>>,
    /// Index commits since the last durable one (see `DURABLE_EVERY`).
    undurable: AtomicU32,
    /// Unsynced saves wait for the log's next transaction (`set_riding`).
    riding: AtomicBool,
    /// The client's index thread commits waiting saves (`background_saves`):
    /// every unsynced save rides, whatever the mode.
    background: AtomicBool,
    /// Index transactions committed by the cache (for tests).
    commits: AtomicU32,
    /// Unsynced saves handed to the thread committing (`hand_off`).
    handoff: Mutex<Handoff>,
    /// Empty containers made ahead of time for new files.
    spares: Arc<Spares>,
    /// The thread refilling `spares` (`None` when the pool is off);
    /// stopped and joined when the cache is dropped.
    spare_maker: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Cache {
    fn drop(&mut self) {
        self.spares.stop();
        if let Some(h) = self.spare_maker.lock().take() {
            let _ = h.join();
        }
    }
}

/// The cache's group commit of unsynced saves: the entries waiting, and
/// whether a thread is committing (it takes them in its next round).
#[derive(Default)]
struct Handoff {
    fids: Vec<Fid>,
    busy: bool,
}

/// Rounds one thread commits for the others before it goes back to its
/// own work (what arrives later waits for the next save, or a durable
/// commit, which takes it along).
const HANDOFF_ROUNDS: usize = 8;

impl Cache {
    /// Load the index; drop what a crash may have left inconsistent.
    pub fn open(cache_dir: &Path, db: Arc<Index>, limit: u64) -> Result<Cache> {
        Cache::open_with_spares(cache_dir, db, limit, SPARES_TARGET)
    }

    /// `open`, keeping up to `target` empty containers ready (0: no pool
    /// thread; spares left by an earlier run are still used up).
    pub fn open_with_spares(
        cache_dir: &Path,
        db: Arc<Index>,
        limit: u64,
        target: usize,
    ) -> Result<Cache> {
        let containers = cache_dir.join("containers");
        std::fs::create_dir_all(&containers)
            .map_err(|e| Error::io(format!("creating {}", containers.display()), e))?;
        let mut map = HashMap::new();
        {
            let w = db.begin_write()?;
            w.open_table(OBJECTS)?;
            w.open_table(ENTRIES)?;
            w.commit()?;
            let r = db.begin_read()?;
            let t = r.open_table(OBJECTS)?;
            for row in t.iter()? {
                let (k, v) = row?;
                let Ok(key) = <[u8; 16]>::try_from(k.value()) else {
                    continue;
                };
                // An undecodable row is dropped, not fatal: the cache is only a cache.
                if let Ok(e) = Entry::decode(v.value()) {
                    map.insert(Fid::from_bytes(&key), e);
                }
            }
            // Rows of a directory without a listing are left over: ignored
            // (and removed when a listing of it is saved whole).
            let t = r.open_table(ENTRIES)?;
            for row in t.iter()? {
                let (k, v) = row?;
                let Some(dir) = k.value().get(..16) else {
                    continue;
                };
                let dir = Fid::from_bytes(dir.try_into().expect("16 bytes"));
                let Some(e) = map.get_mut(&dir) else { continue };
                let Some((_, l)) = &mut e.listing else {
                    continue;
                };
                let mut rd = Reader::new(v.value());
                if let Ok(d) = rd.entry() {
                    Arc::get_mut(l).expect("not shared yet").put(d);
                }
            }
        }
        let mut clock = 0;
        let mut bytes = 0;
        for (fid, e) in map.iter_mut() {
            clock = clock.max(e.last_use);
            // Unstored writes of a crashed run are not trusted as any version
            // (keeping them for reintegration belongs to disconnected operation).
            e.dirty = false;
            let len = std::fs::metadata(containers.join(fid.to_string())).map(|m| m.len());
            match (e.data_version, len) {
                (Some(_), Ok(n)) if n == e.data_bytes => bytes += n,
                _ => {
                    e.data_version = None;
                    e.data_bytes = 0;
                }
            }
        }
        // Leftover temporaries of interrupted fetches are garbage.
        if let Ok(rd) = std::fs::read_dir(&containers) {
            for d in rd.flatten() {
                if d.file_name().to_string_lossy().contains(".tmp") {
                    let _ = std::fs::remove_file(d.path());
                }
            }
        }
        // Names a previous run put in place (and the containers directory
        // itself) are made durable once here, so `make_durable` only has to
        // sync the directory for containers installed by this run.
        sync_dir(&containers)?;
        sync_dir(cache_dir)?;
        let spares = Spares::open(&cache_dir.join("spares"), &containers, target);
        let spare_maker = if target > 0 {
            let s = spares.clone();
            let h = std::thread::Builder::new()
                .name("coda-spares".into())
                .spawn(move || s.run())
                .map_err(|e| Error::io("starting the spare container thread", e))?;
            Some(h)
        } else {
            None
        };
        Ok(Cache {
            spares,
            spare_maker: Mutex::new(spare_maker),
            dir: cache_dir.to_path_buf(),
            pinned: Mutex::new(Default::default()),
            priorities: Mutex::new(Default::default()),
            containers,
            db,
            limit,
            state: Mutex::new(State {
                map,
                clock,
                bytes,
                lru_unsaved: HashSet::new(),
            }),
            unsynced_names: Mutex::new(HashSet::new()),
            undurable: AtomicU32::new(0),
            riding: AtomicBool::new(false),
            background: AtomicBool::new(false),
            commits: AtomicU32::new(0),
            handoff: Mutex::new(Handoff::default()),
        })
    }

    /// Make the container of `fid` (open as `f`) durable: its data and
    /// size, and its name if this run put it in place. Called before a
    /// record that names the data is committed to the log, since that
    /// record is what reintegration later sends over the server's copy.
    ///
    /// The entry's row is written here too (not synced: the record's
    /// durable commit that follows carries it to disk): a store does not
    /// save the entry before its record (`File::store`), and the start-up
    /// check trusts a container whose size the row names, so a plain
    /// store's logged data stays served after a crash.
    pub fn make_durable(&self, fid: Fid, f: &std::fs::File) -> Result<()> {
        f.sync_all()
            .map_err(|e| Error::io(format!("syncing container {fid}"), e))?;
        self.persist_now(&[fid], false);
        // The set is only read and cleared under its lock, never held
        // across the fsync; a name installed meanwhile stays in the set.
        let pending = {
            let mut u = self.unsynced_names.lock();
            if !u.contains(&fid) {
                return Ok(());
            }
            std::mem::take(&mut *u)
        };
        if let Err(e) = sync_dir(&self.containers) {
            self.unsynced_names.lock().extend(pending);
            return Err(e);
        }
        Ok(())
    }

    /// Remove the containers no version and no logged change needs: left
    /// by a store that failed (its container is untrusted), by an object
    /// forgotten while its file was open, or by a crash between writing a
    /// container and indexing it. Run at start once the log's containers
    /// are pinned, so they count against `cache_size` again or are gone.
    pub fn sweep_unused_containers(&self) {
        let pinned = self.pinned.lock().clone();
        let Ok(rd) = std::fs::read_dir(&self.containers) else {
            return;
        };
        let mut st = self.state.lock();
        let mut untracked = Vec::new();
        for d in rd.flatten() {
            let name = d.file_name().to_string_lossy().into_owned();
            let Some(fid) = parse_fid(&name) else {
                continue; // not a container name: not ours to judge
            };
            if pinned.contains(&fid) {
                continue;
            }
            match st.map.get_mut(&fid) {
                Some(e) if e.data_version.is_some() || e.open > 0 => {}
                Some(e) => {
                    st.bytes -= std::mem::take(&mut e.data_bytes);
                    untracked.push(d.path());
                }
                None => untracked.push(d.path()),
            }
        }
        drop(st);
        for p in untracked {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Replace the hoard priorities (after a hoard walk).
    pub fn set_priorities(&self, p: HashMap<Fid, u32>) {
        *self.priorities.lock() = p;
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn pin(&self, fid: Fid) {
        self.pinned.lock().insert(fid);
    }

    pub fn unpin(&self, fid: Fid) {
        self.pinned.lock().remove(&fid);
    }

    /// A path that names `fid`, found through the cached listings (best
    /// effort: for messages and conflict reports).
    pub fn path_of(&self, fid: Fid) -> Option<String> {
        let st = self.state.lock();
        let mut names = Vec::new();
        let mut cur = fid;
        for _ in 0..crate::client::namei::MAX_DEPTH_FOR_NAMES {
            let parent = st.map.iter().find_map(|(d, e)| {
                let l = e.any_listing()?;
                l.iter()
                    .find(|x| x.fid == cur)
                    .map(|x| (*d, x.name.clone()))
            });
            match parent {
                Some((d, n)) => {
                    names.push(n);
                    cur = d;
                }
                None => break,
            }
        }
        if names.is_empty() {
            return None;
        }
        names.reverse();
        Some(format!("/{}", names.join("/")))
    }

    pub fn container(&self, fid: Fid) -> PathBuf {
        self.containers.join(fid.to_string())
    }

    /// A fresh temporary name next to the container (renamed in place once whole).
    pub fn temp_container(&self, fid: Fid) -> PathBuf {
        let n: u64 = u64::from_ne_bytes(crate::proto::auth::random_bytes::<8>());
        self.containers.join(format!("{fid}.tmp{n:016x}"))
    }

    pub fn get(&self, fid: Fid) -> Option<Entry> {
        self.state.lock().map.get(&fid).cloned()
    }

    pub fn known_fids(&self) -> Vec<Fid> {
        self.state.lock().map.keys().copied().collect()
    }

    /// Write the current entries of `fids` (removing those gone) to the
    /// index. The transaction begins first (redb runs one at a time) and
    /// the rows are read from the map inside it, under the state lock only
    /// while reading: a later transaction reads a later state, so the last
    /// commit holds the newest rows; no lock is held across the commit.
    ///
    /// Not fsynced (but every `DURABLE_EVERY`th, or when `durable`): the
    /// index is a cache, and a crash that loses such a commit loses only
    /// what revalidation rereads (entry and listing carry their version in
    /// one row), what the log's redo restores (`redo_log_in_cache`), or
    /// containers the start-up checks drop (`open`).
    fn persist(&self, fids: &[Fid], durable: bool) {
        if !durable && self.defer(fids) {
            return;
        }
        if !durable
            && (self.riding.load(Ordering::Relaxed) || self.background.load(Ordering::Relaxed))
        {
            return self.ride(fids);
        }
        if !durable {
            return self.hand_off(fids);
        }
        // Durable: the saves handed off and not yet committed go with it.
        let mut all = std::mem::take(&mut self.handoff.lock().fids);
        all.extend_from_slice(fids);
        self.persist_now(&dedup(all), true);
    }

    /// An unsynced save, as a group commit: the fids join those waiting;
    /// if a thread is committing, it takes them in its next round and this
    /// one goes on at once (nothing waits for an unsynced commit: see
    /// `persist`); otherwise this thread commits, one transaction for all
    /// that arrived meanwhile, round after round while more arrive (at
    /// most `HANDOFF_ROUNDS`). Threads saving at once so share redb's one
    /// writer instead of queueing for it one transaction each. No lock is
    /// held across a commit.
    fn hand_off(&self, fids: &[Fid]) {
        if fids.is_empty() {
            return;
        }
        {
            let mut h = self.handoff.lock();
            h.fids.extend_from_slice(fids);
            if h.busy {
                return;
            }
            h.busy = true;
        }
        for _ in 0..HANDOFF_ROUNDS {
            let batch = {
                let mut h = self.handoff.lock();
                if h.fids.is_empty() {
                    h.busy = false;
                    return;
                }
                std::mem::take(&mut h.fids)
            };
            self.persist_now(&dedup(batch), false);
        }
        self.handoff.lock().busy = false;
    }

    /// Within `deferred` on this thread: note `fids` for its one commit.
    fn defer(&self, fids: &[Fid]) -> bool {
        let me = self as *const Cache as usize;
        DEFERRED.with(|d| {
            let mut d = d.borrow_mut();
            match d.iter_mut().rev().find(|(c, _)| *c == me) {
                Some((_, v)) => {
                    v.extend_from_slice(fids);
                    true
                }
                None => false,
            }
        })
    }

    /// Run `f`, saving the entries it changes in one index transaction at
    /// its end instead of one each (a create: the new entry and its
    /// parent's listing edit). Only this thread's saves of this cache wait;
    /// the map changes at once. What waits is an unsynced commit either
    /// way, made durable only by a later durable commit, so nothing that
    /// runs within `f` may rely on it being written (`make_durable` writes
    /// at once).
    pub fn deferred<R>(&self, f: impl FnOnce() -> R) -> R {
        struct Frame<'a>(&'a Cache);
        impl Drop for Frame<'_> {
            fn drop(&mut self) {
                let fids = DEFERRED
                    .with(|d| d.borrow_mut().pop())
                    .map(|(_, v)| v)
                    .unwrap_or_default();
                self.0.persist(&dedup(fids), false);
            }
        }
        DEFERRED.with(|d| {
            d.borrow_mut()
                .push((self as *const Cache as usize, Vec::new()))
        });
        let _frame = Frame(self);
        f()
    }

    fn persist_now(&self, fids: &[Fid], durable: bool) {
        if fids.is_empty() && !durable && !self.db.has_riders() {
            return;
        }
        let durable =
            durable || self.undurable.fetch_add(1, Ordering::Relaxed) + 1 >= DURABLE_EVERY;
        let mut fids = fids.to_vec();
        let mut riders = Vec::new();
        let res: Result<()> = (|| {
            let mut w = self.db.begin_write()?;
            if durable {
                self.undurable.store(0, Ordering::Relaxed);
                w.set_durability(Durability::Immediate)?;
            } else {
                w.set_durability(Durability::None)?;
            }
            // The saves waiting to ride (`ride`) go first, taken under the
            // same lock as this save's rows are made: every row is written
            // in the order it was made.
            let rows: Vec<Row> = {
                let mut st = self.state.lock();
                riders = self.db.take_riders();
                fids.extend(self.db.take_lost(&mut st));
                fids = dedup(std::mem::take(&mut fids));
                fids.iter().map(|f| st.row(*f)).collect()
            };
            write_riders(&w, &riders, &[])?;
            write_rows(&w, &rows)?;
            w.commit()?;
            self.commits.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })();
        if res.is_err() {
            // (The failed opening is opened again by the next write: the
            // file noted the failure itself, `Opened::broken`.)
            self.db.riders_failed(riders);
            // The journals taken are lost with the commit: save those
            // listings whole next time.
            let mut st = self.state.lock();
            for f in &fids {
                if let Some(e) = st.map.get_mut(f) {
                    e.journal = Journal::Whole;
                }
            }
        }
    }

    /// An unsynced save in riding mode (`set_riding`): the rows are made
    /// now and wait in the index (`Index::take_riders`) for the next
    /// transaction of the log, which writes them in its own commit, or for
    /// the next save of the cache that commits (at most `RIDERS_MAX` wait).
    /// An unsynced commit is lost in a crash like a save not yet written
    /// (redb writes its header only at a durable commit), and every durable
    /// commit of the log or the cache writes them: so they are as durable
    /// as before, minus one index transaction per save.
    fn ride(&self, fids: &[Fid]) {
        let waiting = {
            let mut st = self.state.lock();
            let mut fids = fids.to_vec();
            fids.extend(self.db.take_lost(&mut st));
            let rows: Vec<Row> = dedup(fids).into_iter().map(|f| st.row(f)).collect();
            self.db.push_riders(rows)
        };
        if waiting >= RIDERS_MAX {
            self.persist_now(&[], false);
        }
    }

    /// Riding mode: unsynced saves wait for the next transaction of the
    /// log instead of committing one of their own (write-back and
    /// write-disconnected modes, where nearly every call logs a record).
    pub fn set_riding(&self, on: bool) {
        self.riding.store(on, Ordering::Relaxed);
    }

    /// From now on the client's index thread (`coda-index`) commits the
    /// unsynced saves: every one rides (`ride`), made now and written by
    /// the log's next transaction, the next durable commit, or the thread's
    /// next round (`flush_riders`), whichever comes first. A caller so pays
    /// no index commit of its own. Nothing a crash keeps changes: an
    /// unsynced commit survives no crash (redb writes its header only at a
    /// durable commit), and a waiting save is written no later than the
    /// first log transaction after it, as a committed one would be made
    /// durable by it; so the index never holds a log change without the
    /// cache saves made before it.
    pub(crate) fn background_saves(&self) {
        self.background.store(true, Ordering::Relaxed);
    }

    /// Commit the saves waiting to ride, if any (the reintegrator's turn:
    /// none waits longer than that without a mutation coming).
    pub fn flush_riders(&self) {
        if self.db.has_riders() {
            self.persist_now(&[], false);
        }
    }

    /// Change (or create from `attr`) an entry and persist it.
    pub fn update<R>(
        &self,
        attr_if_new: Option<&Attr>,
        fid: Fid,
        f: impl FnOnce(&mut Entry) -> R,
    ) -> Option<R> {
        let r = self.change(attr_if_new, fid, f)?;
        self.persist(&[fid], false);
        Some(r)
    }

    /// Change (or create from `attr`) an entry in memory only: for what the
    /// next save of the entry writes anyway, or what a restart drops (the
    /// dirty flag, which start-up clears).
    pub fn change<R>(
        &self,
        attr_if_new: Option<&Attr>,
        fid: Fid,
        f: impl FnOnce(&mut Entry) -> R,
    ) -> Option<R> {
        let mut st = self.state.lock();
        let e = match st.map.entry(fid) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(Entry::new(attr_if_new?.clone()))
            }
        };
        let before_bytes = e.data_bytes;
        let r = f(e);
        let after_bytes = e.data_bytes;
        st.bytes = st.bytes - before_bytes + after_bytes;
        Some(r)
    }

    /// Record fresh status from the server. Unchanged status is not written
    /// again: revalidating 100,000 objects would otherwise be 100,000 index
    /// transactions.
    pub fn set_attr(&self, attr: &Attr) {
        if self
            .state
            .lock()
            .map
            .get(&attr.fid)
            .is_some_and(|e| e.attr == *attr)
        {
            return;
        }
        self.update(Some(attr), attr.fid, |e| e.attr = attr.clone());
    }

    pub fn set_listing(&self, attr: &Attr, entries: Arc<Listing>) {
        self.update(Some(attr), attr.fid, |e| {
            e.attr = attr.clone();
            e.set_listing(attr.version, entries);
        });
    }

    /// Install a listing read from the server, unless the cached one is
    /// newer; returns the listing now cached. A read that the server
    /// answered before one of this client's own changes in the directory
    /// must not undo it when its reply lands after the change was applied
    /// here (after_dir_change): no callback break marks such a read stale,
    /// since the server breaks no callback of the client that made the
    /// change. Directory versions only grow, one per change, here as there.
    pub fn install_fetched_listing(&self, attr: &Attr, entries: Arc<Listing>) -> Arc<Listing> {
        // Decided and done under one hold of the state lock, so an edit
        // cannot land between the comparison and the install.
        let fetched = entries.clone();
        self.update(Some(attr), attr.fid, |e| {
            if let Some(newer) = e.listing_shared().filter(|_| e.attr.version > attr.version) {
                return newer;
            }
            e.attr = attr.clone();
            e.set_listing(attr.version, entries);
            fetched.clone()
        })
        .unwrap_or(fetched)
    }

    pub fn set_symlink(&self, attr: &Attr, target: String) {
        self.update(Some(attr), attr.fid, |e| {
            e.attr = attr.clone();
            e.symlink = Some(target);
        });
    }

    /// Put a fully fetched temporary in place as the container of `attr`'s
    /// version; `open` counts an opener in the same step so it cannot be
    /// evicted between install and open.
    pub fn install(&self, attr: &Attr, temp: &Path, open: bool) -> Result<()> {
        let path = self.container(attr.fid);
        std::fs::rename(temp, &path)
            .map_err(|e| Error::io(format!("installing {}", path.display()), e))?;
        self.installed(attr, open);
        Ok(())
    }

    /// Index a container now at its name.
    fn installed(&self, attr: &Attr, open: bool) {
        self.unsynced_names.lock().insert(attr.fid);
        self.update(Some(attr), attr.fid, |e| {
            e.attr = attr.clone();
            e.data_version = Some(attr.version);
            e.data_bytes = attr.size;
            e.dirty = false;
        });
        // A fresh container counts as just used, opened or not.
        self.opened(attr.fid);
        if !open {
            self.closed_quietly(attr.fid);
        }
        self.evict();
    }

    /// An opener starts using the container: it is now the most recent and
    /// may not be evicted until `closed`.
    pub fn opened(&self, fid: Fid) {
        let mut st = self.state.lock();
        st.clock += 1;
        let c = st.clock;
        if let Some(e) = st.map.get_mut(&fid) {
            e.open += 1;
            e.last_use = c;
        }
    }

    /// Count an opener if the container holds the version we know of;
    /// returns that status. Checked and counted under one lock so eviction
    /// cannot slip in between.
    pub fn try_open(&self, fid: Fid) -> Option<Attr> {
        let mut st = self.state.lock();
        st.clock += 1;
        let c = st.clock;
        let e = st.map.get_mut(&fid)?;
        if !e.data_current() {
            return None;
        }
        e.open += 1;
        e.last_use = c;
        Some(e.attr.clone())
    }

    /// An empty container for `attr`, opened: for new files, and for
    /// `O_TRUNC` opens that need no fetch. `dirty` marks contents that differ
    /// from the server's until stored.
    pub fn install_empty(&self, attr: &Attr, dirty: bool) -> Result<()> {
        self.deferred(|| self.install_empty_now(attr, dirty))
    }

    /// `install_empty` for a new object's container: the one made ahead at
    /// its name when there is one (no system call), else a spare.
    pub fn install_new(&self, attr: &Attr) -> Result<()> {
        if self.spares.take_named(attr.fid) {
            let a = Attr {
                size: 0,
                ..attr.clone()
            };
            self.deferred(|| {
                self.installed(&a, true);
                Ok(())
            })
        } else {
            self.install_empty(attr, false)
        }
    }

    /// The fid range of `volume` hands out `next` now and ends at `end`:
    /// the containers of the next new files are made ahead.
    pub fn expect_creates(&self, volume: u32, next: u64, end: u64) {
        self.spares.expect(volume, next, end);
    }

    /// `fid` will never hold a file's container (a directory's, a
    /// symlink's, a refused create's): the one made ahead for it goes.
    pub fn not_a_file(&self, fid: Fid) {
        self.spares.forget(fid);
    }

    fn install_empty_now(&self, attr: &Attr, dirty: bool) -> Result<()> {
        let a = Attr {
            size: 0,
            ..attr.clone()
        };
        // A spare is renamed into place like a fetched temporary; when the
        // pool is empty (or its spare is gone) the container is made here,
        // so no caller ever waits for the pool's thread.
        let spare = self.spares.take();
        let took = match &spare {
            Some(p) => match self.install(&a, p, true) {
                Ok(()) => true,
                Err(_) => {
                    let _ = std::fs::remove_file(p);
                    false
                }
            },
            None => false,
        };
        if !took {
            let temp = self.temp_container(attr.fid);
            std::fs::File::options()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temp)
                .map_err(|e| Error::io(format!("creating {}", temp.display()), e))?;
            self.install(&a, &temp, true)?;
        }
        if dirty {
            self.update(None, attr.fid, |e| {
                e.attr = attr.clone();
                e.dirty = true;
            });
        }
        Ok(())
    }

    fn closed_quietly(&self, fid: Fid) {
        if let Some(e) = self.state.lock().map.get_mut(&fid) {
            e.open = e.open.saturating_sub(1);
        }
    }

    pub fn closed(&self, fid: Fid) {
        {
            let mut st = self.state.lock();
            if let Some(e) = st.map.get_mut(&fid) {
                e.open = e.open.saturating_sub(1);
                st.lru_unsaved.insert(fid);
            }
        }
        self.evict();
    }

    /// Save the LRU positions not saved yet, in one durable index
    /// transaction (on shutdown: it also makes every earlier commit durable).
    pub fn flush_lru(&self) {
        let fids: Vec<Fid> = {
            let mut st = self.state.lock();
            let mut v: Vec<Fid> = st.lru_unsaved.drain().collect();
            v.retain(|f| st.map.contains_key(f));
            v
        };
        self.persist(&fids, true);
    }

    /// Forget an object entirely (it was removed).
    pub fn forget(&self, fid: Fid) {
        let pinned = self.pinned.lock().contains(&fid);
        let mut st = self.state.lock();
        if let Some(e) = st.map.remove(&fid) {
            st.bytes -= e.data_bytes;
            // A pinned container is still to be stored by the log.
            if e.open == 0 && !pinned {
                let _ = std::fs::remove_file(self.container(fid));
            }
        }
        drop(st);
        self.persist(&[fid], false);
    }

    /// Evict least recently used containers until within the limit; open and
    /// dirty ones stay even if that leaves us over it.
    pub fn evict(&self) {
        // Called after every install and close: within the limit (the usual
        // case) it must cost nothing, not a copy of the pinned set, which
        // holds every fid the log names (thousands in write-back mode).
        if self.state.lock().bytes <= self.limit {
            return;
        }
        let pinned = self.pinned.lock().clone();
        let prio = self.priorities.lock().clone();
        let mut st = self.state.lock();
        let mut evicted = Vec::new();
        while st.bytes > self.limit {
            // Unhoarded (priority 0) first, least recently used first; then
            // hoarded ones from the lowest priority up. Open, dirty and
            // pinned (logged) containers never go.
            let victim = st
                .map
                .iter()
                .filter(|(f, e)| {
                    // An untrusted container (a failed store) still takes
                    // its bytes until it goes.
                    (e.data_version.is_some() || e.data_bytes > 0)
                        && e.open == 0
                        && !e.dirty
                        && !pinned.contains(f)
                })
                .min_by_key(|(f, e)| (prio.get(f).copied().unwrap_or(0), e.last_use))
                .map(|(f, _)| *f);
            let Some(fid) = victim else { break };
            let _ = std::fs::remove_file(self.container(fid));
            let e = st.map.get_mut(&fid).expect("victim present");
            let freed = e.data_bytes;
            e.data_version = None;
            e.data_bytes = 0;
            st.bytes -= freed;
            evicted.push(fid);
        }
        drop(st);
        self.persist(&evicted, false);
    }

    #[cfg(test)]
    pub fn bytes(&self) -> u64 {
        self.state.lock().bytes
    }

    /// Spare containers ready now (tests).
    #[cfg(test)]
    fn spares_ready(&self) -> Vec<PathBuf> {
        self.spares.ready()
    }
}

/// The client's index (`index.redb`: cache entries, the CML, conflicts),
/// reopened after an I/O failure. redb refuses every write after one failed
/// commit ("Previous I/O error occurred") until the database is opened
/// again; a cache file system that filled up must cost only the calls that
/// needed space, and work again once space is free.
pub(crate) struct Index {
    path: PathBuf,
    /// `None` while being reopened (or after a reopen that failed: the
    /// next call tries again).
    db: RwLock<Option<Arc<Opened>>>,
    /// One thread opens the file again at a time; the others wait for it
    /// (`reopened`) with no lock held, bounded.
    reopening: Mutex<bool>,
    reopened: Condvar,
    /// The OS error of the index file's last failed call, noted by the file
    /// itself (`IndexFile`) before redb lets another transaction run: a
    /// transaction refused for an earlier failure ("an earlier write
    /// failed") reports it instead (ENOSPC stays ENOSPC). Without it a
    /// commit that failed on one of the client's own threads (the index
    /// thread, the reintegrator's turn) on a full disk made the caller's
    /// change fail with a generic error.
    last_error: Arc<LastError>,
    /// Cache saves and log records waiting for the next transaction
    /// (`Cache::ride`, `Cml::log_lazy`).
    riders: Mutex<Vec<Rider>>,
    /// Entries whose waiting saves a failed commit lost: saved again
    /// (listings whole) by the cache's next save.
    lost: Mutex<HashSet<Fid>>,
    /// Wakes the index thread when the first cache save of a round starts
    /// waiting (`RiderSignal`).
    signal: Arc<RiderSignal>,
}

/// What the client's index thread waits on: raised when a cache save
/// starts waiting in the index, closed when the index is dropped. The
/// thread holds this, never the index itself, whose redb file stays locked
/// while anyone holds it: a client dropped and opened again on the same
/// cache must not wait for the thread's next turn.
#[derive(Default)]
pub(crate) struct RiderSignal {
    /// (a save waits, the index is gone)
    state: Mutex<(bool, bool)>,
    cv: Condvar,
}

impl RiderSignal {
    fn raise(&self) {
        let mut s = self.state.lock();
        if !s.0 {
            s.0 = true;
            self.cv.notify_one();
        }
    }

    fn close(&self) {
        self.state.lock().1 = true;
        self.cv.notify_all();
    }

    /// Wait at most `wait` for a save to start waiting: `Some(true)` if one
    /// did (the signal is lowered again), `Some(false)` if none,
    /// `None` once the index is gone.
    pub(crate) fn wait(&self, wait: Duration) -> Option<bool> {
        let mut s = self.state.lock();
        if !s.0 && !s.1 {
            self.cv.wait_for(&mut s, wait);
        }
        if s.1 {
            return None;
        }
        Some(std::mem::take(&mut s.0))
    }
}

impl Drop for Index {
    fn drop(&mut self) {
        self.signal.close();
    }
}

// The same error type as redb's own `begin_write`/`begin_read`, so every
// caller's `?` goes on converting it as before.
#[allow(clippy::result_large_err)]
impl Index {
    pub fn open(path: &Path) -> std::result::Result<Index, redb::DatabaseError> {
        let last_error = Arc::new(LastError::default());
        let db = open_index(path, &last_error)?;
        Ok(Index {
            path: path.to_path_buf(),
            db: RwLock::new(Some(Arc::new(db))),
            reopening: Mutex::new(false),
            reopened: Condvar::new(),
            last_error,
            riders: Mutex::new(Vec::new()),
            lost: Mutex::new(HashSet::new()),
            signal: Arc::default(),
        })
    }

    /// What the index thread waits on (`RiderSignal`).
    pub(crate) fn rider_signal(&self) -> Arc<RiderSignal> {
        Arc::clone(&self.signal)
    }

    /// Add made saves to those waiting; returns how many wait.
    fn push_riders(&self, rows: Vec<Row>) -> usize {
        let mut r = self.riders.lock();
        if r.is_empty() {
            self.signal.raise();
        }
        r.extend(rows.into_iter().map(Rider::Cache));
        r.len()
    }

    /// A log record (`id`, encoded) to write with the next transaction
    /// that writes the riders, before the cache saves made after it.
    pub(crate) fn push_log_rider(&self, id: u64, bytes: Vec<u8>) {
        self.riders.lock().push(Rider::Log(id, bytes));
    }

    fn has_riders(&self) -> bool {
        !self.riders.lock().is_empty() || !self.lost.lock().is_empty()
    }

    fn take_riders(&self) -> Vec<Rider> {
        std::mem::take(&mut *self.riders.lock())
    }

    /// The entries whose saves were lost, their listings to be saved whole.
    fn take_lost(&self, st: &mut State) -> Vec<Fid> {
        let lost: Vec<Fid> = self.lost.lock().drain().collect();
        for f in &lost {
            if let Some(e) = st.map.get_mut(f) {
                e.journal = Journal::Whole;
            }
        }
        lost
    }

    /// Write the riders in `w`, a transaction of the log, but the log
    /// records in `removing` (which `w` removes); the caller passes what
    /// this returns to `riders_failed` if `w` does not commit.
    pub(crate) fn stage_riders(
        &self,
        w: &WriteTransaction,
        removing: &[u64],
    ) -> crate::Result<Vec<Rider>> {
        let riders = self.take_riders();
        if let Err(e) = write_riders(w, &riders, removing) {
            self.riders_failed(riders);
            return Err(e);
        }
        Ok(riders)
    }

    /// The error to report for a transaction of the index that failed with
    /// `e`: a refusal for an earlier failure (`PreviousIo`) as that
    /// failure's OS error when it is known (`last_error`). Nothing else:
    /// the opening that failed is opened again by the next `begin_write`,
    /// since the file noted the failure itself (`Opened::broken`); a flag
    /// set here would be set late, after that reopen, and force one more.
    pub(crate) fn report(&self, e: Error) -> Error {
        match self.last_error.get() {
            Some(code) if e.is_previous_io() => Error::io(
                crate::error::METADATA_IO,
                std::io::Error::from_raw_os_error(code),
            ),
            _ => e,
        }
    }

    /// What a caller hears when the index cannot be used (being opened
    /// again, or a reopen failed): the last failure's OS error if known.
    fn unavailable(&self) -> redb::TransactionError {
        redb::TransactionError::Storage(match self.last_error.get() {
            Some(code) => redb::StorageError::Io(std::io::Error::from_raw_os_error(code)),
            None => redb::StorageError::PreviousIo,
        })
    }

    /// The transaction that staged `riders` did not commit: the log
    /// records wait again, first (they are older than any rider made
    /// since); the cache entries are saved again by the cache's next save.
    pub(crate) fn riders_failed(&self, riders: Vec<Rider>) {
        let mut again = Vec::new();
        let mut lost = Vec::new();
        for r in riders {
            match r {
                Rider::Log(..) => again.push(r),
                Rider::Cache(row) => lost.push(row.fid),
            }
        }
        if !again.is_empty() {
            let mut q = self.riders.lock();
            let later = std::mem::take(&mut *q);
            *q = again;
            q.extend(later);
        }
        if !lost.is_empty() {
            self.lost.lock().extend(lost);
        }
    }

    #[cfg(test)]
    pub fn at(path: &Path) -> Index {
        Index::open(path).expect("open a test index")
    }

    /// Write `kv` to the `meta` table in one durable commit.
    pub fn put_meta(&self, kv: &[(String, u64)]) -> crate::Result<()> {
        let w = self.begin_write()?;
        {
            let mut meta = w.open_table(META)?;
            for (k, v) in kv {
                meta.insert(k.as_str(), *v)?;
            }
        }
        w.commit()?;
        Ok(())
    }

    fn current(&self) -> Option<Arc<Opened>> {
        self.db.read().clone()
    }

    /// A write transaction on the index, opened again first if the last
    /// opening failed. Checked again once redb's write lock is ours: a
    /// transaction that failed while we waited for it has been noted by
    /// then (`Opened::broken`), and this one would be refused.
    pub fn begin_write(&self) -> std::result::Result<WriteTransaction, redb::TransactionError> {
        for _ in 0..2 {
            let failed = match self.current() {
                Some(o) if o.broken() => Some(o),
                Some(o) => match o.db.begin_write() {
                    Ok(_) if o.broken() => Some(o),
                    Err(redb::TransactionError::Storage(redb::StorageError::PreviousIo)) => Some(o),
                    r => return r,
                },
                None => None,
            };
            self.reopen(failed)?;
        }
        Err(self.unavailable())
    }

    /// A read transaction on the index. It never opens the file again
    /// while an opening is in use: the caller may hold a write transaction
    /// on it (whose own failure is why it broke), which would keep the file
    /// locked; a read on a broken opening is refused, and the next
    /// `begin_write` opens the file again.
    pub fn begin_read(&self) -> std::result::Result<ReadTransaction, redb::TransactionError> {
        match self.current() {
            Some(o) => o.db.begin_read(),
            None => {
                self.reopen(None)?;
                self.current()
                    .ok_or_else(|| self.unavailable())?
                    .db
                    .begin_read()
            }
        }
    }

    /// Drop the failed database (`failed`, or none left) and open the file
    /// again; redb repairs it to its last committed state. One thread
    /// reopens; the others wait for it (at most `REOPEN_WAIT`) and use what
    /// it opened. No lock is held while the file is opened.
    fn reopen(
        &self,
        failed: Option<Arc<Opened>>,
    ) -> std::result::Result<(), redb::TransactionError> {
        // Held weakly from here: an opening's file stays locked while it is
        // held, and the thread that opens it again must not wait for us.
        let failed = failed.map(|f| Arc::downgrade(&f));
        let old = {
            let mut busy = self.reopening.lock();
            let deadline = Instant::now() + REOPEN_WAIT;
            while *busy {
                if self.reopened.wait_until(&mut busy, deadline).timed_out() {
                    return Err(self.unavailable());
                }
            }
            let mut cur = self.db.write();
            match (&*cur, &failed) {
                // Another thread reopened it since we failed.
                (Some(c), Some(f)) if !std::ptr::eq(Arc::as_ptr(c), f.as_ptr()) => return Ok(()),
                (Some(_), None) => return Ok(()),
                _ => {}
            }
            *busy = true;
            cur.take()
        };
        // Dropped with no lock held: redb's drop of a database may write.
        drop(old);
        let opened = open_index(&self.path, &self.last_error);
        let r = match opened {
            Ok(db) => {
                *self.db.write() = Some(Arc::new(db));
                Ok(())
            }
            Err(redb::DatabaseError::Storage(e)) => Err(redb::TransactionError::Storage(e)),
            Err(e) => Err(redb::TransactionError::Storage(redb::StorageError::Io(
                std::io::Error::other(format!("reopening the index: {e}")),
            ))),
        };
        *self.reopening.lock() = false;
        self.reopened.notify_all();
        r
    }
}

/// How long a caller waits for another thread's reopening of the index
/// (opening a file and, after a crash, redb's repair of it).
const REOPEN_WAIT: Duration = Duration::from_secs(10);

/// `fids` without repeats, in their first order.
fn dedup(fids: Vec<Fid>) -> Vec<Fid> {
    let mut seen = HashSet::new();
    fids.into_iter().filter(|f| seen.insert(*f)).collect()
}

/// The fid a container is named after (`Fid`'s display form).
fn parse_fid(name: &str) -> Option<Fid> {
    let mut it = name.split('.');
    let volume = u32::from_str_radix(it.next()?, 16).ok()?;
    let vnode = u64::from_str_radix(it.next()?, 16).ok()?;
    let unique = u32::from_str_radix(it.next()?, 16).ok()?;
    if it.next().is_some() {
        return None;
    }
    let f = Fid::new(volume, vnode, unique);
    (f.to_string() == name).then_some(f)
}

/// fsync a directory, so the names in it survive a power cut.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("syncing directory {}", dir.display()), e))
}

/// Open the cache index. A client of this process that was just dropped
/// may still be finishing on one of its own threads (the reintegrator or
/// the prober held it for a moment), so "already open" is retried briefly
/// before it means another client.
fn open_index(
    path: &std::path::Path,
    last_error: &Arc<LastError>,
) -> std::result::Result<Opened, redb::DatabaseError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match Opened::open(path, last_error) {
            Err(redb::DatabaseError::DatabaseAlreadyOpen)
                if std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{FileType, Timespec};
    use std::os::unix::fs::MetadataExt;

    fn attr(vnode: u64, size: u64, version: u64) -> Attr {
        Attr {
            fid: Fid::new(1, vnode, 1),
            ftype: FileType::File,
            mode: 0o644,
            nlink: 1,
            size,
            mtime: Timespec::default(),
            ctime: Timespec::default(),
            version,
            uid: 0,
            gid: 0,
            atime: Timespec::default(),
            rdev: 0,
        }
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("coda-cache-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    fn fill(c: &Cache, a: &Attr, open: bool) {
        let t = c.temp_container(a.fid);
        std::fs::write(&t, vec![7u8; a.size as usize]).unwrap();
        c.install(a, &t, open).unwrap();
    }

    #[test]
    fn least_recently_used_goes_first_and_open_files_stay() {
        let dir = tmpdir("lru");
        let db = Arc::new(Index::at(&dir.join("index.redb")));
        let c = Cache::open(&dir, db, 300).unwrap();
        let (a, b, d, e) = (
            attr(1, 100, 1),
            attr(2, 100, 1),
            attr(3, 100, 1),
            attr(4, 100, 1),
        );
        fill(&c, &a, true); // stays open throughout
        fill(&c, &b, false);
        fill(&c, &d, false);
        assert_eq!(c.bytes(), 300);
        fill(&c, &e, false);
        assert!(c.get(a.fid).unwrap().data_current(), "open: never evicted");
        assert!(
            !c.get(b.fid).unwrap().data_current(),
            "least recently used went first"
        );
        assert!(!c.container(b.fid).exists());
        assert!(c.get(d.fid).unwrap().data_current());
        assert_eq!(c.bytes(), 300);
        drop(c); // its spare thread stops first
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn containers_nothing_needs_are_removed_after_a_restart() {
        let dir = tmpdir("sweep");
        let (kept, failed, logged) = (attr(1, 10, 1), attr(2, 20, 1), attr(3, 30, 1));
        let orphan = Fid::new(1, 0x99, 1);
        {
            let db = Arc::new(Index::at(&dir.join("index.redb")));
            let c = Cache::open(&dir, db, 1000).unwrap();
            fill(&c, &kept, false);
            fill(&c, &failed, false);
            fill(&c, &logged, false);
            // A store that failed leaves its container untrusted.
            c.update(None, failed.fid, |e| e.data_version = None);
            c.update(None, logged.fid, |e| e.data_version = None);
            // A crash between writing a container and indexing it.
            std::fs::write(c.container(orphan), b"orphan").unwrap();
            std::fs::write(dir.join("containers").join("not-a-fid"), b"x").unwrap();
        }
        let db = Arc::new(Index::at(&dir.join("index.redb")));
        let c = Cache::open(&dir, db, 1000).unwrap();
        c.pin(logged.fid); // the log still has to store it
        c.sweep_unused_containers();
        assert!(c.container(kept.fid).exists());
        assert!(c.container(logged.fid).exists(), "pinned: kept");
        assert!(!c.container(failed.fid).exists(), "untrusted: removed");
        assert!(!c.container(orphan).exists(), "unindexed: removed");
        assert!(dir.join("containers").join("not-a-fid").exists());
        assert_eq!(c.bytes(), 10);
        drop(c); // its spare thread stops first
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_untrusted_container_is_evicted_like_any_other() {
        let dir = tmpdir("evict-untrusted");
        let db = Arc::new(Index::at(&dir.join("index.redb")));
        let c = Cache::open(&dir, db, 100).unwrap();
        let (a, b) = (attr(1, 60, 1), attr(2, 60, 1));
        fill(&c, &a, false);
        c.update(None, a.fid, |e| e.data_version = None);
        fill(&c, &b, false);
        assert!(!c.container(a.fid).exists());
        assert_eq!(c.bytes(), 60);
        drop(c); // its spare thread stops first
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn ent(name: &str, vnode: u64) -> DirEntry {
        DirEntry {
            name: name.into(),
            fid: Fid::new(1, vnode, 1),
            ftype: FileType::File,
        }
    }

    #[test]
    fn a_listing_read_before_an_own_change_does_not_replace_the_edited_one() {
        use crate::client::namespace::Edit;
        let dir = tmpdir("stale-listing");
        let d = |version| Attr {
            fid: Fid::new(1, 1, 1),
            ftype: FileType::Dir,
            ..attr(1, 0, version)
        };
        let db = Arc::new(Index::at(&dir.join("index.redb")));
        let c = Cache::open(&dir, db, 1000).unwrap();
        let old = || Arc::new(Listing::from_entries(vec![ent("a", 10)]));
        c.install_fetched_listing(&d(4), old());
        // This client's own create, applied as after_dir_change does.
        c.update(None, d(4).fid, |e| {
            e.edit_listing(e.attr.fid, &[(e.attr.fid, Edit::Put(ent("mine", 11)))]);
            e.attr.version += 1;
            e.set_listing_version(e.attr.version);
        });
        // A read the server answered before the create lands now.
        let got = c.install_fetched_listing(&d(4), old());
        assert!(
            got.get("mine").is_some(),
            "the answer is the edited listing"
        );
        let cached = c.get(d(4).fid).unwrap();
        assert_eq!(cached.attr.version, 5);
        assert!(cached.listing_current().unwrap().get("mine").is_some());
        // A newer one (another client's change too) replaces it.
        let newer = Arc::new(Listing::from_entries(vec![ent("a", 10), ent("b", 12)]));
        let got = c.install_fetched_listing(&d(6), newer);
        assert!(got.get("mine").is_none() && got.get("b").is_some());
        assert_eq!(c.get(d(4).fid).unwrap().attr.version, 6);
        // Its spare thread stops with it: removed after, the directory stays gone.
        drop(c);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_listing_is_saved_one_row_per_name_and_its_edits_survive_a_restart() {
        use crate::client::namespace::Edit;
        use redb::ReadableTableMetadata;
        let dir = tmpdir("entries");
        let d = Attr {
            fid: Fid::new(1, 1, 1),
            ftype: FileType::Dir,
            ..attr(1, 0, 4)
        };
        {
            let db = Arc::new(Index::at(&dir.join("index.redb")));
            let c = Cache::open(&dir, db, 1000).unwrap();
            let all: Vec<DirEntry> = (0..300).map(|i| ent(&format!("n{i}"), 100 + i)).collect();
            c.set_listing(&d, Arc::new(Listing::from_entries(all)));
            let edits = vec![
                (d.fid, Edit::Put(ent("new", 7))),
                (
                    d.fid,
                    Edit::Drop {
                        name: "n5".into(),
                        fid: Fid::new(1, 105, 1),
                    },
                ),
                // Names another object: left alone.
                (
                    d.fid,
                    Edit::Drop {
                        name: "n6".into(),
                        fid: Fid::new(1, 999, 1),
                    },
                ),
            ];
            c.update(None, d.fid, |e| e.edit_listing(d.fid, &edits));
            // The directory's own row does not hold its entries: a create
            // rewrites one row of `entries`, not the listing.
            let r = c.db.begin_read().unwrap();
            let row = r
                .open_table(OBJECTS)
                .unwrap()
                .get(&d.fid.to_bytes()[..])
                .unwrap()
                .unwrap()
                .value()
                .len();
            // (The attributes alone are ~120 bytes; 300 entries would be
            // several KiB.)
            assert!(row < 256, "the directory's row is {row} bytes");
            assert_eq!(r.open_table(ENTRIES).unwrap().len().unwrap(), 300);
        }
        let db = Arc::new(Index::at(&dir.join("index.redb")));
        let c = Cache::open(&dir, db, 1000).unwrap();
        let e = c.get(d.fid).unwrap();
        let l = e.listing_current().unwrap();
        assert_eq!(l.iter().count(), 300);
        assert_eq!(l.get("new").unwrap().fid, Fid::new(1, 7, 1));
        assert!(l.get("n5").is_none());
        assert_eq!(l.get("n6").unwrap().fid, Fid::new(1, 106, 1));
        // Dropped whole: no row is left behind.
        c.update(None, d.fid, |e| e.clear_listing());
        let r = c.db.begin_read().unwrap();
        assert_eq!(r.open_table(ENTRIES).unwrap().len().unwrap(), 0);
        drop(r);
        // The cache (and its spare thread) first, or it can recreate the
        // directory after its removal.
        drop(c);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn deferred_saves_are_one_transaction_and_survive_a_restart() {
        let dir = tmpdir("deferred");
        let other_dir = tmpdir("deferred-other");
        let a = attr(9, 0, 3);
        let d = Attr {
            fid: Fid::new(1, 1, 1),
            ftype: FileType::Dir,
            ..attr(1, 0, 1)
        };
        {
            let db = Arc::new(Index::at(&dir.join("index.redb")));
            let c = Cache::open(&dir, db, 1000).unwrap();
            let other = Cache::open(
                &other_dir,
                Arc::new(Index::at(&other_dir.join("index.redb"))),
                1000,
            )
            .unwrap();
            c.set_listing(&d, Arc::new(Listing::from_entries(vec![])));
            let before = c.commits.load(Ordering::Relaxed);
            c.deferred(|| {
                // A create: the new (empty, opened) file and the parent's edit.
                c.install_empty(&a, false).unwrap();
                let edits = [(d.fid, Edit::Put(ent("new", 9)))];
                c.update(None, d.fid, |e| e.edit_listing(d.fid, &edits));
                // Another cache's saves on this thread are not held back.
                other.set_attr(&attr(5, 0, 1));
                assert_eq!(other.commits.load(Ordering::Relaxed), 1);
                assert_eq!(c.commits.load(Ordering::Relaxed), before);
            });
            assert_eq!(c.commits.load(Ordering::Relaxed), before + 1);
            // In memory only: not a transaction.
            c.change(None, a.fid, |e| e.dirty = true);
            assert_eq!(c.commits.load(Ordering::Relaxed), before + 1);
            c.closed(a.fid);
        }
        let db = Arc::new(Index::at(&dir.join("index.redb")));
        let c = Cache::open(&dir, db, 1000).unwrap();
        let e = c.get(a.fid).unwrap();
        assert_eq!((e.data_version, e.data_bytes), (Some(3), 0));
        let l = c.get(d.fid).unwrap();
        assert_eq!(l.listing_current().unwrap().get("new").unwrap().fid, a.fid);
        drop(c);
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&other_dir);
    }

    /// Riding mode: unsynced saves commit nothing of their own; the next
    /// transaction that stages them (the log's) writes them, in the order
    /// they were made; past `RIDERS_MAX` the cache commits them itself;
    /// saves a failed transaction lost are saved again (listings whole).
    #[test]
    fn riding_saves_wait_for_a_transaction_and_are_written_in_order() {
        let dir = tmpdir("riding");
        let a = attr(9, 0, 3);
        let d = Attr {
            fid: Fid::new(1, 1, 1),
            ftype: FileType::Dir,
            ..attr(1, 0, 1)
        };
        {
            let db = Arc::new(Index::at(&dir.join("index.redb")));
            let c = Cache::open_with_spares(&dir, db.clone(), 1000, 0).unwrap();
            c.set_riding(true);
            let before = c.commits.load(Ordering::Relaxed);
            c.set_listing(&d, Arc::new(Listing::from_entries(vec![])));
            c.install_empty(&a, false).unwrap();
            for edit in [
                Edit::Put(ent("new", 9)),
                Edit::Drop {
                    name: "new".into(),
                    fid: a.fid,
                },
                Edit::Put(ent("again", 9)),
            ] {
                let edits = [(d.fid, edit)];
                c.update(None, d.fid, |e| e.edit_listing(d.fid, &edits));
            }
            assert_eq!(c.commits.load(Ordering::Relaxed), before);
            assert!(db.has_riders());
            // A transaction of the log takes them along.
            let w = db.begin_write().unwrap();
            w.open_table(META).unwrap().insert("x", 1).unwrap();
            let staged = db.stage_riders(&w, &[]).unwrap();
            assert_eq!(staged.len(), 5);
            w.commit().unwrap();
            assert!(!db.has_riders());
            // Lost with a transaction that failed: saved again, whole.
            c.update(None, d.fid, |e| {
                e.edit_listing(d.fid, &[(d.fid, Edit::Put(ent("third", 10)))])
            });
            let w = db.begin_write().unwrap();
            let staged = db.stage_riders(&w, &[]).unwrap();
            drop(w);
            db.riders_failed(staged);
            c.flush_riders();
            assert_eq!(c.commits.load(Ordering::Relaxed), before + 1);
            // Too many waiting: the cache commits them itself.
            for v in 0..RIDERS_MAX as u64 {
                c.set_attr(&attr(100 + v, 0, 1));
            }
            assert_eq!(c.commits.load(Ordering::Relaxed), before + 2);
            assert!(!db.has_riders());
            // Not riding: a save commits at once, as always.
            c.set_riding(false);
            c.set_attr(&attr(50, 0, 1));
            assert_eq!(c.commits.load(Ordering::Relaxed), before + 3);
            c.set_riding(true);
            c.set_attr(&attr(51, 0, 1));
            // Dropped without a durable commit: what waited is lost, as an
            // unsynced commit would be.
        }
        let db = Arc::new(Index::at(&dir.join("index.redb")));
        let c = Cache::open_with_spares(&dir, db, 1000, 0).unwrap();
        let e = c.get(a.fid).unwrap();
        assert_eq!((e.data_version, e.data_bytes), (Some(3), 0));
        let l = c.get(d.fid).unwrap();
        let l = l.listing_current().unwrap();
        assert!(l.get("new").is_none());
        assert_eq!(l.get("again").unwrap().fid, a.fid);
        assert_eq!(l.get("third").unwrap().fid.vnode, 10);
        assert!(c.get(attr(100 + RIDERS_MAX as u64 - 1, 0, 1).fid).is_some());
        assert!(c.get(attr(50, 0, 1).fid).is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A transaction refused for an earlier failure reports the OS error
    /// the index file noted (a full disk stays ENOSPC), also after the file
    /// is opened again; the file is opened again after a call on it failed.
    #[test]
    fn a_refusal_reports_its_cause_and_a_failed_file_is_opened_again() {
        let dir = tmpdir("failed");
        let db = Index::at(&dir.join("index.redb"));
        let earlier = || Error::from(redb::Error::PreviousIo);
        assert!(
            db.report(earlier()).is_previous_io(),
            "no cause known: as it was"
        );
        assert!(matches!(
            db.unavailable(),
            redb::TransactionError::Storage(redb::StorageError::PreviousIo)
        ));
        // What `IndexFile` notes when a write finds the disk full.
        db.last_error.note_for_test(libc::ENOSPC);
        assert_eq!(db.report(earlier()).code(), -libc::ENOSPC, "the cause");
        assert_eq!(
            Error::from(db.unavailable()).code(),
            -libc::ENOSPC,
            "unavailable: the cause"
        );
        let other = Error::Invalid("not an I/O error".into());
        assert!(matches!(db.report(other), Error::Invalid(_)), "as it was");
        // Reporting a failure does not open the file again; a call on the
        // file that failed (noted by the file itself) does, at the next
        // write transaction, and the cause stays known (a transaction
        // begun before may be refused after). (Held weakly: an opening's
        // file stays locked while it is held.)
        let before = Arc::downgrade(&db.current().unwrap());
        drop(db.begin_write().unwrap());
        assert!(before.upgrade().is_some(), "not opened again");
        before.upgrade().unwrap().break_for_test();
        drop(db.begin_write().unwrap());
        assert_eq!(db.report(earlier()).code(), -libc::ENOSPC, "still known");
        assert!(before.upgrade().is_none(), "write: opened again");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A caller that finds the file being opened again by another thread
    /// waits for that reopen (no lock held) and uses what it opened,
    /// instead of failing or opening it a second time.
    #[test]
    fn a_caller_waits_for_another_threads_reopen_and_uses_it() {
        let dir = tmpdir("reopen-wait");
        let db = Arc::new(Index::at(&dir.join("index.redb")));
        db.current().unwrap().break_for_test();
        // Another thread's reopen, begun: the failed opening taken out.
        *db.reopening.lock() = true;
        let old = db.db.write().take();
        let started = Instant::now();
        let caller = {
            let db = Arc::clone(&db);
            std::thread::spawn(move || {
                db.begin_write().map(drop).map_err(|e| e.to_string())?;
                Ok::<_, String>(started.elapsed())
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        // ... and finished: the new opening in place, the waiters woken.
        drop(old);
        let fresh = Arc::new(open_index(&db.path, &db.last_error).unwrap());
        *db.db.write() = Some(Arc::clone(&fresh));
        *db.reopening.lock() = false;
        db.reopened.notify_all();
        let waited = caller
            .join()
            .unwrap()
            .expect("begin_write after the reopen");
        assert!(
            waited >= Duration::from_millis(100),
            "it waited: {waited:?}"
        );
        assert!(
            Arc::ptr_eq(&db.current().unwrap(), &fresh),
            "not opened twice"
        );
        drop((fresh, db));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// With the index thread (`background_saves`) every unsynced save
    /// rides, even with riding mode off: the caller commits nothing, the
    /// thread is woken (`RiderSignal`), and its round commits them all in
    /// one transaction; a log transaction before that round writes them
    /// first; the index dropped, the thread's wait ends.
    #[test]
    fn background_saves_ride_and_the_threads_round_commits_them() {
        let dir = tmpdir("background");
        let (a, b, x) = (attr(21, 0, 1), attr(22, 0, 2), attr(23, 0, 3));
        {
            let db = Arc::new(Index::at(&dir.join("index.redb")));
            let c = Cache::open_with_spares(&dir, db.clone(), 1000, 0).unwrap();
            c.background_saves();
            let before = c.commits.load(Ordering::Relaxed);
            let signal = db.rider_signal();
            assert_eq!(
                signal.wait(Duration::from_millis(1)),
                Some(false),
                "nothing yet"
            );
            // The thread's wait ends when the first save starts waiting.
            let waiter = {
                let signal = signal.clone();
                std::thread::spawn(move || signal.wait(Duration::from_secs(30)))
            };
            std::thread::sleep(Duration::from_millis(20));
            c.set_attr(&a);
            assert_eq!(waiter.join().unwrap(), Some(true), "woken by the save");
            c.set_attr(&b);
            assert_eq!(
                c.commits.load(Ordering::Relaxed),
                before,
                "the callers commit nothing"
            );
            c.flush_riders();
            assert_eq!(
                c.commits.load(Ordering::Relaxed),
                before + 1,
                "one for both"
            );
            assert_eq!(signal.wait(Duration::ZERO), Some(false), "lowered");
            // A log transaction before the thread's round writes them.
            c.set_attr(&attr(24, 0, 4));
            let w = db.begin_write().unwrap();
            w.open_table(META).unwrap().insert("x", 1).unwrap();
            let staged = db.stage_riders(&w, &[]).unwrap();
            assert_eq!(staged.len(), 1);
            w.commit().unwrap();
            c.set_attr(&x);
            assert_eq!(c.commits.load(Ordering::Relaxed), before + 1);
            c.flush_riders();
            assert_eq!(c.commits.load(Ordering::Relaxed), before + 2);
            c.flush_lru();
            // The index gone, the thread's wait ends at once.
            drop(c);
            drop(db);
            assert_eq!(signal.wait(Duration::from_secs(30)), None, "closed");
        }
        let db = Arc::new(Index::at(&dir.join("index.redb")));
        let c = Cache::open_with_spares(&dir, db, 1000, 0).unwrap();
        assert_eq!(c.get(a.fid).unwrap().attr.version, 1);
        assert_eq!(c.get(b.fid).unwrap().attr.version, 2);
        assert_eq!(c.get(attr(24, 0, 4).fid).unwrap().attr.version, 4);
        assert_eq!(c.get(x.fid).unwrap().attr.version, 3);
        drop(c);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Saves made while another thread commits are handed to it: they
    /// return at once, and its next round commits them all in one
    /// transaction; a durable commit takes along those still waiting.
    #[test]
    fn unsynced_saves_during_a_commit_go_in_the_committers_next_round() {
        let dir = tmpdir("handoff");
        let (a, b, x) = (attr(11, 0, 1), attr(12, 0, 2), attr(13, 0, 3));
        {
            let db = Arc::new(Index::at(&dir.join("index.redb")));
            let c = Cache::open(&dir, db, 1000).unwrap();
            let before = c.commits.load(Ordering::Relaxed);
            // Another thread is committing.
            c.handoff.lock().busy = true;
            c.set_attr(&a);
            c.set_attr(&b);
            assert_eq!(c.commits.load(Ordering::Relaxed), before, "handed off");
            assert_eq!(c.handoff.lock().fids, vec![a.fid, b.fid]);
            // Its next round: one transaction for both, and it is done.
            c.handoff.lock().busy = false;
            c.set_attr(&x);
            assert_eq!(c.commits.load(Ordering::Relaxed), before + 1);
            let h = c.handoff.lock();
            assert!(h.fids.is_empty() && !h.busy);
            drop(h);
            // Waiting when a durable commit comes: it takes them along.
            c.handoff.lock().busy = true;
            c.set_attr(&Attr {
                size: 7,
                ..a.clone()
            });
            c.flush_lru();
            assert!(c.handoff.lock().fids.is_empty());
            assert_eq!(c.commits.load(Ordering::Relaxed), before + 2);
        }
        let db = Arc::new(Index::at(&dir.join("index.redb")));
        let c = Cache::open(&dir, db, 1000).unwrap();
        assert_eq!(c.get(a.fid).unwrap().attr.size, 7);
        assert_eq!(c.get(b.fid).unwrap().attr.version, 2);
        assert_eq!(c.get(x.fid).unwrap().attr.version, 3);
        drop(c);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_index_survives_a_restart() {
        let dir = tmpdir("restart");
        let a = attr(9, 5, 3);
        {
            let db = Arc::new(Index::at(&dir.join("index.redb")));
            let c = Cache::open(&dir, db, 1000).unwrap();
            fill(&c, &a, false);
            let d = Attr {
                fid: Fid::new(1, 1, 1),
                ftype: FileType::Dir,
                ..a.clone()
            };
            c.set_listing(
                &d,
                Arc::new(Listing::from_entries(vec![DirEntry {
                    name: "x".into(),
                    fid: a.fid,
                    ftype: FileType::File,
                }])),
            );
            std::fs::write(c.container(a.fid).with_extension("tmp1"), b"junk").unwrap();
        }
        let db = Arc::new(Index::at(&dir.join("index.redb")));
        let c = Cache::open(&dir, db, 1000).unwrap();
        let e = c.get(a.fid).unwrap();
        assert_eq!(e.data_version, Some(3));
        assert_eq!(e.attr, a);
        let d = c.get(Fid::new(1, 1, 1)).unwrap();
        assert_eq!(d.listing_current().unwrap().get("x").unwrap().fid, a.fid);
        assert_eq!(c.bytes(), 5);
        drop(c); // its spare thread stops first
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn inode(p: &Path) -> u64 {
        std::fs::metadata(p).unwrap().ino()
    }

    /// Wait (bounded) until the pool's thread has made `n` spares.
    fn wait_for_spares(c: &Cache, n: usize) -> Vec<PathBuf> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = c.spares_ready();
            if s.len() >= n {
                return s;
            }
            assert!(Instant::now() < deadline, "only {} spares made", s.len());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_new_file_takes_a_spare_and_the_pool_is_refilled() {
        let dir = tmpdir("spare-take");
        let db = Arc::new(Index::at(&dir.join("index.redb")));
        let c = Cache::open_with_spares(&dir, db, 1000, 8).unwrap();
        let ready = wait_for_spares(&c, 8);
        let top = ready.last().unwrap().clone();
        let ino = inode(&top);
        let a = attr(3, 0, 1);
        c.install_empty(&a, true).unwrap();
        // The container is the spare taken, renamed into place.
        assert_eq!(inode(&c.container(a.fid)), ino);
        assert!(!top.exists(), "the spare's name is gone");
        let m = std::fs::metadata(c.container(a.fid)).unwrap();
        // (Made unnamed, then linked in: one link, like a plain create.)
        assert_eq!((m.len(), m.mode() & 0o777, m.nlink()), (0, 0o600, 1));
        let e = c.get(a.fid).unwrap();
        assert_eq!((e.data_version, e.dirty, e.open), (Some(1), true, 1));
        assert_eq!(c.bytes(), 0);
        // Below the low-water mark the thread makes more.
        for v in 10..20 {
            c.install_empty(&attr(v, 0, 1), false).unwrap();
        }
        wait_for_spares(&c, 8);
        drop(c);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn with_the_pool_empty_or_failing_a_new_file_makes_its_own_container() {
        let dir = tmpdir("spare-none");
        {
            let db = Arc::new(Index::at(&dir.join("index.redb")));
            let c = Cache::open_with_spares(&dir, db, 1000, 0).unwrap();
            assert!(c.spares_ready().is_empty());
            let a = attr(4, 0, 1);
            c.install_empty(&a, false).unwrap();
            assert_eq!(std::fs::metadata(c.container(a.fid)).unwrap().len(), 0);
            assert_eq!(c.get(a.fid).unwrap().data_version, Some(1));
        }
        // The pool's directory unusable (as on a full disk): its thread
        // fails and backs off; callers do not notice, and dropping the
        // cache stops the thread during its back-off.
        std::fs::remove_dir_all(dir.join("spares")).unwrap();
        std::fs::write(dir.join("spares"), b"not a directory").unwrap();
        let db = Arc::new(Index::at(&dir.join("index.redb")));
        let c = Cache::open_with_spares(&dir, db, 1000, 8).unwrap();
        for v in 5..10 {
            let a = attr(v, 0, 1);
            c.install_empty(&a, false).unwrap();
            assert!(c.container(a.fid).exists());
        }
        assert!(c.spares_ready().is_empty());
        drop(c);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn spares_left_at_a_restart_are_reused_never_taken_for_containers() {
        let dir = tmpdir("spare-restart");
        let left = {
            let db = Arc::new(Index::at(&dir.join("index.redb")));
            let c = Cache::open_with_spares(&dir, db, 1000, 8).unwrap();
            fill(&c, &attr(1, 5, 1), false);
            wait_for_spares(&c, 8)
        };
        // What a crash may leave besides: a spare with data, a second name.
        let spares = dir.join("spares");
        std::fs::write(spares.join("spare.00000000000000aa"), b"data").unwrap();
        std::fs::hard_link(&left[0], spares.join("spare.00000000000000bb")).unwrap();
        std::fs::write(spares.join("other"), b"").unwrap();
        let db = Arc::new(Index::at(&dir.join("index.redb")));
        let c = Cache::open_with_spares(&dir, db, 1000, 0).unwrap();
        c.sweep_unused_containers();
        let mut kept: Vec<PathBuf> = c.spares_ready();
        kept.sort();
        let mut want: Vec<PathBuf> = left[1..].to_vec();
        want.sort();
        assert_eq!(kept, want, "empty single-link spares are reused");
        let mut on_disk: Vec<PathBuf> = std::fs::read_dir(&spares)
            .unwrap()
            .map(|d| d.unwrap().path())
            .collect();
        on_disk.sort();
        // Both names of left[0] were judged while it had two: both removed.
        assert_eq!(on_disk, want, "anything else is removed");
        // None of them is a container, indexed, or counted.
        assert_eq!(c.known_fids(), vec![Fid::new(1, 1, 1)]);
        assert_eq!(c.bytes(), 5);
        assert_eq!(container_names(&dir), vec![Fid::new(1, 1, 1).to_string()]);
        let a = attr(2, 0, 1);
        // The pool's next spare (`take` pops the last).
        let ino = inode(c.spares_ready().last().unwrap());
        c.install_empty(&a, false).unwrap();
        assert_eq!(inode(&c.container(a.fid)), ino);
        drop(c);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Wait (bounded) until the pool's thread has made the named
    /// containers `want`.
    fn wait_for_named(c: &Cache, want: &[Fid]) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let named = c.spares.named();
            if want.iter().all(|f| named.contains(f)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "named containers made: {named:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn container_names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir.join("containers"))
            .unwrap()
            .map(|d| d.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn the_next_new_files_find_their_containers_made_at_their_names() {
        let dir = tmpdir("named");
        let db = Arc::new(Index::at(&dir.join("index.redb")));
        let c = Cache::open_with_spares(&dir, db, 1000, 8).unwrap();
        // The range hands out vnode 100 next, up to 140.
        c.expect_creates(1, 100, 140);
        let ahead: Vec<Fid> = (100..132).map(|v| Fid::new(1, v, 1)).collect();
        wait_for_named(&c, &ahead);
        // Made ahead: empty, private, one link, not indexed or counted.
        let m = std::fs::metadata(c.container(Fid::new(1, 100, 1))).unwrap();
        assert_eq!((m.len(), m.mode() & 0o777, m.nlink()), (0, 0o600, 1));
        assert!(c.get(Fid::new(1, 100, 1)).is_none());
        let ino = inode(&c.container(Fid::new(1, 100, 1)));
        let a = attr(100, 0, 1);
        c.install_new(&a).unwrap();
        // The container is the one made ahead, now an indexed, open entry.
        assert_eq!(inode(&c.container(a.fid)), ino);
        let e = c.get(a.fid).unwrap();
        assert_eq!((e.data_version, e.dirty, e.open), (Some(1), false, 1));
        assert!(!c.spares.named().contains(&a.fid));
        // Never past the range's end.
        c.expect_creates(1, 130, 140);
        let rest: Vec<Fid> = (132..140).map(|v| Fid::new(1, v, 1)).collect();
        wait_for_named(&c, &rest);
        assert!(!c.container(Fid::new(1, 140, 1)).exists());
        // A fid not made ahead (another volume) takes a spare as before.
        let b = Attr {
            fid: Fid::new(2, 7, 1),
            ..attr(7, 0, 1)
        };
        c.install_new(&b).unwrap();
        assert_eq!(std::fs::metadata(c.container(b.fid)).unwrap().len(), 0);
        drop(c);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn named_containers_no_file_takes_are_removed_by_the_thread_or_the_next_start() {
        let dir = tmpdir("named-forget");
        {
            let db = Arc::new(Index::at(&dir.join("index.redb")));
            let c = Cache::open_with_spares(&dir, db, 1000, 8).unwrap();
            c.expect_creates(1, 10, 1024);
            let first: Vec<Fid> = (10..42).map(|v| Fid::new(1, v, 1)).collect();
            wait_for_named(&c, &first);
            // Vnodes 10..20 went to directories: the thread removes theirs.
            for f in &first[..10] {
                c.not_a_file(*f);
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            while first[..10].iter().any(|f| c.container(*f).exists()) {
                assert!(Instant::now() < deadline, "forgotten named containers stay");
                std::thread::sleep(Duration::from_millis(5));
            }
            assert_eq!(c.spares.named(), first[10..].to_vec());
            // A fid never made ahead (or already taken): nothing to remove.
            c.not_a_file(Fid::new(1, 900, 1));
            assert_eq!(c.spares.named(), first[10..].to_vec());
        }
        // What a stop leaves is swept at the next start: not in the index.
        assert_eq!(container_names(&dir).len(), 22);
        let db = Arc::new(Index::at(&dir.join("index.redb")));
        let c = Cache::open_with_spares(&dir, db, 1000, 0).unwrap();
        c.sweep_unused_containers();
        assert!(container_names(&dir).is_empty());
        drop(c);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_create_that_misses_its_named_container_makes_its_own_and_keeps_it() {
        // The thread off: nothing is made ahead, so every new file takes
        // the spare path; a name present already is replaced by it, never
        // the other way round.
        let dir = tmpdir("named-miss");
        let db = Arc::new(Index::at(&dir.join("index.redb")));
        let c = Cache::open_with_spares(&dir, db, 1000, 0).unwrap();
        c.expect_creates(1, 5, 100);
        assert!(c.spares.named().is_empty());
        let a = attr(5, 0, 1);
        std::fs::write(c.container(a.fid), b"left by a crash").unwrap();
        c.install_new(&a).unwrap();
        assert_eq!(std::fs::metadata(c.container(a.fid)).unwrap().len(), 0);
        assert_eq!(c.get(a.fid).unwrap().data_version, Some(1));
        drop(c);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
