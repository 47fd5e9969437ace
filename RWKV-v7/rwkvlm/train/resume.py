"""Where a run starts, and the saves it makes: exact-resume states, weight files, repairs, divergence.

Where a run starts (`find_start`): the save with the most training behind it (samples seen),
whatever the settings it was made with (rwkvlm.rundir.saves). With the settings of the state
unchanged, the run continues exactly; with --my_exit_tokens changed too, with the schedule
stretched to the new end. With other settings changed it continues from that save's weights (and
its optimiser state where the optimiser is the same kind and shape) at the same number of samples,
with a fresh warmup. A damaged save is reported and the next older one is used. A weight file a
kill left missing or damaged is rebuilt from the state that holds it (state.json's `pending`).
"""
from __future__ import annotations

import datetime
import errno
import json
import math
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from rwkvlm.atomic import WriteError, atomic_open, explain_write_errors, free_bytes, human_bytes, link_or_copy
from rwkvlm.errors import UserError
from rwkvlm.rundir.layout import FINAL, STATE_FILE, STATE_WEIGHTS, RunDir
from rwkvlm.rundir.saves import (Save, changed_settings, check_state_files, list_saves, read_state, run_fingerprint,
                                 say_changes, state_samples, state_weights)
from rwkvlm.rundir.weights import (PROJ_HINT, CorruptCheckpoint, check_complete, first_line, load_weights,
                                   save_weights)


RECENT_STEPS = 20  # a state records the mean loss of the steps before it, over this many


@dataclass
class StartPoint:
    """Where a train_stage 3 run starts."""

    step: int  # global optimiser step to start at, at this run's settings
    weights: dict | None  # state dict to load before training (None: the resume state holds them)
    source: Path | None  # file or resume dir it came from
    resume_dir: Path | None = None  # state whose optimiser (and, if exact, RNG) state is restored
    exact: bool = False  # everything continues as if never stopped
    restore_optimizer: bool = False  # the optimiser state of resume_dir is loaded
    state: dict = field(default_factory=dict)  # its state.json
    epoch_begin: int = 0  # first mini-epoch of this run
    run_start_step: int = 0  # the step this run's warmup counts from
    payload: dict | None = None  # trainer.pt of a torch resume state: {"model", "optimizer"}
    finished: bool = False  # training had already reached --my_exit_tokens


def _optimizer_carries(save: Save, cfg) -> bool:
    """Whether the optimiser state of a state folder can be loaded by this run's optimiser."""
    fp = save.fingerprint or {}
    if save.state.get("kind") == "torch":
        return not cfg.is_deepspeed
    # a DeepSpeed checkpoint is partitioned by rank and built for one ZeRO stage and precision
    return (cfg.is_deepspeed and fp.get("strategy") == cfg.strategy and fp.get("world_size") == cfg.world_size
            and fp.get("precision") == cfg.precision)


def _start_from(save: Save, cfg, payload, log) -> StartPoint:
    """The StartPoint for a chosen save."""
    saved_type = (save.fingerprint or {}).get("model_type", "x070")
    if save.fingerprint is not None and saved_type != cfg.my_testing:
        from rwkvlm.model import other_type

        raise other_type(save.path, saved_type, cfg.my_testing)
    if save.kind == "init":  # read whole already to check it (_checked)
        return StartPoint(step=0, weights=payload if payload is not None else load_weights(save.path),
                          source=save.path)
    if save.kind == "state":
        changes = changed_settings(save.fingerprint, cfg)
        if not changes:
            st = save.state
            old_exit = save.fingerprint.get("my_exit_tokens")
            if old_exit is not None and old_exit != cfg.my_exit_tokens and save.step < cfg.total_steps:
                log(f"note: --my_exit_tokens changed {old_exit} -> {cfg.my_exit_tokens}: continuing exactly from "
                    f"{save.path.name}, with the learning-rate schedule stretched to the new end.")
            return StartPoint(step=save.step, weights=payload["model"] if payload else None, source=save.path,
                              resume_dir=save.path, exact=True, restore_optimizer=True, state=st,
                              payload=payload, epoch_begin=int(st.get("epoch_begin", 0)),
                              run_start_step=int(st.get("run_start_step", save.step)))
    # the settings changed since this save: carry its weights on from the same number of samples
    weights = state_weights(save, payload) if save.kind == "state" else load_weights(save.path)
    step = save.samples // cfg.real_bsz
    start = StartPoint(step=step, weights=weights, source=save.path, epoch_begin=step // cfg.epoch_steps,
                       run_start_step=step)
    if save.kind == "state":
        carries = _optimizer_carries(save, cfg)
        start.resume_dir, start.restore_optimizer, start.payload = save.path, carries, payload
        log(f"note: the settings changed since {save.path.name} was saved "
            f"({say_changes(changed_settings(save.fingerprint, cfg))}), so it cannot continue exactly. "
            f"Carried over: its weights (step {save.step}, {save.samples} samples trained)"
            + (" and its optimiser state" if carries else
               "; the optimiser state restarts (it was saved for another optimiser set-up)")
            + f". Training continues at sample {step * cfg.real_bsz} (step {step} at the new settings, "
              f"mini-epoch {step // cfg.epoch_steps}); restarting: the warmup and the data order (windows "
              f"are drawn by the new settings from there on).")
    elif save.kind == "final" and changed_settings(save.fingerprint, cfg):
        log(f"note: continuing from the weights of {save.path.name} ({save.samples} samples trained), "
            f"saved with other settings ({say_changes(changed_settings(save.fingerprint, cfg))}); "
            f"the optimiser state and the warmup restart.")
    return start


def _repair(rd: RunDir, save: Save, log) -> None:
    """Make the weight files made from a state whole again: the rwkv-N.pth / rwkv-final.pth
    that it lists as pending (a stop can interrupt their write) and rwkv-latest.pth."""
    src = save.path / STATE_WEIGHTS
    if save.kind != "state" or not src.is_file():
        return
    for name in save.state.get("pending", []):
        try:
            check_complete(rd / name)
            continue
        except CorruptCheckpoint:
            pass
        link_or_copy(src, rd / name)
        log(f"note: {name} was missing or incomplete (a stop interrupted its write); rebuilt it from "
            f"{rd.relative(save.path)}.")
    try:
        current = rd.latest.samefile(src)
    except OSError:
        current = False
    if not current:
        link_or_copy(src, rd.latest)


def ensure_final(rd: RunDir, save: Save, cfg, weights_of, log) -> None:
    """When `save` is at or past --my_exit_tokens: rwkv-final.pth holds its weights and
    rwkv-final.json says so (writing them where a stop interrupted that, or where the run
    ended on a mini-epoch file alone)."""
    if save.kind == "final":
        return  # rwkv-final.pth itself, checked whole when it was chosen
    info = rd.read_json(rd.final_info) or {}
    if info.get("source") == rd.relative(save.path):
        try:
            check_complete(rd.final)
            return
        except CorruptCheckpoint:
            pass
    src = save.path / STATE_WEIGHTS if save.kind == "state" else save.path
    if src.is_file():
        link_or_copy(src, rd.final)
    else:
        save_weights(weights_of(), rd.final, cfg.precision)
    write_final_info(rd, save.step, save.samples, save.fingerprint or run_fingerprint(cfg),
                     source=rd.relative(save.path))
    log(f"note: wrote {FINAL} from {rd.relative(save.path)}, which had already reached --my_exit_tokens.")


def write_final_info(rd: RunDir, step: int, samples: int, fingerprint: dict, source: str) -> None:
    """rwkv-final.json, after rwkv-final.pth: which step, progress and settings it belongs to."""
    info = {"step": step, "samples": samples, "tokens": samples * fingerprint.get("ctx_len", 0),
            "weights": FINAL, "source": source, "fingerprint": fingerprint,
            "saved_at": str(datetime.datetime.now())}
    with explain_write_errors(rd.path, hint=PROJ_HINT, kept=f"The file {rd.final_info.name} was not changed"):
        with atomic_open(rd.final_info, "w") as f:
            json.dump(info, f, indent=1)


def _checked(save: Save):
    """Check the save's files; returns trainer.pt's content for torch states, and rwkv-init.pth's
    weights (read whole to check it; _start_from uses them), else None."""
    if save.kind == "state":
        return check_state_files(save)
    if save.kind == "init":
        return load_weights(save.path)
    check_complete(save.path)
    return None


def healthy(save: Save, best: float | None, vocab_size: int) -> bool:
    """A save whose logged loss shows training had not yet blown up.

    Unknown losses (rwkv-init.pth, saves of earlier versions) count as healthy; a
    known one must be finite, no worse than a uniform guess over the vocabulary
    plus one, and within twice the best loss of the saves (plus 0.5).
    """
    if save.loss is None:
        return True
    if not math.isfinite(save.loss):
        return False
    limit = math.log(vocab_size) + 1.0
    if best is not None:
        limit = min(limit, 2.0 * best + 0.5)
    return save.loss <= limit


def last_healthy(saves: list[Save], vocab_size: int) -> tuple[Save | None, list[Save]]:
    """The newest healthy save, and the saves newer than it."""
    known = [s.loss for s in saves if s.loss is not None and math.isfinite(s.loss)]
    best = min(known) if known else None
    for i, s in enumerate(saves):
        if healthy(s, best, vocab_size):
            return s, saves[:i]
    return None, saves


def write_divergence(rd: RunDir, cfg, step: int, what: str) -> tuple[Save | None, list[Save]]:
    """Rank 0, when a run diverges: find the last healthy save and record it in diverged.json."""
    saves = list_saves(rd, cfg)
    good, bad = last_healthy(saves, cfg.vocab_size)
    info = {"step": step, "what": what, "lr_init": cfg.lr_init, "warmup_steps": cfg.warmup_steps,
            "healthy": rd.relative(good.path) if good else None,
            "newer": [rd.relative(s.path) for s in bad], "saved_at": str(datetime.datetime.now())}
    with atomic_open(rd.diverged, "w") as f:
        json.dump(info, f, indent=1)
    return good, bad


def _match_save(rd: RunDir, saves: list[Save], spec: str) -> Save:
    """The save that --resume_from names: step-N (or N) for a state, a weight file's name, or a path."""
    spec = spec.strip()
    want = None
    if re.fullmatch(r"(step-)?\d+", spec):
        want = rd.state_dir(int(spec.removeprefix("step-")))
    else:
        p = Path(spec)
        want = p if p.is_absolute() or p.exists() else rd / spec
    for s in saves:
        if s.path.resolve() == Path(want).resolve():
            return s
    listing = ", ".join(rd.relative(s.path) for s in saves[:12]) or "none"
    raise UserError(f"--resume_from {spec!r} is not a save in PROJ_DIR {rd.path.resolve()}. The saves there, "
                    f"newest first: {listing}.")


def _set_aside_newer(rd: RunDir, saves: list[Save], chosen: Save, why: str, log) -> None:
    """Move the saves with more training than `chosen` out of the way, so they no longer win."""
    newer = [s for s in saves if s.order > chosen.order and s.kind != "init"]
    if not newer:
        return
    paths = [s.path for s in newer]
    if any(s.kind == "final" for s in newer):
        paths.append(rd.final_info)
    if rd.latest.exists():
        paths.append(rd.latest)
    folder = rd.set_aside(paths, why)
    log(f"note: moved the {len(newer)} newer save(s) ({', '.join(rd.relative(s.path) for s in newer)}) to "
        f"{folder}, so that this and later runs continue from {rd.relative(chosen.path)}; delete that folder "
        f"when you no longer need them.")


def _after_divergence(rd: RunDir, cfg, saves: list[Save], log) -> Save | None:
    """The save to continue from after a divergence recorded in diverged.json (None: no record)."""
    info = rd.read_json(rd.diverged)
    if info is None:
        return None
    try:
        lr0, warm0, step = float(info["lr_init"]), int(info["warmup_steps"]), int(info["step"])
    except (KeyError, TypeError, ValueError):
        return None
    good = next((s for s in saves if info.get("healthy") and rd.relative(s.path) == info["healthy"]), None)
    if good is None:
        good, _ = last_healthy(saves, cfg.vocab_size)
    if good is None:
        return None
    if cfg.lr_init >= lr0 and cfg.warmup_steps <= warm0:
        raise UserError(
            f"the last run diverged at step {step} ({info.get('what', 'the loss was not finite')}) with --lr_init "
            f"{lr0:g} and --warmup_steps {warm0}; the saves after {good.describe(rd)} hold blown-up weights. "
            f"Lower --lr_init (e.g. {lr0 / 2:g}) or raise --warmup_steps and run again: the run then continues "
            f"from {rd.relative(good.path)}. To continue from another save anyway, pass --resume_from <save> "
            f"(e.g. --resume_from {rd.relative(saves[0].path) if saves else 'step-N'}).")
    log(f"note: the last run diverged at step {step}; with --lr_init {cfg.lr_init:g} (was {lr0:g}) and "
        f"--warmup_steps {cfg.warmup_steps} (was {warm0}) it continues from the last healthy save, "
        f"{good.describe(rd)}.")
    return good


def _load_model_path(cfg) -> Path:
    path = Path(cfg.load_model)
    if not path.is_file():
        raise UserError(f"--load_model {cfg.load_model!r} does not exist; use \"0\" to pick the newest "
                        f"checkpoint in PROJ_DIR automatically.")
    return path


def shapes_from_load_model(cfg, log=print):
    """For --load_model FILE: cfg with the model shapes of that file (n_layer, n_embd, head_size,
    vocab_size; for x070 the LoRA sizes and whether layer 0 holds att.v0/v1/v2), read off its
    tensors (rwkvlm.model.config_from_state_dict), with a line saying what was found and a note
    where they differ from the flags given (the file wins). Any other cfg is returned as it is.

    Called before anything is written; a file that is not a consistent state dict of MODEL_TYPE
    (--my_testing) raises UserError, naming both types for a checkpoint of the other one."""
    import dataclasses

    from rwkvlm.model import config_from_state_dict

    if cfg.load_model in ("", "0"):
        return cfg
    path = _load_model_path(cfg)
    try:
        sd = load_weights(path, mmap=True)
    except CorruptCheckpoint as e:
        raise UserError(f"--load_model: {e}") from None
    mcfg = config_from_state_dict(sd, f"--load_model {path}", expect=cfg.my_testing)
    del sd
    found = cfg.model_config()
    x070 = mcfg.model_type == "x070"
    formula = "" if not x070 or mcfg.lora_is_formula else \
        f" (not the formula's {'/'.join(map(str, mcfg.formula_lora_sizes))}: read from the file)"
    layer0 = "" if not x070 or mcfg.layer0_v else \
        "; no blocks.0.att.v0/v1/v2 (the released layout: layer 0 does not use them)"
    log(f"--load_model {path}: {mcfg.family} {mcfg.describe()}{formula}, vocab {mcfg.vocab_size}{layer0}; the "
        f"model is built to match.")
    checks = [("N_LAYER (--n_layer)", found.n_layer, mcfg.n_layer), ("N_EMBD (--n_embd)", found.n_embd, mcfg.n_embd),
              ("--head_size", found.head_size, mcfg.head_size), ("--vocab_size", found.vocab_size, mcfg.vocab_size)]
    if x070:
        checks.append(("--lora_dims", "/".join(map(str, found.lora_sizes)), "/".join(map(str, mcfg.lora_sizes))))
    diffs = [f"{flag} {a} -> {b}" for flag, a, b in checks
             if a != b and (flag != "--lora_dims" or cfg.lora_dims or found.n_embd == mcfg.n_embd)]
    if diffs:
        log(f"note: the shapes of --load_model {path.name} win over the flags given: {', '.join(diffs)}.")
    layout = {} if not x070 else dict(
        lora_dims="" if mcfg.lora_is_formula else "/".join(map(str, mcfg.lora_sizes)), layer0_v=int(mcfg.layer0_v))
    return dataclasses.replace(cfg, n_layer=mcfg.n_layer, n_embd=mcfg.n_embd, head_size=mcfg.head_size,
                               vocab_size=mcfg.vocab_size, **layout)


def find_start(cfg, log=print) -> StartPoint:
    """Pick where the run starts (see the module docstring) and load its weights.

    Damaged or truncated saves are skipped with a warning naming them; the next
    older save is used instead. Writes in PROJ_DIR only to repair or set aside
    saves (call it holding the PROJ_DIR lock).
    """
    rd = RunDir(cfg.proj_dir)
    if cfg.load_model not in ("", "0"):
        path = _load_model_path(cfg)
        trained = [s for s in list_saves(rd, cfg) if s.kind != "init"] if rd.path.is_dir() else []
        if trained:
            log(f"note: PROJ_DIR {rd.path} already holds saves of a run (newest: {rd.relative(trained[0].path)}), "
                f"so this run continues from them (the auto-resume of the tutorial) and does not load "
                f"--load_model {path} again. To start from {path.name} afresh, use a new PROJ_DIR.")
        else:
            try:
                sd = load_weights(path)
            except CorruptCheckpoint as e:
                raise UserError(f"--load_model: {e}") from None
            step = cfg.epoch_begin * cfg.epoch_steps
            return StartPoint(step=step, weights=sd, source=path, epoch_begin=cfg.epoch_begin, run_start_step=step)

    saves = list_saves(rd, cfg)
    if not saves:
        raise UserError(
            f"no rwkv-init.pth and no rwkv-N.pth checkpoint in PROJ_DIR {rd.path.resolve()}. Run "
            f"`sh demo-training-prepare.sh` first (with the same N_LAYER, N_EMBD and PROJ_DIR as the run "
            f"script), or point PROJ_DIR at the folder that holds your checkpoints."
        )
    chosen, why = None, None
    if cfg.resume_from:
        chosen = _match_save(rd, saves, cfg.resume_from)
        why = f"--resume_from {cfg.resume_from}: these saves had more training than {rd.relative(chosen.path)}."
    else:
        chosen = _after_divergence(rd, cfg, saves, log)
        if chosen is not None:
            why = (f"the run diverged after {rd.relative(chosen.path)}; these saves came later and hold "
                   f"blown-up weights (see ../{rd.diverged.name} there).")
    if chosen is not None:
        try:
            payload = _checked(chosen)
        except CorruptCheckpoint as e:
            raise UserError(f"the save to continue from, {rd.relative(chosen.path)}, is damaged ({e}). Pass "
                            f"--resume_from with another save.") from None
        start = _start_from(chosen, cfg, payload, log)
        _set_aside_newer(rd, saves, chosen, why, log)
        rd.diverged.unlink(missing_ok=True)  # after the set-aside: a stop in between repeats both
        return _finish(rd, chosen, start, cfg, log)

    for save in saves:
        try:
            payload = _checked(save)
            start = _start_from(save, cfg, payload, log)
        except CorruptCheckpoint as e:
            what = "resume state" if save.kind == "state" else "checkpoint"
            warnings.warn(f"{what} {save.path} is corrupted or incomplete ({e}); falling back to the previous "
                          f"save. Delete or move it if this repeats.", stacklevel=2)
            continue
        return _finish(rd, save, start, cfg, log)
    raise UserError(
        f"every checkpoint in {rd.path.resolve()} is unreadable (see the warnings above). Restore one from a "
        f"backup or re-run `sh demo-training-prepare.sh` to start over."
    )


def _finish(rd: RunDir, save: Save, start: StartPoint, cfg, log) -> StartPoint:
    """Repair what a stop left unfinished around the chosen save; note a finished run."""
    weights_of = lambda: start.weights if start.weights is not None else state_weights(save, start.payload)  # noqa: E731
    _repair(rd, save, log)
    if start.step >= cfg.total_steps and save.kind != "init":
        ensure_final(rd, save, cfg, weights_of, log)
        start.finished = True
    return start


def save_resume_state(rd: RunDir, step: int, state: dict, write_payload, keep: int, is_rank0: bool,
                      barrier=lambda: None) -> Path:
    """Write an exact-resume state for `step`; keep the newest `keep` states.

    `write_payload(directory)` writes the weights, model and optimiser files
    (collective for DeepSpeed: every rank calls it). state.json is written
    last, by rank 0. Pruning ranks states by the training behind them and never
    removes the state just written.
    """
    d = rd.state_dir(step)
    earlier = [p for _, p in rd.state_dirs() if p != d]
    kept = (f"The resume state {rd.relative(d)} was not written (its partial files were removed); the saves "
            f"already there are untouched" + (f" (newest state: {rd.relative(earlier[0])})" if earlier else "")
            + ", and re-running the script continues from the newest of them")
    try:
        with explain_write_errors(rd.path, hint=PROJ_HINT, kept=kept):
            if is_rank0:
                if d.exists():
                    shutil.rmtree(d)
                d.mkdir(parents=True)
            barrier()
            write_payload(d)
            barrier()
            if is_rank0:
                with atomic_open(d / STATE_FILE, "w") as f:
                    json.dump(state, f, indent=1)
    except BaseException as e:
        if is_rank0 and d.is_dir() and not (d / STATE_FILE).is_file():
            shutil.rmtree(d, ignore_errors=True)  # incomplete: never used, and it takes space
        if _torch_write_failed(e):
            raise _torch_write_error(e, rd.path, kept) from e
        raise
    if is_rank0:
        prune_states(rd, d, keep)
    barrier()
    return d


def _torch_write_failed(e: BaseException) -> bool:
    """Whether `e` is how torch.save (given a path, as DeepSpeed calls it) reports a failed
    write: a RuntimeError of its zip writer, where Python would raise OSError(ENOSPC)."""
    msg = str(e)
    return isinstance(e, RuntimeError) and not isinstance(e, WriteError) and (
        "inline_container" in msg or "PytorchStreamWriter" in msg or "file write failed" in msg)


def _torch_write_error(e: RuntimeError, folder: Path, kept: str) -> WriteError:
    free = free_bytes(folder)
    space = f" ({human_bytes(free)} free)" if free is not None else ""
    return WriteError(
        f"cannot write in {Path(folder).absolute()}: torch reported a failed write ({first_line(e)[:160]}), "
        f"which most often means the disk is full{space}. {kept}. Free some space there, "
        f"or {PROJ_HINT}.", code=errno.ENOSPC, folder=folder)


def prune_states(rd: RunDir, newest: Path, keep: int) -> None:
    """Keep `newest` and the keep - 1 other complete states with the most training behind them."""
    ranked = []
    for step, d in rd.state_dirs():
        if d == newest:
            continue
        try:
            ranked.append((state_samples(read_state(d, step)), step, d))
        except CorruptCheckpoint:
            ranked.append((-1, step, d))  # damaged: the first to go
    ranked.sort(reverse=True)
    for _, _, d in ranked[max(0, keep - 1):]:
        shutil.rmtree(d, ignore_errors=True)


def make_weight_files(rd: RunDir, state_dir: Path, names) -> None:
    """rwkv-N.pth / rwkv-final.pth / rwkv-latest.pth from a state's weights.pth (hard links
    where the file system allows, so they take no extra space)."""
    kept = (f"The resume state {rd.relative(state_dir)} is complete: the next start makes "
            f"{', '.join(names)} from it")
    with explain_write_errors(rd.path, hint=PROJ_HINT, kept=kept):
        for name in names:
            link_or_copy(state_dir / STATE_WEIGHTS, rd / name)
