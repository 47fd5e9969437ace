"""The model families: RWKV-7 ("x070") and RWKV-6 ("x060"), one shell (lm.py) around each's blocks.

config.py: x070's ModelConfig (shapes, LoRA sizes, reading a state dict); rwkv7.py: its block and
RWKV7; rwkv6.py: x060's Rwkv6Config, block and RWKV6; layers.py: the functional layers both are
built from; head.py: the head and its fused CE + L2Wrap loss; lm.py: the shared shell.

    mcfg = config_from_state_dict(sd, path, expect="x070")  # the family read off the keys
    model = build_model(mcfg)                                 # RWKV7 or RWKV6
"""
from __future__ import annotations

from rwkvlm.errors import UserError
from rwkvlm.model.config import ModelConfig, count_params, state_dict_shapes
from rwkvlm.model.head import head_l2wrap_loss
from rwkvlm.model.rwkv6 import RWKV6, Rwkv6Config
from rwkvlm.model.rwkv7 import RWKV7

__all__ = ["MODEL_TYPES", "RWKV6", "RWKV7", "ModelConfig", "Rwkv6Config", "build_model", "config_from_state_dict",
           "count_params", "describe_type", "head_l2wrap_loss", "model_type_of", "other_type",
           "state_dict_shapes"]

# MODEL_TYPE (--my_testing) -> (family name, config class, model class)
MODEL_TYPES = {"x070": ("RWKV-7", ModelConfig, RWKV7), "x060": ("RWKV-6", Rwkv6Config, RWKV6)}


def model_type_of(sd: dict) -> str | None:
    """"x070" or "x060" by the keys of a state dict (RWKV-7's att.r_k, RWKV-6's att.time_maa_x and
    att.time_faaaa), None for neither."""
    if "blocks.0.att.r_k" in sd:
        return "x070"
    if "blocks.0.att.time_maa_x" in sd and "blocks.0.att.time_faaaa" in sd:
        return "x060"
    return None


def describe_type(model_type: str) -> str:
    """'RWKV-7 (x070)'."""
    return f"{MODEL_TYPES[model_type][0]} ({model_type})"


def other_type(what, found: str, expect: str) -> UserError:
    """The one message for a checkpoint of the other model type than the run's MODEL_TYPE."""
    return UserError(f"{what} is an {describe_type(found)} checkpoint, but MODEL_TYPE (--my_testing) is {expect}, "
                     f"an {describe_type(expect)} model. Set MODEL_TYPE=\"{found}\" in both demo-training scripts "
                     f"to train it, or use an {expect} checkpoint (for a new {expect} model: a new PROJ_DIR and "
                     f"demo-training-prepare.sh).")


def config_from_state_dict(sd: dict, path=None, expect: str | None = None, **kw):
    """The config of an x070 or x060 state dict, read off its shapes and checked name by name.
    With `expect` (the run's MODEL_TYPE), a checkpoint of the other type raises a UserError
    naming both; a dict of neither type gets x070's message (what an RWKV-7 file holds)."""
    found = model_type_of(sd) if isinstance(sd, dict) else None
    if expect is not None and found is not None and found != expect:
        raise other_type(path if path is not None else "the state dict", found, expect)
    cls = MODEL_TYPES[found or "x070"][1]
    return cls.from_state_dict(sd, path, **kw)


def build_model(mcfg):
    """RWKV7 for a ModelConfig, RWKV6 for an Rwkv6Config."""
    return MODEL_TYPES[mcfg.model_type][2](mcfg)
