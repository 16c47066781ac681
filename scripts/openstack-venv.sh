#!/usr/bin/env bash
# Creates (or reuses) the Python virtualenv holding real OpenStack Glance and Keystone, used by
# tests/openstack/lab.py for the integration tests against real Glance, and the clients users
# script with (the `openstack` CLI, openstacksdk), used by tests/openstack_clients.rs.
#
#   scripts/openstack-venv.sh      # prints the venv's path as its last line on stdout
#
# Location: $IMAGE_REPLICATOR_OPENSTACK_VENV, default ~/.cache/image-replicator/openstack-venv.
# Idempotent and safe to run concurrently: the install runs under flock on "<venv>.lock" and is
# marked done by "<venv>/.image-replicator-stamp" (a hash of what is installed); a venv without
# the stamp (an interrupted install) or with another one is removed and built again.
# A rebuild (after PACKAGES or CONSTRAINTS change) removes the old venv even if a lab is running
# from it. Needs python3 (3.11; $IMAGE_REPLICATOR_PYTHON to use another) with venv and pip, and
# PyPI: from scratch about 80 s and 300 MB (pip downloads everything each time here), then 10 ms.
set -euo pipefail

VENV="${IMAGE_REPLICATOR_OPENSTACK_VENV:-$HOME/.cache/image-replicator/openstack-venv}"
PYTHON="${IMAGE_REPLICATOR_PYTHON:-python3}"
# What the lab runs; keystonemiddleware (Glance's authtoken) and python-keystoneclient come in as
# their dependencies, openstacksdk as Glance's. python-openstackclient 8.3.0 is the newest 8.x
# (it works with openstacksdk 4.22 and keystoneauth1 5.18).
PACKAGES=(glance==33.0.0 glance-store==5.7.0 keystone==30.0.0 gunicorn==27.0.1
  python-openstackclient==8.3.0)
# Every dependency pinned (pip freeze of a venv that passed tests/openstack/smoke.sh and
# tests/openstack_clients.rs), as
# OpenStack's own upper-constraints do: a new release of any of them cannot break the lab.
CONSTRAINTS="
alembic==1.20.1 amqp==5.4.2 aniso8601==10.0.1 attrs==26.1.0 automaton==3.5.0 autopage==0.6.0
bcrypt==5.0.0 blinker==1.9.0 cachetools==8.0.2 castellan==5.8.0 certifi==2026.10.19.post1
cffi==2.1.1 charset-normalizer==3.5.3 click==8.5.1 cliff==4.17.0 cmd2==4.3.1 cotyledon==2.2.0
cryptography==50.0.2 cursive==0.3.1 debtcollector==3.1.0 decorator==5.3.1 defusedxml==0.7.1
dnspython==2.9.2 dogpile.cache==1.5.0 elementpath==4.8.0 eventlet==0.41.3 fasteners==0.20
Flask==3.1.3 Flask-RESTful==0.3.10 futurist==3.5.0 glance==33.0.0 glance_store==5.7.0
greenlet==3.5.6 gunicorn==27.0.1 httplib2==0.32.1 idna==3.20 importlib_metadata==10.2.0
iso8601==2.1.0 itsdangerous==2.2.0 Jinja2==3.1.6 jmespath==1.1.0 jsonpatch==1.48 jsonpointer==3.12
jsonschema==4.26.0 jsonschema-specifications==2025.9.1 keystone==30.0.0 keystoneauth1==5.18.1
keystonemiddleware==13.0.1 kombu==5.7.0 osc-lib==4.7.0 lazy-importer==0.1.0 Mako==1.4.3 markdown-it-py==4.3.0
MarkupSafe==3.0.4 mdurl==0.1.2 msgpack==1.2.4 netaddr==1.3.0 networkx==3.6.1 oauthlib==4.0.1
openstacksdk==4.22.0 os-service-types==1.9.0 oslo.cache==4.3.0 oslo.concurrency==7.6.1
oslo.config==10.7.0 oslo.context==6.5.0 oslo.db==18.1.1 oslo.i18n==6.9.0 oslo.limit==2.12.0
oslo.log==8.3.2 oslo.messaging==18.3.1 oslo.metrics==0.17.0 oslo.middleware==8.2.0
oslo.policy==6.0.1 oslo.reports==3.9.0 oslo.serialization==5.11.0 oslo.service==4.8.0
oslo.upgradecheck==2.8.0 oslo.utils==10.2.0 osprofiler==4.4.0 packaging==26.4 Paste==3.10.1
PasteDeploy==3.1.0 pbr==7.1.3 platformdirs==4.14.8 prettytable==3.18.0 prometheus_client==0.26.0
prompt_toolkit==3.0.53 psutil==7.2.2 pycadf==4.1.0 pycparser==3.12 pydot==4.0.1 Pygments==2.21.0
PyJWT==2.15.1 pyOpenSSL==26.4.0 pyparsing==3.3.3 pyperclip==1.11.0 pysaml2==7.5.5
python-barbicanclient==7.6.0 python-dateutil==4.0.0 python-keystoneclient==6.0.0 pytz==2026.6
PyYAML==6.0.4 referencing==0.37.0 repoze-lru==0.8 requests==2.34.2 retrying==1.4.2 rfc3986==2.0.0
rich==15.0.0 rich-argparse==1.8.0 Routes==2.5.1 rpds-py==2026.9.1 setproctitle==1.3.8
simplegeneric==0.8.1 six==1.17.0 SQLAlchemy==2.1.9 statsd==4.0.1 stevedore==5.10.0 taskflow==6.5.0
tenacity==9.2.1 testresources==2.1.2 testscenarios==0.7.0 typing_extensions==4.16.0 tzdata==2026.6
urllib3==2.8.0 vine==5.1.0 wcwidth==0.9.4 WebOb==1.8.11 Werkzeug==3.1.9 wrapt==2.5.2 WSME==0.13.0
xmlschema==2.5.1 yappi==1.7.6 zipp==4.1.2
"
STAMP_TEXT="v3 $(printf '%s\n' "${PACKAGES[*]}" "$CONSTRAINTS" | sha256sum | cut -d' ' -f1)"

log() { printf 'openstack-venv: %s\n' "$*" >&2; }

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9

stamp="$VENV/.image-replicator-stamp"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$STAMP_TEXT" && -x "$VENV/bin/python" ]]; then
  printf '%s\n' "$VENV"
  exit 0
fi

if [[ -e "$VENV" ]]; then
  log "removing incomplete or outdated venv $VENV"
  rm -rf "$VENV"
fi
log "creating $VENV with ${PACKAGES[*]} (about 80 s)"
start=$SECONDS
"$PYTHON" -m venv "$VENV"
constraints="$VENV/constraints.txt"
tr ' ' '\n' <<<"$CONSTRAINTS" | grep . >"$constraints"
# pip's output goes to stderr: stdout carries only the path.
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --progress-bar off \
  -c "$constraints" "${PACKAGES[@]}" >&2
# Check that what the lab runs is importable and its commands exist before stamping.
if ! out=$("$VENV/bin/python" -c 'import glance.common.wsgi_app, glance_store, keystone.server.wsgi
import keystonemiddleware.auth_token, gunicorn, openstack, openstackclient.shell' 2>&1); then
  printf '%s\n' "$out" >&2
  log "import check failed"
  exit 1
fi
for cmd in gunicorn glance-manage keystone-manage openstack; do
  [[ -x "$VENV/bin/$cmd" ]] || { log "missing $VENV/bin/$cmd"; exit 1; }
done
printf '%s\n' "$STAMP_TEXT" >"$stamp.tmp"
mv "$stamp.tmp" "$stamp"
log "done in $((SECONDS - start)) s"
printf '%s\n' "$VENV"
