"""export_hf / import_hf: an x070 .pth <-> a Hugging Face folder of fla's RWKV7ForCausalLM.

    export_hf("out/L12-D768-x070/rwkv-final.pth", "hf/L12-D768")   # or the PROJ_DIR itself
    import_hf("hf/L12-D768", "rwkv-imported.pth")

An export folder holds config.json, generation_config.json, model.safetensors (fla's names, the
checkpoint's dtype), rwkvlm_extra.safetensors (only for checkpoints holding blocks.0.att.v0/v1/v2,
which fla's layer 0 has no place for), the tokenizer: the World one (rwkv_vocab_v20230424.txt,
tokenization_rwkv_world.py, tokenizer_config.json) for a 65536-row vocabulary, or a char-level
model's own (tokenizer.json, tokenizer_config.json and rwkvlm_vocab.json, its vocab.json: chartok.py)
when a vocab.json lies beside the weights, two stub modules that let transformers load
the model with trust_remote_code=True (configuration_rwkv7.py, modeling_rwkv7.py: they import fla),
README.md, and rwkvlm_export.json (what was exported from where; written last, and the mark of an
export). Export then import gives back the same keys, shapes, dtypes and values, and a char-level
model's vocab.json byte for byte (written beside the imported .pth).

Crash safety: the folder is written under a temporary name beside OUT_DIR and renamed onto it when
complete, so OUT_DIR is never a partial export; an earlier export there is replaced whole (moved
aside, then the new one renamed in: a kill between the two renames leaves no OUT_DIR). A
temporary folder left by a killed export is removed by the next export to the same OUT_DIR. A
non-empty OUT_DIR that is not an earlier export is refused. import_hf writes its .pth under a
temporary name and renames it. Bad input raises UserError (naming the key or field, what was found
and what was expected) before anything is written.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rwkvlm.atomic import (atomic_open, atomic_path, atomic_torch_save, check_output_dir, check_output_path,
                           explain_write_errors, fsync_dir)
from rwkvlm.data.charvocab import CharVocab
from rwkvlm.errors import UserError
from rwkvlm.hf.chartok import TOKENIZER_FILE, VOCAB_COPY, tokenizer_config as char_tokenizer_config
from rwkvlm.hf.chartok import tokenizer_json as char_tokenizer_json, vocab_from_tokenizer_json
from rwkvlm.hf.layout import (EXTRA_KEYS, FLA_VERSION, config_from_hf, fla_shapes, from_fla, hf_config, to_fla)
from rwkvlm.model.config import ModelConfig, state_dict_shapes

from rwkvlm.rundir.find import find_weights, load_tool_weights, vocab_file_for
from rwkvlm.rundir.layout import VOCAB as VOCAB_JSON
from rwkvlm.rundir.weights import CorruptCheckpoint, load_weights

__all__ = ["export_hf", "import_hf", "ExportResult", "MARKER", "MODEL_FILE", "EXTRA_FILE", "is_export"]

MODEL_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
EXTRA_FILE = "rwkvlm_extra.safetensors"
MARKER = "rwkvlm_export.json"
MARKER_FORMAT = "rwkvlm-hf-export"
VOCAB_FILE = "rwkv_vocab_v20230424.txt"
TOKENIZER_CODE = "tokenization_rwkv_world.py"
WORLD_VOCAB_ROWS = 65536
OUT_HINT = "choose another OUT_DIR on a disk with room for the export (about the size of the .pth)"

_CONFIG_STUB = '''"""RWKV7Config of flash-linear-attention (fla {fla}), for AutoConfig with trust_remote_code=True.

Written by rwkvlm's export_hf.py; it only imports fla, which must be installed
(pip install flash-linear-attention=={fla}).
"""
from fla.models.rwkv7 import RWKV7Config

__all__ = ["RWKV7Config"]
'''
_MODEL_STUB = '''"""RWKV7Model / RWKV7ForCausalLM of flash-linear-attention (fla {fla}), for AutoModel and
AutoModelForCausalLM with trust_remote_code=True.

Written by rwkvlm's export_hf.py; it only imports fla, which must be installed
(pip install flash-linear-attention=={fla}).
"""
from fla.models.rwkv7 import RWKV7ForCausalLM, RWKV7Model

__all__ = ["RWKV7ForCausalLM", "RWKV7Model"]
'''


@dataclass
class ExportResult:
    out_dir: Path
    source: Path
    cfg: ModelConfig
    dtype: torch.dtype
    files: list = field(default_factory=list)
    notes: list = field(default_factory=list)  # what a user should know (e.g. no tokenizer)
    vocabulary: str = "world"  # "world", "char" (vocab.json: tokenizer.json) or "none" (no tokenizer files)
    char_vocab: CharVocab | None = None
    vocab_file: Path | None = None  # the vocab.json of a char-level model


# ============================================================================================
# Export
# ============================================================================================

def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0]) or "host"


def _stage_re(name: str) -> re.Pattern:
    """Temporary folders beside OUT_DIR: `.{name}.{host}-{pid}-{random}.tmp` (as atomic.py's files)."""
    return re.compile(r"^\." + re.escape(name) + r"\.(?P<host>[A-Za-z0-9-]+)-(?P<pid>\d+)-[A-Za-z0-9_]+\.tmp$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_stages(out: Path) -> list[Path]:
    """Remove the temporary folders that killed exports to `out` left beside it (this host's, whose
    process is gone); return them."""
    pattern, host, removed = _stage_re(out.name), _host(), []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = pattern.match(p.name)
        if m and p.is_dir() and not p.is_symlink() and m["host"] == host and \
                (int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"]))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def is_export(folder) -> bool:
    """Whether `folder` holds an export of this tool (its rwkvlm_export.json says so)."""
    try:
        info = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("format") == MARKER_FORMAT


def _check_target(out: Path) -> None:
    """UserError unless OUT_DIR is missing, an empty folder or an earlier export."""
    check_output_dir(out, "OUT_DIR")
    if not out.is_dir():
        return
    try:
        names = sorted(p.name for p in out.iterdir())
    except OSError as e:
        raise UserError(f"OUT_DIR {out} cannot be read ({e.strerror or e}); choose another folder.") from None
    if names and not is_export(out):
        shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        raise UserError(f"OUT_DIR {out} is not empty and holds no earlier export (no valid {MARKER}): it holds "
                        f"{shown}. Nothing was written. Give a new or empty folder (an earlier export is "
                        f"replaced whole), or move those files away.")


def _load_checkpoint(path: Path) -> dict:
    try:
        if path.is_dir():
            return load_tool_weights(path)
        return load_weights(path, mmap=True)
    except CorruptCheckpoint as e:
        raise UserError(str(e)) from None


def _vocab_source() -> Path | None:
    """The World vocabulary file our tokenizer reads (pyrwkv-tokenizer's), else the rwkv package's."""
    with contextlib.suppress(Exception):
        from rwkvlm.data.tokenizer import get_tokenizer

        p = Path(get_tokenizer().vocab_file)
        if p.is_file():
            return p
    with contextlib.suppress(Exception):
        import importlib.util

        spec = importlib.util.find_spec("rwkv")
        if spec is not None and spec.origin:
            p = Path(spec.origin).with_name(VOCAB_FILE)
            if p.is_file():
                return p
    return None


def _distinct(tensors: dict) -> dict:
    """The tensors, each with storage of its own where two shared one (safetensors refuses shared
    storage); values unchanged."""
    seen, out = set(), {}
    for k, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def _save_safetensors(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(_distinct(tensors), str(tmp), metadata={"format": "pt"})


def _readme(res: ExportResult, has_tokenizer: bool, has_extra: bool) -> str:
    cfg = res.cfg
    Dw, Da, Dv, Dg = cfg.lora_sizes
    char = res.vocabulary == "char"
    if char:
        vocab_line = (f"vocabulary {cfg.vocab_size} (a char-level model: {res.char_vocab.vocab_size} characters, "
                      f"its vocab.json)")
        prompt = next((t for t in ("User: 12 + 7 = ?\n\nAssistant:", "The old king")
                       if set(t) <= set(res.char_vocab.chars)), "".join(res.char_vocab.chars[-3:]))
        prompt = prompt.replace("\n", "\\n")  # as written in the README's Python line
        gen = ("model.generate(ids, max_new_tokens=64, do_sample=False, stop_strings=[\"\\n\\n\"], "
               "tokenizer=tok)")
    else:
        vocab_line = f"vocabulary {cfg.vocab_size}"
        prompt = "User: 12 + 7 = ?\\n\\nAssistant:"
        gen = "model.generate(ids, max_new_tokens=16, do_sample=False)"
    lines = [
        f"# RWKV-7 (x070) {cfg.describe()}, in flash-linear-attention's layout",
        "",
        f"Exported by rwkvlm's `RWKV-v7/export_hf.py` from `{res.source}` on "
        f"{datetime.date.today().isoformat()}: {cfg.n_layer} layers, n_embd {cfg.n_embd}, head size "
        f"{cfg.head_size}, {vocab_line}, LoRA sizes decay/a/value/gate {Dw}/{Da}/{Dv}/{Dg}, "
        f"weights in {str(res.dtype).removeprefix('torch.')}.",
        "",
        "## Load it",
        "",
        f"Needs `flash-linear-attention=={FLA_VERSION}` with `transformers>=5.6.2,<5.24` (from 5.24 on, "
        "`generate()` passes its cache under a name fla 0.6.0 does not read, and the text goes wrong) and a "
        "CUDA GPU (fla's kernels are Triton kernels).",
        "",
        "```python",
        "import torch",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        "path = \"THIS_FOLDER\"",
        "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.bfloat16).cuda()",
        "tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)",
        f"ids = tok(\"{prompt}\", return_tensors=\"pt\").input_ids.cuda()",
        f"print(tok.decode({gen}[0]))",
        "```",
        "",
    ]
    if char:
        lines += [
            "`trust_remote_code=True` runs `configuration_rwkv7.py` / `modeling_rwkv7.py` here, which only import",
            "the classes of `fla.models.rwkv7`; without it, `import fla` first (fla registers `rwkv7` with",
            "transformers' Auto classes). The tokenizer is a plain `tokenizer.json` with no code of its own",
            "(`PreTrainedTokenizerFast.from_pretrained(path)` loads it too); AutoTokenizer reads config.json,",
            "whose `auto_map` makes it ask about remote code unless `trust_remote_code` is given (True or False).",
            "",
            "A char-level model has no end-of-document token (id 0 is a character, "
            f"{res.char_vocab.chars[0]!r}): there is no",
            "bos, eos or pad token, and generation runs to `max_new_tokens` or a stop string. Each character",
            "is one token; a character the vocabulary lacks cannot be encoded (tokenizers raises",
            "`Missing [UNK] token from the vocabulary`): the model knows only the characters it was trained on.",
            "",
        ]
    else:
        lines += [
            "`trust_remote_code=True` runs `configuration_rwkv7.py` / `modeling_rwkv7.py` here, which only import",
            "the classes of `fla.models.rwkv7`, and the tokenizer in `tokenization_rwkv_world.py`. Without it,",
            "`import fla` first (fla registers `rwkv7` with transformers' Auto classes); the tokenizer always",
            "needs it.",
            "",
        ]
    lines += [
        "## Files",
        "",
        "- `config.json`: fla's `RWKV7Config`; the shapes come from the checkpoint, the rest are fla's defaults.",
        "- `model.safetensors`: the weights under fla's names (`model.layers.N.attn.*`, `lm_head.weight`, ...).",
    ]
    if has_extra:
        lines.append(f"- `{EXTRA_FILE}`: `blocks.0.att.v0/v1/v2`, which this checkpoint holds but never uses "
                     "(layer 0 has no value residual) and fla's layer 0 has no place for; kept for a bit-exact "
                     "import.")
    if has_tokenizer and char:
        lines += [
            f"- `{TOKENIZER_FILE}`, `tokenizer_config.json`: the model's character vocabulary as a fast tokenizer "
            "(one id per character, vocab.json's ids; no special tokens).",
            f"- `{VOCAB_COPY}`: the run's vocab.json (`{{\"0\": char, ...}}`), which `import_hf.py` writes back "
            "beside the .pth.",
            "- `generation_config.json`: no eos or pad token.",
        ]
    elif has_tokenizer:
        lines += [
            f"- `{VOCAB_FILE}`, `{TOKENIZER_CODE}`, `tokenizer_config.json`: the RWKV World tokenizer "
            "(greedy longest match over UTF-8 bytes; id 0 = end of document = `<|endoftext|>`, no bos added).",
            "- `generation_config.json`: token 0 ends a document (eos) and pads.",
        ]
    else:
        lines.append("- `generation_config.json`: token 0 ends a document (eos) and pads.")
    lines += [
        f"- `{MARKER}`: what was exported, from where (the mark of an export: a new export may replace this folder).",
        "",
        "## Back to a .pth",
        "",
        "```",
        "python RWKV-v7/import_hf.py THIS_FOLDER rwkv-imported.pth",
        "```",
        "",
        "gives the original state dict (same keys, shapes, dtypes and values), which `train.py --load_model`,",
        "`chat.py`, `evaluate.py` and the `rwkv` pip package load.",
    ]
    if char:
        lines.append("The vocab.json is written beside it (chat.py and evaluate.py read it there).")
    if res.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in res.notes]
    return "\n".join(lines) + "\n"


def _tokenizer_config() -> dict:
    return {
        "tokenizer_class": "RWKVWorldTokenizer",
        "auto_map": {"AutoTokenizer": [f"{TOKENIZER_CODE[:-3]}.RWKVWorldTokenizer", None]},
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,
        "model_input_names": ["input_ids", "attention_mask"],
    }


def _write_json(obj, path: Path) -> None:
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _write_text(text: str, path: Path) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def _write_bytes(data: bytes, path: Path) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def _char_vocab(vocab_file: Path, src: Path, cfg: ModelConfig) -> CharVocab:
    """The vocab.json beside the weights, checked against the model (UserError: nothing written)."""
    vocab = CharVocab.read(vocab_file)
    if vocab.vocab_size > cfg.vocab_size:
        raise UserError(f"{vocab_file} lists {vocab.vocab_size} characters, but the model {src} has a vocabulary of "
                        f"{cfg.vocab_size} tokens: the vocab.json beside it belongs to another model. Move it away, "
                        f"or export the weights of the model it belongs to. Nothing was written.")
    return vocab


def _copy(src: Path, path: Path) -> None:
    with atomic_path(path) as tmp:
        shutil.copyfile(src, tmp)


def _swap_in(stage: Path, out: Path) -> None:
    """Put the complete folder `stage` under the name `out`: over nothing, an empty folder, or an
    earlier export (moved aside first, then removed)."""
    old = None
    if out.is_dir():
        try:
            out.rmdir()  # empty
        except OSError:
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.{_host()}-{os.getpid()}-", suffix=".tmp", dir=out.parent))
            os.replace(out, old)  # onto the empty folder just made
    os.rename(stage, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_hf(weights_path, out_dir, log=print) -> ExportResult:
    """Export an x070 checkpoint to a Hugging Face folder of fla's RWKV7ForCausalLM.

    weights_path: a .pth state dict (ours or a released BlinkDL file; any LoRA sizes, with or
    without blocks.0.att.v0/v1/v2), a PROJ_DIR (its newest weights, as chat.py picks them) or an
    exact-resume state. out_dir: missing, empty, or an earlier export (replaced whole); anything
    else is refused. `log` gets a line on the file picked and on what was written. Returns what
    was written; raises UserError for bad input, with nothing written.
    """
    out = Path(out_dir)
    src, note = find_weights(weights_path)
    if note:
        log(note)
    if not src.exists():
        raise UserError(f"{src} does not exist; expected an x070 .pth checkpoint (e.g. PROJ_DIR/rwkv-final.pth) or "
                        f"a PROJ_DIR that holds one.")
    _check_target(out)
    if out.resolve() == src.resolve() or out.resolve() in src.resolve().parents:
        raise UserError(f"OUT_DIR {out} holds the checkpoint {src}; give a folder of its own for the export.")
    sd = _load_checkpoint(src)
    cfg = ModelConfig.from_state_dict(sd, src)
    fla, extra = to_fla(sd, cfg)
    dtype = sd["emb.weight"].dtype
    res = ExportResult(out_dir=out, source=src, cfg=cfg, dtype=dtype)
    vocab = None
    res.vocab_file = vocab_file_for(src)
    if res.vocab_file is not None:  # a char-level model: its vocab.json is its tokenizer, as for chat.py
        res.vocabulary, res.char_vocab = "char", _char_vocab(res.vocab_file, src, cfg)
        res.notes.append(f"a char-level model: its vocabulary ({res.char_vocab.vocab_size} characters, "
                         f"{res.vocab_file}) is the tokenizer ({TOKENIZER_FILE}, a fast tokenizer with no code of "
                         f"its own); it has no end-of-document token, so config.json and generation_config.json "
                         f"name no bos / eos / pad token.")
    elif cfg.vocab_size >= WORLD_VOCAB_ROWS:
        vocab = _vocab_source()
        if vocab is None:
            raise UserError("cannot find the World vocabulary file rwkv_vocab_v20230424.txt to ship with the export; "
                            "install it with `pip install pyrwkv-tokenizer` (or `pip install -e .` in the repository "
                            "root).")
    else:
        res.vocabulary = "none"
        res.notes.append(f"vocab_size is {cfg.vocab_size}, not the World vocabulary's {WORLD_VOCAB_ROWS}, and there is "
                         f"no {VOCAB_JSON} beside {src}: no tokenizer files were written. For a char-level model, "
                         f"export its PROJ_DIR (or put the run's {VOCAB_JSON} beside the .pth) to ship its vocabulary; "
                         f"otherwise load a tokenizer that fits this model yourself.")
    if cfg.head_size != 64:
        res.notes.append(f"head size {cfg.head_size}: fla's GroupNorm (attn.g_norm) uses eps = head_dim * norm_eps = "
                         f"{cfg.head_size * 1e-5:g}, where RWKV-LM and the rwkv package use 64e-5; its outputs differ "
                         f"slightly from ours.")
    if cfg.n_layer == 1:
        res.notes.append("one layer: fla 0.6.0 cannot load it (RWKV7Attention's weight init divides by "
                         "num_hidden_layers - 1, a ZeroDivisionError in from_pretrained); the export is still "
                         "complete and imports back.")
    if any(sd[k].dtype != dtype for k in sd):
        res.notes.append("the checkpoint mixes dtypes; each tensor keeps its own in model.safetensors.")

    config = hf_config(cfg, dtype)
    special = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    if res.char_vocab is not None:  # no end-of-document token: id 0 is a character
        config.update(bos_token_id=None, eos_token_id=None)
        special = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    plan = [  # (file name, writer); the marker goes last
        ("config.json", lambda p: _write_json(config, p)),
        ("generation_config.json", lambda p: _write_json(special, p)),
        (MODEL_FILE, lambda p: _save_safetensors(fla, p)),
    ]
    if extra:
        plan.append((EXTRA_FILE, lambda p: _save_safetensors(extra, p)))
    if vocab is not None:
        plan += [(VOCAB_FILE, lambda p: _copy(vocab, p)),
                 (TOKENIZER_CODE, lambda p: _copy(Path(__file__).with_name(TOKENIZER_CODE), p)),
                 ("tokenizer_config.json", lambda p: _write_json(_tokenizer_config(), p))]
    if res.char_vocab is not None:
        vocab_bytes = res.vocab_file.read_bytes()  # read now: the copy is the file CharVocab.read checked
        plan += [(TOKENIZER_FILE, lambda p: _write_json(char_tokenizer_json(res.char_vocab), p)),
                 ("tokenizer_config.json", lambda p: _write_json(char_tokenizer_config(), p)),
                 (VOCAB_COPY, lambda p: _write_bytes(vocab_bytes, p))]
    plan += [("configuration_rwkv7.py", lambda p: _write_text(_CONFIG_STUB.format(fla=FLA_VERSION), p)),
             ("modeling_rwkv7.py", lambda p: _write_text(_MODEL_STUB.format(fla=FLA_VERSION), p)),
             ("README.md", lambda p: _write_text(_readme(res, res.vocabulary != "none", bool(extra)), p))]
    res.files = [name for name, _ in plan] + [MARKER]
    marker = {"format": MARKER_FORMAT, "version": 1, "source": str(src.resolve()), "model": cfg.describe(),
              "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "head_size": cfg.head_size, "vocab_size": cfg.vocab_size,
              "lora": "/".join(map(str, cfg.lora_sizes)), "layer0_v": cfg.layer0_v,
              "dtype": str(dtype).removeprefix("torch."), "fla_version": FLA_VERSION, "files": res.files,
              "vocabulary": res.vocabulary,
              **({"vocab_chars": res.char_vocab.vocab_size, "vocab_json": str(res.vocab_file.resolve())}
                 if res.char_vocab is not None else {}),
              "written": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}

    kept = (f"OUT_DIR {out} was not changed" if out.exists() else f"OUT_DIR {out} was not written")
    with explain_write_errors(out.absolute().parent, hint=OUT_HINT, kept=kept):
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
        remove_stale_stages(out.absolute())
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.{_host()}-{os.getpid()}-", suffix=".tmp",
                                      dir=out.absolute().parent))
        try:
            os.chmod(stage, 0o777 & ~_umask())
            for name, write in plan:
                write(stage / name)
            _write_json(marker, stage / MARKER)
            _swap_in(stage, out)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
    log(f"exported {src} ({cfg.describe()}, {str(dtype).removeprefix('torch.')}) to {out}: {', '.join(res.files)}")
    for n in res.notes:
        log(f"note: {n}")
    return res


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ============================================================================================
# Import
# ============================================================================================

def _read_safetensors(path: Path, where: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{where}: {path.name} is not a readable safetensors file ({str(e).splitlines()[0][:200]}); "
                        f"it may be cut short or damaged. Export it again.") from None


def _read_weights(hf: Path, where: str) -> dict:
    """The tensors of model.safetensors, or of the shards model.safetensors.index.json lists."""
    if (hf / MODEL_FILE).is_file():
        return _read_safetensors(hf / MODEL_FILE, where)
    if (hf / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((hf / INDEX_FILE).read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{where}: {INDEX_FILE} is not a valid index of safetensors shards ({e}).") from None
        tensors = {}
        for shard in shards:
            if not (hf / shard).is_file():
                raise UserError(f"{where}: {INDEX_FILE} lists the shard {shard}, which is missing.")
            tensors.update(_read_safetensors(hf / shard, where))
        return tensors
    present = sorted(p.name for p in hf.iterdir())
    bins = [n for n in present if n.endswith(".bin") or n.endswith(".pt")]
    hint = (f" It holds {', '.join(bins[:3])}: load it with transformers and save_pretrained() it "
            f"(safetensors is the default) first." if bins else "")
    raise UserError(f"{where}: no {MODEL_FILE} (or {INDEX_FILE} with its shards); expected the weights of an "
                    f"RWKV7ForCausalLM as safetensors. The folder holds: {', '.join(present[:8]) or 'nothing'}.{hint}")


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """t, copied when it is a view into a larger buffer (torch.save would write the whole buffer)."""
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        return t.clone()
    return t


def import_hf(hf_dir, out_path, log=print) -> Path:
    """Convert a Hugging Face folder of fla's RWKV7ForCausalLM (an export of export_hf, or any fla
    RWKV7 save with our layout's features) back to an x070 .pth that train.py --load_model,
    chat.py, evaluate.py and the rwkv pip package load. An export comes back bit-exact (keys,
    shapes, dtypes, values). A char-level model's vocabulary (rwkvlm_vocab.json byte for byte, else
    rebuilt from a character tokenizer.json) is written as vocab.json beside the .pth, before it;
    a vocab.json already there must be the same one (and none may be there for a model without
    one). Raises UserError for anything else (naming the field or tensor, what was found and what
    was expected), with nothing written. Returns the path of the .pth.
    """
    hf = Path(hf_dir)
    where = str(hf)
    if not hf.is_dir():
        raise UserError(f"HF_DIR {hf} " + ("is a file" if hf.exists() else "does not exist")
                        + "; expected a folder with config.json and model.safetensors (what export_hf.py writes).")
    cfg_file = hf / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"{where}: no config.json; expected a Hugging Face model folder (config.json, "
                        f"{MODEL_FILE}).")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{where}: config.json is not valid JSON ({e}).") from None
    if not isinstance(config, dict) or config.get("model_type") != "rwkv7":
        got = config.get("model_type") if isinstance(config, dict) else None
        raise UserError(f"{where}: config.json model_type is {got!r}; expected 'rwkv7' (flash-linear-attention's "
                        f"RWKV7ForCausalLM). Only RWKV-7 models convert to the x070 layout.")
    out = check_output_path(Path(out_path), "OUT.pth", example="rwkv-imported.pth")
    tensors = _read_weights(hf, where)
    extra = _read_safetensors(hf / EXTRA_FILE, where) if (hf / EXTRA_FILE).is_file() else {}
    odd = [k for k in extra if k not in EXTRA_KEYS]
    if odd:
        raise UserError(f"{where}: {EXTRA_FILE} holds {odd[0]} (shape {tuple(extra[odd[0]].shape)}); expected only "
                        f"{', '.join(EXTRA_KEYS)}.")
    cfg = config_from_hf(config, where, layer0_v=bool(extra))
    if config.get("tie_word_embeddings") and "lm_head.weight" not in tensors and "model.embeddings.weight" in tensors:
        tensors["lm_head.weight"] = tensors["model.embeddings.weight"].clone()  # tied: the head is the embedding
    want = fla_shapes(cfg)
    summary = (f"config.json: hidden_size {cfg.n_embd}, num_hidden_layers {cfg.n_layer}, vocab_size {cfg.vocab_size}, "
               f"head_dim {cfg.head_size}, decay/a/v/gate_low_rank_dim {'/'.join(map(str, cfg.lora_sizes))}")
    stray = {k: v for k, v in tensors.items() if k not in want}
    if stray:
        from_fla(stray, cfg.n_layer, where)  # names the first tensor with no place in the x070 layout
        name = next(iter(stray))
        raise UserError(f"{where}: unexpected tensor {name} (shape {tuple(stray[name].shape)}); an RWKV7ForCausalLM "
                        f"of this {summary} has no such tensor.")
    for name, shape in want.items():
        if name not in tensors:
            raise UserError(f"{where}: {MODEL_FILE} has no {name}; an RWKV7ForCausalLM of this {summary} has it, with "
                            f"shape {shape}.")
        if tuple(tensors[name].shape) != shape:
            raise UserError(f"{where}: {name} has shape {tuple(tensors[name].shape)}; expected {shape} from {summary}.")
    sd = from_fla(tensors, cfg.n_layer, where)
    sd.update(extra)
    ordered = {}
    for name, shape in state_dict_shapes(cfg).items():
        t = sd[name]
        if tuple(t.shape) != shape:  # only the extras can still disagree here
            raise UserError(f"{where}: {EXTRA_FILE}: {name} has shape {tuple(t.shape)}; expected {shape} ({summary}).")
        ordered[name] = _own_storage(t)
    ModelConfig.from_state_dict(ordered, out)  # the same check every loader of ours makes
    vocab, vocab_bytes, vocab_note = _import_vocab(hf, where, cfg)
    vocab_dest = _vocab_destination(out, vocab, cfg)
    kept = f"The file {out.name} was not changed" if out.exists() else f"The file {out.name} was not written"
    with explain_write_errors(out.absolute().parent, hint="choose another OUT.pth path on a disk with room for it",
                              kept=kept):
        if vocab_dest is not None:  # first: a vocab.json without weights is read by nothing
            with atomic_open(vocab_dest, "wb") as f:
                f.write(vocab_bytes)
        atomic_torch_save(ordered, out)
    log(f"imported {hf} ({cfg.describe()}) to {out}")
    if vocab is not None:
        where_vocab = vocab_dest or out.absolute().parent / VOCAB_JSON
        log(f"a char-level model: its vocabulary ({vocab.vocab_size} characters, {vocab_note}) is "
            f"{where_vocab}{'' if vocab_dest is not None else ' (already there, the same)'}")
    return out


def _import_vocab(hf: Path, where: str, cfg: ModelConfig):
    """(CharVocab, the bytes of its vocab.json, where it came from) of an export's char-level vocabulary:
    rwkvlm_vocab.json (byte for byte), else a character tokenizer.json (rebuilt, in vocab.json's format);
    (None, None, "") for the World vocabulary or none. UserError for a damaged or disagreeing one."""
    from_tok = None
    if (hf / TOKENIZER_FILE).is_file():
        from_tok = vocab_from_tokenizer_json(hf / TOKENIZER_FILE, where)
    if (hf / VOCAB_COPY).is_file():
        vocab = CharVocab.read(hf / VOCAB_COPY)
        if from_tok is not None and from_tok != vocab:
            raise UserError(f"{where}: {VOCAB_COPY} and {TOKENIZER_FILE} hold different character vocabularies "
                            f"({vocab.describe_difference(from_tok)}); export the model again. Nothing was written.")
        data, note = (hf / VOCAB_COPY).read_bytes(), f"{VOCAB_COPY}, byte for byte"
    elif from_tok is not None:
        vocab, note = from_tok, f"rebuilt from {TOKENIZER_FILE}"
        data = vocab.to_json().encode("utf-8")
    else:
        return None, None, ""
    if vocab.vocab_size > cfg.vocab_size:
        raise UserError(f"{where}: its character vocabulary ({note}) lists {vocab.vocab_size} characters, but the model "
                        f"has a vocabulary of {cfg.vocab_size} tokens (config.json vocab_size). Nothing was written.")
    return vocab, data, note


def _vocab_destination(out: Path, vocab: CharVocab | None, cfg: ModelConfig) -> Path | None:
    """Where the imported vocab.json goes (beside OUT.pth, where chat.py and evaluate.py look), or None
    when nothing is to be written. UserError when a vocab.json already there is another model's (or the
    imported model has none): the tools would read the .pth with it."""
    existing = vocab_file_for(out.absolute().parent)
    if existing is None:
        return out.absolute().parent / VOCAB_JSON if vocab is not None else None
    try:
        there = CharVocab.read(existing)
    except UserError:
        there = None
    if vocab is not None and there == vocab:
        return None
    what = (f"its own character vocabulary of {vocab.vocab_size} characters ({there.describe_difference(vocab)})"
            if vocab is not None and there is not None else
            "its own character vocabulary" if vocab is not None else
            f"no character vocabulary (vocab_size {cfg.vocab_size})")
    raise UserError(f"{existing} lies in the folder of {out.name}, and chat.py, evaluate.py and train.py would read the "
                    f"imported model with it, but the model has {what}. Import into a folder of its own (or move that "
                    f"vocab.json away). Nothing was written.")
