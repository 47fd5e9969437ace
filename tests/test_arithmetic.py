"""The arithmetic demo corpus: exact answers that match their questions, held-out eval set."""
import json
import re
from collections import Counter
from decimal import Decimal

import pytest

from rwkvlm.data.arithmetic import KINDS, EvalItem, ascii_num, en_int, format_prompt, generate_documents, main, \
    make_eval_set, say, zh_int
from rwkvlm.errors import run_cli

# ------------------------------------------------ independent readers of the number words

ZH_DIGIT = {c: i for i, c in enumerate("零一二三四五六七八九")} | {c: i for i, c in enumerate("零壹贰叁肆伍陆柒捌玖")}
ZH_DIGIT["两"] = 2
ZH_UNIT = {"十": 10, "拾": 10, "百": 100, "佰": 100, "千": 1000, "仟": 1000}
ZH_CHARS = "".join(ZH_DIGIT) + "".join(ZH_UNIT) + "万"


def read_zh(text: str) -> Decimal:
    sign = -1 if text.startswith("负") else 1
    text = text.removeprefix("负")
    whole, _, frac = text.partition("点")
    total = section = digit = 0
    for ch in whole:
        if ch in ZH_DIGIT:
            digit = ZH_DIGIT[ch]
        elif ch in ZH_UNIT:
            section += (digit or 1) * ZH_UNIT[ch]
            digit = 0
        elif ch == "万":
            total += (section + digit) * 10000
            section = digit = 0
    value = Decimal(total + section + digit)
    if frac:
        value += Decimal("0." + "".join(str(ZH_DIGIT[c]) for c in frac))
    return sign * value


EN_SMALL = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen".split())}
EN_TENS = {w: 10 * (i + 2) for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())}
EN_WORD = r"(?:negative|point|hundred|thousand|" + "|".join(sorted(list(EN_SMALL) + list(EN_TENS), key=len,
                                                                       reverse=True)) + r")"
EN_NUMBER = re.compile(rf"\b{EN_WORD}(?:[ -]{EN_WORD})*\b")


def read_en(text: str) -> Decimal:
    words = text.replace("-", " ").split()
    sign = 1
    if words[0] == "negative":
        sign, words = -1, words[1:]
    frac = ""
    if "point" in words:
        k = words.index("point")
        frac = "".join(str(EN_SMALL[w]) for w in words[k + 1:])
        words = words[:k]
    total = current = 0
    for w in words:
        if w in EN_SMALL:
            current += EN_SMALL[w]
        elif w in EN_TENS:
            current += EN_TENS[w]
        elif w == "hundred":
            current *= 100
        elif w == "thousand":
            total += current * 1000
            current = 0
    value = Decimal(total + current) + (Decimal("0." + frac) if frac else 0)
    return sign * value


FULLWIDTH = str.maketrans("０１２３４５６７８９－．＋＝？（）", "0123456789-.+=?()")
ASCII_NUMBER = re.compile(r"(?<![\d)x])-?\d+(?:\.\d+)?")
ZH_NUMBER = re.compile(rf"负?[{ZH_CHARS}]+(?:点[{''.join(ZH_DIGIT)}]+)?")


def numbers_in(question: str) -> tuple:
    """(the numbers of a question in order, read back from its notation; the rest, numbers -> N)."""
    q = question.translate(FULLWIDTH).replace("一个数", "某个数")  # "a number", not the number one
    found = []
    for regex, reader in ((ASCII_NUMBER, Decimal), (ZH_NUMBER, read_zh), (EN_NUMBER, read_en)):
        for m in regex.finditer(q):
            found.append((m.start(), m.end(), reader(m.group())))
    found.sort(key=lambda t: t[0])
    rest, pos = [], 0
    for start, end, _ in found:
        assert start >= pos, question  # no overlapping matches
        rest.append(q[pos:start] + "N")
        pos = end
    return [v for _, _, v in found], "".join(rest) + q[pos:]


def evaluate(expr: str) -> Decimal:
    """a + b / a - (b) / a - b with Decimal, from the ASCII restatement."""
    m = re.fullmatch(r"(-?[\d.]+) ([+-]) \(?(-?[\d.]+)\)?", expr)
    assert m, expr
    a, op, b = Decimal(m.group(1)), m.group(2), Decimal(m.group(3))
    return a + b if op == "+" else a - b


def check_item(question: str, answer: str) -> None:
    """The answer is right, canonical, and about the numbers the question asks about."""
    assert "\n" not in question and "\n" not in answer
    if answer.startswith("x = "):
        m = re.fullmatch(r"x = (.+) = (-?[\d.]+)", answer)
        assert m, answer
        x = Decimal(m.group(2))
        assert evaluate(m.group(1)) == x
        nums, _ = numbers_in(question)
        assert len(nums) == 2, (question, nums)
        a, b = nums
        # substitute x back into the question's equation
        q = question.translate(FULLWIDTH)
        forms = {
            "x+a": re.search(r"x \+|一个数加上|What number plus", q),
            "a+x": re.search(r"\+ x|加上一个数|plus what number", q),
            "x-a": re.search(r"x -|一个数减去|What number minus", q),
            "a-x": re.search(r"- x|减去一个数|minus what number", q),
        }
        form = [k for k, v in forms.items() if v]
        assert len(form) == 1, (question, form)
        lhs = {"x+a": x + a, "a+x": a + x, "x-a": x - a, "a-x": a - x}[form[0]]
        assert lhs == b, (question, answer)
        return
    m = re.fullmatch(r"(-?[\d.]+) ([+-]) (\(-[\d.]+\)|[\d.]+) = (-?[\d.]+)", answer)
    assert m, answer
    a, op, b, r = Decimal(m.group(1)), m.group(2), Decimal(m.group(3).strip("()")), Decimal(m.group(4))
    assert r == (a + b if op == "+" else a - b), answer
    for part in (m.group(1), m.group(3).strip("()-"), m.group(4)):  # canonical: no trailing zeros
        assert not ("." in part and part.endswith("0")) and part != "-0", answer
    nums, rest = numbers_in(question)
    reverse = re.search(r"Subtract .* from|subtracted from", question)
    assert nums == ([b, a] if reverse else [a, b]), (question, answer, nums)
    plus = re.search(r"加|\+|plus|sum|Add|和", rest)
    minus = re.search(r"减|-|minus|ubtract|差", rest)
    assert bool(plus) != bool(minus), question
    assert op == ("+" if plus else "-"), (question, answer)


def turns(doc: str) -> list:
    parts = doc.split("\n\n")
    assert len(parts) % 2 == 0, doc
    out = []
    for user, assistant in zip(parts[::2], parts[1::2]):
        assert user.startswith("User: ") and assistant.startswith("Assistant: "), doc
        out.append((user[len("User: "):], assistant[len("Assistant: "):]))
    return out


# ------------------------------------------------ tests

@pytest.fixture(scope="module")
def docs():
    return list(generate_documents(3000, seed=11))


def test_dialogue_format(docs):
    counts = Counter(len(turns(d)) for d in docs)
    assert set(counts) == {1, 2, 3, 4, 5, 6}
    for d in docs:
        assert not d.startswith("\n") and not d.endswith("\n") and "\n\n\n" not in d


def test_every_answer_is_exact_and_matches_its_question(docs):
    n = 0
    for d in docs:
        for q, a in turns(d):
            check_item(q, a)
            n += 1
    assert n > 8000


def test_mix_of_notations(docs):
    text = "\n".join(docs)
    for needle in ("壹", "贰", "叁", "拾", "佰", "十", "百", "３", "＋", "－", "plus", "minus", "negative",
                   "point", "负", "点", "x = ", "(-", "解方程", "Solve for x"):
        assert needle in text, needle
    assert re.search(r"\d\.\d", text) and re.search(r"User: -\d", text)


def test_answer_is_a_function_of_the_question(docs):
    seen = {}
    for d in docs:
        for q, a in turns(d):
            assert seen.setdefault(q, a) == a


def test_seeded_and_reproducible():
    assert list(generate_documents(50, seed=3)) == list(generate_documents(50, seed=3))
    assert list(generate_documents(50, seed=3)) != list(generate_documents(50, seed=4))
    assert list(generate_documents(10, seed=3)) == list(generate_documents(50, seed=3))[:10]


def test_eval_set_balanced_distinct_exact():
    items = make_eval_set(160, seed=0)
    assert all(isinstance(it, EvalItem) for it in items)
    assert Counter(it.kind for it in items) == {k: 20 for k in KINDS}
    assert len({it.question for it in items}) == 160
    for it in items:
        check_item(it.question, it.answer)
    assert make_eval_set(160, seed=0) == items and make_eval_set(160, seed=1) != items
    assert format_prompt("1 + 1 = ?") == "User: 1 + 1 = ?\n\nAssistant:"
    by_kind = {it.kind: it for it in items}
    assert re.search(r"[０-９]", by_kind["fullwidth"].question)
    assert re.search(r"[壹贰叁肆伍陆柒捌玖]", by_kind["chinese_upper"].question)
    assert "." in by_kind["decimal"].answer and by_kind["equation"].answer.startswith("x = ")
    assert "-" in by_kind["negative"].answer.split(" = ")[0]


def test_eval_problems_never_in_training():
    """Held out by computation: none of the eval set's appears in training, in any wording or form."""
    def problem(answer):  # the computation: "32 + 15", or the solving step "12 - 5" of an equation
        return answer.rsplit(" = ", 1)[0].removeprefix("x = ")

    eval_problems = {problem(it.answer) for seed in (0, 1, 2) for it in make_eval_set(400, seed)}
    for seed in (0, 1, 2):
        train_problems = {problem(a) for d in generate_documents(4000, seed) for _, a in turns(d)}
        assert len(train_problems) > 10000
        assert not eval_problems & train_problems


def test_number_words():
    assert [zh_int(n) for n in (0, 7, 10, 15, 20, 105, 110, 111, 1000, 1010, 10010)] == [
        "零", "七", "十", "十五", "二十", "一百零五", "一百一十", "一百一十一", "一千", "一千零一十", "一万零一十"]
    assert [zh_int(n, upper=True) for n in (10, 15, 105, 999)] == ["壹拾", "壹拾伍", "壹佰零伍", "玖佰玖拾玖"]
    assert zh_int(-32) == "负三十二"
    assert [en_int(n) for n in (0, 13, 40, 21, 100, 105, 321, 1000, 1234)] == [
        "zero", "thirteen", "forty", "twenty-one", "one hundred", "one hundred five",
        "three hundred twenty-one", "one thousand", "one thousand two hundred thirty-four"]
    for n in list(range(0, 2000)) + [-5, 12345, 99999]:
        assert read_zh(zh_int(n)) == n and read_zh(zh_int(n, upper=True)) == n
        if abs(n) < 10**6:
            assert read_en(en_int(n)) == n
    assert say(Decimal("-3.05"), "chinese") == "负三点零五"
    assert say(Decimal("3.25"), "english") == "three point two five"
    assert say(Decimal("-12.5"), "fullwidth") == "－１２．５"


def test_ascii_num_is_canonical():
    assert ascii_num(Decimal("4.50")) == "4.5"
    assert ascii_num(Decimal("5.00")) == "5"
    assert ascii_num(Decimal("-0.0")) == "0"
    assert ascii_num(Decimal("100")) == "100"
    assert ascii_num(Decimal("1E+2")) == "100"
    assert ascii_num(Decimal("0.1") + Decimal("0.2")) == "0.3"
    assert ascii_num(-7) == "-7"


def test_cli_docs_mb_and_seed(tmp_path, capsys):
    out = tmp_path / "a.jsonl"
    assert run_cli(main, [str(out), "--docs", "50", "--seed", "2"]) == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 50
    assert [json.loads(line)["text"] for line in lines] == list(generate_documents(50, seed=2))
    assert run_cli(main, [str(tmp_path / "b.jsonl"), "--mb", "0.05"]) == 0
    size = (tmp_path / "b.jsonl").stat().st_size
    assert 50_000 <= size < 52_000
    assert run_cli(main, [str(tmp_path / "c.jsonl"), "--docs", "0"]) == 2
    assert run_cli(main, [str(tmp_path / "c.jsonl"), "--mb", "-1"]) == 2
    assert not (tmp_path / "c.jsonl").exists()


def test_generation_is_fast():
    import time

    t0 = time.perf_counter()
    n = sum(len(d) for d in generate_documents(4000, seed=0))
    assert n > 300_000
    assert time.perf_counter() - t0 < 3.0  # ~1 MB; 12 MB takes a few seconds
