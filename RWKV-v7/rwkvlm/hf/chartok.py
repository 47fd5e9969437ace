"""A char-level model's vocabulary (PROJ_DIR/vocab.json) as a Hugging Face tokenizer, and back.

export_hf writes, for a model with a vocab.json beside its weights:

- `tokenizer.json`: a `tokenizers` tokenizer (format 1.0) that `AutoTokenizer.from_pretrained`
  loads as a fast tokenizer, without remote code: a Split pre-tokenizer that cuts the text into
  single characters (code points; `[\\s\\S]`, isolated), a WordLevel model whose vocabulary is
  {character: id} with vocab.json's ids, and a Fuse decoder that joins the characters again. No
  normalizer and no special tokens: the text is encoded as it is, one id per character, exactly
  as `rwkvlm.data.charvocab.CharVocab.encode` does. A character the vocabulary lacks cannot be
  encoded: tokenizers raises `WordLevel error: Missing [UNK] token from the vocabulary` (the
  vocabulary has no unknown token, as the model has no row for one);
- `tokenizer_config.json`: `PreTrainedTokenizerFast`, no bos / eos / pad (a character vocabulary
  has no end-of-document token: id 0 is a character, usually the newline);
- `rwkvlm_vocab.json`: the vocab.json itself, byte for byte, which import_hf writes back beside
  the imported .pth.

No `tokenizers` import is needed to write these files (the JSON is written here); tests check that
`tokenizers` and transformers read them as documented.
"""
from __future__ import annotations

import json
from pathlib import Path

from rwkvlm.data.charvocab import CharVocab
from rwkvlm.errors import UserError

TOKENIZER_FILE = "tokenizer.json"
VOCAB_COPY = "rwkvlm_vocab.json"
SPLIT_PATTERN = r"[\s\S]"  # any one code point, newlines included
UNK = "<unk>"  # what tokenizers writes for a WordLevel model without one; no character is it


def tokenizer_json(vocab: CharVocab) -> dict:
    """tokenizer.json (as a dict) of a character vocabulary."""
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": SPLIT_PATTERN}, "behavior": "Isolated",
                          "invert": False},
        "post_processor": None,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": {c: i for i, c in enumerate(vocab.chars)}, "unk_token": UNK},
    }


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
    }


def vocab_from_tokenizer_json(path: Path, where: str) -> CharVocab | None:
    """The character vocabulary of a tokenizer.json written as tokenizer_json writes it, else None
    (another kind of tokenizer). UserError when it claims to be one but is damaged."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{where}: {TOKENIZER_FILE} is not valid JSON ({e}).") from None
    model = obj.get("model") if isinstance(obj, dict) else None
    pre = obj.get("pre_tokenizer") if isinstance(obj, dict) else None
    if not (isinstance(model, dict) and model.get("type") == "WordLevel" and isinstance(pre, dict)
            and pre.get("type") == "Split" and pre.get("pattern") == {"Regex": SPLIT_PATTERN}
            and not obj.get("added_tokens") and obj.get("normalizer") is None):
        return None
    table = model.get("vocab")
    if not isinstance(table, dict) or not table:
        return None
    by_id = {i: c for c, i in table.items()}
    try:
        chars = [by_id[i] for i in range(len(table))]
        return CharVocab(chars)
    except (KeyError, ValueError, TypeError):
        return None  # ids with gaps, tokens longer than one character, not sorted: not a vocab.json's
