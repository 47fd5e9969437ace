"""The save policy, as a Lightning callback: when a run writes an exact-resume state and the weight
files made from it, and how the run ends.

After each step: a state is saved at each mini-epoch's end, every --save_every_steps steps, every
--save_every_minutes minutes (rank 0's clock decides for all), at --my_exit_tokens and when a stop
was asked for (callbacks.StopOnSignal); every rank takes the same decision. The weight files of
that step (rwkv-N.pth every EPOCH_SAVE mini-epochs, rwkv-final.pth at the end) and
rwkv-latest.pth are made from the state after it is complete (rwkvlm.train.resume): a kill in
between leaves the state, which lists them, and the next start makes them. The divergence guard
checks the weights first, so blown-up weights are never saved.
"""
from __future__ import annotations

import datetime
import statistics
import time
from pathlib import Path

import pytorch_lightning as pl

from rwkvlm.atomic import atomic_torch_save
from rwkvlm.rundir import DS_DIR, DS_TAG, FINAL, LATEST, STATE_WEIGHTS, TRAINER_FILE, epoch_name, rng_file
from rwkvlm.rundir.saves import run_fingerprint
from rwkvlm.rundir.weights import save_weights
from rwkvlm.train.logs import count_lines
from rwkvlm.train.resume import make_weight_files, save_resume_state, write_final_info
from rwkvlm.train.rng import rng_state

STATE_FORMAT = 2  # state.json's "format"


class SaveStates(pl.Callback):
    """Saves exact-resume states and weight files by the policy of the module's docstring."""

    def __init__(self, guard):
        self.guard = guard  # guard.DivergenceGuard: check_weights before every save
        self.last_save_time = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        m, cfg = pl_module, pl_module.cfg
        step = m.step  # steps done so far
        epoch_done = step % cfg.epoch_steps == 0
        final = step >= cfg.total_steps
        epoch_file = self._epoch_file((step - 1) // cfg.epoch_steps, m) if epoch_done else None
        want_state = final or epoch_done or (cfg.save_every_steps > 0 and step % cfg.save_every_steps == 0)
        if cfg.save_every_minutes > 0:
            due = time.monotonic() - self.last_save_time >= cfg.save_every_minutes * 60
            want_state = want_state or bool(trainer.strategy.broadcast(due, src=0))
        stop = m.stop_requested
        if cfg.world_size > 1:  # every rank must take the same (collective) decision
            stop = bool(trainer.strategy.reduce_boolean_decision(stop, all=False))
        if want_state or stop:
            pending = ([epoch_file] if epoch_file else []) + ([FINAL] if final else [])
            if cfg.resume_states:
                self.save(trainer, m, step, pending=pending, final=final)
            elif pending:
                self.save_weights_only(trainer, m, step, pending, final)
        if final:
            m.end_message = f"reached --my_exit_tokens ({cfg.my_exit_tokens}): wrote {m.rd.final}"
            return
        if stop:
            m.end_message = (f"stopped at step {step} on request; saved an exact-resume state. "
                             f"Re-run the script to continue." if cfg.resume_states else
                             f"stopped at step {step} on request; --resume_states 0: no state was saved, and "
                             f"re-running the script continues from the newest weight file (rwkv-N.pth).")
            trainer.should_stop = True

    @staticmethod
    def _epoch_file(mini_epoch: int, m) -> str | None:
        """The rwkv-N.pth of the mini-epoch just finished, when EPOCH_SAVE makes it due."""
        epoch_save = m.cfg.epoch_save
        if epoch_save > 0 and (mini_epoch - m.start.epoch_begin) % epoch_save == 0:
            return epoch_name(mini_epoch)
        return None

    def save_weights_only(self, trainer, m, step: int, pending: list, final: bool):
        """--resume_states 0: the weight files of this step (rwkv-N.pth, rwkv-final.pth with its
        rwkv-final.json) written directly, without an exact-resume state; collective."""
        self.guard.check_weights(trainer, m)
        sd = m.gathered_state_dict()  # rank 0 (collective under ZeRO-3)
        if trainer.global_rank == 0:
            for name in pending:
                save_weights(sd, m.rd / name, m.cfg.precision)
            if final:
                write_final_info(m.rd, step, step * m.cfg.real_bsz, run_fingerprint(m.cfg), source=FINAL)
        del sd
        trainer.strategy.barrier()
        self.last_save_time = time.monotonic()

    def save(self, trainer, m, step: int, pending: list, final: bool):
        """An exact-resume state of this step, then the weight files made from it (`pending`:
        rwkv-N.pth, rwkv-final.pth) and rwkv-latest.pth; collective."""
        self.guard.check_weights(trainer, m)
        sd = m.gathered_state_dict()  # rank 0 (collective under ZeRO-3)
        engine = m.engine()
        rank = trainer.global_rank
        samples = step * m.cfg.real_bsz
        state = {
            "format": STATE_FORMAT, "step": step, "samples": samples, "run_start_step": m.run_start_step,
            "epoch_begin": m.start.epoch_begin, "epoch_loss_sum": m.epoch_loss_sum,
            "epoch_loss_count": m.epoch_loss_count, "tokens": step * m.cfg.tokens_per_step,
            "loss": statistics.fmean(m.recent_losses) if m.recent_losses else None,
            "recent_losses": list(m.recent_losses), "pending": pending,
            # the logs as far as this state: a resume from it cuts what a killed run wrote later
            "log_lines": [count_lines(m.rd.train_log), count_lines(m.rd.loss_log)],
            "wandb_id": m.wandb_id, "kind": "deepspeed" if engine is not None else "torch",
            "seed": m.seed,
            "fingerprint": run_fingerprint(m.cfg), "saved_at": str(datetime.datetime.now()),
        }

        def write_payload(d: Path):
            # RNG states per rank (the recipe draws no random numbers while training, but a
            # model change that adds dropout or noise should still resume exactly)
            atomic_torch_save(rng_state(), d / rng_file(rank))
            if engine is not None:
                engine.save_checkpoint(str(d / DS_DIR), tag=DS_TAG, save_latest=False)
            elif rank == 0:
                atomic_torch_save({"model": m.model.state_dict(),
                                   "optimizer": trainer.optimizers[0].state_dict()}, d / TRAINER_FILE)
            if sd is not None:
                save_weights(sd, d / STATE_WEIGHTS, m.cfg.precision)

        d = save_resume_state(m.rd, step, state, write_payload, m.cfg.keep_resume,
                              is_rank0=rank == 0, barrier=trainer.strategy.barrier)
        if rank == 0:
            make_weight_files(m.rd, d, pending + [LATEST])
            if final:
                write_final_info(m.rd, step, samples, state["fingerprint"], source=m.rd.relative(d))
        trainer.strategy.barrier()
        self.last_save_time = time.monotonic()
