"""What both model families (RWKV-7 "x070", RWKV-6 "x060") share: the language-model shell around
their blocks.

    emb -> blocks (ln0 first in layer 0) -> ln_out -> head

RWKVLM holds the embedding, the blocks of its family (`block_cls`), ln_out and the head, and
gives every family the same calls: init_weights(), compile_blocks(), forward(idx) -> logits,
loss(idx, targets) (the head's fused CE + L2Wrap), zero_state(B) and forward_rnn(idx, state)
(one or more tokens with a carried state). A block is called as
`blk(x, carry, state=None, grad_cp=False) -> (x, carry, state)`: `carry` is what one block hands
the next (RWKV-7's v_first, layer 0's value; None in RWKV-6) and `state` one layer's recurrent
state, (att shift x (B, C), WKV state (B, H, N, N) fp32, ffn shift x (B, C)).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from rwkvlm.model.head import Head
from rwkvlm.model.layers import orthogonal_

__all__ = ["RWKVLM"]


class RWKVLM(nn.Module):
    """The shell of a family's model (see the module's docstring). A family sets `block_cls`,
    `count_params` and `matrix_gain`."""

    block_cls: type = None

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.utils.skip_init(nn.Embedding, cfg.vocab_size, cfg.n_embd)
        with torch.no_grad():
            self.emb.weight.zero_()
        self.blocks = nn.ModuleList(self.block_cls(cfg, i) for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.utils.skip_init(Head, cfg.n_embd, cfg.vocab_size, bias=False)
        with torch.no_grad():
            self.head.weight.zero_()

    @staticmethod
    def matrix_gain(name: str) -> float:
        """The orthogonal-init gain of a block's weight matrix `name` (0: zeros)."""
        raise NotImplementedError

    def compile_blocks(self) -> None:
        """Run each block as one torch.compile'd function of plain tensors, and the head loss's
        per-chunk softmax work compiled too.

        Inside a block the compiler fuses the layer norms, token shift and mixing, LoRAs,
        normalisation, ln_x, gating, squared ReLU and the residual adds around the matmuls, and
        the WKV op runs as an opaque custom op (the CUDA kernel on GPU, the PyTorch path with
        --wkv_impl torch or on CPU); one compiled call per block replaces dozens of separately
        launched ops, which is what bounds small-batch steps. The weights are read directly
        rather than through the modules' forward, so compiled blocks are not for DeepSpeed
        ZeRO-3 (--compile auto leaves them off there). Names, shapes and results are unchanged.
        """
        for block in self.blocks:
            block.compiled = True
        self.head.compiled = True

    # ---------------------------------------------------------------------------------------
    # init
    # ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """The family's whole-model init pass, in place; deterministic given torch.manual_seed.

        Layer norms 1 / 0; each block's table values (and its random LoRA parts); then emb
        uniform(+-1e-4), head orthogonal (gain 0.5 * sqrt(V / C) when V > C, else 0.5), and each
        block matrix orthogonal with the family's gain (matrix_gain), in state-dict order."""
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
                orthogonal_(p, 0.5 * math.sqrt(V / C) if V > C else 0.5)
            elif p.dim() == 2:
                gain = self.matrix_gain(name)
                if gain == 0:
                    p.zero_()
                else:
                    orthogonal_(p, gain)
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
        carry = None
        use_cp = self.cfg.grad_cp and torch.is_grad_enabled()
        for blk in self.blocks:
            if use_cp and not blk.compiled:
                x, carry, _ = checkpoint(blk, x, carry, use_reentrant=False)
            else:  # a compiled block checkpoints inside its graph
                x, carry, _ = blk(x, carry, grad_cp=use_cp)
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
        carry = None
        new_state = []
        for blk, layer_state in zip(self.blocks, state):
            x, carry, layer_state = blk(x, carry, state=layer_state)
            new_state.append(layer_state)
        if last_only:
            x = x[:, -1:]  # (B, 1, C): the head is most of the work of a prefill
        logits = self.head(self.ln_out(x))  # (B, T, V)
        return logits, new_state
