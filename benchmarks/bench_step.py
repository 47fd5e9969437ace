"""GPU: one training step (forward + backward) of the tutorial's model, eager against
torch.compile'd blocks, and where the step's time goes.

The model is cast to bf16 as DeepSpeed's bf16 mode does, with gradient checkpointing
(GRAD_CP 1), the CUDA WKV kernel and the fused head loss; tokens are random. The
optimiser is left out (DeepSpeed's fused Adam is a few ms per step): the trainer's
own figures come from the train scenarios of benchmarks/run.py. The profile groups CUDA kernel time by kind.

    python benchmarks/bench_step.py --bsz 16 --modes eager compile --profile
"""
from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch

from rwkvlm.model import RWKV7, ModelConfig, count_params

KIND_RULES = (  # (kind, substrings of the kernel name), first match wins
    ("WKV7 kernel", ("wkv7", "wkv_")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "sm90_", "cublas", "splitk")),
    ("fused (compiled)", ("triton_",)),
    ("softmax / loss", ("softmax", "log_softmax", "nll", "logsumexp", "scatter", "gather", "index")),
    ("reductions", ("reduce", "norm", "layer_norm", "group_norm")),
    ("copies / casts", ("copy", "cast", "fill", "memset", "memcpy", "cat")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KIND_RULES:
        if any(k in low for k in keys):
            return kind
    return "pointwise (eager)"


def build(args, compiled: bool) -> RWKV7:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=args.layers, n_embd=args.embd, grad_cp=True)
    model = RWKV7(cfg).cuda()
    model.init_weights()
    model.bfloat16()
    if compiled:
        model.compile_blocks()
    return model


def step(model, idx, tgt):
    loss = model.loss(idx, tgt)
    loss.backward()
    for p in model.parameters():
        p.grad = None
    return loss


def run(args, bsz: int, mode: str):
    model = build(args, mode == "compile")
    g = torch.Generator(device="cuda").manual_seed(1)
    batches = [torch.randint(0, 65536, (bsz, args.ctx + 1), device="cuda", generator=g) for _ in range(3)]
    t0 = time.perf_counter()
    for i in range(3):  # warm-up (and compile)
        b = batches[i % 3]
        step(model, b[:, :-1], b[:, 1:])
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    times, issue = [], []
    for i in range(args.steps):
        b = batches[i % 3]
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        c0 = time.perf_counter()
        step(model, b[:, :-1], b[:, 1:])
        issue.append((time.perf_counter() - c0) * 1e3)  # host time to issue the step's work
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1))
    print(f"  host time to issue one step (median): {statistics.median(issue):.1f} ms", flush=True)
    ms = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30
    prof = None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(2):
                b = batches[i % 3]
                step(model, b[:, :-1], b[:, 1:])
            torch.cuda.synchronize()
    del model
    torch.cuda.empty_cache()
    return ms, peak, warm_s, times, prof


def report_profile(prof, steps: int = 2, top: int = 12) -> None:
    """Sum the time of every CUDA kernel (and memcpy/memset) event, by kind and by name."""
    from torch.autograd import DeviceType

    by_kind = collections.Counter()
    by_name = collections.Counter()
    for ev in prof.events():
        if getattr(ev, "device_type", None) != DeviceType.CUDA:
            continue
        t = ev.time_range.elapsed_us()
        by_kind[kind_of(ev.name)] += t
        by_name[ev.name] += t
    total = sum(by_kind.values()) or 1
    print(f"  GPU kernel time per step {total / steps / 1e3:.1f} ms, by kind:")
    for kind, t in by_kind.most_common():
        print(f"    {kind:<20} {t / steps / 1e3:8.1f} ms  {100 * t / total:5.1f}%")
    print(f"  top {top} kernels:")
    for name, t in by_name.most_common(top):
        print(f"    {t / steps / 1e3:8.2f} ms  {name[:110]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--embd", type=int, default=768)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--bsz", type=int, nargs="+", default=[16])
    ap.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--top", type=int, default=12, help="kernels listed by name in the profile")
    ap.add_argument("--tflops", type=float, default=0.0, help="measured bf16 matmul rate, for MFU")
    ap.add_argument("--json", default=None, help="also write {'M_BSZ mode': ms per step} here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_step.py needs a CUDA GPU")
    params = count_params(ModelConfig(n_layer=args.layers, n_embd=args.embd))
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}; L{args.layers}-D{args.embd} "
          f"({params:,} params) ctx {args.ctx} bf16 GRAD_CP 1, fwd+bwd (no optimiser)")
    rows, timings = [], {}
    for bsz in args.bsz:
        for mode in args.modes:
            ms, peak, warm, times, prof = run(args, bsz, mode)
            kts = bsz * args.ctx / ms
            mfu = f", MFU {6 * params * kts * 1e3 / (args.tflops * 1e12):.1%}" if args.tflops else ""
            line = (f"M_BSZ {bsz:>2} {mode:<7}: {ms:7.1f} ms/step (min {min(times):.1f}, max {max(times):.1f}), "
                    f"{kts:6.1f} kt/s, peak allocated {peak:5.2f} GiB, warm-up {warm:.0f} s{mfu}")
            print(line, flush=True)
            rows.append(line)
            timings[f"{bsz} {mode}"] = ms
            if prof is not None:
                report_profile(prof, top=args.top)
    print("summary:")
    for line in rows:
        print(" ", line)
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(timings, f)


if __name__ == "__main__":
    main()
