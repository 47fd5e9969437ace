"""The arithmetic demo corpus (RWKV-7-Arithmetic-0.1B) and its held-out set.

A document is a multi-turn dialogue, `User: {question}\\n\\nAssistant: {answer}`
turns joined by `\\n\\n`, its turns of mixed kinds. Questions ask for a sum or
difference, or for the unknown of a one-step equation, with numbers written in
ASCII or full-width digits, Chinese number words, uppercase Chinese numerals
(壹贰叁), English words, negatives and decimals. The answer is a deterministic
function of the problem: the problem restated in ASCII digits, then the exact
result (decimal.Decimal, normalised), e.g. `32 + 15 = 47`, `5 - (-3) = 8`,
`x = 12 - 5 = 7`, `y = 1177 - 375 = 802` (the equation's own unknown name).

Wordings are composed from tables of parts (below: lead-ins, politeness words,
verbs, question words, operator words, endings, punctuation and spacing,
frames, unknown names ...), in English, in Chinese (no spaces, full-width
punctuation or not) and in symbols only: a question is a frame (e.g.
"{lead}{please}{verb} {expr}{end}") whose slots are filled from the tables, the
operator words ({expr}: "{a} plus {b}", "{b} subtracted from {a}", "{a}与{b}之差")
taking the operands, so the number of distinct phrasings is a sum of products
of table sizes (`count_phrasings`, numbers as slots: 3.7 million sums and
differences, 1.2 * 10**10 equations with training's parts; the operands'
renderings multiply it further). Equations are 2 of every 9 training turns,
each other kind 1 of 9.

Held out twice, by construction:
- by problem: a computation whose canonical form (e.g. `32 + 15`, also the
  solving step of `x - 15 = 32`) hashes into the eval partition never appears
  in training documents, in any wording or as an equation;
- by wording: most tables have parts (their `unseen` ones: "determine",
  "kindly", "{a} and {b} added together", "take {b} from {a}", "算一算", "劳驾",
  "{a}和{b}之和", " =?", the unknown names y2 n2 a1 b3 k2 m3 t1, whole frames ...) that
  training never uses. Held-out parts are new words for filler slots, but new
  combinations of taught words where the model must understand or write them
  (operator words, unknown names: a model can only write tokens it was trained
  to write). Held-out parts of those kinds have seen relatives that teach
  their pattern: training's names pair every letter with indices 1-3 (the
  held-out pairs aside), " is exactly " and "恰好等于" stand beside the held-out " is equal to "
  and "正好等于", "I want to know what {expr} is" beside the held-out
  "tell me what {expr} is", "可以{verb}{expr}吗" beside the held-out
  "你能{verb}{expr}吗", lead-ins with the article "a" ("here is a question: ")
  beside the held-out "for a test: ".
make_eval_set draws only held-out problems, each asked either in a training
wording (split "seen") or in a wording with at least one held-out part (split
"unseen").
"""
from __future__ import annotations

import argparse
import functools
import json
import random
import string
import sys
import zlib
from decimal import Decimal
from typing import Iterator, NamedTuple

from rwkvlm.errors import UserError

KINDS = ("ascii", "fullwidth", "chinese", "chinese_upper", "english", "decimal", "negative", "equation")
SPLITS = ("seen", "unseen")  # the eval set's wordings: training's, or with a held-out part
HELDOUT_MOD = 64  # 1/64 of all problems are reserved for evaluation
_TRAIN_SALT = "rwkvlm-arithmetic-train"
_EVAL_SALT = "rwkvlm-arithmetic-eval"


class EvalItem(NamedTuple):
    kind: str
    question: str
    answer: str
    split: str = "seen"  # "seen": a training wording; "unseen": a wording with a held-out part


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


_ascii = functools.lru_cache(maxsize=1 << 17)(ascii_num)


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


_say = functools.lru_cache(maxsize=1 << 17)(say)  # the corpus says the same few thousand numbers


def _render(rng: random.Random, x, style: str, second: bool = False) -> str:
    """`x` as a question writes it: `say` plus a rendering variant (twenty one / twenty-one,
    minus five / negative five, 两百 / 二百) and, for a negative second operand, sometimes parentheses.
    (Not "one hundred and five": "add one hundred and five" would read two ways.)"""
    text = _say(x, style)
    if style == "english":
        if "-" in text and rng.random() < 0.25:
            text = text.replace("-", " ")
        if text.startswith("negative ") and rng.random() < 0.4:
            text = "minus " + text[len("negative "):]
    elif style == "chinese" and text.lstrip("负")[:2] in ("二百", "二千") and rng.random() < 0.4:
        text = text.replace("二", "两", 1)  # 两百, 两千 at the head of a number
    if second and x < 0 and rng.random() < 0.6:
        if style == "fullwidth" or (style != "english" and rng.random() < 0.3):
            return "（" + text + "）"
        return "(" + text + ")"
    return text


# ---------------------------------------------------------------- parts of wordings

class Parts:
    """One slot's table of parts: those training uses (`seen`) and those kept for evaluation
    (`unseen`); with `blank` > 0 the slot is left empty that often (an empty part, seen)."""

    __slots__ = ("seen", "unseen", "all", "blank")

    def __init__(self, seen, unseen=(), blank: float = 0.0):
        self.seen, self.unseen, self.blank = tuple(seen), tuple(unseen), blank
        self.all = self.seen + self.unseen
        if not self.seen or "" in self.all or len(set(self.all)) != len(self.all):
            raise ValueError(f"bad parts table {self.all!r}")  # "" is the blank, never listed

    def count(self, unseen: bool) -> int:
        """Distinct choices: the seen parts (training), or all parts (evaluation)."""
        return len(self.all if unseen else self.seen) + (1 if self.blank else 0)


class _Wording:
    """Picks parts: training's only, or (`mixed`) any part, noting whether a held-out one was used."""

    __slots__ = ("rng", "mixed", "used_unseen")

    def __init__(self, rng: random.Random, mixed: bool = False):
        self.rng, self.mixed, self.used_unseen = rng, mixed, False

    def pick(self, parts: Parts) -> str:
        r = self.rng.random
        if parts.blank and r() < parts.blank:
            return ""
        if not self.mixed:
            return parts.seen[int(r() * len(parts.seen))]
        i = int(r() * len(parts.all))
        if i >= len(parts.seen):
            self.used_unseen = True
        return parts.all[i]


def _lead(words: Parts, people: Parts, greet: tuple, fmt: str) -> Parts:
    """Lead-ins: the words, and greetings of people (`fmt` of a greeting and a name); a greeting of
    a held-out person is held out. Many people: fillers a model learns to read past."""
    return Parts(words.seen + tuple(fmt.format(g, p) for p in people.seen for g in greet),
                 words.unseen + tuple(fmt.format(g, p) for p in people.unseen for g in greet), blank=words.blank)


# ---- English
EN_PEOPLE = Parts(("Alice", "Bob", "Tom", "Anna", "Sam", "Lily", "Max", "Emma", "Jack", "Mia", "Leo", "Kate", "Ben",
                   "Lucy", "Dan", "Amy", "Mark", "Sara", "Paul", "Nina", "John", "Maria", "David", "Linda"),
                  unseen=("Oscar", "Ruby"))
EN_LEAD = _lead(Parts(("hi, ", "hello, ", "hey, ", "ok, ", "okay, ", "now, ", "so, ", "next: ", "question: ",
                       "quick question: ", "math question: ", "another: ", "try this: ", "q: ", "for homework: ",
                       "my teacher asks: ", "in class today: ", "quiz time: ", "here is a question: ",
                       "a quick question: "),
                      unseen=("excuse me, ", "hey there, ", "good morning, ", "for a test: "), blank=0.6),
                EN_PEOPLE, ("hi", "hey", "dear"), "{} {}, ")
EN_PLEASE = Parts(("please ", "now ", "just ", "please just "), unseen=("kindly ",), blank=0.5)
EN_MODAL = Parts(("can you ", "could you ", "would you ", "will you ", "could you please ", "please, can you ",
                  "can you quickly "), unseen=("would you please ", "can you please "))
EN_VERB = Parts(("compute", "calculate", "evaluate", "work out", "find", "solve", "give me", "tell me", "do",
                 "simplify"), unseen=("figure out", "determine"))
EN_END = Parts((".", "!", " please.", ", please.", " for me.", " for me", " now.", ", thanks.", ". Thanks!"),
               unseen=(" for me, please.", ", thank you."), blank=0.3)
EN_QEND = Parts(("?", " ?", "??", "？", "? thanks.", "? thank you."), unseen=("? thanks!",), blank=0.15)
EN_WH = Parts(("what is", "what's", "how much is", "what is the value of", "what is the result of",
               "what do you get for", "what's the answer to"), unseen=("what's the value of", "what's the result of"))
EN_EQASK = Parts((" equals?", " equals what?", " is what?", " = what?", " equals", " gives?", " makes what?"),
                 unseen=(" equals how much?",))
EN_EXPR = {  # operator words: {a} and {b} are the operands; the restatement is `a op b`
    "+": Parts(("{a} plus {b}", "{a} + {b}", "{a}+{b}", "the sum of {a} and {b}", "the total of {a} and {b}",
                "{a} added to {b}", "{a} increased by {b}", "{a} and {b} combined", "{a} and {b} summed up"),
               unseen=("{a} and {b} added together",)),
    "-": Parts(("{a} minus {b}", "{a} - {b}", "{a}-{b}", "the difference of {a} and {b}",
                "{b} subtracted from {a}", "{a} decreased by {b}", "{b} less than {a}"),
               unseen=("the difference between {a} and {b}",)),
}
EN_WORDS_EXPR = {  # the same for numbers in words, spaced: "nine-five hundred" would read as one number
    op: Parts(tuple(p for p in EN_EXPR[op].seen if "}" + op + "{" not in p), EN_EXPR[op].unseen) for op in "+-"}
EN_ACTION = {  # an imperative verb with its operands
    "+": Parts(("add {a} and {b}", "add {a} to {b}", "sum {a} and {b}", "add up {a} and {b}"),
               unseen=("add together {a} and {b}",)),
    "-": Parts(("subtract {b} from {a}", "take {b} away from {a}", "take away {b} from {a}"),
               unseen=("take {b} from {a}",)),
}
EN_FRAMES = Parts(("{lead}{please}{verb} {expr}{end}", "{lead}{modal}{verb} {expr}{qend}", "{lead}{wh} {expr}{qend}",
                   "{lead}{please}{action}{end}", "{lead}{modal}{action}{qend}", "{lead}{expr}{eqask}",
                   "{lead}what does {expr} equal{qend}", "{lead}{modal}tell me what {expr} equals{qend}",
                   "{lead}I want to know what {expr} is{end}", "{lead}{please}say what {expr} makes{end}",
                   "{lead}when you {action}, what is the result{qend}"),
                  unseen=("{lead}tell me what {expr} is{end}", "{lead}if you {action}, what do you get{qend}"))

# ---- Chinese
ZH_PEOPLE = Parts(("小明", "小红", "小刚", "小丽", "小华", "小王", "老师", "同学", "妈妈", "爸爸", "哥哥", "姐姐"),
                  unseen=("小芳", "阿姨"))
ZH_LEAD = _lead(Parts(("你好，", "您好，", "问一下，", "考考你：", "数学题：", "题目：", "来一道题：", "请听题：", "下一题：",
                       "再来一题：", "作业题：", "老师问：", "今天的练习："), unseen=("打扰一下，", "嗨，", "课堂小测："),
                      blank=0.6),
                ZH_PEOPLE, ("", "你好，"), "{1}，{0}")
ZH_POLITE = Parts(("请", "请你", "麻烦", "麻烦你", "帮我", "请帮我", "帮忙"), unseen=("劳驾", "请你帮我"), blank=0.5)
ZH_VERB = Parts(("计算", "算一下", "算算", "求", "算出", "计算一下", "求出", "算"), unseen=("算一算", "求一下"))
ZH_COLON = Parts(("：", ":", " "), blank=0.4)
ZH_END = Parts(("。", "！", "的结果", "的结果。", "的值。"), unseen=("的得数。",), blank=0.4)
ZH_ASK = Parts(("等于多少", "是多少", "得多少", "等于几", "的结果是多少", "结果是多少", "等于什么", "是几", "为多少",
                "的值是多少", "得几"), unseen=("结果等于多少", "的得数是多少"))
ZH_QEND = Parts(("？", "?", "呢？", "啊？", "？？"), unseen=("呀？",), blank=0.15)
ZH_QPOLITE = Parts(("请问", "请问一下，", "想问一下，", "问问你，", "你知道"), unseen=("请教一下，",), blank=0.5)
ZH_RESULT = Parts(("结果是多少", "得多少", "等于几", "等于多少", "得数是多少"))
ZH_ACTION_END = Parts(("。", "！"), blank=0.4)
ZH_EXPR = {
    "+": Parts(("{a}加{b}", "{a}加上{b}", "{a}+{b}", "{a} + {b}", "{a}＋{b}", "{a}与{b}的和", "{a}和{b}的和",
                "{a}与{b}之和", "{a}和{b}相加"), unseen=("{a}和{b}之和", "{a}与{b}相加")),
    "-": Parts(("{a}减{b}", "{a}减去{b}", "{a}-{b}", "{a} - {b}", "{a}－{b}", "{a}与{b}的差", "{a}和{b}的差",
                "{a}与{b}之差", "{a}减掉{b}", "{a}和{b}相减"), unseen=("{a}和{b}之差", "{a}与{b}相减")),
}
ZH_ACTION = {
    "+": Parts(("把{a}和{b}相加", "把{a}与{b}加起来", "把{a}加上{b}", "将{a}加上{b}"), unseen=("将{a}和{b}加起来",)),
    "-": Parts(("从{a}中减去{b}", "用{a}减去{b}", "把{a}减去{b}", "从{a}里减掉{b}"), unseen=("从{a}里减去{b}", "用{a}减掉{b}")),
}
ZH_FRAMES = Parts(("{lead}{polite}{verb}{colon}{expr}{end}", "{lead}{qpolite}{expr}{ask}{qend}",
                   "{lead}{expr}，{ask}{qend}", "{lead}{polite}{action}{action_end}", "{lead}{action}，{result}{qend}",
                   "{lead}{polite}告诉我{expr}{ask}{qend}", "{lead}可以{verb}{expr}吗{qend}",
                   "{lead}能帮我{verb}{expr}吗{qend}"),
                  unseen=("{lead}你能{verb}{expr}吗{qend}",))

# ---- symbols only (digits and Chinese numerals)
SYM_EXPR = {
    "+": Parts(("{a} + {b}", "{a}+{b}", "{a} ＋ {b}", "{a}＋{b}")),
    "-": Parts(("{a} - {b}", "{a}-{b}", "{a} － {b}", "{a}－{b}")),
}
SYM_ASK = Parts((" = ?", "=?", " =", "=", " = ？", "=？", "＝？", " ＝ ？"), unseen=(" =?", " =？"), blank=0.1)
SYM_FRAMES = Parts(("{expr}{symask}",))

# ---- equations: {eq} is the equation, {n} its unknown's name
_NAME_LETTERS = "xyznmabtkp"
_HELDOUT_NAMES = ("y2", "n2", "a1", "b3", "k2", "m3", "t1")  # held out: new combinations of a letter and an index,
#   both of which training's answers write with other partners (a model can only write tokens it was taught to)
NAMES = Parts(tuple(_NAME_LETTERS) + ("X", "□", "○")
              + tuple(c + i for i in "123" for c in _NAME_LETTERS if c + i not in _HELDOUT_NAMES),
              unseen=_HELDOUT_NAMES)
ZH_NAMES = Parts(NAMES.seen + ("未知数",), unseen=NAMES.unseen)
EQUALS = {  # between the expression and the number it equals
    "en": Parts((" = ", "=", " equals ", " is ", " gives ", " is exactly ", " is the same as "),
                unseen=(" is equal to ",)),
    "zh": Parts(("=", " = ", "等于", "得", "的结果是", "恰好等于", "刚好等于"), unseen=("正好等于",)),
}
EQUALS_BACK = {  # the same, sides swapped: `c = expr`
    "en": Parts((" = ", "=", " equals ", " is ", " is exactly ", " is the same as "), unseen=(" is equal to ",)),
    "zh": Parts(("=", " = ", "等于", "恰好等于", "刚好等于"), unseen=("正好等于",)),
}
EN_EQ_VERB = Parts(("solve for {n}", "find {n}", "find the value of {n}", "work out {n}", "compute {n}",
                    "calculate {n}"), unseen=("determine {n}", "figure out {n}"))
EN_COND = Parts((": ", " in ", " if ", " when ", " given ", " given that ", ", if ", " such that ", " where "),
                unseen=(" assuming ",))
EN_SOLVE = Parts(("solve", "solve the equation", "solve this equation"))
EN_COLON = Parts((": ", " ", ":"))
EN_IF = Parts(("if", "given", "given that", "when", "suppose"), unseen=("assuming",))
EN_WH_N = Parts(("what is {n}", "what's {n}", "what is the value of {n}", "how much is {n}", "what does {n} equal",
                 "what must {n} be"), unseen=("what's the value of {n}",))
EN_SEP = Parts((", ", "; ", ". "))
EQ_ASK = Parts((" = ?", "=?", " =", "=？", " = ？", "＝？"), unseen=(" =?",))  # after "{eq}, {n}"
EN_EQ_FRAMES = Parts(("{eq}", "{lead}{please}{eq_verb}{cond}{eq}{end}", "{lead}{modal}{eq_verb}{cond}{eq}{qend}",
                      "{lead}{please}{solve}{colon}{eq}{end}", "{lead}{modal}{solve}{colon}{eq}{qend}",
                      "{lead}{if} {eq}, {wh_n}{qend}", "{lead}{wh_n} if {eq}{qend}", "{eq}. {Wh_n}{qend}",
                      "{eq}{sep}{n}{eq_ask}", "{lead}what value of {n} makes {eq} true{qend}", "{eq}. {Eq_verb}{end}",
                      "{lead}{if} {eq}. {Wh_n}{qend}"),
                     unseen=("{lead}let {eq}. {Wh_n}{qend}",))
ZH_SOLVE = Parts(("解方程", "求解方程", "解", "求解"))
ZH_FIND_N = Parts(("求{n}", "求{n}的值", "算出{n}"))
ZH_SEP = Parts(("：", ":", "，"))  # never none or a space: 求n1 51-n = 3, 求x -7=x-3 would read two ways
ZH_IF = Parts(("已知", "若", "如果", "假设"), unseen=("假如",), blank=0.3)
ZH_THEN = Parts(("则", "那么", "请问", "求"), blank=0.4)
ZH_EQ_FRAMES = Parts(("{eq}", "{lead}{polite}{solve}{colon}{eq}{end}", "{lead}{polite}{find_n}{sep}{eq}{end}",
                      "{lead}{if}{eq}，{then}{n}{ask}{qend}",
                      "{lead}{if}{eq}，{polite}求{n}{action_end}", "{lead}方程{eq}的解{ask}{qend}",
                      "{lead}{eq}，{n}{eq_ask}", "{lead}{eq}的时候，{n}{ask}{qend}", "{lead}{if}{eq}的话，{n}{ask}{qend}"),
                     unseen=("{lead}当{eq}时，{n}{ask}{qend}",))
# word problems: the unknown is a noun phrase ("what number"), answered as x
EN_WHAT_NUMBER = Parts(("what number", "which number", "what"))
EN_A_NUMBER = Parts(("a number", "some number", "a certain number"))
ZH_HOW_MANY = Parts(("多少", "几", "什么数"))
ZH_A_NUMBER = Parts(("一个数", "某数", "某个数"))
EN_ASK_NOUN_FRAMES = Parts(("{lead}{eq}{qend}",))
EN_A_NOUN_FRAMES = Parts(("{lead}{eq}. What is the number{qend}", "{lead}{eq}. Find the number{end}",
                          "{lead}{eq}. What number is it{qend}"),
                         unseen=("{lead}{eq}. Which number is it{qend}",))
ZH_ASK_NOUN_FRAMES = Parts(("{lead}{qpolite}{eq}{qend}",))
ZH_A_NOUN_FRAMES = Parts(("{lead}{eq}，这个数{ask}{qend}", "{lead}{eq}，{polite}求这个数{action_end}"),
                         unseen=("{lead}{eq}，问这个数{ask}{qend}",))


class _Family:
    """Frames and the tables their slots draw from; `expr`/`action` depend on the operator."""

    def __init__(self, frames: Parts, ops: dict, capitalise: bool = False, **slots):
        self.frames, self.ops, self.slots, self.capitalise = frames, ops, slots, capitalise
        names = {f for t in frames.all for _, f, _, _ in string.Formatter().parse(t) if f}
        missing = {n.lower() for n in names} - set(slots) - set(ops["+"]) - {"eq", "n"}
        if missing:
            raise ValueError(f"frame slots without a table: {sorted(missing)}")
        self._compiled = {}
        for op in "+-":
            table = dict(slots, **ops[op])
            self._compiled[op] = {t: _compile(t, table) for t in frames.all}

    def ask(self, w: _Wording, op: str, **values) -> str:
        """One question: a frame, its slots picked by `w`, then {a} {b} {eq} {n} filled from `values`."""
        out = []
        for piece in self._compiled[op][w.pick(self.frames)]:
            if piece.__class__ is str:
                out.append(piece)
            else:
                part = w.pick(piece[0])
                out.append(part[:1].upper() + part[1:] if piece[1] else part)
        return "".join(out).format_map(values)

    def count(self, unseen: bool, extra: int = 1, ops: str = "+-") -> int:
        """Distinct phrasings (numbers as slots), times `extra` for the values' own variants."""
        total = 0
        for op in ops:
            for t in (self.frames.all if unseen else self.frames.seen):
                n = 1
                for piece in self._compiled[op][t]:
                    if piece.__class__ is not str:
                        n *= piece[0].count(unseen)
                total += n * extra
        return total


def _compile(template: str, table: dict) -> tuple:
    """A template as literal strings and (Parts, capitalise) slots; {a} {b} {eq} {n} stay for format."""
    pieces = []
    for literal, field, _, _ in string.Formatter().parse(template):
        pieces.append(literal)
        if field is not None:
            key = field.lower()
            pieces.append((table[key], field[0].isupper()) if key in table else "{" + field + "}")
    return tuple(p for p in pieces if p != "")


_EN_SLOTS = dict(lead=EN_LEAD, please=EN_PLEASE, modal=EN_MODAL, verb=EN_VERB, end=EN_END, qend=EN_QEND, wh=EN_WH,
                 eqask=EN_EQASK)
_ZH_SLOTS = dict(lead=ZH_LEAD, polite=ZH_POLITE, verb=ZH_VERB, colon=ZH_COLON, end=ZH_END, ask=ZH_ASK, qend=ZH_QEND,
                 qpolite=ZH_QPOLITE, result=ZH_RESULT, action_end=ZH_ACTION_END)
_OPS = {lang: {op: {"expr": expr[op], "action": action[op]} for op in "+-"}
        for lang, expr, action in (("en", EN_EXPR, EN_ACTION), ("en_words", EN_WORDS_EXPR, EN_ACTION),
                                   ("zh", ZH_EXPR, ZH_ACTION))}
_OPS["sym"] = {op: {"expr": SYM_EXPR[op]} for op in "+-"}
_NO_OPS = {op: {} for op in "+-"}
_EQ_SLOTS = dict(_EN_SLOTS, eq_verb=EN_EQ_VERB, cond=EN_COND, solve=EN_SOLVE, colon=EN_COLON, sep=EN_SEP,
                 eq_ask=EQ_ASK, wh_n=EN_WH_N, **{"if": EN_IF})
_ZH_EQ_SLOTS = dict(_ZH_SLOTS, solve=ZH_SOLVE, find_n=ZH_FIND_N, sep=ZH_SEP, then=ZH_THEN, eq_ask=EQ_ASK,
                    **{"if": ZH_IF})

BINARY = {  # sums and differences, by language of the wording
    "sym": _Family(SYM_FRAMES, _OPS["sym"], symask=SYM_ASK),
    "en": _Family(EN_FRAMES, _OPS["en"], capitalise=True, **_EN_SLOTS),
    "en_words": _Family(EN_FRAMES, _OPS["en_words"], capitalise=True, **_EN_SLOTS),  # for numbers in words
    "zh": _Family(ZH_FRAMES, _OPS["zh"], **_ZH_SLOTS),
}
EQUATION = {  # (frames with a named unknown, word problems "what number" / "a number")
    "en": (_Family(EN_EQ_FRAMES, _NO_OPS, capitalise=True, **_EQ_SLOTS),
           (_Family(EN_ASK_NOUN_FRAMES, _NO_OPS, capitalise=True, **_EN_SLOTS), EN_WHAT_NUMBER),
           (_Family(EN_A_NOUN_FRAMES, _NO_OPS, capitalise=True, **_EN_SLOTS), EN_A_NUMBER)),
    "zh": (_Family(ZH_EQ_FRAMES, _NO_OPS, **_ZH_EQ_SLOTS),
           (_Family(ZH_ASK_NOUN_FRAMES, _NO_OPS, **_ZH_SLOTS), ZH_HOW_MANY),
           (_Family(ZH_A_NOUN_FRAMES, _NO_OPS, **_ZH_SLOTS), ZH_A_NUMBER)),
}
_EQ_EXPR = {"en": EN_EXPR, "en_words": EN_WORDS_EXPR, "zh": ZH_EXPR}
_EQ_NAMES = {"en": NAMES, "zh": ZH_NAMES}

# number styles of each kind, and the wording languages each style is asked in
_MIXED_STYLES = ("ascii",) * 5 + ("fullwidth",) * 2 + ("chinese", "chinese_upper", "english")
KIND_STYLES = {"ascii": ("ascii",), "fullwidth": ("fullwidth",), "chinese": ("chinese",),
               "chinese_upper": ("chinese_upper",), "english": ("english",), "decimal": _MIXED_STYLES,
               "negative": _MIXED_STYLES, "equation": _MIXED_STYLES}
STYLE_LANGS = {"ascii": ("sym", "sym", "en", "en", "en", "zh", "zh", "zh"),
               "fullwidth": ("sym", "sym", "en", "en", "zh", "zh", "zh", "zh"),
               "chinese": ("zh",) * 6 + ("sym",), "chinese_upper": ("zh",) * 6 + ("sym",), "english": ("en_words",)}
EQ_STYLE_LANGS = {"ascii": ("en", "en", "zh"), "fullwidth": ("en", "zh", "zh"), "chinese": ("zh",),
                  "chinese_upper": ("zh",), "english": ("en",)}


# ---------------------------------------------------------------- problems

def _canonical(a, op: str, b) -> str:
    """`a op b` in ASCII digits, a negative b in parentheses: the restatement and the problem's key."""
    b_text = _ascii(b)
    return f"{_ascii(a)} {op} ({b_text})" if b_text[0] == "-" else f"{_ascii(a)} {op} {b_text}"


def _result(a, op: str, b):
    return a + b if op == "+" else a - b


def _is_heldout(key: str) -> bool:
    return zlib.crc32(key.encode("utf-8")) % HELDOUT_MOD == 0


def _small_int(rng: random.Random) -> int:
    """0..999, digit count uniform over 1..3 so small and large numbers both appear."""
    low, high = _DIGIT_RANGES[int(rng.random() * 3)]
    return low + int(rng.random() * (high - low))


_DIGIT_RANGES = ((0, 10), (10, 100), (100, 1000))


@functools.lru_cache(maxsize=None)
def _decimals(places: int) -> tuple:
    """0 .. 99.9 (places 1) or 0 .. 99.99 (places 2), normalised: 4.50 -> 4.5."""
    return tuple(Decimal(ascii_num(Decimal(i).scaleb(-places))) for i in range(100 * 10**places))


def _decimal(rng: random.Random) -> Decimal:
    """A decimal of one or two places below 100."""
    table = _decimals(1 + int(rng.random() * 2))
    return table[int(rng.random() * len(table))]


def _binary_numbers(rng: random.Random, kind: str) -> tuple:
    """(op, a, b) of a sum or difference of kind `kind`."""
    op = "+" if rng.random() < 0.5 else "-"
    if kind == "decimal":
        a, b = _decimal(rng), _decimal(rng)
        if rng.random() < 0.2:
            a = -a if rng.random() < 0.5 else a
    elif kind == "negative":
        a, b = _small_int(rng), _small_int(rng)
        sign = ("a", "b", "ab")[int(rng.random() * 3)]
        a = -max(a, 1) if "a" in sign else a
        b = -max(b, 1) if "b" in sign else b
    else:
        a, b = _small_int(rng), _small_int(rng)
    return op, a, b


def _binary_question(w: _Wording, kind: str, op: str, a, b) -> str:
    """`a op b` asked in a wording, its numbers in one of the kind's styles."""
    rng = w.rng
    styles = KIND_STYLES[kind]
    style = styles[int(rng.random() * len(styles))]
    langs = STYLE_LANGS[style]
    family = BINARY[langs[int(rng.random() * len(langs))]]
    question = family.ask(w, op, a=_render(rng, a, style), b=_render(rng, b, style, second=True))
    return question[0].upper() + question[1:] if family.capitalise and question[0].islower() else question


def _equation_numbers(rng: random.Random) -> tuple:
    """(form, x, a, c, step) of a one-step linear equation: form x+a=c, a+x=c, x-a=c or a-x=c, x the
    unknown's value (mostly integers, some negatives and decimals), step its solving `c - a` etc."""
    form = ("x+a", "a+x", "x-a", "a-x")[int(rng.random() * 4)]
    if rng.random() < 0.1:
        x, a = _decimal(rng), _decimal(rng)
    else:
        x, a = _small_int(rng), _small_int(rng)
        if rng.random() < 0.1:
            x = -max(x, 1)
        if rng.random() < 0.1:
            a = -max(a, 1)
    if form == "x+a":
        c, step = x + a, _canonical(x + a, "-", a)
    elif form == "a+x":
        c, step = a + x, _canonical(a + x, "-", a)
    elif form == "x-a":
        c, step = x - a, _canonical(x - a, "+", a)
    else:
        c, step = a - x, _canonical(a, "-", a - x)
    return form, x, a, c, step


def _equation_question(w: _Wording, form: str, a, c) -> tuple:
    """(question, the unknown's name in the answer): the equation in a wording, its sides sometimes
    swapped (c = x + a), its unknown a name (x, y, □ ...) or, in a word problem, "what number" (x)."""
    rng = w.rng
    style = _MIXED_STYLES[int(rng.random() * len(_MIXED_STYLES))]
    langs = EQ_STYLE_LANGS[style]
    lang = langs[int(rng.random() * len(langs))]
    named, *nouns = EQUATION[lang]
    roll = rng.random()
    if roll < 0.75:
        family, name = named, w.pick(_EQ_NAMES[lang])
        answer_name = name
    else:
        family, noun_table = nouns[0] if roll < 0.875 else nouns[1]
        name, answer_name = w.pick(noun_table), "x"
    a_text = _render(rng, a, style, second=form[0] == "x")
    left, right = (name, a_text) if form[0] == "x" else (a_text, name)
    expr = w.pick(_EQ_EXPR["en_words" if style == "english" else lang][form[1]]).format(a=left, b=right)
    c_text = _render(rng, c, style)
    if family is named and rng.random() < 0.3:
        eq = c_text + w.pick(EQUALS_BACK[lang]) + expr
    else:
        eq = expr + w.pick(EQUALS[lang]) + c_text
    question = family.ask(w, "+", eq=eq, n=name)
    if family.capitalise and question[0].islower() and not (family is named and question.startswith(eq)):
        question = question[0].upper() + question[1:]  # not "X + 3 = 5"
    return question, answer_name


def _problem(rng: random.Random, kind: str, heldout: bool, split: str = "train") -> EvalItem:
    """A problem of `kind` inside (heldout=True) or outside the eval partition, worded as in
    training (split "train" or "seen") or with at least one held-out part (split "unseen")."""
    unseen = split == "unseen"
    while True:
        if kind == "equation":
            form, x, a, c, key = _equation_numbers(rng)
        else:
            op, a, b = _binary_numbers(rng, kind)
            key = _canonical(a, op, b)
        if _is_heldout(key) == heldout:
            break
    while True:  # training's wordings: once; unseen ones: until one has a held-out part
        w = _Wording(rng, mixed=unseen)
        if kind == "equation":
            question, name = _equation_question(w, form, a, c)
            answer = f"{name} = {key} = {_ascii(x)}"  # held out by the solving step, shared with plain sums
        else:
            question, answer = _binary_question(w, kind, op, a, b), f"{key} = {_ascii(_result(a, op, b))}"
        if w.used_unseen == unseen:
            return EvalItem(kind, question, answer, "unseen" if unseen else "seen")


_TURNS = (1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 5, 6)  # turns per training dialogue: 2.85, about 82 tokens, on average
_TRAIN_KINDS = KINDS + ("equation",)  # a training turn's kind: equations twice as often (two steps, more wordings)


def _turn(item: EvalItem) -> str:
    return f"User: {item.question}\n\nAssistant: {item.answer}"


def generate_documents(n_docs: int, seed: int = 0) -> Iterator[str]:
    """n_docs training dialogues (1-6 turns of mixed kinds each); the same seed gives the same documents."""
    rng = random.Random(f"{_TRAIN_SALT}:{int(seed)}")
    for _ in range(int(n_docs)):
        turns = _TURNS[int(rng.random() * len(_TURNS))]
        kinds = (_TRAIN_KINDS[int(rng.random() * len(_TRAIN_KINDS))] for _ in range(turns))
        yield "\n\n".join(_turn(_problem(rng, kind, heldout=False)) for kind in kinds)


def make_eval_set(n: int, seed: int = 0, split: str = "both") -> list:
    """n distinct single-turn items, all of held-out problems, balanced over KINDS; split "seen"
    (training's wordings), "unseen" (wordings with a held-out part) or "both" (alternating)."""
    if split not in SPLITS + ("both",):
        raise ValueError(f"split must be seen, unseen or both, not {split!r}")
    rng = random.Random(f"{_EVAL_SALT}:{int(seed)}")
    items, seen = [], set()
    for i in range(int(n)):
        if split == "both":
            kind, item_split = KINDS[i // 2 % len(KINDS)], SPLITS[i % 2]
        else:
            kind, item_split = KINDS[i % len(KINDS)], split
        for _ in range(1000):
            item = _problem(rng, kind, heldout=True, split=item_split)
            if item.question not in seen:
                break
        seen.add(item.question)
        items.append(item)
    return items


def count_phrasings() -> dict:
    """Distinct question phrasings, numbers as slots: {"binary"|"equation"|kind: {"seen", "unseen"}}
    ("seen": training's; "unseen": those with at least one held-out part), and "total"."""
    def both(count) -> dict:
        seen, everything = count(False), count(True)
        return {"seen": seen, "unseen": everything - seen}

    def binary(langs):
        return lambda u: sum(BINARY[lang].count(u) for lang in langs)

    def equation(langs):
        def count(u):
            total = 0
            for lang in langs:
                named, *nouns = EQUATION[lang]
                exprs = 2 * sum(_EQ_EXPR[lang][op].count(u) for op in "+-")  # 4 forms, 2 of each operator
                forward = exprs * EQUALS[lang].count(u)
                body = forward + exprs * EQUALS_BACK[lang].count(u)
                total += named.count(u, body * _EQ_NAMES[lang].count(u), ops="+")
                total += sum(fam.count(u, forward * noun.count(u), ops="+") for fam, noun in nouns)
            return total
        return count

    out = {"binary": both(binary(("sym", "en", "zh"))), "equation": both(equation(("en", "zh")))}
    for kind in KINDS:
        if kind == "equation":
            out[kind] = out["equation"]
        else:
            langs = {lang for s in KIND_STYLES[kind] for lang in STYLE_LANGS[s]}
            out[kind] = both(binary(langs - {"en_words"} if "en" in langs else langs))  # en_words: a part of en
    out["total"] = {s: out["binary"][s] + out["equation"][s] for s in ("seen", "unseen")}
    return out


# ---------------------------------------------------------------- command line

def write_jsonl(path, docs=None, mb=None, seed: int = 0, progress: bool = False, texts=None) -> tuple:
    """Write {"text": ...} lines until `docs` documents or `mb` MB; return (documents, bytes). The
    texts are the demo dialogues of `seed`, or those of the iterable `texts`."""
    from rwkvlm.atomic import atomic_open

    limit_bytes = None if mb is None else int(float(mb) * 1_000_000)
    count = written = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=docs if docs is not None else limit_bytes, unit="doc" if docs is not None else "B",
                   unit_scale=True, desc="generating", disable=None)
    with atomic_open(path, "wb") as f:
        for text in texts if texts is not None else generate_documents(10**12, seed):
            if docs is not None and count >= docs:
                break
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
    counts = count_phrasings()["total"]
    print(f"wordings: {counts['seen']:,} phrasings in training's parts; {counts['unseen']:,} more with held-out "
          f"parts, kept for evaluate.py's unseen split")
    return 0


if __name__ == "__main__":
    from rwkvlm.errors import run_cli

    sys.exit(run_cli(main))
