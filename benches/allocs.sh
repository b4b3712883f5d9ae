#!/bin/sh
# Heap allocations per proxied request, counted exactly by valgrind's DHAT on the release build of `ssp serve`:
# two runs on one keep-alive connection, on the load benchmark's config (every check, the JWT enforced, limits,
# both audit records, `durability = "batched"`),
# FEW and then MANY requests; the difference in allocations divided by the difference in requests leaves out
# start-up, the handshakes and the first upstream connection. Usage: benches/allocs.sh [FEW MANY]
# SSP_DHAT_OUT=FILE keeps the DHAT profile of the second run (open it in DHAT's viewer, dh_view.html).
# SSP_COUNT=instructions counts instructions executed instead (valgrind's callgrind, every thread of ssp): per
# request a figure that, unlike CPU time, hardly moves with what else the machine is doing, for comparing two
# builds (runs of one build agreed within 0.1%, but for one outlier). Under valgrind SHA-256 takes its software
# path (valgrind has no SHA extensions): about a third of the count is the audit chain's hashing, which costs a
# tenth of that natively. SSP_BIN=PATH measures another build of ssp (default: the release build made here).
# SSP_PEER=nginx (with SSP_COUNT=instructions) counts nginx's instructions instead: the load benchmark's nginx
# configuration with one worker and no master process, the same provider, certificates, headers and token, the
# requests in origin form (nginx is a reverse proxy); nginx must be installed (benches/load.sh installs it).
set -eu
cd "$(dirname "$0")/.."
few=${1:-20}
many=${2:-220}
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 1; }
cargo build --release --locked --bin ssp >&2
work=$(mktemp -d)
provider=""
trap '[ -n "$provider" ] && kill "$provider" 2>/dev/null; rm -rf "$work"' EXIT
# `cargo bench` below builds ssp again, in its own profile, to the same path: keep the release build aside.
cp target/release/ssp "$work/ssp-release"
ssp_bin=${SSP_BIN:-$work/ssp-release}
what=${SSP_COUNT:-allocations}
peer=${SSP_PEER:-ssp}
case "$peer:$what" in
    ssp:*) ;;
    nginx:instructions) nginx=$(command -v nginx || echo /usr/sbin/nginx) ;;
    *) echo "SSP_PEER=$peer: only ssp, or nginx with SSP_COUNT=instructions" >&2; exit 1 ;;
esac
bench=$(cargo bench --locked --bench load --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | tail -1)
target/release/ssp dev-certs --out "$work/certs" >/dev/null
mkdir "$work/policies"
cp policies/dev.toml "$work/policies/"
SSP_BENCH_ROLE=provider SSP_BENCH_CERTS="$work/certs" "$bench" >"$work/port" &
provider=$!
while [ ! -s "$work/port" ]; do sleep 0.1; done
port=$(head -1 "$work/port")
listen=127.0.0.1:18443
# The load benchmark's own config for its batched instance: every check, the JWT, limits.
SSP_BENCH_ROLE=ssp-config SSP_BENCH_PORT=18443 SSP_BENCH_PROVIDER="127.0.0.1:$port" "$bench" >"$work/ssp.toml"
endpoint=https://provider.dev.localhost:9443/B82617/STU3/1/gpconnect
url=https://$listen/$endpoint/fhir/metadata
if [ "$peer" = nginx ]; then
    SSP_BENCH_ROLE=nginx-config SSP_BENCH_PORT=18443 SSP_BENCH_PROVIDER="127.0.0.1:$port" SSP_BENCH_DIR="$work" \
        "$bench" >"$work/nginx.conf"
    url=https://$listen/B82617/STU3/1/gpconnect/fhir/metadata
fi

# Runs ssp under valgrind for $1 requests (DHAT's profile to $2); prints the count. valgrind runs one thread at a
# time; with its default scheduling, sled's `sled-io` threads, which spin at start-up, held it for over 20 minutes
# before ssp listened (twice on the 2-core machine). `--fair-sched=yes` hands it round in turn.
count() {
    if [ "$peer" = nginx ]; then
        valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$work/callgrind.%p" \
            "$nginx" -c "$work/nginx.conf" -p "$work" 2>"$work/valgrind.txt" &
    elif [ "$what" = instructions ]; then
        valgrind --fair-sched=yes --tool=callgrind --separate-threads=yes \
            --callgrind-out-file="$work/callgrind.%p" "$ssp_bin" serve --config "$work/ssp.toml" \
            2>"$work/valgrind.txt" &
    else
        valgrind --fair-sched=yes --tool=dhat --dhat-out-file="$2" "$ssp_bin" serve --config "$work/ssp.toml" \
            2>"$work/valgrind.txt" &
    fi
    ssp=$!
    # Until ssp listens, curl fails at once (refused); from then on one probe completes, in each run alike. A short
    # --max-time gave up mid-handshake under valgrind, and each retry's handshake was counted.
    until curl -s -o /dev/null --max-time 60 "https://$listen/" --cacert "$work/certs/ca.crt" \
        --cert "$work/certs/consumer.crt" --key "$work/certs/consumer.key" 2>/dev/null; do
        sleep 0.5
    done
    # A token lives 300 s (GP Connect): made now, after the slow start under valgrind, not once for both runs.
    token=$(target/release/ssp dev-token --aud "$endpoint" --scope "organization/*.read")
    args=""
    i=0
    while [ "$i" -lt "$1" ]; do
        args="$args -o /dev/null $url"
        i=$((i + 1))
    done
    # shellcheck disable=SC2086
    curl -s --http1.1 --cacert "$work/certs/ca.crt" --cert "$work/certs/consumer.crt" \
        --key "$work/certs/consumer.key" -w '%{http_code}\n' \
        -H "Ssp-TraceID: 09a01679-2564-0fb4-5129-aecc81ea2706" -H "Ssp-From: 200000000359" \
        -H "Ssp-To: 918999198993" -H "Ssp-InteractionID: urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1" \
        -H "Authorization: Bearer $token" $args >"$work/codes"
    kill -TERM "$ssp"
    wait "$ssp" || true
    ok=$(grep -c '^200$' "$work/codes" || true)
    [ "$ok" = "$1" ] || { echo "expected $1 answers of 200, got $ok:" >&2; sort "$work/codes" | uniq -c >&2; exit 1; }
    if [ "$what" = instructions ]; then
        # Every thread's instructions but those whose count depends on time, not on the requests: the entropy
        # source's CPU-jitter sampling (aws-lc seeds each thread's generator so) and a background thread of sled
        # that spins on a lazily made value.
        for f in "$work"/callgrind.*-*; do
            callgrind_annotate --threshold=100 "$f" | grep -E '^ *[0-9,]+ \(' | grep -v 'PROGRAM TOTALS'
        done | grep -Ev 'jent_|rol64|uint32rotl|ptr_to_le|xoshiro|sled::lazy' \
            | awk '{ gsub(",", "", $1); n += $1 } END { printf "%d\n", n }'
        rm -f "$work"/callgrind.*
    else
        sed -n 's/^==[0-9]*== Total:.* in \([0-9,]*\) blocks.*/\1/p' "$work/valgrind.txt" | tr -d ,
    fi
}
a=$(count "$few" /dev/null)
b=$(count "$many" "${SSP_DHAT_OUT:-/dev/null}")
echo "$peer: $a $what with $few requests, $b with $many"
echo "$what per proxied request: $(( (b - a) / (many - few) ))"
