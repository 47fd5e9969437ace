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
from functools import partial

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from rwkvlm.model.head import Head
from rwkvlm.model.layers import filled, orthogonal_, zeros

__all__ = ["RWKVLM"]


def _owns_storage(t: torch.Tensor) -> bool:
    """Whether t is all of its storage (not a view of a larger tensor)."""
    return t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


class RWKVLM(nn.Module):
    """The shell of a family's model (see the module's docstring). A family sets `block_cls`,
    `count_params` and `matrix_gain`."""

    block_cls: type = None

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        here = torch.get_default_device()  # torch.device("meta"): a model without memory (from_weights)
        self.emb = nn.utils.skip_init(nn.Embedding, cfg.vocab_size, cfg.n_embd, device=here)
        with torch.no_grad():
            self.emb.weight.zero_()
        self.blocks = nn.ModuleList(self.block_cls(cfg, i) for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.utils.skip_init(Head, cfg.n_embd, cfg.vocab_size, bias=False, device=here)
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
        block matrix orthogonal with the family's gain (matrix_gain), in state-dict order
        (init_steps)."""
        params = dict(self.named_parameters())
        for name, fill in self.init_steps():
            fill(params[name])

    def init_steps(self) -> list:
        """The init pass as [(parameter name, fill)], in the order it draws random numbers: fill(t)
        sets a tensor t of that parameter's shape in place, from the generator of t's device.
        init_weights runs them on the model's parameters; initial_state_dict on fresh tensors, one
        at a time (the model may then live on the meta device: the steps read its config and
        names only). Every parameter has exactly one step."""
        cfg = self.cfg
        steps = []
        for block in self.blocks:
            b = f"blocks.{block.layer_id}."
            for ln in ("ln1", "ln2") + (("ln0",) if block.layer_id == 0 else ()):
                steps += [(f"{b}{ln}.weight", filled(1.0)), (f"{b}{ln}.bias", zeros)]
            steps += [(f"{b}att.{n}", fill) for n, fill in block.att.table_steps(randomize=True)]
            steps += [(f"{b}ffn.{n}", fill) for n, fill in block.ffn.table_steps()]
        steps += [("ln_out.weight", filled(1.0)), ("ln_out.bias", zeros)]

        V, C = cfg.vocab_size, cfg.n_embd
        for name, p in self.named_parameters():
            if "ln_" in name or ".ln" in name or ".weight" not in name:
                continue  # table value (above)
            if name == "emb.weight":
                steps.append((name, lambda t: t.uniform_(-1e-4, 1e-4)))
            elif name == "head.weight":
                steps.append((name, partial(orthogonal_, gain=0.5 * math.sqrt(V / C) if V > C else 0.5)))
            elif p.dim() == 2:
                gain = self.matrix_gain(name)
                steps.append((name, zeros if gain == 0 else partial(orthogonal_, gain=gain)))
            else:
                raise AssertionError(f"init_weights: no rule for {name} {tuple(p.shape)}")
        return steps

    @classmethod
    @torch.no_grad()
    def initial_state_dict(cls, cfg, dtype: torch.dtype = torch.float32, device="cpu") -> dict:
        """The state dict of a freshly initialised model (what init_weights() then state_dict()
        give, in `dtype`), made tensor by tensor: each parameter is drawn in fp32 on `device`,
        converted to `dtype` on the CPU, and its fp32 tensor freed. No model is held beside the
        result, so the host memory is the dict in `dtype` plus one parameter's init at a time.

        On the CPU the values are init_weights' bit for bit (its fp32 values, rounded to `dtype`
        as the saves round them), for the same seed and number of CPU threads. On a GPU
        (device "cuda") the random values come from the GPU's generator and QR: deterministic
        for a seed, but not the CPU's values."""
        with torch.device("meta"):
            model = cls(cfg)
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        out = {}
        for name, fill in model.init_steps():
            t = torch.empty(shapes[name], dtype=torch.float32, device=device)
            fill(t)
            out[name] = t.to("cpu", dtype)
            del t
        if set(out) != set(shapes):
            raise AssertionError(f"init_steps: no step for {sorted(set(shapes) - set(out))[:3]}")
        return {k: out[k] for k in shapes}  # state-dict order

    @classmethod
    @torch.no_grad()
    def from_weights(cls, cfg, sd: dict, check=None) -> "RWKVLM":
        """A model holding `sd`'s weights in fp32, built without an init pass: its modules are made
        on the meta device and take the weights as their parameters (an fp32 tensor of `sd` as it
        is; others converted one at a time, each dropped from `sd` once converted, so the host
        holds about one copy). `check(model)` runs on the empty model first (names and shapes:
        rwkvlm.rundir.weights.check_weights_fit). The result equals building the model, then
        load_state_dict({k: v.float()}) (`sd` is emptied)."""
        with torch.device("meta"):
            model = cls(cfg)
        if check is not None:
            check(model)
        fp32, seen = {}, set()
        for k in list(sd):
            v = sd.pop(k)
            if v.dtype != torch.float32:
                v = v.float()
            elif not _owns_storage(v) or v.untyped_storage().data_ptr() in seen:
                v = v.clone()  # a view or a tensor shared with another name: a parameter of its own
            seen.add(v.untyped_storage().data_ptr())
            fp32[k] = v
        model.load_state_dict(fp32, assign=True)
        return model

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
