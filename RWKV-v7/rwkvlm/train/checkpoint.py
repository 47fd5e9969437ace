"""Checkpoints: the rwkv-*.pth weight files, the exact-resume states, and where a run starts.

Weight files (the spec's format): `rwkv-init.pth`, `rwkv-<N>.pth` (N = the
mini-epoch just finished), `rwkv-final.pth` and `rwkv-latest.pth`, each a
plain state dict that loads with `torch.load(weights_only=True)`.

An exact-resume state is a folder `resume/step-<step>/` (names: rundir.py):
`weights.pth` (the weights as in rwkv-N.pth), `trainer.pt` (model and
optimiser, torch optimisers) or `ds/` (a DeepSpeed checkpoint),
`rng-rank<R>.pt` for every rank, and `state.json`, written last: a folder
without it is incomplete and never used. state.json lists the weight files
that are made from this state after it (`pending`), so a kill between the
two is repaired on the next start.

Where a run starts (`find_start`): the save with the most training behind it
(samples seen), whatever the settings it was made with. With the settings of
the state unchanged, the run continues exactly; with --my_exit_tokens changed
too, with the schedule stretched to the new end. With other settings changed
it continues from that save's weights (and its optimiser state where the
optimiser is the same kind and shape) at the same number of samples, with a
fresh warmup. A damaged save is reported and the next older one is used.
"""
from __future__ import annotations

import datetime
import errno
import json
import math
import re
import shutil
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rwkvlm.atomic import (WriteError, atomic_open, atomic_torch_save, explain_write_errors, free_bytes, human_bytes,
                           link_or_copy)
from rwkvlm.errors import UserError
from rwkvlm.train.rundir import (DS_DIR, DS_TAG, FINAL, LATEST, RESUME, STATE_FILE, STATE_WEIGHTS, TRAINER_FILE, RunDir,
                           epoch_name, rng_file, state_folder_of)

SAVE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}

# settings an exact resume must share with the run that saved the state (--my_exit_tokens
# may change: the schedule then stretches or shrinks to the new end)
EXACT_KEYS = ("n_layer", "n_embd", "vocab_size", "head_size", "ctx_len", "micro_bsz", "world_size",
              "magic_prime", "precision", "deepspeed", "mini_epoch_samples")
# the model layout beyond n_layer / n_embd, recorded only where it is not the default (so that the
# fingerprints of earlier versions and of formula-sized models are unchanged): {key: default}
LAYOUT_KEYS = {"lora": None, "layer0_v": 1}
RECENT_STEPS = 20  # a state records the mean loss of the steps before it, over this many


# what to do when a save cannot be written in PROJ_DIR
PROJ_HINT = "choose another --proj_dir (PROJ_DIR in the demo-training scripts) on a disk with room for the saves"


def save_weights(sd: dict, path, precision: str) -> None:
    """Write a weight file (rwkv-*.pth): a plain CPU state dict in the training precision, crash-safely.

    A full disk or an unwritable PROJ_DIR raises WriteError (a UserError); the file
    under `path`, if any, is then unchanged."""
    path = Path(path)
    dtype = SAVE_DTYPES[precision]
    kept = (f"The file {path.name} was not changed" if path.exists() else f"The file {path.name} was not written") + \
        "; the other saves there are untouched"
    with explain_write_errors(path.parent, hint=PROJ_HINT, kept=kept):
        atomic_torch_save({k: v.detach().to("cpu", dtype=dtype if v.is_floating_point() else v.dtype).contiguous()
                           for k, v in sd.items()}, path)


class CorruptCheckpoint(Exception):
    """A checkpoint file that cannot be read (truncated, damaged, not a checkpoint)."""


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def not_plain_weights(path, why: str) -> str:
    """The one message for a file that fails the safe (weights-only) load, whatever the cause."""
    return (f"{path} is not a plain weights file: the safe load, which reads tensors and nothing else, "
            f"refused it ({why}). It may be damaged (cut short by a full disk or a stop while it was being "
            f"saved) or not made by this trainer or RWKV-LM; loading it any other way could run code hidden "
            f"in it. Use a checkpoint you trust, or download it again.")


def _why_refused(e: Exception) -> str:
    """What torch's weights-only load said, in words that never advise loading the file unsafely."""
    msg = str(e)
    m = re.search(r"GLOBAL ([\w.]+)", msg)
    if m:
        return f"it refers to the Python object {m.group(1)}, which a weights file never holds"
    if "Unsupported operand" in msg or isinstance(e, UnicodeDecodeError):
        return "its contents are not a torch.save archive of tensors"
    if isinstance(e, EOFError) or not msg:
        return "it is empty or cut short"
    if "central directory" in msg or "PytorchStreamReader" in msg or "zip" in msg.lower():
        return "it is cut short or not a torch.save archive"
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip() and "weights_only" not in ln
             and "safe_globals" not in ln]
    first = lines[0] if lines else ""
    return f"{type(e).__name__}{': ' + first[:200] if first else ''}"


def load_checkpoint_file(path, mmap: bool = False):
    """The only torch.load of the package: weights_only=True, on the CPU (memory-mapped with
    mmap, where the file's format allows: reading shapes then costs next to nothing).

    Raises CorruptCheckpoint (`not_plain_weights`' message) for any file the safe load
    refuses, damaged or unsafe alike, and for a missing or unreadable one.
    """
    path = Path(path)
    if not path.is_file():
        raise CorruptCheckpoint(f"{path}: missing" if not path.exists() else f"{path}: not a file")
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols: not the user's business
            warnings.simplefilter("ignore")
            # a legacy (non-zip) file cannot be mapped: read it whole
            mapped = bool(mmap) and zipfile.is_zipfile(path)
            return torch.load(path, map_location="cpu", weights_only=True, **({"mmap": True} if mapped else {}))
    except OSError as e:
        raise CorruptCheckpoint(f"{path}: cannot be read ({e.strerror or _first_line(e)})") from None
    except Exception as e:  # torch raises many types for damaged or unsafe files
        raise CorruptCheckpoint(not_plain_weights(path, _why_refused(e))) from None


_torch_load = load_checkpoint_file


def load_weights(path, mmap: bool = False) -> dict:
    """Load a state dict of tensors (load_checkpoint_file).

    Raises CorruptCheckpoint, with one message for a damaged, truncated or unsafe file
    (one that would need arbitrary unpickling, which could run code) or one that holds
    something other than a state dict of tensors. Tools turn it into a UserError as it is.
    """
    path = Path(path)
    obj = load_checkpoint_file(path, mmap=mmap)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        what = f"a {type(obj).__name__}" if not isinstance(obj, dict) else "a dict with values other than tensors"
        raise CorruptCheckpoint(not_plain_weights(path, f"it holds {what}, not a state dict of tensors"))
    return obj


def check_complete(path) -> None:
    """Raise CorruptCheckpoint unless `path` is a whole torch.save file.

    Reads only the zip directory at the end of the file (no unpickling, no tensor
    data), so it is cheap for any size: a file cut short by a kill or a full disk
    loses that directory.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{path}: missing") from None
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise CorruptCheckpoint(f"{path}: not a complete torch.save file ({_first_line(e)})") from None
    if not any(n.endswith("data.pkl") for n in names):
        raise CorruptCheckpoint(f"{path}: not a torch.save file")


def load_trainer_state(path) -> dict:
    """Load a resume state's trainer.pt ({"model": state dict, "optimizer": state dict})."""
    obj = _torch_load(path)
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


def model_layout(cfg) -> dict:
    """The LAYOUT_KEYS of cfg's model that differ from the default: "lora" ("Dw/Da/Dv/Dg") when the
    LoRA sizes are not the formula's, "layer0_v" 0 without blocks.0.att.v0/v1/v2."""
    if not hasattr(cfg, "lora_dims"):
        return {}
    mcfg = cfg.model_config()
    out = {}
    if not mcfg.lora_is_formula:
        out["lora"] = "/".join(map(str, mcfg.lora_sizes))
    if not mcfg.layer0_v:
        out["layer0_v"] = 0
    return out


def run_fingerprint(cfg) -> dict:
    """The settings a state or rwkv-final.pth was made with (EXACT_KEYS and a few more)."""
    return {**model_layout(cfg),
        "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "vocab_size": cfg.vocab_size,
        "head_size": cfg.head_size, "ctx_len": cfg.ctx_len, "micro_bsz": cfg.micro_bsz,
        "world_size": cfg.world_size, "magic_prime": cfg.magic_prime, "precision": cfg.precision,
        "deepspeed": cfg.is_deepspeed, "my_exit_tokens": cfg.my_exit_tokens,
        "mini_epoch_samples": cfg.mini_epoch_samples, "strategy": cfg.strategy,
    }


def changed_settings(fingerprint: dict, cfg) -> dict:
    """{key: (saved, now)} for the EXACT_KEYS in which `fingerprint` differs from cfg."""
    now = run_fingerprint(cfg)
    out = {k: (fingerprint.get(k), now[k]) for k in EXACT_KEYS if fingerprint.get(k) != now[k]}
    for k, default in LAYOUT_KEYS.items():
        a, b = fingerprint.get(k, default), now.get(k, default)
        if a != b:
            out[k] = (a, b)
    return out


def _say_changes(changes: dict) -> str:
    return ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items())


# ============================================================================================
# What PROJ_DIR holds
# ============================================================================================

KIND_RANK = {"state": 3, "final": 2, "epoch": 1, "init": 0}  # at equal progress, the first wins


@dataclass
class Save:
    """One save in PROJ_DIR: a state folder or a weight file, with how far training had got."""

    kind: str  # "state", "final", "epoch" or "init"
    path: Path
    samples: int  # samples trained on (all ranks) when it was made
    step: int = 0  # its step, at the settings it was made with
    fingerprint: dict | None = None  # its settings (state, final)
    state: dict = field(default_factory=dict)  # state.json
    loss: float | None = None  # mean loss of the steps before it, where known
    epoch: int | None = None  # N of rwkv-N.pth

    @property
    def order(self):
        return (self.samples, KIND_RANK[self.kind], self.step)

    def describe(self, rd: RunDir) -> str:
        loss = f", mean loss {self.loss:.4g}" if self.loss is not None else ""
        return f"{rd.relative(self.path)} (step {self.step}{loss})"


_STATE_FIELDS = {"step": int, "kind": str, "fingerprint": dict}
_STATE_OPTIONAL = {"run_start_step": int, "epoch_begin": int, "epoch_loss_sum": (int, float),
                   "epoch_loss_count": int, "samples": int, "pending": list, "recent_losses": list,
                   "loss": (int, float, type(None)), "wandb_id": (str, type(None)), "log_lines": list}


def _read_state(d: Path, step: int) -> dict:
    """state.json of the state folder d, checked field by field; CorruptCheckpoint if it is not right."""
    try:
        state = json.loads((d / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f"{d / STATE_FILE}: unreadable ({_first_line(e)})") from None
    if not isinstance(state, dict):
        raise CorruptCheckpoint(f"{d / STATE_FILE}: not a JSON object")
    for key, typ in _STATE_FIELDS.items():
        if not isinstance(state.get(key), typ) or isinstance(state.get(key), bool):
            raise CorruptCheckpoint(f"{d / STATE_FILE}: field {key!r} is missing or not a {typ.__name__}")
    for key, typ in _STATE_OPTIONAL.items():
        if key in state and (not isinstance(state[key], typ) or isinstance(state[key], bool)):
            raise CorruptCheckpoint(f"{d / STATE_FILE}: field {key!r} has the wrong type")
    if state["step"] != step or state["kind"] not in ("torch", "deepspeed"):
        raise CorruptCheckpoint(f"{d / STATE_FILE}: does not describe {d.name}")
    fp = state["fingerprint"]
    for key in ("micro_bsz", "world_size"):
        if not isinstance(fp.get(key), int) or fp[key] < 1:
            raise CorruptCheckpoint(f"{d / STATE_FILE}: fingerprint field {key!r} is not a positive integer")
    if not all(isinstance(x, (int, float)) for x in state.get("recent_losses", [])) or \
            not all(isinstance(x, str) for x in state.get("pending", [])) or \
            not all(isinstance(x, int) for x in state.get("log_lines", [])):
        raise CorruptCheckpoint(f"{d / STATE_FILE}: a list field holds the wrong types")
    return state


def _state_samples(state: dict) -> int:
    fp = state["fingerprint"]
    return int(state.get("samples", state["step"] * fp["micro_bsz"] * fp["world_size"]))


def _epoch_losses(rd: RunDir) -> dict:
    """{mini-epoch: mean loss} from train_log.txt."""
    out = {}
    try:
        lines = rd.train_log.read_text().splitlines()
    except OSError:
        return out
    for ln in lines:
        parts = ln.split()
        try:
            out[int(parts[0])] = float(parts[1])
        except (ValueError, IndexError):
            continue
    return out


def list_saves(rd: RunDir, cfg) -> list[Save]:
    """Every save in PROJ_DIR, the one with the most training behind it first.

    A state whose state.json is unreadable or malformed is reported and left out.
    """
    saves = []
    for step, d in rd.state_dirs():
        try:
            state = _read_state(d, step)
        except CorruptCheckpoint as e:
            warnings.warn(f"ignoring the resume state {d} ({e}); using the previous save.", stacklevel=3)
            continue
        loss = state.get("loss")
        saves.append(Save("state", d, _state_samples(state), step, state["fingerprint"], state,
                          float(loss) if loss is not None else None))
    info = rd.read_json(rd.final_info)
    if rd.final.is_file() and info is not None:
        try:
            fp, step = info["fingerprint"], int(info["step"])
            samples = int(info.get("samples", step * fp["micro_bsz"] * fp["world_size"]))
            saves.append(Save("final", rd.final, samples, step, fp))
        except (KeyError, TypeError, ValueError):
            pass  # not ours: rwkv-final.pth then counts as nothing
    losses = _epoch_losses(rd)
    for n, p in rd.epoch_checkpoints():
        saves.append(Save("epoch", p, (n + 1) * cfg.mini_epoch_samples, (n + 1) * cfg.epoch_steps,
                          loss=losses.get(n), epoch=n))
    if rd.init.is_file():
        saves.append(Save("init", rd.init, 0, 0))
    return sorted(saves, key=lambda s: s.order, reverse=True)


def check_state_files(save: Save) -> dict | None:
    """Raise CorruptCheckpoint unless every file of a state is there and whole; returns
    trainer.pt's content for torch states (read anyway to check it), else None."""
    d, state = save.path, save.state
    for r in range(state["fingerprint"]["world_size"]):
        rng = _torch_load(d / rng_file(r))
        if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor):
            raise CorruptCheckpoint(f"{d / rng_file(r)}: not an RNG state")
    if (d / STATE_WEIGHTS).exists() or "pending" in state:  # states of this version have weights.pth
        check_complete(d / STATE_WEIGHTS)
    if state["kind"] == "torch":
        return load_trainer_state(d / TRAINER_FILE)
    ds = d / DS_DIR / DS_TAG
    files = sorted(ds.glob("*.pt")) if ds.is_dir() else []
    if not files:
        raise CorruptCheckpoint(f"{ds}: no DeepSpeed checkpoint files")
    for f in files:
        check_complete(f)
    return None


def state_weights(save: Save, payload: dict | None) -> dict:
    """The weights of a state: weights.pth, or (states of earlier versions) trainer.pt's model
    or the DeepSpeed checkpoint's module."""
    d = save.path
    if (d / STATE_WEIGHTS).is_file():
        return load_weights(d / STATE_WEIGHTS)
    if payload is not None:
        return payload["model"]
    obj = _torch_load(d / DS_DIR / DS_TAG / "mp_rank_00_model_states.pt")
    module = obj.get("module") if isinstance(obj, dict) else None
    if not isinstance(module, dict):
        raise CorruptCheckpoint(f"{d}: its DeepSpeed checkpoint holds no module weights")
    return {k.removeprefix("model."): v for k, v in module.items()}


# ============================================================================================
# Where a run starts
# ============================================================================================

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
    if save.kind == "init":
        return StartPoint(step=0, weights=load_weights(save.path), source=save.path)
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
            f"({_say_changes(changed_settings(save.fingerprint, cfg))}), so it cannot continue exactly. "
            f"Carried over: its weights (step {save.step}, {save.samples} samples trained)"
            + (" and its optimiser state" if carries else
               "; the optimiser state restarts (it was saved for another optimiser set-up)")
            + f". Training continues at sample {step * cfg.real_bsz} (step {step} at the new settings, "
              f"mini-epoch {step // cfg.epoch_steps}); restarting: the warmup and the data order (windows "
              f"are drawn by the new settings from there on).")
    elif save.kind == "final" and changed_settings(save.fingerprint, cfg):
        log(f"note: continuing from the weights of {save.path.name} ({save.samples} samples trained), "
            f"saved with other settings ({_say_changes(changed_settings(save.fingerprint, cfg))}); "
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
    """Check the save's files; returns trainer.pt's content for torch states (else None)."""
    if save.kind == "state":
        return check_state_files(save)
    check_complete(save.path) if save.kind != "init" else load_weights(save.path)
    return None


# ---------------------------------------------------------------- divergence

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
    vocab_size, the LoRA sizes, whether layer 0 holds att.v0/v1/v2), read off its tensors
    (ModelConfig.from_state_dict), with a line saying what was found and a note where they differ
    from the flags given (the file wins). Any other cfg is returned as it is.

    Called before anything is written; a file that is not a consistent x070 state dict raises
    UserError."""
    import dataclasses

    from rwkvlm.model.rwkv7 import ModelConfig

    if cfg.load_model in ("", "0"):
        return cfg
    path = _load_model_path(cfg)
    try:
        sd = load_weights(path, mmap=True)
    except CorruptCheckpoint as e:
        raise UserError(f"--load_model: {e}") from None
    mcfg = ModelConfig.from_state_dict(sd, f"--load_model {path}")
    del sd
    found = cfg.model_config()
    formula = "" if mcfg.lora_is_formula else \
        f" (not the formula's {'/'.join(map(str, mcfg.formula_lora_sizes))}: read from the file)"
    layer0 = "" if mcfg.layer0_v else \
        "; no blocks.0.att.v0/v1/v2 (the released layout: layer 0 does not use them)"
    log(f"--load_model {path}: RWKV-7 {mcfg.describe()}{formula}, vocab {mcfg.vocab_size}{layer0}; the model "
        f"is built to match.")
    diffs = [f"{flag} {a} -> {b}" for flag, a, b in (
        ("N_LAYER (--n_layer)", found.n_layer, mcfg.n_layer), ("N_EMBD (--n_embd)", found.n_embd, mcfg.n_embd),
        ("--head_size", found.head_size, mcfg.head_size), ("--vocab_size", found.vocab_size, mcfg.vocab_size),
        ("--lora_dims", "/".join(map(str, found.lora_sizes)), "/".join(map(str, mcfg.lora_sizes))),
    ) if a != b and (flag != "--lora_dims" or cfg.lora_dims or found.n_embd == mcfg.n_embd)]
    if diffs:
        log(f"note: the shapes of --load_model {path.name} win over the flags given: {', '.join(diffs)}.")
    return dataclasses.replace(
        cfg, n_layer=mcfg.n_layer, n_embd=mcfg.n_embd, head_size=mcfg.head_size, vocab_size=mcfg.vocab_size,
        lora_dims="" if mcfg.lora_is_formula else "/".join(map(str, mcfg.lora_sizes)),
        layer0_v=int(mcfg.layer0_v))


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


# ============================================================================================
# Writing an exact-resume state
# ============================================================================================

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
        f"cannot write in {Path(folder).absolute()}: torch reported a failed write ({_first_line(e)[:160]}), "
        f"which most often means the disk is full{space}. {kept}. Free some space there, "
        f"or {PROJ_HINT}.", code=errno.ENOSPC, folder=folder)


def prune_states(rd: RunDir, newest: Path, keep: int) -> None:
    """Keep `newest` and the keep - 1 other complete states with the most training behind them."""
    ranked = []
    for step, d in rd.state_dirs():
        if d == newest:
            continue
        try:
            ranked.append((_state_samples(_read_state(d, step)), step, d))
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



# ============================================================================================
# The weights that the tools (chat.py, evaluate.py) load
# ============================================================================================

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
        state = _read_state(d, step)
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


def load_tool_weights(path) -> dict:
    """The state dict of what find_weights picked: a weight file, or a state folder of an earlier
    version (its trainer.pt model or DeepSpeed module)."""
    p = Path(path)
    if not p.is_dir():
        return load_weights(p)
    payload = load_trainer_state(p / TRAINER_FILE) if (p / TRAINER_FILE).is_file() else None
    return state_weights(Save("state", p, 0), payload)

__all__ = ["CorruptCheckpoint", "StartPoint", "find_start", "shapes_from_load_model", "load_weights", "save_weights", "check_weights_fit",
           "run_fingerprint", "save_resume_state", "epoch_name", "write_final_info", "write_divergence",
           "find_weights", "newest_weights", "load_tool_weights"]
