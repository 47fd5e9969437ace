"""WKV6 CUDA op (rwkvlm.ops.wkv6.cuda) against the per-step reference.

GPU tests (marked `gpu`) skip cleanly without CUDA. The tests at the bottom run anywhere:
the loader / validation checks, and the kernel source itself (RWKV-v7/cuda/wkv6_cuda.cu)
compiled for the CPU with g++, one coroutine per CUDA thread (the kernels' barriers, warp
shuffles and shared memory emulated; shared memory and every output poisoned with NaN
first), checked against the reference.

Inputs follow x060's distributions (tests/wkvkit.py make_inputs6: w = time_decay-like
spread + LoRA noise; "strong" and "mixed" decays exercise the kernel's direct path). The
reference runs in fp64 on the bf16-rounded inputs, and the check is
rms(out - ref) / rms(ref) <= 5e-3 for y and for all five input gradients (dr, dk, dv, dw
are bf16: their rounding alone is ~1.7e-3). Before each GPU call the CUDA caching
allocator is filled with NaN-poisoned blocks, so an element the kernels fail to write
shows up as NaN.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from rwkvlm.errors import UserError
from rwkvlm.ops.wkv6 import wkv6_reference

import wkvkit
from wkvkit import rel_rms

TOL = 5e-3
HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
GRADS = ("dr", "dk", "dv", "dw", "du")


def make_inputs(B, T, H, N=64, device="cuda", seed=0, dtype=torch.bfloat16, decay="model"):
    """r, k, v, w in `dtype`, u in fp32 (the kernel's u dtype)."""
    r, k, v, w, u = wkvkit.make_inputs6(B, T, H, N, device=device, seed=seed, decay=decay)
    return [x.to(dtype) for x in (r, k, v, w)] + [u]


def poison_allocator():
    """Leave NaN-filled freed blocks in both pools of the caching allocator."""
    torch.cuda.synchronize()
    junk = []
    for nbytes in (512, 4096, 65536, 512 * 1024):          # small pool (< 1 MiB)
        junk += [torch.empty(nbytes // 4, device="cuda").fill_(float("nan")) for _ in range(16)]
    for nbytes in (2 << 20, 32 << 20, 256 << 20):           # large pool
        junk += [torch.empty(nbytes // 4, device="cuda").fill_(float("nan")) for _ in range(2)]
    torch.cuda.synchronize()
    del junk


def run_cuda(xs, dy, head_size=64, cfg=None):
    from rwkvlm.ops.wkv6.cuda import wkv6_cuda

    leaves = [x.detach().clone().requires_grad_() for x in xs]
    poison_allocator()
    kw = {} if cfg is None else {"_cfg": cfg}
    y = wkv6_cuda(*leaves, head_size=head_size, **kw)
    poison_allocator()
    y.backward(dy)
    torch.cuda.synchronize()
    return y.detach(), [x.grad for x in leaves]


def run_ref(xs, dy, head_size=64):
    leaves = [x.detach().double().requires_grad_() for x in xs]
    y, _ = wkv6_reference(*leaves, head_size)
    y.backward(dy.double())
    return y.detach(), [x.grad for x in leaves]


def check(y, grads, y_ref, grads_ref, label, tol=TOL):
    errs = {"y": rel_rms(y, y_ref)}
    for nm, g, gr in zip(GRADS, grads, grads_ref):
        if gr is None:  # the reference's output does not depend on it (e.g. w at T = 1): a zero gradient
            gr = torch.zeros_like(g, dtype=torch.float64)
        errs[nm] = rel_rms(g, gr) if gr.abs().max() > 0 else float(g.abs().max())
    assert torch.isfinite(y).all(), f"{label}: NaN/inf in y (unwritten output?)"
    for nm, g in zip(GRADS, grads):
        assert g is not None and torch.isfinite(g).all(), f"{label}: NaN/inf in {nm}"
    print(f"{label}: " + " ".join(f"{k}={v:.2e}" for k, v in errs.items()))
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"{label}: relative RMS error above {tol}: {bad}"


def _dy(B, T, C, seed, dtype=torch.bfloat16):
    return torch.randn(B, T, C, generator=torch.Generator().manual_seed(seed)).to("cuda", dtype)


SHAPES = [(2, 1, 3), (1, 16, 1), (1, 17, 2), (2, 100, 3), (3, 256, 2), (1, 1024, 4), (2, 4000, 2), (1, 4096, 3)]


@gpu
@needs_cuda
@pytest.mark.parametrize("B,T,H", SHAPES)
def test_matches_reference(B, T, H):
    xs = make_inputs(B, T, H, seed=B * 1000 + T + H)
    dy = _dy(B, T, H * 64, T)
    y, grads = run_cuda(xs, dy)
    y_ref, grads_ref = run_ref(xs, dy)
    assert y.dtype == torch.bfloat16 and y.shape == (B, T, H * 64)
    assert grads[4].shape == (H, 64) and grads[4].dtype == torch.float32
    check(y, grads, y_ref, grads_ref, f"B{B} T{T} H{H}")


@gpu
@needs_cuda
@pytest.mark.parametrize("decay", ["strong", "mixed"])
@pytest.mark.parametrize("T", [100, 1024])
def test_strong_and_mixed_decays(decay, T):
    """Chunks whose decay exceeds the relative form's bound run the direct update (per chunk
    and block): both paths, alone and mixed within one call."""
    B, H = 2, 3
    xs = make_inputs(B, T, H, seed=T + 7, decay=decay)
    dy = _dy(B, T, H * 64, 3)
    y, grads = run_cuda(xs, dy)
    y_ref, grads_ref = run_ref(xs, dy)
    check(y, grads, y_ref, grads_ref, f"{decay} T{T}")


@gpu
@needs_cuda
@pytest.mark.parametrize("B,T,H,N,decay", [(1, 1, 1, 64, "model"), (2, 15, 3, 64, "model"), (1, 17, 2, 64, "mixed"),
                                           (3, 100, 2, 64, "model"), (2, 512, 4, 64, "mixed"),
                                           (2, 33, 3, 32, "model")])
def test_state_in_and_out_matches_reference(B, T, H, N, decay):
    """Inference from a given state: y and the final state against the fp64 reference, and two
    calls carrying the state equal one call over both pieces (prefill, then generation)."""
    from rwkvlm.ops.wkv6.cuda import wkv6_cuda_state

    xs = make_inputs(B, T, H, N=N, seed=T * 7 + N, decay=decay)
    s0 = 0.5 * torch.randn(B, H, N, N, generator=torch.Generator().manual_seed(T)).cuda()
    with torch.no_grad():
        poison_allocator()
        y, s1 = wkv6_cuda_state(*xs, initial_state=s0, head_size=N)
        torch.cuda.synchronize()
        y_ref, s_ref = wkv6_reference(*(x.double() for x in xs), N, state=s0.double())
    assert y.shape == (B, T, H * N) and y.dtype == torch.bfloat16 and s1.shape == (B, H, N, N)
    assert s1.dtype == torch.float32
    assert torch.isfinite(y).all() and torch.isfinite(s1).all()
    assert rel_rms(y, y_ref) <= TOL, rel_rms(y, y_ref)
    assert rel_rms(s1, s_ref) <= 1e-4, rel_rms(s1, s_ref)   # fp32 state from bf16 inputs: no rounding
    cut = T // 2
    with torch.no_grad():
        ya, sa = wkv6_cuda_state(*(x[:, :cut] for x in xs[:4]), xs[4], initial_state=s0, head_size=N)
        yb, sb = wkv6_cuda_state(*(x[:, cut:] for x in xs[:4]), xs[4], initial_state=sa, head_size=N)
    assert rel_rms(torch.cat([ya, yb], 1), y_ref) <= TOL and rel_rms(sb, s_ref) <= 1e-4
    with torch.no_grad():
        y0, s_zero = wkv6_cuda_state(*xs, head_size=N)
    y0_ref, s0_ref = wkv6_reference(*(x.double() for x in xs), N)
    assert rel_rms(y0, y0_ref) <= TOL and rel_rms(s_zero, s0_ref) <= 1e-4


@gpu
@needs_cuda
def test_state_op_refuses_gradients():
    from rwkvlm.ops.wkv6.cuda import wkv6_cuda_state

    xs = [x.requires_grad_() for x in make_inputs(1, 16, 1)]
    with pytest.raises(UserError, match="inference"):
        wkv6_cuda_state(*xs)


@gpu
@needs_cuda
def test_head_size_32():
    B, T, H = 2, 128, 3
    xs = make_inputs(B, T, H, N=32, seed=7, decay="mixed")
    dy = _dy(B, T, H * 32, 8)
    y, grads = run_cuda(xs, dy, head_size=32)
    y_ref, grads_ref = run_ref(xs, dy, head_size=32)
    check(y, grads, y_ref, grads_ref, "N32")


@gpu
@needs_cuda
def test_unaligned_T_and_fp32_inputs():
    """T not a multiple of 16 is padded; fp32 inputs come back as fp32 with fp32 grads."""
    B, T, H = 2, 100, 2
    xs = make_inputs(B, T, H, seed=3, dtype=torch.float32)
    dy = torch.randn(B, T, H * 64, device="cuda")
    y, grads = run_cuda(xs, dy)
    assert y.dtype == torch.float32 and y.shape == (B, T, H * 64)
    assert all(g.dtype == torch.float32 for g in grads)
    # reference on the bf16-rounded values the kernel actually sees (u is used in fp32)
    ref_in = [x.to(torch.bfloat16) for x in xs[:4]] + [xs[4]]
    y_ref, grads_ref = run_ref(ref_in, dy.to(torch.bfloat16).float())
    check(y, grads, y_ref, grads_ref, "T100 fp32")


@gpu
@needs_cuda
def test_no_grad_forward_equals_grad_forward():
    from rwkvlm.ops.wkv6.cuda import wkv6_cuda, wkv6_cuda_state

    xs = make_inputs(2, 512, 3, seed=11)
    with torch.no_grad():
        y0 = wkv6_cuda(*xs)
        y2, _ = wkv6_cuda_state(*xs)
    y1 = wkv6_cuda(*[x.clone().requires_grad_() for x in xs])
    assert torch.equal(y0, y1.detach()) and torch.equal(y0, y2)


@gpu
@needs_cuda
def test_compiled_op_matches_eager_call():
    """wkv6_op inside one torch.compile graph (with the casts and the padding of T = 100
    traced) gives the eager call's output and gradients."""
    from rwkvlm.ops.wkv6.cuda import wkv6_op

    xs = make_inputs(2, 100, 3, seed=13, dtype=torch.float32)
    dy = torch.randn(2, 100, 3 * 64, device="cuda")
    y0, g0 = run_cuda(xs, dy)

    def f(*leaves):
        return wkv6_op(*leaves, 64, "cuda")

    torch._dynamo.reset()
    fc = torch.compile(f, fullgraph=True, dynamic=False)
    leaves = [x.clone().requires_grad_() for x in xs]
    poison_allocator()
    y1 = fc(*leaves)
    y1.backward(dy)
    assert y1.dtype == torch.float32
    check(y1.detach(), [x.grad for x in leaves], y0, g0, "compiled vs eager", tol=1e-6)


@gpu
@needs_cuda
def test_deterministic():
    """Same inputs, same bits: no race between warps or blocks (no atomics anywhere)."""
    xs = make_inputs(2, 256, 4, seed=5, decay="mixed")
    dy = _dy(2, 256, 256, 6)
    y0, g0 = run_cuda(xs, dy)
    y1, g1 = run_cuda(xs, dy)
    assert torch.equal(y0, y1)
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)


@gpu
@needs_cuda
def test_dispatcher_uses_the_kernels(monkeypatch):
    import rwkvlm.ops.wkv6.cuda as wc
    from rwkvlm.ops.wkv6 import wkv6

    calls = []
    for name in ("wkv6_cuda", "wkv6_cuda_state"):
        real = getattr(wc, name)
        monkeypatch.setattr(wc, name, lambda *a, _real=real, _n=name, **k: calls.append(_n) or _real(*a, **k))
    B, T, H, N = 2, 45, 2, 64
    xs = make_inputs(B, T, H, seed=37)
    s0 = 0.3 * torch.randn(B, H, N, N, generator=torch.Generator().manual_seed(5)).cuda()
    y_ref, s_ref = wkv6_reference(*(x.double() for x in xs), N, state=s0.double())
    with torch.no_grad():
        y, s = wkv6(*xs, N, initial_state=s0)
        y_train, none = wkv6(*xs, N)
    assert calls == ["wkv6_cuda_state", "wkv6_cuda"] and none is None
    assert rel_rms(y, y_ref) < TOL and rel_rms(s, s_ref) < 1e-4
    # a state that needs gradients takes the chunked path (differentiable in the state)
    s_leaf = s0.clone().requires_grad_()
    y_c, s_c = wkv6(*xs, N, initial_state=s_leaf)
    (y_c.float().sum() + s_c.sum()).backward()
    assert calls == ["wkv6_cuda_state", "wkv6_cuda"] and s_leaf.grad is not None


@gpu
@needs_cuda
def test_every_kernel_variant_matches_reference():
    """The benchmark build (WKV6_ALL_VARIANTS): every rows / columns configuration."""
    from rwkvlm.ops.wkv6.cuda import load_extension

    load_extension(64, "all")
    xs = make_inputs(2, 96, 3, seed=41, decay="mixed")
    dy = _dy(2, 96, 192, 9)
    y_ref, grads_ref = run_ref(xs, dy)
    for rows in range(7):
        for cols in ([0] if rows else range(7)):
            y, grads = run_cuda(xs, dy, cfg=("all", rows, rows, cols))
            check(y, grads, y_ref, grads_ref, f"rows {rows} cols {cols}")


# ---------------------------------------------------------------- no GPU needed

def test_import_builds_nothing(tmp_path):
    """The kernel compiles on first use only: importing the op and running WKV6 on CPU (the
    torch path, the custom op's PyTorch path) never calls the extension builder."""
    code = (
        "import torch, torch.utils.cpp_extension as ce\n"
        "def refuse(*a, **k): raise SystemExit('the extension builder was called')\n"
        "ce.load = refuse\n"
        "import rwkvlm.ops.wkv6.cuda as wc\n"
        "from rwkvlm.ops.wkv6 import wkv6\n"
        "x = torch.randn(1, 20, 64); u = torch.randn(1, 64)\n"
        "wkv6(x, x, x, -x.abs(), u, 64)\n"
        "wc.wkv6_op(x, x, x, -x.abs(), u, 64)\n"
        "assert wc._ops == {}\n"
    )
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (tmp_path / "ext").exists()


def test_rejects_cpu_and_bad_shapes():
    from rwkvlm.ops.wkv6.cuda import wkv6_cuda, wkv6_cuda_state, wkv6_op

    x = torch.zeros(1, 16, 64)
    u = torch.zeros(1, 64)
    with pytest.raises(UserError, match="CUDA"):
        wkv6_cuda(x, x, x, x, u)
    with pytest.raises(UserError, match="shape"):
        wkv6_cuda(x, x, x, torch.zeros(1, 16, 128), u)
    with pytest.raises(UserError, match="head_size"):
        wkv6_cuda(x, x, x, x, u, head_size=48)
    with pytest.raises(UserError, match="u must be"):
        wkv6_cuda(x, x, x, x, torch.zeros(2, 32))
    with pytest.raises(UserError, match="CUDA"):
        wkv6_op(x, x, x, x, u, 64, "cuda")
    with torch.no_grad(), pytest.raises(UserError, match="CUDA"):
        wkv6_cuda_state(x, x, x, x, u)


def test_stale_lock_detected(tmp_path):
    """The shared build helper (rwkvlm/ops/build.py) that both CUDA ops use."""
    from rwkvlm.ops.build import check_stale_lock

    (tmp_path / "build.ninja").write_text("")
    lock = tmp_path / "lock"
    lock.write_text("")
    check_stale_lock(tmp_path, "WKV6 CUDA")          # fresh lock: another build may be running
    old = time.time() - 3600
    for p in tmp_path.iterdir():
        os.utime(p, (old, old))
    with pytest.raises(UserError, match="WKV6 CUDA build directory"):
        check_stale_lock(tmp_path, "WKV6 CUDA")
    lock.unlink()
    check_stale_lock(tmp_path, "WKV6 CUDA")          # no lock: nothing to say


def test_kernel_sources_are_found_from_the_module():
    """The build reads RWKV-v7/cuda/ relative to the op's module (no GPU needed to check the path)."""
    from rwkvlm.ops.wkv6.cuda import _CUDA_DIR, _SOURCES

    assert _CUDA_DIR.name == "cuda" and all((_CUDA_DIR / s).is_file() for s in _SOURCES), _CUDA_DIR


# ------------------------------------------------- the kernel source, emulated on the CPU

EMU_HARNESS = r"""
// CPU emulation of the WKV6 CUDA kernels: one ucontext coroutine per CUDA thread, the
// blocks of a grid one after another, shared memory poisoned with 0xFF (NaN) per block.
#include <ucontext.h>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) uint4 { uint32_t x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }
struct __nv_bfloat16 { uint16_t bits; };
inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float((uint32_t)h.bits << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u; std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(uint16_t)((u >> 16) | 0x40)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{(uint16_t)(u >> 16)};
}
inline float __expf(float x) { return std::exp(x); }

struct Copy { void* dst; const void* src; };
struct Emu {
    int nt = 0, block = 0, cur = 0;
    uint64_t rng = 0x9e3779b97f4a7c15ull;
    std::vector<ucontext_t> ctx;
    ucontext_t sched;
    std::vector<int> done;
    std::vector<int> wait_kind, wait_idx, wait_gen;      // per thread: the barrier it waits on
    std::vector<std::vector<Copy>> open;                 // per thread: copies of the open group
    std::vector<std::vector<std::vector<Copy>>> groups;  // per thread: committed, not yet landed
    int bar_count = 0, bar_gen = 0, or_acc = 0, or_result = 0;
    int warp_count[32] = {0}, warp_gen[32] = {0};
    float shfl[1024];
    unsigned char* smem = nullptr;
    std::function<void()> kern;
};
static Emu* E = nullptr;
struct Idx { int x; };
inline Idx emu_thread() { return Idx{E->cur}; }
inline Idx emu_block() { return Idx{E->block}; }
#define threadIdx (emu_thread())
#define blockIdx (emu_block())
#define WKV6_DYNAMIC_SMEM(name) unsigned char* name = E->smem

// a thread waiting at a barrier is resumed only once the barrier has opened
static inline void emu_wait(int kind, int idx, int gen) {
    const int t = E->cur;
    E->wait_kind[t] = kind; E->wait_idx[t] = idx; E->wait_gen[t] = gen;
    swapcontext(&E->ctx[t], &E->sched);
    E->wait_kind[t] = 0;
}
static inline bool emu_ready(int t) {
    if (E->wait_kind[t] == 1) return E->bar_gen != E->wait_gen[t];
    if (E->wait_kind[t] == 2) return E->warp_gen[E->wait_idx[t]] != E->wait_gen[t];
    return true;
}
inline void __syncthreads() {
    const int g = E->bar_gen;
    if (++E->bar_count == E->nt) { E->bar_count = 0; E->bar_gen++; }
    else emu_wait(1, 0, g);
}
inline int __syncthreads_or(int p) {
    if (p) E->or_acc = 1;
    const int g = E->bar_gen;
    if (++E->bar_count == E->nt) { E->or_result = E->or_acc; E->or_acc = 0; E->bar_count = 0; E->bar_gen++; }
    else emu_wait(1, 0, g);
    return E->or_result;
}
static inline void warp_barrier(int w) {
    const int g = E->warp_gen[w];
    if (++E->warp_count[w] == 32) { E->warp_count[w] = 0; E->warp_gen[w]++; }
    else emu_wait(2, w, g);
}
inline float __shfl_xor_sync(unsigned mask, float v, int o) {
    if (mask != 0xffffffffu) std::abort();
    const int t = E->cur, w = t >> 5, lane = t & 31;
    E->shfl[t] = v;
    warp_barrier(w);
    const float r = E->shfl[(w << 5) | (lane ^ o)];
    warp_barrier(w);
    return r;
}
static inline uint32_t emu_rand() {
    E->rng ^= E->rng << 13; E->rng ^= E->rng >> 7; E->rng ^= E->rng << 17;
    return (uint32_t)(E->rng >> 32);
}
static inline void land(std::vector<Copy>& g) {
    for (const Copy& c : g) std::memcpy(c.dst, c.src, 16);
    g.clear();
}
// cp.async: a committed group lands either at once or only when a wait requires it (chosen at
// random), the two extremes of what the hardware may do
inline void cp_async16(void* smem, const void* gmem) { E->open[E->cur].push_back(Copy{smem, gmem}); }
inline void cp_async_commit() {
    const int t = E->cur;
    if (emu_rand() & 1) land(E->open[t]);
    E->groups[t].push_back(std::move(E->open[t]));
    E->open[t].clear();
}
template <int n> inline void cp_async_wait() {
    auto& g = E->groups[E->cur];
    while ((int)g.size() > n) { land(g.front()); g.erase(g.begin()); }
}

#define WKV6_HOST_EMULATION 1
#include WKV6_SOURCE

static void trampoline(int tid) {
    E->kern();
    E->done[tid] = 1;
    swapcontext(&E->ctx[tid], &E->sched);
}

// Runs kern for every block of the grid; 0, or 1 on a deadlock (threads waiting on each other).
static int run_grid(int grid, int nt, size_t smem_bytes, std::function<void()> kern) {
    if (nt % 32 != 0 || nt > 1024) return 2;
    const size_t stack = 256 * 1024;
    std::vector<char> stacks((size_t)nt * stack);
    const size_t alloc = (smem_bytes + 63) / 64 * 64 + 64;
    unsigned char* smem = (unsigned char*)std::aligned_alloc(64, alloc);
    int rc = 0;
    for (int b = 0; b < grid && rc == 0; b++) {
        Emu e;
        E = &e;
        e.nt = nt; e.block = b; e.kern = kern; e.smem = smem;
        std::memset(smem, 0xff, alloc);
        e.rng ^= 0x2545f4914f6cdd1dull * (uint64_t)(b + 1);
        e.ctx.resize(nt);
        e.done.assign(nt, 0);
        e.wait_kind.assign(nt, 0); e.wait_idx.assign(nt, 0); e.wait_gen.assign(nt, 0);
        e.open.assign(nt, {});
        e.groups.assign(nt, {});
        for (int t = 0; t < nt; t++) {
            getcontext(&e.ctx[t]);
            e.ctx[t].uc_stack.ss_sp = &stacks[(size_t)t * stack];
            e.ctx[t].uc_stack.ss_size = stack;
            e.ctx[t].uc_link = nullptr;
            makecontext(&e.ctx[t], (void (*)())trampoline, 1, t);
        }
        // each pass resumes a random part of the threads, each warp at its own pace (1/2 or
        // 1/8 of the passes): threads drift apart as far as the kernel's barriers allow, so
        // a missing barrier shows up as a race
        uint32_t pace[32];
        for (int w = 0; w < nt / 32; w++) pace[w] = (emu_rand() & 1) ? 2u : 8u;
        for (bool any = true; any;) {
            any = false;
            bool ready = false;
            for (int t = 0; t < nt; t++) {
                if (e.done[t]) continue;
                any = true;
                if (!emu_ready(t)) continue;
                ready = true;
                if (emu_rand() % pace[t >> 5] != 0) continue;
                e.cur = t;
                swapcontext(&e.sched, &e.ctx[t]);
            }
            if (any && !ready) { rc = 1; break; }   // every live thread waits: a deadlock
        }
        E = nullptr;
    }
    std::free(smem);
    return rc;
}

using wkv6::bf16;
constexpr int N = WKV6_HEAD_SIZE;

template <int RB, int RPT, int CPT, bool REV>
static int rows(int B, int T, int H, const bf16* X, const bf16* K, const bf16* R, const bf16* w, const float* u,
                bf16* out, const float* s0, float* s_out) {
    constexpr int NT = (RB / RPT) * (N / CPT);
    return run_grid(B * H * (N / RB), NT, sizeof(wkv6::RowSmem<N, RB>), [=] {
        wkv6::wkv6_rows<N, RB, RPT, CPT, REV>(T, H, X, K, R, w, u, out, s0, s_out);
    });
}

template <int CB, int RH, int CPT2, int MODE>
static int cols(int B, int T, int H, const bf16* X, const bf16* Y, const bf16* Kc, const bf16* Oc, const bf16* w,
                const float* u, float* P, bf16* out, bf16* dw, float* du_b) {
    constexpr int NT = (CB / CPT2) * RH;
    return run_grid(B * H * (N / CB), NT, sizeof(wkv6::ColSmem<N, CB, RH>), [=] {
        wkv6::wkv6_cols<N, CB, RH, CPT2, MODE>(T, H, X, Y, Kc, Oc, w, u, P, out, dw, du_b);
    });
}

// The launch wiring of wkv6_cuda.cu's wkv6_launch_forward / _backward, for three of its
// configurations: cfg 0 = the defaults (rows 0, cols 0); cfg 1 = rows 4, cols 5; cfg 2 = rows 1, cols 1.
template <int RB, int RPT, int CPT, int CB, int RH, int CPT2>
static int fwd_bwd(bool fwd, int B, int T, int H, const bf16* r, const bf16* k, const bf16* v, const bf16* w,
                   const float* u, bf16* y, const float* s0, float* s_out, const bf16* dy, float* P, bf16* dr,
                   bf16* dk, bf16* dv, bf16* dw, float* du_b) {
    if (fwd) return rows<RB, RPT, CPT, false>(B, T, H, v, k, r, w, u, y, s0, s_out);
    int rc = cols<CB, RH, CPT2, 0>(B, T, H, v, dy, k, r, w, u, P, dr, nullptr, nullptr);
    if (!rc) rc = cols<CB, RH, CPT2, 1>(B, T, H, dy, v, r, k, w, u, P, dk, dw, du_b);
    if (!rc) rc = rows<RB, RPT, CPT, true>(B, T, H, dy, r, k, w, u, dv, nullptr, nullptr);
    return rc;
}

static int dispatch(int cfg, bool fwd, int B, int T, int H, const void* r, const void* k, const void* v,
                    const void* w, const float* u, void* y, const float* s0, float* s_out, const void* dy, float* P,
                    void* dr, void* dk, void* dv, void* dw, float* du_b) {
    auto args = [&](auto f) {
        return f(fwd, B, T, H, (const bf16*)r, (const bf16*)k, (const bf16*)v, (const bf16*)w, u, (bf16*)y, s0,
                 s_out, (const bf16*)dy, P, (bf16*)dr, (bf16*)dk, (bf16*)dv, (bf16*)dw, du_b);
    };
    if (cfg == 0) return args([](auto... a) { return fwd_bwd<32, 2, 16, 32, 4, 2>(a...); });
#if WKV6_HEAD_SIZE == 64
    if (cfg == 1) return args([](auto... a) { return fwd_bwd<32, 4, 8, 32, 8, 4>(a...); });
    if (cfg == 2) return args([](auto... a) { return fwd_bwd<64, 2, 16, 32, 4, 1>(a...); });
#endif
    return -1;
}

extern "C" int emu_forward(int cfg, int B, int T, int H, const void* r, const void* k, const void* v, const void* w,
                           const float* u, void* y, const float* s0, float* s_out) {
    return dispatch(cfg, true, B, T, H, r, k, v, w, u, y, s0, s_out, nullptr, nullptr, nullptr, nullptr, nullptr,
                    nullptr, nullptr);
}

extern "C" int emu_backward(int cfg, int B, int T, int H, const void* r, const void* k, const void* v,
                            const void* w, const float* u, const void* dy, float* P, void* dr, void* dk, void* dv,
                            void* dw, float* du_b) {
    return dispatch(cfg, false, B, T, H, r, k, v, w, u, nullptr, nullptr, nullptr, dy, P, dr, dk, dv, dw, du_b);
}
"""


@pytest.fixture(scope="session")
def emulated_kernel(tmp_path_factory):
    """build(N) -> ctypes library of the kernel source compiled for the CPU (g++, C++20)."""
    from rwkvlm.ops.wkv6.cuda import _CUDA_DIR

    gxx = shutil.which("g++")
    if gxx is None or not sys.platform.startswith("linux"):
        pytest.skip("needs g++ on Linux (ucontext) to emulate the kernel on the CPU")
    d = tmp_path_factory.mktemp("wkv6_emu")
    (d / "emu.cpp").write_text(EMU_HARNESS)
    libs = {}

    def build(N):
        if N not in libs:
            so = d / f"emu{N}.so"
            cmd = [gxx, "-std=c++20", "-O1", "-fPIC", "-shared", "-fno-strict-aliasing", "-Wno-unknown-pragmas",
                   f"-DWKV6_HEAD_SIZE={N}", f'-DWKV6_SOURCE="{_CUDA_DIR / "wkv6_cuda.cu"}"', str(d / "emu.cpp"),
                   "-o", str(so)]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if r.returncode != 0 and "c++20" in r.stderr:
                pytest.skip(f"g++ without C++20: {r.stderr[-300:]}")
            assert r.returncode == 0, r.stderr[-4000:]
            lib = ctypes.CDLL(str(so))
            p, i = ctypes.c_void_p, ctypes.c_int
            lib.emu_forward.argtypes = [i, i, i, i] + [p] * 8
            lib.emu_backward.argtypes = [i, i, i, i] + [p] * 12
            lib.emu_forward.restype = lib.emu_backward.restype = i
            libs[N] = lib
        return libs[N]

    return build


def _ptr(t):
    return None if t is None else t.data_ptr()


@pytest.mark.parametrize("N,cfg,B,T,H,decay", [
    (64, 0, 1, 48, 3, "mixed"),    # both update forms in one call, H = 3
    (64, 0, 1, 32, 2, "model"),
    (64, 1, 1, 64, 2, "strong"),   # rows 4 (RPT 4, CPT 8), cols 5 (RH 8, 4 columns per thread)
    (64, 2, 1, 48, 1, "mixed"),    # rows 1 (one block per head), cols 1 (one column per thread)
    (32, 0, 2, 48, 3, "mixed"),    # head size 32
])
def test_kernel_source_emulated_on_cpu(emulated_kernel, N, cfg, B, T, H, decay):
    """wkv6_cuda.cu's kernels, compiled for the CPU, against the fp64 reference: the training
    forward and the inference forward (y and the final state from an initial state), and the
    backward (dr, dk, dv, dw, du). Outputs start as NaN; the fp32 outputs (state, du) must
    match to fp32 precision, the bf16 ones to their rounding."""
    lib = emulated_kernel(N)
    C = H * N
    r, k, v, w, u = wkvkit.make_inputs6(B, T, H, N, seed=T + H + cfg, decay=decay)
    xs = [x.bfloat16().contiguous() for x in (r, k, v, w)]
    uf = u.reshape(-1).float().contiguous()
    g = torch.Generator().manual_seed(cfg)
    s0 = (0.5 * torch.randn(B, H, N, N, generator=g)).contiguous()
    dy = torch.randn(B, T, C, generator=g).bfloat16().contiguous()

    def nan(*shape, dtype=torch.float32):
        return torch.full(shape, float("nan"), dtype=dtype)

    y, s1 = nan(B, T, C, dtype=torch.bfloat16), nan(B, H, N, N)
    assert lib.emu_forward(cfg, B, T, H, *map(_ptr, xs), _ptr(uf), _ptr(y), _ptr(s0), _ptr(s1)) == 0
    ref = [x.double().requires_grad_() for x in xs] + [u.double().requires_grad_()]
    y_ref, s_ref = wkv6_reference(*(x.detach() for x in ref), N, state=s0.double())
    assert torch.isfinite(y).all() and torch.isfinite(s1).all()
    assert rel_rms(y, y_ref) <= TOL and rel_rms(s1, s_ref) <= 1e-5, (rel_rms(y, y_ref), rel_rms(s1, s_ref))

    y0 = nan(B, T, C, dtype=torch.bfloat16)
    assert lib.emu_forward(cfg, B, T, H, *map(_ptr, xs), _ptr(uf), _ptr(y0), None, None) == 0
    y0_ref, _ = wkv6_reference(*ref, N)
    assert rel_rms(y0, y0_ref) <= TOL
    y0_ref.backward(dy.double())

    P = nan(B, T, C)
    outs = [nan(B, T, C, dtype=torch.bfloat16) for _ in range(4)]
    du_b = nan(B, C)
    assert lib.emu_backward(cfg, B, T, H, *map(_ptr, xs), _ptr(uf), _ptr(dy), _ptr(P), *map(_ptr, outs),
                            _ptr(du_b)) == 0
    grads = outs + [du_b.sum(0).view(H, N)]
    errs = {nm: rel_rms(gr, leaf.grad) for nm, gr, leaf in zip(GRADS, grads, ref)}
    for nm, gr in zip(GRADS, grads):
        assert torch.isfinite(gr).all(), f"{nm}: NaN (unwritten output?)"
    assert torch.isfinite(P).all()
    assert all(e <= TOL for e in errs.values()) and errs["du"] <= 1e-5, errs
