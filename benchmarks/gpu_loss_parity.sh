#!/bin/bash
# Loss parity on the GPU: the bf16 DeepSpeed path with the CUDA kernel against the
# fp32 PyTorch reference path (--wkv_impl torch), same rwkv-init.pth, same batches,
# first STEPS steps on the arithmetic demo data (prepared by gpu_train_run.sh).
# With 2 GPUs the two runs go side by side (card 0: bf16, card 1: fp32; BF_CARD / FP_CARD
# choose others; the same card for both runs them one after the other).
# Usage (GPU machine, repo root, after the data exists): bash benchmarks/gpu_loss_parity.sh [OUTDIR] [STEPS] [M_BSZ]
#   (OUTDIR: /tmp/parity)
# Environment: EXTRA (more flags for the bf16 run, e.g. "--compile 1");
#   PARALLEL=1 runs the two sides at the same time even on one card; FP_EXTRA: more flags for
#   the fp32 run, by default "--grad_cp 0" (no recompute of the blocks in backward, which
#   changes no result and saves the fp32 side a forward pass per step: 0.95 s per step on an
#   H200 beside the bf16 side, against 1.5 s with the recompute: benchmarks/RESULTS.md, the
#   2026-11-28 "2x and 1x NVIDIA H200 (commit ec16aa5)" section).
set -eu
OUTDIR=${1:-/tmp/parity}; STEPS=${2:-200}; M_BSZ=${3:-2}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)  # absolute: the runs work in RWKV-v7/train_temp
REPO=$(pwd)
META="$REPO/RWKV-v5/demo.meta.json"
PRIME=$(python3 -c "import json; print(json.load(open('$META'))['magic_prime'])")
EXIT=$((STEPS * M_BSZ * 4096))
cd "$REPO/RWKV-v7/train_temp"
rm -rf out/parity-bf16 out/parity-fp32
sh demo-training-prepare.sh --proj_dir out/parity-bf16 --my_exit_tokens "$EXIT" --magic_prime "$PRIME" --random_seed 1 ${EXTRA:-}
mkdir -p out/parity-fp32 && cp out/parity-bf16/rwkv-init.pth out/parity-fp32/
COMMON="--my_exit_tokens $EXIT --magic_prime $PRIME --micro_bsz $M_BSZ --wandb '' --enable_progress_bar False --random_seed 1 --warmup_steps 10"
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
BF=${BF_CARD:-0}; FP=${FP_CARD:-$([ "$NGPU" -ge 2 ] && echo 1 || echo 0)}
export PYTHONUNBUFFERED=1
(eval CUDA_VISIBLE_DEVICES=$BF sh demo-training-run.sh --proj_dir out/parity-bf16 $COMMON --precision bf16 \
  --strategy deepspeed_stage_2 ${EXTRA:-} > "$OUTDIR/bf16.txt" 2>&1 || echo "bf16 run failed: see $OUTDIR/bf16.txt") &
[ "$BF" != "$FP" ] || [ "${PARALLEL:-0}" = 1 ] || wait
(eval CUDA_VISIBLE_DEVICES=$FP sh demo-training-run.sh --proj_dir out/parity-fp32 $COMMON --precision fp32 \
  --strategy auto --wkv_impl torch --compile 0 ${FP_EXTRA:---grad_cp 0} > "$OUTDIR/fp32.txt" 2>&1 || echo "fp32 run failed: see $OUTDIR/fp32.txt") &
wait
tail -n 3 "$OUTDIR/bf16.txt" "$OUTDIR/fp32.txt"
cp out/parity-bf16/loss_log.csv "$OUTDIR/bf16.csv"; cp out/parity-fp32/loss_log.csv "$OUTDIR/fp32.csv"
python3 "$REPO/benchmarks/loss_parity.py" "$OUTDIR/bf16.csv" "$OUTDIR/fp32.csv" --steps "$STEPS" | tee "$OUTDIR/parity.txt"
