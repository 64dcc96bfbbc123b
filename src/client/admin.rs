//! Operator calls (what Coda's `cfs` does): flush cached objects, list the
//! cache, take the client off the servers on purpose and back, probe the
//! server. Used by `coda-mount`'s control socket and the `coda` CLI.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use super::api::Client;
use crate::proto::FileType;
use crate::proto::{Fid, Msg};
use crate::{Error, Result};

/// Why remote operations stop after an operator's `disconnect` (a message
/// only: the mode, not this text, says the client is held).
const OPERATOR_DISCONNECT: &str = "disconnected by the operator (coda disconnect)";

/// One object in the cache, as `coda listcache` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedObject {
    /// Found by walking the cached directory listings from the root; `None`
    /// when no cached listing names the object.
    pub path: Option<String>,
    /// The object's identifier.
    pub fid: Fid,
    /// File, directory or symlink.
    pub ftype: FileType,
    /// Size as the server last reported it.
    pub size: u64,
    /// Bytes of the container, if it holds the contents of some version.
    pub cached_bytes: Option<u64>,
    /// The contents (or listing) are those of the version we know of.
    pub current: bool,
    /// A callback from the current session holds: trusted without asking.
    pub callback: bool,
    /// Written locally and not yet stored on the server: never evicted or
    /// flushed until it is.
    pub dirty: bool,
    /// Open `File`s on the container.
    pub open: u32,
}

/// What `flush` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushReport {
    /// Objects whose cached contents or listing were dropped.
    pub flushed: usize,
    /// Objects kept because they are open or hold unstored writes.
    pub busy: usize,
}

impl Client {
    /// Drop the cached contents (container, listing) and the callback of the
    /// object at `path` (not following a last symlink), or of every cached
    /// object when `path` is `None`, so the next access fetches afresh. Open
    /// or dirty objects keep their container (counted as `busy`); status
    /// entries stay, to be revalidated by version.
    pub fn flush(&self, path: Option<&str>) -> Result<FlushReport> {
        let inner = &self.inner;
        let fids = match path {
            Some(p) => vec![inner.resolve(p, false)?.0],
            None => inner.cache.known_fids(),
        };
        let mut report = FlushReport::default();
        for fid in fids {
            let container = inner.cache.container(fid);
            // Under the cache's lock (the closure runs inside `update`), so
            // no opener can slip in between the check and the removal.
            let outcome = inner.cache.update(None, fid, |e| {
                if e.open > 0 || e.dirty {
                    return Some(false);
                }
                let had = e.data_version.is_some() || e.has_listing();
                if e.data_version.is_some() {
                    let _ = std::fs::remove_file(&container);
                }
                e.data_version = None;
                e.data_bytes = 0;
                e.clear_listing();
                had.then_some(true)
            });
            match outcome.flatten() {
                Some(true) => report.flushed += 1,
                Some(false) => report.busy += 1,
                None => {}
            }
            if outcome.flatten() != Some(false) {
                inner.callbacks.break_fids(&[fid]);
            }
        }
        Ok(report)
    }

    /// Every object the cache knows of, sorted by path (unnamed ones last).
    /// Works without a server: paths come from the cached listings.
    pub fn cached_objects(&self) -> Vec<CachedObject> {
        let inner = &self.inner;
        let entries: Vec<_> = inner
            .cache
            .known_fids()
            .into_iter()
            .filter_map(|f| inner.cache.get(f).map(|e| (f, e)))
            .collect();
        // Roots: cached directories no cached listing names.
        let named: HashSet<Fid> = entries
            .iter()
            .filter_map(|(_, e)| e.any_listing())
            .flat_map(|l| l.iter().map(|d| d.fid))
            .collect();
        let by_fid: HashMap<Fid, &super::cache::Entry> =
            entries.iter().map(|(f, e)| (*f, e)).collect();
        let mut paths: HashMap<Fid, String> = HashMap::new();
        let mut stack: Vec<(Fid, String)> = entries
            .iter()
            .filter(|(f, e)| e.attr.ftype == FileType::Dir && !named.contains(f))
            .map(|(f, _)| (*f, "/".to_string()))
            .collect();
        while let Some((fid, path)) = stack.pop() {
            if paths.contains_key(&fid) {
                continue;
            }
            paths.insert(fid, path.clone());
            if let Some(l) = by_fid.get(&fid).and_then(|e| e.any_listing()) {
                for d in l.iter() {
                    let child = if path == "/" {
                        format!("/{}", d.name)
                    } else {
                        format!("{path}/{}", d.name)
                    };
                    stack.push((d.fid, child));
                }
            }
        }
        let mut out: Vec<CachedObject> = entries
            .iter()
            .map(|(fid, e)| CachedObject {
                path: paths.get(fid).cloned(),
                fid: *fid,
                ftype: e.attr.ftype,
                size: e.attr.size,
                cached_bytes: e.data_version.map(|_| e.data_bytes),
                current: match e.attr.ftype {
                    FileType::Dir => e.listing_current().is_some(),
                    FileType::Symlink => e.symlink.is_some(),
                    FileType::File => e.data_current(),
                    // Metadata only: the status is all there is.
                    _ => true,
                },
                callback: inner.callbacks.holds(*fid),
                dirty: e.dirty,
                open: e.open,
            })
            .collect();
        out.sort_by(|a, b| match (&a.path, &b.path) {
            (Some(x), Some(y)) => x.cmp(y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => a.fid.to_bytes().cmp(&b.fid.to_bytes()),
        });
        out
    }

    /// Leave the servers on purpose (Coda's `cfs disconnect`): with
    /// disconnected operation on (the default), the client serves cached
    /// objects and logs mutations exactly as when no server answers, and
    /// sends nothing until [`Client::reconnect`]. With emulation off, every
    /// remote operation fails with `Eio` until then. Refused (`Invalid`)
    /// while failed over: failback is the way back from there.
    pub fn disconnect(&self) -> Result<()> {
        let servers = &self.inner.servers;
        let mode = &self.inner.emu.mode;
        if mode.hold(&servers.interrupt, OPERATOR_DISCONNECT).is_err() {
            let why = self.interrupted().unwrap_or_default();
            return Err(Error::Invalid(format!("failed over ({why}); use failback")));
        }
        servers.shutdown();
        Ok(())
    }

    /// Undo [`Client::disconnect`]: connect (a new session) and revalidate
    /// the cache. `Again` while no server answers (the client then stays
    /// disconnected); `Invalid` if the client was not disconnected by the
    /// operator (a failover is undone by failback).
    pub fn reconnect(&self) -> Result<()> {
        let servers = &self.inner.servers;
        let emu = &self.inner.emu;
        let mode = &emu.mode;
        if mode.failed_over() {
            let why = self.interrupted().unwrap_or_default();
            return Err(Error::Invalid(format!("{why}; use failback")));
        }
        if !mode.unhold(&servers.interrupt) {
            return Ok(());
        }
        let again =
            |e: Error| Error::Again(format!("no server answers, staying disconnected: {e}"));
        if mode.enabled() {
            // Reintegrate what was logged meanwhile, then serve from the
            // servers again.
            return self.reintegrate_now().map_err(|e| {
                let _ = mode.hold(&servers.interrupt, OPERATOR_DISCONNECT);
                again(e)
            });
        }
        if let Err(e) = servers.session().and_then(|_| self.inner.revalidate_all()) {
            let _ = mode.hold(&servers.interrupt, OPERATOR_DISCONNECT);
            servers.shutdown();
            return Err(again(e));
        }
        Ok(())
    }

    /// Whether the operator disconnected the client (`coda disconnect`).
    pub fn operator_disconnected(&self) -> bool {
        self.inner.emu.mode.held()
    }

    /// Why remote operations fail right now (failover or disconnect), if
    /// they do.
    pub fn interrupted(&self) -> Option<String> {
        self.inner.servers.interrupt.check().err().map(|e| match e {
            Error::Eio(r) => r,
            e => e.to_string(),
        })
    }

    /// Ask the server one question (status of the root) and time the round
    /// trip; connects first if there is no session. Returns the server's
    /// address and the round-trip time.
    pub fn check_server(&self) -> Result<(String, Duration)> {
        let servers = &self.inner.servers;
        let s = servers.session()?;
        let t0 = Instant::now();
        match s.call(&Msg::GetAttrs { fids: vec![s.root] }, &servers.interrupt)? {
            Msg::Attrs { .. } => Ok((s.server.clone(), t0.elapsed())),
            m => Err(Error::Protocol(format!("GetAttrs answered with {m:?}"))),
        }
    }
}
