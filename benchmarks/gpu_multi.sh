#!/bin/bash
# Several GPUs on one host (two GPUs): the same L12-D768 ctx 4096
# bf16 deepspeed_stage_2 run on 1 GPU and on 2 GPUs (target: >= 1.8x the tokens/s),
# each rank's sample windows dumped and checked distinct; then 2 "nodes" on one host
# (NODE_RANK 0/1, MASTER_ADDR=127.0.0.1, one GPU each).
# Usage (GPU machine, repo root): bash benchmarks/gpu_multi.sh [OUTDIR] [STEPS] [M_BSZ]   (OUTDIR: /tmp/multi)
# Environment: EXTRA (more train.py flags for every run, e.g. a CPU rehearsal:
#   EXTRA="--accelerator cpu --strategy ddp --precision fp32 --n_layer 2 --n_embd 64 --ctx_len 512 ..."),
#   CTX (4096; must match EXTRA's --ctx_len), ONE (the loss_log.csv of a 1-GPU run with the same
#   settings, e.g. gpu_train_run.sh's: the 1-GPU run is then skipped).
set -eu
OUTDIR=${1:-/tmp/multi}; STEPS=${2:-40}; M_BSZ=${3:-16}; CTX=${CTX:-4096}
read -r -a EXTRA <<< "${EXTRA:-}"
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)  # absolute: the runs work in RWKV-v7/train_temp
REPO=$(pwd)
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
[ -f "$REPO/RWKV-v5/demo.meta.json" ] || bash "$REPO/benchmarks/gpu_data.sh" 20000 30 "$CTX"
cd "$REPO/RWKV-v5"
PRIME=$(python3 -c "import json; print(json.load(open('demo.meta.json'))['magic_prime'])")
cd "$REPO/RWKV-v7/train_temp"
rm -rf out/m1 out/m2 out/n2
sh demo-training-prepare.sh --proj_dir out/m1 --magic_prime "$PRIME" --random_seed 0 "${EXTRA[@]}" > /dev/null
for d in m2 n2; do mkdir -p out/$d && cp out/m1/rwkv-init.pth out/$d/; done
COMMON=(--magic_prime "$PRIME" --micro_bsz "$M_BSZ" --wandb "" --enable_progress_bar False --ds_bucket_mb 200)

run() {  # proj gpus_per_node nodes steps
  sh demo-training-run.sh --proj_dir "out/$1" "${COMMON[@]}" --devices "$2" --num_nodes "$3" \
    --my_exit_tokens $(($4 * M_BSZ * $2 * $3 * CTX)) --dump_samples "$OUTDIR/$1" "${EXTRA[@]}"
}
if [ -n "${ONE:-}" ]; then
  mkdir -p out/m1 && cp "$ONE" out/m1/loss_log.csv
else
  echo "== 1 GPU";  run m1 1 1 "$STEPS" > "$OUTDIR/m1.txt" 2>&1 || { tail -30 "$OUTDIR/m1.txt"; exit 1; }
fi
echo "== 2 GPUs"; run m2 2 1 "$STEPS" > "$OUTDIR/m2.txt" 2>&1 || { tail -30 "$OUTDIR/m2.txt"; exit 1; }
echo "== 2 nodes on one host"
PORT=$((20000 + RANDOM % 20000))
for node in 0 1; do
  (export CUDA_VISIBLE_DEVICES=$node MASTER_ADDR=127.0.0.1 MASTER_PORT=$PORT NODE_RANK=$node
   run n2 1 2 10 > "$OUTDIR/n2-node$node.txt" 2>&1) &
done
wait
test -f out/n2/rwkv-final.pth || { tail -30 "$OUTDIR"/n2-node*.txt; exit 1; }
python3 - "$OUTDIR" "$M_BSZ" "$CTX" "$REPO/benchmarks" <<'PY' | tee "$OUTDIR/summary.txt"
import csv, sys
out, mbsz, ctx = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sys.path.insert(0, sys.argv[4])
from train_summary import steady_state
def kts(proj, gpus):
    dt, _ = steady_state([float(r["time"]) for r in csv.DictReader(open(f"out/{proj}/loss_log.csv"))])
    return mbsz * gpus * ctx / dt / 1e3
def distinct(prefix, world):
    starts = [int(l.split(",")[2]) for r in range(world) for l in open(f"{prefix}.rank{r}.csv").read().split()]
    return len(starts), len(set(starts))
one, two = kts("m1", 1), kts("m2", 2)
print(f"1 GPU {one:.1f} kt/s, 2 GPUs {two:.1f} kt/s: {two / one:.2f}x (target >= 1.8x: {'met' if two / one >= 1.8 else 'NOT met'})")
for name, prefix in (("2 GPUs", f"{out}/m2"), ("2 nodes", f"{out}/n2")):
    n, d = distinct(prefix, 2)
    print(f"{name}: {n} samples drawn by 2 ranks, {d} distinct windows ({'ok' if n == d else 'OVERLAP'})")
PY
