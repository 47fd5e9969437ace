"""The loss curve of a training run, as <PROJ_DIR>/loss.png.

Reads the trainer's logs in PROJ_DIR:
- `loss_log.csv`: `step,tokens,loss,lr,kt_s,time`, one row per optimiser step
  (after a resume a step may appear twice: the last row wins), with a `val_loss` column
  when the run validated (--val_every_steps; empty but at validation steps);
- `train_log.txt`: one line per mini-epoch, `epoch loss ppl lr datetime epoch_in_run`
  (the datetime holds a space: `2026-11-28 01:02:03.123456`), and a header line per run
  starting with `#` (rwkvlm.train.trainlog), skipped here, and a `val step ...` line per
  validation, read for the validation losses when loss_log.csv has none.

The plot shows the raw per-step loss faintly, a smoothed line over it, the
mini-epoch mean losses as points, the validation loss (when there is one) as a line
with markers beside the training loss, and the learning rate on a second axis;
the x axis is tokens seen (M or G); a mini-epoch mean is drawn at the middle
of its mini-epoch. Without loss_log.csv the mini-epoch means
are plotted against the mini-epoch number.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rwkvlm.errors import UserError
from rwkvlm.rundir import LOSS_LOG as LOSS_CSV
from rwkvlm.rundir import TRAIN_CONFIG, TRAIN_LOG

OUTPUT = "loss.png"


@dataclass
class StepLog:
    step: np.ndarray
    tokens: np.ndarray
    loss: np.ndarray
    lr: np.ndarray
    path: Path | None = None
    skipped: list = field(default_factory=list)  # [(line number, why)] of the rows left out
    val: np.ndarray | None = None  # the validation loss of each step, NaN where none was computed

    @property
    def has_val(self) -> bool:
        return self.val is not None and bool(np.isfinite(self.val).any())


class BadRow(ValueError):
    """A loss_log.csv row that is not `step,tokens,loss,...` numbers."""


def _number(rec: dict, key: str, finite: bool = True, default: str | None = None) -> float:
    raw = rec.get(key, default)
    if raw is None:
        raise BadRow(f"no {key}")
    try:
        x = float(raw)
    except ValueError:
        raise BadRow(f"{key} {raw!r} is not a number") from None
    if finite and not math.isfinite(x):
        raise BadRow(f"{key} {raw!r} is not a finite number")
    return x


def _row(rec: dict) -> tuple[int, tuple]:
    """(step, (tokens, loss, lr)) of one row, or BadRow."""
    step = _number(rec, "step")
    if step < 0 or step != int(step):
        raise BadRow(f"step {rec['step']!r} is not a whole number >= 0")
    tokens = _number(rec, "tokens", finite=False, default="nan")
    if math.isinf(tokens) or tokens < 0:
        raise BadRow(f"tokens {rec['tokens']!r} is not a finite number >= 0")
    loss = _number(rec, "loss")
    lr = _number(rec, "lr", finite=False, default="nan")
    if math.isinf(lr):
        raise BadRow(f"lr {rec['lr']!r} is not a finite number")
    val = _number(rec, "val_loss", finite=False, default="nan") if rec.get("val_loss") else math.nan
    return int(step), (tokens, loss, lr, val)


def describe_skipped(log: StepLog, limit: int = 3) -> str:
    """One line about the rows of log.path that were left out ('' if none)."""
    if not log.skipped:
        return ""
    n = len(log.skipped)
    shown = "; ".join(f"line {ln}: {why}" for ln, why in log.skipped[:limit]) + ("; ..." if n > limit else "")
    return (f"note: skipped {n} row{'s' if n > 1 else ''} of {log.path} that {'are' if n > 1 else 'is'} not "
            f"step,tokens,loss numbers ({shown}); a torn last line of a stopped run, or an edited file.")


@dataclass
class EpochLog:
    epoch: np.ndarray
    loss: np.ndarray
    lr: np.ndarray
    when: list = field(default_factory=list)


def read_loss_csv(path) -> StepLog | None:
    """Rows of loss_log.csv sorted by step, the last row of a repeated step kept; None if absent/empty."""
    path = Path(path)
    if not path.is_file():
        return None
    rows: dict[int, tuple] = {}
    skipped = []
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        header = None
        for line_no, line in enumerate(f, 1):
            parts = [x.strip() for x in line.strip().split(",")]
            if not parts or parts == [""]:
                continue
            if header is None and parts[0] == "step":
                header = parts
                continue
            cols = header or ["step", "tokens", "loss", "lr", "kt_s", "time"]
            try:
                step, vals = _row(dict(zip(cols, parts)))
            except BadRow as e:  # a torn last line of a killed run, or junk
                skipped.append((line_no, str(e)))
                continue
            rows[step] = vals
    if not rows:
        if skipped:
            ln, why = skipped[0]
            raise UserError(f"{path} has no usable row: each row must be step,tokens,loss,lr,... numbers (line "
                            f"{ln}: {why}). Fix or delete the bad rows, or delete {path.name} to plot the "
                            f"mini-epoch losses of {TRAIN_LOG} alone.")
        return None
    steps = np.array(sorted(rows), dtype=np.int64)
    vals = np.array([rows[s] for s in steps], dtype=np.float64)
    return StepLog(step=steps, tokens=vals[:, 0], loss=vals[:, 1], lr=vals[:, 2], path=path, skipped=skipped,
                   val=vals[:, 3])


def read_val_lines(path) -> tuple[np.ndarray, np.ndarray] | None:
    """(tokens, val_loss) of train_log.txt's validation lines (the last of a repeated step kept),
    or None when there are none."""
    from rwkvlm.rundir.layout import validation_fields

    path = Path(path)
    if not path.is_file():
        return None
    rows = {}
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for line in f:
            v = validation_fields(line)
            if v is not None and math.isfinite(v[2]):
                rows[v[0]] = (v[1], v[2])
    if not rows:
        return None
    steps = sorted(rows)
    return (np.array([rows[s][0] for s in steps], dtype=np.float64),
            np.array([rows[s][1] for s in steps], dtype=np.float64))


def read_train_log(path) -> EpochLog | None:
    """Mini-epoch lines of train_log.txt (the last line of a repeated epoch kept); None if absent/empty."""
    path = Path(path)
    if not path.is_file():
        return None
    rows: dict[int, tuple] = {}
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 4:
                continue
            try:
                epoch, loss, lr = int(parts[0]), float(parts[1]), float(parts[3])
            except ValueError:
                continue
            if epoch < 0 or not math.isfinite(loss) or math.isinf(lr):
                continue  # not a line the trainer wrote
            when = " ".join(parts[4:6]) if len(parts) >= 6 else ""
            rows[epoch] = (loss, lr, when)
    if not rows:
        return None
    epochs = sorted(rows)
    return EpochLog(epoch=np.array(epochs, dtype=np.int64),
                    loss=np.array([rows[e][0] for e in epochs], dtype=np.float64),
                    lr=np.array([rows[e][1] for e in epochs], dtype=np.float64),
                    when=[rows[e][2] for e in epochs])


def smooth(y: np.ndarray, window: int | None = None) -> np.ndarray:
    """Centred moving average (shorter windows at the ends); window ~ len/50 by default."""
    y = np.asarray(y, dtype=np.float64)
    n = len(y)
    if n == 0:
        return y
    if window is None:
        window = max(1, min(500, n // 50))
    if window <= 1:
        return y.copy()
    half = window // 2
    c = np.concatenate(([0.0], np.cumsum(y)))
    lo = np.clip(np.arange(n) - half, 0, n)
    hi = np.clip(np.arange(n) + half + 1, 0, n)
    return (c[hi] - c[lo]) / (hi - lo)


def tokens_per_mini_epoch(proj_dir) -> float | None:
    """From train_config.json, written by the trainer at the start of each run."""
    try:
        return float(json.loads((Path(proj_dir) / TRAIN_CONFIG).read_text())["tokens_per_mini_epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _token_scale(max_tokens: float):
    if max_tokens >= 1e9:
        return 1e9, "G"
    return 1e6, "M"


def plot_run(proj_dir, out=None, title: str | None = None, log=print) -> Path:
    """Write the loss plot of proj_dir (default <proj_dir>/loss.png); return its path.

    Rows of loss_log.csv that are not numbers are left out, said through `log`."""
    from rwkvlm.atomic import check_output_path

    proj = Path(proj_dir)
    if proj.is_file():
        raise UserError(f"{proj} is a file; give its PROJ_DIR, the folder that holds {LOSS_CSV} and {TRAIN_LOG} "
                        f"(e.g. {proj.parent}).")
    if not proj.is_dir():
        raise UserError(f"no such PROJ_DIR {proj}; give the folder that holds {LOSS_CSV} and {TRAIN_LOG} "
                        f"(e.g. RWKV-v7/train_temp/out/L12-D768-x070).")
    if out is not None:
        check_output_path(out, "--out", OUTPUT)
    steps = read_loss_csv(proj / LOSS_CSV)
    if steps is not None and steps.skipped:
        log(describe_skipped(steps))
    epochs = read_train_log(proj / TRAIN_LOG)
    if steps is None and epochs is None:
        raise UserError(f"no training logs in {proj}: expected {LOSS_CSV} (one row per step) or {TRAIN_LOG} "
                        f"(one line per mini-epoch), written by train.py while training. Point plot_loss.py "
                        f"at the PROJ_DIR of a run that has trained at least one step.")
    try:
        import matplotlib
    except ImportError:
        raise UserError("matplotlib is not installed; run `pip install matplotlib` "
                        "(or `pip install -e .[plot]` in the repository root).") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from rwkvlm.atomic import atomic_path, explain_write_errors

    out = Path(out) if out is not None else proj / OUTPUT
    fig, ax = plt.subplots(figsize=(11, 6), dpi=110)
    lr_x = lr_y = None
    summary = []
    if steps is not None:
        tokens = steps.tokens
        if np.isnan(tokens).any():  # no tokens column: estimate from the steps
            tokens = steps.step.astype(np.float64)
            scale, unit, xlabel = 1.0, "", "step"
        else:
            scale, unit = _token_scale(float(tokens.max()))
            xlabel = f"tokens ({unit})"
        x = tokens / scale
        ax.plot(x, steps.loss, color="tab:blue", alpha=0.25, linewidth=0.7, label="loss (per step)")
        if len(x) > 2:
            ax.plot(x, smooth(steps.loss), color="tab:blue", linewidth=1.8, label="loss (smoothed)")
        lr_x, lr_y = x, steps.lr
        summary.append(f"step {int(steps.step[-1])}, last smoothed loss {smooth(steps.loss)[-1]:.4f}")
        val_x = val_y = None
        if steps.has_val:
            keep = np.isfinite(steps.val)
            val_x, val_y = x[keep], steps.val[keep]
        elif xlabel != "step":
            found = read_val_lines(proj / TRAIN_LOG)
            if found is not None:
                val_x, val_y = found[0] / scale, found[1]
        if val_y is not None:
            ax.plot(val_x, val_y, color="tab:orange", marker="o", markersize=4, linewidth=1.5,
                    label="validation loss", zorder=6)
            summary.append(f"last validation loss {val_y[-1]:.4f}")
        if epochs is not None:
            per_epoch = tokens_per_mini_epoch(proj_dir)
            if per_epoch and xlabel != "step":
                ex = (epochs.epoch + 0.5) * per_epoch / scale  # a mean sits mid-interval
                ax.scatter(ex, epochs.loss, color="tab:red", s=22, zorder=5, label="mini-epoch mean")
    else:
        x = epochs.epoch.astype(np.float64)
        xlabel = "mini-epoch"
        ax.plot(x, epochs.loss, color="tab:red", marker="o", markersize=4, label="mini-epoch mean")
        lr_x, lr_y = x, epochs.lr
    if epochs is not None:
        summary.append(f"mini-epoch {int(epochs.epoch[-1])} loss {epochs.loss[-1]:.4f}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if lr_y is not None and not np.isnan(lr_y).all():
        ax2 = ax.twinx()
        (line,) = ax2.plot(lr_x, lr_y, color="tab:green", linewidth=1.0, alpha=0.8, label="learning rate")
        ax2.set_ylabel("learning rate")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        handles.append(line)
        labels.append("learning rate")
    ax.legend(handles, labels, loc="upper right")
    ax.set_title((title or proj.resolve().name) + ("\n" + "; ".join(summary) if summary else ""), fontsize=10)
    fig.tight_layout()
    try:
        with explain_write_errors(out.parent, hint="write the plot elsewhere with --out FILE.png"):
            with atomic_path(out, suffix=".png") as tmp:
                fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="plot_loss.py",
        description="Plot loss (and lr) from a PROJ_DIR's loss_log.csv / train_log.txt into <PROJ_DIR>/loss.png.",
    )
    p.add_argument("proj_dir", help="the run's PROJ_DIR, e.g. train_temp/out/L12-D768-x070")
    p.add_argument("--out", default=None, help="output PNG (default <proj_dir>/loss.png)")
    p.add_argument("--title", default=None, help="plot title (default: the folder name)")
    args = p.parse_args(argv)
    out = plot_run(args.proj_dir, args.out, args.title)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from rwkvlm.errors import run_cli

    sys.exit(run_cli(main))
