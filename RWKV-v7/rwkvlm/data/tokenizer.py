"""The RWKV World tokenizer (vocabulary rwkv_vocab_v20230424).

Encoding uses `pyrwkv-tokenizer` (Rust), which is token-exact with the
reference `rwkv.rwkv_tokenizer.TRIE_TOKENIZER`. Decoding does not call the
Rust decoder (it panics on partial UTF-8 tokens and on unknown ids, with an
exception that `except Exception` misses); it joins the token bytes from the
vocabulary table instead and decodes them with errors="replace", so decode
never raises. Ids without a vocabulary entry (0, 65530..65535, anything
outside 0..65535) decode to U+FFFD, as in the reference. The measurements behind
this: RWKV-v7/docs/tokenizer.md.
"""
from __future__ import annotations

import ast
import functools

from rwkvlm.errors import UserError

VOCAB_NAME = "rwkv_vocab_v20230424"
VOCAB_SIZE = 65536  # embedding rows; ids 1..65529 are real tokens, 0 = end of document
_REPLACEMENT = "\ufffd".encode("utf-8")


def _load_table(vocab_file: str) -> list:
    """Token id -> bytes, a list of VOCAB_SIZE entries (unknown ids -> U+FFFD bytes)."""
    ids, lengths, literals = [], [], []
    with open(vocab_file, "r", encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if line:
                first, last = line.index(" "), line.rindex(" ")
                ids.append(int(line[:first]))
                lengths.append(int(line[last:]))
                literals.append(line[first + 1 : last])
    values = []
    for start in range(0, len(literals), 2048):  # a few big parses: fast, little peak memory
        values += ast.literal_eval("[" + ",".join(literals[start : start + 2048]) + "]")
    table = [_REPLACEMENT] * VOCAB_SIZE
    for i, n, value in zip(ids, lengths, values):
        if isinstance(value, str):
            value = value.encode("utf-8")
        if len(value) != n or not 0 < i < VOCAB_SIZE:
            raise UserError(
                f"the vocabulary file {vocab_file} is corrupt at token {i} "
                f"({len(value)} bytes, the line says {n}); "
                "reinstall it with `pip install --force-reinstall pyrwkv-tokenizer`"
            )
        table[i] = value
    return table


class WorldTokenizer:
    """encode(str) -> list[int] and decode(ids) -> str for the World vocabulary."""

    def __init__(self):
        try:
            import pyrwkv_tokenizer
        except ImportError as e:
            raise UserError(
                f"the tokenizer package is missing ({e}); install it with "
                "`pip install pyrwkv-tokenizer` (or `pip install -e .` in the repository root)"
            ) from None
        self._rust = pyrwkv_tokenizer.RWKVTokenizer()
        self._encode = self._rust.tokenizer.encode
        self.vocab_file = str(self._rust.vocab_filepath)
        self.vocab_name = VOCAB_NAME
        self.vocab_size = VOCAB_SIZE
        self._table = None

    @property
    def table(self) -> list:
        """Token id -> its bytes (loaded on first use, ~0.3 s)."""
        if self._table is None:
            self._table = _load_table(self.vocab_file)
        return self._table

    def encode(self, text: str) -> list:
        """Token ids of `text`. Raises UnicodeEncodeError for lone surrogates."""
        return self._encode(text)

    def decode_bytes(self, ids) -> bytes:
        """The bytes the ids stand for; unknown ids give the bytes of U+FFFD."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        else:
            ids = list(ids)
        if not ids:
            return b""
        table = self.table
        if min(ids) >= 0 and max(ids) < VOCAB_SIZE:
            return b"".join(map(table.__getitem__, ids))
        return b"".join(table[i] if 0 <= i < VOCAB_SIZE else _REPLACEMENT for i in ids)

    def decode(self, ids) -> str:
        """Text of the ids; never raises (partial UTF-8 and unknown ids -> U+FFFD)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def round_trips(self, text: str, ids) -> bool:
        """True when the ids decode exactly to `text`."""
        try:
            expected = text.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return self.decode_bytes(ids) == expected


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> WorldTokenizer:
    """The process-wide World tokenizer (the vocabulary is loaded once)."""
    return WorldTokenizer()
