"""The RWKV-7 "x070" model's shapes: ModelConfig, the LoRA sizes, reading a config off a state dict.

State-dict names and shapes are the checkpoint format of RWKV-v7/docs/rwkv7-x070.md (no wrapper
prefixes). `ModelConfig.from_state_dict` reads any x070 file (ours or a released one) and checks
every name and shape against the model its config builds; `state_dict_shapes` and `count_params`
give what RWKV7(cfg) holds without building it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from rwkvlm.errors import UserError

__all__ = ["LORA_FACTORS", "LORA_NAMES", "ModelConfig", "count_params", "state_dict_shapes"]


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

    model_type = "x070"
    family = "RWKV-7"

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
                        + f"; {expect}. This trainer loads RWKV-7 (x070) and RWKV-6 (x060: blocks.N.att.time_maa_x "
                          f"and time_faaaa) checkpoints.")
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
