"""rwkvlm: the RWKV-7 (x070) pre-training workflow.

One module per concern:
  errors       UserError, the one exception type for mistakes a user can fix
  atomic       crash-safe file writes (temporary name, fsync, rename)
  tokenizer    the rwkv_vocab_v20230424 World tokenizer (pyrwkv-tokenizer)
  binidx       MMIDIDX .bin/.idx reader and writer
  magic_prime  magic_prime and the sample-position formula
  make_data    jsonl -> binidx (RWKV-v5/make_data.py)
  arithmetic   the arithmetic demo corpus and its held-out set
  model        the x070 model, its init and its fused loss
  wkv          the WKV7 op: fp32 reference, chunked PyTorch path, dispatch
  wkv_cuda     the CUDA kernel's loader and autograd wrapper (RWKV-v7/cuda/)
  config       train.py's flags and the validated TrainConfig
  data_checks  the data against the settings (magic_prime, ctx_len, ...)
  dataset      magic_prime sampling of training windows
  optim        optimiser groups and the learning-rate schedule
  checkpoint   rwkv-*.pth files and exact-resume states
  lit          the LightningModule: steps, logs, saves, resume
  progress     the progress bar: the run's global step of its total
  trainlog     train_log.txt's lines: a header per run, one line per mini-epoch
  train        train.py (RWKV-v7/train_temp/train.py)
  generate     loading a checkpoint, sampling with a carried state
  chat         chat.py
  evaluate     evaluate.py: held-out arithmetic accuracy by kind
  plot         plot_loss.py: loss.png from the training logs
"""
__version__ = "0.1.0"
