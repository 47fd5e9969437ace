#!/bin/bash
# The tutorial's GPU run on one card, as a benchmark and as the real
# RWKV-7-Arithmetic-0.1B pre-training run: arithmetic demo data (make_data N=30,
# ctx 4096), L12-D768, M_BSZ 16, GRAD_CP 1, bf16, deepspeed_stage_2, then the
# held-out evaluation. Steady-state tokens/s comes from loss_log.csv; peak GPU
# memory of the whole machine from nvidia-smi polling.
# Usage (device machine, repo root): bash benchmarks/gpu_train_run.sh OUTDIR [DOCS] [COPIES] [TRAIN_LIMIT_S]
# Environment: M_BSZ (16), GRAD_CP (1), STEPS (train only this many steps: a speed/memory
# benchmark rather than the real run), PROJ (out/L12-D768-x070), EXTRA (more train.py flags
# for both runs, e.g. "--strategy deepspeed_stage_1").
# Needs `python` on PATH for the tutorial scripts (they fall back to python3).
set -eu
OUTDIR=${1:-/tmp/gpu_run}; DOCS=${2:-20000}; COPIES=${3:-30}; LIMIT=${4:-420}
M_BSZ=${M_BSZ:-16}; GRAD_CP=${GRAD_CP:-1}; STEPS=${STEPS:-0}; EXTRA=${EXTRA:-}
mkdir -p "$OUTDIR"
REPO=$(pwd)
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUTDIR/card.txt"

echo "== bf16 matmul rate"
python3 - <<'PY' | tee "$OUTDIR/matmul.txt"
import torch, time
if not torch.cuda.is_available():
    raise SystemExit("no CUDA device: skipped")
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
for _ in range(3): a @ b
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(20): a @ b
torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 20
print(f"bf16 matmul 8192^3: {2 * 8192**3 / dt / 1e12:.0f} TFLOP/s")
PY

echo "== data"
cd "$REPO/RWKV-v5"
python3 make_arithmetic_data.py demo.jsonl --docs "$DOCS" --seed 0
python3 make_data.py demo.jsonl "$COPIES" 4096 --seed 0 --no-progress | tee "$OUTDIR/make_data.txt"
TOKENS=$(python3 -c "import json; print(json.load(open('demo.meta.json'))['tokens'])")
PRIME=$(python3 -c "import json; print(json.load(open('demo.meta.json'))['magic_prime'])")
EXIT_TOKENS=$TOKENS
if [ "$STEPS" -gt 0 ]; then EXIT_TOKENS=$((STEPS * M_BSZ * 4096)); fi
P=${PROJ:-out/L12-D768-x070}

cd "$REPO/RWKV-v7/train_temp"
echo "== smoke: tiny model, deepspeed_stage_2 bf16 (builds the kernels)"
sh demo-training-prepare.sh --n_layer 2 --n_embd 128 --proj_dir out/smoke --my_exit_tokens "$TOKENS" --magic_prime "$PRIME"
sh demo-training-run.sh --n_layer 2 --n_embd 128 --proj_dir out/smoke --my_exit_tokens $((20 * 4 * 4096)) \
   --magic_prime "$PRIME" --micro_bsz 4 --wandb "" --enable_progress_bar False --ds_bucket_mb 200 $EXTRA 2>&1 | tail -5
test -f out/smoke/rwkv-final.pth

echo "== the run: L12-D768 ctx 4096 M_BSZ $M_BSZ GRAD_CP $GRAD_CP bf16 deepspeed_stage_2, $EXIT_TOKENS tokens"
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$OUTDIR/gpu_mem.csv" &
SMI=$!
sh demo-training-prepare.sh --proj_dir "$P" --my_exit_tokens "$TOKENS" --magic_prime "$PRIME" --random_seed 0
T0=$(date +%s)
set +e
timeout "$LIMIT" sh demo-training-run.sh --proj_dir "$P" --my_exit_tokens "$EXIT_TOKENS" --magic_prime "$PRIME" --wandb "" \
   --micro_bsz "$M_BSZ" --grad_cp "$GRAD_CP" --ds_bucket_mb 200 --enable_progress_bar False --random_seed 0 \
   $EXTRA > "$OUTDIR/train.txt" 2>&1
RC=$?
set -e
T1=$(date +%s)
kill $SMI || true
tail -5 "$OUTDIR/train.txt"
cp $P/loss_log.csv $P/train_log.txt "$OUTDIR/" 2>/dev/null || true
echo "train rc=$RC wall=$((T1 - T0)) s" | tee "$OUTDIR/wall.txt"
python3 - "$OUTDIR" "$M_BSZ" <<'PY' | tee "$OUTDIR/summary.txt"
import sys, csv, statistics
out, mbsz = sys.argv[1], int(sys.argv[2])
rows = list(csv.DictReader(open(f"{out}/loss_log.csv")))
t = [float(r["time"]) for r in rows]
steps = len(rows)
# steady state: skip the first 10 steps (fewer on a short run), time between step ends
skip = min(10, max(0, len(t) - 3))
dts = [b - a for a, b in zip(t[skip:], t[skip + 1:])]
tok_step = mbsz * 4096
kts = tok_step / statistics.median(dts) / 1e3 if dts else float("nan")
mem = max(int(x) for x in open(f"{out}/gpu_mem.csv").read().split() if x.strip().isdigit())
params = 191_084_544
print(f"steps {steps}, tokens {steps * tok_step}, loss first {rows[0]['loss']} last {rows[-1]['loss']}")
print(f"steady-state {kts:.1f} kt/s (median step {statistics.median(dts) * 1e3:.1f} ms), peak GPU memory {mem} MiB = {mem / 1024:.2f} GiB")
print(f"model FLOP rate 6*N*tok/s = {6 * params * kts * 1e3 / 1e12:.1f} TFLOP/s")
PY
if [ -f $P/rwkv-final.pth ]; then
  echo "== evaluate"
  python3 ../evaluate.py $P/rwkv-final.pth --n 400 --device cuda --json "$OUTDIR/eval.json" | tee "$OUTDIR/eval.txt"
  python3 ../chat.py $P/rwkv-final.pth --device cuda --prompt "三十二加十五等于多少？" | tee -a "$OUTDIR/eval.txt"
fi
