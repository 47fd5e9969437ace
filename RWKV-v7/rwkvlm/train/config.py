"""train.py's flags and the one validated training config.

Every flag of the tutorial's scripts is a `TrainConfig` field, declared once
with its default and help; `build_parser` generates train.py's parser from
them. A TrainConfig is frozen and checks itself when made: every setting that
cannot work is refused, before any training work, with a message naming the
flag to change (`warnings()` lists the ones that run but look like mistakes).
Checks that need the data file live in `rwkvlm.train.data_checks`; what the machine
decides (accelerator, strategy, precision plugin) in `rwkvlm.train.hardware`.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

from rwkvlm.errors import UserError

from rwkvlm.recipe import MINI_EPOCH_SAMPLES, WKV_CHUNK_LEN

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


_PARSERS = {"str": str, "int": int, "float": float, "bool": _bool}


def flag(default, help: str = "", *, group: str, choices=None):
    """A TrainConfig field that is also the train.py flag `--<field name>`."""
    return dataclasses.field(default=default, metadata={"help": help, "group": group, "choices": choices})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every train.py flag, declared once: the parser is generated from these fields.

    Frozen and checked in __post_init__: a TrainConfig that exists can run (checks
    that need the data file are in rwkvlm.train.data_checks). What the machine decides
    (accelerator, strategy object, precision plugin) is rwkvlm.train.hardware's.
    """
    # --- what to load, where to write
    load_model: str = flag("0", '"0": newest checkpoint in proj_dir (rwkv-init.pth if none); or a .pth path',
                           group="run")
    proj_dir: str = flag("out", "output directory for checkpoints and logs", group="run")
    wandb: str = flag("", 'wandb project name; "" disables wandb', group="run")
    my_testing: str = flag("x070", "model type (MODEL_TYPE): x070 (RWKV-7) or x060 (RWKV-6)", group="run")
    random_seed: int = flag(-1, "-1: a random seed", group="run")
    # --- data
    data_file: str = flag("", 'binidx data path without extension; or a weighted mix of binidx files, '
                          '"web:0.7,code:0.3" or mix.json (docs/data.md); with --data_type utf-8 a .txt file or a '
                          'folder of .txt files', group="data")
    data_type: str = flag("binidx", "data format: binidx (make_data.py's output) or utf-8 (plain text, tokenized "
                          "when the run starts)", group="data", choices=["binidx", "utf-8"])
    vocab_size: int = flag(65536, "65536: the World vocabulary; 0 (with --data_type utf-8): a character "
                           "vocabulary built from the data (PROJ_DIR/vocab.json), the model's vocabulary its size",
                           group="data")
    ctx_len: int = flag(4096, "tokens per sample (a multiple of 512; make_data uses the same)", group="data")
    my_exit_tokens: int = flag(0, "tokens to train on (make_data prints it)", group="data")
    magic_prime: int = flag(0, "make_data prints it for your ctx_len", group="data")
    # --- schedule
    train_stage: int = flag(3, "1: write rwkv-init.pth; 3: train", group="schedule", choices=[1, 3])
    epoch_count: int = flag(999999, "not used: training stops at --my_exit_tokens", group="schedule")
    epoch_begin: int = flag(0, "mini-epoch to start from when loading a given --load_model", group="schedule")
    epoch_save: int = flag(1, "write rwkv-N.pth every this many mini-epochs", group="schedule")
    micro_bsz: int = flag(16, "samples per GPU per step", group="schedule")
    lr_init: float = flag(6e-4, "learning rate after warmup", group="schedule")
    lr_final: float = flag(6e-5, "learning rate at --my_exit_tokens", group="schedule")
    warmup_steps: int = flag(10, "steps of linear warmup from 1% of --lr_init", group="schedule")
    beta1: float = flag(0.9, "Adam beta1", group="schedule")
    beta2: float = flag(0.99, "Adam beta2", group="schedule")
    adam_eps: float = flag(1e-18, "Adam epsilon", group="schedule")
    weight_decay: float = flag(0.001, "decoupled weight decay of the matrices (0: plain Adam)", group="schedule")
    grad_clip: float = flag(1.0, "clip the gradient norm at this (0: off)", group="schedule")
    # --- model
    n_layer: int = flag(12, "layers", group="model")
    n_embd: int = flag(768, "embedding width (a multiple of 64)", group="model")
    head_size: int = flag(64, "WKV head size", group="model")
    lora_dims: str = flag("", 'LoRA sizes decay/aaa/value/gate, e.g. "96/96/64/256" ("": the formula of '
                          'RWKV-LM; a --load_model file sets them from its shapes)', group="model")
    layer0_v: int = flag(1, "1: layer 0 holds att.v0/v1/v2 (unused), as rwkv-init.pth; 0: it does not, as "
                         "the released RWKV-7 files (a --load_model file sets this)", group="model", choices=[0, 1])
    grad_cp: int = flag(0, "1: gradient checkpointing (less memory)", group="model", choices=[0, 1])
    wkv_impl: str = flag("auto", "WKV op: auto (the CUDA kernel on GPU), cuda, or torch (the PyTorch "
                         "reference path)", group="model", choices=["auto", "cuda", "torch"])
    compile: str = flag("auto", "torch.compile each block as one graph around the WKV kernel (much faster "
                        "steps; the first step waits for the compiler, under a minute). auto: on GPU (not "
                        "with deepspeed_stage_3); 0: off; 1: always, also on CPU",
                        group="model", choices=["auto", "0", "1"])
    init_device: str = flag("auto", "where demo-training-prepare.sh draws rwkv-init.pth: auto (a CUDA GPU when one "
                            "is visible, else the CPU), cuda (much faster for large models; its random values are "
                            "the GPU's, not the CPU's for the same seed), or cpu (the same file for the same seed "
                            "and number of CPU threads)", group="model", choices=["auto", "cpu", "cuda"])
    # --- hardware
    accelerator: str = flag("gpu", "gpu (CPU with a note when no GPU is visible), cpu or auto",
                            group="hardware", choices=["gpu", "cuda", "cpu", "auto"])
    devices: int = flag(1, "GPUs (or CPU processes) per node", group="hardware")
    num_nodes: int = flag(1, "nodes", group="hardware")
    precision: str = flag("bf16", "bf16, fp32, tf32 or fp16", group="hardware")
    strategy: str = flag("deepspeed_stage_2", "deepspeed_stage_1/2/2_offload/3/3_offload, ddp, auto or "
                         "single_device", group="hardware")
    ds_bucket_mb: int = flag(200, "DeepSpeed bucket size in MB (2 for consumer GPUs)", group="hardware")
    enable_progress_bar: bool = flag(True, "show the progress bar", group="hardware")
    # --- saving and resume (ours; the tutorial's scripts need none of them)
    save_every_steps: int = flag(0, "also write an exact-resume state every N steps (0: off)", group="saving")
    save_every_minutes: float = flag(0.0, "also write an exact-resume state every N minutes (0: off)",
                                     group="saving")
    keep_resume: int = flag(2, "keep the last K exact-resume states", group="saving")
    resume_states: int = flag(1, "1: write exact-resume states (weights, optimiser state, RNG) and make the weight "
                              "files from them; 0: the weight files only (rwkv-N.pth, rwkv-final.pth), for a model "
                              "whose optimiser state does not fit the disk (7B: about 100 GB per state); a stopped "
                              "run then continues from the newest weight file, not exactly", group="saving",
                              choices=[0, 1])
    resume_from: str = flag("", "continue from this save in PROJ_DIR instead of the newest: step-N (an "
                            "exact-resume state), rwkv-N.pth or rwkv-init.pth; the saves after it are "
                            "moved to PROJ_DIR/set-aside/", group="saving")
    mini_epoch_samples: int = flag(MINI_EPOCH_SAMPLES, "samples per mini-epoch; keep 40320 (the recipe): "
                                   "smaller values are for quick tests", group="saving")
    # --- validation (rwkvlm.train.validation)
    val_data_file: str = flag("", "held-out data for a validation loss: a binidx path without extension (made "
                              "by make_data.py with the run's vocabulary), or with --data_type utf-8 also a .txt "
                              "file or folder", group="validation")
    val_every_steps: int = flag(0, "compute the validation loss every N steps and at the last step (0: off)",
                                group="validation")
    val_tokens: int = flag(0, "tokens of --val_data_file to validate on, in whole CTX_LEN windows, the same "
                           "windows every time (0: one step's tokens per 32 steps between validations, at least "
                           "one step's, at most 1048576: about 2%% of the training time from --val_every_steps 32 on)", group="validation")
    dump_samples: str = flag("", "diagnostics: append 'step,rank,start' of every sample to <this "
                             "path>.rank<R>.csv", group="diagnostics")
    profile_steps: int = flag(0, "diagnostics: profile this many steps after the run's first 10 (CPU and GPU "
                              "time per op) into PROJ_DIR/profile.txt (0: off)", group="diagnostics")

    def __post_init__(self):
        if self.accelerator == "cuda":
            object.__setattr__(self, "accelerator", "gpu")
        self._check()

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
        """The model's config: ModelConfig (x070) or Rwkv6Config (x060)."""
        from rwkvlm.model import ModelConfig, Rwkv6Config

        shapes = dict(n_layer=self.n_layer, n_embd=self.n_embd, vocab_size=self.vocab_size,
                      head_size=self.head_size, grad_cp=bool(self.grad_cp), wkv_impl=self.wkv_impl)
        if self.my_testing == "x060":
            return Rwkv6Config(**shapes)
        w, a, v, g = self.lora_sizes or (None,) * 4
        return ModelConfig(**shapes, lora_w=w, lora_a=a, lora_v=v, lora_g=g, layer0_v=bool(self.layer0_v))

    @property
    def lora_sizes(self) -> tuple[int, int, int, int] | None:
        """--lora_dims as (decay, aaa, value, gate); None for "" (the formula)."""
        text = self.lora_dims.strip()
        if not text:
            return None
        parts = text.replace(",", "/").split("/")
        try:
            sizes = tuple(int(x) for x in parts)
        except ValueError:
            sizes = ()
        if len(sizes) != 4 or min(sizes) <= 0:
            raise UserError(f"--lora_dims is {self.lora_dims!r}; expected four positive sizes decay/aaa/value/gate, "
                            f"e.g. \"96/96/64/256\", or \"\" for the formula.")
        return sizes

    # ---- checks that need no data
    def _check(self) -> None:
        """Raise UserError for settings that cannot work (no file access)."""
        if self.my_testing not in ("x070", "x060"):
            raise UserError(
                f"--my_testing / MODEL_TYPE is {self.my_testing!r}; this trainer implements RWKV-7 (x070) and "
                f'RWKV-6 (x060): set MODEL_TYPE="x070" or "x060" in both demo-training scripts.'
            )
        if self.my_testing == "x060" and (self.lora_dims.strip() or not self.layer0_v):
            raise UserError(
                "--lora_dims and --layer0_v describe RWKV-7 (x070) models; MODEL_TYPE is x060 (RWKV-6), whose "
                "shapes come from N_LAYER / N_EMBD (or a --load_model file). Leave them out.")
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
        self.lora_sizes  # noqa: B018 (checks --lora_dims)
        if self.n_layer < 1:
            raise UserError(f"N_LAYER (--n_layer) is {self.n_layer}; it must be at least 1.")
        self._check_data_flags()
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
        if not self.resume_states and (self.save_every_steps or self.save_every_minutes):
            raise UserError("--save_every_steps / --save_every_minutes write exact-resume states, which "
                            "--resume_states 0 turns off: leave them at 0, or use --resume_states 1.")
        if self.epoch_begin < 0:
            raise UserError(f"--epoch_begin is {self.epoch_begin}; it counts mini-epochs from 0, so use 0 or more.")
        for name in ("save_every_steps", "profile_steps"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name} is {getattr(self, name)}; use 0 (off) or a positive number.")
        if not (self.save_every_minutes >= 0 and math.isfinite(self.save_every_minutes)):
            raise UserError(f"--save_every_minutes is {self.save_every_minutes}; use 0 (off) or a positive number.")
        if self.ds_bucket_mb < 1:
            raise UserError(f"--ds_bucket_mb is {self.ds_bucket_mb}; use 200 (or 2 on consumer GPUs).")
        if self.train_stage == 3:
            self._check_schedule()
        if self.train_stage == 3 and self.accelerator == "cpu" and self.precision == "fp16":
            # (stage 1, demo-training-prepare.sh, runs on CPU and never trains: it takes any precision)
            raise UserError("--precision fp16 needs a GPU; use --precision fp32 or bf16 on CPU.")

    def _check_data_flags(self) -> None:
        """--data_type, --vocab_size, a mix and the validation flags, as far as they go without files."""
        from rwkvlm.data.mix import is_mix

        text = self.data_type == "utf-8"
        if self.vocab_size == 0 and not text:
            raise UserError("--vocab_size 0 (a vocabulary built from the data) works with --data_type utf-8 (a "
                            "plain text file); binidx data is tokenized by make_data.py with the World "
                            "vocabulary: use --vocab_size 65536.")
        if self.vocab_size < 0 or self.vocab_size == 1:
            raise UserError(f"--vocab_size is {self.vocab_size}; use 65536 for the World vocabulary"
                            + (", or 0 for a character vocabulary built from the text." if text else "."))
        if text and self.data_file and is_mix(self.data_file):
            raise UserError(f"--data_file {self.data_file!r} is a mix of binidx files, but --data_type is utf-8. "
                            f"A mix takes make_data.py outputs (--data_type binidx); for text, give one .txt file "
                            f"or a folder of .txt files.")
        for name in ("val_every_steps", "val_tokens"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name} is {getattr(self, name)}; use 0 or a positive number.")
        if self.train_stage == 3 and self.val_every_steps > 0 and not self.val_data_file:
            raise UserError(f"--val_every_steps {self.val_every_steps} asks for a validation loss, but "
                            f"--val_data_file is empty: give a held-out binidx file (make_data.py output, path "
                            f"without extension), or --val_every_steps 0.")

    def _check_schedule(self) -> None:
        if not self.data_file:
            raise UserError("--data_file is empty: set data_file to the make_data output path without extension.")
        if not (self.lr_init > 0 and self.lr_final > 0 and math.isfinite(self.lr_init) and math.isfinite(self.lr_final)):
            raise UserError(f"LR_INIT and LR_FINAL (--lr_init, --lr_final) must be finite and > 0 "
                            f"(got {self.lr_init}, {self.lr_final}).")
        if self.my_exit_tokens < 0:
            raise UserError(f"--my_exit_tokens is {self.my_exit_tokens}, below 0: copy the '--my_exit_tokens ... "
                            f"--magic_prime ...' line that make_data.py printed into the run script.")
        if self.my_exit_tokens == 0:
            raise UserError(
                "--my_exit_tokens is not set: copy the '--my_exit_tokens ... --magic_prime ...' line "
                "that make_data.py printed into the run script."
            )
        if self.warmup_steps < 0:
            raise UserError(f"--warmup_steps is {self.warmup_steps}; use 0 (no warmup) or more (the recipe: 10).")
        for name, value in (("beta1", self.beta1), ("beta2", self.beta2)):
            if not 0 <= value < 1:
                raise UserError(f"--{name} is {value}; Adam's betas lie in [0, 1) (the recipe: --beta1 0.9 "
                                f"--beta2 0.99).")
        if not (self.adam_eps >= 0 and math.isfinite(self.adam_eps)):
            raise UserError(f"--adam_eps is {self.adam_eps}; use a small positive number (the recipe: 1e-18).")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise UserError(f"--weight_decay is {self.weight_decay}; use 0 (off) or a small positive number "
                            f"(the recipe: 0.001).")
        if not (self.grad_clip >= 0 and math.isfinite(self.grad_clip)):
            raise UserError(f"--grad_clip is {self.grad_clip}; use 0 (off) or a positive norm (the recipe: 1.0).")

    def warnings(self) -> list[str]:
        """Settings that run but are likely mistakes, each naming the flag to change."""
        out = []
        if self.train_stage != 3:
            return out
        if self.warmup_steps >= self.total_steps:
            out.append(f"--warmup_steps {self.warmup_steps} is not shorter than the whole run ({self.total_steps} "
                       f"steps to --my_exit_tokens): the learning rate never reaches --lr_init. Lower "
                       f"--warmup_steps.")
        if self.val_data_file and self.val_every_steps == 0:
            out.append(f"--val_data_file {self.val_data_file!r} is set but --val_every_steps is 0: no validation "
                       f"loss is computed. Set --val_every_steps N to validate every N steps.")
        if self.val_every_steps > 0 and self.val_data_file:
            from rwkvlm.train.validation import estimated_cost, val_token_budget

            tokens = val_token_budget(self)
            cost = estimated_cost(tokens, self.val_every_steps, self.tokens_per_step)
            if cost > 0.05:
                out.append(f"validating on {tokens} tokens (--val_tokens {self.val_tokens}) every "
                           f"{self.val_every_steps} steps ({self.val_every_steps * self.tokens_per_step} tokens "
                           f"trained between validations) adds about {cost:.0%} to the training time (a batch of "
                           f"validation windows costs about 0.75 of a training step). Raise --val_every_steps "
                           f"(16 or more keeps one batch under 5%) or lower --val_tokens (0: about 2% from "
                           f"--val_every_steps 32 on).")
        if self.lr_final > self.lr_init:
            out.append(f"--lr_final {self.lr_final} is above --lr_init {self.lr_init}: the learning rate will rise "
                       f"over the run. Swap them for the usual decay.")
        return out


def build_parser() -> argparse.ArgumentParser:
    """train.py's parser, one `--<name>` per TrainConfig field, grouped as declared."""
    p = argparse.ArgumentParser(
        prog="train.py",
        description="RWKV-7 (x070) and RWKV-6 (x060) pre-training. train_stage 1 writes rwkv-init.pth; "
        "train_stage 3 trains, resuming from the newest save in --proj_dir.",
    )
    groups = {}
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        g = groups.get(meta["group"]) or groups.setdefault(meta["group"], p.add_argument_group(meta["group"]))
        g.add_argument(f"--{f.name}", default=f.default, type=_PARSERS[f.type], choices=meta["choices"],
                       help=f"{meta['help']} (default: {f.default!r})" if meta["help"] else None)
    return p


def parse_args(argv=None) -> TrainConfig:
    """argv -> a checked TrainConfig (UserError for a setting that cannot work)."""
    return TrainConfig(**vars(build_parser().parse_args(argv)))
