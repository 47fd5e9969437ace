"""The saves in PROJ_DIR: exact-resume states and weight files, each with how far training had got.

An exact-resume state is a folder `resume/step-<step>/` (names: layout.py): `weights.pth` (the
weights as in rwkv-N.pth), `trainer.pt` (model and optimiser, torch optimisers) or `ds/` (a
DeepSpeed checkpoint), `rng-rank<R>.pt` for every rank, and `state.json`, written last: a folder
without it is incomplete and never used. state.json records the settings the state was made with
(its fingerprint) and lists the weight files made from the state after it (`pending`).

`list_saves` ranks every save by the samples trained behind it, whatever its settings; the
trainer (rwkvlm.train.resume) and the tools (find.py) both start from that ranking.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rwkvlm.rundir.layout import DS_DIR, DS_TAG, STATE_FILE, STATE_WEIGHTS, TRAINER_FILE, RunDir, rng_file
from rwkvlm.rundir.weights import (CorruptCheckpoint, check_complete, first_line, load_checkpoint_file,
                                   load_trainer_state, load_weights)


# settings an exact resume must share with the run that saved the state (--my_exit_tokens
# may change: the schedule then stretches or shrinks to the new end)
EXACT_KEYS = ("n_layer", "n_embd", "vocab_size", "head_size", "ctx_len", "micro_bsz", "world_size",
              "magic_prime", "precision", "deepspeed", "mini_epoch_samples")


# the model layout beyond n_layer / n_embd, recorded only where it is not the default (so that the
# fingerprints of earlier versions and of formula-sized models are unchanged): {key: default}
LAYOUT_KEYS = {"lora": None, "layer0_v": 1, "model_type": "x070"}


def model_layout(cfg) -> dict:
    """The LAYOUT_KEYS of cfg's model that differ from the default: "model_type" other than x070;
    for x070, "lora" ("Dw/Da/Dv/Dg") when the LoRA sizes are not the formula's, "layer0_v" 0 without
    blocks.0.att.v0/v1/v2."""
    if not hasattr(cfg, "lora_dims"):
        return {}
    mcfg = cfg.model_config()
    if mcfg.model_type != "x070":
        return {"model_type": mcfg.model_type}
    out = {}
    if not mcfg.lora_is_formula:
        out["lora"] = "/".join(map(str, mcfg.lora_sizes))
    if not mcfg.layer0_v:
        out["layer0_v"] = 0
    return out


# the data beyond magic_prime, recorded only where it is not the default (a single file: the
# fingerprints of single-file runs are unchanged): {key: default}. "data_mix": the files of a
# --data_file mix with their samples per 40320 and magic primes (rwkvlm.data.mix)
DATA_KEYS = {"data_mix": None}


def data_layout(cfg) -> dict:
    """The DATA_KEYS of cfg's data that differ from the default."""
    from rwkvlm.data.mix import is_mix, mix_fingerprint

    data_file = getattr(cfg, "data_file", "")
    if data_file and is_mix(data_file) and getattr(cfg, "data_type", "binidx") == "binidx":
        return {"data_mix": mix_fingerprint(data_file, cfg.ctx_len)}
    return {}


def run_fingerprint(cfg) -> dict:
    """The settings a state or rwkv-final.pth was made with (EXACT_KEYS and a few more)."""
    return {**model_layout(cfg), **data_layout(cfg),
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
    for k, default in {**LAYOUT_KEYS, **DATA_KEYS}.items():
        a, b = fingerprint.get(k, default), now.get(k, default)
        if a != b:
            out[k] = (a, b)
    return out


def say_changes(changes: dict) -> str:
    return ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items())


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


def read_state(d: Path, step: int) -> dict:
    """state.json of the state folder d, checked field by field; CorruptCheckpoint if it is not right."""
    try:
        state = json.loads((d / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f"{d / STATE_FILE}: unreadable ({first_line(e)})") from None
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


def state_samples(state: dict) -> int:
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
            state = read_state(d, step)
        except CorruptCheckpoint as e:
            warnings.warn(f"ignoring the resume state {d} ({e}); using the previous save.", stacklevel=3)
            continue
        loss = state.get("loss")
        saves.append(Save("state", d, state_samples(state), step, state["fingerprint"], state,
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
        rng = load_checkpoint_file(d / rng_file(r))
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
    obj = load_checkpoint_file(d / DS_DIR / DS_TAG / "mp_rank_00_model_states.pt")
    module = obj.get("module") if isinstance(obj, dict) else None
    if not isinstance(module, dict):
        raise CorruptCheckpoint(f"{d}: its DeepSpeed checkpoint holds no module weights")
    return {k.removeprefix("model."): v for k, v in module.items()}
