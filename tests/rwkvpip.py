"""The `rwkv` pip package (the independent inference client) run in a subprocess: logits of
a checkpoint (x070 or x060) for a token list, whole and token by token."""

RWKV_PKG_SCRIPT = r"""
import os, sys
import torch
path, out, toks = sys.argv[1], sys.argv[2], [int(t) for t in sys.argv[3].split(",")]
# the package's x070 class runs RWKV-7 files; without RWKV_V7_ON it reads the version (v6.0 for
# x060) off the keys itself
file = path if path.endswith(".pth") else path + ".pth"  # the package adds .pth to a name without it
keys = torch.load(file, map_location="cpu", weights_only=True, mmap=True).keys()
os.environ["RWKV_V7_ON"] = "1" if "blocks.0.att.r_k" in keys else "0"
os.environ["RWKV_JIT_ON"] = "0"
os.environ["RWKV_CUDA_ON"] = "0"
from rwkv.model import RWKV
m = RWKV(model=path, strategy="cpu fp32")
seq, _ = m.forward(toks, None, full_output=True)
state, one = None, []
for t in toks:
    o, state = m.forward([t], state)
    one.append(o)
torch.save({"seq": seq, "one": torch.stack(one), "state": state}, out)
"""
