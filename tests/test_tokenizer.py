"""rwkvlm.data.tokenizer: token-exact with the reference TRIE_TOKENIZER; decode never raises."""
import random
from pathlib import Path

import numpy as np
import pytest

from rwkvlm.data.tokenizer import VOCAB_SIZE, get_tokenizer

rwkv = pytest.importorskip("rwkv")
from rwkv.rwkv_tokenizer import TRIE_TOKENIZER  # noqa: E402


@pytest.fixture(scope="module")
def ref():
    return TRIE_TOKENIZER(str(Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"))


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def _random_unicode(rng: random.Random, n: int) -> str:
    """Random code points from many planes (no surrogates), with runs of ASCII between."""
    ranges = [(0x20, 0x7E), (0x00, 0x1F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF),
              (0x10000, 0x1FFFF), (0x20000, 0x2FFFF), (0x30000, 0x3FFFF), (0xE0000, 0xEFFFF),
              (0xF0000, 0x10FFFF), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def corpus():
    rng = random.Random(1234)
    texts = [
        "",
        "Hello, world! The quick brown fox jumps over the lazy dog.",
        "It's 3:45pm -- isn't it?  \"Quotes\" and 'apostrophes'; semi-colons: yes.",
        "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\n\tclass A(B): pass\n",
        "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }\r\n",
        "人工智能正在改变世界。我们今天学习RWKV语言模型，它结合了RNN和Transformer的优点。",
        "三十二加十五等于多少？答：四十七。壹贰叁肆伍陆柒捌玖拾佰仟万亿",
        "全角数字：０１２３４５６７８９ ＋ － ＝ ？（１２）．５",
        "日本語のテキストとカタカナ、한국어 텍스트, Ελληνικά, русский текст, العربية, עברית",
        "emoji: 😀😃😄 👍🏽 👩‍👩‍👧‍👦 🏳️‍🌈 🇨🇳🇺🇸 ❤️‍🔥 🧑🏿‍🚀 1️⃣ #️⃣ 🫠",
        "combining: e\u0301 a\u0308 n\u0303 Z\u0351\u0352\u0353 \u200b\u200c\u200d\ufeff zero-width",
        "\x00\x01\x02\x7f control \x1b[31mred\x1b[0m",
        "math: ∀x∈ℝ, ∑ᵢ xᵢ² ≥ 0; ∫₀^∞ e^{-x} dx = 1; 𝔸𝔹ℂ 𝕏",
        "x" * 5000,
        "ab" * 3000 + "世界" * 700,
        "https://example.com/path?q=1&r=%20x#frag user@example.org",
    ]
    for n in (1, 2, 3, 7, 16, 64, 100, 4097):
        texts.append(" " * n)
        texts.append("a" + " " * n + "b")
        texts.append("\n" * n)
    texts.append("\t \t\n\r\n \u3000\u3000  \n\n\n\t\t\t   ")
    texts.append("".join(rng.choice([" ", "\t", "\n", "\r\n", "\u3000", "a", "1"]) for _ in range(3000)))
    for _ in range(2000):
        texts.append(_random_unicode(rng, rng.randint(1, 80)))
    texts.append(_random_unicode(rng, 50000))
    from rwkvlm.data.arithmetic import generate_documents

    texts.extend(generate_documents(300, seed=5))  # the demo corpus itself
    return texts


def test_encode_token_exact_with_reference(tok, ref):
    for text in corpus():
        assert tok.encode(text) == ref.encode(text), repr(text[:80])


def test_encode_exact_on_vocab_pieces_fuzz(tok, ref):
    """Strings glued from random vocabulary entries stress the longest-match boundaries."""
    rng = random.Random(7)
    pieces = [b for b in tok.table[1:65530] if b != "\ufffd".encode()]
    valid = []
    for b in pieces:
        try:
            valid.append(b.decode("utf-8"))
        except UnicodeDecodeError:
            pass
    assert len(valid) > 60000
    for _ in range(400):
        text = "".join(rng.choice(valid) for _ in range(rng.randint(1, 30)))
        assert tok.encode(text) == ref.encode(text), repr(text)


def test_table_matches_reference(tok, ref):
    assert len(tok.table) == VOCAB_SIZE
    for i, b in ref.idx2token.items():
        assert tok.table[i] == b
    assert set(ref.idx2token) == set(range(1, 65530))


def test_decode_round_trip_and_reference_bytes(tok, ref):
    for text in corpus():
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode_bytes(ids) == ref.decodeBytes(ids)
        assert tok.round_trips(text, ids)
        assert tok.decode(np.array(ids, dtype=np.uint16)) == text


def test_decode_never_raises(tok):
    partial = [i for i in range(1, 65530) if _invalid_utf8(tok.table[i])]
    assert len(partial) > 100  # the vocabulary has partial UTF-8 tokens
    for ids in ([0], [65530], [65535], [-1], [-7], [65536], [10**12], partial[:50], [partial[0]] * 3,
                [0, 300, 65535, -5, 2**40], list(range(65520, 65536))):
        out = tok.decode(ids)
        assert isinstance(out, str) and "\ufffd" in out
    assert tok.decode([]) == ""
    # an unknown id must not borrow a real token (negative ids must not wrap around)
    assert tok.decode([-7]) == "\ufffd"
    assert tok.decode([0]) == "\ufffd"
    assert tok.decode(tok.encode("ab") + [0] + tok.encode("cd")) == "ab\ufffdcd"


def _invalid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_lone_surrogate_cannot_round_trip(tok):
    with pytest.raises(UnicodeEncodeError):
        tok.encode("a\ud800b")
    assert not tok.round_trips("a\ud800b", tok.encode("ab"))
    assert not tok.round_trips("abc", tok.encode("abd"))
