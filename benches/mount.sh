#!/usr/bin/env bash
# Benchmark of `lifeboat mount` against `restic mount` (the peer) on the same data, in one run:
#   1. a 1 GiB disk image (MBR, one ext4 partition holding 10,000 small files and ~900 MiB of
#      incompressible filler), replicated to a local appliance and backed up with restic;
#   2. a sequential read of the whole DISK.img through each mount;
#   3. a read of every file of the 10,000-file directory through each mount (inside the ext4
#      partition for Lifeboat, the backed-up directory for restic).
# Each measurement is the median of 3 runs; the ratio is restic time / Lifeboat time (> 1: faster).
#
# Usage (as root, or where FUSE mounts are allowed):
#   cargo build --release -p appliance          # with CARGO_TARGET_DIR=/var/tmp/lifeboat-target
#   LIFEBOAT=/var/tmp/lifeboat-target/release/lifeboat bash benches/mount.sh
# Needs: e2fsprogs (mkfs.ext4), fuse3 (fusermount3), restic, python3.
set -euo pipefail

LIFEBOAT="${LIFEBOAT:-${CARGO_TARGET_DIR:-target}/release/lifeboat}"
FILES="${FILES:-10000}"
RUNS="${RUNS:-3}"
for t in "$LIFEBOAT" mkfs.ext4 fusermount3 restic python3; do
  command -v "$t" >/dev/null || { echo "mount.sh: $t is required" >&2; exit 1; }
done

W="$(mktemp -d /var/tmp/lifeboat-mount-bench.XXXXXX)"
APP_PID="" LB_PID="" RS_PID=""
cleanup() {
  set +e
  [ -n "$LB_PID" ] && kill -INT "$LB_PID" 2>/dev/null && wait "$LB_PID" 2>/dev/null
  [ -n "$RS_PID" ] && kill -INT "$RS_PID" 2>/dev/null && wait "$RS_PID" 2>/dev/null
  for m in "$W/mnt-lifeboat" "$W/mnt-restic"; do
    mountpoint -q "$m" 2>/dev/null && { fusermount3 -u -z "$m" || umount -l "$m"; }
  done
  [ -n "$APP_PID" ] && kill -9 "$APP_PID" 2>/dev/null && wait "$APP_PID" 2>/dev/null
  rm -rf "$W"
}
trap cleanup EXIT

now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }

echo "== data in $W"
mkdir -p "$W/data/small"
python3 - "$W/data/small" "$FILES" <<'EOF'
import os, random, sys
d, n = sys.argv[1], int(sys.argv[2])
r = random.Random(7)
for i in range(n):
    with open(os.path.join(d, f"f{i:05d}.txt"), "wb") as f:
        f.write(os.urandom(r.randint(512, 4096)))
EOF
mkdir -p "$W/tree"
mv "$W/data/small" "$W/tree/small"
head -c $((900 << 20)) /dev/urandom >"$W/tree/filler.bin"
mkfs.ext4 -q -F -b 4096 -d "$W/tree" "$W/fs.img" 1023M
python3 - "$W/fs.img" "$W/data/disk.img" <<'EOF'
import struct, sys
fs, out = sys.argv[1], sys.argv[2]
with open(out, "wb") as o:
    mbr = bytearray(512)
    mbr[446:462] = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", 2048, (1023 << 20) // 512)
    mbr[510:512] = b"\x55\xaa"
    o.write(mbr)
    o.write(bytes((1 << 20) - 512))
    with open(fs, "rb") as f:
        while True:
            b = f.read(1 << 22)
            if not b:
                break
            o.write(b)
EOF
rm -f "$W/fs.img"
mv "$W/tree/small" "$W/data/small"
echo "disk: $(stat -c %s "$W/data/disk.img") bytes; small files: $(ls "$W/data/small" | wc -l)"

echo "== lifeboat: appliance, replication"
mkdir -p "$W/app"
echo "bench-passphrase" >"$W/app/passphrase"
cat >"$W/app/lifeboat.toml" <<EOF
data_dir = "$W/app/data"
[listen]
management = "127.0.0.1:0"
replication = "127.0.0.1:0"
nbd = "127.0.0.1:0"
metrics = "127.0.0.1:0"
[security]
passphrase_file = "$W/app/passphrase"
[blob]
url = "file://$W/app/blob"
[policy]
crash_consistent_interval = "2s"
EOF
RUST_LOG=warn "$LIFEBOAT" serve --json --config "$W/app/lifeboat.toml" >"$W/app/ready.line" &
APP_PID=$!
for _ in $(seq 100); do [ -s "$W/app/ready.line" ] && break; sleep 0.2; done
REPL="$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["replication"], r["cert"])' "$W/app/ready.line")"
read -r REPL_ADDR CERT <<<"$REPL"
t0=$(now)
RUST_LOG=warn "$LIFEBOAT" agent sync --server "https://$REPL_ADDR" --ca "$CERT" --passphrase-file "$W/app/passphrase" \
  --machine m1 --disk "$W/data/disk.img" --json >/dev/null
echo "agent sync: $(echo "$(now) - $t0" | bc) s"
for _ in $(seq 600); do
  if RUST_LOG=warn "$LIFEBOAT" points list --config "$W/app/lifeboat.toml" --machine m1 --json |
    python3 -c 'import json,sys; sys.exit(0 if any(p["readable"] for p in json.load(sys.stdin)) else 1)'; then
    break
  fi
  sleep 0.5
done

echo "== restic: init, backup"
export RESTIC_PASSWORD=bench RESTIC_REPOSITORY="$W/restic-repo" RESTIC_CACHE_DIR="$W/restic-cache"
restic init -q
t0=$(now)
(cd "$W/data" && restic backup -q disk.img small)
echo "restic backup: $(echo "$(now) - $t0" | bc) s"

echo "== mounts"
mkdir -p "$W/mnt-lifeboat" "$W/mnt-restic"
RUST_LOG=warn "$LIFEBOAT" mount "$W/mnt-lifeboat" --config "$W/app/lifeboat.toml" &
LB_PID=$!
restic mount -q "$W/mnt-restic" &
RS_PID=$!
for _ in $(seq 300); do
  ls "$W/mnt-lifeboat/m1/latest/" >/dev/null 2>&1 && ls "$W/mnt-restic/snapshots/latest/" >/dev/null 2>&1 && break
  sleep 0.2
done
LB_IMG="$W/mnt-lifeboat/m1/latest/disk0.img"
LB_SMALL="$W/mnt-lifeboat/m1/latest/disk0/p1/small"
RS_ROOT="$W/mnt-restic/snapshots/latest"
RS_IMG="$(find "$RS_ROOT/" -name disk.img -print -quit)"
RS_SMALL="$(dirname "$RS_IMG")/small"
ls -la "$LB_IMG" "$RS_IMG"
[ "$(ls "$LB_SMALL" | wc -l)" = "$FILES" ] && [ "$(ls "$RS_SMALL" | wc -l)" = "$FILES" ]

read_img() { cat "$1" >/dev/null; }
read_small() { find "$1" -type f -print0 | xargs -0 cat >/dev/null; }
bench() { # name function path
  local times=()
  for _ in $(seq "$RUNS"); do
    drop_caches
    local t0 t1
    t0=$(now)
    "$2" "$3"
    t1=$(now)
    times+=("$(echo "$t1 - $t0" | bc)")
  done
  local med
  med="$(printf '%s\n' "${times[@]}" | median)"
  echo "$1: runs ${times[*]} s, median $med s" >&2
  echo "$med"
}

echo "== checksums agree"
[ "$(cmp "$LB_IMG" "$W/data/disk.img" && echo same)" = same ]
[ "$(cmp "$RS_IMG" "$W/data/disk.img" && echo same)" = same ]

echo "== 1 GiB DISK.img, sequential"
LB_T="$(bench lifeboat read_img "$LB_IMG")"
RS_T="$(bench restic read_img "$RS_IMG")"
SIZE_MB="$(echo "$(stat -c %s "$W/data/disk.img") / 1000000" | bc -l)"
echo "== $FILES small files"
LBS_T="$(bench lifeboat read_small "$LB_SMALL")"
RSS_T="$(bench restic read_small "$RS_SMALL")"

printf '\n%-28s %12s %12s %8s\n' "" "lifeboat" "restic" "ratio"
printf '%-28s %9.1f MB/s %9.1f MB/s %7.2fx\n' "1 GiB DISK.img read" \
  "$(echo "$SIZE_MB / $LB_T" | bc -l)" "$(echo "$SIZE_MB / $RS_T" | bc -l)" "$(echo "$RS_T / $LB_T" | bc -l)"
printf '%-28s %10.2f s  %10.2f s  %7.2fx\n' "$FILES small files read" "$LBS_T" "$RSS_T" "$(echo "$RSS_T / $LBS_T" | bc -l)"
