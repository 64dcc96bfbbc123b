//! Mapped owners (docs/MOUNT.md "Mapped owners"): with `uid_map` in the
//! mount's config, the owner numbers the server keeps are read as coda user
//! ids (the ids `coda whoami` and `coda-server user list` show) and shown as
//! the local uids the map gives them; a chown goes the other way. The map
//! names coda users; their ids are asked of the server (`UserIds`) and kept
//! in the cache directory, so a mount started while no server answers still
//! shows them.

use coda::client::{Client, Config};
use coda::{Error, Result};
use parking_lot::RwLock;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The uid shown for an owner no map entry names (`nobody` on Debian).
pub const DEFAULT_UNMAPPED: u32 = 65534;

/// How often a mount whose ids are unknown asks the server again, and
/// how many times (a day).
const RETRY: Duration = Duration::from_secs(5);
const RETRIES: u32 = 17_280;

/// The mount-only keys of a config file (the others go to the client).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MountKeys {
    /// `uid_map`: coda user name → local uid, in the order written.
    pub uid_map: Vec<(String, u32)>,
    /// `unmapped_uid`.
    pub unmapped_uid: Option<u32>,
}

/// Read a mount config file: the client's keys into a `Config` (as
/// `Config::from_file` does), `uid_map` and `unmapped_uid` into `MountKeys`.
pub fn load_config(path: &Path) -> Result<(Config, MountKeys)> {
    let mut keys = MountKeys::default();
    let cfg = Config::from_file_with(path, |k, v| {
        match k {
            "uid_map" => keys.uid_map = parse_uid_map(v)?,
            "unmapped_uid" => keys.unmapped_uid = Some(parse_uid(v)?),
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    if keys.unmapped_uid.is_some() && keys.uid_map.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: unmapped_uid needs uid_map",
            path.display()
        )));
    }
    Ok((cfg, keys))
}

fn parse_uid(v: &str) -> Result<u32> {
    match v.parse::<u32>() {
        // (uid_t)-1 means "no change" to chown(2): never an owner.
        Ok(u) if u != u32::MAX => Ok(u),
        _ => Err(Error::Invalid(format!(
            "{v:?} is not a uid (0 to 4294967294)"
        ))),
    }
}

/// `coda_user:uid, coda_user:uid, ...`. A user named twice, or two users
/// given one uid, is refused: the map must work both ways.
pub fn parse_uid_map(v: &str) -> Result<Vec<(String, u32)>> {
    let mut out: Vec<(String, u32)> = Vec::new();
    for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let bad = |why: &str| Error::Invalid(format!("uid_map entry {item:?}: {why}"));
        let (name, uid) = item
            .rsplit_once(':')
            .ok_or_else(|| bad("expected coda_user:uid"))?;
        let name = name.trim();
        coda::proto::acl::check_acl_name(name).map_err(|e| bad(&e.to_string()))?;
        if name.contains(':') {
            return Err(bad("a coda user name has no ':' (groups are not owners)"));
        }
        let uid = parse_uid(uid.trim()).map_err(|e| bad(&e.to_string()))?;
        if out.iter().any(|(n, _)| n == name) {
            return Err(bad("user named twice"));
        }
        if let Some((other, _)) = out.iter().find(|(_, u)| *u == uid) {
            return Err(bad(&format!("uid {uid} is {other}'s already")));
        }
        out.push((name.to_string(), uid));
    }
    if out.is_empty() {
        return Err(Error::Invalid("uid_map is empty".into()));
    }
    Ok(out)
}

/// The two directions, once the users' ids are known.
#[derive(Debug, Default)]
struct Ids {
    /// coda user id → local uid.
    to_local: HashMap<u32, u32>,
    /// local uid → coda user id.
    to_coda: HashMap<u32, u32>,
    /// The id of the user the mount acts for (the owner of what it makes).
    own: Option<u32>,
}

/// A mount's owner mapping (see the module comment).
pub struct IdMap {
    users: Vec<(String, u32)>,
    unmapped: u32,
    /// Where the ids learnt from the server are kept (`cache_dir/idmap`).
    file: PathBuf,
    ids: RwLock<Ids>,
}

impl IdMap {
    /// A map from the config's keys; `None` without `uid_map`. Ids kept by
    /// an earlier run are loaded now; `resolve` asks the server.
    pub fn new(keys: &MountKeys, cache_dir: &Path) -> Option<IdMap> {
        if keys.uid_map.is_empty() {
            return None;
        }
        let map = IdMap {
            users: keys.uid_map.clone(),
            unmapped: keys.unmapped_uid.unwrap_or(DEFAULT_UNMAPPED),
            file: cache_dir.join("idmap"),
            ids: RwLock::new(Ids::default()),
        };
        if let Ok(text) = std::fs::read_to_string(&map.file) {
            let mut known = HashMap::new();
            let mut own = None;
            for line in text.lines() {
                let mut f = line.split_whitespace();
                match (f.next(), f.next(), f.next()) {
                    (Some("own"), Some(id), None) => own = id.parse().ok(),
                    (Some("user"), Some(name), Some(id)) => {
                        if let Ok(id) = id.parse::<u32>() {
                            known.insert(name.to_string(), id);
                        }
                    }
                    _ => {}
                }
            }
            map.install(&known, own);
        }
        Some(map)
    }

    /// Learn the users' ids (and the mount's own) from the server and keep
    /// them. Fails while no server answers; the map then keeps what an
    /// earlier run learnt (see `resolve_later`).
    pub fn resolve(&self, client: &Client) -> Result<()> {
        let names: Vec<String> = self.users.iter().map(|(n, _)| n.clone()).collect();
        let ids = client.user_ids(&names)?;
        let own = client.whoami()?.id;
        let mut known = HashMap::new();
        let mut text = format!("own {own}\n");
        for (name, id) in names.iter().zip(&ids) {
            if *id == 0 {
                eprintln!("coda-mount: uid_map: {name} is no user on the server (ignored)");
                continue;
            }
            known.insert(name.clone(), *id);
            text.push_str(&format!("user {name} {id}\n"));
        }
        self.install(&known, Some(own));
        // Best effort: without it a start with no server shows owners as
        // unmapped until the server answers.
        let tmp = self.file.with_extension("tmp");
        if std::fs::write(&tmp, text).is_ok() {
            let _ = std::fs::rename(&tmp, &self.file);
        }
        Ok(())
    }

    fn install(&self, known: &HashMap<String, u32>, own: Option<u32>) {
        let mut ids = Ids {
            own: own.filter(|&id| id != 0),
            ..Ids::default()
        };
        for (name, uid) in &self.users {
            if let Some(&id) = known.get(name) {
                ids.to_local.insert(id, *uid);
                ids.to_coda.insert(*uid, id);
            }
        }
        *self.ids.write() = ids;
    }

    /// Until the ids are known (a mount started while no server
    /// answered), ask again every 5 s on a thread of its own: never on a
    /// request's path, where a lock may be held. Gives up after a day
    /// (logged); what an earlier run learnt is shown meanwhile.
    pub fn resolve_later(map: std::sync::Arc<IdMap>, client: Client) {
        let spawned = std::thread::Builder::new()
            .name("coda-idmap".into())
            .spawn(move || {
                for _ in 0..RETRIES {
                    std::thread::sleep(RETRY);
                    if map.resolve(&client).is_ok() {
                        return;
                    }
                }
                eprintln!(
                    "coda-mount: uid_map: no user ids from the server after a day; giving up"
                );
            });
        if let Err(e) = spawned {
            eprintln!("coda-mount: uid_map: cannot start the thread asking for user ids: {e}");
        }
    }

    /// The local uid an object owned by coda user id `owner` shows.
    pub fn attr_uid(&self, owner: u32) -> u32 {
        self.local_uid(owner)
    }

    fn local_uid(&self, owner: u32) -> u32 {
        self.ids
            .read()
            .to_local
            .get(&owner)
            .copied()
            .unwrap_or(self.unmapped)
    }

    /// The owner (coda user id) of a new object: the user the mount acts
    /// for, whoever the local caller is (the server records that user as
    /// its owner too). `None` while that id is unknown.
    pub fn new_owner(&self) -> Option<u32> {
        self.ids.read().own
    }

    /// The coda user id a chown to local `uid` asks for: `EINVAL` (as
    /// chown(2) answers an id it cannot represent) for a uid the map does
    /// not name.
    pub fn chown_uid(&self, uid: u32) -> std::result::Result<u32, i32> {
        match self.ids.read().to_coda.get(&uid) {
            Some(&id) => Ok(id),
            None => {
                eprintln!(
                    "coda-mount: chown to uid {uid} refused: uid_map names no coda user for it"
                );
                Err(libc::EINVAL)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_map() {
        let m = parse_uid_map(" bob:4242, admin:0 ,carol: 1001,").unwrap();
        assert_eq!(
            m,
            vec![
                ("bob".to_string(), 4242),
                ("admin".to_string(), 0),
                ("carol".to_string(), 1001)
            ]
        );
    }

    #[test]
    fn refuses_bad_maps() {
        for (v, why) in [
            ("", "empty"),
            ("bob", "expected coda_user:uid"),
            ("bob:x", "not a uid"),
            ("bob:4294967295", "not a uid"),
            ("bob:1, bob:2", "named twice"),
            ("bob:1, carol:1", "bob's already"),
            ("web:editors:5", "no ':'"),
            (":5", "uid_map entry"),
        ] {
            let e = parse_uid_map(v).unwrap_err().to_string();
            assert!(e.contains(why), "{v:?}: {e}");
        }
    }

    #[test]
    fn maps_both_ways_and_unmapped() {
        let dir = std::env::temp_dir().join(format!("coda-idmap-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let keys = MountKeys {
            uid_map: vec![("bob".into(), 4242), ("admin".into(), 0)],
            unmapped_uid: Some(999),
        };
        let map = IdMap::new(&keys, &dir).unwrap();
        let known: HashMap<String, u32> = [("bob".to_string(), 2), ("admin".to_string(), 1)]
            .into_iter()
            .collect();
        map.install(&known, Some(2));
        assert_eq!(map.local_uid(2), 4242);
        assert_eq!(map.local_uid(1), 0);
        assert_eq!(map.local_uid(7), 999);
        assert_eq!(map.chown_uid(0), Ok(1));
        assert_eq!(map.chown_uid(4242), Ok(2));
        assert_eq!(map.chown_uid(1000), Err(libc::EINVAL));
        assert_eq!(map.ids.read().own, Some(2));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn config_splits_mount_keys() {
        let dir = std::env::temp_dir().join(format!("coda-idmap-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("mount.conf");
        std::fs::write(
            &f,
            "cache_dir = /tmp/x\nuid_map = bob:4242 # comment\nunmapped_uid = 7\n",
        )
        .unwrap();
        let (cfg, keys) = load_config(&f).unwrap();
        assert_eq!(cfg.cache_dir, Some(PathBuf::from("/tmp/x")));
        assert_eq!(keys.uid_map, vec![("bob".to_string(), 4242)]);
        assert_eq!(keys.unmapped_uid, Some(7));
        std::fs::write(&f, "cache_dir = /tmp/x\nuid_map = bob\n").unwrap();
        let e = load_config(&f).unwrap_err().to_string();
        assert!(
            e.contains("mount.conf:2: ") && e.contains("coda_user:uid"),
            "{e}"
        );
        std::fs::write(&f, "unmapped_uid = 7\n").unwrap();
        let e = load_config(&f).unwrap_err().to_string();
        assert!(e.contains("unmapped_uid needs uid_map"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
