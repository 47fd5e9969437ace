"""MMIDIDX .bin/.idx token files (the Megatron layout RWKV-LM trains from).

.idx layout, all little-endian: magic b"MMIDIDX\\x00\\x00", uint64 version (1),
uint8 dtype code, uint64 item count n, uint64 doc-index count m,
int32 sizes[n], int64 byte pointers[n], int64 doc_idx[m].
.bin: the items' tokens back to back in that dtype.

Dtype codes 1-8 are Megatron's MMapIndexedDataset table (RWKV-LM's binidx.py has
the same). It has no uint32: code 9 is uint32 as in fairseq's and metaseq's tables
(make_data --dtype uint32). Megatron's and RWKV-LM's readers stop at code 8, so
they cannot open such a file (for them, a vocabulary past 65536 goes in int32, code 4).

`BinIdx` memory-maps both files and only checks what is O(1) to check, so it
opens multi-GB files instantly. `BinIdxWriter` streams items to disk (memory
does not grow with the data) under temporary names and puts both files (and
make_data's .meta.json) in place as one set only when complete; a reader
first completes a set that a killed writer left half renamed.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np

from rwkvlm.atomic import commit_files, finish_commit, remove_stale_temps, temp_path
from rwkvlm.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, n items, m doc_idx entries
DTYPES = {
    1: np.dtype("u1"),
    2: np.dtype("i1"),
    3: np.dtype("<i2"),
    4: np.dtype("<i4"),
    5: np.dtype("<i8"),
    6: np.dtype("<f8"),
    7: np.dtype("<f8"),
    8: np.dtype("<u2"),
    9: np.dtype("<u4"),  # fairseq / metaseq; not in Megatron's table
}


def dtype_code(dtype) -> int:
    """The MMIDIDX code of a numpy dtype (the first code that maps to it)."""
    dtype = np.dtype(dtype)
    for code, dt in DTYPES.items():
        if dt.kind == dtype.kind and dt.itemsize == dtype.itemsize:
            return code
    raise ValueError(f"dtype {dtype} has no MMIDIDX code; use one of {sorted(set(map(str, DTYPES.values())))}")


def split_path(path) -> Path:
    """The path without .bin/.idx (accepts 'data/demo', 'data/demo.bin' or 'data/demo.idx')."""
    path = Path(path)
    if path.suffix in (".bin", ".idx") and not Path(str(path) + ".idx").exists():
        return path.with_suffix("")
    return path


class BinIdx:
    """A memory-mapped MMIDIDX dataset: `.tokens`, `.sizes`, `.pointers`, `.doc_idx`."""

    def __init__(self, path):
        self.path = split_path(path)
        self.bin_path = Path(str(self.path) + ".bin")
        self.idx_path = Path(str(self.path) + ".idx")
        finish_interrupted_write(self.path)
        self._open_index()
        self._open_tokens()

    def _fail(self, what: str) -> UserError:
        return UserError(
            f"cannot use the data files {self.bin_path} and {self.idx_path}: {what}. "
            "Re-create both with make_data.py (e.g. `python make_data.py demo.jsonl 30 4096`), "
            "and give the data path without the .bin/.idx extension."
        )

    def _open_index(self) -> None:
        for p in (self.idx_path, self.bin_path):
            if not p.is_file():
                raise self._fail(f"{p} does not exist" if not p.exists() else f"{p} is not a file")
        idx_len = self.idx_path.stat().st_size
        if idx_len < HEADER.size:
            raise self._fail(f"{self.idx_path.name} has {idx_len} bytes, fewer than the {HEADER.size}-byte header")
        with open(self.idx_path, "rb") as f:
            magic, version, code, n, m = HEADER.unpack(f.read(HEADER.size))
        if magic != MAGIC:
            raise self._fail(
                f"{self.idx_path.name} is not an MMIDIDX index (starts with {magic!r}, expected {MAGIC!r})"
            )
        if version != VERSION:
            raise self._fail(f"{self.idx_path.name} has index version {version}, expected {VERSION}")
        if code not in DTYPES:
            raise self._fail(f"{self.idx_path.name} has dtype code {code}, expected one of {sorted(DTYPES)}")
        need = HEADER.size + 12 * n + 8 * m
        if idx_len < need:
            raise self._fail(
                f"{self.idx_path.name} is truncated: it has {idx_len} bytes but its header "
                f"({n} items, {m} doc_idx entries) needs {need}"
            )
        self.version, self.dtype_code, self.dtype = version, code, DTYPES[code]
        self.num_items, self.num_doc_idx = n, m
        self.sizes = self._map(self.idx_path, "<i4", HEADER.size, n)
        self.pointers = self._map(self.idx_path, "<i8", HEADER.size + 4 * n, n)
        self.doc_idx = self._map(self.idx_path, "<i8", HEADER.size + 12 * n, m)

    def _open_tokens(self) -> None:
        bin_len = self.bin_path.stat().st_size
        itemsize = self.dtype.itemsize
        if bin_len % itemsize:
            raise self._fail(
                f"{self.bin_path.name} has {bin_len} bytes, not a multiple of {itemsize} (dtype {self.dtype})"
            )
        if self.num_items:
            first, last, last_size = int(self.pointers[0]), int(self.pointers[-1]), int(self.sizes[-1])
            end = last + last_size * itemsize
            if first < 0 or last < first or last_size < 0 or end > bin_len:
                raise self._fail(
                    f"the index points past the end of {self.bin_path.name} (its last item ends at byte {end}, "
                    f"the file has {bin_len} bytes): the two files do not belong together or one is truncated"
                )
            if end < bin_len:
                raise self._fail(
                    f"{self.bin_path.name} holds {bin_len // itemsize} tokens but {self.idx_path.name} describes "
                    f"{end // itemsize}: the two files do not belong together (a .bin of another make_data run?)"
                )
        self.num_tokens = bin_len // itemsize
        self.tokens = self._map(self.bin_path, self.dtype, 0, self.num_tokens)

    @staticmethod
    def _map(path, dtype, offset, count):
        if count == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))

    def __len__(self) -> int:
        return self.num_items

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens of item i (a view into the memory map)."""
        if not -self.num_items <= i < self.num_items:
            raise IndexError(f"item {i} out of range for {self.num_items} items")
        i %= self.num_items
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        size = int(self.sizes[i]) - offset if length is None else length
        return self.tokens[start : start + size]

    def __repr__(self) -> str:
        return f"BinIdx({str(self.path)!r}, tokens={self.num_tokens}, items={self.num_items}, dtype={self.dtype})"


def commit_journal(path) -> Path:
    """The journal of an interrupted BinIdxWriter commit of <path>.bin/.idx (see atomic.commit_files)."""
    path = Path(path)
    return path.parent / f".{path.name}.binidx-commit.json"


def finish_interrupted_write(path) -> None:
    """Complete a BinIdxWriter commit that a killed writer left half done, so that
    <path>.bin/.idx/.meta.json are the new set (a no-op when there is none)."""
    journal = commit_journal(path)
    try:
        finish_commit(journal)
    except OSError as e:
        raise UserError(
            f"a write of {path}.bin/.idx was interrupted and cannot be completed here ({e}). Run "
            f"make_data.py again to write the data anew."
        ) from None


class BinIdxWriter:
    """Stream items into <path>.bin/.idx; files appear under their names only on finish().

    Use as a context manager (finishes on success, removes the temporaries on error), or
    call finish()/abort() yourself. Sizes, pointers and doc_idx go to anonymous temporary
    files, so memory stays flat however many items are written; reserve_items leaves the
    writing of some items' tokens to someone else (make_data's worker processes). finish()
    replaces .bin, .idx and any extra files (make_data's .meta.json) as one set: a crash at
    any moment leaves the old set or the new one (`finish_interrupted_write`).
    """

    def __init__(self, path, dtype=np.uint16):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.code = dtype_code(self.dtype)
        self.dtype = DTYPES[self.code]
        self.bin_path = Path(str(self.path) + ".bin")
        self.idx_path = Path(str(self.path) + ".idx")
        self._temps = []
        self._stack = contextlib.ExitStack()
        try:
            directory = self.bin_path.parent
            finish_interrupted_write(self.path)  # a killed earlier write: complete it before replacing it
            remove_stale_temps(directory, {self.bin_path.name, self.idx_path.name, commit_journal(self.path).name})
            self._tmp_bin = self._temp(self.bin_path)
            self._tmp_idx = self._temp(self.idx_path)
            self._bin = self._stack.enter_context(open(self._tmp_bin, "wb"))
            self._sizes = self._stack.enter_context(tempfile.TemporaryFile(dir=directory))
            self._pointers = self._stack.enter_context(tempfile.TemporaryFile(dir=directory))
            self._docs = self._stack.enter_context(tempfile.TemporaryFile(dir=directory))
        except BaseException:
            self._discard()
            raise
        self._docs.write(np.zeros(1, "<i8").tobytes())
        self.num_items = 0
        self.num_docs = 1  # doc_idx entries (starts with 0)
        self.num_tokens = 0
        self._reserved = False  # reserve_items was used: others write into the .bin too
        self._done = False

    def _temp(self, dest: Path) -> Path:
        tmp = temp_path(dest)
        self._temps.append(tmp)
        return tmp

    def _discard(self) -> None:
        self._stack.close()
        for tmp in self._temps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def _check(self, tokens) -> np.ndarray:
        arr = np.asarray(tokens)
        if arr.dtype != self.dtype:
            if arr.size and arr.dtype.kind in "iu":
                info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
                if info is not None and (arr.min() < info.min or arr.max() > info.max):
                    raise ValueError(f"token values {arr.min()}..{arr.max()} do not fit {self.dtype}")
            arr = arr.astype(self.dtype)
        return arr.reshape(-1)

    def add_items(self, flat, sizes, end_documents: bool = True) -> None:
        """Append len(sizes) items whose tokens lie back to back in `flat`.

        With end_documents each item is also one document (make_data's layout).
        """
        flat = self._check(flat)
        sizes = self._item_sizes(sizes)
        if int(sizes.sum()) != flat.size:
            raise ValueError(f"sizes add up to {int(sizes.sum())} tokens but {flat.size} were given")
        if self._reserved:  # the file's end, past what others wrote
            self._bin.seek(self.num_tokens * self.dtype.itemsize)
        self._bin.write(np.ascontiguousarray(flat).data)
        self._index(sizes, end_documents)

    def reserve_items(self, sizes) -> int:
        """Append len(sizes) items, each one document, whose tokens the caller writes itself into
        the temporary .bin (`tmp_bin_path`; another process may, with pwrite) at the byte offset
        returned, back to back. finish() refuses a .bin that lacks any of them."""
        sizes = self._item_sizes(sizes)
        self._bin.flush()
        self._reserved = True
        offset = self.num_tokens * self.dtype.itemsize
        self._index(sizes, True)
        return offset

    @property
    def tmp_bin_path(self) -> Path:
        """Where the .bin is written until finish() puts it in place."""
        return self._tmp_bin

    @staticmethod
    def _item_sizes(sizes) -> np.ndarray:
        sizes = np.asarray(sizes, dtype=np.int64).reshape(-1)
        if sizes.size and (sizes.min() < 0 or sizes.max() > np.iinfo(np.int32).max):
            raise ValueError("item sizes must lie in 0..2**31-1")
        return sizes

    def _index(self, sizes: np.ndarray, end_documents: bool) -> None:
        """Record items of these sizes whose tokens follow the ones so far in the .bin."""
        ends = np.cumsum(sizes)
        pointers = (self.num_tokens + ends - sizes) * self.dtype.itemsize
        self._sizes.write(sizes.astype("<i4").tobytes())
        self._pointers.write(pointers.astype("<i8").tobytes())
        if end_documents:
            docs = np.arange(self.num_items + 1, self.num_items + sizes.size + 1, dtype="<i8")
            self._docs.write(docs.tobytes())
            self.num_docs += sizes.size
        self.num_items += sizes.size
        self.num_tokens += int(ends[-1]) if sizes.size else 0

    def add_item(self, tokens) -> None:
        """Append one item (does not end the document)."""
        arr = self._check(tokens)
        self.add_items(arr, [arr.size], end_documents=False)

    def end_document(self) -> None:
        """Mark the items added so far as the end of a document."""
        self._docs.write(np.array([self.num_items], "<i8").tobytes())
        self.num_docs += 1

    def add_document(self, tokens) -> None:
        """Append one item that is a whole document."""
        arr = self._check(tokens)
        self.add_items(arr, [arr.size], end_documents=True)

    def finish(self, extra: dict | None = None) -> None:
        """Write the index and put .bin, .idx and `extra` ({path: bytes}, e.g. the
        .meta.json that belongs to this data) in place as one set."""
        if self._done:
            return
        try:
            self._bin.flush()
            size, expected = os.fstat(self._bin.fileno()).st_size, self.num_tokens * self.dtype.itemsize
            if size != expected:
                raise OSError(f"{self._tmp_bin} has {size} bytes, but the items written to it need {expected}")
            with open(self._tmp_idx, "wb") as idx:
                idx.write(HEADER.pack(MAGIC, VERSION, self.code, self.num_items, self.num_docs))
                for part in (self._sizes, self._pointers, self._docs):
                    _append_file(part, idx)
            renames = [(self._tmp_bin, self.bin_path), (self._tmp_idx, self.idx_path)]
            for dest, data in (extra or {}).items():
                tmp = self._temp(Path(dest))
                tmp.write_bytes(data)
                renames.append((tmp, Path(dest)))
            self._stack.close()
            commit_files(renames, commit_journal(self.path))
        except BaseException:
            self.abort()
            raise
        self._done = True

    def abort(self) -> None:
        """Discard everything written; no .bin/.idx is created or changed."""
        if not self._done:
            self._done = True
            self._discard()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.finish()
        else:
            self.abort()
        return False


_NO_SENDFILE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV}


def _append_file(src, dest) -> None:
    """Append the whole of file object src to file object dest: in the kernel (sendfile) where the
    system can, so the bytes never pass through this process's memory; else in 1 MB blocks."""
    src.flush()
    dest.flush()
    size = os.fstat(src.fileno()).st_size
    offset = 0
    while offset < size:
        try:
            sent = os.sendfile(dest.fileno(), src.fileno(), offset, size - offset)
        except (AttributeError, OSError) as e:
            if offset or getattr(e, "errno", errno.ENOSYS) not in _NO_SENDFILE:
                raise
            break  # no sendfile between these files: copied below
        if sent == 0:
            raise OSError(f"{src.name} ended at byte {offset} of {size} while it was copied")
        offset += sent
    else:
        dest.seek(0, os.SEEK_END)  # where sendfile left the file (the buffered writer does not know)
        return
    src.seek(0)
    shutil.copyfileobj(src, dest, 1 << 20)


def write_binidx(path, documents, dtype=np.uint16) -> tuple:
    """Write each array of `documents` as one item and one document; return (tokens, items).

    No end-of-document token is added: include it in the arrays if you want one.
    """
    with BinIdxWriter(path, dtype) as w:
        for doc in documents:
            w.add_document(doc)
    return w.num_tokens, w.num_items
