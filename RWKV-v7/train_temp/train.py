"""RWKV-7 pre-training entry point (called by demo-training-prepare.sh / demo-training-run.sh).

The implementation is the installed `rwkvlm` package (RWKV-v7/rwkvlm/).
"""
try:
    from rwkvlm.train.run import cli
except ImportError as e:  # the package is not installed
    raise SystemExit(f"cannot import rwkvlm ({e}): run `pip install -e .` in the repository root first.")

if __name__ == "__main__":
    cli()
