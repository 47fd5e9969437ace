"""Convert a Hugging Face folder of flash-linear-attention's RWKV7ForCausalLM back to an x070 .pth.

    python import_hf.py hf/L12-D768 rwkv-imported.pth

The .pth is in the RWKV-LM layout (train.py --load_model, chat.py, evaluate.py, the rwkv package).
The implementation is the installed `rwkvlm` package (RWKV-v7/rwkvlm/hf/); see docs/huggingface.md.
"""
import sys

try:
    from rwkvlm.errors import run_cli
    from rwkvlm.hf.cli import import_main as main
except ImportError as e:  # the package (or one of its dependencies) is not installed
    raise SystemExit(f"cannot import rwkvlm ({e}): run `pip install -e .` in the repository root.")

if __name__ == "__main__":
    sys.exit(run_cli(main))
