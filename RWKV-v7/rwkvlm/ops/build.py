"""Building the CUDA op libraries (ops/wkv6/cuda.py, ops/wkv7/cuda.py): the shared helpers.

The ops compile lazily with torch.utils.cpp_extension.load, for the current device's compute
capability only (explicit -gencode; TORCH_CUDA_ARCH_LIST is not consulted). What can go
wrong is turned into rwkvlm.errors.UserError messages that say what to do.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import torch

from rwkvlm.errors import UserError

# A build lock older than this, in a directory where nothing changed for as long, is stale.
STALE_LOCK_S = 600.0


def build_dir(name: str) -> Path:
    """torch's build directory for the extension `name` (created if missing)."""
    from torch.utils import cpp_extension as ce

    try:
        d = Path(ce._get_build_directory(name, verbose=False))
    except Exception:  # private helper moved: same layout, computed here
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or ce.get_default_build_root()
        d = Path(root) / name
        d.mkdir(parents=True, exist_ok=True)
    return d


def check_stale_lock(build_dir: Path, label: str = "CUDA extension") -> None:
    """Raise if torch's build lock is old and nothing in the directory moves.

    torch.utils.cpp_extension waits forever on `<build_dir>/lock`; a build
    killed mid-way leaves it behind.
    """
    lock = build_dir / "lock"
    try:
        lock_age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if lock_age < STALE_LOCK_S:
        return  # another process may be building right now; torch will wait for it
    newest = 0.0
    for p in build_dir.iterdir():
        try:
            newest = max(newest, p.stat().st_mtime)
        except OSError:
            pass
    if time.time() - newest < STALE_LOCK_S:
        return
    raise UserError(
        f"The {label} build directory {build_dir} holds a lock file that is "
        f"{lock_age / 60:.0f} minutes old and nothing there has changed for "
        f"{STALE_LOCK_S / 60:.0f} minutes: a build was probably killed. If no other "
        f"process is compiling it, remove the directory (rm -rf '{build_dir}') and run again."
    )


def nvcc_version() -> str:
    """The last line of `nvcc --version` under CUDA_HOME, or why there is none."""
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return "not found"
    nvcc = Path(CUDA_HOME) / "bin" / "nvcc"
    try:
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=30).stdout
        return out.strip().splitlines()[-1] if out.strip() else "unknown"
    except Exception as e:  # noqa: BLE001
        return f"unusable ({e})"


def cuda_toolchain_ready() -> bool:
    """True when a CUDA device and a CUDA compiler are there (nothing is built)."""
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None


def compile_op_library(name: str, sources, cuda_flags, cflags, label: str, fallback: str,
                       verbose: bool = False):
    """Build (first time) and load the op library `name`; return its torch.ops namespace.

    sources: paths of the .cpp / .cu files; cuda_flags / cflags: extra nvcc / C++ flags (the
    -gencode for the current device is added here); label: the op's name in messages;
    fallback: what to use instead, for the messages.
    """
    if not torch.cuda.is_available():
        raise UserError(f"{label}: no CUDA device is visible (torch.cuda.is_available() is False); "
                        f"use {fallback} instead.")
    from torch.utils import cpp_extension as ce

    if ce.CUDA_HOME is None or shutil.which(str(Path(ce.CUDA_HOME) / "bin" / "nvcc")) is None:
        raise UserError(
            f"{label}: no CUDA compiler found (nvcc under CUDA_HOME); install the CUDA toolkit "
            f"matching torch's CUDA {torch.version.cuda} and set CUDA_HOME, or use {fallback}."
        )
    sources = [Path(s) for s in sources]
    for s in sources:
        if not s.is_file():
            raise UserError(f"{label}: source {s} is missing; reinstall the package.")
    bdir = build_dir(name)
    check_stale_lock(bdir, label)
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    t0 = time.time()
    try:
        ce.load(
            name=name,
            sources=[str(s) for s in sources],
            extra_cflags=list(cflags),
            extra_cuda_cflags=[f"-gencode=arch=compute_{arch},code=sm_{arch}", *cuda_flags],
            build_directory=str(bdir),
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as e:  # noqa: BLE001
        raise UserError(
            f"{label}: building the extension {name} in {bdir} failed: {type(e).__name__}: {str(e)[-2000:]}\n"
            f"torch {torch.__version__} was built with CUDA {torch.version.cuda}; nvcc: {nvcc_version()}; "
            f"device compute capability {major}.{minor}. What to do: install a CUDA toolkit whose nvcc matches "
            f"torch's CUDA version (set CUDA_HOME to it), make sure ninja and a C++ compiler are on PATH, "
            f"rerun with verbose=True to see the compiler output, or remove {bdir} to force a clean rebuild. "
            f"TORCH_CUDA_ARCH_LIST is not used by this build (it targets sm_{arch} explicitly). Without the "
            f"extension, use {fallback}."
        ) from e
    if verbose:
        print(f"[{label}] {name} ready in {time.time() - t0:.1f} s ({bdir})", flush=True)
    return getattr(torch.ops, name)
