"""The `rwkv` pip package (the independent inference client) run in a subprocess: logits of
a checkpoint for a token list, whole and token by token."""

RWKV_PKG_SCRIPT = r"""
import os, sys
os.environ["RWKV_V7_ON"] = "1"
os.environ["RWKV_JIT_ON"] = "0"
os.environ["RWKV_CUDA_ON"] = "0"
import torch
from rwkv.model import RWKV
path, out, toks = sys.argv[1], sys.argv[2], [int(t) for t in sys.argv[3].split(",")]
m = RWKV(model=path, strategy="cpu fp32")
seq, _ = m.forward(toks, None, full_output=True)
state, one = None, []
for t in toks:
    o, state = m.forward([t], state)
    one.append(o)
torch.save({"seq": seq, "one": torch.stack(one), "state": state}, out)
"""
