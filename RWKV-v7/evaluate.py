"""Held-out arithmetic accuracy of RWKV-7 checkpoints, by kind (greedy, exact match), on training's
wordings (seen) and on wordings with parts training never uses (unseen).

    python evaluate.py train_temp/out/L12-D768-x070/rwkv-final.pth
    python evaluate.py train_temp/out/L12-D768-x070 --last 3 --show-errors --json eval.json
    python evaluate.py train_temp/out/L12-D768-x070/rwkv-final.pth --n 4000 --split unseen

The implementation is the installed `rwkvlm` package (RWKV-v7/rwkvlm/infer/evaluate.py).
"""
import sys

try:
    from rwkvlm.errors import run_cli
    from rwkvlm.infer.evaluate import main
except ImportError as e:  # the package (or one of its dependencies) is not installed
    raise SystemExit(f"cannot import rwkvlm ({e}): run `pip install -e .` in the repository root.")

if __name__ == "__main__":
    sys.exit(run_cli(main))
