"""Checkpoints: the rwkv-*.pth weight files and the exact-resume states.

Weight files (the spec's format): `rwkv-init.pth`, `rwkv-<N>.pth` (N = the
mini-epoch just finished) and `rwkv-final.pth`, each a plain state dict that
loads with `torch.load(weights_only=True)`.

Exact-resume states live in `<proj_dir>/resume/step-<step>/`: `state.json`
(written last: a state without it is incomplete and ignored) plus either
`trainer.pt` (model and optimiser state, for torch optimisers) or `ds/` (a
DeepSpeed checkpoint). `rwkv-final.json`, written after rwkv-final.pth, holds
the step and settings it belongs to: a re-run with the same settings then has
nothing to do. Every file is written under a temporary name and renamed when
complete.
"""
from __future__ import annotations

import datetime
import json
import pickle
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rwkvlm.atomic import atomic_open, atomic_torch_save
from rwkvlm.errors import UserError

RESUME_DIR = "resume"
FINAL_WEIGHTS = "rwkv-final.pth"
FINAL_INFO = "rwkv-final.json"  # written after rwkv-final.pth: its step and run settings
STATE_FILE = "state.json"
_EPOCH_RE = re.compile(r"^rwkv-(\d+)\.pth$")
_STEP_RE = re.compile(r"^step-(\d+)$")


SAVE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}


def save_weights(sd: dict, path, precision: str) -> None:
    """Write a weight file (rwkv-*.pth): a plain CPU state dict in the training precision, crash-safely."""
    dtype = SAVE_DTYPES[precision]
    atomic_torch_save({k: v.detach().to("cpu", dtype=dtype if v.is_floating_point() else v.dtype).contiguous()
                       for k, v in sd.items()}, path)


class CorruptCheckpoint(Exception):
    """A checkpoint file that cannot be read (truncated, damaged, not a checkpoint)."""


def load_weights(path) -> dict:
    """Load a state dict with weights_only=True.

    Raises UserError for a file that needs arbitrary unpickling (refused: it
    could run code) and CorruptCheckpoint for a damaged or truncated file.
    """
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Unsupported global" in msg or "Unsupported class" in msg:
            raise UserError(
                f"{path} needs arbitrary unpickling to load (it stores Python objects, not just tensors), "
                f"so it was refused: unpickling can run code. If you trust this file, convert it once to a "
                f"plain state dict: python -c \"import torch; sd=torch.load('{path}', weights_only=False); "
                f"torch.save({{k: v for k, v in sd.items()}}, '{path}')\""
            ) from None
        raise CorruptCheckpoint(f"{path}: {msg.splitlines()[0] if msg else type(e).__name__}") from None
    except Exception as e:  # torch raises many types for damaged files
        raise CorruptCheckpoint(f"{path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CorruptCheckpoint(f"{path}: not a state dict of tensors")
    return obj


def load_trainer_state(path) -> dict:
    """Load a resume state's trainer.pt ({"model": state dict, "optimizer": state dict})."""
    path = Path(path)
    if not path.is_file():
        raise CorruptCheckpoint(f"{path}: missing")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for damaged files
        raise CorruptCheckpoint(f"{path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(obj, dict) or "model" not in obj or "optimizer" not in obj:
        raise CorruptCheckpoint(f"{path}: not a resume state")
    return obj


def check_weights_fit(sd: dict, model, path) -> None:
    """Raise UserError when a state dict does not fit the model's shapes and names."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    extra = sorted(set(sd) - set(own))
    wrong = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    if not (missing or extra or wrong):
        return
    got = describe_weights(sd)
    want = describe_weights(own)
    detail = []
    if wrong:
        k, a, b = wrong[0]
        detail.append(f"{k} has shape {a}, the model expects {b}")
    if missing:
        detail.append(f"missing {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if extra:
        detail.append(f"unexpected {extra[0]}" + (f" and {len(extra) - 1} more" if len(extra) > 1 else ""))
    raise UserError(
        f"{path} does not fit this model ({'; '.join(detail)}). The file looks like {got}; the script asks for "
        f"{want}. Make N_LAYER / N_EMBD / --vocab_size / --head_size the same in demo-training-prepare.sh and "
        f"demo-training-run.sh, or use a new PROJ_DIR and re-run the prepare script."
    )


def describe_weights(sd: dict) -> str:
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    emb = sd.get("emb.weight")
    if emb is None:
        return "not an RWKV-7 model"
    return f"N_LAYER={len(layers)} N_EMBD={emb.shape[1]} vocab_size={emb.shape[0]}"


def epoch_checkpoints(proj_dir) -> list[tuple[int, Path]]:
    """rwkv-N.pth files in proj_dir, newest (largest N) first."""
    out = []
    for p in Path(proj_dir).glob("rwkv-*.pth"):
        m = _EPOCH_RE.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out, reverse=True)


def resume_states(proj_dir) -> list[tuple[int, Path]]:
    """Complete exact-resume states (their state.json exists), newest first."""
    root = Path(proj_dir) / RESUME_DIR
    out = []
    if root.is_dir():
        for d in root.iterdir():
            m = _STEP_RE.match(d.name)
            if m and (d / STATE_FILE).is_file():
                out.append((int(m.group(1)), d))
    return sorted(out, reverse=True)


@dataclass
class StartPoint:
    """Where a train_stage 3 run starts."""

    step: int  # global optimiser step to start at
    weights: dict | None  # state dict to load before training (None: the resume state holds them)
    source: Path | None  # file or resume dir it came from
    resume_dir: Path | None = None  # exact-resume state to restore in on_train_start
    state: dict = field(default_factory=dict)  # its state.json
    epoch_begin: int = 0  # first mini-epoch of this run
    payload: dict | None = None  # trainer.pt of a torch resume state: {"model", "optimizer"}


def run_fingerprint(cfg) -> dict:
    """Settings an exact resume must share with the run that saved the state."""
    return {
        "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "vocab_size": cfg.vocab_size,
        "head_size": cfg.head_size, "ctx_len": cfg.ctx_len, "micro_bsz": cfg.micro_bsz,
        "world_size": cfg.world_size, "magic_prime": cfg.magic_prime, "precision": cfg.precision,
        "deepspeed": cfg.is_deepspeed, "my_exit_tokens": cfg.my_exit_tokens,
        "mini_epoch_samples": cfg.mini_epoch_samples,
    }


def save_final_info(proj_dir, step: int, cfg) -> None:
    """Rank 0, after rwkv-final.pth: rwkv-final.json says which step and settings it belongs
    to, so that a re-run of the same script finds the run finished instead of training the
    tail again from an older save."""
    info = {"step": step, "tokens": step * cfg.tokens_per_step, "weights": FINAL_WEIGHTS,
            "fingerprint": run_fingerprint(cfg), "saved_at": str(datetime.datetime.now())}
    with atomic_open(Path(proj_dir) / FINAL_INFO, "w") as f:
        json.dump(info, f, indent=1)


def _finished_run(proj: Path, cfg) -> StartPoint | None:
    """The finished run in proj: rwkv-final.pth with rwkv-final.json for these very settings."""
    try:
        info = json.loads((proj / FINAL_INFO).read_text())
        step = int(info["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    weights = proj / FINAL_WEIGHTS
    if info.get("fingerprint") != run_fingerprint(cfg) or step < cfg.total_steps or not weights.is_file():
        return None
    return StartPoint(step=step, weights=None, source=weights)


def find_start(cfg, log=print) -> StartPoint:
    """Pick the newest complete save in cfg.proj_dir (or --load_model) and load its weights.

    Corrupted or truncated files are skipped with a warning naming them; the
    next older save is used instead.
    """
    proj = Path(cfg.proj_dir)
    if cfg.load_model not in ("", "0"):
        path = Path(cfg.load_model)
        if not path.is_file():
            raise UserError(f"--load_model {cfg.load_model!r} does not exist; use \"0\" to pick the newest "
                            f"checkpoint in PROJ_DIR automatically.")
        try:
            sd = load_weights(path)
        except CorruptCheckpoint as e:
            raise UserError(f"--load_model: cannot read {e}. Use another checkpoint.") from None
        return StartPoint(step=cfg.epoch_begin * cfg.epoch_steps, weights=sd, source=path,
                          epoch_begin=cfg.epoch_begin)

    done = _finished_run(proj, cfg)
    if done is not None:
        return done
    candidates = []  # (step, priority, kind, path, extra): extra is the state.json or the mini-epoch N
    fp = run_fingerprint(cfg)
    for step, d in resume_states(proj):
        try:
            state = json.loads((d / STATE_FILE).read_text())
        except (OSError, ValueError) as e:
            warnings.warn(f"ignoring resume state {d}: unreadable {STATE_FILE} ({e})", stacklevel=2)
            continue
        if state.get("fingerprint") != fp:
            changed = {k: (state.get("fingerprint", {}).get(k), v) for k, v in fp.items()
                       if state.get("fingerprint", {}).get(k) != v}
            log(f"note: not resuming exactly from {d} (settings changed since it was saved: "
                f"{', '.join(f'{k} {a} -> {b}' for k, (a, b) in changed.items())}); using weight files.")
            continue
        candidates.append((step, 1, "resume", d, state))
    for n, p in epoch_checkpoints(proj):
        candidates.append(((n + 1) * cfg.epoch_steps, 0, "epoch", p, n))
    init = proj / "rwkv-init.pth"
    if init.is_file():
        candidates.append((0, -1, "init", init, None))
    if not candidates:
        raise UserError(
            f"no rwkv-init.pth and no rwkv-N.pth checkpoint in PROJ_DIR {proj.resolve()}. Run "
            f"`sh demo-training-prepare.sh` first (with the same N_LAYER, N_EMBD and PROJ_DIR as the run "
            f"script), or point PROJ_DIR at the folder that holds your checkpoints."
        )
    candidates.sort(key=lambda c: (c[0], c[1]), reverse=True)
    for step, _, kind, path, extra in candidates:
        if kind == "resume":
            state = extra
            payload = None
            if state.get("kind") == "torch":
                try:
                    payload = load_trainer_state(path / "trainer.pt")
                except CorruptCheckpoint as e:
                    warnings.warn(f"resume state {path} is corrupted or incomplete ({e}); falling back to the "
                                  f"previous save.", stacklevel=2)
                    continue
            return StartPoint(step=step, weights=payload["model"] if payload else None, source=path,
                              resume_dir=path, state=state, payload=payload,
                              epoch_begin=int(state.get("epoch_begin", 0)))
        try:
            sd = load_weights(path)
        except CorruptCheckpoint as e:
            warnings.warn(f"checkpoint {path} is corrupted or truncated ({e}); falling back to the previous "
                          f"save. Delete or move it if this repeats.", stacklevel=2)
            continue
        if kind == "epoch":
            return StartPoint(step=step, weights=sd, source=path, epoch_begin=extra + 1)
        return StartPoint(step=0, weights=sd, source=path, epoch_begin=0)
    raise UserError(
        f"every checkpoint in {proj.resolve()} is unreadable (see the warnings above). Restore one from a "
        f"backup or re-run `sh demo-training-prepare.sh` to start over."
    )


def save_resume_state(proj_dir, step: int, state: dict, write_payload, keep: int, is_rank0: bool,
                      barrier=lambda: None) -> Path:
    """Write an exact-resume state for `step`; keep the newest `keep` of them.

    `write_payload(directory)` writes the model/optimiser files (collective for
    DeepSpeed: every rank calls it). state.json is written last, by rank 0.
    """
    root = Path(proj_dir) / RESUME_DIR
    d = root / f"step-{step:09d}"
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
        for _, old in resume_states(proj_dir)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
        # incomplete leftovers (a kill while writing) older than the newest state
        for old in root.iterdir():
            m = _STEP_RE.match(old.name)
            if m and int(m.group(1)) < step and not (old / STATE_FILE).is_file():
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return d
