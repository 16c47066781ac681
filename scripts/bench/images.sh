# shellcheck shell=bash disable=SC2154 # SRV_PID, SRV_PORT, ROOT and the rest come from scripts/bench.sh
# The images API (issue 15), figures I1 and I2: sourced by scripts/bench.sh for `--only I` after
# its prerequisites, with its functions and variables (BIN, TMP, RESULTS, SETUP_LOG, MODE, REPS,
# OUT, TMP_PARENT, start_server, ir, log, die, py).
#
# One image of random data (1 GiB; 64 MiB with --quick) in the run's temporary directory,
# uploaded (`PUT /v2/images/ID/file`) and downloaded (`GET …/file` into a file) with curl through
# the appliance (release binary, directory region in the same temporary directory) and through
# a real Glance 33 (tests/openstack/lab.py --auth none, file store there too), and copied with
# cp: with an fsync (the upload's floor: the appliance's upload is durable) and without (the
# download's). scripts/bench/images.py times the rounds and writes the report section.

IMAGES_PY="$ROOT/scripts/bench/images.py"
if [[ $MODE == quick ]]; then
  IMAGE_MIB=${BENCH_IMAGES_MIB:-64}
else
  IMAGE_MIB=${BENCH_IMAGES_MIB:-1024}
fi
command -v curl >/dev/null || die "curl is needed for the images figures"
need_kib=$((IMAGE_MIB * 1024 * 6 + 512 * 1024))
free_kib=$(df -Pk "$TMP" | awk 'NR == 2 {print $4}')
((free_kib > need_kib)) || die "$TMP has $((free_kib / 1024)) MiB free; the images figures need $((need_kib / 1024)) MiB"

log "the venv with Glance (scripts/openstack-venv.sh)"
VENV=$("$ROOT/scripts/openstack-venv.sh" | tail -n1) || die "scripts/openstack-venv.sh failed"

TI=4f5a6b7c8d9e4f0a9b1c2d3e4f5a6b7c   # the appliance's tenant: owner of the uploads
TOKI=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
# shellcheck disable=SC2016,SC2034 # names, shown as they are; read by ir
declare -A SHOWN_AS=([$TOKI]='$TOKEN')

log "writing $IMAGE_MIB MiB of random data"
echo "head -c ${IMAGE_MIB}M /dev/urandom >\$TMP/image.raw" >>"$SETUP_LOG"
head -c "${IMAGE_MIB}M" /dev/urandom >"$TMP/image.raw"

AD=$TMP/appliance
ir APPLIANCE "$AD" region add ot1 >/dev/null
ir APPLIANCE "$AD" tenant add "$TI" --region ot1 >/dev/null
ir APPLIANCE "$AD" user add bench --tenant "$TI" >/dev/null
ir APPLIANCE "$AD" token issue --user bench --tenant "$TI" --token "$TOKI" >/dev/null
start_server appliance "$AD"

python3 "$IMAGES_PY" run --results "$RESULTS" --file "$TMP/image.raw" --work "$TMP" \
  --store "$AD/regions/ot1" --reps "$REPS" --port "${SRV_PORT[appliance]}" --token "$TOKI" --pid "${SRV_PID[appliance]}" \
  --venv "$VENV" --setup-log "$SETUP_LOG" ${BENCH_IMAGES_PERF:+--perf "$BENCH_IMAGES_PERF"} ||
  die "scripts/bench/images.py run failed"
drain_log appliance "I1/I2"

FINISHED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
export MODE REPS COMMAND_LINE FINISHED STARTED LOAD_START BIN TMP IMAGE_MIB
python3 "$IMAGES_PY" report --results "$RESULTS" --setup-log "$SETUP_LOG" --out "$OUT" |
  sed -n '/^| id /,/^$/p' >&2
log "images section written to $OUT"
