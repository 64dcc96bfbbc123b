//! The group a member belongs to: `DIR/group` (its node id and every
//! member's address) and `DIR/group.key` (the key peers prove to each other).

use std::fmt::Write as _;
use std::fs;
use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use crate::proto::auth::{decode_secret, encode_secret, random_bytes, SECRET_LEN};
use crate::{Error, Result};

/// Name of the group file in a data directory.
pub const GROUP_FILE: &str = "group";
/// Name of the group key file in a data directory.
pub const KEY_FILE: &str = "group.key";

/// One member: its Raft node id (1-based) and the address it serves on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Raft node id, never reused.
    pub id: u64,
    /// `HOST:PORT` as given to `init --group`.
    pub addr: String,
}

/// What `DIR/group` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConfig {
    /// This member's node id.
    pub node: u64,
    /// Every member of the group as this member knows it (node id order).
    pub members: Vec<Member>,
    /// The voters the group was initialised with: the configuration the
    /// log starts from on every member, including ones added later.
    pub initial: Vec<u64>,
}

/// Path of the group file.
pub fn group_path(root: &Path) -> PathBuf {
    root.join(GROUP_FILE)
}

impl GroupConfig {
    /// Parse `--group ADDR1,ADDR2,...` for member `node`.
    pub fn from_list(node: u64, list: &str) -> Result<GroupConfig> {
        let members: Vec<Member> = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .enumerate()
            .map(|(i, a)| Member {
                id: i as u64 + 1,
                addr: a.to_string(),
            })
            .collect();
        if members.is_empty() {
            return Err(Error::Invalid("--group lists no address".into()));
        }
        for m in &members {
            resolve(&m.addr)?;
        }
        for (i, m) in members.iter().enumerate() {
            if members[..i].iter().any(|o| o.addr == m.addr) {
                return Err(Error::Invalid(format!("--group lists {} twice", m.addr)));
            }
        }
        if node == 0 || node as usize > members.len() {
            return Err(Error::Invalid(format!(
                "--node {node}: the group has members 1 to {}",
                members.len()
            )));
        }
        let initial = members.iter().map(|m| m.id).collect();
        Ok(GroupConfig {
            node,
            members,
            initial,
        })
    }

    /// Read `DIR/group`; `Ok(None)` when the directory is a lone server.
    pub fn load(root: &Path) -> Result<Option<GroupConfig>> {
        let path = group_path(root);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("read {}", path.display()), e)),
        };
        let bad = |line: &str| Error::Invalid(format!("{}: bad line {line:?}", path.display()));
        let mut node = None;
        let mut members = Vec::new();
        let mut initial = Vec::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let f: Vec<&str> = line.split_whitespace().collect();
            match f.as_slice() {
                ["node", n] => node = Some(n.parse::<u64>().map_err(|_| bad(line))?),
                ["initial", ids] => {
                    initial = ids
                        .split(',')
                        .map(|i| i.parse::<u64>().map_err(|_| bad(line)))
                        .collect::<Result<_>>()?
                }
                ["member", id, addr] => members.push(Member {
                    id: id.parse().map_err(|_| bad(line))?,
                    addr: addr.to_string(),
                }),
                _ => return Err(bad(line)),
            }
        }
        let node = node.ok_or_else(|| bad("(no node line)"))?;
        if !members.iter().any(|m| m.id == node) {
            return Err(Error::Invalid(format!(
                "{}: node {node} is not among its members",
                path.display()
            )));
        }
        if initial.is_empty() {
            initial = members.iter().map(|m| m.id).collect();
        }
        Ok(Some(GroupConfig {
            node,
            members,
            initial,
        }))
    }

    /// Write `DIR/group` (fsynced, then renamed into place).
    pub fn save(&self, root: &Path) -> Result<()> {
        let mut text =
            String::from("# coda-server group: this member's node id and every member\n");
        let _ = writeln!(text, "node {}", self.node);
        let initial: Vec<String> = self.initial.iter().map(u64::to_string).collect();
        let _ = writeln!(text, "initial {}", initial.join(","));
        for m in &self.members {
            let _ = writeln!(text, "member {} {}", m.id, m.addr);
        }
        write_file_durably(&group_path(root), text.as_bytes(), 0o600)
    }

    /// This member's own entry.
    pub fn me(&self) -> &Member {
        self.members
            .iter()
            .find(|m| m.id == self.node)
            .expect("load and from_list check the node is a member")
    }

    /// The address of member `id`, if it is one.
    pub fn addr_of(&self, id: u64) -> Option<&str> {
        self.members
            .iter()
            .find(|m| m.id == id)
            .map(|m| m.addr.as_str())
    }
}

/// Resolve `HOST:PORT` to its first address.
pub fn resolve(addr: &str) -> Result<SocketAddr> {
    if let Ok(a) = addr.parse() {
        return Ok(a);
    }
    addr.to_socket_addrs()
        .map_err(|e| Error::Invalid(format!("cannot resolve {addr:?}: {e}")))?
        .next()
        .ok_or_else(|| Error::Invalid(format!("{addr:?} has no address")))
}

/// Generate a fresh group key in `DIR/group.key` (mode 0600).
pub fn generate_key(root: &Path) -> Result<()> {
    let key: [u8; SECRET_LEN] = random_bytes();
    let text = format!("{}\n", encode_secret(&key));
    write_file_durably(&root.join(KEY_FILE), text.as_bytes(), 0o600)
}

/// Read the group key of a data directory.
pub fn read_key(root: &Path) -> Result<[u8; SECRET_LEN]> {
    let path = root.join(KEY_FILE);
    let text = fs::read_to_string(&path)
        .map_err(|e| Error::io(format!("read group key {}", path.display()), e))?;
    decode_secret(text.trim())
}

/// Write a small file whole: temporary name, fsync, rename, fsync the directory.
pub fn write_file_durably(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| Error::io(format!("create {}", tmp.display()), e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(format!("write {}", tmp.display()), e))?;
    fs::rename(&tmp, path).map_err(|e| Error::io(format!("rename {}", path.display()), e))?;
    crate::server::objects::sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_list_numbers_members_from_one_and_checks_the_node() {
        let g = GroupConfig::from_list(2, "127.0.0.1:1, 127.0.0.1:2,127.0.0.1:3").unwrap();
        assert_eq!(g.members.len(), 3);
        assert_eq!(g.me().addr, "127.0.0.1:2");
        assert_eq!(g.addr_of(3), Some("127.0.0.1:3"));
        assert!(GroupConfig::from_list(4, "127.0.0.1:1,127.0.0.1:2").is_err());
        assert!(GroupConfig::from_list(0, "127.0.0.1:1").is_err());
        assert!(GroupConfig::from_list(1, "127.0.0.1:1,127.0.0.1:1").is_err());
        assert!(GroupConfig::from_list(1, "nohostport").is_err());
    }
}
