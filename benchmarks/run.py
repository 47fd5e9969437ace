#!/usr/bin/env python3
"""The benchmark driver: named scenarios, one JSON row per run, a readable section for RESULTS.md.

    python benchmarks/run.py --list
    python benchmarks/run.py SCENARIO [SCENARIO ...] --out OUTDIR [--base DIR] [--results benchmarks/RESULTS.md]
                            [--steps N] [--extra "FLAGS"] [--cards 0,1] [--budget S] [--dry-run]
    python benchmarks/run.py --out OUTDIR --report [--results FILE]   # the last call's section again
    python benchmarks/run.py --out OUTDIR --hwtable                    # the hardware table of its hw-* rows

A training scenario makes the arithmetic demo data the way the tutorial does
(RWKV-v5/make_arithmetic_data.py, then make_data.py) into OUTDIR/data/ (kept there for later
calls), runs RWKV-v7/train_temp/demo-training-prepare.sh and demo-training-run.sh with only
their variables changed (given as flags; later flags win), and reads the run's loss_log.csv:
steady-state tokens/s and ms/step (median step time after the first 10 steps), MFU, peak
memory (nvidia-smi, the whole card and the run's own processes; torch's peak allocated when
the run is profiled), the loss; for the hardware table's rows (hw-*) also the prepare time, the time
from launch to the first step and PyTorch's memory by phase, and a larger M_BSZ planned from the
M_BSZ 1 row's (`--m-bsz` sets it). `--base DIR` runs every scenario a second time with an older
copy of the library (DIR holds rwkvlm/, e.g. .base/RWKV-v7) for a before/after comparison.

Every run appends one JSON row to OUTDIR/results.jsonl as soon as it ends; the call's
section (date, card, commit, command, figures) is appended to OUTDIR/report.md and, with
--results FILE, to FILE (appended through a temporary file and a rename: existing text is
never changed). benchmarks/README.md describes the scenarios and the figures.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
LIB = REPO / "RWKV-v7"
V5 = REPO / "RWKV-v5"
GIB = 2**30
WARMUP_STEPS = 10  # steps left out of the steady state (compilation, warm-up); rwkvlm.train.lit profiles after them


# ---------------------------------------------------------------------------------------- scenarios

@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    kind: str           # train, parity, matmul, pytest, step, wkv
    what: str
    gpus: int = 1       # GPUs it needs (0: runs on CPU)
    devices: int = 1    # --devices (GPUs per node); 0: every GPU there is
    nodes: int = 1      # --num_nodes, all on this host (NODE_RANK 0..nodes-1, one process each)
    m_bsz: int = 16
    ctx: int = 4096
    n_layer: int = 12
    n_embd: int = 768
    steps: int = 40
    grad_cp: int = 1
    strategy: str = "deepspeed_stage_2"
    precision: str = "bf16"
    compile: str = "1"
    accelerator: str = "gpu"
    profile_steps: int = 0      # --profile_steps (profile.txt: torch's peak allocated, where the time goes)
    flags: tuple = ()           # more train.py flags
    data: tuple = (20000, 30)   # arithmetic dialogues x make_data copies (docs 0: sized for the run)
    limit_s: int = 300          # the run is stopped (SIGTERM: it saves and exits) after this
    ab: bool = True             # also run with --base's library
    ref: tuple = ()             # (card, kt/s, GiB): the original RWKV-LM trainer's figure on that card
    compare: str = ""           # the 1-GPU scenario whose per-GPU kt/s this one's is compared with
    dump_samples: bool = False  # --dump_samples: check that the ranks drew distinct windows
    eval_n: int = 0             # held-out items to evaluate rwkv-final.pth on
    train_s: int = 0            # plan the run's tokens to take this long (from the measured kt/s)
    args: tuple = ()            # the tool's arguments (kinds pytest, step, wkv)
    warmup: int = WARMUP_STEPS  # steps left out of the steady state (compilation, warm-up)
    plan_from: str = ""         # M_BSZ: the largest power of two that fits by this M_BSZ 1 scenario's measured
                                # memory (its row in OUTDIR; else m_bsz); halved and run again on out of memory
    host_gib: float = 0.0       # host memory the run needs (computed): skipped with a note on a smaller machine
    budget_s: int = 0           # the estimated time of the whole row (prepare, set-up, steps) on one H200
    table: tuple = ()           # the hardware table's row: (label, the tutorial's VRAM at M_BSZ 1 in MiB or a
                                # text, the target in MiB: 0.75x the tutorial's)

    def setup(self, devices: int | None = None) -> str:
        d = self.devices if devices is None else devices
        if self.kind == "parity":
            sides = ("bf16 deepspeed_stage_2 compile 1" if self.accelerator == "gpu" else "CPU fp32 (rehearsal)")
            return (f"M_BSZ {self.m_bsz}, ctx {self.ctx}, L{self.n_layer}-D{self.n_embd}, {self.steps} steps: "
                    f"{sides} vs fp32 --wkv_impl torch")
        unit = "GPU" if self.accelerator == "gpu" else "CPU process"
        where = f"{self.nodes} nodes x {d} {unit}" if self.nodes > 1 else (
            f"{d or 'every'} GPU" if self.accelerator == "gpu" else "CPU")
        steps = f"{self.train_s} s of tokens" if self.train_s else f"{self.steps} steps"
        extra = f", {' '.join(self.flags)}" if self.flags else ""
        prof = f", profile_steps {self.profile_steps}" if self.profile_steps else ""
        m = (f"the largest power of two that fits (planned from {self.plan_from}; else {self.m_bsz})"
             if self.plan_from else self.m_bsz)
        return (f"{where} x M_BSZ {m}, ctx {self.ctx}, L{self.n_layer}-D{self.n_embd}, GRAD_CP "
                f"{self.grad_cp}, {self.strategy} {self.precision}, compile {self.compile}, {steps}{prof}{extra}")


S = Scenario
_T = dict(kind="train")  # the tutorial's L12-D768 ctx 4096 bf16 deepspeed_stage_2 GRAD_CP 1 run, compiled
_STRATEGIES = [  # (name, strategy, precision): short runs of the other strategies and precisions
    ("strat-s1-bf16", "deepspeed_stage_1", "bf16"), ("strat-s3-bf16", "deepspeed_stage_3", "bf16"),
    ("strat-s2off-bf16", "deepspeed_stage_2_offload", "bf16"),
    ("strat-s3off-bf16", "deepspeed_stage_3_offload", "bf16"),
    ("strat-s2-fp16", "deepspeed_stage_2", "fp16"), ("strat-s2-tf32", "deepspeed_stage_2", "tf32"),
    ("strat-s2-fp32", "deepspeed_stage_2", "fp32"), ("strat-ddp-bf16", "ddp", "bf16"),
]
# The tutorial's hardware table (ctx 4096; its VRAM at M_BSZ 1, as it states them in MB = MiB): each size at
# M_BSZ 1 and at the largest power of two that fits, through the tutorial's scripts, bf16, GRAD_CP 1. 7B:
# deepspeed_stage_2 needs about 20 bytes per parameter (133.6 GiB) before the activations, more than the card
# has; with the optimiser offloaded the card holds 4 bytes per parameter (26.7 GiB) and the host 16 (106.9 GiB):
# benchmarks/README.md, "The hardware table". Each row fits one 600 s call (budget_s: the estimate, from a fresh
# machine: FusedAdam or CPU Adam built, the WKV kernel built, the first step compiled).
_HW = [  # (name, label, n_layer, n_embd, tutorial MiB (0: a text), strategy, steps, warmup, M_BSZ fallback,
         #  budget of the M_BSZ 1 row, of the larger row, host GiB)
    ("0.1b", "0.1B", 12, 768, 6540, "deepspeed_stage_2", 30, 10, 64, 180, 240, 0),
    ("0.4b", "0.4B", 24, 1024, 12414, "deepspeed_stage_2", 30, 10, 32, 200, 270, 0),
    ("1.5b", "1.5B", 24, 2048, 42104, "deepspeed_stage_2", 24, 8, 16, 240, 330, 0),
    ("3b", "3B", 32, 2560, 91354, "deepspeed_stage_2", 20, 6, 8, 300, 420, 0),
    ("7b", "7B", 32, 4096, 0, "deepspeed_stage_2_offload", 12, 3, 8, 420, 560, 116),
]
HW_TUTORIAL_TEXT = {"7b": "4 x RTX 4090: out of memory", "14b": "4 x RTX 4090: out of memory"}


def _hw_scenarios():
    out = []
    for name, label, L, C, mib, strat, steps, warm, m_fallback, b1, bm, host in _HW:
        # 3B and 7B: weight files only (--resume_states 0): an exact-resume state of 3B takes ~47 GB, of 7B ~100 GB
        # (bf16 weights + fp32 master weights + Adam's moments), against the 64 GiB disk of the benchmark machine
        flags = ("--resume_states", "0") if C >= 2560 else ()
        common = dict(kind="train", ctx=4096, n_layer=L, n_embd=C, strategy=strat, grad_cp=1, precision="bf16",
                      compile="1", steps=steps, warmup=warm, ab=False, host_gib=host, data=(20000, 30), flags=flags)
        tut = mib or HW_TUTORIAL_TEXT[name]
        target = round(0.75 * mib) if mib else 0
        fits = f"target <= {target} MiB (0.75x the tutorial's {mib} MB)" if mib else f"the tutorial: {tut}"
        off = " (optimiser offloaded: ~116 GiB host memory)" if "offload" in strat else ""
        out.append(S(f"hw-{name}-m1", what=f"the hardware table, {label} L{L}-D{C} at M_BSZ 1{off}: peak memory, "
                     f"kt/s, MFU, prepare and launch-to-first-step times; {fits}; ~{b1} s", m_bsz=1,
                     limit_s=b1, budget_s=b1, table=(label, tut, target), **common))
        out.append(S(f"hw-{name}-mmax", what=f"the hardware table, {label} L{L}-D{C} at the largest power-of-two "
                     f"M_BSZ that fits (planned from hw-{name}-m1's measured memory, else {m_fallback}){off}; ~{bm} s",
                     m_bsz=m_fallback, plan_from=f"hw-{name}-m1", limit_s=bm, budget_s=bm, table=(label, tut, 0),
                     **common))
    # 14B: stated as computed unless the host has the memory (stage_2_offload: 16 bytes per parameter of
    # 13.19B parameters = 196.6 GiB of host memory, beside 49.1 GiB of weights and gradients on the card)
    out.append(S("hw-14b-m1", what="the hardware table, 14B L61-D4096 at M_BSZ 1, deepspeed_stage_2_offload: runs "
                 "only on a host with >= 210 GiB of memory (one GPU of a larger machine); ~570 s", kind="train",
                 ctx=4096, n_layer=61, n_embd=4096, strategy="deepspeed_stage_2_offload", grad_cp=1,
                 precision="bf16", compile="1", steps=10, warmup=3, m_bsz=1, ab=False, host_gib=210,
                 flags=("--resume_states", "0"),
                 limit_s=570, budget_s=570, table=("14B", HW_TUTORIAL_TEXT["14b"], 0)))
    return out


SCENARIOS = {s.name: s for s in [
    *_hw_scenarios(),
    S("matmul", "matmul", "the card's bf16 matmul rate, 8192^3 (benchmarks/matmul_rate.py): the MFU "
      "denominator of the runs after it", ab=False, limit_s=120),
    S("kernels", "pytest", "GPU tests: the WKV CUDA kernel and DeepSpeed kill/resume "
      "(pytest tests/test_wkv_cuda.py tests/test_gpu_resume.py)",
      args=("tests/test_wkv_cuda.py", "tests/test_gpu_resume.py"), ab=False, limit_s=480),
    S("wkv", "wkv", "the WKV7 op alone, forward + backward, ours vs fla chunk_rwkv7, B16 T4096 H12 "
      "(benchmarks/bench_wkv.py)", args=("--fla-budget-s", "150"), limit_s=360),
    S("step-m16", "step", "one L12-D768 training step (forward + backward, no optimiser), eager vs compiled "
      "(benchmarks/bench_step.py)", m_bsz=16, args=("--modes", "eager", "compile", "--steps", "8"), limit_s=300),
    S("step-m8", "step", "one compiled L12-D768 step at M_BSZ 8 (benchmarks/bench_step.py)", m_bsz=8,
      args=("--modes", "compile", "--steps", "8"), limit_s=240),
    S("train-0.1b-m16", what="the tutorial's 0.1B run, M_BSZ 16 (profiled steps 11-13)", m_bsz=16, steps=40,
      profile_steps=3, ref=("H200", 160.0, 31.1), **_T),
    S("train-0.1b-m8", what="the tutorial's 0.1B run, M_BSZ 8", m_bsz=8, steps=40, ref=("H200", 107.0, 17.2), **_T),
    S("train-0.1b-m1", what="the tutorial's 0.1B run, M_BSZ 1 (the tutorial's H100 table row)", m_bsz=1,
      steps=60, limit_s=240, ref=("H100", 21.0, 6.57), **_T),
    S("train-0.1b-2gpu", what="2 GPUs x M_BSZ 16: scaling vs train-0.1b-m16 (target >= 1.8x), distinct "
      "windows per rank", gpus=2, devices=2, steps=30, dump_samples=True, compare="train-0.1b-m16", **_T),
    S("train-0.1b-2node", what="2 nodes on one host (NODE_RANK 0/1, MASTER_ADDR 127.0.0.1, one GPU each): "
      "rwkv-final.pth, distinct windows", gpus=2, nodes=2, steps=10, dump_samples=True, limit_s=300, **_T),
    *[S(n, what=f"{st} {pr}: M_BSZ 4, 10 steps (loss falls from ~11.25, rwkv-final.pth)", m_bsz=4, steps=10,
        strategy=st, precision=pr, compile="auto", limit_s=240, **_T) for n, st, pr in _STRATEGIES],
    S("train-0.1b-x060-m16", what="RWKV-6 (MODEL_TYPE x060) L12-D768 M_BSZ 16: beside train-0.1b-m16 (target: "
      "at least its kt/s at no more memory)", m_bsz=16, steps=40, flags=("--my_testing", "x060"), ab=False, **_T),
    S("kernels-x060", "pytest", "GPU tests: the WKV6 CUDA kernel (pytest tests/test_wkv6_cuda.py)",
      args=("tests/test_wkv6_cuda.py",), ab=False, limit_s=300),
    S("parity-x060", "parity", "loss parity of RWKV-6: bf16 DeepSpeed + WKV6 kernel + compile vs the fp32 PyTorch "
      "path; target: running-mean loss within 0.01", m_bsz=2, steps=200, flags=("--my_testing", "x060"),
      limit_s=540, ab=False),
    S("parity", "parity", "loss parity: bf16 DeepSpeed + CUDA kernel + compile vs the fp32 PyTorch path "
      "(--wkv_impl torch), same init and batches, both on one card at once (two cards where there are two); "
      "target: running-mean loss within 0.01", m_bsz=2, steps=200, limit_s=540),
    S("arith-0.1b", what="the RWKV-7-Arithmetic-0.1B run on every GPU: tokens for train_s seconds at the "
      "kt/s measured by train-0.1b-m16 (or --kts), data sized for it, then the held-out evaluation",
      devices=0, steps=0, train_s=420, eval_n=400, data=(0, 30), flags=("--epoch_save", "1"), limit_s=0,
      ab=False, **_T),
    S("cpu-smoke", what="a tiny CPU run through the same scripts (tests the driver; no GPU needed)", gpus=0,
      accelerator="cpu", precision="fp32", strategy="auto", compile="0", n_layer=2, n_embd=64, ctx=128,
      m_bsz=4, steps=12, grad_cp=0, data=(300, 4), limit_s=240, **_T),
]}
GROUPS = {
    "confirm": ["matmul", "train-0.1b-m8", "train-0.1b-m16"],
    "check": ["matmul", "kernels", "step-m16", "train-0.1b-m16", "train-0.1b-2gpu", "train-0.1b-2node"],
    "multi": ["train-0.1b-m16", "train-0.1b-2gpu", "train-0.1b-2node"],
    "strategies": [n for n, _, _ in _STRATEGIES],
    "hwtable": ["matmul"] + [f"hw-{h[0]}-{m}" for h in _HW for m in ("m1", "mmax")],
    **{f"hw-{h[0]}": [f"hw-{h[0]}-m1", f"hw-{h[0]}-mmax"] for h in _HW},
}
# dense bf16 tensor-core peaks (no sparsity), the MFU denominator when no matmul scenario ran
STATED_PEAKS = (("H200", 989.0, "NVIDIA H200 SXM datasheet"), ("H100 PCIe", 756.0, "NVIDIA H100 PCIe datasheet"),
                ("H100 NVL", 835.0, "NVIDIA H100 NVL datasheet"), ("H100", 989.0, "NVIDIA H100 SXM datasheet"),
                ("A100", 312.0, "NVIDIA A100 datasheet"), ("L40S", 362.0, "NVIDIA L40S datasheet"))
REF_TARGET = 1.25  # the speed target against the original trainer, at no more memory
# --chat: one conversation of the kinds the demo model learns, in wordings a new user might pick
CHAT_QUESTIONS = ("Compute 833 + 82", "Please compute six hundred fifteen plus nine hundred thirty-three.",
                  "Find x if x + 375 = 1177.", "What is -723 + (-636)?", "三百二十加四百五十等于多少？",
                  "12.5 - 3.75 = ?", "１２３＋４５６＝？", "贰佰叁拾肆减壹佰零伍等于几？")


def rehearsal(sc: Scenario) -> Scenario:
    """--rehearse: the scenario's launch on CPU, tiny (2 "GPUs" are CPU processes)."""
    return dataclasses.replace(
        sc, accelerator="cpu", precision="fp32", compile="0", n_layer=2, n_embd=64, ctx=128,
        m_bsz=min(sc.m_bsz, 2), steps=min(sc.steps, 12) if sc.steps else 12, train_s=0,
        data=(300, 4), eval_n=min(sc.eval_n, 8), devices=sc.devices or 1, profile_steps=0,
        strategy="ddp" if sc.devices > 1 else "auto", grad_cp=0, limit_s=300, host_gib=0.0,
        warmup=min(sc.warmup, WARMUP_STEPS))


# ---------------------------------------------------------------------------------------- helpers

class RunError(Exception):
    """A run that could not be made or failed: the message, and the log whose tail explains it."""

    def __init__(self, msg: str, log: Path | None = None):
        super().__init__(msg)
        self.log = log


class Interrupted(Exception):
    pass


def now_iso() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def rel(p) -> str:
    p = Path(p)
    try:
        return str(p.resolve().relative_to(REPO))
    except ValueError:
        return str(p)


def tail(path, n: int = 25) -> list:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [ln.rstrip()[:300] for ln in lines if ln.strip()][-n:]


def git(*a, cwd=REPO, strip=True) -> str | None:
    """A read-only git query (--no-optional-locks: the index is never written)."""
    try:
        r = subprocess.run(["git", "--no-optional-locks", *a], cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return (r.stdout.strip() if strip else r.stdout) if r.returncode == 0 else None


def tree_sha(root: Path) -> str:
    """sha256 (12 hex digits) of the library's source: rwkvlm/**/*.py and cuda/*, names and contents."""
    h = hashlib.sha256()
    files = sorted(p for p in (root / "rwkvlm").rglob("*.py"))
    if (root / "cuda").is_dir():
        files += sorted(p for p in (root / "cuda").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for p in files:
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def shell_line(argv, env_changes: dict | None = None, cwd: Path | None = None) -> str:
    """A command as one could type it in the repository root."""
    pre = " ".join(f"{k}={v if k == 'PYTHONPATH' and ' ' not in v else shlex.quote(v)}"
                   for k, v in (env_changes or {}).items())
    cmd = " ".join("python" if str(a) == sys.executable else shlex.quote(rel(a) if isinstance(a, Path) else str(a))
                   for a in argv)
    if cwd is not None and Path(cwd).resolve() != REPO:
        cmd = f"(cd {shlex.quote(rel(cwd))} && {cmd})"
    return f"{pre} {cmd}".strip()


def steady_state(rows: list, exclude=(), warmup: int = WARMUP_STEPS) -> tuple:
    """(median seconds per step, [first, last] step measured, steps measured) from loss_log.csv rows:
    a step's time is the time between its end and the previous step's; the first `warmup` (10) steps
    (fewer on a short run: all but 3) and the steps in `exclude` are left out."""
    skip = min(warmup, max(0, len(rows) - 3))
    dts, used = [], []
    for a, b in zip(rows[skip:], rows[skip + 1:]):
        if b["step"] == a["step"] + 1 and b["step"] not in exclude:
            dts.append(b["time"] - a["time"])
            used.append(b["step"])
    if not dts:
        return None, None, 0
    return statistics.median(dts), [used[0], used[-1]], len(dts)


def read_loss_log(path: Path) -> list:
    """loss_log.csv rows sorted by step (the last row of a repeated step wins)."""
    by_step = {}
    try:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                try:
                    by_step[int(r["step"])] = {"step": int(r["step"]), "tokens": int(r["tokens"]),
                                               "loss": float(r["loss"]), "time": float(r["time"])}
                except (KeyError, TypeError, ValueError):
                    continue
    except OSError:
        return []
    return [by_step[s] for s in sorted(by_step)]


def count_params(n_layer: int, n_embd: int, model_type: str = "x070") -> int | None:
    try:
        sys.path.insert(0, str(LIB))
        from rwkvlm.model import MODEL_TYPES

        _, config_cls, model_cls = MODEL_TYPES[model_type]
        return model_cls.count_params(config_cls(n_layer=n_layer, n_embd=n_embd))
    except Exception:
        return None
    finally:
        sys.path.remove(str(LIB))


def process_group_members(pgids: set) -> set:
    """Pids of the live (not zombie) processes in these process groups."""
    out = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = open(f"/proc/{d}/stat").read()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) in pgids and fields[0] not in ("Z", "X"):  # zombies are gone already
                out.add(int(d))
        except (OSError, ValueError, IndexError):
            continue
    return out


def rss_bytes(pid: int) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


class Sampler:
    """Peak memory while a run's process groups live: nvidia-smi, the whole card (memory.used of the
    cards, 0.2 s) and per process (compute apps of the run's processes, 0.5 s), and host RSS."""

    def __init__(self, cards: list, pgids: set, csv_path: Path):
        self.cards, self.pgids, self.csv_path = cards, pgids, csv_path
        self.card_peak, self.pid_peak, self.rss_peak = {}, {}, 0
        self.apps_seen, self.mine = False, {}
        self.stop_ev = threading.Event()
        self.procs, self.threads = [], []
        smi = shutil.which("nvidia-smi") if cards else None
        self.baseline = query_card_memory(cards) if smi else {}
        if smi:
            ids = ",".join(map(str, cards))
            self._stream([smi, "-i", ids, "--query-gpu=index,memory.used", "--format=csv,noheader,nounits",
                          "-lms", "200"], self._card_line, open(csv_path, "w"))
            self._stream([smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits",
                          "-lms", "500"], self._app_line, None)
        t = threading.Thread(target=self._rss_loop, daemon=True)
        t.start()
        self.threads.append(t)

    def _stream(self, argv, handle, copy_to):
        try:
            p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            return
        self.procs.append(p)

        def loop():
            for line in p.stdout:
                if copy_to is not None:
                    copy_to.write(line)
                handle([x.strip() for x in line.split(",")])
            if copy_to is not None:
                copy_to.close()

        t = threading.Thread(target=loop, daemon=True)
        t.start()
        self.threads.append(t)

    def _card_line(self, parts):
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            i, mib = int(parts[0]), int(parts[1])
            self.card_peak[i] = max(self.card_peak.get(i, 0), mib)

    def _app_line(self, parts):
        if len(parts) != 2 or not parts[0].isdigit() or not parts[1].isdigit():
            return
        self.apps_seen = True
        pid, mib = int(parts[0]), int(parts[1])
        if pid not in self.mine:  # whether this pid is one of the run's (checked once, while it lives)
            self.mine[pid] = pid in process_group_members(self.pgids)
        if self.mine[pid]:
            self.pid_peak[pid] = max(self.pid_peak.get(pid, 0), mib)

    def _rss_loop(self):
        while not self.stop_ev.wait(0.5):
            self.rss_peak = max(self.rss_peak, sum(rss_bytes(p) for p in process_group_members(self.pgids)))

    def stop(self) -> dict:
        self.stop_ev.set()
        for p in self.procs:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        for t in self.threads:
            t.join(5)
        out = {"host_rss_peak_gib": round(self.rss_peak / GIB, 2) if self.rss_peak else None}
        if self.card_peak:
            out["gpu_mem_card_peak_gib"] = round(max(self.card_peak.values()) / 1024, 2)
            out["gpu_mem_card_peak_mib"] = {str(k): v for k, v in sorted(self.card_peak.items())}
            out["gpu_mem_card_before_mib"] = {str(k): v for k, v in sorted(self.baseline.items())}
        if self.pid_peak:
            out["gpu_mem_process_peak_gib"] = round(max(self.pid_peak.values()) / 1024, 2)
            out["gpu_mem_processes_sum_gib"] = round(sum(self.pid_peak.values()) / 1024, 2)
        elif self.card_peak:
            out["gpu_mem_process_note"] = ("nvidia-smi listed no process of this run (another PID namespace?): "
                                           "whole-card figure only" if self.apps_seen else
                                           "nvidia-smi listed no compute processes: whole-card figure only")
        return out


def query_card_memory(cards) -> dict:
    out = {}
    try:
        r = subprocess.run(["nvidia-smi", "-i", ",".join(map(str, cards)), "--query-gpu=index,memory.used",
                            "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30)
        for line in r.stdout.splitlines():
            parts = [x.strip() for x in line.split(",")]
            if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                out[int(parts[0])] = int(parts[1])
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def append_text(path: Path, text: str) -> None:
    """Append `text` to `path` through a temporary file and a rename; what the file held is kept byte for
    byte (retried when someone else wrote it meanwhile)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(10):
        old = path.read_bytes() if path.exists() else b""
        sep = b"" if not old or old.endswith(b"\n\n") else (b"\n" if old.endswith(b"\n") else b"\n\n")
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(old + sep + text.encode())
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            shutil.copymode(path, tmp)
        if (path.read_bytes() if path.exists() else b"") != old:
            os.unlink(tmp)  # changed while we wrote: read it again
            time.sleep(0.2)
            continue
        os.replace(tmp, path)
        return
    raise RuntimeError(f"{path} kept changing; the section was not appended")


# ---------------------------------------------------------------------------------------- libraries

@dataclasses.dataclass
class Library:
    side: str        # "current" (this tree) or "base" (--base)
    path: Path       # the folder holding rwkvlm/
    scripts: Path    # the train_temp folder whose scripts run
    commit: str
    modified: list
    sha: str
    error: str = ""

    def as_dict(self) -> dict:
        return {"side": self.side, "path": rel(self.path), "scripts": rel(self.scripts), "commit": self.commit,
                "modified": self.modified, "rwkvlm_sha256": self.sha}


def resolve_library(side: str, folder, commit_override: str = "") -> Library:
    p = Path(folder).resolve()
    if (p / "RWKV-v7" / "rwkvlm").is_dir():
        p = p / "RWKV-v7"
    if not (p / "rwkvlm" / "__init__.py").is_file():
        raise SystemExit(f"error: --base {folder}: no rwkvlm package there (looked for {p}/rwkvlm/__init__.py "
                         f"and {p}/RWKV-v7/rwkvlm/). Give the folder that holds rwkvlm/, e.g. .base/RWKV-v7.")
    scripts = p / "train_temp" if (p / "train_temp" / "demo-training-run.sh").is_file() else LIB / "train_temp"
    commit, modified = commit_override, []
    top = git("rev-parse", "--show-toplevel", cwd=p)
    repo_top = git("rev-parse", "--show-toplevel")
    if top and (side == "current" or Path(top).resolve() != Path(repo_top or "/nonexistent").resolve()):
        commit = commit or git("rev-parse", "--short", "HEAD", cwd=p) or ""
        st = git("status", "--porcelain", "--", str(p), cwd=p, strip=False)
        modified = [ln[3:] for ln in (st or "").splitlines() if ln.strip()]
    if not commit:
        for f in (p / "COMMIT", p.parent / "COMMIT"):
            if f.is_file():
                commit = f.read_text().strip().split()[0] if f.read_text().strip() else ""
                break
    return Library(side, p, scripts, commit or "unknown", modified, tree_sha(p))


# ---------------------------------------------------------------------------------------- the driver

class Driver:
    def __init__(self, args, argv):
        self.args = args
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.call = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.date = now_iso()
        self.command = "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in argv)
        self.t0 = time.monotonic()
        self.rows = []
        self.log_f = open(self.out / "driver.log", "a")
        # the scripts run `python` (else python3) from PATH: make it the driver's own Python
        self.bindir = bindir = Path(tempfile.mkdtemp(prefix="bench-python-"))
        wrapper = bindir / "python"
        wrapper.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} \"$@\"\n")
        wrapper.chmod(0o755)
        self.py = sys.executable
        self.base_env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
                             PYTHONUNBUFFERED="1", NCCL_NVLS_ENABLE="0", WANDB_MODE="disabled",
                             CUDA_DEVICE_ORDER="PCI_BUS_ID")  # CUDA's card numbers = nvidia-smi's
        self.tflops, self.tflops_src = None, ""
        self.libs = []
        self.data_dir = Path(args.data_dir).resolve() if args.data_dir else self.out / "data"

    # ---- output
    def say(self, msg: str) -> None:
        line = f"=== {datetime.datetime.now():%H:%M:%S} {msg}"
        print(line, flush=True)
        self.log_f.write(line + "\n")
        self.log_f.flush()

    def info(self, msg: str) -> None:
        for line in str(msg).splitlines() or [""]:
            print(f"    {line}", flush=True)
            self.log_f.write(f"    {line}\n")
        self.log_f.flush()

    # ---- the machine
    def probe(self) -> None:
        code = ("import json, importlib.metadata as md, platform\n"
                "d = {'python': platform.python_version()}\n"
                "try:\n"
                "    import torch\n"
                "    d['torch'], d['cuda'] = torch.__version__, torch.version.cuda\n"
                "    d['gpus'] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] "
                "if torch.cuda.is_available() else []\n"
                "except Exception as e:\n"
                "    d['torch_error'], d['gpus'] = repr(e)[:300], []\n"
                "for m in ('pytorch-lightning', 'deepspeed'):\n"
                "    try: d[m] = md.version(m)\n"
                "    except Exception: d[m] = None\n"
                "print(json.dumps(d))\n")
        env = dict(self.base_env)
        env["PYTHONPATH"] = os.pathsep.join([str(LIB)] + [x for x in [env.get("PYTHONPATH")] if x])
        try:
            r = subprocess.run([self.py, "-c", code], env=env, capture_output=True, text=True, timeout=120)
            self.versions = json.loads(r.stdout.strip().splitlines()[-1])
        except (subprocess.SubprocessError, ValueError, IndexError, OSError) as e:
            self.versions = {"gpus": [], "probe_error": repr(e)[:300]}
        self.torch_gpus = self.versions.get("gpus", [])
        self.smi = []
        if shutil.which("nvidia-smi"):
            try:
                r = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total,driver_version",
                                    "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30)
                for line in r.stdout.splitlines():
                    parts = [x.strip() for x in line.split(",")]
                    if len(parts) == 4 and parts[0].isdigit():
                        self.smi.append({"index": int(parts[0]), "name": parts[1], "memory_mib": parts[2],
                                         "driver": parts[3]})
            except (OSError, subprocess.SubprocessError):
                pass
        n = len(self.torch_gpus)
        if self.args.cards:
            self.cards = [int(c) for c in self.args.cards.split(",") if c.strip()]
        else:
            self.cards = [c["index"] for c in self.smi][:n] if len(self.smi) >= n else list(range(n))
        self.ngpu = min(n, len(self.cards))
        if self.args.rehearse:
            self.ngpu, self.cards = 2, [0, 1]
        cpu = platform.processor() or platform.machine()
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        self.host = f"{cpu}, {cores} cores"

    def card_name(self, cards: list | None) -> str:
        """'1x NVIDIA H200 (143771 MiB, driver ...)' for these cards; the CPU for a CPU run."""
        if not cards or self.args.rehearse:
            return f"CPU: {self.host}" + (" (rehearsal of a GPU scenario)" if self.args.rehearse and cards else "")
        by_index = {c["index"]: c for c in self.smi}
        names = []
        for i, c in enumerate(cards):
            if c in by_index:
                s = by_index[c]
                names.append(f"{s['name']} ({s['memory_mib']} MiB, driver {s['driver']})")
            elif i < len(self.torch_gpus):
                names.append(self.torch_gpus[i])
            else:
                names.append(f"GPU {c}")
        uniq = sorted(set(names), key=names.index)
        return " + ".join(f"{names.count(u)}x {u}" for u in uniq)

    def machine(self) -> str:
        if self.ngpu and not self.args.rehearse:
            return self.card_name(self.cards[:self.ngpu])
        return f"CPU: {self.host}" + (" (rehearsal)" if self.args.rehearse else "")

    # ---- libraries and environment
    def lib_env(self, lib: Library, cards: list | None, cpu: bool = False) -> tuple:
        env = dict(self.base_env)
        env["PYTHONPATH"] = os.pathsep.join([str(lib.path)] + [x for x in [env.get("PYTHONPATH")] if x])
        changes = {}
        if cpu or self.args.rehearse:
            changes["CUDA_VISIBLE_DEVICES"] = ""
        elif cards:
            changes["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, cards))
        if lib.side == "base":
            changes["PYTHONPATH"] = f"{rel(lib.path)}:$PYTHONPATH"
        env.update({k: v for k, v in changes.items() if k != "PYTHONPATH"})
        return env, {k: v for k, v in changes.items()}

    def check_library(self, lib: Library) -> None:
        env, _ = self.lib_env(lib, None, cpu=True)
        r = subprocess.run([self.py, "-c", "import os, rwkvlm; print(os.path.dirname(os.path.abspath(rwkvlm.__file__)))"],
                           env=env, capture_output=True, text=True, timeout=120, cwd=str(lib.scripts))
        got = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
        if r.returncode != 0 or Path(got).resolve() != (lib.path / "rwkvlm").resolve():
            lib.error = (f"the {lib.side} library does not import from {lib.path / 'rwkvlm'}: "
                         f"python imports {got or r.stderr.strip()[-300:]}")

    # ---- launching
    def launch(self, procs: list, limit: float, watch=None) -> tuple:
        """Run [(argv, env, cwd, log)] together, each in its own process group; SIGTERM to the groups
        after `limit` s (SIGKILL 60 s later). Returns (return codes, wall seconds, timed out); a watch gets
        the memory its sampler measured."""
        handles = []
        for argv, env, cwd, log in procs:
            f = open(log, "w")
            p = subprocess.Popen([str(a) for a in argv], env=env, cwd=str(cwd), stdout=f, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
            handles.append((p, f))
        pgids = {p.pid for p, _ in handles}
        sampler = watch.start(pgids) if watch else None
        t0 = time.monotonic()
        timed_out, kill_at, give_up = False, None, None
        next_progress = t0 + self.args.progress_s
        try:
            while any(p.poll() is None for p, _ in handles) or process_group_members(pgids):
                now = time.monotonic()
                if all(p.poll() is not None for p, _ in handles) and kill_at is None:
                    kill_at = now + 30  # the scripts ended; what is left of their groups gets 30 s
                if limit and not timed_out and now - t0 > limit:
                    timed_out = True
                    self.info(f"time limit {limit:.0f} s reached: SIGTERM (the trainer saves and exits)")
                    self._signal(pgids, signal.SIGTERM)
                    kill_at = now + 60
                if kill_at is not None and now > kill_at and give_up is None:
                    self._signal(pgids, signal.SIGKILL)
                    give_up = now + 10
                if give_up is not None and now > give_up:
                    break
                if watch and now >= next_progress:
                    watch.progress(now - t0)
                    next_progress = now + self.args.progress_s
                time.sleep(0.25)
        except BaseException:
            self._signal(pgids, signal.SIGTERM)
            end = time.monotonic() + 30
            while process_group_members(pgids) and time.monotonic() < end:
                time.sleep(0.5)
            self._signal(pgids, signal.SIGKILL)
            raise
        finally:
            for _, f in handles:
                f.close()
            mem = sampler.stop() if sampler else {}
            if watch:
                watch.memory = mem
        return [p.returncode for p, _ in handles], time.monotonic() - t0, timed_out

    @staticmethod
    def _signal(pgids, sig):
        for g in pgids:
            try:
                os.killpg(g, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def remaining(self) -> float | None:
        if not self.args.budget:
            return None
        return self.args.budget - (time.monotonic() - self.t0) - 30

    def limit_for(self, sc: Scenario, want: float) -> float:
        lim = self.args.limit or want
        left = self.remaining()
        if left is not None:
            if left < 60:
                raise RunError(f"skipped: {left + 30:.0f} s left of --budget {self.args.budget:.0f} s")
            lim = min(lim, left)
        return lim

    # ---- data
    def ensure_data(self, docs: int, copies: int, ctx: int) -> dict:
        key = f"arith-{docs}x{copies}-ctx{ctx}"
        d = self.data_dir / key
        meta_p = d / "demo.meta.json"
        if meta_p.is_file() and (d / "demo.bin").is_file() and (d / "demo.idx").is_file():
            meta = json.loads(meta_p.read_text())
            self.info(f"data: reusing {rel(d)} ({meta['tokens']:,} tokens)")
        else:
            self.info(f"data: {docs} arithmetic dialogues x {copies} copies at ctx {ctx} -> {rel(d)}")
            tmp = d.with_name(d.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            env = dict(self.base_env)
            env["PYTHONPATH"] = os.pathsep.join([str(LIB)] + [x for x in [env.get("PYTHONPATH")] if x])
            log = tmp / "make_data.txt"
            with open(log, "w") as f:
                for argv in ([self.py, V5 / "make_arithmetic_data.py", "demo.jsonl", "--docs", docs, "--seed", 0],
                             [self.py, V5 / "make_data.py", "demo.jsonl", copies, ctx, "--seed", 0, "--no-progress"]):
                    f.write(f"$ {shell_line(argv)}\n")
                    f.flush()
                    r = subprocess.run([str(a) for a in argv], cwd=tmp, env=env, stdout=f, stderr=subprocess.STDOUT)
                    if r.returncode != 0:
                        raise RunError(f"making the data failed (rc {r.returncode})", log)
            (tmp / "demo.jsonl").unlink()
            shutil.rmtree(d, ignore_errors=True)
            os.replace(tmp, d)
            meta = json.loads(meta_p.read_text())
            self.info(f"data: {meta['tokens']:,} tokens, magic_prime {meta['magic_prime']}")
        meta["base"] = str(d / "demo")
        meta["key"] = key
        return meta

    # ---- rows
    def new_rundir(self, name: str) -> Path:
        d = self.out / name
        i = 2
        while d.exists():  # never over an earlier run's files
            d = self.out / f"{name}-{i}"
            i += 1
        d.mkdir(parents=True)
        return d

    def base_row(self, sc: Scenario, lib: Library | None, cards) -> dict:
        return {"scenario": sc.name, "kind": sc.kind, "what": sc.what, "date": now_iso(), "call": self.call,
                "status": "", "note": "", "card": self.card_name(cards), "host": self.host,
                "versions": {k: v for k, v in self.versions.items() if k != "gpus"},
                "library": lib.as_dict() if lib else None, "settings": {}, "command": "", "commands": [],
                "driver_command": self.command, "figures": {}, "run_dir": "", "rehearsal": bool(self.args.rehearse)}

    def write_row(self, row: dict) -> None:
        self.rows.append(row)
        line = json.dumps(row, ensure_ascii=False)
        with open(self.out / "results.jsonl", "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        if row.get("run_dir"):
            d = Path(row["run_dir"])
            d = d if d.is_absolute() else REPO / d
            if d.is_dir():
                (d / "row.json").write_text(json.dumps(row, ensure_ascii=False, indent=1) + "\n")

    def previous_rows(self) -> list:
        rows = []
        try:
            for line in open(self.out / "results.jsonl"):
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
        except OSError:
            pass
        return rows

    def find_row(self, scenario: str, lib: Library) -> dict | None:
        """The newest good row of `scenario` in OUTDIR/results.jsonl run with this library's code."""
        for r in reversed(self.previous_rows()):
            if (r.get("scenario") == scenario and r.get("status") == "ok" and r.get("library")
                    and r["library"].get("rwkvlm_sha256") == lib.sha and r.get("rehearsal") == bool(self.args.rehearse)):
                return r
        return None

    # ---- MFU
    def load_tflops(self) -> None:
        if self.args.tflops:
            self.tflops, self.tflops_src = self.args.tflops, "--tflops"
            return
        p = self.out / "matmul.json"
        if p.is_file() and self.ngpu:
            m = json.loads(p.read_text())
            if m.get("card") in self.torch_gpus:
                self.tflops, self.tflops_src = m["tflops"], f"matmul scenario, {m.get('date', '')[:16]}"

    def mfu_basis(self, card: str) -> tuple:
        if self.tflops:
            return self.tflops, f"measured {self.tflops:.0f} TFLOP/s ({self.tflops_src})"
        for key, tf, what in STATED_PEAKS:
            if key in card:
                return tf, f"stated peak {tf:.0f} TFLOP/s dense bf16 ({what}; no matmul scenario ran)"
        return None, "no MFU: no matmul rate measured and no stated peak for this card"

    # ---- the scenarios
    def run_all(self, names: list) -> None:
        self.probe()
        self.load_tflops()
        cur = resolve_library("current", LIB, self.args.commit)
        self.libs = [cur]
        if self.args.base:
            self.libs.append(resolve_library("base", self.args.base, self.args.base_commit))
        for lib in self.libs:
            self.check_library(lib)
        self.say(f"benchmarks/run.py: {' '.join(names)} -> {rel(self.out)}")
        self.info(f"machine: {self.machine()}" + ("" if self.machine().startswith("CPU") else f"; host {self.host}"))
        self.info("software: " + ", ".join(f"{k} {v}" for k, v in self.versions.items() if k != "gpus" and v))
        for lib in self.libs:
            self.info(f"library ({lib.side}): {rel(lib.path)}, commit {lib.commit}"
                      f"{' + uncommitted changes' if lib.modified else ''}, rwkvlm sha256 {lib.sha}, scripts "
                      f"{rel(lib.scripts)}" + (f"\n  ERROR: {lib.error}" if lib.error else ""))
        if self.tflops:
            self.info(f"MFU basis: {self.tflops:.0f} TFLOP/s ({self.tflops_src})")
        try:
            for name in names:
                sc = SCENARIOS[name]
                if self.args.rehearse:
                    if sc.kind not in ("train", "parity"):
                        self.skip(sc, "--rehearse rehearses the training scenarios only")
                        continue
                    sc = rehearsal(sc)
                if self.args.steps and sc.steps and not sc.train_s:
                    sc = dataclasses.replace(sc, steps=self.args.steps)
                if self.args.profile is not None and sc.kind == "train":
                    sc = dataclasses.replace(sc, profile_steps=self.args.profile)
                sides = self.libs if sc.ab else self.libs[:1]
                for lib in sides:
                    self.run_one(sc, lib)
        except Interrupted:
            self.say("interrupted: the rows so far are in results.jsonl; writing the section")

    def skip(self, sc: Scenario, why: str, lib: Library | None = None) -> None:
        self.say(f"{sc.name}: skipped: {why}")
        row = self.base_row(sc, lib, None)
        row.update(status="skipped", note=why, settings=dataclasses.asdict(sc))
        if not self.args.dry_run:
            self.write_row(row)

    def devices_of(self, sc: Scenario) -> int:
        """GPUs per node of a run: the scenario's, else every visible one (1 on a machine without)."""
        return sc.devices or max(self.ngpu, 1)

    def run_one(self, sc: Scenario, lib: Library) -> None:
        side = f" [{lib.side}: {rel(lib.path)}]" if len(self.libs) > 1 else ""
        gpu_train = sc.kind == "train" and sc.accelerator == "gpu"
        need = (sc.devices or 1) * sc.nodes if gpu_train else (sc.gpus if sc.accelerator == "gpu" else 0)
        cards_there, dry_note = self.cards, ""
        if need and self.ngpu < need:
            seen = f"{self.ngpu} visible to PyTorch" + ("" if self.versions.get("torch") else " (torch not importable)")
            if not self.args.dry_run:
                return self.skip(sc, f"needs {need} GPU{'s' if need > 1 else ''}, {seen}", lib)
            dry_note = f"(dry run: needs {need} GPU{'s' if need > 1 else ''}, {seen}; commands shown for cards 0..)"
            cards_there = list(range(max(need, 2)))
        if lib.error:
            return self.skip(sc, f"not run: {lib.error}", lib)
        devices = self.devices_of(sc)
        cards = (cards_there[:devices * sc.nodes] if gpu_train else cards_there[:need]) if need else []
        if sc.train_s and self.args.train_s:  # --train-s, --eval-n: the row's settings and setup say them
            sc = dataclasses.replace(sc, train_s=self.args.train_s)
        if sc.eval_n and self.args.eval_n:
            sc = dataclasses.replace(sc, eval_n=self.args.eval_n)
        row = self.base_row(sc, lib, cards)
        row["settings"] = dict(dataclasses.asdict(sc), devices=devices)
        row["setup"] = sc.setup(devices) if sc.kind in ("train", "parity") else " ".join(sc.args)
        self.say(f"{sc.name}{side}: {sc.what}")
        if dry_note:
            self.info(dry_note)
        name = sc.name + ("" if lib.side == "current" else ".base")
        rundir = self.out / name if self.args.dry_run else self.new_rundir(name)
        row["run_dir"] = rel(rundir)
        t0 = time.monotonic()
        try:
            if self.args.dry_run:
                row["status"] = "dry run"
            runner = {"train": self.run_train, "parity": self.run_parity, "matmul": self.run_matmul,
                      "pytest": self.run_pytest, "step": self.run_step, "wkv": self.run_wkv}[sc.kind]
            runner(sc, lib, cards, rundir, row)
        except RunError as e:
            row["status"] = "skipped" if str(e).startswith("skipped: ") else "failed"
            row["note"] = str(e).removeprefix("skipped: ")
            if e.log is not None:
                row["log_tail"] = tail(e.log, 30)
                row["log"] = rel(e.log)
        except (KeyboardInterrupt, Interrupted):
            row["status"], row["note"] = "interrupted", "the driver was stopped during this run"
            row["figures"]["wall_s"] = round(time.monotonic() - t0)
            self.write_row(row)
            raise Interrupted()
        row["figures"].setdefault("wall_s", round(time.monotonic() - t0))
        if self.args.dry_run:
            return
        self.write_row(row)
        self.report_row(row)

    def report_row(self, row: dict) -> None:
        if row["status"] in ("failed", "timeout", "incomplete"):
            self.info(f"{row['status'].upper()}: {row['note']}")
            if row.get("log_tail"):
                self.info(f"last lines of {row.get('log', 'the log')}:")
                for line in row["log_tail"][-20:]:
                    self.info("  | " + line)
        elif row["status"] == "skipped":
            self.info(f"skipped: {row['note']}")
        summary = summarize(row)
        if summary:
            self.info(f"{row['status']}: {summary}")

    # ---- kind: train
    def train_commands(self, sc, lib, meta, proj, rundir, exit_tokens, devices, extra_run=()):
        model = ["--n_layer", sc.n_layer, "--n_embd", sc.n_embd, "--ctx_len", sc.ctx]
        hw = ["--precision", sc.precision, "--strategy", sc.strategy, "--compile", sc.compile]
        more = list(sc.flags) + shlex.split(self.args.extra or "")
        prep = ["sh", lib.scripts / "demo-training-prepare.sh", "--proj_dir", proj, "--data_file", meta["base"],
                "--my_exit_tokens", meta["tokens"], "--magic_prime", meta["magic_prime"], "--random_seed", 0,
                *model, *hw, *more]
        run = ["sh", lib.scripts / "demo-training-run.sh", "--proj_dir", proj, "--data_file", meta["base"],
               "--my_exit_tokens", exit_tokens, "--magic_prime", meta["magic_prime"], "--wandb", "",
               "--micro_bsz", sc.m_bsz, "--grad_cp", sc.grad_cp, "--devices", devices, "--num_nodes", sc.nodes,
               "--ds_bucket_mb", 200, "--enable_progress_bar", "False", "--random_seed", 0, *model,
               "--accelerator", sc.accelerator, *hw]
        if sc.profile_steps:
            run += ["--profile_steps", sc.profile_steps]
        if sc.dump_samples:
            run += ["--dump_samples", rundir / "samples"]
        return prep, run + list(extra_run) + more

    def prepare(self, prep, env, rundir) -> float:
        """demo-training-prepare.sh; returns its wall time (s)."""
        self.info("demo-training-prepare.sh (rwkv-init.pth)")
        rcs, wall, timed_out = self.launch([(prep, env, REPO, rundir / "prepare.txt")], 600)
        if rcs[0] != 0 or timed_out:
            raise RunError(f"demo-training-prepare.sh failed (rc {rcs[0]})", rundir / "prepare.txt")
        return wall

    def host_memory_gib(self) -> float | None:
        try:
            for line in open("/proc/meminfo"):
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
        except (OSError, ValueError, IndexError):
            pass
        return None

    def plan_m_bsz(self, sc: Scenario) -> tuple:
        """(M_BSZ, how it was chosen) for a scenario with plan_from: the largest power of two (at most 128,
        dividing the 40320 samples of a mini-epoch) for which what the card held before a step plus M_BSZ
        times the measured memory per sample stays within 92% of the card less 1.5 GiB (nvidia-smi's whole
        process is PyTorch's allocations plus the CUDA context and workspaces). The per-sample figure is
        measured at M_BSZ 1 (rwkvlm.train.memory.MemoryProbe) and includes the step's fixed workspaces, so
        the plan errs small. Without a measured row: the scenario's m_bsz."""
        if self.args.m_bsz:
            return self.args.m_bsz, "--m-bsz"
        one = None
        for r in reversed(self.previous_rows()):
            if (r.get("scenario") == sc.plan_from and r.get("status") == "ok" and r.get("rehearsal") == bool(
                    self.args.rehearse) and (r.get("figures") or {}).get("cuda_memory")):
                one = r
                break
        if one is None:
            return sc.m_bsz, (f"the scenario's fallback {sc.m_bsz}: no {sc.plan_from} row with measured GPU memory "
                              f"in {rel(self.out)} (run {sc.plan_from} into the same OUTDIR first, or give --m-bsz)")
        mem = one["figures"]["cuda_memory"]
        room = 0.92 * mem["total"] - 1.5
        m = 1
        while (m * 2 <= 128 and 40320 % (m * 2) == 0 and mem["held"] + m * 2 * mem["per_sample"] <= room
               and mem["peak_optimizer"] <= room):
            m *= 2
        same = "" if one["library"]["rwkvlm_sha256"] == self.libs[0].sha else " (another version of the library)"
        return m, (f"{mem['held']:.1f} GiB held + M_BSZ x {mem['per_sample']:.2f} GiB per sample <= {room:.1f} GiB "
                   f"(92% of {mem['total']:.1f} GiB less 1.5), measured by {sc.plan_from} ({one['run_dir']}){same}")

    def run_train(self, sc: Scenario, lib: Library, cards, rundir: Path, row: dict) -> None:
        f = row["figures"]
        devices = self.devices_of(sc)
        world = devices * sc.nodes
        if sc.host_gib:
            have = self.host_memory_gib()
            if have is not None and have < sc.host_gib and not self.args.dry_run:
                raise RunError(f"skipped: needs about {sc.host_gib:.0f} GiB of host memory ({sc.strategy}: computed "
                               f"in benchmarks/README.md, the hardware table), this machine has {have:.0f} GiB")
        if sc.plan_from:
            m, why = self.plan_m_bsz(sc)
            sc = dataclasses.replace(sc, m_bsz=m)
            f["m_bsz_plan"] = why
            row["settings"]["m_bsz"] = m
            row["setup"] = dataclasses.replace(sc, plan_from="").setup(devices)
            self.info(f"M_BSZ {m}: {why}")
        f["m_bsz"], f["strategy"] = sc.m_bsz, sc.strategy
        tok_step = sc.m_bsz * world * sc.ctx
        docs, copies = sc.data
        if sc.train_s:  # plan the tokens from the measured speed
            kts = self.args.kts
            if not kts:
                one = self.find_row("train-0.1b-m16", lib)
                if not one or not one["figures"].get("kt_s_per_gpu"):
                    raise RunError("needs the kt/s of these GPUs: run train-0.1b-m16 into the same OUTDIR "
                                   "first, or give --kts (all GPUs together)")
                kts = 0.97 * world * one["figures"]["kt_s_per_gpu"]
                f["kts_planned_from"] = f"97% of {world} x {one['figures']['kt_s_per_gpu']} kt/s ({one['run_dir']})"
            train_s = sc.train_s
            exit_tokens = int(kts * 1000 * train_s) // tok_step * tok_step
            steps = exit_tokens // tok_step
            docs = self.args.docs or docs or max(20000, int(exit_tokens / copies / 80 * 1.15))  # ~80 tokens each
            limit = self.limit_for(sc, train_s + 150)
            f["kts_planned"], f["train_s_planned"] = round(kts, 1), train_s
        else:
            steps = sc.steps
            exit_tokens = steps * tok_step
            limit = self.limit_for(sc, sc.limit_s)
        if self.args.dry_run:
            meta = {"base": str(self.data_dir / f"arith-{docs}x{copies}-ctx{sc.ctx}" / "demo"),
                    "tokens": "TOKENS", "magic_prime": "PRIME"}
        else:
            meta = self.ensure_data(docs, copies, sc.ctx)
            f["data"] = {"path": rel(Path(meta["base"]).parent), "tokens": meta["tokens"], "documents": docs,
                         "copies": copies, "magic_prime": meta["magic_prime"]}
        proj = rundir / "proj"
        prep, run, procs = self.train_procs(sc, lib, cards, meta, proj, rundir, exit_tokens, devices)
        # the hardware table's rows draw rwkv-init.pth on the run's GPU (--init_device auto), the others on the
        # CPU as before (their inits stay comparable with earlier sections)
        penv, pchg = self.lib_env(lib, cards[:1] if sc.table else None, cpu=not sc.table or sc.accelerator == "cpu")
        row["commands"] = [shell_line(prep, pchg)] + [shell_line(p[0], p[4]) for p in procs]
        row["command"] = row["commands"][-1] if sc.nodes == 1 else " & ".join(row["commands"][1:])
        f["tokens_per_step"], f["steps_planned"] = tok_step, steps
        self.info(f"{dataclasses.replace(sc, plan_from='').setup(devices)}; {steps} steps of {tok_step:,} tokens; "
                  f"limit {limit:.0f} s")
        self.info("$ " + row["commands"][0])
        self.info("$ " + row["command"])
        if self.args.dry_run:
            return
        f["prepare_s"] = round(self.prepare(prep, penv, rundir), 1)
        m = re.search(r"init ([\d.]+) s, write ([\d.]+) s", (rundir / "prepare.txt").read_text(errors="replace"))
        if m:
            f["init_s"], f["write_s"] = float(m.group(1)), float(m.group(2))
        deadline = time.monotonic() + limit
        while True:
            cpu = sc.accelerator == "cpu"
            watch = Watch(self, proj, procs[0][3], steps, cards if not cpu else [], rundir / "gpu_mem.csv")
            launched = time.time()
            rcs, wall, timed_out = self.launch([p[:4] for p in procs], max(60.0, deadline - time.monotonic()), watch)
            f["rc"] = max(rcs, key=abs)
            f["wall_s"] = round(wall)
            f.update(watch.memory)
            self.train_figures(sc, proj, rundir, row, devices, tok_step, cards, launched=launched)
            oom = f["rc"] == 2 and "ran out of memory" in "\n".join(tail(procs[0][3], 60))
            if oom:
                f.setdefault("out_of_memory_at_m_bsz", []).append(sc.m_bsz)
            if not (oom and sc.plan_from and sc.m_bsz > 1 and deadline - time.monotonic() > 120):
                break
            # planned too large: half the M_BSZ, from the same rwkv-init.pth, in a fresh PROJ_DIR
            sc = dataclasses.replace(sc, m_bsz=sc.m_bsz // 2)
            self.info(f"out of memory at M_BSZ {sc.m_bsz * 2}: running again at M_BSZ {sc.m_bsz}")
            tok_step = sc.m_bsz * world * sc.ctx
            steps, exit_tokens = sc.steps, sc.steps * tok_step
            old_proj, proj = proj, rundir / f"proj-m{sc.m_bsz}"
            proj.mkdir()
            os.link(old_proj / "rwkv-init.pth", proj / "rwkv-init.pth")
            prep, run, procs = self.train_procs(sc, lib, cards, meta, proj, rundir, exit_tokens, devices,
                                                log_suffix=f"-m{sc.m_bsz}")
            row["commands"].append(shell_line(procs[0][0], procs[0][4]))
            row["command"] = row["commands"][-1]
            row["settings"]["m_bsz"] = f["m_bsz"] = sc.m_bsz
            row["setup"] = dataclasses.replace(sc, plan_from="").setup(devices)
            f["tokens_per_step"], f["steps_planned"] = tok_step, steps
        last = f.get("steps", 0)
        if timed_out:
            row["status"], row["note"] = "timeout", f"stopped by the time limit ({limit:.0f} s) at step {last} of {steps}"
        elif f["rc"] != 0:
            why = " (out of memory: see the log's last lines)" if f.get("out_of_memory_at_m_bsz") else ""
            row["status"], row["note"] = "failed", (f"demo-training-run.sh ended with rc {f['rc']} at step {last} of "
                                                    f"{steps}{why}")
        elif last < steps:
            row["status"], row["note"] = "incomplete", f"rc 0 but only {last} of {steps} steps logged"
        else:
            row["status"] = "ok"
        if row["status"] != "ok":
            row["log_tail"], row["log"] = tail(procs[0][3], 30), rel(procs[0][3])
        if sc.eval_n and (proj / "rwkv-final.pth").is_file():
            self.evaluate(sc, lib, cards, proj, rundir, row)
            if self.args.chat:
                self.chat(sc, lib, cards, proj, rundir, row)
        if not self.args.keep_weights:
            for p in list(rundir.rglob("*.pth")):
                p.unlink()
            for d in rundir.glob("proj*"):
                for sub in ("resume", "set-aside"):
                    shutil.rmtree(d / sub, ignore_errors=True)

    def train_procs(self, sc, lib, cards, meta, proj, rundir, exit_tokens, devices, log_suffix=""):
        """(prepare argv, run argv, [(argv, env, cwd, log, env changes)] one per node) of a training run."""
        prep, run = self.train_commands(sc, lib, meta, proj, rundir, exit_tokens, devices)
        cpu = sc.accelerator == "cpu"
        procs = []
        port = str(random.randint(20000, 40000))
        for node in range(sc.nodes):
            node_cards = cards[node * devices:(node + 1) * devices]
            env, chg = self.lib_env(lib, node_cards, cpu=cpu)
            if sc.nodes > 1:
                node_env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "NODE_RANK": str(node)}
                env.update(node_env)
                chg.update(node_env)
            log = rundir / (f"train-node{node}{log_suffix}.txt" if sc.nodes > 1 else f"train{log_suffix}.txt")
            procs.append((run, env, REPO, log, chg))
        return prep, run, procs

    def train_figures(self, sc, proj, rundir, row, devices, tok_step, cards, launched=None) -> None:
        f = row["figures"]
        rows = read_loss_log(proj / "loss_log.csv")
        f["steps"] = rows[-1]["step"] if rows else 0
        try:
            info = json.loads((proj / "train_config.json").read_text())
        except (OSError, ValueError):
            info = {}
        for key in ("train_start_s", "first_step_s", "cuda_memory"):  # the trainer's: from its process's start
            if info.get(key) is not None:
                f[f"trainer_{key}" if key != "cuda_memory" else key] = info[key]
        if not rows:
            return
        if launched is not None:  # from the launch of demo-training-run.sh to the end of the first step
            f["launch_to_first_step_s"] = round(rows[0]["time"] - launched, 1)
        f["tokens"] = rows[-1]["tokens"]
        f["loss_first"], f["loss_last"] = rows[0]["loss"], rows[-1]["loss"]
        f["loss_mean_last20"] = round(statistics.fmean(r["loss"] for r in rows[-20:]), 4)
        exclude = set(range(WARMUP_STEPS + 1, WARMUP_STEPS + sc.profile_steps + 2)) if sc.profile_steps else set()
        med, span, n = steady_state(rows, exclude, warmup=sc.warmup)
        if med:
            world = devices * sc.nodes
            kts = tok_step / med / 1e3
            f.update(step_ms=round(med * 1e3, 1), kt_s=round(kts, 1 if kts >= 10 else 3),
                     kt_s_per_gpu=round(kts / world, 1 if kts / world >= 10 else 3), tokens_per_s=round(kts * 1e3),
                     steady_steps=f"{span[0]}..{span[1]}", steady_n=n)
            if exclude:
                f["steady_left_out"] = (f"steps {min(exclude)}..{max(exclude)}: the {sc.profile_steps} profiled steps "
                                        f"and the one that writes profile.txt")
            flags = list(sc.flags) + shlex.split(self.args.extra or "")
            model_type = flags[flags.index("--my_testing") + 1] if "--my_testing" in flags[:-1] else "x070"
            params = count_params(sc.n_layer, sc.n_embd, model_type)
            f["params"] = params
            if params and sc.accelerator == "gpu" and not self.args.rehearse:
                tf, basis = self.mfu_basis(self.card_name(cards))
                f["mfu_basis"] = basis
                if tf:
                    f["mfu"] = round(6 * params * kts * 1e3 / world / (tf * 1e12), 4)
        prof = proj / "profile.txt"
        if prof.is_file():
            shutil.copy(prof, rundir / "profile.txt")
            m = re.search(r"peak allocated ([\d.]+) GiB, peak reserved ([\d.]+) GiB", prof.read_text(errors="replace"))
            if m:
                f["torch_peak_allocated_gib"], f["torch_peak_reserved_gib"] = float(m.group(1)), float(m.group(2))
        mem = f.get("gpu_mem_process_peak_gib") or f.get("gpu_mem_card_peak_gib")
        if sc.ref and mem and f.get("kt_s_per_gpu") and sc.ref[0] in row["card"]:
            card, rk, rg = sc.ref
            sp, mr = f["kt_s_per_gpu"] / rk, mem / rg
            f["vs_original"] = {"card": card, "kt_s": rk, "gib": rg, "speed": round(sp, 2), "memory": round(mr, 2),
                                "target": f">= {REF_TARGET}x the speed at no more memory",
                                "met": bool(sp >= REF_TARGET and mr <= 1.0)}
        if sc.dump_samples:
            starts = []
            for p in sorted(rundir.glob("samples.rank*.csv")):
                starts += [ln.split(",")[2] for ln in p.read_text().split() if ln.count(",") == 2]
            f["windows_drawn"], f["windows_distinct"] = len(starts), len(set(starts))
        if sc.nodes > 1:
            f["final_written"] = (proj / "rwkv-final.pth").is_file()
        if sc.compare and f.get("kt_s_per_gpu"):
            one = next((r for r in reversed(self.rows) if r["scenario"] == sc.compare and r["status"] == "ok"
                        and r["library"] == row["library"]), None) or self.find_row(sc.compare, self.lib_of(row))
            if one and one["figures"].get("kt_s"):
                world = devices * sc.nodes
                x = f["kt_s"] / one["figures"]["kt_s"]
                f["scaling"] = {"vs": sc.compare, "vs_kt_s": one["figures"]["kt_s"], "x": round(x, 2),
                                "ideal": world, "target": round(0.9 * world, 2), "met": bool(x >= 0.9 * world),
                                "vs_run": one["run_dir"]}
            else:
                f["scaling"] = {"vs": sc.compare, "note": f"no {sc.compare} row with this library in this OUTDIR: "
                                                          f"run {sc.compare} first for the scaling figure"}

    def lib_of(self, row) -> Library:
        return next(lb for lb in self.libs if lb.side == row["library"]["side"])

    def tool(self, name, sc, lib, cards, proj) -> tuple:
        """(argv start, env, env changes) of one of the library's tools (evaluate.py, chat.py: the
        library's own where it has one) on PROJ_DIR/rwkv-final.pth, on the run's first card or the CPU."""
        script = lib.path / name if (lib.path / name).is_file() else LIB / name
        cpu = sc.accelerator == "cpu"
        env, chg = self.lib_env(lib, cards[:1], cpu=cpu)
        return [self.py, script, proj / "rwkv-final.pth", "--device", "cpu" if cpu else "cuda"], env, chg

    def evaluate(self, sc, lib, cards, proj, rundir, row) -> None:
        argv, env, chg = self.tool("evaluate.py", sc, lib, cards, proj)
        argv += ["--n", sc.eval_n, "--json", rundir / "eval.json"]
        row["commands"].append(shell_line(argv, chg))
        f = row["figures"]
        try:
            limit = self.limit_for(sc, 600)
        except RunError as e:
            f["eval"] = {"note": f"evaluation {e}"}
            return
        self.info(f"evaluating rwkv-final.pth on {sc.eval_n} held-out items")
        rcs, _, _ = self.launch([(argv, env, REPO, rundir / "eval.txt")], limit)
        try:
            ck = json.loads((rundir / "eval.json").read_text())["checkpoints"][0]
            f["eval"] = {"n": ck["overall"]["n"], "correct": ck["overall"]["correct"],
                         "accuracy": ck["overall"]["accuracy"], "restated": ck["overall"].get("restated"),
                         "by_kind": {k: v["accuracy"] for k, v in ck["by_kind"].items()},
                         "by_split": {name: {"n": part["overall"]["n"], "accuracy": part["overall"]["accuracy"],
                                             "restated": part["overall"].get("restated"),
                                             "by_kind": {k: v["accuracy"] for k, v in part["by_kind"].items()}}
                                      for name, part in ck.get("by_split", {}).items()}}
        except (OSError, ValueError, KeyError, IndexError):
            f["eval"] = {"rc": rcs[0], "note": "no eval.json", "log_tail": tail(rundir / "eval.txt", 10)}

    def chat(self, sc, lib, cards, proj, rundir, row) -> None:
        """--chat: CHAT_QUESTIONS piped into chat.py (greedy) as one conversation; the transcript
        goes to RUNDIR/chat.txt and the row."""
        argv, env, chg = self.tool("chat.py", sc, lib, cards, proj)
        argv += ["--temperature", "0", "--max_tokens", "60"]
        questions = "".join(q + "\n" for q in CHAT_QUESTIONS)
        row["commands"].append(f"printf '%s\\n' {' '.join(shlex.quote(q) for q in CHAT_QUESTIONS)} | "
                               + shell_line(argv, chg))
        self.info(f"chat.py: {len(CHAT_QUESTIONS)} questions, one conversation")
        try:
            r = subprocess.run([str(a) for a in argv], input=questions, env=env, cwd=REPO, capture_output=True,
                               text=True, timeout=300)
            text, rc = r.stdout + r.stderr, r.returncode
        except subprocess.TimeoutExpired as e:  # its output so far comes as bytes
            out = e.stdout or b""
            text, rc = out.decode("utf-8", "replace") if isinstance(out, bytes) else out, "timeout"
        (rundir / "chat.txt").write_text(text)
        row["figures"]["chat"] = {"rc": rc, "transcript": rel(rundir / "chat.txt"), "text": text}

    # ---- kind: parity
    def run_parity(self, sc: Scenario, lib: Library, cards, rundir: Path, row: dict) -> None:
        f = row["figures"]
        limit = self.limit_for(sc, sc.limit_s)
        meta = (self.ensure_data(*sc.data, sc.ctx) if not self.args.dry_run else
                {"base": "DATA", "tokens": "TOKENS", "magic_prime": "PRIME"})
        exit_tokens = sc.steps * sc.m_bsz * sc.ctx
        bf, fp = rundir / "bf16", rundir / "fp32"
        model = ["--n_layer", sc.n_layer, "--n_embd", sc.n_embd, "--ctx_len", sc.ctx]
        more = list(sc.flags) + shlex.split(self.args.extra or "")
        gpu = not self.args.rehearse
        prep = ["sh", lib.scripts / "demo-training-prepare.sh", "--proj_dir", bf, "--data_file", meta["base"],
                "--my_exit_tokens", exit_tokens, "--magic_prime", meta["magic_prime"], "--random_seed", 1,
                "--compile", "1" if gpu else "0", *model, *more]
        common = ["--data_file", meta["base"], "--my_exit_tokens", exit_tokens, "--magic_prime", meta["magic_prime"],
                  "--micro_bsz", sc.m_bsz, "--wandb", "", "--enable_progress_bar", "False", "--random_seed", 1,
                  "--warmup_steps", 10, *model]
        hw_bf = (["--precision", "bf16", "--strategy", "deepspeed_stage_2", "--compile", "1"] if gpu else
                 ["--accelerator", "cpu", "--precision", "fp32", "--strategy", "auto", "--compile", "0"])
        hw_fp = ["--precision", "fp32", "--strategy", "auto", "--wkv_impl", "torch", "--compile", "0", "--grad_cp", "0"]
        if not gpu:
            hw_fp = ["--accelerator", "cpu"] + hw_fp
        run_bf = ["sh", lib.scripts / "demo-training-run.sh", "--proj_dir", bf, *common, *hw_bf, *more]
        run_fp = ["sh", lib.scripts / "demo-training-run.sh", "--proj_dir", fp, *common, *hw_fp, *sc.flags]
        c_bf = cards[:1]
        c_fp = ([c for c in self.cards[:self.ngpu] if c not in c_bf][:1] or c_bf) if gpu else []
        (env_bf, ch_bf), (env_fp, ch_fp) = self.lib_env(lib, c_bf, cpu=not gpu), self.lib_env(lib, c_fp, cpu=not gpu)
        penv, pchg = self.lib_env(lib, None, cpu=True)
        row["commands"] = [shell_line(prep, pchg), f"cp {rel(bf)}/rwkv-init.pth {rel(fp)}/",
                           shell_line(run_bf, ch_bf), shell_line(run_fp, ch_fp)]
        row["command"] = " & ".join(row["commands"][2:])
        where = f"bf16 side on card {c_bf[0]}, fp32 side on card {c_fp[0]}" if gpu else "both sides on CPU"
        self.info(f"{sc.setup()}; {where}, at once; limit {limit:.0f} s")
        for c in row["commands"][2:]:
            self.info("$ " + c)
        if self.args.dry_run:
            return
        self.prepare(prep, penv, rundir)
        fp.mkdir(parents=True, exist_ok=True)
        shutil.copy(bf / "rwkv-init.pth", fp / "rwkv-init.pth")
        watch = Watch(self, fp, rundir / "fp32.txt", sc.steps, sorted(set(c_bf + c_fp)) if gpu else [],
                      rundir / "gpu_mem.csv")
        rcs, wall, timed_out = self.launch([(run_bf, env_bf, REPO, rundir / "bf16.txt"),
                                            (run_fp, env_fp, REPO, rundir / "fp32.txt")], limit, watch)
        f["rc_bf16"], f["rc_fp32"], f["rc"], f["wall_s"] = rcs[0], rcs[1], max(rcs, key=abs), round(wall)
        f.update(watch.memory)
        sys.path.insert(0, str(BENCH))
        from loss_parity import running_mean

        sys.path.remove(str(BENCH))
        for side, proj in (("bf16", bf), ("fp32", fp)):
            rows = read_loss_log(proj / "loss_log.csv")
            if (proj / "loss_log.csv").is_file():
                shutil.copy(proj / "loss_log.csv", rundir / f"{side}.csv")
            med, _, _ = steady_state(rows)
            f[f"steps_{side}"] = rows[-1]["step"] if rows else 0
            f[f"step_s_{side}"] = round(med, 3) if med else None
            f[f"loss_step1_{side}"] = rows[0]["loss"] if rows else None
        try:
            ma = running_mean(bf / "loss_log.csv", sc.steps)
            mb = running_mean(fp / "loss_log.csv", sc.steps)
        except (OSError, KeyError, ValueError):
            ma = mb = []
        n = min(len(ma), len(mb))
        f["steps_compared"] = n
        if n:
            f["running_mean"] = {str(s): [round(ma[s - 1], 4), round(mb[s - 1], 4), round(ma[s - 1] - mb[s - 1], 4)]
                                 for s in (10, 50, 100, 150, 200) if s <= n}
            f["final_diff"] = round(abs(ma[n - 1] - mb[n - 1]), 4)
            f["max_diff_from_step20"] = round(max(abs(x - y) for x, y in zip(ma[19:n], mb[19:n])), 4) if n > 20 else None
            f["target"], f["met"] = 0.01, bool(f["final_diff"] <= 0.01 and (f["max_diff_from_step20"] or 0) <= 0.01)
        if timed_out:
            row["status"], row["note"] = "timeout", f"stopped by the time limit ({limit:.0f} s) after {n} steps"
        elif f["rc"] != 0:
            row["status"], row["note"] = "failed", f"rc bf16 {rcs[0]}, fp32 {rcs[1]}"
            row["log"] = rel(rundir / ("bf16.txt" if rcs[0] else "fp32.txt"))
            row["log_tail"] = tail(REPO / row["log"], 30)
        elif n < sc.steps:
            row["status"], row["note"] = "incomplete", f"{n} of {sc.steps} steps compared"
        else:
            row["status"] = "ok"
        if not self.args.keep_weights:
            for p in list(rundir.rglob("*.pth")):
                p.unlink()
            for d in (bf / "resume", fp / "resume"):
                shutil.rmtree(d, ignore_errors=True)

    # ---- tools
    def run_tool(self, sc, lib, cards, rundir, row, argv, limit) -> str:
        env, chg = self.lib_env(lib, cards[:1])
        row["command"] = shell_line(argv, chg)
        row["commands"] = [row["command"]]
        self.info("$ " + row["command"])
        if self.args.dry_run:
            return ""
        log = rundir / "out.txt"
        rcs, wall, timed_out = self.launch([(argv, env, REPO, log)], self.limit_for(sc, limit), ToolWatch(self, log))
        row["figures"].update(rc=rcs[0], wall_s=round(wall))
        row["log"] = rel(log)
        text = log.read_text(errors="replace")
        if timed_out:
            row["status"], row["note"] = "timeout", f"stopped by the time limit ({limit:.0f} s)"
        elif rcs[0] != 0:
            row["status"], row["note"] = "failed", f"rc {rcs[0]}"
        else:
            row["status"] = "ok"
        if row["status"] != "ok":
            row["log_tail"] = tail(log, 30)
        return text

    def run_matmul(self, sc, lib, cards, rundir, row) -> None:
        text = self.run_tool(sc, lib, cards, rundir, row, [self.py, BENCH / "matmul_rate.py"], sc.limit_s)
        m = re.search(r"^(.*): bf16 matmul (\d+)\^3: ([\d.]+) TFLOP/s", text, re.M)
        if m:
            self.tflops, self.tflops_src = float(m.group(3)), f"matmul scenario, {row['date'][:16]}"
            row["figures"].update(tflops=self.tflops, n=int(m.group(2)), device=m.group(1))
            (self.out / "matmul.json").write_text(json.dumps(
                {"tflops": self.tflops, "card": m.group(1), "date": row["date"], "run_dir": row["run_dir"]}) + "\n")
        elif row["status"] == "ok":
            row["status"], row["note"] = "failed", "no TFLOP/s figure in matmul_rate.py's output"

    def run_pytest(self, sc, lib, cards, rundir, row) -> None:
        text = self.run_tool(sc, lib, cards, rundir, row,
                             [self.py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *sc.args], sc.limit_s)
        lines = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
        if lines:
            counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed)",
                                                         lines[-1])}
            m = re.search(r"in ([\d.]+)s", lines[-1])
            row["figures"].update(tests=counts, tests_s=float(m.group(1)) if m else None,
                                  summary=lines[-1].strip("= "))

    def run_step(self, sc, lib, cards, rundir, row) -> None:
        argv = [self.py, BENCH / "bench_step.py", "--bsz", sc.m_bsz, *sc.args, "--json", rundir / "step.json"]
        if self.tflops:
            argv += ["--tflops", self.tflops]
        text = self.run_tool(sc, lib, cards, rundir, row, argv, sc.limit_s)
        modes, host = {}, None
        for line in text.splitlines():
            m = re.search(r"host time to issue one step \(median\): ([\d.]+) ms", line)
            if m:
                host = float(m.group(1))
            m = re.match(r"M_BSZ\s+(\d+) (\w+)\s*: +([\d.]+) ms/step .*?([\d.]+) kt/s, peak allocated +([\d.]+) GiB"
                         r"(?:, warm-up (\d+) s)?(?:, MFU ([\d.]+)%)?", line.strip())
            if m:
                modes[m.group(2)] = {"ms": float(m.group(3)), "kt_s": float(m.group(4)),
                                     "peak_allocated_gib": float(m.group(5)), "host_issue_ms": host,
                                     "mfu": float(m.group(7)) / 100 if m.group(7) else None}
        if modes:
            row["figures"]["modes"] = modes
            best = modes.get("compile") or next(iter(modes.values()))
            row["figures"].update(step_ms=best["ms"], kt_s=best["kt_s"], torch_peak_allocated_gib=best["peak_allocated_gib"])

    def run_wkv(self, sc, lib, cards, rundir, row) -> None:
        text = self.run_tool(sc, lib, cards, rundir, row, [self.py, BENCH / "bench_wkv.py", *sc.args], sc.limit_s)
        m = re.search(r"ours default: fwd ([\d.]+) ms, fwd\+bwd ([\d.]+) ms", text)
        if m:
            row["figures"].update(fwd_ms=float(m.group(1)), fwd_bwd_ms=float(m.group(2)))
        table, on = [], False
        for line in text.splitlines():
            if line.startswith("| B") and "forward ms" in line:
                on, table = True, []
            elif on and line.startswith("|") and not line.startswith("|---"):
                cells = [c.strip() for c in line.strip("|").split("|")]
                if len(cells) == 3:
                    table.append(cells)
            elif on and not line.startswith("|"):
                on = False
        if table:
            row["figures"]["table"] = table


class ToolWatch:
    """Progress lines while a tool runs: its output's last line."""

    def __init__(self, drv: Driver, log: Path):
        self.drv, self.log, self.memory = drv, log, {}

    def start(self, pgids):
        return None

    def progress(self, elapsed: float) -> None:
        last = tail(self.log, 1)
        self.drv.info(f"{elapsed:4.0f} s{': ' + last[0][:150] if last else ''}")


class Watch:
    """Progress lines while a training run lives, and its memory sampler."""

    def __init__(self, drv: Driver, proj: Path, log: Path, steps: int, cards, mem_csv: Path):
        self.drv, self.proj, self.log, self.steps, self.cards, self.mem_csv = drv, proj, log, steps, cards, mem_csv
        self.memory = {}

    def start(self, pgids):
        return Sampler(self.cards, pgids, self.mem_csv)

    def progress(self, elapsed: float) -> None:
        rows = read_loss_log(self.proj / "loss_log.csv")
        if rows:
            r = rows[-1]
            dt = (rows[-1]["time"] - rows[-6]["time"]) / 5 if len(rows) > 6 else None
            speed = f", {r['tokens'] / r['step'] / dt / 1e3:.1f} kt/s (last 5 steps)" if dt else ""
            self.drv.info(f"{elapsed:4.0f} s: step {r['step']}/{self.steps}, loss {r['loss']:.4f}{speed}")
        else:
            last = tail(self.log, 1)
            self.drv.info(f"{elapsed:4.0f} s: starting{': ' + last[0][:150] if last else ''}")


# ---------------------------------------------------------------------------------------- the section

def gib(x) -> str:
    return f"{x:.2f} GiB" if isinstance(x, (int, float)) else "-"


def mem_text(f: dict) -> str:
    if f.get("gpu_mem_process_peak_gib") is not None:
        return f"{gib(f['gpu_mem_process_peak_gib'])} (process; card {gib(f.get('gpu_mem_card_peak_gib'))})"
    if f.get("gpu_mem_card_peak_gib") is not None:
        before = sum((f.get("gpu_mem_card_before_mib") or {}).values())
        return f"{gib(f['gpu_mem_card_peak_gib'])} (card{f', {before} MiB in use before' if before else ''})"
    if f.get("host_rss_peak_gib") is not None:
        return f"host RSS {gib(f['host_rss_peak_gib'])}"
    return "-"


def mem_value(f: dict):
    return f.get("gpu_mem_process_peak_gib") or f.get("gpu_mem_card_peak_gib") or f.get("host_rss_peak_gib")


def summarize(row: dict) -> str:
    """One line of a row's main figures."""
    f, k = row["figures"], row["kind"]
    if k == "train" and f.get("kt_s"):
        s = (f"{f['kt_s']} kt/s ({f['kt_s_per_gpu']} per GPU), {f['step_ms']} ms/step (steps {f['steady_steps']}), "
             f"MFU {f['mfu']:.1%}" if f.get("mfu") is not None else
             f"{f['kt_s']} kt/s ({f['kt_s_per_gpu']} per GPU), {f['step_ms']} ms/step (steps {f['steady_steps']})")
        s += f", peak memory {mem_text(f)}"
        if f.get("torch_peak_allocated_gib"):
            s += f", torch peak allocated {gib(f['torch_peak_allocated_gib'])}"
        s += f", loss {f['loss_first']:.4f} -> {f['loss_last']:.4f}"
        if f.get("vs_original"):
            v = f["vs_original"]
            s += (f"; vs the original trainer on an {v['card']} ({v['kt_s']} kt/s at {v['gib']} GiB): "
                  f"{v['speed']}x / {v['memory']}x ({'met' if v['met'] else 'NOT met'})")
        if f.get("scaling", {}).get("x"):
            sc = f["scaling"]
            s += f"; {sc['x']}x the kt/s of {sc['vs']} (target >= {sc['target']}x: {'met' if sc['met'] else 'NOT met'})"
        if "windows_drawn" in f:
            s += f"; {f['windows_drawn']} windows drawn, {f['windows_distinct']} distinct"
        if "final_written" in f:
            s += f"; rwkv-final.pth {'written' if f['final_written'] else 'MISSING'}"
        if f.get("eval", {}).get("accuracy") is not None:
            e = f["eval"]
            s += f"; held-out exact match {e['accuracy']}% ({e['correct']}/{e['n']})"
        return s
    if k == "train" and "steps" in f:
        return f"{f.get('steps', 0)} steps logged"
    if k == "parity" and f.get("steps_compared"):
        worst = f.get("max_diff_from_step20")
        means = "; ".join(f"step {k}: {a:.4f} vs {b:.4f} ({d:+.4f})" for k, (a, b, d) in f.get("running_mean", {}).items())
        return (f"{f['steps_compared']} steps compared, running-mean loss bf16 vs fp32: {means}; final difference "
                f"{f.get('final_diff')}" + (f", largest from step 20 {worst}" if worst is not None else "")
                + f" (target <= 0.01: {'met' if f.get('met') else 'NOT met'}); step 1 loss {f.get('loss_step1_bf16')} "
                f"vs {f.get('loss_step1_fp32')}; s/step bf16 {f.get('step_s_bf16')}, fp32 {f.get('step_s_fp32')} "
                f"(both sides at once)")
    if k == "matmul" and f.get("tflops"):
        return f"{f['device']}: bf16 matmul {f['n']}^3 {f['tflops']:.0f} TFLOP/s"
    if k == "pytest" and f.get("summary"):
        return f["summary"]
    if k == "step" and f.get("modes"):
        return "; ".join(f"{m}: {v['ms']} ms/step, {v['kt_s']} kt/s, peak allocated {v['peak_allocated_gib']} GiB, "
                         f"host issue {v['host_issue_ms']} ms" for m, v in f["modes"].items())
    if k == "wkv" and f.get("fwd_bwd_ms"):
        return f"ours: forward {f['fwd_ms']} ms, forward + backward {f['fwd_bwd_ms']} ms" + "".join(
            f"; {c[0]}: {c[1]} / {c[2]} ms" for c in f.get("table", []) if not c[0].startswith("ours"))
    return ""


def hw_table(rows: list) -> str:
    """The hardware table (the tutorial's beside ours) of the hw-* rows: the newest row of each scenario,
    in the order of SCENARIOS; markdown, for README.md's "Model size and VRAM"."""
    newest = {}
    for r in rows:
        if r.get("scenario") in SCENARIOS and SCENARIOS[r["scenario"]].table and r.get("status") != "dry run":
            if r["status"] == "ok" or newest.get(r["scenario"], {}).get("status") != "ok":
                newest[r["scenario"]] = r
    if not newest:
        return ""
    out = ["| model | N_LAYER-N_EMBD | parameters | the tutorial's VRAM (M_BSZ 1) | strategy | M_BSZ | ours: peak GPU "
           "memory (nvidia-smi, whole process) | target (0.75x the tutorial's) | kt/s | MFU | host RSS peak | "
           "prepare (rwkv-init.pth) | launch to the end of step 1 | status | commit |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, sc in SCENARIOS.items():
        r = newest.get(name)
        if r is None:
            continue
        f, (label, tut, target) = r["figures"], sc.table
        tut_s = f"{tut} MB" if isinstance(tut, int) else tut
        mem = f.get("gpu_mem_process_peak_gib") or f.get("gpu_mem_card_peak_gib")
        mem_s = f"{mem:.2f} GiB ({mem * 1024:.0f} MiB)" if mem else "-"
        if target and mem:
            tgt = f"<= {target} MiB: {'met' if mem * 1024 <= target else 'NOT met'}"
        else:
            tgt = f"<= {target} MiB" if target else ("fits one card" if sc.m_bsz == 1 and not sc.plan_from else "-")
        mfu = f"{f['mfu']:.1%}" if f.get("mfu") is not None else "-"
        host = f"{f['host_rss_peak_gib']:.1f} GiB" if f.get("host_rss_peak_gib") else "-"
        prep = f"{f['prepare_s']:.0f} s" if f.get("prepare_s") else "-"
        if f.get("init_s") is not None:
            prep += f" (init {f['init_s']:.0f} s, write {f['write_s']:.0f} s)"
        first = f"{f['launch_to_first_step_s']:.0f} s" if f.get("launch_to_first_step_s") is not None else "-"
        if f.get("trainer_train_start_s") is not None:
            first += f" (set-up {f['trainer_train_start_s']:.0f} s)"
        params = f"{f['params'] / 1e9:.2f}B" if f.get("params") else "-"
        status = r["status"] + (f": {r['note']}" if r["status"] != "ok" and r.get("note") else "")
        lib = (r.get("library") or {}).get("commit", "-")
        out.append(f"| {label} | L{sc.n_layer}-D{sc.n_embd} | {params} | {tut_s if sc.m_bsz == 1 and not sc.plan_from else '-'} "
                   f"| {f.get('strategy', sc.strategy)} | {f.get('m_bsz', r['settings'].get('m_bsz'))} | {mem_s} | {tgt} "
                   f"| {f.get('kt_s', '-')} | {mfu} | {host} | {prep} | {first} | {status} | {lib} |")
    return "\n".join(out) + "\n"


def pct(a, b) -> str:
    return f" ({(b - a) / a:+.1%})" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else ""


def lib_text(lib: dict) -> str:
    if not lib:
        return "-"
    c = lib["commit"] if lib["commit"] != "unknown" else "commit unknown"
    mod = f" + uncommitted changes to {len(lib['modified'])} file(s)" if lib.get("modified") else ""
    return f"{lib['path']} ({c}{mod}, rwkvlm sha256 {lib['rwkvlm_sha256']}; scripts {lib['scripts']})"


def section(rows: list, results_note: str = "") -> str:
    """The markdown section of one call's rows."""
    if not rows:
        return ""
    first = rows[0]
    date = first["date"][:16].replace("T", " ")
    libs = {}
    for r in rows:
        if r.get("library"):
            libs.setdefault(r["library"]["side"], r["library"])
    ab = "base" in libs
    names = sorted(set(r["scenario"] for r in rows), key=[r["scenario"] for r in rows].index)
    cards = sorted(set(r["card"] for r in rows if r["status"] not in ("skipped",)), key=[r["card"] for r in rows].index)
    rehearse = any(r.get("rehearsal") for r in rows)
    title = (f"## {date} — benchmarks/run.py{' (CPU rehearsal)' if rehearse else ''}: {', '.join(names)}"
             f"{', before/after' if ab else ''} ({'; '.join(re.sub(r' [(].*?[)]', '', c) for c in cards) or first['card']})")
    v = first.get("versions") or {}
    soft = ", ".join(f"{k} {v[k]}" for k in ("python", "torch", "cuda", "pytorch-lightning", "deepspeed") if v.get(k))
    gpu_cards = [c for c in cards if not c.startswith("CPU")]
    out = [title, "", f"- date: {first['date']} (call {first['call']})",
           f"- card: {'; '.join(gpu_cards) if gpu_cards else 'none (CPU only)'}; host: {first['host']}",
           f"- software: {soft}"]
    if "current" in libs:
        out.append(f"- commit: {libs['current']['commit']}{' (after)' if ab else ''}: library {lib_text(libs['current'])}")
    if ab:
        out.append(f"- before (--base): {lib_text(libs['base'])}")
    out += [f"- command: `{first['driver_command']}`",
            f"- output: `{results_note or 'OUTDIR'}` (results.jsonl: one JSON row per run; one folder per run)",
            "- method: kt/s = M_BSZ x GPUs x ctx / the median step time after the first 10 steps (from "
            "loss_log.csv; profiled steps left out); MFU = 6 x params x kt/s per GPU / the matmul rate; peak "
            "memory: nvidia-smi (the run's processes where nvidia-smi lists them, else the whole card), torch's "
            "peak allocated from profile.txt (profiled runs)", ""]
    train = [r for r in rows if r["kind"] == "train" and r["status"] not in ("skipped",)]
    if train:
        out += ["| scenario | library | setup | status | kt/s (per GPU) | ms/step | MFU | peak memory (nvidia-smi) "
                "| torch peak allocated | loss first -> last | vs original trainer | wall |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in train:
            f = r["figures"]
            setup = r.get("setup", "")
            mfu = f"{f['mfu']:.1%}" if f.get("mfu") is not None else "-"
            vs = ""
            if f.get("vs_original"):
                o = f["vs_original"]
                vs = f"{o['speed']}x / {o['memory']}x of {o['kt_s']} kt/s at {o['gib']} GiB ({'met' if o['met'] else 'NOT met'})"
            kts = f"**{f['kt_s']}** ({f['kt_s_per_gpu']})" if f.get("kt_s") else "-"
            loss = f"{f['loss_first']:.4f} -> {f['loss_last']:.4f}" if "loss_first" in f else "-"
            out.append(f"| {r['scenario']} | {libtag(r, ab)} | {setup} | {r['status']} | {kts} | {f.get('step_ms', '-')} | {mfu} "
                       f"| {mem_text(f)} | {gib(f.get('torch_peak_allocated_gib'))} | {loss} | {vs or '-'} "
                       f"| {f.get('wall_s', '-')} s |")
        out.append("")
        bases = [r for r in train if r["library"]["side"] == "base"]
        if bases:
            out += ["Before / after (the same scenario with --base's library, then with this tree's):", "",
                    "| scenario | kt/s before -> after | ms/step | peak memory | torch peak allocated | loss last |",
                    "|---|---|---|---|---|---|"]
            for b in bases:
                a = next((r for r in train if r["scenario"] == b["scenario"] and r["library"]["side"] == "current"), None)
                if not a:
                    continue
                fa, fb = a["figures"], b["figures"]

                def pair(key, fmt="{}", fa=fa, fb=fb):
                    x, y = fb.get(key), fa.get(key)
                    return f"{fmt.format(x) if x is not None else '-'} -> {fmt.format(y) if y is not None else '-'}{pct(x, y)}"
                ma, mb = mem_value(fa), mem_value(fb)
                out.append(f"| {b['scenario']} | {pair('kt_s')} | {pair('step_ms')} | "
                           f"{gib(mb)} -> {gib(ma)}{pct(mb, ma)} | {pair('torch_peak_allocated_gib', '{:.2f}')} | "
                           f"{pair('loss_last', '{:.4f}')} |")
            out.append("")
    hw = hw_table(rows)
    if hw:
        out += ["The hardware table (hw-* rows of this call; `python benchmarks/run.py --out OUTDIR --hwtable` "
                "collects every call's):", "", hw]
    notes = []
    for r in rows:
        if r["kind"] == "train" and r["status"] not in ("skipped",):
            extra = []
            f = r["figures"]
            if f.get("scaling"):
                sc = f["scaling"]
                extra.append(f"{sc['x']}x the kt/s of {sc['vs']} ({sc['vs_kt_s']} kt/s; target >= {sc['target']}x: "
                             f"{'met' if sc['met'] else 'NOT met'})" if sc.get("x") else sc.get("note", ""))
            if "windows_drawn" in f:
                extra.append(f"{f['windows_drawn']} sample windows drawn by the ranks, {f['windows_distinct']} distinct")
            if "final_written" in f:
                extra.append(f"rwkv-final.pth {'written' if f['final_written'] else 'MISSING'}")
            if f.get("eval"):
                e = f["eval"]
                extra.append(f"held-out exact match {e.get('accuracy')}% ({e.get('correct')}/{e.get('n')}): "
                             + ", ".join(f"{k} {x}%" for k, x in (e.get("by_kind") or {}).items())
                             + "".join(f"; {name} wordings {part['accuracy']}% of {part['n']}: "
                                       + ", ".join(f"{k} {x}%" for k, x in part["by_kind"].items())
                                       for name, part in (e.get("by_split") or {}).items())
                             + (f"; of the {e['n'] - e['correct']} misses {e['n'] - e['restated']} misread the "
                                f"problem (its restatement wrong)" if e.get("restated") is not None
                                and e.get("correct", 0) < e.get("n", 0) else ""))
            if f.get("kts_planned"):
                extra.append(f"{f['steps_planned']} steps planned from {f['kts_planned']} kt/s x {f['train_s_planned']} s "
                             f"({f.get('kts_planned_from', '--kts')})")
            if f.get("mfu_basis"):
                extra.append(f"MFU basis: {f['mfu_basis']}")
            if f.get("m_bsz_plan"):
                extra.append(f"M_BSZ {f.get('m_bsz')}: {f['m_bsz_plan']}")
            if f.get("out_of_memory_at_m_bsz"):
                extra.append(f"out of memory at M_BSZ {', '.join(map(str, f['out_of_memory_at_m_bsz']))}")
            if f.get("cuda_memory"):
                c = f["cuda_memory"]
                extra.append(f"PyTorch's memory at step {c['step']}: {c['held']} GiB held, peak {c['peak_forward_backward']}"
                             f" GiB in forward + backward, {c['peak_optimizer']} GiB in the optimiser step"
                             + (f"; before it at most {c['peak_before']} GiB allocated, {c['reserved_peak']} GiB "
                                f"reserved; the card {c['card_used']} GiB in use after it"
                                if c.get("card_used") is not None else "")
                             + ("; outside PyTorch's allocator: " + ", ".join(
                                 f"{v} GiB {k.replace('_', ' ')}" for k, v in c["outside_allocator"].items())
                                if c.get("outside_allocator") else ""))
            if f.get("chat"):
                extra.append(f"chat.py session (greedy, {len(CHAT_QUESTIONS)} questions): `{f['chat']['transcript']}`"
                             + ("" if f["chat"]["rc"] == 0 else f" (rc {f['chat']['rc']})"))
            if f.get("prepare_s") is not None:
                extra.append(f"prepare {f['prepare_s']} s" + (f" (init {f['init_s']} s, write {f['write_s']} s)"
                                                               if f.get("init_s") is not None else ""))
            if f.get("launch_to_first_step_s") is not None:
                extra.append(f"launch to the end of step 1: {f['launch_to_first_step_s']} s"
                             + (f" (the trainer's set-up {f['trainer_train_start_s']} s)"
                                if f.get("trainer_train_start_s") is not None else ""))
            if extra:
                notes.append(f"- {r['scenario']}{who(r, ab)}: " + "; ".join(x for x in extra if x))
        elif r["kind"] != "train" and r["status"] not in ("skipped",):
            s = summarize(r)
            notes.append(f"- {r['scenario']}{who(r, ab)}: {r['status']}" + (f": {s}" if s else ""))
    if notes:
        out += notes + [""]
    bad = [r for r in rows if r["status"] not in ("ok", "dry run")]
    if bad:
        out.append("Not run or not finished:")
        out.append("")
        for r in bad:
            out.append(f"- {r['scenario']}{who(r, ab)}: {r['status']}: {r['note']}")
            if r.get("log_tail"):
                out += ["", "  ```"] + [f"  {ln}" for ln in r["log_tail"][-8:]] + ["  ```"]
        out.append("")
    cmds = [r for r in rows if r.get("command")]
    if cmds:
        out += ["Commands (repository root):", ""]
        for r in cmds:
            out.append(f"- {r['scenario']}{who(r, ab)}: `{r['command']}`")
        out.append("")
    return "\n".join(out) + "\n"


def who(r: dict, ab: bool) -> str:
    return f" ({libtag(r, ab)})" if r.get("library") else ""


def libtag(r: dict, ab: bool = True) -> str:
    lib = r.get("library")
    if not lib:
        return "-"
    c = lib["commit"] if lib["commit"] != "unknown" else f"rwkvlm {lib['rwkvlm_sha256']}"
    if not ab:
        return c
    return f"{'after' if lib['side'] == 'current' else 'before'}, {c}"


# ---------------------------------------------------------------------------------------- main

def scenario_table() -> str:
    lines = [f"{'scenario':<18} {'kind':<7} {'GPUs':>4}  what / settings"]
    for s in SCENARIOS.values():
        lines.append(f"{s.name:<18} {s.kind:<7} {s.gpus or 'cpu':>4}  {s.what}")
        if s.kind in ("train", "parity"):
            lines.append(f"{'':<32}{s.setup()}; limit {s.limit_s or 'train_s + 150'} s"
                         f"{'' if s.ab else '; not run with --base'}"
                         + (f"; the whole row ~{s.budget_s} s on one H200" if s.budget_s else "")
                         + (f"; needs ~{s.host_gib:.0f} GiB host memory" if s.host_gib else ""))
    lines.append("")
    lines += [f"group {g}: {' '.join(v)}" for g, v in GROUPS.items()]
    return "\n".join(lines)


def expand(names: list) -> list:
    out = []
    for n in names:
        for m in GROUPS.get(n, [n]):
            if m not in SCENARIOS:
                raise SystemExit(f"error: unknown scenario {m!r}; `python benchmarks/run.py --list` shows them")
            if m not in out:
                out.append(m)
    if "matmul" in out:  # the MFU of the runs after it uses the rate it measures
        out.remove("matmul")
        out.insert(0, "matmul")
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenarios", nargs="*", help="scenario or group names (--list)")
    ap.add_argument("--out", help="the output folder (made if missing): results.jsonl, report.md, data/, one folder per run")
    ap.add_argument("--base", help="also run each scenario with this older copy of the library (the folder "
                                   "holding rwkvlm/, e.g. .base/RWKV-v7; its train_temp/ scripts when it has them)")
    ap.add_argument("--results", help="append the call's section to this file too (e.g. benchmarks/RESULTS.md)")
    ap.add_argument("--steps", type=int, help="steps of each training run instead of the scenario's")
    ap.add_argument("--extra", default="", help="more train.py flags for every training run (of the parity: its "
                                                 "bf16 side)")
    ap.add_argument("--profile", type=int, help="--profile_steps of every training run (0: none)")
    ap.add_argument("--cards", help="nvidia-smi indices of the cards to use, comma-separated (default: all)")
    ap.add_argument("--limit", type=float, help="seconds before a run is stopped, instead of the scenario's")
    ap.add_argument("--budget", type=float, help="seconds for the whole call: each run's limit is cut to what is "
                                                 "left, and runs with under a minute left are skipped")
    ap.add_argument("--tflops", type=float, help="the card's bf16 matmul rate for MFU (default: the matmul "
                                                 "scenario's, else the card's stated peak)")
    ap.add_argument("--kts", type=float, help="arith-0.1b: kt/s of all its GPUs together (default: 97%% of "
                                              "train-0.1b-m16's per-GPU figure in OUTDIR)")
    ap.add_argument("--train-s", type=int, help="arith-0.1b: seconds of training to plan the tokens for")
    ap.add_argument("--eval-n", type=int, help="arith-0.1b: held-out items to evaluate on (both wordings; "
                                               "default: the scenario's)")
    ap.add_argument("--docs", type=int, help="arith-0.1b: dialogues in its corpus (default: enough for 1.15x its "
                                             "tokens over the 30 copies)")
    ap.add_argument("--chat", action="store_true", help="arith-0.1b: after the evaluation, a short chat.py session "
                                                        "(greedy, several turns, mixed kinds) of rwkv-final.pth")
    ap.add_argument("--m-bsz", type=int, help="hw-*-mmax: this M_BSZ instead of the one planned from the M_BSZ 1 "
                                              "row's measured memory")
    ap.add_argument("--hwtable", action="store_true", help="print the hardware table of every hw-* row in "
                                                          "OUTDIR/results.jsonl (the newest of each) and exit")
    ap.add_argument("--commit", default="", help="the commit of this tree (default: git; for a copy without .git)")
    ap.add_argument("--base-commit", default="", help="the commit of --base's library (default: git or DIR/COMMIT)")
    ap.add_argument("--data-dir", help="where the prepared data sets are kept (default OUTDIR/data; ~110 MB "
                                       "for the ctx 4096 set)")
    ap.add_argument("--keep-weights", action="store_true", help="keep the runs' .pth files and resume states")
    ap.add_argument("--progress-s", type=float, default=30.0, help="seconds between progress lines of a run")
    ap.add_argument("--rehearse", action="store_true", help="run the training scenarios' launches on CPU, tiny "
                                                            "(2 CPU processes stand in for 2 GPUs)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("--report", action="store_true", help="write the section of OUTDIR's last call again")
    ap.add_argument("--list", action="store_true", help="list the scenarios")
    args = ap.parse_args(argv)
    if args.list:
        print(scenario_table())
        return 0
    if not args.out:
        ap.error("--out OUTDIR is required")
    out = Path(args.out).resolve()
    if args.hwtable:
        rows = []
        try:
            for line in open(out / "results.jsonl"):
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass
        except OSError:
            pass
        text = hw_table(rows)
        if not text:
            raise SystemExit(f"error: no hw-* rows in {out / 'results.jsonl'}")
        print(text, end="")
        return 0
    if args.report:
        rows = []
        for line in open(out / "results.jsonl"):
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
        if not rows:
            raise SystemExit(f"error: no rows in {out / 'results.jsonl'}")
        call = rows[-1]["call"]
        text = section([r for r in rows if r["call"] == call], rel(out))
    else:
        if not args.scenarios:
            ap.error("name at least one scenario (--list shows them)")
        names = expand(args.scenarios)
        drv = Driver(args, argv)

        def stop(signum, _frame):
            raise Interrupted()

        old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            drv.run_all(names)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            shutil.rmtree(drv.bindir, ignore_errors=True)
        if args.dry_run:
            return 0
        text = section(drv.rows, rel(out))
    print("\n" + text, flush=True)
    append_text(out / "report.md", text)
    if args.results:
        append_text(Path(args.results), text)
        print(f"appended the section to {args.results}", flush=True)
    if args.report:
        return 0
    bad = [r for r in drv.rows if r["status"] in ("failed", "timeout", "incomplete", "interrupted")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
