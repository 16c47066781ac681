# shellcheck shell=bash disable=SC2154 # SRV_PID, SRV_PORT, ROOT and the rest come from scripts/bench.sh
# Peer appliances (issue 14), figures D1-D4: sourced by scripts/bench.sh for `--only D` (or
# D1,D2,...) after its prerequisites, with its functions and variables (BIN, TMP, RESULTS,
# SETUP_LOG, MODE, REPS, OUT, start_server, stop_server, drain_log, log, die, py).
#
# Two appliances on 127.0.0.1: "central" (directory region ot1, tenants A and P, an admin
# token) and "edge" (directory region edge with tenant B; the central's ot1 as peer region
# "central", where A and P live), every byte between them through scripts/bench/relay.py.
# Images: scripts/chunk-size.sh --images-only (an ext4 image of a /usr copy, its v2 changed in
# place, both as qcow2 too), imported into the central as tenant A's.

PEER_PY="$ROOT/scripts/bench/peer.py"
pp() { python3 "$PEER_PY" "$@"; }

if [[ $MODE == quick ]]; then
  : "${CHUNK_SIZE_IMAGE:=160M}" "${CHUNK_SIZE_TREE:=/usr/lib/python3 /usr/lib/python3.11}"
else
  : "${CHUNK_SIZE_IMAGE:=512M}" "${CHUNK_SIZE_TREE:=/usr/bin /usr/lib/python3 /usr/lib/python3.11}"
fi
export CHUNK_SIZE_IMAGE CHUNK_SIZE_TREE
# The thin link: each direction of the relay limited to this many bytes a second (200 Mbit/s).
THIN_RATE=${BENCH_PEER_THIN_RATE:-25000000}
PEER_POLL=0.02
PEER_FORMATS=${BENCH_PEER_FORMATS:-raw qcow2}

for tool in curl mkfs.ext4 debugfs qemu-img; do
  command -v "$tool" >/dev/null || PATH=$PATH:/sbin:/usr/sbin command -v "$tool" >/dev/null ||
    die "$tool is needed for the peer figures"
done

PA=1a2b3c4d5e6f4a7b8c9d0e1f2a3b4c5d   # the central's tenant A: owner of the images
PB=2b3c4d5e6f7a4b8c9d0e1f2a3b4c5d6e   # the edge's tenant B: destination of the pulls
PP=3c4d5e6f7a8b4c9d0e1f2a3b4c5d6e7f   # the central's tenant P: destination of the pushes
TOKC=$(python3 -c 'import secrets; print(secrets.token_hex(16))')   # central, root, admin
TOKA=$(python3 -c 'import secrets; print(secrets.token_hex(16))')   # edge, alice for A
TOKB=$(python3 -c 'import secrets; print(secrets.token_hex(16))')   # edge, alice for B

# The CLI's commands are noted by ir (scripts/bench.sh) with these tokens as names.
# shellcheck disable=SC2016,SC2034 # names, shown as they are; read by ir
declare -A SHOWN_AS=([$TOKC]='$TOKEN_CENTRAL' [$TOKA]='$TOKEN_EDGE_A' [$TOKB]='$TOKEN_EDGE_B')
# shellcheck disable=SC2016,SC2034
DELETED_AS='$COPY_ID'

# ----- images -----------------------------------------------------------------------------------

IMAGES=$TMP/images
log "building the images: CHUNK_SIZE_IMAGE=$CHUNK_SIZE_IMAGE CHUNK_SIZE_TREE=\"$CHUNK_SIZE_TREE\" scripts/chunk-size.sh --images-only"
# shellcheck disable=SC2016 # shown, not run
echo "CHUNK_SIZE_IMAGE=$CHUNK_SIZE_IMAGE CHUNK_SIZE_TREE=\"$CHUNK_SIZE_TREE\" scripts/chunk-size.sh --images-only \$TMP/images --tmpdir \$TMP" >>"$SETUP_LOG"
"$ROOT/scripts/chunk-size.sh" --images-only "$IMAGES" --tmpdir "$TMP" 2>"$TMP/chunk-size.log" ||
  { tail -n 20 "$TMP/chunk-size.log" >&2; die "scripts/chunk-size.sh --images-only failed"; }

changed=$(grep -m1 'files rewritten' "$TMP/chunk-size.log" || true)
[[ -z $changed ]] || py record "$RESULTS" kind=peer-info "detail=v2 against v1 (scripts/chunk-size.sh): $changed: the least any delta can send"
need_kib=$(($(du -sk "$IMAGES" | cut -f1) * 4 + 512 * 1024))
free_kib=$(df -Pk "$TMP" | awk 'NR == 2 {print $4}')
((free_kib > need_kib)) || die "$TMP has $((free_kib / 1024)) MiB free; the peer figures need $((need_kib / 1024)) MiB"

# ----- the two appliances and the relay ----------------------------------------------------------

CD=$TMP/central
ED=$TMP/edge
log "setting up the central and the edge"
ir CENTRAL "$CD" region add ot1 >/dev/null
ir CENTRAL "$CD" tenant add "$PA" --region ot1 >/dev/null
ir CENTRAL "$CD" tenant add "$PP" --region ot1 >/dev/null
ir CENTRAL "$CD" user add root --tenant "$PA" --tenant "$PP" --admin >/dev/null
ir CENTRAL "$CD" token issue --user root --tenant "$PA" --token "$TOKC" >/dev/null
declare -A V1=() V2=()
alloc() { echo $(($(stat -c '%b * %B' "$1"))); }
for fmt in $PEER_FORMATS; do
  V1[$fmt]=$(python3 -c 'import uuid; print(uuid.uuid4())')
  V2[$fmt]=$(python3 -c 'import uuid; print(uuid.uuid4())')
  src=a.$fmt
  ir CENTRAL "$CD" image import "$IMAGES/$src" --tenant "$PA" --name "v1-$fmt" --disk-format "$fmt" --id "${V1[$fmt]}" >/dev/null
  ir CENTRAL "$CD" image import "$IMAGES/b-inplace.$fmt" --tenant "$PA" --name "v2-$fmt" --disk-format "$fmt" --id "${V2[$fmt]}" >/dev/null
  py record "$RESULTS" kind=peer-images "format=$fmt" \
    "v1_size=$(stat -c %s "$IMAGES/$src")" "v1_alloc=$(alloc "$IMAGES/$src")" \
    "v2_size=$(stat -c %s "$IMAGES/b-inplace.$fmt")" "v2_alloc=$(alloc "$IMAGES/b-inplace.$fmt")"
done
rm -rf "$IMAGES"

start_server central "$CD"
python3 "$ROOT/scripts/bench/relay.py" --target "127.0.0.1:${SRV_PORT[central]}" \
  --ports-file "$TMP/relay.ports" 2>"$TMP/relay.log" &
SRV_PID[relay]=$!
for ((i = 0; i < 300; i++)); do
  [[ -s $TMP/relay.ports ]] && break
  kill -0 "${SRV_PID[relay]}" 2>/dev/null || { cat "$TMP/relay.log" >&2; die "the relay exited at start"; }
  sleep 0.1
done
[[ -s $TMP/relay.ports ]] || die "the relay did not start within 30 s"
RELAY_PORT=$(py field relay <"$TMP/relay.ports")
RELAY_CTL=$(py field control <"$TMP/relay.ports")
log "relay: pid ${SRV_PID[relay]}, 127.0.0.1:$RELAY_PORT → central, control port $RELAY_CTL"
echo "python3 scripts/bench/relay.py --target 127.0.0.1:\$PORT_CENTRAL --ports-file \$TMP/relay.ports   # then \$RELAY_PORT, \$RELAY_CONTROL" >>"$SETUP_LOG"

printf '%s\n' "$TOKC" >"$TMP/central.token"
ir EDGE "$ED" region add edge >/dev/null
ir EDGE "$ED" region add central --peer-url "http://127.0.0.1:$RELAY_PORT" \
  --peer-token-file "$TMP/central.token" --peer-region ot1 >/dev/null
ir EDGE "$ED" tenant add "$PA" --region central >/dev/null
ir EDGE "$ED" tenant add "$PP" --region central >/dev/null
ir EDGE "$ED" tenant add "$PB" --region edge >/dev/null
ir EDGE "$ED" user add alice --tenant "$PA" --tenant "$PB" --tenant "$PP" >/dev/null
ir EDGE "$ED" token issue --user alice --tenant "$PA" --token "$TOKA" >/dev/null
ir EDGE "$ED" token issue --user alice --tenant "$PB" --token "$TOKB" >/dev/null
sed -i "s|http://127.0.0.1:$RELAY_PORT|http://127.0.0.1:\$RELAY_PORT|" "$SETUP_LOG"
start_server edge "$ED"
PIDS="central=${SRV_PID[central]},edge=${SRV_PID[edge]},relay=${SRV_PID[relay]}"

idle=$(pp idle --control "$RELAY_CTL" --seconds 3)
py record "$RESULTS" kind=peer-info \
  "detail=with no job, the relay counted $(printf '%s' "$idle" | py field up) bytes up and $(printf '%s' "$idle" | py field down) down in 3 s after the edge started (what the edge sends on its own)"

# ----- steps ------------------------------------------------------------------------------------

# peer_job ID FORMAT DIRECTION SIZE TOKEN IMAGE DST [key=value...]: one timed copy, recorded;
# sets LAST_DEST to the copy's id.
LAST_DEST=
peer_job() {
  local id=$1 fmt=$2 dir=$3 size=$4 token=$5 image=$6 dst=$7 out
  shift 7
  out=$(pp job --port "${SRV_PORT[edge]}" --token "$token" --image "$image" --dst "$dst" \
    --control "$RELAY_CTL" --pids "$PIDS" --bin "$BIN" --data-dir "$ED" --poll "$PEER_POLL") ||
    { tail -n 20 "$TMP/edge.log" >&2; die "the $id $dir $fmt copy failed"; }
  LAST_DEST=$(printf '%s' "$out" | py field dest_image_id)
  python3 - "$RESULTS" "$out" "$id" "$fmt" "$dir" "$size" "$@" <<'PY'
import json, sys
r = json.loads(sys.argv[2])
r.update(kind="peer", id=sys.argv[3], format=sys.argv[4], direction=sys.argv[5], size=int(sys.argv[6]))
for kv in sys.argv[7:]:
    k, _, v = kv.partition("=")
    r[k] = json.loads(v) if v[:1].isdigit() else v
open(sys.argv[1], "a").write(json.dumps(r, sort_keys=True) + "\n")
PY
  log "$id $dir $fmt: $(printf '%s' "$out" | py field seconds) s, relay up $(printf '%s' "$out" | py field up) down $(printf '%s' "$out" | py field down), fetched $(printf '%s' "$out" | py field bytes_fetched), reused $(printf '%s' "$out" | py field bytes_reused)"
}

# peer_curl FORMAT LINK REP ORDER SIZE IMAGE: curl -o of the plain download through the relay.
peer_curl() {
  local fmt=$1 link=$2 rep=$3 order=$4 size=$5 image=$6 out
  out=$(pp curl --url "http://127.0.0.1:$RELAY_PORT/peer/v1/images/$image/file" --token "$TOKC" \
    --output "$TMP/curl.out" --control "$RELAY_CTL" --pids "$PIDS") || die "curl of the $fmt file failed"
  python3 - "$RESULTS" "$out" "$fmt" "$link" "$rep" "$order" "$size" "$(relay_rate)" <<'PY'
import json, sys
r = json.loads(sys.argv[2])
r.update(kind="peer", id="D2", format=sys.argv[3], link=sys.argv[4], rep=int(sys.argv[5]),
         order=int(sys.argv[6]), size=int(sys.argv[7]), rate=int(sys.argv[8]))
open(sys.argv[1], "a").write(json.dumps(r, sort_keys=True) + "\n")
PY
  log "D2 $fmt $link rep $rep: curl $(printf '%s' "$out" | py field seconds) s"
}

relay_rate() { python3 "$ROOT/scripts/bench/relay.py" --ask "$RELAY_CTL" stats | py field rate; }
set_rate() { python3 "$ROOT/scripts/bench/relay.py" --ask "$RELAY_CTL" "rate $1" >/dev/null; }

size_of() { "$BIN" --data-dir "$CD" --json image show "$1" | py field size; }

# shellcheck disable=SC2016 # shown, not run
{
  echo 'POST http://127.0.0.1:$PORT_EDGE/v2/extension/image_replicator/jobs {"image_id": V1_OR_V2, "tenant_id_dst": B} with $TOKEN_EDGE_A (pull), or {"image_id": EDGE_COPY, "tenant_id_dst": P} with $TOKEN_EDGE_B (push); GET .../jobs/ID every 20 ms until replicated'
  echo 'image-replicator --data-dir $DIR_EDGE --json job show $JOB_ID   # bytes_reused, bytes_fetched, bytes_on_wire'
  echo 'curl -sS -o $TMP/curl.out -H "X-Auth-Token: $TOKEN_CENTRAL" http://127.0.0.1:$RELAY_PORT/peer/v1/images/V1/file'
  echo 'python3 scripts/bench/relay.py --ask $RELAY_CONTROL stats   # before and after each step; "rate 25000000" for the thin link, "rate 0" after'
  echo 'GET http://127.0.0.1:$PORT_CENTRAL/peer/v1/images/ID/manifest with $TOKEN_CENTRAL   # D3'
} >>"$SETUP_LOG"

# ----- D3: manifests ----------------------------------------------------------------------------

for fmt in $PEER_FORMATS; do
  for which in v1 v2; do
    if [[ $which == v1 ]]; then img=${V1[$fmt]}; else img=${V2[$fmt]}; fi
    m=$(pp manifest --port "${SRV_PORT[central]}" --token "$TOKC" --image "$img")
    py record "$RESULTS" kind=peer id=D3 "format=$fmt" "image=$which" "size=$(size_of "$img")" \
      "manifest_bytes=$(printf '%s' "$m" | py field manifest_bytes)"
  done
done

# ----- D2: v1 into an empty edge, job vs curl, side by side ------------------------------------

for fmt in $PEER_FORMATS; do
  size=$(size_of "${V1[$fmt]}")
  for link in loopback thin; do
    rate=0
    [[ $link == thin ]] && rate=$THIN_RATE
    set_rate "$rate"
    for ((rep = 1; rep <= REPS; rep++)); do
      sync
      if ((rep % 2)); then
        peer_job D2 "$fmt" pull "$size" "$TOKA" "${V1[$fmt]}" "$PB" "link=$link" "rep=$rep" order=1 "rate=$rate" tool=job
        ir EDGE "$ED" image delete "$LAST_DEST" >/dev/null
        sync
        peer_curl "$fmt" "$link" "$rep" 2 "$size" "${V1[$fmt]}"
      else
        peer_curl "$fmt" "$link" "$rep" 1 "$size" "${V1[$fmt]}"
        sync
        peer_job D2 "$fmt" pull "$size" "$TOKA" "${V1[$fmt]}" "$PB" "link=$link" "rep=$rep" order=2 "rate=$rate" tool=job
        ir EDGE "$ED" image delete "$LAST_DEST" >/dev/null
      fi
    done
  done
  set_rate 0
  # Where the CPU goes: one more loopback copy, not timed, with perf sampling both appliances.
  if [[ -n ${BENCH_PEER_PERF:-} ]] && command -v perf >/dev/null; then
    mkdir -p "$BENCH_PEER_PERF"
    perf_pids=()
    for proc in central edge; do
      perf record -F 999 -o "$BENCH_PEER_PERF/$fmt-$proc.data" -p "${SRV_PID[$proc]}" \
        2>"$BENCH_PEER_PERF/$fmt-$proc.err" &
      perf_pids+=($!)
    done
    sleep 1
    out=$(pp job --port "${SRV_PORT[edge]}" --token "$TOKA" --image "${V1[$fmt]}" --dst "$PB" \
      --control "$RELAY_CTL" --pids "$PIDS" --bin "$BIN" --data-dir "$ED" --poll "$PEER_POLL")
    kill -INT "${perf_pids[@]}" 2>/dev/null || true
    wait "${perf_pids[@]}" 2>/dev/null || true
    ir EDGE "$ED" image delete "$(printf '%s' "$out" | py field dest_image_id)" >/dev/null
    for proc in central edge; do
      perf report -i "$BENCH_PEER_PERF/$fmt-$proc.data" --stdio --no-children --sort dso,symbol \
        --percent-limit 2 2>/dev/null >"$BENCH_PEER_PERF/$fmt-$proc.txt" || true
      python3 - "$RESULTS" "$fmt" "$proc" "$BENCH_PEER_PERF/$fmt-$proc.txt" <<'PY'
import json, re, sys
top, cpu = [], None
for line in open(sys.argv[4], errors="replace"):
    count = re.match(r"# Event count \(approx\.\): (\d+)", line)
    if count:
        cpu = int(count.group(1)) / 1e9  # cpu-clock counts nanoseconds
    m = re.match(r"\s+([0-9.]+)%\s+(\S+)\s+\[.\]\s+(.*)", line)
    if m and len(top) < 8:
        symbol = re.split(r"\s{2,}", m.group(3).strip())[0][:70]
        top.append(f"{m.group(1)} % {symbol} ({m.group(2)})")
open(sys.argv[1], "a").write(json.dumps({"kind": "peer-profile", "format": sys.argv[2],
                                         "process": sys.argv[3], "cpu_s": cpu, "top": top}) + "\n")
PY
    done
    log "perf profiles of a $fmt copy in $BENCH_PEER_PERF"
  fi
done
drain_log edge "D2"

# ----- D1 and D4, pull then push ----------------------------------------------------------------

for fmt in $PEER_FORMATS; do
  s1=$(size_of "${V1[$fmt]}")
  s2=$(size_of "${V2[$fmt]}")
  peer_job v1 "$fmt" pull "$s1" "$TOKA" "${V1[$fmt]}" "$PB"
  e1=$LAST_DEST
  peer_job D1 "$fmt" pull "$s2" "$TOKA" "${V2[$fmt]}" "$PB"
  e2=$LAST_DEST
  peer_job D4 "$fmt" pull "$s2" "$TOKA" "${V2[$fmt]}" "$PB"
  ir EDGE "$ED" image delete "$LAST_DEST" >/dev/null
  # Push: the edge's copies into tenant P of the central, which holds nothing yet.
  peer_job v1 "$fmt" push "$s1" "$TOKB" "$e1" "$PP"
  c1=$LAST_DEST
  peer_job D1 "$fmt" push "$s2" "$TOKB" "$e2" "$PP"
  c2=$LAST_DEST
  peer_job D4 "$fmt" push "$s2" "$TOKB" "$e2" "$PP"
  c3=$LAST_DEST
  for img in "$e1" "$e2"; do ir EDGE "$ED" image delete "$img" >/dev/null; done
  for img in "$c1" "$c2" "$c3"; do ir CENTRAL "$CD" image delete "$img" >/dev/null; done
done
drain_log edge "D1/D4"
drain_log central "D1-D4"

# ----- the report ---------------------------------------------------------------------------------

FINISHED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
export MODE REPS COMMAND_LINE FINISHED STARTED LOAD_START BIN TMP CHUNK_SIZE_IMAGE CHUNK_SIZE_TREE PEER_POLL
python3 - "$TMP/peer-meta.json" "$SETUP_LOG" <<'PY'
import json, os, platform, subprocess, sys

def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "n/a"

env = os.environ
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "n/a")
mem = next((f"{int(l.split()[1]) / 1048576:.1f} GiB" for l in open("/proc/meminfo") if l.startswith("MemTotal")), "n/a")
fs = " on ".join((run("findmnt", "-n", "-o", "FSTYPE,SOURCE", "--target", env["TMP"]).splitlines() or ["n/a"])[0].split())
commit = run("git", "rev-parse", "--short", "HEAD") or "unknown"
if run("git", "status", "--porcelain", "--untracked-files=no"):
    commit += " (with uncommitted changes)"
meta = {
    "mode": env["MODE"], "command": env["COMMAND_LINE"], "started": env["STARTED"],
    "finished": env["FINISHED"], "commit": commit, "reps": int(env["REPS"]),
    "image_size": env["CHUNK_SIZE_IMAGE"], "tree": env["CHUNK_SIZE_TREE"],
    "poll": float(env["PEER_POLL"]),
    "machine": {
        "CPUs (nproc)": run("nproc"), "CPU model": cpu, "memory": mem,
        "kernel": run("uname", "-srm"), "python3": platform.python_version(),
        "curl": " ".join((run("curl", "--version") or "n/a").split()[:2]),
        "data directory file system": fs,
        "load average at start / end": f"{env.get('LOAD_START', 'n/a')} / {' '.join(open('/proc/loadavg').read().split()[0:3])}",
    },
    "setup_commands": [l.rstrip("\n") for l in open(sys.argv[2])],
}
json.dump(meta, open(sys.argv[1], "w"), indent=1)
PY
PEER_MD=$ROOT/scripts/bench/peer.md
[[ $MODE == quick ]] && PEER_MD=$TMP_PARENT/image-replicator-bench-peer-quick.md
pp report --results "$RESULTS" --meta "$TMP/peer-meta.json" --md "$PEER_MD" --out "$OUT" |
  sed -n '/^| id /,/^$/p' >&2
log "peer section written to $PEER_MD and $OUT"
