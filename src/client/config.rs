//! Client configuration: the keys of docs C-API.md, set one by one as text so
//! that new options never change the C ABI.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Everything a [`super::Client`] needs to start. Build with [`Config::new`]
/// (defaults) and [`Config::set`], or read a file with [`Config::from_file`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `host:port` of the file servers, tried in order.
    pub servers: Vec<String>,
    /// Container files, the index and the CML live here (required).
    pub cache_dir: Option<PathBuf>,
    /// Bytes of container files kept before least recently used ones go.
    pub cache_size: u64,
    /// Who the client authenticates as (default `admin`).
    pub user: String,
    /// File holding the user's secret as 64 hex digits, mode 0600 (required).
    pub secret_file: Option<PathBuf>,
    /// Period of the liveness probe of the servers.
    pub heartbeat_ms: u64,
    /// Silence after which a server is declared down.
    pub dead_after_ms: u64,
    /// With `failover_target`: the symlink repointed on automatic failover.
    pub failover_link: Option<PathBuf>,
    /// With `failover_link`: the local copy the link points to when failed over.
    pub failover_target: Option<PathBuf>,
    /// With automatic failover: swap back by itself once servers have been
    /// up (and the cache revalidated) this long. `None`: only by call.
    pub failback_after_ms: Option<u64>,
    /// Local address of the control connection (`None`: the kernel's choice).
    pub bind_addr: Option<SocketAddr>,
    /// Bound on every wait for a reply (for bulk transfers: per chunk).
    pub rpc_timeout_ms: u64,
    /// With a replicated group: how long a reconnect keeps asking members
    /// that answer "no leader elected yet" before the servers count as
    /// down (at least this, whatever is left of `dead_after_ms`).
    pub election_wait_ms: u64,
    /// Serve from the cache and log mutations while no server answers
    /// (disconnected operation). Off: calls fail with EIO/ETIMEDOUT instead.
    pub disconnected_operation: bool,
    /// Connected, but mutations are only logged and sent in batches once
    /// older than `reintegration_age_ms` (for slow links).
    pub write_disconnected: bool,
    /// With `write_disconnected`: how old a logged change gets before it is sent.
    pub reintegration_age_ms: u64,
    /// Write-back mode (0: off): a mutation returns once it is durable in
    /// the local log and reaches the server within this many milliseconds
    /// (write-disconnected mode with this bound; see CLIENT.md).
    pub write_back_ms: u64,
    /// Walk the hoard profile this often while connected (0: only on demand).
    pub hoard_walk_ms: u64,
    /// Most bulk (file data) connections open to a server at once; more
    /// concurrent fetches and stores wait for one.
    pub bulk_connections: usize,
    /// File of the pinned server certificate fingerprints (`sha256:<hex>`,
    /// one per line). `None`: `server.fingerprint` beside `secret_file`.
    pub tls_fingerprint_file: Option<PathBuf>,
    /// PEM file of a site CA: servers' certificates must chain to it and
    /// name the host in `servers` (instead of pinning).
    pub tls_ca: Option<PathBuf>,
    /// Talk to servers without TLS; only servers started with
    /// `--insecure-plaintext` accept it (and only they are reachable).
    pub insecure_plaintext: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config::new()
    }
}

impl Config {
    /// The defaults (those of `coda_config_new`).
    pub fn new() -> Config {
        Config {
            servers: vec![format!("127.0.0.1:{}", crate::proto::DEFAULT_PORT)],
            cache_dir: None,
            cache_size: 1 << 30,
            user: "admin".into(),
            secret_file: None,
            heartbeat_ms: 200,
            dead_after_ms: 1000,
            failover_link: None,
            failover_target: None,
            failback_after_ms: None,
            bind_addr: None,
            rpc_timeout_ms: 10_000,
            election_wait_ms: 3_000,
            disconnected_operation: true,
            write_disconnected: false,
            reintegration_age_ms: 5_000,
            write_back_ms: 0,
            hoard_walk_ms: 600_000,
            bulk_connections: 4,
            tls_fingerprint_file: None,
            tls_ca: None,
            insecure_plaintext: false,
        }
    }

    /// Set one option by key. Unknown keys and malformed values are
    /// `Invalid`, with a message naming them.
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let bad = |why: &str| Error::Invalid(format!("config {key} = {value:?}: {why}"));
        let v = value.trim();
        match key.trim() {
            "servers" => {
                let list: Vec<String> = v
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(with_default_port)
                    .collect();
                if list.is_empty() {
                    return Err(bad("needs at least one host:port"));
                }
                for s in &list {
                    check_host_port(s).map_err(|_| bad(&format!("{s:?} is not host:port")))?;
                }
                self.servers = list;
            }
            "cache_dir" => {
                self.cache_dir = Some(non_empty_path(v).ok_or_else(|| bad("empty path"))?)
            }
            "cache_size" => {
                self.cache_size = parse_size(v)
                    .ok_or_else(|| bad("expected bytes with optional k, M or G suffix"))?
            }
            "user" => {
                if v.is_empty() || v.len() > crate::proto::MAX_USER {
                    return Err(bad("user names are 1 to 64 bytes"));
                }
                self.user = v.to_string();
            }
            "secret_file" => {
                self.secret_file = Some(non_empty_path(v).ok_or_else(|| bad("empty path"))?)
            }
            "heartbeat_ms" => {
                self.heartbeat_ms = parse_ms(v).ok_or_else(|| bad("expected milliseconds > 0"))?
            }
            "dead_after_ms" => {
                self.dead_after_ms = parse_ms(v).ok_or_else(|| bad("expected milliseconds > 0"))?
            }
            "rpc_timeout_ms" => {
                self.rpc_timeout_ms = parse_ms(v).ok_or_else(|| bad("expected milliseconds > 0"))?
            }
            "election_wait_ms" => {
                self.election_wait_ms =
                    parse_ms(v).ok_or_else(|| bad("expected milliseconds > 0"))?
            }
            "failover_link" => {
                self.failover_link = Some(non_empty_path(v).ok_or_else(|| bad("empty path"))?)
            }
            "failover_target" => {
                self.failover_target = Some(non_empty_path(v).ok_or_else(|| bad("empty path"))?)
            }
            "failback_after_ms" => {
                // "off" (or 0) keeps failback manual, the default.
                self.failback_after_ms = match v {
                    "off" | "0" => None,
                    _ => Some(
                        v.parse::<u64>()
                            .map_err(|_| bad("expected milliseconds or off"))?,
                    ),
                }
            }
            "bind_addr" => {
                let a = if v.contains(':') {
                    v.parse::<SocketAddr>().ok()
                } else {
                    // An address alone means "any port".
                    v.parse::<std::net::IpAddr>()
                        .ok()
                        .map(|ip| SocketAddr::new(ip, 0))
                };
                self.bind_addr = Some(a.ok_or_else(|| bad("expected ip or ip:port"))?);
            }
            "disconnected_operation" => {
                self.disconnected_operation =
                    parse_bool(v).ok_or_else(|| bad("expected true or false"))?
            }
            "write_disconnected" => {
                self.write_disconnected =
                    parse_bool(v).ok_or_else(|| bad("expected true or false"))?
            }
            "hoard_walk_ms" => {
                self.hoard_walk_ms = v.parse::<u64>().map_err(|_| bad("expected milliseconds"))?
            }
            "reintegration_age_ms" => {
                self.reintegration_age_ms =
                    v.parse::<u64>().map_err(|_| bad("expected milliseconds"))?
            }
            "write_back_ms" => {
                self.write_back_ms = v.parse::<u64>().map_err(|_| bad("expected milliseconds"))?
            }
            "bulk_connections" => {
                self.bulk_connections = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=1024).contains(n))
                    .ok_or_else(|| bad("expected 1 to 1024"))?
            }
            "tls_fingerprint_file" => {
                self.tls_fingerprint_file =
                    Some(non_empty_path(v).ok_or_else(|| bad("empty path"))?)
            }
            "tls_ca" => self.tls_ca = Some(non_empty_path(v).ok_or_else(|| bad("empty path"))?),
            "insecure_plaintext" => {
                self.insecure_plaintext =
                    parse_bool(v).ok_or_else(|| bad("expected true or false"))?
            }
            _ => return Err(Error::Invalid(format!("unknown config key {key:?}"))),
        }
        Ok(())
    }

    /// Read `key = value` lines; `#` starts a comment; blank lines are skipped.
    /// Errors name the file and line.
    pub fn from_file(path: &Path) -> Result<Config> {
        Config::from_file_with(path, |_, _| Ok(false))
    }

    /// As [`Config::from_file`], for a program with keys of its own (the
    /// mount's): `own(key, value)` is asked first, and a key it claims
    /// (returns `Ok(true)` for) is not the client's. Its errors name the
    /// file and line too.
    pub fn from_file_with(
        path: &Path,
        mut own: impl FnMut(&str, &str) -> Result<bool>,
    ) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("config file {}", path.display()), e))?;
        let mut cfg = Config::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let at = |e: Error| Error::Invalid(format!("{}:{}: {e}", path.display(), i + 1));
            let (k, v) = line.split_once('=').ok_or_else(|| {
                at(Error::Invalid(format!(
                    "expected key = value, got {line:?}"
                )))
            })?;
            let (k, v) = (k.trim(), v.trim());
            if !own(k, v).map_err(at)? {
                cfg.set(k, v).map_err(at)?;
            }
        }
        Ok(cfg)
    }
}

fn non_empty_path(v: &str) -> Option<PathBuf> {
    (!v.is_empty()).then(|| PathBuf::from(v))
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

fn parse_ms(v: &str) -> Option<u64> {
    v.parse::<u64>().ok().filter(|&n| n > 0)
}

/// `123`, `4k`, `16M`, `1G` (binary multiples; `K`, `m`, `g` accepted too).
pub(crate) fn parse_size(v: &str) -> Option<u64> {
    let (digits, mult) = match v.char_indices().last()? {
        (i, 'k' | 'K') => (&v[..i], 1u64 << 10),
        (i, 'm' | 'M') => (&v[..i], 1 << 20),
        (i, 'g' | 'G') => (&v[..i], 1 << 30),
        _ => (v, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(mult)
}

/// `localhost` or `10.0.0.5` alone means the default port (2432); a bare
/// IPv6 address gets its brackets. Names are resolved when connecting.
fn with_default_port(s: &str) -> String {
    let port = crate::proto::DEFAULT_PORT;
    match s.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
        Ok(ip) => format!("{ip}:{port}"),
        Err(_) if !s.contains(':') => format!("{s}:{port}"),
        Err(_) => s.to_string(),
    }
}

fn check_host_port(s: &str) -> std::result::Result<(), ()> {
    let (host, port) = s.rsplit_once(':').ok_or(())?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_c_api() {
        let c = Config::new();
        assert_eq!(c.servers, vec!["127.0.0.1:2432".to_string()]);
        assert_eq!(c.cache_size, 1 << 30);
        assert_eq!(c.user, "admin");
        assert_eq!(
            (c.heartbeat_ms, c.dead_after_ms, c.rpc_timeout_ms),
            (200, 1000, 10_000)
        );
        assert!(c.cache_dir.is_none() && c.secret_file.is_none());
    }

    #[test]
    fn sizes_take_suffixes() {
        assert_eq!(parse_size("123"), Some(123));
        assert_eq!(parse_size("4k"), Some(4096));
        assert_eq!(parse_size("16M"), Some(16 << 20));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        for bad in ["", "k", "1.5G", "-1", "1T", " 1"] {
            assert_eq!(parse_size(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn unknown_key_and_bad_value_name_themselves() {
        let mut c = Config::new();
        let e = c.set("cache_sise", "1G").unwrap_err();
        assert!(
            matches!(&e, Error::Invalid(m) if m.contains("cache_sise")),
            "{e}"
        );
        let e = c.set("cache_size", "lots").unwrap_err();
        assert!(
            matches!(&e, Error::Invalid(m) if m.contains("cache_size") && m.contains("lots")),
            "{e}"
        );
        assert!(c.set("servers", "a:1, b:2").is_ok());
        assert_eq!(c.servers, vec!["a:1".to_string(), "b:2".to_string()]);
        assert!(c.set("servers", "localhost").is_ok());
        assert_eq!(c.servers, vec!["localhost:2432".to_string()]);
        assert!(c.set("servers", "::1, 10.0.0.5").is_ok());
        assert_eq!(c.servers, vec!["[::1]:2432", "10.0.0.5:2432"]);
        assert!(c.set("servers", "host:").is_err());
        assert!(c.set("servers", "host:port").is_err());
        assert!(c.set("heartbeat_ms", "0").is_err());
        assert_eq!(c.election_wait_ms, 3_000);
        assert!(c.set("election_wait_ms", "0").is_err());
        assert!(c.set("election_wait_ms", "20000").is_ok());
        assert_eq!(c.election_wait_ms, 20_000);
        assert!(c.set("bind_addr", "127.0.0.1").is_ok());
        assert_eq!(c.bind_addr, Some("127.0.0.1:0".parse().unwrap()));
        assert_eq!(c.failback_after_ms, None);
        c.set("failback_after_ms", "1500").unwrap();
        assert_eq!(c.failback_after_ms, Some(1500));
        c.set("failback_after_ms", "off").unwrap();
        assert_eq!(c.failback_after_ms, None);
        assert!(c.set("failback_after_ms", "soon").is_err());
    }

    #[test]
    fn files_parse_with_comments_and_errors_name_the_line() {
        let dir = std::env::temp_dir().join(format!("coda-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("ok.conf");
        std::fs::write(
            &p,
            "# a comment\n\ncache_dir = /tmp/x  # trailing\ncache_size=2M\n",
        )
        .unwrap();
        let c = Config::from_file(&p).unwrap();
        assert_eq!(c.cache_dir, Some(PathBuf::from("/tmp/x")));
        assert_eq!(c.cache_size, 2 << 20);
        std::fs::write(&p, "user = bob\nbogus = 1\n").unwrap();
        let e = Config::from_file(&p).unwrap_err().to_string();
        assert!(e.contains(":2:") && e.contains("bogus"), "{e}");
        std::fs::write(&p, "just words\n").unwrap();
        assert!(Config::from_file(&p)
            .unwrap_err()
            .to_string()
            .contains(":1:"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
