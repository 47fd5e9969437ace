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

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import torch

from rwkvlm.errors import UserError

__all__ = ["wkv7_cuda", "is_available", "load_extension", "CHUNK_LEN", "HEAD_SIZES"]

CHUNK_LEN = 16
HEAD_SIZES = (32, 64)
# Bump when the sources change in a way that must not reuse an old build.
_VERSION = 2
_CUDA_DIR = Path(__file__).resolve().parents[1] / "cuda"
_SOURCES = ("wkv7_op.cpp", "wkv7_cuda.cu")
_STALE_LOCK_S = 600.0

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


def _build_dir(name: str) -> Path:
    from torch.utils import cpp_extension as ce

    try:
        d = Path(ce._get_build_directory(name, verbose=False))
    except Exception:  # private helper moved: same layout, computed here
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or ce.get_default_build_root()
        d = Path(root) / name
        d.mkdir(parents=True, exist_ok=True)
    return d


def _check_stale_lock(build_dir: Path) -> None:
    """Raise if torch's build lock is old and nothing in the directory moves.

    torch.utils.cpp_extension waits forever on `<build_dir>/lock`; a build
    killed mid-way leaves it behind.
    """
    lock = build_dir / "lock"
    try:
        lock_age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if lock_age < _STALE_LOCK_S:
        return  # another process may be building right now; torch will wait for it
    newest = 0.0
    for p in build_dir.iterdir():
        try:
            newest = max(newest, p.stat().st_mtime)
        except OSError:
            pass
    if time.time() - newest < _STALE_LOCK_S:
        return
    raise UserError(
        f"The WKV7 CUDA build directory {build_dir} holds a lock file that is "
        f"{lock_age / 60:.0f} minutes old and nothing there has changed for "
        f"{_STALE_LOCK_S / 60:.0f} minutes: a build was probably killed. If no other "
        f"process is compiling it, remove the directory (rm -rf '{build_dir}') and run again."
    )


def _nvcc_version() -> str:
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return "not found"
    nvcc = Path(CUDA_HOME) / "bin" / "nvcc"
    try:
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=30).stdout
        return out.strip().splitlines()[-1] if out.strip() else "unknown"
    except Exception as e:  # noqa: BLE001
        return f"unusable ({e})"


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
                            "use the PyTorch path rwkvlm.wkv.wkv7 instead.")
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
                f"rerun with verbose=True (rwkvlm.wkv_cuda.load_extension(verbose=True)) to see the compiler "
                f"output, or remove {build_dir} to force a clean rebuild. TORCH_CUDA_ARCH_LIST is not used by "
                f"this build (it targets sm_{arch} explicitly). Without the extension, use the PyTorch path "
                f"rwkvlm.wkv.wkv7."
            ) from e
        ops = getattr(torch.ops, name)
        if verbose:
            print(f"[wkv7_cuda] {name} ready in {time.time() - t0:.1f} s ({build_dir})", flush=True)
        _ops[key] = ops
        return ops


class _WKV7(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, w, k, v, a, b, head_size, cfg):
        ops = load_extension(head_size, cfg[0])
        need = any(ctx.needs_input_grad[:6])
        y, sT, sa = ops.forward(r, w, k, v, a, b, need, cfg[1])
        if need:
            ctx.save_for_backward(r, w, k, v, a, b, sT, sa)
        ctx.head_size = head_size
        ctx.cfg = cfg
        return y

    @staticmethod
    def backward(ctx, dy):
        r, w, k, v, a, b, sT, sa = ctx.saved_tensors
        ops = load_extension(ctx.head_size, ctx.cfg[0])
        dy = dy.to(torch.bfloat16).contiguous()
        dr, dw, dk, dv, da, db = ops.backward(r, w, k, v, a, b, dy, sT, sa, ctx.cfg[2], ctx.cfg[3])
        return dr, dw, dk, dv, da, db, None, None


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
    out_dtype = r.dtype
    xs = tuple(x.to(torch.bfloat16) for x in xs)
    pad = (-T) % CHUNK_LEN
    if pad:
        xs = tuple(torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in xs)
    xs = tuple(x.contiguous() for x in xs)
    # cp.async needs 16-byte aligned rows: a view with an odd storage offset is copied
    xs = tuple(x if x.data_ptr() % 16 == 0 else x.clone() for x in xs)
    y = _WKV7.apply(*xs, head_size, tuple(_cfg))
    if pad:
        y = y[:, :T]
    return y.to(out_dtype)
