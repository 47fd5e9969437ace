"""make_data's pass 1: a jsonl file's documents tokenized once, in input order, into a token file
and a file of document end offsets (both temporary files of make_data, see Pass1).

The input is cut into CHUNK_BYTES ranges that end at a line end (plan_chunks); a ChunkJob
tokenizes one range, in a worker process or in make_data itself (tokenize_chunk), and gives back
its tokens and each document's token count. Texts are tokenized BATCH_BYTES at a time, in one call
of the tokenizer each (_encode_batch: exact, and checked). A chunk whose lines all have the form
json.dumps writes, `{"text": "..."}`, goes through a fast path (one UTF-8 decode and one split per
chunk, the string scanner of json per line); any other chunk, or one with anything unusual in it,
goes line by line, which finds and words each bad line. Both give the same tokens.
"""
from __future__ import annotations

import functools
import json
import os
from array import array
from json.decoder import scanstring as _scanstring
from pathlib import Path
from typing import NamedTuple

import numpy as np

from rwkvlm.data.tokenizer import get_tokenizer
from rwkvlm.errors import UserError
from rwkvlm.recipe import END_OF_DOC

CHUNK_BYTES = 1 << 20  # input bytes per pass-1 task (cut at a line end): a worker's unit of work
BATCH_BYTES = 1 << 18  # text tokenized in one call of the tokenizer
FAST_MAX_BYTES = 8 << 20  # larger chunks (a line of MBs) go line by line, never read whole
_BOM = b"\xef\xbb\xbf"
_SEP = "\x00"  # joins the texts of a batch (see _encode_batch)
_FAST_PREFIXES = ('{"text": "', '{"text":"')  # lines json.dumps writes (see _fast_text)
_WHITESPACE = " \t\n\r\x0b\x0c"  # what bytes.strip() strips (a line's surrounding blanks)


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


def gather(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
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
    if int(byte_lengths.sum()) != expected.size or not np.array_equal(gather(blob, starts[ids], byte_lengths), expected):
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

    The fast path first (_fast), else line by line. Bad lines are reported in line order: a batch
    is tokenized (and its round trips checked) before any later line is reported bad."""

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
        if job.end - job.start <= FAST_MAX_BYTES:
            with open(job.path, "rb") as f:
                f.seek(job.start)
                data = f.read(job.end - job.start)
            done = self._fast(data)
            if done is not None:
                return done
        return self._line_by_line()

    def _fast(self, data: bytes) -> ChunkTokens | None:
        """The chunk's tokens when every line is blank or exactly {"text": "..."} (json.dumps's
        form) and every text tokenizes in its batch; else None (then it goes line by line).

        The same texts as _parse_line's: the chunk is valid UTF-8 exactly when each of its lines
        is, and each line's string is read by json's own strict scanner."""
        job = self.job
        if len(data) != job.end - job.start or not data.endswith(b"\n") or not self.batches:
            return None  # the file's last line, a file that changed meanwhile
        at_bom = job.start == 0 and data.startswith(_BOM)
        try:
            lines = (data[len(_BOM):] if at_bom else data).decode("utf-8").split("\n")
        except UnicodeDecodeError:
            return None
        lines.pop()  # after the last newline
        if len(data) > job.max_line_bytes and 4 * max(map(len, lines)) + len(_BOM) > job.max_line_bytes:
            return None  # a line may pass the limit (4 bytes a character at most)
        texts, blank, size, scan = [], 0, 0, _scanstring
        for line in lines:
            if not line.startswith(_FAST_PREFIXES):
                if line.strip(_WHITESPACE):
                    return None
                blank += 1
                continue
            try:
                text, end = scan(line, 10 if line[8] == " " else 9, True)
            except ValueError:
                return None
            if line[end : end + 1] != "}" or (end != len(line) - 1 and line[end + 1 :].strip(_WHITESPACE)):
                return None  # more after the string: other fields, an error
            texts.append(text)
            size += len(line)
            if size >= BATCH_BYTES:
                if not self._add_batch(texts):
                    return None
                texts, size = [], 0
        if texts and not self._add_batch(texts):
            return None
        return self._result(len(lines), len(lines) - blank)

    def _add_batch(self, texts: list) -> bool:
        done = _encode_batch(self.tokenizer, texts, self.dtype)
        if done is None:
            return False
        self.parts.append(done[0])
        self.lengths.append(done[1])
        return True

    def _result(self, lines: int, non_empty: int) -> ChunkTokens:
        tokens = np.concatenate(self.parts) if self.parts else np.zeros(0, self.dtype)
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int64)
        return ChunkTokens(tokens, lengths, lines, non_empty, self.bad, self.job.end - self.job.start)

    def _line_by_line(self) -> ChunkTokens:
        job = self.job
        self.parts, self.lengths = [], []
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
        return self._result(self.lines, self.non_empty)

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
    """Tokenize every input line once: the tokens, END_OF_DOC after each document, go to
    `tokens_file`; the token offset where each document ends to `ends_file` (int64, after a 0:
    documents + 1 values). Only counts stay in memory."""

    def __init__(self, tokens_file, ends_file, skip_bad: bool, dtype):
        self.tokens_file, self.ends_file = tokens_file, ends_file
        self.skip_bad, self.dtype = skip_bad, np.dtype(dtype)
        self.documents = 0
        self.tokens = 0
        self.non_empty_lines = 0
        self.skipped = 0
        self._bad_lines = {}  # category -> (count, first line numbers)
        ends_file.write(np.zeros(1, "<i8").tobytes())

    def _bad(self, path: Path, e: BadLine) -> None:
        if not self.skip_bad:
            raise UserError(
                f"{path}, {e}. Fix or delete that line, or run again with --skip-bad "
                "to skip bad lines. Nothing was written."
            )
        self.skipped += 1
        count, lines = self._bad_lines.get(e.category, (0, []))
        self._bad_lines[e.category] = (count + 1, lines if len(lines) >= 5 else lines + [e.line_no])

    def run(self, path: Path, max_line_bytes: int, progress, workers=None) -> None:
        """Tokenize `path` chunk by chunk, by `workers` (a rwkvlm.data.workers.Workers; default:
        this process)."""
        jobs = (ChunkJob(str(path), start, end, max_line_bytes, self.skip_bad, self.dtype.str)
                for start, end in plan_chunks(path, CHUNK_BYTES))
        # a worker's tokens come back through shared memory: valid until the next chunk is asked for
        chunks = workers.map(tokenize_chunk, jobs, shared="tokens") if workers else map(tokenize_chunk, jobs)
        line_base = 0
        for chunk in chunks:
            for line_no, category, detail in chunk.bad:
                self._bad(path, BadLine(line_base + line_no, category, detail))
            self.tokens_file.write(memoryview(chunk.tokens))
            if chunk.lengths.size:
                ends = self.tokens + np.cumsum(chunk.lengths)
                self.ends_file.write(ends.astype("<i8").tobytes())
                self.tokens = int(ends[-1])
                self.documents += chunk.lengths.size
            line_base += chunk.lines
            self.non_empty_lines += chunk.non_empty
            progress.update(chunk.nbytes)
        self.tokens_file.flush()
        self.ends_file.flush()

    def skipped_summary(self) -> str:
        parts = []
        for category, (count, lines) in self._bad_lines.items():
            shown = ", ".join(map(str, lines)) + (", ..." if count > len(lines) else "")
            parts.append(f"{count} {category} (line{'s' if count > 1 else ''} {shown})")
        return "; ".join(parts)


