#!/bin/bash
# The GPU benchmark stages, one per invocation (each fits in 10 minutes). Work files go to
# /tmp/gpuwork, shared by the stages run on one machine (`real` reads what `speed` measured,
# `confirm` and `pair` collect a loss parity left running), and are packed into
# OUTDIR/work.tgz (weights and token files left out) when the stage ends.
#
#   check   card, matmul rate, data, GPU kernel tests, WKV op vs fla, one training step eager
#           vs compiled (profiled), the trainer at M_BSZ 16 for STEPS steps, and with 2 GPUs
#           the 2-GPU and 2-node runs (gpu_multi.sh)
#   speed   (4 GPUs) the trainer's speed by strategy, profiled, beside one compiled step; the
#           loss parity left running on card 3 for `real` to collect
#   real    the RWKV-7-Arithmetic-0.1B run on REAL_CARDS (default every GPU): EXIT_TOKENS from
#           KTS (measured kt/s for those GPUs together) x TRAIN_S seconds, then the evaluation
#   (MORE: flags added to every trainer run, e.g. for a CPU rehearsal with a stand-in nvidia-smi)
#   parity  bf16 vs fp32 loss parity (gpu_loss_parity.sh)
#   confirm one GPU alone: the trainer at the reference rows' settings (M_BSZ 16 profiled and 8
#           on an H200, 1 and 16 on an H100)
#   strategies  short runs of the other DeepSpeed stages (offload too), fp16, tf32, fp32 and ddp
#   pair    (2 GPUs) the M_BSZ 1 row alone, 2 GPUs and 2 nodes (gpu_multi.sh), then strategy_runs
#
# Usage (GPU machine, repo root, wheels installed; OUTDIR defaults to benchmarks/runs/gpu-STAGE):
#   bash benchmarks/gpu_session.sh check [OUTDIR]        [env COMPILE=auto|0|1, STEPS=30, STEP_MODES="eager compile",
#                                                         KERNELS=1 (kernel tests + WKV vs fla), PARITY=0, T8=0]
#   DOCS=120000 bash benchmarks/gpu_session.sh speed [OUTDIR]
#   KTS=400 bash benchmarks/gpu_session.sh real [OUTDIR] [env TRAIN_S=420, COMPILE=1, EVAL=400, REAL_CARDS=0,1,2, DOCS]
#   bash benchmarks/gpu_session.sh parity [OUTDIR]       [env COMPILE=1, PARALLEL=1]
#   bash benchmarks/gpu_session.sh confirm|strategies|pair [OUTDIR]   (env: see each stage below)
set -u
STAGE=${1:?usage: bash benchmarks/gpu_session.sh STAGE [OUTDIR] (STAGE: check, speed, real, parity, confirm, strategies, pair)}
OUTDIR=${2:-benchmarks/runs/gpu-$STAGE}
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd) || exit 1
W=/tmp/gpuwork; mkdir -p "$W"
B=benchmarks
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
NGPU=$(nvidia-smi -L | wc -l)
LAST=$((NGPU - 1))  # the second card where there are two
pack() { tar czf "$OUTDIR/work.tgz" --exclude='*.pth' --exclude='*.bin' -C /tmp gpuwork 2>/dev/null; }
trap pack EXIT
say() { echo "=== $(date +%T) $*"; }
chosen_compile() { cut -d' ' -f2 "$W/compile.txt" 2>/dev/null || echo 0; }  # what `check` chose
card_info() { nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader | tee "$W/card.txt"; }
builds() {  # in the background, as a trainer's first step would: the WKV kernel and DeepSpeed's ops named
  python3 -c "from rwkvlm.wkv_cuda import load_extension; load_extension(64)" > "$W/kernel_build.txt" 2>&1 &
  python3 -c "
import deepspeed.ops.op_builder as ops
from rwkvlm.optim import deepspeed_arch_list
with deepspeed_arch_list():
    for name in '$*'.split():
        getattr(ops, name)().load()" > "$W/adam_builds.txt" 2>&1 &
}
setup() {  # the card and versions; in the background the data (DOCS docs x 30, its pid in DATA),
           # the WKV kernel and the DeepSpeed ops named
  card_info
  python3 -c "import os, torch, pytorch_lightning as pl, deepspeed; print('torch', torch.__version__, 'lightning', pl.__version__, 'deepspeed', deepspeed.__version__, 'TORCH_CUDA_ARCH_LIST', os.environ.get('TORCH_CUDA_ARCH_LIST'))"
  say "background: data (${DOCS:-20000} docs x 30), WKV kernel and $* builds"
  bash $B/gpu_data.sh "${DOCS:-20000}" 30 "${CTX:-4096}" > "$W/data.txt" 2>&1 &
  DATA=$!
  builds "$@"
}
tflops() { grep -o '[0-9.]* TFLOP/s' "$W/matmul.txt" 2>/dev/null | head -1 | cut -d' ' -f1; }  # matmul_rate.py's figure

alive() { local st; st=$(ps -o stat= -p "$1" 2>/dev/null) && [ "${st#Z}" = "$st" ]; }  # running, not a zombie
wait_runs() {  # wait for this shell's background jobs, except a loss parity left running (start_parity)
  local j; j=$(jobs -p | grep -v -x "$(cat "$W/parity.pid" 2>/dev/null || echo none)")
  [ -z "$j" ] || wait $j
}
strategy_runs() {  # RUNS (strategy:precision) at M_BSZ 4 for STEPS steps, one per card at a time
  RUNS=${RUNS:-"deepspeed_stage_1:bf16 deepspeed_stage_3:bf16 deepspeed_stage_2_offload:bf16 deepspeed_stage_3_offload:bf16 deepspeed_stage_2:fp16 deepspeed_stage_2:tf32 deepspeed_stage_2:fp32 ddp:bf16"}
  local i=0 r ST PR N
  for r in $RUNS; do
    ST=${r%%:*}; PR=${r##*:}; N="s_${ST#deepspeed_}_$PR"
    say "start $N on card $((i % NGPU))"
    (NAME=$N M_BSZ=4 CARDS=$((i % NGPU)) STEPS=${STEPS:-20} LIMIT=${SLIMIT:-240} \
       EXTRA="--strategy $ST --precision $PR ${MORE:-}" bash $B/gpu_train_run.sh "$W" > "$W/$N.out" 2>&1) &
    i=$((i + 1)); [ $((i % NGPU)) = 0 ] && wait_runs
  done
  wait_runs
  for r in $RUNS; do ST=${r%%:*}; PR=${r##*:}; N="s_${ST#deepspeed_}_$PR"; say "$N"; grep -E "rc |loss first|peak|steady" "$W/$N.summary.txt" 2>/dev/null || tail -5 "$W/$N.out"; done
}

start_parity() {  # the 200-step loss parity, both sides on card $1, detached (setsid) so that it
                 # keeps running after this stage ends; collect_parity (this stage or a later one) reports it
  say "background (setsid) on card $1: loss parity, bf16 DeepSpeed (compile 1) vs fp32 PyTorch path, 200 steps"
  BF_CARD=$1 FP_CARD=$1 PARALLEL=1 EXTRA="--compile 1 ${MORE:-}" setsid nohup bash $B/gpu_loss_parity.sh "$W/parity" 200 2 \
    > "$W/parity.txt" 2>&1 < /dev/null &
  echo $! > "$W/parity.pid"
}
collect_parity() {  # wait for the parity until $1 seconds into this stage, then print what it has
  while alive "$(cat "$W/parity.pid")" && [ "$SECONDS" -lt "$1" ]; do sleep 2; done
  if alive "$(cat "$W/parity.pid")"; then
    say "loss parity still running: $(tail -n 1 RWKV-v7/train_temp/out/parity-fp32/loss_log.csv 2>/dev/null)"
  else
    say "loss parity"; tail -24 "$W/parity.txt"; rm -f "$W/parity.pid"
  fi
}

case "$STAGE" in
check)
  setup FusedAdamBuilder
  if [ "${KERNELS:-1}" = 1 ]; then
    wkv() { CUDA_VISIBLE_DEVICES=$LAST timeout 200 python3 -m pytest -q tests/test_wkv_cuda.py -p no:cacheprovider
            CUDA_VISIBLE_DEVICES=$LAST timeout 240 python3 $B/bench_wkv.py --fla-budget-s 150; }
    if [ "$NGPU" -ge 2 ]; then wkv > "$W/wkv.txt" 2>&1 & fi
  fi
  say "matmul rate and one training step (${STEP_MODES:-eager compile}), card 0"
  CUDA_VISIBLE_DEVICES=0 python3 $B/matmul_rate.py | tee "$W/matmul.txt"
  TF=$(tflops)
  CUDA_VISIBLE_DEVICES=0 timeout 300 python3 $B/bench_step.py --bsz 16 --modes ${STEP_MODES:-eager compile} --profile \
     --steps 6 --tflops "${TF:-0}" --json "$W/step.json" 2>&1 | tee "$W/step.txt" | grep -v -i warn
  [ "${KERNELS:-1}" = 1 ] && [ "$NGPU" -lt 2 ] && wkv > "$W/wkv.txt" 2>&1
  wait $DATA; DATA_RC=$?
  say "data"; tail -3 "$W/data.txt"; [ "$DATA_RC" = 0 ] || { echo "data failed"; exit 1; }
  C=${COMPILE:-auto}
  if [ "$C" = auto ]; then  # compiled when its step ran and was not slower than eager (if timed)
    C=$(python3 -c "import json; t = json.load(open('$W/step.json')); c = t.get('16 compile'); e = t.get('16 eager', 1e9); print(int(c is not None and c < 0.97 * e))" 2>/dev/null || echo 0)
  fi
  echo "compile: $C" | tee "$W/compile.txt"
  PAR=""
  if [ "${PARITY:-0}" = 1 ] && [ "$NGPU" -ge 2 ]; then
    say "background on card $LAST: loss parity, bf16 DeepSpeed (compile $C) vs fp32 PyTorch path, 200 steps"
    (BF_CARD=$LAST FP_CARD=$LAST EXTRA="--compile $C ${MORE:-}" timeout 330 bash $B/gpu_loss_parity.sh "$W/parity" 200 2) \
      > "$W/parity.txt" 2>&1 &
    PAR=$!
  fi
  say "trainer, 1 GPU, M_BSZ 16"
  NAME=t16 STEPS=${STEPS:-30} LIMIT=300 EXTRA="--compile $C --profile_steps 3 ${MORE:-}" bash $B/gpu_train_run.sh "$W"
  if [ "${T8:-0}" = 1 ]; then
    say "trainer, 1 GPU, M_BSZ 8"
    NAME=t8 M_BSZ=8 STEPS=${STEPS:-30} LIMIT=200 EXTRA="--compile $C ${MORE:-}" bash $B/gpu_train_run.sh "$W"
  fi
  if [ -n "$PAR" ]; then wait $PAR; say "loss parity"; tail -12 "$W/parity.txt"; fi
  wait
  if [ "${KERNELS:-1}" = 1 ]; then say "kernel tests and WKV benchmark"; grep -E "passed|failed|error|ms|x " "$W/wkv.txt" | tail -14; fi
  if [ "$NGPU" -ge 2 ]; then
    say "2 GPUs and 2 nodes"
    ONE="$W/t16.loss_log.csv" EXTRA="--compile $C ${MORE:-}" timeout 400 bash $B/gpu_multi.sh "$W/multi" "${STEPS:-30}" 16
  fi
  ;;
real)
  TRAIN_S=${TRAIN_S:-420}; C=${COMPILE:-$(chosen_compile)}
  CARDS=${REAL_CARDS:-$(seq -s, 0 $LAST)}; NREAL=$(echo "$CARDS" | tr ',' '\n' | wc -l)
  if [ -z "${KTS:-}" ] && [ -f "$W/t16.summary.txt" ]; then  # 97% of NREAL x the 1-GPU figure measured by `speed`
    KTS=$(python3 -c "import re; print(int(0.97 * $NREAL * float(re.search(r'\(([0-9.]+) per GPU\)', open('$W/t16.summary.txt').read()).group(1))))")
  fi
  : "${KTS:?set KTS, the measured kt/s of all GPUs together}"
  STEP_TOK=$((16 * NREAL * 4096))
  EXIT=$(python3 -c "print(int($KTS * 1000 * $TRAIN_S) // $STEP_TOK * $STEP_TOK)")
  DOCS=${DOCS:-$(python3 -c "print(max(20000, int($EXIT / 30 / 80 * 1.15)))")}  # ~80 tokens per document
  say "real run: $NREAL GPU(s) (cards $CARDS), $EXIT tokens ($((EXIT / STEP_TOK)) steps) planned from $KTS kt/s x $TRAIN_S s; data $DOCS docs x 30"
  bash $B/gpu_data.sh "$DOCS" 30 > "$W/data_real.txt" 2>&1 || { cat "$W/data_real.txt"; exit 1; }
  tail -2 "$W/data_real.txt"
  NAME=real DEVICES=$NREAL CARDS=$CARDS EXIT_TOKENS=$EXIT LIMIT=$((TRAIN_S + 90)) EVAL=${EVAL:-400} \
    EXTRA="--compile $C --epoch_save 1 ${MORE:-}" bash $B/gpu_train_run.sh "$W"
  if [ -f "$W/parity.pid" ]; then  # the loss parity that `speed` left running on its own card
    say "loss parity (started by speed)"
    collect_parity $((SECONDS + 80))
  fi
  ;;
speed)
  # Card 0: matmul rate, one compiled step (profiled), then the trainer under --strategy auto;
  # card 1: the trainer at M_BSZ 16, deepspeed_stage_2, profiled; card 2: deepspeed_stage_1, then
  # M_BSZ 8 (M_BSZ 1 on an H100); card 3: the 200-step loss parity, left running detached
  # (setsid) after this stage ends: `real` collects it.
  DOCS=${DOCS:-20000}
  card() { echo $(( $1 < NGPU ? $1 : LAST )); }
  setup FusedAdamBuilder
  (CUDA_VISIBLE_DEVICES=0 python3 $B/matmul_rate.py > "$W/matmul.txt" 2>&1
   TF=$(tflops)
   CUDA_VISIBLE_DEVICES=0 timeout 200 python3 $B/bench_step.py --bsz 16 --modes compile --profile --top 40 \
     --steps 6 --tflops "${TF:-0}" --json "$W/step.json" > "$W/step.txt" 2>&1) &
  STEP=$!
  wait $DATA || { cat "$W/data.txt"; exit 1; }
  wait $(jobs -p | grep -v "^$STEP$") 2>/dev/null
  tail -2 "$W/data.txt"; tail -2 "$W/kernel_build.txt"
  echo "compile: 1" > "$W/compile.txt"
  if [ "$NGPU" -ge 4 ]; then
    say "background (setsid) on card 3: loss parity, 200 steps"
    BF_CARD=3 FP_CARD=3 EXTRA="--compile 1 ${MORE:-}" setsid nohup bash $B/gpu_loss_parity.sh "$W/parity" 200 2 \
      > "$W/parity.txt" 2>&1 < /dev/null &
    echo $! > "$W/parity.pid"
  fi
  say "trainers: card $(card 1) stage 2 (profiled), card $(card 2) stage 1 then M_BSZ 8"
  (NAME=t16 CARDS=$(card 1) STEPS=${STEPS:-40} LIMIT=240 EXTRA="--compile 1 --profile_steps 3 ${MORE:-}" bash $B/gpu_train_run.sh "$W" > "$W/t16.out" 2>&1) &
  (NAME=t16s1 CARDS=$(card 2) STEPS=${STEPS:-40} LIMIT=240 EXTRA="--compile 1 --strategy deepspeed_stage_1 --profile_steps 3 ${MORE:-}" \
     bash $B/gpu_train_run.sh "$W" > "$W/t16s1.out" 2>&1
   if nvidia-smi -L | grep -q H100; then
     NAME=t1 M_BSZ=1 CARDS=$(card 2) STEPS=60 LIMIT=150 EXTRA="--compile 1 ${MORE:-}" bash $B/gpu_train_run.sh "$W" > "$W/t1.out" 2>&1
   else
     NAME=t8 M_BSZ=8 CARDS=$(card 2) STEPS=${STEPS:-40} LIMIT=150 EXTRA="--compile 1 ${MORE:-}" bash $B/gpu_train_run.sh "$W" > "$W/t8.out" 2>&1
   fi) &
  wait $STEP
  say "one compiled step, card 0"; grep -v -i warn "$W/step.txt"; head -3 "$W/matmul.txt"
  (NAME=t16auto CARDS=0 STEPS=${STEPS:-40} LIMIT=200 EXTRA="--compile 1 --strategy auto --profile_steps 3 ${MORE:-}" bash $B/gpu_train_run.sh "$W" > "$W/t16auto.out" 2>&1) &
  wait_runs
  for n in t16 t16s1 t8 t1 t16auto; do [ -f "$W/$n.out" ] && { say "$n"; grep -v "profile (top" "$W/$n.out" | head -12; }; done
  for n in t16 t16s1 t16auto; do [ -f "$W/$n.profile.txt" ] && { say "$n profile"; head -4 "$W/$n.profile.txt" | cut -c1-300; grep -E "Self CPU time total|Self CUDA time total" "$W/$n.profile.txt" | sort -u; }; done
  ;;
parity)
  # bf16 DeepSpeed vs the fp32 PyTorch path over 200 steps (gpu_loss_parity.sh; PARALLEL=1
  # runs both sides at once on one card); the data as `check` makes it when missing
  C=${COMPILE:-$(chosen_compile)}
  [ -f RWKV-v5/demo.meta.json ] || bash $B/gpu_data.sh 20000 30 > "$W/data.txt" 2>&1
  say "loss parity: bf16 DeepSpeed (compile $C) vs fp32 PyTorch path, 200 steps"
  EXTRA="--compile $C ${MORE:-}" timeout 450 bash $B/gpu_loss_parity.sh "$W/parity" 200 2 | tail -24
  ;;
confirm)
  # One GPU, nothing else running: the trainer at M_BSZ 16 (profiled) and at M_BSZ 8 on an
  # H200, or at M_BSZ 1 and 16 on an H100 (the rows of the tutorial's reference figures).
  # ROWS overrides the M_BSZ list, PROFILE_ROWS (16) the rows profiled (PROFILE steps, 3);
  # KERNELS=1 first runs the GPU kernel tests; SMALL=1 first times every WKV kernel
  # configuration at B 1 and one compiled step at M_BSZ 1 (profiled); STEP_AB=DIR then
  # times one compiled step at the first row's M_BSZ with this tree's rwkvlm and with the
  # rwkvlm package under DIR (an older commit), on the same card.
  setup FusedAdamBuilder
  if [ "${SMALL:-0}" = 1 ]; then  # the all-variants WKV build, beside the others
    python3 -c "from rwkvlm.wkv_cuda import load_extension; load_extension(64, 'all')" > "$W/kernel_all_build.txt" 2>&1 &
  fi
  python3 $B/matmul_rate.py | tee "$W/matmul.txt"
  if [ "${KERNELS:-0}" = 1 ]; then
    say "GPU tests: WKV kernel, compiled op"
    timeout 240 python3 -m pytest -q tests/test_wkv_cuda.py tests/test_wkv.py -p no:cacheprovider 2>&1 | tail -3 | tee "$W/tests.txt"
  fi
  wait
  tail -1 "$W/data.txt"
  if [ "${PARITY:-0}" = 1 ] && [ "$NGPU" -ge 2 ]; then start_parity "$LAST"; fi
  if [ "${SMALL:-0}" = 1 ]; then
    say "WKV op at B 1 (T 4096, H 12), every kernel configuration"
    timeout 150 python3 $B/bench_wkv.py --B 1 --no-fla --variants 2>&1 | grep -v -i warn | tee "$W/wkv_b1.txt" | tail -25
    say "one compiled step at M_BSZ 1, profiled"
    timeout 150 python3 $B/bench_step.py --bsz 1 --modes compile --profile --steps 8 --tflops "$(tflops)" \
      2>&1 | grep -v -i warn | tee "$W/step1.txt" | head -40
  fi
  echo "compile: 1" > "$W/compile.txt"
  if [ -z "${ROWS:-}" ]; then if nvidia-smi -L | grep -q H100; then ROWS="1 16"; else ROWS="8 16"; fi; fi
  for M in $ROWS; do
    P=""; case " ${PROFILE_ROWS:-16} " in *" $M "*) [ "${PROFILE:-3}" != 0 ] && P="--profile_steps ${PROFILE:-3}" ;; esac
    say "trainer, 1 GPU, M_BSZ $M"
    NAME=t$M M_BSZ=$M CARDS=0 STEPS=${STEPS:-40} LIMIT=200 EXTRA="--compile 1 $P ${MORE:-}" bash $B/gpu_train_run.sh "$W" 2>&1 \
      | grep -v -E "profile \(top|^torch.profiler over|^host time per phase" | head -12
  done
  [ -n "${CONFIRM_RUNS:-}" ] && RUNS=$CONFIRM_RUNS NGPU=1 STEPS=${SSTEPS:-10} strategy_runs  # on card 0 only
  for M in $ROWS; do
    [ -f "$W/t$M.profile.txt" ] || continue
    say "t$M profile"; head -3 "$W/t$M.profile.txt"
    grep -E "Self CPU time total|Self CUDA time total" "$W/t$M.profile.txt" | sort -u
    grep -E "cudaLaunchKernel |aten::isfinite|AccumulateGrad|aten::pin_memory|linalg_vector_norm|CompiledFunction |cudaMemsetAsync|cudaStreamSynchronize|cudaDeviceSynchronize|aten::item|aten::_local_scalar_dense" "$W/t$M.profile.txt" | cut -c1-60,100-125,185-250 | sort -u
  done
  [ -f "$W/parity.pid" ] && collect_parity "${PARITY_UNTIL:-540}"
  if [ -n "${STEP_AB:-}" ]; then
    M=${ROWS%% *}
    TF=$(tflops)
    for side in new old; do
      say "one compiled step, M_BSZ $M, $side rwkvlm"
      PP=${PYTHONPATH:-}; [ $side = old ] && PP=$STEP_AB:$PP
      PYTHONPATH=$PP timeout 200 python3 $B/bench_step.py --bsz "$M" --modes compile --steps 8 --tflops "${TF:-0}" \
        2>&1 | grep -v -i warn | tee "$W/step_$side.txt"
    done
  fi
  ;;
strategies)
  # The strategies and precisions besides bf16 + deepspeed_stage_2: RUNS short runs (M_BSZ 4,
  # STEPS steps, --compile auto), one per card at a time; each should end with rc 0, a finite
  # loss falling from ~11.25 and rwkv-final.pth (offload builds DeepSpeed's CPU Adam first).
  setup FusedAdamBuilder CPUAdamBuilder
  wait; tail -1 "$W/data.txt"; tail -3 "$W/adam_builds.txt"
  strategy_runs
  ;;
pair)
  # Two GPUs: the M_BSZ 1 row alone on card 0 (the tutorial's H100 reference
  # row), the 2-GPU and 2-node runs (gpu_multi.sh), then strategy_runs two at a time.
  # On a machine that `confirm` used (PARITY=1) it first waits for the loss parity left running;
  # STEPS1=0 skips the M_BSZ 1 row; with ONE_T16=1 the 2-GPU run is compared with confirm's t16
  # run (same settings, same machine) instead of a new 1-GPU run; X2_RUNS (strategy:precision)
  # then run on every GPU at once (M_BSZ 4, SSTEPS steps).
  [ -f "$W/parity.pid" ] && collect_parity "${PARITY_UNTIL:-300}"
  setup FusedAdamBuilder $([ -n "${RUNS-x}" ] && echo CPUAdamBuilder)  # CPU Adam for the offload runs
  [ -f "$W/matmul.txt" ] || python3 $B/matmul_rate.py | tee "$W/matmul.txt"
  wait; tail -1 "$W/data.txt"
  if [ "${STEPS1:-60}" != 0 ]; then
    say "trainer, 1 GPU alone, M_BSZ 1"
    NAME=t1 M_BSZ=1 CARDS=0 STEPS=${STEPS1:-60} LIMIT=150 EXTRA="--compile 1 ${MORE:-}" bash $B/gpu_train_run.sh "$W" 2>&1 | head -12
  fi
  ONE=""; [ "${ONE_T16:-0}" = 1 ] && [ -f "$W/t16.loss_log.csv" ] && ONE="$W/t16.loss_log.csv"
  say "1 GPU${ONE:+ (the t16 run of confirm)}, 2 GPUs, 2 nodes (M_BSZ 16)"
  ONE=$ONE EXTRA="--compile 1 ${MORE:-}" timeout 270 bash $B/gpu_multi.sh "$W/multi" "${STEPS:-30}" 16 2>&1 | tail -6
  [ -n "${RUNS-x}" ] && STEPS=${SSTEPS:-10} strategy_runs
  for r in ${X2_RUNS:-}; do
    ST=${r%%:*}; PR=${r##*:}; N="x${NGPU}_${ST#deepspeed_}_$PR"
    say "$N: $NGPU GPUs"
    NAME=$N M_BSZ=4 DEVICES=$NGPU STEPS=${SSTEPS:-10} LIMIT=${SLIMIT:-240} EXTRA="--strategy $ST --precision $PR ${MORE:-}" \
      bash $B/gpu_train_run.sh "$W" > "$W/$N.out" 2>&1
    grep -E "rc |loss first|peak|steady" "$W/$N.summary.txt" 2>/dev/null || tail -5 "$W/$N.out"
  done
  ;;
*) echo "unknown stage $STAGE (check, speed, real, parity, confirm, strategies, pair)"; exit 2 ;;
esac
