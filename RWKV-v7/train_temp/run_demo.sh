#!/bin/sh
# The whole tutorial on its embedded default, end to end:
#   1. generate the arithmetic demo corpus (RWKV-v5/demo.jsonl)
#   2. make_data.py: jsonl -> demo.bin / demo.idx, printing --my_exit_tokens / --magic_prime
#   3. demo-training-prepare.sh: rwkv-init.pth
#   4. demo-training-run.sh: a short training run (CPU when there is no GPU)
#   5. test the model: arithmetic accuracy table, one chat answer, the loss plot
# Usage: sh RWKV-v7/train_temp/run_demo.sh   (variables below; extra flags go to demo-training-run.sh)
set -eu
cd "$(dirname "$0")/../.."   # the repository root

DOCS="4000"        # dialogues in the generated corpus
COPIES="3"         # make_data.py's N (duplications)
CTX_LEN="512"      # a multiple of 512
N_LAYER="2"        # a tiny model, so that CPU training takes a few minutes
N_EMBD="128"
M_BSZ="8"
TRAIN_STEPS="100"  # optimiser steps of the demo run (M_BSZ x CTX_LEN tokens each)
PROJ_DIR="out/demo-L${N_LAYER}-D${N_EMBD}"

if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  HW="--accelerator gpu --precision bf16 --strategy auto"
else
  HW="--accelerator cpu --precision fp32 --strategy auto"
fi

echo "== 1. arithmetic demo corpus"
cd RWKV-v5
python3 make_arithmetic_data.py demo.jsonl --docs "$DOCS" --seed 0
echo "== 2. make_data.py demo.jsonl $COPIES $CTX_LEN"
python3 make_data.py demo.jsonl "$COPIES" "$CTX_LEN" --seed 0
TOKENS=$(python3 -c "import json; print(json.load(open('demo.meta.json'))['tokens'])")
PRIME=$(python3 -c "import json; print(json.load(open('demo.meta.json'))['magic_prime'])")
EXIT_TOKENS=$((TRAIN_STEPS * M_BSZ * CTX_LEN))
cd ../RWKV-v7/train_temp

COMMON="--proj_dir $PROJ_DIR --data_file ../../RWKV-v5/demo --ctx_len $CTX_LEN --n_layer $N_LAYER --n_embd $N_EMBD --magic_prime $PRIME --random_seed 0"
echo "== 3. demo-training-prepare.sh"
sh demo-training-prepare.sh $COMMON --my_exit_tokens "$TOKENS"
echo "== 4. demo-training-run.sh ($TRAIN_STEPS steps; the data holds $TOKENS tokens, the demo trains on $EXIT_TOKENS)"
# shellcheck disable=SC2086
sh demo-training-run.sh $COMMON $HW --my_exit_tokens "$EXIT_TOKENS" --micro_bsz "$M_BSZ" \
  --wandb "" --lr_init 2e-3 --lr_final 5e-4 "$@"

echo "== 5. test the model"
python3 ../evaluate.py "$PROJ_DIR/rwkv-final.pth" --n 80
python3 ../chat.py "$PROJ_DIR/rwkv-final.pth" --prompt "12 + 7 = ?"
python3 ../plot_loss.py "$PROJ_DIR"
echo "== done: checkpoints, train_log.txt and loss.png are in RWKV-v7/train_temp/$PROJ_DIR"
