"""A trained model through lm-evaluation-harness (HF backend) on the arithmetic held-out task, end to end.

    python benchmarks/bench_lmeval.py --model-dir PROJ_DIR --out OUTDIR                  # a GPU: cuda:0, bf16
    python benchmarks/bench_lmeval.py --model-dir PROJ_DIR --out OUTDIR --device cpu --limit 16   # a rehearsal

Run it with the Python of an environment that holds lm-eval, flash-linear-attention 0.6.0 and
transformers (>= 5.6.2, < 5.24) besides this package (RWKV-v7/docs/huggingface.md). The chain, each
step a command of its own (all written to the JSON, so that any step can be re-run by hand):

1. `RWKV-v7/export_hf.py MODEL OUTDIR/hf`: the model (a PROJ_DIR, its newest weights, or a .pth) as
   a Hugging Face folder in fla's RWKV7 layout, with its tokenizer;
2. `benchmarks/lmeval_arith_task.py OUTDIR/task --n N --seed 0`: evaluate.py's held-out items as the
   local tasks `rwkv_arith` (exact match of the whole reply) and `rwkv_arith_number` (of its last
   number);
3. `lm_eval --model hf --model_args pretrained=OUTDIR/hf,trust_remote_code=True,dtype=bfloat16
   --tasks rwkv_arith,rwkv_arith_number --include_path OUTDIR/task --device cuda:0 ...` (on the CPU:
   `python -m rwkvlm.hf.cpu lm_eval ...` with `dtype=float32,fuse_norm=False`, fla's Triton kernels
   replaced by PyTorch: rwkvlm/hf/cpu.py), its results and per-item samples in OUTDIR/lmeval/;
4. `RWKV-v7/evaluate.py MODEL --n LIMIT --max-tokens 64 ...`: our own evaluation of the same items
   (the first LIMIT of the N: the held-out set's first items do not depend on N) with the task's
   generation limit, for a cross-check: the same greedy replies should score the same.

OUTDIR/bench_lmeval.json gets the scores (lm-eval's exact_match and its stderr per task, evaluate.py's
accuracy, how many replies are the same in both), the device (the card, or the CPU model and its
cores), the commit, the versions, each step's command and time. A failed step stops the chain with
its log's last lines (OUTDIR/logs/STEP.log) and exit status 1.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXPORT = REPO / "RWKV-v7" / "export_hf.py"
EVALUATE = REPO / "RWKV-v7" / "evaluate.py"
TASK_SCRIPT = REPO / "benchmarks" / "lmeval_arith_task.py"
TASKS = ("rwkv_arith", "rwkv_arith_number")
MAX_GEN = 64  # the task's max_gen_toks (lmeval_arith_task.py --max_tokens), evaluate.py's --max-tokens here


def shell(argv) -> str:
    return " ".join(shlex.quote(str(a)) for a in argv)


def device_name(device: str) -> str:
    """The card's name, or the CPU's model and cores."""
    if device.startswith("cuda"):
        import torch

        index = int(device.split(":")[1]) if ":" in device else 0
        return f"1x {torch.cuda.get_device_name(index)}"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model}, {os.cpu_count()} cores"


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return head + (" with uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "flash-linear-attention", "fla-core", "lm-eval", "tokenizers", "triton"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


class Chain:
    def __init__(self, out: Path):
        self.out = out
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.steps: list[dict] = []

    def run(self, name: str, argv, env=None) -> None:
        """Run one step, its output into logs/NAME.log; SystemExit(1) naming the log when it fails."""
        argv = [str(a) for a in argv]
        log = self.logs / f"{name}.log"
        print(f"[{name}] {shell(argv)}", flush=True)
        t0 = time.perf_counter()
        with open(log, "w") as f:
            rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env).returncode
        seconds = time.perf_counter() - t0
        self.steps.append({"step": name, "command": shell(argv), "seconds": round(seconds, 1), "rc": rc,
                           "log": str(log)})
        print(f"      {seconds:.1f} s, exit status {rc}", flush=True)
        if rc != 0:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            print("\n".join(["      " + ln for ln in tail]), file=sys.stderr)
            raise SystemExit(1)


def lm_eval_results(folder: Path) -> tuple[dict, Path]:
    """The newest results_*.json lm-eval wrote under `folder`, and its path."""
    found = sorted(glob.glob(str(folder / "**" / "results_*.json"), recursive=True), key=os.path.getmtime)
    if not found:
        raise SystemExit(f"lm-eval wrote no results_*.json under {folder}")
    return json.loads(Path(found[-1]).read_text()), Path(found[-1])


def lm_eval_replies(results_file: Path, task: str) -> dict:
    """{question: filtered reply} from lm-eval's per-item samples of `task` (--log_samples)."""
    stamp = results_file.stem.removeprefix("results_")
    files = sorted(results_file.parent.glob(f"samples_{task}_{stamp}*.jsonl")) or \
        sorted(results_file.parent.glob(f"samples_{task}_[0-9]*.jsonl"))  # not samples_{task}_number_...
    out = {}
    if files:
        for line in files[-1].read_text(encoding="utf-8").splitlines():
            s = json.loads(line)
            reply = s.get("filtered_resps", [""])
            out[s["doc"]["question"]] = reply[0] if isinstance(reply, list) and reply else reply
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module's text (and RWKV-v7/docs/huggingface.md) for the chain.")
    ap.add_argument("--model-dir", required=True,
                    help="the trained model: a PROJ_DIR (its newest weights, as evaluate.py picks them) or a .pth")
    ap.add_argument("--out", required=True, help="output folder (hf/, task/, lmeval/, logs/, bench_lmeval.json)")
    ap.add_argument("--device", default="cuda:0", help="cuda:N (fla's kernels, bf16) or cpu (fla's PyTorch stand-ins, "
                                                        "fp32); default cuda:0")
    ap.add_argument("--n", type=int, default=400, help="held-out items in the task (default 400, as evaluate.py)")
    ap.add_argument("--limit", type=int, default=None, help="lm-eval --limit: score the first LIMIT items only")
    ap.add_argument("--batch-size", default=None, help="lm-eval --batch_size (default 16 on a GPU, 1 on the CPU)")
    ap.add_argument("--dtype", default=None, help="the model's dtype in lm-eval (default bfloat16 on a GPU, float32 on "
                                                  "the CPU)")
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"default {','.join(TASKS)}")
    ap.add_argument("--no-evaluate", action="store_true", help="leave out step 4 (evaluate.py on the same items)")
    args = ap.parse_args(argv)
    cpu = args.device == "cpu"
    if not cpu and not args.device.startswith("cuda"):
        ap.error(f"--device {args.device!r}: give cpu or cuda:N")
    if not cpu:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA GPU visible: give --device cpu for the rehearsal on fla's PyTorch stand-ins",
                  file=sys.stderr)
            return 2
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    dtype = args.dtype or ("float32" if cpu else "bfloat16")
    batch = args.batch_size or ("1" if cpu else "16")
    tasks = [t for t in args.tasks.split(",") if t]
    n_scored = min(args.limit, args.n) if args.limit else args.n
    chain = Chain(out)
    t_all = time.perf_counter()

    hf, task = out / "hf", out / "task"
    chain.run("export", [py, EXPORT, args.model_dir, hf])
    exported = json.loads((hf / "rwkvlm_export.json").read_text())
    if exported.get("vocabulary") != "world":
        print(f"{args.model_dir} is a model of the {exported.get('vocabulary')} vocabulary "
              f"(vocab_size {exported['vocab_size']}): lm-eval's HF backend needs an end-of-text token (the "
              f"tokenizer's eos), which only the World vocabulary has here (a char-level model has none). Give a "
              f"World-vocabulary model.", file=sys.stderr)
        return 2
    chain.run("task", [py, TASK_SCRIPT, task, "--n", args.n, "--seed", 0, "--max_tokens", MAX_GEN])
    model_args = f"pretrained={hf},trust_remote_code=True,dtype={dtype}" + (",fuse_norm=False" if cpu else "")
    lm = ([py, "-m", "rwkvlm.hf.cpu", "lm_eval"] if cpu else [py, "-m", "lm_eval"]) + [
        "--model", "hf", "--model_args", model_args, "--tasks", ",".join(tasks), "--include_path", task,
        "--device", args.device, "--batch_size", batch, "--output_path", out / "lmeval", "--log_samples"]
    if args.limit:
        lm += ["--limit", args.limit]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    chain.run("lm_eval", lm, env=env)
    results, results_file = lm_eval_results(out / "lmeval")
    scores = {}
    for t in tasks:
        r = results["results"].get(t, {})
        key = next((k for k in r if k.startswith("exact_match,")), None)
        scores[t] = {"exact_match": r.get(key), "stderr": r.get(key.replace("exact_match,", "exact_match_stderr,"))
                     if key else None, "filter": key.split(",", 1)[1] if key else None,
                     "n": results.get("n-samples", {}).get(t, {}).get("effective")}

    ours = None
    if not args.no_evaluate:
        ev_json = out / "evaluate.json"
        chain.run("evaluate", [py, EVALUATE, args.model_dir, "--last", 0, "--n", n_scored, "--seed", 0,
                               "--max-tokens", MAX_GEN, "--device", "cpu" if cpu else "cuda", "--json", ev_json],
                  env=env)
        ck = json.loads(ev_json.read_text())["checkpoints"][0]
        ours = {"n": ck["overall"]["n"], "correct": ck["overall"]["correct"], "accuracy": ck["overall"]["accuracy"],
                "by_kind": {k: v["accuracy"] for k, v in ck["by_kind"].items()}}
        if "rwkv_arith" in tasks:  # the same replies? (evaluate.py keeps the wrong ones; the right ones are the answer)
            from rwkvlm.data.arithmetic import make_eval_set

            wrong = {e["question"]: e["got"] for e in ck["errors"]}
            theirs = lm_eval_replies(results_file, "rwkv_arith")
            items = make_eval_set(n_scored, 0)
            same = sum(theirs.get(it.question) == wrong.get(it.question, it.answer) for it in items)
            ours["same_replies_as_lm_eval"] = same
            ours["compared"] = len(items)

    doc = {
        "what": "lm-evaluation-harness (HF backend) on the arithmetic held-out task",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device_name(args.device), "device_arg": args.device,
        "backend": "fla kernels" if not cpu else "fla's model code with PyTorch stand-ins for its Triton kernels "
                                                 "(rwkvlm/hf/cpu.py)",
        "commit": commit(), "model": str(Path(args.model_dir)),
        "export": exported,
        "n_items": args.n, "limit": args.limit, "scored": n_scored, "dtype": dtype, "batch_size": batch,
        "lm_eval": scores, "lm_eval_results": str(results_file), "evaluate_py": ours,
        "steps": chain.steps, "seconds": round(time.perf_counter() - t_all, 1), "versions": versions(),
    }
    (out / "bench_lmeval.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    print(f"\n{doc['device']} ({doc['backend']}), {doc['export']['model']} from {args.model_dir}, "
          f"{n_scored} of {args.n} items, {dtype}:")
    for t, s in scores.items():
        print(f"  lm-eval {t}: exact_match {s['exact_match']} (stderr {s['stderr']}, n {s['n']})")
    if ours:
        extra = (f", the same reply as lm-eval on {ours['same_replies_as_lm_eval']} of {ours['compared']} items"
                 if "same_replies_as_lm_eval" in ours else "")
        print(f"  evaluate.py: {ours['correct']}/{ours['n']} = {ours['accuracy']}%{extra}")
    times = ", ".join(f"{s['step']} {s['seconds']} s" for s in chain.steps)
    print(f"  {doc['seconds']} s in all ({times})")
    print(f"wrote {out / 'bench_lmeval.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
