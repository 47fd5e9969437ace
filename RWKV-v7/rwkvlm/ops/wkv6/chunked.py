"""The chunked PyTorch path of WKV6 (CPU, and GPU without the kernel).

Same contract as reference.py (argument order r, k, v, w, u; the [value, key] state layout;
fp32 state).

`wkv6_chunked` cuts T into chunks of `chunk_len` steps (rwkvlm.recipe.WKV_CHUNK_LEN by
default). Inside a chunk, with l_t = -exp(w_t) the log-decay of step t, c_t the cumulative
log-decay through step t (inclusive) and c_{t-1} the one through step t-1, the pair (t, s)
with s < t carries the factor exp(c_{t-1} - c_s) <= 1 per key channel. Write Z = S^T
([key, value]); for one chunk starting from Z0:

    A[t, s] = sum_j r_t[j] k_s[j] exp(c_{t-1}[j] - c_s[j])      (s < t; 0 above the diagonal)
    A[t, t] = sum_j r_t[j] u[j] k_t[j]                          (the bonus of the current token)
    Y  = (r * exp(c_{t-1})) Z0 + A V                            outputs of the chunk
    Z' = diag(exp(c_last)) Z0 + (k * exp(c_last - c))^T V       state at the chunk end
                                                                (c_last - c_s summed from the end)

Every factor outside A is <= 1. Everything that does not depend on Z0 is computed for all
chunks at once with batched matmuls; the Python loop runs once per chunk and only does
Z' = E * Z0 + H0 (an elementwise update per head).

A is built one of two ways, chosen per chunk and head:
  * factored (fast): (r_t exp(c_{t-1})) @ (k_s exp(-c_s))^T, products relative to the chunk
    start. Every product keeps full relative precision in fp32; the only risk is the range
    of exp(-c_s), so a chunk uses this form while its total log-decay is at most
    _FACTORED_MAX_LOGDECAY (factors below e^40 ~ 2e17, far from the fp32 limit). The x060
    model's initial decays (w = time_decay + LoRA, time_decay in [-6, -1]) give at most
    16 * e^-1 ~ 6 per chunk.
  * pairwise (general): exp(l_{s+1} + ... + l_{t-1}) formed per pair (every exponent <= 0,
    summed over the pair's own steps for full precision), at the cost of an (L, L, N) tensor
    for each such chunk. Chunks with stronger decays (trained models have some channels
    with w > 1) take this form; the rest of the call stays factored.
Both are plain differentiable torch ops, so autograd works through everything, the initial
state and u included.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rwkvlm.ops.wkv6.reference import _check_inputs, _check_state, _compute_dtype, _no_autocast
from rwkvlm.recipe import WKV_CHUNK_LEN

# Largest total log-decay inside one chunk for which the factored form of A is used.
_FACTORED_MAX_LOGDECAY = 40.0


def _to_chunks(x: torch.Tensor, B: int, T: int, H: int, N: int, L: int, pad: int, cd) -> torch.Tensor:
    """(B, T, C) -> chunk-major (NC, B, H, L, N) in the compute dtype, zero-padded at the end of time."""
    x = x.to(cd).view(B, T, H, N)  # (B, T, H, N)
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))  # (B, T + pad, H, N)
    NC = (T + pad) // L
    x = x.view(B, NC, L, H, N)  # (B, NC, L, H, N)
    return x.permute(1, 0, 3, 2, 4).contiguous()  # (NC, B, H, L, N)


def _intra_factored(r, k, c, cex, strict):
    """Strictly lower A from products relative to the chunk start (bounded decay only).

    r, k, c, cex: (..., L, N); returns (..., L, L).
    """
    A = (r * torch.exp(cex)) @ (k * torch.exp(-c)).transpose(-1, -2)  # (..., L, L)
    return torch.where(strict, A, A.new_zeros(()))


def _intra_pairwise(r, k, ld, strict):
    """Strictly lower A with exp(l_{s+1} + ... + l_{t-1}) formed per pair: every exponent is <= 0.

    The exponent is summed over the pair's own steps (a masked matmul), not taken as the
    difference of two cumulative sums, which would lose its precision when the sums are large.
    """
    L = ld.shape[-2]
    idx = torch.arange(L, device=ld.device)
    between = (idx.view(1, L, 1) < idx.view(1, 1, L)) & (idx.view(1, 1, L) < idx.view(L, 1, 1))  # (L_t, L_s, L_m)
    d = torch.einsum("tsm,...mn->...tsn", between.to(ld.dtype), ld)  # (..., L_t, L_s, N)
    D = torch.exp(torch.where(strict.unsqueeze(-1), d, d.new_full((), float("-inf"))))  # (..., L, L, N)
    return ((r.unsqueeze(-2) * D) * k.unsqueeze(-3)).sum(-1)  # (..., L, L)


def wkv6_chunked(r, k, v, w, u, head_size: int, state=None, chunk_len: int = WKV_CHUNK_LEN,
                 mode: str = "auto"):
    """Chunked WKV6 in PyTorch, fp32 accumulation (fp64 for fp64 inputs).

    r, k, v, w: (B, T, C); u: (H, N) or (C,); state: (B, H, N, N) [value, key] or None (zero).
    Any T (padded internally to a multiple of chunk_len). `mode` is "auto" (factored A where
    a chunk's decay allows, pairwise elsewhere), "factored" or "pairwise" (every chunk one
    way: for tests; "factored" is only exact within the decay bound). Returns (y (B, T, C) in
    r's dtype, final state (B, H, N, N) in the compute dtype).
    """
    _check_inputs(r, k, v, w, u, head_size)
    if not 1 <= chunk_len <= 256:
        raise ValueError(f"wkv6_chunked: chunk_len={chunk_len} must be in 1..256")
    if mode not in ("auto", "factored", "pairwise"):
        raise ValueError(f"wkv6_chunked: unknown mode {mode!r}")
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
        rc, kc, vc = (_to_chunks(x, B, T, H, N, L, pad, cd) for x in (r, k, v))  # (NC, B, H, L, N)
        uu = u.to(cd).reshape(1, 1, H, 1, N)  # (1, 1, H, 1, N)
        # log-decay <= 0; padded steps get 0 (decay 1) and zero r, k, v, so the state passes unchanged
        ld = _to_chunks(-torch.exp(w.to(cd)), B, T, H, N, L, pad, cd)  # (NC, B, H, L, N)
        c = torch.cumsum(ld, dim=-2)   # (NC, B, H, L, N): log-decay through step t (inclusive)
        cex = F.pad(c[..., :-1, :], (0, 0, 1, 0))  # (NC, B, H, L, N): through step t-1 (a shifted copy)
        c_last = c[..., -1:, :]        # (NC, B, H, 1, N)
        # log-decay after step s to the chunk end, summed from the end (exact for the late steps)
        tail = F.pad(torch.flip(torch.cumsum(torch.flip(ld[..., 1:, :], [-2]), -2), [-2]), (0, 0, 0, 1))  # (NC, B, H, L, N)

        strict = torch.ones(L, L, dtype=torch.bool, device=dev).tril(-1)  # s < t
        if mode == "pairwise":
            A = _intra_pairwise(rc, kc, ld, strict)  # (NC, B, H, L, L)
        else:
            strong = None
            if mode == "auto":
                strong = (-c_last.detach()).amax(dim=(-2, -1)) > _FACTORED_MAX_LOGDECAY  # (NC, B, H)
                if not bool(strong.any()):
                    strong = None
            if strong is None:
                A = _intra_factored(rc, kc, c, cex, strict)  # (NC, B, H, L, L)
            else:
                # factored everywhere on exponents made harmless in the strong chunks, then the
                # strong chunks' A replaced by the pairwise form (index_copy: differentiable)
                keep = strong[..., None, None]  # (NC, B, H, 1, 1)
                A = _intra_factored(rc, kc, c.masked_fill(keep, 0.0), cex.masked_fill(keep, 0.0), strict)
                sel = strong.reshape(-1).nonzero().squeeze(1)  # (M,)
                pick = [x.reshape(NC * B * H, L, N).index_select(0, sel) for x in (rc, kc, ld)]  # (M, L, N)
                A = A.reshape(NC * B * H, L, L).index_copy(0, sel, _intra_pairwise(*pick, strict))
                A = A.view(NC, B, H, L, L)  # (NC, B, H, L, L)

        bonus = (rc * uu * kc).sum(-1, keepdim=True)         # (NC, B, H, L, 1): A's diagonal
        Y0 = A @ vc + bonus * vc                             # (NC, B, H, L, N)
        r_dec = rc * torch.exp(cex)                          # (NC, B, H, L, N), factor <= 1
        k_dec = kc * torch.exp(tail)                         # (NC, B, H, L, N), factor <= 1
        H0 = k_dec.transpose(-1, -2) @ vc                    # (NC, B, H, Nk, Nv)
        E = torch.exp(c_last).transpose(-1, -2)              # (NC, B, H, Nk, 1): whole-chunk decay per key

        if state is None:
            Z = torch.zeros(B, H, N, N, dtype=cd, device=dev)  # (B, H, Nk, Nv)
        else:
            Z = state.to(cd).transpose(-1, -2)  # (B, H, Nk, Nv)
        Hs, Es = H0.unbind(0), E.unbind(0)  # NC x (B, H, Nk, Nv), NC x (B, H, Nk, 1)
        starts = []
        for i in range(NC):
            starts.append(Z)
            Z = torch.addcmul(Hs[i], Es[i], Z)  # (B, H, Nk, Nv)
        Z0s = torch.stack(starts, dim=0)  # (NC, B, H, Nk, Nv)
        Y = Y0 + r_dec @ Z0s  # (NC, B, H, L, Nv)
        y = Y.permute(1, 0, 3, 2, 4).reshape(B, NC * L, C)  # (B, T + pad, C)
        if pad:
            y = y[:, :T].contiguous()  # (B, T, C)
        S_out = Z.transpose(-1, -2)  # (B, H, Nv, Nk)
    return y.to(r.dtype), S_out
