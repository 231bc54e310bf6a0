#!/usr/bin/env bash
# TESTING.md S4: a short cargo-fuzz run of every fuzz target (WAL, transport, Raft codec, snapshot
# stream, KV), on stable (`--sanitizer none`), from a copy of the committed corpus (the tree is left
# as it was).
# Fails on any crash, panic, timeout or allocation of 64 MiB or more (the targets enforce that cap
# themselves: libFuzzer's -malloc_limit_mb needs a sanitizer's malloc hooks, which --sanitizer
# none does not have). Ends with an "N passed, N failed" line; exits 1 if any target failed.
#
# Usage: bash .ci/fuzz.sh [target...]     (default: every target)
# Environment: FUZZ_SEED (libFuzzer -seed, default 1: the same run every time for one binary; set
# it to anything else for a different exploration), FUZZ_SCALE (multiplies runs and time limits,
# default 1; e.g. 20 for a soak).
set -euo pipefail
cd "$(dirname "$0")/.."

seed=${FUZZ_SEED:-1}
scale=${FUZZ_SCALE:-1}

# Per target: executions, and a time limit in seconds that ends the run first where 1 M executions
# would take longer than ~4 minutes. Measured here (release build with debug assertions, corpus
# seeded from fuzz/corpus; "CPU" is exec per second of CPU time, "loaded" the wall-clock rate while
# three other engineers kept the 2 cores at a load average of ~10):
#   record_decode    ~250,000 exec/s CPU, ~77,000-111,000 loaded -> 1 M runs in 4-13 s
#   batch_roundtrip   ~91,000 exec/s CPU, ~29,000 loaded         -> 1 M runs in 11-34 s
#   recover_image      ~8,700 exec/s CPU, ~2,500-3,800 loaded    -> 1 M runs in ~2 min on an idle
#                      machine but 4-7 min on a loaded one (each input writes a small log, damages
#                      it, opens it, appends, closes and reopens it), so it stops at 240 s: on a
#                      busy machine that is ~0.6-0.9 M runs rather than 1 M.
#
# The engine's targets (fuzz/src/engine.rs) must together add at most ~4 minutes on this loaded
# 2-core machine. Measured the same way ("loaded": load average 7-17; "light": ~5):
#   transport_frame   ~61,000 exec/s CPU, ~28,000-40,000 loaded, ~83,000 light
#                     -> 3 M runs: 36 s light, stopped at 70 s loaded (~2 M runs)
#   raft_message     ~690,000 exec/s CPU, ~260,000-440,000 loaded, ~710,000 light
#                     -> 10 M runs: 14 s light, stopped at 20 s loaded (~5 M runs)
#   snapshot_stream  ~840,000 exec/s CPU, ~670,000-806,000 light (load ~3); not measured loaded,
#                     ~320,000-530,000 if it slows like raft_message (an offer's Raft message goes
#                     through raft_message's check) -> 10 M runs: 12 s light, stopped at 20 s
#                     loaded (~6-10 M runs); coverage still creeps up past 20 M runs
#   kv_command       ~108,000 exec/s CPU, ~47,000-53,000 loaded, ~61,000 light
#                     -> 3 M runs: 50 s light, stopped at 55 s loaded (~2.6 M runs)
# So at most 165 s of fuzzing plus ~2 s of start-up each, and ~1 min more of build the first time
# (the fuzz crate now also builds `flotilla` and its dependencies): under 4 minutes in all.
# snapshot_stream's 20 s came from transport_frame (75 -> 70 s) and kv_command (60 -> 55 s). The
# first three together took 104-113 s in two runs of this script at load averages of 5-25 (with
# the older 75 s and 60 s limits).
declare -A runs=([record_decode]=1000000 [batch_roundtrip]=1000000 [recover_image]=1000000
    [transport_frame]=3000000 [raft_message]=10000000 [snapshot_stream]=10000000
    [kv_command]=3000000)
declare -A max_time=([record_decode]=240 [batch_roundtrip]=240 [recover_image]=240
    [transport_frame]=70 [raft_message]=20 [snapshot_stream]=20 [kv_command]=55)

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    targets=(record_decode batch_roundtrip recover_image transport_frame raft_message
        snapshot_stream kv_command)
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/flotilla-fuzz.XXXXXX")
failed=()
for target in "${targets[@]}"; do
    [ -n "${runs[$target]:-}" ] || { echo "fuzz.sh: unknown target $target" >&2; exit 2; }
    mkdir -p "$work/corpus/$target" "$work/artifacts/$target"
    cp fuzz/corpus/"$target"/* "$work/corpus/$target/"
    echo "=== fuzz $target: ${runs[$target]} runs x$scale, at most ${max_time[$target]} s x$scale"
    started=$SECONDS
    if (cd fuzz && cargo fuzz run --sanitizer none "$target" "$work/corpus/$target" -- \
        -runs=$((runs[$target] * scale)) -max_total_time=$((max_time[$target] * scale)) \
        -seed="$seed" -malloc_limit_mb=64 -rss_limit_mb=2048 -timeout=10 \
        -artifact_prefix="$work/artifacts/$target/" -print_final_stats=1 \
        2>&1) >"$work/$target.log"; then
        grep -E '^(Done|stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb))' \
            "$work/$target.log" || true
        echo "=== fuzz $target: ok in $((SECONDS - started)) s"
    else
        tail -n 60 "$work/$target.log"
        for crash in "$work/artifacts/$target"/*; do
            [ -f "$crash" ] || continue
            echo "--- crashing input $(basename "$crash") (base64; save it under" \
                "fuzz/regressions/$target/ and replay with" \
                "cargo fuzz run --sanitizer none $target FILE):"
            base64 -w 76 "$crash"
        done
        echo "=== fuzz $target: FAILED after $((SECONDS - started)) s"
        failed+=("$target")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz.sh: failed: ${failed[*]} (logs and inputs kept in $work)"
    echo "fuzz.sh: $((${#targets[@]} - ${#failed[@]})) passed, ${#failed[@]} failed"
    exit 1
fi
rm -rf "$work"
echo "fuzz.sh: ${#targets[@]} passed, 0 failed"
