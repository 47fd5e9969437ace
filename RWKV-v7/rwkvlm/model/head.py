"""The head and its loss: the output projection, and mean cross-entropy + L2Wrap fused with it.

Full-vocabulary logits are never held whole in training: the head's matmul and the loss run
together in row chunks (head_l2wrap_loss), and the loss's gradient is formed in forward.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from rwkvlm.model.layers import compile_once

__all__ = ["Head", "head_l2wrap_loss", "L2WRAP_FACTOR"]

L2WRAP_FACTOR = 1e-4


class Head(nn.Linear):
    """The output projection (state-dict name `head.weight`, no bias).

    Called with targets it returns the fused cross-entropy + L2Wrap loss
    instead of logits, so that full-vocabulary logits are never held whole.
    Going through forward() (rather than reading head.weight from outside)
    also lets DeepSpeed ZeRO-3 gather the partitioned weight first.
    """

    compiled = False  # set by RWKV7.compile_blocks: the per-chunk softmax work runs fused

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return super().forward(x)
        return head_l2wrap_loss(x, self.weight, targets, compiled=self.compiled)


def _default_chunk_rows(vocab: int, device_type: str = "cpu") -> int:
    """Rows per chunk: logits of about 2^25 elements per chunk on CPU (128 MiB in fp32), 2^27
    on a GPU (2,048 rows of the World vocabulary: its bf16 logits and their gradient take
    512 MiB; a whole M_BSZ 1 sample in one chunk took twice that)."""
    budget = (1 << 27) if device_type == "cuda" else (1 << 25)
    return max(1, budget // max(1, vocab))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16, fp64 for fp64: the dtype of softmax statistics."""
    return torch.promote_types(dtype, torch.float32)


_SCRATCH: dict = {}


def _scratch(role: str, shape, dtype, device) -> torch.Tensor:
    """A reusable CPU work buffer (fresh large allocations page-fault on every step);
    elsewhere a plain torch.empty."""
    device = torch.device(device)
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    t = _SCRATCH.get(role)
    if t is None or t.shape != torch.Size(shape) or t.dtype != dtype:
        _SCRATCH.pop(role, None)
        t = torch.empty(shape, dtype=dtype, device=device)
        _SCRATCH[role] = t
    return t


def _softmax_into(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Row softmax of src (n, V) written into dst: one fused pass per row."""
    try:
        return torch._softmax(src, 1, False, out=dst)
    except (AttributeError, RuntimeError, TypeError):
        return dst.copy_(torch.softmax(src, dim=1))


def _ce_chunk_grad(logits, tgt):
    """For logits (n, V) and targets (n,): per-row CE (fp32) and M * dloss/dlogits with the
    L2Wrap term (softmax - onehot(target) + 1e-4 * max_logit at the arg-max), in logits' dtype.
    The fused form of _HeadCE's per-chunk work (one kernel or two under torch.compile)."""
    lg = logits.to(_acc_dtype(logits.dtype))                # (n, V) fp32 (fp64 for fp64)
    m, am = lg.max(dim=1, keepdim=True)                     # (n, 1)
    e = torch.exp(lg - m)                                   # (n, V)
    s = e.sum(dim=1, keepdim=True)                          # (n, 1)
    loss = (m + torch.log(s) - lg.gather(1, tgt.unsqueeze(1))).squeeze(1)  # (n,) logsumexp - target
    col = torch.arange(lg.shape[1], device=lg.device)      # (V,)
    g = e / s - (col == tgt.unsqueeze(1)).to(lg.dtype) + (col == am).to(lg.dtype) * (L2WRAP_FACTOR * m)
    return loss, g.to(logits.dtype)


class _HeadCE(torch.autograd.Function):
    """Fused head matmul + mean CE + L2Wrap over row chunks.

    The loss is a scalar, so its gradient with respect to the logits is known in
    forward up to the incoming scale: each chunk's logits are computed, turned into
    M * dloss/dlogits = softmax - onehot + 1e-4 * max_logit at the arg-max, and
    consumed right away (grad_x = G W / M, grad_W += G^T x). Backward only scales
    by the incoming gradient. Three matmuls of the head's size in all, as with
    autograd, but never more than one logits chunk (plus its softmax) in memory.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_rows, compiled=False):
        M, C = x.shape
        V = weight.shape[0]
        dev = x.device
        cdt = x.dtype
        acc = _acc_dtype(cdt)
        Wc = weight if weight.dtype == cdt else weight.to(cdt)
        need_gx, need_gw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx = torch.empty_like(x) if need_gx else None
        gw = torch.zeros(V, C, dtype=acc, device=dev) if need_gw else None
        R = min(chunk_rows, M)
        logits_buf = _scratch("head_logits", (R, V), cdt, dev)
        prob_buf = None if compiled else _scratch("head_probs", (R, V), acc, dev)  # the compiled form makes its own
        rows_all = torch.arange(R, device=dev)
        total = torch.zeros((), dtype=torch.float64, device=dev)
        underflow = []  # (chunk start, rows whose target probability underflowed): fixed after the loop
        with torch.no_grad():
            for i in range(0, M, R):
                xc = x[i:i + R]
                n = xc.shape[0]
                rows = rows_all[:n]
                tgt = targets[i:i + R]
                lg = torch.mm(xc, Wc.t(), out=logits_buf[:n])  # (n, V)
                if compiled:  # the fused form: no fp32 copy of the chunk, no underflow case
                    loss_rows, gc = compile_once(_ce_chunk_grad)(lg, tgt)  # (n,), (n, V) in cdt
                    total += loss_rows.sum(dtype=torch.float64)
                else:
                    if cdt != acc:
                        lg = lg.to(acc)                         # (n, V) fp32
                    m, am = lg.max(dim=1)                       # (n,)
                    p = _softmax_into(lg, prob_buf[:n])         # (n, V)
                    pt = p[rows, tgt]                           # (n,)
                    tiny = pt < 1e-30                           # p_t underflows: -log(p_t) is inexact
                    total += torch.where(tiny, 0.0, -torch.log(pt)).sum(dtype=torch.float64)
                    underflow.append((i, tiny))                 # no host sync inside the loop
                    if need_gx or need_gw:
                        p[rows, tgt] -= 1.0
                        p[rows, am] += L2WRAP_FACTOR * m        # M * (dCE/dlogits + L2Wrap)
                        gc = p if cdt == acc else p.to(cdt)
                if need_gx:
                    torch.mm(gc, Wc, out=gx[i:i + n])           # (n, C)
                if need_gw:
                    if gc.dtype == acc:
                        gw.addmm_(gc.t(), xc)                   # (V, C)
                    else:
                        gw.add_(gc.t() @ xc)
            # rows whose target probability underflowed (loss > 69): exact logsumexp - logit,
            # recomputed for those rows only; one host sync per call, not one per chunk
            if underflow and bool(torch.stack([t.any() for _, t in underflow]).any()):
                for i, tiny in underflow:
                    idx = tiny.nonzero().squeeze(1)
                    if idx.numel():
                        lg = (x[i + idx] @ Wc.t()).to(acc)     # (k, V)
                        total += (torch.logsumexp(lg, dim=1)
                                  - lg.gather(1, targets[i + idx].unsqueeze(1)).squeeze(1)).sum(dtype=torch.float64)
        ctx.gx, ctx.gw, ctx.M = gx, gw, M
        ctx.w_dtype = weight.dtype
        return (total / M).to(acc)

    @staticmethod
    def backward(ctx, g):
        gx, gw = ctx.gx, ctx.gw
        if gx is None and gw is None and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            raise RuntimeError("the fused head loss supports one backward pass per forward")
        ctx.gx = ctx.gw = None  # scaled in place below: release them
        scale = g / ctx.M
        if gx is not None:
            gx = gx.mul_(scale.to(gx.dtype))
        if gw is not None:
            gw = gw.mul_(scale.to(gw.dtype)).to(ctx.w_dtype)
        return gx, gw, None, None, None


def head_l2wrap_loss(hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor,
                     chunk_rows: int | None = None, compiled: bool = False) -> torch.Tensor:
    """Mean CE of (hidden @ head_weight^T) against targets, plus the L2Wrap gradient, fused.

    hidden: (B, T, C); head_weight: (V, C); targets: (B, T). Under autocast the
    matmuls run in the autocast dtype; softmax statistics are always fp32. With `compiled`
    each chunk's softmax work runs through torch.compile (one fused pass over the logits).
    """
    B, T, C = hidden.shape
    V = head_weight.shape[0]
    if targets.shape != (B, T):
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match hidden {(B, T)}")
    dev_type = hidden.device.type
    if dev_type in ("cuda", "cpu") and torch.is_autocast_enabled(dev_type):
        hidden = hidden.to(torch.get_autocast_dtype(dev_type))
    R = chunk_rows or _default_chunk_rows(V, dev_type)
    no_autocast = dev_type in ("cuda", "cpu")
    with torch.autocast(device_type=dev_type, enabled=False) if no_autocast else contextlib.nullcontext():
        # (B*T, C), (V, C), (B*T,)
        return _HeadCE.apply(hidden.reshape(B * T, C), head_weight, targets.reshape(-1).long(), R, compiled)
