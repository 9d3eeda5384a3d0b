#!/usr/bin/env bash
# Installs what the test suite needs on a Debian machine, as root:
#   nsd      - the authoritative DNS server the end-to-end tests run
#   openssl  - makes the test CA and server certificates for the STARTTLS tests
#   postfix  - a real MTA with STARTTLS, run as private instances by the tests
#   aiosmtpd - the SMTP server (Python) behind tests/peers/smtp_peer.py
#   the wasm32-wasip2 Rust target, for the components
# Services are never started or enabled: each test starts its own peers on
# loopback addresses and stops them.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

need_apt=()
command -v nsd >/dev/null || need_apt+=(nsd)
command -v openssl >/dev/null || need_apt+=(openssl)
command -v postfix >/dev/null || need_apt+=(postfix)
[ -f /etc/ssl/certs/ca-certificates.crt ] || need_apt+=(ca-certificates)
if [ ${#need_apt[@]} -gt 0 ]; then
    apt-get update -q
    # Postfix asks how to configure itself: not at all. Tests run private instances.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get install -y -q --no-install-recommends "${need_apt[@]}"
    # Debian enables the nsd service on install; the tests run their own.
    if [ -d /run/systemd/system ]; then
        systemctl disable --now nsd postfix >/dev/null 2>&1 || true
    else
        for service in nsd postfix; do
            deb-systemd-helper disable "$service.service" >/dev/null 2>&1 || true
            update-rc.d "$service" disable >/dev/null 2>&1 || true
        done
    fi
fi
python3 -c 'import aiosmtpd' 2>/dev/null || python3 -m pip install -q aiosmtpd
rustup target add wasm32-wasip2
