#!/usr/bin/env bash
# Runs every fuzz target for a bounded time, growing the corpus kept under fuzz/corpus/<target>.
#
#   fuzz/run.sh            # 600 s per target, two targets at a time
#   fuzz/run.sh 60 jwt     # 60 s, one target
#
# cargo-fuzz needs nightly flags (sanitizers); RUSTC_BOOTSTRAP=1 lets this stable toolchain accept them.
# A crash stops its target and leaves the input under fuzz/artifacts/<target>/; the script then exits non-zero.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-600}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(target_url ssp_headers jwt policy)
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2
export RUSTC_BOOTSTRAP=1
for t in "${targets[@]}"; do cargo fuzz build --release "$t"; done

max_len() {
    case "$1" in
        jwt) echo 20000 ;;      # past the 16 KiB token limit
        policy) echo 16384 ;;
        *) echo 10000 ;;        # past the 8 KiB target limit
    esac
}

run() {
    local t="$1"
    mkdir -p "corpus/$t" "artifacts/$t"
    local rc=0
    cargo fuzz run --release "$t" "corpus/$t" -- \
        -max_total_time="$secs" -max_len="$(max_len "$t")" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 >"artifacts/$t.log" 2>&1 || rc=$?
    echo "$t: exit $rc; $(grep -E '^stat::number_of_executed_units' "artifacts/$t.log" | tail -1); corpus $(ls "corpus/$t" | wc -l) inputs"
    return $rc
}

status=0
pids=()
names=()
# Two at a time: this machine has two cores.
for t in "${targets[@]}"; do
    run "$t" & pids+=($!); names+=("$t")
    if [ ${#pids[@]} -eq 2 ]; then
        for i in "${!pids[@]}"; do wait "${pids[$i]}" || status=1; done
        pids=(); names=()
    fi
done
for i in "${!pids[@]}"; do wait "${pids[$i]}" || status=1; done
exit $status
