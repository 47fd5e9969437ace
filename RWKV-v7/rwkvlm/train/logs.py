"""The run's logs, as a Lightning callback: train_log.txt, loss_log.csv, train_config.json, the
progress bar's figures, wandb and --dump_samples (file names and formats: rwkvlm.rundir).

At the start (rank 0): log lines past the start point, left by a killed run, are cut; this run's
header line goes into train_log.txt (rwkvlm.train.trainlog) and its settings into
train_config.json; wandb starts when --wandb is set. After each step: the loss, learning rate and
kt/s on the progress bar, one loss_log.csv row (and a wandb point), and at a mini-epoch's end its
train_log.txt line. The running sums (mean loss of the mini-epoch, of the last steps) live on the
module, so that the exact-resume states (rwkvlm.train.saving) carry them.

With --val_every_steps the loss_log.csv header has a val_loss column (empty but at validation
steps); a validation step's row waits for the validation callback (rwkvlm.train.validation), which
calls log_validation with the loss: that writes the row, train_log.txt's validation line, the
progress bar's val_loss and the wandb point.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import secrets
import time
from pathlib import Path

import pytorch_lightning as pl

from rwkvlm.atomic import atomic_open, explain_write_errors
from rwkvlm.rundir import LOSS_LOG_HEADER, LOSS_LOG_VAL_HEADER
from rwkvlm.rundir.weights import PROJ_HINT
from rwkvlm.train import trainlog


def append(path, text: str, hint: str = PROJ_HINT) -> None:
    """Append to a log; a full disk or unwritable folder stops the run with what to do."""
    path = Path(path)
    with explain_write_errors(path.parent, hint=hint,
                              kept="The saves in PROJ_DIR are untouched; re-running the script continues "
                                   "from the newest"):
        with open(path, "a") as f:
            f.write(text)


def process_started() -> float:
    """The wall-clock time (time.time()) at which this process started: /proc/self/stat's start
    time after boot plus the boot time; where /proc is not there, the time this module was loaded."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _LOADED


_LOADED = time.time()


class TrainLogs(pl.Callback):
    """Writes the logs of a run (see the module's docstring)."""

    def __init__(self, log=print):
        self.say = log
        self.launched = process_started()
        self.first_step_s = None  # seconds from the launch to the end of this run's first step
        self.t_train_start = None
        self.t_last = None
        self.wandb_run = None
        self.held_row = None  # (step, loss, kt_s) of a validation step, written by log_validation

    def on_train_start(self, trainer, pl_module):
        if trainer.global_rank == 0:
            self._trim_logs(pl_module)
            if pl_module.cfg.val_every_steps > 0:
                _add_val_column(pl_module.rd.loss_log)
            # after the trim: this run's header, then its mini-epochs
            append(pl_module.rd.train_log, trainlog.header_line(pl_module.cfg, pl_module.start, pl_module.rd,
                                                                extra=_header_extra(pl_module)))
            self._write_run_config(pl_module)
            if pl_module.cfg.wandb:
                self._start_wandb(pl_module)
        self.t_train_start = time.time()
        self.t_last = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        cfg = pl_module.cfg
        if cfg.dump_samples:
            step, mb, rank = pl_module.step, cfg.micro_bsz, trainer.global_rank
            ds = pl_module.dataset
            where = getattr(ds, "dump_row", ds.start)  # a mix: 'start,file'
            append(f"{cfg.dump_samples}.rank{rank}.csv",
                   "".join(f"{step},{rank},{where(s)}\n" for s in range(step * mb, (step + 1) * mb)),
                   hint="give --dump_samples a path on a disk with free space, or leave it empty")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        m, cfg = pl_module, pl_module.cfg
        loss = m.step_loss(outputs)
        now = time.perf_counter()
        dt = now - self.t_last
        self.t_last = now
        kt_s = cfg.tokens_per_step / dt / 1000.0
        m.kt_s = kt_s if m.kt_s == 0 else 0.9 * m.kt_s + 0.1 * kt_s
        m.epoch_loss_sum += loss
        m.epoch_loss_count += 1
        m.recent_losses.append(loss)
        step = m.step  # steps done so far
        mini_epoch = (step - 1) // cfg.epoch_steps
        m.log_dict({"loss": loss, "lr": m.lr_now, "Kt/s": m.kt_s, "ep": float(mini_epoch)},
                   prog_bar=True, logger=False, on_step=True, on_epoch=False)
        if self.first_step_s is None:
            self.first_step_s = time.time() - self.launched
            self._first_step_line(m, step)
        if trainer.global_rank == 0:
            from rwkvlm.train.validation import due

            if due(cfg, step):
                self.held_row = (step, loss, kt_s)  # written with its val_loss by log_validation
            else:
                self._log_step(m, step, loss, kt_s)
        if step % cfg.epoch_steps == 0:
            self._end_mini_epoch(trainer, m, mini_epoch)

    def _first_step_line(self, m, step: int) -> None:
        """When this run's first step ended, counted from the launch of the process (also in
        train_config.json as first_step_s, with launched_at): start-up + the first step."""
        setup = self.t_train_start - self.launched if self.t_train_start else None
        self.say(f"step {step} done {self.first_step_s:.1f} s after launch (set-up {setup:.1f} s, then the "
                 f"first step {self.first_step_s - setup:.1f} s)" if setup is not None else
                 f"step {step} done {self.first_step_s:.1f} s after launch")
        if m.trainer.global_rank == 0:
            from rwkvlm.train.memory import update_run_config

            update_run_config(m.rd.train_config, launched_at=self.launched, first_step_s=round(self.first_step_s, 2),
                              train_start_s=round(setup, 2) if setup is not None else None)

    def on_train_end(self, trainer, pl_module):
        if self.wandb_run is not None:
            self.wandb_run.finish()

    def log_validation(self, trainer, m, step: int, val_loss: float, windows: int, seconds: float) -> None:
        """The validation loss of `step` (every rank calls it): the step's loss_log.csv row with it,
        train_log.txt's validation line, the progress bar and wandb. The time it took is left out
        of the next step's kt/s."""
        m.log_dict({"val_loss": val_loss}, prog_bar=True, logger=False, on_step=True, on_epoch=False)
        if trainer.global_rank == 0:
            held, self.held_row = self.held_row, None
            if held is not None and held[0] == step:
                self._log_step(m, step, held[1], held[2], val_loss=val_loss)
            append(m.rd.train_log, trainlog.validation_line(step, step * m.cfg.tokens_per_step, val_loss, windows,
                                                           seconds))
            if self.wandb_run is not None:
                self.wandb_run.log({"val_loss": val_loss}, step=step)
        self.t_last = time.perf_counter()

    # ------------------------------------------------------------ lines
    def _end_mini_epoch(self, trainer, m, mini_epoch: int) -> None:
        """train_log.txt's line for the mini-epoch just finished; its running sums restart."""
        if trainer.global_rank == 0:
            mean = m.epoch_loss_sum / max(1, m.epoch_loss_count)
            line = (f"{mini_epoch} {mean:.6f} {math.exp(min(mean, 50)):.4f} {m.lr_now:.8f} "
                    f"{datetime.datetime.now()} {mini_epoch - m.start.epoch_begin}\n")
            append(m.rd.train_log, line)
        m.epoch_loss_sum, m.epoch_loss_count = 0.0, 0

    def _log_step(self, m, step: int, loss: float, kt_s: float, val_loss: float | None = None):
        path = m.rd.loss_log
        validating = m.cfg.val_every_steps > 0
        head = "" if path.exists() else (LOSS_LOG_VAL_HEADER if validating else LOSS_LOG_HEADER) + "\n"
        val = "" if not validating else "," + ("" if val_loss is None else f"{val_loss:.6f}")
        append(path, head + f"{step},{step * m.cfg.tokens_per_step},{loss:.6f},{m.lr_now:.8g},"
                            f"{kt_s:.3f},{time.time():.3f}{val}\n")
        if self.wandb_run is not None:
            self.wandb_run.log({
                "loss": loss, "lr": m.lr_now, "wd": m.cfg.weight_decay,
                "Gtokens": step * m.cfg.tokens_per_step / 1e9, "kt/s": kt_s,
            }, step=step)

    def _write_run_config(self, m):
        """train_config.json: this run's settings and derived sizes, for tools (the loss plot)."""
        cfg = m.cfg
        info = dict(vars(cfg), world_size=cfg.world_size, epoch_steps=cfg.epoch_steps,
                    tokens_per_step=cfg.tokens_per_step, total_steps=cfg.total_steps,
                    tokens_per_mini_epoch=cfg.mini_epoch_samples * cfg.ctx_len, start_step=m.start.step,
                    started_from=str(m.start.source), data=_data_record(m),
                    validation=getattr(m, "validation_info", None))
        with atomic_open(m.rd.train_config, "w") as f:
            json.dump(info, f, indent=1, default=str)

    def _trim_logs(self, m):
        """Drop log lines past the start point, left by a run that was killed after writing them.

        A state records how many lines each log had when it was written; for other starts the
        lines are judged by their mini-epoch and token count.
        """
        start, rd = m.start, m.rd
        st = start.state if start.resume_dir is not None else {}
        if "log_lines" in st:
            for path, n in zip((rd.train_log, rd.loss_log), st["log_lines"]):
                _keep_lines(path, n)
            return
        first_epoch = start.step // m.cfg.epoch_steps
        tokens = start.step * m.cfg.tokens_per_step
        _filter_lines(rd.train_log, lambda ln: trainlog.before_start(ln, first_epoch, start.step))
        _filter_lines(rd.loss_log, lambda ln: ln.startswith("step") or int(ln.split(",")[1]) <= tokens)

    def _start_wandb(self, m):
        try:
            import wandb
        except ImportError:
            self.say('note: --wandb is set but the wandb package is not installed (pip install -e ".[wandb]", '
                     'or WANDB="" in demo-training-run.sh to turn wandb off); training continues without it.')
            return
        settings = {}
        if not os.environ.get("WANDB_MODE") and not _wandb_logged_in():
            settings["mode"] = "offline"
            self.say("note: no wandb login found: logging offline (sync later with `wandb sync`).")
        m.wandb_id = m.wandb_id or secrets.token_hex(4)  # a wandb run id: [a-z0-9]{8}
        cfg = m.cfg
        self.wandb_run = wandb.init(
            project=cfg.wandb, id=m.wandb_id, resume="allow", dir=str(m.rd.path),
            name=f"L{cfg.n_layer}-D{cfg.n_embd}-{cfg.my_testing} {datetime.datetime.now():%Y-%m-%d %H:%M}",
            config=json.loads(json.dumps(dict(vars(cfg)), default=str)), **settings,
        )


def _data_record(m) -> dict:
    """What train_config.json says about the data: its kind, and a text's vocabulary or a mix's files."""
    record = getattr(m.data, "record", None)
    if record is not None:
        return record()
    return {"kind": "binidx", "path": m.cfg.data_file, "tokens": int(getattr(m.data, "num_tokens", 0))}


def _header_extra(m) -> dict:
    """The items of the run's train_log.txt header beyond trainlog.HEADER_KEYS."""
    from rwkvlm.data.mix import DataMix

    cfg, out = m.cfg, {}
    if isinstance(m.data, DataMix):
        out["data_mix"] = m.data.header_value()
    if cfg.data_type != "binidx":
        out["data_type"] = cfg.data_type
        out["vocab"] = getattr(m.data, "vocab_name", "?")
    info = getattr(m, "validation_info", None)
    if info:
        out.update(val_data_file=info["val_data_file"], val_every_steps=info["every_steps"],
                   val_windows=info["windows"])
    return out


def _add_val_column(path: Path) -> None:
    """Give an existing loss_log.csv the val_loss column (crash-safely; rows without it stay)."""
    if not path.is_file():
        return
    with open(path) as f:
        first = f.readline().strip()
    if first == LOSS_LOG_HEADER:
        text = path.read_text()
        with atomic_open(path, "w") as f:
            f.write(LOSS_LOG_VAL_HEADER + text[len(first):])


def count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def _keep_lines(path: Path, n: int) -> None:
    """Cut `path` (crash-safely) to its first n lines."""
    if count_lines(path) > n:
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
