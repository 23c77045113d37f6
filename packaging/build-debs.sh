#!/usr/bin/env bash
# Builds the two Debian packages into target/debian/:
#   overlay_VERSION-1_ARCH.deb        overlayd, overlayctl, overlayd.service
#   overlay-coord_VERSION-1_ARCH.deb  overlay-coord, overlay-coord.service
# VERSION is the workspace's (Cargo.toml). Needs cargo-deb:
#   cargo install --locked cargo-deb
# .ci/run calls this before the test suite; tests/tests/packaging.rs installs the
# result into a fresh Debian root.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo-deb >/dev/null 2>&1 || {
    echo "build-debs.sh: cargo-deb is missing; install it with: cargo install --locked cargo-deb" >&2
    exit 1
}

target=${CARGO_TARGET_DIR:-target}
jobs=${CARGO_BUILD_JOBS:-2}
# `release` for packages to ship; tests/run.sh passes `dev` to package the debug
# build it has just made, so a test run builds the workspace once.
profile=${DEB_PROFILE:-release}
case $profile in
    dev) outdir=debug ;;
    *) outdir=$profile ;;
esac

# One build of what the packages hold, with the workspace's features (so no
# second variant of every dependency), then the man pages and completions from
# the same clap definitions.
nice cargo build -j"$jobs" --profile "$profile" --workspace \
    --bin overlayd --bin overlayctl --bin overlay-coord --bin xtask
docs="$target/$outdir/overlay-docs"
rm -rf "$docs"
"$target/$outdir/xtask" docs "$docs"
# Debian policy: man pages gzipped, reproducibly (no name or time in the header).
gzip -9n "$docs"/man/*.1

rm -f "$target"/debian/overlay_*.deb "$target"/debian/overlay-coord_*.deb
# --strip: the release profile keeps line tables for backtraces; the packaged
# binaries do without. --fast: zopfli would add minutes for a few percent.
nice cargo deb --no-build --profile "$profile" --strip --fast -p overlayd
nice cargo deb --no-build --profile "$profile" --strip --fast -p overlay-coord
ls -l "$target"/debian/*.deb
