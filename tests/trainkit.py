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
                    scale: float = 0.1, model_type: str = "x070"):
    """A spec-initialised RWKV7 (or RWKV6: model_type "x060") moved off its zero matrices, so every
    path changes the output."""
    import torch

    from rwkvlm.model import RWKV6, RWKV7, ModelConfig, Rwkv6Config

    torch.manual_seed(seed)
    if model_type == "x060":
        model = RWKV6(Rwkv6Config(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size))
    else:
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


# ---------------------------------------------------------------- text data, mixes, validation

WORDS = ("the a one cat dog bird fox sat ran saw ate on under over near mat tree hill river quick slow red "
         "blue little old and but then").split()


def write_text(path: Path, n_sentences: int = 300, seed: int = 0) -> str:
    """A few KB of generated English-like sentences (one per line) in `path`; returns the text."""
    import random

    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))).capitalize() + "." for _ in
             range(n_sentences)]
    text = "\n".join(lines) + "\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text, encoding="utf-8")
    return text


def text_numbers(path, vocab_size: int = 0, ctx_len: int = 64) -> dict:
    """{"base": path, "tokens": n, "magic_prime": p} of a text file as train.py tokenizes it, so that
    run_args(...) works for --data_type utf-8 runs."""
    from rwkvlm.data.magic_prime import magic_prime
    from rwkvlm.data.text import load_text_data

    data = load_text_data(path, vocab_size)
    return {"base": str(path), "tokens": data.num_tokens, "magic_prime": magic_prime(data.num_tokens, ctx_len),
            "vocab_size": data.vocab_size}


def char_args(args: list, vocab_size: int = 0) -> list:
    """train.py arguments with TINY's --vocab_size replaced and --data_type utf-8 added."""
    out = list(args)
    i = out.index("--vocab_size")
    out[i + 1] = str(vocab_size)
    return out + ["--data_type", "utf-8"]


def make_binidx(base: Path, n_tokens: int, seed: int = 0, vocab: str = "rwkv_vocab_v20230424",
                high: int = 65536, doc_len: int = 97) -> dict:
    """A binidx file of random tokens in documents of doc_len (token 0 after each) and its meta.json;
    returns run_args' meta dict for ctx_len 64."""
    import numpy as np

    from rwkvlm.data.binidx import write_binidx
    from rwkvlm.data.magic_prime import magic_prime

    rng = np.random.default_rng(seed)
    docs, left = [], n_tokens
    while left > 0:
        n = min(doc_len, left)
        d = rng.integers(1, high, size=n, dtype=np.int64)
        d[-1] = 0
        docs.append(d.astype(np.uint16))
        left -= n
    base.parent.mkdir(parents=True, exist_ok=True)
    tokens, _ = write_binidx(base, docs)
    meta = {"tokens": int(tokens), "ctx_len": 64, "magic_prime": magic_prime(tokens, 64), "vocab": vocab,
            "dtype": "uint16"}
    Path(str(base) + ".meta.json").write_text(json.dumps(meta))
    return dict(meta, base=str(base))


def train_main(args, stop_at=None) -> int:
    """train.py's main in this process; stop_at: stop after that step as on Ctrl-C (an exact-resume
    state is saved there), through the hook tests/test_first_run.py uses."""
    import pytest

    from rwkvlm.train.run import main
    from rwkvlm.train.saving import SaveStates

    batch_end = SaveStates.on_train_batch_end

    def on_train_batch_end(self, trainer, m, *a):
        if m.step == stop_at:
            m.stop_requested = True
        return batch_end(self, trainer, m, *a)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SaveStates, "on_train_batch_end", on_train_batch_end)
        return main([str(a) for a in args])


def same_weights(a, b) -> bool:
    import torch

    wa, wb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
