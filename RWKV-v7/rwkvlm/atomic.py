"""Crash-safe file writes: write under a temporary name, fsync, rename.

A reader never sees a half-written file: either the old file (or none) or the
complete new one. Temporary files live in the destination directory so the
rename is atomic on POSIX file systems, and their names say which process on
which host writes them (`.NAME.HOST-PID-XXXXXXXX.tmp`), so that the next run
of a tool can remove those of writers that died (`remove_stale_temps`).

A set of files that must change together (a .bin with its .idx and
.meta.json) is replaced by `commit_files`: the complete temporaries are
listed in a small journal first, then renamed; `finish_commit` completes
an interrupted commit from its journal, so a consistent old or new set
exists at every instant.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

# `.{name}.{host}-{pid}-{random}.tmp`; the random part (mkstemp's) never holds '-'
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9-]+)-(?P<pid>\d+)-(?P<rand>[a-z0-9_]+)(?:\.\w+)?\.tmp$")
# the names of earlier versions: `.{name}.{random}.tmp`, no owner
_OLD_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<rand>[a-z0-9_]{8})\.tmp$")
OLD_TEMP_AGE_S = 3600  # an ownerless temporary this old is taken for a dead writer's


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0]) or "host"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(directory: Path) -> None:
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


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        f.flush()
        os.fsync(f.fileno())


def temp_path(dest, suffix: str = "") -> Path:
    """A new, empty temporary file beside `dest`, named for this process (`suffix`, e.g.
    ".png", goes before ".tmp" for writers that choose a format by the extension)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.{_host()}-{os.getpid()}-", suffix=suffix + ".tmp",
                               dir=dest.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(dest, suffix: str = ""):
    """Yield a temporary path beside `dest`; on success rename it onto `dest`.

    The temporary file is removed if the body raises (or is interrupted), so
    no partial output is ever left under the final name.
    """
    dest = Path(dest)
    tmp = temp_path(dest, suffix)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, dest)
        if tmp.exists():  # rename() does nothing when both names are links to one file
            tmp.unlink()
        fsync_dir(dest.parent)
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


def link_or_copy(src, dest) -> None:
    """Make `dest` a complete copy of `src`, crash-safely: a hard link where the file
    system allows (no extra disk), else a copy."""
    src, dest = Path(src), Path(dest)
    with contextlib.suppress(OSError):
        if dest.samefile(src):
            return
    with atomic_path(dest) as tmp:
        try:
            tmp.unlink()
            os.link(src, tmp)
        except OSError:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            shutil.copyfile(src, tmp)


# ---------------------------------------------------------------- dead writers' temporaries

def _alive(pid: int, since: float) -> bool:
    """Whether process `pid` runs on this host and started no later than `since` (an mtime)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by someone else
    started = None
    with contextlib.suppress(OSError):
        started = os.stat(f"/proc/{pid}").st_ctime
    return started is None or started <= since + 1.0  # a newer process reused the number


def stale_temps(directory, names=None) -> list[Path]:
    """Temporaries in `directory` left by writers that are no longer running.

    Only this host's writers are judged (a shared file system may hold another
    host's live ones); `names`, if given, limits it to temporaries of those
    destination names. Ownerless temporaries of earlier versions count when
    older than OLD_TEMP_AGE_S.
    """
    directory = Path(directory)
    out = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return out
    host, now = _host(), time.time()
    for e in entries:
        if not e.name.endswith(".tmp") or not e.is_file(follow_symlinks=False):
            continue
        try:
            mtime = e.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        m = _TEMP_RE.match(e.name)
        if m:
            if names is not None and m["name"] not in names:
                continue
            if m["host"] == host and not _alive(int(m["pid"]), mtime):
                out.append(Path(e.path))
            continue
        m = _OLD_TEMP_RE.match(e.name)
        if m and (names is None or m["name"] in names) and now - mtime > OLD_TEMP_AGE_S:
            out.append(Path(e.path))
    return sorted(out)


def remove_stale_temps(directory, names=None) -> list[Path]:
    """Remove what `stale_temps` finds; return the removed paths."""
    removed = []
    for p in stale_temps(directory, names):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    return removed


# ---------------------------------------------------------------- replacing a set of files

def commit_files(renames, journal) -> None:
    """Rename complete temporaries onto their destinations as one set.

    `renames`: [(temporary, destination), ...], each temporary complete (it is
    fsynced here). The journal lists them before the first rename; after a
    crash `finish_commit(journal)` does the rest, so under the destination
    names there is always the old set or (once the journal exists) the new one.
    """
    journal = Path(journal)
    pairs = [(Path(t), Path(d)) for t, d in renames]
    for tmp, _ in pairs:
        _fsync_file(tmp)
    with atomic_open(journal, "w") as f:
        json.dump({"renames": [[t.name, d.name] for t, d in pairs]}, f)
    finish_commit(journal)


def finish_commit(journal) -> bool:
    """Complete the commit that `journal` lists, if there is one; True if there was."""
    journal = Path(journal)
    try:
        plan = json.loads(journal.read_text())
        renames = [(str(t), str(d)) for t, d in plan["renames"]]
    except FileNotFoundError:
        return False
    except (OSError, ValueError, KeyError, TypeError):
        # the journal is renamed into place whole, so an unreadable one was never ours
        raise OSError(f"{journal} is not a commit journal; remove it") from None
    directory = journal.parent
    for tmp, dest in renames:
        with contextlib.suppress(FileNotFoundError):  # done already (by us or a concurrent reader)
            os.replace(directory / tmp, directory / dest)
    fsync_dir(directory)
    with contextlib.suppress(FileNotFoundError):
        journal.unlink()
    fsync_dir(directory)
    return True
