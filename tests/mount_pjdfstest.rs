//! pjdfstest, the POSIX conformance suite, run against the mount and
//! against a local directory of the same machine: every test case that
//! passes locally must pass on the mount, unless docs/MOUNT.md ("POSIX",
//! "pjdfstest cases refused by design") lists it with its reason.

mod client_util;
mod common;
mod mount_util;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{prereq, TempDir};
use mount_util::*;

/// The suite's own run time is about 10 s locally and a few minutes on the
/// mount; a run that takes longer than this is stuck.
const RUN_LIMIT: Duration = Duration::from_secs(900);

/// What the suite needs: root (it switches users), FUSE, and the runner.
fn prerequisites() -> bool {
    prereq::require_root("root", "pjdfstest switches users and makes device nodes")
        && fuse_available()
        && prereq::require(
            "pjdfstest",
            prereq::have_tool("pjdfstest"),
            "the program `pjdfstest`",
            "Install it: cargo install --locked pjdfstest@0.2.2 (`make deps` does)",
        )
}

/// The runner's configuration: the features the Linux local file systems
/// have, and two unprivileged users Debian always has.
fn config(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("pjdfstest.toml");
    std::fs::write(
        &p,
        "[features]\n\
         posix_fallocate = {}\n\
         rename_ctime = {}\n\
         utime_now = {}\n\
         utimensat = {}\n\
         \n\
         [settings]\n\
         naptime = 0.01\n\
         \n\
         [dummy_auth]\n\
         entries = [[\"nobody\", \"nogroup\"], [\"daemon\", \"daemon\"]]\n",
    )
    .unwrap();
    p
}

/// Run the suite in `dir`: test case name → outcome (`ok`, `FAILED`,
/// `skipped`), and the whole output for the failure message.
fn run_suite(conf: &Path, dir: &Path) -> (BTreeMap<String, String>, String) {
    let mut child = Command::new("pjdfstest")
        .arg("-c")
        .arg(conf)
        .arg("-p")
        .arg(dir)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pjdfstest");
    // Read both pipes on threads so a full pipe never stalls the runner.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let deadline = Instant::now() + RUN_LIMIT;
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pjdfstest in {} ran over {RUN_LIMIT:?}", dir.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = t_out.join().unwrap() + &t_err.join().unwrap();
    let mut results = BTreeMap::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if let (Some(name), Some(outcome), None) = (words.next(), words.next(), words.next()) {
            if name.contains("::") && ["ok", "FAILED", "skipped"].contains(&outcome) {
                results.insert(name.to_string(), outcome.to_string());
            }
        }
    }
    (results, text)
}

/// The cases docs/MOUNT.md lists as refused by design: the lines
/// "- `pjdfstest: NAME`: reason" of its POSIX section.
fn refused_by_design() -> BTreeSet<String> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/MOUNT.md"))
        .expect("docs/MOUNT.md");
    doc.lines()
        .filter_map(|l| l.trim().strip_prefix("- `pjdfstest: "))
        .filter_map(|l| l.split('`').next())
        .map(|s| s.trim().to_string())
        .collect()
}

/// The failure output of case `name` in a run's text (a few lines).
fn failure_of(text: &str, name: &str) -> String {
    let mut lines = text.lines().skip_while(|l| !l.starts_with(name));
    let mut out: Vec<&str> = lines.next().into_iter().collect();
    out.extend(
        lines
            .take_while(|l| l.starts_with('\t') || l.starts_with(' '))
            .filter(|l| !l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
            .filter(|l| !l.trim_start().starts_with("at "))
            .take(3),
    );
    out.join(" | ")
}

#[test]
fn every_pjdfstest_case_that_passes_locally_passes_on_the_mount() {
    if !prerequisites() {
        return;
    }
    let d = TempDir::new("pjdfstest");
    // Other users (the suite's) must reach the directories it works in.
    std::fs::set_permissions(
        d.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let conf = config(d.path());
    let local = d.path().join("local");
    std::fs::create_dir(&local).unwrap();
    std::fs::set_permissions(&local, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let (local_results, _) = run_suite(&conf, &local);
    let passing: BTreeSet<&String> = local_results
        .iter()
        .filter(|(_, o)| *o == "ok")
        .map(|(n, _)| n)
        .collect();
    assert!(
        passing.len() > 200,
        "the local run passed only {} cases: the runner is not working",
        passing.len()
    );

    let srv = client_util::start();
    let m = Mount::start(&srv, d.path(), &[], &["--allow-other"]);
    std::fs::set_permissions(
        m.path(""),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let (mount_results, mount_text) = run_suite(&conf, &m.mountpoint);

    let refused = refused_by_design();
    let mut failing = Vec::new();
    let mut excused = 0;
    for name in &passing {
        match mount_results.get(*name).map(String::as_str) {
            Some("ok") => {}
            _ if refused.contains(*name) => excused += 1,
            other => failing.push(format!(
                "{name}: {}",
                match other {
                    Some("FAILED") => failure_of(&mount_text, name),
                    Some(o) => o.to_string(),
                    None => "did not run (the runner stopped?)".to_string(),
                }
            )),
        }
    }
    let ok = passing.len() - failing.len() - excused;
    eprintln!(
        "pjdfstest: {ok} of the {} cases passing locally pass on the mount \
         ({excused} refused by design, {} failing)",
        passing.len(),
        failing.len()
    );
    assert!(
        failing.is_empty(),
        "{} pjdfstest cases pass locally but fail on the mount:\n{}",
        failing.len(),
        failing.join("\n")
    );
}
