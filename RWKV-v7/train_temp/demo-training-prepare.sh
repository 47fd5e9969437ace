#!/bin/sh
# Write rwkv-init.pth: the freshly initialised model that training starts from.
# Edit the variables below, then run: sh demo-training-prepare.sh
# Extra flags are passed on to train.py (later flags win), e.g. --random_seed 42
set -eu
cd "$(dirname "$0")"
PYTHON=${PYTHON:-$(command -v python || command -v python3)}   # the Python that has torch (your venv/conda env; PYTHON=... picks one)

MODEL_TYPE="x070"      # x070: RWKV-7; x060: RWKV-6 (the same in both scripts)
N_LAYER="12"           # layers   } 12 x 768 is the 0.1B model; see the tutorial's
N_EMBD="768"           # width    } hardware table. N_EMBD must be a multiple of 64.
CTX_LEN="4096"         # context length: a multiple of 512, the same as in make_data.py
PROJ_DIR="out/L${N_LAYER}-D${N_EMBD}-${MODEL_TYPE}"   # output folder; the same in both scripts

# make_data.py output (path WITHOUT .bin/.idx) and the line it printed:
data_file="../../RWKV-v5/demo"
MY_EXIT_TOKENS="52078530"   # --my_exit_tokens from make_data.py
MAGIC_PRIME="12713"         # --magic_prime from make_data.py

"$PYTHON" train.py --wandb "" --proj_dir "$PROJ_DIR" \
 --data_file "$data_file" --data_type "binidx" --vocab_size 65536 --my_testing "$MODEL_TYPE" \
 --ctx_len "$CTX_LEN" --train_stage 1 --epoch_count 1 --epoch_begin 0 \
 --epoch_save 1 --weight_decay 0 --head_size 64 \
 --num_nodes 1 --micro_bsz 1 --n_layer "$N_LAYER" --n_embd "$N_EMBD" \
 --my_exit_tokens "$MY_EXIT_TOKENS" --magic_prime "$MAGIC_PRIME" \
 --lr_init 1e-5 --lr_final 1e-5 --warmup_steps 10 --beta1 0.9 --beta2 0.99 --adam_eps 1e-8 \
 --accelerator cpu --devices 1 --precision bf16 --strategy deepspeed_stage_2 --grad_cp 1 \
 "$@"
