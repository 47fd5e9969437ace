"""Helpers for the training tests: tiny data sets and train.py argument lists."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN_TEMP = REPO / "RWKV-v7" / "train_temp"
MAKE_DATA = REPO / "RWKV-v5" / "make_data.py"

# A tiny model that trains fast on 2 CPU cores.
TINY = ["--n_layer", "2", "--n_embd", "64", "--head_size", "64", "--vocab_size", "65536"]


def make_dataset(workdir: Path, n_docs: int = 300, copies: int = 2, ctx_len: int = 64, seed: int = 0) -> dict:
    """Generate arithmetic dialogues, run make_data.py on them; return the meta dict (+ 'base')."""
    from rwkvlm.data.arithmetic import generate_documents

    workdir.mkdir(parents=True, exist_ok=True)
    src = workdir / "arith.jsonl"
    with open(src, "w", encoding="utf-8") as f:
        for text in generate_documents(n_docs, seed):
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    subprocess.run([sys.executable, str(MAKE_DATA), src.name, str(copies), str(ctx_len), "--seed", "1"],
                   cwd=workdir, check=True, capture_output=True)
    meta = json.loads((workdir / "arith.meta.json").read_text())
    meta["base"] = str(workdir / "arith")
    return meta


def run_args(meta: dict, proj: Path, *extra, ctx_len: int = 64, micro_bsz: int = 4) -> list:
    return [
        "--train_stage", "3", "--load_model", "0", "--wandb", "", "--proj_dir", str(proj),
        "--data_file", meta["base"], "--ctx_len", str(ctx_len),
        "--my_exit_tokens", str(meta["tokens"]), "--magic_prime", str(meta["magic_prime"]),
        "--micro_bsz", str(micro_bsz), *TINY, "--lr_init", "3e-3", "--lr_final", "1e-3",
        "--warmup_steps", "5", "--accelerator", "cpu", "--devices", "1", "--precision", "fp32",
        "--strategy", "auto", "--enable_progress_bar", "False", "--random_seed", "7", *extra,
    ]


def prepare_args(proj: Path, *extra) -> list:
    return ["--train_stage", "1", "--proj_dir", str(proj), "--precision", "fp32", "--random_seed", "7",
            "--accelerator", "cpu", *TINY, *extra]


def snapshot(d: Path) -> dict:
    """{relative path: (size, mtime_ns)} of every file under d."""
    if not d.exists():
        return {}
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in d.rglob("*") if p.is_file()}


def perturbed_model(n_layer: int = 2, n_embd: int = 64, vocab_size: int = 65536, seed: int = 0,
                    scale: float = 0.1):
    """A spec-initialised RWKV7 moved off its zero matrices, so every path changes the output."""
    import torch

    from rwkvlm.model import ModelConfig, RWKV7

    torch.manual_seed(seed)
    model = RWKV7(ModelConfig(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def run_make_data(cwd, *argv) -> int:
    """make_data's main through run_cli, in folder `cwd` (as `python make_data.py ...` there): its exit code."""
    import os

    from rwkvlm.data import make_data
    from rwkvlm.errors import run_cli

    old = os.getcwd()
    os.chdir(cwd)
    try:
        return run_cli(make_data.main, [str(a) for a in argv])
    finally:
        os.chdir(old)
