"""Weight files: write them (plain CPU state dicts, crash-safely) and read them (the one safe load).

Weight files (the spec's format): `rwkv-init.pth`, `rwkv-<N>.pth` (N = the mini-epoch just
finished), `rwkv-final.pth` and `rwkv-latest.pth`, each a plain state dict that loads with
`torch.load(weights_only=True)`. `load_checkpoint_file` is the package's only torch.load: any file
the safe load refuses, damaged or unsafe alike, raises CorruptCheckpoint with one message.
"""
from __future__ import annotations

import contextlib
import re
import warnings
import zipfile
from pathlib import Path

import torch

from rwkvlm.atomic import atomic_torch_save, explain_write_errors
from rwkvlm.errors import UserError


SAVE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}


# what to do when a save cannot be written in PROJ_DIR
PROJ_HINT = "choose another --proj_dir (PROJ_DIR in the demo-training scripts) on a disk with room for the saves"


# a state dict of GPU tensors at least this large is written through one CPU copy at a time (stream_from_gpu)
STREAM_BYTES = 4 * 2**30


def save_weights(sd: dict, path, precision: str) -> None:
    """Write a weight file (rwkv-*.pth): a plain CPU state dict in the training precision, crash-safely.

    Weights on a GPU that are already in that precision and take STREAM_BYTES or more (a 7B model
    in bf16: 14 GB) are not copied to the host as a whole first: each tensor goes through a CPU copy
    of its own as it is written (stream_from_gpu), so the host needs one tensor's memory beside the
    optimiser state it holds under an offload strategy. The file is the same plain CPU state dict.

    A full disk or an unwritable PROJ_DIR raises WriteError (a UserError); the file
    under `path`, if any, is then unchanged."""
    path = Path(path)
    dtype = SAVE_DTYPES[precision]
    kept = (f"The file {path.name} was not changed" if path.exists() else f"The file {path.name} was not written") + \
        "; the other saves there are untouched"

    def want(v):
        return dtype if v.is_floating_point() else v.dtype

    on_gpu = [v for v in sd.values() if v.device.type != "cpu"]
    stream = (on_gpu and len(on_gpu) == len(sd) and all(v.dtype == want(v) for v in on_gpu)
              and sum(v.numel() * v.element_size() for v in on_gpu) >= STREAM_BYTES)
    with explain_write_errors(path.parent, hint=PROJ_HINT, kept=kept):
        if stream:
            with stream_from_gpu():
                atomic_torch_save({k: v.detach().contiguous() for k, v in sd.items()}, path)
        else:
            atomic_torch_save({k: v.detach().to("cpu", dtype=want(v)).contiguous() for k, v in sd.items()}, path)


@contextlib.contextmanager
def stream_from_gpu():
    """While torch.save runs inside: every storage is recorded as a CPU one. torch.save copies each
    non-CPU storage to the CPU just before writing its bytes (one at a time); with the location
    recorded as "cpu" the file is what saving CPU copies gives, and loads without map_location."""
    from torch import serialization

    entry = (-1000, lambda storage: "cpu", lambda storage, location: None)
    serialization._package_registry.insert(0, entry)
    try:
        yield
    finally:
        serialization._package_registry.remove(entry)


class CorruptCheckpoint(Exception):
    """A checkpoint file that cannot be read (truncated, damaged, not a checkpoint)."""


def first_line(e: Exception) -> str:
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
        raise CorruptCheckpoint(f"{path}: cannot be read ({e.strerror or first_line(e)})") from None
    except Exception as e:  # torch raises many types for damaged or unsafe files
        raise CorruptCheckpoint(not_plain_weights(path, _why_refused(e))) from None


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
        raise CorruptCheckpoint(f"{path}: not a complete torch.save file ({first_line(e)})") from None
    if not any(n.endswith("data.pkl") for n in names):
        raise CorruptCheckpoint(f"{path}: not a torch.save file")


def load_trainer_state(path) -> dict:
    """Load a resume state's trainer.pt ({"model": state dict, "optimizer": state dict})."""
    obj = load_checkpoint_file(path)
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
    from rwkvlm.model import model_type_of, other_type

    theirs, ours = model_type_of(sd), model_type_of(own)
    if theirs is not None and ours is not None and theirs != ours:
        raise other_type(path, theirs, ours)
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
        return "not an RWKV model"
    from rwkvlm.model import model_type_of

    kind = model_type_of(sd)
    return (f"MODEL_TYPE={kind} " if kind else "") + f"N_LAYER={len(layers)} N_EMBD={emb.shape[1]} vocab_size={emb.shape[0]}"
