"""Hand trained models to the Hugging Face ecosystem: flash-linear-attention's RWKV7 layout.

convert.py: export_hf (an x070 .pth -> a folder fla's RWKV7ForCausalLM and transformers load) and
import_hf (such a folder -> a .pth our trainer and the rwkv package load; bit-exact for an export);
layout.py: the name mapping, reshapes and config.json (no files); cli.py: the two scripts
(RWKV-v7/export_hf.py, RWKV-v7/import_hf.py); parity.py: logits and greedy generation of fla
against ours (needs fla on a CUDA GPU); cpu.py: fla's RWKV7 on a CPU (PyTorch stand-ins for its
Triton kernels; `python -m rwkvlm.hf.cpu lm_eval ...`); chartok.py: a char-level model's vocab.json as
a tokenizer.json; tokenization_rwkv_world.py: the World tokenizer for transformers, copied into every
World-vocabulary export (never imported here). How to use them:
RWKV-v7/docs/huggingface.md.
"""
from rwkvlm.hf.convert import ExportResult, export_hf, import_hf, is_export
from rwkvlm.hf.layout import fla_name, hf_config, mapping_table

__all__ = ["ExportResult", "export_hf", "import_hf", "is_export", "fla_name", "hf_config", "mapping_table"]
