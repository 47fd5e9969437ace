"""The WKV7 operator ("x070" time mixing), one signature on every path.

    y, final_state = wkv7(r, w, k, v, a, b, head_size, impl="auto",
                          initial_state=None, output_final_state=False)

r, w, k, v, a, b: (B, T, C), C = H * head_size, decay_t = exp(-exp(w_t)); states are
(B, H, N, N) fp32, row i = value channel, column j = key channel. The paths:

- reference.py: wkv7_reference (per step, the fp32 ground truth) and wkv7_step (one token);
- chunked.py: wkv7_chunked (chunks of 16 steps as batched matmuls; autograd through all);
- cuda.py: the CUDA kernel (bf16 in, fp32 state): the training op and the inference op
  with an initial / final state, compiled on first use.
"""
from __future__ import annotations

import torch

from rwkvlm.ops.wkv7.chunked import wkv7_chunked
from rwkvlm.ops.wkv7.reference import wkv7_reference, wkv7_step

__all__ = ["wkv7", "wkv7_chunked", "wkv7_reference", "wkv7_step"]


def wkv7(r, w, k, v, a, b, head_size: int, impl: str = "auto", initial_state=None,
         output_final_state: bool = False):
    """The WKV7 dispatcher: (y (B, T, C) in r's dtype, final state (B, H, N, N) fp32 or None).

    initial_state: (B, H, N, N) in the [value, key] layout, None for zero; the final state
    is returned when output_final_state is set or an initial state is given.
    impl "auto": CUDA tensors take the kernel (rwkvlm.ops.wkv7.cuda) when its module imports:
    the training op from a zero state, the inference op (no autograd) with a state; a state
    that needs gradients, CPU tensors and a missing kernel module take the chunked PyTorch
    path, which differentiates through everything. One token with a state takes wkv7_step.
    "torch" always takes the PyTorch paths (the fp32 reference of parity runs); "cuda"
    requires the kernel.
    """
    if impl == "cuda" and not r.is_cuda:
        raise ValueError("wkv7(impl='cuda') needs CUDA tensors")
    stateful = initial_state is not None or output_final_state
    if stateful and r.shape[1] == 1 and impl != "cuda":
        return wkv7_step(r, w, k, v, a, b, head_size, state=initial_state)
    kernel = None
    if r.is_cuda and impl in ("auto", "cuda"):
        try:
            import rwkvlm.ops.wkv7.cuda as kernel
        except ImportError:
            if impl == "cuda":
                raise
    if kernel is not None:
        if not stateful:
            return kernel.wkv7_cuda(r, w, k, v, a, b, head_size=head_size), None
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (r, w, k, v, a, b, initial_state))
        if not needs_grad:
            return kernel.wkv7_cuda_state(r, w, k, v, a, b, initial_state, head_size=head_size)
    y, state = wkv7_chunked(r, w, k, v, a, b, head_size, state=initial_state)
    return y, (state if stateful else None)
