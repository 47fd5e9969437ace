"""The weights that the tools (chat.py, evaluate.py, export_hf.py) load for the path they are given.

A weight file as it is; a PROJ_DIR: its newest weights by training progress (saves.list_saves);
an exact-resume state (resume/step-N/, or a file in it): that state's weights.
"""
from __future__ import annotations

from pathlib import Path

from rwkvlm.errors import UserError
from rwkvlm.rundir.layout import (FINAL, LATEST, RESUME, STATE_FILE, STATE_WEIGHTS, TRAINER_FILE, VOCAB, RunDir,
                                  state_folder_of)
from rwkvlm.rundir.saves import Save, list_saves, read_state, state_weights
from rwkvlm.rundir.weights import CorruptCheckpoint, load_trainer_state, load_weights


def _tools_cfg(rd: RunDir):
    """What list_saves needs to rank rwkv-N.pth: the mini-epoch size of the latest run
    (train_config.json), else the recipe's."""
    from types import SimpleNamespace

    info = rd.read_json(rd.train_config) or {}
    try:
        samples = int(info["mini_epoch_samples"])
        steps = int(info.get("epoch_steps", 0))
    except (KeyError, TypeError, ValueError):
        from rwkvlm.recipe import MINI_EPOCH_SAMPLES

        samples, steps = MINI_EPOCH_SAMPLES, 0
    return SimpleNamespace(mini_epoch_samples=samples, epoch_steps=steps)


def _same_file(a: Path, b: Path, copies: bool = False) -> bool:
    """`a` is the file `b` (a hard link of it); with copies=True, for a weight file made from a
    state's weights.pth `b`, also a copy of the same size made no earlier than it (where the file
    system copies instead of linking)."""
    try:
        if a.samefile(b):
            return True
        sa, sb = a.stat(), b.stat()
    except OSError:
        return False
    return copies and sa.st_size == sb.st_size and sa.st_mtime_ns >= sb.st_mtime_ns


def _weights_file(rd: RunDir, save: Save) -> Path:
    """The file that holds a save's weights, by its best-known name: for a state, rwkv-final.pth,
    rwkv-N.pth or rwkv-latest.pth when one of them is its weights.pth, else weights.pth itself
    (or the state folder, for states of earlier versions that have no weights.pth)."""
    if save.kind != "state":
        return save.path
    w = save.path / STATE_WEIGHTS
    if not w.is_file():
        return save.path
    for alias in (rd.final, *(q for _, q in rd.epoch_checkpoints()), rd.latest):
        if alias.is_file() and _same_file(alias, w, copies=True):
            return alias
    return w


def _describe_for_tools(rd: RunDir, save: Save) -> str:
    if save.kind == "state":
        return f"the exact-resume state {rd.relative(save.path)}: step {save.step}, {save.samples} samples trained"
    if save.kind == "final":
        return f"the end of training: step {save.step}, {save.samples} samples trained"
    return f"after mini-epoch {save.epoch}: {save.samples} samples trained"


def _no_weights(rd: RunDir) -> UserError:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in rd.path.iterdir() if not p.name.startswith("."))
    names += [f"{rd.relative(d)}/ (incomplete: no {STATE_FILE})" for _, d in rd.state_dirs(complete=False)]
    listing = ", ".join(names[:16]) + (f" and {len(names) - 16} more" if len(names) > 16 else "") or "nothing"
    init = (f" {rd.init.name} there is the untrained initial model: pass that file by name to try it anyway."
            if rd.init.is_file() else "")
    return UserError(
        f"{rd.path} holds no trained weights: no rwkv-N.pth, {rd.latest.name}, {FINAL} or complete exact-resume "
        f"state (resume/step-N/). It holds: {listing}.{init} Training writes them into its PROJ_DIR (sh "
        f"demo-training-run.sh): {rd.latest.name} at every exact-resume save (each mini-epoch's end, every "
        f"--save_every_steps N steps or --save_every_minutes M minutes, and when you stop it with Ctrl-C), "
        f"rwkv-N.pth every EPOCH_SAVE mini-epochs, {FINAL} at --my_exit_tokens. Pass the PROJ_DIR that "
        f"training used, or one of those files.")


def newest_weights(proj) -> tuple[Path, str]:
    """The weight file in PROJ_DIR with the most training behind it (list_saves' ranking: the
    exact-resume states, rwkv-final.pth and rwkv-N.pth), and a line saying what was picked.

    An rwkv-final.pth without rwkv-final.json counts as the newest (its name says training
    ended); an rwkv-latest.pth whose state is gone counts by its modification time. A PROJ_DIR
    with nothing but rwkv-init.pth (untrained) raises UserError, as does one with nothing.
    """
    rd = RunDir(proj)
    saves = [s for s in list_saves(rd, _tools_cfg(rd)) if s.kind != "init"]
    ranked = [(_weights_file(rd, s), _describe_for_tools(rd, s)) for s in saves]
    if rd.final.is_file() and not any(s.kind == "final" for s in saves) and \
            not any(_same_file(rd.final, f) for f, _ in ranked):
        ranked.insert(0, (rd.final, f"{FINAL} without {rd.final_info.name}: taken for the end of training"))
    if rd.latest.is_file() and not any(_same_file(rd.latest, f) for f, _ in ranked):
        newer = not ranked or rd.latest.stat().st_mtime_ns > ranked[0][0].stat().st_mtime_ns
        if newer:
            ranked.insert(0, (rd.latest, "its exact-resume state is gone; newer than the other weights by date"))
    if not ranked:
        raise _no_weights(rd)
    path, why = ranked[0]
    older = [rd.relative(f) for f, _ in ranked[1:4]]
    note = (f"{rd.path}: using {rd.relative(path)}, the newest weights by training progress ({why})"
            + (f"; older: {', '.join(older)}" if older else "") + ".")
    info = rd.read_json(rd.diverged)
    if info is not None and info.get("healthy"):
        note += (f" Note: the last run diverged ({rd.diverged.name}); its last healthy save is {info['healthy']}: "
                 f"pass that to test it instead.")
    return path, note


def find_weights(path) -> tuple[Path, str | None]:
    """What chat.py and evaluate.py load for the path given: a weight file as it is; a PROJ_DIR:
    its newest weights (newest_weights); an exact-resume state (resume/step-N/, or a file in it
    such as trainer.pt): that state's weights. Returns the path to load (a weight file, or the
    folder of a state of an earlier version without weights.pth) and a line saying what was
    picked (None for a weight file given by name). A path that does not exist is returned as it is."""
    p = Path(path)
    d = state_folder_of(p)
    if d is not None:
        return _state_weights_for_tools(d, p)
    if p.is_dir():
        if p.name == RESUME and p.parent.is_dir():
            raise UserError(f"{p} is the folder of the exact-resume states; pass its PROJ_DIR {p.parent} (the "
                            f"newest weights there are used) or one state, e.g. {p}/step-N.")
        return newest_weights(p)
    return p, None


def _state_weights_for_tools(d: Path, given: Path) -> tuple[Path, str | None]:
    proj = d.parent.parent
    if not d.is_dir():
        return given, None  # the caller reports the missing path
    step = int(d.name.removeprefix("step-"))
    use = f"Use {proj / LATEST} (the weights of the newest state) or pass the PROJ_DIR {proj}."
    if not (d / STATE_FILE).is_file():
        raise UserError(f"{d} is an incomplete exact-resume state (no {STATE_FILE}: its save was interrupted), "
                        f"so its weights may be partial. {use}")
    try:
        state = read_state(d, step)
    except CorruptCheckpoint as e:
        raise UserError(f"cannot use the exact-resume state {d}: {e}. {use}") from None
    w = d / STATE_WEIGHTS
    if w.is_file():
        if given.resolve() == w.resolve():
            return w, None
        return w, (f"{given} belongs to the exact-resume state {d.name} (step {state['step']}); using that state's "
                   f"weights, {w}" + (f" (the same as {proj / LATEST})" if _same_file(proj / LATEST, w, copies=True) else "")
                   + ".")
    return d, f"{given}: using the model weights saved in the exact-resume state {d} (step {state['step']})."


def vocab_file_for(path) -> Path | None:
    """The character vocabulary (PROJ_DIR/vocab.json, rwkvlm.data.charvocab) of the weights at
    `path` (what find_weights picked): beside the file, or, for a state's file or folder, in its
    PROJ_DIR. None when there is none: the World vocabulary."""
    p = Path(path)
    d = state_folder_of(p)
    folder = d.parent.parent if d is not None else (p if p.is_dir() else p.parent)
    f = folder / VOCAB
    return f if f.is_file() else None


def load_tool_weights(path) -> dict:
    """The state dict of what find_weights picked: a weight file, or a state folder of an earlier
    version (its trainer.pt model or DeepSpeed module)."""
    p = Path(path)
    if not p.is_dir():
        return load_weights(p)
    payload = load_trainer_state(p / TRAINER_FILE) if (p / TRAINER_FILE).is_file() else None
    return state_weights(Save("state", p, 0), payload)
