"""CPU training speed through the real scripts (train.py via Lightning).

Generates the arithmetic demo data, runs make_data, prepares the tiny config
(L2, D128, ctx 512, micro_bsz 8, fp32) and trains STEPS steps on 2 CPU cores.
Reports steady-state tokens/s (median step time after 10 warm-up steps, from
loss_log.csv) and the training process's peak RSS (getrusage of the child).

    python benchmarks/bench_cpu_trainer.py [--steps 60] [--compile auto|0|1] [--append]
Target (issue 3): >= 2,000 tokens/s at <= 3 GB peak RSS.
"""
import argparse
import csv
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "RWKV-v7" / "train_temp" / "train.py"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--compile", default="auto", choices=["auto", "0", "1"], help="train.py's --compile")
    ap.add_argument("--append", action="store_true")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_cpu_trainer."))
    py = sys.executable
    subprocess.run([py, REPO / "RWKV-v5" / "make_arithmetic_data.py", "demo.jsonl", "--docs", "4000"], cwd=work,
                   check=True, capture_output=True)
    subprocess.run([py, REPO / "RWKV-v5" / "make_data.py", "demo.jsonl", "3", "512", "--seed", "0"], cwd=work,
                   check=True, capture_output=True)
    meta = json.loads((work / "demo.meta.json").read_text())
    proj = work / "proj"
    common = ["--proj_dir", proj, "--n_layer", "2", "--n_embd", "128", "--ctx_len", "512", "--precision", "fp32",
              "--accelerator", "cpu", "--random_seed", "0"]
    subprocess.run([py, TRAIN, "--train_stage", "1", *common], check=True, capture_output=True)
    cmd = [py, TRAIN, "--train_stage", "3", *common, "--data_file", work / "demo", "--strategy", "auto",
           "--my_exit_tokens", str(a.steps * 8 * 512), "--magic_prime", str(meta["magic_prime"]),
           "--micro_bsz", "8", "--wandb", "", "--enable_progress_bar", "False", "--compile", a.compile]
    subprocess.run([str(c) for c in cmd], check=True, capture_output=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the largest child: train.py
    t = [float(r["time"]) for r in csv.DictReader(open(proj / "loss_log.csv"))]
    dts = [b - x for x, b in zip(t[10:], t[11:])]
    toks = 8 * 512 / statistics.median(dts)
    line = (f"--compile {a.compile}: steady-state {toks:,.0f} tokens/s (median step {statistics.median(dts) * 1e3:.0f} ms over "
            f"{len(dts)} steps), peak RSS {peak / 2**30:.2f} GiB; target >= 2,000 tokens/s at <= 3 GB: "
            f"{'met' if toks >= 2000 and peak <= 3e9 else 'NOT met'}")
    print(line)
    if a.append:
        with open(REPO / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(f"\n## CPU training through train.py ({datetime.date.today()})\n\n"
                    f"- machine: CPU 2 cores (dev sandbox), {platform.machine()}, Python {platform.python_version()}\n"
                    f"- command: `python benchmarks/bench_cpu_trainer.py --steps {a.steps} --compile {a.compile} --append` "
                    f"(L2-D128, ctx 512, micro_bsz 8, fp32, strategy auto, vocab 65536)\n- {line}\n")


if __name__ == "__main__":
    main()
