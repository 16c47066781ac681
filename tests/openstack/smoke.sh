#!/usr/bin/env bash
# Smoke test of the OpenStack lab (tests/openstack/lab.py): real Glance without auth (2
# instances) and with Keystone, driven with curl. Creates the venv first if needed
# (scripts/openstack-venv.sh). Prints "smoke: N passed, 0 failed" and exits 0 when all is well.
#
#   tests/openstack/smoke.sh            # about 30 s with the venv in place
set -euo pipefail
cd "$(dirname "$0")/../.."

VENV=$(scripts/openstack-venv.sh | tail -n1)
PY="$VENV/bin/python"
WORK=$(mktemp -d /tmp/openstack-smoke.XXXXXX)
PASSED=0
LAB_PID=

cleanup() {
  if [[ -n "$LAB_PID" ]]; then
    kill -TERM "$LAB_PID" 2>/dev/null || true
    wait "$LAB_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

fail() {
  echo "smoke: FAILED: $*" >&2
  for f in "$WORK"/*/lab.log; do echo "--- $f" >&2; tail -n 20 "$f" >&2; done
  echo "smoke: $PASSED passed, 1 failed"
  exit 1
}
ok() { PASSED=$((PASSED + 1)); echo "ok - $*"; }
check() { # check DESCRIPTION ACTUAL EXPECTED
  [[ "$2" == "$3" ]] || fail "$1: got '$2', expected '$3'"
  ok "$1"
}

# ---- the lab as a coprocess: JSON on its first line, then one answer per command ----------
start_lab() { # start_lab NAME ARGS...
  local name=$1
  shift
  local t0=$SECONDS
  coproc LAB { exec "$PY" tests/openstack/lab.py --dir "$WORK/$name" "$@"; }
  IFS= read -r -t 240 LAB_JSON <&"${LAB[0]}" || fail "lab $name did not start (see $WORK/$name/lab.log)"
  echo "# lab $name ($*) up in $((SECONDS - t0)) s: $(jq -r .startup_seconds <<<"$LAB_JSON") s inside"
}
lab() { # lab COMMAND: sends one command, fails unless the answer is "ok"
  local answer
  echo "$1" >&"${LAB[1]}"
  IFS= read -r -t 120 answer <&"${LAB[0]}" || fail "no answer to '$1'"
  [[ "$answer" == ok ]] || fail "'$1' answered '$answer'"
  ok "lab: $1"
}
stop_lab() { # EOF on stdin: the lab kills everything and exits 0, leaving no process behind
  local fd=${LAB[1]} pid=$LAB_PID answer groups g
  echo status >&"${LAB[1]}"
  IFS= read -r -t 60 answer <&"${LAB[0]}" || fail "no answer to status"
  groups=$(jq -r '.pgids | [.glance[], .keystone] | map(select(. != null)) | join(" ")' <<<"$answer")
  [[ -n "$groups" ]] || fail "status gave no process groups: $answer"
  exec {fd}>&-
  wait "$pid" || fail "lab exited $?"
  LAB_PID=
  ok "lab stopped on EOF with status 0"
  for g in $groups; do
    [[ -z "$(ps -e -o pgid= | awk -v g="$g" '$1 == g')" ]] || fail "process group $g still alive"
  done
  ok "no process left in groups $groups"
}
field() { jq -r "$1" <<<"$LAB_JSON"; }

# Every curl: loopback only, never through a proxy.
c() { curl -sS --noproxy '*' "$@"; }
status_of() { c -o /dev/null -w '%{http_code}' "$@" 2>/dev/null; }

head -c 3145728 /dev/urandom >"$WORK/data"
MD5=$(md5sum "$WORK/data" | cut -d' ' -f1)
SHA512=$(sha512sum "$WORK/data" | cut -d' ' -f1)
TAIL_SHA512=$(tail -c +1048577 "$WORK/data" | sha512sum | cut -d' ' -f1)

# ---- no auth, two Glances ------------------------------------------------------------------
start_lab noauth --glance 2
G0=$(field '.glance[0].url')
G1=$(field '.glance[1].url')
check "no keystone in auth none" "$(field .keystone)" null

ID=$(c -X POST "$G0/v2/images" -H 'Content-Type: application/json' \
  -d '{"name":"x","disk_format":"raw","container_format":"bare","owner":"t1"}' | jq -r .id)
[[ "$ID" =~ ^[0-9a-f-]{36}$ ]] || fail "create image: id '$ID'"
ok "create image $ID"
check "upload 3 MiB" "$(status_of -X PUT "$G0/v2/images/$ID/file" \
  -H 'Content-Type: application/octet-stream' --data-binary @"$WORK/data")" 204
REC=$(c "$G0/v2/images/$ID")
check "status" "$(jq -r .status <<<"$REC")" active
check "size" "$(jq -r .size <<<"$REC")" 3145728
check "checksum (md5)" "$(jq -r .checksum <<<"$REC")" "$MD5"
check "os_hash_algo" "$(jq -r .os_hash_algo <<<"$REC")" sha512
check "os_hash_value" "$(jq -r .os_hash_value <<<"$REC")" "$SHA512"
check "owner from the body" "$(jq -r .owner <<<"$REC")" t1
check "file lands in store_dir" "$(stat -c %s "$(field '.glance[0].store_dir')/$ID")" 3145728
check "download" "$(c "$G0/v2/images/$ID/file" | sha512sum | cut -d' ' -f1)" "$SHA512"
check "range download status" "$(status_of -H 'Range: bytes=1048576-' "$G0/v2/images/$ID/file")" 206
check "range download bytes" \
  "$(c -H 'Range: bytes=1048576-' "$G0/v2/images/$ID/file" | sha512sum | cut -d' ' -f1)" "$TAIL_SHA512"
check "second glance is separate" "$(status_of "$G1/v2/images/$ID")" 404
check "delete" "$(status_of -X DELETE "$G0/v2/images/$ID")" 204
check "deleted image is gone" "$(status_of "$G0/v2/images/$ID")" 404

ID1=$(c -X POST "$G1/v2/images" -H 'Content-Type: application/json' \
  -d '{"name":"y","disk_format":"raw","container_format":"bare","owner":"t2"}' | jq -r .id)
lab "stop glance 1"
check "stopped glance refuses connections" "$(status_of "$G1/v2/images" || true)" 000
check "the other glance still serves" "$(status_of "$G0/v2/images")" 200
lab "start glance 1"
check "restarted glance keeps its records" "$(c "$G1/v2/images/$ID1" | jq -r .owner)" t2
lab "kill glance 0"
check "killed glance refuses connections" "$(status_of "$G0/v2/images" || true)" 000
lab "start glance 0"
check "glance 0 back" "$(status_of "$G0/v2/images")" 200
stop_lab

# ---- keystone, one Glance ------------------------------------------------------------------
start_lab keystone --glance 1 --auth keystone
G=$(field '.glance[0].url')
K=$(field '.keystone.url')
ALPHA=$(field '.keystone.projects.alpha.id')

token() { # token USER PASSWORD PROJECT -> the X-Subject-Token of a project-scoped token
  c -D - -o /dev/null -X POST "$K/auth/tokens" -H 'Content-Type: application/json' -d "$(jq -n \
    --arg u "$1" --arg p "$2" --arg proj "$3" '{auth:{identity:{methods:["password"],
      password:{user:{name:$u,domain:{id:"default"},password:$p}}},
      scope:{project:{name:$proj,domain:{id:"default"}}}}}')" |
    tr -d '\r' | awk 'tolower($1)=="x-subject-token:" {print $2}'
}
RT=$(token replicator "$(field .keystone.service.password)" service)
[[ -n "$RT" ]] || fail "no token for replicator"
ok "replicator token (project service)"
AT=$(token alpha-user "$(field .keystone.projects.alpha.password)" alpha)
BT=$(token beta-user "$(field .keystone.projects.beta.password)" beta)
GT=$(token gamma-user "$(field .keystone.gamma.password)" beta)
[[ -n "$AT" && -n "$BT" && -n "$GT" ]] || fail "no user tokens"
ok "alpha, beta, gamma (on beta) tokens"

check "glance without token" "$(status_of "$G/v2/images")" 401
ID=$(c -X POST "$G/v2/images" -H "X-Auth-Token: $RT" -H 'Content-Type: application/json' \
  -d "{\"name\":\"k\",\"disk_format\":\"raw\",\"container_format\":\"bare\",\"owner\":\"$ALPHA\"}" |
  jq -r .id)
[[ "$ID" =~ ^[0-9a-f-]{36}$ ]] || fail "create image as replicator: id '$ID'"
ok "replicator creates an image owned by alpha"
check "upload as replicator" "$(status_of -X PUT "$G/v2/images/$ID/file" -H "X-Auth-Token: $RT" \
  -H 'Content-Type: application/octet-stream' --data-binary @"$WORK/data")" 204
REC=$(c -H "X-Auth-Token: $RT" "$G/v2/images/$ID")
check "owner is alpha's project" "$(jq -r .owner <<<"$REC")" "$ALPHA"
check "os_hash_value (keystone)" "$(jq -r .os_hash_value <<<"$REC")" "$SHA512"
check "alpha-user sees it" "$(c -H "X-Auth-Token: $AT" "$G/v2/images" | jq -r '.images[].id')" "$ID"
check "beta-user does not" "$(c -H "X-Auth-Token: $BT" "$G/v2/images" | jq '.images | length')" 0
check "gamma-user on beta does not" "$(c -H "X-Auth-Token: $GT" "$G/v2/images" | jq '.images | length')" 0
check "alpha-user downloads it" \
  "$(c -H "X-Auth-Token: $AT" "$G/v2/images/$ID/file" | sha512sum | cut -d' ' -f1)" "$SHA512"
BID=$(c -X POST "$G/v2/images" -H "X-Auth-Token: $BT" -H 'Content-Type: application/json' \
  -d '{"name":"b","disk_format":"raw","container_format":"bare"}' | jq -r .id)
check "replicator lists every image" \
  "$(c -H "X-Auth-Token: $RT" "$G/v2/images" | jq -r '[.images[].id] | sort | join(" ")')" \
  "$(printf '%s\n' "$ID" "$BID" | sort | paste -sd' ')"

# Token validation (the replicator's token validates a user's) and revocation.
V=$(c -H "X-Auth-Token: $RT" -H "X-Subject-Token: $AT" "$K/auth/tokens")
check "validate: user" "$(jq -r .token.user.name <<<"$V")" alpha-user
check "validate: project" "$(jq -r .token.project.id <<<"$V")" "$ALPHA"
check "validate: role" "$(jq -r '[.token.roles[].name] | index("member") != null' <<<"$V")" true
check "revoke" "$(status_of -X DELETE -H "X-Auth-Token: $RT" -H "X-Subject-Token: $AT" "$K/auth/tokens")" 204
check "revoked token: validate 404" "$(status_of -H "X-Auth-Token: $RT" -H "X-Subject-Token: $AT" "$K/auth/tokens")" 404
check "revoked token: glance 401" "$(status_of -H "X-Auth-Token: $AT" "$G/v2/images")" 401

lab "stop keystone"
# Glance's authtoken runs with delay_auth_decision = true: an unreachable Keystone makes every
# token invalid, so Glance answers 401 (not 503).
check "glance without keystone: 401" "$(status_of -H "X-Auth-Token: $RT" "$G/v2/images")" 401
lab "start keystone"
check "glance with keystone back" "$(status_of -H "X-Auth-Token: $RT" "$G/v2/images")" 200
check "replicator deletes alpha's image" "$(status_of -X DELETE -H "X-Auth-Token: $RT" "$G/v2/images/$ID")" 204
stop_lab

echo "smoke: $PASSED passed, 0 failed"
