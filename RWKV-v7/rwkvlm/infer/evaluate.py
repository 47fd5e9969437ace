"""Held-out arithmetic accuracy of one or more checkpoints.

Each held-out item (`rwkvlm.data.arithmetic.make_eval_set(n, seed, split)`, problems
that never appear in the training corpus in any wording) is asked as
`User: {question}\\n\\nAssistant:`; the greedy reply up to the blank line,
stripped, must equal the item's answer exactly. Results are broken down by
kind and by wording: "seen" items are worded as in training, "unseen" ones
with at least one held-out part (a prefix, verb, operator word, unknown name,
frame ... that training never uses). The table has one column group per
checkpoint: seen, unseen and all items (or the one split asked for).

A char-level model (PROJ_DIR/vocab.json beside its weights) is asked in its own vocabulary. An item
whose prompt or answer holds a character that vocabulary lacks cannot be asked (its question cannot
be encoded, or its answer cannot be written): it is counted as "not in the vocabulary", per kind and
split, left out of the accuracy, and the table has a column for these counts with a note naming the
missing characters. A World-vocabulary model asks every item.

Prompts are batched: prompts of equal token length are prefilled together,
then all replies are decoded as one batch (finished rows drop out).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rwkvlm.errors import UserError

DEFAULT_N = 400
DEFAULT_SEED = 0
DEFAULT_LAST = 2
DEFAULT_SPLIT = "both"


# ---------------------------------------------------------------- scoring

def reply_of(text: str) -> str:
    """The assistant's reply: up to the first blank line, stripped."""
    return text.split("\n\n", 1)[0].strip()


def restatement_of(answer: str) -> str:
    """What an answer says before its result: `32 + 15` of `32 + 15 = 47`, `x = 12 - 5` of
    `x = 12 - 5 = 7` (the problem as the model read it); the whole text when it has no ` = `."""
    return answer.rsplit(" = ", 1)[0]


@dataclass
class KindScore:
    """n items asked, `correct` of them right, `restated` of them with the problem restated right
    (the answer's text before its result: a miss there is a misreading, after it a slip in the
    sum); `not_in_vocab` more that could not be asked (characters the model's vocabulary lacks),
    outside n and the accuracy."""

    n: int = 0
    correct: int = 0
    not_in_vocab: int = 0
    restated: int = 0

    @property
    def accuracy(self) -> float:
        return 100.0 * self.correct / self.n if self.n else 0.0

    def as_dict(self) -> dict:
        return {"n": self.n, "correct": self.correct, "accuracy": round(self.accuracy, 2),
                "not_in_vocab": self.not_in_vocab, "restated": self.restated}


@dataclass
class SplitScore:
    """The score of the items of one wording split ("seen" or "unseen")."""

    by_kind: dict = field(default_factory=dict)  # kind -> KindScore
    overall: KindScore = field(default_factory=KindScore)

    def as_dict(self) -> dict:
        return {"overall": self.overall.as_dict(), "by_kind": {k: v.as_dict() for k, v in self.by_kind.items()}}


@dataclass
class Result:
    """The score of one checkpoint (or one answering function) on an eval set: all items
    (by_kind, overall) and each wording split's (by_split)."""

    label: str
    path: str = ""
    by_kind: dict = field(default_factory=dict)  # kind -> KindScore
    overall: KindScore = field(default_factory=KindScore)
    by_split: dict = field(default_factory=dict)  # "seen" / "unseen" -> SplitScore
    errors: list = field(default_factory=list)  # {"kind", "split", "question", "expected", "got"}
    seconds: float = 0.0
    info: dict = field(default_factory=dict)
    vocabulary: str = "World"  # or e.g. "char: 43 characters (out/x/vocab.json)"
    missing: dict = field(default_factory=dict)  # character the vocabulary lacks -> items it kept out

    def as_dict(self) -> dict:
        return {"label": self.label, "path": self.path, "vocabulary": self.vocabulary,
                "overall": self.overall.as_dict(),
                "by_kind": {k: v.as_dict() for k, v in self.by_kind.items()},
                "by_split": {s: v.as_dict() for s, v in self.by_split.items()},
                "not_in_vocab": {"items": self.overall.not_in_vocab, "characters": self.missing},
                "seconds": round(self.seconds, 3), "info": self.info, "errors": self.errors}


def score(items, replies, label: str = "", kinds=None, not_asked=()) -> Result:
    """Exact-match score of `replies` (raw generated texts) against the items' answers; `not_asked`:
    (item, missing characters) of the items the vocabulary could not ask (counted, not scored)."""
    if len(items) != len(replies):
        raise ValueError(f"{len(items)} items but {len(replies)} replies")
    from rwkvlm.data.arithmetic import SPLITS

    if kinds is None:
        from rwkvlm.data.arithmetic import KINDS as kinds
    not_asked = list(not_asked)
    res = Result(label=label, by_kind={k: KindScore() for k in kinds})
    for split in SPLITS:  # the splits present, in their order
        if any(_split_of(it) == split for it in list(items) + [it for it, _ in not_asked]):
            res.by_split[split] = SplitScore(by_kind={k: KindScore() for k in kinds})

    def scores_of(item):
        part = res.by_split.setdefault(_split_of(item), SplitScore(by_kind={k: KindScore() for k in kinds}))
        return (res.by_kind.setdefault(item.kind, KindScore()), res.overall,
                part.by_kind.setdefault(item.kind, KindScore()), part.overall)

    for item, text in zip(items, replies):
        got, want = reply_of(text), item.answer.strip()
        ok = got == want
        read = restatement_of(got) == restatement_of(want)
        for ks in scores_of(item):
            ks.n += 1
            ks.correct += ok
            ks.restated += read
        if not ok:
            res.errors.append({"kind": item.kind, "split": _split_of(item), "question": item.question,
                               "expected": item.answer, "got": got})
    for item, missing in not_asked:
        for ks in scores_of(item):
            ks.not_in_vocab += 1
        for c in missing:
            res.missing[c] = res.missing.get(c, 0) + 1
    res.missing = dict(sorted(res.missing.items(), key=lambda kv: (-kv[1], kv[0])))
    return res


def missing_characters(item, chars) -> str:
    """The characters of the item's prompt and answer that the set `chars` lacks, sorted ('' when none)."""
    from rwkvlm.data.arithmetic import format_prompt

    return "".join(sorted(set(format_prompt(item.question) + " " + item.answer) - chars))


def split_by_vocabulary(items, tokenizer):
    """(items the tokenizer can ask, [(item, missing characters)] of those it cannot). A tokenizer with a
    character list (`chars`: a char-level vocabulary) cannot ask an item whose prompt or answer holds
    another character; any other tokenizer (the World one, which encodes every text) asks all."""
    chars = getattr(tokenizer, "chars", None)
    if chars is None:
        return list(items), []
    chars = set(chars)
    asked, not_asked = [], []
    for it in items:
        missing = missing_characters(it, chars)
        if missing:
            not_asked.append((it, missing))
        else:
            asked.append(it)
    return asked, not_asked


def _split_of(item) -> str:
    return getattr(item, "split", "seen")  # items without one (an older EvalItem) are training's wordings


def evaluate_with(items, answer_fn, label: str = "", kinds=None, tokenizer=None) -> Result:
    """Score `answer_fn(prompts) -> list of generated texts` on the items; with a char-level
    `tokenizer` (a CharVocab) only on those it can ask, the others counted as not in the vocabulary."""
    from rwkvlm.data.arithmetic import format_prompt

    t0 = time.perf_counter()
    asked, not_asked = split_by_vocabulary(items, tokenizer)
    replies = answer_fn([format_prompt(it.question) for it in asked]) if asked else []
    res = score(asked, list(replies), label, kinds, not_asked)
    res.vocabulary = describe_vocabulary(tokenizer, getattr(tokenizer, "source", None))
    res.seconds = time.perf_counter() - t0
    return res


def describe_vocabulary(tokenizer, where=None) -> str:
    """'World', or 'char: N characters (WHERE)' for a char-level vocabulary (WHERE: its vocab.json)."""
    if getattr(tokenizer, "chars", None) is None:
        return "World"
    return f"char: {len(tokenizer.chars)} characters ({where or 'vocab.json'})"


def default_max_tokens(items, tokenizer) -> int:
    """Enough tokens for the longest expected answer plus its blank line, and some slack (over the
    items the tokenizer can ask)."""
    asked, _ = split_by_vocabulary(items, tokenizer)
    longest = max((len(tokenizer.encode(" " + it.answer + "\n\n")) for it in asked), default=16)
    return longest + 8


def model_answerer(gen, max_tokens: int, batch_size: int, prefix_end_of_doc: bool = False):
    """answer_fn for evaluate_with: greedy batched replies of a Generator."""
    from rwkvlm.infer.generate import SamplingOptions

    opts = SamplingOptions(temperature=0.0, max_tokens=max_tokens)

    def answer(prompts):
        out = gen.generate_batch(prompts, opts, batch_size=batch_size, prefix=[0] if prefix_end_of_doc else None)
        return [g.text for g in out]

    return answer


# ---------------------------------------------------------------- checkpoints

def expand_checkpoints(paths, last: int = DEFAULT_LAST, log=print) -> list:
    """Weight files as given; a PROJ_DIR gives its last `last` rwkv-N.pth (by N) and its newest
    weights (rwkv-final.pth, rwkv-latest.pth or rwkv-N.pth, by training progress, said through
    `log`); an exact-resume state (resume/step-N/ or a file in it) gives that state's weights."""
    from rwkvlm.rundir.find import find_weights
    from rwkvlm.infer.generate import _no_such_checkpoint
    from rwkvlm.rundir import RunDir, state_folder_of

    out = []
    for p in map(Path, paths):
        if not p.exists():
            raise _no_such_checkpoint(p)
        chosen, note = find_weights(p)
        if note:
            log(note)
        if not chosen.exists():
            raise _no_such_checkpoint(chosen)
        if p.is_dir() and state_folder_of(p) is None:
            numbered = [q for _, q in RunDir(p).epoch_checkpoints()][:last] if last > 0 else []
            out.extend(q for q in reversed(numbered) if not _same(q, chosen))
        out.append(chosen)
    unique = []
    for p in out:
        if not any(_same(p, q) for q in unique):
            unique.append(p)
    return unique


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or a.samefile(b)
    except OSError:
        return False


def labels_for(paths) -> list:
    """Column names: the file stem (a state's step-N for its weights.pth), with the folder name when
    stems repeat."""
    from rwkvlm.rundir import STATE_WEIGHTS, state_folder_of

    stems = [Path(p).parent.name if Path(p).name == STATE_WEIGHTS and state_folder_of(p) else Path(p).stem
             for p in paths]
    out = []
    for p, s in zip(paths, stems):
        out.append(f"{Path(p).parent.name}/{s}" if stems.count(s) > 1 else s)
    return out


# ---------------------------------------------------------------- output

def _columns(res: Result) -> list:
    """A result's columns: ("seen", SplitScore), ("unseen", ...), then ("all", res) when it has
    both splits; ("all", res) alone when it has none."""
    cols = [(name, part) for name, part in res.by_split.items()]
    return cols + [("all", res)] if len(cols) != 1 else cols


def _cell(ks: KindScore) -> str:
    return f"{ks.correct}/{ks.n} {ks.accuracy:5.1f}%" if ks.n else "-"


NOT_IN_VOCAB = "not in vocab"  # the column of the items a char-level vocabulary could not ask


def _shown(chars, limit: int = 12) -> str:
    shown = ", ".join(repr(c) for c in list(chars)[:limit])
    return shown + (f" and {len(chars) - limit} more" if len(chars) > limit else "")


def vocabulary_note(results) -> str:
    """The lines under the table on the items not asked: what the column means, and per result with
    such items its vocabulary and the characters it lacks (most items first)."""
    hit = [r for r in results if r.overall.not_in_vocab]
    if not hit:
        return ""
    lines = [f"{NOT_IN_VOCAB}: items whose question or answer holds a character the model's vocabulary lacks; "
             f"not asked, and not in the accuracy (n counts the items asked)."]
    for r in hit:
        total = r.overall.n + r.overall.not_in_vocab
        lines.append(f"  {r.label}: {r.overall.not_in_vocab} of {total} items; vocabulary {r.vocabulary}; "
                     f"lacking {_shown(list(r.missing))}")
    return "\n".join(lines)


def format_table(results, kinds=None, title: str = "") -> str:
    """Rows: kinds then overall; per result a column group, headed by its label, of
    `correct/n acc%` cells: seen wordings, unseen wordings, all items (the splits it has), and, for a
    result with items its vocabulary could not ask, their count (all splits) in a `not in vocab`
    column (vocabulary_note explains it)."""
    if kinds is None:
        from rwkvlm.data.arithmetic import KINDS as kinds
    kinds = list(kinds) + [k for r in results for k in r.by_kind if k not in kinds]
    kinds = list(dict.fromkeys(kinds))
    groups = []  # per result: [(column name, {row: cell}, width)]
    for r in results:
        group = []
        for name, score in _columns(r):
            rows = {k: _cell(score.by_kind.get(k, KindScore())) for k in kinds}
            rows["overall"] = _cell(score.overall)
            group.append([name, rows, max([len(name)] + [len(c) for c in rows.values()])])
        if r.overall.not_in_vocab:
            rows = {k: str(r.by_kind.get(k, KindScore()).not_in_vocab) for k in kinds}
            rows["overall"] = str(r.overall.not_in_vocab)
            group.append([NOT_IN_VOCAB, rows, max([len(NOT_IN_VOCAB)] + [len(c) for c in rows.values()])])
        spare = len(r.label) - (sum(c[2] for c in group) + 2 * (len(group) - 1))
        if spare > 0:
            group[-1][2] += spare
        groups.append(group)
    w0 = max([len("overall"), len("kind")] + [len(k) for k in kinds])
    two_rows = any(len(g) > 1 for g in groups) or any(r.by_split for r in results)

    def line(first, cells):
        return "  ".join([first.ljust(w0)] + cells).rstrip()

    lines = [title] if title else []
    heads = []
    for r, g in zip(results, groups):
        width = sum(c[2] for c in g) + 2 * (len(g) - 1)
        heads.append(r.label.center(width) if len(g) > 1 else r.label.rjust(width))
    lines.append(line("kind", heads))
    if two_rows:
        lines.append(line("", [name.rjust(w) for g in groups for name, _, w in g]))
    rule = line("-" * w0, ["-" * w for g in groups for _, _, w in g])
    lines.append(rule)
    for k in kinds + ["overall"]:
        if k == "overall":
            lines.append(rule)
        lines.append(line(k, [rows[k].rjust(w) for g in groups for _, rows, w in g]))
    note = vocabulary_note(results)
    return "\n".join(lines + ([note] if note else []))


def format_errors(res: Result, limit: int) -> str:
    if not res.errors or limit <= 0:
        return f"{res.label}: no wrong answers" if not res.errors else ""
    lines = [f"{res.label}: {len(res.errors)} wrong, first {min(limit, len(res.errors))}:"]
    for e in res.errors[:limit]:
        tag = f"{e['kind']}, {e['split']} wording" if "split" in e else e["kind"]
        lines.append(f"  [{tag}] {e['question']!r}\n      expected {e['expected']!r}\n      got      {e['got']!r}")
    return "\n".join(lines)


def write_json(path, results, n: int, seed: int, kinds, split: str = DEFAULT_SPLIT) -> None:
    """The results as JSON: per checkpoint overall / by_kind (all items) and by_split
    ({"seen"|"unseen": {"overall", "by_kind"}})."""
    from rwkvlm.atomic import atomic_open, explain_write_errors

    doc = {"n": n, "seed": seed, "split": split, "kinds": list(kinds), "metric": "exact match of the greedy reply",
           "checkpoints": [r.as_dict() for r in results]}
    with explain_write_errors(Path(path).parent, hint="give another --json FILE"):
        with atomic_open(path, "w") as f:
            json.dump(doc, f, ensure_ascii=False, indent=1)
            f.write("\n")


# ---------------------------------------------------------------- command line

def _parser():
    p = argparse.ArgumentParser(
        prog="evaluate.py",
        description="Held-out arithmetic accuracy (greedy, exact match) of RWKV-7 checkpoints, by kind, on "
                    "training's wordings (seen) and on wordings with held-out parts (unseen).",
    )
    p.add_argument("checkpoints", nargs="+",
                   help="rwkv-*.pth files, or a PROJ_DIR (its newest weights: rwkv-final.pth, rwkv-latest.pth "
                        "or rwkv-N.pth by training progress, plus its last --last rwkv-N.pth), or an "
                        "exact-resume state resume/step-N/")
    p.add_argument("--n", type=int, default=DEFAULT_N, help=f"number of held-out items (default {DEFAULT_N})")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"seed of the held-out set (default {DEFAULT_SEED}; the held-out problems never "
                        f"appear in training data, whatever the seed)")
    p.add_argument("--split", choices=("seen", "unseen", "both"), default=DEFAULT_SPLIT,
                   help="which wordings: seen (training's), unseen (each with a part training never uses) or "
                        f"both, alternating (default {DEFAULT_SPLIT})")
    p.add_argument("--last", type=int, default=DEFAULT_LAST,
                   help=f"for a directory: how many of the newest rwkv-N.pth to evaluate (default {DEFAULT_LAST})")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on CUDA), fp32 or bf16")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows decoded together (default 512 on CUDA, 400 on CPU)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="longest reply in tokens (default: longest expected answer + 8)")
    p.add_argument("--eod-prefix", action="store_true",
                   help="feed token 0 (end of document) before each prompt, like a document start in training")
    p.add_argument("--show-errors", type=int, nargs="?", const=5, default=0, metavar="K",
                   help="print K wrong answers per checkpoint (default K=5 when the flag is given)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results to this JSON file")
    return p


def _check_eod_prefix(paths, vocab_files) -> None:
    """UserError for --eod-prefix with a char-level model: it has no end-of-document token."""
    from rwkvlm.data.charvocab import CharVocab

    for path, f in zip(paths, vocab_files):
        if f is not None:
            first = CharVocab.read(f).chars[0]
            raise UserError(f"--eod-prefix feeds token 0, the World vocabulary's end of document, before each prompt; "
                            f"{path} is a char-level model (its vocabulary is {f}), which has no such token: its "
                            f"id 0 is the character {first!r}. Leave --eod-prefix out for it.")


def _summary(res: Result, char_max_tokens=None) -> str:
    """The line printed after each checkpoint."""
    ov = res.overall
    total = ov.n + ov.not_in_vocab
    tail = f"  [{res.path}]"
    if char_max_tokens is not None:
        tail = f"  [{res.path}; vocabulary {res.vocabulary}, max {char_max_tokens} tokens]"
    if ov.n == 0:
        return f"  {res.label}: no item asked: all {total} hold characters its vocabulary lacks{tail}"
    splits = ", ".join(f"{name} {part.overall.accuracy:.1f}%" for name, part in res.by_split.items()
                       if part.overall.n)
    skipped = f"; {ov.not_in_vocab} of {total} items not in the vocabulary" if ov.not_in_vocab else ""
    misread = ov.n - ov.restated
    slips = ov.n - ov.correct - misread
    misses = f"; of the {ov.n - ov.correct} misses {misread} misread the problem, {slips} slipped in the result" \
        if ov.correct < ov.n else ""
    return (f"  {res.label}: {ov.correct}/{ov.n} = {ov.accuracy:.1f}% ({splits}{skipped}{misses}; "
            f"{res.seconds:.1f} s){tail}")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.n < 1:
        raise UserError(f"--n must be at least 1, found {args.n}")
    if args.last < 0:
        raise UserError(f"--last must be >= 0, found {args.last}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, found {args.batch_size}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, found {args.max_tokens}")
    if args.json:  # before the evaluation, not after it
        from rwkvlm.atomic import check_output_path

        check_output_path(args.json, "--json", "eval.json")
    paths = expand_checkpoints(args.checkpoints, args.last)

    import torch

    from rwkvlm.data.arithmetic import KINDS, make_eval_set
    from rwkvlm.infer.generate import Generator, load_model, resolve_device, resolve_dtype
    from rwkvlm.data.tokenizer import get_tokenizer
    from rwkvlm.rundir.find import vocab_file_for

    vocab_files = [vocab_file_for(p) for p in paths]  # None: the World vocabulary
    if args.eod_prefix:
        _check_eod_prefix(paths, vocab_files)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    batch_size = args.batch_size or (512 if device.type == "cuda" else 400)
    items = make_eval_set(args.n, args.seed, split=args.split)
    world = get_tokenizer()
    if args.max_tokens or not any(vocab_files):
        limit = f"max {args.max_tokens or default_max_tokens(items, world)} tokens"
    else:
        limit = "max tokens: the longest answer + 8 in each model's vocabulary"
    wordings = {"both": "seen and unseen wordings", "seen": "seen wordings", "unseen": "unseen wordings"}
    print(f"held-out arithmetic: {len(items)} items (seed {args.seed}, {wordings[args.split]}), greedy, exact "
          f"match, {limit}, {device} {str(dtype).replace('torch.', '')}", flush=True)

    results = []
    for path, label, vocab_file in zip(paths, labels_for(paths), vocab_files):
        t0 = time.perf_counter()
        model = load_model(path, device, dtype, log=lambda msg: None)  # said by expand_checkpoints
        tok = model.tokenizer if model.tokenizer is not None else world  # a char-level model's vocab.json
        max_tokens = args.max_tokens or default_max_tokens(items, tok)
        gen = Generator(model, tok)
        res = evaluate_with(items, model_answerer(gen, max_tokens, batch_size, args.eod_prefix), label, KINDS,
                            tokenizer=tok)
        res.path = str(path)
        res.vocabulary = describe_vocabulary(tok, vocab_file)
        cfg = getattr(model, "cfg", None)
        if cfg is not None:
            res.info = {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "vocab_size": cfg.vocab_size,
                        "load_seconds": round(time.perf_counter() - t0 - res.seconds, 3)}
        res.info["max_tokens"] = max_tokens
        print(_summary(res, max_tokens if model.tokenizer is not None else None), flush=True)
        results.append(res)
        del model, gen
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print()
    print(format_table(results, KINDS))
    if args.show_errors:
        for res in results:
            text = format_errors(res, args.show_errors)
            if text:
                print("\n" + text)
    if args.json:
        write_json(args.json, results, len(items), args.seed, KINDS, args.split)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    from rwkvlm.errors import run_cli

    sys.exit(run_cli(main))
