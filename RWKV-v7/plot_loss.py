"""Plot the training loss (and learning rate) of a PROJ_DIR to <PROJ_DIR>/loss.png.

    python plot_loss.py train_temp/out/L12-D768-x070

The implementation is the installed `rwkvlm` package (RWKV-v7/rwkvlm/infer/plot.py).
"""
import sys

try:
    from rwkvlm.errors import run_cli
    from rwkvlm.infer.plot import main
except ImportError as e:  # the package (or one of its dependencies) is not installed
    raise SystemExit(f"cannot import rwkvlm ({e}): run `pip install -e .` in the repository root.")

if __name__ == "__main__":
    sys.exit(run_cli(main))
