"""Summarise one gpu_train_run.sh run: steps, loss, steady-state tokens/s, peak GPU memory, MFU.

    python benchmarks/train_summary.py OUTDIR/NAME --tok-step 65536 --tflops 790 --wall 300 --rc 0

Reads NAME.loss_log.csv (the trainer's per-step log) and NAME.gpu_mem.csv (nvidia-smi
`index, memory.used` MiB samples). Steady state: the median time between step ends after
the first 10 steps (compilation and warm-up excluded).
"""
from __future__ import annotations

import argparse
import collections
import csv
import statistics

from rwkvlm.model import ModelConfig, count_params


def steady_state(times: list) -> tuple:
    """(median seconds per step, steps skipped) from the step-end times of loss_log.csv:
    the first 10 steps (compilation, warm-up) are left out, fewer on a short run."""
    skip = min(10, max(0, len(times) - 3))
    dts = [b - a for a, b in zip(times[skip:], times[skip + 1:])]
    return (statistics.median(dts) if dts else float("nan")), skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("prefix")
    ap.add_argument("--tok-step", type=int, required=True, help="tokens per optimiser step (all GPUs)")
    ap.add_argument("--tflops", default="", help="measured bf16 matmul TFLOP/s of one card")
    ap.add_argument("--wall", type=int, default=0)
    ap.add_argument("--rc", type=int, default=0)
    ap.add_argument("--label", default="")
    ap.add_argument("--gpus", type=int, default=1, help="GPUs the run used")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--embd", type=int, default=768)
    args = ap.parse_args()

    try:
        rows = list(csv.DictReader(open(f"{args.prefix}.loss_log.csv")))
    except OSError:
        rows = []
    peak = collections.defaultdict(int)
    try:
        for line in open(f"{args.prefix}.gpu_mem.csv"):
            parts = [x.strip() for x in line.split(",")]
            if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                peak[int(parts[0])] = max(peak[int(parts[0])], int(parts[1]))
    except OSError:
        pass
    print(f"{args.label}: rc {args.rc}, wall {args.wall} s")
    if not rows:
        print("  no steps logged")
        return
    t = [float(r["time"]) for r in rows]
    med, skip = steady_state(t)
    kts = args.tok_step / med / 1e3
    gpus = args.gpus
    print(f"  steps {rows[-1]['step']}, tokens {rows[-1]['tokens']}, loss first {float(rows[0]['loss']):.4f} "
          f"last {float(rows[-1]['loss']):.4f} (mean of last 20: "
          f"{statistics.fmean(float(r['loss']) for r in rows[-20:]):.4f})")
    print(f"  steady state: {kts:.1f} kt/s in all ({kts / gpus:.1f} per GPU), median step {med * 1e3:.1f} ms "
          f"(steps {skip + 1}..{len(t)})")
    for i in sorted(peak):
        print(f"  peak GPU memory, card {i} (nvidia-smi): {peak[i]} MiB = {peak[i] / 1024:.2f} GiB")
    params = count_params(ModelConfig(n_layer=args.layers, n_embd=args.embd))
    if args.tflops:
        rate = 6 * params * kts * 1e3 / gpus
        print(f"  MFU: 6 x {params:,} params x {kts / gpus:.1f} kt/s per GPU = {rate / 1e12:.1f} TFLOP/s "
              f"= {rate / (float(args.tflops) * 1e12):.1%} of the measured {float(args.tflops):.0f} TFLOP/s")


if __name__ == "__main__":
    main()
