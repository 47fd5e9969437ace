"""Time the WKV6 CUDA op (forward, forward+backward) against flash-linear-attention's
chunk_rwkv6 and RWKV-LM's own wkv6 kernel on the same inputs.

    PYTHONPATH=RWKV-v7 python3 benchmarks/bench_wkv6.py --out OUTDIR
        [--B 16 --T 4096 --H 12] [--rwkvlm-cuda PATH/TO/RWKV-LM/RWKV-v5/cuda] [--no-fla] [--variants]

Default problem: B 16, T 4096, H 12, N 64, bf16 (the 0.1B model's C = 768 at a 4k context).
Inputs follow the x060 model's distributions (tests/wkvkit.py make_inputs6: r, k, v ~ randn,
w spread like time_decay's init plus LoRA noise, u ~ 0.5 randn). Timings are medians of
triton.testing.do_bench (CUDA events), through benchmarks/bench_wkv.py's `bench`.

- ours: rwkvlm.ops.wkv6.cuda.wkv6_cuda through autograd, and the bare kernels
  (ops.forward / ops.backward) without it. u goes in as fp32, r, k, v, w as bf16.
- fla (timed last: its first call compiles and autotunes for minutes): fla.ops.rwkv6.chunk_rwkv6(r, k, v, w_log, u, scale=1.0) with the layout (B, T, H, N)
  (the same tensors viewed) and w_log = -exp(w) in bf16 (fla takes the log-decay); skipped
  with a message when fla does not import. Its first call compiles and autotunes (minutes).
- RWKV-LM: RWKV-v5/cuda/wkv6_op.cpp + wkv6_cuda.cu from --rwkvlm-cuda, compiled here with its
  own flags (-D_N_=64 -D_T_=T) plus -gencode for this card, called as RWKV-LM's WKV_6
  Function does (bf16 everything, u (H, N), gu per batch summed); skipped when not given.

Accuracy: every implementation against the fp64 reference (rwkvlm.ops.wkv6.wkv6_reference)
of the inputs it actually sees, on B2 T1024 H4 (fla: w recovered from its bf16 log-decay),
and the implementations against ours at the benchmark size. --variants also times every
kernel configuration of the WKV6_ALL_VARIANTS build and checks each against fp64.

Writes OUTDIR/bench_wkv6.json and prints a table with the card's name.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench_wkv (timing helper)
sys.path.insert(0, str(ROOT / "tests"))                    # wkvkit (input makers)
if importlib.util.find_spec("rwkvlm") is None:
    sys.path.insert(0, str(ROOT / "RWKV-v7"))

from bench_wkv import bench, rel_rms  # noqa: E402
from rwkvlm.ops.wkv6 import wkv6_reference  # noqa: E402
from rwkvlm.ops.wkv6.cuda import load_extension, wkv6_cuda  # noqa: E402
import wkvkit  # noqa: E402

N = 64
ROW_CFGS = {0: "RB32 RPT2 CPT16 (64 thr, 2 blk/head)", 1: "RB64 RPT2 CPT16 (128 thr, 1 blk/head)",
            2: "RB16 RPT1 CPT16 (64 thr, 4 blk/head)", 3: "RB32 RPT1 CPT16 (128 thr, 2 blk/head)",
            4: "RB32 RPT4 CPT8 (64 thr, 2 blk/head)", 5: "RB64 RPT4 CPT16 (64 thr, 1 blk/head)",
            6: "RB16 RPT2 CPT8 (64 thr, 4 blk/head)"}
COL_CFGS = {0: "CB32 RH4 2col (64 thr, 2 blk/head)", 1: "CB32 RH4 1col (128 thr, 2 blk/head)",
            2: "CB16 RH4 1col (64 thr, 4 blk/head)", 3: "CB64 RH4 2col (128 thr, 1 blk/head)",
            4: "CB16 RH4 2col (32 thr, 4 blk/head)", 5: "CB32 RH8 4col (64 thr, 2 blk/head)",
            6: "CB32 RH2 2col (32 thr, 2 blk/head)"}
GRAD_NAMES = ("dr", "dk", "dv", "dw", "du")


def make_inputs(B, T, H, seed=0):
    """r, k, v, w bf16 (B, T, C) and u fp32 (H, N) on the GPU (u's values are bf16-exact)."""
    r, k, v, w, u = wkvkit.make_inputs6(B, T, H, N, seed=seed)
    xs = [x.to("cuda", torch.bfloat16).contiguous() for x in (r, k, v, w)]
    return xs + [u.to(torch.bfloat16).to("cuda", torch.float32)]


def ref_fp64(xs, dy):
    leaves = [x.detach().double().requires_grad_() for x in xs]
    y, _ = wkv6_reference(*leaves, N)
    y.backward(dy.double())
    return y.detach(), [x.grad for x in leaves]


def ours_grads(xs, dy, cfg=("default", -1, -1, -1)):
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    y = wkv6_cuda(*leaves, _cfg=cfg)
    y.backward(dy)
    return y.detach(), [x.grad for x in leaves]


def fla_fn():
    from fla.ops.rwkv6 import chunk_rwkv6

    def run(r, k, v, w_log, u, B, T, H):
        o, _ = chunk_rwkv6(*(x.view(B, T, H, N) for x in (r, k, v, w_log)), u, scale=1.0,
                           output_final_state=False)
        return o.reshape(B, T, H * N)

    return run


def fla_grads(run, xs, dy, B, T, H):
    """Gradients with respect to r, k, v, w (through w_log = -exp(w), rounded to bf16) and u."""
    r, k, v, w = [x.detach().clone().requires_grad_() for x in xs[:4]]
    u = xs[4].detach().to(torch.bfloat16).requires_grad_()
    w_log = (-torch.exp(w.float())).to(torch.bfloat16)
    y = run(r, k, v, w_log, u, B, T, H)
    y.backward(dy)
    return y.detach(), [r.grad, k.grad, v.grad, w.grad, u.grad]


def load_rwkvlm(cuda_dir: Path, T: int, build_dir: Path):
    """Compile RWKV-LM's wkv6 kernel (its own flags plus -gencode for this card); torch.ops.wkv6."""
    from torch.utils.cpp_extension import load

    major, minor = torch.cuda.get_device_capability()
    build_dir.mkdir(parents=True, exist_ok=True)
    load(name="wkv6", sources=[str(cuda_dir / "wkv6_op.cpp"), str(cuda_dir / "wkv6_cuda.cu")],
         is_python_module=False, verbose=False, build_directory=str(build_dir),
         extra_cuda_cflags=[f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}", "-res-usage",
                            "--use_fast_math", "-O3", "-Xptxas -O3", "--extra-device-vectorization",
                            f"-D_N_={N}", f"-D_T_={T}"])
    return torch.ops.wkv6


def rwkvlm_calls(ops, xs, dy, B, T, H):
    """(forward(), forward_backward()) calling RWKV-LM's ops the way its WKV_6 Function does."""
    r, k, v, w = xs[:4]
    u = xs[4].to(torch.bfloat16).contiguous()  # (H, N)
    C = H * N

    def fwd():
        y = torch.empty((B, T, C), device=r.device, dtype=torch.bfloat16)
        ops.forward(B, T, C, H, r, k, v, w, u, y)
        return y

    def bwd():
        gr, gk, gv, gw = (torch.empty((B, T, C), device=r.device, dtype=torch.bfloat16) for _ in range(4))
        gu = torch.empty((B, C), device=r.device, dtype=torch.bfloat16)
        ops.backward(B, T, C, H, r, k, v, w, u, dy, gr, gk, gv, gw, gu)
        return gr, gk, gv, gw, torch.sum(gu, 0).view(H, N)

    def fwd_bwd():
        return fwd(), bwd()

    return fwd, fwd_bwd


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--H", type=int, default=12)
    ap.add_argument("--out", type=Path, required=True, help="folder for bench_wkv6.json")
    ap.add_argument("--rwkvlm-cuda", type=Path, default=None,
                    help="RWKV-LM's RWKV-v5/cuda folder (wkv6_op.cpp, wkv6_cuda.cu); skipped when not given")
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--variants", action="store_true", help="time every compiled kernel configuration")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_wkv6: needs a CUDA GPU", file=sys.stderr)
        return 2
    B, T, H = args.B, args.T, args.H
    C = H * N
    args.out.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name()
    result = {"card": card, "torch": torch.__version__, "cuda": torch.version.cuda,
              "sms": torch.cuda.get_device_properties(0).multi_processor_count,
              "problem": {"B": B, "T": T, "H": H, "N": N, "dtype": "bf16"}, "timings_ms": [], "accuracy": {},
              "notes": []}

    def note(s):
        print(s, flush=True)
        result["notes"].append(s)

    print(f"card: {card}; torch {torch.__version__} (CUDA {torch.version.cuda}); SMs {result['sms']}", flush=True)
    xs = make_inputs(B, T, H)
    dy = torch.randn(B, T, C, generator=torch.Generator().manual_seed(1)).to("cuda", torch.bfloat16)
    sx = make_inputs(2, 1024, 4, seed=9)
    sdy = torch.randn(2, 1024, 4 * N, generator=torch.Generator().manual_seed(2)).to("cuda", torch.bfloat16)
    y_ref, g_ref = ref_fp64(sx, sdy)

    def vs_ref(name, y, grads):
        errs = {"y": rel_rms(y, y_ref)}
        errs.update({n: rel_rms(g, gr) for n, g, gr in zip(GRAD_NAMES, grads, g_ref)})
        result["accuracy"][f"{name} vs fp64 (B2 T1024 H4)"] = errs
        print(f"{name} vs fp64 (B2 T1024 H4): " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()), flush=True)

    def timed(name, fwd, fwd_bwd, leaves=()):
        def fb():
            for x in leaves:
                x.grad = None
            fwd_bwd()
        with torch.no_grad():
            t_f = bench(fwd)
        t_fb = bench(fb)
        result["timings_ms"].append({"name": name, "fwd": t_f, "fwd_bwd": t_fb})
        print(f"{name}: fwd {t_f:.3f} ms, fwd+bwd {t_fb:.3f} ms", flush=True)

    def save():  # after each part: a run stopped at its time limit keeps what it measured
        out = args.out / "bench_wkv6.json"
        out.write_text(json.dumps(result, indent=1))
        return out

    # ---- ours
    t0 = time.time()
    ops = load_extension(N, "default")
    note(f"ours: default build load {time.time() - t0:.1f} s (0 if cached)")
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    timed("ours wkv6_cuda (autograd)", lambda: wkv6_cuda(*leaves), lambda: wkv6_cuda(*leaves).backward(dy), leaves)
    uk = xs[4].reshape(-1).contiguous()
    timed("ours kernels only", lambda: ops.forward(*xs[:4], uk, -1),
          lambda: (ops.forward(*xs[:4], uk, -1), ops.backward(*xs[:4], uk, dy, -1, -1)))
    y_o, g_o = ours_grads(sx, sdy)
    vs_ref("ours", y_o, g_o)
    yb_o, gb_o = ours_grads(xs, dy)

    if args.variants:
        t0 = time.time()
        ops_all = load_extension(N, "all")
        note(f"ours: all-variants build {time.time() - t0:.1f} s")
        # the rows kernel runs the forward and the backward's dv pass, the columns kernel the
        # backward's dr / dk passes: each varied with the other at its default
        combos = [(rc, 0) for rc in ROW_CFGS] + [(0, cc) for cc in COL_CFGS if cc]
        t_fwd, t_bwd = {}, {}
        for rc, cc in combos:
            y_, g_ = ours_grads(sx, sdy, ("all", rc, rc, cc))
            worst = max([rel_rms(y_, y_ref)] + [rel_rms(g, gr) for g, gr in zip(g_, g_ref)])
            t_fwd[rc] = bench(lambda: ops_all.forward(*xs[:4], uk, rc))
            t_bwd[rc, cc] = bench(lambda: ops_all.backward(*xs[:4], uk, dy, rc, cc))
            result["timings_ms"].append({"name": f"ours kernels rows {rc} ({ROW_CFGS[rc]}), cols {cc} ({COL_CFGS[cc]})",
                                         "fwd": t_fwd[rc], "fwd_bwd": t_fwd[rc] + t_bwd[rc, cc],
                                         "bwd": t_bwd[rc, cc], "max_rel_rms_vs_fp64": worst})
            print(f"  rows {rc} cols {cc}: fwd {t_fwd[rc]:.3f} bwd {t_bwd[rc, cc]:.3f} ms; max rel-rms vs fp64 "
                  f"{worst:.1e}{'' if worst <= 5e-3 else '  FAIL'}", flush=True)
        best_rows = min(ROW_CFGS, key=lambda rc: t_fwd[rc] + t_bwd[rc, 0])
        best_cols = min(COL_CFGS, key=lambda cc: t_bwd[0, cc])
        note(f"ours: fastest rows cfg {best_rows} ({ROW_CFGS[best_rows]}), fastest cols cfg {best_cols} "
             f"({COL_CFGS[best_cols]}); the build's defaults are rows 0, cols 0")
        cfg = ("all", best_rows, best_rows, best_cols)
        timed(f"ours wkv6_cuda (autograd, rows {best_rows}, cols {best_cols})", lambda: wkv6_cuda(*leaves, _cfg=cfg),
              lambda: wkv6_cuda(*leaves, _cfg=cfg).backward(dy), leaves)

    save()

    # ---- RWKV-LM's kernel
    if args.rwkvlm_cuda is None:
        note("RWKV-LM wkv6: skipped (give --rwkvlm-cuda PATH/TO/RWKV-LM/RWKV-v5/cuda)")
    else:
        t0 = time.time()
        try:
            rops = load_rwkvlm(args.rwkvlm_cuda, T, args.out / "rwkvlm_wkv6_build")
        except Exception as e:  # noqa: BLE001
            rops = None
            note(f"RWKV-LM wkv6: build failed ({type(e).__name__}: {str(e)[-500:]})")
        if rops is not None:
            note(f"RWKV-LM wkv6: build {time.time() - t0:.1f} s")
            fwd, fwd_bwd = rwkvlm_calls(rops, xs, dy, B, T, H)
            timed("RWKV-LM wkv6 kernels", fwd, fwd_bwd)
            yb_r, gb_r = fwd_bwd()
            result["accuracy"]["RWKV-LM vs ours (bench size)"] = {
                n: rel_rms(a, b) for n, a, b in zip(("y",) + GRAD_NAMES, [yb_r] + list(gb_r), [yb_o] + gb_o)}
            if T >= 1024:   # its backward keeps a per-thread array of _T_ - 2 floats: fine for T <= _T_
                y_r, g_r = rwkvlm_calls(rops, sx, sdy, 2, 1024, 4)[1]()
                vs_ref("RWKV-LM", y_r, list(g_r))

    save()

    # ---- flash-linear-attention
    if args.no_fla:
        note("fla: skipped (--no-fla)")
    else:
        try:
            run = fla_fn()
        except Exception as e:  # noqa: BLE001
            run = None
            note(f"fla: skipped, fla.ops.rwkv6.chunk_rwkv6 does not import ({type(e).__name__}: {str(e)[:200]})")
        if run is not None:
            fr, fk, fv = [x.detach().clone().requires_grad_() for x in xs[:3]]
            fw = (-torch.exp(xs[3].float())).to(torch.bfloat16).requires_grad_()
            fu = xs[4].to(torch.bfloat16).requires_grad_()
            fl = [fr, fk, fv, fw, fu]
            t0 = time.time()
            run(*fl, B, T, H).backward(dy)  # compile / autotune outside the timing
            torch.cuda.synchronize()
            note(f"fla: first call (compile / autotune) {time.time() - t0:.1f} s")
            timed("fla chunk_rwkv6", lambda: run(*fl, B, T, H), lambda: run(*fl, B, T, H).backward(dy), fl)
            y_f, g_f = fla_grads(run, sx, sdy, 2, 1024, 4)
            # fla's own fp64 reference: the w its bf16 log-decay stands for
            w_eff = torch.log(-(-torch.exp(sx[3].float())).to(torch.bfloat16).double())
            yr_f, gr_f = ref_fp64(sx[:3] + [w_eff, sx[4]], sdy)
            errs = {"y": rel_rms(y_f, yr_f)}
            errs.update({n: rel_rms(g, gr) for n, g, gr in zip(GRAD_NAMES, g_f, gr_f)})
            result["accuracy"]["fla vs fp64 of its inputs (B2 T1024 H4)"] = errs
            print("fla vs fp64 of its inputs (B2 T1024 H4): " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()))
            yb_f, gb_f = fla_grads(run, xs, dy, B, T, H)
            result["accuracy"]["fla vs ours (bench size)"] = {
                n: rel_rms(a, b) for n, a, b in zip(("y",) + GRAD_NAMES, [yb_f] + gb_f, [yb_o] + gb_o)}
            del fl, yb_f, gb_f

    print("")
    print(f"| B{B} T{T} H{H} N{N} bf16 on {card} | forward ms | forward+backward ms |")
    print("|---|---|---|")
    for t in result["timings_ms"]:
        print(f"| {t['name']} | {t['fwd']:.3f} | {t['fwd_bwd']:.3f} |")
    for k, errs in result["accuracy"].items():
        print(f"{k}: " + " ".join(f"{n}={v:.1e}" for n, v in errs.items()))
    print(f"wrote {save()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
