"""The RWKV-7 "x070" model: one functional block, the modules that hold its parameters, RWKV7.

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

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rwkvlm.model.config import ModelConfig, count_params
from rwkvlm.model.lm import RWKVLM
from rwkvlm.model.layers import (HeadGroupNorm, Norm, compile_once, filled, group_norm, layer_norm, linear,
                                 orthogonal_spec_, param_tuple, put, run_steps, shift, zero_linear, zeros)
from rwkvlm.ops.wkv7 import wkv7
from rwkvlm.ops.wkv7.cuda import wkv7_op

__all__ = ["RWKV7", "block", "time_mix", "channel_mix"]


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


# ============================================================================================
# Modules: the parameters (state-dict names and shapes), their initial values, and which of
# the block's functions runs them
# ============================================================================================

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
        self.receptance = zero_linear(C, C)
        self.key = zero_linear(C, C)
        self.value = zero_linear(C, C)
        self.output = zero_linear(C, C)
        self.ln_x = HeadGroupNorm(C, N)
        self.init_table()
    @torch.no_grad()
    def init_table(self, randomize: bool = False) -> None:
        """The spec's per-parameter table values; random LoRA w2/a2/v2/g2 only when randomize."""
        run_steps(self, self.table_steps(randomize))

    def table_steps(self, randomize: bool = False) -> list:
        """init_table as [(parameter name, fill)], in the order it draws random numbers (fill(t) sets
        a tensor of that parameter's shape in place; the values are computed on the CPU in float64)."""
        cfg, l = self.cfg, self.layer_id
        C, L, N = cfg.n_embd, cfg.n_layer, cfg.head_size
        n = torch.arange(C, dtype=torch.float64)
        d = n / C                                   # (C,)
        lin = n / (C - 1) - 0.5                     # (C,)
        z = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
        zig = z * z.abs()                           # (C,)
        r0 = l / (L - 1) if L > 1 else 0.0          # 0 .. 1
        r1 = 1.0 - l / L                            # 1 .. almost 0
        www = -6 + 6 * (n / (C - 1)) ** (1 + r0 ** 0.3)

        steps = [(name, put(1.0 - d ** (e * r1))) for name, e in (
            ("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2))]
        steps.append(("w0", put(www + 0.5 + 2.5 * zig)))
        steps.append(("a0", put(-0.19 + 0.3 * zig + 0.4 * lin)))
        if self.v0 is not None:
            steps.append(("v0", put(0.73 - 0.4 * lin)))
        steps += [("k_k", put(0.71 - 0.1 * lin)), ("k_a", filled(1.02)), ("r_k", filled(-0.04))]
        steps += [(name, zeros) for name in ("w1", "a1", "v1", "g1") if getattr(self, name) is not None]
        for name in ("w2", "a2", "v2", "g2"):
            if getattr(self, name) is not None:
                steps.append((name, (lambda t: orthogonal_spec_(t, 0.1)) if randomize else zeros))
        steps += [("ln_x.weight", filled(((1 + l) / L) ** 0.7)), ("ln_x.bias", zeros)]
        return steps

    def params(self, as_modules: bool = False) -> TimeMixParams:
        return param_tuple(self, TimeMixParams, as_modules)

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
        self.key = zero_linear(C, cfg.dim_ffn)
        self.value = zero_linear(cfg.dim_ffn, C)
        self.init_table()

    @torch.no_grad()
    def init_table(self) -> None:
        run_steps(self, self.table_steps())

    def table_steps(self) -> list:
        """init_table as [(parameter name, fill)] (no random numbers)."""
        C, L = self.cfg.n_embd, self.cfg.n_layer
        r1 = 1.0 - self.layer_id / L
        d = torch.arange(C, dtype=torch.float64) / C
        return [("x_k", put(1.0 - d ** (r1 ** 4)))]  # (1, 1, C)

    def params(self, as_modules: bool = False) -> ChannelMixParams:
        return param_tuple(self, ChannelMixParams, as_modules)

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
        return param_tuple(self, BlockParams, as_modules)

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
            fused = compile_once(_block_fused_cp if grad_cp else _block_fused)
            x, v_first = fused(self.params(), x, v_first, N, impl)
            return x, v_first, None
        return block(self.params(as_modules=True), x, v_first, state, N, impl)


class RWKV7(RWKVLM):
    """The RWKV-7 model: RWKVLM's shell (model/lm.py) around x070 blocks."""

    block_cls = Block
    count_params = staticmethod(count_params)
    LR_2X = ("att.w0",)  # the optimiser's 2x learning-rate group (train/optim.py)

    @staticmethod
    def matrix_gain(name: str) -> float:
        """att.output and ffn.value start at zero, att.key at gain 0.1; att.receptance, att.value
        and ffn.key at the plain gain 1."""
        if name.endswith("att.output.weight") or name.endswith("ffn.value.weight"):
            return 0.0
        if name.endswith("att.key.weight"):
            return 0.1
        return 1.0
