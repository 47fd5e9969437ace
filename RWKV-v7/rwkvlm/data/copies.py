"""make_data's pass 2: the N shuffled copies written from pass 1's token file, in memory that does
not depend on the size of the input or on its number of documents.

Copy c puts the documents in the order of Shuffle(documents, seed, c) (rwkvlm.data.shuffle),
computed block by block. Where each document's tokens lie comes from pass 1's file of end
offsets, read in bounded blocks too: a copy is written in segments of SEGMENT_DOCS output
positions. With one segment (up to SEGMENT_DOCS documents) the offsets of all documents are
read and put in output order in memory. With more, the offsets are first sorted into segments
on disk: the end offsets are read in input order, SCAN_DOCS at a time, each document's place
in the copy computed (Shuffle.place), and its (place in its segment, length, start) record
written into that segment's part of a temporary file (RECORD, 16 bytes a document); then each
segment's records are read back and put in order. The documents of a segment are then read
from the token file (held in memory up to IN_MEMORY_BYTES, else read document by document, by
the worker processes when there are some, which also write them into the output at the places
make_data reserves for them) in pieces of at most CHUNK_DOCS documents and CHUNK_TOKENS tokens.
Memory: a few segments' arrays (~30 MB with the default sizes) and 8 bytes per segment, whatever
the input.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from rwkvlm.data.shuffle import Shuffle
from rwkvlm.data.tokenize_jsonl import gather

CHUNK_DOCS = 2048  # documents gathered per pass-2 piece
CHUNK_TOKENS = 1 << 20  # and at most this many tokens (unless one document is larger)
IN_MEMORY_BYTES = 16 << 20  # pass 2 holds the token file in memory up to this size
SEGMENT_DOCS = 1 << 19  # output positions put in order at a time
SCAN_DOCS = 1 << 17  # documents read at a time while sorting them into segments
RECORD = np.dtype([("at", "<u4"), ("length", "<u4"), ("start", "<i8")])  # a document in its segment


def scratch_bytes(n_docs: int) -> int:
    """The bytes of the temporary file of records that pass 2 writes for n_docs documents."""
    return RECORD.itemsize * n_docs if n_docs > SEGMENT_DOCS else 0


def _pwrite_all(fd: int, data, offset: int) -> None:
    view, done = memoryview(data), 0
    while done < len(view):
        written = os.pwrite(fd, view[done:], offset + done)
        if written <= 0:
            raise OSError(f"wrote nothing at byte {offset + done} of a file of make_data")
        done += written


def _pread(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise OSError(f"a temporary file of make_data is shorter than what was written to it "
                      f"(read {len(data)} of {size} bytes at {offset})")
    return data


class DocEnds:
    """Pass 1's end offsets (int64, n_docs + 1 values, the first 0), read by range."""

    def __init__(self, f, n_docs: int):
        f.flush()
        self.fd, self.n_docs = f.fileno(), n_docs

    def read(self, first: int, count: int) -> np.ndarray:
        """ends[first : first + count]."""
        return np.frombuffer(_pread(self.fd, 8 * count, 8 * first), dtype="<i8")


def _scan(ends: DocEnds, shuffle: Shuffle):
    """(place in the copy, start, length) of the documents, SCAN_DOCS at a time in input order."""
    for first in range(0, shuffle.n, SCAN_DOCS):
        e = ends.read(first, min(SCAN_DOCS, shuffle.n - first) + 1)
        yield shuffle.place(np.arange(first, first + e.size - 1)), e[:-1], np.diff(e)


def segments(ends: DocEnds, shuffle: Shuffle, records_fd: int | None):
    """(starts, lengths) of the documents at output positions [k * SEGMENT_DOCS, (k + 1) *
    SEGMENT_DOCS) of the copy, for k = 0, 1, ...: token offsets in the token file, counts.
    records_fd: a temporary file for the records (used only past one segment)."""
    n, seg = shuffle.n, SEGMENT_DOCS
    if n <= seg:  # one segment: put in order in memory
        starts, lengths = np.empty(n, np.int64), np.empty(n, np.int64)
        for place, start, length in _scan(ends, shuffle):
            starts[place], lengths[place] = start, length
        yield starts, lengths
        return
    n_segments = -(-n // seg)
    filled = np.zeros(n_segments, np.int64)  # records written into each segment's part so far
    for place, start, length in _scan(ends, shuffle):
        segment = (place // seg).astype(np.uint16 if n_segments <= 1 << 16 else np.int64)  # uint16: a radix sort
        by_segment = np.argsort(segment, kind="stable")
        records = np.empty(place.size, RECORD)
        records["at"] = (place % seg)[by_segment]
        records["length"], records["start"] = length[by_segment], start[by_segment]
        counts = np.bincount(segment, minlength=n_segments)
        first = np.cumsum(counts) - counts
        for k in np.flatnonzero(counts).tolist():
            part = records[first[k] : first[k] + counts[k]]
            _pwrite_all(records_fd, part.tobytes(), (k * seg + int(filled[k])) * RECORD.itemsize)
        filled += counts
    for k in range(n_segments):
        size = min(seg, n - k * seg)
        records = np.frombuffer(_pread(records_fd, size * RECORD.itemsize, k * seg * RECORD.itemsize), RECORD)
        starts, lengths = np.empty(size, np.int64), np.empty(size, np.int64)
        starts[records["at"]], lengths[records["at"]] = records["start"], records["length"]
        yield starts, lengths


def _pieces(starts: np.ndarray, lengths: np.ndarray):
    """(starts, lengths) of the documents in pieces of at most CHUNK_DOCS documents and
    CHUNK_TOKENS tokens (unless one document is larger)."""
    for i in range(0, len(starts), CHUNK_DOCS):
        s, n = starts[i : i + CHUNK_DOCS], lengths[i : i + CHUNK_DOCS]
        # cut the chunk further where it passes CHUNK_TOKENS (long documents)
        cum = np.cumsum(n)
        cuts = [0]
        while cuts[-1] < len(s):
            base = cum[cuts[-1] - 1] if cuts[-1] else 0
            nxt = int(np.searchsorted(cum, base + CHUNK_TOKENS, side="right"))
            cuts.append(min(max(nxt, cuts[-1] + 1), len(s)))
        for a, b in zip(cuts[:-1], cuts[1:]):
            yield s[a:b], n[a:b]


class TokenSource:
    """The pass-1 token file, read back by document.

    Up to IN_MEMORY_BYTES it is loaded whole (fast vectorised gathers); beyond, each
    document is read with pread, so memory stays flat however large the data is.
    (A memory map would not: Linux maps whole page-cache folios, up to ~1 MB, per fault.)
    """

    def __init__(self, f, n_tokens: int, dtype):
        f.flush()
        self.dtype = np.dtype(dtype)
        self.size = n_tokens * self.dtype.itemsize
        self.fd = f.fileno()
        self.tokens = None
        if self.size <= IN_MEMORY_BYTES:
            self.tokens = np.frombuffer(_pread(self.fd, self.size, 0), dtype=self.dtype)

    def gather(self, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        if self.tokens is not None:
            return gather(self.tokens, starts, lengths)
        return _pread_documents(self.fd, self.dtype, starts, lengths)


def _pread_documents(fd: int, dtype, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Tokens [starts[k], starts[k] + lengths[k]) of the token file `fd` for each k, back to back."""
    return np.frombuffer(_pread_bytes(fd, np.dtype(dtype).itemsize, starts, lengths), dtype=dtype)


def _pread_bytes(fd: int, item: int, starts: np.ndarray, lengths: np.ndarray) -> bytes:
    pread = os.pread
    data = b"".join([pread(fd, n * item, s * item) for s, n in zip(starts.tolist(), lengths.tolist())])
    if len(data) != int(lengths.sum()) * item:
        raise OSError("the temporary token file is shorter than what was written to it")
    return data


class CopyJob(NamedTuple):
    """Documents for a worker to copy from the token file (open in make_data; forked workers share
    it) into the output's temporary .bin at a byte offset (BinIdxWriter.reserve_items)."""
    fd: int
    dtype: str
    starts: np.ndarray
    lengths: np.ndarray
    out_path: str
    out_offset: int


_out_fds = {}  # in a worker: the output files it has open, by path


def copy_documents(job: CopyJob) -> int:
    """Pass 2's unit of work in a worker: read the documents, write them; returns their tokens."""
    data = _pread_bytes(job.fd, np.dtype(job.dtype).itemsize, job.starts, job.lengths)
    fd = _out_fds.get(job.out_path)
    if fd is None:
        for old in _out_fds.values():  # another run's output: done with
            os.close(old)
        _out_fds.clear()
        fd = _out_fds[job.out_path] = os.open(job.out_path, os.O_WRONLY)
    _pwrite_all(fd, data, job.out_offset)
    return int(job.lengths.sum())


def write_copies(source: TokenSource, ends: DocEnds, copies: int, seed: int, writer, progress,
                 workers=None, records_fd: int | None = None) -> None:
    """Append `copies` shuffled copies of the documents to the writer (a BinIdxWriter), copy c in
    the order of Shuffle(documents, seed, c), in bounded pieces. Forked workers (a
    rwkvlm.data.workers.Workers) copy the documents of a token file too large to hold straight
    into the output, at the places reserved for them here. records_fd: a temporary file for more
    than SEGMENT_DOCS documents."""
    pieces = (piece for copy in range(copies)
              for segment in segments(ends, Shuffle(ends.n_docs, seed, copy), records_fd)
              for piece in _pieces(*segment))
    if source.tokens is None and workers is not None and workers.forked:
        out = str(writer.tmp_bin_path)
        jobs = (CopyJob(source.fd, source.dtype.str, s, n, out, writer.reserve_items(n)) for s, n in pieces)
        for tokens in workers.map(copy_documents, jobs):
            progress.update(tokens)
        return
    for starts, lengths in pieces:
        flat = source.gather(starts, lengths)
        writer.add_items(flat, lengths)
        progress.update(flat.size)
