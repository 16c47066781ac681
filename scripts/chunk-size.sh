#!/usr/bin/env bash
# Chunk size of manifests (issue 20) and the peer protocol's chunking (issue 14): builds two
# successive ext4 images of a system tree offline (no mounts, no root needed for the images, no
# network) and measures with examples/chunk_size.rs how much of the new build a delta transfer
# would send with each chunking (fixed sizes, a gear-hash CDC, the fastcdc crate), what that
# weighs after zstd level 1 with the manifest, the size of manifests and chunk indexes, BLAKE3's
# throughput per chunk size, and the CPU each chunking costs (cutting, BLAKE3, zstd-1).
#
#   scripts/chunk-size.sh [--no-build] [--keep] [--tmpdir DIR]
#
# Build A: a 1 GiB raw file made by `mkfs.ext4 -d` from a copy of /usr/bin, /usr/lib/python3*
# and /usr/share without locale, man pages and package lists (665 MiB, 28,000 entries here).
# Build B: the same tree after a mimicked package update (binaries rebuilt, Python sources
# edited, docs appended, a new 20 MiB package, a removed package and scattered deletions),
# written three ways:
#   in place  - A's image with the changes written by `debugfs -w` (rm, then write: what a
#               package manager in a running guest does; freed blocks keep their old bytes);
#   seeded    - rebuilt from scratch by mkfs.ext4 -d with A's UUID, hash seed and a fixed
#               E2FSPROGS_FAKE_TIME (a reproducible image build);
#   fresh     - rebuilt from scratch by mkfs.ext4 -d with default options (a new UUID and
#               hash seed, the clock's time: an ordinary image pipeline).
# The in-place and seeded pairs are also converted to qcow2 (qemu-img convert, 64 KiB clusters)
# and the in-place pair to compressed qcow2 (-c). The tables go to stdout (Markdown); progress
# to stderr. Everything runs under nice in a temporary directory removed at exit (--keep keeps
# it). About 4 minutes on 2 cores; at most about 5.5 GB of disk and 2.5 GB of memory.
#
# Environment: CHUNK_SIZE_TREE="DIR ..." (absolute paths copied into the tree instead of the
# defaults), CHUNK_SIZE_IMAGE (image size for mkfs, default 1G).
# --images-only DIR: only builds a.raw, b-inplace.raw, a.qcow2 and b-inplace.qcow2 into DIR
# (no example, no measurement; scripts/bench.sh --only D uses them).

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TMP_PARENT=${TMPDIR:-/tmp}
KEEP=0
BUILD=1
IMAGES_ONLY=
IMAGE_SIZE=${CHUNK_SIZE_IMAGE:-1G}
read -r -a TREE_DIRS <<<"${CHUNK_SIZE_TREE:-/usr/bin /usr/lib/python3 /usr/lib/python3.11 /usr/share}"
NICE=(nice -n 10)
PATH=$PATH:/sbin:/usr/sbin

while (($#)); do
  case $1 in
    --no-build) BUILD=0 ;;
    --keep) KEEP=1 ;;
    --images-only) IMAGES_ONLY=${2:?--images-only needs a directory}; BUILD=0; shift ;;
    --tmpdir) TMP_PARENT=${2:?--tmpdir needs a directory}; shift ;;
    -h|--help) sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "chunk-size.sh: unknown argument $1; see --help." >&2; exit 2 ;;
  esac
  shift
done

for tool in mkfs.ext4 debugfs e2fsck qemu-img python3 tar; do
  command -v "$tool" >/dev/null || { echo "chunk-size.sh: $tool is missing." >&2; exit 1; }
done

WORK=$(mktemp -d "$TMP_PARENT/chunk-size.XXXXXX")
cleanup() {
  if ((KEEP)); then
    echo "chunk-size.sh: kept $WORK" >&2
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT

log() { echo "chunk-size.sh: $(date +%T) $*" >&2; }
STARTED=$SECONDS

if ((BUILD)); then
  log "building the example"
  (cd "$ROOT" && "${NICE[@]}" cargo build --release --quiet --example chunk_size)
fi
BIN=$ROOT/target/release/examples/chunk_size
[[ -n $IMAGES_ONLY || -x $BIN ]] || { echo "chunk-size.sh: $BIN is missing; run without --no-build." >&2; exit 1; }

# ---------------------------------------------------------------- build A's tree
log "copying ${TREE_DIRS[*]}"
mkdir -p "$WORK/a"
rel_dirs=()
for dir in "${TREE_DIRS[@]}"; do rel_dirs+=("${dir#/}"); done
"${NICE[@]}" tar -C / -cf - --exclude=usr/share/locale --exclude=usr/share/man \
  --exclude=usr/share/package-lists "${rel_dirs[@]}" 2>/dev/null |
  "${NICE[@]}" tar -C "$WORK/a" -xf -
printf 'IMAGE_BUILD=1\nIMAGE_DATE=2026-11-01\n' >"$WORK/a/usr/lib/image-build"

# ---------------------------------------------------------------- build B's tree
# B starts as hard links to A's files; every change replaces a file (new inode), so A stays.
cp -al "$WORK/a" "$WORK/b"
log "mimicking a package update in B"
"${NICE[@]}" python3 - "$WORK/b" "$WORK/changes" <<'PY'
import os, random, re, shutil, sys

root, out = sys.argv[1], sys.argv[2]
os.makedirs(out)
rng = random.Random(20)
simple = re.compile(r"^[A-Za-z0-9._+@/-]+$")  # names debugfs takes without quoting
modified, added, added_dirs, deleted, deleted_dirs = [], [], [], [], []

def files(sub, keep=lambda rel, path: True):
    found = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, sub)):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if os.path.isfile(path) and not os.path.islink(path) and simple.match(rel) \
                    and keep(rel, path):
                found.append(rel)
    return found

def rewrite(rel, data):
    path = os.path.join(root, rel)
    tmp = path + ".new"
    with open(tmp, "wb") as f:
        f.write(data)
    shutil.copystat(path, tmp)
    os.replace(tmp, path)  # a new inode: A's hard link keeps the old bytes
    modified.append(rel)

def read(rel):
    with open(os.path.join(root, rel), "rb") as f:
        return f.read()

def is_elf(rel, path):
    if os.path.getsize(path) < 16384:
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"

# Rebuilt binaries (every 15th ELF file over 16 KiB): from a tenth of the file on, every
# 509th byte changes (new addresses throughout), and 2,000 bytes are appended.
for rel in files("usr/bin", is_elf)[::15]:
    data = bytearray(read(rel))
    for i in range(len(data) // 10, len(data), 509):
        data[i] = (data[i] + 1) % 256
    rewrite(rel, bytes(data) + rng.randbytes(2000))

# Edited Python sources (every 40th .py): a line inserted after the first.
for rel in files("usr/lib/python3.11", lambda rel, path: rel.endswith(".py"))[::40]:
    lines = read(rel).split(b"\n")
    rewrite(rel, b"\n".join(lines[:1] + [b"# patched in build 2"] + lines[1:]))

# Documentation appended (every 20th file under usr/share/doc).
for rel in files("usr/share/doc")[::20]:
    rewrite(rel, read(rel) + b"\n" + b"Changes in build 2.\n" * 15)

# The build stamp.
rewrite("usr/lib/image-build", b"IMAGE_BUILD=2\nIMAGE_DATE=2026-11-08\n")

# A new package: about 20 MiB in 12 files of incompressible data (256 KiB to 3 MiB).
pkg = "usr/lib/newpkg-2.0"
os.makedirs(os.path.join(root, pkg))
added_dirs.append(pkg)
total = 0
for n in range(12):
    size = rng.randrange(256 * 1024, 3 * 1024 * 1024)
    if n == 11:
        size = max(64 * 1024, 20 * 1024 * 1024 - total)
    rel = f"{pkg}/part{n:02}.bin"
    with open(os.path.join(root, rel), "wb") as f:
        f.write(rng.randbytes(size))
    added.append(rel)
    total += size

# A removed package: the dist-packages directory closest to 6 MiB whose names are simple.
def tree_size(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs
               if not os.path.islink(os.path.join(d, f)))
base = os.path.join(root, "usr/lib/python3/dist-packages")
candidates = []
for name in sorted(os.listdir(base)):
    path = os.path.join(base, name)
    if os.path.isdir(path) and not os.path.islink(path):
        rels = [os.path.relpath(os.path.join(d, x), root) for d, ds, fs in os.walk(path)
                for x in ds + fs]
        if all(simple.match(r) for r in rels):
            candidates.append((abs(tree_size(path) - 6 * 1024 * 1024), name))
if candidates:
    name = min(candidates)[1]
    path = os.path.join(base, name)
    for d, ds, fs in os.walk(path, topdown=False):
        for f in fs:
            deleted.append(os.path.relpath(os.path.join(d, f), root))
        deleted_dirs.append(os.path.relpath(d, root))
    shutil.rmtree(path)

# Scattered deletions: every 60th file elsewhere under usr/share.
for rel in files("usr/share", lambda rel, path: not rel.startswith("usr/share/doc"))[::60]:
    os.unlink(os.path.join(root, rel))
    deleted.append(rel)

def size(rel):
    return os.path.getsize(os.path.join(root, rel))
written = sum(size(r) for r in modified) + sum(size(r) for r in added)
print(f"{len(modified)} files rewritten, {len(added)} added ({total / 2**20:.1f} MiB), "
      f"{len(deleted)} files and {len(deleted_dirs)} directories deleted; "
      f"B's changed and added files hold {written / 2**20:.1f} MiB "
      f"({written} bytes)", file=sys.stderr)
with open(os.path.join(out, "written-bytes"), "w") as f:
    f.write(f"{written}\n")

# debugfs commands that apply the same changes to A's image. `write` names a file in the
# current directory, so each write cds first.
with open(os.path.join(out, "debugfs.cmds"), "w") as f:
    for rel in deleted:
        f.write(f"rm /{rel}\n")
    for rel in deleted_dirs:
        f.write(f"rmdir /{rel}\n")
    for rel in modified:
        d, name = os.path.split(rel)
        f.write(f"cd /{d}\nrm {name}\nwrite {os.path.join(root, rel)} {name}\n")
    for rel in added_dirs:
        f.write(f"mkdir /{rel}\n")
    for rel in added:
        d, name = os.path.split(rel)
        f.write(f"cd /{d}\nwrite {os.path.join(root, rel)} {name}\n")
PY

# Reading a file updates its atime once after a copy (relatime), and mkfs -d copies atimes:
# read both trees once so that two mkfs runs over the same tree see the same times.
"${NICE[@]}" tar -C "$WORK" -cf - a b | cat >/dev/null

# ---------------------------------------------------------------- the images
UUID=0b1a5e3d-2a94-4d0c-9f2e-7b6c1e0d2a20
SEED=5d2c0c42-8b7e-4b1e-9d7a-3f1f6c1b9e01
FAKE_TIME=1793491200
seeded_mkfs() { # tree image
  E2FSPROGS_FAKE_TIME=$FAKE_TIME "${NICE[@]}" mkfs.ext4 -q -F -L image -U "$UUID" \
    -E "hash_seed=$SEED" -d "$1" "$2" "$IMAGE_SIZE" >&2
}
log "mkfs.ext4 -d: A, A again (control), B seeded, B fresh"
seeded_mkfs "$WORK/a" "$WORK/a.raw"
[[ -n $IMAGES_ONLY ]] || {
seeded_mkfs "$WORK/a" "$WORK/a-again.raw"
if cmp -s "$WORK/a.raw" "$WORK/a-again.raw"; then
  CONTROL="identical"
else
  CONTROL="$(cmp -l "$WORK/a.raw" "$WORK/a-again.raw" | wc -l) bytes differ"
fi
rm "$WORK/a-again.raw"
log "A built twice from the same tree with the same seed, UUID and time: $CONTROL"
seeded_mkfs "$WORK/b" "$WORK/b-seeded.raw"
"${NICE[@]}" mkfs.ext4 -q -F -L image -d "$WORK/b" "$WORK/b-fresh.raw" "$IMAGE_SIZE" >&2
}

log "B in place: debugfs -w on a copy of A"
cp --sparse=always "$WORK/a.raw" "$WORK/b-inplace.raw"
E2FSPROGS_FAKE_TIME=$FAKE_TIME "${NICE[@]}" debugfs -w -f "$WORK/changes/debugfs.cmds" \
  "$WORK/b-inplace.raw" >"$WORK/debugfs.log" 2>&1
# debugfs echoes each command and the inodes it allocates; anything else is an error.
debugfs_said() { grep -v -e '^debugfs' -e '^$' -e '^Allocated inode: ' "$WORK/debugfs.log"; }
if debugfs_said >/dev/null; then
  echo "chunk-size.sh: debugfs said:" >&2
  debugfs_said | head -20 >&2
  exit 1
fi
"${NICE[@]}" e2fsck -fn "$WORK/b-inplace.raw" >"$WORK/e2fsck.log" 2>&1 || {
  echo "chunk-size.sh: e2fsck finds the in-place image damaged:" >&2
  tail -20 "$WORK/e2fsck.log" >&2
  exit 1
}
WRITTEN=$(cat "$WORK/changes/written-bytes")
rm -rf "$WORK/a" "$WORK/b"
if [[ -n $IMAGES_ONLY ]]; then
  mkdir -p "$IMAGES_ONLY"
  for name in a b-inplace; do
    "${NICE[@]}" qemu-img convert -O qcow2 "$WORK/$name.raw" "$WORK/$name.qcow2"
    mv "$WORK/$name.raw" "$WORK/$name.qcow2" "$IMAGES_ONLY/"
  done
  log "a.raw, b-inplace.raw, a.qcow2, b-inplace.qcow2 in $IMAGES_ONLY ($((SECONDS - STARTED)) s)"
  exit 0
fi

log "qemu-img convert: qcow2 of A, B in place, B seeded; compressed qcow2 of A, B in place"
for name in a b-inplace b-seeded; do
  "${NICE[@]}" qemu-img convert -O qcow2 "$WORK/$name.raw" "$WORK/$name.qcow2"
done
for name in a b-inplace; do
  "${NICE[@]}" qemu-img convert -c -O qcow2 "$WORK/$name.raw" "$WORK/$name.c.qcow2"
done
log "disk use: $(du -sh "$WORK" | cut -f1)"

# ---------------------------------------------------------------- measure
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
file_mib() { mib "$(stat -c %s "$1")"; }
data_mib() { mib "$(($(stat -c %b "$1") * 512))"; }
echo "## Chunk size of manifests: raw figures"
echo
echo "Made by \`scripts/chunk-size.sh\` on $(date -u +%FT%TZ): $(nproc) CPUs" \
  "($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), $(uname -sr)," \
  "$(mke2fs -V 2>&1 | head -1), $(qemu-img --version | head -1)," \
  "load average $(cut -d' ' -f1-3 /proc/loadavg)."
echo
echo "B's changed and added files hold $(mib "$WRITTEN") MiB: the least any delta can send."
echo "A built twice from the same tree with the same UUID, hash seed and time: $CONTROL."
echo
echo "| file | size (MiB) | allocated (MiB) |"
echo "|---|---|---|"
for f in a.raw b-inplace.raw b-seeded.raw b-fresh.raw a.qcow2 b-inplace.qcow2 b-seeded.qcow2 \
  a.c.qcow2 b-inplace.c.qcow2; do
  echo "| $f | $(file_mib "$WORK/$f") | $(data_mib "$WORK/$f") |"
done
echo
log "measuring (throughput on a.qcow2, CPU per chunking on b-inplace.qcow2, then the pairs)"
cd "$WORK"
"${NICE[@]}" "$BIN" --cdc --fastcdc --throughput a.qcow2 --cpu b-inplace.qcow2 \
  --pair "raw, B modified in place (debugfs)" a.raw b-inplace.raw \
  --pair "raw, B rebuilt, seeded mkfs (same UUID, hash seed, time)" a.raw b-seeded.raw \
  --pair "raw, B rebuilt, fresh mkfs (defaults)" a.raw b-fresh.raw \
  --pair "qcow2 of the in-place pair" a.qcow2 b-inplace.qcow2 \
  --pair "qcow2 of the seeded pair" a.qcow2 b-seeded.qcow2 \
  --pair "compressed qcow2 (-c) of the in-place pair" a.c.qcow2 b-inplace.c.qcow2

echo "Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
log "done in $((SECONDS - STARTED)) s"
