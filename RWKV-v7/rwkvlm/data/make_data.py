"""jsonl -> binidx, as RWKV-LM's make_data.py: `python make_data.py demo.jsonl 30 4096`.

Writes <name>.bin/.idx (World tokens, uint16 unless --dtype uint32, one item per
document, token 0 after each document) holding N copies of the documents, each
copy in a fresh shuffle, then prints `--my_exit_tokens T --magic_prime P --ctx_len C`
and saves the numbers to <name>.meta.json.

How: pass 1 (rwkvlm.data.tokenize_jsonl) tokenizes each input line once. The input
is cut into ranges of about a MB that end at line ends; --workers processes (all
cores by default; this process alone for one worker or an input of one range,
rwkvlm.data.workers) tokenize them, and their tokens are appended in input order
to a temporary token file, each document's end offset to a second temporary file.
Pass 2 (rwkvlm.data.copies) writes the N copies from those files, copy c in the
order of rwkvlm.data.shuffle.Shuffle(documents, --seed, c), a permutation computed
block by block. So the output depends on the input and the seed, never on the
number of workers.

Memory: a constant (the tokenizer in each process, shared by forked workers; a few
chunks in flight; pass 2's segments of documents, ~30 MB), whatever the number of
copies, documents or bytes: no array holds a value per document. Nothing appears
under the output names until all is written, and the .bin, .idx and .meta.json are
replaced as one set (binidx.BinIdxWriter.finish); the temporary files have no name,
so even a killed run leaves none behind.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from rwkvlm.atomic import (check_output_dir, existing_parent, free_bytes, human_bytes, is_write_error, remove_stale_temps,
                           write_error)
from rwkvlm.data import tokenize_jsonl
from rwkvlm.data.binidx import HEADER, BinIdx, BinIdxWriter, finish_interrupted_write, split_path
from rwkvlm.data.copies import DocEnds, TokenSource, scratch_bytes, write_copies
from rwkvlm.data.magic_prime import check_magic_prime, magic_prime
from rwkvlm.data.tokenize_jsonl import Pass1
from rwkvlm.data.tokenizer import get_tokenizer
from rwkvlm.data.workers import default_workers, worker_pool
from rwkvlm.errors import UserError
from rwkvlm.recipe import END_OF_DOC, WKV_CHUNK_LEN

DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}  # --dtype: the token files make_data writes
PREVIEW_TOKENS = 100
PROGRESS_MIN_BYTES = 8 << 20  # inputs from this size get a progress bar (on a terminal)


# ---------------------------------------------------------------- reporting

def _preview(tokenizer, data: BinIdx, name: str, i: int) -> str:
    size = int(data.sizes[i])
    ids = np.asarray(data.get(i), dtype=np.int64)
    body = ids[:-1] if size and ids[-1] == END_OF_DOC else ids
    head = "-" * 70 + f"[{name} idx {i} sz {size}]"
    if len(body) > PREVIEW_TOKENS:
        return "\n".join(
            (head, tokenizer.decode(body[:PREVIEW_TOKENS]), "· " * 30, tokenizer.decode(body[-PREVIEW_TOKENS:]))
        )
    return head + "\n" + tokenizer.decode(body)


def read_meta(path) -> dict | None:
    """The numbers make_data saved beside <path>.bin/.idx, or None if there is no sidecar."""
    meta_path = Path(str(split_path(path)) + ".meta.json")
    finish_interrupted_write(split_path(path))
    try:
        with open(meta_path, "r", encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {meta_path} ({e}); delete it or re-run make_data.py") from None
    if not isinstance(meta, dict):
        raise UserError(f"{meta_path} does not hold a JSON object; delete it or re-run make_data.py")
    return meta


def _progress(total: int, desc: str, unit: str, enabled: bool):
    from tqdm import tqdm

    # disable=None: shown only on a terminal
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, leave=False,
                disable=None if enabled else True, mininterval=0.5)


# ---------------------------------------------------------------- main

def _positive_int(name: str, value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise UserError(f"{name} must be a whole number, found {value!r}") from None
    if n < 1:
        raise UserError(f"{name} must be at least 1, found {n}")
    return n


CTX_MULTIPLE = 512  # the tutorial's ctx_len values are multiples of 512


def check_ctx_len(ctx_len: int) -> None:
    """Refuse a ctx_len that train.py (or the tutorial's recipe) would refuse later.

    Valid: a multiple of 512; below 512 also a multiple of 16 (the WKV kernel's chunk, all
    train.py needs), for quick tests with tiny models.
    """
    if ctx_len % CTX_MULTIPLE == 0 or (ctx_len < CTX_MULTIPLE and ctx_len % WKV_CHUNK_LEN == 0):
        return
    step_below = CTX_MULTIPLE if ctx_len > CTX_MULTIPLE else WKV_CHUNK_LEN
    step_above = CTX_MULTIPLE if ctx_len > CTX_MULTIPLE - WKV_CHUNK_LEN else WKV_CHUNK_LEN
    near = [x for x in (ctx_len // step_below * step_below, (ctx_len // step_above + 1) * step_above) if x > 0]
    raise UserError(
        f"ctx_len (3rd argument) is {ctx_len}; it must be a multiple of {CTX_MULTIPLE}, as in the tutorial "
        f"(train.py's --ctx_len needs a multiple of {WKV_CHUNK_LEN}, the WKV kernel's chunk; below {CTX_MULTIPLE} "
        f"any multiple of {WKV_CHUNK_LEN} works, for quick tests with tiny models). Use "
        f"{' or '.join(map(str, near))}, and the same CTX_LEN in the training scripts."
    )


def output_bytes(doc_tokens: int, n_docs: int, copies: int, itemsize: int = 2) -> tuple[int, int]:
    """(.bin bytes, .idx bytes) of `copies` copies of documents holding doc_tokens tokens."""
    items = n_docs * copies
    return doc_tokens * copies * itemsize, HEADER.size + 12 * items + 8 * (items + 1)


def check_free_space(out_dir: Path, name: str, doc_tokens: int, n_docs: int, copies: int, itemsize: int = 2,
                     scratch: int = 0) -> int:
    """Raise UserError when the output would not fit the free space of out_dir; return the
    bytes the write needs (the .bin, the .idx, the index's parts while it is assembled, and
    `scratch` bytes of temporary files)."""
    bin_bytes, idx_bytes = output_bytes(doc_tokens, n_docs, copies, itemsize)
    need = bin_bytes + 2 * idx_bytes + scratch + (64 << 10)
    free = free_bytes(out_dir)
    if free is None or need <= free:
        return need
    per_copy = sum(output_bytes(doc_tokens, n_docs, 1, itemsize)) + idx_bytes // max(1, copies)
    fit = max(0, (free - scratch - (64 << 10)) // max(1, per_copy))
    raise UserError(
        f"the output needs about {human_bytes(need)} in {out_dir.absolute()} ({name}.bin {human_bytes(bin_bytes)}: "
        f"{doc_tokens} tokens x {copies} copies x {itemsize} bytes, plus {name}.idx "
        f"{human_bytes(idx_bytes)} and room to assemble it"
        + (f", and {human_bytes(scratch)} of temporary files" if scratch else "")
        + f"), but only {human_bytes(free)} is free there. "
        + (f"Use fewer copies (the 2nd argument: {fit} fit), " if fit else "Not even one copy fits: ")
        + "free some space, or write elsewhere with --out-dir. Nothing was written."
    )


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="make_data.py",
        description="Convert a jsonl file ({\"text\": ...} per line) into RWKV binidx training data.",
        epilog="Example: python make_data.py demo.jsonl 30 4096",
    )
    parser.add_argument("input", help="input .jsonl file, one {\"text\": \"...\"} object per line")
    parser.add_argument("copies", help="number of shuffled copies of the data (the tutorial uses 30)")
    parser.add_argument("ctx_len", help="training context length (e.g. 4096); used for magic_prime")
    parser.add_argument("--seed", type=int, default=None, help="shuffle seed (default: random; printed)")
    parser.add_argument("--skip-bad", action="store_true", help="skip bad lines instead of stopping")
    parser.add_argument("--out-dir", default=".", help="where to write <name>.bin/.idx/.meta.json (default: .)")
    parser.add_argument("--max-line-mb", type=float, default=16.0,
                        help="largest allowed line (document) in MB (default 16)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--workers", default=None,
                        help="processes that tokenize (and copy the documents of large inputs into the shuffled "
                             f"copies); the output is the same for any number (default: the CPU cores this process "
                             f"may use, {default_workers()})")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="token type of the .bin (default: uint16 when the vocabulary fits it, as World's "
                             "65536 tokens do, else uint32)")
    return parser.parse_args(argv)


def token_dtype(name: str | None, vocab_size: int) -> np.dtype:
    """The dtype of --dtype `name` (None: the smallest that holds every id of the vocabulary)."""
    if name is None:
        name = "uint16" if vocab_size <= 1 << 16 else "uint32"
    dtype = DTYPES[name]
    if vocab_size > 1 << (8 * dtype.itemsize):
        raise UserError(f"--dtype {name} cannot hold the token ids of a {vocab_size}-token vocabulary; "
                        f"use --dtype uint32 (or leave --dtype out).")
    return dtype


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    copies = _positive_int("the number of copies (2nd argument)", args.copies)
    ctx_len = _positive_int("ctx_len (3rd argument)", args.ctx_len)
    check_ctx_len(ctx_len)
    if not args.max_line_mb > 0:
        raise UserError(f"--max-line-mb must be positive, found {args.max_line_mb}")
    src = Path(args.input)
    if not src.exists():
        raise UserError(f"the input file {src} does not exist; give the path of your .jsonl file")
    if not src.is_file():
        raise UserError(f"the input {src} is not a file; give the path of your .jsonl file")
    name = os.path.splitext(src.name)[0]
    out_dir = check_output_dir(args.out_dir, "--out-dir")
    prefix = out_dir / name
    bin_path, idx_path, meta_path = (Path(f"{prefix}{ext}") for ext in (".bin", ".idx", ".meta.json"))
    for p in (bin_path, idx_path, meta_path):
        if p.exists() and p.resolve() == src.resolve():
            raise UserError(f"the output {p} would overwrite the input {src}; rename the input to end in .jsonl")
    if args.seed is not None and args.seed < 0:
        raise UserError(f"--seed must be 0 or more, found {args.seed}")
    seed = secrets.randbits(63) if args.seed is None else args.seed
    workers = default_workers() if args.workers is None else _positive_int("--workers", args.workers)
    show = not args.no_progress

    tokenizer = get_tokenizer()
    dtype = token_dtype(args.dtype, tokenizer.vocab_size)
    print(f"### Convert {src} to {name}.bin/idx...", flush=True)
    had = [p.name for p in (bin_path, idx_path, meta_path) if p.exists()]
    stats = {}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        meta = _convert(args, src, name, out_dir, copies, ctx_len, seed, show, tokenizer, dtype, workers, stats)
    except OSError as e:
        if not is_write_error(e):
            raise
        kept = (f"The previous {', '.join(had)} there {'are' if len(had) > 1 else 'is'} untouched" if had else
                f"No {name}.bin/.idx was written") + " (the partial files were removed)"
        raise write_error(e, existing_parent(out_dir), hint="write elsewhere with --out-dir",
                          kept=kept, need=stats.get("need")) from e
    rc = _report(tokenizer, prefix, name, meta)
    print(_summary(stats, time.perf_counter() - started, meta["tokens"]), flush=True)
    return rc


def _convert(args, src: Path, name: str, out_dir: Path, copies: int, ctx_len: int, seed: int, show: bool,
             tokenizer, dtype, workers: int, stats: dict) -> dict:
    """Pass 1 and pass 2; returns the meta written beside the data. `stats` gets the input size,
    pass 1's seconds and workers, and the bytes the output needs once they are known (for the
    message of a full disk)."""
    prefix = out_dir / name
    meta_path = Path(f"{prefix}.meta.json")
    size = src.stat().st_size
    workers = max(1, min(workers, -(-size // tokenize_jsonl.CHUNK_BYTES)))  # no more than there are chunks
    t = time.perf_counter()
    # the temporary files have no name (removed by the system however the run ends); the workers
    # fork after the token file is open (pass 2 reads it through them) and before a progress bar
    # starts its thread
    with tempfile.TemporaryFile(dir=out_dir, prefix=f".{name}.tokens.") as tokens_file, \
            tempfile.TemporaryFile(dir=out_dir, prefix=f".{name}.ends.") as ends_file, \
            tempfile.TemporaryFile(dir=out_dir, prefix=f".{name}.order.") as records_file, \
            worker_pool(workers, slot_bytes=dtype.itemsize * tokenize_jsonl.CHUNK_BYTES + (64 << 10)) as pool:
        p1 = Pass1(tokens_file, ends_file, args.skip_bad, dtype)
        with _progress(size, "tokenizing", "B", show and size > PROGRESS_MIN_BYTES) as bar:
            p1.run(src, int(args.max_line_mb * 1_000_000), bar, pool)
        stats.update(input_bytes=size, tokenize_s=time.perf_counter() - t, workers=workers)
        print(f"### Found {p1.non_empty_lines} non-empty lines in {src}", flush=True)
        if p1.skipped:
            print(f"### Skipped {p1.skipped} bad lines: {p1.skipped_summary()}", flush=True)
        n_docs, doc_tokens = p1.documents, p1.tokens
        if n_docs == 0:
            if p1.skipped:
                raise UserError(f"all {p1.skipped} non-empty lines of {src} are bad; nothing to write")
            raise UserError(
                f"{src} has no documents ({'it is empty' if size == 0 else 'only blank lines'}); "
                'give a .jsonl file with one {"text": "..."} object per line'
            )
        stats["need"] = check_free_space(out_dir, name, doc_tokens, n_docs, copies, dtype.itemsize,
                                         scratch=scratch_bytes(n_docs))
        print(f"### Tokenized {n_docs} documents once ({doc_tokens} tokens); "
              f"writing {copies} shuffled copies (--seed {seed})...", flush=True)
        source = TokenSource(tokens_file, doc_tokens, dtype)
        remove_stale_temps(out_dir, {meta_path.name})
        with BinIdxWriter(prefix, dtype) as writer, \
                _progress(doc_tokens * copies, "writing", "tok", show and doc_tokens * copies > (16 << 20)) as bar:
            write_copies(source, DocEnds(ends_file, n_docs), copies, seed, writer, bar, pool, records_file.fileno())
            meta = {
                "tokens": writer.num_tokens, "items": writer.num_items, "documents": n_docs, "ctx_len": ctx_len,
                "magic_prime": magic_prime(writer.num_tokens, ctx_len), "copies": copies,
                "vocab": tokenizer.vocab_name, "dtype": dtype.name, "source": str(src.resolve()), "seed": seed,
                "skipped_lines": p1.skipped,
            }
            # the numbers go in place together with the data they describe
            writer.finish(extra={meta_path: (json.dumps(meta, indent=1) + "\n").encode()})
    return meta


def _summary(stats: dict, seconds: float, tokens: int) -> str:
    """The closing line: input MB/s over the whole run and over pass 1, tokens, seconds."""
    size, workers = stats["input_bytes"], stats["workers"]
    return (f"### Done in {seconds:.1f} s: {human_bytes(size)} of input at {human_bytes(size / max(seconds, 1e-9))}/s "
            f"(tokenizing {stats['tokenize_s']:.1f} s, {human_bytes(size / max(stats['tokenize_s'], 1e-9))}/s, "
            f"{workers} worker{'s' if workers > 1 else ''}), {tokens} tokens written")


def _report(tokenizer, prefix, name, meta) -> int:
    print("### Verifying result...", flush=True)
    data = BinIdx(prefix)
    tokens, items, ctx_len, p = data.num_tokens, data.num_items, meta["ctx_len"], meta["magic_prime"]
    if (tokens, items) != (meta["tokens"], meta["items"]):
        raise OSError(f"{prefix}.bin/.idx hold {tokens} tokens in {items} items, but {meta['tokens']} tokens "
                      f"in {meta['items']} items were written: the files were changed meanwhile")
    for i in sorted({0, items - 1}):
        print(_preview(tokenizer, data, name, i))
    print(f"{'-' * 80}\n### Final {name}.bin/idx has {tokens} tokens, {items} items. Dtype {data.dtype}")
    if p is None:
        print(f"\n### Not enough data for magic_prime: {tokens} tokens is fewer than 3 x ctx_len = "
              f"{3 * ctx_len}. Use more data, more copies, or a smaller ctx_len.\n")
    else:
        print(f"\n### magic_prime = {p} (for ctxlen {ctx_len})")
        print(f"\n--my_exit_tokens {tokens} --magic_prime {p} --ctx_len {ctx_len}\n")
        try:
            check_magic_prime(p, tokens, ctx_len)
        except UserError:
            print(f"### WARNING: {p} is under 0.9 x the {tokens // ctx_len} ctx_len slots of this data, "
                  "so the trainer will refuse it; use more data or more copies.\n")
    print(f"### Saved these numbers to {prefix}.meta.json", flush=True)
    return 0


def cli() -> int:
    from rwkvlm.errors import run_cli

    return run_cli(main, sys.argv[1:])


if __name__ == "__main__":
    sys.exit(cli())
