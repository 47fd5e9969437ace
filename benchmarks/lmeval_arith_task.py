"""Write the arithmetic held-out set as an lm-evaluation-harness task folder (lm-eval 0.4.x).

    python benchmarks/lmeval_arith_task.py OUT_TASK_DIR [--n 400] [--seed 0] [--jsonl ITEMS.jsonl]
    lm_eval --model hf --model_args pretrained=HF_DIR,trust_remote_code=True,dtype=bfloat16 \\
        --tasks rwkv_arith,rwkv_arith_number --include_path OUT_TASK_DIR --device cuda:0 --batch_size 16

The items are evaluate.py's: `rwkvlm.data.arithmetic.make_eval_set(n, seed)` (problems that never
appear in the training corpus in any wording; the defaults are evaluate.py's, 400 items, seed 0),
or the lines of --jsonl, each {"question": ..., "answer": ...} (and "kind", "split" if known).
The folder gets:

- `arith_heldout.jsonl`: one line per item: kind, split, question, answer, `prompt` (exactly
  evaluate.py's prompt, `User: {question}\\n\\nAssistant:`) and `number` (the answer's last number);
- `rwkv_arith.yaml`: task `rwkv_arith`, generate_until with greedy decoding up to the blank line,
  the reply stripped, exact match against the whole answer (e.g. `32 + 15 = 47`): the figure
  evaluate.py reports as "overall";
- `rwkv_arith_number.yaml`: task `rwkv_arith_number`, the same generation, exact match of the
  last number in the reply against the answer's (`47`): credit for the result even when the
  restated problem differs.

The data file is named by its absolute path in the YAML (lm-eval's `dataset_path: json` with
`data_files`), so move the folder only together with a re-run of this script.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

DATA = "arith_heldout.jsonl"
NUMBER = r"(-?[0-9]+(?:\.[0-9]+)?)"  # the last match in a reply is its result


def last_number(text: str) -> str:
    found = re.findall(NUMBER, text)
    return found[-1] if found else ""


def items_from(args) -> list[dict]:
    if args.jsonl:
        out = []
        for n, line in enumerate(Path(args.jsonl).read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                out.append({"kind": obj.get("kind", ""), "split": obj.get("split", ""),
                            "question": str(obj["question"]), "answer": str(obj["answer"])})
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise SystemExit(f"{args.jsonl} line {n}: expected a JSON object with question and answer ({e})")
        return out
    from rwkvlm.data.arithmetic import make_eval_set

    return [{"kind": it.kind, "split": getattr(it, "split", ""), "question": it.question, "answer": it.answer}
            for it in make_eval_set(args.n, args.seed)]


def task_yaml(name: str, data: Path, target: str, filters: list, max_tokens: int, what: str) -> str:
    """One task file. Strings are written as JSON strings, which YAML reads as double-quoted scalars."""
    q = json.dumps
    lines = [
        f"# {what}",
        "# Written by benchmarks/lmeval_arith_task.py (rwkvlm); see RWKV-v7/docs/huggingface.md.",
        f"task: {name}",
        "dataset_path: json",
        "dataset_name: null",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {q(str(data))}",
        "test_split: test",
        "output_type: generate_until",
        f"doc_to_text: {q('{{prompt}}')}",
        f"doc_to_target: {q(target)}",
        f"target_delimiter: {q(' ')}",
        "generation_kwargs:",
        f"  until: [{q(chr(10) * 2)}]",
        "  do_sample: false",
        "  temperature: 0.0",
        f"  max_gen_toks: {max_tokens}",
        "filter_list:",
        "  - name: reply",
        "    filter:",
    ]
    for function, kwargs in filters:
        lines.append(f"      - function: {q(function)}")
        for k, v in kwargs.items():
            lines.append(f"        {k}: {q(v)}")
    lines += [
        "metric_list:",
        "  - metric: exact_match",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 1.0",
    ]
    return "\n".join(lines) + "\n"


def write_task(out: Path, items: list[dict], max_tokens: int) -> list[Path]:
    """The three files of the task folder `out`; returns their paths."""
    from rwkvlm.atomic import atomic_open
    from rwkvlm.data.arithmetic import format_prompt

    out.mkdir(parents=True, exist_ok=True)
    data = out.resolve() / DATA
    with atomic_open(data, "w") as f:
        for it in items:
            row = dict(it, prompt=format_prompt(it["question"]), number=last_number(it["answer"]))
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    exact = task_yaml("rwkv_arith", data, "{{answer}}", [("remove_whitespace", {}), ("take_first", {})], max_tokens,
                      "Held-out arithmetic, exact match of the whole reply (evaluate.py's figure).")
    number = task_yaml("rwkv_arith_number", data, "{{number}}",
                       [("regex", {"regex_pattern": NUMBER, "group_select": -1, "fallback": "[none]"}),
                        ("take_first", {})], max_tokens,
                       "Held-out arithmetic, exact match of the reply's last number.")
    paths = [data]
    for name, text in (("rwkv_arith.yaml", exact), ("rwkv_arith_number.yaml", number)):
        with atomic_open(out / name, "w") as f:
            f.write(text)
        paths.append(out / name)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Then: lm_eval --model hf --model_args pretrained=HF_DIR,"
                                        "trust_remote_code=True,dtype=bfloat16 --tasks rwkv_arith,rwkv_arith_number "
                                        "--include_path OUT_TASK_DIR --device cuda:0")
    ap.add_argument("out", metavar="OUT_TASK_DIR", help="the task folder to write (created if missing)")
    ap.add_argument("--n", type=int, default=400, help="held-out items (default 400, as evaluate.py)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the held-out set (default 0, as evaluate.py)")
    ap.add_argument("--jsonl", default=None, help="take the items from this jsonl ({question, answer} per line)")
    ap.add_argument("--max_tokens", type=int, default=64, help="generation limit per reply (default 64)")
    args = ap.parse_args(argv)
    if args.n < 1:
        raise SystemExit(f"--n must be at least 1, found {args.n}")
    items = items_from(args)
    paths = write_task(Path(args.out), items, args.max_tokens)
    print(f"wrote {len(items)} items: " + ", ".join(str(p) for p in paths))
    print(f"run: lm_eval --model hf --model_args pretrained=HF_DIR,trust_remote_code=True,dtype=bfloat16 "
          f"--tasks rwkv_arith,rwkv_arith_number --include_path {Path(args.out).resolve()} --device cuda:0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
