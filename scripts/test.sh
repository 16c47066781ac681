#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what the tests need that the machine lacks,
# then runs `cargo test --locked` (extra arguments go to cargo test).
#
# - pkg-config and OpenSSL's headers (Debian's pkg-config, libssl-dev): the openssl crate links
#   the system's libcrypto for the images' MD5 and SHA-512.
# - qemu-img (Debian's qemu-utils): tests/glance.rs makes qcow2 files with it.
# - mkfs.xfs (Debian's xfsprogs): the reflink test of tests/peer.rs mounts an XFS image (as
#   root; as another user that test says so and does nothing).
# - chromium and chromedriver (Debian's chromium, chromium-driver): tests/ui.rs drives the web
#   page in a headless Chromium through WebDriver (CI reaches Debian's mirror, nothing else).
# - initdb, pg_ctl and psql (Debian's postgresql: /usr/lib/postgresql/NN/bin): the PostgreSQL
#   store's tests start a throwaway cluster of their own (as the postgres user when root).
# - Glance and Keystone from PyPI, in the virtualenv scripts/openstack-venv.sh makes once and
#   keeps in ~/.cache/image-replicator (about 80 s and 300 MB the first time).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v pkg-config >/dev/null || missing+=(pkg-config)
[[ -f /usr/include/openssl/evp.h ]] || missing+=(libssl-dev)
command -v qemu-img >/dev/null || missing+=(qemu-utils)
PATH=$PATH:/sbin:/usr/sbin command -v mkfs.xfs >/dev/null || missing+=(xfsprogs)
[[ -x /usr/lib/chromium/chromium ]] || command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
command -v initdb >/dev/null || compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
if ((${#missing[@]})); then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    echo "scripts/test.sh: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "scripts/test.sh: missing ${missing[*]}: install them (as root: apt-get install ${missing[*]})" >&2
    exit 1
  fi
fi
scripts/openstack-venv.sh >/dev/null
exec cargo test --locked "$@"
