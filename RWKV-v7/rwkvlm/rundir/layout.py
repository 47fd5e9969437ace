"""PROJ_DIR: the name and place of every file a training run keeps there.

    rwkv-init.pth          the prepare stage's weights
    rwkv-N.pth             weights after mini-epoch N (every EPOCH_SAVE mini-epochs)
    rwkv-final.pth         weights when --my_exit_tokens is reached
    rwkv-final.json        its step and the settings of the run that wrote it
    rwkv-latest.pth        the weights of the newest exact-resume state
    train_log.txt          a header line per run (rwkvlm.train.trainlog), one line per mini-epoch
    loss_log.csv           one row per step (a val_loss column when the run validates)
    train_config.json      the settings of the latest run
    vocab.json             a char-level model's vocabulary (--data_type utf-8 --vocab_size 0), written by
                           the prepare stage: {"0": char, ...} (rwkvlm.data.charvocab)
    profile.txt            --profile_steps
    resume/step-N/         exact-resume states (see saves.py)
    diverged.json          written when a run diverges: the last healthy save
    set-aside/<when>/      saves moved out of the way by --resume_from or after a divergence
    .train.lock            held by the running trainer (.train.node<K>.lock on node K > 0)

Every file is written under a temporary name and renamed when complete
(rwkvlm.atomic).
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
from pathlib import Path

from rwkvlm.atomic import existing_parent, is_write_error, remove_stale_temps, write_error
from rwkvlm.errors import UserError

INIT = "rwkv-init.pth"
FINAL = "rwkv-final.pth"
FINAL_INFO = "rwkv-final.json"
LATEST = "rwkv-latest.pth"
TRAIN_LOG = "train_log.txt"
LOSS_LOG = "loss_log.csv"
LOSS_LOG_HEADER = "step,tokens,loss,lr,kt_s,time"
LOSS_LOG_VAL_HEADER = LOSS_LOG_HEADER + ",val_loss"  # --val_every_steps: the loss of the validation windows
TRAIN_CONFIG = "train_config.json"
VOCAB = "vocab.json"
PROFILE = "profile.txt"
RESUME = "resume"
DIVERGED = "diverged.json"
SET_ASIDE = "set-aside"

# inside resume/step-N/
STATE_FILE = "state.json"  # written last: a state without it is incomplete
STATE_WEIGHTS = "weights.pth"  # the weights, in the rwkv-N.pth format
TRAINER_FILE = "trainer.pt"  # model and optimiser state (torch optimisers)
DS_DIR = "ds"  # a DeepSpeed checkpoint (DeepSpeed strategies)
DS_TAG = "state"


# train_log.txt: a validation's line starts with this word (rwkvlm.train.trainlog writes it):
# `val step S tokens T val_loss L val_ppl P windows W seconds X <datetime>`
VAL_MARK = "val"


def validation_fields(line: str) -> tuple[int, int, float] | None:
    """(step, tokens, val_loss) of a train_log.txt validation line, None for any other line."""
    if not line.lstrip().startswith(VAL_MARK + " "):
        return None
    parts = line.split()
    try:
        return int(parts[2]), int(parts[4]), float(parts[6])
    except (IndexError, ValueError):
        return None


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


_EPOCH_RE = re.compile(r"^rwkv-(\d+)\.pth$")
_STEP_RE = re.compile(r"^step-(\d+)$")


def state_folder_of(path) -> Path | None:
    """The exact-resume state folder (.../resume/step-N/) that `path` is or lies in (its
    trainer.pt, weights.pth, ds/... files), else None."""
    p = Path(path)
    for q in (p, *list(p.parents)[:3]):
        if _STEP_RE.match(q.name) and q.parent.name == RESUME:
            return q
    return None


def state_name(step: int) -> str:
    return f"step-{step:09d}"


def epoch_name(n: int) -> str:
    return f"rwkv-{n}.pth"


class RunDir:
    """The files of one PROJ_DIR."""

    def __init__(self, path):
        self.path = Path(path)

    def __truediv__(self, name) -> Path:
        return self.path / name

    init = property(lambda self: self.path / INIT)
    final = property(lambda self: self.path / FINAL)
    final_info = property(lambda self: self.path / FINAL_INFO)
    latest = property(lambda self: self.path / LATEST)
    train_log = property(lambda self: self.path / TRAIN_LOG)
    loss_log = property(lambda self: self.path / LOSS_LOG)
    train_config = property(lambda self: self.path / TRAIN_CONFIG)
    vocab = property(lambda self: self.path / VOCAB)
    profile = property(lambda self: self.path / PROFILE)
    resume_root = property(lambda self: self.path / RESUME)
    diverged = property(lambda self: self.path / DIVERGED)

    def epoch_weights(self, n: int) -> Path:
        return self.path / epoch_name(n)

    def state_dir(self, step: int) -> Path:
        return self.resume_root / state_name(step)

    def epoch_checkpoints(self) -> list[tuple[int, Path]]:
        """rwkv-N.pth files, newest (largest N) first."""
        out = []
        for p in self.path.glob("rwkv-*.pth"):
            m = _EPOCH_RE.match(p.name)
            if m:
                out.append((int(m.group(1)), p))
        return sorted(out, reverse=True)

    def state_dirs(self, complete: bool = True) -> list[tuple[int, Path]]:
        """Exact-resume state folders, newest first: the complete ones (their state.json
        exists), or with complete=False the incomplete ones."""
        out = []
        if self.resume_root.is_dir():
            for d in self.resume_root.iterdir():
                m = _STEP_RE.match(d.name)
                if m and d.is_dir() and (d / STATE_FILE).is_file() == complete:
                    out.append((int(m.group(1)), d))
        return sorted(out, reverse=True)

    def read_json(self, path) -> dict | None:
        """A JSON object file of this folder, or None when it is missing or not one."""
        try:
            obj = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return None
        return obj if isinstance(obj, dict) else None

    def relative(self, path) -> str:
        try:
            return str(Path(path).relative_to(self.path))
        except ValueError:
            return str(path)

    # ------------------------------------------------------------ leftovers of killed runs
    def remove_leftovers(self) -> list[Path]:
        """Temporaries of dead writers and incomplete state folders (a kill while saving).

        Call only while holding the lock (no other trainer writes here then).
        """
        removed = remove_stale_temps(self.path)
        for _, d in self.state_dirs(complete=True):
            removed += remove_stale_temps(d)
        for _, d in self.state_dirs(complete=False):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
        return removed

    # ------------------------------------------------------------ setting saves aside
    def set_aside(self, paths, why: str) -> Path | None:
        """Move saves (files or state folders of this PROJ_DIR) to set-aside/<when>/, keeping
        their relative paths, so that they no longer count as saves; returns the folder."""
        paths = [Path(p) for p in paths if Path(p).exists()]
        if not paths:
            return None
        folder = self.path / SET_ASIDE / f"{datetime.datetime.now():%Y%m%d-%H%M%S}"
        n = 1
        while folder.exists():
            n += 1
            folder = folder.with_name(f"{folder.name.split('.')[0]}.{n}")
        folder.mkdir(parents=True)
        (folder / "WHY.txt").write_text(why.rstrip() + "\n")
        for p in paths:
            dest = folder / self.relative(p)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(p, dest)
        for log in (self.loss_log, self.train_log):  # the logs as they were, before they are trimmed
            if log.is_file():
                shutil.copyfile(log, folder / log.name)
        return folder

    # ------------------------------------------------------------ one trainer at a time
    def lock(self, node_rank: int = 0) -> "RunLock":
        name = ".train.lock" if node_rank == 0 else f".train.node{node_rank}.lock"
        return RunLock(self.path / name, self.path)


def check_proj_dir(path, flag: str = "--proj_dir") -> Path:
    """Raise UserError when PROJ_DIR (or a folder above it) exists and is not a folder."""
    proj = Path(path)
    if proj.exists() and not proj.is_dir():
        raise UserError(f"{flag} {proj} is a file, not a folder; PROJ_DIR must be a folder for the checkpoints "
                        f"and logs. Set PROJ_DIR in the demo-training scripts (or {flag}) to a folder, or move "
                        f"the file away.")
    p = proj.absolute().parent
    while p != p.parent and not p.exists():
        p = p.parent
    if not p.is_dir():
        raise UserError(f"{flag} {proj}: {p} is a file, not a folder, so PROJ_DIR cannot be made under it. "
                        f"Choose another {flag} (PROJ_DIR in the demo-training scripts).")
    return proj


def ensure_proj_dir(path, flag: str = "--proj_dir") -> Path:
    """Make PROJ_DIR if it is missing; UserError (saying which flag to change) when it cannot be."""
    proj = check_proj_dir(path, flag)
    try:
        proj.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _refuse_unwritable(proj, e, flag)
        raise
    return proj


def _refuse_unwritable(proj: Path, e: OSError, flag: str = "--proj_dir") -> None:
    """Raise the WriteError for a PROJ_DIR that cannot be made or written (full, read-only, not ours)."""
    if is_write_error(e):
        raise write_error(e, existing_parent(proj), hint=f"choose another {flag} (PROJ_DIR in the "
                                                          f"demo-training scripts)") from e


class RunLock:
    """An exclusive lock on PROJ_DIR for one trainer (per node), held while it runs.

    The lock file says who holds it; the operating system releases the lock when the
    holder dies, so a later run takes a dead run's lock over (with a note).
    """

    def __init__(self, path: Path, proj: Path):
        self.path, self.proj = Path(path), Path(proj)
        self._fd = None
        self.took_over = None  # the dead holder's description, when its lock was taken over

    def _holder(self, fd) -> dict:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            obj = json.loads(os.read(fd, 1 << 16).decode() or "{}")
        except (OSError, ValueError, UnicodeDecodeError):
            return {}
        return obj if isinstance(obj, dict) else {}

    @staticmethod
    def describe(h: dict) -> str:
        return (f"pid {h.get('pid', '?')} on {h.get('host', '?')}, started {h.get('started', '?')}"
                f" ({h.get('command', '?')})")

    def acquire(self) -> "RunLock":
        ensure_proj_dir(self.proj)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                _refuse_unwritable(self.proj, e)
                raise
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = self._holder(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise UserError(
                        f"another training run is using PROJ_DIR {self.proj.resolve()}: "
                        f"{self.describe(holder)}. Two runs in one folder would overwrite each other's "
                        f"saves and logs. Wait for it to finish, stop it (Ctrl-C saves an exact-resume "
                        f"state), or give this run another PROJ_DIR.") from None
                raise
            # a holder that released the lock may have removed the file meanwhile: lock the one in place
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        old = self._holder(fd)
        if old:
            self.took_over = self.describe(old)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}",
                "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False
