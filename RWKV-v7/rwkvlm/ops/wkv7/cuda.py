"""The WKV7 CUDA op: loader, autograd Function and public call.

`wkv7_cuda(r, w, k, v, a, b, head_size=64) -> y` computes, per batch and head,
with state S (N x N, row i = value channel, column j = key channel, S_0 = 0)

    S_t[i,j] = S_{t-1}[i,j] * decay_t[j] + (sum_m S_{t-1}[i,m] a_t[m]) * b_t[j] + v_t[i] k_t[j]
    y_t[i]   = sum_j S_t[i,j] r_t[j],        decay = exp(-exp(w))

Contract:
- r, w, k, v, a, b: (B, T, C) on one CUDA device, C = H * head_size; the layout
  is (B, T, H, N) flattened, as the model produces it (non-contiguous inputs
  are copied).
- dtype: the kernels take bfloat16 and keep the state in fp32.  fp16/fp32
  inputs are cast to bf16 (their gradients flow back through the cast) and y
  is returned in r's dtype.  w is used in bf16 too, like the reference
  RWKV-LM kernel: the model gives w = -softplus(-w_raw) - 0.5 (so w <= -0.5 and
  decay >= 0.545); pass it in any float dtype.  The backward rebuilds the
  state inside each 16-step chunk by dividing by decay (as the reference
  design does): fine in that range (tested); much stronger decays (w well
  above 0) are untested and can lose gradient precision (not output precision).
- T: any length.  The kernels need T % 16 == 0 (CHUNK_LEN); other lengths are
  zero-padded at the end here (the output at t < T never depends on later
  steps) and y is sliced back, at the cost of one copy of each input.
- head_size: 64 (the model's), or 32.
- Compiled lazily on the first call with torch.utils.cpp_extension.load (15 s
  measured on a 16-core H200 machine; cached afterwards under torch's extension
  root, one directory per head size / chunk length / variant set), for the
  current device's compute capability only (explicit -gencode; the
  TORCH_CUDA_ARCH_LIST environment variable is not consulted, so a '9.0a' there
  cannot break this build).  Compile failures and a stale build lock left by a
  killed build raise rwkvlm.errors.UserError saying what to do.
"""
from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import torch

from rwkvlm.errors import UserError
from rwkvlm.ops.build import build_dir as _build_dir
from rwkvlm.ops.build import check_stale_lock as _check_stale_lock
from rwkvlm.ops.build import nvcc_version as _nvcc_version
from rwkvlm.recipe import WKV_CHUNK_LEN

__all__ = ["wkv7_cuda", "wkv7_cuda_state", "wkv7_op", "is_available", "load_extension", "CHUNK_LEN", "HEAD_SIZES"]

CHUNK_LEN = WKV_CHUNK_LEN
HEAD_SIZES = (32, 64)
# Bump when the sources change in a way that must not reuse an old build.
_VERSION = 3
_CUDA_DIR = Path(__file__).resolve().parents[3] / "cuda"  # RWKV-v7/cuda
_SOURCES = ("wkv7_op.cpp", "wkv7_cuda.cu")

_lock = threading.Lock()
_ops: dict = {}


def is_available() -> bool:
    """True when a CUDA device and a CUDA compiler are there (nothing is built)."""
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None and all((_CUDA_DIR / s).is_file() for s in _SOURCES)


def _ext_name(head_size: int, variants: str) -> str:
    return f"wkv7_n{head_size}_c{CHUNK_LEN}_{variants}_v{_VERSION}"


def load_extension(head_size: int = 64, variants: str = "default", verbose: bool = False):
    """Build (first time) and load the op library; return its torch.ops namespace.

    variants: "default" builds the tuned kernel configuration only; "all" builds
    every configuration (benchmarks choose with cfg ids, see wkv7_cuda.cu).
    """
    if head_size not in HEAD_SIZES:
        raise UserError(f"WKV7 CUDA: head_size {head_size} is not supported; use one of {HEAD_SIZES}.")
    if variants not in ("default", "all"):
        raise ValueError(f"variants must be 'default' or 'all', got {variants!r}")
    key = (head_size, variants)
    ops = _ops.get(key)
    if ops is not None:
        return ops
    with _lock:
        if key in _ops:
            return _ops[key]
        if not torch.cuda.is_available():
            raise UserError("WKV7 CUDA: no CUDA device is visible (torch.cuda.is_available() is False); "
                            "use the PyTorch path rwkvlm.ops.wkv7.wkv7 instead.")
        from torch.utils import cpp_extension as ce

        if ce.CUDA_HOME is None or shutil.which(str(Path(ce.CUDA_HOME) / "bin" / "nvcc")) is None:
            raise UserError(
                "WKV7 CUDA: no CUDA compiler found (nvcc under CUDA_HOME); install the CUDA toolkit "
                f"matching torch's CUDA {torch.version.cuda} and set CUDA_HOME, or use the PyTorch path."
            )
        for s in _SOURCES:
            if not (_CUDA_DIR / s).is_file():
                raise UserError(f"WKV7 CUDA: source {_CUDA_DIR / s} is missing; reinstall the package.")
        name = _ext_name(head_size, variants)
        build_dir = _build_dir(name)
        _check_stale_lock(build_dir)
        major, minor = torch.cuda.get_device_capability()
        arch = f"{major}{minor}"
        cuda_flags = [
            f"-gencode=arch=compute_{arch},code=sm_{arch}",
            "-O3",
            "--use_fast_math",
            "-res-usage",
            "-Xptxas=-O3",
            "--extra-device-vectorization",
            f"-DWKV7_HEAD_SIZE={head_size}",
            f"-DWKV7_CHUNK={CHUNK_LEN}",
        ]
        cflags = ["-O3", f"-DWKV7_NS={name}"]
        if variants == "all":
            cuda_flags.append("-DWKV7_ALL_VARIANTS")
        t0 = time.time()
        try:
            ce.load(
                name=name,
                sources=[str(_CUDA_DIR / s) for s in _SOURCES],
                extra_cflags=cflags,
                extra_cuda_cflags=cuda_flags,
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=verbose,
            )
        except Exception as e:  # noqa: BLE001
            raise UserError(
                f"WKV7 CUDA: building the extension {name} in {build_dir} failed: "
                f"{type(e).__name__}: {str(e)[-2000:]}\n"
                f"torch {torch.__version__} was built with CUDA {torch.version.cuda}; nvcc: {_nvcc_version()}; "
                f"device compute capability {major}.{minor}. What to do: install a CUDA toolkit whose nvcc matches "
                f"torch's CUDA version (set CUDA_HOME to it), make sure ninja and a C++ compiler are on PATH, "
                f"rerun with verbose=True (rwkvlm.ops.wkv7.cuda.load_extension(verbose=True)) to see the compiler "
                f"output, or remove {build_dir} to force a clean rebuild. TORCH_CUDA_ARCH_LIST is not used by "
                f"this build (it targets sm_{arch} explicitly). Without the extension, use the PyTorch path "
                f"rwkvlm.ops.wkv7.wkv7."
            ) from e
        ops = getattr(torch.ops, name)
        if verbose:
            print(f"[wkv7_cuda] {name} ready in {time.time() - t0:.1f} s ({build_dir})", flush=True)
        _ops[key] = ops
        return ops


# ------------------------------------------------------------------------------------------
# The op pair as torch.library custom ops. They are the autograd wrapper of the eager call
# below and of the compiled blocks (rwkvlm.model.rwkv7): torch.compile treats them as opaque ops
# whose output shapes come from the fake functions, so a whole block compiles as one graph
# around them. CUDA tensors run the kernels; with torch_path (or tensors on another device)
# they run the chunked PyTorch path instead, whose backward re-runs it under autograd: that
# is how the compiled blocks work without a GPU (--wkv_impl torch, CPU tests).
# ------------------------------------------------------------------------------------------

_F32 = torch.float32


def _kernel_ready(xs):
    """Contiguous, 16-byte aligned rows (cp.async); a no-op for what the model produces."""
    xs = tuple(x.contiguous() for x in xs)
    return tuple(x if x.data_ptr() % 16 == 0 else x.clone() for x in xs)


def _on_kernel(r: torch.Tensor, torch_path: bool) -> bool:
    return r.device.type == "cuda" and not torch_path


@torch.library.custom_op("rwkvlm::wkv7_forward", mutates_args=())
def _op_forward(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                b: torch.Tensor, head_size: int, torch_path: bool, need_state: bool, variants: str,
                cfg_fwd: int, cfg_rows: int, cfg_cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, sT, sa): the output and the fp32 buffers the kernel backward reads (empty on the
    PyTorch path). On the kernel path all six inputs are bf16 with T % CHUNK_LEN == 0."""
    if _on_kernel(r, torch_path):
        ops = load_extension(head_size, variants)
        return ops.forward(*_kernel_ready((r, w, k, v, a, b)), need_state, cfg_fwd)
    from rwkvlm.ops.wkv7.chunked import wkv7_chunked

    y, _ = wkv7_chunked(r, w, k, v, a, b, head_size)
    return y, r.new_empty((0,), dtype=_F32), r.new_empty((0,), dtype=_F32)


@_op_forward.register_fake
def _(r, w, k, v, a, b, head_size, torch_path, need_state, variants, cfg_fwd, cfg_rows, cfg_cols):
    if not _on_kernel(r, torch_path):
        return r.new_empty(r.shape), r.new_empty((0,), dtype=_F32), r.new_empty((0,), dtype=_F32)
    B, T, C = r.shape
    N = head_size
    sT_shape = (B, C // N, T // CHUNK_LEN, N, N) if need_state else (0,)  # per chunk (B, H, T/L, N, N)
    return r.new_empty(r.shape), r.new_empty(sT_shape, dtype=_F32), r.new_empty((B, T, C), dtype=_F32)


@torch.library.custom_op("rwkvlm::wkv7_backward", mutates_args=())
def _op_backward(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                 b: torch.Tensor, dy: torch.Tensor, sT: torch.Tensor, sa: torch.Tensor, head_size: int,
                 torch_path: bool, variants: str, cfg_rows: int, cfg_cols: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dr, dw, dk, dv, da, db)."""
    if _on_kernel(r, torch_path):
        ops = load_extension(head_size, variants)
        return tuple(ops.backward(*_kernel_ready((r, w, k, v, a, b, dy)), sT, sa, cfg_rows, cfg_cols))
    from rwkvlm.ops.wkv7.chunked import wkv7_chunked

    # torch.func: autograd's dispatch keys are off inside an op's implementation
    _, vjp = torch.func.vjp(lambda *xs: wkv7_chunked(*xs, head_size)[0], r, w, k, v, a, b)
    return tuple(vjp(dy))


@_op_backward.register_fake
def _(r, w, k, v, a, b, dy, sT, sa, head_size, torch_path, variants, cfg_rows, cfg_cols):
    return tuple(r.new_empty(r.shape) for _ in range(6))


def _setup_context(ctx, inputs, output):
    r, w, k, v, a, b, head_size, torch_path, need_state, variants, _, cfg_rows, cfg_cols = inputs
    _, sT, sa = output
    ctx.save_for_backward(r, w, k, v, a, b, sT, sa)
    ctx.opts = (head_size, torch_path, variants, cfg_rows, cfg_cols)
    ctx.had_state = need_state or not _on_kernel(r, torch_path)


def _backward(ctx, dy, _dsT, _dsa):
    if not ctx.had_state:
        raise RuntimeError("wkv7: backward through a forward that ran without grad (need_state=False)")
    r, w, k, v, a, b, sT, sa = ctx.saved_tensors
    head_size, torch_path, variants, cfg_rows, cfg_cols = ctx.opts
    grads = _op_backward(r, w, k, v, a, b, dy.to(r.dtype), sT, sa, head_size, torch_path, variants,
                         cfg_rows, cfg_cols)
    return (*grads,) + (None,) * 7


_op_forward.register_autograd(_backward, setup_context=_setup_context)


def wkv7_op(r, w, k, v, a, b, head_size: int = 64, impl: str = "auto", *, _cfg=("default", -1, -1, -1)):
    """WKV7 through the custom op, without argument checks: traceable by torch.compile.

    impl "auto": the kernel for CUDA tensors, the chunked PyTorch path otherwise; "torch": the
    PyTorch path; "cuda": the kernel (CUDA tensors only). On the kernel path the inputs are
    cast to bf16 and T is zero-padded to a multiple of CHUNK_LEN (the output at t < T never
    depends on later steps); y comes back in r's dtype, length T.
    """
    torch_path = impl == "torch" or r.device.type != "cuda"
    if impl == "cuda" and torch_path:
        raise UserError(f"wkv7: impl 'cuda' needs CUDA tensors; these are on {r.device}.")
    xs = (r, w, k, v, a, b)
    T = r.shape[1]
    pad = 0 if torch_path else (-T) % CHUNK_LEN
    if not torch_path:
        xs = tuple(x.to(torch.bfloat16) for x in xs)
        if pad:
            xs = tuple(torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in xs)  # (B, T + pad, C)
    need_state = torch.is_grad_enabled() and any(x.requires_grad for x in xs)
    y = _op_forward(*xs, head_size, torch_path, need_state, _cfg[0], _cfg[1], _cfg[2], _cfg[3])[0]
    if pad:
        y = y[:, :T]  # (B, T, C)
    return y.to(r.dtype)


def wkv7_cuda(r, w, k, v, a, b, head_size: int = 64, *, _cfg=("default", -1, -1, -1)):
    """WKV7 on CUDA: all six (B, T, C) tensors in, y (B, T, C) out in r's dtype.

    See the module docstring for dtypes, padding and build behaviour.
    `_cfg` = (variant set, forward cfg, backward rows cfg, backward cols cfg)
    is for benchmarks; -1 means the build's default.
    """
    xs = (r, w, k, v, a, b)
    for nm, x in zip("rwkvab", xs):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise UserError(f"wkv7_cuda: {nm} must be a (B, T, C) tensor, got "
                            f"{getattr(x, 'shape', type(x).__name__)}.")
        if x.shape != r.shape:
            raise UserError(f"wkv7_cuda: {nm} has shape {tuple(x.shape)}, expected {tuple(r.shape)} like r.")
        if not x.is_floating_point():
            raise UserError(f"wkv7_cuda: {nm} has dtype {x.dtype}; expected a float dtype.")
    B, T, C = r.shape
    if head_size not in HEAD_SIZES:
        raise UserError(f"wkv7_cuda: head_size {head_size} is not supported; use one of {HEAD_SIZES}.")
    if C % head_size != 0:
        raise UserError(f"wkv7_cuda: C = {C} is not a multiple of head_size = {head_size}.")
    for nm, x in zip("rwkvab", xs):
        if not x.is_cuda or x.device != r.device:
            raise UserError(f"wkv7_cuda: {nm} is on {x.device}; the CUDA op needs all six on one CUDA device.")
    if T == 0 or B == 0:
        return r.new_zeros(r.shape)
    return wkv7_op(r, w, k, v, a, b, head_size, "cuda", _cfg=tuple(_cfg))


def wkv7_cuda_state(r, w, k, v, a, b, initial_state=None, head_size: int = 64):
    """Inference WKV7 on the kernel from a given state: (y, final_state).

    r..b: (B, T, C) CUDA tensors of any float dtype (used in bf16); initial_state:
    (B, H, N, N) in the [value, key] layout, None for zero; final_state comes back in
    fp32 with that layout and y in r's dtype. No autograd: a call that needs gradients
    raises (the training op starts from a zero state; rwkvlm.ops.wkv7's chunked path
    differentiates through a state). T is padded to a multiple of CHUNK_LEN with steps
    that leave the state unchanged (decay 1: w = -inf; k = v = a = b = 0).
    """
    xs = (r, w, k, v, a, b)
    if torch.is_grad_enabled() and any(x.requires_grad for x in xs + (initial_state,) if x is not None):
        raise UserError("wkv7_cuda_state is for inference: call it under torch.no_grad(), or use "
                        "rwkvlm.ops.wkv7.wkv7_chunked to differentiate through a state.")
    B, T, C = r.shape
    N = head_size
    H = C // N
    if initial_state is None:
        s0 = r.new_zeros((B, H, N, N), dtype=_F32)
    else:
        if tuple(initial_state.shape) != (B, H, N, N):
            raise UserError(f"wkv7_cuda_state: initial_state has shape {tuple(initial_state.shape)}, "
                            f"expected (B, H, N, N) = {(B, H, N, N)}.")
        s0 = initial_state.to(device=r.device, dtype=_F32).contiguous()
    if T == 0:
        return r.new_zeros(r.shape), s0.clone()
    xs = [x.to(torch.bfloat16) for x in xs]
    pad = (-T) % CHUNK_LEN
    if pad:
        fill = [0.0, float("-inf"), 0.0, 0.0, 0.0, 0.0]  # r w k v a b: decay 1, nothing added
        xs = [torch.nn.functional.pad(x, (0, 0, 0, pad), value=f) for x, f in zip(xs, fill)]  # (B, T + pad, C)
    ops = load_extension(head_size)
    y, s1 = ops.forward_state(*_kernel_ready(xs), s0, -1)
    return y[:, :T].to(r.dtype), s1  # (B, T, C), (B, H, N, N)
