"""Time the WKV7 CUDA op alone (forward, backward, forward+backward) and
flash-linear-attention's chunk_rwkv7 on the same inputs.

    PYTHONPATH=RWKV-v7 python3 benchmarks/bench_wkv.py [--B 16 --T 4096 --H 12]
        [--results benchmarks/RESULTS.md] [--no-fla] [--variants]

Default problem: B 16, T 4096, H 12, N 64, bf16 (the 0.1B model's C = 768 at
a 4k context). Inputs follow the model's distributions (see
tests/test_wkv_cuda.py). Timings are medians of triton.testing.do_bench
(CUDA events). fla takes log-decay: we pass w_fla = -exp(w) in bf16, scale 1,
layout (B, T, H, N) - the same tensors viewed, no copies.

--variants also times every kernel configuration built with
WKV7_ALL_VARIANTS (ids documented in RWKV-v7/cuda/wkv7_cuda.cu) and checks
each against an fp64 reference. --results appends a dated markdown section.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
try:
    import rwkvlm  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT / "RWKV-v7"))

from rwkvlm.ops.wkv7.cuda import load_extension, wkv7_cuda  # noqa: E402

ROW_CFGS = {0: "RB32 RPT1 CPT16 (128 thr, 2 blk/head)", 1: "RB64 RPT1 CPT16 (256 thr, 1 blk/head)",
            2: "RB32 RPT2 CPT16 (64 thr, 2 blk/head)", 3: "RB32 RPT2 CPT8 (128 thr, 2 blk/head)",
            4: "RB64 RPT1 CPT64 (64 thr, thread per row)", 5: "RB16 RPT1 CPT16 (64 thr, 4 blk/head)",
            6: "RB32 RPT4 CPT8 (64 thr, 2 blk/head)", 7: "RB16 RPT2 CPT16 (32 thr, 4 blk/head)",
            8: "RB64 RPT4 CPT16 (64 thr, 1 blk/head)", 9: "RB32 RPT4 CPT16 (32 thr, 2 blk/head)",
            10: "RB64 RPT2 CPT16 (128 thr, 1 blk/head)"}
COL_CFGS = {0: "CB32 RH4 1col (128 thr, 2 blk/head)", 1: "CB32 RH2 1col (64 thr, 2 blk/head)",
            2: "CB16 RH4 1col (64 thr, 4 blk/head)", 3: "CB64 RH2 1col (128 thr, 1 blk/head)",
            4: "CB32 RH4 2col (64 thr, 2 blk/head)", 5: "CB64 RH4 2col (128 thr, 1 blk/head)",
            6: "CB16 RH4 2col (32 thr, 4 blk/head)"}
DEFAULT_ROW, DEFAULT_COL = 2, 0


def make_inputs(B, T, H, N=64, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rn(*s):
        return torch.randn(*s, generator=g)

    shape = (B, T, H, N)
    r, k, v = rn(*shape), rn(*shape), rn(*shape)
    w = -F.softplus(-rn(*shape)) - 0.5
    kk = F.normalize(rn(*shape), dim=-1)
    a = -kk
    b = kk * torch.sigmoid(rn(*shape))
    return [x.reshape(B, T, H * N).to("cuda", torch.bfloat16).contiguous() for x in (r, w, k, v, a, b)]


def rel_rms(x, ref):
    x, ref = x.double(), ref.double()
    return ((x - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def bench(fn, warmup=25, rep=200):
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def ref_fp64(xs, dy, N=64):
    from rwkvlm.ops.wkv7 import wkv7_reference

    leaves = [x.detach().double().requires_grad_() for x in xs]
    y = wkv7_reference(*leaves, head_size=N)[0]
    y.backward(dy.double())
    return y.detach(), [x.grad for x in leaves]


def ours_grads(xs, dy, cfg=("default", -1, -1, -1)):
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    y = wkv7_cuda(*leaves, _cfg=cfg)
    y.backward(dy)
    return y.detach(), [x.grad for x in leaves]


def fla_fn():
    from fla.ops.rwkv7 import chunk_rwkv7

    def run(r, w, k, v, a, b, B, T, H, N, lower_bound=None):
        # w here is already the log-decay (-exp(w_model))
        kw = {} if lower_bound is None else {"lower_bound": lower_bound}
        o, _ = chunk_rwkv7(*(x.view(B, T, H, N) for x in (r, w, k, v, a, b)), scale=1.0,
                           output_final_state=False, **kw)
        return o.reshape(B, T, H * N)

    return run


def fla_grads(run, xs, dy, B, T, H, N, lower_bound=None):
    r, w, k, v, a, b = [x.detach().clone().requires_grad_() for x in xs]
    wl = (-torch.exp(w.float())).to(torch.bfloat16)
    y = run(r, wl, k, v, a, b, B, T, H, N, lower_bound)
    y.backward(dy)
    return y.detach(), [r.grad, w.grad, k.grad, v.grad, a.grad, b.grad]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--H", type=int, default=12)
    ap.add_argument("--results", type=str, default=None, help="append a dated markdown section here")
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--variants", action="store_true", help="time every compiled kernel configuration")
    ap.add_argument("--rows", type=str, default=None, help="row cfg ids to time, e.g. 2,6,7 (default all)")
    ap.add_argument("--cols", type=str, default=None, help="col cfg ids to time (default all)")
    ap.add_argument("--fla-first", action="store_true",
                    help="run fla's first call (Triton compile + autotune, minutes) before anything else")
    ap.add_argument("--fla-budget-s", type=float, default=240.0, help="skip fla's extra modes past this")
    args = ap.parse_args(argv)
    B, T, H, N = args.B, args.T, args.H, 64
    C = H * N
    dev = torch.cuda.get_device_name()
    lines = []

    def out(s=""):
        print(s, flush=True)
        lines.append(s)

    t_start = time.time()
    out(f"card: {dev}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
        f"SMs {torch.cuda.get_device_properties(0).multi_processor_count}")
    # copy bandwidth ceiling (read + write bytes)
    xbig = torch.empty(512 << 20, dtype=torch.uint8, device="cuda")
    ybig = torch.empty_like(xbig)
    ms = bench(lambda: ybig.copy_(xbig))
    copy_bw = 2 * xbig.numel() / ms / 1e6
    del xbig, ybig
    out(f"device-to-device copy: {copy_bw:.0f} GB/s (read+write)")

    xs = make_inputs(B, T, H, N)
    dy = torch.randn(B, T, C, generator=torch.Generator().manual_seed(1)).to("cuda", torch.bfloat16)
    if args.fla_first and not args.no_fla:
        try:
            run = fla_fn()
            t0 = time.time()
            ll = [x.detach().clone().requires_grad_() for x in xs]
            ll[1] = (-torch.exp(xs[1].float())).to(torch.bfloat16).requires_grad_()
            run(*ll, B, T, H, N).backward(dy)
            torch.cuda.synchronize()
            out(f"fla chunk_rwkv7 (default) first call (compile/autotune): {time.time() - t0:.1f} s")
            del ll
        except Exception as e:  # noqa: BLE001
            out(f"fla warm-up failed: {type(e).__name__}: {str(e)[:300]}")
    t0 = time.time()
    load_extension(N, "default")
    out(f"default build load: {time.time() - t0:.1f} s (0 if cached)")

    r, w, k, v, a, b = xs
    ms_bytes_fwd = (6 * 2 + 2 + 4) * B * T * C + 4 * B * H * (T // 16) * N * N
    ms_bytes_bwd = (7 * 2 + 6 * 2 + 3 * 4 + 4 * 2 + 2 * 2 + 4) * B * T * C + 4 * B * H * (T // 16) * N * N
    out(f"problem B{B} T{T} H{H} N{N} bf16; minimum DRAM bytes fwd {ms_bytes_fwd / 1e9:.2f} GB "
        f"({ms_bytes_fwd / copy_bw / 1e6:.3f} ms at copy rate), bwd ~{ms_bytes_bwd / 1e9:.2f} GB "
        f"({ms_bytes_bwd / copy_bw / 1e6:.3f} ms)")

    rows = []   # (name, fwd ms, fwd+bwd ms)

    def timed_autograd(fn_fwd, leaves):
        def fb():
            for x in leaves:
                x.grad = None
            y = fn_fwd()
            y.backward(dy)
        with torch.no_grad():
            t_f = bench(fn_fwd)
        t_fb = bench(fb)
        return t_f, t_fb

    # ---- ours, default configuration, through the autograd Function
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    t_f, t_fb = timed_autograd(lambda: wkv7_cuda(*leaves), leaves)
    rows.append(("ours (default cfg)", t_f, t_fb))
    out(f"ours default: fwd {t_f:.3f} ms, fwd+bwd {t_fb:.3f} ms")

    if args.variants:
        t0 = time.time()
        ops = load_extension(N, "all")
        out(f"all-variants build: {time.time() - t0:.1f} s")
        # correctness of every configuration on a small problem vs fp64
        sx = make_inputs(2, 512, 3, N, seed=3)
        sdy = torch.randn(2, 512, 3 * N).to("cuda", torch.bfloat16)
        y_ref, g_ref = ref_fp64(sx, sdy, N)
        row_ids = [int(x) for x in args.rows.split(",")] if args.rows else list(ROW_CFGS)
        col_ids = [int(x) for x in args.cols.split(",")] if args.cols else list(COL_CFGS)
        combos = [(rc, DEFAULT_COL) for rc in row_ids] + [(DEFAULT_ROW, cc) for cc in col_ids]
        for rc, cc in dict.fromkeys(combos):
            y_, g_ = ours_grads(sx, sdy, ("all", rc, rc, cc))
            errs = [rel_rms(y_, y_ref)] + [rel_rms(g, gr) for g, gr in zip(g_, g_ref)]
            ok = all(e <= 5e-3 for e in errs) and all(torch.isfinite(g).all() for g in g_)
            out(f"  check row cfg {rc} col cfg {cc}: max rel-rms {max(errs):.2e} {'ok' if ok else 'FAIL'}")
        # kernel-level timings
        out("")
        out(f"| kernel config | forward ms | backward ms (rows cfg varied, cols {DEFAULT_COL}) |")
        out("|---|---|---|")
        y0, sT, sa = ops.forward(r, w, k, v, a, b, True, DEFAULT_ROW)
        best_r, best_c = (None, 1e9), (None, 1e9)
        for rc in row_ids:
            desc = ROW_CFGS[rc]
            tf = bench(lambda: ops.forward(r, w, k, v, a, b, True, rc))
            tb = bench(lambda: ops.backward(r, w, k, v, a, b, dy, sT, sa, rc, DEFAULT_COL))
            out(f"| row {rc}: {desc} | {tf:.3f} | {tb:.3f} |")
            if tf + tb < best_r[1]:
                best_r = (rc, tf + tb)
        out("")
        out(f"| cols config | backward ms (rows cfg {DEFAULT_ROW}) |")
        out("|---|---|")
        for cc in col_ids:
            desc = COL_CFGS[cc]
            tb = bench(lambda: ops.backward(r, w, k, v, a, b, dy, sT, sa, DEFAULT_ROW, cc))
            out(f"| col {cc}: {desc} | {tb:.3f} |")
            if tb < best_c[1]:
                best_c = (cc, tb)
        out(f"best: row cfg {best_r[0]}, col cfg {best_c[0]}")
        cfg = ("all", best_r[0], best_r[0], best_c[0])
        t_f, t_fb = timed_autograd(lambda: wkv7_cuda(*leaves, _cfg=cfg), leaves)
        rows.append((f"ours (row {best_r[0]}, col {best_c[0]})", t_f, t_fb))
        del sT, sa, y0

    # ---- fla
    fla_note = ""
    if not args.no_fla:
        try:
            run = fla_fn()
            fr, fw, fk, fv, fa, fb_ = [x.detach().clone().requires_grad_() for x in xs]
            fwl = (-torch.exp(w.float())).to(torch.bfloat16).requires_grad_()
            fl = [fr, fwl, fk, fv, fa, fb_]
            modes = [("fla chunk_rwkv7 (default)", None), ("fla chunk_rwkv7 (lower_bound=-0.62)", -0.62)]
            for name, lb in modes:
                if time.time() - t_start > args.fla_budget_s and lb is not None:
                    out(f"{name}: skipped (time budget)")
                    continue
                t0 = time.time()
                run(*fl, B, T, H, N, lb).sum().backward()   # compile / autotune outside the timing
                torch.cuda.synchronize()
                out(f"{name}: first call here (compile/autotune unless warmed up) {time.time() - t0:.1f} s")
                t_f, t_fb = timed_autograd(lambda: run(*fl, B, T, H, N, lb), fl)
                rows.append((name, t_f, t_fb))
            # errors: fla vs ours at the benchmark size
            y_o, g_o = ours_grads(xs, dy)
            y_f, g_f = fla_grads(run, xs, dy, B, T, H, N)
            out("fla vs ours (bench size): " + ", ".join(
                f"{nm}: rel-rms {rel_rms(f, o):.2e} max|diff| {(f.float() - o.float()).abs().max().item():.3g}"
                for nm, f, o in zip(["y", "dr", "dw", "dk", "dv", "da", "db"], [y_f] + g_f, [y_o] + g_o)))
            del y_o, g_o, y_f, g_f
            # both against fp64 on a smaller problem
            sx = make_inputs(2, 1024, 4, N, seed=9)
            sdy = torch.randn(2, 1024, 4 * N).to("cuda", torch.bfloat16)
            y_ref, g_ref = ref_fp64(sx, sdy, N)
            y_o, g_o = ours_grads(sx, sdy)
            y_f, g_f = fla_grads(run, sx, sdy, 2, 1024, 4, N)
            for nm, (yy, gg) in (("ours", (y_o, g_o)), ("fla", (y_f, g_f))):
                out(f"{nm} vs fp64 (B2 T1024 H4): " + " ".join(
                    f"{n}={rel_rms(x, xr):.1e}" for n, x, xr in
                    zip(["y", "dr", "dw", "dk", "dv", "da", "db"], [yy] + gg, [y_ref] + g_ref)))
        except Exception as e:  # noqa: BLE001
            fla_note = f"fla failed: {type(e).__name__}: {str(e)[:500]}"
            out(fla_note)

    out("")
    out(f"| B{B} T{T} H{H} N{N} bf16 on {dev} | forward ms | forward+backward ms |")
    out("|---|---|---|")
    for name, tf, tfb in rows:
        out(f"| {name} | {tf:.3f} | {tfb:.3f} |")

    if args.results:
        cmd = "PYTHONPATH=RWKV-v7 python3 benchmarks/bench_wkv.py " + " ".join(argv if argv else sys.argv[1:])
        sec = [f"\n## WKV7 CUDA vs fla chunk_rwkv7 — {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
               "", f"- card: {dev}", f"- command: `{cmd}`", "", "```"] + lines + ["```", ""]
        with open(args.results, "a", encoding="utf-8") as f:
            f.write("\n".join(sec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
