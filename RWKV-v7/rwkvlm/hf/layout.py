"""The two layouts of one RWKV-7 model: ours (RWKV-LM's .pth) and flash-linear-attention's (Hugging Face).

Pure functions, no files. `to_fla(sd, cfg)` renames and reshapes an x070 state dict into the
tensors of `fla.models.rwkv7.RWKV7ForCausalLM` (fla 0.6.0); `from_fla(tensors, n_layer)` is its
exact inverse (bit-exact: only renames, views and transposes). `hf_config(cfg)` is the config.json
those tensors need; `config_from_hf(config, where)` reads one back and refuses what our layout
cannot hold.

The mapping, per layer l (ours `blocks.{l}.X` <-> fla `model.layers.{l}.Y`):

    ln0 (layer 0 only)           pre_norm                      as is
    ln1 / ln2                    attn_norm / ffn_norm          as is
    att.x_r .. att.x_g           attn.x_r .. attn.x_g          as is, (1, 1, C)
    att.w0 / a0 / v0             attn.{w,a,v}_lora.lora.2.bias (1, 1, C) <-> (C,)
    att.w1 / a1 / v1 / g1        attn.{w,a,v,g}_lora.lora.0.weight   transposed: (C, D) <-> (D, C)
    att.w2 / a2 / v2 / g2        attn.{w,a,v,g}_lora.lora.2.weight   transposed: (D, C) <-> (C, D)
    att.k_k / att.k_a            attn.k_k / attn.k_a           (1, 1, C) <-> (C,)
    att.r_k                      attn.r_k                      as is, (H, N)
    att.receptance/key/value/output.weight   attn.r_proj/k_proj/v_proj/o_proj.weight   as is
    att.ln_x                     attn.g_norm                   as is
    ffn.x_k                      ffn.x_k                       (1, 1, C) <-> (C,)
    ffn.key / ffn.value .weight  ffn.key / ffn.value .weight   as is

and emb.weight <-> model.embeddings.weight, ln_out <-> model.norm, head.weight <-> lm_head.weight.
fla's layer 0 has no v_lora: blocks.0.att.v0/v1/v2 (held, unused, by checkpoints of this trainer)
have no place there and travel beside it (`EXTRA_KEYS`).
"""
from __future__ import annotations

import math

import torch

from rwkvlm.errors import UserError
from rwkvlm.model.config import ModelConfig, state_dict_shapes

__all__ = ["EXTRA_KEYS", "FLA_VERSION", "fla_name", "to_fla", "from_fla", "fla_shapes", "hf_config",
           "config_from_hf", "mapping_table"]

FLA_VERSION = "0.6.0"  # the flash-linear-attention release whose RWKV7 layout this writes
EXTRA_KEYS = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")  # no place in fla's layer 0

_TOP = {"emb.weight": "model.embeddings.weight", "ln_out.weight": "model.norm.weight",
        "ln_out.bias": "model.norm.bias", "head.weight": "lm_head.weight"}
_NORMS = {"ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm"}
_PROJ = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj", "ln_x": "g_norm"}
_LORA = {"0": "lora.2.bias", "1": "lora.0.weight", "2": "lora.2.weight"}  # w0 / w1 / w2 ...

# how a tensor changes on the way to fla: "same", "flat" ((1, 1, C) -> (C,)) or "T" (transposed)
SAME, FLAT, TRANSPOSE = "same", "flat", "T"


def fla_name(name: str) -> tuple[str, str]:
    """(fla's name, the change: SAME / FLAT / TRANSPOSE) of one of our state-dict names.

    Raises KeyError for a name outside the x070 layout, and for blocks.0.att.v0/v1/v2 (EXTRA_KEYS),
    which fla's layer 0 does not have."""
    if name in _TOP:
        return _TOP[name], SAME
    if name in EXTRA_KEYS:
        raise KeyError(name)
    parts = name.split(".")
    if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit():
        raise KeyError(name)
    layer, module, rest = parts[1], parts[2], parts[3:]
    prefix = f"model.layers.{layer}."
    if module in _NORMS and rest in (["weight"], ["bias"]):
        return prefix + f"{_NORMS[module]}.{rest[0]}", SAME
    if module == "ffn":
        if rest == ["x_k"]:
            return prefix + "ffn.x_k", FLAT
        if rest in (["key", "weight"], ["value", "weight"]):
            return prefix + "ffn." + ".".join(rest), SAME
        raise KeyError(name)
    if module != "att" or not rest:
        raise KeyError(name)
    leaf = rest[0]
    if len(rest) == 1:
        if leaf in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "r_k"):
            return prefix + "attn." + leaf, SAME
        if leaf in ("k_k", "k_a"):
            return prefix + "attn." + leaf, FLAT
        if len(leaf) == 2 and leaf[0] in "wavg" and leaf[1] in "012" and leaf != "g0":
            return prefix + f"attn.{leaf[0]}_lora.{_LORA[leaf[1]]}", FLAT if leaf[1] == "0" else TRANSPOSE
    elif len(rest) == 2 and leaf in _PROJ and (rest[1] == "weight" or (leaf == "ln_x" and rest[1] == "bias")):
        return prefix + f"attn.{_PROJ[leaf]}.{rest[1]}", SAME
    raise KeyError(name)


def _to(t: torch.Tensor, change: str) -> torch.Tensor:
    if change == FLAT:
        return t.reshape(-1)
    if change == TRANSPOSE:
        return t.t().contiguous()
    return t


def _back(t: torch.Tensor, change: str) -> torch.Tensor:
    if change == FLAT:
        return t.reshape(1, 1, -1)
    if change == TRANSPOSE:
        return t.t().contiguous()
    return t


def fla_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """{fla name: shape} of the tensors to_fla makes for cfg (what RWKV7ForCausalLM holds)."""
    out = {}
    for name, shape in state_dict_shapes(cfg).items():
        if name in EXTRA_KEYS:
            continue
        new, change = fla_name(name)
        out[new] = (int(math.prod(shape)),) if change == FLAT else tuple(reversed(shape)) if change == TRANSPOSE \
            else tuple(shape)
    return out


def to_fla(sd: dict, cfg: ModelConfig) -> tuple[dict, dict]:
    """(fla's tensors, the extra tensors) of a checked x070 state dict `sd` of config `cfg`.

    Every tensor keeps its dtype and values; the fla dict follows our key order. The extras are
    blocks.0.att.v0/v1/v2 where sd has them (under our names), else empty."""
    fla, extra = {}, {}
    for name in state_dict_shapes(cfg):
        t = sd[name]
        if name in EXTRA_KEYS:
            extra[name] = t.contiguous()
            continue
        new, change = fla_name(name)
        fla[new] = _to(t, change).contiguous()
    return fla, extra


def _inverse(n_layer: int) -> dict[str, tuple[str, str]]:
    """{fla name: (our name, change)} for every name an n_layer model can have."""
    names = state_dict_shapes(ModelConfig(n_layer=n_layer, n_embd=64, vocab_size=1))
    out = {}
    for name in names:
        if name not in EXTRA_KEYS:
            new, change = fla_name(name)
            out[new] = (name, change)
    return out


def from_fla(tensors: dict, n_layer: int, where: str = "the folder") -> dict:
    """Our state dict (unordered) from fla's tensors of an n_layer model: to_fla's inverse.

    UserError naming the first tensor that has no place in the x070 layout."""
    inverse = _inverse(n_layer)
    sd = {}
    for name, t in tensors.items():
        if name not in inverse:
            hint = ""
            if name.endswith("attn.x_x"):
                hint = (" (fla's first RWKV7 layout, which packed x_r..x_g into one tensor: load and save it with fla "
                        "first)")
            elif name.startswith("model.layers.0.attn.v_lora."):
                hint = " (fla's layer 0 has no value LoRA)"
            raise UserError(f"{where}: unexpected tensor {name} (shape {tuple(t.shape)}){hint}; an RWKV7ForCausalLM "
                            f"of {n_layer} layers (config.json num_hidden_layers) has no such tensor, so it cannot "
                            f"be converted to the x070 layout.")
        ours, change = inverse[name]
        sd[ours] = _back(t, change)
    return sd


def mapping_table(n_layer: int = 2) -> list[tuple[str, str, str]]:
    """[(our name, fla name, change)] for an n_layer model, for documentation and tests."""
    return [(ours, new, change) for new, (ours, change) in _inverse(n_layer).items()]


# ---------------------------------------------------------------- config.json

# RWKV7Config fields that our layout fixes (value: what config.json must say)
_FIXED = {"hidden_act": "sqrelu", "norm_first": True, "norm_bias": True, "norm_eps": 1e-5, "attn": None}
_DEFAULTS = {  # fla 0.6.0's RWKV7Config defaults for what the model does not decide
    "attn_mode": "chunk", "max_position_embeddings": 2048, "use_cache": True, "initializer_range": 0.02,
    "fuse_norm": True, "fuse_cross_entropy": True, "fuse_linear_cross_entropy": False, "use_l2warp": True,
}
END_OF_DOC = 0  # the World vocabulary's end-of-document token (bos and eos alike)


def hf_config(cfg: ModelConfig, dtype: torch.dtype, remote_code: bool = True) -> dict:
    """config.json of the fla model of `cfg`: every RWKV7Config field, the ones the checkpoint
    decides read off cfg, the rest fla 0.6.0's defaults. With remote_code, `auto_map` names the two
    stub modules shipped beside it (they import fla), so transformers loads the model with
    trust_remote_code=True and no `import fla` first.

    pad_token_id stays null: fla gives its embedding that padding_idx, which would freeze token
    0's row (the end-of-document token, an input in every training sample) in fine-tuning."""
    C, L = cfg.n_embd, cfg.n_layer
    Dw, Da, Dv, Dg = cfg.lora_sizes
    out = {
        "architectures": ["RWKV7ForCausalLM"],
        "model_type": "rwkv7",
    }
    if remote_code:
        out["auto_map"] = {"AutoConfig": "configuration_rwkv7.RWKV7Config",
                           "AutoModel": "modeling_rwkv7.RWKV7Model",
                           "AutoModelForCausalLM": "modeling_rwkv7.RWKV7ForCausalLM"}
    out.update({
        "attn_mode": _DEFAULTS["attn_mode"],
        "hidden_size": C,
        "hidden_ratio": 4,
        "intermediate_size": cfg.dim_ffn,
        "num_hidden_layers": L,
        "head_dim": cfg.head_size,
        "num_heads": cfg.n_head,
        "decay_low_rank_dim": Dw,
        "a_low_rank_dim": Da,
        "v_low_rank_dim": Dv,
        "gate_low_rank_dim": Dg,
        "value_dim": [C] * L,
        "vocab_size": cfg.vocab_size,
        "hidden_act": _FIXED["hidden_act"],
        "norm_first": _FIXED["norm_first"],
        "norm_bias": _FIXED["norm_bias"],
        "norm_eps": _FIXED["norm_eps"],
        "attn": _FIXED["attn"],
        "tie_word_embeddings": False,
        "bos_token_id": END_OF_DOC,
        "eos_token_id": END_OF_DOC,
        "pad_token_id": None,
        "max_position_embeddings": _DEFAULTS["max_position_embeddings"],
        "use_cache": _DEFAULTS["use_cache"],
        "initializer_range": _DEFAULTS["initializer_range"],
        "fuse_norm": _DEFAULTS["fuse_norm"],
        "fuse_cross_entropy": _DEFAULTS["fuse_cross_entropy"],
        "fuse_linear_cross_entropy": _DEFAULTS["fuse_linear_cross_entropy"],
        "use_l2warp": _DEFAULTS["use_l2warp"],
        "dtype": str(dtype).removeprefix("torch."),
    })
    return out


def _int_field(config: dict, key: str, where: str, default=None) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{where}: config.json {key} is {value!r}; expected a positive integer.")
    return value


def config_from_hf(config: dict, where: str, layer0_v: bool = False) -> ModelConfig:
    """Our ModelConfig of an RWKV7 config.json (a dict), or UserError saying which field our
    layout cannot hold. Field defaults are RWKV7Config's (fla 0.6.0)."""
    if not isinstance(config, dict):
        raise UserError(f"{where}: config.json holds {type(config).__name__}, not a JSON object.")
    kind = config.get("model_type")
    if kind != "rwkv7":
        raise UserError(f"{where}: config.json model_type is {kind!r}; expected 'rwkv7' (flash-linear-attention's "
                        f"RWKV7ForCausalLM). Only RWKV-7 models convert to the x070 layout.")
    C = _int_field(config, "hidden_size", where, 2048)
    L = _int_field(config, "num_hidden_layers", where, 24)
    V = _int_field(config, "vocab_size", where, 32000)
    head_dim, heads = config.get("head_dim", 64), config.get("num_heads")
    if head_dim is None and heads is not None:
        heads = _int_field(config, "num_heads", where)
        head_dim = C // heads if C % heads == 0 else None
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0 or C % head_dim:
        raise UserError(f"{where}: config.json head_dim {config.get('head_dim')!r} (num_heads {heads!r}) does not "
                        f"split hidden_size {C} into heads; expected a head_dim dividing it, e.g. 64.")
    if C % 64:
        raise UserError(f"{where}: config.json hidden_size is {C}; the x070 layout needs a multiple of 64.")
    for key, want in _FIXED.items():
        got = config.get(key, want)
        same = math.isclose(got, want, rel_tol=1e-9) if key == "norm_eps" and isinstance(got, (int, float)) \
            else got == want
        if not same:
            raise UserError(f"{where}: config.json {key} is {got!r}; the x070 layout has {want!r} only (RWKV-7 "
                            f"blocks without the layer changes that field makes), so it cannot be converted.")
    ffn = config.get("intermediate_size")
    if ffn is None:
        ratio = config.get("hidden_ratio") or 4
        ffn = 32 * ((int(C * ratio) + 31) // 32)
    if ffn != 4 * C:
        raise UserError(f"{where}: config.json intermediate_size is {ffn} (hidden_ratio "
                        f"{config.get('hidden_ratio')!r}); the x070 layout has 4 * hidden_size = {4 * C}.")
    value_dim = config.get("value_dim")
    if value_dim is not None and value_dim != C and value_dim != [C] * L:
        raise UserError(f"{where}: config.json value_dim is {value_dim!r}; the x070 layout has value_dim = hidden_size "
                        f"({C}) in every layer.")
    if config.get("tie_word_embeddings", False) not in (False, True):
        raise UserError(f"{where}: config.json tie_word_embeddings is {config.get('tie_word_embeddings')!r}; "
                        f"expected true or false.")
    lora = {"lora_w": _int_field(config, "decay_low_rank_dim", where, 64),
            "lora_a": _int_field(config, "a_low_rank_dim", where, 64),
            "lora_v": _int_field(config, "v_low_rank_dim", where, 16),
            "lora_g": _int_field(config, "gate_low_rank_dim", where, 128)}
    try:
        return ModelConfig(n_layer=L, n_embd=C, vocab_size=V, head_size=head_dim, layer0_v=layer0_v, **lora)
    except UserError as e:
        raise UserError(f"{where}: config.json describes a model the x070 layout cannot hold: {e}") from None
