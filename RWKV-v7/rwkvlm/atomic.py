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

A write that fails because the disk is full, the folder is read-only or not
ours (ENOSPC, EDQUOT, EROFS, EACCES, EPERM) raises `WriteError`: a UserError
(the entry points print it) that is still an OSError, naming the folder and
what to do; the temporary file is removed first, so the old file is intact.
Callers add the flag to change with `explain_write_errors`.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

from rwkvlm.errors import UserError

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
    no partial output is ever left under the final name. A full disk or an
    unwritable folder raises WriteError (see the module docstring).
    """
    dest = Path(dest)
    kept = f"The file {dest.name} was not changed" if dest.exists() else f"The file {dest.name} was not written"
    try:
        tmp = temp_path(dest, suffix)
    except OSError as e:
        if is_write_error(e) and not isinstance(e, WriteError):
            raise write_error(e, existing_parent(dest.parent), kept=kept) from e
        raise
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, dest)
        if tmp.exists():  # rename() does nothing when both names are links to one file
            tmp.unlink()
        fsync_dir(dest.parent)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if is_write_error(e) and not isinstance(e, WriteError):
            raise write_error(e, dest.parent, kept=kept) from e
        raise


def existing_parent(p: Path) -> Path:
    """`p` or its nearest parent that exists (absolute)."""
    p = Path(p).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


@contextlib.contextmanager
def atomic_open(dest, mode: str = "wb"):
    """Open a temporary file for writing; rename onto `dest` when the block ends cleanly."""
    with atomic_path(dest) as tmp:
        with open(tmp, mode) as f:
            yield f


def atomic_torch_save(obj, dest) -> None:
    """torch.save `obj` to `dest` crash-safely.

    torch.save writes through a Python file object: given a path, a full disk ends in a
    RuntimeError ("unexpected pos ...") without the OSError (ENOSPC) it is; a full disk
    or an unwritable folder raises WriteError (atomic_path).
    """
    import torch

    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as f:
            try:
                torch.save(obj, f)
            except RuntimeError as e:
                # torch's writer then fails closing the archive, and that RuntimeError
                # ("unexpected pos ...") hides the OSError of the write: raise the OSError
                cause = _write_error_in_chain(e)
                if cause is None:
                    raise
                raise cause from None


def _write_error_in_chain(e: BaseException) -> OSError | None:
    seen = set()
    while e is not None and id(e) not in seen:
        if is_write_error(e):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


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


# ---------------------------------------------------------------- writes that cannot succeed here

# what a failed write's errno means to the user
WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied (the folder is read-only or belongs to another user)",
    errno.EPERM: "the operation is not permitted there",
}
_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class WriteError(UserError, OSError):
    """A write that failed for a reason the user can fix: a full disk or a folder that cannot
    be written. A UserError for the entry points and still an OSError (with .errno) for
    code that handles OSError."""

    def __init__(self, message: str, *, code: int | None = None, folder=None):
        super().__init__(message)
        self.errno = code
        self.folder = Path(folder) if folder is not None else None


def human_bytes(n: float) -> str:
    """A byte count for people: 5.0 kB, 3.2 GB (powers of 1000, as df -H)."""
    n = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB", "PB", "EB"):
        if abs(n) < 1000 or unit == "EB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def free_bytes(folder) -> int | None:
    """Free space on the file system holding `folder` (its nearest existing parent), or None."""
    try:
        return int(shutil.disk_usage(existing_parent(Path(folder))).free)
    except OSError:
        return None


def is_write_error(e: BaseException) -> bool:
    """Whether `e` is an OSError a user fixes by freeing space or choosing another folder."""
    return isinstance(e, OSError) and e.errno in WRITE_ERRNOS


def write_error(e: OSError, folder, *, hint: str = "choose another folder", kept: str = "",
                need: int | None = None) -> WriteError:
    """The WriteError for the failed write `e` in `folder` (is_write_error(e) must hold).

    hint: what to do instead (e.g. "choose another --proj_dir"); kept: a sentence on what
    was not changed ("The previous rwkv-3.pth is untouched"); need: the bytes the write needs.
    """
    folder = Path(folder).absolute()
    code = e.errno
    parts = [f"cannot write in {folder}: {WRITE_ERRNOS[code]}"]
    if code in _SPACE_ERRNOS:
        free = free_bytes(folder)
        space = [f"it needs about {human_bytes(need)}" if need else "",
                 f"{human_bytes(free)} free" if free is not None else ""]
        space = ", ".join(x for x in space if x)
        if space:
            parts[0] += f" ({space})"
    parts[0] += "."
    if kept:
        parts.append(kept + ".")
    if code in _SPACE_ERRNOS:
        parts.append(f"Free some space there, or {hint}.")
    else:
        parts.append(f"Make the folder writable, or {hint}.")
    return WriteError(" ".join(parts), code=code, folder=folder)


@contextlib.contextmanager
def explain_write_errors(folder, *, hint: str = "choose another folder", kept: str = "",
                         need: int | None = None):
    """Turn a full disk or an unwritable folder inside the block into a WriteError that says
    `hint` (re-phrasing a WriteError from below, e.g. atomic_path's, with this hint)."""
    try:
        yield
    except OSError as e:
        if not is_write_error(e):
            raise
        where = e.folder if isinstance(e, WriteError) and e.folder is not None else folder
        raise write_error(e, where, hint=hint, kept=kept, need=need) from e


def check_output_path(dest, flag: str, example: str = "out") -> Path:
    """Raise UserError unless `dest` can become a file: it is no folder and no part of its
    path is a file. `flag` names the option that gave it (e.g. "--out"); `example`, a file
    name to suggest inside a folder given by mistake."""
    dest = Path(dest)
    if dest.is_dir():
        raise UserError(f"{flag} {dest} is a folder; give the name of a file to write, e.g. "
                        f"{flag} {dest / example}.")
    _check_parents(dest.parent, flag, dest)
    return dest


def check_output_dir(folder, flag: str) -> Path:
    """Raise UserError unless `folder` is a folder or can be made one (no file in the way)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder} is a file, not a folder; give a folder (it is created if "
                        f"missing), or move the file away.")
    _check_parents(folder.parent, flag, folder)
    return folder


def _check_parents(parent: Path, flag: str, dest: Path) -> None:
    p = parent
    while str(p) not in ("", ".") and p != p.parent:
        if p.exists():
            if not p.is_dir():
                raise UserError(f"{flag} {dest}: {p} is a file, not a folder, so nothing can be written "
                                f"under it. Choose another path, or move {p} away.")
            return
        p = p.parent


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
