# Shared by the scripts/bench-* drivers (sourced from the repository root, not run).
#
# Smoke mode: `BENCH_SMOKE=1 scripts/bench-X` or `scripts/bench-X --smoke`. A few iterations,
# the debug (test) build instead of a release build, nothing written to docs/, no package
# installs: a missing dependency fails under CI=true (scripts/setup installs them) and skips the
# benchmark otherwise. crates/bench/tests/smoke.rs runs every script this way.
#
# Full mode records the run: headline rows and section in docs/benchmarks.md, history entry in
# docs/bench-history/<script>.md (`bench_record`).

BENCH_NAME="$(basename "$0")"
BENCH_SMOKE="${BENCH_SMOKE:-0}"
if [[ "${1:-}" == --smoke ]]; then
    BENCH_SMOKE=1
    shift
fi
export BENCH_SMOKE
export DEBIAN_FRONTEND=noninteractive
# The nimbus processes the benchmarks start skip the KVM probe: its QEMU would run next to the
# measured work, and nested KVM is not usable on the development machine (bench-vm sets its
# accelerator itself).
export NIMBUS_VM_ACCEL="${NIMBUS_VM_ACCEL:-tcg}"
BENCH_TARGET="${CARGO_TARGET_DIR:-target}"
if [[ "$BENCH_SMOKE" == 1 ]]; then
    BENCH_PROFILE=debug
    echo "$BENCH_NAME: smoke mode (debug build, few iterations, docs untouched)" >&2
else
    BENCH_PROFILE=release
fi

bench_smoke() { [[ "$BENCH_SMOKE" == 1 ]]; }

# bench_build ARGS...: `cargo build --release -q ARGS`. In smoke mode the debug build of the
# whole workspace with all targets instead, as scripts/test builds it: building a subset would
# resolve other features and compile a second copy of the dependencies.
bench_build() {
    if bench_smoke; then cargo build --workspace --all-targets -q; else cargo build --release -q "$@"; fi
}

# bench_test_run FILE TEST: runs the ignored benchmark test TEST of crates/nimbus/tests/FILE.rs
# (release; smoke mode: the debug build selected as scripts/test selects it).
bench_test_run() {
    local sel=(--release -p nimbus)
    bench_smoke && sel=(--workspace)
    cargo test "${sel[@]}" -q --test "$1" -- --ignored --exact "$2" --nocapture --test-threads 1
}

# bench_bin NAME: path of a binary built by bench_build.
bench_bin() { echo "$BENCH_TARGET/$BENCH_PROFILE/$1"; }

bench_have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }

# bench_need COMMAND PACKAGE...: a required dependency. Full mode installs it when missing; smoke
# mode never installs: it fails under CI=true and skips the benchmark (exit 0) otherwise.
bench_need() {
    local cmd=$1
    shift
    bench_have "$cmd" && return 0
    if bench_smoke; then
        if [[ "${CI:-}" == true ]]; then
            echo "$BENCH_NAME: missing dependency in CI: $cmd (scripts/setup installs $*)" >&2
            exit 1
        fi
        echo "SKIPPED: $BENCH_NAME: missing dependency $cmd (scripts/setup installs $*)" >&2
        exit 0
    fi
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "$@"
}

# bench_optional COMMAND PACKAGE...: an optional baseline; full mode tries to install it.
bench_optional() {
    local cmd=$1
    shift
    bench_have "$cmd" || bench_smoke || apt-get install -y -qq --no-install-recommends "$@" || true
}

# bench_record HEADING BODY_FILE [ROW...]: records a full run (rows: metric|target|result|ratio|verdict).
# Does nothing in smoke mode.
bench_record() {
    bench_smoke && return 0
    local heading=$1 body=$2
    shift 2
    local rows=()
    for r in "$@"; do rows+=(--row "$r"); done
    cargo build --release -q -p nimbus-bench
    "$BENCH_TARGET/release/nimbus-bench" record --doc docs/benchmarks.md --script "$BENCH_NAME" \
        --heading "$heading" --command "${BENCH_COMMAND:-scripts/$BENCH_NAME}" --body "$body" \
        "${rows[@]+"${rows[@]}"}"
}

# bench_ratio A B: A/B with two decimals and an x.
bench_ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "n/a"; else printf "%.2fx", a / b }'; }

# bench_verdict CONDITION_AWK A B: **met** when awk's `a CONDITION b` holds, else **missed**.
bench_verdict() { awk -v a="$2" -v b="$3" "BEGIN { if (a $1 b) print \"**met**\"; else print \"**missed**\" }"; }

# bench_cell FILE ROW_PATTERN COLUMN: the COLUMNth cell (1-based) of the first markdown table row
# whose first cell matches ROW_PATTERN (awk regex), without `**` and a trailing unit.
bench_cell() {
    awk -F'|' -v pat="$2" -v col="$3" '$2 ~ pat { v = $(col + 1); gsub(/\*|^ +| +$/, "", v); sub(/ *(ms|s|MiB|x)$/, "", v); print v; exit }' "$1"
}
