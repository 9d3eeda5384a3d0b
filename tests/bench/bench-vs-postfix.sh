#!/bin/bash
# bench-vs-postfix.sh - mailroot and Postfix side by side, on the same corpus,
# on this machine, loopback only. Prints messages per second for each, the
# ratio, peak RSS and CPU seconds.
#
#   tests/bench/bench-vs-postfix.sh [REPEAT]        (default 3; needs root)
#
# Env:
#   CASES   "MSGS:RCPTS ..." (default "10000:1 2000:10"): MSGS files of about
#           4 KB, RCPTS recipients each spread over d0.test..d9.test
#   TOOLS   "mailroot postfix" (default both)
#   SHARED  the shared benchmark scripts (default ../shared/bench beside the repo)
#
# Both relays resolve MX records through the same local DNS server
# (dns-mx-server.sh: d<i>.test MX mx.d<i>.test, A 127.0.0.1) and deliver to
# smtp-sink on 127.0.0.1:2525; the clock runs from the moment the files are
# released until smtp-sink has received every transaction.
# - mailroot: the corpus is copied into Pickup while mailroot is stopped, then
#   `mailroot serve` starts (start-up included in the time).
# - Postfix: bench-postfix.sh's "prefill" mode in "mx" mode (its maildrop filled
#   first, then released at once: pickup, cleanup, qmgr, smtp).
# Both fsync every accepted message before the original is gone.
set -uo pipefail
export RESULTS=${RESULTS:-$(cd "$(dirname "$0")/../.." && pwd)/target/bench-results.csv}
source "$(dirname "$0")/lib.sh"
REPEAT=${1:-3}
CASES=${CASES:-"10000:1 2000:10"}
TOOLS=${TOOLS:-"mailroot postfix"}

cleanup() {
    stop_sink
    stop_mon
    stop_mailroot
    stop_dns
}
trap cleanup EXIT

# bench-postfix.sh stops the DNS server when it ends: start it again for mailroot.
ensure_dns() {
    [ -f "$WORK/dns.pid" ] && kill -0 "$(cat "$WORK/dns.pid")" 2>/dev/null && return 0
    start_dns
}

prepare_bench
start_dns
rm -f "$RESULTS"

# run_mailroot MSGS RCPTS RUN
run_mailroot() {
    local msgs=$1 rcpts=$2 run=$3 corpus root txns t0 t1
    ensure_dns
    corpus=$(corpus "$msgs" "$rcpts")
    root="$WORK/mailroot-root"
    fill_pickup "$corpus" "$root"
    # one transaction per recipient domain
    txns=$(( msgs * (rcpts < 10 ? rcpts : 10) ))
    start_sink "$txns"
    t0=$(now)
    start_mailroot "$root" "$WORK/mailroot.log" "$SINK_PORT"
    start_mon "$WORK/mailroot-mon.json" "$RELAY_PID"
    wait_sink || log "warning: smtp-sink ended with an error"
    t1=$(now)
    stop_mon
    stop_mailroot
    record mailroot "mx-pickup" "$msgs" "$rcpts" "$run" "$(echo "$t1 - $t0" | bc)" "$txns" \
        "$(json_get "$WORK/mailroot-mon.json" peak_rss_kb)" "$(json_get "$WORK/mailroot-mon.json" peak_pss_kb)" \
        "$(json_get "$WORK/mailroot-mon.json" cpu_s)" "" ""
}

for case in $CASES; do
    msgs=${case%%:*}; rcpts=${case##*:}
    for tool in $TOOLS; do
        case $tool in
        mailroot) for run in $(seq 1 "$REPEAT"); do run_mailroot "$msgs" "$rcpts" "$run"; done ;;
        postfix) MODES=mx CASES="$msgs:$rcpts:prefill" DNS_ADDR=$DNS_ADDR "$SHARED/bench-postfix.sh" "$REPEAT" ;;
        esac
    done
done
"$SHARED/bench-postfix.sh" teardown >/dev/null 2>&1

echo
summarize "$RESULTS"
"$PY" - "$RESULTS" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
def median(tool, msgs, rcpts):
    rates = [float(r["msgs_per_s"]) for r in rows if r["tool"] == tool and r["msgs"] == msgs and r["rcpts"] == rcpts]
    return statistics.median(rates) if rates else None
print()
print(f'{"case":<14} {"mailroot/s":>11} {"postfix/s":>10} {"ratio":>6}')
for msgs, rcpts in sorted({(r["msgs"], r["rcpts"]) for r in rows}, key=lambda k: (int(k[1]), int(k[0]))):
    m, p = median("mailroot", msgs, rcpts), median("postfix", msgs, rcpts)
    ratio = f"{m / p:.2f}" if m and p else "-"
    print(f'{msgs + "x" + rcpts:<14} {m or 0:>11.0f} {p or 0:>10.0f} {ratio:>6}')
PY
