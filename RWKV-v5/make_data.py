"""Convert a jsonl file to RWKV binidx data: python make_data.py demo.jsonl 30 4096

Thin wrapper around rwkvlm.data.make_data (see `python make_data.py --help`).
"""
import sys

try:
    from rwkvlm.errors import run_cli
    from rwkvlm.data.make_data import main
except ImportError:
    print("rwkvlm is not installed: run `pip install -e .` in the repository root", file=sys.stderr)
    sys.exit(1)

if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
