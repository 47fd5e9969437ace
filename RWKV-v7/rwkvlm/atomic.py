"""Crash-safe file writes: write under a temporary name, fsync, rename.

A reader never sees a half-written file: either the old file (or none) or the
complete new one. Temporary files live in the destination directory so the
rename is atomic on POSIX file systems.
"""
import contextlib
import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(dest, suffix: str = ""):
    """Yield a temporary path beside `dest`; on success rename it onto `dest`.

    The temporary file is removed if the body raises (or is interrupted), so
    no partial output is ever left under the final name.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix + ".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_open(dest, mode: str = "wb"):
    """Open a temporary file for writing; rename onto `dest` when the block ends cleanly."""
    with atomic_path(dest) as tmp:
        with open(tmp, mode) as f:
            yield f


def atomic_torch_save(obj, dest) -> None:
    """torch.save `obj` to `dest` crash-safely."""
    import torch

    with atomic_path(dest) as tmp:
        torch.save(obj, tmp)
