#!/bin/bash
# bench-startup.sh - start-up to first delivery: the time from starting
# `mailroot serve` on a mailroot with one file in Pickup until smtp-sink has
# the message, first with an empty compiled-code cache (ROOT/.cache), then
# with the cache the first start wrote. Loopback only; needs root (DNS on
# port 53).
#
#   tests/bench/bench-startup.sh [REPEAT]      (default 5 warm starts)
set -uo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
SHARED=${SHARED:-$(cd "$REPO/.." && pwd)/shared/bench}
[ -f "$SHARED/common.sh" ] || { echo "no benchmark scripts in $SHARED (set SHARED)"; exit 2; }
source "$SHARED/common.sh"
REPEAT=${1:-5}
DNS_ADDR=127.0.0.53
MAILROOT=$REPO/target/release/mailroot
ROOT=$WORK/mailroot-startup-root

cleanup() {
    stop_sink
    [ -n "${RELAY_PID:-}" ] && kill "$RELAY_PID" 2>/dev/null
    "$SHARED/dns-mx-server.sh" stop >/dev/null 2>&1
}
trap cleanup EXIT

log "building mailroot (release)"
(cd "$REPO" && cargo build --release -q -p mailroot) || die "cargo build failed"
command -v smtp-sink >/dev/null && command -v dnsmasq >/dev/null || "$SHARED/peers-install.sh" apt >&2
"$SHARED/dns-mx-server.sh" stop >/dev/null 2>&1
"$SHARED/dns-mx-server.sh" start "$DNS_ADDR" 53 || die "DNS server did not start"
rm -rf "$ROOT"

# start_once LABEL: one start, one message; prints the seconds it took.
start_once() {
    local t0 t1
    mkdir -p "$ROOT/Pickup"
    printf 'From: a@src.test\nTo: r@d1.test\nSubject: start-up\n\nhello\n' >"$ROOT/Pickup/start.eml"
    touch -d '-10 seconds' "$ROOT/Pickup/start.eml"
    start_sink 1
    t0=$(now)
    "$MAILROOT" serve --root "$ROOT" --hostname bench.localdomain --dns-server "$DNS_ADDR:53" \
        --smtp-port "$SINK_PORT" --poll-interval 0.05 >"$WORK/mailroot-startup.log" 2>&1 &
    RELAY_PID=$!
    wait_sink || die "smtp-sink ended with an error (see $WORK/mailroot-startup.log)"
    t1=$(now)
    kill "$RELAY_PID" 2>/dev/null; wait "$RELAY_PID" 2>/dev/null; RELAY_PID=
    printf '%-6s %.3f s\n' "$1" "$(echo "$t1 - $t0" | bc)"
}

echo "start-up to first delivery"
rm -rf "$ROOT/.cache"
start_once cold
for _ in $(seq 1 "$REPEAT"); do start_once warm; done
