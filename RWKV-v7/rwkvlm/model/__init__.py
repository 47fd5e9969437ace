"""The RWKV-7 ("x070") model: config, one functional block, the head loss (rwkv7.py)."""
from rwkvlm.model.rwkv7 import RWKV7, ModelConfig, count_params, head_l2wrap_loss

__all__ = ["RWKV7", "ModelConfig", "count_params", "head_l2wrap_loss"]
