#!/usr/bin/env bash
# Long fuzzing run of tests/test_fuzz.py (the random-graph fuzzer) under the "long" hypothesis
# profile, for a given number of seconds, and the count of graphs run and of failures.
#
#   bash scripts/fuzz_long.sh [SECONDS]          # default 1200 (20 minutes)
#   PYTHON=/path/to/venv/bin/python bash scripts/fuzz_long.sh 600
#
# It loops: each round is one pytest run of tests/test_fuzz.py with a fresh random
# --hypothesis-seed and REPARAM_FUZZ_EXAMPLES graphs per property test (default 500; the long
# profile alone would ask for thousands per test), until the time is up; the last round is cut at
# the deadline (its count is kept: the test module writes it every 50 graphs). Every graph is
# folded in float64 (must match within 1e-9) and float32 (within 1e-4). A failing round keeps
# its log (with hypothesis' shrunk example) in $LOG_DIR (default fuzz-logs/).
# REPARAM_FUZZ_KNOWN (see KNOWN_BUGS in tests/test_fuzz.py) selects which known-bug patterns stay
# off; REPARAM_FUZZ_KNOWN="" fuzzes everything.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DURATION=${1:-${DURATION:-1200}}
LOG_DIR=${LOG_DIR:-fuzz-logs}
export REPARAM_FUZZ_EXAMPLES=${REPARAM_FUZZ_EXAMPLES:-500}
mkdir -p "$LOG_DIR"

start=$(date +%s)
end=$((start + DURATION))
graphs=0 wrong=0 errors=0 regions=0 rounds=0 failed_rounds=0
while [ "$(date +%s)" -lt "$end" ]; do
    left=$((end - $(date +%s)))
    seed=$(( (RANDOM << 15) | RANDOM ))
    count="$LOG_DIR/count-$seed.txt"
    log="$LOG_DIR/round-$seed.log"
    rm -f "$count"
    REPARAM_FUZZ_COUNT_FILE="$count" timeout -s INT "$left" \
        "$PY" -m pytest -q -p no:cacheprovider tests/test_fuzz.py \
        --hypothesis-profile=long --hypothesis-seed="$seed" >"$log" 2>&1
    rc=$?
    rounds=$((rounds + 1))
    r_wrong=0 r_errors=0
    if [ -f "$count" ]; then
        # shellcheck disable=SC2046
        eval $(tr ' ' '\n' <"$count" | sed 's/^/r_/')
        graphs=$((graphs + r_graphs)); wrong=$((wrong + r_wrong))
        errors=$((errors + r_errors)); regions=$((regions + r_regions))
        rm -f "$count"
    fi
    [ -f "$count.cases" ] && mv "$count.cases" "$LOG_DIR/cases-$seed.txt"
    # a round cut at the deadline while hypothesis shrinks a failure has no FAILED line yet:
    # its log is kept (and the round counted as failed) whenever it counted a wrong output
    if { [ "$rc" -eq 0 ] || [ "$rc" -eq 124 ] || [ "$rc" -eq 130 ]; } && ! grep -q "FAILED" "$log" \
            && [ "$r_wrong" -eq 0 ] && [ "$r_errors" -eq 0 ]; then
        rm -f "$log"
    else
        failed_rounds=$((failed_rounds + 1))
        echo "round with seed $seed failed (rc $rc): see $log" >&2
    fi
    echo "$(( $(date +%s) - start ))s: $graphs graphs, $wrong wrong outputs, $errors errors" >&2
done
echo "fuzz_long: $graphs graphs run in $(( $(date +%s) - start ))s ($rounds rounds of" \
     "$REPARAM_FUZZ_EXAMPLES examples per test, profile long), $regions regions folded;" \
     "wrong outputs: $wrong, fold errors: $errors, failed rounds: $failed_rounds"
[ "$wrong" -eq 0 ] && [ "$errors" -eq 0 ] && [ "$failed_rounds" -eq 0 ]
