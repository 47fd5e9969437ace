"""rwkvlm: the RWKV-7 (x070) pre-training workflow, in layers (each imports only those above it):

  errors, atomic,  UserError (mistakes a user can fix); crash-safe file writes;
  recipe           the recipe's fixed numbers (mini-epoch size, WKV chunk length, end of document)
  data/            tokenizer (World vocabulary), binidx (.bin/.idx), magic_prime (sampling),
                   make_data (jsonl -> binidx: RWKV-v5/make_data.py), arithmetic (the demo corpus),
                   text + charvocab (--data_type utf-8, char-level vocabularies), mix (weighted
                   binidx mixes: RWKV-v5/mix_data.py)
  ops/wkv7/        the WKV7 op: reference (fp32, per step; one-token step), chunked (PyTorch),
                   cuda (the kernel of RWKV-v7/cuda/, built on first use), one dispatcher
  model/           rwkv7: the x070 model (one functional block), its init and its fused loss
  train/           config (train.py's flags), hardware, data_checks, dataset, mixset, validation, optim, rundir
                   (PROJ_DIR's files), checkpoint (saves, resume), trainlog, lit (the
                   LightningModule), progress, run (train.py: RWKV-v7/train_temp/train.py)
  infer/           generate (a carried state), chat (chat.py), evaluate (evaluate.py),
                   plot (plot_loss.py)
"""
__version__ = "0.1.0"
