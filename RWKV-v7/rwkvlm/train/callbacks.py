"""The trainer's bookkeeping that is not training: Lightning callbacks beside RWKVTrainModule.

- StopOnSignal: the first Ctrl-C or SIGTERM asks the module to finish the step, save an
  exact-resume state and stop (module.stop_requested); a second Ctrl-C stops at once.
- StepProfiler: --profile_steps N profiles N steps after the run's first PROFILE_AFTER_STEPS into
  PROJ_DIR/profile.txt (torch.profiler tables, wall time per step, host time per phase).
"""
from __future__ import annotations

import os
import signal
import statistics
import sys
import threading
import time

import pytorch_lightning as pl
import torch

from rwkvlm.atomic import atomic_open

PROFILE_AFTER_STEPS = 10  # --profile_steps skips the run's first steps (compilation, warm-up)


class StopOnSignal(pl.Callback):
    """Ctrl-C / SIGTERM (a cluster's preemption notice): set the module's stop_requested; the
    module saves and stops after the step. The previous handlers come back when training ends."""

    def __init__(self):
        self._old = {}

    def on_train_start(self, trainer, pl_module):
        pl_module.stop_requested = False
        if threading.current_thread() is not threading.main_thread():
            return
        self._old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def request(signum, frame):
            if pl_module.stop_requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            pl_module.stop_requested = True
            if trainer.global_rank == 0:
                print(f"\n{signal.Signals(signum).name}: stopping after this step and saving an exact-resume "
                      f"state (press Ctrl-C again to stop at once).", file=sys.stderr, flush=True)

        for sig in self._old:
            signal.signal(sig, request)

    def _restore(self):
        for sig, handler in self._old.items():
            if handler is not None:
                signal.signal(sig, handler)
        self._old = {}

    def on_train_end(self, trainer, pl_module):
        self._restore()

    def on_exception(self, trainer, pl_module, exception):
        self._restore()


class StepProfiler(pl.Callback):
    """torch.profiler over `steps` training steps after the first PROFILE_AFTER_STEPS, written
    (rank 0) to `path` with the wall time of each step and the host time of each phase."""

    def __init__(self, steps: int, path, log=print):
        self.steps, self.path, self.say = steps, path, log
        self.prof = None
        self.times = []  # wall time per profiled step (s)
        self.marks = []  # per profiled step: [(phase, host perf_counter)]
        self.t_last = None

    # -------------------------------------------------------- phases of a step
    def _mark(self, phase):
        """The host time at which `phase` ended (issued, not run: the GPU works asynchronously
        until the loss is read at the step's end)."""
        if self.prof is not None and self.marks:
            self.marks[-1].append((phase, time.perf_counter()))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == PROFILE_AFTER_STEPS and self.prof is None and not self.times:
            self._start(trainer)
        if self.prof is not None:
            self._mark("data and Lightning loop before the next step")  # closes the previous step
            self.marks.append([("start", time.perf_counter())])

    def on_before_backward(self, trainer, pl_module, loss):
        self._mark("forward")

    def on_after_backward(self, trainer, pl_module):
        self._mark("backward")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._mark("to optimizer step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        dt = None if self.t_last is None else now - self.t_last
        if self.prof is not None:
            self._mark("optimizer step")
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            float(loss.detach())  # waits for the GPU
            self._mark("wait for the GPU (loss read)")
            self.times.append(dt if dt is not None else 0.0)
            if batch_idx + 1 >= PROFILE_AFTER_STEPS + self.steps:
                self._stop(trainer)
        self.t_last = now

    def on_train_end(self, trainer, pl_module):
        if self.prof is not None:
            self._stop(trainer)

    # -------------------------------------------------------- the profile
    def _start(self, trainer):
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU]
        if torch.cuda.is_available() and trainer.strategy.root_device.type == "cuda":
            acts.append(ProfilerActivity.CUDA)
        self.times, self.marks = [], []
        self.prof = profile(activities=acts)
        self.prof.__enter__()

    def _stop(self, trainer):
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        if trainer.global_rank != 0:
            return
        n = max(1, len(self.times))
        avg = prof.key_averages()
        has_cuda = any(getattr(e, "self_device_time_total", 0) > 0 for e in avg)
        parts = [f"torch.profiler over {n} training steps after the first {PROFILE_AFTER_STEPS} "
                 f"(totals over all {n} steps); wall time per step (ms): "
                 + ", ".join(f"{t * 1e3:.1f}" for t in self.times)]
        parts += [self._phase_table()]
        if has_cuda:
            gib = 2 ** 30
            parts += [f"CUDA memory of this process so far: peak allocated "
                      f"{torch.cuda.max_memory_allocated() / gib:.2f} GiB, peak reserved "
                      f"{torch.cuda.max_memory_reserved() / gib:.2f} GiB "
                      f"(PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '')!r})"]
        parts += [""]
        if has_cuda:
            parts += ["== by GPU time (self)", avg.table(sort_by="self_device_time_total", row_limit=40), ""]
        parts += ["== by CPU time (self)", avg.table(sort_by="self_cpu_time_total", row_limit=40), ""]
        parts += ["== by CPU time (with children)", avg.table(sort_by="cpu_time_total", row_limit=40)]
        with atomic_open(self.path, "w") as f:
            f.write("\n".join(parts) + "\n")
        self.say(f"wrote {self.path} ({n} steps profiled)")

    def _phase_table(self) -> str:
        """Host time per phase of the profiled steps (median ms), in the order they ran."""
        per_phase = {}
        for marks in self.marks:
            for (_, t0), (name, t1) in zip(marks, marks[1:]):
                per_phase.setdefault(name, []).append((t1 - t0) * 1e3)
        if not per_phase:
            return "host time per phase: none recorded"
        return "host time per phase (median ms; the profiler's overhead included): " + ", ".join(
            f"{name} {statistics.median(v):.1f}" for name, v in per_phase.items())
