"""The plain loss the tests compare the model's fused head loss against: mean cross-entropy
plus L2Wrap (RWKV-v7/docs/rwkv7-x070.md, "Loss"), written with autograd on whole logits."""
import torch
import torch.nn.functional as F

L2WRAP_FACTOR = 1e-4  # the spec's


class L2Wrap(torch.autograd.Function):
    """loss' = L2Wrap.apply(loss, logits): forward returns loss unchanged; backward adds
    1e-4 / (B*T) * max_logit to the arg-max logit's gradient at every position (scaled
    by the incoming gradient). logits: (..., V); B*T = number of positions."""

    @staticmethod
    def forward(ctx, loss, logits):
        maxx, ids = logits.detach().max(dim=-1, keepdim=True)  # (..., 1)
        ctx.save_for_backward(maxx, ids)
        ctx.logits_shape = logits.shape
        ctx.logits_dtype = logits.dtype
        ctx.n_pos = max(1, logits.numel() // logits.shape[-1])
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        maxx, ids = ctx.saved_tensors
        acc = torch.promote_types(maxx.dtype, torch.float32)
        gy = torch.zeros(ctx.logits_shape, dtype=ctx.logits_dtype, device=maxx.device)
        gy.scatter_(-1, ids, (maxx.to(acc) * (L2WRAP_FACTOR / ctx.n_pos) * grad_output).to(gy.dtype))
        return grad_output, gy


def l2wrap_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean CE of logits (B, T, V) against targets (B, T), plus the L2Wrap gradient."""
    V = logits.shape[-1]
    ce = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))  # (B*T, V), (B*T,)
    return L2Wrap.apply(ce, logits)
