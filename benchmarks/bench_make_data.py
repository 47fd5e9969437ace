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

At pre-training scale (--sizes, in GB): a ~1 GB generated jsonl (and 4 GB with
`--sizes 1,4`) through make_data with 1 and 2 workers (--workers), N = 1 by
default (--scale-copies): input MB/s over the whole run and over pass 1
(tokenizing), MB per CPU-second (user + sys of the whole process tree, from
RUSAGE_CHILDREN: the per-core rate), and the peak memory of the process tree,
sampled from /proc: the sum of VmRSS over make_data and its workers every 0.1 s
(forked workers share the tokenizer's pages, which RSS counts in each) and the
sum of Pss every 1 s (shared pages split between the processes: the memory
really used).
Also the per-core rates of pass 1's parts on a sample of the input (JSON,
tokenizer per line and per batch, the round-trip check). JSON goes to OUTDIR
(--out; default: the scratch folder); the generated files are deleted after.
On a shared machine, --scale-repeats R interleaves R runs of each worker count and
takes the fastest of each, and --wait-idle S waits (up to S s) for idle cores before each run;
each row records the CPU-seconds that other work took while it ran (others_cpu_s).

    python benchmarks/bench_make_data.py --sizes 1,4 --out OUTDIR
"""
from __future__ import annotations

import argparse
import datetime
import filecmp
import json
import os
import platform
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
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
    from rwkvlm.data.shuffle import copy_orders  # only for the same document order as ours

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


# ---------------------------------------------------------------- at pre-training scale

def _tree(pid: int) -> list:
    """pid and all its descendants (from /proc/PID/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def _kib(path: str, field: str) -> int:
    """A 'Field:  N kB' line's N from a /proc file (0 if the process is gone)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMemory(threading.Thread):
    """Samples the memory of a process tree until stop(): the peak over time of the sum of VmRSS
    (every `interval` s) and of the sum of Pss (every `pss_every` samples: reading smaps_rollup
    walks the page tables, too costly to do often on 2 cores), the parent's own peak RSS, the
    most processes."""

    def __init__(self, pid: int, interval: float = 0.1, pss_every: int = 10):
        super().__init__(daemon=True)
        self.pid, self.interval, self.pss_every = pid, interval, pss_every
        self.peak_rss = self.peak_pss = self.parent_rss = self.processes = 0
        self._stop_event = threading.Event()

    def run(self):
        n = 0
        while not self._stop_event.is_set():
            pids = _tree(self.pid)
            rss = [_kib(f"/proc/{p}/status", "VmRSS:") for p in pids]
            self.peak_rss, self.parent_rss = max(self.peak_rss, sum(rss)), max(self.parent_rss, rss[0])
            self.processes = max(self.processes, sum(1 for r in rss if r))
            if n % self.pss_every == 0:
                self.peak_pss = max(self.peak_pss, sum(_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids))
            n += 1
            self._stop_event.wait(self.interval)

    def stop(self) -> dict:
        self._stop_event.set()
        self.join()
        return {"peak_rss_tree_mib": self.peak_rss / 1024, "peak_pss_tree_mib": self.peak_pss / 1024,
                "peak_rss_parent_mib": self.parent_rss / 1024, "processes": self.processes}


def run_tree(cmd, cwd) -> dict:
    """Run cmd; its wall s, CPU s (user + sys of it and its workers), tree memory, stdout.
    (Not ru_maxrss: a child forked from this process starts with this process's RSS.)"""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = TreeMemory(proc.pid)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    memory = sampler.stop()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"{cmd} failed ({proc.returncode}):\n{err[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, **memory, "stdout": out}


def write_long_docs(path: Path, mb: float, doc_kb: float, seed: int = 0) -> tuple:
    """A jsonl of ~mb MB whose documents are arithmetic dialogues joined (blank line between) into
    documents of at least doc_kb KB, a pre-training corpus's document size. (documents, bytes)."""
    from rwkvlm.data.arithmetic import generate_documents, write_jsonl

    def joined():
        target, texts, size = int(doc_kb * 1000), [], 0
        for text in generate_documents(10**12, seed):
            texts.append(text)
            size += len(text.encode("utf-8")) + 2
            if size >= target:
                yield "\n\n".join(texts)
                texts, size = [], 0

    return write_jsonl(path, mb=mb, texts=joined())


def make_big_jsonl(path: Path, gb: float, block: Path) -> tuple:
    """path = the generated block repeated to ~gb GB (documents repeat; tokenizing speed and
    memory per document are those of the block's). Returns (documents, bytes)."""
    block_docs = sum(1 for _ in open(block, "rb"))
    block_bytes = block.stat().st_size
    reps = max(1, round(gb * 1e9 / block_bytes))
    with open(path, "wb") as out:
        for _ in range(reps):
            with open(block, "rb") as f:
                shutil.copyfileobj(f, out, 16 << 20)
    return reps * block_docs, reps * block_bytes


def part_rates(sample: Path) -> dict:
    """MB per CPU-second of pass 1's parts on `sample`, one core: what bounds the per-core rate."""
    from rwkvlm.data import tokenize_jsonl as tj
    from rwkvlm.data.tokenizer import get_tokenizer

    tok = get_tokenizer()
    tj._vocab_bytes(tok)
    raw = [line.strip() for line in open(sample, "rb")]
    texts = [tj._parse_line(r, i) for i, r in enumerate(raw, 1) if r]
    mb = sum(map(len, raw)) / 1e6

    def rate(fn) -> float:
        t = time.process_time()
        fn()
        return mb / (time.process_time() - t)

    batches = []
    for i in range(0, len(texts), 1000):
        batches.append(texts[i : i + 1000])
    jobs = [tj.ChunkJob(str(sample), a, b, 16_000_000, False, "<u2") for a, b in tj.plan_chunks(sample, tj.CHUNK_BYTES)]
    chunks = [sample.read_bytes()[a:b] for a, b in tj.plan_chunks(sample, tj.CHUNK_BYTES)]

    def scan_chunk(data: bytes) -> list:  # what pass 1's fast path does before tokenizing
        return [tj._scanstring(line, 10, True)[0] for line in data.decode("utf-8").split("\n") if line]

    return {
        "sample_mb": mb,
        "json_parse": rate(lambda: [tj._parse_line(r, 1) for r in raw if r]),
        "json_parse_chunk_decode_split_scan": rate(lambda: [scan_chunk(c) for c in chunks]),
        "tokenizer_encode_per_line": rate(lambda: [tok.encode(t) for t in texts]),
        "tokenizer_encode_batched": rate(lambda: [tok.encode(tj._SEP.join(b) + tj._SEP) for b in batches]),
        "encode_batch_with_check": rate(lambda: [tj._encode_batch(tok, b, "<u2") for b in batches]),
        "pass1_one_core": rate(lambda: [tj.tokenize_chunk(j) for j in jobs]),
    }


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def _cpu_busy_s() -> float:
    """CPU-seconds the whole machine has spent busy (all cores; /proc/stat, not idle or iowait)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _wait_idle(limit_s: float, busy_max: float = 0.1) -> tuple:
    """Wait (up to limit_s) until the machine's cores are busy less than busy_max of the time over
    3 s (the 1-minute load average still counts the previous run): (seconds waited, that share)."""
    t0 = time.perf_counter()
    while True:
        b0, w0 = _cpu_busy_s(), time.perf_counter()
        time.sleep(3)
        share = (_cpu_busy_s() - b0) / ((time.perf_counter() - w0) * len(os.sched_getaffinity(0)))
        if share < busy_max or time.perf_counter() - t0 > limit_s:
            return time.perf_counter() - t0, share


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _done_line(stdout: str) -> dict:
    """make_data's closing line: pass 1's seconds and the tokens written."""
    import re

    m = re.search(r"^### Done in [\d.]+ s: .* \(tokenizing ([\d.]+) s, .*\), (\d+) tokens written$", stdout, re.M)
    return {"tokenize_s": float(m.group(1)), "tokens": int(m.group(2))} if m else {}


def scale(args) -> None:
    """The --sizes benchmark (see the module docstring)."""
    from rwkvlm.data.arithmetic import write_jsonl

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_make_data."))
    work.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out or work)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = [float(x) for x in args.sizes.split(",")]
    workers = [int(x) for x in args.workers.split(",")]
    block = work / "block.jsonl"
    if args.doc_kb:
        block_docs, block_bytes = write_long_docs(block, args.block_mb, args.doc_kb, seed=0)
    else:
        block_docs, block_bytes = write_jsonl(block, mb=args.block_mb, seed=0)
    print(f"block: {block_bytes / 1e6:.1f} MB, {block_docs} documents; load {_load()}", flush=True)
    sample = work / "sample.jsonl"
    with open(block, "rb") as f, open(sample, "wb") as g:
        g.writelines(line for _, line in zip(range(block_docs // 4), f))
    result = {"date": datetime.date.today().isoformat(), "cpu": _cpu_model(), "cores": len(os.sched_getaffinity(0)),
              "python": platform.python_version(), "copies": args.scale_copies, "ctx": args.ctx, "seed": args.seed,
              "block_mb": block_bytes / 1e6, "doc_bytes": round(block_bytes / block_docs),
              "parts_mb_per_cpu_s": part_rates(sample), "runs": []}
    print("per-core rates of pass 1's parts (MB/CPU-s):", json.dumps(result["parts_mb_per_cpu_s"]), flush=True)
    for gb in sizes:
        big = work / f"in{gb:g}g.jsonl"
        docs, size = make_big_jsonl(big, gb, block)
        for _, w in ((k, w) for k in range(args.scale_repeats) for w in workers):  # interleaved repeats
            cmd = [sys.executable, MAKE_DATA, big, args.scale_copies, args.ctx, "--seed", args.seed, "--no-progress",
                   "--workers", w, "--out-dir", work / "out"]
            waited, busy = _wait_idle(args.wait_idle) if args.wait_idle else (0.0, None)
            load, busy0 = _load(), _cpu_busy_s()
            r = run_tree(cmd, work)
            r.update(_done_line(r.pop("stdout")))
            # CPU the machine spent on other work while this ran (its own: cpu_s)
            others = _cpu_busy_s() - busy0 - r["cpu_s"]
            row = {"gb": gb, "input_bytes": size, "documents": docs, "workers": w, "load_before": load,
                   "load_after": _load(), "idle_wait_s": waited, "busy_share_before": busy,
                   "others_cpu_s": others, **r}
            row["mb_s"] = size / 1e6 / r["wall_s"]
            row["tokenize_mb_s"] = size / 1e6 / r["tokenize_s"] if r.get("tokenize_s") else None
            row["mb_per_cpu_s"] = size / 1e6 / r["cpu_s"]
            result["runs"].append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(work / "out", ignore_errors=True)
        big.unlink()
    block.unlink()
    sample.unlink()
    _scale_summary(result, workers, sizes)
    path = out_dir / "make_data_scale.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


def _scale_summary(result: dict, workers: list, sizes: list) -> None:
    """Speed-up of each worker count over the first; memory growth of each size over the first.
    Of repeated runs, the fastest (the least disturbed by other load on the machine) counts for
    the speed; memory and CPU-seconds are the largest and the smallest seen."""
    runs = {}
    for r in sorted(result["runs"], key=lambda r: -r["wall_s"]):
        runs[r["gb"], r["workers"]] = r
    w0, s0 = workers[0], sizes[0]
    result["speedup"] = {f"{gb:g}GB x{w}": {k: runs[gb, w][k] / runs[gb, w0][k] for k in ("mb_s", "tokenize_mb_s")}
                         for gb in sizes for w in workers[1:]}

    def most(gb, w, key, pick=max):
        return pick(r[key] for r in result["runs"] if (r["gb"], r["workers"]) == (gb, w))

    result["memory_growth"] = {f"{w} workers {gb:g}GB": {
        k: most(gb, w, k) / most(s0, w, k) - 1 for k in ("peak_rss_tree_mib", "peak_pss_tree_mib")}
        for w in workers for gb in sizes[1:]}
    result["best_mb_per_cpu_s"] = {f"{gb:g}GB x{w}": most(gb, w, "mb_per_cpu_s") for gb in sizes for w in workers}
    print("speed-up:", json.dumps(result["speedup"]), "\nmemory growth:", json.dumps(result["memory_growth"]),
          "\nMB per CPU-s:", json.dumps(result["best_mb_per_cpu_s"]))


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
    ap.add_argument("--sizes", default=None, help="run the scale benchmark on inputs of these GB (e.g. 1,4)")
    ap.add_argument("--workers", default="1,2", help="--sizes: the worker counts to run (default 1,2)")
    ap.add_argument("--scale-copies", type=int, default=1, help="--sizes: N of those runs (default 1)")
    ap.add_argument("--scale-repeats", type=int, default=1,
                    help="--sizes: runs of each worker count, interleaved; the fastest counts (default 1)")
    ap.add_argument("--block-mb", type=float, default=64.0, help="--sizes: the generated block repeated (MB)")
    ap.add_argument("--doc-kb", type=float, default=0.0, help="--sizes: join the dialogues into documents of at least "
                                                              "this many KB (default: one dialogue each, ~240 B)")
    ap.add_argument("--wait-idle", type=float, default=0.0,
                    help="--sizes: before each run wait up to this many seconds for the machine's cores to be "
                         "less than 10%% busy (a shared machine); each row records the wait, the busy share and "
                         "the CPU-seconds other work took while it ran (others_cpu_s)")
    ap.add_argument("--out", default=None, help="--sizes: folder of make_data_scale.json (default: the scratch folder)")
    ap.add_argument("--baseline-worker", nargs=4, metavar=("JSONL", "N", "CTX", "SEED"), help=argparse.SUPPRESS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args.child)
    if args.baseline_worker:
        jsonl, n, ctx, seed = args.baseline_worker
        return baseline(jsonl, int(n), int(ctx), int(seed))
    if args.sizes:
        return scale(args)

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
