"""rwkvlm.data.binidx: MMIDIDX layout, reading any dtype, writing crash-safely."""
import os
import struct

import numpy as np
import pytest

from rwkvlm.data.binidx import BinIdx, BinIdxWriter, write_binidx
from rwkvlm.errors import UserError

# dtype codes from the spec, built by hand here (independent of the module's table)
# (1-8: Megatron's MMapIndexedDataset; 9: uint32 as in fairseq's and metaseq's MMIDIDX)
SPEC_DTYPES = {1: "u1", 2: "i1", 3: "<i2", 4: "<i4", 5: "<i8", 6: "<f8", 7: "<f8", 8: "<u2", 9: "<u4"}


def hand_built(path, code, items, doc_idx=None):
    """Write <path>.bin/.idx with struct, following the spec's layout byte by byte."""
    dtype = np.dtype(SPEC_DTYPES[code])
    if doc_idx is None:
        doc_idx = list(range(len(items) + 1))
    with open(f"{path}.bin", "wb") as f:
        for item in items:
            f.write(np.asarray(item, dtype=dtype).tobytes())
    idx = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    idx += struct.pack("<Q", len(items)) + struct.pack("<Q", len(doc_idx))
    idx += b"".join(struct.pack("<i", len(it)) for it in items)
    offset = 0
    for it in items:
        idx += struct.pack("<q", offset)
        offset += len(it) * dtype.itemsize
    idx += b"".join(struct.pack("<q", d) for d in doc_idx)
    with open(f"{path}.idx", "wb") as f:
        f.write(idx)
    return idx


def test_write_then_read_back(tmp_path):
    docs = [np.array([5, 6, 7, 0], np.uint16), np.array([0], np.uint16), np.array([65529, 1, 0], np.uint16)]
    tokens, items = write_binidx(tmp_path / "d", docs)
    assert (tokens, items) == (8, 3)
    d = BinIdx(tmp_path / "d")
    assert d.num_tokens == 8 and d.num_items == 3 and len(d) == 3
    assert d.dtype == np.dtype("<u2") and d.dtype_code == 8
    assert d.tokens.tolist() == [5, 6, 7, 0, 0, 65529, 1, 0]
    assert d.sizes.tolist() == [4, 1, 3]
    assert d.pointers.tolist() == [0, 8, 10]
    assert d.doc_idx.tolist() == [0, 1, 2, 3]
    assert [d.get(i).tolist() for i in range(3)] == [x.tolist() for x in docs]
    assert d.get(-1).tolist() == [65529, 1, 0]
    assert d.get(0, offset=1, length=2).tolist() == [6, 7]
    assert isinstance(d.tokens, np.memmap)
    with pytest.raises(IndexError):
        d.get(3)


def test_idx_bytes_match_spec_layout(tmp_path):
    items = [[1, 2, 3, 0], [4, 0], [7, 8, 9, 10, 0]]
    write_binidx(tmp_path / "ours", [np.array(x, np.uint16) for x in items])
    expected = hand_built(tmp_path / "spec", 8, items)
    assert (tmp_path / "ours.idx").read_bytes() == expected
    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "spec.bin").read_bytes()
    # spot-check the header fields at their absolute offsets
    raw = (tmp_path / "ours.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack_from("<Q", raw, 9)[0] == 1
    assert raw[17] == 8
    assert struct.unpack_from("<QQ", raw, 18) == (3, 4)
    assert len(raw) == 34 + 3 * 4 + 3 * 8 + 4 * 8


@pytest.mark.parametrize("code", sorted(SPEC_DTYPES))
def test_reads_hand_built_files_of_every_dtype(tmp_path, code):
    dtype = np.dtype(SPEC_DTYPES[code])
    items = [[1, 2, 3], [4], [5, 6], [-1 if dtype.kind in "if" else 255, 0]]
    # several items per document, as Megatron's tools write them
    hand_built(tmp_path / "x", code, items, doc_idx=[0, 2, 4])
    d = BinIdx(str(tmp_path / "x"))
    assert d.dtype == dtype and d.dtype_code == code
    assert d.num_items == 4 and d.num_tokens == 8
    assert d.doc_idx.tolist() == [0, 2, 4]
    assert [d.get(i).tolist() for i in range(4)] == [np.array(it, dtype).tolist() for it in items]


def test_uint32_write_then_read_back(tmp_path):
    """Token ids past 65535 in a uint32 file: code 9, byte pointers of 4-byte tokens, the spec's bytes."""
    items = [[70000, 5, 0], [4_000_000_000, 0], [1, 2, 3, 65536, 0]]
    assert write_binidx(tmp_path / "w", [np.array(x, np.uint32) for x in items], dtype=np.uint32) == (10, 3)
    expected = hand_built(tmp_path / "spec", 9, items)
    assert (tmp_path / "w.idx").read_bytes() == expected
    assert (tmp_path / "w.bin").read_bytes() == (tmp_path / "spec.bin").read_bytes()
    d = BinIdx(tmp_path / "w")
    assert d.dtype == np.dtype("<u4") and d.dtype_code == 9
    assert d.pointers.tolist() == [0, 12, 20]
    assert [d.get(i).tolist() for i in range(3)] == items
    with pytest.raises(ValueError):
        write_binidx(tmp_path / "v", [np.array([2**32], np.int64)], dtype=np.uint32)


def test_accepts_path_with_extension(tmp_path):
    write_binidx(tmp_path / "d", [np.array([1, 0], np.uint16)])
    assert BinIdx(tmp_path / "d.bin").num_tokens == 2
    assert BinIdx(str(tmp_path / "d.idx")).num_tokens == 2


def test_empty_dataset(tmp_path):
    assert write_binidx(tmp_path / "e", []) == (0, 0)
    d = BinIdx(tmp_path / "e")
    assert d.num_tokens == 0 and d.num_items == 0 and d.doc_idx.tolist() == [0]


def test_multi_item_documents_with_writer(tmp_path):
    with BinIdxWriter(tmp_path / "m") as w:
        w.add_item([1, 2])
        w.add_item([3])
        w.end_document()
        w.add_document([4, 0])
        w.add_items(np.array([5, 6, 7], np.uint16), [1, 2])
    d = BinIdx(tmp_path / "m")
    assert d.sizes.tolist() == [2, 1, 2, 1, 2]
    assert d.pointers.tolist() == [0, 4, 6, 10, 12]
    assert d.doc_idx.tolist() == [0, 2, 3, 4, 5]


def test_writer_rejects_values_that_do_not_fit(tmp_path):
    with pytest.raises(ValueError):
        with BinIdxWriter(tmp_path / "v") as w:
            w.add_document([1, 70000])
    assert os.listdir(tmp_path) == []


def test_failed_write_leaves_nothing_and_keeps_old_files(tmp_path):
    write_binidx(tmp_path / "d", [np.array([1, 2, 0], np.uint16)])
    before = {p: (tmp_path / p).read_bytes() for p in ("d.bin", "d.idx")}

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with BinIdxWriter(tmp_path / "d") as w:
            w.add_document(np.arange(1000, dtype=np.uint16))
            raise Boom()
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]  # no temporaries left
    assert {p: (tmp_path / p).read_bytes() for p in before} == before
    w2 = BinIdxWriter(tmp_path / "d")
    w2.add_document([9, 9])
    w2.abort()
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]
    assert BinIdx(tmp_path / "d").tokens.tolist() == [1, 2, 0]
    write_binidx(tmp_path / "d", [np.array([7, 0], np.uint16)])
    assert BinIdx(tmp_path / "d").tokens.tolist() == [7, 0]


def _expect_error(path, *words):
    with pytest.raises(UserError) as e:
        BinIdx(path)
    msg = str(e.value)
    for w in ("d.bin", "d.idx", "make_data") + words:
        assert w in msg, (w, msg)


def test_errors_name_both_files_and_what_to_do(tmp_path):
    p = tmp_path / "d"
    _expect_error(p, "does not exist")
    write_binidx(p, [np.array([1, 2, 3, 0], np.uint16), np.array([4, 0], np.uint16)])
    good_idx, good_bin = (tmp_path / "d.idx").read_bytes(), (tmp_path / "d.bin").read_bytes()

    (tmp_path / "d.bin").unlink()
    _expect_error(p, "does not exist")
    (tmp_path / "d.bin").write_bytes(good_bin[:-2])
    _expect_error(p, "past the end")
    (tmp_path / "d.bin").write_bytes(good_bin + b"\x01")
    _expect_error(p, "multiple of 2")
    (tmp_path / "d.bin").write_bytes(good_bin + b"\x01\x00" * 5)  # more tokens than the index describes
    _expect_error(p, "holds 11 tokens but d.idx describes 6")
    (tmp_path / "d.bin").write_bytes(good_bin)

    (tmp_path / "d.idx").write_bytes(b"NOTANIDX!" + good_idx[9:])
    _expect_error(p, "MMIDIDX")
    (tmp_path / "d.idx").write_bytes(good_idx[:9] + struct.pack("<Q", 2) + good_idx[17:])
    _expect_error(p, "version 2")
    (tmp_path / "d.idx").write_bytes(good_idx[:17] + b"\x0c" + good_idx[18:])
    _expect_error(p, "dtype code 12")
    (tmp_path / "d.idx").write_bytes(good_idx[:-1])
    _expect_error(p, "truncated")
    (tmp_path / "d.idx").write_bytes(good_idx[:20])
    _expect_error(p, "header")
    (tmp_path / "d.idx").write_bytes(good_idx)
    assert BinIdx(p).num_tokens == 6


def test_open_maps_instead_of_reading(tmp_path):
    """Opening must not load sizes/pointers/tokens (MiniPile has ~1M items, the Pile far more)."""
    n = 200_000
    with BinIdxWriter(tmp_path / "big") as w:
        w.add_items(np.zeros(n, np.uint16), np.ones(n, "<i4"))
    d = BinIdx(tmp_path / "big")
    for arr in (d.tokens, d.sizes, d.pointers, d.doc_idx):
        assert isinstance(arr, np.memmap)
    assert d.num_items == n and int(d.pointers[-1]) == 2 * (n - 1)


@pytest.mark.parametrize("failure", [None, "no sendfile", "no space"])
def test_index_parts_copied_in_the_kernel_or_by_blocks(tmp_path, monkeypatch, failure):
    """finish() appends the index's parts with sendfile, or by 1 MB blocks where the system has no
    sendfile between files: the same .idx; a write error (a full disk) is not hidden by the fallback."""
    import errno

    sizes = np.arange(1, 300_001) % 7 + 1
    tokens = np.arange(int(sizes.sum())) % 60000
    expected = None
    if failure:
        with BinIdxWriter(tmp_path / "ref") as w:
            w.add_items(tokens, sizes)
        expected = (tmp_path / "ref.idx").read_bytes()
        code = errno.EINVAL if failure == "no sendfile" else errno.ENOSPC

        def sendfile(*a):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(os, "sendfile", sendfile)
    w = BinIdxWriter(tmp_path / "d")
    w.add_items(tokens, sizes)
    if failure == "no space":
        with pytest.raises(OSError, match="No space"):
            w.finish()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.bin", "ref.idx"]
        return
    w.finish()
    d = BinIdx(tmp_path / "d")
    assert d.num_items == sizes.size and np.array_equal(d.sizes, sizes)
    assert d.doc_idx.tolist() == list(range(sizes.size + 1))
    if expected is not None:
        assert (tmp_path / "d.idx").read_bytes() == expected


def test_reserved_items_written_by_someone_else(tmp_path):
    """reserve_items: the index grows here, the tokens are written into the temporary .bin by another
    writer (make_data's workers, with pwrite) in any order, mixed with add_items; finish() refuses a
    .bin where a reserved part was never written."""
    docs = [np.arange(i, i + 5 + i % 4, dtype=np.uint16) for i in range(40)]
    write_binidx(tmp_path / "ref", docs)
    w = BinIdxWriter(tmp_path / "d")
    fd = os.open(w.tmp_bin_path, os.O_WRONLY)
    later = []
    for i in range(0, 40, 4):
        group = docs[i : i + 4]
        if i % 8:
            w.add_items(np.concatenate(group), [len(d) for d in group])
        else:
            later.append((w.reserve_items([len(d) for d in group]), np.concatenate(group)))
    for offset, tokens in reversed(later):
        os.pwrite(fd, tokens.tobytes(), offset)
    os.close(fd)
    w.finish()
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"d{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()

    w = BinIdxWriter(tmp_path / "e")
    w.add_items(docs[0], [len(docs[0])])
    w.reserve_items([3])
    with pytest.raises(OSError, match="need"):
        w.finish()
    assert not (tmp_path / "e.bin").exists() and not (tmp_path / "e.idx").exists()
