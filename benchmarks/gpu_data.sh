#!/bin/bash
# The arithmetic demo data for the GPU scripts: DOCS generated dialogues (seed 0), make_data
# with COPIES copies at ctx 4096 -> RWKV-v5/demo.{bin,idx,meta.json}. Kept when it already
# matches (same DOCS and COPIES).
# Usage (repo root): bash benchmarks/gpu_data.sh [DOCS] [COPIES] [CTX]
set -eu
DOCS=${1:-20000}; COPIES=${2:-30}; CTX=${3:-4096}
cd "$(dirname "$0")/../RWKV-v5"
STAMP="docs=$DOCS copies=$COPIES ctx=$CTX"
if [ -f demo.meta.json ] && [ "$(cat demo.stamp 2>/dev/null)" = "$STAMP" ]; then
  echo "data: kept ($STAMP)"; exit 0
fi
python3 make_arithmetic_data.py demo.jsonl --docs "$DOCS" --seed 0
python3 make_data.py demo.jsonl "$COPIES" "$CTX" --seed 0 --no-progress
echo "$STAMP" > demo.stamp
