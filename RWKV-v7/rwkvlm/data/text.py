"""Plain UTF-8 text as training data (`--data_type utf-8`): a .txt file or a folder of them.

    data = load_text_data("book.txt", vocab_size=0)        # a char-level vocabulary is built
    data = load_text_data("book.txt", vocab_size=65536)    # the World vocabulary
    data.tokens      # 1-D uint16 (or uint32) token array, in memory, sampled like a .bin

What is read: the file itself, or every `*.txt` file under the folder (sub-folders too), in the
order of their sorted relative paths. Each file must be UTF-8 (a leading byte-order mark is
dropped); the first invalid byte stops with the file, its byte offset and line. Empty files in
a folder are left out; an empty file given by name, or a folder without text, is refused.

How it is tokenized:
- a character vocabulary (vocab_size 0, or a fixed size below 65536 that holds all the
  characters): the files' characters back to back, each its id in rwkvlm.data.charvocab
  (there is no end-of-document token);
- the World vocabulary (vocab_size 65536 or more): each file's tokens followed by token 0
  (end of document), as make_data.py writes each document.

The text is read and tokenized once per process, into memory: for corpora larger than a few
hundred MB use make_data.py (jsonl -> binidx), which streams to disk.
"""
from __future__ import annotations

import codecs
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rwkvlm.data.charvocab import CharVocab
from rwkvlm.errors import UserError
from rwkvlm.recipe import END_OF_DOC

TEXT_SUFFIX = ".txt"
WORLD_VOCAB_SIZE = 65536  # rwkvlm.data.tokenizer.VOCAB_SIZE (not imported: it loads the tokenizer package)


def uses_world_vocab(vocab_size: int) -> bool:
    """--vocab_size 65536 (or more) with text data: the World tokenizer; 0 or less: characters."""
    return vocab_size >= WORLD_VOCAB_SIZE


def text_files(path, flag: str = "--data_file") -> list[Path]:
    """The files `path` names: itself, or the *.txt files under the folder, sorted."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted((q for q in p.rglob(f"*{TEXT_SUFFIX}") if q.is_file()), key=lambda q: q.relative_to(p).parts)
        if not files:
            raise UserError(f"{flag} {path!r} is a folder without any {TEXT_SUFFIX} file (searched "
                            f"{p.resolve()} and its sub-folders). Put your text in .txt files there, or give "
                            f"{flag} the path of a text file.")
        return files
    hint = ""
    if Path(str(p) + TEXT_SUFFIX).is_file():
        hint = f" ({p}{TEXT_SUFFIX} exists: give the name with its extension)"
    raise UserError(f"{flag} {path!r} not found: tried {p.resolve()} (working directory {Path.cwd()}){hint}. "
                    f"With --data_type utf-8 give a .txt file or a folder of .txt files, relative to "
                    f"RWKV-v7/train_temp or absolute.")


def read_utf8(path, flag: str = "--data_file") -> str:
    """The text of one file; UserError at the first byte that is not UTF-8 (offset, line, what to do)."""
    path = Path(path)
    data = path.read_bytes()
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = skip + e.start
        line = data.count(b"\n", 0, at) + 1
        col = at - (data.rfind(b"\n", 0, at) + 1)
        raise UserError(
            f"{path} ({flag}) is not valid UTF-8: byte offset {at} (line {line}, byte {col + 1} of the line) "
            f"holds {data[at:at + 4].hex(' ')}, which {e.reason}. --data_type utf-8 reads UTF-8 text only: "
            f"convert the file, e.g. `iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{TEXT_SUFFIX}` "
            f"for Latin-1 text (or -f cp1252, -f gbk ... for its encoding), or remove the bad bytes. Nothing "
            f"was written.") from None


def read_texts(path, flag: str = "--data_file") -> list[tuple[Path, str]]:
    """(file, text) of every non-empty file `path` names; UserError when there is no text at all."""
    files = text_files(path, flag)
    texts = [(f, read_utf8(f, flag)) for f in files]
    kept = [(f, t) for f, t in texts if t]
    if not kept:
        what = f"{flag} {path!r} is an empty file" if len(files) == 1 and Path(path).is_file() else \
            f"the {len(files)} {TEXT_SUFFIX} file(s) of {flag} {path!r} are all empty"
        raise UserError(f"{what}: there is no text to train on. Give a file (or folder) that holds your "
                        f"training text.")
    return kept


@dataclass
class TextData:
    """Text read and tokenized once (see the module's docstring)."""

    path: str  # as given
    files: list  # the files read, in order
    tokens: np.ndarray  # 1-D token ids
    vocab: CharVocab | None  # the character vocabulary; None for the World vocabulary
    vocab_size: int  # the model's vocabulary: N characters (or the fixed size asked for), or 65536+
    characters: int  # characters of text read

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def name(self) -> str:
        return Path(self.path).name or str(self.path)

    @property
    def vocab_name(self) -> str:
        from rwkvlm.data.tokenizer import VOCAB_NAME

        return f"char{self.vocab.vocab_size}" if self.vocab is not None else VOCAB_NAME

    def describe(self) -> str:
        files = f"{len(self.files)} {TEXT_SUFFIX} files" if len(self.files) > 1 else "1 file"
        if self.vocab is None:
            how = "the World vocabulary"
        else:
            how = f"a character vocabulary of {self.vocab.vocab_size} characters (vocab.json)"
        return (f"{self.path} (utf-8, {files}): {self.characters:,} characters as {self.num_tokens:,} tokens of "
                f"{how}, model vocab_size {self.vocab_size}")

    def record(self) -> dict:
        """What train_config.json says about the data."""
        return {"kind": "utf-8", "path": str(self.path), "files": len(self.files), "characters": self.characters,
                "tokens": self.num_tokens, "vocab": self.vocab_name, "vocab_size": self.vocab_size}


def _dtype_for(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def tokenize(texts, vocab: CharVocab | None) -> np.ndarray:
    """The token array of `texts` (strings) by a character vocabulary, or by the World tokenizer
    (vocab None: each text followed by token 0)."""
    if vocab is not None:
        dtype = _dtype_for(vocab.vocab_size)
        return np.concatenate([vocab.encode(t).astype(dtype) for t in texts]) if texts else np.zeros(0, dtype)
    from rwkvlm.data.tokenizer import get_tokenizer

    tok = get_tokenizer()
    parts = []
    for t in texts:
        parts.append(np.asarray(tok.encode(t), dtype=np.uint16))
        parts.append(np.array([END_OF_DOC], dtype=np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, np.uint16)


def load_text_data(path, vocab_size: int, vocab: CharVocab | None = None, flag: str = "--data_file") -> TextData:
    """Read and tokenize `path` (see the module's docstring).

    vocab_size 0: a character vocabulary built from the text (model vocab = its size); below 65536:
    the same, and it must hold every character (UserError naming --vocab_size otherwise); 65536 or
    more: the World vocabulary. `vocab` given: tokenize with it (a validation text read with the
    training run's vocabulary: UserError for a character it lacks)."""
    texts = read_texts(path, flag)
    strings = [t for _, t in texts]
    chars = sum(len(t) for t in strings)
    if vocab is None and not uses_world_vocab(vocab_size):
        vocab = CharVocab.build(strings)
        if vocab.vocab_size < 2:
            raise UserError(f"the text of {flag} {path!r} is one character ({vocab.chars[0]!r}) repeated: there is "
                            f"nothing for a model to learn. Give it your training text.")
        if 0 < vocab_size < vocab.vocab_size:
            raise UserError(
                f"--vocab_size is {vocab_size}, but the text of {flag} {path!r} holds {vocab.vocab_size} different "
                f"characters, each a token of a char-level model. Use --vocab_size 0 (the vocabulary is built "
                f"from the data: {vocab.vocab_size}), --vocab_size {vocab.vocab_size} or more, or --vocab_size "
                f"65536 for the World vocabulary. Nothing was written.")
    try:
        tokens = tokenize(strings, vocab)
    except UserError as e:
        raise UserError(f"{flag} {path!r}: {e}") from None
    size = vocab_size if vocab_size > 0 else vocab.vocab_size
    return TextData(path=str(path), files=[f for f, _ in texts], tokens=tokens, vocab=vocab, vocab_size=size,
                    characters=chars)
