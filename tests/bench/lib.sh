# lib.sh - what the benchmark scripts here share: the scripts of
# ../shared/bench (logging, smtp-sink, the memory monitor, the DNS server),
# a release build of mailroot, and starting and stopping it.
#
# Source it from a script in this directory (set RESULTS first if the script
# keeps a results file).
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SHARED=${SHARED:-$(cd "$REPO/.." && pwd)/shared/bench}
[ -f "$SHARED/common.sh" ] || { echo "no benchmark scripts in $SHARED (set SHARED)"; exit 2; }
source "$SHARED/common.sh"
DNS_ADDR=127.0.0.53
MAILROOT=$REPO/target/release/mailroot
RELAY_PID=

# prepare_bench: build mailroot (release) and install smtp-sink and dnsmasq
# when they are missing.
prepare_bench() {
    log "building mailroot (release)"
    (cd "$REPO" && cargo build --release -q -p mailroot) || die "cargo build failed"
    command -v smtp-sink >/dev/null && command -v dnsmasq >/dev/null || "$SHARED/peers-install.sh" apt >&2
}

# start_dns: (re)start the MX server on DNS_ADDR:53; DOMAINS in the
# environment sets how many d<i>.test domains it serves.
start_dns() {
    stop_dns
    "$SHARED/dns-mx-server.sh" start "$DNS_ADDR" 53 || die "DNS server did not start"
}

stop_dns() {
    "$SHARED/dns-mx-server.sh" stop >/dev/null 2>&1
}

# fill_pickup CORPUS ROOT: a fresh mailroot whose Pickup holds the corpus,
# old enough to be claimed at once, and on disk before the clock starts.
fill_pickup() {
    rm -rf "$2"; mkdir -p "$2/Pickup"
    # No globs: 100,000 names overflow an argument list.
    cp -r "$1/." "$2/Pickup/"
    rm -f "$2/Pickup/.done"
    find "$2/Pickup" -type f -print0 | xargs -0 touch -d '-10 seconds'
    sync
}

# start_mailroot ROOT LOG PORT [ARGS...]: `mailroot serve` in the background,
# resolving through DNS_ADDR and delivering to PORT; sets RELAY_PID.
start_mailroot() {
    local root=$1 logfile=$2 port=$3
    shift 3
    "$MAILROOT" serve --root "$root" --hostname bench.localdomain --dns-server "$DNS_ADDR:53" \
        --smtp-port "$port" --poll-interval 0.05 "$@" >"$logfile" 2>&1 &
    RELAY_PID=$!
}

stop_mailroot() {
    [ -n "$RELAY_PID" ] || return 0
    kill "$RELAY_PID" 2>/dev/null
    wait "$RELAY_PID" 2>/dev/null
    RELAY_PID=
}
