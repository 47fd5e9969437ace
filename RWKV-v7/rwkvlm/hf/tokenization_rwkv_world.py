"""The RWKV World tokenizer (vocabulary rwkv_vocab_v20230424) for Hugging Face transformers.

This file is shipped into every folder that `export_hf.py` writes, next to
`rwkv_vocab_v20230424.txt`, and `tokenizer_config.json` names it, so that

    AutoTokenizer.from_pretrained(folder, trust_remote_code=True)

loads it. It needs `transformers` only (no rwkvlm, no torch). It lives in the rwkvlm package to be
copied, never imported there.

Encoding is the vocabulary's rule: greedy longest match over the UTF-8 bytes of the text (the rule
of the reference `rwkv.rwkv_tokenizer.TRIE_TOKENIZER` and of `pyrwkv-tokenizer`). Id 0, which the
vocabulary file does not list, is the end-of-document token, named `<|endoftext|>` here and used as
bos, eos and pad; nothing is added around a text (no bos), and a text that spells
`<|endoftext|>` is encoded as its bytes, as the reference does (split_special_tokens; pass id 0
as an id). Decoding joins the tokens' bytes and
reads them as UTF-8 with errors replaced, so any id decodes; ids the file does not list (0 when not
skipped as special, 65530..65535) give U+FFFD.

Tokens are strings to transformers: each byte is written as one printable character (the
byte-to-character table of GPT-2's byte-level BPE, rebuilt here), so the 65,529 byte strings of the
vocabulary become 65,529 distinct str tokens.
"""
from __future__ import annotations

import ast
import os
import shutil

from transformers import PreTrainedTokenizer

VOCAB_FILE = "rwkv_vocab_v20230424.txt"
END_OF_TEXT = "<|endoftext|>"
VOCAB_ROWS = 65536  # the embedding rows of a World-vocabulary model


def _byte_chars() -> list[str]:
    """One printable character per byte value: printable Latin-1 bytes stand for themselves, the
    others (control characters, space, 0x7f-0xa0, 0xad) for code points from U+0100 on."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    out, spare = [], 0x100
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(spare))
            spare += 1
    return out


def read_vocab(path: str) -> dict[int, bytes]:
    """{id: bytes} of a World vocabulary file: lines `<id> <Python str or bytes literal> <length>`."""
    table = {}
    with open(path, "r", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            first, last = line.index(" "), line.rindex(" ")
            idx, value, length = int(line[:first]), ast.literal_eval(line[first + 1:last]), int(line[last + 1:])
            if isinstance(value, str):
                value = value.encode("utf-8")
            if not isinstance(value, bytes) or len(value) != length:
                raise ValueError(f"{path} line {n}: token {idx} has {len(value)} bytes, the line says {length}")
            table[idx] = value
    return table


class RWKVWorldTokenizer(PreTrainedTokenizer):
    """The World tokenizer; `vocab_file` is rwkv_vocab_v20230424.txt."""

    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT,
                 unk_token=None, clean_up_tokenization_spaces=False, split_special_tokens=True, **kwargs):
        self.vocab_file = vocab_file
        self._bytes = read_vocab(vocab_file)                   # id -> bytes
        self._by_bytes = {b: i for i, b in self._bytes.items()}  # bytes -> id
        self._prefixes = {b[:n] for b in self._bytes.values() for n in range(1, len(b) + 1)}
        chars = _byte_chars()
        self._char_of = chars
        self._byte_of = {c: b for b, c in enumerate(chars)}
        self._token_of = {i: "".join(chars[x] for x in b) for i, b in self._bytes.items()}  # id -> str token
        self._id_of = {t: i for i, t in self._token_of.items()}
        if END_OF_TEXT in self._id_of:
            raise ValueError(f"{vocab_file} lists {END_OF_TEXT!r} as a token; expected the World vocabulary")
        self._id_of[END_OF_TEXT] = 0
        self._replacement = "".join(chars[x] for x in "\ufffd".encode("utf-8"))
        super().__init__(bos_token=bos_token, eos_token=eos_token, pad_token=pad_token, unk_token=unk_token,
                         clean_up_tokenization_spaces=clean_up_tokenization_spaces,
                         split_special_tokens=split_special_tokens, **kwargs)

    # ------------------------------------------------------------ vocabulary

    @property
    def vocab_size(self) -> int:
        return VOCAB_ROWS

    def get_vocab(self) -> dict[str, int]:
        vocab = dict(self._id_of)
        vocab.update(getattr(self, "_added_tokens_encoder", {}))
        return vocab

    def _convert_token_to_id(self, token: str) -> int:
        return self._id_of.get(token, 0)

    def _convert_id_to_token(self, index: int) -> str:
        if index == 0:
            return END_OF_TEXT
        return self._token_of.get(int(index), self._replacement)

    # ------------------------------------------------------------ encoding and decoding

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of raw bytes: at each position, the longest vocabulary entry that starts there."""
        ids, i, n = [], 0, len(data)
        prefixes, by_bytes = self._prefixes, self._by_bytes
        while i < n:
            best, end = None, i + 1
            while end <= n and data[i:end] in prefixes:
                hit = by_bytes.get(data[i:end])
                if hit is not None:
                    best, best_end = hit, end
                end += 1
            if best is None:  # cannot happen with the World vocabulary (every byte is a token)
                raise ValueError(f"byte {data[i]:#04x} has no token")
            ids.append(best)
            i = best_end
        return ids

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [self._token_of[i] for i in self.encode_bytes(text.encode("utf-8"))]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        out = bytearray()
        byte_of = self._byte_of
        for token in tokens:
            if all(c in byte_of for c in token):  # a vocabulary token (or a special token's ASCII text)
                out.extend(byte_of[c] for c in token)
            else:  # an added token with other characters: its text
                out.extend(token.encode("utf-8"))
        return out.decode("utf-8", errors="replace")

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        """The ids as they are: RWKV World models take no bos/eos around a text."""
        return list(token_ids_0) + (list(token_ids_1) if token_ids_1 is not None else [])

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        return [0] * (len(token_ids_0) + (len(token_ids_1) if token_ids_1 is not None else 0))

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE
        dest = os.path.join(save_directory, name)
        if os.path.abspath(dest) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, dest)
        return (dest,)
