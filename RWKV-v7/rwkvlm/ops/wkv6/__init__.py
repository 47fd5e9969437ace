"""The WKV6 operator ("x060" time mixing), one signature on every path.

    y, final_state = wkv6(r, k, v, w, u, head_size, impl="auto",
                          initial_state=None, output_final_state=False)

Argument order r, k, v, w, u: that of RWKV-LM's RUN_CUDA_RWKV6 and of flash-linear-attention's
chunk_rwkv6. r, k, v, w: (B, T, C), C = H * head_size, decay_t = exp(-exp(w_t)); u (the
x060 parameter time_faaaa): (H, N) or (C,). States are (B, H, N, N) fp32, row i = value
channel, column j = key channel (the transpose of the `rwkv` pip package's per-layer
(H, N, N) state and of fla's [K, V] state):

    y_t = S_{t-1} r_t + v_t * sum_j(r_t[j] u[j] k_t[j]),   S_t = S_{t-1} diag(decay_t) + v_t k_t^T

The paths:

- reference.py: wkv6_reference (per step, the fp32 ground truth) and wkv6_step (one token);
- chunked.py: wkv6_chunked (chunks of WKV_CHUNK_LEN steps as batched matmuls; autograd
  through all, the initial state and u included);
- cuda.py: the CUDA kernel (bf16 r, k, v, w; fp32 u and state): the training op from a zero
  state and the inference op with an initial / final state, compiled on first use.
"""
from __future__ import annotations

import torch

from rwkvlm.ops.wkv6.chunked import wkv6_chunked
from rwkvlm.ops.wkv6.reference import wkv6_reference, wkv6_step

__all__ = ["wkv6", "wkv6_chunked", "wkv6_reference", "wkv6_step"]


def wkv6(r, k, v, w, u, head_size: int, impl: str = "auto", initial_state=None,
         output_final_state: bool = False):
    """The WKV6 dispatcher: (y (B, T, C) in r's dtype, final state (B, H, N, N) fp32 or None).

    initial_state: (B, H, N, N) in the [value, key] layout, None for zero; the final state
    is returned when output_final_state is set or an initial state is given.
    impl "auto": CUDA tensors take the kernel (rwkvlm.ops.wkv6.cuda) when its module imports
    and supports head_size: the training op from a zero state, the inference op (no
    autograd) with a state; a state that needs gradients, CPU tensors, another head size
    and a missing kernel module take the chunked PyTorch path, which differentiates through
    everything. One token with a state takes wkv6_step. "torch" always takes the PyTorch
    paths (the fp32 reference of parity runs); "cuda" requires the kernel.
    """
    if impl not in ("auto", "torch", "cuda"):
        raise ValueError(f"wkv6: impl must be 'auto', 'torch' or 'cuda', got {impl!r}")
    if impl == "cuda" and not r.is_cuda:
        raise ValueError("wkv6(impl='cuda') needs CUDA tensors")
    stateful = initial_state is not None or output_final_state
    if stateful and r.dim() == 3 and r.shape[1] == 1 and impl != "cuda":
        return wkv6_step(r, k, v, w, u, head_size, state=initial_state)
    kernel = None
    if r.is_cuda and impl in ("auto", "cuda"):
        try:
            import rwkvlm.ops.wkv6.cuda as kernel
        except ImportError:
            if impl == "cuda":
                raise
        if kernel is not None and impl == "auto" and head_size not in kernel.HEAD_SIZES:
            kernel = None
    if kernel is not None:
        if not stateful:
            return kernel.wkv6_cuda(r, k, v, w, u, head_size=head_size), None
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (r, k, v, w, u, initial_state))
        if not needs_grad:
            return kernel.wkv6_cuda_state(r, k, v, w, u, initial_state, head_size=head_size)
    y, state = wkv6_chunked(r, k, v, w, u, head_size, state=initial_state)
    return y, (state if stateful else None)
