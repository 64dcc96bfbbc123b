//! Hoarding: a profile of paths the user wants available while
//! disconnected, with priorities, and a walk that prefetches them (on
//! demand, and every `hoard_walk_ms` while connected).
//!
//! Profile format (one entry per line, `#` starts a comment), after Coda's
//! hoard files:
//!
//! ```text
//! /projects/paper      100:d+    # the directory and all its descendants
//! /home/me/.profile    50        # one file
//! /usr/share/dict      10:c      # the directory and its children
//! ```
//!
//! Priority is 1..=1000 (higher is kept longer). `c` covers the children of
//! a directory, `d` all its descendants; a trailing `+` (`c+`, `d+`) is
//! accepted for Coda compatibility: every walk expands the entry afresh, so
//! children made later are always covered. The walk records each reached
//! object's priority in the cache, whose eviction takes unhoarded objects
//! first (least recently used first), then hoarded ones from the lowest
//! priority up; open, dirty and logged ones never.

use std::collections::HashMap;

use redb::{ReadableTable, TableDefinition};

use std::sync::Arc;

use super::cache::{Cache, Index};
use super::callback::Callbacks;
use super::stats::Counters;

use crate::proto::{Attr, Fid, FileType};
use crate::{Error, Result};

/// path → priority (u32) and expansion (u8) packed as `priority << 8 | exp`.
pub(crate) const HOARD: TableDefinition<&str, u64> = TableDefinition::new("hoard");

pub const MAX_PRIORITY: u32 = 1000;

/// How far a hoard entry reaches below a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expand {
    /// The object itself.
    Itself,
    /// A directory and its entries.
    Children,
    /// A directory and everything below it.
    Descendants,
}

/// One line of the hoard profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoardEntry {
    /// The hoarded path, as the other `Client` calls take one; it need not
    /// exist yet (a walk counts it as missing).
    pub path: String,
    /// 1..=1000: higher is walked first and evicted last.
    pub priority: u32,
    /// How far below `path` the entry reaches.
    pub expand: Expand,
}

/// What a hoard walk did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HoardReport {
    /// Objects the profile covers (files, directories, symlinks).
    pub objects: u64,
    /// Files fetched because they were not cached (or not current).
    pub fetched: u64,
    /// Bytes those fetches brought into the cache.
    pub fetched_bytes: u64,
    /// Files left out because the cache could not hold them as well.
    pub skipped: u64,
    /// Profile paths that do not resolve (yet).
    pub missing: u64,
}

impl HoardEntry {
    /// Parse one profile line (`PATH PRIORITY[:c|:c+|:d|:d+]`).
    pub fn parse(line: &str) -> Result<HoardEntry> {
        let bad = |why: &str| Error::Invalid(format!("hoard entry {line:?}: {why}"));
        let mut it = line.split_whitespace();
        let path = it.next().ok_or_else(|| bad("empty"))?;
        let spec = it.next().ok_or_else(|| bad("no priority"))?;
        if it.next().is_some() {
            return Err(bad("expected PATH PRIORITY[:c|:d]"));
        }
        super::namei::split_path(path)?;
        let (pri, exp) = spec.split_once(':').unwrap_or((spec, ""));
        let priority: u32 = pri
            .parse()
            .ok()
            .filter(|p| (1..=MAX_PRIORITY).contains(p))
            .ok_or_else(|| bad("priority must be 1..=1000"))?;
        let expand = match exp {
            "" => Expand::Itself,
            "c" | "c+" => Expand::Children,
            "d" | "d+" => Expand::Descendants,
            _ => return Err(bad("expansion must be c, c+, d or d+")),
        };
        Ok(HoardEntry {
            path: path.to_string(),
            priority,
            expand,
        })
    }

    pub(crate) fn pack(&self) -> u64 {
        let e = match self.expand {
            Expand::Itself => 0,
            Expand::Children => 1,
            Expand::Descendants => 2,
        };
        (self.priority as u64) << 8 | e
    }

    fn unpack(path: &str, v: u64) -> HoardEntry {
        HoardEntry {
            path: path.to_string(),
            priority: (v >> 8) as u32,
            expand: match v & 0xff {
                1 => Expand::Children,
                2 => Expand::Descendants,
                _ => Expand::Itself,
            },
        }
    }
}

/// Parse a whole profile (comments and blank lines skipped).
pub fn parse_profile(text: &str) -> Result<Vec<HoardEntry>> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(HoardEntry::parse)
        .collect()
}

/// What a hoard walk needs of the client besides the cache and counters:
/// to name, list, read and fetch objects (from the server when not cached).
pub(crate) trait Source {
    fn resolve(&self, path: &str) -> Result<(Fid, FileType)>;
    fn listing(&self, dir: Fid) -> Result<Arc<super::namespace::Listing>>;
    fn readlink_fid(&self, fid: Fid) -> Result<String>;
    fn getattr(&self, fid: Fid) -> Result<Attr>;
    /// Make `fid`'s data current in the cache (it stays closed).
    fn fetch(&self, fid: Fid) -> Result<()>;
}

/// The profile as stored in the index.
pub(crate) fn entries(db: &Index) -> Result<Vec<HoardEntry>> {
    let r = db.begin_read()?;
    let t = match r.open_table(HOARD) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(vec![]),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for row in t.iter()? {
        let (k, v) = row?;
        out.push(HoardEntry::unpack(k.value(), v.value()));
    }
    Ok(out)
}

/// Walk the profile, highest priority first: resolve, list directories
/// as far as each entry reaches, fetch files not cached, and give every
/// object reached its priority (the highest entry covering it).
pub(crate) fn walk(
    db: &Index,
    cache: &Cache,
    callbacks: &Callbacks,
    counters: &Counters,
    src: &impl Source,
) -> Result<HoardReport> {
    let mut entries = entries(db)?;
    entries.sort_by_key(|e| std::cmp::Reverse(e.priority));
    let mut report = HoardReport::default();
    let mut prio: HashMap<Fid, u32> = HashMap::new();
    let mut hoarded_bytes = 0u64;
    let limit = cache.limit();
    for e in &entries {
        let (fid, t) = match src.resolve(&e.path) {
            Ok(x) => x,
            Err(Error::NotFound(_)) | Err(Error::NotDir(_)) => {
                report.missing += 1;
                continue;
            }
            Err(err) => return Err(err),
        };
        // (fid, type, depth left: None = unbounded)
        let depth = match e.expand {
            Expand::Itself => Some(0),
            Expand::Children => Some(1),
            Expand::Descendants => None,
        };
        let mut stack = vec![(fid, t, depth)];
        while let Some((fid, t, depth)) = stack.pop() {
            if prio.contains_key(&fid) {
                continue; // reached by a higher (or equal) entry already
            }
            prio.insert(fid, e.priority);
            report.objects += 1;
            match t {
                FileType::Dir => {
                    let list = src.listing(fid)?;
                    if depth == Some(0) {
                        continue;
                    }
                    for child in list.iter() {
                        stack.push((child.fid, child.ftype, depth.map(|d| d - 1)));
                    }
                }
                FileType::Symlink => {
                    src.readlink_fid(fid)?;
                }
                // Special files are their status, already cached.
                FileType::Fifo | FileType::Socket | FileType::CharDev | FileType::BlockDev => {}
                FileType::File => {
                    let cached = cache.get(fid).filter(|c| c.data_current());
                    let size = match &cached {
                        Some(c) => c.data_bytes,
                        None => src.getattr(fid)?.size,
                    };
                    if hoarded_bytes + size > limit {
                        // What does not fit stays out, lowest priorities
                        // first (they come last).
                        report.skipped += 1;
                        prio.remove(&fid);
                        continue;
                    }
                    hoarded_bytes += size;
                    if cached.is_none() || !callbacks.holds(fid) {
                        let before = counters.snapshot().fetches;
                        src.fetch(fid)?;
                        if counters.snapshot().fetches > before {
                            report.fetched += 1;
                            report.fetched_bytes += size;
                        }
                    }
                }
            }
        }
        // Priorities take effect as the walk goes, so its own fetches
        // evict unhoarded objects rather than what it just hoarded.
        cache.set_priorities(prio.clone());
    }
    cache.set_priorities(prio);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_lines_parse_like_codas() {
        let p = parse_profile("# mine\n/a 100:d+\n/b/c 5   # one file\n\n/d 10:c\n").unwrap();
        assert_eq!(
            p,
            vec![
                HoardEntry {
                    path: "/a".into(),
                    priority: 100,
                    expand: Expand::Descendants
                },
                HoardEntry {
                    path: "/b/c".into(),
                    priority: 5,
                    expand: Expand::Itself
                },
                HoardEntry {
                    path: "/d".into(),
                    priority: 10,
                    expand: Expand::Children
                },
            ]
        );
        for bad in ["/a", "/a 0", "/a 1001", "/a 5:x", "a 5", "/a 5 6"] {
            assert!(HoardEntry::parse(bad).is_err(), "{bad}");
        }
        let e = HoardEntry::parse("/x 700:c").unwrap();
        assert_eq!(HoardEntry::unpack("/x", e.pack()), e);
    }
}
