"""The RWKV-6 "x060" model: config, one functional block, the modules that hold its parameters, RWKV6.

The facts (parameter names and shapes, init, forward) are RWKV-v7/docs/rwkv6-x060.md's: RWKV-LM's
`--my_testing x060` model (RWKV-v5/src/model.py, RWKV_Tmix_x060 / RWKV_CMix_x060), whose
checkpoints the `rwkv` package runs as its "v6.0". The block runs the same three ways as
RWKV-7's (rwkvlm/model/rwkv7.py, "The block"): eager module by module, compiled on plain
tensors, and recurrent with a carried state; the shell (emb, ln_out, head, loss, forward_rnn)
is model/lm.py's.

    x060 time mix:   xx = shift(x) - x
                     m_w, m_k, m_v, m_r, m_g = tanh((x + xx * maa_x) @ maa_w1) @ maa_w2   (5 LoRAs)
                     x_* = x + xx * (maa_* + m_*)
                     r, k, v = W_r x_r, W_k x_k, W_v x_v;  g = silu(W_g x_g)
                     w = time_decay + tanh(x_w @ decay_w1) @ decay_w2     (decay = exp(-exp(w)))
                     y = output(ln_x(WKV6(r, k, v, w, u = time_faaaa)) * g)
    x060 channel mix: sigmoid(W_r x_r) * W_v relu(W_k x_k)^2,  x_k / x_r token-shift mixes
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rwkvlm.errors import UserError
from rwkvlm.model.layers import (HeadGroupNorm, Norm, compile_once, filled, group_norm, layer_norm, linear, param_tuple,
                                 put, run_steps, shift, zero_linear, zeros)
from rwkvlm.model.lm import RWKVLM
from rwkvlm.ops.wkv6 import wkv6

__all__ = ["Rwkv6Config", "RWKV6", "count_params_x060", "state_dict_shapes_x060"]

MIX_LORA = 32    # RWKV-LM's D_MIX_LORA: the five token-shift LoRAs (w, k, v, r, g) of x060
DECAY_LORA = 64  # RWKV-LM's D_DECAY_LORA
MIX_NAMES = ("w", "k", "v", "r", "g")  # the order of the five LoRAs in time_maa_w1 / time_maa_w2


# ============================================================================================
# Configuration
# ============================================================================================

@dataclass
class Rwkv6Config:
    """The shapes of an x060 model. dim_ffn: RWKV-LM's default int(3.5 * n_embd) // 32 * 32;
    the LoRA sizes: RWKV-LM's 32 (mix) and 64 (decay) unless a checkpoint holds others."""
    n_layer: int
    n_embd: int
    vocab_size: int = 65536
    head_size: int = 64
    grad_cp: bool = False
    wkv_impl: str = "auto"
    dim_ffn: int | None = None
    lora_mix: int = MIX_LORA
    lora_decay: int = DECAY_LORA

    model_type = "x060"
    family = "RWKV-6"

    def __post_init__(self):
        if self.wkv_impl not in ("auto", "cuda", "torch"):
            raise UserError(f"--wkv_impl must be auto, cuda or torch; got {self.wkv_impl!r}.")
        for flag, value in (("--n_layer", self.n_layer), ("--n_embd", self.n_embd), ("--vocab_size", self.vocab_size),
                            ("--head_size", self.head_size), ("the mix LoRA size", self.lora_mix),
                            ("the decay LoRA size", self.lora_decay)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"{flag} must be a positive integer; got {value!r}.")
        if self.n_embd % 32 != 0 or self.n_embd % self.head_size != 0:
            raise UserError(f"--n_embd {self.n_embd} must be a multiple of 32 and of --head_size {self.head_size} "
                            f"for RWKV-6 (the channels are split into n_embd / head_size heads).")
        if self.dim_ffn is None:
            self.dim_ffn = int(self.n_embd * 3.5) // 32 * 32

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    def describe(self) -> str:
        """'L12-D768, ffn 2688' (and the LoRA sizes and head size when unusual)."""
        out = f"L{self.n_layer}-D{self.n_embd}, ffn {self.dim_ffn}"
        if (self.lora_mix, self.lora_decay) != (MIX_LORA, DECAY_LORA):
            out += f", LoRA mix/decay {self.lora_mix}/{self.lora_decay}"
        if self.head_size != 64:
            out += f", head size {self.head_size}"
        return out

    @classmethod
    def from_state_dict(cls, sd: dict, path=None, **kw) -> "Rwkv6Config":
        """The config of an x060 state dict, read off its shapes; every name and shape is then
        checked against the model that config builds (UserError naming the key otherwise)."""
        where = f"{path}" if path is not None else "the state dict"
        emb, head = sd.get("emb.weight"), sd.get("head.weight")
        if emb is None or emb.dim() != 2:
            raise UserError(f"{where}: no emb.weight (vocab_size, n_embd); expected an RWKV-6 (x060) state dict.")
        V, C = (int(x) for x in emb.shape)
        if head is None or tuple(head.shape) != (V, C):
            raise UserError(f"{where}: head.weight must be {(V, C)} like emb.weight; found "
                            f"{None if head is None else tuple(head.shape)}.")
        layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
        if not layers or layers != list(range(len(layers))):
            raise UserError(f"{where}: the blocks are not numbered 0..N-1 (found {layers[:8]}).")

        def shape(k):
            if k not in sd:
                raise UserError(f"{where}: {k} is missing; an RWKV-6 (x060) checkpoint has it.")
            return tuple(sd[k].shape)

        H, N = shape("blocks.0.att.time_faaaa")
        F_ = shape("blocks.0.ffn.key.weight")[0]
        w1, d1 = shape("blocks.0.att.time_maa_w1"), shape("blocks.0.att.time_decay_w1")
        if len(w1) != 2 or w1[1] % 5 != 0:
            raise UserError(f"{where}: blocks.0.att.time_maa_w1 has shape {w1}; expected (n_embd, 5 * D).")
        cfg = cls(n_layer=len(layers), n_embd=C, vocab_size=V, head_size=N, dim_ffn=F_, lora_mix=w1[1] // 5,
                  lora_decay=d1[1], **kw)
        if cfg.n_head != H:
            raise UserError(f"{where}: blocks.0.att.time_faaaa has shape {(H, N)}; n_head * head_size must be "
                            f"n_embd {C}.")
        want = state_dict_shapes_x060(cfg)
        for k, s in want.items():
            if shape(k) != s:
                raise UserError(f"{where}: {k} has shape {shape(k)}; expected {s}, as in the rest of this "
                                f"RWKV-6 {cfg.describe()} checkpoint.")
        extra = [k for k in sd if k not in want]
        if extra:
            raise UserError(f"{where}: unexpected key {extra[0]} (shape {tuple(sd[extra[0]].shape)}); an RWKV-6 "
                            f"checkpoint of {cfg.describe()} has no such tensor.")
        return cfg


def state_dict_shapes_x060(cfg: Rwkv6Config) -> dict[str, tuple]:
    """{name: shape} of RWKV6(cfg).state_dict(), without building anything."""
    C, V, F_, H, N = cfg.n_embd, cfg.vocab_size, cfg.dim_ffn, cfg.n_head, cfg.head_size
    Dm, Dd = cfg.lora_mix, cfg.lora_decay
    vec = (1, 1, C)
    out = {"emb.weight": (V, C)}
    for l in range(cfg.n_layer):
        b = f"blocks.{l}."
        for ln in ("ln1", "ln2") + (("ln0",) if l == 0 else ()):
            out[b + ln + ".weight"], out[b + ln + ".bias"] = (C,), (C,)
        att = {f"time_maa_{n}": vec for n in ("x",) + MIX_NAMES}
        att.update({"time_maa_w1": (C, 5 * Dm), "time_maa_w2": (5, Dm, C), "time_decay": vec,
                    "time_decay_w1": (C, Dd), "time_decay_w2": (Dd, C), "time_faaaa": (H, N),
                    "receptance.weight": (C, C), "key.weight": (C, C), "value.weight": (C, C),
                    "output.weight": (C, C), "gate.weight": (C, C), "ln_x.weight": (C,), "ln_x.bias": (C,)})
        out.update({b + "att." + k: v for k, v in att.items()})
        out.update({b + "ffn.time_maa_k": vec, b + "ffn.time_maa_r": vec, b + "ffn.key.weight": (F_, C),
                    b + "ffn.receptance.weight": (C, C), b + "ffn.value.weight": (C, F_)})
    out.update({"ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)})
    return out


def count_params_x060(cfg: Rwkv6Config) -> int:
    """Number of parameters of RWKV6(cfg), computed without allocating anything."""
    return sum(math.prod(s) for s in state_dict_shapes_x060(cfg).values())


# ============================================================================================
# The block, as functions of its parameters (run three ways, as RWKV-7's: see rwkv7.py)
# ============================================================================================

class TimeMixParams(NamedTuple):
    """TimeMix's parameters; the vectors of C values as (C,) views."""
    time_maa_x: torch.Tensor     # (C,) token-shift mix before the LoRAs
    time_maa_w: torch.Tensor     # (C,) each input's base mix
    time_maa_k: torch.Tensor
    time_maa_v: torch.Tensor
    time_maa_r: torch.Tensor
    time_maa_g: torch.Tensor
    time_maa_w1: torch.Tensor    # (C, 5 Dm): the five mix LoRAs, down
    time_maa_w2: torch.Tensor    # (5, Dm, C): up, one per input (w, k, v, r, g)
    time_decay: torch.Tensor     # (C,)
    time_decay_w1: torch.Tensor  # (C, Dd): decay LoRA
    time_decay_w2: torch.Tensor  # (Dd, C)
    time_faaaa: torch.Tensor     # (C,), stored (H, N): the bonus u of the current token
    receptance: torch.Tensor | nn.Linear  # (C, C) weights
    key: torch.Tensor | nn.Linear
    value: torch.Tensor | nn.Linear
    output: torch.Tensor | nn.Linear
    gate: torch.Tensor | nn.Linear
    ln_x: Norm | nn.Module


class ChannelMixParams(NamedTuple):
    time_maa_k: torch.Tensor              # (C,)
    time_maa_r: torch.Tensor              # (C,)
    key: torch.Tensor | nn.Linear         # (F, C)
    receptance: torch.Tensor | nn.Linear  # (C, C)
    value: torch.Tensor | nn.Linear       # (C, F)


class BlockParams(NamedTuple):
    ln0: Norm | nn.LayerNorm | None  # layer 0 only
    ln1: Norm | nn.LayerNorm
    att: TimeMixParams | nn.Module
    ln2: Norm | nn.LayerNorm
    ffn: ChannelMixParams | nn.Module


def wkv(r, k, v, w, u, state, head_size: int, impl: str, compiled: bool):
    """WKV6 of the (B, T, C) inputs: (y (B, T, C), the state after the last token or None).

    In the compiled graph: the custom op (rwkvlm.ops.wkv6.cuda.wkv6_op), which torch.compile keeps
    as one opaque node. Otherwise rwkvlm.ops.wkv6.wkv6 (the CUDA kernel on GPU, the chunked
    PyTorch path elsewhere)."""
    if compiled and state is None:
        from rwkvlm.ops.wkv6.cuda import wkv6_op

        return wkv6_op(r, k, v, w, u, head_size, impl), None
    return wkv6(r, k, v, w, u, head_size, impl=impl, initial_state=state, output_final_state=state is not None)


def time_mix(p, x, x_prev, state, head_size: int, wkv_impl: str, compiled: bool = False):
    """TimeMix. x: (B, T, C), the ln1 output; x_prev: (B, C), the ln1 output of the token before x
    (None: zeros); state: the WKV state (B, H, N, N) before x, or None (zeros, not returned).
    Returns (out (B, T, C), WKV state after x or None)."""
    if isinstance(p, nn.Module):
        return p(x, x_prev, state, head_size, wkv_impl, compiled)
    B, T, C = x.shape
    xx = shift(x, x_prev) - x  # (B, T, C)
    h = torch.tanh((x + xx * p.time_maa_x) @ p.time_maa_w1)  # (B, T, 5 Dm)
    h = h.view(B * T, 5, -1).transpose(0, 1)                 # (5, B*T, Dm)
    mw, mk, mv, mr, mg = torch.bmm(h, p.time_maa_w2).view(5, B, T, C).unbind(0)  # 5 x (B, T, C)
    xw = x + xx * (p.time_maa_w + mw)
    xk = x + xx * (p.time_maa_k + mk)
    xv = x + xx * (p.time_maa_v + mv)
    xr = x + xx * (p.time_maa_r + mr)
    xg = x + xx * (p.time_maa_g + mg)
    r = linear(xr, p.receptance)        # (B, T, C)
    k = linear(xk, p.key)               # (B, T, C)
    v = linear(xv, p.value)             # (B, T, C)
    g = F.silu(linear(xg, p.gate))      # (B, T, C)
    w = p.time_decay.float() + (torch.tanh(xw @ p.time_decay_w1) @ p.time_decay_w2).float()  # (B, T, C) fp32
    y, state = wkv(r, k, v, w, p.time_faaaa, state, head_size, wkv_impl, compiled)  # (B, T, C)
    y = group_norm(y, p.ln_x, head_size)
    return linear(y * g, p.output), state


def channel_mix(p, x, x_prev):
    """ChannelMix. x: (B, T, C), the ln2 output; x_prev: (B, C), that of the token before x
    (None: zeros). Returns (B, T, C)."""
    if isinstance(p, nn.Module):
        return p(x, x_prev)
    xx = shift(x, x_prev) - x  # (B, T, C)
    k = torch.relu(linear(x + xx * p.time_maa_k, p.key)) ** 2  # (B, T, F)
    return torch.sigmoid(linear(x + xx * p.time_maa_r, p.receptance)) * linear(k, p.value)  # (B, T, C)


def block(p, x, state, head_size: int, wkv_impl: str, compiled: bool = False):
    """One block (ln0 first in layer 0). x: (B, T, C); state: None, or this layer's (att shift x
    (B, C), WKV state (B, H, N, N) fp32, ffn shift x (B, C)) before x. Returns (x, the state
    after x or None)."""
    att_prev, wkv_state, ffn_prev = (None, None, None) if state is None else state
    if p.ln0 is not None:
        x = layer_norm(x, p.ln0)
    h = layer_norm(x, p.ln1)  # (B, T, C)
    dx, wkv_state = time_mix(p.att, h, att_prev, wkv_state, head_size, wkv_impl, compiled)
    x = x + dx
    h2 = layer_norm(x, p.ln2)  # (B, T, C)
    x = x + channel_mix(p.ffn, h2, ffn_prev)
    if state is None:
        return x, None
    return x, (h[:, -1], wkv_state.float(), h2[:, -1])


def _block_fused(p: BlockParams, x, head_size: int, wkv_impl: str):
    """block() in training as torch.compile traces it, on plain tensors (Block.params())."""
    return block(p, x, None, head_size, wkv_impl, compiled=True)[0]


def _block_fused_cp(*args):
    """_block_fused under activation checkpointing inside the compiled graph (see rwkv7.py)."""
    return checkpoint(_block_fused, *args, use_reentrant=False)


# ============================================================================================
# Modules: the parameters (state-dict names and shapes) and their initial values
# ============================================================================================

class TimeMix(nn.Module):
    def __init__(self, cfg: Rwkv6Config, layer_id: int):
        super().__init__()
        self.cfg = cfg
        self.layer_id = layer_id
        C, H, N, Dm, Dd = cfg.n_embd, cfg.n_head, cfg.head_size, cfg.lora_mix, cfg.lora_decay

        def vec():
            return nn.Parameter(torch.zeros(1, 1, C))

        for name in ("x",) + MIX_NAMES:
            setattr(self, f"time_maa_{name}", vec())
        self.time_maa_w1 = nn.Parameter(torch.zeros(C, 5 * Dm))
        self.time_maa_w2 = nn.Parameter(torch.zeros(5, Dm, C))
        self.time_decay = vec()
        self.time_decay_w1 = nn.Parameter(torch.zeros(C, Dd))
        self.time_decay_w2 = nn.Parameter(torch.zeros(Dd, C))
        self.time_faaaa = nn.Parameter(torch.zeros(H, N))
        self.receptance = zero_linear(C, C)
        self.key = zero_linear(C, C)
        self.value = zero_linear(C, C)
        self.output = zero_linear(C, C)
        self.gate = zero_linear(C, C)
        self.ln_x = HeadGroupNorm(C, N, eps=1e-5 * 8 ** 2)  # RWKV-LM: eps 1e-5 * head_size_divisor ** 2
        self.init_table()

    @torch.no_grad()
    def init_table(self, randomize: bool = False) -> None:
        """RWKV-LM's x060 values: token-shift mixes, decay speeds and the bonus by channel and
        layer; the LoRA "up" matrices uniform(+-0.01) only when randomize (zeros otherwise)."""
        run_steps(self, self.table_steps(randomize))

    def table_steps(self, randomize: bool = False) -> list:
        """init_table as [(parameter name, fill)], in the order it draws random numbers (values
        computed on the CPU in float64)."""
        cfg, l = self.cfg, self.layer_id
        C, L = cfg.n_embd, cfg.n_layer
        n = torch.arange(C, dtype=torch.float64)
        r0 = l / (L - 1) if L > 1 else 0.0  # 0 .. 1
        r1 = 1.0 - l / L                    # 1 .. almost 0
        ddd = n / C

        steps = [(f"time_maa_{x}", put(1.0 - ddd ** r1)) for x in ("x", "w", "k")]
        steps += [("time_maa_v", put(1.0 - (ddd ** r1 + 0.3 * r0))), ("time_maa_r", put(1.0 - ddd ** (0.5 * r1))),
                  ("time_maa_g", put(1.0 - ddd ** (0.5 * r1))),
                  ("time_decay", put(-6 + 5 * (n / (C - 1)) ** (0.7 + 1.3 * r0))),
                  ("time_faaaa", put(r0 * (1 - n / (C - 1)) + ((n + 1) % 3 - 1) * 0.1)),
                  ("time_maa_w1", zeros), ("time_decay_w1", zeros)]
        for name in ("time_maa_w2", "time_decay_w2"):
            steps.append((name, (lambda t: t.uniform_(-0.01, 0.01)) if randomize else zeros))
        steps += [("ln_x.weight", filled(((1 + l) / L) ** 0.7)), ("ln_x.bias", zeros)]
        return steps

    def params(self, as_modules: bool = False) -> TimeMixParams:
        return param_tuple(self, TimeMixParams, as_modules)

    def forward(self, x, x_prev, state, head_size: int, wkv_impl: str, compiled: bool = False):
        """time_mix() of this layer; the linear layers and ln_x called as modules."""
        return time_mix(self.params(as_modules=True), x, x_prev, state, head_size, wkv_impl, compiled)


class ChannelMix(nn.Module):
    def __init__(self, cfg: Rwkv6Config, layer_id: int):
        super().__init__()
        self.cfg = cfg
        self.layer_id = layer_id
        C, F_ = cfg.n_embd, cfg.dim_ffn
        self.time_maa_k = nn.Parameter(torch.zeros(1, 1, C))
        self.time_maa_r = nn.Parameter(torch.zeros(1, 1, C))
        self.key = zero_linear(C, F_)
        self.receptance = zero_linear(C, C)
        self.value = zero_linear(F_, C)
        self.init_table()

    @torch.no_grad()
    def init_table(self) -> None:
        run_steps(self, self.table_steps())

    def table_steps(self) -> list:
        """init_table as [(parameter name, fill)] (no random numbers)."""
        C, L = self.cfg.n_embd, self.cfg.n_layer
        r1 = 1.0 - self.layer_id / L
        ddd = torch.arange(C, dtype=torch.float64) / C
        return [(name, put(1.0 - ddd ** (r1 ** 3))) for name in ("time_maa_k", "time_maa_r")]  # (1, 1, C)

    def params(self, as_modules: bool = False) -> ChannelMixParams:
        return param_tuple(self, ChannelMixParams, as_modules)

    def forward(self, x, x_prev=None):
        return channel_mix(self.params(as_modules=True), x, x_prev)


class Block(nn.Module):
    def __init__(self, cfg: Rwkv6Config, layer_id: int):
        super().__init__()
        self.cfg = cfg
        self.layer_id = layer_id
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd)
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(cfg, layer_id)
        self.compiled = False  # set by RWKVLM.compile_blocks

    def params(self, as_modules: bool = False) -> BlockParams:
        return param_tuple(self, BlockParams, as_modules)

    def forward(self, x, carry=None, state=None, grad_cp: bool = False):
        """block(): x (B, T, C) -> (x, None, the state after x or None); `carry` is unused
        (RWKV-6 hands nothing from one block to the next), kept for RWKVLM's one calling
        convention. Eager and compiled as RWKV-7's Block (rwkv7.py)."""
        N, impl = self.cfg.head_size, self.cfg.wkv_impl
        if self.compiled and state is None:
            fused = compile_once(_block_fused_cp if grad_cp else _block_fused)
            return fused(self.params(), x, N, impl), None, None
        x, state = block(self.params(as_modules=True), x, state, N, impl)
        return x, None, state


class RWKV6(RWKVLM):
    """The RWKV-6 model: RWKVLM's shell (model/lm.py) around x060 blocks."""

    block_cls = Block
    count_params = staticmethod(count_params_x060)
    LR_2X = ("att.time_decay",)  # RWKV-LM's layerwise_lr: time_decay at 2x (its LoRAs at 1x)

    @staticmethod
    def matrix_gain(name: str) -> float:
        """RWKV-LM's x060 init: att.output, ffn.value and ffn.receptance start at zero, att.key and
        att.gate at gain 0.1, att.receptance, att.value and ffn.key at gain 1."""
        if name.endswith(("att.output.weight", "ffn.value.weight", "ffn.receptance.weight")):
            return 0.0
        if name.endswith(("att.key.weight", "att.gate.weight")):
            return 0.1
        return 1.0
