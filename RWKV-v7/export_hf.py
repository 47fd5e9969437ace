"""Export an RWKV-7 checkpoint to a Hugging Face folder (flash-linear-attention's RWKV7 layout).

    python export_hf.py train_temp/out/L12-D768-x070/rwkv-final.pth hf/L12-D768
    python export_hf.py train_temp/out/L12-D768-x070 hf/L12-D768    # its newest weights

The implementation is the installed `rwkvlm` package (RWKV-v7/rwkvlm/hf/); see docs/huggingface.md.
"""
import sys

try:
    from rwkvlm.errors import run_cli
    from rwkvlm.hf.cli import export_main as main
except ImportError as e:  # the package (or one of its dependencies) is not installed
    raise SystemExit(f"cannot import rwkvlm ({e}): run `pip install -e .` in the repository root.")

if __name__ == "__main__":
    sys.exit(run_cli(main))
