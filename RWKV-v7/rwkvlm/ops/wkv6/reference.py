"""WKV6 in plain PyTorch, step by step: the fp32 reference and the one-token step.

Argument order (every WKV6 path): r, k, v, w, u, head_size, the order of RWKV-LM's
RUN_CUDA_RWKV6(r, k, v, w, u) and of flash-linear-attention's chunk_rwkv6.

r, k, v, w: (B, T, C), C = H * N (N = head_size); decay_t = exp(-exp(w_t)) (w is the
"log-log" decay the x060 model feeds its kernel); u ("time_faaaa", the bonus of the current
token): (H, N) or (C,). The state S (B, H, N, N) has row i = value channel, column j = key
channel (the layout of RWKV-LM's wkv6state kernel and of its `time_state` parameter):

    y_t = S_{t-1} r_t + v_t * sum_j(r_t[j] u[j] k_t[j])
    S_t = S_{t-1} diag(decay_t) + v_t k_t^T

i.e. y_t[i] = sum_j r_t[j] (S_{t-1}[i,j] + u[j] k_t[j] v_t[i]): the output reads the state
*before* step t, and token t itself enters through u only. Kept in fp32 (fp64 for fp64
inputs). The other paths (chunked.py, cuda.py) are tested against wkv6_reference.
"""
from __future__ import annotations

import contextlib

import torch


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs, fp64 for fp64 inputs."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _no_autocast(device: torch.device):
    """Disable autocast so fp32 accumulation is not silently downcast."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _check_inputs(r, k, v, w, u, head_size: int):
    if r.dim() != 3:
        raise ValueError(f"wkv6 inputs must be (B, T, C); got shape {tuple(r.shape)}")
    for name, t in (("k", k), ("v", v), ("w", w)):
        if t.shape != r.shape:
            raise ValueError(f"wkv6: {name} has shape {tuple(t.shape)}, expected {tuple(r.shape)} like r")
    C = r.shape[2]
    if head_size <= 0 or C % head_size != 0:
        raise ValueError(f"wkv6: C={C} is not a multiple of head_size={head_size}")
    H = C // head_size
    if tuple(u.shape) not in ((H, head_size), (C,)):
        raise ValueError(f"wkv6: u has shape {tuple(u.shape)}, expected (H, N) = {(H, head_size)} or (C,) = {(C,)}")


def _check_state(state, B: int, H: int, N: int):
    if state is not None and tuple(state.shape) != (B, H, N, N):
        raise ValueError(f"wkv6: state has shape {tuple(state.shape)}, expected {(B, H, N, N)}")


# --------------------------------------------------------------------------------------------
# Reference: one step at a time
# --------------------------------------------------------------------------------------------

def wkv6_reference(r, k, v, w, u, head_size: int, state=None):
    """Plain per-step recurrence in fp32 (fp64 for fp64 inputs): the ground truth.

    state: (B, H, N, N) [value, key] initial state, None for zero. Returns (y (B, T, C) in r's
    dtype, final state (B, H, N, N) in the compute dtype). Differentiable in every input.
    """
    _check_inputs(r, k, v, w, u, head_size)
    B, T, C = r.shape
    N = head_size
    H = C // N
    _check_state(state, B, H, N)
    cd = _compute_dtype(r)
    with _no_autocast(r.device):
        rr, kk, vv, ww = (t.to(cd).view(B, T, H, N) for t in (r, k, v, w))  # (B, T, H, N)
        uu = u.to(cd).reshape(H, N)  # (H, N)
        decay = torch.exp(-torch.exp(ww))  # (B, T, H, N)
        if state is None:
            S = torch.zeros(B, H, N, N, dtype=cd, device=r.device)  # (B, H, Nv, Nk)
        else:
            S = state.to(cd)
        ys = []
        for t in range(T):
            r_t, k_t, v_t = rr[:, t], kk[:, t], vv[:, t]  # (B, H, N)
            bonus = (r_t * uu * k_t).sum(-1, keepdim=True)  # (B, H, 1)
            ys.append((S @ r_t.unsqueeze(-1)).squeeze(-1) + bonus * v_t)  # (B, H, Nv)
            S = S * decay[:, t].unsqueeze(-2) + v_t.unsqueeze(-1) @ k_t.unsqueeze(-2)  # (B, H, Nv, Nk)
        if T > 0:
            y = torch.stack(ys, dim=1)  # (B, T, H, N)
        else:
            y = rr.new_zeros(B, 0, H, N)  # (B, 0, H, N)
        y = y.reshape(B, T, C).to(r.dtype)  # (B, T, C)
    return y, S


def wkv6_step(r, k, v, w, u, head_size: int, state=None):
    """One token with a state: r, k, v, w (B, 1, C) or (B, C); returns (y like r, state (B, H, N, N)).

    The recurrence once, as a handful of batched ops (the cheap step of token-by-token
    generation; the sequence paths' chunking and padding would only add work at T = 1).
    """
    squeeze = r.dim() == 2
    if squeeze:
        r, k, v, w = (t.unsqueeze(1) for t in (r, k, v, w))  # (B, 1, C)
    _check_inputs(r, k, v, w, u, head_size)
    B, T, C = r.shape
    if T != 1:
        raise ValueError(f"wkv6_step takes one token, got T = {T}")
    N = head_size
    H = C // N
    _check_state(state, B, H, N)
    cd = _compute_dtype(r)
    with _no_autocast(r.device):
        rr, kk, vv, ww = (t.to(cd).view(B, H, N) for t in (r, k, v, w))  # (B, H, N)
        uu = u.to(cd).reshape(H, N)  # (H, N)
        S = r.new_zeros((B, H, N, N), dtype=cd) if state is None else state.to(cd)  # (B, H, Nv, Nk)
        bonus = (rr * uu * kk).sum(-1, keepdim=True)  # (B, H, 1)
        y = (S @ rr.unsqueeze(-1)).squeeze(-1) + bonus * vv  # (B, H, Nv)
        S = S * torch.exp(-torch.exp(ww)).unsqueeze(-2) + vv.unsqueeze(-1) @ kk.unsqueeze(-2)  # (B, H, Nv, Nk)
        y = y.reshape(B, 1, C).to(r.dtype)  # (B, 1, C)
    return (y.squeeze(1) if squeeze else y), S
