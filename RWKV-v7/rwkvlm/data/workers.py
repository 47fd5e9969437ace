"""make_data's worker processes: one pool for both passes (tokenizing in pass 1, reading documents
back from the token file in pass 2), results in job order, a bounded number of tasks in flight."""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

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
    forked: the workers are forks of this process, so they share its open files."""

    def __init__(self, executor=None, ahead: int = 0, forked: bool = False):
        self.executor, self.ahead, self.forked = executor, ahead, forked

    def map(self, fn, jobs):
        return map(fn, jobs) if self.executor is None else self._in_order(fn, jobs)

    def _in_order(self, fn, jobs):
        pending = deque()
        try:
            for job in jobs:
                pending.append(self.executor.submit(fn, job))
                if len(pending) > self.ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BrokenProcessPool:
            raise UserError("a make_data worker process died (killed, or out of memory?); run again, with fewer "
                            "--workers if memory is short. Nothing was written.") from None


@contextlib.contextmanager
def worker_pool(workers: int):
    """The Workers of a run: this process alone for one worker, else a pool of `workers`
    processes, CHUNKS_AHEAD tasks each in flight. They tokenize (pass 1) and read documents
    back from the token file (pass 2; forked workers only, which share its descriptor).

    Forked where the system can (Linux), after the tokenizer is loaded here, so the workers
    share its ~250 MB instead of loading it each; started at once, before anything else (a
    progress bar's thread) runs. On leaving, queued tasks are cancelled and the workers stopped."""
    if workers <= 1:
        yield Workers()
        return
    _vocab_bytes(get_tokenizer())  # loaded before the fork, shared by the workers
    forked = "fork" in multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if forked else None)
    executor = ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init, initargs=(os.getpid(),))
    try:
        executor.submit(int).result()  # starts the processes now
        yield Workers(executor, CHUNKS_AHEAD * workers, forked)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def default_workers() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
