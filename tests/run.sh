#!/usr/bin/env bash
# Builds the whole workspace once, then runs every test: unit tests, overlayctl's
# fake-daemon tests, and the network-namespace lab tests (which need root).
#
#   sudo tests/run.sh                 # everything
#   sudo tests/run.sh lan             # only tests whose name contains "lan"
#
# Extra arguments go to the test harness (filters, --nocapture, ...).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "tests/run.sh: the end-to-end tests create network namespaces and need root; run: sudo tests/run.sh" >&2
    exit 1
fi

# Under sudo, PATH and HOME are root's: find the invoking user's rustup toolchain.
if ! command -v cargo >/dev/null 2>&1 && [ -n "${SUDO_USER:-}" ]; then
    user_home=$(getent passwd "$SUDO_USER" | cut -d: -f6)
    export CARGO_HOME="${CARGO_HOME:-$user_home/.cargo}"
    export RUSTUP_HOME="${RUSTUP_HOME:-$user_home/.rustup}"
    export PATH="$CARGO_HOME/bin:$PATH"
fi
command -v cargo >/dev/null 2>&1 || { echo "tests/run.sh: cargo not found in PATH" >&2; exit 1; }

for tool in ip nft ping tcpdump ss dig dnsmasq; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "tests/run.sh: '$tool' is missing; install iproute2 nftables iputils-ping tcpdump dnsutils dnsmasq (see .ci/run)" >&2
        exit 1
    }
done

# One build of every target; `cargo test` then only links what is already built.
cargo build -j2 --workspace --all-targets
# The Debian packages tests/tests/debs.rs installs into a fresh root, made from
# the debug build just done (no second build); without cargo-deb that test says
# it was skipped.
if command -v cargo-deb >/dev/null 2>&1; then
    DEB_PROFILE=dev packaging/build-debs.sh >/dev/null
fi
# Lab tests serialise themselves (one lab per test process); two threads keep the
# pure unit tests fast without overloading a two-core machine.
exec cargo test -j2 --workspace --no-fail-fast -- --test-threads=2 "$@"
