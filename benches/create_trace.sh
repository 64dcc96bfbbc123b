#!/bin/bash
# Where a connected create of a small file goes through the mount (issue 11):
# one coda-server (with CODA_SERVER_TRACE) and one coda-mount in a scratch
# directory, 200 warm-up creates, then N timed creates of 4 KiB files
# (open(O_CREAT|O_TRUNC), write, close) from Python, one after another.
# Prints files/s and the open and close times the program saw, then the
# server's per-commit phases (apply, journal append + fdatasync, redb
# commit, after: the checkpoint every 256 groups) and the page writes the
# server made per file (strace of pwrite64 during a second run of N).
#
#   cargo build --release && benches/create_trace.sh [SCRATCH_DIR] [N]
#
# SCRATCH_DIR (default: a new directory under $TMPDIR or /tmp) should be on
# the file system being measured (with chattr +T on an ext4 root, as the
# other benches). Needs root (FUSE), python3 and strace. Everything it
# starts is stopped by PID at the end, even on failure.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=$here/target/release
scratch=${1:-$(mktemp -d "${TMPDIR:-/tmp}/coda-create-trace.XXXXXX")}
n=${2:-1500}
for tool in python3 strace; do
    command -v $tool >/dev/null || { echo "create_trace: $tool is missing" >&2; exit 1; }
done
[ -x "$bin/coda-server" ] && [ -x "$bin/coda-mount" ] || {
    echo "create_trace: build first (cargo build --release)" >&2; exit 1; }
srv=$scratch/server; mnt=$scratch/mnt; cli=$scratch/client
mkdir -p "$srv" "$mnt" "$cli"
server_pid=; strace_pid=
cleanup() {
    [ -n "$strace_pid" ] && kill "$strace_pid" 2>/dev/null || true
    mountpoint -q "$mnt" && { umount "$mnt" 2>/dev/null || umount -l "$mnt"; }
    [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null || true
}
trap cleanup EXIT
"$bin/coda-server" init --root "$srv/data" >/dev/null
CODA_SERVER_TRACE=1 "$bin/coda-server" serve --root "$srv/data" --listen 127.0.0.1:0 \
    >"$srv/out" 2>"$srv/trace" &
server_pid=$!
for _ in $(seq 100); do grep -q '^listening on' "$srv/out" && break; sleep 0.1; done
addr=$(sed -n 's/^listening on //p' "$srv/out")
[ -n "$addr" ] || { echo "create_trace: the server did not start" >&2; exit 1; }
cat >"$cli/mount.conf" <<CONF
servers = $addr
cache_dir = $cli/cache
secret_file = $srv/data/admin.secret
CONF
"$bin/coda-mount" --daemon --config "$cli/mount.conf" "$mnt" >/dev/null
mkdir -p "$mnt/d"
creates() { # DIR PREFIX COUNT
    python3 - "$@" <<'PY'
import os, sys, time
d, prefix, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
buf = b"x" * 4096
t_open = t_close = 0.0
start = time.perf_counter()
for i in range(n):
    a = time.perf_counter()
    fd = os.open(f"{d}/{prefix}{i}", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    b = time.perf_counter()
    os.write(fd, buf)
    c = time.perf_counter()
    os.close(fd)
    t_open += b - a
    t_close += time.perf_counter() - c
elapsed = time.perf_counter() - start
print(f"{prefix}: {n / elapsed:.0f} files/s, open {t_open / n * 1e6:.0f} us, close {t_close / n * 1e6:.0f} us")
PY
}
creates "$mnt/d" warm 200
: >"$srv/trace"
creates "$mnt/d" f "$n"
cp "$srv/trace" "$scratch/trace.timed"
# Counted in a second run: tracing every system call slows the server.
strace -f -e trace=pwrite64 -o "$scratch/pwrites" -p "$server_pid" 2>/dev/null &
strace_pid=$!
sleep 0.5
creates "$mnt/d" g "$n" >/dev/null
kill "$strace_pid"; wait "$strace_pid" 2>/dev/null || true; strace_pid=
awk -v n="$n" '
/TRACE commit/ {
    for (i = 3; i <= 7; i++) { split($i, kv, "="); sum[kv[1]] += kv[2]; if (kv[1] == "after" && kv[2] > 1000) { cp++; cps += kv[2] } }
    commits++
}
END {
    printf "server: %d commits (%.2f per file); mean per commit: apply %.0f us, journal write %.0f us, redb commit %.0f us, journal sync after it %.0f us, after %.0f us\n",
        commits, commits / n, sum["apply"] / commits, sum["journal"] / commits, sum["commit"] / commits, sum["sync"] / commits, sum["after"] / commits
    if (cp) printf "server: %d checkpoints, %.1f ms each\n", cp, cps / cp / 1000
}' "$scratch/trace.timed"
echo "server: $(grep -c pwrite64 "$scratch/pwrites") pwrite64 calls for $n more files (a second run, under strace)"
