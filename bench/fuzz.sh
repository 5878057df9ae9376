#!/usr/bin/env bash
# Long runs of outbox_core's property-based fuzz targets (crates/outbox_core/tests/fuzz.rs): each
# target's properties in release mode with many cases each, case counts and wall time printed per
# target, and a short report written to bench/fuzz-report.md.
#
# Usage: bench/fuzz.sh [CASES] [TARGET...]
#   CASES   cases per property (PROPTEST_CASES), default 1000000
#   TARGET  command_payloads kafka_records centrifugo_replies consumers_json table_names (default: all)
# Environment: FUZZ_THREADS (test threads, default: the number of cores), CARGO_TARGET_DIR.
# A failing case is shrunk, printed, listed in the report, and its seed saved by proptest in
# crates/outbox_core/tests/fuzz.proptest-regressions (replayed first by every later run).

set -euo pipefail

cases="${1:-1000000}"
shift $(( $# > 0 ? 1 : 0 ))
all_targets=(command_payloads kafka_records centrifugo_replies consumers_json table_names)
if (( $# > 0 )); then targets=("$@"); else targets=("${all_targets[@]}"); fi
threads="${FUZZ_THREADS:-$(nproc)}"

if ! [[ "$cases" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 [CASES] [TARGET...]  (CASES: a positive number of cases per property)" >&2
    exit 2
fi

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
report="$root/bench/fuzz-report.md"
logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT

echo "building the fuzz targets (release)..."
binary="$(cargo test --release -p outbox_core --test fuzz --no-run --message-format=json 2>"$logs/build.err" \
    | jq -r 'select(.reason == "compiler-artifact" and .target.name == "fuzz" and .executable != null) | .executable')" \
    || { cat "$logs/build.err" >&2; exit 1; }
[[ -x "$binary" ]] || { cat "$logs/build.err" >&2; echo "no test binary built" >&2; exit 1; }

started="$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
total_start=$EPOCHREALTIME
rows=()
failures=()
printf '%-20s %10s %16s %10s  %s\n' target properties cases "wall (s)" result
for target in "${targets[@]}"; do
    properties=$("$binary" --list "${target}::" 2>/dev/null | grep -c ': test$' || true)
    if [[ "$properties" -eq 0 ]]; then
        echo "unknown target: $target (targets: ${all_targets[*]})" >&2
        exit 2
    fi
    start=$EPOCHREALTIME
    # --exact is not used: the filter is the target's module path prefix.
    if PROPTEST_CASES="$cases" "$binary" "${target}::" --test-threads="$threads" >"$logs/$target.log" 2>&1; then
        result=passed
    else
        result=FAILED
        # The property that failed and its shrunk input, first lines only.
        while IFS= read -r line; do failures+=("$target: $line"); done < <(
            grep -E '^---- |minimal failing input|^Test failed' "$logs/$target.log" | cut -c1-400 | head -n 30)
        cp "$logs/$target.log" "$root/bench/fuzz-$target.log"
    fi
    wall=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
    total=$((properties * cases))
    printf '%-20s %10d %16d %10s  %s\n' "$target" "$properties" "$total" "$wall" "$result"
    rows+=("| \`$target\` | $properties | $cases | $total | $wall | $result |")
done
total_wall=$(awk -v a="$total_start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
echo "total wall time: $total_wall s"

{
    echo "# Fuzz report"
    echo
    echo "Command: \`bench/fuzz.sh $cases${*:+ $*}\` (property-based tests of"
    echo "\`crates/outbox_core/tests/fuzz.rs\`, release build, $threads test threads)."
    echo
    echo "- Started: $started"
    changes="$(git status --porcelain -- crates/outbox_core 2>/dev/null)"
    echo "- Commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)${changes:+, with uncommitted changes in crates/outbox_core}"
    echo "- Machine: $(nproc) cores, $(uname -sm), $(rustc --version)"
    echo "- Cases per property: $cases"
    echo "- Total wall time: $total_wall s"
    echo
    echo "| target | properties | cases per property | cases | wall time (s) | result |"
    echo "|---|---|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
    echo
    echo "## Failures found"
    echo
    if [[ ${#failures[@]} -eq 0 ]]; then
        echo "None."
    else
        echo "Full logs: \`bench/fuzz-<target>.log\`."
        echo
        echo '```'
        printf '%s\n' "${failures[@]}"
        echo '```'
    fi
} >"$report"
echo "report: $report"
[[ ${#failures[@]} -eq 0 ]]
