"""train_log.txt: a header line for every run, then one line per mini-epoch.

    # 2026-12-01 10:00:00 new run at step 0 (mini-epoch 0) from rwkv-init.pth, to step 36: n_layer=2 ...
    0 5.123456 167.8901 0.00300000 2026-12-01 10:00:05.123456 0
    # 2026-12-01 10:02:00 resumed exactly at step 18 (mini-epoch 1) from resume/step-000000018, to step 36: ...
    1 4.012345 55.2701 0.00200000 2026-12-01 10:02:04.654321 1

The mini-epoch lines keep the original trainer's format, `epoch loss ppl lr
datetime epoch_in_run` (written by rwkvlm.train.lit). A header line starts with '#'
(the original trainer writes `str(vars(args))` there): readers of mini-epoch
lines, which take the first field for an integer, skip it. So do they skip the
line of each validation (--val_every_steps), which starts with the word `val`:

    val step 40 tokens 10240 val_loss 3.215400 val_ppl 24.9153 windows 16 seconds 0.42 2026-12-03 10:00:09.123456 A header is
written by rank 0 when a run starts, after the log was cut back to the start
point (rwkvlm.train.logs.TrainLogs): a resumed run's header follows the lines that
its state recorded, so no mini-epoch line is ever repeated.
"""
from __future__ import annotations

import datetime
import re
import shlex

from rwkvlm.rundir.layout import VAL_MARK, validation_fields

HEADER_MARK = "#"
_AT_STEP = re.compile(r" at step (\d+)\b")

# the settings a header names, in this order (the full set is in train_config.json of the latest run)
HEADER_KEYS = ("n_layer", "n_embd", "head_size", "vocab_size", "ctx_len", "micro_bsz", "devices", "num_nodes",
               "real_bsz", "mini_epoch_samples", "epoch_steps", "my_exit_tokens", "total_steps", "lr_init",
               "lr_final", "warmup_steps", "beta1", "beta2", "adam_eps", "weight_decay", "grad_clip",
               "precision", "strategy", "grad_cp", "epoch_save", "save_every_steps", "save_every_minutes",
               "data_file", "magic_prime", "random_seed")


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return shlex.quote(str(v)) if isinstance(v, str) else str(v)


def header_line(cfg, start, rd, now=None, extra=None) -> str:
    """The line that opens a run in train_log.txt: how it starts (a new run, an exact resume or a
    continuation from weights), at which step, from which save, and the main settings (then the
    `extra` {key: value} items: the data's kind, a mix's files, the validation set)."""
    epoch_steps = max(1, int(getattr(cfg, "epoch_steps", 1) or 1))
    if start.exact:
        how = "resumed exactly"
    elif start.step == 0:
        how = "new run"
    else:
        how = "continued (not exactly: weights carried over)"
    src = rd.relative(start.source) if start.source is not None else "nothing"
    settings = []
    for key in HEADER_KEYS:
        try:
            v = getattr(cfg, key)
        except (AttributeError, TypeError, ValueError):
            continue
        if v is not None and not callable(v):
            settings.append(f"{key}={_value(v)}")
    settings += [f"{k}={_value(v)}" for k, v in (extra or {}).items()]
    when = f"{now or datetime.datetime.now():%Y-%m-%d %H:%M:%S}"
    total = getattr(cfg, "total_steps", "?")
    return (f"{HEADER_MARK} {when} {how} at step {start.step} (mini-epoch {start.step // epoch_steps}) "
            f"from {src}, to step {total}: " + " ".join(settings) + "\n")


def is_header(line: str) -> bool:
    return line.lstrip().startswith(HEADER_MARK)


def validation_line(step: int, tokens: int, loss: float, windows: int, seconds: float, now=None) -> str:
    """train_log.txt's line for one validation (see the module's docstring)."""
    import math

    ppl = math.exp(min(loss, 50)) if math.isfinite(loss) else loss
    return (f"{VAL_MARK} step {step} tokens {tokens} val_loss {loss:.6f} val_ppl {ppl:.4f} windows {windows} "
            f"seconds {seconds:.2f} {now or datetime.datetime.now()}\n")


def is_validation(line: str) -> bool:
    return line.lstrip().startswith(VAL_MARK + " ")


def header_step(line: str) -> int | None:
    """The step at which the run of a header line started (None: not a header, or none named)."""
    if not is_header(line):
        return None
    m = _AT_STEP.search(line)
    return int(m.group(1)) if m else None


def before_start(line: str, first_epoch: int, step: int) -> bool:
    """Whether a train_log.txt line belongs before a run that starts at `step` (mini-epoch
    `first_epoch`) without a state's line count: mini-epochs before it, and headers of runs that
    started before it (a run that started there or later left no work behind). Raises ValueError
    for a line that is neither (left alone by the caller)."""
    if is_header(line):
        s = header_step(line)
        return True if s is None else s < step
    if is_validation(line):  # computed after its step: it belongs to a run that started there or later
        v = validation_fields(line)
        return True if v is None else v[0] <= step
    return int(line.split()[0]) < first_epoch


def epoch_lines(lines) -> list[str]:
    """The mini-epoch lines of train_log.txt's lines (headers, validation and blank lines left out)."""
    return [ln for ln in lines if ln.strip() and not is_header(ln) and not is_validation(ln)]
