"""rwkvlm: the RWKV-7 (x070) pre-training workflow.

One module per concern:
  errors       UserError, the one exception type for mistakes a user can fix
  atomic       crash-safe file writes (temporary name, fsync, rename)
  tokenizer    the rwkv_vocab_v20230424 World tokenizer (pyrwkv-tokenizer)
  binidx       MMIDIDX .bin/.idx reader and writer
  magic_prime  magic_prime and the sample-position formula
  make_data    jsonl -> binidx (RWKV-v5/make_data.py)
  arithmetic   the arithmetic demo corpus and held-out set
  model        the x070 model, its init and its loss
  wkv          the WKV7 op: fp32 reference, chunked PyTorch path, CUDA seam
  train        train.py (RWKV-v7/train.py)
"""
__version__ = "0.1.0"
