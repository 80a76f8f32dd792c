#!/usr/bin/env bash
# Training throughput of two source trees of truthgpt (e.g. two git worktrees, each with its
# native kernel built in place), alternated round by round so that load elsewhere hits both:
#
#   bash benchmarks/compare_trees.sh BEFORE_TREE AFTER_TREE [ROUNDS] [KINDS]
#
# Each round runs each tree's own benchmarks/train.py (char-small, 2 threads, the median of 3
# runs of 30 steps) and prints tokens/s per kind; the summary gives the medians over rounds.
# Each tree's train.threads2.md/.json, which train.py rewrites, are put back as they were.
set -euo pipefail
before=$(cd "$1" && pwd); after=$(cd "$2" && pwd)
rounds=${3:-7}; kinds=${4:-dot,l1}
python=${PYTHON:-python}
log=$(mktemp)
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq "$rounds"); do
    for tree in "$before" "$after"; do
        results="$tree/benchmarks/results/train.threads2"
        saved=$(mktemp -d)
        cp -p "$results.md" "$results.json" "$saved/" 2>/dev/null || true
        (cd "$tree" && PYTHONPATH="$tree/src" "$python" benchmarks/train.py --presets char-small \
            --kinds "$kinds" --steps 30 --rounds 3 --threads 2 >/dev/null)
        grep -E '^\| char-small \|' "$tree/benchmarks/results/train.threads2.md" |
            awk -F'|' -v tree="$tree" -v round="$round" \
                '{gsub(/[ ,]/, "", $3); gsub(/[ ,]/, "", $4); print round, tree, $3, $4}' |
            tee -a "$log"
        for ext in md json; do
            if [ -e "$saved/train.threads2.$ext" ]; then
                cp -p "$saved/train.threads2.$ext" "$results.$ext"
            else
                rm -f "$results.$ext"  # train.py wrote it: it was not there before
            fi
        done
        rm -rf "$saved"
    done
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
"$python" - "$log" "$before" "$after" <<'PY'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
before, after = sys.argv[2], sys.argv[3]
for kind in dict.fromkeys(r[2] for r in rows):
    med = {t: statistics.median(int(r[3]) for r in rows if r[1] == t and r[2] == kind)
           for t in (before, after)}
    print(f"{kind}: before {med[before]:,.0f} tokens/s, after {med[after]:,.0f} "
          f"({med[after] / med[before]:.2f}x)")
PY
rm -f "$log"
