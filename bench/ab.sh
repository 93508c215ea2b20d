#!/bin/bash
# One A/B run of the serving path: a tree from before a change ("base") against this one,
# alternating, then the machine's floor, then each process's saturation; everything in one
# run, so the ratios compare like with like (docs/performance.md, "Where the per-token
# levers landed").
#
#   bench/ab.sh BASE_TREE OUT_DIR
#
# BASE_TREE: a worktree of the older commit with this bench/ copied in (and
# xim_proto/eventloop.py, which bench.run imports), e.g.
#   git worktree add --detach /tmp/base d1e1657 && ln -s "$PWD/.venv" /tmp/base/.venv
#   rm -rf /tmp/base/bench && cp -r bench /tmp/base/ && cp xim_proto/eventloop.py /tmp/base/xim_proto/
set -euo pipefail
base=$(cd "$1" && pwd); here=$(cd "$(dirname "$0")/.." && pwd); out=$2
mkdir -p "$out"
run() { local dir=$base; [ "$1" = main ] && dir=$here; shift
        (cd "$dir" && PYTHONPATH=$dir "$here/.venv/bin/python" "$@"); }
for i in 1 2; do
  for side in base main; do
    run $side -m bench.run --pacing stream --concurrency 1,64,256 --phase-seconds 8 \
        --json "$out/run-$side-$i.json" > "$out/run-$side-$i.txt" 2>&1
  done
done
for c in 64 256; do run main -m bench.floor --concurrency $c > "$out/floor-$c.txt" 2>&1; done
for target in ximd router; do
  for side in base main; do
    run $side -m bench.saturate --target $target --streams 64 --seconds 10 \
        --json "$out/sat-$target-$side.json" > "$out/sat-$target-$side.txt" 2>&1
  done
done
echo "results in $out"
