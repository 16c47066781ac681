# shellcheck shell=bash
# Comparison mode of scripts/bench.sh (sourced by it, after its options, its functions and the
# job files; not run alone): P1-P5 of a base binary ($COMPARE) and a new one ($BIN) in one run.
#
# Each side gets its own data directories, made by its own CLI with the same commands (a store
# written by one version is never opened by the other). Every figure is measured per rep as one
# unit per side (P1: /healthz and /jobs; P2: the same with random tokens; P3: the empty and the
# big store; P4: one POST run; P5: our copy, cp and sha512sum); the two units of a rep run back
# to back, base first in odd reps and new first in even ones (ABBA...), so a drift of the
# machine's load cancels. The report takes per rep the figure of each side and new/base, and
# the median of those ratios over the reps.

declare -A SIDE_BIN=([base]=$COMPARE [new]=$BIN)
SIDES_ODD=(base new)
SIDES_EVEN=(new base)
NEW_BIN=$BIN

want() { [[ ,$ONLY, == *,$1,* ]]; }
for f in ${ONLY//,/ }; do
  [[ $f =~ ^P[1-5]$ ]] || die "--only takes figures P1 to P5 (comma-separated), not '$f'"
done
((REPS >= 2)) || die "--compare needs at least 2 reps (one of each order)"

# use_side SIDE: the CLI and the servers started from now on are SIDE's binary.
use_side() { BIN=${SIDE_BIN[$1]}; }

# sides_of REP: the two sides in the order they run in rep REP.
sides_of() {
  if (($1 % 2)); then echo "${SIDES_ODD[@]}"; else echo "${SIDES_EVEN[@]}"; fi
}

# The machine's load, every 30 s, for the report (the benchmark itself adds to it).
(while :; do
  printf '%s %s\n' "$(date +%s)" "$(cut -d' ' -f1-3 /proc/loadavg)"
  sleep 30
done) >"$TMP/loadavg.txt" &
LOAD_PID=$!

# Space on top of the single mode's check: each side's copy source and big store.
need_kib=$((4 * COPY_BYTES / 1024 + OTHER_JOBS * 6 + 512 * 1024))
free_kib=$(df -Pk "$TMP" | awk 'NR == 2 {print $4}')
((free_kib > need_kib)) || die "$TMP has $((free_kib / 1024)) MiB free; the comparison needs $((need_kib / 1024)) MiB"
log "comparison: base $COMPARE, new $NEW_BIN; figures $ONLY; $REPS reps (ABBA)"

# ----- set-up: the same commands for both sides --------------------------------------------------

HTTP=0
for f in P1 P2 P3 P4; do want "$f" && HTTP=1; done
for side in base new; do
  use_side "$side"
  if ((HTTP)); then
    log "setting up the HTTP stores of $side"
    setup_http_store "A_$side" "$TMP/A_$side"
    want P3 && setup_http_store "B_$side" "$TMP/B_$side"
  fi
done

if want P5; then
  log "preparing the copy source ($((COPY_BYTES / MIB)) MiB, the same bytes for both sides)"
  dd if=/dev/urandom of="$TMP/copy-source.bin" bs=1M count=$((COPY_BYTES / MIB)) status=none
  echo "dd if=/dev/urandom of=\$TMP/copy-source.bin bs=1M count=$((COPY_BYTES / MIB))" >>"$SETUP_LOG"
  for side in base new; do
    use_side "$side"
    dir=$TMP/C_$side
    ir "C_$side" "$dir" region add ot1 >/dev/null
    ir "C_$side" "$dir" region add ot2 >/dev/null
    ir "C_$side" "$dir" tenant add "$T1" --region ot1 >/dev/null
    ir "C_$side" "$dir" tenant add "$T2" --region ot2 >/dev/null
    ir "C_$side" "$dir" user add bench --tenant "$T1" --tenant "$T2" >/dev/null
    ir "C_$side" "$dir" token issue --user bench --tenant "$T1" --token "$TOK1" >/dev/null
    ir "C_$side" "$dir" image import "$TMP/copy-source.bin" --tenant "$T1" --name bench-copy --id "$IMG_COPY" >/dev/null
    [[ -f $dir/regions/ot1/$IMG_COPY ]] || die "the $side binary did not store the image at regions/ot1/$IMG_COPY"
  done
  rm -f "$TMP/copy-source.bin"
fi

# ----- P1-P4: HTTP, every server of both sides up, API only --------------------------------------

# Both sides' servers run at once (idle when not measured), so neither sees the other start.
if ((HTTP)); then
  for side in base new; do
    use_side "$side"
    start_server "A_$side" "$TMP/A_$side" --no-worker
    want P3 && start_server "B_$side" "$TMP/B_$side" --no-worker
  done
  sleep 1
  for side in base new; do
    check_list "A_$side" "$TOK1" 10
    check_list "A_$side" "$TOK3" 100
    want P3 && check_list "B_$side" "$TOK3" 100
  done
  log "warming up both sides (token cache, connections)"
  for side in base new; do
    run_wrk warmup /healthz 0 0 "A_$side" "$WARMUP" "$CONNS" "$THREADS" report.lua /healthz T1
    run_wrk warmup /jobs 0 0 "A_$side" "$WARMUP" "$CONNS" "$THREADS" report.lua "$JOBS_PATH" T1
    run_wrk warmup empty-store 0 0 "A_$side" "$WARMUP" 1 1 report.lua "$JOBS_PATH" T3
    want P3 && run_wrk warmup big-store 0 0 "B_$side" "$WARMUP" 1 1 report.lua "$JOBS_PATH" T3
  done
fi

# pair ID REP ORDER SERVER_OF_FIRST SERVER_OF_SECOND CONNS THREADS SCRIPT TOKEN FIRST:PATH SECOND:PATH
# runs one side's unit of a ratio figure: the two variants back to back, in the order given.
pair() {
  local id=$1 rep=$2 order=$3 s1=$4 s2=$5 conns=$6 threads=$7 script=$8 token=$9
  local v1=${10%%=*} p1=${10#*=} v2=${11%%=*} p2=${11#*=}
  local -a sample=()
  [[ $id == P2 ]] && sample=(rss)
  run_wrk "$id" "$v1" "$rep" "$order" "$s1" "$DURATION" "$conns" "$threads" "$script" "$p1" "$token" "${sample[@]}"
  run_wrk "$id" "$v2" "$rep" "$((order + 1))" "$s2" "$DURATION" "$conns" "$threads" "$script" "$p2" "$token" "${sample[@]}"
}

# ratio_figure ID WHAT CONNS THREADS SCRIPT TOKEN STORE_OF_A STORE_OF_B A=PATH B=PATH
# Odd reps run A then B in each unit, even reps B then A, as the single mode does.
ratio_figure() {
  local id=$1 what=$2 conns=$3 threads=$4 script=$5 token=$6 sa=$7 sb=$8 a=$9 b=${10}
  local rep side order
  for ((rep = 1; rep <= REPS; rep++)); do
    order=1
    for side in $(sides_of "$rep"); do
      log "$id rep $rep/$REPS, $side: $what"
      if ((rep % 2)); then
        pair "$id" "$rep" "$order" "${sa}_$side" "${sb}_$side" "$conns" "$threads" "$script" "$token" "$a" "$b"
      else
        pair "$id" "$rep" "$order" "${sb}_$side" "${sa}_$side" "$conns" "$threads" "$script" "$token" "$b" "$a"
      fi
      order=$((order + 2))
    done
  done
}

want P1 && ratio_figure P1 "GET /jobs (10 jobs) vs GET /healthz, $CONNS connections" \
  "$CONNS" "$THREADS" report.lua T1 A A "/healthz=/healthz" "/jobs=$JOBS_PATH"
want P2 && ratio_figure P2 "GET /jobs with random tokens vs GET /healthz, $CONNS connections" \
  "$CONNS" "$THREADS" random-token.lua - A A "/healthz random token=/healthz" "/jobs random token=$JOBS_PATH"
want P3 && ratio_figure P3 "GET /jobs (100 jobs), one connection, $OTHER_JOBS other jobs vs none" \
  1 1 report.lua T3 A B "empty-store=$JOBS_PATH" "big-store=$JOBS_PATH"
if want P3; then
  for side in base new; do stop_server "B_$side"; done
fi

if want P4; then
  export BENCH_POST_BODY="{\"image_id\": \"$IMG_SMALL\", \"tenant_id_dst\": \"$T1\"}"
  for side in base new; do
    run_wrk warmup-P4 POST 0 0 "A_$side" "$WARMUP" "$CONNS" "$THREADS" post-job.lua "$JOBS_PATH" T1
  done
  for ((rep = 1; rep <= REPS; rep++)); do
    order=1
    for side in $(sides_of "$rep"); do
      log "P4 rep $rep/$REPS, $side: POST /jobs, $CONNS connections"
      run_wrk P4 "POST /jobs" "$rep" "$order" "A_$side" "$DURATION" "$CONNS" "$THREADS" post-job.lua "$JOBS_PATH" T1
      order=$((order + 1))
    done
  done
fi
if ((HTTP)); then
  for side in base new; do stop_server "A_$side"; done
fi

# ----- P5: a copy through the API against cp and sha512sum of the same source ------------------

# compare_copy SIDE REP ORDER TOOL
compare_copy() {
  local side=$1 rep=$2 order=$3 tool=$4 seconds out dest
  local dir=$TMP/C_$side
  local src=$dir/regions/ot1/$IMG_COPY scratch=$TMP/scratch/copy.out
  sync
  case $tool in
    api)
      out=$(py api-copy --port "${SRV_PORT[C_$side]}" --token "$TOK1" --image "$IMG_COPY" --dst "$T2" \
        --pid "${SRV_PID[C_$side]}")
      dest=$(printf '%s' "$out" | py field dest_image_id)
      python3 - "$RESULTS" "$out" "$side" "$rep" "$order" <<'PY'
import json, sys
r = json.loads(sys.argv[2])
r.update(kind="copy", id="P5", side=sys.argv[3], rep=int(sys.argv[4]), order=int(sys.argv[5]),
         tool="api", cmd="POST $API/jobs {\"image_id\": SOURCE, \"tenant_id_dst\": T2}, then GET $API/jobs/ID every 50 ms until replicated")
open(sys.argv[1], "a").write(json.dumps(r, sort_keys=True) + "\n")
PY
      seconds=$(printf '%s' "$out" | py field seconds)
      use_side "$side"
      ir "C_$side" "$dir" image delete "$dest" >/dev/null
      ;;
    cp | sha512sum)
      local -a cmd=(cp "$src" "$scratch")
      [[ $tool == sha512sum ]] && cmd=(sha512sum "$src")
      seconds=$(py time -- "${cmd[@]}")
      local shown="${cmd[*]}"
      shown=${shown//$dir\/regions\/ot1\//\$REGION_OT1_$side\/}
      shown=${shown//$TMP/\$TMP}
      py record "$RESULTS" kind=copy id=P5 "side=$side" "rep=$rep" "order=$order" "tool=$tool" \
        "seconds=$seconds" "cmd=$shown"
      rm -f "$scratch"
      ;;
  esac
  log "P5 rep $rep, $side: $tool $(python3 -c "print(f'{float(\"$seconds\"):.3f}')") s"
}

if want P5; then
  for side in base new; do
    use_side "$side"
    start_server "C_$side" "$TMP/C_$side"
  done
  sleep 2
  mkdir -p "$TMP/scratch"
  tools=(api cp sha512sum)
  for ((rep = 1; rep <= REPS; rep++)); do
    order=1
    for side in $(sides_of "$rep"); do
      # Each unit warms the page cache with its own source, then runs the tools rotated per rep.
      cat "$TMP/C_$side/regions/ot1/$IMG_COPY" >/dev/null
      for ((i = 0; i < 3; i++)); do
        compare_copy "$side" "$rep" "$order" "${tools[(i + rep - 1) % 3]}"
        order=$((order + 1))
      done
    done
  done
  drain_log C_base P5
  drain_log C_new P5
  for side in base new; do stop_server "C_$side"; done
fi

# ----- the report ---------------------------------------------------------------------------------

kill "$LOAD_PID" 2>/dev/null || true
wait "$LOAD_PID" 2>/dev/null || true
LOAD_PID=
FINISHED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
BASE_BIN=$COMPARE
export MODE REPS DURATION THREADS CONNS OTHER_JOBS COPY_BYTES COMMAND_LINE FINISHED STARTED \
  LOAD_START BASE_BIN NEW_BIN TMP ONLY
python3 - "$TMP/meta.json" "$SETUP_LOG" "$TMP/loadavg.txt" <<'PY'
import json, os, platform, subprocess, sys

def run(*cmd, cwd=None):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=cwd).stdout.strip()
    except OSError:
        return ""

def commit_of(binary):
    """The commit of the git work tree the binary was built in (best effort)."""
    d = os.path.dirname(binary)
    top = run("git", "rev-parse", "--show-toplevel", cwd=d)
    if not top:
        return "unknown"
    c = run("git", "rev-parse", "--short", "HEAD", cwd=top) or "unknown"
    if run("git", "status", "--porcelain", "--untracked-files=no", cwd=top):
        c += " (with uncommitted changes)"
    return c

def cpu_model():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "n/a"

env = os.environ
tmp = env["TMP"]
loads = []
for line in open(sys.argv[3]):
    parts = line.split()
    if len(parts) == 4:
        loads.append(float(parts[1]))
fs = " on ".join(run("findmnt", "-n", "-o", "FSTYPE,SOURCE", "--target", tmp).split())
meta = {
    "mode": env["MODE"],
    "command": env["COMMAND_LINE"],
    "started": env["STARTED"],
    "finished": env["FINISHED"],
    "reps": int(env["REPS"]),
    "figures": env["ONLY"].split(","),
    "base": {"binary": env["BASE_BIN"], "commit": commit_of(env["BASE_BIN"])},
    "new": {"binary": env["NEW_BIN"], "commit": commit_of(env["NEW_BIN"])},
    "load_1min_samples": loads,
    "machine": {
        "CPUs (nproc)": run("nproc"),
        "CPU model": cpu_model(),
        "kernel": run("uname", "-srm"),
        "rustc": run("rustc", "--version"),
        "wrk": (run("sh", "-c", "wrk -v 2>&1") or "n/a").splitlines()[0],
        "data directory file system": fs or "n/a",
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
    },
    "setup_commands": [l.rstrip("\n") for l in open(sys.argv[2])],
}
json.dump(meta, open(sys.argv[1], "w"), indent=1)
PY
mkdir -p "$(dirname "$OUT")"
py compare-report --results "$RESULTS" --meta "$TMP/meta.json" --out "$OUT"
sed -n '/^### Figures/,/^### Raw/p' "$OUT" | sed '$d' >&2
log "comparison written to $OUT"
