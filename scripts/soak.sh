#!/usr/bin/env bash
# The long reliability run of issue 6, outside CI (CI runs the same tests, short: see
# tests/crash.rs, tokens.rs, admin_socket.rs, limits.rs, store_safety.rs and hostile.rs). Release build, tests one at a time, figures
# collected; then, if asked, both fuzz targets. RELIABILITY.md records a full run.
#
#   scripts/soak.sh                      # 50 crash cycles, the rest scaled up likewise
#   FUZZ_SECONDS=600 scripts/soak.sh     # and each fuzz target for 10 minutes (nightly)
#
# Knobs (environment): SOAK_CYCLES (50), MIDCOPY_ROUNDS (10 kills per copy stage),
# HOSTILE_MUTATIONS (20000), FLOOD_REQUESTS (100000), RELIABILITY_SEED (replay a run),
# FUZZ_SECONDS (0: no fuzzing), SOAK_OUT (where logs go). Needs root, like CI (tmpfs, setpriv).
set -uo pipefail
cd "$(dirname "$0")/.."

export SOAK_CYCLES=${SOAK_CYCLES:-50}
export MIDCOPY_ROUNDS=${MIDCOPY_ROUNDS:-10}
export HOSTILE_MUTATIONS=${HOSTILE_MUTATIONS:-20000}
export FLOOD_REQUESTS=${FLOOD_REQUESTS:-100000}
export RELIABILITY_SEED=${RELIABILITY_SEED:-$(date +%s%N)}
FUZZ_SECONDS=${FUZZ_SECONDS:-0}
OUT=${SOAK_OUT:-target/soak-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

echo "soak: seed $RELIABILITY_SEED, crash cycles $SOAK_CYCLES, mid-copy rounds $MIDCOPY_ROUNDS," \
     "mutations $HOSTILE_MUTATIONS, flood $FLOOD_REQUESTS, fuzz ${FUZZ_SECONDS}s per target; logs in $OUT"
cargo build --release --locked --tests >"$OUT/build.log" 2>&1 || { echo "build failed: $OUT/build.log"; exit 1; }

failed=0
for suite in crash tokens admin_socket limits store_safety hostile; do
    started=$(date +%s)
    # One test at a time: the crash cycles get the machine to themselves.
    cargo test --release --locked --test "$suite" -- --nocapture --test-threads=1 >"$OUT/$suite.log" 2>&1
    status=$?
    echo "== $suite: exit $status after $(( $(date +%s) - started )) s"
    grep -E '^test result' "$OUT/$suite.log" | sed 's/^/   /'
    # The second "failures:" heading lists the failed tests' names.
    awk '/^failures:$/ { n++ } n == 2 && /^    [a-z]/ { print "   FAILED " $1 }' "$OUT/$suite.log"
    grep -o 'figures: .*' "$OUT/$suite.log" | sed 's/^/   /'
    [ "$status" -eq 0 ] || failed=1
done

if [ "$FUZZ_SECONDS" -gt 0 ]; then
    if ! command -v cargo-fuzz >/dev/null || ! rustup toolchain list | grep -q nightly; then
        echo "== fuzz: needs cargo-fuzz and a nightly toolchain; running the stable property loop instead"
        (cd fuzz && cargo test --release) >"$OUT/fuzz.log" 2>&1 || failed=1
        grep 'test result' "$OUT/fuzz.log" | sed 's/^/   /'
    else
        (cd fuzz && cargo run --release --quiet --example seeds -- corpus) >"$OUT/fuzz-seeds.log" 2>&1
        # The two targets side by side, one core each.
        (cd fuzz && cargo +nightly fuzz run parse corpus/parse -- \
            -max_total_time="$FUZZ_SECONDS" -print_final_stats=1) >"$OUT/fuzz-parse.log" 2>&1 &
        parse=$!
        (cd fuzz && cargo +nightly fuzz run route corpus/route -- -dict=route.dict \
            -max_len=20000 -max_total_time="$FUZZ_SECONDS" -print_final_stats=1) >"$OUT/fuzz-route.log" 2>&1 &
        route=$!
        for target in parse route; do
            pid=$parse; [ "$target" = route ] && pid=$route
            wait "$pid"; status=$?
            echo "== fuzz $target: exit $status"
            grep -E 'stat::number_of_executed_units|stat::peak_rss_mb|cov: .* DONE|Done [0-9]+ runs' \
                "$OUT/fuzz-$target.log" | tail -3 | sed 's/^/   /'
            grep -E '^==[0-9]+== ERROR|panicked at|Test unit written' "$OUT/fuzz-$target.log" | head -5 | sed 's/^/   /'
            [ "$status" -eq 0 ] || failed=1
        done
    fi
fi

echo "soak: $([ "$failed" -eq 0 ] && echo passed || echo 'had failures'); logs in $OUT"
exit "$failed"
