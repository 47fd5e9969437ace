"""CPU training throughput of the tiny RWKV-7 config.

A plain loop of forward + loss + backward + Adam step on random tokens
(L2, D128, ctx 512, micro_bsz 8, fp32, vocab 65536 by default). Reports the
steady-state tokens/s (median over the timed steps, after warm-up) and the
whole process's peak RSS (resource.getrusage ru_maxrss).

    python benchmarks/bench_cpu_train.py                 # print figures
    python benchmarks/bench_cpu_train.py --append        # also append to benchmarks/RESULTS.md

Target: >= 2,000 tokens/s at <= 3 GB peak RSS on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from rwkvlm.model import ModelConfig, RWKV7

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
TARGET_TOKS = 2000.0
TARGET_RSS_GB = 3.0


def peak_rss_bytes() -> int:
    # ru_maxrss is KiB on Linux, bytes on macOS
    v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return v if sys.platform == "darwin" else v * 1024


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n_layer", type=int, default=2)
    ap.add_argument("--n_embd", type=int, default=128)
    ap.add_argument("--vocab_size", type=int, default=65536)
    ap.add_argument("--ctx_len", type=int, default=512)
    ap.add_argument("--micro_bsz", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch default)")
    ap.add_argument("--grad_cp", action="store_true")
    ap.add_argument("--append", action="store_true", help=f"append a dated section to {RESULTS.name}")
    ap.add_argument("--machine", default="CPU 2 cores (dev sandbox)")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=args.n_layer, n_embd=args.n_embd, vocab_size=args.vocab_size, grad_cp=args.grad_cp)
    model = RWKV7(cfg)
    model.init_weights()
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.99), eps=1e-18, fused=True)
    B, T, V = args.micro_bsz, args.ctx_len, args.vocab_size
    gen = torch.Generator().manual_seed(1)

    times, losses = [], []
    for step in range(args.warmup + args.steps):
        data = torch.randint(0, V, (B, T + 1), generator=gen)
        idx, tgt = data[:, :-1], data[:, 1:]
        t0 = time.perf_counter()
        loss = model.loss(idx, tgt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        if step >= args.warmup:
            times.append(dt)
        print(f"step {step:3d}  loss {losses[-1]:.4f}  {dt * 1000:7.1f} ms  {B * T / dt:8.0f} tok/s"
              f"{'' if step >= args.warmup else '  (warm-up)'}", flush=True)

    med = statistics.median(times)
    res = {
        "tokens_per_s": B * T / med,
        "tokens_per_s_mean": B * T * len(times) / sum(times),
        "step_ms_median": med * 1000,
        "peak_rss_gb": peak_rss_bytes() / 1e9,
        "params": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(),
    }
    met = res["tokens_per_s"] >= TARGET_TOKS and res["peak_rss_gb"] <= TARGET_RSS_GB
    res["target_met"] = met
    cmd = "python benchmarks/bench_cpu_train.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"\nconfig: L{args.n_layer} D{args.n_embd} V{V} ctx {T} micro_bsz {B} fp32, "
          f"{res['params']:,} params, torch {torch.__version__}, {res['threads']} threads")
    print(f"steady-state: {res['tokens_per_s']:.0f} tokens/s (median step {res['step_ms_median']:.0f} ms; "
          f"mean {res['tokens_per_s_mean']:.0f} tokens/s), peak RSS {res['peak_rss_gb']:.2f} GB")
    print(f"target >= {TARGET_TOKS:.0f} tokens/s at <= {TARGET_RSS_GB:.0f} GB: {'MET' if met else 'NOT MET'}")

    if args.append:
        section = (
            f"\n## {_dt.date.today().isoformat()} — CPU training throughput, tiny RWKV-7 (bench_cpu_train.py)\n\n"
            f"- machine: {args.machine} ({platform.processor() or platform.machine()}, "
            f"torch {torch.__version__}, {res['threads']} threads)\n"
            f"- command: `{cmd.strip()}`\n"
            f"- config: L{args.n_layer} D{args.n_embd} V{V}, ctx {T}, micro_bsz {B}, fp32, "
            f"{res['params']:,} params; forward + fused head/CE/L2Wrap loss + backward + Adam(fused=True) step, "
            f"random tokens; "
            f"{args.warmup} warm-up + {args.steps} timed steps\n"
            f"- throughput: {res['tokens_per_s']:.0f} tokens/s steady state (median step "
            f"{res['step_ms_median']:.0f} ms; mean {res['tokens_per_s_mean']:.0f} tokens/s)\n"
            f"- peak RSS (whole process, ru_maxrss): {res['peak_rss_gb']:.2f} GB\n"
            f"- target (>= {TARGET_TOKS:.0f} tokens/s at <= {TARGET_RSS_GB:.0f} GB): "
            f"{'met' if met else 'NOT met'}\n"
        )
        with open(RESULTS, "a", encoding="utf-8") as f:
            f.write(section)
        print(f"appended to {RESULTS}")
    return res


if __name__ == "__main__":
    main()
