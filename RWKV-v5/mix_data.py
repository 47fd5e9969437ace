"""Print the train.py line for a weighted mix of binidx files:

    python mix_data.py web code math --weights 0.7,0.2,0.1 --ctx_len 4096

Thin wrapper around rwkvlm.data.mix (see `python mix_data.py --help` and RWKV-v7/docs/data.md).
"""
import sys

try:
    from rwkvlm.errors import run_cli
    from rwkvlm.data.mix import main
except ImportError:
    print("rwkvlm is not installed: run `pip install -e .` in the repository root", file=sys.stderr)
    sys.exit(1)

if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
