"""train.py's flags and the one validated training config.

Every flag of the tutorial's scripts is declared here explicitly. `parse_args`
turns argv into a `TrainConfig`; `TrainConfig.check_settings()` rejects, before
any training work, every setting that cannot work, with a message naming the
flag to change. Checks that need the data file live in `rwkvlm.data_checks`.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

from rwkvlm.errors import UserError

MINI_EPOCH_SAMPLES = 40320  # samples per mini-epoch, fixed by the recipe
WKV_CHUNK_LEN = 16  # the CUDA kernel processes T in chunks of 16

PRECISIONS = {"bf16", "fp32", "tf32", "fp16"}
STRATEGIES = {
    "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload",
    "deepspeed_stage_3", "deepspeed_stage_3_offload", "ddp", "auto", "single_device",
}


def _bool(s: str) -> bool:
    v = str(s).strip().lower()
    if v in ("1", "true", "yes", "y", "on"):
        return True
    if v in ("0", "false", "no", "n", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected True/False or 1/0, got {s!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="RWKV-7 (x070) pre-training. train_stage 1 writes rwkv-init.pth; "
        "train_stage 3 trains, resuming from the newest save in --proj_dir.",
    )
    a = p.add_argument
    # --- what to load, where to write
    a("--load_model", default="0", type=str, help='"0": newest checkpoint in proj_dir (rwkv-init.pth if none); or a .pth path')
    a("--proj_dir", default="out", type=str, help="output directory for checkpoints and logs")
    a("--wandb", default="", type=str, help='wandb project name; "" disables wandb')
    a("--my_testing", default="x070", type=str, help="model type (only x070 is implemented)")
    a("--random_seed", default=-1, type=int, help="-1: a random seed")
    # --- data
    a("--data_file", default="", type=str, help="binidx data path without extension")
    a("--data_type", default="binidx", type=str, choices=["binidx"])
    a("--vocab_size", default=65536, type=int)
    a("--ctx_len", default=4096, type=int)
    a("--my_exit_tokens", default=0, type=int, help="tokens to train on (make_data prints it)")
    a("--magic_prime", default=0, type=int, help="make_data prints it for your ctx_len")
    # --- schedule
    a("--train_stage", default=3, type=int, choices=[1, 3], help="1: write rwkv-init.pth; 3: train")
    a("--epoch_count", default=999999, type=int, help="not used: training stops at --my_exit_tokens")
    a("--epoch_begin", default=0, type=int, help="mini-epoch to start from when loading a given --load_model")
    a("--epoch_save", default=1, type=int, help="write rwkv-N.pth every this many mini-epochs")
    a("--micro_bsz", default=16, type=int, help="samples per GPU per step")
    a("--lr_init", default=6e-4, type=float)
    a("--lr_final", default=6e-5, type=float)
    a("--warmup_steps", default=10, type=int)
    a("--beta1", default=0.9, type=float)
    a("--beta2", default=0.99, type=float)
    a("--adam_eps", default=1e-18, type=float)
    a("--weight_decay", default=0.001, type=float)
    a("--grad_clip", default=1.0, type=float)
    # --- model
    a("--n_layer", default=12, type=int)
    a("--n_embd", default=768, type=int)
    a("--head_size", default=64, type=int)
    a("--grad_cp", default=0, type=int, choices=[0, 1], help="1: gradient checkpointing (less memory)")
    a("--wkv_impl", default="auto", choices=["auto", "cuda", "torch"],
      help="WKV op: auto (the CUDA kernel on GPU), cuda, or torch (the PyTorch reference path)")
    a("--compile", default="auto", choices=["auto", "0", "1"],
      help="torch.compile each block as one graph around the WKV kernel (much faster steps; the "
           "first step waits for the compiler, under a minute). auto: on GPU (not with "
           "deepspeed_stage_3); 0: off; 1: always, also on CPU")
    # --- hardware
    a("--accelerator", default="gpu", type=str, choices=["gpu", "cuda", "cpu", "auto"])
    a("--devices", default=1, type=int, help="GPUs (or CPU processes) per node")
    a("--num_nodes", default=1, type=int)
    a("--precision", default="bf16", type=str, help="bf16, fp32, tf32 or fp16")
    a("--strategy", default="deepspeed_stage_2", type=str)
    a("--ds_bucket_mb", default=200, type=int, help="DeepSpeed bucket size in MB (2 for consumer GPUs)")
    a("--enable_progress_bar", default=True, type=_bool)
    # --- saving and resume (ours; the tutorial's scripts need none of them)
    a("--save_every_steps", default=0, type=int, help="also write an exact-resume state every N steps (0: off)")
    a("--save_every_minutes", default=0.0, type=float, help="also write an exact-resume state every N minutes (0: off)")
    a("--keep_resume", default=2, type=int, help="keep the last K exact-resume states")
    a("--resume_from", default="", type=str,
      help="continue from this save in PROJ_DIR instead of the newest: step-N (an exact-resume state), "
           "rwkv-N.pth or rwkv-init.pth; the saves after it are moved to PROJ_DIR/set-aside/")
    a("--dump_samples", default="", type=str,
      help="diagnostics: append 'step,rank,start' of every sample to <this path>.rank<R>.csv")
    a("--profile_steps", default=0, type=int,
      help="diagnostics: profile this many steps after the run's first 10 (CPU and GPU time per op) "
           "into PROJ_DIR/profile.txt (0: off)")
    a("--mini_epoch_samples", default=MINI_EPOCH_SAMPLES, type=int,
      help="samples per mini-epoch; keep 40320 (the recipe): smaller values are for quick tests")
    return p


@dataclasses.dataclass
class TrainConfig:
    load_model: str
    proj_dir: str
    wandb: str
    my_testing: str
    random_seed: int
    data_file: str
    data_type: str
    vocab_size: int
    ctx_len: int
    my_exit_tokens: int
    magic_prime: int
    train_stage: int
    epoch_count: int
    epoch_begin: int
    epoch_save: int
    micro_bsz: int
    lr_init: float
    lr_final: float
    warmup_steps: int
    beta1: float
    beta2: float
    adam_eps: float
    weight_decay: float
    grad_clip: float
    n_layer: int
    n_embd: int
    head_size: int
    grad_cp: int
    wkv_impl: str
    compile: str
    accelerator: str
    devices: int
    num_nodes: int
    precision: str
    strategy: str
    ds_bucket_mb: int
    enable_progress_bar: bool
    save_every_steps: int
    save_every_minutes: float
    keep_resume: int
    resume_from: str
    mini_epoch_samples: int
    dump_samples: str
    profile_steps: int

    # ---- derived values
    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes

    @property
    def real_bsz(self) -> int:
        return self.micro_bsz * self.world_size

    @property
    def epoch_steps(self) -> int:
        return self.mini_epoch_samples // self.real_bsz

    @property
    def tokens_per_step(self) -> int:
        return self.real_bsz * self.ctx_len

    @property
    def total_steps(self) -> int:
        """Steps until tokens_seen reaches my_exit_tokens (when rwkv-final.pth is written)."""
        return math.ceil(self.my_exit_tokens / self.tokens_per_step)

    def compile_on(self, accelerator: str) -> bool:
        """Whether --compile asks for torch.compile with this accelerator ("gpu" or "cpu").

        auto: on GPU, except under ZeRO-3 (weights gathered on the fly; not measured compiled)."""
        if self.compile == "auto":
            return accelerator == "gpu" and "stage_3" not in self.strategy
        return self.compile == "1"

    @property
    def is_deepspeed(self) -> bool:
        return self.strategy.startswith("deepspeed")

    @property
    def proj_path(self) -> Path:
        return Path(self.proj_dir)

    def model_config(self):
        from rwkvlm.model import ModelConfig

        return ModelConfig(
            n_layer=self.n_layer, n_embd=self.n_embd, vocab_size=self.vocab_size,
            head_size=self.head_size, grad_cp=bool(self.grad_cp), wkv_impl=self.wkv_impl,
        )

    # ---- checks that need no data
    def check_settings(self) -> None:
        """Raise UserError for settings that cannot work (no file access)."""
        if self.my_testing != "x070":
            raise UserError(
                f"--my_testing / MODEL_TYPE is {self.my_testing!r}; this trainer implements only RWKV-7, "
                f'so set MODEL_TYPE="x070".'
            )
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision {self.precision!r} is not one of {sorted(PRECISIONS)}.")
        if self.strategy not in STRATEGIES:
            raise UserError(f"--strategy {self.strategy!r} is not one of {sorted(STRATEGIES)}.")
        if self.compile == "1" and "stage_3" in self.strategy:
            raise UserError(
                f"--compile 1 does not work with --strategy {self.strategy}: the compiled blocks read the "
                f"layer norms' weights directly, which ZeRO-3 partitions. Use --compile auto (or 0) with "
                f"ZeRO-3, or --strategy deepspeed_stage_2 to compile.")
        if self.n_embd <= 0 or self.n_embd % 64 != 0:
            raise UserError(
                f"N_EMBD (--n_embd) is {self.n_embd}; it must be a positive multiple of 64 "
                f"(e.g. {max(64, round(self.n_embd / 64) * 64)})."
            )
        if self.head_size <= 0 or self.n_embd % self.head_size != 0:
            raise UserError(
                f"--head_size {self.head_size} does not divide N_EMBD {self.n_embd}; keep --head_size 64."
            )
        if self.n_layer < 1:
            raise UserError(f"N_LAYER (--n_layer) is {self.n_layer}; it must be at least 1.")
        if self.vocab_size < 2:
            raise UserError(f"--vocab_size is {self.vocab_size}; use 65536 for the World vocabulary.")
        if self.ctx_len <= 0 or self.ctx_len % WKV_CHUNK_LEN != 0:
            near = max(512, round(self.ctx_len / 512) * 512)
            raise UserError(
                f"CTX_LEN (--ctx_len) is {self.ctx_len}; it must be a multiple of {WKV_CHUNK_LEN} "
                f"(the WKV kernel's chunk), and the tutorial uses multiples of 512, e.g. {near}. "
                f"Re-run make_data.py with the same ctx_len."
            )
        if self.micro_bsz < 1 or self.devices < 1 or self.num_nodes < 1:
            raise UserError(
                f"M_BSZ, GPU_PER_NODE and N_NODE must be at least 1 (got --micro_bsz {self.micro_bsz}, "
                f"--devices {self.devices}, --num_nodes {self.num_nodes})."
            )
        if self.mini_epoch_samples < 1 or self.mini_epoch_samples % self.real_bsz != 0:
            n = self.mini_epoch_samples
            ok = [b for b in (1, 2, 4, 8, 16, 24, 32, 48, 64) if n > 0 and n % (b * self.world_size) == 0]
            raise UserError(
                f"M_BSZ x GPU_PER_NODE x N_NODE = {self.micro_bsz} x {self.devices} x {self.num_nodes} = "
                f"{self.real_bsz} does not divide {n} (the samples in one mini-epoch), so "
                f"epoch_steps would not be whole. Choose M_BSZ from {ok} for this many GPUs."
            )
        if self.epoch_save < 0 or self.keep_resume < 1:
            raise UserError("--epoch_save must be >= 0 and --keep_resume >= 1.")
        if self.train_stage == 3:
            if not self.data_file:
                raise UserError("--data_file is empty: set data_file to the make_data output path without extension.")
            if self.lr_init <= 0 or self.lr_final <= 0:
                raise UserError(f"LR_INIT and LR_FINAL must be > 0 (got {self.lr_init}, {self.lr_final}).")
            if self.my_exit_tokens <= 0:
                raise UserError(
                    "--my_exit_tokens is not set: copy the '--my_exit_tokens ... --magic_prime ...' line "
                    "that make_data.py printed into the run script."
                )
        if self.train_stage == 3 and self.accelerator == "cpu" and self.precision == "fp16":
            # (stage 1, demo-training-prepare.sh, runs on CPU and never trains: it takes any precision)
            raise UserError("--precision fp16 needs a GPU; use --precision fp32 or bf16 on CPU.")


def parse_args(argv=None) -> TrainConfig:
    ns = build_parser().parse_args(argv)
    cfg = TrainConfig(**vars(ns))
    if cfg.accelerator == "cuda":
        cfg.accelerator = "gpu"
    return cfg
