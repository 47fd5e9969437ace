"""The WKV6 CUDA op: loader, autograd custom ops and public calls.

`wkv6_cuda(r, k, v, w, u, head_size=64) -> y` computes, per batch and head, with state S
(N x N, row i = value channel, column j = key channel, S_0 = 0)

    y_t[i]   = sum_j S_{t-1}[i,j] r_t[j] + v_t[i] * sum_j r_t[j] u[j] k_t[j]
    S_t[i,j] = S_{t-1}[i,j] * decay_t[j] + v_t[i] k_t[j],        decay = exp(-exp(w))

Contract:
- r, k, v, w: (B, T, C) on one CUDA device, C = H * head_size; the layout is (B, T, H, N)
  flattened, as the model produces it (non-contiguous inputs are copied). u: (H, N) or (C,).
- dtype: the kernels take r, k, v, w in bfloat16 (like RWKV-LM's wkv6 kernel: w too, the
  x060 model's w = time_decay + LoRA), u in fp32, and keep the state in fp32. Other dtypes
  are cast (their gradients flow back through the cast); y comes back in r's dtype. The
  gradients of r, k, v, w are computed in fp32 and rounded to bf16; du stays fp32.
- Any decay strength: inside a chunk the state is kept relative to the chunk start (one FMA
  per element and step) unless some column decays by more than e^-40 there, in which case
  that chunk runs the direct update (see RWKV-v7/cuda/wkv6_cuda.cu). No division by decays.
- T: any length. The kernels need T % 16 == 0 (CHUNK_LEN); other lengths are zero-padded at
  the end here (the output at t < T never depends on later steps) and y is sliced back, at
  the cost of one copy of each input.
- head_size: 64 (the model's), or 32.
- The training op starts from a zero state and needs no saved buffers: the backward
  recomputes the forward state (three passes: dr, then dk / dw / du, and dv alongside them
  on a side stream joined back into the current one).
- Needs compute capability 8.0 or newer (cp.async).
  `wkv6_cuda_state` is the inference op (initial and final state, no autograd).
- Compiled lazily on the first call with torch.utils.cpp_extension.load (cached afterwards
  under torch's extension root, one directory per head size / chunk length / variant set),
  for the current device's compute capability only (explicit -gencode). Compile failures
  and a stale build lock left by a killed build raise rwkvlm.errors.UserError saying what
  to do (rwkvlm/ops/build.py).
"""
from __future__ import annotations

import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from rwkvlm.errors import UserError
from rwkvlm.ops.build import compile_op_library, cuda_toolchain_ready
from rwkvlm.recipe import WKV_CHUNK_LEN

__all__ = ["wkv6_cuda", "wkv6_cuda_state", "wkv6_op", "is_available", "load_extension", "CHUNK_LEN", "HEAD_SIZES"]

CHUNK_LEN = WKV_CHUNK_LEN
HEAD_SIZES = (32, 64)
# Bump when the sources change in a way that must not reuse an old build.
_VERSION = 1
_CUDA_DIR = Path(__file__).resolve().parents[3] / "cuda"  # RWKV-v7/cuda
_SOURCES = ("wkv6_op.cpp", "wkv6_cuda.cu")
_FALLBACK = "the PyTorch path rwkvlm.ops.wkv6.wkv6(..., impl='torch')"

_lock = threading.Lock()
_ops: dict = {}


def is_available() -> bool:
    """True when a CUDA device, a CUDA compiler and the sources are there (nothing is built)."""
    return cuda_toolchain_ready() and all((_CUDA_DIR / s).is_file() for s in _SOURCES)


def _ext_name(head_size: int, variants: str) -> str:
    return f"wkv6_n{head_size}_c{CHUNK_LEN}_{variants}_v{_VERSION}"


def load_extension(head_size: int = 64, variants: str = "default", verbose: bool = False):
    """Build (first time) and load the op library; return its torch.ops namespace.

    variants: "default" builds the default kernel configurations only; "all" builds every
    configuration (head size 64; benchmarks choose with cfg ids, see wkv6_cuda.cu).
    """
    if head_size not in HEAD_SIZES:
        raise UserError(f"WKV6 CUDA: head_size {head_size} is not supported; use one of {HEAD_SIZES}.")
    if variants not in ("default", "all"):
        raise ValueError(f"variants must be 'default' or 'all', got {variants!r}")
    key = (head_size, variants)
    ops = _ops.get(key)
    if ops is not None:
        return ops
    with _lock:
        if key in _ops:
            return _ops[key]
        name = _ext_name(head_size, variants)
        cuda_flags = [
            "-O3",
            "--use_fast_math",
            "-res-usage",
            "-Xptxas=-O3",
            "--extra-device-vectorization",
            f"-DWKV6_HEAD_SIZE={head_size}",
            f"-DWKV6_CHUNK={CHUNK_LEN}",
        ]
        if variants == "all":
            cuda_flags.append("-DWKV6_ALL_VARIANTS")
        ops = compile_op_library(name, [_CUDA_DIR / s for s in _SOURCES], cuda_flags, ["-O3", f"-DWKV6_NS={name}"],
                                 label="WKV6 CUDA", fallback=_FALLBACK, verbose=verbose)
        _ops[key] = ops
        return ops


# ------------------------------------------------------------------------------------------
# The op pair as torch.library custom ops: the autograd wrapper of the eager call below, and
# opaque to torch.compile (output shapes from the fake functions). CUDA tensors run the
# kernels; with torch_path (or tensors on another device) they run the chunked PyTorch path,
# whose backward re-runs it under autograd (torch.func.vjp).
# ------------------------------------------------------------------------------------------


def _kernel_ready(xs):
    """Contiguous, 16-byte aligned rows (cp.async); a no-op for what the model produces."""
    xs = tuple(x.contiguous() for x in xs)
    return tuple(x if x.data_ptr() % 16 == 0 else x.clone() for x in xs)


def _on_kernel(r: torch.Tensor, torch_path: bool) -> bool:
    return r.device.type == "cuda" and not torch_path


@torch.library.custom_op("rwkvlm::wkv6_forward", mutates_args=())
def _op_forward(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
                head_size: int, torch_path: bool, variants: str, cfg_fwd: int, cfg_rows: int,
                cfg_cols: int) -> torch.Tensor:
    """y. On the kernel path r, k, v, w are bf16 (B, T, C) with T % CHUNK_LEN == 0 and u fp32 (C,)."""
    if _on_kernel(r, torch_path):
        ops = load_extension(head_size, variants)
        return ops.forward(*_kernel_ready((r, k, v, w)), u.contiguous(), cfg_fwd)
    from rwkvlm.ops.wkv6.chunked import wkv6_chunked

    return wkv6_chunked(r, k, v, w, u, head_size)[0]


@_op_forward.register_fake
def _(r, k, v, w, u, head_size, torch_path, variants, cfg_fwd, cfg_rows, cfg_cols):
    return r.new_empty(r.shape)


@torch.library.custom_op("rwkvlm::wkv6_backward", mutates_args=())
def _op_backward(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
                 dy: torch.Tensor, head_size: int, torch_path: bool, variants: str, cfg_rows: int,
                 cfg_cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dr, dk, dv, dw, du)."""
    if _on_kernel(r, torch_path):
        ops = load_extension(head_size, variants)
        rr, kk, vv, ww, gy = _kernel_ready((r, k, v, w, dy))
        return tuple(ops.backward(rr, kk, vv, ww, u.contiguous(), gy, cfg_rows, cfg_cols))
    from rwkvlm.ops.wkv6.chunked import wkv6_chunked

    # torch.func: autograd's dispatch keys are off inside an op's implementation
    _, vjp = torch.func.vjp(lambda *xs: wkv6_chunked(*xs, head_size)[0], r, k, v, w, u)
    return tuple(vjp(dy))


@_op_backward.register_fake
def _(r, k, v, w, u, dy, head_size, torch_path, variants, cfg_rows, cfg_cols):
    return tuple(r.new_empty(r.shape) for _ in range(4)) + (u.new_empty(u.shape),)


def _setup_context(ctx, inputs, output):
    r, k, v, w, u, head_size, torch_path, variants, _, cfg_rows, cfg_cols = inputs
    ctx.save_for_backward(r, k, v, w, u)
    ctx.opts = (head_size, torch_path, variants, cfg_rows, cfg_cols)


def _backward(ctx, dy):
    r, k, v, w, u = ctx.saved_tensors
    head_size, torch_path, variants, cfg_rows, cfg_cols = ctx.opts
    grads = _op_backward(r, k, v, w, u, dy.to(r.dtype), head_size, torch_path, variants, cfg_rows, cfg_cols)
    return (*grads,) + (None,) * 6


_op_forward.register_autograd(_backward, setup_context=_setup_context)


def wkv6_op(r, k, v, w, u, head_size: int = 64, impl: str = "auto", *, _cfg=("default", -1, -1, -1)):
    """WKV6 through the custom op, without argument checks: traceable by torch.compile.

    impl "auto": the kernel for CUDA tensors, the chunked PyTorch path otherwise; "torch": the
    PyTorch path; "cuda": the kernel (CUDA tensors only). On the kernel path r, k, v, w are
    cast to bf16, u to fp32 (C,), and T is zero-padded to a multiple of CHUNK_LEN; y comes
    back in r's dtype, length T. `_cfg` = (variant set, forward cfg, backward rows cfg,
    backward cols cfg), for benchmarks; -1 means the build's default.
    """
    torch_path = impl == "torch" or r.device.type != "cuda"
    if impl == "cuda" and torch_path:
        raise UserError(f"wkv6: impl 'cuda' needs CUDA tensors; these are on {r.device}.")
    xs = (r, k, v, w)
    uu = u.reshape(-1)  # (C,)
    T = r.shape[1]
    pad = 0 if torch_path else (-T) % CHUNK_LEN
    if not torch_path:
        xs = tuple(x.to(torch.bfloat16) for x in xs)
        uu = uu.to(torch.float32)
        if pad:
            xs = tuple(F.pad(x, (0, 0, 0, pad)) for x in xs)  # (B, T + pad, C)
    y = _op_forward(*xs, uu, head_size, torch_path, _cfg[0], _cfg[1], _cfg[2], _cfg[3])
    if pad:
        y = y[:, :T]  # (B, T, C)
    return y.to(r.dtype)


def _check_call(name: str, r, k, v, w, u, head_size: int):
    xs = (r, k, v, w)
    for nm, x in zip("rkvw", xs):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise UserError(f"{name}: {nm} must be a (B, T, C) tensor, got "
                            f"{getattr(x, 'shape', type(x).__name__)}.")
        if x.shape != r.shape:
            raise UserError(f"{name}: {nm} has shape {tuple(x.shape)}, expected {tuple(r.shape)} like r.")
        if not x.is_floating_point():
            raise UserError(f"{name}: {nm} has dtype {x.dtype}; expected a float dtype.")
    C = r.shape[2]
    if head_size not in HEAD_SIZES:
        raise UserError(f"{name}: head_size {head_size} is not supported; use one of {HEAD_SIZES}.")
    if C % head_size != 0:
        raise UserError(f"{name}: C = {C} is not a multiple of head_size = {head_size}.")
    H = C // head_size
    if not isinstance(u, torch.Tensor) or tuple(u.shape) not in ((H, head_size), (C,)) or not u.is_floating_point():
        raise UserError(f"{name}: u must be a float tensor of shape (H, N) = {(H, head_size)} or (C,) = {(C,)}, "
                        f"got {getattr(u, 'shape', type(u).__name__)}.")
    for nm, x in zip("rkvwu", xs + (u,)):
        if not x.is_cuda or x.device != r.device:
            raise UserError(f"{name}: {nm} is on {x.device}; the CUDA op needs r, k, v, w, u on one CUDA device.")


def wkv6_cuda(r, k, v, w, u, head_size: int = 64, *, _cfg=("default", -1, -1, -1)):
    """WKV6 on CUDA from a zero state: r, k, v, w (B, T, C) and u (H, N) or (C,) in, y (B, T, C) out
    in r's dtype; differentiable in all five inputs.

    See the module docstring for dtypes, padding and build behaviour.
    """
    _check_call("wkv6_cuda", r, k, v, w, u, head_size)
    B, T, C = r.shape
    if T == 0 or B == 0:
        return r.new_zeros(r.shape)
    return wkv6_op(r, k, v, w, u, head_size, "cuda", _cfg=tuple(_cfg))


def wkv6_cuda_state(r, k, v, w, u, initial_state=None, head_size: int = 64, *, _cfg_fwd: int = -1):
    """Inference WKV6 on the kernel from a given state: (y, final_state).

    r, k, v, w: (B, T, C) CUDA tensors of any float dtype (used in bf16); u: (H, N) or (C,);
    initial_state: (B, H, N, N) in the [value, key] layout, None for zero; final_state comes
    back in fp32 with that layout and y in r's dtype. No autograd: a call that needs
    gradients raises (the training op starts from a zero state; rwkvlm.ops.wkv6's chunked
    path differentiates through a state). T is padded to a multiple of CHUNK_LEN with steps
    that leave the state unchanged (decay 1: w = -inf; r = k = v = 0).
    """
    xs = (r, k, v, w)
    if torch.is_grad_enabled() and any(x.requires_grad for x in xs + (u, initial_state) if x is not None):
        raise UserError("wkv6_cuda_state is for inference: call it under torch.no_grad(), or use "
                        "rwkvlm.ops.wkv6.wkv6_chunked to differentiate through a state.")
    _check_call("wkv6_cuda_state", r, k, v, w, u, head_size)
    B, T, C = r.shape
    N = head_size
    H = C // N
    if initial_state is None:
        s0 = r.new_zeros((B, H, N, N), dtype=torch.float32)
    else:
        if tuple(initial_state.shape) != (B, H, N, N):
            raise UserError(f"wkv6_cuda_state: initial_state has shape {tuple(initial_state.shape)}, "
                            f"expected (B, H, N, N) = {(B, H, N, N)}.")
        s0 = initial_state.to(device=r.device, dtype=torch.float32).contiguous()
    if T == 0 or B == 0:
        return r.new_zeros(r.shape), s0.clone()
    xs = [x.to(torch.bfloat16) for x in xs]
    pad = (-T) % CHUNK_LEN
    if pad:
        fill = [0.0, 0.0, 0.0, float("-inf")]  # r k v w: decay 1, nothing added, nothing read
        xs = [F.pad(x, (0, 0, 0, pad), value=f) for x, f in zip(xs, fill)]  # (B, T + pad, C)
    ops = load_extension(head_size)
    y, s1 = ops.forward_state(*_kernel_ready(xs), u.reshape(-1).to(torch.float32).contiguous(), s0, _cfg_fwd)
    return y[:, :T].to(r.dtype), s1  # (B, T, C), (B, H, N, N)
