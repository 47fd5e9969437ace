"""Checks of the training data against the settings, before any training work.

Each mistake the tutorial's FAQ lists (wrong data_file, CTX_LEN not the one of
make_data, wrong --my_exit_tokens / --magic_prime) gets a message with the
value found, the value expected and the line to paste into the run script.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from rwkvlm.errors import UserError


def _right_line(n_tokens: int, ctx_len: int, p: int | None) -> str:
    """The make_data line for this data (p: its magic_prime at ctx_len, None when too short)."""
    if p is None:
        return f"(this data is too short for ctx_len {ctx_len}: it needs at least {3 * ctx_len} tokens)"
    return f"--my_exit_tokens {n_tokens} --magic_prime {p} --ctx_len {ctx_len}"


def check_outputs(cfg) -> None:
    """Raise UserError, before any training work, for an output path that cannot be written:
    a --proj_dir that is a file (or lies under one), a --dump_samples whose folder is missing."""
    from rwkvlm.rundir import check_proj_dir

    check_proj_dir(cfg.proj_dir)
    check_dump_samples(getattr(cfg, "dump_samples", ""))


def check_dump_samples(prefix: str) -> None:
    """--dump_samples P appends to P.rank<R>.csv: P's folder must exist and be a folder."""
    if not prefix:
        return
    target = Path(f"{prefix}.rank0.csv")
    folder = target.parent
    if target.is_dir():
        raise UserError(f"--dump_samples {prefix!r} would write {target}, which is a folder; give a file name "
                        f"prefix, e.g. --dump_samples {Path(prefix) / 'samples'}.")
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise UserError(f"--dump_samples {prefix!r} writes {target.name} into {folder.absolute()}, which {what}. "
                        f"Create the folder first (mkdir -p {folder}), or give a --dump_samples path in an "
                        f"existing folder.")


def open_training_data(cfg):
    """Open cfg.data_file and check it against cfg (and the run's output paths: check_outputs).
    Returns the BinIdx.

    Raises UserError for: a missing data file, ctx_len / magic_prime that do not
    fit the data, data shorter than 3 x ctx_len, token ids that are not integers in
    [0, vocab_size).
    Warns when --my_exit_tokens differs from the tokens in the file.
    """
    from rwkvlm.data.binidx import BinIdx
    from rwkvlm.data.magic_prime import is_prime, magic_prime
    from rwkvlm.data.make_data import read_meta

    check_outputs(cfg)
    base = Path(cfg.data_file)
    if base.suffix in (".bin", ".idx"):
        raise UserError(
            f"data_file is {cfg.data_file!r}: give the path WITHOUT the extension "
            f"(data_file={str(base.with_suffix(''))!r}); the .bin/.idx pair is found from it."
        )
    bin_path, idx_path = Path(str(base) + ".bin"), Path(str(base) + ".idx")
    missing = [str(p.resolve()) for p in (bin_path, idx_path) if not p.is_file()]
    if missing:
        raise UserError(
            f"data_file {cfg.data_file!r} not found: tried {' and '.join(missing)} "
            f"(working directory {Path.cwd()}). Set data_file in the script to the make_data output "
            f"path without extension, relative to RWKV-v7/train_temp or absolute, "
            f"e.g. data_file=\"../../RWKV-v5/demo\"."
        )
    data = BinIdx(str(base))
    n = int(data.num_tokens)
    ctx = cfg.ctx_len

    if n < 3 * ctx:
        raise UserError(
            f"{bin_path} holds {n} tokens, fewer than 3 x ctx_len = {3 * ctx}. Add data, use more copies "
            f"in make_data.py (its second argument), or lower CTX_LEN."
        )

    meta = read_meta(str(base))
    p = cfg.magic_prime
    want = magic_prime(n, ctx)
    right = _right_line(n, ctx, want)
    if meta is not None and meta.get("ctx_len") and int(meta["ctx_len"]) != ctx:
        if p != want:
            raise UserError(
                f"CTX_LEN is {ctx} but {bin_path.name} was prepared for ctx_len {meta['ctx_len']} "
                f"(make_data.py ... {meta['ctx_len']}). Either set CTX_LEN=\"{meta['ctx_len']}\", or keep "
                f"{ctx} and use the numbers for it: {right}"
            )
        warnings.warn(
            f"training at ctx_len {ctx} on data prepared for ctx_len {meta['ctx_len']} "
            f"(your --magic_prime fits ctx_len {ctx}, so this works).",
            stacklevel=2,
        )

    if p != want:
        why = []
        if p <= 0:
            why.append("it is not set")
        else:
            if not is_prime(p):
                why.append(f"{p} is not prime")
            if p % 3 != 2:
                why.append(f"{p} is not of the form 3n+2 ({p} mod 3 = {p % 3})")
            if not why:
                why.append(f"{p} is not the magic_prime of this data at ctx_len {ctx} (expected {want})")
        raise UserError(
            f"--magic_prime is wrong: {'; '.join(why)}. For {bin_path.name} ({n} tokens) at ctx_len {ctx} "
            f"use this line (make_data.py prints it):\n    {right}"
        )

    if cfg.my_exit_tokens != n:
        warnings.warn(
            f"--my_exit_tokens is {cfg.my_exit_tokens} but {bin_path.name} holds {n} tokens: training will "
            f"run for {cfg.my_exit_tokens / n:.3g} passes over the data. For exactly one pass use: {right}",
            stacklevel=2,
        )

    from_file = cfg.load_model if cfg.train_stage == 3 and cfg.load_model not in ("", "0") else None
    check_token_ids(data.tokens, cfg.vocab_size, bin_path.name, model_file=from_file)
    return data


def check_token_ids(tokens, vocab_size: int, name: str, chunk: int = 1 << 26, model_file=None) -> None:
    """Raise UserError unless every token id is an integer in [0, vocab_size).

    Reads the data only when its dtype can hold ids outside that range (make_data's
    uint16 with the World vocabulary of 65536 never can).
    """
    dtype = np.dtype(tokens.dtype)
    if dtype.kind not in "iu":
        raise UserError(
            f"{name} stores its tokens as {dtype} numbers, but token ids are integers. Re-create the data "
            f"with make_data.py, which writes uint16 token ids.")
    info = np.iinfo(dtype)
    if info.min >= 0 and info.max < vocab_size:
        return
    lo, hi = 0, 0
    for i in range(0, len(tokens), chunk):
        part = np.asarray(tokens[i : i + chunk])
        lo, hi = min(lo, int(part.min())), max(hi, int(part.max()))
    if lo < 0:
        raise UserError(
            f"{name} holds the negative token id {lo} (its dtype is {dtype}"
            + (", which stores ids above 32767 as negative numbers" if dtype == np.dtype("<i2") else "")
            + "). Re-create the data with make_data.py, which writes uint16 token ids.")
    if hi >= vocab_size and model_file is not None:
        raise UserError(
            f"{name} holds token id {hi}, but the model of --load_model {model_file} has a vocabulary of "
            f"{vocab_size} tokens (its emb.weight has shape ({vocab_size}, n_embd)); it needs at least {hi + 1}. "
            f"Use a checkpoint made for this data's tokenizer (65536: the World vocabulary), or data "
            f"tokenized for this model's vocabulary. Nothing was written.")
    if hi >= vocab_size:
        raise UserError(
            f"{name} holds token id {hi} but --vocab_size is {vocab_size}. Use "
            f"--vocab_size {max(65536, hi + 1)} (65536 for the World vocabulary), or re-run make_data.py."
        )
