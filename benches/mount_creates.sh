#!/bin/bash
# Small-file creates through a mount by hand (issue 11): one coda-server and
# one coda-mount in a scratch directory, connected or in write-back mode,
# then N creates of 4 KiB files in 100 directories (Python: open, write,
# close), one after another. Prints files/s per thousand and overall, the
# mount's CPU per file, and how many Reintegrates the client sent (in
# write-back mode: how its records were batched).
#
#   cargo build --release && benches/mount_creates.sh [SCRATCH_DIR] [N] [WRITE_BACK_MS]
#
# WRITE_BACK_MS 0 (the default) measures connected creates. SCRATCH_DIR
# (default: a new directory under $TMPDIR or /tmp) should be on the file
# system being measured. Needs root (FUSE) and python3. Everything it starts
# is stopped by PID at the end, even on failure.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=$here/target/release
scratch=${1:-$(mktemp -d "${TMPDIR:-/tmp}/coda-mount-creates.XXXXXX")}
n=${2:-5000}
wb=${3:-0}
command -v python3 >/dev/null || { echo "mount_creates: python3 is missing" >&2; exit 1; }
[ -x "$bin/coda-server" ] && [ -x "$bin/coda-mount" ] && [ -x "$bin/coda" ] || {
    echo "mount_creates: build first (cargo build --release)" >&2; exit 1; }
srv=$scratch/server; mnt=$scratch/mnt; cli=$scratch/client
mkdir -p "$srv" "$mnt" "$cli"
server_pid=; mount_pid=
cleanup() {
    mountpoint -q "$mnt" && { umount "$mnt" 2>/dev/null || umount -l "$mnt"; }
    # The mount exits once unmounted; wait for it (bounded) so the scratch
    # directory is free.
    if [ -n "$mount_pid" ]; then
        for _ in $(seq 50); do kill -0 "$mount_pid" 2>/dev/null || break; sleep 0.1; done
    fi
    [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null || true
}
trap cleanup EXIT
"$bin/coda-server" init --root "$srv/data" >/dev/null
"$bin/coda-server" serve --root "$srv/data" --listen 127.0.0.1:0 >"$srv/out" 2>"$srv/err" &
server_pid=$!
for _ in $(seq 100); do grep -q '^listening on' "$srv/out" && break; sleep 0.1; done
addr=$(sed -n 's/^listening on //p' "$srv/out")
[ -n "$addr" ] || { echo "mount_creates: the server did not start" >&2; exit 1; }
cat >"$cli/mount.conf" <<CONF
servers = $addr
cache_dir = $cli/cache
secret_file = $srv/data/admin.secret
write_back_ms = $wb
CONF
"$bin/coda-mount" --daemon --config "$cli/mount.conf" "$mnt" >/dev/null
mount_pid=$(sed -n 's/^pid: //p' < <("$bin/coda" --cache-dir "$cli/cache" status))
[ -n "$mount_pid" ] || { echo "mount_creates: the mount did not report its pid" >&2; exit 1; }
cpu() { awk '{print $14 + $15}' "/proc/$mount_pid/stat"; }
python3 - "$mnt" 100 <<'PY'
import os, sys
for d in range(int(sys.argv[2])):
    os.mkdir(f"{sys.argv[1]}/d{d:02}")
PY
c0=$(cpu)
python3 - "$mnt" "$n" <<'PY'
import sys, time
m, n = sys.argv[1], int(sys.argv[2])
buf = b"x" * 4096
t0 = time.perf_counter(); last = t0
for i in range(n):
    with open(f"{m}/d{i % 100:02}/f{i}", "wb") as f:
        f.write(buf)
    if (i + 1) % 1000 == 0:
        t = time.perf_counter()
        print(f"{i + 1}: {1000 / (t - last):.0f} files/s", flush=True)
        last = t
print(f"all: {n / (time.perf_counter() - t0):.0f} files/s")
PY
c1=$(cpu)
ticks=$(getconf CLK_TCK)
echo "mount CPU per file: $(( (c1 - c0) * 1000000 / ticks / n )) us"
"$bin/coda" --cache-dir "$cli/cache" status | grep -E '^reintegrations:' || true
