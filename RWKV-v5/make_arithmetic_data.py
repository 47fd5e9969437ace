"""Generate the arithmetic demo corpus: python make_arithmetic_data.py demo.jsonl --docs 20000 --seed 0

Thin wrapper around rwkvlm.data.arithmetic (see `python make_arithmetic_data.py --help`): dialogues
of sums, differences and equations in many wordings composed from tables of parts, none of the
held-out problems or held-out parts that evaluate.py tests with.
"""
import sys

try:
    from rwkvlm.data.arithmetic import main
    from rwkvlm.errors import run_cli
except ImportError:
    print("rwkvlm is not installed: run `pip install -e .` in the repository root", file=sys.stderr)
    sys.exit(1)

if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
