//! A replicated group of real `coda-server` processes on loopback ports
//! chosen at run time, each killed by PID and cleaned up on drop.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coda::server::replication::{
    ask_status,
    node::NodeStatus,
    transport::{peer_key, PeerKey},
};

use crate::common::{TempDir, SERVER_BIN};

/// Issue 14's randomized history run and its checker (a test and a bench).
pub mod history;

/// Bounded wait for an observable condition.
pub fn wait_until<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct Member {
    pub id: u64,
    pub addr: SocketAddr,
    pub root: PathBuf,
    child: Option<Child>,
}

impl Member {
    pub fn running(&self) -> bool {
        self.child.is_some()
    }
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("member running").id() as i32
    }
}

pub struct Group {
    pub dir: TempDir,
    pub members: Vec<Member>,
    key: PeerKey,
    /// Where each member really binds, when behind a proxy.
    listen: Vec<Option<SocketAddr>>,
    /// Members serve `--insecure-plaintext` (behind the proxies, which must
    /// read a peer connection's ids: inside TLS they could not).
    pub plaintext: bool,
    /// More arguments for every member's `serve`.
    pub extra: Vec<String>,
    /// More environment for every member's `serve`.
    pub env: Vec<(String, String)>,
}

/// `n` distinct free loopback ports. All are held until all are picked:
/// a port released before the next bind may be handed out again (a group
/// once got `--group A,B,B`).
fn free_ports(n: usize) -> Vec<SocketAddr> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    held.iter().map(|l| l.local_addr().unwrap()).collect()
}

fn run(args: &[&str]) -> String {
    let out = Command::new(SERVER_BIN)
        .args(args)
        .output()
        .expect("run coda-server");
    assert!(
        out.status.success(),
        "coda-server {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Group {
    /// Initialise `n` members (the first generates, the others copy) and serve them all.
    pub fn start(n: usize) -> Group {
        Group::start_with(n, &[])
    }

    /// Like [`Group::start`], with `extra` arguments for every `serve`.
    pub fn start_with(n: usize, extra: &[&str]) -> Group {
        Group::start_with_env(n, extra, &[])
    }

    /// Like [`Group::start_with`], with `env` in every member's environment.
    pub fn start_with_env(n: usize, extra: &[&str], env: &[(&str, &str)]) -> Group {
        let dir = TempDir::new("group");
        let addrs = free_ports(n);
        let members = init_members(dir.path(), &addrs);
        let key = peer_key(&members[0].root, true).expect("group key");
        let mut g = Group {
            dir,
            members,
            key,
            listen: vec![None; n],
            plaintext: false,
            extra: extra.iter().map(|a| a.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        for i in 0..n {
            g.serve(i);
        }
        g
    }

    pub fn secret_file(&self) -> PathBuf {
        self.members[0].root.join("admin.secret")
    }

    /// Start member index `i` (0-based) on its group address.
    pub fn serve(&mut self, i: usize) {
        let bind = self.listen.get(i).copied().flatten();
        let m = &mut self.members[i];
        assert!(m.child.is_none(), "member {} already running", m.id);
        let bind_at = bind.unwrap_or(m.addr);
        // The port may be held a moment by the killed process's sockets.
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpListener::bind(bind_at).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut cmd = Command::new(SERVER_BIN);
        cmd.args(["serve", "--root"]).arg(&m.root);
        if let Some(b) = bind {
            cmd.args(["--listen", &b.to_string()]);
        }
        if self.plaintext {
            cmd.arg("--insecure-plaintext");
        }
        cmd.args(&self.extra);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn coda-server serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("read coda-server's first line");
        assert_eq!(line.trim(), format!("listening on {bind_at}"));
        m.child = Some(child);
    }

    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stop member `i` cleanly (SIGTERM) and wait for its exit, bounded:
    /// 30 s, then kill -9 and fail.
    pub fn stop(&mut self, i: usize) {
        let id = self.members[i].id;
        let Some(mut c) = self.members[i].child.take() else {
            return;
        };
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match c.try_wait() {
                Ok(Some(st)) => {
                    assert!(st.success(), "member {id} stopped with {st}");
                    return;
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = c.kill();
                    let _ = c.wait();
                    panic!("member {id} did not stop within 30 s of SIGTERM");
                }
            }
        }
    }

    /// SIGSTOP member `i` and wait until it is stopped (`wait_stopped`).
    pub fn sigstop(&self, i: usize) {
        unsafe { libc::kill(self.members[i].pid(), libc::SIGSTOP) };
        crate::common::wait_stopped(self.members[i].pid());
    }

    pub fn sigcont(&self, i: usize) {
        unsafe { libc::kill(self.members[i].pid(), libc::SIGCONT) };
    }

    /// Initialise a new member `id` from member index `from`'s directory
    /// (running or not), serve it, and return its index. It is not a
    /// member until `group add`.
    pub fn join(&mut self, id: u64, from: usize) -> usize {
        let addr = free_ports(1)[0];
        let root = self.dir.path().join(format!("m{id}"));
        // Its position in --group is its node id.
        assert_eq!(id as usize, self.members.len() + 1);
        let mut list: Vec<String> = self.members.iter().map(|m| m.addr.to_string()).collect();
        list.push(addr.to_string());
        run(&[
            "init",
            "--root",
            root.to_str().unwrap(),
            "--node",
            &id.to_string(),
            "--group",
            &list.join(","),
            "--from",
            self.members[from].root.to_str().unwrap(),
        ]);
        self.members.push(Member {
            id,
            addr,
            root,
            child: None,
        });
        let i = self.members.len() - 1;
        self.serve(i);
        i
    }

    /// `coda-server group add/remove` against member index `via`.
    pub fn membership(&self, via: usize, args: &[&str]) -> String {
        let mut a = vec!["group"];
        a.extend_from_slice(&args[..1]);
        a.extend(["--root", self.members[via].root.to_str().unwrap()]);
        a.extend_from_slice(&args[1..]);
        if self.plaintext {
            a.push("--insecure-plaintext");
        }
        run(&a)
    }

    /// Every member's address, as a client's `servers` lists them.
    pub fn servers(&self) -> String {
        self.members
            .iter()
            .map(|m| m.addr.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A client of the whole group with its own cache under `cache`.
    pub fn client_config(&self, cache: &std::path::Path) -> coda::client::Config {
        let mut c = coda::client::Config::new();
        c.set("servers", &self.servers()).unwrap();
        c.set("cache_dir", cache.to_str().unwrap()).unwrap();
        c.set("secret_file", self.secret_file().to_str().unwrap())
            .unwrap();
        c.set("rpc_timeout_ms", "5000").unwrap();
        c.set("heartbeat_ms", "100").unwrap();
        c.set("dead_after_ms", "1000").unwrap();
        if self.plaintext {
            c.set("insecure_plaintext", "true").unwrap();
        }
        c
    }

    /// Whether member `i`'s disk holds `data` as a file's content: some
    /// object file holds exactly it, or (a small file, whose bytes live in
    /// its row of the index: SERVER.md "Small files") `meta.redb` holds it.
    /// The member is running and has its index open, so the file's bytes
    /// are searched; the Raft log is in another file (`raft.redb`), so only
    /// applied data is found.
    pub fn has_object(&self, i: usize, data: &[u8]) -> bool {
        if !data.is_empty() && data.len() as u64 <= coda::server::SMALL_DATA_MAX {
            let meta = std::fs::read(self.members[i].root.join("meta.redb")).unwrap_or_default();
            return meta.windows(data.len()).any(|w| w == data);
        }
        let dir = self.members[i].root.join("objects");
        let Ok(vols) = std::fs::read_dir(&dir) else {
            return false;
        };
        vols.flatten().any(|v| {
            std::fs::read_dir(v.path()).is_ok_and(|fs| {
                fs.flatten()
                    .any(|f| std::fs::read(f.path()).is_ok_and(|b| b == data))
            })
        })
    }

    /// `has_object`, waiting for it (at most 10 s): a running member's
    /// unsynced commits may stay in redb's memory until its next durable
    /// one, which comes within its checkpoint interval (1 s) of an apply.
    pub fn holds(&self, i: usize, data: &[u8]) -> bool {
        let end = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if self.has_object(i, data) {
                return true;
            }
            if std::time::Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Member `i`'s own view, if it answers.
    pub fn status(&self, i: usize) -> Option<NodeStatus> {
        let m = &self.members[i];
        if !m.running() {
            return None;
        }
        ask_status(&m.addr.to_string(), m.id, &self.key).ok()
    }

    /// A raw control connection as `admin` with client id `[id; 16]` to
    /// member `i`, waited for (bounded) until the member takes it (a
    /// leader just elected may still refuse). `plain`: without TLS (a
    /// group behind the test's proxies).
    pub fn raw_control(&self, i: usize, id: u8, plain: bool) -> crate::common::raw::Raw {
        use crate::common::raw::Raw;
        use coda::proto::ConnKind;
        let secret = coda::proto::auth::read_secret_file(&self.secret_file()).unwrap();
        let addr = self.members[i].addr;
        wait_until("the leader takes a control connection", 10, || {
            let c = if plain {
                Raw::connect_plain
            } else {
                Raw::connect
            };
            c(addr, "admin", &secret, ConnKind::Control, [id; 16], 1).ok()
        })
    }

    /// Index of the member that is leader, as the members in `among` see
    /// it: it says so itself and every other of them names it, in its term.
    pub fn wait_leader(&self, among: &[usize]) -> usize {
        wait_until("a leader all live members agree on", 30, || {
            let sts: Vec<NodeStatus> = among
                .iter()
                .map(|&i| self.status(i))
                .collect::<Option<_>>()?;
            let leader = sts.iter().find(|s| s.role == "leader")?;
            sts.iter()
                .all(|s| s.leader == leader.id && s.term == leader.term)
                .then(|| {
                    among
                        .iter()
                        .copied()
                        .find(|&i| self.members[i].id == leader.id)
                })
                .flatten()
        })
    }

    /// Wait until every member in `among` has applied the leader's commit index.
    pub fn wait_caught_up(&self, among: &[usize]) -> u64 {
        wait_until("every member applied the leader's commit", 30, || {
            let l = self.wait_leader(among);
            let commit = self.status(l)?.commit;
            among
                .iter()
                .all(|&i| self.status(i).is_some_and(|s| s.applied >= commit))
                .then_some(commit)
        })
    }
}

/// A stopped member's volume store as its disk holds it (opening it
/// recovers it as a restart would): the log index it holds through
/// (`raft_applied`), and the rows of its replicated tables, each as text.
pub struct StoreState {
    pub applied: Option<u64>,
    pub tables: Vec<(&'static str, Vec<String>)>,
}

pub fn store_state(root: &std::path::Path) -> StoreState {
    use redb::{ReadableDatabase, ReadableTable, TableDefinition};
    const OBJECTS: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new("objects");
    const DIRENTS: TableDefinition<(&[u8; 16], &str), &[u8; 17]> = TableDefinition::new("dirents");
    const SMALL_DATA: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new("small_data");
    const CLIENT_STORE: TableDefinition<&[u8; 16], u64> = TableDefinition::new("client_store");
    const VOLSTAMPS: TableDefinition<u32, &[u8]> = TableDefinition::new("volstamps");
    // AllocFids's effects: a range reserved twice would move these on one member only.
    const VOLUMES: TableDefinition<u32, u64> = TableDefinition::new("volumes");
    const RESERVED: TableDefinition<(u32, u64), &[u8; 20]> = TableDefinition::new("reserved");
    const GRAVES: TableDefinition<&[u8; 16], ()> = TableDefinition::new("graves");
    const SETTINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("settings");
    // Who owns each client id, and when it was last presented: log entries too.
    const CLIENT_OWNERS: TableDefinition<&[u8; 16], &str> = TableDefinition::new("client_owners");
    const CLIENT_SEEN: TableDefinition<&[u8; 16], u64> = TableDefinition::new("client_seen");
    let db = redb::Database::open(root.join("meta.redb")).expect("open the member's store");
    let txn = db.begin_read().unwrap();
    let applied = txn
        .open_table(SETTINGS)
        .unwrap()
        .get("raft_applied")
        .unwrap()
        .map(|v| u64::from_be_bytes(v.value().try_into().unwrap()));
    macro_rules! rows {
        ($t:expr) => {
            match txn.open_table($t) {
                Ok(t) => t
                    .iter()
                    .unwrap()
                    .map(|r| {
                        let (k, v) = r.unwrap();
                        format!("{:?} => {:?}", k.value(), v.value())
                    })
                    .collect(),
                Err(redb::TableError::TableDoesNotExist(_)) => Vec::new(),
                Err(e) => panic!("{e}"),
            }
        };
    }
    StoreState {
        applied,
        tables: vec![
            ("objects", rows!(OBJECTS)),
            ("dirents", rows!(DIRENTS)),
            ("small_data", rows!(SMALL_DATA)),
            ("client_store", rows!(CLIENT_STORE)),
            ("volstamps", rows!(VOLSTAMPS)),
            ("volumes", rows!(VOLUMES)),
            ("reserved", rows!(RESERVED)),
            ("graves", rows!(GRAVES)),
            ("client_owners", rows!(CLIENT_OWNERS)),
            ("client_seen", rows!(CLIENT_SEEN)),
        ],
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill9(i);
        }
    }
}

/// A TCP proxy the test controls, in front of every member: each member's
/// group address is its proxy, which forwards to the address the member
/// really binds. Client connections always pass; peer connections (they
/// start with `CODARFT1`, then the dialer's and the dialled node ids) of a
/// member that is cut off are refused and, when the cut starts, closed.
pub struct Cutter {
    cut: std::sync::Arc<parking_lot::Mutex<std::collections::HashSet<u64>>>,
    /// Open peer connections: (from, to, the two sockets).
    open: std::sync::Arc<parking_lot::Mutex<Vec<(u64, u64, std::net::TcpStream)>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    listeners: Vec<SocketAddr>,
}

impl Cutter {
    /// Cut member `id` off from every other member (clients still reach it).
    pub fn cut(&self, id: u64) {
        self.cut.lock().insert(id);
        for (f, t, s) in self.open.lock().iter() {
            if *f == id || *t == id {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    /// Let member `id` talk to the others again.
    pub fn heal(&self, id: u64) {
        self.cut.lock().remove(&id);
    }
}

impl Drop for Cutter {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for a in &self.listeners {
            let _ = std::net::TcpStream::connect(a);
        }
        for (_, _, s) in self.open.lock().iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn pump(mut from: std::net::TcpStream, mut to: std::net::TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}

impl Group {
    /// Like [`Group::start`], with every member behind a proxy the returned
    /// [`Cutter`] controls.
    pub fn start_behind_proxies(n: usize) -> (Group, Cutter) {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        use std::sync::Arc;
        let dir = TempDir::new("group");
        let proxies: Vec<TcpListener> = (0..n)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let addrs: Vec<SocketAddr> = proxies.iter().map(|l| l.local_addr().unwrap()).collect();
        let real = free_ports(n);
        let cutter = Cutter {
            cut: Default::default(),
            open: Default::default(),
            stop: Default::default(),
            listeners: addrs.clone(),
        };
        for (l, target) in proxies.into_iter().zip(real.clone()) {
            let cut = Arc::clone(&cutter.cut);
            let open = Arc::clone(&cutter.open);
            let stop = Arc::clone(&cutter.stop);
            std::thread::spawn(move || {
                for conn in l.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(mut c) = conn else { continue };
                    let cut = Arc::clone(&cut);
                    let open = Arc::clone(&open);
                    std::thread::spawn(move || {
                        let mut head = [0u8; 24];
                        let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
                        if c.read_exact(&mut head[..1]).is_err() {
                            return;
                        }
                        let mut len = 1;
                        let mut ids = None;
                        if head[0] == b'C' {
                            if c.read_exact(&mut head[1..]).is_err() {
                                return;
                            }
                            len = 24;
                            let from = u64::from_be_bytes(head[8..16].try_into().unwrap());
                            let to = u64::from_be_bytes(head[16..24].try_into().unwrap());
                            let g = cut.lock();
                            if g.contains(&from) || g.contains(&to) {
                                return;
                            }
                            ids = Some((from, to));
                        }
                        let _ = c.set_read_timeout(None);
                        let Ok(mut up) = std::net::TcpStream::connect(target) else {
                            return;
                        };
                        if up.write_all(&head[..len]).is_err() {
                            return;
                        }
                        if let Some((f, t)) = ids {
                            open.lock().push((f, t, c.try_clone().unwrap()));
                            open.lock().push((f, t, up.try_clone().unwrap()));
                        }
                        let (c2, up2) = (c.try_clone().unwrap(), up.try_clone().unwrap());
                        let t = std::thread::spawn(move || pump(c2, up2));
                        pump(up, c);
                        let _ = t.join();
                    });
                }
            });
        }
        let members = init_members(dir.path(), &addrs);
        let key = peer_key(&members[0].root, false).expect("group key");
        let mut g = Group {
            dir,
            members,
            key,
            listen: real.iter().map(|a| Some(*a)).collect(),
            plaintext: true,
            extra: Vec::new(),
            env: Vec::new(),
        };
        for i in 0..n {
            g.serve(i);
        }
        (g, cutter)
    }
}

/// `coda-server init` of one member per address in `dir/m1`, `dir/m2`, ...
/// (the first makes the group key and secrets, the others copy them).
fn init_members(dir: &std::path::Path, addrs: &[SocketAddr]) -> Vec<Member> {
    let list = addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let first = dir.join("m1");
    let mut members = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let root = dir.join(format!("m{}", i + 1));
        let node = (i + 1).to_string();
        let mut args = vec![
            "init",
            "--root",
            root.to_str().unwrap(),
            "--node",
            &node,
            "--group",
            &list,
        ];
        if i > 0 {
            args.extend(["--from", first.to_str().unwrap()]);
        }
        run(&args);
        members.push(Member {
            id: i as u64 + 1,
            addr: *addr,
            root,
            child: None,
        });
    }
    members
}
