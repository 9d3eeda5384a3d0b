#!/bin/bash
# bench-slow-destinations.sh - 1,000 messages to 1,000 destinations behind a
# slow server (every reply, the greeting included, waits DELAY seconds),
# mailroot and Postfix side by side with the same connection limit.
# Loopback only; needs root (Postfix runs as the system instance, its
# configuration saved and restored as ../shared/bench/bench-postfix.sh does).
#
#   tests/bench/bench-slow-destinations.sh
#
# Env:
#   COUNT   messages = destinations (default 1000): u<i>@d<i>.test, one each
#   DELAY   seconds before each reply (default 2)
#   CONNS   connection limit for both relays (default COUNT): mailroot's
#           --max-connections, Postfix's default_process_limit
#   TOOLS   "mailroot postfix" (default both)
#   SHARED  the shared benchmark scripts (default ../shared/bench beside the repo)
#
# The slow server is tests/peers/smtp_peer.py (aiosmtpd) with --reply-delay;
# it records every connection, so the table shows how many sessions each
# relay held at once. DNS: dns-mx-server.sh with DOMAINS=COUNT (d<i>.test MX
# mx.d<i>.test, A 127.0.0.1). The clock runs from the release of the files
# until the server has received every message.
set -uo pipefail
export RESULTS=${RESULTS:-$(cd "$(dirname "$0")/../.." && pwd)/target/bench-slow-results.csv}
source "$(dirname "$0")/lib.sh"
COUNT=${COUNT:-1000}
DELAY=${DELAY:-2}
CONNS=${CONNS:-$COUNT}
TOOLS=${TOOLS:-"mailroot postfix"}
SLOW_ADDR=127.0.0.1
SLOW_PORT=2526
PEER_DIR=$WORK/slow-peer
SPOOL=/var/spool/postfix

PEER_PID=
cleanup() {
    stop_mon
    stop_mailroot
    [ -n "$PEER_PID" ] && kill "$PEER_PID" 2>/dev/null
    stop_dns
    if [ -e /etc/postfix/main.cf.bench-orig ] || [ -e /etc/postfix/main.cf.bench-orig-absent ]; then
        "$SHARED/bench-postfix.sh" teardown >/dev/null 2>&1
    fi
}
trap cleanup EXIT

prepare_bench
"$PY" -c 'import aiosmtpd' 2>/dev/null || "$PY" -m pip install -q aiosmtpd
DOMAINS=$COUNT start_dns
rm -f "$RESULTS"

# The corpus: message i to u<i>@d<i>.test, about 4 KB.
CORPUS=$WORK/corpus-slow-$COUNT
if [ ! -f "$CORPUS/.done" ]; then
    rm -rf "$CORPUS"; mkdir -p "$CORPUS"
    "$PY" - "$CORPUS" "$COUNT" <<'PY'
import os, sys, email.utils
out, count = sys.argv[1], int(sys.argv[2])
line = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod"
date = email.utils.formatdate()
for i in range(count):
    head = (f"From: Bench Sender <bench@src.test>\nTo: u{i}@d{i}.test\n"
            f"Subject: slow destination {i}\nDate: {date}\nMessage-ID: <slow-{i}@src.test>\n\n")
    body = "\n".join([line] * ((4096 - len(head)) // (len(line) + 1)))
    with open(os.path.join(out, f"msg-{i:06d}.eml"), "w") as f:
        f.write(head + body + "\n")
PY
    touch "$CORPUS/.done"
fi

start_peer() {
    rm -rf "$PEER_DIR"; mkdir -p "$PEER_DIR"
    "$PY" "$REPO/tests/peers/smtp_peer.py" --listen "$SLOW_ADDR:$SLOW_PORT" --out "$PEER_DIR" \
        --reply-delay "$DELAY" --no-sync 2>"$WORK/slow-peer.log" &
    PEER_PID=$!
    for _ in $(seq 1 200); do [ -e "$PEER_DIR/ready" ] && return 0; sleep 0.05; done
    die "the slow server did not start (see $WORK/slow-peer.log)"
}
stop_peer() { [ -n "$PEER_PID" ] && kill "$PEER_PID" 2>/dev/null; wait "$PEER_PID" 2>/dev/null; PEER_PID=; }
delivered() { local n; n=$(grep -c '"event": "message"' "$PEER_DIR/events.jsonl" 2>/dev/null); echo "${n:-0}"; }
peak_sessions() {
    "$PY" - "$PEER_DIR/events.jsonl" <<'PY'
import json, sys
# A session counts from its connect until the client closed its side.
held, peak = set(), 0
for line in open(sys.argv[1]):
    event = json.loads(line)
    if event["event"] == "connect":
        held.add(event["peer"]); peak = max(peak, len(held))
    elif event["event"] in ("client-closed", "disconnect"):
        held.discard(event.get("peer"))
print(peak)
PY
}
MAX_THREADS=0
wait_delivered() {   # until COUNT messages arrived or TIMEOUT; counts mailroot's threads
    local deadline=$((SECONDS + TIMEOUT)) threads
    MAX_THREADS=0
    while [ "$(delivered)" -lt "$COUNT" ]; do
        [ $SECONDS -lt $deadline ] || { log "TIMEOUT: $(delivered) of $COUNT delivered"; return 1; }
        if [ -n "${RELAY_PID:-}" ]; then
            threads=$(ls "/proc/$RELAY_PID/task" 2>/dev/null | wc -l)
            [ "$threads" -gt "$MAX_THREADS" ] && MAX_THREADS=$threads
        fi
        sleep 0.1
    done
}

run_mailroot() {
    local root="$WORK/mailroot-slow-root" t0 t1
    fill_pickup "$CORPUS" "$root"
    start_peer
    t0=$(now)
    start_mailroot "$root" "$WORK/mailroot-slow.log" "$SLOW_PORT" --max-connections "$CONNS"
    start_mon "$WORK/mailroot-slow-mon.json" "$RELAY_PID"
    wait_delivered
    t1=$(now)
    stop_mon
    stop_mailroot
    PEAK=$(peak_sessions)
    stop_peer
    record mailroot "slow-x$PEAK" "$COUNT" 1 1 "$(echo "$t1 - $t0" | bc)" "$COUNT" \
        "$(json_get "$WORK/mailroot-slow-mon.json" peak_rss_kb)" "$(json_get "$WORK/mailroot-slow-mon.json" peak_pss_kb)" \
        "$(json_get "$WORK/mailroot-slow-mon.json" cpu_s)" "" ""
    log "mailroot: $PEAK sessions at once, at most $MAX_THREADS threads"
}

# Postfix, its system instance, configured for MX delivery to the slow
# server with CONNS processes; the originals are saved as bench-postfix.sh
# saves them, and its `teardown` restores them.
pf_setup() {
    for f in main.cf master.cf; do
        [ -e /etc/postfix/$f.bench-orig ] || [ -e /etc/postfix/$f.bench-orig-absent ] ||
            cp -a /etc/postfix/$f /etc/postfix/$f.bench-orig 2>/dev/null || touch /etc/postfix/$f.bench-orig-absent
    done
    cat >/etc/postfix/main.cf <<EOF
# Written by bench-slow-destinations.sh. Original: main.cf.bench-orig
compatibility_level = 3.6
myhostname = bench.localdomain
mydomain = localdomain
myorigin = \$myhostname
mydestination =
local_recipient_maps =
local_transport = error:local delivery disabled in benchmark
alias_maps =
alias_database =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
biff = no
append_dot_mydomain = no
smtputf8_enable = no
maillog_file = /var/log/postfix-bench.log
relayhost =
smtp_dns_support_level = enabled
smtp_host_lookup = dns
smtp_tcp_port = $SLOW_PORT
default_process_limit = $CONNS
EOF
    [ -e /etc/postfix/master.cf.bench-orig ] && cp -a /etc/postfix/master.cf.bench-orig /etc/postfix/master.cf
    postconf -MX smtp/inet
    /usr/lib/postfix/configure-instance.sh - >/dev/null 2>&1
    printf 'nameserver %s\noptions attempts:2 timeout:1\n' "$DNS_ADDR" >$SPOOL/etc/resolv.conf
    postsuper -d ALL >/dev/null 2>&1
    find $SPOOL/maildrop -type f -delete 2>/dev/null
    postfix check || die "postfix check failed"
    postfix start >/dev/null 2>&1 || die "postfix start failed"
    sleep 1
}

run_postfix() {
    local t0 t1 master
    pf_setup
    master=$(awk '{print $1}' $SPOOL/pid/master.pid)
    start_peer
    start_mon "$WORK/postfix-slow-mon.json" "$master"
    t0=$(now)
    # Fed by sendmail, four loops in parallel (about 12 ms of CPU each);
    # delivery, not submission, takes the time here.
    for w in 0 1 2 3; do
        ( n=0; for f in "$CORPUS"/msg-*.eml; do
              [ $((n % 4)) -eq $w ] && /usr/sbin/sendmail -t -i -f bench@src.test <"$f"
              n=$((n + 1))
          done ) &
    done
    wait_delivered
    t1=$(now)
    stop_mon
    PEAK=$(peak_sessions)
    stop_peer
    log "Postfix: $PEAK sessions at once, at most $(json_get "$WORK/postfix-slow-mon.json" peak_procs) processes"
    postfix stop >/dev/null 2>&1
    record postfix "slow-x$PEAK" "$COUNT" 1 1 "$(echo "$t1 - $t0" | bc)" "$COUNT" \
        "$(json_get "$WORK/postfix-slow-mon.json" peak_rss_kb)" "$(json_get "$WORK/postfix-slow-mon.json" peak_pss_kb)" \
        "$(json_get "$WORK/postfix-slow-mon.json" cpu_s)" "" ""
}

for tool in $TOOLS; do
    case $tool in
    mailroot) run_mailroot ;;
    postfix) run_postfix ;;
    esac
done

echo
echo "$COUNT destinations, each reply delayed ${DELAY} s; connection limit $CONNS (variant slow-xN: N sessions held at once)"
summarize "$RESULTS"
