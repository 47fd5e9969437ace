"""WKV7 in plain PyTorch, step by step: the fp32 reference and the one-token step.

r, w, k, v, a, b: (B, T, C), C = H * N (N = head_size), decay_t = exp(-exp(w_t)); the
state S (B, H, N, N) has row i = value channel, column j = key channel:

    S_t = S_{t-1} diag(decay_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T
    y_t = S_t r_t

kept in fp32 (fp64 for fp64 inputs). The other paths (chunked.py, cuda.py) are tested
against wkv7_reference.
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


def _check_inputs(r, w, k, v, a, b, head_size: int):
    if r.dim() != 3:
        raise ValueError(f"wkv7 inputs must be (B, T, C); got shape {tuple(r.shape)}")
    for name, t in (("w", w), ("k", k), ("v", v), ("a", a), ("b", b)):
        if t.shape != r.shape:
            raise ValueError(f"wkv7: {name} has shape {tuple(t.shape)}, expected {tuple(r.shape)} like r")
    C = r.shape[2]
    if head_size <= 0 or C % head_size != 0:
        raise ValueError(f"wkv7: C={C} is not a multiple of head_size={head_size}")


def _check_state(state, B: int, H: int, N: int):
    if state is not None and tuple(state.shape) != (B, H, N, N):
        raise ValueError(f"wkv7: state has shape {tuple(state.shape)}, expected {(B, H, N, N)}")


# --------------------------------------------------------------------------------------------
# Reference: one step at a time
# --------------------------------------------------------------------------------------------

def wkv7_reference(r, w, k, v, a, b, head_size: int, state=None):
    """Plain per-step recurrence in fp32 (fp64 for fp64 inputs): the ground truth.

    Returns (y (B, T, C) in r's dtype, final state (B, H, N, N) in the compute dtype).
    """
    _check_inputs(r, w, k, v, a, b, head_size)
    B, T, C = r.shape
    N = head_size
    H = C // N
    _check_state(state, B, H, N)
    cd = _compute_dtype(r)
    with _no_autocast(r.device):
        rr, ww, kk, vv, aa, bb = (t.to(cd).view(B, T, H, N) for t in (r, w, k, v, a, b))  # (B, T, H, N)
        decay = torch.exp(-torch.exp(ww))  # (B, T, H, N)
        if state is None:
            S = torch.zeros(B, H, N, N, dtype=cd, device=r.device)  # (B, H, Nv, Nk)
        else:
            S = state.to(cd)
        ys = []
        for t in range(T):
            sa = S @ aa[:, t].unsqueeze(-1)  # (B, H, Nv, 1)
            S = (S * decay[:, t].unsqueeze(-2)                      # decay along the key axis
                 + sa @ bb[:, t].unsqueeze(-2)                      # (B, H, Nv, 1) @ (B, H, 1, Nk)
                 + vv[:, t].unsqueeze(-1) @ kk[:, t].unsqueeze(-2))  # (B, H, Nv, 1) @ (B, H, 1, Nk)
            ys.append((S @ rr[:, t].unsqueeze(-1)).squeeze(-1))  # (B, H, Nv)
        if T > 0:
            y = torch.stack(ys, dim=1)  # (B, T, H, N)
        else:
            y = rr.new_zeros(B, 0, H, N)  # (B, 0, H, N)
        y = y.reshape(B, T, C).to(r.dtype)  # (B, T, C)
    return y, S


def wkv7_step(r, w, k, v, a, b, head_size: int, state=None):
    """One token with a state: r..b (B, 1, C) or (B, C); returns (y like r, state (B, H, N, N)).

    The recurrence once, as a handful of batched ops (the cheap step of token-by-token
    generation; the sequence paths' chunking and padding would only add work at T = 1).
    """
    squeeze = r.dim() == 2
    if squeeze:
        r, w, k, v, a, b = (t.unsqueeze(1) for t in (r, w, k, v, a, b))  # (B, 1, C)
    _check_inputs(r, w, k, v, a, b, head_size)
    B, T, C = r.shape
    if T != 1:
        raise ValueError(f"wkv7_step takes one token, got T = {T}")
    N = head_size
    H = C // N
    _check_state(state, B, H, N)
    cd = _compute_dtype(r)
    with _no_autocast(r.device):
        rr, ww, kk, vv, aa, bb = (t.to(cd).view(B, H, N) for t in (r, w, k, v, a, b))  # (B, H, N)
        S = r.new_zeros((B, H, N, N), dtype=cd) if state is None else state.to(cd)  # (B, H, Nv, Nk)
        sa = S @ aa.unsqueeze(-1)  # (B, H, Nv, 1)
        S = S * torch.exp(-torch.exp(ww)).unsqueeze(-2) + sa @ bb.unsqueeze(-2) + vv.unsqueeze(-1) @ kk.unsqueeze(-2)
        y = (S @ rr.unsqueeze(-1)).view(B, 1, C).to(r.dtype)  # (B, H, Nv, 1) -> (B, 1, C)
    return (y.squeeze(1) if squeeze else y), S
