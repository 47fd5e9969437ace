"""The LightningModule that trains RWKV-7 by the recipe.

It owns the per-step learning rate, the mini-epoch bookkeeping (train_log.txt,
rwkv-N.pth, rwkv-final.pth), the exact-resume states and the optional wandb
log; signals and the profiler are callbacks (rwkvlm.train.callbacks). Global step numbers count from the very first run: a run that resumes
at step k continues the schedule, the data order and the mini-epoch numbering
from k.
"""
from __future__ import annotations

import collections
import datetime
import json
import math
import os
import secrets
import statistics
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from rwkvlm.train import trainlog
from rwkvlm.atomic import atomic_open, atomic_torch_save, explain_write_errors
from rwkvlm.train.checkpoint import (PROJ_HINT, RECENT_STEPS, load_checkpoint_file, make_weight_files, run_fingerprint,
                               save_resume_state, save_weights, write_divergence, write_final_info)
from rwkvlm.train.dataset import MagicPrimeDataset, StepSampler
from rwkvlm.errors import UserError
from rwkvlm.train.optim import lr_at, make_optimizer, param_groups
from rwkvlm.train.rundir import (DS_DIR, DS_TAG, FINAL, LATEST, LOSS_LOG_HEADER, STATE_WEIGHTS, TRAINER_FILE, RunDir,
                           epoch_name, rng_file)




class RWKVTrainModule(pl.LightningModule):
    def __init__(self, cfg, model, data, start, log=print, seed=None):
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.data = data  # BinIdx
        self.start = start  # checkpoint.StartPoint
        self.print_fn = log
        self.seed = seed  # recorded in the states: an exact resume reuses it (train._seed)
        self.end_message = None  # why the run ended, printed once the progress bar is closed
        st = start.state if start.exact else {}  # a run that continues exactly keeps its running sums
        self.run_start_step = start.run_start_step
        self.epoch_loss_sum = float(st.get("epoch_loss_sum", 0.0))
        self.epoch_loss_count = int(st.get("epoch_loss_count", 0))
        self.recent_losses = collections.deque(st.get("recent_losses", []), maxlen=RECENT_STEPS)
        self.wandb_id = st.get("wandb_id")
        self.wandb_run = None
        self.stop_requested = False  # set by callbacks.StopOnSignal (Ctrl-C / SIGTERM)
        self.last_save_time = time.monotonic()
        self.t_last = None
        self.kt_s = 0.0
        self.lr_now = 0.0
        self.rd = RunDir(cfg.proj_dir)
        self.fp16_skipped = None  # DeepSpeed's count of skipped fp16 steps when last looked at
        self.fp16_told = False  # the advice that goes with the first skipped step was given

    # ------------------------------------------------------------ steps
    @property
    def step(self) -> int:
        """Global optimiser step about to run (before the step) or just run (after it)."""
        return self.start.step + self.trainer.global_step

    def train_dataloader(self):
        self.dataset = ds = MagicPrimeDataset(
            self.data.tokens, self.cfg.ctx_len, self.cfg.magic_prime, self.cfg.micro_bsz,
            self.cfg.epoch_steps, rank=self.global_rank, world_size=self.cfg.world_size,
            mini_epoch_samples=self.cfg.mini_epoch_samples,
        )
        sampler = StepSampler(self.cfg.micro_bsz, self.start.step, self.cfg.total_steps)
        # no pin_memory: pinning each fresh 0.5 MB batch cost 13 ms per tensor on the H200 host,
        # on the step's critical path, far more than the plain copy it would speed up
        return DataLoader(ds, batch_size=self.cfg.micro_bsz, sampler=sampler, num_workers=0,
                          pin_memory=False, drop_last=True)

    def configure_optimizers(self):
        groups = param_groups(self.model, self.cfg.weight_decay)
        lr = lr_at(self.start.step, self.start.step - self.run_start_step, self.cfg)
        # the strategy's device, not self.device: DeepSpeed builds the optimiser before moving the model
        return make_optimizer(groups, self.cfg, lr, self.trainer.strategy.root_device.type)

    def forward(self, idx):
        return self.model(idx)

    def training_step(self, batch, batch_idx):
        idx, targets = batch  # (B, T), (B, T)
        return self.model.loss(idx, targets)

    # ------------------------------------------------------------ hooks
    def on_train_start(self):
        if self.start.resume_dir is not None and self.start.restore_optimizer:
            self._restore_resume_state()
        if self.global_rank == 0:
            self._trim_logs()
            # after the trim: this run's header, then its mini-epochs
            self._append(self.rd.train_log, trainlog.header_line(self.cfg, self.start, self.rd))
            self._write_run_config()
        if self.global_rank == 0 and self.cfg.wandb:
            self._start_wandb()
        self.t_last = time.perf_counter()

    def on_train_batch_start(self, batch, batch_idx):
        if self.fp16_skipped is None and self.cfg.precision == "fp16":  # after a resume restored the count
            self.fp16_skipped = self._deepspeed_skipped_steps()
        step = self.step
        self.lr_now = lr_at(step, step - self.run_start_step, self.cfg)
        for g in self.trainer.optimizers[0].param_groups:
            g["lr"] = self.lr_now * g.get("lr_scale", 1.0)
        if self.cfg.dump_samples:
            mb = self.cfg.micro_bsz
            self._append(f"{self.cfg.dump_samples}.rank{self.global_rank}.csv",
                         "".join(f"{step},{self.global_rank},{self.dataset.start(s)}\n"
                                 for s in range(step * mb, (step + 1) * mb)),
                         hint="give --dump_samples a path on a disk with free space, or leave it empty")

    def on_train_batch_end(self, outputs, batch, batch_idx):
        cfg = self.cfg
        loss = float(outputs["loss"].detach()) if isinstance(outputs, dict) else float(outputs.detach())
        own_bad = not math.isfinite(loss)
        bad = own_bad
        if cfg.world_size > 1:  # every rank stops together (a rank left behind would hang)
            bad = bool(self.trainer.strategy.reduce_boolean_decision(own_bad, all=False))
        if bad:
            self._diverged(f"the training loss is {loss} at step {self.step}" if own_bad
                           else f"another rank's training loss is not finite at step {self.step}")
        if self.cfg.precision == "fp16":
            self._note_fp16_skip()
        now = time.perf_counter()
        dt = now - self.t_last
        self.t_last = now
        kt_s = cfg.tokens_per_step / dt / 1000.0
        self.kt_s = kt_s if self.kt_s == 0 else 0.9 * self.kt_s + 0.1 * kt_s
        self.epoch_loss_sum += loss
        self.epoch_loss_count += 1
        self.recent_losses.append(loss)
        step = self.step  # steps done so far
        mini_epoch = (step - 1) // cfg.epoch_steps
        self.log_dict({"loss": loss, "lr": self.lr_now, "Kt/s": self.kt_s, "ep": float(mini_epoch)},
                      prog_bar=True, logger=False, on_step=True, on_epoch=False)
        if self.global_rank == 0:
            self._log_step(step, loss, kt_s)

        epoch_done = step % cfg.epoch_steps == 0
        final = step >= cfg.total_steps
        epoch_file = self._end_mini_epoch(mini_epoch) if epoch_done else None
        want_state = final or epoch_done or (cfg.save_every_steps > 0 and step % cfg.save_every_steps == 0)
        if cfg.save_every_minutes > 0:
            due = time.monotonic() - self.last_save_time >= cfg.save_every_minutes * 60
            want_state = want_state or bool(self.trainer.strategy.broadcast(due, src=0))
        stop = self.stop_requested
        if cfg.world_size > 1:  # every rank must take the same (collective) decision
            stop = bool(self.trainer.strategy.reduce_boolean_decision(stop, all=False))
        if want_state or stop:
            # the weight files of this step are made from the state, after it: a stop in between
            # leaves the state, which lists them, and the next start makes them
            pending = ([epoch_file] if epoch_file else []) + ([FINAL] if final else [])
            self._save(step, pending=pending, final=final)
        if final:
            self.end_message = f"reached --my_exit_tokens ({cfg.my_exit_tokens}): wrote {self.rd.final}"
            return
        if stop:
            self.end_message = (f"stopped at step {step} on request; saved an exact-resume state. "
                                f"Re-run the script to continue.")
            self.trainer.should_stop = True

    def on_train_end(self):
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.end_message:  # after the progress bar's last line (its on_train_end runs first)
            self.print_fn(self.end_message)

    # ------------------------------------------------------------ mini-epochs and saving
    def _end_mini_epoch(self, mini_epoch: int) -> str | None:
        """Log the mini-epoch's mean loss; return the name of the rwkv-N.pth to write, if it is due."""
        cfg = self.cfg
        epoch_in_run = mini_epoch - self.start.epoch_begin
        if self.global_rank == 0:
            mean = self.epoch_loss_sum / max(1, self.epoch_loss_count)
            line = (f"{mini_epoch} {mean:.6f} {math.exp(min(mean, 50)):.4f} {self.lr_now:.8f} "
                    f"{datetime.datetime.now()} {epoch_in_run}\n")
            self._append(self.rd.train_log, line)
        self.epoch_loss_sum, self.epoch_loss_count = 0.0, 0
        if cfg.epoch_save > 0 and epoch_in_run % cfg.epoch_save == 0:
            return epoch_name(mini_epoch)
        return None

    def _engine(self):
        """The DeepSpeed engine under a DeepSpeed strategy, else None."""
        return getattr(self.trainer.strategy, "deepspeed_engine", None)

    def gathered_state_dict(self) -> dict | None:
        """The model's full state dict on rank 0 (None elsewhere); collective under ZeRO-3."""
        engine = self._engine()
        if engine is not None and engine.zero_optimization_stage() == 3:
            full = engine._zero3_consolidated_16bit_state_dict()  # collective
            if self.global_rank != 0:
                return None
            return {k.removeprefix("model."): v for k, v in full.items()}
        if self.global_rank != 0:
            return None
        return self.model.state_dict()

    # ------------------------------------------------------------ divergence
    def _deepspeed_skipped_steps(self) -> int | None:
        return getattr(self._engine(), "skipped_steps", None)

    def _note_fp16_skip(self):
        """fp16 under DeepSpeed: say so when the step just taken was skipped because its scaled
        gradients overflowed (the weights are unchanged and the loss scale is lowered)."""
        skipped = self._deepspeed_skipped_steps()
        if skipped is None or self.fp16_skipped is None:
            return
        if skipped > self.fp16_skipped and self.global_rank == 0:
            scaler = getattr(getattr(self._engine(), "optimizer", None), "loss_scaler", None)
            scale = getattr(scaler, "cur_scale", None)
            now = f"; loss scale now {scale:g}" if isinstance(scale, (int, float)) else ""
            msg = f"fp16: step {self.step} skipped (its gradients overflowed{now})."
            if not self.fp16_told:  # the advice once per run
                msg += (" DeepSpeed lowers the loss scale until the gradients fit: a few skipped steps at"
                        " the start are normal; a long run of them later means training diverges: lower"
                        " --lr_init or use --precision bf16.")
                self.fp16_told = True
            self.print_fn(msg)
        self.fp16_skipped = skipped

    def _diverged(self, what: str):
        """Stop with a message (before anything of this step is saved) that names the last
        healthy save, which the next run continues from once the learning rate is lowered."""
        cfg = self.cfg
        detail = ""
        if self.global_rank == 0:
            good, bad = write_divergence(self.rd, cfg, self.step, what)
            if good is not None and bad:
                detail = (f" The last healthy save is {good.describe(self.rd)}; the {len(bad)} later one(s) ("
                          + ", ".join(s.describe(self.rd) for s in bad[:4]) + (", ..." if len(bad) > 4 else "")
                          + ") hold blown-up weights and will be set aside.")
            elif good is not None:
                detail = f" The newest save, {good.describe(self.rd)}, is from before it."
            where = f"it continues from {self.rd.relative(good.path)}" if good else "it continues from the newest save"
        else:
            where = "it continues from the last healthy save"
        raise UserError(
            f"Training diverged: {what}. Nothing from this step was saved.{detail} Lower --lr_init (now "
            f"{cfg.lr_init:g}) or raise --warmup_steps (now {cfg.warmup_steps}) and run the script again: {where} "
            f"(--resume_from <save> picks another one).")

    def _check_weights_finite(self):
        """Every rank's weights (its ZeRO partition) hold only finite values; a collective.

        DeepSpeed's bf16 mode runs without its per-gradient overflow check (train.py), so a
        NaN gradient would reach the weights: this keeps such weights out of every save.
        """
        params = [p.detach() for p in self.model.parameters() if p.numel() > 0]
        ok = bool(torch.stack(torch._foreach_norm(params)).isfinite().all()) if params else True
        if self.cfg.world_size > 1:
            ok = not self.trainer.strategy.reduce_boolean_decision(not ok, all=False)
        if not ok:
            self._diverged(f"the weights hold NaN or infinite values after step {self.step}")

    def _save(self, step: int, pending: list, final: bool):
        """An exact-resume state of this step, then the weight files made from it (`pending`:
        rwkv-N.pth, rwkv-final.pth) and rwkv-latest.pth; collective."""
        self._check_weights_finite()
        sd = self.gathered_state_dict()  # rank 0 (collective under ZeRO-3)
        engine = self._engine()
        samples = step * self.cfg.real_bsz
        state = {
            "format": 2, "step": step, "samples": samples, "run_start_step": self.run_start_step,
            "epoch_begin": self.start.epoch_begin, "epoch_loss_sum": self.epoch_loss_sum,
            "epoch_loss_count": self.epoch_loss_count, "tokens": step * self.cfg.tokens_per_step,
            "loss": statistics.fmean(self.recent_losses) if self.recent_losses else None,
            "recent_losses": list(self.recent_losses), "pending": pending,
            # the logs as far as this state: a resume from it cuts what a killed run wrote later
            "log_lines": [_count_lines(self.rd.train_log), _count_lines(self.rd.loss_log)],
            "wandb_id": self.wandb_id, "kind": "deepspeed" if engine is not None else "torch",
            "seed": self.seed,
            "fingerprint": run_fingerprint(self.cfg), "saved_at": str(datetime.datetime.now()),
        }

        def write_payload(d: Path):
            # RNG states per rank (the recipe draws no random numbers while training, but a
            # model change that adds dropout or noise should still resume exactly)
            atomic_torch_save(_rng_state(), d / rng_file(self.global_rank))
            if engine is not None:
                engine.save_checkpoint(str(d / DS_DIR), tag=DS_TAG, save_latest=False)
            elif self.global_rank == 0:
                atomic_torch_save({"model": self.model.state_dict(),
                                   "optimizer": self.trainer.optimizers[0].state_dict()}, d / TRAINER_FILE)
            if sd is not None:
                save_weights(sd, d / STATE_WEIGHTS, self.cfg.precision)

        d = save_resume_state(self.rd, step, state, write_payload, self.cfg.keep_resume,
                              is_rank0=self.global_rank == 0, barrier=self.trainer.strategy.barrier)
        if self.global_rank == 0:
            make_weight_files(self.rd, d, pending + [LATEST])
            if final:
                write_final_info(self.rd, step, samples, state["fingerprint"], source=self.rd.relative(d))
        self.trainer.strategy.barrier()
        self.last_save_time = time.monotonic()

    def _restore_resume_state(self):
        """The optimiser state of the start's state folder (and, continuing exactly, the RNG).

        The optimiser hyperparameters (betas, eps, weight decay) stay this run's: a state
        brings its moments, not its settings.
        """
        d, start = self.start.resume_dir, self.start
        engine = self._engine()
        optimizer = self.trainer.optimizers[0]
        mine = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        try:
            if engine is not None:
                engine.load_checkpoint(str(d / DS_DIR), tag=DS_TAG, load_optimizer_states=True,
                                       load_lr_scheduler_states=False, load_module_strict=True)
            else:
                optimizer.load_state_dict(start.payload["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            if start.exact or engine is not None:
                raise UserError(f"cannot restore the optimiser state of {d} ({str(e).splitlines()[0]}). If "
                                f"you changed --weight_decay since it was saved, change it back; or pass "
                                f"--resume_from with an rwkv-N.pth to continue from weights alone.") from None
            self.print_fn(f"note: the optimiser state of {d.name} does not fit this run's optimiser "
                          f"({str(e).splitlines()[0]}); it restarts.")
            return
        for group, own in zip(optimizer.param_groups, mine):
            group.update(own)
        if not start.exact:
            return
        _set_rng_state(load_checkpoint_file(d / rng_file(self.global_rank)))
        if self.global_rank == 0:
            self.print_fn(f"resumed exactly from {d} (step {start.step})")

    # ------------------------------------------------------------ logs
    def _write_run_config(self):
        """train_config.json: this run's settings and derived sizes, for tools (the loss plot)."""
        cfg = self.cfg
        info = dict(vars(cfg), world_size=cfg.world_size, epoch_steps=cfg.epoch_steps,
                    tokens_per_step=cfg.tokens_per_step, total_steps=cfg.total_steps,
                    tokens_per_mini_epoch=cfg.mini_epoch_samples * cfg.ctx_len, start_step=self.start.step,
                    started_from=str(self.start.source))
        with atomic_open(self.rd.train_config, "w") as f:
            json.dump(info, f, indent=1, default=str)

    def _trim_logs(self):
        """Drop log lines past the start point, left by a run that was killed after writing them.

        A state records how many lines each log had when it was written; for other starts the
        lines are judged by their mini-epoch and token count.
        """
        st = self.start.state if self.start.resume_dir is not None else {}
        if "log_lines" in st:
            for path, n in zip((self.rd.train_log, self.rd.loss_log), st["log_lines"]):
                _keep_lines(path, n)
            return
        first_epoch = self.start.step // self.cfg.epoch_steps
        tokens = self.start.step * self.cfg.tokens_per_step
        _filter_lines(self.rd.train_log, lambda ln: trainlog.before_start(ln, first_epoch, self.start.step))
        _filter_lines(self.rd.loss_log, lambda ln: ln.startswith("step") or int(ln.split(",")[1]) <= tokens)

    def _append(self, path, text: str, hint: str = PROJ_HINT) -> None:
        """Append to a log; a full disk or unwritable folder stops the run with what to do."""
        path = Path(path)
        with explain_write_errors(path.parent, hint=hint,
                                  kept="The saves in PROJ_DIR are untouched; re-running the script continues "
                                       "from the newest"):
            with open(path, "a") as f:
                f.write(text)

    def _log_step(self, step: int, loss: float, kt_s: float):
        path = self.rd.loss_log
        head = "" if path.exists() else LOSS_LOG_HEADER + "\n"
        self._append(path, head + f"{step},{step * self.cfg.tokens_per_step},{loss:.6f},{self.lr_now:.8g},"
                                  f"{kt_s:.3f},{time.time():.3f}\n")
        if self.wandb_run is not None:
            self.wandb_run.log({
                "loss": loss, "lr": self.lr_now, "wd": self.cfg.weight_decay,
                "Gtokens": step * self.cfg.tokens_per_step / 1e9, "kt/s": kt_s,
            }, step=step)

    def _start_wandb(self):
        try:
            import wandb
        except ImportError:
            self.print_fn('note: --wandb is set but the wandb package is not installed (pip install -e ".[wandb]", '
                          'or WANDB="" in demo-training-run.sh to turn wandb off); training continues without it.')
            return
        settings = {}
        if not os.environ.get("WANDB_MODE") and not _wandb_logged_in():
            settings["mode"] = "offline"
            self.print_fn("note: no wandb login found: logging offline (sync later with `wandb sync`).")
        self.wandb_id = self.wandb_id or secrets.token_hex(4)  # a wandb run id: [a-z0-9]{8}
        cfg = dict(vars(self.cfg))
        self.wandb_run = wandb.init(
            project=self.cfg.wandb, id=self.wandb_id, resume="allow", dir=str(self.rd.path),
            name=f"L{self.cfg.n_layer}-D{self.cfg.n_embd}-x070 {datetime.datetime.now():%Y-%m-%d %H:%M}",
            config=json.loads(json.dumps(cfg, default=str)), **settings,
        )


def _rng_state() -> dict:
    import random

    import numpy as np

    st = {"torch": torch.get_rng_state(),
          "numpy": torch.from_numpy(np.append(np.random.get_state()[1], np.random.get_state()[2])
                                    .astype(np.int64)),
          "python": torch.tensor(list(random.getstate()[1]), dtype=torch.int64)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def _set_rng_state(st: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])
    keys = st["numpy"].numpy()
    np.random.set_state(("MT19937", keys[:624].astype(np.uint32), int(keys[624])))
    py = tuple(int(x) for x in st["python"].tolist())
    random.setstate((3, py, None))


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def _keep_lines(path: Path, n: int) -> None:
    """Cut `path` (crash-safely) to its first n lines."""
    if _count_lines(path) > n:
        with open(path) as f:
            lines = [ln for _, ln in zip(range(n), f)]
        with atomic_open(path, "w") as f:
            f.writelines(lines)


def _filter_lines(path: Path, keep) -> None:
    """Rewrite `path` (crash-safely) without the lines for which keep(line) is false."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [ln for ln in lines if not ln.strip() or _safe(keep, ln)]
    if len(kept) != len(lines):
        with atomic_open(path, "w") as f:
            f.writelines(kept)


def _safe(keep, line) -> bool:
    try:
        return bool(keep(line))
    except (ValueError, IndexError):
        return True  # not a line we wrote: leave it


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False
