"""make_data's worker processes: one pool for both passes (tokenizing in pass 1, copying documents
from the token file into the output in pass 2), results in job order, a bounded number of tasks in
flight."""
from __future__ import annotations

import contextlib
import mmap
import multiprocessing
import os
import signal
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import NamedTuple

import numpy as np

from rwkvlm.data.tokenize_jsonl import _vocab_bytes
from rwkvlm.data.tokenizer import get_tokenizer
from rwkvlm.errors import UserError

CHUNKS_AHEAD = 2  # tasks in flight per worker


def _worker_init(parent: int) -> None:
    """In each worker: die with make_data, so that a killed run leaves no worker behind (holding
    the token file open), and leave Ctrl-C to make_data (which stops the workers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before that
        os._exit(1)


class Workers:
    """Runs fn over jobs, results in job order: in this process (no executor), or by a pool of
    worker processes with at most `ahead` + 1 tasks in flight (memory stays bounded).
    forked: the workers are forks of this process, so they share its open files.

    map(..., shared="tokens"): that array of each result comes back through memory the pool
    shares (`slots`, made before the fork; one slot per task in flight), not through a pipe: two
    copies instead of five, and no pickling. A result then holds a view of its slot, valid until
    the next result is asked for. An array too large for a slot comes through the pipe."""

    def __init__(self, executor=None, ahead: int = 0, forked: bool = False, slots: "_Slots | None" = None):
        self.executor, self.ahead, self.forked, self.slots = executor, ahead, forked, slots

    def map(self, fn, jobs, shared: str | None = None):
        return map(fn, jobs) if self.executor is None else self._in_order(fn, jobs, shared if self.slots else None)

    def _in_order(self, fn, jobs, shared):
        pending = deque()
        try:
            for i, job in enumerate(jobs):
                if shared:  # slot i % count: free, its last user's result was handed on ahead + 1 jobs ago
                    pending.append(self.executor.submit(_run_sharing, fn, shared, i % self.slots.count, job))
                else:
                    pending.append(self.executor.submit(fn, job))
                if len(pending) > self.ahead:
                    yield self._unshare(pending.popleft().result(), shared)
            while pending:
                yield self._unshare(pending.popleft().result(), shared)
        except BrokenProcessPool:
            raise UserError("a make_data worker process died (killed, or out of memory?); run again, with fewer "
                            "--workers if memory is short. Nothing was written.") from None

    def _unshare(self, result, field):
        value = getattr(result, field) if field else None
        if not isinstance(value, _InSlot):
            return result
        slots = self.slots
        array = np.frombuffer(slots.memory, dtype=value.dtype, count=value.count, offset=value.slot * slots.size)
        return result._replace(**{field: array})


class _Slots(NamedTuple):
    """Memory shared by make_data and its forked workers: `count` slots of `size` bytes."""
    memory: mmap.mmap
    count: int
    size: int


class _InSlot(NamedTuple):
    """Stands in a result for an array that went into a slot."""
    slot: int
    dtype: str
    count: int


_slots: _Slots | None = None  # the pool's shared slots, in this process and (inherited) in its workers


def _run_sharing(fn, field: str, slot: int, job):
    """In a worker: fn(job), with its result's `field` array put into `slot` when it fits."""
    result = fn(job)
    array = np.ascontiguousarray(getattr(result, field))
    if _slots is None or array.nbytes > _slots.size:
        return result
    start = slot * _slots.size
    _slots.memory[start : start + array.nbytes] = memoryview(array).cast("B")
    return result._replace(**{field: _InSlot(slot, array.dtype.str, array.size)})


@contextlib.contextmanager
def worker_pool(workers: int, slot_bytes: int = 0):
    """The Workers of a run: this process alone for one worker, else a pool of `workers`
    processes, CHUNKS_AHEAD tasks each in flight. They tokenize (pass 1) and copy documents
    from the token file into the output (pass 2; forked workers only, which share its
    descriptor). slot_bytes: the size of a shared slot for results (Workers.map's `shared`).

    Forked where the system can (Linux), after the tokenizer is loaded here, so the workers
    share its ~250 MB instead of loading it each; started at once, before anything else (a
    progress bar's thread) runs. On leaving, queued tasks are cancelled and the workers stopped."""
    global _slots
    if workers <= 1:
        yield Workers()
        return
    _vocab_bytes(get_tokenizer())  # loaded before the fork, shared by the workers
    forked = "fork" in multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if forked else None)
    ahead = CHUNKS_AHEAD * workers
    if forked and slot_bytes:
        _slots = _Slots(mmap.mmap(-1, (ahead + 2) * slot_bytes), ahead + 2, slot_bytes)
    executor = ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init, initargs=(os.getpid(),))
    try:
        executor.submit(int).result()  # starts the processes now
        yield Workers(executor, ahead, forked, _slots)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        slots, _slots = _slots, None
        if slots is not None:
            with contextlib.suppress(BufferError):  # a result's view still alive: the memory goes with it
                slots.memory.close()


def default_workers() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
