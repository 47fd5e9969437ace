"""The RWKV-7 "x070" model: configuration, modules, initialisation and loss.

State-dict names and shapes are the checkpoint format of the spec,
RWKV-v7/docs/rwkv7-x070.md (no wrapper prefixes); the forward pass
follows the `rwkv` package's x070 inference code, so a state dict saved from
RWKV7 loads there unchanged.

Typical use:
    cfg = ModelConfig(n_layer=12, n_embd=768)
    model = RWKV7(cfg)
    model.init_weights()                 # or model.load_state_dict(torch.load(...))
    loss = model.loss(idx, targets)      # mean CE + L2Wrap gradient
    logits, state = model.forward_rnn(idx)            # inference, carried state
    logits, state = model.forward_rnn(next_idx, state)

A freshly constructed RWKV7 holds the spec's deterministic table values and
zero matrices (no random draws); call init_weights() for a fresh model.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rwkvlm.errors import UserError
from rwkvlm.ops.wkv7 import wkv7
from rwkvlm.ops.wkv7.cuda import wkv7_op

__all__ = ["ModelConfig", "RWKV7", "count_params", "head_l2wrap_loss", "state_dict_shapes"]

L2WRAP_FACTOR = 1e-4


# ============================================================================================
# Configuration
# ============================================================================================

def _lora_dim(n_embd: int, factor: float) -> int:
    """max(32, round(factor * sqrt(C) / 32) * 32)."""
    return max(32, int(round(factor * math.sqrt(n_embd) / 32)) * 32)


LORA_NAMES = ("w", "a", "v", "g")  # decay, in-context learning rate ("aaa"), value residual ("mv"), gate
LORA_FACTORS = {"w": 2.5, "a": 2.5, "v": 1.7, "g": 5.0}  # the formula's factor of each (_lora_dim)


@dataclass
class ModelConfig:
    """The model's shapes. The LoRA sizes default to the formula (_lora_dim); released files (and
    any checkpoint: from_state_dict) may carry others, given as lora_w / lora_a / lora_v / lora_g.
    layer0_v False: layer 0 holds no att.v0/v1/v2 (it never uses them), the layout of the released
    files; True (the default, as rwkv-init.pth): it holds them, unused."""
    n_layer: int
    n_embd: int
    vocab_size: int = 65536
    head_size: int = 64
    grad_cp: bool = False
    wkv_impl: str = "auto"  # "auto" (CUDA kernel on GPU), "cuda" or "torch" (the PyTorch path)
    lora_w: int | None = None  # None: the formula
    lora_a: int | None = None
    lora_v: int | None = None
    lora_g: int | None = None
    layer0_v: bool = True

    def __post_init__(self):
        if self.wkv_impl not in ("auto", "cuda", "torch"):
            raise UserError(f"--wkv_impl must be auto, cuda or torch; got {self.wkv_impl!r}.")
        for flag, value in (("--n_layer", self.n_layer), ("--n_embd", self.n_embd),
                            ("--vocab_size", self.vocab_size), ("--head_size", self.head_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"{flag} must be a positive integer; got {value!r}.")
        for name in LORA_NAMES:
            value = getattr(self, f"lora_{name}")
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise UserError(f"the {name} LoRA size (--lora_dims) must be a positive integer; got {value!r}.")
        if self.n_embd % 64 != 0:
            raise UserError(
                f"--n_embd {self.n_embd} is not a multiple of 64; RWKV-7 needs n_embd to be a multiple "
                f"of 64 (e.g. {max(64, self.n_embd // 64 * 64)} or {(self.n_embd // 64 + 1) * 64}). "
                f"Change --n_embd.")
        if self.n_embd % self.head_size != 0:
            raise UserError(
                f"--n_embd {self.n_embd} is not a multiple of --head_size {self.head_size}; the channels "
                f"are split into n_embd / head_size heads. Use --head_size 64 (the standard) or an "
                f"--n_embd divisible by {self.head_size}.")

    # derived dimensions
    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    @property
    def dim_att(self) -> int:
        return self.n_embd

    @property
    def dim_ffn(self) -> int:
        return 4 * self.n_embd

    @property
    def d_decay_lora(self) -> int:  # Dw
        return self.lora_w or self._formula("w")

    @property
    def d_aaa_lora(self) -> int:  # Da
        return self.lora_a or self._formula("a")

    @property
    def d_mv_lora(self) -> int:  # Dv
        return self.lora_v or self._formula("v")

    @property
    def d_gate_lora(self) -> int:  # Dg
        return self.lora_g or self._formula("g")

    @property
    def lora_sizes(self) -> tuple[int, int, int, int]:
        """(Dw, Da, Dv, Dg)."""
        return self.d_decay_lora, self.d_aaa_lora, self.d_mv_lora, self.d_gate_lora

    def _formula(self, name: str) -> int:
        return _lora_dim(self.n_embd, LORA_FACTORS[name])

    @property
    def formula_lora_sizes(self) -> tuple[int, int, int, int]:
        """What the formula gives for this n_embd."""
        return tuple(self._formula(name) for name in LORA_NAMES)

    @property
    def lora_is_formula(self) -> bool:
        return self.lora_sizes == self.formula_lora_sizes

    def describe(self) -> str:
        """'L24-D1024, LoRA w/a/v/g 64/64/32/160' (and the head size and vocabulary when unusual)."""
        out = f"L{self.n_layer}-D{self.n_embd}, LoRA w/a/v/g {'/'.join(map(str, self.lora_sizes))}"
        if self.head_size != 64:
            out += f", head size {self.head_size}"
        return out

    @classmethod
    def from_state_dict(cls, sd: dict, path=None, **kw) -> "ModelConfig":
        """The config of an x070 state dict, read off its shapes (see _config_from_state_dict);
        UserError (naming the key, the shape found and what was expected) for anything else.
        `kw`: grad_cp / wkv_impl."""
        return _config_from_state_dict(sd, path, kw)


def _shape(t) -> tuple:
    return tuple(t.shape)


def _config_from_state_dict(sd: dict, path, kw: dict) -> ModelConfig:
    """n_layer from the blocks.N keys, vocab_size and n_embd from emb.weight (V, C) (head.weight must
    be the same), head_size from blocks.0.att.r_k (H, N), each LoRA size from its x1 (C, D) / x2 (D, C)
    pair, layer0_v from whether blocks.0.att.v0/v1/v2 are there; then every name and shape is checked
    against the model that config builds (so every block has the same shapes)."""
    import re

    where = f"{path}" if path is not None else "the state dict"
    expect = ("expected an RWKV-7 (x070) state dict: emb.weight (V, C), blocks.N.att.* / blocks.N.ffn.*, "
              "ln_out, head.weight (V, C), as rwkv-*.pth files and the released RWKV-7 .pth files hold")
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{where} is not an x070 state dict (it holds {type(sd).__name__} "
                        f"{'with non-tensor values' if isinstance(sd, dict) and sd else ''}); {expect}.")
    keys = list(sd)
    emb = sd.get("emb.weight")
    if emb is None:
        prefixed = [k for k in keys if k.endswith(".emb.weight")]
        hint = (f" Its keys carry a prefix ({prefixed[0][:-len('emb.weight')]!r}): strip it from every key."
                if prefixed else "")
        raise UserError(f"{where} is not an x070 state dict: it has no emb.weight (its first keys: "
                        f"{', '.join(keys[:4])}); {expect}.{hint}")
    if any(".att.time_" in k or k.endswith("att.time_decay") for k in keys) or "blocks.0.att.r_k" not in sd:
        old = [k for k in keys if ".att.time_" in k][:1]
        raise UserError(f"{where} is not an x070 state dict: it has no blocks.0.att.r_k"
                        + (f" and holds {old[0]} (an RWKV-4/5/6 name)" if old else "")
                        + f"; {expect}. This trainer loads RWKV-7 (x070) checkpoints only.")
    if emb.dim() != 2:
        raise UserError(f"{where}: emb.weight has shape {_shape(emb)}; expected (vocab_size, n_embd).")
    V, C = (int(x) for x in emb.shape)
    head = sd.get("head.weight")
    if head is None or _shape(head) != (V, C):
        found = "is missing" if head is None else f"has shape {_shape(head)}"
        raise UserError(f"{where}: head.weight {found}; with emb.weight {(V, C)} it must be {(V, C)} "
                        f"(vocab_size {V}, n_embd {C}).")
    if C % 64 != 0:
        raise UserError(f"{where}: emb.weight has shape {(V, C)}: n_embd {C} is not a multiple of 64, which "
                        f"RWKV-7 needs; expected an x070 checkpoint.")
    layers = sorted({int(m.group(1)) for k in keys if (m := re.match(r"blocks\.(\d+)\.", k))})
    if layers != list(range(len(layers))):
        gap = next(i for i in range(len(layers) + 1) if i not in layers)
        raise UserError(f"{where}: the blocks are not numbered 0..{layers[-1]}: no blocks.{gap}.* keys "
                        f"(found blocks {layers[:8]}{' ...' if len(layers) > 8 else ''}); expected every "
                        f"layer from 0 on.")
    L = len(layers)
    r_k = sd["blocks.0.att.r_k"]
    if r_k.dim() != 2 or r_k.shape[0] * r_k.shape[1] != C:
        raise UserError(f"{where}: blocks.0.att.r_k has shape {_shape(r_k)}; expected (n_head, head_size) with "
                        f"n_head * head_size = n_embd {C} (e.g. {(C // 64, 64)}): the head count must divide "
                        f"n_embd.")
    H, N = (int(x) for x in r_k.shape)
    sizes = {}
    for name in LORA_NAMES:
        layer = 1 if name == "v" and "blocks.0.att.v1" not in sd else 0
        k1, k2 = f"blocks.{layer}.att.{name}1", f"blocks.{layer}.att.{name}2"
        if layer >= L:
            continue  # one layer without v params: no value LoRA at all
        if k1 not in sd or k2 not in sd:
            raise UserError(f"{where}: {k1 if k1 not in sd else k2} is missing; expected the {name} LoRA pair "
                            f"{k1} (n_embd, D) and {k2} (D, n_embd) of an x070 checkpoint.")
        a, b = sd[k1], sd[k2]
        if a.dim() != 2 or a.shape[0] != C:
            raise UserError(f"{where}: {k1} has shape {_shape(a)}; expected (n_embd, D) = ({C}, D).")
        D = int(a.shape[1])
        if _shape(b) != (D, C):
            raise UserError(f"{where}: the LoRA pair disagrees: {k1} has shape {_shape(a)}, so {k2} must be "
                            f"{(D, C)}, but it has shape {_shape(b)}.")
        sizes[name] = D
    v0_keys = [f"blocks.0.att.v{i}" for i in range(3)]
    present = [k for k in v0_keys if k in sd]
    if present and len(present) != 3:
        missing = [k for k in v0_keys if k not in sd]
        raise UserError(f"{where}: {', '.join(present)} present but {', '.join(missing)} missing; layer 0 holds "
                        f"all three of blocks.0.att.v0/v1/v2 or none of them.")
    formula = dict(zip(LORA_NAMES, ModelConfig(n_layer=L, n_embd=C, vocab_size=V, head_size=N).lora_sizes))
    cfg = ModelConfig(n_layer=L, n_embd=C, vocab_size=V, head_size=N, layer0_v=bool(present),
                      **{f"lora_{n}": d for n, d in sizes.items() if d != formula[n]}, **kw)
    want = state_dict_shapes(cfg)  # every name and shape of the model this config builds
    for k, shape in want.items():
        if k not in sd:
            raise UserError(f"{where}: {k} is missing; an x070 checkpoint of {cfg.describe()} has it, with "
                            f"shape {shape}.")
        if _shape(sd[k]) != shape:
            raise UserError(f"{where}: {k} has shape {_shape(sd[k])}; expected {shape}, as in blocks.0 and the "
                            f"rest of this {cfg.describe()} checkpoint (every block has the same shapes).")
    extra = [k for k in keys if k not in want]
    if extra:
        raise UserError(f"{where}: unexpected key {extra[0]} (shape {_shape(sd[extra[0]])})"
                        + (f" and {len(extra) - 1} more" if len(extra) > 1 else "")
                        + f"; an x070 checkpoint of {cfg.describe()} has no such tensor.")
    return cfg


def state_dict_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """{name: shape} of RWKV7(cfg).state_dict(), without building anything."""
    C, V, F_, H, N = cfg.n_embd, cfg.vocab_size, cfg.dim_ffn, cfg.n_head, cfg.head_size
    Dw, Da, Dv, Dg = cfg.lora_sizes
    vec = (1, 1, C)
    out = {"emb.weight": (V, C)}
    for l in range(cfg.n_layer):
        b = f"blocks.{l}."
        lns = ("ln1", "ln2") + (("ln0",) if l == 0 else ())
        for ln in lns:
            out[b + ln + ".weight"], out[b + ln + ".bias"] = (C,), (C,)
        att = {"x_r": vec, "x_w": vec, "x_k": vec, "x_v": vec, "x_a": vec, "x_g": vec,
               "w0": vec, "w1": (C, Dw), "w2": (Dw, C), "a0": vec, "a1": (C, Da), "a2": (Da, C),
               "v0": vec, "v1": (C, Dv), "v2": (Dv, C), "g1": (C, Dg), "g2": (Dg, C),
               "k_k": vec, "k_a": vec, "r_k": (H, N), "receptance.weight": (C, C), "key.weight": (C, C),
               "value.weight": (C, C), "output.weight": (C, C), "ln_x.weight": (C,), "ln_x.bias": (C,)}
        if l == 0 and not cfg.layer0_v:
            for k in ("v0", "v1", "v2"):
                del att[k]
        out.update({b + "att." + k: v for k, v in att.items()})
        out.update({b + "ffn.x_k": vec, b + "ffn.key.weight": (F_, C), b + "ffn.value.weight": (C, F_)})
    out.update({"ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)})
    return out


def count_params(cfg: ModelConfig) -> int:
    """Number of parameters of RWKV7(cfg), computed without allocating anything."""
    C, V, L = cfg.n_embd, cfg.vocab_size, cfg.n_layer
    Dw, Da, Dv, Dg = cfg.d_decay_lora, cfg.d_aaa_lora, cfg.d_mv_lora, cfg.d_gate_lora
    att = (6 * C                      # x_r x_w x_k x_v x_a x_g
           + C + 2 * C * Dw           # w0 w1 w2
           + C + 2 * C * Da           # a0 a1 a2
           + C + 2 * C * Dv           # v0 v1 v2
           + 2 * C * Dg               # g1 g2
           + 2 * C                    # k_k k_a
           + cfg.n_head * cfg.head_size  # r_k
           + 4 * C * C                # receptance key value output
           + 2 * C)                   # ln_x
    ffn = C + 2 * cfg.dim_ffn * C     # x_k key value
    block = 4 * C + att + ffn         # ln1 ln2
    unused = 0 if cfg.layer0_v else C + 2 * C * Dv  # layer 0 without v0 v1 v2 (the released layout)
    return 2 * V * C + 2 * C + 2 * C + L * block - unused  # emb head, ln0, ln_out


# ============================================================================================
# Init helpers
# ============================================================================================

def _orthogonal_(p: torch.Tensor, gain: float) -> None:
    """torch's orthogonal init with exactly `gain` (drawn in fp32, copied in p's dtype)."""
    t = torch.empty(p.shape, dtype=torch.float32, device=p.device)
    nn.init.orthogonal_(t, gain=gain)
    p.copy_(t)


def _orthogonal_spec_(p: torch.Tensor, g: float) -> None:
    """The spec's "orthogonal, gain g": gain g * sqrt(rows/cols) when rows > cols, else g."""
    rows, cols = p.shape
    _orthogonal_(p, g * math.sqrt(rows / cols) if rows > cols else g)


def _skip_init_linear(n_in: int, n_out: int) -> nn.Linear:
    lin = nn.utils.skip_init(nn.Linear, n_in, n_out, bias=False)
    with torch.no_grad():
        lin.weight.zero_()
    return lin


# ============================================================================================
# The block, as functions of its parameters
# ============================================================================================
# One implementation of a block, run three ways by Block.forward:
#   * eager training: the parameter objects are the modules themselves (see below);
#   * compiled training (RWKV7.compile_blocks): _block_fused, the whole block as one
#     torch.compile graph around the WKV custom op, with plain tensors as parameters;
#   * forward_rnn: one or more tokens with a carried state (eager, like training).
# A parameter object holds a sub-module's parameters under their state-dict names. In eager
# runs each one is the nn.Module itself, and every function below then calls the module,
# whose forward calls the function back with its own parameters: DeepSpeed ZeRO-3 gathers a
# module's partitioned weights in its forward hooks, so each weight is read inside the
# forward of the module that holds it. A new parameter: its declaration and initial value in
# its module, its field in the NamedTuple here, its use here (and count_params).

class Norm(NamedTuple):
    """A layer norm's (or ln_x's) parameters."""
    weight: torch.Tensor  # (C,)
    bias: torch.Tensor    # (C,)
    eps: float


class TimeMixParams(NamedTuple):
    """TimeMix's parameters; the vectors of C values as (C,) views."""
    x_r: torch.Tensor  # (C,) token-shift mix of each input
    x_w: torch.Tensor
    x_k: torch.Tensor
    x_v: torch.Tensor
    x_a: torch.Tensor
    x_g: torch.Tensor
    w0: torch.Tensor   # (C,), (C, Dw), (Dw, C): decay LoRA
    w1: torch.Tensor
    w2: torch.Tensor
    a0: torch.Tensor   # (C,), (C, Da), (Da, C): in-context learning rate LoRA
    a1: torch.Tensor
    a2: torch.Tensor
    v0: torch.Tensor   # (C,), (C, Dv), (Dv, C): value residual LoRA (unused in layer 0)
    v1: torch.Tensor
    v2: torch.Tensor
    g1: torch.Tensor   # (C, Dg), (Dg, C): gate LoRA
    g2: torch.Tensor
    k_k: torch.Tensor  # (C,)
    k_a: torch.Tensor  # (C,)
    r_k: torch.Tensor  # (C,), stored (H, N)
    receptance: torch.Tensor | nn.Linear  # (C, C) weights
    key: torch.Tensor | nn.Linear
    value: torch.Tensor | nn.Linear
    output: torch.Tensor | nn.Linear
    ln_x: Norm | nn.Module


class ChannelMixParams(NamedTuple):
    x_k: torch.Tensor                # (C,)
    key: torch.Tensor | nn.Linear    # (4C, C)
    value: torch.Tensor | nn.Linear  # (C, 4C)


class BlockParams(NamedTuple):
    ln0: Norm | nn.LayerNorm | None  # layer 0 only
    ln1: Norm | nn.LayerNorm
    att: TimeMixParams | nn.Module
    ln2: Norm | nn.LayerNorm
    ffn: ChannelMixParams | nn.Module


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


def wkv(r, w, k, v, a, b, state, head_size: int, impl: str, compiled: bool):
    """WKV7 of the (B, T, C) inputs: (y (B, T, C), the state after the last token or None).

    In the compiled graph: the custom op (rwkvlm.ops.wkv7.cuda.wkv7_op), which torch.compile keeps
    as one opaque node. Otherwise rwkvlm.ops.wkv7.wkv7 (the CUDA kernel on GPU, also with a carried
    state (B, H, N, N) for inference; the chunked PyTorch path elsewhere).
    """
    if compiled and state is None:
        return wkv7_op(r, w, k, v, a, b, head_size, impl), None
    return wkv7(r, w, k, v, a, b, head_size, impl=impl, initial_state=state, output_final_state=state is not None)


def time_mix(p, x, x_prev, v_first, state, head_size: int, wkv_impl: str, compiled: bool = False):
    """TimeMix (the spec's "Forward"). x: (B, T, C), the ln1 output; x_prev: (B, C), the ln1
    output of the token before x (None: zeros); v_first: layer 0's value (None in layer 0);
    state: the WKV state (B, H, N, N) before x, or None (zeros, not returned).
    Returns (out (B, T, C), v_first, WKV state after x or None)."""
    if isinstance(p, nn.Module):
        return p(x, x_prev, v_first, state, head_size, wkv_impl, compiled)
    B, T, C = x.shape
    N = head_size
    xx = shift(x, x_prev) - x  # (B, T, C)
    xr, xw, xk, xv, xa, xg = (x + xx * mu for mu in (p.x_r, p.x_w, p.x_k, p.x_v, p.x_a, p.x_g))
    r = linear(xr, p.receptance)  # (B, T, C)
    k = linear(xk, p.key)         # (B, T, C)
    v = linear(xv, p.value)       # (B, T, C)
    w_raw = p.w0.float() + (torch.tanh(xw @ p.w1) @ p.w2).float()  # (B, T, C) fp32
    if v_first is None:  # layer 0: its value is every later layer's v_first
        v_first = v
    else:
        v = v + (v_first - v) * torch.sigmoid(p.v0 + (xv @ p.v1) @ p.v2)
    iclr = torch.sigmoid(p.a0 + (xa @ p.a1) @ p.a2)  # (B, T, C) in-context learning rate
    g = torch.sigmoid(xg @ p.g1) @ p.g2              # (B, T, C)
    kk = F.normalize((k * p.k_k).view(B, T, C // N, N), dim=-1, p=2.0, eps=1e-12)  # (B, T, H, N)
    kk = kk.view(B, T, C)  # (B, T, C)
    k = k * (1 + (iclr - 1) * p.k_a)
    w = -F.softplus(-w_raw) - 0.5  # (B, T, C) fp32; decay = exp(-exp(w))
    y, state = wkv(r, w, k, v, -kk, kk * iclr, state, N, wkv_impl, compiled)  # (B, T, C)
    y = group_norm(y, p.ln_x, N)
    bonus = (r * k * p.r_k).view(B, T, C // N, N).sum(dim=-1, keepdim=True)  # (B, T, H, 1)
    y = y + (bonus * v.view(B, T, C // N, N)).view(B, T, C)  # (B, T, H, N) -> (B, T, C)
    return linear(y * g, p.output), v_first, state


def channel_mix(p, x, x_prev):
    """ChannelMix. x: (B, T, C), the ln2 output; x_prev: (B, C), that of the token before x
    (None: zeros). Returns (B, T, C)."""
    if isinstance(p, nn.Module):
        return p(x, x_prev)
    h = torch.relu(linear(x + (shift(x, x_prev) - x) * p.x_k, p.key)) ** 2  # (B, T, 4C)
    return linear(h, p.value)  # (B, T, C)


def block(p, x, v_first, state, head_size: int, wkv_impl: str, compiled: bool = False):
    """One block (ln0 first in layer 0). x: (B, T, C); v_first: (B, T, C) or None in layer 0;
    state: None, or this layer's (att shift x (B, C), WKV state (B, H, N, N) fp32, ffn shift
    x (B, C)) before x. Returns (x, v_first, the state after x or None)."""
    att_prev, wkv_state, ffn_prev = (None, None, None) if state is None else state
    if p.ln0 is not None:
        x = layer_norm(x, p.ln0)
    h = layer_norm(x, p.ln1)  # (B, T, C)
    dx, v_first, wkv_state = time_mix(p.att, h, att_prev, v_first, wkv_state, head_size, wkv_impl, compiled)
    x = x + dx
    h2 = layer_norm(x, p.ln2)  # (B, T, C)
    x = x + channel_mix(p.ffn, h2, ffn_prev)
    if state is None:
        return x, v_first, None
    return x, v_first, (h[:, -1], wkv_state.float(), h2[:, -1])


def _block_fused(p: BlockParams, x, v_first, head_size: int, wkv_impl: str):
    """block() in training as torch.compile traces it: one graph per block call, around the
    WKV custom op (rwkvlm.ops.wkv7.cuda.wkv7_op). p holds plain tensors (Block.params())."""
    x, v_first, _ = block(p, x, v_first, None, head_size, wkv_impl, compiled=True)
    return x, v_first


def _block_fused_cp(*args):
    """_block_fused under activation checkpointing, for torch.compile: only the block's inputs
    are kept for backward, whose graph recomputes the rest. Compiled from inside, this costs
    no extra compiled call per block and no saved-tensor hooks, unlike checkpoint(block) around
    the compiled function."""
    return checkpoint(_block_fused, *args, use_reentrant=False)


_COMPILED: dict = {}


def _compiled(fn):
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
                if not _is_compiler_error(e):
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


# ============================================================================================
# Modules: the parameters (state-dict names and shapes), their initial values, and which of
# the block's functions runs them
# ============================================================================================

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


def _params(module: nn.Module, cls, as_modules: bool):
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


class TimeMix(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.cfg = cfg
        self.layer_id = layer_id
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size

        def vec():
            return nn.Parameter(torch.zeros(1, 1, C))

        def mat(rows, cols):
            return nn.Parameter(torch.zeros(rows, cols))

        self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g = (vec() for _ in range(6))
        self.w0, self.w1, self.w2 = vec(), mat(C, cfg.d_decay_lora), mat(cfg.d_decay_lora, C)
        self.a0, self.a1, self.a2 = vec(), mat(C, cfg.d_aaa_lora), mat(cfg.d_aaa_lora, C)
        if layer_id == 0 and not cfg.layer0_v:  # the released layout: layer 0 never uses them
            for name in ("v0", "v1", "v2"):
                self.register_parameter(name, None)
        else:
            self.v0, self.v1, self.v2 = vec(), mat(C, cfg.d_mv_lora), mat(cfg.d_mv_lora, C)
        self.g1, self.g2 = mat(C, cfg.d_gate_lora), mat(cfg.d_gate_lora, C)
        self.k_k, self.k_a = vec(), vec()
        self.r_k = nn.Parameter(torch.zeros(H, N))
        self.receptance = _skip_init_linear(C, C)
        self.key = _skip_init_linear(C, C)
        self.value = _skip_init_linear(C, C)
        self.output = _skip_init_linear(C, C)
        self.ln_x = HeadGroupNorm(C, N)
        self.init_table()
    @torch.no_grad()
    def init_table(self, randomize: bool = False) -> None:
        """The spec's per-parameter table values; random LoRA w2/a2/v2/g2 only when randomize."""
        cfg, l = self.cfg, self.layer_id
        C, L, N = cfg.n_embd, cfg.n_layer, cfg.head_size
        dev = self.x_r.device
        n = torch.arange(C, dtype=torch.float64, device=dev)
        d = n / C                                   # (C,)
        lin = n / (C - 1) - 0.5                     # (C,)
        z = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
        zig = z * z.abs()                           # (C,)
        r0 = l / (L - 1) if L > 1 else 0.0          # 0 .. 1
        r1 = 1.0 - l / L                            # 1 .. almost 0
        www = -6 + 6 * (n / (C - 1)) ** (1 + r0 ** 0.3)

        def put(p, values):
            p.copy_(values.view(p.shape).to(p.dtype))  # (C,) -> (1, 1, C)

        for p, e in ((self.x_r, 0.2), (self.x_w, 0.9), (self.x_k, 0.7),
                     (self.x_v, 0.7), (self.x_a, 0.9), (self.x_g, 0.2)):
            put(p, 1.0 - d ** (e * r1))
        put(self.w0, www + 0.5 + 2.5 * zig)
        put(self.a0, -0.19 + 0.3 * zig + 0.4 * lin)
        if self.v0 is not None:
            put(self.v0, 0.73 - 0.4 * lin)
        put(self.k_k, 0.71 - 0.1 * lin)
        self.k_a.fill_(1.02)
        self.r_k.fill_(-0.04)
        for p in (self.w1, self.a1, self.v1, self.g1):
            if p is not None:
                p.zero_()
        for p in (self.w2, self.a2, self.v2, self.g2):
            if p is None:
                continue
            if randomize:
                _orthogonal_spec_(p, 0.1)
            else:
                p.zero_()
        self.ln_x.weight.fill_(((1 + l) / L) ** 0.7)
        self.ln_x.bias.zero_()

    def params(self, as_modules: bool = False) -> TimeMixParams:
        return _params(self, TimeMixParams, as_modules)

    def forward(self, x, x_prev, v_first, state, head_size: int, wkv_impl: str, compiled: bool = False):
        """time_mix() of this layer; the linear layers and ln_x called as modules."""
        p = self.params(as_modules=True)
        return time_mix(p, x, x_prev, v_first, state, head_size, wkv_impl, compiled)


class ChannelMix(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.cfg = cfg
        self.layer_id = layer_id
        C = cfg.n_embd
        self.x_k = nn.Parameter(torch.zeros(1, 1, C))
        self.key = _skip_init_linear(C, cfg.dim_ffn)
        self.value = _skip_init_linear(cfg.dim_ffn, C)
        self.init_table()

    @torch.no_grad()
    def init_table(self) -> None:
        C, L = self.cfg.n_embd, self.cfg.n_layer
        r1 = 1.0 - self.layer_id / L
        d = torch.arange(C, dtype=torch.float64, device=self.x_k.device) / C
        self.x_k.copy_((1.0 - d ** (r1 ** 4)).view(1, 1, C).to(self.x_k.dtype))  # (1, 1, C)

    def params(self, as_modules: bool = False) -> ChannelMixParams:
        return _params(self, ChannelMixParams, as_modules)

    def forward(self, x, x_prev=None):
        """channel_mix(self.params(...), x, x_prev); the linear layers called as modules."""
        return channel_mix(self.params(as_modules=True), x, x_prev)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.cfg = cfg
        self.layer_id = layer_id
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd)
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(cfg, layer_id)
        self.compiled = False  # set by RWKV7.compile_blocks

    def params(self, as_modules: bool = False) -> BlockParams:
        return _params(self, BlockParams, as_modules)

    def forward(self, x, v_first, state=None, grad_cp: bool = False):
        """block(): x (B, T, C) -> (x, v_first, the state after x, None without `state`).

        Eager: module by module (DeepSpeed ZeRO-3 gathers each module's weights in its
        forward). Compiled (training, no state): one graph reading the weights directly, never
        under ZeRO-3; with grad_cp it checkpoints inside the graph, so that the backward graph
        recomputes the block within the same compiled call (RWKV7.forward_hidden wraps eager
        blocks in checkpoint() instead).
        """
        N, impl = self.cfg.head_size, self.cfg.wkv_impl
        if self.compiled and state is None:
            fused = _compiled(_block_fused_cp if grad_cp else _block_fused)
            x, v_first = fused(self.params(), x, v_first, N, impl)
            return x, v_first, None
        return block(self.params(as_modules=True), x, v_first, state, N, impl)


class RWKV7(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.utils.skip_init(nn.Embedding, cfg.vocab_size, cfg.n_embd)
        with torch.no_grad():
            self.emb.weight.zero_()
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.utils.skip_init(Head, cfg.n_embd, cfg.vocab_size, bias=False)
        with torch.no_grad():
            self.head.weight.zero_()

    count_params = staticmethod(count_params)

    def compile_blocks(self) -> None:
        """Run each block as one torch.compile'd function (_block_fused: block() on plain
        tensors) and the head loss's per-chunk softmax work compiled too.

        Inside a block the compiler fuses the layer norms, token shift and mixing, LoRAs,
        normalisation, ln_x, bonus, gating, squared ReLU and the residual adds around the
        matmuls, and the WKV op runs as an opaque custom op (the CUDA kernel on GPU, the
        PyTorch path with --wkv_impl torch or on CPU); one compiled call per block replaces
        dozens of separately launched ops, which is what bounds small-batch steps. The
        weights are read directly rather than through the modules' forward, so compiled
        blocks are not for DeepSpeed ZeRO-3 (--compile auto leaves them off there). Names,
        shapes and results are unchanged.
        """
        for block in self.blocks:
            block.compiled = True
        self.head.compiled = True

    # ---------------------------------------------------------------------------------------
    # init
    # ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """The spec's whole-model init pass, in place; deterministic given torch.manual_seed."""
        cfg = self.cfg
        for block in self.blocks:
            for ln in (block.ln1, block.ln2) + ((block.ln0,) if block.layer_id == 0 else ()):
                ln.weight.fill_(1.0)
                ln.bias.zero_()
            block.att.init_table(randomize=True)  # also sets ln_x.weight = ((1 + l) / L) ** 0.7
            block.ffn.init_table()
        self.ln_out.weight.fill_(1.0)
        self.ln_out.bias.zero_()

        V, C = cfg.vocab_size, cfg.n_embd
        for name, p in self.named_parameters():
            if "ln_" in name or ".ln" in name or ".weight" not in name:
                continue  # table value (set above)
            if name == "emb.weight":
                p.uniform_(-1e-4, 1e-4)
            elif name == "head.weight":
                _orthogonal_(p, 0.5 * math.sqrt(V / C) if V > C else 0.5)
            elif name.endswith("att.output.weight") or name.endswith("ffn.value.weight"):
                p.zero_()
            elif name.endswith("att.key.weight"):
                _orthogonal_(p, 0.1)
            elif p.dim() == 2:
                _orthogonal_(p, 1.0)  # att.receptance, att.value, ffn.key: plain gain
            else:
                raise AssertionError(f"init_weights: no rule for {name} {tuple(p.shape)}")

    # ---------------------------------------------------------------------------------------
    # training forward
    # ---------------------------------------------------------------------------------------
    def _check_idx(self, idx: torch.Tensor) -> None:
        if idx.dim() != 2:
            raise ValueError(f"idx must be (B, T) token ids; got shape {tuple(idx.shape)}")

    def forward_hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """ln_out(x) before the head: (B, T, C)."""
        self._check_idx(idx)
        x = self.emb(idx)  # (B, T, C)
        v_first = None
        use_cp = self.cfg.grad_cp and torch.is_grad_enabled()
        for blk in self.blocks:
            if use_cp and not blk.compiled:
                x, v_first, _ = checkpoint(blk, x, v_first, use_reentrant=False)
            else:  # a compiled block checkpoints inside its graph
                x, v_first, _ = blk(x, v_first, grad_cp=use_cp)
        return self.ln_out(x)  # (B, T, C)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) for training / scoring (zero initial state)."""
        return self.head(self.forward_hidden(idx))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over all B*T positions, with the L2Wrap gradient.

        The head and the loss run fused in row chunks: full-vocabulary logits
        are never held whole (see head_l2wrap_loss).
        """
        h = self.forward_hidden(idx)  # (B, T, C)
        return self.head(h, targets)

    # ---------------------------------------------------------------------------------------
    # inference with a carried state
    # ---------------------------------------------------------------------------------------
    def zero_state(self, batch_size: int, device=None, dtype=None) -> list:
        """Per layer (att shift x (B, C), wkv state (B, H, N, N) fp32, ffn shift x (B, C))."""
        cfg = self.cfg
        p = self.emb.weight
        device = p.device if device is None else device
        dtype = p.dtype if dtype is None else dtype
        B, C, H, N = batch_size, cfg.n_embd, cfg.n_head, cfg.head_size
        return [(torch.zeros(B, C, device=device, dtype=dtype),
                 torch.zeros(B, H, N, N, device=device, dtype=torch.float32),
                 torch.zeros(B, C, device=device, dtype=dtype)) for _ in range(cfg.n_layer)]

    def forward_rnn(self, idx: torch.Tensor, state: list | None = None, last_only: bool = False):
        """Logits (B, T, V) (or (B, 1, V) with last_only) and the state after the last token.

        `state` is None (zero state) or what a previous call returned: a list with one
        (att shift x (B, C), wkv state (B, H, N, N) fp32, ffn shift x (B, C)) per layer.
        Feeding a sequence in pieces gives the same logits as feeding it whole.
        Call under torch.no_grad() for inference.
        """
        self._check_idx(idx)
        B, T = idx.shape
        if T == 0:
            raise ValueError("forward_rnn needs at least one token")
        if state is None:
            state = self.zero_state(B, device=idx.device)
        if len(state) != self.cfg.n_layer:
            raise ValueError(f"state has {len(state)} layers, the model has {self.cfg.n_layer}")
        x = self.emb(idx)  # (B, T, C)
        v_first = None
        new_state = []
        for blk, layer_state in zip(self.blocks, state):
            x, v_first, layer_state = blk(x, v_first, state=layer_state)
            new_state.append(layer_state)
        if last_only:
            x = x[:, -1:]  # (B, 1, C): the head is most of the work of a prefill
        logits = self.head(self.ln_out(x))  # (B, T, V)
        return logits, new_state


# ============================================================================================
# Loss: cross-entropy + L2Wrap
# ============================================================================================

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
                    loss_rows, gc = _compiled(_ce_chunk_grad)(lg, tgt)  # (n,), (n, V) in cdt
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

