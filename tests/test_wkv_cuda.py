"""WKV7 CUDA op (rwkvlm.ops.wkv7.cuda) against the per-step reference.

GPU tests (marked `gpu`) skip cleanly without CUDA; the loader / validation
tests at the bottom run anywhere.

Inputs follow the model's distributions: w = -softplus(-randn) - 0.5,
kk = L2-normalised per head, a = -kk, b = kk * sigmoid(randn), r/k/v ~ randn.
The reference runs in fp64 on the bf16-rounded inputs (rwkvlm.ops.wkv7.wkv7_reference
with fp64 tensors), and the check is rms(out - ref) / rms(ref) <= 5e-3 for y and
for all six input gradients. Before each call the CUDA caching allocator is
filled with NaN-poisoned blocks, so an element the kernels fail to write shows
up as NaN.
"""
from __future__ import annotations

import os
import time

import pytest
import torch

from rwkvlm.errors import UserError
from rwkvlm.ops.wkv7 import wkv7_reference

import wkvkit
from wkvkit import rel_rms

TOL = 5e-3
HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def _reference(r, w, k, v, a, b, head_size):
    return wkv7_reference(r, w, k, v, a, b, head_size)[0]


def make_inputs(B, T, H, N=64, device="cuda", seed=0, dtype=torch.bfloat16):
    return wkvkit.make_inputs(B, T, H, N, device=device, seed=seed, dtype=dtype)


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
    from rwkvlm.ops.wkv7.cuda import wkv7_cuda

    leaves = [x.detach().clone().requires_grad_() for x in xs]
    poison_allocator()
    kw = {} if cfg is None else {"_cfg": cfg}
    y = wkv7_cuda(*leaves, head_size=head_size, **kw)
    poison_allocator()
    y.backward(dy)
    torch.cuda.synchronize()
    return y.detach(), [x.grad for x in leaves]


def run_ref(xs, dy, head_size=64):
    leaves = [x.detach().double().requires_grad_() for x in xs]
    y = _reference(*leaves, head_size=head_size)
    y.backward(dy.double())
    return y.detach(), [x.grad for x in leaves]


def check(y, grads, y_ref, grads_ref, label, tol=TOL):
    errs = {"y": rel_rms(y, y_ref)}
    for nm, g, gr in zip("rwkvab", grads, grads_ref):
        errs["d" + nm] = rel_rms(g, gr)
    assert torch.isfinite(y).all(), f"{label}: NaN/inf in y (unwritten output?)"
    for nm, g in zip("rwkvab", grads):
        assert g is not None and torch.isfinite(g).all(), f"{label}: NaN/inf in d{nm}"
    print(f"{label}: " + " ".join(f"{k}={v:.2e}" for k, v in errs.items()))
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"{label}: relative RMS error above {tol}: {bad}"


SHAPES = [(1, 16, 1), (2, 64, 3), (3, 256, 2), (1, 1024, 4), (2, 4096, 2)]


@gpu
@needs_cuda
@pytest.mark.parametrize("B,T,H", SHAPES)
def test_matches_reference(B, T, H):
    xs = make_inputs(B, T, H, seed=B * 1000 + T + H)
    dy = torch.randn(B, T, H * 64, generator=torch.Generator().manual_seed(T)).to("cuda", torch.bfloat16)
    y, grads = run_cuda(xs, dy)
    y_ref, grads_ref = run_ref(xs, dy)
    assert y.dtype == torch.bfloat16 and y.shape == (B, T, H * 64)
    check(y, grads, y_ref, grads_ref, f"B{B} T{T} H{H}")


@gpu
@needs_cuda
@pytest.mark.parametrize("B,T,H,N", [(1, 1, 1, 64), (2, 15, 3, 64), (1, 17, 2, 64), (3, 100, 2, 64),
                                     (2, 512, 4, 64), (2, 33, 3, 32)])
def test_state_in_and_out_matches_reference(B, T, H, N):
    """Inference from a given state: y and the final state against the fp64 reference, and two
    calls carrying the state equal one call over both pieces (prefill, then generation)."""
    from rwkvlm.ops.wkv7.cuda import wkv7_cuda_state

    xs = make_inputs(B, T, H, N=N, seed=T * 7 + N)
    s0 = 0.5 * torch.randn(B, H, N, N, generator=torch.Generator().manual_seed(T)).cuda()
    with torch.no_grad():
        poison_allocator()
        y, s1 = wkv7_cuda_state(*xs, initial_state=s0, head_size=N)
        torch.cuda.synchronize()
        y_ref, s_ref = wkv7_reference(*(x.double() for x in xs), N, state=s0.double())
    assert y.shape == (B, T, H * N) and y.dtype == torch.bfloat16 and s1.shape == (B, H, N, N)
    assert torch.isfinite(y).all() and torch.isfinite(s1).all()
    assert rel_rms(y, y_ref) <= TOL, rel_rms(y, y_ref)
    assert rel_rms(s1, s_ref) <= TOL, rel_rms(s1, s_ref)
    cut = T // 2
    with torch.no_grad():
        ya, sa = wkv7_cuda_state(*(x[:, :cut] for x in xs), initial_state=s0, head_size=N)
        yb, sb = wkv7_cuda_state(*(x[:, cut:] for x in xs), initial_state=sa, head_size=N)
    assert rel_rms(torch.cat([ya, yb], 1), y_ref) <= TOL and rel_rms(sb, s_ref) <= TOL
    with torch.no_grad():
        y0, _ = wkv7_cuda_state(*xs, head_size=N)
    assert rel_rms(y0, wkv7_reference(*(x.double() for x in xs), N)[0]) <= TOL


@gpu
@needs_cuda
def test_state_op_refuses_gradients():
    from rwkvlm.ops.wkv7.cuda import wkv7_cuda_state

    xs = [x.requires_grad_() for x in make_inputs(1, 16, 1)]
    with pytest.raises(UserError, match="inference"):
        wkv7_cuda_state(*xs)


@gpu
@needs_cuda
def test_head_size_32():
    B, T, H = 2, 128, 3
    xs = make_inputs(B, T, H, N=32, seed=7)
    dy = torch.randn(B, T, H * 32).to("cuda", torch.bfloat16)
    y, grads = run_cuda(xs, dy, head_size=32)
    y_ref, grads_ref = run_ref(xs, dy, head_size=32)
    check(y, grads, y_ref, grads_ref, "N32")


@gpu
@needs_cuda
def test_unaligned_T_and_fp32_inputs():
    """T not a multiple of 16 is padded; fp32 inputs come back as fp32 with fp32 grads."""
    B, T, H = 2, 100, 2
    xs = [x.float() for x in make_inputs(B, T, H, seed=3)]
    dy = torch.randn(B, T, H * 64, device="cuda")
    y, grads = run_cuda(xs, dy)
    assert y.dtype == torch.float32 and y.shape == (B, T, H * 64)
    assert all(g.dtype == torch.float32 for g in grads)
    # reference on the bf16-rounded values the kernel actually sees
    y_ref, grads_ref = run_ref([x.to(torch.bfloat16) for x in xs], dy.to(torch.bfloat16).float())
    check(y, grads, y_ref, grads_ref, "T100 fp32")


@gpu
@needs_cuda
def test_no_grad_forward_equals_grad_forward():
    from rwkvlm.ops.wkv7.cuda import wkv7_cuda

    xs = make_inputs(2, 512, 3, seed=11)
    with torch.no_grad():
        y0 = wkv7_cuda(*xs)
    y1 = wkv7_cuda(*[x.clone().requires_grad_() for x in xs])
    assert torch.equal(y0, y1.detach())


@gpu
@needs_cuda
def test_compiled_op_matches_eager_call():
    """wkv7_op inside one torch.compile graph (as the compiled blocks call it, with the bf16
    casts and the padding of T = 100 traced) gives the eager call's output and gradients."""
    from rwkvlm.ops.wkv7.cuda import wkv7_op

    xs = [x.float() for x in make_inputs(2, 100, 3, seed=13)]
    dy = torch.randn(2, 100, 3 * 64, device="cuda")
    y0, g0 = run_cuda(xs, dy)

    def f(*leaves):
        return wkv7_op(*leaves, 64, "cuda")

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
    """Same inputs, same bits: no race between warps or blocks."""
    xs = make_inputs(2, 256, 4, seed=5)
    dy = torch.randn(2, 256, 256).to("cuda", torch.bfloat16)
    y0, g0 = run_cuda(xs, dy)
    y1, g1 = run_cuda(xs, dy)
    assert torch.equal(y0, y1)
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- no GPU needed

def test_import_builds_nothing(tmp_path):
    """The kernel compiles on first use only: importing the library, building a model and running
    it on CPU (the torch path) never calls the extension builder."""
    import subprocess
    import sys

    code = (
        "import torch, torch.utils.cpp_extension as ce\n"
        "def refuse(*a, **k): raise SystemExit('the extension builder was called')\n"
        "ce.load = refuse\n"
        "import rwkvlm.train.run, rwkvlm.ops.wkv7.cuda, rwkvlm.infer.generate\n"
        "from rwkvlm.model import ModelConfig, RWKV7\n"
        "m = RWKV7(ModelConfig(n_layer=1, n_embd=64, vocab_size=256)); m.init_weights()\n"
        "m(torch.zeros(1, 16, dtype=torch.long))\n"
        "m.forward_rnn(torch.zeros(1, 1, dtype=torch.long))\n"
        "assert rwkvlm.ops.wkv7.cuda._ops == {}\n"
    )
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (tmp_path / "ext").exists()


def test_rejects_cpu_and_bad_shapes():
    from rwkvlm.ops.wkv7.cuda import wkv7_cuda

    x = torch.zeros(1, 16, 64)
    with pytest.raises(UserError, match="CUDA"):
        wkv7_cuda(x, x, x, x, x, x)
    with pytest.raises(UserError, match="shape"):
        wkv7_cuda(x, x, x, x, x, torch.zeros(1, 16, 128))
    with pytest.raises(UserError, match="head_size"):
        wkv7_cuda(x, x, x, x, x, x, head_size=48)


def test_stale_lock_detected(tmp_path):
    from rwkvlm.ops.wkv7.cuda import _check_stale_lock

    (tmp_path / "build.ninja").write_text("")
    lock = tmp_path / "lock"
    lock.write_text("")
    _check_stale_lock(tmp_path)            # fresh lock: another build may be running
    old = time.time() - 3600
    for p in tmp_path.iterdir():
        os.utime(p, (old, old))
    with pytest.raises(UserError, match=str(tmp_path)):
        _check_stale_lock(tmp_path)
    lock.unlink()
    _check_stale_lock(tmp_path)            # no lock: nothing to say


def test_kernel_sources_are_found_from_the_module():
    """The build reads RWKV-v7/cuda/ relative to the op's module (no GPU needed to check the path)."""
    from rwkvlm.ops.wkv7.cuda import _CUDA_DIR, _SOURCES

    assert _CUDA_DIR.name == "cuda" and all((_CUDA_DIR / s).is_file() for s in _SOURCES), _CUDA_DIR
