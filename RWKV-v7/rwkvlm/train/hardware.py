"""What this machine runs a TrainConfig with: accelerator, strategy, precision.

`resolve(cfg)` never changes `cfg` (it is frozen). It returns a `Hardware`
whose `config` is the configuration that actually runs here, the one the run
fingerprint, the optimiser and the saves are made from:

- no visible GPU and --accelerator gpu (the scripts' default): train on CPU
  in fp32, without DeepSpeed, with a one-line note;
- DeepSpeed asked for on CPU: ddp with several processes, else a single one;
- --strategy auto with several devices: ddp (with the unused-parameter search
  that layer 0's unused v0/v1/v2 need).

`lightning_strategy(hw)` builds the strategy object for pl.Trainer.
"""
from __future__ import annotations

import dataclasses
import logging

from rwkvlm.train.config import TrainConfig
from rwkvlm.errors import UserError

PRECISION_PLUGINS = {"bf16": "bf16-mixed", "fp16": "16-mixed", "fp32": "32-true", "tf32": "32-true"}


@dataclasses.dataclass(frozen=True)
class Hardware:
    config: TrainConfig  # the settings that run on this machine
    notes: tuple[str, ...] = ()  # what was changed from the flags, and why

    @property
    def accelerator(self) -> str:
        return self.config.accelerator

    @property
    def on_gpu(self) -> bool:
        return self.config.accelerator == "gpu"

    @property
    def precision_plugin(self) -> str:
        return PRECISION_PLUGINS[self.config.precision]


def resolve(cfg: TrainConfig, cuda_available: bool | None = None) -> Hardware:
    """The Hardware for `cfg` on this machine (`cuda_available` overrides the probe, for tests)."""
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    notes = []
    accelerator, strategy, precision = cfg.accelerator, cfg.strategy, cfg.precision
    if accelerator == "auto":
        accelerator = "gpu" if cuda_available else "cpu"
    if accelerator == "gpu" and not cuda_available:
        accelerator = "cpu"
        if precision != "fp32":
            precision = "fp32"
        notes.append("no CUDA GPU is visible to PyTorch: training on CPU in fp32 (slow; for the GPU run "
                     "install a CUDA build of torch, or check CUDA_VISIBLE_DEVICES).")
    world = cfg.devices * cfg.num_nodes
    if accelerator == "cpu" and strategy.startswith("deepspeed"):
        strategy = "ddp" if world > 1 else "auto"
        notes.append(f"DeepSpeed needs GPUs: on CPU using --strategy {strategy} instead of {cfg.strategy}.")
    if strategy in ("auto", "single_device") and world > 1:
        strategy = "ddp"
    if strategy == "single_device":
        strategy = "auto"
    run = dataclasses.replace(cfg, accelerator=accelerator, strategy=strategy, precision=precision)
    return Hardware(config=run, notes=tuple(notes))


def set_matmul_precision(hw: Hardware) -> None:
    """tf32 matmuls for --precision tf32 on GPU, exact fp32 for fp32 (torch's own default).

    bf16 and fp16 leave torch's default as it is. Lightning's hint to lower the float32 matmul
    precision is kept out of the output (train.LIBRARY_NOISE): --precision decides it."""
    if not hw.on_gpu:
        return
    import torch

    if hw.config.precision == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif hw.config.precision == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = False


def lightning_strategy(hw: Hardware):
    """The strategy argument of pl.Trainer for this Hardware."""
    cfg = hw.config
    if cfg.is_deepspeed:
        return _deepspeed_strategy(cfg)
    if cfg.strategy == "ddp":
        from pytorch_lightning.strategies import DDPStrategy

        return DDPStrategy(process_group_backend="nccl" if hw.on_gpu else "gloo",
                           find_unused_parameters=True)  # layer 0 does not use v0/v1/v2
    return cfg.strategy


def _deepspeed_strategy(cfg: TrainConfig):
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise UserError(
            f"--strategy {cfg.strategy} needs DeepSpeed: pip install -e '.[gpu]' (or pip install deepspeed), "
            f"or use --strategy ddp / auto."
        ) from None
    from pytorch_lightning.strategies import DeepSpeedStrategy

    stage = int(cfg.strategy.split("_")[2])
    offload = cfg.strategy.endswith("offload")
    bucket = int(cfg.ds_bucket_mb * 1000 * 1000)
    # overlap_comm reduces gradients on a side stream, behind a device-wide sync on every
    # bucket; with one process there is nothing to reduce and the syncs leave the GPU idle
    # while the host prepares the optimiser step. Off only where measured: ZeRO-2 on one
    # process (ZeRO-1 without it moves its gradient copies after the backward pass; ZeRO-3
    # also uses it to prefetch weights)
    overlap = not (stage == 2 and cfg.world_size == 1)
    strategy = DeepSpeedStrategy(
        stage=stage, offload_optimizer=offload, offload_parameters=offload and stage == 3,
        allgather_bucket_size=bucket, reduce_bucket_size=bucket, overlap_comm=overlap,
        logging_level=logging.WARNING,
    )
    if stage in (1, 2) and not offload:  # offload takes the norm on the CPU side
        from rwkvlm.train.optim import use_foreach_grad_norm

        use_foreach_grad_norm()
    if cfg.precision == "bf16":  # Lightning keeps a "bf16" section it finds in the config
        from rwkvlm.train.optim import deepspeed_bf16_config

        strategy.config["bf16"] = deepspeed_bf16_config()
    return strategy
