"""The arithmetic demo corpus (RWKV-7-Arithmetic-0.1B) and its held-out set.

A document is a multi-turn dialogue, `User: {question}\\n\\nAssistant: {answer}`
turns joined by `\\n\\n`. Questions ask for a sum or difference, or for x in an
equation, written with ASCII or full-width digits, Chinese number words,
uppercase Chinese numerals (壹贰叁), English words, negatives and decimals.
The answer is a deterministic function of the problem: the problem restated
in ASCII digits, then the exact result (decimal.Decimal, normalised), e.g.
`32 + 15 = 47`, `5 - (-3) = 8`, `x = 12 - 5 = 7`.

Held out by construction: a computation whose canonical form (e.g. `32 + 15`,
also the solving step of `x - 15 = 32`) hashes into the eval partition never
appears in training documents, in any wording or as an equation;
make_eval_set draws only from that partition, with its own RNG salt.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import zlib
from decimal import Decimal
from typing import Iterator, NamedTuple

from rwkvlm.errors import UserError

KINDS = ("ascii", "fullwidth", "chinese", "chinese_upper", "english", "decimal", "negative", "equation")
HELDOUT_MOD = 64  # 1/64 of all problems are reserved for evaluation
_TRAIN_SALT = "rwkvlm-arithmetic-train"
_EVAL_SALT = "rwkvlm-arithmetic-eval"


class EvalItem(NamedTuple):
    kind: str
    question: str
    answer: str


def format_prompt(question: str) -> str:
    """The prompt a model completes with ` {answer}` (then a blank line)."""
    return f"User: {question}\n\nAssistant:"


# ---------------------------------------------------------------- numbers in words

_ZH_DIGITS = "零一二三四五六七八九"
_ZH_UNITS = ("", "十", "百", "千")
_ZH_UPPER_DIGITS = "零壹贰叁肆伍陆柒捌玖"
_ZH_UPPER_UNITS = ("", "拾", "佰", "仟")
_EN_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen "
    "fourteen fifteen sixteen seventeen eighteen nineteen"
).split()
_EN_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_FULLWIDTH = str.maketrans("0123456789-.+=?()", "０１２３４５６７８９－．＋＝？（）")


def _zh_below_10000(n: int, upper: bool, leading: bool) -> str:
    digits, units = (_ZH_UPPER_DIGITS, _ZH_UPPER_UNITS) if upper else (_ZH_DIGITS, _ZH_UNITS)
    out, pending_zero, started = [], False, False
    for pos in (3, 2, 1, 0):
        d = n // 10**pos % 10
        if d == 0:
            pending_zero = pending_zero or started
            continue
        if pending_zero:
            out.append(digits[0])
            pending_zero = False
        if not (pos == 1 and d == 1 and leading and not started and not upper):
            out.append(digits[d])  # lowercase 10-19 read 十, 十一 ..., not 一十
        out.append(units[pos])
        started = True
    return "".join(out)


def zh_int(n: int, upper: bool = False) -> str:
    """Chinese number words: 105 -> 一百零五 (upper: 壹佰零伍); below 10**8."""
    if n < 0:
        return "负" + zh_int(-n, upper)
    if n == 0:
        return (_ZH_UPPER_DIGITS if upper else _ZH_DIGITS)[0]
    if n >= 10**8:
        raise ValueError(f"{n} is too large for zh_int (below 10**8)")
    high, low = divmod(n, 10000)
    if not high:
        return _zh_below_10000(low, upper, leading=True)
    text = _zh_below_10000(high, upper, leading=True) + "万"
    if low:
        zero = (_ZH_UPPER_DIGITS if upper else _ZH_DIGITS)[0] if low < 1000 else ""
        text += zero + _zh_below_10000(low, upper, leading=False)
    return text


def en_int(n: int) -> str:
    """English words: 321 -> three hundred twenty-one; below 10**6."""
    if n < 0:
        return "negative " + en_int(-n)
    if n >= 10**6:
        raise ValueError(f"{n} is too large for en_int (below 10**6)")
    if n < 20:
        return _EN_ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _EN_TENS[tens] + ("-" + _EN_ONES[ones] if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return _EN_ONES[hundreds] + " hundred" + (" " + en_int(rest) if rest else "")
    thousands, rest = divmod(n, 1000)
    return en_int(thousands) + " thousand" + (" " + en_int(rest) if rest else "")


def ascii_num(x) -> str:
    """Canonical ASCII form: integers plain, decimals without trailing zeros, never -0."""
    if isinstance(x, int):
        return str(x)
    if x == x.to_integral_value():
        return str(int(x))
    return format(x.normalize(), "f")


def _split_decimal(x):
    text = ascii_num(x)
    negative = text.startswith("-")
    whole, _, frac = text.lstrip("-").partition(".")
    return negative, int(whole), frac


def say(x, style: str) -> str:
    """A number in one of the styles: ascii, fullwidth, chinese, chinese_upper, english."""
    if style == "ascii":
        return ascii_num(x)
    if style == "fullwidth":
        return ascii_num(x).translate(_FULLWIDTH)
    negative, whole, frac = _split_decimal(x)
    if style in ("chinese", "chinese_upper"):
        upper = style == "chinese_upper"
        digits = _ZH_UPPER_DIGITS if upper else _ZH_DIGITS
        text = zh_int(whole, upper) + ("点" + "".join(digits[int(c)] for c in frac) if frac else "")
        return ("负" if negative else "") + text
    if style == "english":
        text = en_int(whole) + (" point " + " ".join(_EN_ONES[int(c)] for c in frac) if frac else "")
        return ("negative " if negative else "") + text
    raise ValueError(f"unknown number style {style!r}")


# ---------------------------------------------------------------- problems

def _operand(x, style: str = "ascii") -> str:
    """A second operand in symbolic form: negatives in parentheses."""
    text = say(x, style)
    if ascii_num(x).startswith("-"):
        return "（" + text + "）" if style == "fullwidth" else "(" + text + ")"
    return text


def _canonical(a, op: str, b) -> str:
    return f"{ascii_num(a)} {op} {_operand(b)}"


def _result(a, op: str, b):
    return a + b if op == "+" else a - b


def _is_heldout(key: str) -> bool:
    return zlib.crc32(key.encode("utf-8")) % HELDOUT_MOD == 0


def _small_int(rng: random.Random) -> int:
    """0..999, digit count uniform over 1..3 so small and large numbers both appear."""
    digits = rng.choice((1, 2, 3))
    return rng.randrange(0 if digits == 1 else 10 ** (digits - 1), 10**digits)


def _decimal(rng: random.Random) -> Decimal:
    places = rng.choice((1, 2))
    value = Decimal(rng.randrange(100 * 10**places)).scaleb(-places)
    return Decimal(ascii_num(value))


# Question wordings per operator; {a} and {b} are already formatted.
_SYMBOLIC = (
    "{a} {op} {b} = ?",
    "{a}{op}{b}=?",
    "{a} {op} {b} 等于多少？",
    "{a} {op} {b} 是多少？",
    "计算：{a} {op} {b}",
    "What is {a} {op} {b}?",
    "Calculate {a} {op} {b}.",
    "{a} {op} {b} = ",
)
_FULLWIDTH_SYMBOLIC = (
    "{a} {op} {b} ＝ ？",
    "{a}{op}{b}＝？",
    "{a}{op}{b}等于多少？",
    "计算：{a}{op}{b}",
    "What is {a} {op} {b}?",
)
_WORDS_ZH = {
    "+": ("{a}加{b}等于多少？", "{a}加上{b}是多少？", "计算{a}加{b}。", "{a}与{b}的和是多少？", "请问{a}加{b}得多少？"),
    "-": ("{a}减{b}等于多少？", "{a}减去{b}是多少？", "计算{a}减{b}。", "{a}与{b}的差是多少？", "请问{a}减{b}得多少？"),
}
_WORDS_EN = {
    "+": ("What is {a} plus {b}?", "How much is {a} plus {b}?", "What is the sum of {a} and {b}?",
          "Add {a} and {b}.", "Calculate {a} plus {b}."),
    "-": ("What is {a} minus {b}?", "How much is {a} minus {b}?", "Subtract {b} from {a}.",
          "What is {b} subtracted from {a}?", "Calculate {a} minus {b}."),
}


def _ask(rng: random.Random, a, op: str, b, style: str) -> str:
    """One wording of `a op b` with numbers in `style`."""
    if style == "ascii" or (style in ("chinese", "chinese_upper", "english") and rng.random() < 0.15):
        # word-number styles are sometimes mixed with symbols: 三十二+十五=?
        if style == "english":  # spaced: "fifteen-four" would read as one number
            return f"{say(a, style)} {op} {_operand(b, style)} = ?"
        if style != "ascii":
            return f"{say(a, style)}{op}{_operand(b, style)}=?"
        if rng.random() < 0.3:
            table = _WORDS_ZH if rng.random() < 0.5 else _WORDS_EN
            return rng.choice(table[op]).format(a=say(a, "ascii"), b=say(b, "ascii"))
        return rng.choice(_SYMBOLIC).format(a=say(a, "ascii"), op=op, b=_operand(b, "ascii")).rstrip()
    if style == "fullwidth":
        return rng.choice(_FULLWIDTH_SYMBOLIC).format(
            a=say(a, style), op=op.translate(_FULLWIDTH), b=_operand(b, style)
        )
    if style in ("chinese", "chinese_upper"):
        return rng.choice(_WORDS_ZH[op]).format(a=say(a, style), b=say(b, style))
    if style == "english":
        return rng.choice(_WORDS_EN[op]).format(a=say(a, style), b=say(b, style))
    raise ValueError(f"unknown number style {style!r}")


_MIXED_STYLES = ("ascii",) * 6 + ("fullwidth",) * 2 + ("chinese",) * 1 + ("english",) * 1


def _binary_problem(rng: random.Random, kind: str):
    """(key, question, answer) for a sum or difference of kind `kind`."""
    op = rng.choice("+-")
    if kind == "decimal":
        a, b = _decimal(rng), _decimal(rng)
        if rng.random() < 0.2:
            a = -a if rng.random() < 0.5 else a
        style = rng.choice(_MIXED_STYLES)
    elif kind == "negative":
        a, b = _small_int(rng), _small_int(rng)
        sign = rng.choice(("a", "b", "ab"))
        a = -max(a, 1) if "a" in sign else a
        b = -max(b, 1) if "b" in sign else b
        style = rng.choice(_MIXED_STYLES)
    else:
        a, b = _small_int(rng), _small_int(rng)
        style = kind if kind in ("fullwidth", "chinese", "chinese_upper", "english") else "ascii"
    key = _canonical(a, op, b)
    return key, _ask(rng, a, op, b, style), f"{key} = {ascii_num(_result(a, op, b))}"


# Equation wordings; {eq} is the equation, {a}/{b} the known numbers.
_EQ_SYMBOLIC = (
    "{eq}", "解方程：{eq}", "Solve for x: {eq}", "{eq}，x 等于多少？", "If {eq}, what is x?", "求 x：{eq}",
)
_EQ_WORDS = {
    "x+a": ("一个数加上{a}等于{b}，这个数是多少？", "What number plus {a} equals {b}?"),
    "a+x": ("{a}加上一个数等于{b}，这个数是多少？", "{a} plus what number equals {b}?"),
    "x-a": ("一个数减去{a}等于{b}，这个数是多少？", "What number minus {a} equals {b}?"),
    "a-x": ("{a}减去一个数等于{b}，这个数是多少？", "{a} minus what number equals {b}?"),
}


def _equation_problem(rng: random.Random):
    """(key, question, answer) for solving x in a one-step linear equation."""
    form = rng.choice(("x+a", "a+x", "x-a", "a-x"))
    x, a = _small_int(rng), _small_int(rng)
    if rng.random() < 0.1:
        x = -max(x, 1)
    if rng.random() < 0.1:
        a = -max(a, 1)
    if form == "x+a":
        b = x + a
        equation, step = f"x + {_operand(a)} = {ascii_num(b)}", _canonical(b, "-", a)
    elif form == "a+x":
        b = a + x
        equation, step = f"{ascii_num(a)} + x = {ascii_num(b)}", _canonical(b, "-", a)
    elif form == "x-a":
        b = x - a
        equation, step = f"x - {_operand(a)} = {ascii_num(b)}", _canonical(b, "+", a)
    else:
        b = a - x
        equation, step = f"{ascii_num(a)} - x = {ascii_num(b)}", _canonical(a, "-", b)
    answer = f"x = {step} = {ascii_num(x)}"
    roll = rng.random()
    if roll < 0.6:
        question = rng.choice(_EQ_SYMBOLIC).format(eq=equation)
    elif roll < 0.75:
        question = rng.choice(_EQ_SYMBOLIC[:1] + _EQ_SYMBOLIC[3:4]).format(eq=equation).translate(_FULLWIDTH)
    else:
        zh, en = _EQ_WORDS[form]
        if rng.random() < 0.5:
            style = rng.choice(("ascii", "chinese"))
            question = zh.format(a=say(a, style), b=say(b, style))
        else:
            style = rng.choice(("ascii", "english"))
            question = en.format(a=say(a, style), b=say(b, style))
    return step, question, answer  # held out by the computation, shared with plain sums


def _problem(rng: random.Random, kind: str, heldout: bool) -> EvalItem:
    """A problem of `kind` inside (heldout=True) or outside the eval partition."""
    while True:
        if kind == "equation":
            key, question, answer = _equation_problem(rng)
        else:
            key, question, answer = _binary_problem(rng, kind)
        if _is_heldout(key) == heldout:
            return EvalItem(kind, question, answer)


def _turn(item: EvalItem) -> str:
    return f"User: {item.question}\n\nAssistant: {item.answer}"


def generate_documents(n_docs: int, seed: int = 0) -> Iterator[str]:
    """n_docs training dialogues (1-6 turns each); the same seed gives the same documents."""
    rng = random.Random(f"{_TRAIN_SALT}:{int(seed)}")
    for _ in range(int(n_docs)):
        turns = rng.choice((1, 2, 2, 3, 3, 4, 4, 5, 6))
        yield "\n\n".join(_turn(_problem(rng, rng.choice(KINDS), heldout=False)) for _ in range(turns))


def make_eval_set(n: int, seed: int = 0) -> list:
    """n distinct single-turn held-out items, balanced over KINDS (kind i % 8)."""
    rng = random.Random(f"{_EVAL_SALT}:{int(seed)}")
    items, seen = [], set()
    for i in range(int(n)):
        kind = KINDS[i % len(KINDS)]
        for _ in range(1000):
            item = _problem(rng, kind, heldout=True)
            if item.question not in seen:
                break
        seen.add(item.question)
        items.append(item)
    return items


# ---------------------------------------------------------------- command line

def write_jsonl(path, docs=None, mb=None, seed: int = 0, progress: bool = False) -> tuple:
    """Write {"text": ...} lines until `docs` documents or `mb` MB; return (documents, bytes)."""
    from rwkvlm.atomic import atomic_open

    limit_bytes = None if mb is None else int(float(mb) * 1_000_000)
    count = written = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=docs if docs is not None else limit_bytes, unit="doc" if docs is not None else "B",
                   unit_scale=True, desc="generating", disable=None)
    with atomic_open(path, "wb") as f:
        for text in generate_documents(docs if docs is not None else 10**12, seed):
            line = (json.dumps({"text": text}, ensure_ascii=False) + "\n").encode("utf-8")
            f.write(line)
            count += 1
            written += len(line)
            if bar is not None:
                bar.update(1 if docs is not None else len(line))
            if limit_bytes is not None and written >= limit_bytes:
                break
    if bar is not None:
        bar.close()
    return count, written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="make_arithmetic_data.py",
        description="Generate the arithmetic demo corpus (jsonl) that RWKV-7-Arithmetic-0.1B trains on.",
    )
    parser.add_argument("output", help="output .jsonl file, e.g. demo.jsonl")
    parser.add_argument("--docs", type=int, default=None,
                        help="number of documents (dialogues); default 40000 (about 10 MB) without --mb")
    parser.add_argument("--mb", type=float, default=None, help="stop at this many MB of jsonl")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    if args.docs is None and args.mb is None:
        args.docs = 40000
    if args.docs is not None and args.docs < 1:
        raise UserError(f"--docs must be at least 1, found {args.docs}")
    if args.mb is not None and not args.mb > 0:
        raise UserError(f"--mb must be positive, found {args.mb}")
    docs, written = write_jsonl(args.output, args.docs, args.mb, args.seed, progress=True)
    print(f"wrote {docs} documents, {written / 1e6:.2f} MB, to {args.output} (seed {args.seed})")
    return 0


if __name__ == "__main__":
    from rwkvlm.errors import run_cli

    sys.exit(run_cli(main))
