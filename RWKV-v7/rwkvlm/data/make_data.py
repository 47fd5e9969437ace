"""jsonl -> binidx, as RWKV-LM's make_data.py: `python make_data.py demo.jsonl 30 4096`.

Writes <name>.bin/.idx (uint16 World tokens, one item per document, token 0
after each document) holding N copies of the documents, each copy in a fresh
shuffle, then prints `--my_exit_tokens T --magic_prime P --ctx_len C` and
saves the numbers to <name>.meta.json.

How: each distinct document is tokenized once (pass 1) into an anonymous
temporary file plus an offsets array; pass 2 writes the N permutations from
it in bounded chunks. Memory does not grow with N, and inputs larger than
RAM work: past IN_MEMORY_BYTES the token file is read back by document.
Nothing appears under the output names until all is written, and the .bin,
.idx and .meta.json are replaced as one set (binidx.BinIdxWriter.finish).
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
from array import array
from pathlib import Path

import numpy as np

from rwkvlm.atomic import (check_output_dir, existing_parent, free_bytes, human_bytes, is_write_error, remove_stale_temps,
                     write_error)
from rwkvlm.data.binidx import HEADER, BinIdx, BinIdxWriter, finish_interrupted_write, split_path
from rwkvlm.recipe import END_OF_DOC, WKV_CHUNK_LEN
from rwkvlm.errors import UserError
from rwkvlm.data.magic_prime import check_magic_prime, magic_prime

DTYPE = np.dtype("<u2")
PREVIEW_TOKENS = 100
CHUNK_DOCS = 2048  # documents gathered per pass-2 chunk
CHUNK_TOKENS = 1 << 20  # and at most this many tokens (unless one document is larger)
IN_MEMORY_BYTES = 16 << 20  # pass 2 holds the token file in memory up to this size
_BOM = b"\xef\xbb\xbf"


# ---------------------------------------------------------------- pass 1: read and tokenize

class BadLine(Exception):
    """One unusable input line: its number, a category and what is wrong."""

    def __init__(self, line_no: int, category: str, detail: str):
        super().__init__(f"line {line_no}: {detail}")
        self.line_no, self.category, self.detail = line_no, category, detail


def _snippet(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _parse_line(raw: bytes, line_no: int) -> str:
    """The "text" of one non-empty jsonl line, or BadLine."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadLine(
            line_no, "invalid UTF-8",
            f"not valid UTF-8 (byte {raw[e.start]:#04x} at byte {e.start + 1} of the line); "
            "re-save the file as UTF-8",
        ) from None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadLine(
            line_no, "invalid JSON",
            f"not valid JSON ({e.msg} at column {e.colno}), found {_snippet(line)}; "
            'each line must be one JSON object like {"text": "..."}',
        ) from None
    if not isinstance(obj, dict):
        raise BadLine(
            line_no, "not an object",
            f'expected a JSON object like {{"text": "..."}}, found a JSON {type(obj).__name__}: {_snippet(line)}',
        )
    if "text" not in obj:
        raise BadLine(
            line_no, 'no "text"',
            f'the object has no "text" field (its fields: {sorted(obj)[:10]}); '
            'each line needs {"text": "..."}',
        )
    text = obj["text"]
    if not isinstance(text, str):
        raise BadLine(
            line_no, '"text" not a string',
            f'"text" must be a string, found a JSON {type(text).__name__}: {_snippet(json.dumps(text))}',
        )
    return text


def _check_round_trip(tokenizer, text: str, ids, line_no: int) -> None:
    if tokenizer.round_trips(text, ids):
        return
    bad = next((i for i, ch in enumerate(text) if 0xD800 <= ord(ch) <= 0xDFFF), None)
    if bad is not None:
        why = (f"it contains the lone surrogate \\u{ord(text[bad]):04x} at character {bad + 1} "
               "(a JSON \\uXXXX escape without its pair), which UTF-8 cannot encode")
    else:
        why = "decode(encode(text)) differs from the text"
    raise BadLine(line_no, "does not round-trip", f"the text does not survive tokenization: {why}; fix the text")


def _iter_lines(f, max_line_bytes: int):
    """(line_no, raw bytes or BadLine, bytes consumed) for every line, without reading
    more than max_line_bytes of one line into memory."""
    line_no = 0
    while True:
        raw = f.readline(max_line_bytes + 1)
        if not raw:
            return
        line_no += 1
        consumed = len(raw)
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):
                raw = f.readline(1 << 20)
                consumed += len(raw)
            yield line_no, BadLine(
                line_no, "line too long",
                f"the line is {consumed / 1e6:.1f} MB, more than the {max_line_bytes / 1e6:g} MB limit "
                "per document; split the document into smaller ones, or raise --max-line-mb",
            ), consumed
            continue
        if line_no == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM):]
        yield line_no, raw, consumed


class Pass1:
    """Tokenize every distinct document once into `tokens_file` (uint16, 0 after each)."""

    def __init__(self, tokenizer, tokens_file, skip_bad: bool):
        self.tokenizer, self.tokens_file, self.skip_bad = tokenizer, tokens_file, skip_bad
        self.ends = array("q", [0])  # token offset where each document ends
        self.non_empty_lines = 0
        self.skipped = 0
        self._bad_lines = {}  # category -> (count, first line numbers)

    def _tokenize(self, raw, line_no: int) -> list:
        if isinstance(raw, BadLine):
            raise raw
        text = _parse_line(raw, line_no)
        try:
            ids = self.tokenizer.encode(text)
        except UnicodeEncodeError:  # lone surrogates; reported by the round-trip check
            ids = []
        _check_round_trip(self.tokenizer, text, ids, line_no)
        return ids

    def _bad(self, path: Path, e: BadLine) -> None:
        if not self.skip_bad:
            raise UserError(
                f"{path}, {e}. Fix or delete that line, or run again with --skip-bad "
                "to skip bad lines. Nothing was written."
            )
        self.skipped += 1
        count, lines = self._bad_lines.get(e.category, (0, []))
        self._bad_lines[e.category] = (count + 1, lines if len(lines) >= 5 else lines + [e.line_no])

    def run(self, path: Path, max_line_bytes: int, progress) -> None:
        buf, ends, total, pending = [], self.ends, 0, 0
        with open(path, "rb") as f:
            for line_no, raw, consumed in _iter_lines(f, max_line_bytes):
                pending += consumed
                if pending >= 1 << 20:
                    progress.update(pending)
                    pending = 0
                if not isinstance(raw, BadLine):
                    raw = raw.strip()
                    if not raw:
                        continue
                self.non_empty_lines += 1
                try:
                    ids = self._tokenize(raw, line_no)
                except BadLine as e:
                    self._bad(path, e)
                    continue
                buf.extend(ids)
                buf.append(END_OF_DOC)
                total += len(ids) + 1
                ends.append(total)
                if len(buf) >= 1 << 18:
                    self.tokens_file.write(np.array(buf, dtype=DTYPE).tobytes())
                    buf.clear()
        self.tokens_file.write(np.array(buf, dtype=DTYPE).tobytes())
        self.tokens_file.flush()
        progress.update(pending)

    @property
    def documents(self) -> int:
        return len(self.ends) - 1

    def skipped_summary(self) -> str:
        parts = []
        for category, (count, lines) in self._bad_lines.items():
            shown = ", ".join(map(str, lines)) + (", ..." if count > len(lines) else "")
            parts.append(f"{count} {category} (line{'s' if count > 1 else ''} {shown})")
        return "; ".join(parts)


# ---------------------------------------------------------------- pass 2: write the copies

def copy_orders(n_docs: int, copies: int, seed: int):
    """The document order of each copy: `copies` independent permutations of range(n_docs)."""
    rng = np.random.default_rng(seed)
    dtype = np.int32 if n_docs < 2**31 else np.int64
    for _ in range(copies):
        yield rng.permutation(np.arange(n_docs, dtype=dtype))


def _gather(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """tokens[starts[k] : starts[k] + lengths[k]] for each k, back to back (lengths >= 1)."""
    total = int(lengths.sum())
    if len(starts) == 1:
        return np.array(tokens[int(starts[0]) : int(starts[0]) + total])
    # index = cumulative sum of steps: +1 inside a document, a jump at each document start
    index = np.ones(total, dtype=np.int64)
    index[0] = starts[0]
    index[(np.cumsum(lengths) - lengths)[1:]] = starts[1:] - (starts[:-1] + lengths[:-1] - 1)
    np.cumsum(index, out=index)
    return tokens[index]


class _TokenSource:
    """The pass-1 token file, read back by document.

    Up to IN_MEMORY_BYTES it is loaded whole (fast vectorised gathers); beyond, each
    document is read with pread, so memory stays flat however large the data is.
    (A memory map would not: Linux maps whole page-cache folios, up to ~1 MB, per fault.)
    """

    def __init__(self, f, n_tokens: int):
        self.size = n_tokens * DTYPE.itemsize
        self._fd = f.fileno()
        self.tokens = None
        if self.size <= IN_MEMORY_BYTES:
            f.seek(0)
            self.tokens = np.frombuffer(f.read(self.size), dtype=DTYPE)
            if self.tokens.size != n_tokens:
                raise OSError(f"read {self.tokens.size} of {n_tokens} tokens back from the temporary file")

    def gather(self, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        if self.tokens is not None:
            return _gather(self.tokens, starts, lengths)
        item, fd, pread = DTYPE.itemsize, self._fd, os.pread
        data = b"".join([pread(fd, n * item, s * item) for s, n in zip(starts.tolist(), lengths.tolist())])
        if len(data) != int(lengths.sum()) * item:
            raise OSError("the temporary token file is shorter than what was written to it")
        return np.frombuffer(data, dtype=DTYPE)


def write_copies(source: _TokenSource, ends: np.ndarray, orders, writer: BinIdxWriter, progress) -> None:
    """Append each order's documents (a permutation) to the writer, in bounded chunks."""
    for order in orders:
        for i in range(0, len(order), CHUNK_DOCS):
            docs = order[i : i + CHUNK_DOCS]
            starts = ends[docs]
            lengths = ends[docs + 1] - starts
            # cut the chunk further where it passes CHUNK_TOKENS (long documents)
            cum = np.cumsum(lengths)
            cuts = [0]
            while cuts[-1] < len(docs):
                base = cum[cuts[-1] - 1] if cuts[-1] else 0
                nxt = int(np.searchsorted(cum, base + CHUNK_TOKENS, side="right"))
                cuts.append(min(max(nxt, cuts[-1] + 1), len(docs)))
            for a, b in zip(cuts[:-1], cuts[1:]):
                flat = source.gather(starts[a:b], lengths[a:b])
                writer.add_items(flat, lengths[a:b])
                progress.update(flat.size)


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


def output_bytes(doc_tokens: int, n_docs: int, copies: int) -> tuple[int, int]:
    """(.bin bytes, .idx bytes) of `copies` copies of documents holding doc_tokens tokens."""
    items = n_docs * copies
    return doc_tokens * copies * DTYPE.itemsize, HEADER.size + 12 * items + 8 * (items + 1)


def check_free_space(out_dir: Path, name: str, doc_tokens: int, n_docs: int, copies: int) -> int:
    """Raise UserError when the output would not fit the free space of out_dir; return the
    bytes the write needs (the .bin, the .idx, and the index's parts while it is assembled)."""
    bin_bytes, idx_bytes = output_bytes(doc_tokens, n_docs, copies)
    need = bin_bytes + 2 * idx_bytes + (64 << 10)
    free = free_bytes(out_dir)
    if free is None or need <= free:
        return need
    per_copy = sum(output_bytes(doc_tokens, n_docs, 1)) + idx_bytes // max(1, copies)
    fit = max(0, (free - (64 << 10)) // max(1, per_copy))
    raise UserError(
        f"the output needs about {human_bytes(need)} in {out_dir.absolute()} ({name}.bin {human_bytes(bin_bytes)}: "
        f"{doc_tokens} tokens x {copies} copies x {DTYPE.itemsize} bytes, plus {name}.idx "
        f"{human_bytes(idx_bytes)} and room to assemble it), but only {human_bytes(free)} is free there. "
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
    return parser.parse_args(argv)


def main(argv=None) -> int:
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
    show = not args.no_progress

    from rwkvlm.data.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    print(f"### Convert {src} to {name}.bin/idx...", flush=True)
    had = [p.name for p in (bin_path, idx_path, meta_path) if p.exists()]
    need = []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        meta = _convert(args, src, name, out_dir, copies, ctx_len, seed, show, tokenizer, need)
    except OSError as e:
        if not is_write_error(e):
            raise
        kept = (f"The previous {', '.join(had)} there {'are' if len(had) > 1 else 'is'} untouched" if had else
                f"No {name}.bin/.idx was written") + " (the partial files were removed)"
        raise write_error(e, existing_parent(out_dir), hint="write elsewhere with --out-dir",
                          kept=kept, need=need[0] if need else None) from e
    return _report(tokenizer, prefix, name, meta)


def _convert(args, src: Path, name: str, out_dir: Path, copies: int, ctx_len: int, seed: int, show: bool,
             tokenizer, need: list) -> dict:
    """Pass 1 and pass 2; returns the meta written beside the data. `need` gets the bytes the
    output needs once they are known (for the message of a full disk)."""
    prefix = out_dir / name
    meta_path = Path(f"{prefix}.meta.json")
    with tempfile.TemporaryFile(dir=out_dir, prefix=f".{name}.tokens.") as tokens_file:
        size = src.stat().st_size
        p1 = Pass1(tokenizer, tokens_file, args.skip_bad)
        with _progress(size, "tokenizing", "B", show and size > (8 << 20)) as bar:
            p1.run(src, int(args.max_line_mb * 1_000_000), bar)
        print(f"### Found {p1.non_empty_lines} non-empty lines in {src}", flush=True)
        if p1.skipped:
            print(f"### Skipped {p1.skipped} bad lines: {p1.skipped_summary()}", flush=True)
        n_docs = p1.documents
        if n_docs == 0:
            if p1.skipped:
                raise UserError(f"all {p1.skipped} non-empty lines of {src} are bad; nothing to write")
            raise UserError(
                f"{src} has no documents ({'it is empty' if size == 0 else 'only blank lines'}); "
                'give a .jsonl file with one {"text": "..."} object per line'
            )
        ends = np.frombuffer(p1.ends, dtype=np.int64)
        doc_tokens = int(ends[-1])
        need.append(check_free_space(out_dir, name, doc_tokens, n_docs, copies))
        print(f"### Tokenized {n_docs} documents once ({doc_tokens} tokens); "
              f"writing {copies} shuffled copies (--seed {seed})...", flush=True)
        source = _TokenSource(tokens_file, doc_tokens)
        remove_stale_temps(out_dir, {meta_path.name})
        with BinIdxWriter(prefix, DTYPE) as writer, \
                _progress(doc_tokens * copies, "writing", "tok", show and doc_tokens * copies > (16 << 20)) as bar:
            write_copies(source, ends, copy_orders(n_docs, copies, seed), writer, bar)
            meta = {
                "tokens": writer.num_tokens, "items": writer.num_items, "documents": n_docs, "ctx_len": ctx_len,
                "magic_prime": magic_prime(writer.num_tokens, ctx_len), "copies": copies,
                "vocab": tokenizer.vocab_name, "dtype": "uint16", "source": str(src.resolve()), "seed": seed,
                "skipped_lines": p1.skipped,
            }
            # the numbers go in place together with the data they describe
            writer.finish(extra={meta_path: (json.dumps(meta, indent=1) + "\n").encode()})
    return meta


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
