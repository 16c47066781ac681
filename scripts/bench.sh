#!/usr/bin/env bash
# The project's benchmark: figures P1-P7 and R1 of the goals, written to BENCHMARKS.md.
#
#   scripts/bench.sh                 full sizes (about 10 minutes), writes BENCHMARKS.md
#   scripts/bench.sh --quick         tiny sizes (well under 2 minutes), writes a temp file
#   scripts/bench.sh --out FILE      write the report elsewhere
#
# It builds the release binary, sets up data directories in a temporary directory through the
# CLI, starts `image-replicator serve` on 127.0.0.1 (any free port), drives HTTP load with wrk
# (installed from Debian's packages if missing), times copies through the API against cp,
# b3sum (installed with cargo into ~/.cache/image-replicator/b3sum if missing) and sha512sum,
# kills a capped copy with SIGKILL and times its resume (R1), reads the server's memory from
# /proc, and writes the report. Every process it
# starts is stopped, and the temporary directory removed, when it exits (--keep keeps the
# directory). Ratios are measured side by side: both sides of a pair run back to back, the
# pairs are repeated (3 times in full mode), and the report gives the median ratio.
#
# Options: --quick, --out FILE, --reps N, --duration SECONDS (of each wrk run),
#          --tmpdir DIR (where the data goes; default $TMPDIR or /tmp), --keep, --no-build,
#          --no-glance (skip G1, which starts two real Glances from the venv that
#          scripts/openstack-venv.sh makes: about 80 s and 300 MB the first time),
#          --bin PATH (measure this binary, build nothing; CI passes its debug build to
#          --quick, whose figures only show that the benchmark still runs).
# Environment: BENCH_WRK_THREADS (default 2), BENCH_CONNECTIONS (default 32) for P1, P2, P4.
#
#   scripts/bench.sh --compare BASE_BIN [--bin NEW_BIN] [--only P1,P2,P3,P4,P5]
#
# Comparison mode (scripts/bench/compare.sh): P1-P5 of two binaries in one run, each figure's
# runs of the two back to back, the order alternating per rep (base-new, new-base, ...: ABBA,
# so a drift of the machine cancels), the same sizes and load for both. It reports per figure
# the base and the new value, the median over reps of new/base, and whether that is within
# +-10 %, as the section "Side by side" of BENCHMARKS.md (the rest of the file is kept; in
# --quick mode a temp file). NEW_BIN defaults to the release build of this checkout (built
# unless --no-build). Default reps: 4 (2 with --quick).
#
#   scripts/bench.sh --only D [--quick]
#
# Peer appliances (issue 14, scripts/bench/peer.sh): figures D1-D4 only, two appliances on
# loopback with a counting relay (scripts/bench/relay.py) between them, images from
# scripts/chunk-size.sh --images-only (CHUNK_SIZE_IMAGE, default 512M; 160M with --quick). It
# writes scripts/bench/peer.md (a temp file with --quick) and puts it into BENCHMARKS.md, the
# rest of which is kept (a full run carries scripts/bench/peer.md along). About 5 minutes.
# Environment: BENCH_PEER_THIN_RATE (bytes/s of the thin link, default 25000000),
# BENCH_PEER_FORMATS (default "raw qcow2"), BENCH_PEER_PERF=DIR (profile one more copy with perf).
#
#   scripts/bench.sh --only I [--quick]
#
# The images API (issue 15, scripts/bench/images.sh): figures I1 (upload) and I2 (download)
# only, a 1 GiB image of random data (64 MiB with --quick) through the appliance's
# /v2/images/ID/file, through a real Glance 33 (file store; the venv of
# scripts/openstack-venv.sh) and with cp, the same file system, 3 reps (1 with --quick). It
# puts its section into BENCHMARKS.md (a temp file with --quick), the rest of which is kept.
# About 2 minutes. Environment: BENCH_IMAGES_MIB (the image's size), BENCH_IMAGES_PERF=DIR
# (one more upload and download under perf record).

#
#   scripts/bench.sh --only S [--quick] [--reps N] [--duration S]
#
# Several appliances on one PostgreSQL (issue 16, scripts/bench/shared-db.py): S1 (durable
# creates on sled, on PostgreSQL with one appliance and with two), S2 (kill -9 of the
# appliance holding a copy, 20 times: lost, finished twice, differing, takeover time) and P1/P3
# on PostgreSQL beside sled, with its own PostgreSQL cluster (Debian's postgresql). It puts its
# section into BENCHMARKS.md (printed only with --quick). About 8 minutes (30 s with --quick).
#
#   scripts/bench.sh --only G [--quick] [--reps N] [--duration S] [--tmpdir DIR] [--keep]
#
# Costs as the store grows (issue 18, scripts/bench/growth.py): one data directory seeded
# step by step to 10k, 100k, 300k and 1M jobs (1k, 5k, 10k with --quick) through the running
# server with `job seed`; per size idle RSS, start-up, the first and second `/metrics` after a
# job change, bytes on disk per job, seed time and peak memory, `GET /jobs` p50/p99; then
# POST /jobs at 1, 8, 32 and 128 connections on a fresh store, each beside a write+fdatasync
# loop with as many threads on the same file system, with POSTs per fdatasync (perf, else
# strace) and server CPU per POST. It puts its section into BENCHMARKS.md (a temp file, printed,
# with --quick). About 10 minutes (under a minute with --quick). Environment:
# BENCH_SEED_BATCH (jobs per `job seed` call; default: one call per size).

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HELPER="$ROOT/scripts/bench/helper.py"
COMMAND_LINE="scripts/bench.sh${*:+ $*}"

MODE=full
OUT=
REPS=
DURATION=
TMP_PARENT=${TMPDIR:-/tmp}
KEEP=0
BUILD=1
GLANCE=1
BIN=
COMPARE=
ONLY=P1,P2,P3,P4,P5

usage() {
  sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

while (($#)); do
  case $1 in
    --quick) MODE=quick ;;
    --out) OUT=${2:?--out needs a file}; shift ;;
    --out=*) OUT=${1#--out=} ;;
    --reps) REPS=${2:?--reps needs a number}; shift ;;
    --duration) DURATION=${2:?--duration needs seconds}; shift ;;
    --tmpdir) TMP_PARENT=${2:?--tmpdir needs a directory}; shift ;;
    --keep) KEEP=1 ;;
    --no-build) BUILD=0 ;;
    --no-glance) GLANCE=0 ;;
    --bin) BIN=$(realpath -- "${2:?--bin needs a path}"); shift ;;
    --compare) COMPARE=$(realpath -- "${2:?--compare needs the base binary}"); shift ;;
    --only) ONLY=${2:?--only needs a list such as P1,P3}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "bench.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# As given (the defaults below are bench.sh's own; scripts/bench/growth.py has its own).
REPS_GIVEN=$REPS DURATION_GIVEN=$DURATION

PEER=0
if [[ ,$ONLY, == *,D* ]]; then
  [[ -z $COMPARE ]] || { echo "bench.sh: the peer figures (D) have no --compare mode." >&2; exit 2; }
  PEER=1
fi
IMAGES=0
if [[ ,$ONLY, == *,I* ]]; then
  [[ -z $COMPARE && $PEER == 0 ]] || { echo "bench.sh: the images figures (I) run alone, without --compare." >&2; exit 2; }
  IMAGES=1
fi
if [[ -n $COMPARE && -z $REPS ]]; then
  REPS=4
  [[ $MODE == quick ]] && REPS=2
fi

MIB=$((1024 * 1024))
if [[ $MODE == quick ]]; then
  : "${REPS:=1}" "${DURATION:=2}"
  WARMUP=1
  OTHER_JOBS=1000
  COPY_BYTES=$((16 * MIB))
  R1_BYTES=$((64 * MIB))
  R1_CAP=20M
  SPARSE_BYTES=$((64 * MIB))
  SPARSE_PIECES=4
  PIECE_MIB=1
  GLANCE_MIB=16
else
  : "${REPS:=3}" "${DURATION:=10}"
  WARMUP=2
  OTHER_JOBS=100000
  COPY_BYTES=$((1024 * MIB))
  R1_BYTES=$COPY_BYTES
  R1_CAP=100M
  SPARSE_BYTES=$((4096 * MIB))
  SPARSE_PIECES=16
  PIECE_MIB=16
  GLANCE_MIB=256
fi
SPARSE_DATA_BYTES=$((SPARSE_PIECES * PIECE_MIB * MIB))
R1_KILL_PERCENT=85
# API copies poll their job this often (seconds); P6 takes a fraction of a second.
POLL=0.01
THREADS=${BENCH_WRK_THREADS:-2}
CONNS=${BENCH_CONNECTIONS:-32}
JOBS_PATH=/v2/extension/image_replicator/jobs

# Fixed lab identities (Keystone-style tenant ids), the same in every run.
T1=1b0e5c9a2f3d4e6b8a7c0d1e2f3a4b5c   # ot1: 10 jobs (P1), source of the copies and of P4
T2=2c1f6d0b3a4e5f7c9b8d1e2f3a4b5c6d   # ot2: destination of the copies
T3=3d2a7e1c4b5f6a8d0c9e2f3a4b5c6d7e   # ot1: 100 jobs (P3)
TO=4e3b8f2d5c6a7b9e1d0f3a4b5c6d7e8f   # ot2: the other tenant of P3's big store, no token
IMG_SMALL=5f4c9a3e-6d7b-4c8f-a2e1-4b5c6d7e8f90
IMG_COPY=6a5d0b4f-7e8c-4d9a-b3f2-5c6d7e8f9a01
IMG_SPARSE=7b6e1c5a-8f9d-4eab-84a3-6d7e8f9a0b12
IMG_R1=8c7f2d6b-9a0e-4fbc-95b4-7e8f9a0b1c23   # R1's source when it is not the P5 image (--quick)

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

# ----- processes we start, and their cleanup ---------------------------------------------------

declare -A SRV_PID=() SRV_PORT=()
SAMPLER_PID=
WRK_PID=
STRACE_PID=
LOAD_PID=
TMP=

cleanup() {
  local rc=$? name pid i
  trap - EXIT INT TERM
  [[ -n $SAMPLER_PID ]] && kill "$SAMPLER_PID" 2>/dev/null
  [[ -n $WRK_PID ]] && kill "$WRK_PID" 2>/dev/null
  [[ -n $STRACE_PID ]] && kill -INT "$STRACE_PID" 2>/dev/null
  [[ -n $LOAD_PID ]] && kill "$LOAD_PID" 2>/dev/null
  for name in "${!SRV_PID[@]}"; do
    kill -TERM "${SRV_PID[$name]}" 2>/dev/null || true
  done
  for name in "${!SRV_PID[@]}"; do
    pid=${SRV_PID[$name]}
    for ((i = 0; i < 100; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    { wait "$pid"; } 2>/dev/null || true
  done
  if [[ -n $TMP && -d $TMP ]]; then
    if ((KEEP)); then
      log "kept $TMP"
    else
      rm -rf "$TMP"
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

py() { python3 "$HELPER" "$@"; }

# ----- prerequisites ----------------------------------------------------------------------------

command -v python3 >/dev/null || die "python3 is needed"
command -v cargo >/dev/null || die "cargo is needed"
if ((PEER == 0 && IMAGES == 0)) && ! command -v wrk >/dev/null; then
  log "installing wrk from Debian's packages"
  SUDO=
  ((EUID == 0)) || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq wrk >/dev/null
  command -v wrk >/dev/null || die "wrk could not be installed"
fi

# b3sum, the BLAKE3 team's CLI (P5's floor for hashing): from PATH, else installed once with
# cargo into a cache of its own (idempotent: an installed one is used as it is). --quick goes
# on without it, with a note in the report.
B3SUM=$(command -v b3sum || true)
B3SUM_NOTE=
B3SUM_ROOT=${HOME:+$HOME/.cache/image-replicator/b3sum}
if [[ -z $B3SUM && -n $B3SUM_ROOT && -x $B3SUM_ROOT/bin/b3sum ]]; then
  B3SUM=$B3SUM_ROOT/bin/b3sum
fi
if [[ -z $B3SUM ]] && ((PEER == 0 && IMAGES == 0)) && [[ ,$ONLY, != *,G* ]]; then
  if [[ -n $B3SUM_ROOT ]]; then
    log "installing b3sum: cargo install --locked b3sum --root $B3SUM_ROOT"
    mkdir -p "$B3SUM_ROOT"
    if nice -n 10 cargo install --locked b3sum --root "$B3SUM_ROOT" >"$B3SUM_ROOT/install.log" 2>&1 &&
      [[ -x $B3SUM_ROOT/bin/b3sum ]]; then
      B3SUM=$B3SUM_ROOT/bin/b3sum
    else
      B3SUM_NOTE="b3sum could not be installed (cargo install --locked b3sum --root $B3SUM_ROOT: $(tail -n 1 "$B3SUM_ROOT/install.log" | cut -c1-200))"
    fi
  else
    B3SUM_NOTE="b3sum is not on PATH and HOME is not set, so there is no cache to install it into"
  fi
  if [[ -n $B3SUM_NOTE ]]; then
    [[ $MODE == quick ]] || die "$B3SUM_NOTE"
    log "$B3SUM_NOTE; --quick goes on without b3sum"
  fi
fi

cd "$ROOT"
if [[ -z $BIN ]]; then
  BIN=$ROOT/target/release/image-replicator
  if ((BUILD)); then
    log "building: cargo build --release --locked"
    cargo build --release --locked >&2
  fi
fi
[[ -x $BIN ]] || die "$BIN is missing (build with cargo build --release --locked)"
if [[ ,$ONLY, == *,S* ]]; then
  [[ -z $COMPARE && $PEER == 0 && $IMAGES == 0 ]] || die "the shared-database figures (S) run alone"
  shared=(--bin "$BIN")
  [[ $MODE == quick ]] && shared+=(--quick --no-write)
  [[ -n $REPS ]] && shared+=(--reps "$REPS")
  [[ -n $DURATION ]] && shared+=(--duration "$DURATION")
  [[ -n $OUT ]] && shared+=(--out "$OUT")
  exec python3 "$ROOT/scripts/bench/shared-db.py" "${shared[@]}"
fi
if [[ ,$ONLY, == *,G* ]]; then
  [[ -z $COMPARE && $PEER == 0 && $IMAGES == 0 ]] || die "the growth figures (G) run alone"
  growth=(--bin "$BIN" --tmpdir "$TMP_PARENT" --command "$COMMAND_LINE")
  [[ $MODE == quick ]] && growth+=(--quick)
  ((KEEP)) && growth+=(--keep)
  [[ -n $REPS_GIVEN ]] && growth+=(--reps "$REPS_GIVEN")
  [[ -n $DURATION_GIVEN ]] && growth+=(--duration "$DURATION_GIVEN")
  [[ -n $OUT ]] && growth+=(--out "$OUT")
  [[ -n ${BENCH_SEED_BATCH:-} ]] && growth+=(--seed-batch "$BENCH_SEED_BATCH")
  exec python3 "$ROOT/scripts/bench/growth.py" "${growth[@]}"
fi
[[ -z $COMPARE || -x $COMPARE ]] || die "the base binary $COMPARE is missing or not executable"

mkdir -p "$TMP_PARENT"
TMP=$(mktemp -d "$TMP_PARENT/image-replicator-bench.XXXXXX")
RESULTS=$TMP/results.jsonl
SETUP_LOG=$TMP/setup-commands.txt
: >"$RESULTS"
: >"$SETUP_LOG"
if [[ -z $OUT ]]; then
  if [[ $MODE == quick ]]; then
    OUT=$(mktemp --suffix=.md "$TMP_PARENT/image-replicator-bench-quick.XXXXXX")
  else
    OUT=$ROOT/BENCHMARKS.md
  fi
fi
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

# Space: the copy source, our copy and cp's copy at once, the sparse images' data four times,
# the big store (about 2 KiB a job), the logs of one wrk run, and a margin.
# R1 reuses the P5 image unless their sizes differ (--quick): then its source and copy too.
need_kib=$(((3 * COPY_BYTES + 4 * SPARSE_DATA_BYTES) / 1024 + OTHER_JOBS * 3 + 512 * 1024))
((R1_BYTES == COPY_BYTES)) || need_kib=$((need_kib + 2 * R1_BYTES / 1024))
((PEER == 0)) || need_kib=$((512 * 1024)) # scripts/bench/peer.sh checks its own once it has the images
((IMAGES == 0)) || need_kib=$((512 * 1024)) # and scripts/bench/images.sh its own
free_kib=$(df -Pk "$TMP" | awk 'NR == 2 {print $4}')
((free_kib > need_kib)) || die "$TMP has $((free_kib / 1024)) MiB free; the benchmark needs $((need_kib / 1024)) MiB"
log "mode $MODE: $REPS rep(s), ${DURATION}s wrk runs, data in $TMP ($((free_kib / 1024)) MiB free, needs $((need_kib / 1024)) MiB)"
[[ -z $B3SUM_NOTE ]] || py record "$RESULTS" kind=check id=b3sum ok=false "detail=$B3SUM_NOTE; P5 is measured without it"

TOK1=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
TOK3=$(python3 -c 'import secrets; print(secrets.token_hex(16))')

# How ir notes secrets (value -> name) and the id of an image it deletes.
# shellcheck disable=SC2016 # names, shown as they are
declare -A SHOWN_AS=([$TOK1]='$TOKEN_T1' [$TOK3]='$TOKEN_T3')
# shellcheck disable=SC2016
DELETED_AS='$DESTINATION_IMAGE_ID'

# ir LABEL DIR ARGS...: runs the CLI on a data directory and notes the command (tokens and
# paths as names) for the report.
ir() {
  local label=$1 dir=$2 secret
  shift 2
  local shown="image-replicator --data-dir \$DIR_$label $*"
  for secret in "${!SHOWN_AS[@]}"; do
    shown=${shown//$secret/${SHOWN_AS[$secret]}}
  done
  shown=${shown//$TMP/\$TMP}
  [[ $1 == image && ${2:-} == delete ]] && shown="image-replicator --data-dir \$DIR_$label image delete $DELETED_AS"
  grep -qxF -- "$shown" "$SETUP_LOG" || printf '%s\n' "$shown" >>"$SETUP_LOG"
  "$BIN" --data-dir "$dir" "$@"
}

# ----- servers ----------------------------------------------------------------------------------

# start_server NAME DIR [serve options]: sets SRV_PID[NAME] and SRV_PORT[NAME].
start_server() {
  local name=$1 dir=$2 i port=
  shift 2
  : >"$TMP/$name.out"
  # O_APPEND (>>), so the log can be emptied between runs without leaving a hole.
  "$BIN" serve --listen 127.0.0.1:0 --data-dir "$dir" "$@" >"$TMP/$name.out" 2>>"$TMP/$name.log" &
  SRV_PID[$name]=$!
  for ((i = 0; i < 600; i++)); do
    port=$(grep -o -m1 'listening on http://127\.0\.0\.1:[0-9]*' "$TMP/$name.out" | grep -o '[0-9]*$' || true)
    [[ -n $port ]] && break
    kill -0 "${SRV_PID[$name]}" 2>/dev/null || { tail -n 20 "$TMP/$name.log" >&2; die "server $name exited at start"; }
    sleep 0.1
  done
  [[ -n $port ]] || die "server $name did not start within 60 s"
  SRV_PORT[$name]=$port
  log "server $name: pid ${SRV_PID[$name]}, http://127.0.0.1:$port, serve${*:+ $*}"
}

# stop_server NAME [SIGNAL] (stderr muted: bash would announce a SIGKILLed job as "Killed")
stop_server() {
  local name=$1 sig=${2:-TERM} pid=${SRV_PID[$1]} i
  {
    kill "-$sig" "$pid"
    for ((i = 0; i < 200; i++)); do
      kill -0 "$pid" || break
      sleep 0.1
    done
    if ! kill -0 "$pid"; then wait "$pid" || true; fi
  } 2>/dev/null
  kill -0 "$pid" 2>/dev/null && die "server $name did not stop within 20 s of SIG$sig"
  unset "SRV_PID[$name]" "SRV_PORT[$name]"
}

# Keeps the server's log small (one request line per request): notes warnings and errors,
# then empties it.
drain_log() {
  local name=$1 what=$2 problems
  problems=$(grep -c -E ' (WARN|ERROR) ' "$TMP/$name.log" || true)
  if ((problems > 0)); then
    grep -E ' (WARN|ERROR) ' "$TMP/$name.log" | head -n 5 >&2
    py record "$RESULTS" kind=check id=log ok=false \
      "detail=server $name logged $problems warning/error line(s) during $what, e.g. $(grep -m1 -E ' (WARN|ERROR) ' "$TMP/$name.log" | cut -c1-200)"
  fi
  tail -n 200 "$TMP/$name.log" >"$TMP/$name.log.tail"
  : >"$TMP/$name.log"
}

rss_kib() { awk -v key="$2:" '$1 == key {print $2}' "/proc/$1/status"; }

start_sampler() {
  local pid=$1 file=$2
  (while [[ -r /proc/$pid/status ]]; do
    awk '$1 == "VmRSS:" {print $2}' "/proc/$pid/status" 2>/dev/null || true
    sleep 0.1
  done) >"$file" &
  SAMPLER_PID=$!
}

stop_sampler() {
  [[ -n $SAMPLER_PID ]] || return 0
  kill "$SAMPLER_PID" 2>/dev/null || true
  wait "$SAMPLER_PID" 2>/dev/null || true
  SAMPLER_PID=
}

# ----- wrk --------------------------------------------------------------------------------------

# run_wrk ID VARIANT REP ORDER SERVER SECONDS CONNECTIONS THREADS SCRIPT PATH TOKEN_NAME [SAMPLE]
# TOKEN_NAME is T1, T3 or - (none); SAMPLE=rss samples the server's VmRSS every 100 ms.
run_wrk() {
  local id=$1 variant=$2 rep=$3 order=$4 srv=$5 secs=$6 conns=$7 threads=$8 script=$9
  local path=${10} token_name=${11} sample=${12:-}
  local pid=${SRV_PID[$srv]} port=${SRV_PORT[$srv]} token='' env_shown=''
  local -a args=(-t"$threads" -c"$conns" -d"${secs}s" --timeout 10s)
  case $token_name in
    T1) token=$TOK1 ;;
    T3) token=$TOK3 ;;
  esac
  [[ -n $token ]] && args+=(-H "X-Auth-Token: $token")
  args+=(-s "scripts/bench/$script" "http://127.0.0.1:$port$path")
  local shown="wrk ${args[*]}"
  shown=${shown/X-Auth-Token: $token/\'X-Auth-Token: \$TOKEN_$token_name\'}
  local url="http://127.0.0.1:$port$path"
  shown=${shown/"$url"/\"http://127.0.0.1:\$PORT_$srv$path\"}
  [[ $script == post-job.lua ]] && env_shown="BENCH_POST_BODY='$BENCH_POST_BODY' "
  local base=$TMP/run
  py metrics "$port" >"$base.m0"
  py snap "$pid" >"$base.s0"
  [[ $sample == rss ]] && start_sampler "$pid" "$base.rss"
  wrk "${args[@]}" >"$base.out" 2>&1 &
  WRK_PID=$!
  wait "$WRK_PID" || { cat "$base.out" >&2; die "wrk failed ($shown)"; }
  WRK_PID=
  stop_sampler
  py snap "$pid" >"$base.s1"
  py metrics "$port" >"$base.m1"
  local -a extra=()
  [[ $sample == rss ]] && extra=(--rss-samples "$base.rss")
  py wrk-record "$RESULTS" "$base.out" "$base.s0" "$base.s1" \
    "id=$id" "variant=$variant" "rep=$rep" "order=$order" "server=$srv" "cmd=$env_shown$shown" \
    "connections=$conns" "threads=$threads" "seconds=$secs" \
    --metrics-before "$base.m0" --metrics-after "$base.m1" "${extra[@]}"
  drain_log "$srv" "$id $variant"
}

# ----- data -------------------------------------------------------------------------------------

if ((PEER)); then
  # shellcheck source=scripts/bench/peer.sh
  source "$ROOT/scripts/bench/peer.sh"
  exit 0
fi
if ((IMAGES)); then
  # shellcheck source=scripts/bench/images.sh
  source "$ROOT/scripts/bench/images.sh"
  exit 0
fi

log "preparing data"
# shellcheck disable=SC2016 # shown, not run
{
  echo 'head -c 4K /dev/urandom >$TMP/small.bin'
  echo "scripts/bench/helper.py jobs \$TMP/jobs-t1.json --tenant $T1 --region ot1 --count 10 --seed 1"
  echo "scripts/bench/helper.py jobs \$TMP/jobs-t3.json --tenant $T3 --region ot1 --count 100 --seed 3"
  echo "scripts/bench/helper.py jobs \$TMP/jobs-other.json --tenant $TO --region ot2 --count $OTHER_JOBS --seed 9"
} >>"$SETUP_LOG"
head -c 4096 /dev/urandom >"$TMP/small.bin"
py jobs "$TMP/jobs-t1.json" --tenant "$T1" --region ot1 --count 10 --seed 1
py jobs "$TMP/jobs-t3.json" --tenant "$T3" --region ot1 --count 100 --seed 3
py jobs "$TMP/jobs-other.json" --tenant "$TO" --region ot2 --count "$OTHER_JOBS" --seed 9

# setup_http_store LABEL DIR: the HTTP benchmarks' store (A without, B with the other jobs).
setup_http_store() {
  local label=$1 dir=$2
  ir "$label" "$dir" region add ot1 >/dev/null
  ir "$label" "$dir" region add ot2 >/dev/null
  ir "$label" "$dir" tenant add "$T1" --region ot1 >/dev/null
  ir "$label" "$dir" tenant add "$T2" --region ot2 >/dev/null
  ir "$label" "$dir" tenant add "$T3" --region ot1 >/dev/null
  ir "$label" "$dir" tenant add "$TO" --region ot2 >/dev/null
  ir "$label" "$dir" user add bench --tenant "$T1" --tenant "$T2" --tenant "$T3" >/dev/null
  ir "$label" "$dir" token issue --user bench --tenant "$T1" --token "$TOK1" >/dev/null
  ir "$label" "$dir" token issue --user bench --tenant "$T3" --token "$TOK3" >/dev/null
  ir "$label" "$dir" image import "$TMP/small.bin" --tenant "$T1" --name bench-small --id "$IMG_SMALL" >/dev/null
  if [[ $label == B* ]]; then
    local t0 t1
    t0=$(date +%s.%N)
    ir "$label" "$dir" job seed "$TMP/jobs-other.json" >/dev/null
    t1=$(date +%s.%N)
    py record "$RESULTS" kind=check id=seed ok=info "store=$label" \
      "detail=seeding $OTHER_JOBS other-tenant jobs with job seed took $(python3 -c "print(f'{$t1 - $t0:.1f}')") s"
  fi
  ir "$label" "$dir" job seed "$TMP/jobs-t1.json" >/dev/null
  ir "$label" "$dir" job seed "$TMP/jobs-t3.json" >/dev/null
}

# check_list SERVER TOKEN COUNT: the token works and the list has the expected length.
check_list() {
  local srv=$1 token=$2 want=$3 got
  got=$(python3 - "${SRV_PORT[$srv]}" "$token" <<'PY'
import json, sys, urllib.request
req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/v2/extension/image_replicator/jobs",
                             headers={"X-Auth-Token": sys.argv[2]})
print(len(json.load(urllib.request.urlopen(req))))
PY
  )
  [[ $got == "$want" ]] || die "server $srv lists $got jobs, expected $want"
}

# Comparison mode (scripts/bench/compare.sh) takes over here: the data above, its own sequence.
if [[ -n $COMPARE ]]; then
  # shellcheck source=scripts/bench/compare.sh
  source "$ROOT/scripts/bench/compare.sh"
  exit 0
fi

setup_http_store A "$TMP/A"
setup_http_store B "$TMP/B"

log "preparing the copy sources ($((COPY_BYTES / MIB)) MiB; sparse $((SPARSE_BYTES / MIB)) MiB holding $((SPARSE_DATA_BYTES / MIB)) MiB)"
C=$TMP/C
ir C "$C" region add ot1 >/dev/null
ir C "$C" region add ot2 >/dev/null
ir C "$C" tenant add "$T1" --region ot1 >/dev/null
ir C "$C" tenant add "$T2" --region ot2 >/dev/null
ir C "$C" user add bench --tenant "$T1" --tenant "$T2" >/dev/null
ir C "$C" token issue --user bench --tenant "$T1" --token "$TOK1" >/dev/null
dd if=/dev/urandom of="$TMP/copy-source.bin" bs=1M count=$((COPY_BYTES / MIB)) status=none
echo "dd if=/dev/urandom of=\$TMP/copy-source.bin bs=1M count=$((COPY_BYTES / MIB))" >>"$SETUP_LOG"
ir C "$C" image import "$TMP/copy-source.bin" --tenant "$T1" --name bench-copy --id "$IMG_COPY" >/dev/null
rm -f "$TMP/copy-source.bin"
truncate -s "$SPARSE_BYTES" "$TMP/sparse-source.raw"
stride_mib=$((SPARSE_BYTES / MIB / SPARSE_PIECES))
for ((i = 0; i < SPARSE_PIECES; i++)); do
  dd if=/dev/urandom of="$TMP/sparse-source.raw" bs=1M count="$PIECE_MIB" \
    seek=$((i * stride_mib + stride_mib / 2)) conv=notrunc status=none
done
# shellcheck disable=SC2016 # the command is shown, not run
printf 'truncate -s %s $TMP/sparse-source.raw; for i in 0..%s: dd if=/dev/urandom of=$TMP/sparse-source.raw bs=1M count=%s seek=$((i * %s + %s)) conv=notrunc\n' \
  "$SPARSE_BYTES" "$((SPARSE_PIECES - 1))" "$PIECE_MIB" "$stride_mib" "$((stride_mib / 2))" >>"$SETUP_LOG"
ir C "$C" image import "$TMP/sparse-source.raw" --tenant "$T1" --name bench-sparse --disk-format raw --id "$IMG_SPARSE" >/dev/null
rm -f "$TMP/sparse-source.raw"
R1_IMG=$IMG_COPY
if ((R1_BYTES != COPY_BYTES)); then
  R1_IMG=$IMG_R1
  dd if=/dev/urandom of="$TMP/r1-source.bin" bs=1M count=$((R1_BYTES / MIB)) status=none
  echo "dd if=/dev/urandom of=\$TMP/r1-source.bin bs=1M count=$((R1_BYTES / MIB))" >>"$SETUP_LOG"
  ir C "$C" image import "$TMP/r1-source.bin" --tenant "$T1" --name bench-resume --id "$IMG_R1" >/dev/null
  rm -f "$TMP/r1-source.bin"
fi
COPY_SRC=$C/regions/ot1/$IMG_COPY
SPARSE_SRC=$C/regions/ot1/$IMG_SPARSE
alloc_kib() { echo $(($(stat -c '%b * %B' "$1") / 1024)); }
sparse_alloc=$(alloc_kib "$SPARSE_SRC")
py record "$RESULTS" kind=check id=sparse ok="$([[ $sparse_alloc -le $((SPARSE_DATA_BYTES / 1024 + 1024)) ]] && echo true || echo false)" \
  "detail=the imported sparse source allocates $((sparse_alloc / 1024)) MiB of its $((SPARSE_BYTES / MIB)) MiB (data: $((SPARSE_DATA_BYTES / MIB)) MiB)"

# ----- P1-P3: HTTP on the two stores, both servers up, API only -----------------------------------

start_server A "$TMP/A" --no-worker
start_server B "$TMP/B" --no-worker
sleep 1
py record "$RESULTS" kind=rss name=idle_http "kib=$(rss_kib "${SRV_PID[A]}" VmRSS)" "how=VmRSS 1 s after start, store A (no other jobs)"
py record "$RESULTS" kind=rss name=idle_http_big "kib=$(rss_kib "${SRV_PID[B]}" VmRSS)" "how=VmRSS 1 s after start, store B ($OTHER_JOBS other jobs)"
metrics_time=$(py get-time "http://127.0.0.1:${SRV_PORT[B]}/metrics")
py record "$RESULTS" kind=check id=metrics ok=info \
  "detail=one GET /metrics on store B ($((OTHER_JOBS + 110)) jobs) took $(printf '%s' "$metrics_time" | py field seconds | python3 -c 'import sys; print(f"{float(sys.stdin.read()) * 1000:.0f}")') ms"

# Sanity: the token works, the lists have the expected lengths, a garbage token is refused.
check_list A "$TOK1" 10
check_list A "$TOK3" 100
check_list B "$TOK3" 100

log "warming up (token cache, connections)"
run_wrk warmup-P1 /healthz 0 0 A "$WARMUP" "$CONNS" "$THREADS" report.lua /healthz T1
run_wrk warmup-P1 /jobs 0 0 A "$WARMUP" "$CONNS" "$THREADS" report.lua "$JOBS_PATH" T1
run_wrk warmup-P3 empty-store 0 0 A "$WARMUP" 1 1 report.lua "$JOBS_PATH" T3
run_wrk warmup-P3 big-store 0 0 B "$WARMUP" 1 1 report.lua "$JOBS_PATH" T3

# Each pair runs back to back; odd reps run the baseline first, even reps the other side.
for ((rep = 1; rep <= REPS; rep++)); do
  log "P1 rep $rep/$REPS: GET /jobs (10 jobs) vs GET /healthz, $CONNS connections"
  if ((rep % 2)); then
    run_wrk P1 /healthz "$rep" 1 A "$DURATION" "$CONNS" "$THREADS" report.lua /healthz T1
    run_wrk P1 /jobs "$rep" 2 A "$DURATION" "$CONNS" "$THREADS" report.lua "$JOBS_PATH" T1
  else
    run_wrk P1 /jobs "$rep" 1 A "$DURATION" "$CONNS" "$THREADS" report.lua "$JOBS_PATH" T1
    run_wrk P1 /healthz "$rep" 2 A "$DURATION" "$CONNS" "$THREADS" report.lua /healthz T1
  fi
  # Not part of the ratio: the same route listing nothing, to split authentication from listing.
  run_wrk P1 "/jobs?limit=0" "$rep" 3 A "$DURATION" "$CONNS" "$THREADS" report.lua "$JOBS_PATH?limit=0" T1
done

for ((rep = 1; rep <= REPS; rep++)); do
  log "P2 rep $rep/$REPS: GET /jobs with random tokens vs GET /healthz, $CONNS connections"
  if ((rep % 2)); then
    run_wrk P2 "/healthz random token" "$rep" 1 A "$DURATION" "$CONNS" "$THREADS" random-token.lua /healthz - rss
    run_wrk P2 "/jobs random token" "$rep" 2 A "$DURATION" "$CONNS" "$THREADS" random-token.lua "$JOBS_PATH" - rss
  else
    run_wrk P2 "/jobs random token" "$rep" 1 A "$DURATION" "$CONNS" "$THREADS" random-token.lua "$JOBS_PATH" - rss
    run_wrk P2 "/healthz random token" "$rep" 2 A "$DURATION" "$CONNS" "$THREADS" random-token.lua /healthz - rss
  fi
done

for ((rep = 1; rep <= REPS; rep++)); do
  log "P3 rep $rep/$REPS: GET /jobs (100 jobs), one connection, store with $OTHER_JOBS other jobs vs none"
  if ((rep % 2)); then
    run_wrk P3 empty-store "$rep" 1 A "$DURATION" 1 1 report.lua "$JOBS_PATH" T3
    run_wrk P3 big-store "$rep" 2 B "$DURATION" 1 1 report.lua "$JOBS_PATH" T3
  else
    run_wrk P3 big-store "$rep" 1 B "$DURATION" 1 1 report.lua "$JOBS_PATH" T3
    run_wrk P3 empty-store "$rep" 2 A "$DURATION" 1 1 report.lua "$JOBS_PATH" T3
  fi
done
stop_server B

# ----- P4: durable creates ----------------------------------------------------------------------

export BENCH_POST_BODY="{\"image_id\": \"$IMG_SMALL\", \"tenant_id_dst\": \"$T1\"}"
run_wrk warmup-P4 POST 0 0 A "$WARMUP" "$CONNS" "$THREADS" post-job.lua "$JOBS_PATH" T1
for ((rep = 1; rep <= REPS; rep++)); do
  log "P4 rep $rep/$REPS: POST /jobs, $CONNS connections"
  run_wrk P4 "POST /jobs" "$rep" 1 A "$DURATION" "$CONNS" "$THREADS" post-job.lua "$JOBS_PATH" T1
done
# What "flushed" means: with strace (if installed), count the sync system calls behind the 202s
# of one short extra run (not part of the figure: tracing slows the server down).
if command -v strace >/dev/null; then
  strace -f -qq -c -e trace=fsync,fdatasync,sync_file_range,syncfs,sync -p "${SRV_PID[A]}" \
    -o "$TMP/strace.txt" 2>"$TMP/strace.err" &
  STRACE_PID=$!
  sleep 1
  if kill -0 "$STRACE_PID" 2>/dev/null; then
    log "P4 audit: POST /jobs for 2 s under strace, counting sync system calls"
    run_wrk P4-audit "POST /jobs under strace" 1 1 A 2 "$CONNS" "$THREADS" post-job.lua "$JOBS_PATH" T1
    kill -INT "$STRACE_PID" 2>/dev/null || true
    wait "$STRACE_PID" 2>/dev/null || true
    python3 - "$RESULTS" "$TMP/strace.txt" <<'PY'
import json, sys
calls = {}
for line in open(sys.argv[2]):
    parts = line.split()
    if len(parts) >= 5 and parts[-1] in ("fsync", "fdatasync", "sync_file_range", "syncfs", "sync"):
        calls[parts[-1]] = int(parts[3])
run = [json.loads(l) for l in open(sys.argv[1]) if '"P4-audit"' in l][-1]
answers = run.get("server_counted", {}).get("POST /v2/extension/image_replicator/jobs 202", 0)
listed = ", ".join(f"{n:,} {name}" for name, n in sorted(calls.items())) or "no sync calls"
detail = (f"under strace, {answers:,} answers 202 in 2 s went with {listed} "
          "(fsync/fdatasync flush the file and the disk's write cache; sync_file_range only "
          "starts and waits for the write-out of a range: no metadata, no cache flush)")
with open(sys.argv[1], "a") as f:
    f.write(json.dumps({"kind": "check", "id": "P4", "ok": "info", "detail": detail}) + "\n")
PY
  else
    log "strace could not attach ($(head -c 200 "$TMP/strace.err")); no sync-call audit"
  fi
  STRACE_PID=
fi

# Every 202 was flushed before it was sent: kill the server without warning, then count.
stop_server A KILL
stored=$(ir A "$TMP/A" --json job list --tenant "$T1" --status replicate_requested | py count)
answered=$(python3 - "$RESULTS" <<'PY'
import json, sys
n = 0
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("kind") == "wrk" and r.get("id") in ("P4", "warmup-P4", "P4-audit"):
        n += r.get("server_counted", {}).get("POST /v2/extension/image_replicator/jobs 202", 0)
print(n)
PY
)
py record "$RESULTS" kind=check id=P4 "ok=$([[ $stored -ge $answered ]] && echo true || echo false)" \
  "detail=after SIGKILL of the server, the store holds $stored new jobs; the server had counted $answered answers 202"

# ----- P5-P7: copies through the API --------------------------------------------------------------

start_server C "$C"
sleep 2
CPID=${SRV_PID[C]}
py record "$RESULTS" kind=rss name=idle "kib=$(rss_kib "$CPID" VmRSS)" "how=VmRSS 2 s after a fresh start of the copy server (worker on)"
py record "$RESULTS" kind=rss name=idle_before_copy_hwm "kib=$(rss_kib "$CPID" VmHWM)" "how=VmHWM of the same, before any copy"
mkdir -p "$TMP/scratch"
SCRATCH=$TMP/scratch/copy.out

# copy_step ID REP ORDER TOOL SOURCE
copy_step() {
  local id=$1 rep=$2 order=$3 tool=$4 src=$5 seconds out
  sync
  case $tool in
    api | api-keep-freed)
      local img=$IMG_COPY
      [[ $id == P6 ]] && img=$IMG_SPARSE
      out=$(py api-copy --port "${SRV_PORT[C]}" --token "$TOK1" --image "$img" --dst "$T2" --pid "$CPID" \
        --poll "$POLL")
      local dest
      dest=$(printf '%s' "$out" | py field dest_image_id)
      local alloc
      alloc=$(alloc_kib "$C/regions/ot2/$dest")
      python3 - "$RESULTS" "$out" "$id" "$rep" "$order" "$alloc" "$POLL" "$tool" <<'PY'
import json, sys
r = json.loads(sys.argv[2])
r.update(kind="copy", id=sys.argv[3], rep=int(sys.argv[4]), order=int(sys.argv[5]), tool=sys.argv[8],
         alloc_kib=int(sys.argv[6]),
         cmd="POST $API/jobs {\"image_id\": SOURCE, \"tenant_id_dst\": T2}, then GET $API/jobs/ID every "
             f"{float(sys.argv[7]) * 1000:.0f} ms until replicated")
open(sys.argv[1], "a").write(json.dumps(r, sort_keys=True) + "\n")
PY
      seconds=$(printf '%s' "$out" | py field seconds)
      if [[ $id == P5 && $rep == 1 && $tool == api ]]; then
        py record "$RESULTS" kind=rss name=copy_peak "kib=$(rss_kib "$CPID" VmHWM)" \
          "how=VmHWM after the first $((COPY_BYTES / MIB)) MiB copy since a fresh start"
      fi
      ir C "$C" image delete "$dest" >/dev/null
      ;;
    import)
      # An admin's import of the same file while the server runs (the server does the work,
      # through its admin socket), then the new image is deleted again.
      local new_id shown
      new_id=$(python3 -c 'import uuid; print(uuid.uuid4())')
      out=$(py time-json --pid "$CPID" -- "$BIN" --data-dir "$C" image import "$src" --tenant "$T1" \
        --name bench-sparse-import --disk-format raw --id "$new_id")
      seconds=$(printf '%s' "$out" | py field seconds)
      shown="image-replicator --data-dir \$DIR_C image import $src --tenant $T1 --name bench-sparse-import --disk-format raw --id \$NEW_ID"
      shown=${shown//$C\/regions\/ot1\//\$REGION_OT1\/}
      python3 - "$RESULTS" "$out" "$id" "$rep" "$order" "$(alloc_kib "$C/regions/ot1/$new_id")" "$shown" <<'PY'
import json, sys
r = json.loads(sys.argv[2])
r.update(kind="copy", id=sys.argv[3], rep=int(sys.argv[4]), order=int(sys.argv[5]), tool="import",
         alloc_kib=int(sys.argv[6]), cmd=sys.argv[7])
open(sys.argv[1], "a").write(json.dumps(r, sort_keys=True) + "\n")
PY
      ir C "$C" image delete "$new_id" >/dev/null
      ;;
    cp | "cp --sparse=always" | cp+fsync | "cp --sparse=always+fsync" | sha512sum | md5sum | b3sum)
      local -a cmd
      # shellcheck disable=SC2016 # sh expands $1 and $2 of cp+fsync
      case $tool in
        cp) cmd=(cp "$src" "$SCRATCH") ;;
        "cp --sparse=always") cmd=(cp --sparse=always "$src" "$SCRATCH") ;;
        cp+fsync) cmd=(sh -c 'cp "$1" "$2" && sync "$2"' sh "$src" "$SCRATCH") ;;
        "cp --sparse=always+fsync") cmd=(sh -c 'cp --sparse=always "$1" "$2" && sync "$2"' sh "$src" "$SCRATCH") ;;
        sha512sum) cmd=(sha512sum "$src") ;;
        md5sum) cmd=(md5sum "$src") ;;
        b3sum) cmd=("$B3SUM" "$src") ;;
      esac
      seconds=$(py time -- "${cmd[@]}")
      local -a extra=()
      [[ -e $SCRATCH ]] && extra=("alloc_kib=$(alloc_kib "$SCRATCH")")
      local shown="${cmd[*]}"
      [[ $tool == cp+fsync ]] && shown="cp $src $SCRATCH && sync $SCRATCH"
      [[ $tool == "cp --sparse=always+fsync" ]] && shown="cp --sparse=always $src $SCRATCH && sync $SCRATCH"
      [[ $tool == b3sum ]] && shown="b3sum $src"
      shown=${shown//$C\/regions\/ot1\//\$REGION_OT1\/}
      shown=${shown//$TMP/\$TMP}
      py record "$RESULTS" kind=copy "id=$id" "rep=$rep" "order=$order" "tool=$tool" \
        "seconds=$seconds" "cmd=$shown" "${extra[@]}"
      rm -f "$SCRATCH"
      ;;
  esac
  log "$id rep $rep: $tool $(python3 -c "print(f'{float(\"$seconds\"):.3f}')") s"
}

# run_copies ID SOURCE TOOL...: each rep warms the page cache, then runs the tools in an order
# rotated by one per rep.
run_copies() {
  local id=$1 src=$2 rep i n
  shift 2
  local -a tools=("$@")
  n=${#tools[@]}
  for ((rep = 1; rep <= REPS; rep++)); do
    cat "$src" >/dev/null
    for ((i = 0; i < n; i++)); do
      copy_step "$id" "$rep" "$((i + 1))" "${tools[(i + rep - 1) % n]}" "$src"
    done
  done
}

P5_TOOLS=(api cp cp+fsync sha512sum md5sum)
[[ -n $B3SUM ]] && P5_TOOLS+=(b3sum)
log "P5: $((COPY_BYTES / MIB)) MiB copy through the API vs ${P5_TOOLS[*]:1}"
run_copies P5 "$COPY_SRC" "${P5_TOOLS[@]}"
log "P6: $((SPARSE_BYTES / MIB)) MiB sparse copy through the API vs cp --sparse=always; image import of it"
run_copies P6 "$SPARSE_SRC" api "cp --sparse=always" "cp --sparse=always+fsync" sha512sum md5sum import
py record "$RESULTS" kind=rss name=hwm_after_all_copies "kib=$(rss_kib "$CPID" VmHWM)" "how=VmHWM after every P5 and P6 copy"
drain_log C "P5/P6"
stop_server C

# A diagnostic, not part of any ratio: the API copies again, with glibc's malloc told to keep
# what it frees (no trimming; buffers of 1 MiB from the heap, not mmap), to show how much of a
# copy's time goes to fresh pages for its chunk buffers (see the page faults in the tables).
KEEP_FREED=glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=268435456
GLIBC_TUNABLES=$KEEP_FREED start_server C "$C"
# shellcheck disable=SC2016 # shown, not run
py record "$RESULTS" kind=commands id=malloc "cmd=GLIBC_TUNABLES=$KEEP_FREED image-replicator serve --listen 127.0.0.1:0 --data-dir \$DIR_C   # the api-keep-freed diagnostic: then the same POST and GETs"
sleep 1
CPID=${SRV_PID[C]}
log "diagnostic: P5 and P6 copies with GLIBC_TUNABLES=$KEEP_FREED"
for ((rep = 1; rep <= REPS; rep++)); do
  for id in P5 P6; do
    src=$COPY_SRC
    [[ $id == P6 ]] && src=$SPARSE_SRC
    cat "$src" >/dev/null
    copy_step "$id" "$rep" 9 api-keep-freed "$src"
  done
done
drain_log C "the malloc diagnostic"
stop_server C

# ----- R1: a capped copy killed with SIGKILL at >= 85 %, resumed by a restart ---------------------

# r1_step REP: starts a capped server, POSTs a copy, kills the server (SIGKILL) once the
# destination's partial file holds R1_KILL_PERCENT % of the image, reads the job's record with
# no server running, restarts with the same cap and times the restart until `replicated`.
r1_step() {
  local rep=$1 out job dest part held before t0 after wait_out
  start_server R "$C" --max-bandwidth "$R1_CAP"
  out=$(py kill-at --port "${SRV_PORT[R]}" --token "$TOK1" --image "$R1_IMG" --dst "$T2" \
    --pid "${SRV_PID[R]}" --region-dir "$C/regions/ot2" --percent "$R1_KILL_PERCENT" --size "$R1_BYTES")
  # kill-at sent the SIGKILL itself, the moment it saw the size; here it is only reaped.
  { wait "${SRV_PID[R]}"; } 2>/dev/null || true
  unset "SRV_PID[R]" "SRV_PORT[R]"
  job=$(printf '%s' "$out" | py field job_id)
  dest=$(printf '%s' "$out" | py field dest_image_id)
  part=$C/regions/ot2/.$dest.part
  held=$(stat -c %s "$part" 2>/dev/null || echo 0)
  before=$("$BIN" --data-dir "$C" --json job show "$job")
  t0=$(date +%s.%N)
  start_server R "$C" --max-bandwidth "$R1_CAP"
  wait_out=$(py wait-job --port "${SRV_PORT[R]}" --token "$TOK1" --job "$job" --since "$t0" --poll "$POLL")
  after=$("$BIN" --data-dir "$C" --json job show "$job")
  python3 - "$RESULTS" "$rep" "$out" "$held" "$before" "$wait_out" "$after" "$R1_BYTES" "$R1_CAP" "$R1_KILL_PERCENT" <<'PY'
import json, sys
results, rep, kill, held, before, waited, after, size, cap, percent = sys.argv[1:]
r = {"kind": "resume", "id": "R1", "rep": int(rep), "kill": json.loads(kill),
     "part_bytes_after_kill": int(held), "before": json.loads(before), "wait": json.loads(waited),
     "after": json.loads(after), "bytes": int(size), "cap": cap, "kill_percent": int(percent)}
open(results, "a").write(json.dumps(r, sort_keys=True) + "\n")
PY
  log "R1 rep $rep: killed at $(printf '%s' "$out" | py field part_percent) %, restart to replicated $(printf '%s' "$wait_out" | py field seconds) s"
  ir C "$C" image delete "$(printf '%s' "$after" | py field destination_image_id)" >/dev/null
  drain_log R "R1 rep $rep"
  stop_server R
}

log "R1: $((R1_BYTES / MIB)) MiB copy under serve --max-bandwidth $R1_CAP, SIGKILL at $R1_KILL_PERCENT %, restart"
# shellcheck disable=SC2016 # shown, not run
py record "$RESULTS" kind=commands id=R1 "cmd=$(
  echo "image-replicator serve --listen 127.0.0.1:0 --data-dir \$DIR_C --max-bandwidth $R1_CAP"
  echo "POST \$API/jobs {\"image_id\": \"$R1_IMG\", \"tenant_id_dst\": \"$T2\"}; stat \$DIR_C/regions/ot2/.\$DEST.part every 10 ms; kill -KILL \$SERVER_PID once it holds $R1_KILL_PERCENT % of $R1_BYTES bytes"
  echo 'image-replicator --data-dir $DIR_C --json job show $JOB_ID   # no server running'
  echo "image-replicator serve --listen 127.0.0.1:0 --data-dir \$DIR_C --max-bandwidth $R1_CAP   # the restart: the clock starts"
  echo 'GET $API/jobs/$JOB_ID every 10 ms until replicated; GET /metrics; image-replicator --data-dir $DIR_C --json job show $JOB_ID'
)"
for ((rep = 1; rep <= REPS; rep++)); do
  r1_step "$rep"
done

# ----- G1: Glance → Glance through the API vs a curl pipe (real Glances from PyPI) ------------

if ((GLANCE)); then
  log "G1: $GLANCE_MIB MiB Glance → Glance copy vs curl GET | curl PUT (starts two Glances)"
  python3 "$ROOT/scripts/bench/glance.py" --mib "$GLANCE_MIB" --reps "$REPS" --binary "$BIN" \
    >"$TMP/glance.json" || die "the Glance benchmark failed"
  python3 - "$RESULTS" "$TMP/glance.json" <<'PY'
import json, sys
r = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])
r["kind"] = "glance"
open(sys.argv[1], "a").write(json.dumps(r, sort_keys=True) + "\n")
PY
fi

# ----- the report ---------------------------------------------------------------------------------

FINISHED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
export MODE REPS DURATION THREADS CONNS OTHER_JOBS COPY_BYTES SPARSE_BYTES SPARSE_DATA_BYTES \
  COMMAND_LINE FINISHED STARTED LOAD_START BIN TMP B3SUM R1_BYTES R1_CAP POLL
python3 - "$TMP/meta.json" "$SETUP_LOG" <<'PY'
import json, os, platform, subprocess, sys

def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "n/a"

def cpu_model():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "n/a"

def mem_total():
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal"):
            return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return "n/a"

env = os.environ
tmp = env["TMP"]
fs = " on ".join(run("findmnt", "-n", "-o", "FSTYPE,SOURCE", "--target", tmp).split()) or run("stat", "-f", "-c", "%T", tmp)
commit = run("git", "rev-parse", "--short", "HEAD") or "unknown"
if run("git", "status", "--porcelain", "--untracked-files=no"):
    commit += " (with uncommitted changes)"
meta = {
    "mode": env["MODE"],
    "command": env["COMMAND_LINE"],
    "started": env["STARTED"],
    "finished": env["FINISHED"],
    "commit": commit,
    "reps": int(env["REPS"]),
    "machine": {
        "CPUs (nproc)": run("nproc"),
        "CPU model": cpu_model(),
        "memory": mem_total(),
        "kernel": run("uname", "-srm"),
        "OS": next((l.split("=", 1)[1].strip().strip('"') for l in open("/etc/os-release")
                    if l.startswith("PRETTY_NAME=")), "n/a"),
        "rustc": run("rustc", "--version"),
        "wrk": (run("sh", "-c", "wrk -v 2>&1") or "n/a").splitlines()[0],
        "b3sum": (run(env["B3SUM"], "--version") or "n/a") if env.get("B3SUM") else "not installed",
        "python3": platform.python_version(),
        "data directory file system": fs,
        "load average at start / end": f"{env.get('LOAD_START', 'n/a')} / {' '.join(open('/proc/loadavg').read().split()[0:3])}",
    },
    "sizes": {
        "wrk seconds per run": int(env["DURATION"]),
        "wrk threads": int(env["THREADS"]),
        "wrk connections (P1, P2, P4)": int(env["CONNS"]),
        "jobs of the P1 tenant": 10,
        "jobs of the P3 tenant": 100,
        "other_jobs": int(env["OTHER_JOBS"]),
        "copy_bytes": int(env["COPY_BYTES"]),
        "sparse_bytes": int(env["SPARSE_BYTES"]),
        "sparse_data_bytes": int(env["SPARSE_DATA_BYTES"]),
        "r1_bytes": int(env["R1_BYTES"]),
        "r1_cap": env["R1_CAP"],
        "poll_seconds": float(env["POLL"]),
    },
    "setup_commands": [l.rstrip("\n") for l in open(sys.argv[2])],
}
json.dump(meta, open(sys.argv[1], "w"), indent=1)
PY
mkdir -p "$(dirname "$OUT")"
py report --results "$RESULTS" --meta "$TMP/meta.json" --out "$OUT"
sed -n '/^## Results/,/^## Checks/p' "$OUT" | sed '$d' >&2
log "report written to $OUT"
