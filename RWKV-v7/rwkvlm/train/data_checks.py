"""Checks of the training data against the settings, before any training work.

Each mistake the tutorial's FAQ lists (wrong data_file, CTX_LEN not the one of
make_data, wrong --my_exit_tokens / --magic_prime) gets a message with the
value found, the value expected and the line to paste into the run script.

The data a run trains from (`open_training_data`): a binidx file (make_data.py's output),
plain text (--data_type utf-8: rwkvlm.data.text, tokenized in memory) or a weighted mix of
binidx files (rwkvlm.data.mix); `resolve_data` also settles --vocab_size 0 (a character
vocabulary: its size) and checks PROJ_DIR/vocab.json; `open_val_data` the --val_data_file.
Nothing here writes in PROJ_DIR.
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
    Returns a BinIdx (binidx), a rwkvlm.data.text.TextData (--data_type utf-8) or a
    rwkvlm.data.mix.DataMix (a mix); each has .num_tokens, the first two .tokens.
    """
    from rwkvlm.data.mix import is_mix

    check_outputs(cfg)
    if is_mix(cfg.data_file):
        return open_mix_data(cfg)
    if cfg.data_type == "utf-8":
        data = load_text(cfg)
        check_text_data(cfg, data)
        return data
    return open_binidx_data(cfg)


def open_binidx_data(cfg):
    """Open the binidx cfg.data_file and check it against cfg. Returns the BinIdx.

    Raises UserError for: a missing data file, ctx_len / magic_prime that do not
    fit the data, data shorter than 3 x ctx_len, token ids that are not integers in
    [0, vocab_size).
    Warns when --my_exit_tokens differs from the tokens in the file.
    """
    from rwkvlm.data.binidx import BinIdx
    from rwkvlm.data.magic_prime import magic_prime
    from rwkvlm.data.make_data import read_meta

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

    _check_prime(p, want, n, ctx, bin_path.name, right, "make_data.py prints it")
    _check_exit_tokens(cfg, n, bin_path.name, right)

    from_file = cfg.load_model if cfg.train_stage == 3 and cfg.load_model not in ("", "0") else None
    check_token_ids(data.tokens, cfg.vocab_size, bin_path.name, model_file=from_file)
    return data


def _check_prime(p: int, want, n: int, ctx: int, name: str, right: str, who: str) -> None:
    """UserError with the right line unless --magic_prime p is `want`, the magic prime of n tokens."""
    from rwkvlm.data.magic_prime import is_prime

    if p == want:
        return
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
        f"--magic_prime is wrong: {'; '.join(why)}. For {name} ({n} tokens) at ctx_len {ctx} "
        f"use this line ({who}):\n    {right}"
    )


def _check_exit_tokens(cfg, n: int, name: str, right: str) -> None:
    if cfg.my_exit_tokens != n:
        warnings.warn(
            f"--my_exit_tokens is {cfg.my_exit_tokens} but {name} holds {n} tokens: training will "
            f"run for {cfg.my_exit_tokens / n:.3g} passes over the data. For exactly one pass use: {right}",
            stacklevel=3,
        )


# ---------------------------------------------------------------- text (--data_type utf-8)

def load_text(cfg):
    """Read and tokenize the text of cfg.data_file (rwkvlm.data.text): UserError for a missing,
    empty or non-UTF-8 file, or a --vocab_size below the characters it holds."""
    from rwkvlm.data.text import load_text_data

    if not cfg.data_file:
        raise UserError("--data_file is empty: with --data_type utf-8 give the .txt file (or folder of .txt "
                        "files) to train on" + (", from which --vocab_size 0 builds the character vocabulary."
                                                if cfg.vocab_size == 0 else "."))
    return load_text_data(cfg.data_file, cfg.vocab_size)


def check_text_data(cfg, data) -> None:
    """The checks of a binidx file, for tokenized text: 3 x ctx_len tokens, --magic_prime,
    --my_exit_tokens (a warning). The right line is printed by this check: make_data is not used."""
    from rwkvlm.data.magic_prime import magic_prime

    n, ctx = data.num_tokens, cfg.ctx_len
    if n < 3 * ctx:
        raise UserError(f"{data.path} holds {n} tokens ({data.characters} characters), fewer than 3 x ctx_len = "
                        f"{3 * ctx}. Add text, or lower CTX_LEN.")
    want = magic_prime(n, ctx)
    right = _right_line(n, ctx, want)
    _check_prime(cfg.magic_prime, want, n, ctx, data.name, right,
                 "the numbers of this text, tokenized as this run does")
    _check_exit_tokens(cfg, n, data.name, right)


# ---------------------------------------------------------------- a mix of binidx files

def open_mix_data(cfg):
    """Open and check every file of a --data_file mix (rwkvlm.data.mix). Returns the DataMix.

    UserError for: a malformed spec or weight, a missing or too short file, files made with
    different vocabularies, token ids outside [0, vocab_size), a --magic_prime other than 0."""
    from rwkvlm.data.make_data import read_meta
    from rwkvlm.data.mix import mix_line, open_mix

    mix = open_mix(cfg.data_file, cfg.ctx_len)
    vocabs = {}
    for s in mix.sources:
        meta = read_meta(s.entry.path) or {}
        if meta.get("vocab"):
            vocabs.setdefault(meta["vocab"], []).append(s.entry.path)
    if len(vocabs) > 1:
        listing = "; ".join(f"{v}: {', '.join(paths)}" for v, paths in vocabs.items())
        raise UserError(f"--data_file: the files of the mix were tokenized with different vocabularies ({listing}, "
                        f"their .meta.json says). Re-make them with make_data.py, or leave the odd ones out.")
    line = mix_line(mix, [s.entry.path for s in mix.sources], cfg.my_exit_tokens or None)
    if cfg.magic_prime != 0:
        raise UserError(f"--magic_prime is {cfg.magic_prime}, but --data_file is a mix of {len(mix.sources)} files: "
                        f"each file is sampled by its own magic prime (computed from its size), so set "
                        f"--magic_prime 0 (MAGIC_PRIME=\"0\"). The line for this mix (RWKV-v5/mix_data.py prints "
                        f"it):\n    {line}")
    if cfg.my_exit_tokens != mix.num_tokens:
        passes = ", ".join(f"{s.entry.path} {x:.3g}" for s, x in zip(mix.sources, mix.passes(cfg.my_exit_tokens)))
        warnings.warn(f"--my_exit_tokens is {cfg.my_exit_tokens}; the mix's files hold {mix.num_tokens} tokens in "
                      f"all. Each file's windows are read this many times over the run: {passes}.", stacklevel=2)
    from_file = cfg.load_model if cfg.train_stage == 3 and cfg.load_model not in ("", "0") else None
    for s in mix.sources:
        check_token_ids(s.tokens, cfg.vocab_size, f"{s.entry.path}.bin", model_file=from_file)
    return mix


# ---------------------------------------------------------------- the run's vocabulary

def run_vocab_name(cfg, data) -> str:
    """The name of the vocabulary the run's data was tokenized with (a .meta.json's "vocab")."""
    from rwkvlm.data.make_data import read_meta
    from rwkvlm.data.mix import DataMix
    from rwkvlm.data.text import TextData
    from rwkvlm.data.tokenizer import VOCAB_NAME

    if isinstance(data, TextData):
        return data.vocab_name
    path = data.sources[0].entry.path if isinstance(data, DataMix) else cfg.data_file
    return (read_meta(path) or {}).get("vocab") or VOCAB_NAME


def resolve_data(cfg):
    """(cfg, data): the training data opened and checked (open_training_data), cfg with
    --vocab_size 0 replaced by the character vocabulary's size, and, at train_stage 3, the
    vocabulary checked against PROJ_DIR/vocab.json (check_vocab_file)."""
    import dataclasses

    data = open_training_data(cfg)
    size = getattr(data, "vocab_size", None)
    if cfg.vocab_size == 0 and size:
        cfg = dataclasses.replace(cfg, vocab_size=size)
    if cfg.train_stage == 3:
        check_vocab_file(cfg, data)
    return cfg, data


def check_vocab_file(cfg, data) -> None:
    """At train_stage 3: a char-level run needs PROJ_DIR/vocab.json, equal to the vocabulary of its
    data; a run with the World vocabulary must not find one (the folder holds a char-level model)."""
    from rwkvlm.data.charvocab import CharVocab
    from rwkvlm.rundir import RunDir

    rd = RunDir(cfg.proj_dir)
    vocab = getattr(data, "vocab", None)
    if vocab is None:
        if rd.vocab.is_file():
            saved = CharVocab.read(rd.vocab)
            raise UserError(
                f"PROJ_DIR {rd.path} holds {rd.vocab.name}: its model is char-level, with a vocabulary of "
                f"{saved.vocab_size} characters, but this run tokenizes with the World vocabulary (--data_type "
                f"{cfg.data_type}, --vocab_size {cfg.vocab_size}). Train it on its text with --data_type utf-8 "
                f"--vocab_size 0, or give this run a new PROJ_DIR (and demo-training-prepare.sh). Nothing was "
                f"written.")
        return
    if not rd.vocab.is_file():
        raise UserError(
            f"PROJ_DIR {rd.path} has no {rd.vocab.name}: a char-level run (--data_type utf-8 --vocab_size "
            f"{0 if cfg.vocab_size == vocab.vocab_size else cfg.vocab_size}) trains the model that "
            f"demo-training-prepare.sh made for its text, and prepare writes the vocabulary there. Run "
            f"demo-training-prepare.sh with the same --data_file, --data_type utf-8 and --vocab_size first.")
    saved = CharVocab.read(rd.vocab)
    if saved != vocab:
        raise UserError(
            f"the text of --data_file {cfg.data_file!r} gives a character vocabulary unlike the one the model in "
            f"PROJ_DIR {rd.path} was made for ({rd.vocab.name}: {saved.vocab_size} characters; this text: "
            f"{vocab.vocab_size}, {saved.describe_difference(vocab)}). Train on the text it was prepared with, or "
            f"prepare a new PROJ_DIR for this text (demo-training-prepare.sh). Nothing was written.")


# ---------------------------------------------------------------- validation data

def _is_text_path(path: str) -> bool:
    p = Path(path)
    return p.suffix == ".txt" or p.is_dir()


def open_val_data(cfg, data):
    """The validation windows of --val_data_file (rwkvlm.train.validation.ValData), or None when
    validation is off. `data` is the run's training data (its vocabulary decides).

    UserError for: a missing file, one made with another vocabulary (its .meta.json's "vocab",
    or token ids >= --vocab_size), a text with characters outside the run's vocabulary, a file
    shorter than one window (ctx_len + 1 tokens)."""
    from rwkvlm.train.validation import ValData, val_token_budget, val_windows

    if not cfg.val_data_file or cfg.val_every_steps <= 0:
        return None
    path = cfg.val_data_file
    vocab = getattr(data, "vocab", None)
    if _is_text_path(path):
        from rwkvlm.data.text import load_text_data

        if vocab is None and cfg.vocab_size < 65536:
            raise UserError(f"--val_data_file {path!r} is text, but this run's vocabulary is not one text can be "
                            f"tokenized with here; give a binidx file made by make_data.py.")
        tokens = load_text_data(path, cfg.vocab_size, vocab=vocab, flag="--val_data_file").tokens
        name = path
    else:
        tokens, name = _open_val_binidx(cfg, data, path)
    starts = val_windows(len(tokens), cfg.ctx_len, val_token_budget(cfg))
    if len(starts) == 0:
        raise UserError(f"--val_data_file {path!r} holds {len(tokens)} tokens, fewer than one window of CTX_LEN + 1 = "
                        f"{cfg.ctx_len + 1}; give a larger held-out file.")
    return ValData(name=name, tokens=tokens, starts=starts, ctx_len=cfg.ctx_len)


def _open_val_binidx(cfg, data, path: str):
    from rwkvlm.data.binidx import BinIdx
    from rwkvlm.data.make_data import read_meta

    base = Path(path)
    if base.suffix in (".bin", ".idx"):
        raise UserError(f"--val_data_file is {path!r}: give the path WITHOUT the extension "
                        f"({str(base.with_suffix(''))!r}).")
    missing = [str(Path(str(base) + e).resolve()) for e in (".bin", ".idx") if not Path(str(base) + e).is_file()]
    if missing:
        raise UserError(f"--val_data_file {path!r} not found: tried {' and '.join(missing)} (working directory "
                        f"{Path.cwd()}). Give a held-out binidx file made by make_data.py (path without extension, "
                        f"relative to RWKV-v7/train_temp or absolute).")
    val = BinIdx(str(base))
    meta = read_meta(str(base)) or {}
    want = run_vocab_name(cfg, data)
    if meta.get("vocab") and meta["vocab"] != want:
        raise UserError(f"--val_data_file {path!r} was tokenized with the vocabulary {meta['vocab']!r} (its "
                        f".meta.json), but this run's is {want!r}: its loss would mean nothing. Make the held-out "
                        f"file with the run's vocabulary" + (" (for a char-level run: a .txt file)." if
                                                             getattr(data, "vocab", None) is not None else
                                                             " (make_data.py)."))
    hi = max_token_id(val.tokens)
    if hi >= cfg.vocab_size:
        raise UserError(f"--val_data_file {path!r} holds token id {hi}, but the model's vocabulary has "
                        f"{cfg.vocab_size} tokens: it was made with another vocabulary. Make the held-out file "
                        f"with the run's vocabulary (make_data.py for the World vocabulary).")
    return val.tokens, path


def max_token_id(tokens, chunk: int = 1 << 26) -> int:
    """The largest id of a token array (read in chunks)."""
    hi = -1
    for i in range(0, len(tokens), chunk):
        hi = max(hi, int(np.asarray(tokens[i:i + chunk]).max()))
    return hi


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
