#!/bin/sh
# Make (once) a minimal Debian root for the tests and print its path.
# usage: debian_root.sh SUITE [PACKAGE,PACKAGE...]
#   debian_root.sh bullseye python3                      a bare Debian 11 with only python3
#   debian_root.sh bookworm systemd,systemd-sysv,dbus,python3   one that boots systemd in systemd-nspawn
# Cached under ${AIRGAP_LLM_CACHE:-~/.cache/airgap-llm}/roots/, keyed by suite, packages and this
# script; built beside its place and renamed in, so a killed build leaves nothing half made.
# Needs root and debootstrap, and the Debian archive (the only network use in the tests).
set -eu

main() {
    suite=$1 include=${2:-python3}
    cache=${AIRGAP_LLM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/airgap-llm}
    key=$( (printf '%s %s\n' "$suite" "$include"; cat "$0") | sha256sum | cut -c1-12)
    root="$cache/roots/$suite-$key"
    if [ -f "$root/.done" ]; then printf '%s\n' "$root"; exit 0; fi
    mkdir -p "$cache/roots"
    exec 9>"$root.lock"
    flock 9
    if [ -f "$root/.done" ]; then printf '%s\n' "$root"; exit 0; fi
    tmp="$root.partial"
    rm -rf "$tmp"
    debootstrap --variant=minbase --include="$include" "$suite" "$tmp" >"$root.log" 2>&1 || {
        tail -20 "$root.log" >&2
        printf 'error: debootstrap %s failed; log: %s\n' "$suite" "$root.log" >&2
        rm -rf "$tmp"
        exit 1
    }
    rm -rf "$tmp/var/cache/apt/archives"/*.deb
    printf '%s %s\n' "$suite" "$include" >"$tmp/.done"
    mv "$tmp" "$root"
    printf '%s\n' "$root"
}

main "$@"
