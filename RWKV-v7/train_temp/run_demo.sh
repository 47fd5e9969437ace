#!/bin/sh
# The whole tutorial on its built-in demo, end to end, in five stages:
#   1. generate the arithmetic demo corpus (RWKV-v5/demo.jsonl)
#   2. make_data.py: jsonl -> demo.bin / demo.idx, printing --my_exit_tokens / --magic_prime
#   3. demo-training-prepare.sh: rwkv-init.pth
#   4. demo-training-run.sh: one pass over the data, as the tutorial trains (CPU when there is no GPU)
#   5. test the model: arithmetic accuracy table, one chat answer, the loss plot
# Usage: sh RWKV-v7/train_temp/run_demo.sh   (variables below; extra flags go to demo-training-run.sh)
#        MODEL_TYPE=x060 sh RWKV-v7/train_temp/run_demo.sh   (the same demo with an RWKV-6 model)
# Each stage's first line gives its time as measured on 2 CPU cores without a GPU (an otherwise
# idle machine: 3 minutes in all; with other work running, training takes several times longer),
# its last line the time it took here.
set -eu
cd "$(dirname "$0")/../.."   # the repository root
PYTHON=${PYTHON:-$(command -v python || command -v python3)}   # the Python that has torch (your venv/conda env; PYTHON=... picks one)

DOCS="1630"        # dialogues in the generated corpus: x COPIES = 402,399 tokens, one pass = 99 steps
COPIES="3"         # make_data.py's N (duplications)
CTX_LEN="512"      # a multiple of 512
N_LAYER="2"        # a tiny model, so that CPU training takes a few minutes
N_EMBD="128"
M_BSZ="8"          # samples per step: M_BSZ x CTX_LEN = 4096 tokens per step
MODEL_TYPE=${MODEL_TYPE:-x070}   # x070: RWKV-7; x060: RWKV-6
SUFFIX=$([ "$MODEL_TYPE" = "x070" ] || echo "-$MODEL_TYPE")
PROJ_DIR="out/demo-L${N_LAYER}-D${N_EMBD}${SUFFIX}"   # relative to RWKV-v7/train_temp, like the tutorial's scripts

if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  HW="--accelerator gpu --precision bf16 --strategy auto"
else
  HW="--accelerator cpu --precision fp32 --strategy auto"
fi

T_STAGE=0
stage() {   # stage N "what" "measured time"
  [ "$T_STAGE" = 0 ] || echo "      (took $(( $(date +%s) - T_STAGE )) s)"
  T_STAGE=$(date +%s)
  echo ""
  echo "[$1/5] $2 (about $3 on 2 CPU cores)"
}

stage 1 "making the arithmetic corpus: $DOCS dialogues" "1 s"
cd RWKV-v5
"$PYTHON" make_arithmetic_data.py demo.jsonl --docs "$DOCS" --seed 0
stage 2 "make_data.py demo.jsonl $COPIES $CTX_LEN: tokenising it into demo.bin / demo.idx" "2 s"
"$PYTHON" make_data.py demo.jsonl "$COPIES" "$CTX_LEN" --seed 0
# the line make_data.py printed, which the tutorial copies into the scripts
TOKENS=$("$PYTHON" -c "import json; print(json.load(open('demo.meta.json'))['tokens'])")
PRIME=$("$PYTHON" -c "import json; print(json.load(open('demo.meta.json'))['magic_prime'])")
STEPS=$(( (TOKENS + M_BSZ * CTX_LEN - 1) / (M_BSZ * CTX_LEN) ))
cd ../RWKV-v7/train_temp

COMMON="--proj_dir $PROJ_DIR --data_file ../../RWKV-v5/demo --ctx_len $CTX_LEN --n_layer $N_LAYER --n_embd $N_EMBD"
COMMON="$COMMON --my_testing $MODEL_TYPE"
COMMON="$COMMON --my_exit_tokens $TOKENS --magic_prime $PRIME --random_seed 0"
stage 3 "demo-training-prepare.sh: the initial model L${N_LAYER}-D${N_EMBD}, rwkv-init.pth" "3 s"
# shellcheck disable=SC2086
sh demo-training-prepare.sh $COMMON
stage 4 "demo-training-run.sh: $STEPS steps of $M_BSZ x $CTX_LEN tokens, one pass over the $TOKENS tokens" "170 s"
# shellcheck disable=SC2086
sh demo-training-run.sh $COMMON $HW --micro_bsz "$M_BSZ" --wandb "" --lr_init 2e-3 --lr_final 5e-4 "$@"

stage 5 "testing the model: held-out accuracy, one chat answer, the loss plot" "6 s"
"$PYTHON" ../evaluate.py "$PROJ_DIR/rwkv-final.pth" --n 80
echo "chat.py --prompt \"12 + 7 = ?\" answers:"
"$PYTHON" ../chat.py "$PROJ_DIR/rwkv-final.pth" --prompt "12 + 7 = ?" --temperature 0
"$PYTHON" ../plot_loss.py "$PROJ_DIR"
echo "      (took $(( $(date +%s) - T_STAGE )) s)"

cat <<EOF

== done: checkpoints, train_log.txt and loss.png are in RWKV-v7/train_temp/$PROJ_DIR

What to expect. This model is tiny (L${N_LAYER}-D${N_EMBD}) and trained for only $STEPS steps: it learns the
format of the dialogues (User: ... / Assistant: a + b = c), not the arithmetic, so 0% accuracy and
a wrong chat answer are expected; its loss falls from 11.2 to about 1.6 (loss.png). The tutorial's
GPU run, RWKV-7-Arithmetic-0.1B (L12-D768, ctx 4096, 180M tokens: 14 min on one H200), answers 99.6%
of the held-out problems asked in training's wordings, 93.95% in held-out wordings (README.md,
"The RWKV-7-Arithmetic-0.1B run").

Next (from the repository root):
  cd RWKV-v7/train_temp
  python ../evaluate.py $PROJ_DIR --show-errors   # the table again, with wrong answers
  python ../chat.py $PROJ_DIR                     # chat with it (User: / Assistant:)
  python ../plot_loss.py $PROJ_DIR                # loss.png from train_log.txt / loss_log.csv
  sh demo-training-prepare.sh && sh demo-training-run.sh   # the tutorial's 0.1B run (a GPU): README.md
EOF
