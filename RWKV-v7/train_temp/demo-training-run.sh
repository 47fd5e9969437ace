#!/bin/sh
# Pre-train from rwkv-init.pth. Re-running this script resumes from the newest save in PROJ_DIR.
# Edit the variables below (the first block must match demo-training-prepare.sh), then run:
#   sh demo-training-run.sh
# Extra flags are passed on to train.py (later flags win), e.g. --save_every_minutes 30
set -eu
cd "$(dirname "$0")"
PYTHON=${PYTHON:-$(command -v python || command -v python3)}   # the Python that has torch (your venv/conda env; PYTHON=... picks one)

MODEL_TYPE="x070"      # the same as in demo-training-prepare.sh
N_LAYER="12"
N_EMBD="768"
CTX_LEN="4096"         # the ctx_len you gave make_data.py
PROJ_DIR="out/L${N_LAYER}-D${N_EMBD}-${MODEL_TYPE}"

# make_data.py output (path WITHOUT .bin/.idx) and the line it printed:
data_file="../../RWKV-v5/demo"
MY_EXIT_TOKENS="52078530"   # --my_exit_tokens: training ends (rwkv-final.pth) after this many tokens
MAGIC_PRIME="12713"         # --magic_prime for this data and CTX_LEN

M_BSZ="16"             # samples per GPU per step: as large as VRAM allows (a power of 2)
LR_INIT="6e-4"         # about 0.45 / N_EMBD
LR_FINAL="6e-5"        # about 0.04 / N_EMBD
GRAD_CP=1              # 1: gradient checkpointing, less VRAM; 0: faster, more VRAM
EPOCH_SAVE=10          # write rwkv-N.pth every this many mini-epochs (40320 samples each)
N_NODE=1               # machines
GPU_PER_NODE=1         # GPUs per machine
DS_BUCKET_MB=2         # DeepSpeed bucket: 2 for consumer GPUs, 200 for A100 / H100
WANDB="Test"           # wandb project name; "" to turn wandb off
LOAD_MODEL="0"         # "0": rwkv-init.pth or the newest save in PROJ_DIR; or a .pth file of MODEL_TYPE (e.g. a released
                       # RWKV-7) to start from: its shapes (layers, width, LoRA sizes) are read from it and win over
                       # N_LAYER / N_EMBD; once PROJ_DIR holds saves, re-running resumes from them instead

"$PYTHON" train.py --load_model "$LOAD_MODEL" --wandb "$WANDB" --proj_dir "$PROJ_DIR" --my_testing "$MODEL_TYPE" \
 --ctx_len "$CTX_LEN" --train_stage 3 --epoch_count 999999 --epoch_begin 0 \
 --data_file "$data_file" --my_exit_tokens "$MY_EXIT_TOKENS" --magic_prime "$MAGIC_PRIME" \
 --num_nodes "$N_NODE" --micro_bsz "$M_BSZ" --n_layer "$N_LAYER" --n_embd "$N_EMBD" \
 --lr_init "$LR_INIT" --lr_final "$LR_FINAL" --warmup_steps 10 --beta1 0.9 --beta2 0.99 --adam_eps 1e-18 \
 --data_type "binidx" --vocab_size 65536 \
 --weight_decay 0.001 --epoch_save "$EPOCH_SAVE" --head_size 64 \
 --accelerator gpu --devices "$GPU_PER_NODE" --precision bf16 --strategy deepspeed_stage_2 \
 --grad_cp "$GRAD_CP" --enable_progress_bar True --ds_bucket_mb "$DS_BUCKET_MB" \
 "$@"
