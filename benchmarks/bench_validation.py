"""What validation (--val_every_steps) adds to the training time, on CPU, through train.py.

    python benchmarks/bench_validation.py --out OUTDIR [--steps 200] [--n_layer 2 --n_embd 64 --ctx_len 64]

Makes the arithmetic demo data (make_arithmetic_data.py + make_data.py, a held-out set with another
seed), prepares one rwkv-init.pth, then trains the same run (same seed, same steps) without
validation and with each validation setting of --settings ("EVERY:VAL_TOKENS", VAL_TOKENS 0 = the
default). Per run, from the logs: the training time (loss_log.csv's time column, first to last
step: start-up and the first step left out), the seconds of each validation (train_log.txt's
validation lines), and from them:

- added: the validations' seconds / the rest of the training time (what validation adds);
- wall: the run's training time / the baseline's (the mean of a baseline run before and one after
  the others), minus 1 (the same, with the noise of a shared machine in it);
- batch cost: the seconds of one batch of validation windows (M_BSZ windows) / of one training
  step (validation.FORWARD_COST is the figure the trainer's estimate uses);
- estimate: validation.estimated_cost for the setting.

Writes OUTDIR/results.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "RWKV-v7" / "train_temp" / "train.py"


def sh(cmd, cwd=None, env=None):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(map(str, cmd))}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def make_data(d: Path, docs: int, seed: int, ctx: int, name: str) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    if not (d / f"{name}.meta.json").is_file():
        sh([sys.executable, REPO / "RWKV-v5" / "make_arithmetic_data.py", f"{name}.jsonl", "--docs", docs, "--seed",
            seed], cwd=d)
        sh([sys.executable, REPO / "RWKV-v5" / "make_data.py", f"{name}.jsonl", 1, ctx, "--seed", 0], cwd=d)
    meta = json.loads((d / f"{name}.meta.json").read_text())
    meta["base"] = str(d / name)
    return meta


def run_once(args, meta, proj: Path, init: Path, env, val=None) -> dict:
    proj.mkdir(parents=True, exist_ok=True)
    (proj / "rwkv-init.pth").write_bytes(init.read_bytes())
    tokens = args.steps * args.micro_bsz * args.ctx_len
    cmd = [sys.executable, TRAIN, "--train_stage", "3", "--proj_dir", proj, "--data_file", meta["base"],
           "--my_exit_tokens", tokens, "--magic_prime", meta["magic_prime"], "--ctx_len", args.ctx_len,
           "--n_layer", args.n_layer, "--n_embd", args.n_embd, "--micro_bsz", args.micro_bsz, "--accelerator", "cpu",
           "--precision", "fp32", "--strategy", "auto", "--wandb", "", "--enable_progress_bar", "0",
           "--random_seed", 0, "--warmup_steps", 10, "--lr_init", "3e-3", "--lr_final", "1e-3"]
    if val is not None:
        every, val_tokens, val_base = val
        cmd += ["--val_data_file", val_base, "--val_every_steps", every, "--val_tokens", val_tokens]
    t0 = time.perf_counter()
    out = sh(cmd, env=env)
    wall = time.perf_counter() - t0
    rows = [r.split(",") for r in (proj / "loss_log.csv").read_text().splitlines()[1:]]
    train_s = float(rows[-1][5]) - float(rows[0][5])
    val_lines = [ln.split() for ln in (proj / "train_log.txt").read_text().splitlines() if ln.startswith("val ")]
    val_s = sum(float(v[v.index("seconds") + 1]) for v in val_lines)
    windows = int(val_lines[0][val_lines[0].index("windows") + 1]) if val_lines else 0
    # the validation of the first step is inside loss_log's first row's time: only those after it count
    counted = [v for v in val_lines if int(v[2]) > int(rows[0][0])]
    val_in = sum(float(v[v.index("seconds") + 1]) for v in counted)
    return {"train_s": train_s, "val_s": val_s, "val_in_window_s": val_in, "validations": len(val_lines),
            "windows": windows, "wall_s": wall, "steps": args.steps,
            "note": next((ln for ln in out.splitlines() if ln.startswith("validation:")), "")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--n_layer", type=int, default=2)
    p.add_argument("--n_embd", type=int, default=64)
    p.add_argument("--ctx_len", type=int, default=64)
    p.add_argument("--micro_bsz", type=int, default=4)
    p.add_argument("--settings", default="12:0,32:0,100:0,50:16384",
                   help="comma-separated EVERY:VAL_TOKENS validation settings (VAL_TOKENS 0: the default)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", WANDB_MODE="disabled")
    train = make_data(out / "data", 3000, 0, args.ctx_len, "train")
    heldout = make_data(out / "data", 1500, 1, args.ctx_len, "heldout")
    init_dir = out / "init"
    if not (init_dir / "rwkv-init.pth").is_file():
        sh([sys.executable, TRAIN, "--train_stage", "1", "--proj_dir", init_dir, "--n_layer", args.n_layer,
            "--n_embd", args.n_embd, "--precision", "fp32", "--accelerator", "cpu", "--random_seed", 0], env=env)
    init = init_dir / "rwkv-init.pth"
    sys.path.insert(0, str(REPO / "RWKV-v7"))
    from rwkvlm.train.validation import estimated_cost

    results = {"config": vars(args), "runs": []}
    base = run_once(args, train, out / "base", init, env)
    results["runs"].append(dict(base, setting="no validation (first)"))
    runs = []
    tokens_per_step = args.micro_bsz * args.ctx_len
    for item in args.settings.split(","):
        every, val_tokens = (int(x) for x in item.split(":"))
        r = run_once(args, train, out / f"val-{every}-{val_tokens}", init, env, (every, val_tokens, heldout["base"]))
        rest = r["train_s"] - r["val_in_window_s"]
        r["added"] = r["val_in_window_s"] / rest
        batches = r["validations"] * -(-r["windows"] // args.micro_bsz)
        r["batch_cost"] = (r["val_s"] / max(1, batches)) / (rest / args.steps)
        r["estimate"] = estimated_cost(r["windows"] * args.ctx_len, every, tokens_per_step)
        r["setting"] = f"every {every} steps, --val_tokens {val_tokens}" + (" (default)" if val_tokens == 0 else "")
        runs.append(r)
    last = run_once(args, train, out / "base2", init, env)
    results["runs"].append(dict(last, setting="no validation (last)"))
    baseline = (base["train_s"] + last["train_s"]) / 2
    print(f"L{args.n_layer}-D{args.n_embd} ctx {args.ctx_len} M_BSZ {args.micro_bsz}, {args.steps} steps, "
          f"{tokens_per_step} tokens/step; baseline training time {base['train_s']:.1f} s and {last['train_s']:.1f} s")
    print("| setting | validations x windows | val s | added | wall vs baseline | batch cost | estimate |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        r["wall"] = r["train_s"] / baseline - 1
        results["runs"].append(r)
        print(f"| {r['setting']} | {r['validations']} x {r['windows']} | {r['val_s']:.2f} | {r['added']:.2%} | "
              f"{r['wall']:+.2%} | {r['batch_cost']:.2f} | {r['estimate']:.2%} |", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
