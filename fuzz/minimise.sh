#!/bin/sh
# Merges what a fuzzing run found into the committed corpus, keeping it small:
# the named files of fuzz/corpus/<target>/ (seeds, reproducers) always stay; the
# hash-named ones and the run's finds compete for $KEEP places, picked greedily
# for the coverage edges they add.
#
#   fuzz/minimise.sh <target> <dir the run wrote new inputs to>
set -eu
target=$1
found=$(realpath "$2")
keep=${KEEP:-60}
cd "$(dirname "$0")"
cargo +nightly fuzz build "$target"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
mkdir "$scratch/named" "$scratch/found" "$scratch/merged" "$scratch/picked"
for f in "corpus/$target"/*; do
    case $(basename "$f") in
        *[!0-9a-f]*) cp "$f" "$scratch/named/" ;;
        *) cp "$f" "$scratch/found/" ;;
    esac
done
ASAN_OPTIONS=detect_odr_violation=0 \
    "target/x86_64-unknown-linux-gnu/release/$target" -merge=1 -use_counters=0 \
    -merge_control_file="$scratch/control" "$scratch/merged" \
    "$scratch/named" "$scratch/found" "$found" 2>/dev/null
python3 pick_corpus.py "$scratch/control" "$scratch/named" "$scratch/picked" "$keep"
rm -rf "corpus/$target"
cp -r "$scratch/picked" "corpus/$target"
