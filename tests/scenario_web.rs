//! The scenario the product exists for, end to end with a real web server:
//! nginx serves `root web;` where `web -> mnt/web` is a symlink into the
//! coda mount. The server dies (kill -9) or hangs (SIGSTOP); with
//! `failover_link`/`failover_target` configured the client flips the link to
//! the local copy by itself. The last "remote" answer and the first "local"
//! one must be at most 1.5 s apart, and every answer after the first "local"
//! must be a 200 with "local". Then the server comes back, we fail back, and
//! the page is "remote" again.
//!
//! `CODA_SCENARIO_RUNS=N` repeats each variant N times and prints the
//! median and max gap (docs/BENCHMARKS.md).

mod client_util;
mod common;
mod mount_util;
mod replication_util;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{TempDir, TestServer};
use mount_util::*;
use replication_util::Group;

const MAX_GAP: Duration = Duration::from_millis(1500);
const PERIOD: Duration = Duration::from_millis(20);

/// nginx as our own child process, killed by PID on drop.
struct Nginx {
    child: Child,
    addr: SocketAddr,
}

impl Nginx {
    /// Serve `prefix/web` (`root web;`) on a free loopback port.
    fn start(prefix: &Path) -> Nginx {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let p = prefix.display();
        let tmp = prefix.join("nginx-tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        let t = tmp.display();
        // No open_file_cache: every request opens the file through the
        // link, as a server that never heard of coda would.
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\n\
             error_log {p}/nginx-error.log;\npid {p}/nginx.pid;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  access_log off;\n\
               client_body_temp_path {t}/body;\n  proxy_temp_path {t}/proxy;\n\
               fastcgi_temp_path {t}/fastcgi;\n  uwsgi_temp_path {t}/uwsgi;\n\
               scgi_temp_path {t}/scgi;\n\
               server {{\n    listen 127.0.0.1:{port};\n    root web;\n\
                 location / {{ }}\n  }}\n}}\n"
        );
        let cpath = prefix.join("nginx.conf");
        std::fs::write(&cpath, conf).unwrap();
        let child = Command::new(nginx_bin())
            .arg("-p")
            .arg(format!("{p}/"))
            .arg("-c")
            .arg(&cpath)
            .arg("-e")
            .arg(prefix.join("nginx-error.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start nginx (installed by .ci/run)");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut n = Nginx { child, addr };
        assert!(
            eventually(Duration::from_secs(10), || TcpStream::connect(addr).is_ok()),
            "nginx listens: {}",
            std::fs::read_to_string(prefix.join("nginx-error.log")).unwrap_or_default()
        );
        assert!(n.child.try_wait().unwrap().is_none(), "nginx runs");
        n
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nginx_bin() -> PathBuf {
    for p in ["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    PathBuf::from("nginx")
}

/// One answer: when it came, its status (0: no HTTP answer) and body.
#[derive(Clone, Debug)]
struct Answer {
    at: Instant,
    status: u16,
    body: String,
}

fn get(addr: SocketAddr) -> (u16, String) {
    get_within(addr, Duration::from_millis(1000))
}

/// [`get`], waiting up to `wait` for the answer.
fn get_within(addr: SocketAddr, wait: Duration) -> (u16, String) {
    let go = || -> std::io::Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
        s.set_read_timeout(Some(wait))?;
        s.set_write_timeout(Some(wait))?;
        s.write_all(b"GET /index.html HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.trim().to_string())
            .unwrap_or_default();
        Ok((status, body))
    };
    go().unwrap_or((0, String::new()))
}

/// Requests the page every `PERIOD` until stopped, recording each answer.
struct Load {
    stop: Arc<AtomicBool>,
    answers: Arc<Mutex<Vec<Answer>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr) -> Load {
        Load::start_within(addr, Duration::from_millis(1000))
    }

    /// [`Load::start`], each request waiting up to `wait` for its answer.
    fn start_within(addr: SocketAddr, wait: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(Mutex::new(Vec::new()));
        let (s, a) = (stop.clone(), answers.clone());
        let thread = std::thread::spawn(move || {
            // Bounded: a minute at most, whatever happens.
            let end = Instant::now() + Duration::from_secs(60);
            while !s.load(Ordering::Relaxed) && Instant::now() < end {
                let t0 = Instant::now();
                let (status, body) = get_within(addr, wait);
                a.lock().unwrap().push(Answer {
                    at: Instant::now(),
                    status,
                    body,
                });
                std::thread::sleep(PERIOD.saturating_sub(t0.elapsed()));
            }
        });
        Load {
            stop,
            answers,
            thread: Some(thread),
        }
    }

    fn seen(&self, f: impl Fn(&Answer) -> bool) -> bool {
        self.answers.lock().unwrap().iter().any(f)
    }

    fn finish(mut self) -> Vec<Answer> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.answers.lock().unwrap())
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn is(a: &Answer, what: &str) -> bool {
    a.status == 200 && a.body == what
}

struct Outcome {
    gap: Duration,
    errors: usize,
    answers: usize,
}

/// The assertions of step 4 on one run's answers.
fn judge(answers: &[Answer], variant: &str) -> Outcome {
    judge_remote(answers, variant, "remote")
}

/// [`judge`], with `remote` the page the servers held last.
fn judge_remote(answers: &[Answer], variant: &str, remote: &str) -> Outcome {
    let first_local = answers
        .iter()
        .position(|a| is(a, "local"))
        .unwrap_or_else(|| panic!("{variant}: never a \"local\" answer: {answers:?}"));
    let last_remote = answers[..first_local]
        .iter()
        .rposition(|a| is(a, remote))
        .unwrap_or_else(|| panic!("{variant}: no {remote:?} answer before the failover"));
    let gap = answers[first_local].at - answers[last_remote].at;
    let errors = first_local - last_remote - 1;
    for a in &answers[first_local..] {
        assert!(
            is(a, "local"),
            "{variant}: after the first \"local\" answer, got {a:?}"
        );
    }
    assert!(
        gap <= MAX_GAP,
        "{variant}: last remote and first local answers {gap:?} apart (> {MAX_GAP:?}); \
         answers between: {:?}",
        &answers[last_remote..=first_local]
    );
    Outcome {
        gap,
        errors,
        answers: answers.len(),
    }
}

fn scenario(variant: &str, mount_args: &[&str], stop_server: fn(&mut TestServer)) {
    if !fuse_available() {
        return;
    }
    let have_nginx = nginx_bin().is_absolute() || common::prereq::have_tool("nginx");
    if !common::prereq::require(
        "nginx",
        have_nginx,
        "the program `nginx`",
        "Install it (Debian: apt-get install nginx; `make test` does it as root)",
    ) {
        return;
    }
    let runs: usize = std::env::var("CODA_SCENARIO_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut srv = TestServer::start();
    let d = TempDir::new("web");
    let dir = d.path();

    // 1. The server holds /web/index.html ("remote"); a local copy ("local").
    {
        let c = client_util::client(&srv, &dir.join("seed-cache"));
        c.mkdir("/web", 0o755).unwrap();
        client_util::put(&c, "/web/index.html", b"remote");
    }
    std::fs::create_dir_all(dir.join("local/web")).unwrap();
    std::fs::write(dir.join("local/web/index.html"), b"local").unwrap();

    // 2. Mount, link web -> mnt/web, nginx serving `root web;`.
    let link = dir.join("web");
    let remote_target = dir.join("mnt/web");
    let local_target = dir.join("local/web");
    std::os::unix::fs::symlink(&remote_target, &link).unwrap();
    let m = Mount::start(
        &srv,
        dir,
        &[
            ("failover_link", link.to_str().unwrap()),
            ("failover_target", local_target.to_str().unwrap()),
            ("heartbeat_ms", "100"),
            ("dead_after_ms", "500"),
        ],
        mount_args,
    );
    let nginx = Nginx::start(dir);
    assert_eq!(get(nginx.addr), (200, "remote".to_string()));

    let mut gaps = Vec::new();
    for run in 0..runs {
        // 3. A client loop requests the page continuously.
        let load = Load::start(nginx.addr);
        assert!(
            eventually(Duration::from_secs(5), || load.seen(|a| is(a, "remote"))),
            "{variant}: remote answers before the outage"
        );
        std::thread::sleep(Duration::from_millis(200));

        // 4. The server dies or hangs; the link flips by itself.
        stop_server(&mut srv);
        assert!(
            eventually(Duration::from_secs(10), || load.seen(|a| is(a, "local"))),
            "{variant}: the link flipped to the local copy by itself"
        );
        std::thread::sleep(Duration::from_secs(1));
        let answers = load.finish();
        let o = judge(&answers, variant);
        eprintln!(
            "scenario {variant} run {}: gap {} ms between the last remote and the first local \
             answer, {} errors in between, {} answers",
            run + 1,
            o.gap.as_millis(),
            o.errors,
            o.answers
        );
        gaps.push((o.gap, o.errors));
        assert_eq!(std::fs::read_link(&link).unwrap(), local_target);

        // 5. Restart the server, fail back: the page is "remote" again.
        srv.restart();
        let mut last = None;
        let back = eventually(Duration::from_secs(20), || {
            let o = m.cli(&[
                "failback",
                "--link",
                link.to_str().unwrap(),
                "--target",
                remote_target.to_str().unwrap(),
            ]);
            let ok = o.status.success();
            last = Some(o);
            ok
        });
        assert!(back, "{variant}: failback: {last:?}");
        assert!(
            eventually(Duration::from_secs(5), || get(nginx.addr)
                == (200, "remote".to_string())),
            "{variant}: the page is remote again"
        );
    }
    gaps.sort();
    let (median, max) = (gaps[gaps.len() / 2], gaps[gaps.len() - 1]);
    let errs: Vec<usize> = gaps.iter().map(|g| g.1).collect();
    eprintln!(
        "scenario {variant}: {runs} run(s), gap median {} ms, max {} ms; errors per run {errs:?}",
        median.0.as_millis(),
        max.0.as_millis()
    );
}

#[test]
fn web_server_fails_over_by_itself_when_the_server_is_killed() {
    scenario("kill -9", &[], |s| s.kill9());
}

/// The same on a `--no-open` mount, where the kernel serves the page from
/// its own cache without asking `coda-mount` at each open: the failover
/// still drops it at once (docs/MOUNT.md, "No-open mode").
#[test]
fn web_server_on_a_no_open_mount_fails_over_by_itself_when_the_server_is_killed() {
    scenario("--no-open, kill -9", &["--no-open"], |s| s.kill9());
}

#[test]
fn web_server_fails_over_by_itself_when_the_server_hangs() {
    scenario("SIGSTOP", &[], |s| s.sigstop());
}

/// The replicated variant: three real members, the mount lists them all.
/// `kill -9` of the leader is not a failover: nginx goes on answering 200
/// with the servers' page while another member is elected, and a page
/// written through the new leader reaches it (so it is served remotely,
/// not from a stale cache). Only when every member is stopped does the
/// link flip to the local copy.
#[test]
fn web_server_keeps_serving_the_remote_page_while_the_group_leader_is_killed() {
    if !fuse_available() {
        return;
    }
    let have_nginx = nginx_bin().is_absolute() || common::prereq::have_tool("nginx");
    if !common::prereq::require(
        "nginx",
        have_nginx,
        "the program `nginx`",
        "Install it (Debian: apt-get install nginx; `make test` does it as root)",
    ) {
        return;
    }
    let variant = "group";
    let mut g = Group::start(3);
    let all = [0, 1, 2];
    let leader = g.wait_leader(&all);
    let d = TempDir::new("web-group");
    let dir = d.path();

    // 1. The group holds /web/index.html ("remote"); a local copy ("local").
    let writer = coda::client::Client::new(g.client_config(&dir.join("seed-cache")))
        .expect("a client of the group");
    writer.mkdir("/web", 0o755).unwrap();
    client_util::put(&writer, "/web/index.html", b"remote");
    std::fs::create_dir_all(dir.join("local/web")).unwrap();
    std::fs::write(dir.join("local/web/index.html"), b"local").unwrap();

    // 2. Mount the group, link web -> mnt/web, nginx serving `root web;`.
    let link = dir.join("web");
    let remote_target = dir.join("mnt/web");
    let local_target = dir.join("local/web");
    std::os::unix::fs::symlink(&remote_target, &link).unwrap();
    let config = dir.join("coda.conf");
    std::fs::write(
        &config,
        format!(
            "servers = {}\ncache_dir = {}\nsecret_file = {}\nrpc_timeout_ms = 5000\n\
             heartbeat_ms = 100\ndead_after_ms = 1000\n\
             failover_link = {}\nfailover_target = {}\n",
            g.servers(),
            dir.join("cache").display(),
            g.secret_file().display(),
            link.display(),
            local_target.display()
        ),
    )
    .unwrap();
    let m = Mount::start_config(config, dir, &[]);
    let nginx = Nginx::start(dir);
    assert_eq!(get(nginx.addr), (200, "remote".to_string()));

    // 3. A client loop requests the page continuously. A request that
    // needs the servers while the group elects waits for the new leader
    // (about a second, longer on a loaded machine): slow, not an error, so
    // each may take up to 10 s.
    let load = Load::start_within(nginx.addr, Duration::from_secs(10));
    assert!(
        eventually(Duration::from_secs(5), || load.seen(|a| is(a, "remote"))),
        "{variant}: remote answers before the outage"
    );

    // 4. kill -9 of the leader; the other two elect another.
    g.kill9(leader);
    let rest: Vec<usize> = all.iter().copied().filter(|&i| i != leader).collect();
    let new_leader = g.wait_leader(&rest);
    assert_ne!(new_leader, leader);
    // A newer page through the new leader reaches nginx: the mount is
    // connected to the group again, not serving its cache blind.
    // (Bounded retries: the writer's own session may have died with the
    // leader; a write it logged meanwhile is sent once it reconnects.)
    // Published as a site is deployed, by a rename over the old page: a
    // rewrite in place can show a server that opened the old version the
    // new size and then the old bytes (docs/MOUNT.md, "Rewriting a file
    // that is open"; nginx: "pread() read only 6 of 7"), an error answer
    // this scenario is not about.
    let written = eventually(Duration::from_secs(30), || {
        let put = || -> coda::Result<()> {
            let mut f = writer.open(
                "/web/.index.html.new",
                libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
                0o644,
            )?;
            let page = b"remote2";
            let mut off = 0;
            while off < page.len() {
                off += f.write_at(&page[off..], off as u64)?;
            }
            f.close()?;
            writer.rename("/web/.index.html.new", "/web/index.html")
        };
        put().is_ok()
    });
    assert!(written, "{variant}: the writer wrote the newer page");
    assert!(
        eventually(Duration::from_secs(30), || {
            let _ = writer.reintegrate_now();
            writer.pending_records() == 0
        }),
        "{variant}: the newer page reached the group"
    );
    // What nginx logged (errors reading through the mount), for the
    // messages below.
    let nginx_log = || {
        let l = std::fs::read_to_string(dir.join("nginx-error.log")).unwrap_or_default();
        l[l.len().saturating_sub(3000)..].to_string()
    };
    assert!(
        eventually(Duration::from_secs(30), || load.seen(|a| is(a, "remote2"))),
        "{variant}: the page written through the new leader is served; nginx's log: {}",
        nginx_log()
    );
    let during = load.answers.lock().unwrap().clone();
    let bad: Vec<&Answer> = during
        .iter()
        .filter(|a| !is(a, "remote") && !is(a, "remote2"))
        .collect();
    assert!(
        bad.is_empty(),
        "{variant}: while the leader was killed and another elected, every answer is 200 \
         with the servers' page; not these: {bad:?}; nginx's log: {}",
        nginx_log()
    );
    assert_eq!(std::fs::read_link(&link).unwrap(), remote_target);
    drop(writer);
    // The operator's view: the new leader, and the killed member down
    // (exit 1: a member is down), as the leader hears them.
    let member = |i: usize| format!("member {} {}", g.members[i].id, g.members[i].addr);
    let shows = |o: &std::process::Output| {
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        (text.contains(&format!("group leader {} term", g.members[new_leader].addr))
            && text.contains(&format!("{} down", member(leader)))
            && text.contains(&format!("{} up leader", member(new_leader))))
        .then_some(text)
    };
    let mut last = String::new();
    assert!(
        eventually(Duration::from_secs(10), || {
            let o = m.cli(&["checkservers"]);
            last = format!("{o:?}");
            shows(&o).is_some() && o.status.code() == Some(1)
        }),
        "{variant}: checkservers shows the new leader and the lost member: {last}"
    );

    // 5. Every member stopped: now the link flips to the local copy.
    for i in rest {
        g.kill9(i);
    }
    assert!(
        eventually(Duration::from_secs(10), || load.seen(|a| is(a, "local"))),
        "{variant}: the link flipped to the local copy once no member answers"
    );
    std::thread::sleep(Duration::from_secs(1));
    let answers = load.finish();
    let o = judge_remote(&answers, variant, "remote2");
    eprintln!(
        "scenario {variant}: {} answers before all members were stopped, none an error; gap {} ms \
         between the last remote and the first local answer, {} errors in between, {} answers",
        during.len(),
        o.gap.as_millis(),
        o.errors,
        o.answers
    );
    assert_eq!(std::fs::read_link(&link).unwrap(), local_target);
}
