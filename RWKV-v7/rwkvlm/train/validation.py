"""The validation loss, as a Lightning callback: held-out mean cross-entropy every --val_every_steps.

What is measured: the plain mean cross-entropy (no L2Wrap: its term only touches gradients) of
the model on fixed windows of --val_data_file, with the model in eval mode under torch.no_grad()
and the training precision (the strategy's autocast), through the same fused head loss as
training. The windows: the file's W = (tokens - 1) // CTX_LEN whole slots (a window reads
CTX_LEN + 1 tokens: inputs and next-token targets); n = round(val tokens / CTX_LEN) of them, at
least one, at most W, spread evenly: window j starts at floor(j * W / n) * CTX_LEN. They are the
same windows at every validation and after every resume with the same settings. Rank r takes
windows r, r + R, r + 2R, ... (R ranks), so the ranks share the work without overlap; every
rank runs the same number of batches (a rank with fewer windows pads with a window it does not
count), as ZeRO-3's collective forward needs. The loss is the mean over all ranks' windows:
each rank's (sum of window losses, window count) summed over ranks, then divided.

Val tokens: --val_tokens, or (0, the default) one training step's tokens (M_BSZ x ranks x
CTX_LEN) for every VAL_SHARE = 32 steps between validations (at least one step's worth, at most
1,048,576 tokens): about a thirty-second of the tokens trained between two validations. A batch
of validation windows costs about FORWARD_COST = 0.75 of a training step (0.65-0.76 measured on
CPU with an L2-D64 model at ctx 64, where fixed costs weigh most; forward only, no backward or
optimiser step: benchmarks/RESULTS.md), so validation adds FORWARD_COST x batches /
--val_every_steps: 2.3% with the default once --val_every_steps is 32 or more, and at least
0.75 / --val_every_steps, since each validation runs one batch at least (under 5% from 16 steps
on). The trainer warns when its estimate passes 5%.

When: at every step that is a multiple of --val_every_steps, and at the last step (due()). It
runs after the logs' callback (rwkvlm.train.logs.TrainLogs, which holds that step's loss_log.csv
row until the validation loss is known: TrainLogs.log_validation writes it, with train_log.txt's
validation line, the progress bar's val_loss and wandb) and before the saves: the weights
validated are those saved at that step. Validation touches no RNG and no weight, so an exact
resume continues the same run.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import pytorch_lightning as pl
import torch

VAL_SHARE = 32  # the default val tokens: one step's tokens per this many steps between validations
VAL_TOKENS_MAX = 1 << 20  # ... at most this many
FORWARD_COST = 0.75  # a batch of validation windows / a training step of the same batch (measured on CPU)


def estimated_cost(val_tokens: int, every_steps: int, tokens_per_step: int) -> float:
    """The fraction validation adds to the training time: FORWARD_COST per batch (a step's worth
    of windows, at least one) per validation, over --val_every_steps steps."""
    batches = max(1, -(-int(val_tokens) // max(1, tokens_per_step)))
    return FORWARD_COST * batches / max(1, every_steps)


def val_token_budget(cfg) -> int:
    """--val_tokens, or the default for 0 (see the module's docstring)."""
    if cfg.val_tokens > 0:
        return int(cfg.val_tokens)
    steps = max(1, cfg.val_every_steps // VAL_SHARE)
    return min(VAL_TOKENS_MAX, steps * cfg.tokens_per_step)


def val_windows(n_tokens: int, ctx_len: int, want_tokens: int) -> np.ndarray:
    """Start offsets of the validation windows (see the module's docstring); empty when the file
    holds fewer than ctx_len + 1 tokens."""
    slots = (int(n_tokens) - 1) // ctx_len
    if slots < 1:
        return np.zeros(0, dtype=np.int64)
    n = min(slots, max(1, round(want_tokens / ctx_len)))
    return (np.arange(n, dtype=np.int64) * slots // n) * ctx_len


def due(cfg, step: int) -> bool:
    """Whether the validation loss is computed after `step` (a global step count)."""
    every = cfg.val_every_steps
    return every > 0 and step > 0 and (step % every == 0 or step == cfg.total_steps)


@dataclass
class ValData:
    """The held-out tokens and the windows read from them."""

    name: str  # the --val_data_file as given
    tokens: object  # 1-D token array (a np.memmap or an ndarray)
    starts: np.ndarray  # window offsets, all ranks
    ctx_len: int

    @property
    def tokens_used(self) -> int:
        return len(self.starts) * self.ctx_len

    def describe(self, cfg) -> str:
        every = f"every {cfg.val_every_steps} steps and at the last"
        cost = estimated_cost(self.tokens_used, cfg.val_every_steps, cfg.tokens_per_step)
        return (f"validation: {len(self.starts)} windows of {self.ctx_len} tokens ({self.tokens_used:,} tokens) of "
                f"{self.name}, {every} (about {cost:.1%} of the training time)")

    def record(self, cfg) -> dict:
        return {"val_data_file": self.name, "windows": int(len(self.starts)), "tokens": self.tokens_used,
                "every_steps": cfg.val_every_steps}

    def rank_starts(self, rank: int, world: int) -> np.ndarray:
        return self.starts[rank::world]

    def batches(self, rank: int, world: int, rows: int) -> list[tuple[torch.Tensor, int]]:
        """This rank's windows as (tokens (B, ctx_len + 1) int64, windows counted) batches; every
        rank gets the same number of batches (padded with an uncounted window)."""
        per_rank = -(-len(self.starts) // world)
        n_batches = max(1, -(-per_rank // rows))
        mine = self.rank_starts(rank, world)
        out = []
        for b in range(n_batches):
            part = mine[b * rows:(b + 1) * rows]
            counted = len(part)
            if counted == 0:
                part = self.starts[:1]
            win = np.stack([np.asarray(self.tokens[i:i + self.ctx_len + 1], dtype=np.int64) for i in part])
            out.append((torch.from_numpy(win), counted))
        return out


@torch.no_grad()
def mean_loss(model, batches, device, context=None) -> tuple[float, int]:
    """(sum over counted windows of each window's mean CE, windows counted) for this rank."""
    import contextlib

    total, count = 0.0, 0
    for win, counted in batches:
        win = win.to(device)
        x, y = win[:, :-1], win[:, 1:]
        if counted < x.shape[0]:
            x, y = x[:max(1, counted)], y[:max(1, counted)]
        with context() if context is not None else contextlib.nullcontext():
            loss = model.loss(x, y)  # mean over the batch's windows (all of ctx_len tokens)
        if counted:
            total += float(loss) * counted
            count += counted
    return total, count


class Validation(pl.Callback):
    """Computes the validation loss when due() and hands it to the logs (see the module's docstring)."""

    def __init__(self, val: ValData, logs, log=print):
        self.val = val
        self.logs = logs  # rwkvlm.train.logs.TrainLogs
        self.say = log
        self._batches = None  # this rank's batches, read once

    def setup(self, trainer, pl_module, stage=None):
        pl_module.validation_info = self.val.record(pl_module.cfg)  # train_config.json (TrainLogs)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = pl_module.step
        if not due(pl_module.cfg, step):
            return
        t0 = time.perf_counter()
        loss = self.evaluate(trainer, pl_module)
        self.logs.log_validation(trainer, pl_module, step, loss, len(self.val.starts), time.perf_counter() - t0)

    def evaluate(self, trainer, m) -> float:
        """The mean loss over every rank's windows (a collective with several ranks)."""
        model = m.model
        was_training = model.training
        model.eval()
        try:
            if self._batches is None:
                self._batches = self.val.batches(trainer.global_rank, m.cfg.world_size, m.cfg.micro_bsz)
            total, count = mean_loss(model, self._batches, m.device, trainer.precision_plugin.forward_context)
        finally:
            model.train(was_training)
        sums = torch.tensor([total, float(count)], dtype=torch.float64, device=m.device)
        if m.cfg.world_size > 1:
            sums = trainer.strategy.reduce(sums, reduce_op="sum")
        total, count = float(sums[0]), float(sums[1])
        return total / count if count else math.nan
