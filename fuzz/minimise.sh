#!/bin/sh
# Merges what a fuzzing run found into the committed corpus, keeping it small:
# every file already in fuzz/corpus/<target>/ (seeds, reproducers) stays, and at
# most $KEEP of the new inputs join, picked greedily for the coverage edges they add.
#
#   fuzz/minimise.sh <target> <dir the run wrote new inputs to>
set -eu
target=$1
found=$2
keep=${KEEP:-60}
cd "$(dirname "$0")"
cargo +nightly fuzz build "$target"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
ASAN_OPTIONS=detect_odr_violation=0 \
  "target/x86_64-unknown-linux-gnu/release/$target" -merge=1 -use_counters=0 \
  -merge_control_file="$scratch/control" "$scratch" "corpus/$target" "$found" 2>/dev/null
python3 pick_corpus.py "$scratch/control" "corpus/$target" "corpus/$target" "$keep"
