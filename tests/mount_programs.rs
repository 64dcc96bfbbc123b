//! Real programs on the mount give the same result as on a local
//! directory of the same machine: tar -x then tar -d, git, rsync twice,
//! SQLite (rollback journal and WAL) with integrity_check, autoreconf +
//! configure + make, and an fsx-style random operation run checked
//! against an in-memory model.

mod client_util;
mod common;
mod mount_util;

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::prereq;
use common::TempDir;
use mount_util::*;

/// What a shell script did: its exit status and what it printed.
#[derive(Debug, PartialEq)]
struct Ran {
    ok: bool,
    out: String,
}

/// Run `script` with `sh -c` in `dir`; stdout and stderr together, in
/// order (both go to one pipe).
fn sh(dir: &Path, home: &Path, script: &str) -> Ran {
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!("exec 2>&1\n{script}"))
        .current_dir(dir)
        .env("HOME", home)
        .env("LC_ALL", "C")
        .env("TZ", "UTC")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "Coda Test")
        .env("GIT_AUTHOR_EMAIL", "test@example.org")
        .env("GIT_COMMITTER_NAME", "Coda Test")
        .env("GIT_COMMITTER_EMAIL", "test@example.org")
        .env("GIT_AUTHOR_DATE", "2024-01-01T00:00:00Z")
        .env("GIT_COMMITTER_DATE", "2024-01-01T00:00:00Z")
        .output()
        .expect("run sh");
    Ran {
        ok: o.status.success(),
        out: String::from_utf8_lossy(&o.stdout).into_owned(),
    }
}

/// A server, a mount of it, and a local directory to compare with.
struct Both {
    _srv: common::TestServer,
    m: Mount,
    local: PathBuf,
    home: PathBuf,
    _d: TempDir,
}

impl Both {
    fn start(tag: &str) -> Both {
        let srv = client_util::start();
        let d = TempDir::new(tag);
        let m = Mount::start(&srv, d.path(), &[], &[]);
        let local = d.path().join("local");
        let home = d.path().join("home");
        std::fs::create_dir_all(&local).unwrap();
        std::fs::create_dir_all(&home).unwrap();
        Both {
            _srv: srv,
            m,
            local,
            home,
            _d: d,
        }
    }

    /// Run `script` in `sub` of the local directory, then of the mount;
    /// the two results.
    fn run(&self, sub: &str, script: &str) -> (Ran, Ran) {
        let l = self.local.join(sub);
        let m = self.m.path(sub);
        std::fs::create_dir_all(&l).unwrap();
        std::fs::create_dir_all(&m).unwrap();
        (sh(&l, &self.home, script), sh(&m, &self.home, script))
    }

    fn scratch(&self) -> &Path {
        self._d.path()
    }
}

/// A generated source tree: directories, files of many sizes (some
/// empty, one executable, names with spaces), symlinks, an empty
/// directory, all with fixed past times.
fn make_tree(root: &Path) {
    let mut n = 0u64;
    for d in 0..12 {
        let dir = root.join(format!("dir{d}/sub {d}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..12 {
            n += 1;
            let size = (n * 7919 % 20_000) as usize * (f % 3);
            let data: Vec<u8> = (0..size).map(|i| (i as u64 * 31 + n) as u8).collect();
            std::fs::write(dir.join(format!("file {f}.txt")), data).unwrap();
        }
        std::os::unix::fs::symlink("file 1.txt", dir.join("link")).unwrap();
    }
    std::fs::create_dir_all(root.join("empty")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", root.join("dangling")).unwrap();
    std::fs::write(root.join("run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let st = Command::new("find")
        .arg(root)
        .args([
            "-exec",
            "touch",
            "-h",
            "-d",
            "2023-06-01 12:00:00",
            "{}",
            "+",
        ])
        .status()
        .unwrap();
    assert!(st.success());
}

/// A failure message that names the other helper's unfinished work when
/// the difference is one of times.
fn why(what: &str, local: &Ran, mount: &Ran) -> String {
    let times = mount.out.contains("Mod time differs")
        || mount.out.contains("utime")
        || mount.out.contains("time");
    format!(
        "{what}: the mount differs from a local directory{}\n--- local (ok={}):\n{}\n--- mount (ok={}):\n{}",
        if times {
            " (times: needs the posix work, issue 11 \"times set by utimensat kept exactly\", \
             symlink times, directory times)"
        } else {
            ""
        },
        local.ok,
        local.out,
        mount.ok,
        mount.out
    )
}

#[test]
fn tar_extract_then_compare_finds_no_differences() {
    if !fuse_available() || !prereq::require_tool("tar", "tar", "tar") {
        return;
    }
    let b = Both::start("prog-tar");
    let src = b.scratch().join("src");
    make_tree(&src);
    let tarball = b.scratch().join("tree.tar");
    let st = Command::new("tar")
        .arg("-cf")
        .arg(&tarball)
        .arg("-C")
        .arg(&src)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    let script = format!(
        "tar -xf '{t}' && tar -df '{t}' && echo same",
        t = tarball.display()
    );
    let (l, m) = b.run("t", &script);
    assert!(l.ok && l.out == "same\n", "local: {l:?}");
    assert!(m == l, "{}", why("tar -x; tar -d", &l, &m));
}

#[test]
fn rsync_twice_copies_nothing_the_second_time() {
    if !fuse_available() || !prereq::require_tool("rsync", "rsync", "rsync") {
        return;
    }
    let b = Both::start("prog-rsync");
    let src = b.scratch().join("src");
    make_tree(&src);
    let script = format!(
        "rsync -a '{s}/' r/ && echo first done && rsync -a -i '{s}/' r/ && \
         echo second done && diff -r --no-dereference '{s}' r && echo same",
        s = src.display()
    );
    let (l, m) = b.run(".", &script);
    assert!(
        l.ok && l.out == "first done\nsecond done\nsame\n",
        "local: {l:?}"
    );
    assert!(m == l, "{}", why("rsync -a twice", &l, &m));
}

#[test]
fn git_init_add_commit_status_gc_fsck() {
    if !fuse_available() || !prereq::require_tool("git", "git", "git") {
        return;
    }
    let b = Both::start("prog-git");
    let script = "set -e\n\
        git -c init.defaultBranch=main init -q\n\
        mkdir -p src/a src/b\n\
        for i in $(seq 1 40); do printf 'line %s\\n' $i > src/a/f$i.txt; done\n\
        for i in $(seq 1 40); do seq 1 $i > src/b/g$i.txt; done\n\
        printf '#!/bin/sh\\n' > tool.sh; chmod 755 tool.sh\n\
        git add -A\n\
        git commit -q -m first\n\
        echo change >> src/a/f1.txt; git rm -q src/b/g2.txt; git mv src/a/f3.txt src/f3.txt\n\
        git commit -q -am second\n\
        git status --porcelain\n\
        git gc -q\n\
        git fsck --full --strict\n\
        git rev-parse HEAD\n\
        git log --format=%s | tr '\\n' ' '\n\
        git count-objects -v | grep -E '^(count|in-pack):'\n";
    let (l, m) = b.run("repo", script);
    assert!(l.ok, "local: {l:?}");
    assert!(m == l, "{}", why("git", &l, &m));
}

#[test]
fn sqlite_rollback_and_wal_pass_integrity_check() {
    if !fuse_available() || !prereq::require_python() {
        return;
    }
    let b = Both::start("prog-sqlite");
    // Two connections (a reader beside the writer: WAL's shared memory),
    // many transactions, updates and deletes, then integrity_check and a
    // digest of the contents.
    let script = r#"python3 - <<'EOF'
import sqlite3, hashlib
for mode in ("delete", "wal"):
    path = "db-%s.sqlite" % mode
    w = sqlite3.connect(path, isolation_level=None)
    print(mode, w.execute("PRAGMA journal_mode=%s" % mode).fetchone()[0])
    w.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT)")
    r = sqlite3.connect(path, isolation_level=None)
    for tx in range(40):
        w.execute("BEGIN")
        for i in range(50):
            k = tx * 50 + i
            w.execute("INSERT INTO t VALUES (?, ?)", (k, ("v%d-" % k) * (k % 17 + 1)))
        w.execute("UPDATE t SET v = v || '!' WHERE k % 7 = ?", (tx % 7,))
        w.execute("DELETE FROM t WHERE k % 13 = 0 AND k < ?", (tx * 50,))
        w.execute("COMMIT")
        assert r.execute("SELECT count(*) FROM t").fetchone()[0] > 0
    if mode == "wal":
        w.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    print(mode, "integrity", w.execute("PRAGMA integrity_check").fetchone()[0])
    h = hashlib.sha256()
    for k, v in w.execute("SELECT k, v FROM t ORDER BY k"):
        h.update(("%d=%s;" % (k, v)).encode())
    print(mode, w.execute("SELECT count(*) FROM t").fetchone()[0], h.hexdigest())
    r.close(); w.close()
    c = sqlite3.connect(path)
    print(mode, "reopened", c.execute("PRAGMA integrity_check").fetchone()[0])
    c.close()
EOF"#;
    let (l, m) = b.run("db", script);
    assert!(l.ok && l.out.contains("wal integrity ok"), "local: {l:?}");
    assert!(m == l, "{}", why("sqlite", &l, &m));
}

#[test]
fn autoreconf_configure_make_builds_a_program() {
    if !fuse_available()
        || !prereq::require_tool("autotools", "autoreconf", "autoconf")
        || !prereq::require_tool("autotools", "automake", "automake")
        || !prereq::require_tool("autotools", "make", "make")
        || !prereq::require_cc()
    {
        return;
    }
    let b = Both::start("prog-autotools");
    let script = "set -e\n\
        cat > configure.ac <<'EOF'\n\
AC_INIT([hello], [1.0])\n\
AM_INIT_AUTOMAKE([foreign])\n\
AC_PROG_CC\n\
AC_CONFIG_HEADERS([config.h])\n\
AC_CONFIG_FILES([Makefile])\n\
AC_OUTPUT\n\
EOF\n\
        printf 'bin_PROGRAMS = hello\\nhello_SOURCES = hello.c\\n' > Makefile.am\n\
        cat > hello.c <<'EOF'\n\
#include \"config.h\"\n\
#include <stdio.h>\n\
int main(void) { printf(\"%s from coda\\n\", PACKAGE_STRING); return 0; }\n\
EOF\n\
        autoreconf -i > autoreconf.log 2>&1 || { cat autoreconf.log; exit 1; }\n\
        ./configure > configure.log 2>&1 || { cat configure.log; exit 1; }\n\
        make > make.log 2>&1 || { cat make.log; exit 1; }\n\
        ./hello\n\
        make > make2.log 2>&1 || { cat make2.log; exit 1; }\n\
        grep -c 'gcc\\|cc ' make2.log || true\n";
    let (l, m) = b.run("proj", script);
    assert!(
        l.ok && l.out.starts_with("hello 1.0 from coda\n"),
        "local: {l:?}"
    );
    assert!(m == l, "{}", why("autoreconf + configure + make", &l, &m));
}

/// A small deterministic generator (xorshift64*), seeded.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

const FSX_MAX: u64 = 256 * 1024;

/// `ops` random operations on `path` (write, truncate, mmap write, read
/// back and compare, close and reopen), checked against a model of the
/// contents. Returns the model, or what went wrong with the last few
/// operations.
fn fsx(path: &Path, seed: u64, ops: usize) -> Result<Vec<u8>, String> {
    let open = || {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| format!("open: {e}"))
    };
    let mut rng = Rng(seed | 1);
    let mut model: Vec<u8> = Vec::new();
    let mut f = open()?;
    f.set_len(0)
        .map_err(|e| format!("truncate at start: {e}"))?;
    let mut log: Vec<String> = Vec::new();
    for i in 0..ops {
        let pick = rng.below(100);
        let step: Result<String, String> = (|| {
            if pick < 35 {
                let off = rng.below(FSX_MAX);
                let len = (1 + rng.below(16 * 1024)).min(FSX_MAX - off);
                let fill = rng.next() as u8;
                let data: Vec<u8> = (0..len)
                    .map(|j| fill.wrapping_add((j as u8).wrapping_mul(7)))
                    .collect();
                f.write_all_at(&data, off)
                    .map_err(|e| format!("write: {e}"))?;
                let end = (off + len) as usize;
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[off as usize..end].copy_from_slice(&data);
                Ok(format!("write {off}+{len}"))
            } else if pick < 48 {
                let len = rng.below(FSX_MAX + 1);
                f.set_len(len).map_err(|e| format!("truncate: {e}"))?;
                model.resize(len as usize, 0);
                Ok(format!("truncate {len}"))
            } else if pick < 62 {
                if model.is_empty() {
                    return Ok("mmap skipped (empty)".into());
                }
                let size = model.len();
                let off = rng.below(size as u64) as usize;
                let len = (1 + rng.below(8 * 1024) as usize).min(size - off);
                let fill = rng.next() as u8;
                // SAFETY: a fresh shared mapping of the open file, `size`
                // bytes (its current length); unmapped below.
                unsafe {
                    let p = libc::mmap(
                        std::ptr::null_mut(),
                        size,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_SHARED,
                        f.as_raw_fd(),
                        0,
                    );
                    if p == libc::MAP_FAILED {
                        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
                    }
                    let b = p as *mut u8;
                    for j in 0..len {
                        *b.add(off + j) = fill ^ (j as u8);
                    }
                    libc::munmap(p, size);
                }
                for j in 0..len {
                    model[off + j] = fill ^ (j as u8);
                }
                Ok(format!("mmap write {off}+{len} of {size}"))
            } else if pick < 97 {
                let off = rng.below(model.len() as u64 + 1024);
                let len = 1 + rng.below(32 * 1024);
                let mut buf = vec![0u8; len as usize];
                let mut got = 0;
                while got < buf.len() {
                    match f.read_at(&mut buf[got..], off + got as u64) {
                        Ok(0) => break,
                        Ok(n) => got += n,
                        Err(e) => return Err(format!("read: {e}")),
                    }
                }
                let start = (off as usize).min(model.len());
                let end = ((off + len) as usize).min(model.len());
                let want = &model[start..end];
                if &buf[..got] != want {
                    let at = buf[..got]
                        .iter()
                        .zip(want)
                        .position(|(a, b)| a != b)
                        .map(|p| p as u64 + off);
                    return Err(format!(
                        "read {off}+{len}: got {got} bytes, want {}; first difference at {at:?}",
                        want.len()
                    ));
                }
                let size = f.metadata().map_err(|e| format!("fstat: {e}"))?.len();
                if size != model.len() as u64 {
                    return Err(format!("fstat size {size}, want {}", model.len()));
                }
                Ok(format!("read {off}+{len}"))
            } else {
                f.sync_all().map_err(|e| format!("fsync: {e}"))?;
                f = open()?;
                Ok("fsync, close and reopen".into())
            }
        })();
        match step {
            Ok(what) => {
                log.push(what);
                if log.len() > 12 {
                    log.remove(0);
                }
            }
            Err(e) => {
                return Err(format!(
                    "fsx seed {seed}: operation {i} failed: {e}; the operations before it:\n{}",
                    log.join("\n")
                ))
            }
        }
    }
    f.sync_all().map_err(|e| format!("final fsync: {e}"))?;
    drop(f);
    let back = std::fs::read(path).map_err(|e| format!("read back: {e}"))?;
    if back != model {
        return Err(format!(
            "fsx seed {seed}: the file read back ({} bytes) differs from the model ({} bytes)",
            back.len(),
            model.len()
        ));
    }
    Ok(model)
}

#[test]
fn fsx_random_operations_match_the_model() {
    if !fuse_available() {
        return;
    }
    let seed = common::seed_from_env("CODA_FSX_SEED");
    eprintln!("fsx seed {seed} (rerun with CODA_FSX_SEED={seed})");
    let srv = client_util::start();
    let d = TempDir::new("prog-fsx");
    let local = fsx(&d.path().join("local-fsx"), seed, 20_000).expect("fsx on a local file");
    // 20,000 operations through passthrough (the default), a shorter run
    // through the plain path (the kernel's page cache and FUSE writes).
    for (i, (args, ops)) in [(&[][..], 20_000), (&["--no-passthrough"][..], 5_000)]
        .iter()
        .enumerate()
    {
        let sub = d.path().join(format!("m{i}"));
        std::fs::create_dir_all(&sub).unwrap();
        let m = Mount::start(&srv, &sub, &[], args);
        let name = format!("fsx{i}");
        let got = fsx(&m.path(&name), seed, *ops)
            .unwrap_or_else(|e| panic!("mount {args:?}: {e} (CODA_FSX_SEED={seed})"));
        let want = if *ops == 20_000 {
            local.clone()
        } else {
            fsx(&d.path().join(format!("local-fsx{i}")), seed, *ops).expect("fsx on a local file")
        };
        assert!(got == want, "mount {args:?}: differs from the local run");
        let other = client_util::client(&srv, &sub.join("other"));
        let stored = client_util::get(&other, &format!("/{name}"));
        assert!(
            stored == want,
            "mount {args:?}: the server has {} bytes, want {} (CODA_FSX_SEED={seed})",
            stored.len(),
            want.len()
        );
    }
}
