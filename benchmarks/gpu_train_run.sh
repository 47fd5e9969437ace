#!/bin/bash
# The tutorial's GPU run through demo-training-run.sh, as a speed/memory benchmark and as the
# real RWKV-7-Arithmetic-0.1B run: L12-D768 ctx 4096 bf16 deepspeed_stage_2 on the arithmetic
# demo data (benchmarks/gpu_data.sh makes it), then the held-out evaluation.
# Steady-state tokens/s comes from loss_log.csv (median step time after the first 10 steps);
# peak GPU memory from nvidia-smi (whole card, so every process on it) polled every 0.2 s.
#
# Usage (GPU machine, repo root): bash benchmarks/gpu_train_run.sh OUTDIR   (the output folder, e.g.
#   benchmarks/runs/train; made if missing)
# Environment (all optional):
#   NAME (run)         prefix of the files written to OUTDIR
#   M_BSZ (16), GRAD_CP (1), DEVICES (1: GPUs used), CARDS (the cards, comma-separated: 0..DEVICES-1)
#   STEPS              train this many steps (a benchmark); else EXIT_TOKENS, else the whole data
#   PROJ               proj_dir (out/<NAME>), started fresh from a new rwkv-init.pth
#   LIMIT (540)        seconds before the run is stopped (SIGTERM: it saves and exits)
#   EVAL (0)           held-out items to evaluate rwkv-final.pth on (0: no evaluation)
#   TFLOPS             measured bf16 matmul rate, for MFU (default: read OUTDIR/matmul.txt)
#   EXTRA              more train.py flags, e.g. "--compile 1" or "--strategy deepspeed_stage_1"
set -eu
OUTDIR=${1:?usage: bash benchmarks/gpu_train_run.sh OUTDIR}
NAME=${NAME:-run}; M_BSZ=${M_BSZ:-16}; GRAD_CP=${GRAD_CP:-1}; DEVICES=${DEVICES:-1}
STEPS=${STEPS:-0}; LIMIT=${LIMIT:-540}; EVAL=${EVAL:-0}; EXTRA=${EXTRA:-}
REPO=$(pwd)
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)  # absolute: the run itself works in RWKV-v7/train_temp
O="$OUTDIR/$NAME"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
META="$REPO/RWKV-v5/demo.meta.json"
TOKENS=$(python3 -c "import json; print(json.load(open('$META'))['tokens'])")
PRIME=$(python3 -c "import json; print(json.load(open('$META'))['magic_prime'])")
TOK_STEP=$((M_BSZ * DEVICES * 4096))
if [ "$STEPS" -gt 0 ]; then EXIT_TOKENS=$((STEPS * TOK_STEP)); else EXIT_TOKENS=${EXIT_TOKENS:-$TOKENS}; fi
P=${PROJ:-out/$NAME}
GPUS=${CARDS:-$(seq -s, 0 $((DEVICES - 1)))}
FIRST=${GPUS%%,*}

cd "$REPO/RWKV-v7/train_temp"
rm -rf "$P"
echo "== $NAME: L12-D768 ctx 4096, $DEVICES GPU x M_BSZ $M_BSZ, GRAD_CP $GRAD_CP, $EXIT_TOKENS tokens" \
     "($((EXIT_TOKENS / TOK_STEP)) steps), $EXTRA"
sh demo-training-prepare.sh --proj_dir "$P" --my_exit_tokens "$TOKENS" --magic_prime "$PRIME" --random_seed 0 $EXTRA \
   > "$O.prepare.txt" 2>&1 || { cat "$O.prepare.txt"; exit 1; }
nvidia-smi -i "$GPUS" --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 200 > "$O.gpu_mem.csv" &
SMI=$!
T0=$(date +%s)
set +e
CUDA_VISIBLE_DEVICES=$GPUS timeout -s TERM -k 60 "$LIMIT" sh demo-training-run.sh --proj_dir "$P" \
   --my_exit_tokens "$EXIT_TOKENS" --magic_prime "$PRIME" --wandb "" --micro_bsz "$M_BSZ" --grad_cp "$GRAD_CP" \
   --devices "$DEVICES" --ds_bucket_mb 200 --enable_progress_bar False --random_seed 0 $EXTRA > "$O.train.txt" 2>&1
RC=$?
set -e
T1=$(date +%s)
kill $SMI 2>/dev/null || true
grep -v "^\s*$" "$O.train.txt" | tail -4
cp "$P/loss_log.csv" "$O.loss_log.csv" 2>/dev/null || true
cp "$P/train_log.txt" "$O.train_log.txt" 2>/dev/null || true
python3 "$REPO/benchmarks/train_summary.py" "$O" --rc "$RC" --wall $((T1 - T0)) --tok-step "$TOK_STEP" --gpus "$DEVICES" \
   --tflops "${TFLOPS:-$(grep -o '[0-9.]* TFLOP/s' "$OUTDIR/matmul.txt" 2>/dev/null | head -1 | cut -d' ' -f1)}" \
   --label "$NAME: $DEVICES x M_BSZ $M_BSZ GRAD_CP $GRAD_CP $EXTRA" | tee "$O.summary.txt"
if [ -f "$P/profile.txt" ]; then  # --profile_steps N in EXTRA
  cp "$P/profile.txt" "$O.profile.txt"
  echo "== $NAME: profile (top of $O.profile.txt)"; head -n 30 "$O.profile.txt" | cut -c1-220
fi
if [ "$EVAL" -gt 0 ] && [ -f "$P/rwkv-final.pth" ]; then
  echo "== $NAME: evaluate rwkv-final.pth and the last saves on $EVAL held-out items"
  CUDA_VISIBLE_DEVICES=$FIRST python3 ../evaluate.py "$P"/rwkv-final.pth --n "$EVAL" --device cuda \
     --json "$O.eval.json" --show-errors 8 2>&1 | tee "$O.eval.txt"
  for q in "三十二加十五等于多少？" "What is 487 minus 1209?" "x + 35 = 112, x = ?"; do
    CUDA_VISIBLE_DEVICES=$FIRST python3 ../chat.py "$P"/rwkv-final.pth --device cuda --prompt "$q" 2>&1 | tee -a "$O.eval.txt"
  done
fi
exit $RC
