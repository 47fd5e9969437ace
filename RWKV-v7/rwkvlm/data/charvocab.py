"""A character vocabulary, for char-level models trained on plain text (`--vocab_size 0`).

The vocabulary is the sorted set of the characters of the training text (sorted by code
point, as Python sorts one-character strings), each character's id its place in that list:
with N characters the ids are 0..N-1 and the model's vocabulary is N. It is kept in PROJ_DIR as
`vocab.json` in the format RWKV-LM writes for its char-level runs, a JSON object from id (as a
string) to character:

    {"0": "\\n", "1": " ", "2": "!", ...}

so that RWKV-LM's tools read it too. A character vocabulary has no end-of-document token
(`end_of_doc` is None): id 0 is a real character, usually the newline.

`CharVocab.build(texts)` makes one, `encode`/`decode` convert (encode raises UserError for a
character outside the vocabulary, naming it), `read(path)` / `to_json()` load and write the file.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rwkvlm.errors import UserError

_REPLACEMENT = "\ufffd"


def code_points(text: str) -> np.ndarray:
    """The code points of `text`, (len(text),) uint32 (one copy, no Python loop)."""
    return np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype="<u4")


class CharVocab:
    """Sorted unique characters; id = index. encode(str) -> np.ndarray, decode(ids) -> str."""

    name = "char"
    end_of_doc = None  # no end-of-document token: every id is a character

    def __init__(self, chars):
        chars = list(chars)
        if not chars or any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise ValueError("a character vocabulary is a non-empty list of one-character strings")
        if chars != sorted(set(chars)):
            raise ValueError("the characters of a vocabulary must be sorted and unique")
        self.chars = chars
        self._codes = np.array([ord(c) for c in chars], dtype=np.uint32)  # sorted: searchsorted finds ids

    # ------------------------------------------------------------ making one
    @classmethod
    def build(cls, texts) -> "CharVocab":
        """The vocabulary of the characters in `texts` (strings; at least one character in all)."""
        seen = np.zeros(0, dtype=np.uint32)
        for t in texts:
            if t:
                seen = np.union1d(seen, np.unique(code_points(t)))
        if seen.size == 0:
            raise ValueError("no characters to build a vocabulary from")
        return cls([chr(int(c)) for c in seen])

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def __eq__(self, other) -> bool:
        return isinstance(other, CharVocab) and self.chars == other.chars

    def __hash__(self):
        return hash(tuple(self.chars))

    def __repr__(self) -> str:
        return f"CharVocab({self.vocab_size} characters)"

    # ------------------------------------------------------------ converting
    def encode(self, text: str) -> np.ndarray:
        """The ids of `text` (int64). UserError naming the characters the vocabulary lacks."""
        cps = code_points(text)
        if cps.size == 0:
            return np.zeros(0, dtype=np.int64)
        ids = np.searchsorted(self._codes, cps)
        ids_c = np.minimum(ids, len(self._codes) - 1)
        bad = self._codes[ids_c] != cps
        if bad.any():
            missing = sorted({chr(int(c)) for c in cps[bad]})
            shown = ", ".join(repr(c) for c in missing[:10]) + (", ..." if len(missing) > 10 else "")
            raise UserError(f"the text holds {len(missing)} character(s) that the model's character vocabulary "
                            f"({self.vocab_size} characters, vocab.json) does not have: {shown}. A char-level "
                            f"model knows only the characters of the text it was trained on; leave these out.")
        return ids.astype(np.int64)

    def decode(self, ids) -> str:
        """The text of `ids`; never raises (an id outside the vocabulary gives U+FFFD)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        n, chars = len(self.chars), self.chars
        return "".join(chars[i] if 0 <= i < n else _REPLACEMENT for i in ids)

    def decode_bytes(self, ids) -> bytes:
        """The UTF-8 bytes of decode(ids) (generate.TextStream reads these)."""
        return self.decode(ids).encode("utf-8", errors="replace")

    def describe_difference(self, other: "CharVocab") -> str:
        """What `other` has that this one lacks and the other way round, in a few words."""
        a, b = set(self.chars), set(other.chars)

        def some(s):
            s = sorted(s)
            return ", ".join(repr(c) for c in s[:8]) + (", ..." if len(s) > 8 else "")

        parts = []
        if b - a:
            parts.append(f"{len(b - a)} new character(s): {some(b - a)}")
        if a - b:
            parts.append(f"{len(a - b)} character(s) no longer there: {some(a - b)}")
        return "; ".join(parts) or "the same characters"

    # ------------------------------------------------------------ vocab.json
    def to_json(self) -> str:
        """vocab.json's text: {"0": c0, "1": c1, ...} (RWKV-LM's format)."""
        return json.dumps({str(i): c for i, c in enumerate(self.chars)}, ensure_ascii=False) + "\n"

    @classmethod
    def read(cls, path) -> "CharVocab":
        """Load a vocab.json; UserError naming the file when it is not one."""
        path = Path(path)
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read the character vocabulary {path} ({e}); it is written by "
                            f"demo-training-prepare.sh (train.py --train_stage 1 --data_type utf-8 --vocab_size 0). "
                            f"Run it again to make it.") from None
        try:
            if not isinstance(obj, dict) or not obj:
                raise ValueError("not a non-empty JSON object")
            chars = [obj[str(i)] for i in range(len(obj))]
            return cls(chars)
        except (KeyError, ValueError, TypeError) as e:
            raise UserError(f"{path} is not a character vocabulary ({e}): expected {{\"0\": char, \"1\": char, "
                            f"...}} with the characters sorted, as demo-training-prepare.sh writes it.") from None
