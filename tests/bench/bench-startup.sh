#!/bin/bash
# bench-startup.sh - start-up to first delivery: the time from starting
# `mailroot serve` on a mailroot with one file in Pickup until smtp-sink has
# the message, first with an empty compiled-code cache (ROOT/.cache), then
# with the cache the first start wrote. Loopback only; needs root (DNS on
# port 53).
#
#   tests/bench/bench-startup.sh [REPEAT]      (default 5 warm starts)
set -uo pipefail
source "$(dirname "$0")/lib.sh"
REPEAT=${1:-5}
ROOT=$WORK/mailroot-startup-root

cleanup() {
    stop_sink
    stop_mailroot
    stop_dns
}
trap cleanup EXIT

prepare_bench
start_dns
rm -rf "$ROOT"

# start_once LABEL: one start, one message; prints the seconds it took.
start_once() {
    local t0 t1
    mkdir -p "$ROOT/Pickup"
    printf 'From: a@src.test\nTo: r@d1.test\nSubject: start-up\n\nhello\n' >"$ROOT/Pickup/start.eml"
    touch -d '-10 seconds' "$ROOT/Pickup/start.eml"
    start_sink 1
    t0=$(now)
    start_mailroot "$ROOT" "$WORK/mailroot-startup.log" "$SINK_PORT"
    wait_sink || die "smtp-sink ended with an error (see $WORK/mailroot-startup.log)"
    t1=$(now)
    stop_mailroot
    printf '%-6s %.3f s\n' "$1" "$(echo "$t1 - $t0" | bc)"
}

echo "start-up to first delivery"
rm -rf "$ROOT/.cache"
start_once cold
for _ in $(seq 1 "$REPEAT"); do start_once warm; done
