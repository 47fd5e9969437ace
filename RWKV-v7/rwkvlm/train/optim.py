"""Optimiser parameter groups and the learning-rate schedule of the recipe.

Groups: `att.w0` (x070; `att.time_decay` in x060) at 2x lr with no decay; 2-D `.weight` tensors with
weight_decay (only when it is > 0); everything else at 1x lr with no decay.
Each group carries `lr_scale`; the schedule sets `lr = lr_now * lr_scale`.

lr: cosine from lr_init to lr_final over tokens, with a warmup over the first
warmup_steps of a run (RWKV-v7/docs/rwkv7-x070.md, "Optimiser and schedule").
"""
from __future__ import annotations

import contextlib
import math
import os
import re


def param_groups(model, weight_decay: float):
    """Split model parameters into the recipe's groups (names sorted, stable). The 2x group is
    the model's LR_2X names (x070: att.w0; x060: att.time_decay, as RWKV-LM's layerwise_lr)."""
    lr_1x, lr_2x, lr_decay = [], [], []
    fast = getattr(model, "LR_2X", ("att.w0",))
    for name, p in sorted(model.named_parameters()):
        if not p.requires_grad:
            continue
        if name.endswith(fast):
            lr_2x.append(p)
        elif weight_decay > 0 and p.dim() >= 2 and ".weight" in name:
            lr_decay.append(p)
        else:
            lr_1x.append(p)
    groups = [
        {"params": lr_1x, "weight_decay": 0.0, "lr_scale": 1.0, "name": "lr_1x"},
        {"params": lr_2x, "weight_decay": 0.0, "lr_scale": 2.0, "name": "lr_2x"},
    ]
    if lr_decay:
        groups.append({"params": lr_decay, "weight_decay": weight_decay, "lr_scale": 1.0, "name": "lr_decay"})
    return [g for g in groups if g["params"]]


def lr_at(step: int, run_step: int, cfg) -> float:
    """Learning rate for global optimiser step `step` (0-based).

    `run_step` is the step counted from the start of this run (warmup restarts
    when a run starts from weights only; an exact resume continues the count).
    """
    tokens_seen = step * cfg.tokens_per_step
    warmup_tokens = cfg.warmup_steps * cfg.tokens_per_step
    if cfg.my_exit_tokens > warmup_tokens:
        progress = (tokens_seen - warmup_tokens) / (cfg.my_exit_tokens - warmup_tokens)
    else:
        progress = 1.0
    progress = min(1.0, max(0.0, progress))
    f = cfg.lr_final / cfg.lr_init
    lr = cfg.lr_init * ((0.5 + f / 2) + (0.5 - f / 2) * math.cos(math.pi * progress))
    if run_step < cfg.warmup_steps:
        lr *= 0.01 + 0.99 * run_step / cfg.warmup_steps
    return lr


def make_optimizer(groups, cfg, lr: float, device_type: str):
    """Adam (AdamW when weight_decay > 0) as the recipe sets it up.

    DeepSpeed runs use DeepSpeed's FusedAdam on GPU and DeepSpeedCPUAdam when
    the optimiser is offloaded; other runs use torch's Adam/AdamW.
    """
    betas = (cfg.beta1, cfg.beta2)
    decoupled = cfg.weight_decay > 0
    if cfg.is_deepspeed and device_type == "cuda":
        if "offload" in cfg.strategy:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, eps=cfg.adam_eps, bias_correction=True,
                                    adamw_mode=decoupled, amsgrad=False)
        from deepspeed.ops.adam import FusedAdam

        with deepspeed_arch_list():  # FusedAdam compiles its CUDA op here on first use
            return FusedAdam(groups, lr=lr, betas=betas, eps=cfg.adam_eps, bias_correction=True,
                             adam_w_mode=decoupled, amsgrad=False)
    import torch

    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    # the fused kernels run on CUDA and CPU alike (on CPU about 7x faster than the default);
    # Lightning refuses gradient clipping with a fused optimiser under mixed precision, so
    # bf16 / fp16 runs take the multi-tensor (foreach) kernels there instead
    mixed = cfg.precision in ("bf16", "fp16") and cfg.grad_clip > 0
    fused = device_type in ("cuda", "cpu") and not mixed
    return cls(groups, lr=lr, betas=betas, eps=cfg.adam_eps, fused=fused or None,
               foreach=(not fused and device_type == "cuda") or None)


def deepspeed_bf16_config() -> dict:
    """DeepSpeed's "bf16" config section: bf16 on, without the per-gradient overflow check.

    bf16 has fp32's exponent range, so there is no loss scale to adjust. The check runs
    several small kernels per parameter tensor (about 2,800 launches per step for the
    tutorial's L12-D768, whose step is bound by the host's launch rate) and a host sync.
    The trainer checks the loss every step and the weights before every save instead
    (lit.RWKVTrainModule). DeepSpeed versions without the option get {"enabled": True}.
    """
    section = {"enabled": True}
    try:
        from deepspeed.runtime.precision_config import DeepSpeedBF16Config
    except ImportError:
        return section
    if "check_grad_overflow" in getattr(DeepSpeedBF16Config, "model_fields", {}):
        section["check_grad_overflow"] = False
    return section


def use_foreach_grad_norm() -> bool:
    """DeepSpeed ZeRO-1/2's gradient norm (for --grad_clip) as one multi-tensor norm.

    DeepSpeed 0.19 takes the norm tensor by tensor: an fp64 copy and a norm for each of the
    model's ~400 gradients every step, about 800 kernels each launched from Python, which at
    M_BSZ 1 is host time on the step's critical path (on an H100, under the profiler, the
    optimizer step's host time at M_BSZ 1 is 22.0 ms with this norm, commit 774ed11, against
    41.9 ms at commit 4b1267b: benchmarks/RESULTS.md, the 2026-11-28 "1x NVIDIA H100"
    section). The replacement computes the same per-tensor norms with torch._foreach_norm
    (fp32 accumulation, squares summed in fp64) and keeps DeepSpeed's reduction across ranks
    and its NaN/inf masking. Cases it does not cover (another norm type, model or pipeline
    parallelism) go to DeepSpeed's own method.
    Returns whether it is in place (False when DeepSpeed's internals differ).
    """
    try:
        from deepspeed.runtime.zero import stage_1_and_2 as zero
    except ImportError:
        return False
    cls = getattr(zero, "DeepSpeedZeroOptimizer", None)
    names = ("dist", "mask_nan_or_inf_with_val_inplace", "PIPE_REPLICATED")
    if cls is None or not hasattr(cls, "get_grad_norm_direct") or not all(hasattr(zero, n) for n in names):
        return False
    if not getattr(cls.get_grad_norm_direct, "rwkvlm_foreach", False):
        cls.get_grad_norm_direct = foreach_grad_norm(cls.get_grad_norm_direct, zero)
    return True


def foreach_grad_norm(original, ns):
    """DeepSpeedZeroOptimizer.get_grad_norm_direct with one torch._foreach_norm; `ns` holds
    what DeepSpeed's method uses (dist, mask_nan_or_inf_with_val_inplace, PIPE_REPLICATED)."""
    import torch

    def get_grad_norm_direct(self, gradients, params, norm_type=2):
        params = list(params)
        if (float(norm_type) != 2.0 or getattr(self, "model_parallel_rank", 0) != 0
                or any(getattr(p, ns.PIPE_REPLICATED, False) for p in params)):
            return original(self, gradients, params, norm_type)
        grads = [g.detach() for g in gradients if not getattr(g, "_zero_padding", False)][:len(params)]
        if grads:
            norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)  # one per tensor
            total = torch.stack(norms).double().square().sum().float()
        else:
            total = torch.tensor(0.0, dtype=torch.float32, device=self.device)
        ns.dist.all_reduce(total, op=ns.dist.ReduceOp.SUM, group=self.dp_process_group)
        self._model_parallel_all_reduce(tensor=total, op=ns.dist.ReduceOp.SUM)
        total = total.sqrt()
        ns.mask_nan_or_inf_with_val_inplace(total, device=self.device)
        return total

    get_grad_norm_direct.rwkvlm_foreach = True
    get_grad_norm_direct.original = original
    get_grad_norm_direct.__doc__ = original.__doc__
    return get_grad_norm_direct


@contextlib.contextmanager
def deepspeed_arch_list():
    """TORCH_CUDA_ARCH_LIST without arch suffixes ('9.0a' -> '9.0') while DeepSpeed builds an op.

    PyTorch accepts arch-specific entries such as '9.0a' (images for Hopper set them),
    but DeepSpeed's op builder parses each entry as numbers and fails with
    "invalid literal for int() with base 10: '0a'". The plain arch builds the same op.
    The variable is restored afterwards.
    """
    old = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if old:
        os.environ["TORCH_CUDA_ARCH_LIST"] = clean_arch_list(old)
    try:
        yield
    finally:
        if old is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old


def clean_arch_list(value: str) -> str:
    """'8.0;9.0a+PTX 10.0f' -> '8.0;9.0+PTX 10.0': letter suffixes off each compute capability."""
    return re.sub(r"(\d+\.\d+)[a-z]+", r"\1", value)
