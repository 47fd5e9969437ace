"""Memory: what a run's model state takes by strategy, and the message for a run that does not fit.

`state_bytes(params, strategy, precision, world_size)` estimates the bytes per GPU and in host
memory of the weights, gradients and optimiser state (not the activations, which grow with M_BSZ x
CTX_LEN and shrink with GRAD_CP 1): benchmarks/README.md writes the same arithmetic out for the
tutorial's sizes. `out_of_memory(e, ...)` turns an out-of-memory error of the set-up or of a step
(torch.cuda.OutOfMemoryError, DeepSpeed's and NCCL's RuntimeErrors saying "out of memory", the
CPU allocator's) into the UserError that says what the card (or host) has, what was asked for and
the peak reached, the model and M_BSZ, and what to try next, in order. The trainer raises it in
place of the error (run.py), on the rank where it happened; under several processes Lightning's
launcher then ends the others. Nothing of an unfinished step is ever saved, so PROJ_DIR keeps its
newest save.
"""
from __future__ import annotations

import re

import pytorch_lightning as pl

from rwkvlm.errors import UserError

GIB = 2**30

# bytes per parameter, mixed precision (bf16 / fp16) under DeepSpeed ZeRO: the 16-bit weights and
# gradients, the fp32 master weights, Adam's two fp32 moments, and the fp32 gradient partition the
# optimiser step reads (ZeRO-1/2 make it from the 16-bit gradients; offload keeps it in host memory)
W16, G16, MASTER, ADAM, G32 = 2, 2, 4, 8, 4


def state_bytes(params: int, strategy: str, precision: str, world_size: int = 1) -> dict:
    """{"gpu": bytes per GPU, "host": bytes of host memory on one node (all its ranks), "what": how}
    of the model state (weights, gradients, optimiser), for `world_size` GPUs in all; activations,
    CUDA buffers and the allocator's slack are not included. An estimate by the layouts of
    DeepSpeed ZeRO and torch's Adam."""
    n, w = float(params), max(1, int(world_size))
    mixed = precision in ("bf16", "fp16")
    opt = ADAM + (MASTER + G32 if mixed else 0)  # the optimiser's share: moments (+ fp32 master and grads)
    wt = W16 if mixed else 4
    gr = G16 if mixed else 4
    if not strategy.startswith("deepspeed"):  # torch Adam: fp32 weights, fp32 grads, moments, on every GPU
        return {"gpu": n * (4 + 4 + ADAM), "host": 0.0,
                "what": "fp32 weights 4 + fp32 gradients 4 + Adam moments 8 bytes per parameter on every GPU"}
    stage = int(strategy.split("_")[2])
    offload = strategy.endswith("offload")
    if offload and stage == 3:
        return {"gpu": 0.0, "host": n * (wt + opt),
                "what": f"weights {wt} + optimiser {opt} bytes per parameter in host memory (the GPU holds the "
                        f"layers in use)"}
    if offload:
        return {"gpu": n * (wt + gr / w), "host": n * opt,
                "what": f"weights {wt} + gradients {gr} bytes per parameter on the GPU (gradients split over "
                        f"the GPUs), optimiser {opt} in host memory"}
    if stage == 1:
        return {"gpu": n * (wt + gr + opt / w), "host": 0.0,
                "what": f"weights {wt} + gradients {gr} + optimiser {opt} bytes per parameter (optimiser split "
                        f"over the GPUs)"}
    if stage == 2:
        return {"gpu": n * (wt + (gr + opt) / w), "host": 0.0,
                "what": f"weights {wt} + gradients {gr} + optimiser {opt} bytes per parameter (gradients and "
                        f"optimiser split over the GPUs)"}
    return {"gpu": n * (wt + gr + opt) / w, "host": 0.0,
            "what": f"weights {wt} + gradients {gr} + optimiser {opt} bytes per parameter, all split over the GPUs"}


def host_memory() -> tuple[int | None, int | None]:
    """(total, available) bytes of this machine's memory (None where /proc/meminfo is unreadable)."""
    total = avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k == "MemTotal":
                    total = int(v.split()[0]) * 1024
                elif k == "MemAvailable":
                    avail = int(v.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return total, avail


def gpu_memory() -> dict | None:
    """The current card's name, total and free bytes, and PyTorch's allocated / peak allocated /
    reserved bytes; None without CUDA."""
    try:
        import torch

        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return None
        dev = torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(dev)
        return {"name": torch.cuda.get_device_name(dev), "index": dev, "total": total, "free": free,
                "allocated": torch.cuda.memory_allocated(dev), "peak": torch.cuda.max_memory_allocated(dev),
                "reserved": torch.cuda.memory_reserved(dev)}
    except Exception:  # the card may be in a bad state after the error: the message goes without it
        return None


_ASKED = re.compile(r"[Tt]ried to allocate ([\d.]+) ?([KMGT]i?B)")
_CPU_ASKED = re.compile(r"you tried to allocate (\d+) bytes")
_UNITS = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}


def asked_bytes(e: BaseException) -> int | None:
    """The allocation that failed, in bytes, as the error message states it (None if it does not)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        msg = str(e)
        m = _ASKED.search(msg)
        if m:
            return int(float(m.group(1)) * _UNITS[m.group(2)])
        m = _CPU_ASKED.search(msg)
        if m:
            return int(m.group(1))
        e = e.__cause__ or e.__context__
    return None


def _host_side(e: BaseException) -> bool:
    """Whether the failed allocation was host memory (the CPU allocator, or pinned memory)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if type(e).__name__ == "OutOfMemoryError":  # torch's CUDA caching allocator
            return False
        msg = str(e).lower()
        if "can't allocate memory" in msg or "cpuallocator" in msg or "pinned" in msg or isinstance(e, MemoryError):
            return True
        e = e.__cause__ or e.__context__
    return False


def _cuda_typed(e: BaseException) -> bool:
    """Whether `e` (or what it was raised from) is torch's CUDA OutOfMemoryError or names CUDA."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if type(e).__name__ == "OutOfMemoryError" or "cuda" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False


PEER_MARKS = ("connection closed by peer", "connection reset by peer", "remote process exited",
              "communicator was aborted")


def is_peer_failure(e: BaseException) -> bool:
    """Whether `e` is a collective that failed because another process of the run ended (gloo's
    "Connection closed by peer", NCCL's "remote process exited" / "communicator was aborted")."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, RuntimeError) and any(m in str(e).lower() for m in PEER_MARKS):
            return True
        e = e.__cause__ or e.__context__
    return False


def peer_stopped(e: BaseException, where: str, rank: int) -> UserError:
    """The UserError of a rank whose collective failed because another rank ended (most often with its
    own message: out of memory, a divergence, a full disk)."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    return UserError(f"rank {rank}: another process of this run ended during {where}, so this one stops too; "
                     f"that process's message (above or below) says why (an out-of-memory message names the "
                     f"next things to try). Nothing of the unfinished step was saved: the saves in PROJ_DIR are "
                     f"as they were, and re-running the script continues from the newest. (The error here: "
                     f"{type(e).__name__}: {first})")


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def next_steps(cfg, params: int, host_total: int | None) -> list[str]:
    """What to try, in order, for a run of `cfg` that ran out of memory."""
    out = []
    if cfg.micro_bsz > 1:
        out.append(f"a smaller M_BSZ: M_BSZ={max(1, cfg.micro_bsz // 2)} in demo-training-run.sh (--micro_bsz; "
                   f"the activations shrink with it)")
    if not cfg.grad_cp:
        out.append("GRAD_CP=1 in demo-training-run.sh (--grad_cp 1: each block is recomputed in the backward "
                   "pass instead of keeping its activations)")
    world = cfg.world_size
    have = f"; this machine has {gib(host_total)}" if host_total else ""
    if not cfg.is_deepspeed:
        out.append(f"--strategy deepspeed_stage_2 (the optimiser state split over the GPUs, 16-bit weights: "
                   f"{gib(state_bytes(params, 'deepspeed_stage_2', cfg.precision, world)['gpu'])} per GPU)")
    if not cfg.strategy.endswith("offload"):
        s = state_bytes(params, "deepspeed_stage_2_offload", cfg.precision, world)
        out.append(f"--strategy deepspeed_stage_2_offload (Adam's moments and the fp32 weights in host memory: "
                   f"about {gib(s['host'])} of it{have}; {gib(s['gpu'])} of weights and gradients per GPU)")
    if cfg.strategy != "deepspeed_stage_3_offload":
        s = state_bytes(params, "deepspeed_stage_3_offload", cfg.precision, world)
        out.append(f"--strategy deepspeed_stage_3_offload (the weights in host memory too: about "
                   f"{gib(s['host'])} of it{have})")
    out.append("more GPUs (GPU_PER_NODE / N_NODE): ZeRO splits the optimiser state, and stage 2 the gradients, "
               "over them")
    return out


def out_of_memory(e: BaseException, cfg, params: int, describe: str, where: str, rank: int = 0) -> UserError:
    """The UserError for an out-of-memory error `e` of a run of `cfg` (a model of `params`
    parameters, `describe`d), during `where` ("the set-up ...", "step 12")."""
    host_total, host_avail = host_memory()
    gpu = gpu_memory()
    asked = asked_bytes(e)
    host = _host_side(e) or (gpu is None and not _cuda_typed(e))
    who = f"rank {rank}: " if cfg.world_size > 1 else ""
    parts = []
    if host:
        have = (f"this machine has {gib(host_total)}" + (f", {gib(host_avail)} available now" if host_avail else "")
                if host_total else "the machine's memory is unknown")
        parts.append(f"{who}the host (CPU) memory ran out during {where}: {have}"
                     + (f"; the allocation that failed asked for {gib(asked)}" if asked else "") + ".")
    elif gpu is None:  # no figures of the card (e.g. CUDA is in a bad state after the error)
        parts.append(f"{who}the GPU ran out of memory during {where}"
                     + (f"; the allocation that failed asked for {gib(asked)}" if asked else "") + ".")
    else:
        parts.append(f"{who}the GPU ran out of memory during {where}: GPU {gpu['index']} ({gpu['name']}) has "
                     f"{gib(gpu['total'])}, {gib(gpu['free'])} free now; PyTorch held {gib(gpu['allocated'])} "
                     f"(peak {gib(gpu['peak'])}, reserved {gib(gpu['reserved'])})"
                     + (f" and asked for {gib(asked)} more" if asked else "")
                     + (f": it needed at least {gib(gpu['peak'] + asked)}" if asked else "") + "."
                     + (f" Host memory: {gib(host_total)}" + (f", {gib(host_avail)} available now" if host_avail else "")
                        + "." if host_total and cfg.strategy.endswith("offload") else ""))
    s = state_bytes(params, cfg.strategy, cfg.precision, cfg.world_size)
    parts.append(f"The run: {describe} ({params / 1e9:.2f}B parameters), M_BSZ {cfg.micro_bsz}, CTX_LEN "
                 f"{cfg.ctx_len}, GRAD_CP {int(bool(cfg.grad_cp))}, {cfg.world_size} "
                 f"{'GPU(s)' if cfg.accelerator == 'gpu' else 'process(es)'}, {cfg.strategy} "
                 f"{cfg.precision}. Its weights, gradients and optimiser state alone take about {gib(s['gpu'])} "
                 f"per GPU" + (f" and {gib(s['host'])} of host memory" if s["host"] else "")
                 + f" ({s['what']}), before the activations.")
    steps = next_steps(cfg, params, host_total)
    parts.append("Try, in this order: " + "; ".join(f"({i}) {x}" for i, x in enumerate(steps, 1)) + ".")
    parts.append("Nothing of the unfinished step was saved: the saves in PROJ_DIR are as they were, and "
                 "re-running the script continues from the newest.")
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    parts.append(f"(The error: {type(e).__name__}: {first})")
    return UserError(" ".join(parts))


def describe_cfg(cfg) -> str:
    """'RWKV-7 L32-D4096' of a TrainConfig (without building anything)."""
    mcfg = cfg.model_config()
    return f"{mcfg.family} {mcfg.describe()}"



# ------------------------------------------------------------------------------------ measured

class CudaMemory:
    """torch.cuda's figures of the current card (the MemoryProbe's source; a test gives another)."""

    def allocated(self) -> int:
        import torch

        return torch.cuda.memory_allocated()

    def peak(self) -> int:
        import torch

        return torch.cuda.max_memory_allocated()

    def reset_peak(self) -> None:
        import torch

        torch.cuda.reset_peak_memory_stats()

    def total(self) -> int:
        import torch

        return torch.cuda.mem_get_info()[1]

    def reserved_peak(self) -> int:
        import torch

        return torch.cuda.max_memory_reserved()

    def reserved(self) -> int:
        import torch

        return torch.cuda.memory_reserved()

    def card_used(self) -> int:
        """The whole card's memory in use: this process's PyTorch segments, its CUDA context and what
        libraries (NCCL, cuBLAS) allocate beside PyTorch, and any other process's."""
        import torch

        free, total = torch.cuda.mem_get_info()
        return total - free


class MemoryProbe(pl.Callback):
    """The GPU memory of one training step, split by phase, measured at the run's second step (its
    first when it has one step): what the card held before the step (weights, gradient buffers,
    optimiser state: `held`), the peak through forward + backward (`peak_forward_backward`: held +
    the activations of M_BSZ samples + workspaces) and through the optimiser step
    (`peak_optimizer`); beside them where the rest of the card goes: the peak allocated before the
    step (`peak_before`: set-up and the first step), the most PyTorch's allocator held from the
    card (`reserved_peak`, its cached segments included) and the card's memory in use after the step
    (`card_used`: also the CUDA context and what NCCL or cuBLAS take beside PyTorch), and what lies
    outside PyTorch's allocator (the card in use less what the allocator holds: `outside_allocator`)
    at three moments: the trainer's set-up (the CUDA context, before the strategy's), after the
    strategy's set-up (DeepSpeed's engine, the process group's first collectives) and after the
    step (the kernels the step loaded: ours, Triton's, cuBLAS's). Rank 0 prints one line and adds
    them to train_config.json as "cuda_memory" (GiB); benchmarks/run.py plans the largest M_BSZ
    that fits from them."""

    def __init__(self, log=print, source=None, step_in_run: int = 2):
        self.say, self.mem = log, source or CudaMemory()
        self.step_in_run = step_in_run
        self.on, self.held, self.peak_fb, self.result = False, 0, 0, None
        self.peak_before = self.reserved_before = 0
        self.outside = {}

    def _outside(self, moment: str) -> None:
        self.outside[moment] = self.mem.card_used() - self.mem.reserved()

    def setup(self, trainer, pl_module, stage):
        self._outside("setup")

    def on_fit_start(self, trainer, pl_module):
        self._outside("after_strategy_setup")

    def _measuring(self, pl_module) -> bool:
        run_steps = pl_module.cfg.total_steps - pl_module.start.step
        return pl_module.step - pl_module.start.step == min(self.step_in_run, run_steps) - 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.on = self.result is None and self._measuring(pl_module)
        if self.on:
            self.held = self.mem.allocated()
            self.peak_before, self.reserved_before = self.mem.peak(), self.mem.reserved_peak()
            self.mem.reset_peak()  # (PyTorch's reset clears the reserved peak too)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.on:
            self.peak_fb = self.mem.peak()
            self.mem.reset_peak()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.on:
            return
        self.on = False
        g = lambda n: round(n / GIB, 3)  # noqa: E731
        cfg = pl_module.cfg
        peak_opt = max(self.mem.peak(), self.mem.allocated())
        self.result = {"step": pl_module.step, "m_bsz": cfg.micro_bsz, "ctx_len": cfg.ctx_len, "total": g(self.mem.total()),
                       "held": g(self.held), "peak_forward_backward": g(self.peak_fb), "peak_optimizer": g(peak_opt),
                       "per_sample": g(max(0, self.peak_fb - self.held) / cfg.micro_bsz),
                       "peak_before": g(self.peak_before),
                       "reserved_peak": g(max(self.reserved_before, self.mem.reserved_peak())),
                       "card_used": g(self.mem.card_used())}
        self._outside("after_step")
        self.result["outside_allocator"] = {k: g(v) for k, v in self.outside.items()}
        r = self.result
        outside = ", ".join(f"{v:.2f} GiB {k.replace('_', ' ')}" for k, v in r["outside_allocator"].items())
        self.say(f"GPU memory at step {r['step']} (M_BSZ {cfg.micro_bsz}): {r['held']:.1f} GiB held before the step, "
                 f"peak {r['peak_forward_backward']:.1f} GiB in forward + backward, {r['peak_optimizer']:.1f} GiB "
                 f"in the optimiser step (PyTorch's allocations; before this step at most {r['peak_before']:.1f} GiB); "
                 f"PyTorch reserved at most {r['reserved_peak']:.1f} GiB; the card has {r['card_used']:.1f} of "
                 f"{r['total']:.1f} GiB in use; outside PyTorch's allocator: {outside}")
        if trainer.global_rank == 0:
            update_run_config(pl_module.rd.train_config, cuda_memory=r)


def update_run_config(path, **items) -> None:
    """Add items to train_config.json (crash-safely; nothing when it is missing or unreadable)."""
    import contextlib
    import json

    from rwkvlm.atomic import atomic_open

    with contextlib.suppress(OSError, ValueError):
        info = json.loads(path.read_text())
        info.update(items)
        with atomic_open(path, "w") as f:
            json.dump(info, f, indent=1, default=str)
