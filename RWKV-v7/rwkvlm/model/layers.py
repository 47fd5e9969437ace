"""What the model's blocks are built from: parameter tuples, the functional layers, init helpers,
and the compiled-function cache.

Each functional layer takes either a parameter tuple of plain tensors (the compiled path) or the
nn.Module holding them (the eager path, where the module's forward calls the function back with its
own parameters: see rwkvlm/model/rwkv7.py, "The block").
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from rwkvlm.errors import UserError, is_out_of_memory

__all__ = ["Norm", "HeadGroupNorm", "shift", "linear", "layer_norm", "group_norm", "param_tuple",
           "orthogonal_", "orthogonal_spec_", "put", "filled", "zeros", "run_steps", "zero_linear", "compile_once"]


# ============================================================================================
# Init helpers
# ============================================================================================

def orthogonal_(p: torch.Tensor, gain: float) -> None:
    """torch's orthogonal init with exactly `gain` (drawn in fp32, copied in p's dtype).

    An fp32 p is drawn into directly (the same values as through an fp32 copy, without the
    copy's memory). On the CPU the values also depend on the number of threads (the QR
    factorisation's blocking); on a GPU they are the GPU's own (another generator and QR)."""
    if p.dtype == torch.float32 and p.is_contiguous():
        nn.init.orthogonal_(p, gain=gain)
        return
    t = torch.empty(p.shape, dtype=torch.float32, device=p.device)
    nn.init.orthogonal_(t, gain=gain)
    p.copy_(t)


def orthogonal_spec_(p: torch.Tensor, g: float) -> None:
    """The spec's "orthogonal, gain g": gain g * sqrt(rows/cols) when rows > cols, else g."""
    rows, cols = p.shape
    orthogonal_(p, g * math.sqrt(rows / cols) if rows > cols else g)


# The init as steps: a fill sets one tensor in place, given only that tensor (a parameter of the
# model, or a fresh tensor of its shape: rwkvlm.model.lm.RWKVLM.init_steps).

def put(values: torch.Tensor):
    """The fill that copies `values` (a CPU tensor of as many elements, e.g. (C,) float64) into
    the tensor in its shape and dtype."""
    return lambda t: t.copy_(values.reshape(t.shape).to(t.dtype))


def filled(value: float):
    """The fill that sets every element to `value`."""
    return lambda t: t.fill_(value)


def zeros(t: torch.Tensor) -> torch.Tensor:
    """The fill of zeros."""
    return t.zero_()


@torch.no_grad()
def run_steps(module: nn.Module, steps) -> None:
    """Run [(name, fill)] on `module`'s parameters of those names (nothing on the meta device)."""
    params = dict(module.named_parameters())
    for name, fill in steps:
        p = params[name]
        if not p.is_meta:
            fill(p)


def zero_linear(n_in: int, n_out: int) -> nn.Linear:
    """A linear layer of zeros (no bias), on the default device (torch.device("meta") builds
    a model without memory: rwkvlm.model.lm)."""
    lin = nn.utils.skip_init(nn.Linear, n_in, n_out, bias=False, device=torch.get_default_device())
    with torch.no_grad():
        lin.weight.zero_()
    return lin


# ============================================================================================
# Functional layers: each takes a parameter tuple of plain tensors or the module holding them
# ============================================================================================

class Norm(NamedTuple):
    """A layer norm's (or ln_x's) parameters."""
    weight: torch.Tensor  # (C,)
    bias: torch.Tensor    # (C,)
    eps: float


def shift(x: torch.Tensor, x_prev: torch.Tensor | None) -> torch.Tensor:
    """shift(x)[t] = x[t-1]; shift(x)[0] = x_prev (zeros when None). x: (B, T, C), x_prev: (B, C)."""
    if x_prev is None:
        return F.pad(x, (0, 0, 1, -1))  # (B, T, C)
    return torch.cat((x_prev.unsqueeze(1).to(x.dtype), x[:, :-1]), dim=1)  # (B, T, C)


def linear(x: torch.Tensor, w) -> torch.Tensor:
    """x @ w^T for a weight w (no bias), or w(x) for the nn.Linear itself."""
    return w(x) if isinstance(w, nn.Module) else F.linear(x, w)


def layer_norm(x: torch.Tensor, p) -> torch.Tensor:
    """LayerNorm over the last dimension. x: (B, T, C)."""
    if isinstance(p, nn.Module):
        return p(x)
    return F.layer_norm(x, (x.shape[-1],), p.weight, p.bias, p.eps)  # (B, T, C)


def group_norm(y: torch.Tensor, p, head_size: int) -> torch.Tensor:
    """ln_x: GroupNorm with one group per head over y (B, T, C), computed in fp32, returned
    in y's dtype."""
    if isinstance(p, nn.Module):
        return p(y)
    B, T, C = y.shape
    N = head_size
    yh = y.float().view(B, T, C // N, N)  # (B, T, H, N)
    var, mean = torch.var_mean(yh, dim=-1, unbiased=False, keepdim=True)  # (B, T, H, 1)
    yn = ((yh - mean) * torch.rsqrt(var + p.eps)).view(B, T, C)  # (B, T, H, N) -> (B, T, C)
    return (yn * p.weight.float() + p.bias.float()).to(y.dtype)


def param_tuple(module: nn.Module, cls, as_modules: bool):
    """A parameter object of type cls (a NamedTuple above), filled from module's attributes
    of the same names: a parameter of C values as a (C,) view, a matrix as it is; a
    sub-module as the module itself with as_modules (eager: see "The block"), otherwise
    as its tensors (a linear layer's weight, a norm's Norm, TimeMix/ChannelMix's params())."""
    def get(name):
        obj = getattr(module, name, None)  # None: ln0 outside layer 0
        if isinstance(obj, nn.Parameter):
            # (1, 1, C) or (H, N) -> (C,): torch 2.11's compiled backward can return a vector
            # parameter's gradient as (C,); the view's backward reshapes it
            return obj.view(-1) if obj.numel() == module.cfg.n_embd else obj
        if obj is None or as_modules:
            return obj
        if isinstance(obj, nn.Linear):
            return obj.weight
        if isinstance(obj, (nn.LayerNorm, HeadGroupNorm)):
            return Norm(obj.weight, obj.bias, obj.eps)
        return obj.params()

    return cls(*(get(name) for name in cls._fields))


class HeadGroupNorm(nn.Module):
    """ln_x: the spec's GroupNorm(H, C) with one group per head, over (B, T, C) inputs
    (state-dict names weight and bias, as nn.GroupNorm)."""

    def __init__(self, n_embd: int, head_size: int, eps: float = 64e-5):
        super().__init__()
        self.head_size, self.eps = head_size, eps
        self.weight = nn.Parameter(torch.ones(n_embd))
        self.bias = nn.Parameter(torch.zeros(n_embd))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return group_norm(y, Norm(self.weight, self.bias, self.eps), self.head_size)


_COMPILED: dict = {}


def compile_once(fn):
    """fn under torch.compile, compiled once per function and shared by every layer.

    A compiler failure (no C compiler or Triton, an unsupported GPU, ...) becomes a
    UserError that names the flag turning compilation off.
    """
    c = _COMPILED.get(fn)
    if c is None:
        compiled = torch.compile(fn, dynamic=False)

        def call(*args):
            try:
                return compiled(*args)
            except Exception as e:
                if not _is_compiler_error(e) or is_out_of_memory(e):  # memory: the trainer's message
                    raise
                first = (str(e).strip().splitlines() or [""])[0][:300]
                raise UserError(
                    f"torch.compile could not compile the model's pointwise work ({fn.__name__}: "
                    f"{type(e).__name__}: {first}). Train without it: add --compile 0 to the run "
                    f"script's command line.") from e

        c = _COMPILED[fn] = call
    return c


def _is_compiler_error(e: Exception) -> bool:
    import torch._dynamo.exc

    if isinstance(e, torch._dynamo.exc.TorchDynamoException):
        return True
    return type(e).__module__.startswith(("torch._inductor", "triton"))
