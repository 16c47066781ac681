#!/usr/bin/env bash
# `job seed` in bounded memory (issue 18): seeds 300,000 jobs (SEED_JOBS=N for another number)
# once with no server and once through a running one, on a release build, and prints the time
# each took, the CLI's peak resident memory (wait4's ru_maxrss) and the server's VmHWM before
# and after; fails if the CLI's peak or the server's growth reaches 64 MiB. It is the ignored
# test a_seed_of_300_000_jobs_stays_in_bounded_memory in tests/cli.rs, run on its own.
#
#   scripts/seed-memory.sh [extra cargo test arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo test --release --test cli a_seed_of_300_000_jobs_stays_in_bounded_memory "$@" \
    -- --ignored --exact --nocapture
