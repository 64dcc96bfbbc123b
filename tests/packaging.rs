//! What a newcomer installs and reads: man pages in step with `--help`,
//! `--version`, `coda-mount`'s refusals of a bad mountpoint, host names in
//! `--listen` and `servers`, the Python package (pip into a venv, imported
//! from elsewhere, its tests under pytest) and the Debian package (built,
//! installed with dpkg, its systemd units' command lines run, removed).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use common::{prereq, TempDir, TestServer};

const BINS: [(&str, &str, &str); 3] = [
    (
        "coda-server",
        env!("CARGO_BIN_EXE_coda-server"),
        "man/coda-server.8",
    ),
    (
        "coda-mount",
        env!("CARGO_BIN_EXE_coda-mount"),
        "man/coda-mount.8",
    ),
    ("coda", env!("CARGO_BIN_EXE_coda"), "man/coda.1"),
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command, what: &str) -> String {
    let o = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        o.status.success(),
        "{what} failed ({}):\n{}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every `--flag` of a binary's `--help` appears in its man page (troff
/// writes a hyphen as `\-`), and `--version` prints name and version.
#[test]
fn man_pages_name_every_flag_of_help() {
    for (name, bin, page) in BINS {
        let help = run(Command::new(bin).arg("--help"), &format!("{name} --help"));
        let man = std::fs::read_to_string(repo().join(page))
            .unwrap()
            .replace("\\-", "-");
        let mut flags: Vec<&str> = help
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .filter(|w| w.starts_with("--") && w.len() > 2)
            .collect();
        flags.sort();
        flags.dedup();
        assert!(flags.len() >= 2, "{name} --help lists flags: {help}");
        for f in flags {
            assert!(
                man.contains(f),
                "{page} does not mention {f} (from {name} --help)"
            );
        }
        let v = run(
            Command::new(bin).arg("--version"),
            &format!("{name} --version"),
        );
        assert_eq!(v.trim(), format!("{name} {}", env!("CARGO_PKG_VERSION")));
    }
    // `coda help` works without a mount, and so do the subcommands' names.
    let help = run(Command::new(BINS[2].1).arg("help"), "coda help");
    let man = std::fs::read_to_string(repo().join("man/coda.1")).unwrap();
    for cmd in [
        "status",
        "checkservers",
        "failover",
        "listconflicts",
        "hoard walk",
    ] {
        assert!(help.contains(cmd) && man.contains(cmd), "{cmd}");
    }
    let mount_help = run(Command::new(BINS[1].1).arg("--help"), "coda-mount --help");
    assert!(mount_help.contains("--nonempty") && mount_help.contains("/dev/fuse"));
}

/// A missing prerequisite fails, naming it, how to get it and the opt-out;
/// listed in CODA_SKIP it skips; present it runs. Never a silent pass.
#[test]
fn missing_prerequisites_fail_unless_skipped_by_name() {
    let how = "Install it (Debian: apt-get install fuse3)";
    let err = prereq::decide("fuse", false, "/dev/fuse", how, "").unwrap_err();
    assert!(err.contains("missing prerequisite: /dev/fuse"), "{err}");
    assert!(
        err.contains("apt-get install fuse3") && err.contains("CODA_SKIP=fuse"),
        "{err}"
    );
    assert!(prereq::decide("fuse", false, "/dev/fuse", how, "asan,valgrind").is_err());
    assert!(prereq::decide("fuse", false, "/dev/fuse", how, "fusex").is_err());
    assert_eq!(
        prereq::decide("fuse", false, "/dev/fuse", how, "asan,fuse"),
        Ok(false)
    );
    assert_eq!(
        prereq::decide("fuse", false, "/dev/fuse", how, "asan fuse"),
        Ok(false)
    );
    assert_eq!(prereq::decide("fuse", true, "/dev/fuse", how, ""), Ok(true));
    // The real probe for a program that does not exist fails the same way.
    let r = std::panic::catch_unwind(|| {
        prereq::require_tool("no-such-key", "coda-no-such-tool", "coda-no-such-package")
    });
    let msg = r.unwrap_err();
    let msg = msg.downcast_ref::<String>().unwrap();
    assert!(
        msg.contains("`coda-no-such-tool`") && msg.contains("apt-get install coda-no-such-package"),
        "{msg}"
    );
}

/// `coda-mount` refuses a regular file, a non-empty directory (unless
/// `--nonempty`), and an existing mount, each with a clear message and
/// exit code 1, before it talks to any server.
#[test]
fn coda_mount_refuses_bad_mountpoints() {
    let d = TempDir::new("mountpoint");
    let conf = d.path().join("c.conf");
    std::fs::write(
        &conf,
        "servers = 127.0.0.1:1\ncache_dir = /nonexistent-coda\nsecret_file = /x\n",
    )
    .unwrap();
    let mount = |mp: &Path, extra: &[&str]| {
        Command::new(BINS[1].1)
            .arg("--config")
            .arg(&conf)
            .args(extra)
            .arg(mp)
            .output()
            .unwrap()
    };
    let file = d.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let o = mount(&file, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("is not a directory"), "{}", stderr(&o));

    let full = d.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("keep"), "x").unwrap();
    let o = mount(&full, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("is not empty (--nonempty mounts over it"),
        "{}",
        stderr(&o)
    );

    let missing = d.path().join("missing");
    let o = mount(&missing, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("does not exist"), "{}", stderr(&o));

    // "/" is a mount point everywhere; --nonempty does not let it through.
    let o = mount(Path::new("/"), &["--nonempty"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("/ is already a mount point"),
        "{}",
        stderr(&o)
    );
    // The file and the directory were left alone.
    assert_eq!(std::fs::read_to_string(full.join("keep")).unwrap(), "x");
    assert!(file.is_file());
}

/// As a user who cannot open /dev/fuse and has no fusermount3, coda-mount
/// says so, naming /dev/fuse, instead of a bare errno from the mount.
#[test]
fn coda_mount_names_dev_fuse_when_it_cannot_use_it() {
    use std::os::unix::fs::PermissionsExt;
    if !prereq::require_root("root", "to run coda-mount as the user nobody")
        || !prereq::require_fuse()
    {
        return;
    }
    let mode = std::fs::metadata("/dev/fuse").unwrap().permissions().mode();
    if mode & 0o006 != 0 {
        eprintln!("/dev/fuse is open to every user here (mode {mode:o}): nothing to refuse");
        return;
    }
    let d = TempDir::new("nofuse");
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let mp = d.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    std::fs::set_permissions(&mp, std::fs::Permissions::from_mode(0o777)).unwrap();
    let conf = d.path().join("c.conf");
    std::fs::write(
        &conf,
        format!(
            "servers = 127.0.0.1:1\ncache_dir = {}\nsecret_file = /x\n",
            d.path().join("cache").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = Command::new("runuser")
        .args(["-u", "nobody", "--", "env", "PATH=/nonexistent"])
        .arg(BINS[1].1)
        .arg("--config")
        .arg(&conf)
        .arg(&mp)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("no access to /dev/fuse and no fusermount3"),
        "{}",
        stderr(&o)
    );
}

/// A `coda-server serve` child, killed by PID on drop.
struct Serve(Child, String);

impl Serve {
    fn start(root: &Path, listen: &str) -> Serve {
        let mut c = Command::new(BINS[0].1)
            .args(["serve", "--root"])
            .arg(root)
            .args(["--listen", listen])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(c.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        Serve(c, line.trim().to_string())
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `--listen localhost:PORT` resolves the name; a client configured with
/// `servers = localhost:PORT` reaches it. A name that does not resolve is a
/// usage error naming it.
#[test]
fn host_names_in_listen_and_servers() {
    let d = TempDir::new("localhost");
    let root = d.path().join("data");
    run(
        Command::new(BINS[0].1).args(["init", "--root"]).arg(&root),
        "coda-server init",
    );
    let s = Serve::start(&root, "localhost:0");
    let addr =
        s.1.strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("first line {:?}", s.1));
    let port = addr.rsplit_once(':').unwrap().1;
    let mut cfg = coda::client::Config::new();
    cfg.set("servers", &format!("localhost:{port}")).unwrap();
    cfg.set("secret_file", root.join("admin.secret").to_str().unwrap())
        .unwrap();
    cfg.set("cache_dir", d.path().join("cache").to_str().unwrap())
        .unwrap();
    let c = coda::client::Client::new(cfg).expect("connect through localhost");
    c.mkdir("/by-name", 0o755).unwrap();
    assert!(c.stat("/by-name").is_ok());
    drop(c);

    let o = Command::new(BINS[0].1)
        .args(["serve", "--root"])
        .arg(&root)
        .args(["--listen", "no-such-host.invalid:2432"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("cannot resolve \"no-such-host.invalid:2432\""),
        "{}",
        stderr(&o)
    );
}

/// The libcoda.so that `cargo test` built (target/debug), with the
/// `libcoda.so.0` name programs ask for.
fn debug_lib_dir() -> PathBuf {
    let dir = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(
        Command::new(cargo)
            .args(["build", "--lib", "--quiet"])
            .current_dir(repo()),
        "cargo build --lib",
    );
    let soname = dir.join("libcoda.so.0");
    if std::fs::symlink_metadata(&soname).is_err() {
        let _ = std::os::unix::fs::symlink("libcoda.so", &soname);
    }
    dir
}

/// `pip install .` into a venv (made by `make test`: the venv with pytest
/// and setuptools, so no network here), `import coda` from another
/// directory finding the library on the system path, then the package's
/// tests under pytest.
#[test]
fn python_package_installs_imports_and_passes_pytest() {
    if !prereq::require_python() {
        return;
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo().join("target"));
    let made = target.join("pyenv");
    if !prereq::require(
        "python",
        made.join("bin/pytest").exists(),
        &format!("the venv {} with pytest and setuptools", made.display()),
        "Run `make deps` (or `make test`), which makes it: python3 -m venv target/pyenv && \
         target/pyenv/bin/pip install pytest setuptools wheel",
    ) {
        return;
    }
    let d = TempDir::new("pypkg");
    // Installed afresh each run into the prepared venv (pytest is there).
    let py = made.join("bin/python");
    let scratch = d.path().join("build");
    std::fs::create_dir_all(&scratch).unwrap();
    run(
        Command::new(&py)
            .args([
                "-m",
                "pip",
                "install",
                "-q",
                "--no-build-isolation",
                "--disable-pip-version-check",
                "--no-index",
                "--no-deps",
                "--force-reinstall",
            ])
            .arg(repo())
            .env("TMPDIR", &scratch),
        "pip install .",
    );
    let lib = debug_lib_dir();
    let elsewhere = d.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let out = run(
        Command::new(&py)
            .args([
                "-c",
                "import coda, sys; print(coda.__file__); print(coda.version()); \
                 print(coda.Client.listdir.__annotations__['return'])",
            ])
            .current_dir(&elsewhere)
            .env_remove("CODA_LIB")
            .env_remove("PYTHONPATH")
            .env("LD_LIBRARY_PATH", &lib),
        "import coda from another directory",
    );
    let first = out.lines().next().unwrap_or_default();
    assert!(
        first.starts_with(made.to_str().unwrap()) && first.ends_with("coda/__init__.py"),
        "coda imported from the venv, not the source tree: {out}"
    );
    assert!(out.contains(env!("CARGO_PKG_VERSION")), "{out}");

    let server = TestServer::start();
    let out = run(
        Command::new(&py)
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
            .arg(repo().join("ffi-tests/python"))
            .current_dir(&elsewhere)
            .env_remove("PYTHONPATH")
            .env("CODA_LIB", lib.join("libcoda.so"))
            .env("CODA_TEST_SERVER", server.addr().to_string())
            .env("CODA_TEST_SECRET", server.secret_file())
            .env("CODA_TEST_DIR", d.path()),
        "pytest ffi-tests/python",
    );
    assert!(out.contains(" passed"), "{out}");
    assert!(!out.contains("failed"), "{out}");
}

/// systemd's escaping of a path for an instance name (`systemd-escape
/// --path`): `/` separators become `-`, other bytes outside
/// `[A-Za-z0-9:_.]` become `\xNN`.
fn systemd_escape_path(p: &Path) -> String {
    let s = p.to_str().unwrap().trim_matches('/');
    let mut out = String::new();
    for (i, b) in s.bytes().enumerate() {
        match b {
            b'/' => out.push('-'),
            b'.' if i == 0 => out.push_str("\\x2e"),
            b if b.is_ascii_alphanumeric() || b":_.".contains(&b) => out.push(b as char),
            b => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out
}

/// The `Exec...=` lines of a unit file.
fn exec_lines(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_string)
        .collect()
}

/// A child started from a unit's ExecStart line (through `sh -c`, which
/// parses the quoting as systemd would for these lines), killed on drop.
struct Service(Child);

impl Service {
    fn start(line: &str) -> (Service, String) {
        let mut c = Command::new("sh")
            .args(["-c", &format!("exec {line}")])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let out = c.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let first = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .unwrap_or_default();
        (Service(c), first.trim().to_string())
    }

    fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        // SAFETY: signalling our own child by PID.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(st)) = self.0.try_wait() {
                return Some(st);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Removes the package (and the config this test put in /etc/coda) even
/// when the test fails half-way.
struct Installed(Vec<PathBuf>);

impl Drop for Installed {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
        let _ = Command::new("dpkg").args(["--purge", "coda"]).output();
    }
}

/// `make deb`, `dpkg -i` it, use what it installed: the binaries on PATH,
/// the library through pkg-config with no extra path, the man pages, and
/// both systemd units by their ExecStart lines (no systemd in CI): the
/// server serves, coda-mount@ mounts and a file written through the mount
/// is read back by a C program built against the installed library. Then
/// `dpkg --purge` removes it all.
#[test]
fn debian_package_builds_installs_and_its_services_run() {
    if !prereq::require_root("deb", "dpkg -i installs the package")
        || !prereq::require_tool("deb", "dpkg-deb", "dpkg")
        || !prereq::require_cc()
        || !prereq::require_tool("cc", "pkg-config", "pkg-config")
        || !prereq::require_fuse()
    {
        return;
    }
    let before = Command::new("dpkg").args(["-s", "coda"]).output().unwrap();
    assert!(
        !before.status.success(),
        "a package named coda is installed already; this test would replace and remove it \
         (dpkg -r coda first, or CODA_SKIP=deb)"
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // The debug profile: what `cargo test` built already, so no new build.
    run(
        Command::new("make")
            .args(["-s", "deb", "PROFILE=debug"])
            .arg(format!("CARGO={cargo}"))
            .current_dir(repo()),
        "make deb",
    );
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo().join("target"));
    let deb = target.join(format!(
        "deb/coda_{}_{}.deb",
        env!("CARGO_PKG_VERSION"),
        run(
            Command::new("dpkg").arg("--print-architecture"),
            "dpkg --print-architecture"
        )
        .trim()
    ));
    assert!(deb.exists(), "{}", deb.display());
    let d = TempDir::new("deb");
    let mountpoint = d.path().join("mnt");
    std::fs::create_dir(&mountpoint).unwrap();
    let instance = systemd_escape_path(&mountpoint);
    let conf = PathBuf::from(format!("/etc/coda/{instance}.conf"));
    let mut installed = Installed(vec![]);
    run(Command::new("dpkg").arg("-i").arg(&deb), "dpkg -i");

    for b in ["coda-server", "coda-mount", "coda"] {
        let v = run(Command::new(format!("/usr/bin/{b}")).arg("--version"), b);
        assert_eq!(v.trim(), format!("{b} {}", env!("CARGO_PKG_VERSION")));
    }
    for f in [
        "/usr/lib/libcoda.so.0",
        "/usr/lib/libcoda.a",
        "/usr/include/coda.h",
        "/usr/share/man/man8/coda-server.8.gz",
        "/usr/share/man/man8/coda-mount.8.gz",
        "/usr/share/man/man1/coda.1.gz",
    ] {
        assert!(Path::new(f).exists(), "{f} installed");
    }
    let v = run(
        Command::new("pkg-config").args(["--modversion", "coda"]),
        "pkg-config",
    );
    assert_eq!(v.trim(), env!("CARGO_PKG_VERSION"));

    // coda-server.service, its data directory moved into the scratch dir
    // and its port to a free one (tests never take fixed ports).
    let unit = std::fs::read_to_string("/lib/systemd/system/coda-server.service").unwrap();
    assert!(unit.contains("NoNewPrivileges=yes") && unit.contains("ProtectSystem=strict"));
    let data = d.path().join("var-lib-coda");
    let adapt = |l: &str| {
        l.replace("/var/lib/coda", data.to_str().unwrap())
            .replace("0.0.0.0:2432", "127.0.0.1:0")
    };
    for pre in exec_lines(&unit, "ExecStartPre") {
        run(
            Command::new("sh").args(["-c", &adapt(&pre)]),
            "ExecStartPre",
        );
    }
    let start = exec_lines(&unit, "ExecStart");
    assert_eq!(start.len(), 1, "{unit}");
    assert!(start[0].starts_with("/usr/bin/coda-server serve"));
    let (mut server, first) = Service::start(&adapt(&start[0]));
    let addr = first
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("coda-server.service's first line: {first:?}"))
        .to_string();

    // coda-mount@INSTANCE.service with /etc/coda/INSTANCE.conf, as written.
    std::fs::write(
        &conf,
        format!(
            "servers = {addr}\ncache_dir = {}\nsecret_file = {}\n",
            d.path().join("cache").display(),
            data.join("admin.secret").display()
        ),
    )
    .unwrap();
    installed.0.push(conf.clone());
    let unit = std::fs::read_to_string("/lib/systemd/system/coda-mount@.service").unwrap();
    let start = exec_lines(&unit, "ExecStart");
    assert_eq!(start.len(), 1, "{unit}");
    let line = start[0]
        .replace("%i", &instance.replace('\\', "\\\\"))
        .replace("%f", mountpoint.to_str().unwrap());
    let (mut mount, first) = Service::start(&line);
    assert_eq!(first, format!("mounted on {}", mountpoint.display()));
    std::fs::create_dir(mountpoint.join("web")).unwrap();
    std::fs::write(mountpoint.join("web/index.html"), "from the package\n").unwrap();

    // A C program built against the installed library, no paths given.
    let exe = d.path().join("readwrite");
    run(
        Command::new("sh").arg("-c").arg(format!(
            "cc {} -o {} $(pkg-config --cflags --libs coda)",
            repo().join("examples/c/readwrite.c").display(),
            exe.display()
        )),
        "cc against the installed library",
    );
    let out = run(
        Command::new(&exe)
            .arg(&addr)
            .arg(data.join("admin.secret"))
            .arg(d.path().join("cache-c"))
            .env_remove("LD_LIBRARY_PATH"),
        "the program using /usr/lib/libcoda.so.0",
    );
    assert!(out.contains("  web"), "{out}");

    assert_eq!(mount.terminate().and_then(|s| s.code()), Some(0));
    assert_eq!(server.terminate().and_then(|s| s.code()), Some(0));
    drop(installed);
    assert!(
        !Path::new("/usr/bin/coda-server").exists(),
        "dpkg --purge removed it"
    );
    assert!(!Path::new("/usr/lib/libcoda.so.0").exists());
}
