"""Greedy maximum coverage over a libFuzzer merge control file.

usage: pick_corpus.py CONTROL_FILE KEEP_DIR OUT_DIR K

Copies into OUT_DIR every input that came from KEEP_DIR, then up to K
others, each time the one adding the most coverage edges not yet covered
(the smaller on a tie).
"""
import os
import shutil
import sys

control, corpus, out, k = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
lines = open(control).read().split("\n")
count = int(lines[0])
files = lines[2 : 2 + count]
edges = {}
for line in lines[2 + count :]:
    parts = line.split()
    if len(parts) >= 2 and parts[0] == "COV":
        edges[int(parts[1])] = set(parts[2:])


def kept(i):
    return os.path.dirname(os.path.abspath(files[i])) == os.path.abspath(corpus)


covered = set()
chosen = [i for i in range(count) if kept(i)]
for i in chosen:
    covered |= edges.get(i, set())
rest = [i for i in range(count) if not kept(i)]
for _ in range(k):
    gain = lambda i: (len(edges.get(i, set()) - covered), -os.path.getsize(files[i]))
    best = max(rest, key=gain, default=None)
    if best is None or gain(best)[0] == 0:
        break
    covered |= edges[best]
    chosen.append(best)
    rest.remove(best)
os.makedirs(out, exist_ok=True)
for i in chosen:
    target = os.path.join(out, os.path.basename(files[i]))
    if os.path.abspath(files[i]) != os.path.abspath(target):
        shutil.copy(files[i], target)
total = set().union(*edges.values()) if edges else set()
print(f"{len(chosen)} inputs, {len(covered)} of {len(total)} edges")
