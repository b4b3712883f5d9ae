#!/bin/sh
# The load benchmark in one command: installs nginx and HAProxy (Debian packages) when they are missing and this
# user can, so that they are measured in the same run, then runs `cargo bench --bench load`.
# Environment: SSP_BENCH_SECS, SSP_BENCH_ROUNDS, SSP_BENCH_ONLY, SSP_BENCH_PEERS (see benches/load.rs).
set -eu
cd "$(dirname "$0")/.."
if [ "${SSP_BENCH_PEERS:-1}" != 0 ]; then
    missing=""
    command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$missing nginx"
    command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing="$missing haproxy"
    if [ -n "$missing" ]; then
        sudo=""
        [ "$(id -u)" = 0 ] || sudo="sudo"
        if command -v apt-get >/dev/null 2>&1; then
            echo "installing$missing to measure them in the same run" >&2
            $sudo apt-get update -qq >/dev/null 2>&1 || true
            DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $missing >/dev/null 2>&1 \
                || echo "could not install$missing: their rows are left out" >&2
        fi
    fi
fi
exec cargo bench --locked --bench load "$@"
