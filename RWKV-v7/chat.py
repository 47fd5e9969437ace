"""Chat with a pre-trained RWKV-7 checkpoint (the tutorial's "Test the pre-trained model").

    python chat.py train_temp/out/L12-D768-x070/rwkv-final.pth
    python chat.py train_temp/out/L12-D768-x070/rwkv-final.pth --prompt "12 + 7 = ?" --temperature 0
    python chat.py train_temp/out/L12-D768-x070     # its newest weights (rwkv-final, -latest or -N.pth)

The implementation is the installed `rwkvlm` package (RWKV-v7/rwkvlm/infer/generate.py).
"""
import sys

try:
    from rwkvlm.errors import run_cli
    from rwkvlm.infer.chat import chat_main as main
except ImportError as e:  # the package (or one of its dependencies) is not installed
    raise SystemExit(f"cannot import rwkvlm ({e}): run `pip install -e .` in the repository root.")

if __name__ == "__main__":
    sys.exit(run_cli(main))
