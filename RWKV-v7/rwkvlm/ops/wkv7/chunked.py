"""The chunked PyTorch path of WKV7 (CPU, and GPU without the kernel).

Same contract as reference.py (shapes, the [value, key] state layout, fp32 state).

`wkv7_chunked` cuts T into chunks of `chunk_len` steps. Inside a chunk, with
c_t the cumulative log-decay up to and including step t, every pairwise
interaction carries the factor exp(c_t - c_s) (s <= t). Write u_t = S_{t-1} a_t
and Z = S^T. Then, for one chunk starting from Z0,

    U  = (I - A_ab)^{-1} (a~ Z0 + A_ak V)          u_t for every step
    Y  = r~ Z0 + A_rk V + A_rb U                    outputs
    Z' = diag(exp(c_last)) Z0 + K^T V + B^T U       state at chunk end

with a~ = a * exp(c_{t-1}), r~ = r * exp(c_t) and K, B the keys / b-vectors
decayed to the chunk end (all factors <= 1). The L x L matrices A_xy hold
sum_j x_t[j] y_s[j] exp(c_t[j] - c_s[j]) (c_{t-1} for the a-rows), lower
triangular. Everything that does not depend on Z0 is computed for all chunks
at once with batched matmuls; the Python loop runs once per chunk and only
does Z' = diag(exp(c_last)) Z0 + G Z0 + H0 (one N x N matmul per head).

The A_xy matrices are built one of two ways:
  * factored (fast path): (x * exp(c_t)) @ (y * exp(-c_s))^T, i.e. relative to
    the chunk start. exp(-c_s) grows with the decay accumulated inside the
    chunk, so this path is taken only while every chunk's total log-decay is
    at most _FACTORED_MAX_LOGDECAY (exp factors below ~3.3e6, far from fp32
    limits, and every product term still carries full relative precision).
    The model feeds w <= -0.5, so its per-step log-decay is >= -exp(-0.5) and
    a 16-step chunk accumulates at most ~9.7: the model always gets this path.
  * pairwise (general path): exp(c_t - c_s) formed directly for s <= t (every
    exponent <= 0), at the cost of an (L, L, N) tensor per chunk. Used when a
    call has stronger decays than the bound above (arbitrary w).
Both are plain differentiable torch ops, so autograd works through them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rwkvlm.ops.wkv7.reference import _check_inputs, _check_state, _compute_dtype, _no_autocast

# Largest total log-decay inside one chunk for which the factored form is used.
_FACTORED_MAX_LOGDECAY = 15.0


# --------------------------------------------------------------------------------------------

def _to_chunks(x: torch.Tensor, B: int, T: int, H: int, N: int, L: int, pad: int, cd) -> torch.Tensor:
    """(B, T, C) -> chunk-major (NC, B, H, L, N) in the compute dtype, zero-padded at the end of time."""
    x = x.to(cd).view(B, T, H, N)  # (B, T, H, N)
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))  # (B, T + pad, H, N)
    NC = (T + pad) // L
    x = x.view(B, NC, L, H, N)  # (B, NC, L, H, N)
    return x.permute(1, 0, 3, 2, 4).contiguous()  # (NC, B, H, L, N)


def _intra_factored(r, k, a, b, c, cex, incl, strict):
    """A matrices via products relative to the chunk start (bounded decay only).

    All tensors (..., L, N); returns r~, a~ (..., L, N) and A_rk, A_rb, A_ak, A_ab (..., L, L).
    """
    e_neg = torch.exp(-c)     # (..., L, N), <= exp(_FACTORED_MAX_LOGDECAY)
    r_t = r * torch.exp(c)    # (..., L, N), factor <= 1
    a_t = a * torch.exp(cex)  # (..., L, N), factor <= 1
    L = r.shape[-2]
    left = torch.cat((r_t, a_t), dim=-2)                 # (..., 2L, N)
    right = torch.cat((k * e_neg, b * e_neg), dim=-2)    # (..., 2L, N)
    A = left @ right.transpose(-1, -2)                   # (..., 2L, 2L)
    zero = A.new_zeros(())
    A_rk = torch.where(incl, A[..., :L, :L], zero)       # (..., L, L)
    A_rb = torch.where(incl, A[..., :L, L:], zero)       # (..., L, L)
    A_ak = torch.where(strict, A[..., L:, :L], zero)     # (..., L, L)
    A_ab = torch.where(strict, A[..., L:, L:], zero)     # (..., L, L)
    return r_t, a_t, A_rk, A_rb, A_ak, A_ab


def _intra_pairwise(r, k, a, b, c, cex, incl, strict):
    """A matrices with exp(c_t - c_s) formed per pair: every exponent is <= 0."""
    neg_inf = c.new_full((), float("-inf"))
    d_in = c.unsqueeze(-2) - c.unsqueeze(-3)     # (..., L_t, L_s, N): c_t - c_s
    d_ex = cex.unsqueeze(-2) - c.unsqueeze(-3)   # (..., L_t, L_s, N): c_{t-1} - c_s
    D_in = torch.exp(torch.where(incl.unsqueeze(-1), d_in, neg_inf))    # (..., L, L, N)
    D_ex = torch.exp(torch.where(strict.unsqueeze(-1), d_ex, neg_inf))  # (..., L, L, N)
    Xr = r.unsqueeze(-2) * D_in                                         # (..., L, L, N)
    Xa = a.unsqueeze(-2) * D_ex                                         # (..., L, L, N)
    A_rk = (Xr * k.unsqueeze(-3)).sum(-1)  # (..., L, L)
    A_rb = (Xr * b.unsqueeze(-3)).sum(-1)  # (..., L, L)
    A_ak = (Xa * k.unsqueeze(-3)).sum(-1)  # (..., L, L)
    A_ab = (Xa * b.unsqueeze(-3)).sum(-1)  # (..., L, L)
    r_t = r * torch.exp(c)    # (..., L, N)
    a_t = a * torch.exp(cex)  # (..., L, N)
    return r_t, a_t, A_rk, A_rb, A_ak, A_ab


def _unit_lower_inverse(A: torch.Tensor) -> torch.Tensor:
    """(I - A)^{-1} for strictly lower-triangular A (nilpotent): (I+A)(I+A^2)(I+A^4)...

    Exact product form of the finite Neumann series; log2(L) batched matmuls.
    """
    L = A.shape[-1]
    eye = torch.eye(L, dtype=A.dtype, device=A.device)
    inv = eye + A  # (..., L, L)
    P = A
    n = 2
    while n < L:
        P = P @ P            # A^n
        inv = inv + inv @ P  # inv (I + A^n)
        n *= 2
    return inv


def wkv7_chunked(r, w, k, v, a, b, head_size: int, state=None, chunk_len: int = 16, mode: str = "auto"):
    """Chunked WKV7 in PyTorch, fp32 accumulation (fp64 for fp64 inputs).

    Any T (padded internally to a multiple of chunk_len). `mode` is "auto"
    (factored when the decay bound allows, else pairwise), "factored" or
    "pairwise" (the latter two for tests). Returns (y (B, T, C) in r's dtype,
    final state (B, H, N, N) in the compute dtype).
    """
    _check_inputs(r, w, k, v, a, b, head_size)
    if not 1 <= chunk_len <= 256:
        raise ValueError(f"wkv7_chunked: chunk_len={chunk_len} must be in 1..256")
    if mode not in ("auto", "factored", "pairwise"):
        raise ValueError(f"wkv7_chunked: unknown mode {mode!r}")
    B, T, C = r.shape
    N = head_size
    H = C // N
    _check_state(state, B, H, N)
    cd = _compute_dtype(r)
    dev = r.device
    if T == 0:
        S = torch.zeros(B, H, N, N, dtype=cd, device=dev) if state is None else state.to(cd)
        return r.new_zeros(B, 0, C), S
    L = min(chunk_len, T)
    pad = (-T) % L
    NC = (T + pad) // L

    with _no_autocast(dev):
        # chunk-major layout: every per-chunk quantity below is (NC, B, H, ...)
        rc, kc, vc, ac, bc = (_to_chunks(x, B, T, H, N, L, pad, cd) for x in (r, k, v, a, b))  # (NC, B, H, L, N)
        # log-decay <= 0; padded steps get 0 (decay 1) and zero k, v, a, b, so the state passes unchanged
        ld = _to_chunks(-torch.exp(w.to(cd)), B, T, H, N, L, pad, cd)  # (NC, B, H, L, N)
        c = torch.cumsum(ld, dim=-2)   # (NC, B, H, L, N): log-decay through step t (inclusive)
        cex = c - ld                   # (NC, B, H, L, N): through step t-1
        c_last = c[..., -1:, :]        # (NC, B, H, 1, N)

        incl = torch.ones(L, L, dtype=torch.bool, device=dev).tril()      # s <= t
        strict = torch.ones(L, L, dtype=torch.bool, device=dev).tril(-1)  # s < t
        use_factored = mode == "factored"
        if mode == "auto":
            use_factored = bool((-c_last.detach()).max() <= _FACTORED_MAX_LOGDECAY)
        intra = _intra_factored if use_factored else _intra_pairwise
        r_t, a_t, A_rk, A_rb, A_ak, A_ab = intra(rc, kc, ac, bc, c, cex, incl, strict)

        # U = P Z0 + Q with [P | Q] = (I - A_ab)^{-1} [a~ | A_ak V]
        PQ = _unit_lower_inverse(A_ab) @ torch.cat((a_t, A_ak @ vc), dim=-1)  # (NC, B, H, L, 2N)
        # Y = Rp Z0 + Y0 with Rp = r~ + A_rb P, Y0 = A_rk V + A_rb Q
        X_P, X_Q = torch.split(A_rb @ PQ, N, dim=-1)     # (NC, B, H, L, N) each (split: cheap backward)
        Rp = r_t + X_P                                   # (NC, B, H, L, N)
        Y0 = X_Q + A_rk @ vc                             # (NC, B, H, L, N)
        # Z' = diag(exp(c_last)) Z0 + G Z0 + H0 with G = B~^T P, H0 = K~^T V + B~^T Q
        e_end = torch.exp(c_last - c)                    # (NC, B, H, L, N), <= 1
        G, GH_Q = torch.split((bc * e_end).transpose(-1, -2) @ PQ, N, dim=-1)  # (NC, B, H, N, N) each
        E = torch.exp(c_last).reshape(NC, B * H, N, 1)   # (NC, B*H, Nk, 1): whole-chunk decay per key row
        H0 = torch.baddbmm(GH_Q.reshape(NC * B * H, N, N),
                           (kc * e_end).transpose(-1, -2).reshape(NC * B * H, N, L),
                           vc.reshape(NC * B * H, L, N))  # (NC*B*H, N, N)

        if state is None:
            Z = torch.zeros(B * H, N, N, dtype=cd, device=dev)  # (B*H, Nk, Nv)
        else:
            Z = state.to(cd).transpose(-1, -2).reshape(B * H, N, N)  # (B*H, Nk, Nv)
        Gs = G.reshape(NC, B * H, N, N).unbind(0)    # NC x (B*H, Nk, Nk)
        Hs = H0.view(NC, B * H, N, N).unbind(0)      # NC x (B*H, Nk, Nv)
        Es = E.unbind(0)                             # NC x (B*H, Nk, 1)
        starts = []
        for i in range(NC):
            starts.append(Z)
            Z = torch.baddbmm(torch.addcmul(Hs[i], Es[i], Z), Gs[i], Z)  # (B*H, Nk, Nv)
        Z0s = torch.stack(starts, dim=0).view(NC, B, H, N, N)  # (NC, B, H, Nk, Nv)
        Y = torch.baddbmm(Y0.reshape(NC * B * H, L, N), Rp.reshape(NC * B * H, L, N),
                          Z0s.view(NC * B * H, N, N)).view(NC, B, H, L, N)  # (NC, B, H, L, Nv)
        y = Y.permute(1, 0, 3, 2, 4).reshape(B, NC * L, C)  # (B, T + pad, C)
        if pad:
            y = y[:, :T].contiguous()  # (B, T, C)
        S_out = Z.view(B, H, N, N).transpose(-1, -2)  # (B, H, Nv, Nk)
    return y.to(r.dtype), S_out


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------

