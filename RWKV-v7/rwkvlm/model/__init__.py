"""The RWKV-7 ("x070") model.

config.py: ModelConfig (shapes, LoRA sizes, reading a state dict); layers.py: the functional
layers and init helpers blocks are built from; head.py: the head and its fused CE + L2Wrap loss;
rwkv7.py: one functional block and the RWKV7 module.
"""
from rwkvlm.model.config import ModelConfig, count_params, state_dict_shapes
from rwkvlm.model.head import head_l2wrap_loss
from rwkvlm.model.rwkv7 import RWKV7

__all__ = ["RWKV7", "ModelConfig", "count_params", "head_l2wrap_loss", "state_dict_shapes"]
