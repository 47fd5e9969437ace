"""Benchmark make_data against the straightforward method (not a test).

The tutorial's command shape, `make_data.py demo.jsonl 30 4096`, on a generated
arithmetic jsonl (~12 MB by default), against the straightforward method the
original make_data uses: write every shuffled copy out as jsonl, then
re-tokenize every copy with the `rwkv` package's TRIE_TOKENIZER, one process.
Both runs use the same document order (same seed), so their .bin/.idx must be
byte-identical. Whole-process wall time and peak RSS (wait4) are measured;
then ours again at N = 1 and 100 (memory vs N) and on a 10x input (memory vs
input size).

    python benchmarks/bench_make_data.py [--mb 12] [--append]
"""
from __future__ import annotations

import argparse
import datetime
import filecmp
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAKE_DATA = ROOT / "RWKV-v5" / "make_data.py"


def baseline(jsonl: str, copies: int, ctx_len: int, seed: int) -> None:
    """The straightforward method, as the original make_data.py does it."""
    import numpy as np
    import rwkv
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    from rwkvlm.data.magic_prime import magic_prime
    from rwkvlm.data.make_data import copy_orders  # only for the same document order as ours

    tokenizer = TRIE_TOKENIZER(str(Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"))
    name = os.path.splitext(os.path.basename(jsonl))[0]
    with open(jsonl, "r", encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    temp = "make_data_temp.jsonl"
    with open(temp, "w", encoding="utf-8") as f:
        for order in copy_orders(len(lines), copies, seed):
            for i in order:
                f.write(lines[i] + "\n")
    sizes, doc_idx = [], [0]
    with open(f"{name}.bin", "wb") as out, open(temp, "r", encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            ids = tokenizer.encode(text)
            if tokenizer.decode(ids) != text:
                raise SystemExit("round-trip failure")
            ids.append(0)
            out.write(np.array(ids, dtype=np.uint16).tobytes())
            sizes.append(len(ids))
            doc_idx.append(len(sizes))
    pointers, address = [], 0
    for size in sizes:
        pointers.append(address)
        address += size * 2
    with open(f"{name}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, len(sizes), len(doc_idx)))
        f.write(np.array(sizes, dtype="<i4").tobytes())
        f.write(np.array(pointers, dtype="<i8").tobytes())
        f.write(np.array(doc_idx, dtype="<i8").tobytes())
    os.remove(temp)
    tokens = os.path.getsize(f"{name}.bin") // 2
    p = magic_prime(tokens, ctx_len)
    print(f"--my_exit_tokens {tokens} --magic_prime {p} --ctx_len {ctx_len}")


def measure(cmd, cwd) -> tuple:
    """(wall seconds, stdout) of one process; exits on failure."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{cmd} failed ({proc.returncode}):\n{err[-3000:]}")
    return time.perf_counter() - t0, out


def run_measured(cmd, cwd) -> tuple:
    """(wall s, peak RSS MiB, stdout) of cmd, from a fresh helper process whose only
    child is cmd (RUSAGE_CHILDREN keeps the max over all of a process's children)."""
    helper = [sys.executable, __file__, "--child", json.dumps([str(c) for c in cmd])]
    _, out = measure(helper, cwd)
    result = json.loads(out.strip().splitlines()[-1])
    return result["wall"], result["maxrss_mib"], result["stdout"]


def _child(cmd_json: str) -> None:
    cmd = json.loads(cmd_json)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.stderr.write(err.decode(errors="replace"))
        raise SystemExit(proc.returncode)
    import resource

    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"wall": wall, "maxrss_mib": rss, "stdout": out.decode(errors="replace")}))


def exit_line(stdout: str) -> str:
    return next((line for line in stdout.splitlines() if line.startswith("--my_exit_tokens")), "(none)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=12.0, help="size of the generated jsonl (MB)")
    ap.add_argument("--copies", type=int, default=30)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="runs of ours to take the median of")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--skip-scaling", action="store_true")
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a new temp dir)")
    ap.add_argument("--append", action="store_true", help="append the figures to benchmarks/RESULTS.md")
    ap.add_argument("--baseline-worker", nargs=4, metavar=("JSONL", "N", "CTX", "SEED"), help=argparse.SUPPRESS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args.child)
    if args.baseline_worker:
        jsonl, n, ctx, seed = args.baseline_worker
        return baseline(jsonl, int(n), int(ctx), int(seed))

    from rwkvlm.data.arithmetic import write_jsonl

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_make_data."))
    work.mkdir(parents=True, exist_ok=True)
    ours_dir, base_dir = work / "ours", work / "baseline"
    ours_dir.mkdir(exist_ok=True)
    base_dir.mkdir(exist_ok=True)
    demo = work / "demo.jsonl"
    docs, size = write_jsonl(demo, mb=args.mb, seed=0)
    print(f"input: {demo} {size / 1e6:.2f} MB, {docs} documents", flush=True)
    ours_cmd = [sys.executable, MAKE_DATA, demo, args.copies, args.ctx, "--seed", args.seed, "--no-progress"]

    lines = []
    runs = [run_measured(ours_cmd, ours_dir) for _ in range(args.repeats)]
    ours_wall = statistics.median(r[0] for r in runs)
    ours_rss = max(r[1] for r in runs)
    print(f"ours: {[round(r[0], 2) for r in runs]} s, peak {ours_rss:.0f} MiB; {exit_line(runs[0][2])}",
          flush=True)
    lines.append(f"- ours (pyrwkv-tokenizer, tokenize once, N permutations): wall {ours_wall:.2f} s "
                 f"(median of {args.repeats}: {', '.join(f'{r[0]:.2f}' for r in runs)}), "
                 f"peak RSS {ours_rss:.0f} MiB")
    lines.append(f"  - prints `{exit_line(runs[0][2])}`")

    if not args.skip_baseline:
        base_cmd = [sys.executable, __file__, "--baseline-worker", demo, args.copies, args.ctx, args.seed]
        b_wall, b_rss, b_out = run_measured(base_cmd, base_dir)
        same = all(filecmp.cmp(ours_dir / f"demo{ext}", base_dir / f"demo{ext}", shallow=False)
                   for ext in (".bin", ".idx"))
        same_line = exit_line(b_out) == exit_line(runs[0][2])
        print(f"baseline: {b_wall:.1f} s, peak {b_rss:.0f} MiB; identical .bin/.idx: {same}", flush=True)
        lines.append(f"- straightforward (TRIE_TOKENIZER re-tokenizes all {args.copies} copies, one process): "
                     f"wall {b_wall:.1f} s, peak RSS {b_rss:.0f} MiB")
        speedup = b_wall / ours_wall
        lines.append(f"- speed-up {speedup:.1f}x (target >= 30x: {'met' if speedup >= 30 else 'NOT met'}); "
                     f"peak memory ours/straightforward {ours_rss / b_rss:.2f} "
                     f"(target <= 1: {'met' if ours_rss <= b_rss else 'NOT met'})")
        lines.append(f"- same seed, same document order: .bin and .idx byte-identical: {same}; "
                     f"same printed line: {same_line}")
        for ext in (".bin", ".idx"):
            (base_dir / f"demo{ext}").unlink()

    if not args.skip_scaling:
        rss_n = {}
        for n in (1, 100):
            cmd = [sys.executable, MAKE_DATA, demo, n, args.ctx, "--seed", args.seed, "--no-progress"]
            w, r, _ = run_measured(cmd, ours_dir)
            rss_n[n] = (w, r)
            print(f"ours N={n}: {w:.2f} s, peak {r:.0f} MiB", flush=True)
        rss_n[args.copies] = (ours_wall, ours_rss)
        big = work / "demo10x.jsonl"
        docs10, size10 = write_jsonl(big, mb=args.mb * 10, seed=10)
        cmd = [sys.executable, MAKE_DATA, big, args.copies, args.ctx, "--seed", args.seed, "--no-progress"]
        w10, r10, _ = run_measured(cmd, ours_dir)
        print(f"ours 10x input ({size10 / 1e6:.0f} MB): {w10:.1f} s, peak {r10:.0f} MiB", flush=True)
        lo = min(r for _, r in rss_n.values())
        hi = max(r for _, r in rss_n.values())
        lines.append("- peak RSS vs N (1x input): " + ", ".join(
            f"N={n}: {r:.0f} MiB ({w:.2f} s)" for n, (w, r) in sorted(rss_n.items()))
            + f"; spread {100 * (hi - lo) / lo:.1f}%")
        growth = 100 * (r10 - ours_rss) / ours_rss
        lines.append(f"- peak RSS vs input (N={args.copies}): 1x {size / 1e6:.1f} MB -> {ours_rss:.0f} MiB; "
                     f"10x {size10 / 1e6:.0f} MB ({docs10} docs) -> {r10:.0f} MiB ({w10:.1f} s); "
                     f"growth {growth:+.1f}% (target within 10%: {'met' if abs(growth) <= 10 else 'NOT met'})")
        big.unlink()
    for ext in (".bin", ".idx", ".meta.json"):
        for p in ours_dir.glob(f"*{ext}"):
            p.unlink()

    header = (f"\n## make_data ({datetime.date.today().isoformat()})\n\n"
              f"- machine: CPU 2 cores (dev sandbox), {platform.processor() or platform.machine()}, "
              f"Python {platform.python_version()}\n"
              f"- command: `python benchmarks/bench_make_data.py --mb {args.mb:g} --copies {args.copies} "
              f"--ctx {args.ctx} --seed {args.seed}` "
              f"(tutorial shape `make_data.py demo.jsonl {args.copies} {args.ctx}` on a {size / 1e6:.1f} MB "
              f"generated arithmetic jsonl, {docs} documents, --seed {args.seed})\n")
    text = header + "\n".join(lines) + "\n"
    print(text)
    if args.append:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a", encoding="utf-8") as f:
            if f.tell() == 0:
                f.write("# Benchmark results\n\nAppend-only; one dated section per run.\n")
            f.write(text)


if __name__ == "__main__":
    main()
