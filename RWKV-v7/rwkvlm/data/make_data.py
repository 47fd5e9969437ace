"""jsonl -> binidx, as RWKV-LM's make_data.py: `python make_data.py demo.jsonl 30 4096`.

Writes <name>.bin/.idx (World tokens, uint16 unless --dtype uint32, one item per
document, token 0 after each document) holding N copies of the documents, each
copy in a fresh shuffle, then prints `--my_exit_tokens T --magic_prime P --ctx_len C`
and saves the numbers to <name>.meta.json.

How: pass 1 tokenizes each input line once. The input is cut into CHUNK_BYTES
ranges that end at line ends; --workers processes (all cores by default; this
process alone for one worker or an input of one chunk) tokenize them, and their
tokens are appended in input order to an anonymous temporary file, of which only
each document's end offset is kept. Pass 2 writes the N permutations, decided
here from --seed alone, from that file in bounded chunks. So the output depends
on the input and the seed, never on the number of workers.

Memory: a constant (the tokenizer in each process, shared by forked workers; a few
chunks in flight) plus 12 bytes per document in pass 2 (its end offset and its
place in one permutation): ~600 MB for 50M documents. It does not grow with N or
with the size of the documents; past IN_MEMORY_BYTES the token file is read back
by document. Nothing appears under the output names until all is written, and the
.bin, .idx and .meta.json are replaced as one set (binidx.BinIdxWriter.finish);
the token file has no name, so even a killed run leaves none behind.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import multiprocessing
import os
import secrets
import signal
import sys
import tempfile
import time
from array import array
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from json.decoder import scanstring as _scanstring
from pathlib import Path
from typing import NamedTuple

import numpy as np

from rwkvlm.atomic import (check_output_dir, existing_parent, free_bytes, human_bytes, is_write_error, remove_stale_temps,
                     write_error)
from rwkvlm.data.binidx import HEADER, BinIdx, BinIdxWriter, finish_interrupted_write, split_path
from rwkvlm.recipe import END_OF_DOC, WKV_CHUNK_LEN
from rwkvlm.errors import UserError
from rwkvlm.data.magic_prime import check_magic_prime, magic_prime
from rwkvlm.data.tokenizer import get_tokenizer

DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}  # --dtype: the token files make_data writes
PREVIEW_TOKENS = 100
CHUNK_BYTES = 1 << 20  # input bytes per pass-1 task (cut at a line end): a worker's unit of work
BATCH_BYTES = 1 << 18  # text tokenized in one call of the tokenizer
CHUNKS_AHEAD = 2  # tasks in flight per worker
PROGRESS_MIN_BYTES = 8 << 20  # inputs from this size get a progress bar (on a terminal)
CHUNK_DOCS = 2048  # documents gathered per pass-2 chunk
CHUNK_TOKENS = 1 << 20  # and at most this many tokens (unless one document is larger)
IN_MEMORY_BYTES = 16 << 20  # pass 2 holds the token file in memory up to this size
_BOM = b"\xef\xbb\xbf"
_SEP = "\x00"  # joins the texts of a batch (see _encode_batch)
_FAST_PREFIXES = ('{"text": "', '{"text":"')  # lines json.dumps writes (see _fast_text)


# ---------------------------------------------------------------- pass 1: one line

class BadLine(Exception):
    """One unusable input line: its number, a category and what is wrong."""

    def __init__(self, line_no: int, category: str, detail: str):
        super().__init__(f"line {line_no}: {detail}")
        self.line_no, self.category, self.detail = line_no, category, detail


def _snippet(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _fast_text(line: str) -> str | None:
    """The "text" of a line that is exactly {"text": "..."} (as json.dumps writes it), else None.

    The value json.loads gives (the same C string scanner, strict), about twice as fast;
    anything else (other fields, other spacing, an error) is left to json.loads."""
    for prefix in _FAST_PREFIXES:
        if line.startswith(prefix):
            try:
                text, end = _scanstring(line, len(prefix), True)
            except ValueError:
                return None
            return text if end == len(line) - 1 and line[end] == "}" else None
    return None


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
    text = _fast_text(line)
    if text is not None:
        return text
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


def _encode_one(tokenizer, text: str, line_no: int) -> list:
    """The token ids of one document's text, checked to decode back to it (else BadLine)."""
    try:
        ids = tokenizer.encode(text)
    except UnicodeEncodeError:  # lone surrogates; reported by the round-trip check
        ids = []
    _check_round_trip(tokenizer, text, ids, line_no)
    return ids


@functools.lru_cache(maxsize=2)
def _vocab_bytes(tokenizer) -> tuple:
    """(blob, starts, lengths, sep_id): every token's bytes back to back (uint8), where each id's
    bytes start in blob and how many they are; sep_id, the token of _SEP when no other token
    holds its byte (then batches are exact, see _encode_batch), else None."""
    table = tokenizer.table
    lengths = np.fromiter(map(len, table), dtype=np.int64, count=len(table))
    blob = np.frombuffer(b"".join(table), dtype=np.uint8)
    sep = _SEP.encode()
    holders = [i for i, b in enumerate(table) if sep in b]
    sep_id = holders[0] if len(holders) == 1 and table[holders[0]] == sep else None
    return blob, np.cumsum(lengths) - lengths, lengths, sep_id


def _ids_array(ids: list) -> np.ndarray:
    """A Python list of token ids as a numpy array (via array('I'): ~3x faster than np.array)."""
    a = array("I", ids)
    return np.frombuffer(a, dtype=f"=u{a.itemsize}")


def _encode_batch(tokenizer, texts: list, dtype) -> tuple | None:
    """Tokenize texts (none holding _SEP) in one call: (the tokens of each text followed by
    END_OF_DOC, back to back; each text's token count). None when they must go one by one:
    a text that UTF-8 cannot encode, or tokens that do not decode back to the texts.

    Exact: the World tokenizer takes the longest vocabulary match at each position, and no
    token but _SEP's own holds the _SEP byte, so no token crosses a separator and
    encode(a + _SEP + b) == encode(a) + [sep_id] + encode(b). Checked here all the same: the
    tokens must decode to the joined texts, with sep_id exactly where the separators are.
    One call per batch instead of one per line saves ~6 us a document."""
    blob, starts, lengths, sep_id = _vocab_bytes(tokenizer)
    joined = _SEP.join(texts) + _SEP
    try:
        expected = np.frombuffer(joined.encode("utf-8"), dtype=np.uint8)
    except UnicodeEncodeError:
        return None
    ids = _ids_array(tokenizer.encode(joined))
    ends = np.flatnonzero(ids == sep_id)
    if ends.size != len(texts) or ends[-1] != ids.size - 1:
        return None
    byte_lengths = lengths[ids]
    if int(byte_lengths.sum()) != expected.size or not np.array_equal(_gather(blob, starts[ids], byte_lengths), expected):
        return None
    tokens = ids.astype(dtype)
    tokens[ends] = END_OF_DOC
    return tokens, np.diff(ends, prepend=-1)


def _iter_lines(f, max_line_bytes: int, limit: int | None = None, at_start: bool = True):
    """(line_no, raw bytes or BadLine, bytes consumed) for every line of the next `limit` bytes of
    f (to its end when None), without reading more than max_line_bytes of one line into memory.
    at_start: f is at the start of the file, where a UTF-8 byte-order mark is dropped."""
    line_no = done = 0
    while limit is None or done < limit:
        raw = f.readline(max_line_bytes + 1)
        if not raw:
            return
        line_no += 1
        consumed = len(raw)
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):
                raw = f.readline(1 << 20)
                consumed += len(raw)
            raw = BadLine(
                line_no, "line too long",
                f"the line is {consumed / 1e6:.1f} MB, more than the {max_line_bytes / 1e6:g} MB limit "
                "per document; split the document into smaller ones, or raise --max-line-mb",
            )
        elif at_start and line_no == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM):]
        done += consumed
        if limit is not None and done > limit:
            raise UserError(f"{getattr(f, 'name', 'the input')} changed while make_data read it; "
                            "run make_data again once the file is complete. Nothing was written.")
        yield line_no, raw, consumed


# ---------------------------------------------------------------- pass 1: one chunk (a worker's task)

class ChunkJob(NamedTuple):
    """Tokenize the lines in bytes [start, end) of path (end at a line end)."""
    path: str
    start: int
    end: int
    max_line_bytes: int
    skip_bad: bool
    dtype: str


class ChunkTokens(NamedTuple):
    """What a ChunkJob gives back. Line numbers count from the chunk's first line (1)."""
    tokens: np.ndarray  # each document's tokens and END_OF_DOC, in input order
    lengths: np.ndarray  # each document's token count (END_OF_DOC included)
    lines: int  # lines in the chunk
    non_empty: int  # of which not blank
    bad: list  # (line_no, category, detail) of each bad line in order; without skip_bad the chunk ends at the first
    nbytes: int


class _Stop(Exception):
    """A bad line without --skip-bad: the chunk ends there."""


class _ChunkTokenizer:
    """Runs one ChunkJob: texts gather into batches of BATCH_BYTES, each tokenized in one call.

    Bad lines are reported in line order: a batch is tokenized (and its round trips checked)
    before any later line is reported bad."""

    def __init__(self, job: ChunkJob):
        self.job = job
        self.tokenizer = get_tokenizer()
        self.batches = _vocab_bytes(self.tokenizer)[3] is not None  # else each text alone
        self.dtype = np.dtype(job.dtype)
        self.parts, self.lengths, self.bad = [], [], []
        self.texts, self.text_lines, self.text_bytes = [], [], 0
        self.lines = self.non_empty = 0

    def run(self) -> ChunkTokens:
        job = self.job
        try:
            with open(job.path, "rb") as f:
                f.seek(job.start)
                for line_no, raw, _ in _iter_lines(f, job.max_line_bytes, job.end - job.start, job.start == 0):
                    self.lines = line_no
                    if not isinstance(raw, BadLine):
                        raw = raw.strip()
                        if not raw:
                            continue
                    self.non_empty += 1
                    try:
                        self._add(raw, line_no)
                    except BadLine as e:
                        self._flush()
                        self._bad(e)
            self._flush()
        except _Stop:
            pass
        tokens = np.concatenate(self.parts) if self.parts else np.zeros(0, self.dtype)
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int64)
        return ChunkTokens(tokens, lengths, self.lines, self.non_empty, self.bad, job.end - job.start)

    def _add(self, raw, line_no: int) -> None:
        if isinstance(raw, BadLine):
            raise raw
        text = _parse_line(raw, line_no)
        if _SEP in text:  # a batch would split it there: on its own
            self._flush()
            self._append(_encode_one(self.tokenizer, text, line_no))
            return
        self.texts.append(text)
        self.text_lines.append(line_no)
        self.text_bytes += len(raw)
        if self.text_bytes >= BATCH_BYTES:
            self._flush()

    def _flush(self) -> None:
        texts, lines = self.texts, self.text_lines
        if not texts:
            return
        self.texts, self.text_lines, self.text_bytes = [], [], 0
        done = _encode_batch(self.tokenizer, texts, self.dtype) if self.batches else None
        if done is not None:
            self.parts.append(done[0])
            self.lengths.append(done[1])
            return
        for text, line_no in zip(texts, lines):  # one by one, to find the texts that fail
            try:
                self._append(_encode_one(self.tokenizer, text, line_no))
            except BadLine as e:
                self._bad(e)

    def _append(self, ids: list) -> None:
        self.parts.append(np.array(ids + [END_OF_DOC], dtype=self.dtype))
        self.lengths.append(np.array([len(ids) + 1], dtype=np.int64))

    def _bad(self, e: BadLine) -> None:
        self.bad.append((e.line_no, e.category, e.detail))
        if not self.job.skip_bad:
            raise _Stop()


def tokenize_chunk(job: ChunkJob) -> ChunkTokens:
    """Pass 1's unit of work, in a worker process or in this one."""
    return _ChunkTokenizer(job).run()


# ---------------------------------------------------------------- the worker processes

def _worker_init(parent: int) -> None:
    """In each worker: die with make_data, so that a killed run leaves no worker behind (holding
    the token file open), and leave Ctrl-C to make_data (which stops the workers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before that
        os._exit(1)


class Workers:
    """Runs fn over jobs, results in job order: in this process (no executor), or by a pool of
    worker processes with at most `ahead` + 1 tasks in flight (memory stays bounded).
    forked: the workers are forks of this process, so they share its open files."""

    def __init__(self, executor=None, ahead: int = 0, forked: bool = False):
        self.executor, self.ahead, self.forked = executor, ahead, forked

    def map(self, fn, jobs):
        return map(fn, jobs) if self.executor is None else self._in_order(fn, jobs)

    def _in_order(self, fn, jobs):
        pending = deque()
        try:
            for job in jobs:
                pending.append(self.executor.submit(fn, job))
                if len(pending) > self.ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BrokenProcessPool:
            raise UserError("a make_data worker process died (killed, or out of memory?); run again, with fewer "
                            "--workers if memory is short. Nothing was written.") from None


@contextlib.contextmanager
def worker_pool(workers: int):
    """The Workers of a run: this process alone for one worker, else a pool of `workers`
    processes, CHUNKS_AHEAD tasks each in flight. They tokenize (pass 1) and read documents
    back from the token file (pass 2; forked workers only, which share its descriptor).

    Forked where the system can (Linux), after the tokenizer is loaded here, so the workers
    share its ~250 MB instead of loading it each; started at once, before anything else (a
    progress bar's thread) runs. On leaving, queued tasks are cancelled and the workers stopped."""
    if workers <= 1:
        yield Workers()
        return
    _vocab_bytes(get_tokenizer())  # loaded before the fork, shared by the workers
    forked = "fork" in multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if forked else None)
    executor = ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init, initargs=(os.getpid(),))
    try:
        executor.submit(int).result()  # starts the processes now
        yield Workers(executor, CHUNKS_AHEAD * workers, forked)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------- pass 1: the chunks, in order

def plan_chunks(path, chunk_bytes: int):
    """(start, end) byte ranges covering the file, each of about chunk_bytes and ending at a line
    end (or the end of the file), so that every line lies in one range."""
    with open(path, "rb") as f:
        start = 0
        while True:
            end = _line_end_after(f, start + chunk_bytes - 1)
            if end is None:
                size = f.seek(0, os.SEEK_END)
                if size > start:
                    yield start, size
                return
            yield start, end
            start = end


def _line_end_after(f, pos: int) -> int | None:
    """The offset just past the first newline at or after pos, or None if there is none."""
    f.seek(pos)
    while True:
        block = f.read(1 << 14)
        if not block:
            return None
        i = block.find(b"\n")
        if i >= 0:
            return pos + i + 1
        pos += len(block)


class Pass1:
    """Tokenize every input line once into `tokens_file` (END_OF_DOC after each document)."""

    def __init__(self, tokens_file, skip_bad: bool, dtype):
        self.tokens_file, self.skip_bad, self.dtype = tokens_file, skip_bad, np.dtype(dtype)
        self.ends = array("q", [0])  # token offset where each document ends
        self.non_empty_lines = 0
        self.skipped = 0
        self._bad_lines = {}  # category -> (count, first line numbers)

    def _bad(self, path: Path, e: BadLine) -> None:
        if not self.skip_bad:
            raise UserError(
                f"{path}, {e}. Fix or delete that line, or run again with --skip-bad "
                "to skip bad lines. Nothing was written."
            )
        self.skipped += 1
        count, lines = self._bad_lines.get(e.category, (0, []))
        self._bad_lines[e.category] = (count + 1, lines if len(lines) >= 5 else lines + [e.line_no])

    def run(self, path: Path, max_line_bytes: int, progress, workers: Workers = Workers()) -> None:
        """Tokenize `path` chunk by chunk, by `workers` (default: this process)."""
        jobs = (ChunkJob(str(path), start, end, max_line_bytes, self.skip_bad, self.dtype.str)
                for start, end in plan_chunks(path, CHUNK_BYTES))
        line_base = 0
        for chunk in workers.map(tokenize_chunk, jobs):
            for line_no, category, detail in chunk.bad:
                self._bad(path, BadLine(line_base + line_no, category, detail))
            self.tokens_file.write(memoryview(chunk.tokens))
            if chunk.lengths.size:
                self.ends.frombytes((self.ends[-1] + np.cumsum(chunk.lengths)).astype(np.int64).tobytes())
            line_base += chunk.lines
            self.non_empty_lines += chunk.non_empty
            progress.update(chunk.nbytes)
        self.tokens_file.flush()

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
    """The document order of each copy: `copies` independent permutations of range(n_docs),
    rng.permutation(n_docs) of default_rng(seed) each.

    They are made in one array, reused: a yielded order is valid until the next is asked for
    (copy it to keep it). Memory: 4 bytes a document (8 past 2**31 documents)."""
    rng = np.random.default_rng(seed)
    order = np.empty(n_docs, dtype=np.int32 if n_docs < 2**31 else np.int64)
    step = 1 << 20
    for _ in range(copies):
        for i in range(0, n_docs, step):  # order = arange(n_docs), without a second array
            order[i : i + step] = np.arange(i, min(i + step, n_docs), dtype=order.dtype)
        rng.shuffle(order)  # what rng.permutation does to its copy of an array
        yield order


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

    def __init__(self, f, n_tokens: int, dtype):
        self.dtype = np.dtype(dtype)
        self.size = n_tokens * self.dtype.itemsize
        self._fd = f.fileno()
        self.tokens = None
        if self.size <= IN_MEMORY_BYTES:
            f.seek(0)
            self.tokens = np.frombuffer(f.read(self.size), dtype=self.dtype)
            if self.tokens.size != n_tokens:
                raise OSError(f"read {self.tokens.size} of {n_tokens} tokens back from the temporary file")

    def gather(self, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        if self.tokens is not None:
            return _gather(self.tokens, starts, lengths)
        return _pread_documents(self.fd, self.dtype, starts, lengths)

    @property
    def fd(self) -> int:
        return self._fd


def _pread_documents(fd: int, dtype, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Tokens [starts[k], starts[k] + lengths[k]) of the token file `fd` for each k, back to back."""
    item, pread = np.dtype(dtype).itemsize, os.pread
    data = b"".join([pread(fd, n * item, s * item) for s, n in zip(starts.tolist(), lengths.tolist())])
    if len(data) != int(lengths.sum()) * item:
        raise OSError("the temporary token file is shorter than what was written to it")
    return np.frombuffer(data, dtype=dtype)


class ReadJob(NamedTuple):
    """Documents for a worker to read from the token file (open in make_data; forked workers share it)."""
    fd: int
    dtype: str
    starts: np.ndarray
    lengths: np.ndarray


def read_documents(job: ReadJob) -> tuple:
    """Pass 2's unit of work in a worker: (the documents' lengths, their tokens back to back)."""
    return job.lengths, _pread_documents(job.fd, np.dtype(job.dtype), job.starts, job.lengths)


def _pieces(ends: np.ndarray, orders):
    """(starts, lengths) of the documents of each order in turn, in pieces of at most CHUNK_DOCS
    documents and CHUNK_TOKENS tokens (unless one document is larger)."""
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
                yield starts[a:b], lengths[a:b]


def write_copies(source: _TokenSource, ends: np.ndarray, orders, writer: BinIdxWriter, progress,
                 workers: Workers = Workers()) -> None:
    """Append each order's documents (a permutation) to the writer, in bounded chunks. Forked
    workers read the documents of a token file too large to hold (the writing stays here)."""
    pieces = _pieces(ends, orders)
    if source.tokens is None and workers.forked:
        done = workers.map(read_documents, (ReadJob(source.fd, source.dtype.str, s, n) for s, n in pieces))
    else:
        done = ((n, source.gather(s, n)) for s, n in pieces)
    for lengths, flat in done:
        writer.add_items(flat, lengths)
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


def output_bytes(doc_tokens: int, n_docs: int, copies: int, itemsize: int = 2) -> tuple[int, int]:
    """(.bin bytes, .idx bytes) of `copies` copies of documents holding doc_tokens tokens."""
    items = n_docs * copies
    return doc_tokens * copies * itemsize, HEADER.size + 12 * items + 8 * (items + 1)


def check_free_space(out_dir: Path, name: str, doc_tokens: int, n_docs: int, copies: int, itemsize: int = 2) -> int:
    """Raise UserError when the output would not fit the free space of out_dir; return the
    bytes the write needs (the .bin, the .idx, and the index's parts while it is assembled)."""
    bin_bytes, idx_bytes = output_bytes(doc_tokens, n_docs, copies, itemsize)
    need = bin_bytes + 2 * idx_bytes + (64 << 10)
    free = free_bytes(out_dir)
    if free is None or need <= free:
        return need
    per_copy = sum(output_bytes(doc_tokens, n_docs, 1, itemsize)) + idx_bytes // max(1, copies)
    fit = max(0, (free - (64 << 10)) // max(1, per_copy))
    raise UserError(
        f"the output needs about {human_bytes(need)} in {out_dir.absolute()} ({name}.bin {human_bytes(bin_bytes)}: "
        f"{doc_tokens} tokens x {copies} copies x {itemsize} bytes, plus {name}.idx "
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
    parser.add_argument("--workers", default=None,
                        help=f"tokenizer processes (default: the CPU cores this process may use, {default_workers()})")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="token type of the .bin (default: uint16 when the vocabulary fits it, as World's "
                             "65536 tokens do, else uint32)")
    return parser.parse_args(argv)


def default_workers() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


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
    workers = max(1, min(workers, -(-size // CHUNK_BYTES)))  # no more than there are chunks
    t = time.perf_counter()
    # the workers fork after the token file is open (pass 2 reads it through them) and before
    # a progress bar starts its thread
    with tempfile.TemporaryFile(dir=out_dir, prefix=f".{name}.tokens.") as tokens_file, worker_pool(workers) as pool:
        p1 = Pass1(tokens_file, args.skip_bad, dtype)
        with _progress(size, "tokenizing", "B", show and size > PROGRESS_MIN_BYTES) as bar:
            p1.run(src, int(args.max_line_mb * 1_000_000), bar, pool)
        stats.update(input_bytes=size, tokenize_s=time.perf_counter() - t, workers=workers)
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
        stats["need"] = check_free_space(out_dir, name, doc_tokens, n_docs, copies, dtype.itemsize)
        print(f"### Tokenized {n_docs} documents once ({doc_tokens} tokens); "
              f"writing {copies} shuffled copies (--seed {seed})...", flush=True)
        source = _TokenSource(tokens_file, doc_tokens, dtype)
        remove_stale_temps(out_dir, {meta_path.name})
        with BinIdxWriter(prefix, dtype) as writer, \
                _progress(doc_tokens * copies, "writing", "tok", show and doc_tokens * copies > (16 << 20)) as bar:
            write_copies(source, ends, copy_orders(n_docs, copies, seed), writer, bar, pool)
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
