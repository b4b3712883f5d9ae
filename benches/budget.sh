#!/bin/sh
# A per-request CPU budget of ssp by stage, across all of its threads: the load benchmark's batched instance
# profiled with `perf record` (kernel included, SSP_BUDGET_HZ samples a second per CPU, 1,999 by default) for the
# whole of one run of one scenario (`SSP_BENCH_ONLY`, default c32), the samples' self time put into stages by symbol
# and library (benches/budget.py), each stage's share times the CPU per request measured from /proc.
# The profile is system-wide (`perf record -a`), the report filtered to the instance's process: following the
# process's threads (`perf record -p`) cost it half its throughput on this machine (perf's work at each of its
# threads' context switches), which moved it to another operating point (fewer records a write, writes handed to
# `ssp-audit`); system-wide sampling costs it about 6%. A run of the same scenario without the profiler comes
# first, on the same build, and each stage is given at both CPU figures: the profiled run's, and the share times
# the unprofiled run's CPU per request. The shares add up to the whole by construction: the method attributes, it
# does not add. Usage: benches/budget.sh [SCENARIO [SECS]]
# Needs perf (linux-perf) and permission to profile the whole system (root, or kernel.perf_event_paranoid <= 0).
# SSP_BUDGET_KEEP=<file> keeps the profile there, for `perf report -i <file> --pid <pid>`.
set -eu
cd "$(dirname "$0")/.."
scenario=${1:-c32}
secs=${2:-10}
hz=${SSP_BUDGET_HZ:-1999}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# The running proxy's CPU per request, without the profiler.
SSP_BENCH_PEERS=0 SSP_BENCH_ONLY=$scenario SSP_BENCH_SECS=$secs SSP_BENCH_ROUNDS=1 \
    cargo bench --locked --bench load >"$out/plain.txt" 2>"$out/plain.err" || { cat "$out/plain.err" >&2; exit 1; }
SSP_BENCH_PEERS=0 SSP_BENCH_ONLY=$scenario SSP_BENCH_SECS=$secs SSP_BENCH_ROUNDS=1 \
    cargo bench --locked --bench load >"$out/bench.txt" 2>"$out/bench.err" &
bench=$!
# The batched instance: `ssp serve --config <tmp>/batched.toml`.
pid=""
while [ -z "$pid" ]; do
    kill -0 "$bench" 2>/dev/null || { cat "$out/bench.err" >&2; exit 1; }
    pid=$(pgrep -f 'serve --config .*/batched\.toml' | head -1 || true)
    sleep 0.2
done
perf record -q -a -F "$hz" -o "$out/perf.data" >/dev/null 2>&1 &
perf=$!
wait "$bench"
kill -INT "$perf" 2>/dev/null || true
wait "$perf" || true
echo "without the profiler:"
cat "$out/plain.txt"
echo "profiled at $hz Hz:"
cat "$out/bench.txt"
perf report -i "$out/perf.data" --pid "$pid" --no-children --sort comm,dso,sym -F overhead,comm,dso,sym --stdio 2>/dev/null \
    | python3 benches/budget.py "$out/bench.txt" "$scenario" "$out/plain.txt"
if [ -n "${SSP_BUDGET_KEEP:-}" ]; then
    cp "$out/perf.data" "$SSP_BUDGET_KEEP"
fi
