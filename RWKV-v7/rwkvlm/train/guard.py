"""The divergence guard: a Lightning callback that stops a run whose loss or weights blow up.

- After every step: a non-finite training loss on any rank stops every rank together, with a
  message naming the last healthy save (written to diverged.json); nothing of that step is saved.
- Before every save (SaveStates calls check_weights): weights holding NaN or infinite values are
  never saved (DeepSpeed's bf16 mode runs without its per-gradient overflow check).
- fp16 under DeepSpeed: a step skipped because its scaled gradients overflowed is reported, with
  the advice once per run.
"""
from __future__ import annotations

import math

import pytorch_lightning as pl
import torch

from rwkvlm.errors import UserError
from rwkvlm.train.resume import write_divergence


def _engine(trainer):
    """The DeepSpeed engine under a DeepSpeed strategy, else None."""
    return getattr(trainer.strategy, "deepspeed_engine", None)


class DivergenceGuard(pl.Callback):
    """Stops the run, with what to do, when training diverges (see the module's docstring)."""

    def __init__(self, log=print):
        self.say = log
        self.fp16_skipped = None  # DeepSpeed's count of skipped fp16 steps when last looked at
        self.fp16_told = False  # the advice that goes with the first skipped step was given

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.fp16_skipped is None and pl_module.cfg.precision == "fp16":  # after a resume restored the count
            self.fp16_skipped = self._skipped_steps(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = pl_module.step_loss(outputs)
        own_bad = not math.isfinite(loss)
        bad = own_bad
        if pl_module.cfg.world_size > 1:  # every rank stops together (a rank left behind would hang)
            bad = bool(trainer.strategy.reduce_boolean_decision(own_bad, all=False))
        if bad:
            self.diverged(trainer, pl_module, f"the training loss is {loss} at step {pl_module.step}" if own_bad
                          else f"another rank's training loss is not finite at step {pl_module.step}")
        if pl_module.cfg.precision == "fp16":
            self.note_fp16_skip(trainer, pl_module)

    # ------------------------------------------------------------ fp16
    @staticmethod
    def _skipped_steps(trainer) -> int | None:
        return getattr(_engine(trainer), "skipped_steps", None)

    def note_fp16_skip(self, trainer, pl_module):
        """fp16 under DeepSpeed: say so when the step just taken was skipped because its scaled
        gradients overflowed (the weights are unchanged and the loss scale is lowered)."""
        skipped = self._skipped_steps(trainer)
        if skipped is None or self.fp16_skipped is None:
            return
        if skipped > self.fp16_skipped and trainer.global_rank == 0:
            scaler = getattr(getattr(_engine(trainer), "optimizer", None), "loss_scaler", None)
            scale = getattr(scaler, "cur_scale", None)
            now = f"; loss scale now {scale:g}" if isinstance(scale, (int, float)) else ""
            msg = f"fp16: step {pl_module.step} skipped (its gradients overflowed{now})."
            if not self.fp16_told:  # the advice once per run
                msg += (" DeepSpeed lowers the loss scale until the gradients fit: a few skipped steps at"
                        " the start are normal; a long run of them later means training diverges: lower"
                        " --lr_init or use --precision bf16.")
                self.fp16_told = True
            self.say(msg)
        self.fp16_skipped = skipped

    # ------------------------------------------------------------ stopping
    def check_weights(self, trainer, pl_module):
        """Every rank's weights (its ZeRO partition) hold only finite values; a collective."""
        params = [p.detach() for p in pl_module.model.parameters() if p.numel() > 0]
        ok = bool(torch.stack(torch._foreach_norm(params)).isfinite().all()) if params else True
        if pl_module.cfg.world_size > 1:
            ok = not trainer.strategy.reduce_boolean_decision(not ok, all=False)
        if not ok:
            self.diverged(trainer, pl_module, f"the weights hold NaN or infinite values after step {pl_module.step}")

    def diverged(self, trainer, pl_module, what: str):
        """Stop with a message (before anything of this step is saved) that names the last
        healthy save, which the next run continues from once the learning rate is lowered."""
        cfg, rd = pl_module.cfg, pl_module.rd
        detail = ""
        if trainer.global_rank == 0:
            good, bad = write_divergence(rd, cfg, pl_module.step, what)
            if good is not None and bad:
                detail = (f" The last healthy save is {good.describe(rd)}; the {len(bad)} later one(s) ("
                          + ", ".join(s.describe(rd) for s in bad[:4]) + (", ..." if len(bad) > 4 else "")
                          + ") hold blown-up weights and will be set aside.")
            elif good is not None:
                detail = f" The newest save, {good.describe(rd)}, is from before it."
            where = f"it continues from {rd.relative(good.path)}" if good else "it continues from the newest save"
        else:
            where = "it continues from the last healthy save"
        raise UserError(
            f"Training diverged: {what}. Nothing from this step was saved.{detail} Lower --lr_init (now "
            f"{cfg.lr_init:g}) or raise --warmup_steps (now {cfg.warmup_steps}) and run the script again: {where} "
            f"(--resume_from <save> picks another one).")
