"""export_hf / import_hf (rwkvlm.hf): our x070 .pth <-> flash-linear-attention's RWKV7 folder, on the CPU.

- Round trips are bit-exact (keys, shapes, dtypes, values) for a trained-style checkpoint (block-0
  v params, formula LoRA sizes) and for the released layouts (no block-0 v params; the 0.1B and
  0.4B LoRA sizes at 2 layers), and config.json says what the state dict implies.
- The imported .pth loads in the `rwkv` pip package with the same logits as ours.
- Every bad input is refused with a message naming the key / field and shape, nothing written;
  a failure or a SIGKILL in the middle of an export leaves no folder under the final name.
- Where fla and transformers import (tests then need nothing else; they skip otherwise): the folder
  loads through AutoConfig / AutoModelForCausalLM / AutoTokenizer with trust_remote_code=True, and
  fla's own RWKV7ForCausalLM code (its PyTorch reference ops and a float64 WKV loop standing in for
  its Triton kernels, which need a GPU) gives our logits and our greedy generation. fla's kernels
  themselves are checked on a GPU by tests/test_hf_gpu.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rwkvlm.errors import UserError, run_cli
from rwkvlm.hf import export_hf, import_hf
from rwkvlm.hf.convert import EXTRA_FILE, MARKER, MODEL_FILE
from rwkvlm.hf.layout import EXTRA_KEYS, fla_shapes
from rwkvlm.model import RWKV7, ModelConfig, state_dict_shapes

from test_released import RELEASED, SMALL_LORA, check_parity, released_layout, small_released
from trainkit import perturbed_model

REPO = Path(__file__).resolve().parents[1]
KILLPOINT = REPO / "tests" / "killpoint.py"
EXPORT_SCRIPT = REPO / "RWKV-v7" / "export_hf.py"
IMPORT_SCRIPT = REPO / "RWKV-v7" / "import_hf.py"
QUIET = dict(log=lambda s: None)

# RWKV7Config.__init__'s fields in fla 0.6.0 (configuration_rwkv7.py); config.json writes each one
FLA_FIELDS = ("attn_mode", "hidden_size", "hidden_ratio", "intermediate_size", "num_hidden_layers", "head_dim",
              "num_heads", "decay_low_rank_dim", "gate_low_rank_dim", "a_low_rank_dim", "v_low_rank_dim",
              "hidden_act", "max_position_embeddings", "norm_first", "norm_bias", "norm_eps", "attn", "use_cache",
              "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "initializer_range",
              "fuse_norm", "fuse_cross_entropy", "fuse_linear_cross_entropy", "use_l2warp", "vocab_size",
              "value_dim")


# ---------------------------------------------------------------- checkpoints

def trained_style(path, dtype=torch.bfloat16, n_embd=128, vocab=300, seed=0, spec_init=False):
    """What this trainer saves: blocks.0.att.v0/v1/v2 present, formula LoRA sizes, one dtype. Random
    values (norm weights near 1), or with spec_init the spec's init moved off its zeros (slower:
    for runs whose logits matter)."""
    if spec_init:
        sd = perturbed_model(2, n_embd, vocab, seed=seed).state_dict()
    else:
        g = torch.Generator().manual_seed(seed)
        shapes = state_dict_shapes(ModelConfig(n_layer=2, n_embd=n_embd, vocab_size=vocab))
        sd = {k: torch.randn(s, generator=g) * 0.1 + (1.0 if ".ln" in k and k.endswith(".weight") else 0.0)
              for k, s in shapes.items()}
    sd = {k: v.to(dtype) for k, v in sd.items()}
    torch.save(sd, path)
    return sd


def released(path, name, vocab=512, n_layer=2, dtype=torch.bfloat16):
    """A random file in the layout of the released `name` (its n_embd and LoRA sizes), n_layer layers."""
    _, C, lora = RELEASED[name]
    g = torch.Generator().manual_seed(1)
    sd = released_layout(n_layer, C, lora, V=vocab, make=lambda s: (torch.randn(s, generator=g) * 0.1).to(dtype))
    torch.save(sd, path)
    return sd


def assert_same(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def load(path):
    return torch.load(path, weights_only=True)


def leftovers(folder: Path) -> list:
    """Temporary files or folders (ours end in .tmp) in `folder`."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_trained_checkpoint_round_trips_bit_exact(tmp_path, dtype):
    sd = trained_style(tmp_path / "rwkv-final.pth", dtype)
    res = export_hf(tmp_path / "rwkv-final.pth", tmp_path / "hf", **QUIET)
    out = tmp_path / "hf"
    assert res.cfg.layer0_v and (out / EXTRA_FILE).is_file()
    from safetensors.torch import load_file

    fla = load_file(out / MODEL_FILE)
    assert {k: tuple(v.shape) for k, v in fla.items()} == fla_shapes(res.cfg)
    assert all(v.dtype == dtype for v in fla.values())
    assert sorted(load_file(out / EXTRA_FILE)) == ["blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"]
    # the transforms: a LoRA matrix transposed, a (1, 1, C) vector flattened into a bias
    assert torch.equal(fla["model.layers.1.attn.w_lora.lora.0.weight"], sd["blocks.1.att.w1"].t())
    assert torch.equal(fla["model.layers.0.attn.a_lora.lora.2.bias"], sd["blocks.0.att.a0"].view(-1))
    assert torch.equal(fla["model.layers.0.pre_norm.weight"], sd["blocks.0.ln0.weight"])
    import_hf(out, tmp_path / "back.pth", **QUIET)
    back = load(tmp_path / "back.pth")
    assert_same(back, sd)
    assert list(back) == list(sd)  # and in our model's key order
    assert leftovers(tmp_path) == [] and leftovers(out) == []


@pytest.mark.parametrize("name", ["small", "0.1B", "0.4B"])
def test_released_layouts_round_trip_bit_exact(tmp_path, name):
    src = tmp_path / "rel.pth"
    sd = small_released(src, V=512) if name == "small" else released(src, name)
    res = export_hf(src, tmp_path / "hf", **QUIET)
    assert not res.cfg.layer0_v and not (tmp_path / "hf" / EXTRA_FILE).exists()
    want_lora = SMALL_LORA if name == "small" else RELEASED[name][2]
    assert res.cfg.lora_sizes == want_lora
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["decay_low_rank_dim"], config["a_low_rank_dim"], config["v_low_rank_dim"],
            config["gate_low_rank_dim"]) == want_lora
    import_hf(tmp_path / "hf", tmp_path / "back.pth", **QUIET)
    assert_same(load(tmp_path / "back.pth"), sd)


def test_config_json_says_what_the_state_dict_implies(tmp_path):
    trained_style(tmp_path / "a.pth", n_embd=192, vocab=65536)
    res = export_hf(tmp_path / "a.pth", tmp_path / "hf", **QUIET)
    cfg = ModelConfig.from_state_dict(load(tmp_path / "a.pth"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "rwkv7" and config["architectures"] == ["RWKV7ForCausalLM"]
    assert all(f in config for f in FLA_FIELDS)
    C, L = cfg.n_embd, cfg.n_layer
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (C, L, 65536)
    assert (config["head_dim"], config["num_heads"], config["intermediate_size"]) == (64, 3, 4 * C)
    assert (config["decay_low_rank_dim"], config["a_low_rank_dim"], config["v_low_rank_dim"],
            config["gate_low_rank_dim"]) == cfg.lora_sizes
    assert config["value_dim"] == [C] * L and config["tie_word_embeddings"] is False
    assert (config["norm_eps"], config["hidden_act"], config["norm_first"], config["norm_bias"]) == \
        (1e-5, "sqrelu", True, True)
    assert config["pad_token_id"] is None  # fla would make it the embedding's padding_idx
    assert (config["bos_token_id"], config["eos_token_id"], config["dtype"]) == (0, 0, "bfloat16")
    assert config["fuse_norm"] is True and config["attn"] is None and config["attn_mode"] == "chunk"
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    names = set(os.listdir(tmp_path / "hf"))
    assert {"rwkv_vocab_v20230424.txt", "tokenization_rwkv_world.py", "tokenizer_config.json", "README.md",
            "configuration_rwkv7.py", "modeling_rwkv7.py", MARKER} <= names
    assert sorted(json.loads((tmp_path / "hf" / MARKER).read_text())["files"]) == sorted(names)
    assert res.notes == []
    vocab = (tmp_path / "hf" / "rwkv_vocab_v20230424.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 65529 and vocab[0] == "1 '\\x00' 1"


def test_imported_pth_runs_in_rwkv_pip_like_ours(tmp_path):
    small_released(tmp_path / "rel.pth", V=512)
    export_hf(tmp_path / "rel.pth", tmp_path / "hf", **QUIET)
    import_hf(tmp_path / "hf", tmp_path / "imported.pth", **QUIET)
    m = check_parity(tmp_path / "imported.pth", tmp_path)  # rwkv pip vs ours, whole and token by token
    assert m.cfg.lora_sizes == SMALL_LORA and not m.cfg.layer0_v


def test_a_new_export_replaces_an_earlier_one(tmp_path):
    trained_style(tmp_path / "a.pth", seed=0)
    trained_style(tmp_path / "b.pth", seed=1)
    export_hf(tmp_path / "a.pth", tmp_path / "hf", **QUIET)
    (tmp_path / "hf" / "stray.txt").write_text("from before")
    export_hf(tmp_path / "b.pth", tmp_path / "hf", **QUIET)
    assert not (tmp_path / "hf" / "stray.txt").exists()  # replaced whole
    import_hf(tmp_path / "hf", tmp_path / "back.pth", **QUIET)
    assert_same(load(tmp_path / "back.pth"), load(tmp_path / "b.pth"))
    assert leftovers(tmp_path) == []


def test_fla_folders_not_made_here_import_too(exported, tmp_path):
    """fla's own conversion holds no rwkvlm_extra.safetensors (-> the released layout) and may tie
    the head to the embedding (-> head.weight = emb.weight)."""
    sd = load(tmp_path / "a.pth")
    (exported / EXTRA_FILE).unlink()
    (exported / MARKER).unlink()
    import_hf(exported, tmp_path / "no-extra.pth", **QUIET)
    got = load(tmp_path / "no-extra.pth")
    assert_same(got, {k: v for k, v in sd.items() if k not in EXTRA_KEYS})
    assert ModelConfig.from_state_dict(got).layer0_v is False
    _edit_weights(exported, lambda t: t.pop("lm_head.weight"))
    _edit_config(exported, tie_word_embeddings=True)
    import_hf(exported, tmp_path / "tied.pth", **QUIET)
    tied = load(tmp_path / "tied.pth")
    assert torch.equal(tied["head.weight"], sd["emb.weight"])


# ---------------------------------------------------------------- the scripts

def test_export_script_takes_a_proj_dir_and_import_script_writes_the_pth(tmp_path, cpu_env):
    proj = tmp_path / "proj"
    proj.mkdir()
    trained_style(proj / "rwkv-init.pth", seed=0)
    trained_style(proj / "rwkv-0.pth", seed=1)
    newest = trained_style(proj / "rwkv-1.pth", seed=2)
    r = subprocess.run([sys.executable, str(EXPORT_SCRIPT), str(proj), str(tmp_path / "hf")], env=cpu_env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "rwkv-1.pth" in r.stdout and "exported" in r.stdout
    assert json.loads((tmp_path / "hf" / MARKER).read_text())["source"] == str((proj / "rwkv-1.pth").resolve())
    assert run_cli(__import__("rwkvlm.hf.cli", fromlist=["x"]).import_main,
                   [str(tmp_path / "hf"), str(tmp_path / "back.pth")]) == 0
    assert_same(load(tmp_path / "back.pth"), newest)


def test_scripts_print_one_error_and_exit_nonzero(tmp_path, capsys):
    from rwkvlm.hf.cli import export_main, import_main

    torch.save({"foo": torch.zeros(3)}, tmp_path / "x.pth")
    assert run_cli(export_main, [str(tmp_path / "x.pth"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ERROR:") and "no emb.weight" in err and len(err.splitlines()) == 1
    assert run_cli(import_main, [str(tmp_path / "nothing"), str(tmp_path / "o.pth")]) == 2
    assert "does not exist" in capsys.readouterr().err
    for main in (export_main, import_main):
        with pytest.raises(SystemExit) as e:
            main(["--help"])
        assert e.value.code == 0
        assert "RWKV-v7/docs/huggingface.md" in capsys.readouterr().out


# ---------------------------------------------------------------- bad input

def _x060(path):
    from rwkvlm.model.rwkv6 import Rwkv6Config, state_dict_shapes_x060

    torch.save({k: torch.zeros(s) for k, s in state_dict_shapes_x060(Rwkv6Config(n_layer=1, n_embd=64,
                                                                                  vocab_size=50)).items()}, path)


def _lora_disagrees(path):
    sd = trained_style(path)
    sd["blocks.0.att.w2"] = torch.zeros(48, 128, dtype=torch.bfloat16)  # w1 is (128, 32)
    torch.save(sd, path)


def _heads_do_not_divide(path):
    sd = trained_style(path)
    for l in range(2):
        sd[f"blocks.{l}.att.r_k"] = torch.zeros(3, 40, dtype=torch.bfloat16)  # 120 != n_embd 128
    torch.save(sd, path)


BAD_CHECKPOINTS = {
    "a random dict": (lambda p: torch.save({"foo": torch.zeros(2, 2), "bar": torch.ones(3)}, p),
                      ["no emb.weight", "foo"]),
    "an x060 checkpoint": (_x060, ["blocks.0.att.r_k", "time_", "RWKV-4/5/6", "x070"]),
    "a LoRA pair that disagrees": (_lora_disagrees, ["blocks.0.att.w1", "(128, 32)", "blocks.0.att.w2", "(32, 128)",
                                                     "(48, 128)"]),
    "heads that do not divide n_embd": (_heads_do_not_divide, ["blocks.0.att.r_k", "(3, 40)", "128"]),
    "not a torch file": (lambda p: p.write_text("hello"), ["not a plain weights file"]),
}


@pytest.mark.parametrize("what", list(BAD_CHECKPOINTS))
def test_bad_checkpoints_are_refused_with_nothing_written(tmp_path, what):
    make, words = BAD_CHECKPOINTS[what]
    make(tmp_path / "bad.pth")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(UserError) as e:
        export_hf(tmp_path / "bad.pth", tmp_path / "hf", **QUIET)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert sorted(os.listdir(tmp_path)) == before  # no OUT_DIR, no temporaries


def test_missing_checkpoint_and_bad_out_dirs_are_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        export_hf(tmp_path / "nope.pth", tmp_path / "hf", **QUIET)
    trained_style(tmp_path / "a.pth")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"not empty and holds no earlier export .*notes.txt"):
        export_hf(tmp_path / "a.pth", busy, **QUIET)
    assert os.listdir(busy) == ["notes.txt"] and (busy / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        export_hf(tmp_path / "a.pth", tmp_path / "file", **QUIET)
    (tmp_path / "empty").mkdir()
    export_hf(tmp_path / "a.pth", tmp_path / "empty", **QUIET)  # an empty folder is fine
    assert (tmp_path / "empty" / MARKER).is_file()


@pytest.fixture
def exported(tmp_path):
    trained_style(tmp_path / "a.pth")
    export_hf(tmp_path / "a.pth", tmp_path / "hf", **QUIET)
    return tmp_path / "hf"


def _edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _edit_weights(folder, fn):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / MODEL_FILE)
    fn(tensors)
    save_file(tensors, str(folder / MODEL_FILE), metadata={"format": "pt"})


BAD_FOLDERS = {
    "another model type": (lambda d: _edit_config(d, model_type="llama"), ["model_type is 'llama'", "rwkv7"]),
    "no safetensors": (lambda d: (d / MODEL_FILE).unlink(), ["no model.safetensors", "config.json"]),
    "cut-short safetensors": (lambda d: (d / MODEL_FILE).write_bytes((d / MODEL_FILE).read_bytes()[:5000]),
                              ["model.safetensors is not a readable safetensors file"]),
    "config and tensors disagree": (lambda d: _edit_config(d, decay_low_rank_dim=64),
                                    ["model.layers.0.attn.w_lora.lora.0.weight has shape (32, 128)", "(64, 128)",
                                     "decay/a/v/gate_low_rank_dim 64/32/32/64"]),
    "an unexpected tensor": (lambda d: _edit_weights(d, lambda t: t.update({"model.layers.0.attn.q_proj.weight":
                                                                             torch.zeros(4, 4)})),
                             ["unexpected tensor model.layers.0.attn.q_proj.weight", "(4, 4)"]),
    "a missing tensor": (lambda d: _edit_weights(d, lambda t: t.pop("model.layers.1.attn.k_k")),
                         ["no model.layers.1.attn.k_k", "(128,)"]),
    "another value_dim": (lambda d: _edit_config(d, value_dim=256), ["value_dim is 256"]),
    "no config.json": (lambda d: (d / "config.json").unlink(), ["no config.json"]),
}


@pytest.mark.parametrize("what", list(BAD_FOLDERS))
def test_bad_hf_folders_are_refused_with_nothing_written(exported, what):
    change, words = BAD_FOLDERS[what]
    change(exported)
    before = sorted(os.listdir(exported.parent))
    with pytest.raises(UserError) as e:
        import_hf(exported, exported.parent / "out.pth", **QUIET)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert sorted(os.listdir(exported.parent)) == before


# ---------------------------------------------------------------- failures and kills mid-write

def test_a_failure_mid_export_leaves_nothing_under_the_final_name(tmp_path, monkeypatch):
    import rwkvlm.hf.convert as convert

    trained_style(tmp_path / "a.pth", seed=0)
    trained_style(tmp_path / "b.pth", seed=1)
    real = convert._save_safetensors

    def half_then_fail(tensors, path):
        path.write_bytes(b"partial")
        raise OSError("simulated failure while writing")

    monkeypatch.setattr(convert, "_save_safetensors", half_then_fail)
    with pytest.raises(OSError, match="simulated"):
        export_hf(tmp_path / "a.pth", tmp_path / "hf", **QUIET)
    assert not (tmp_path / "hf").exists() and leftovers(tmp_path) == []

    monkeypatch.setattr(convert, "_save_safetensors", real)
    export_hf(tmp_path / "a.pth", tmp_path / "hf", **QUIET)
    before = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}
    monkeypatch.setattr(convert, "_save_safetensors", half_then_fail)
    with pytest.raises(OSError, match="simulated"):
        export_hf(tmp_path / "b.pth", tmp_path / "hf", **QUIET)  # over the earlier export
    assert {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()} == before  # untouched
    assert leftovers(tmp_path) == []


def test_a_failure_mid_import_writes_no_pth(exported, monkeypatch):
    import rwkvlm.atomic as atomic

    def fail(obj, f):
        f.write(b"partial")
        raise OSError("simulated failure while writing")

    monkeypatch.setattr(atomic.torch if hasattr(atomic, "torch") else torch, "save", fail)
    with pytest.raises(OSError, match="simulated"):
        import_hf(exported, exported.parent / "out.pth", **QUIET)
    assert not (exported.parent / "out.pth").exists() and leftovers(exported.parent) == []


@pytest.mark.parametrize("moment", ["replace:model.safetensors:1",
                                    "replace:.hf.*.tmp:1"])
def test_sigkill_mid_export_never_leaves_a_partial_folder(tmp_path, cpu_env, moment):
    """SIGKILL (no clean-up of any kind) while the model file (in the temporary folder) or the
    move of the earlier export aside is about to be renamed: under the name OUT_DIR there is the
    earlier export or nothing; the next export removes the dead one's temporary folder."""
    trained_style(tmp_path / "a.pth", seed=0)
    trained_style(tmp_path / "b.pth", seed=1)
    out = tmp_path / "hf"
    export_hf(tmp_path / "a.pth", out, **QUIET)
    earlier = {p.name: p.read_bytes() for p in out.iterdir()}
    r = subprocess.run([sys.executable, str(KILLPOINT), "--kill", moment, str(EXPORT_SCRIPT), str(tmp_path / "b.pth"),
                        str(out)], env=cpu_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, (r.returncode, r.stderr[-2000:])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier
    assert leftovers(tmp_path)  # the dead export's folder
    export_hf(tmp_path / "b.pth", out, **QUIET)
    assert leftovers(tmp_path) == []
    import_hf(out, tmp_path / "back.pth", **QUIET)
    assert_same(load(tmp_path / "back.pth"), load(tmp_path / "b.pth"))


# ---------------------------------------------------------------- char-level models (vocab.json)

CHAR_TEXTS = ["User: 12 + 7 = ?\n\nAssistant: 12 + 7 = 19", "壹贰叁 １２３ e\u0301 👩‍👩‍👧\ttabs  \n\n\n", " ", ""]


def char_proj(folder: Path, vocab_size=None, ascii_json=True):
    """A PROJ_DIR of a char-level model: rwkv-final.pth (trained-style, fp32) and a vocab.json of the
    characters of CHAR_TEXTS (written escaped, as json.dumps writes by default: not CharVocab's own
    bytes, so that a byte-for-byte copy shows). Returns (state dict, vocab, the vocab.json bytes)."""
    from rwkvlm.data.charvocab import CharVocab

    vocab = CharVocab.build(CHAR_TEXTS)
    folder.mkdir(parents=True, exist_ok=True)
    sd = trained_style(folder / "rwkv-final.pth", torch.float32, vocab=vocab_size or vocab.vocab_size)
    text = json.dumps({str(i): c for i, c in enumerate(vocab.chars)}, ensure_ascii=ascii_json)
    (folder / "vocab.json").write_text(text)
    return sd, vocab, (folder / "vocab.json").read_bytes()


def test_char_model_exports_its_vocabulary_as_a_tokenizer_and_imports_back_bit_exact(tmp_path):
    from rwkvlm.hf.chartok import TOKENIZER_FILE, VOCAB_COPY

    sd, vocab, raw = char_proj(tmp_path / "proj")
    res = export_hf(tmp_path / "proj", tmp_path / "hf", **QUIET)  # the PROJ_DIR: rwkv-final.pth and vocab.json
    hf = tmp_path / "hf"
    assert res.vocabulary == "char" and res.char_vocab == vocab
    names = set(os.listdir(hf))
    assert {TOKENIZER_FILE, "tokenizer_config.json", VOCAB_COPY} <= names
    assert not {"rwkv_vocab_v20230424.txt", "tokenization_rwkv_world.py"} & names
    marker = json.loads((hf / MARKER).read_text())
    assert sorted(marker["files"]) == sorted(names)
    assert (marker["vocabulary"], marker["vocab_chars"]) == ("char", vocab.vocab_size)
    assert (hf / VOCAB_COPY).read_bytes() == raw
    config = json.loads((hf / "config.json").read_text())
    assert (config["vocab_size"], config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == \
        (vocab.vocab_size, None, None, None)  # id 0 is a character, no end of document
    assert json.loads((hf / "generation_config.json").read_text()) == \
        {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    tok_config = json.loads((hf / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast" and "auto_map" not in tok_config
    assert not {"bos_token", "eos_token", "pad_token", "unk_token"} & set(tok_config)
    table = json.loads((hf / TOKENIZER_FILE).read_text(encoding="utf-8"))["model"]["vocab"]
    assert table == {c: i for i, c in enumerate(vocab.chars)}
    readme = (hf / "README.md").read_text()
    assert "char-level model" in readme and "stop_strings" in readme and any("char-level" in n for n in res.notes)

    (tmp_path / "back").mkdir()
    import_hf(hf, tmp_path / "back" / "rwkv-imported.pth", **QUIET)
    assert_same(load(tmp_path / "back" / "rwkv-imported.pth"), sd)
    assert (tmp_path / "back" / "vocab.json").read_bytes() == raw  # byte for byte, beside the .pth
    from rwkvlm.infer.generate import load_model

    model = load_model(tmp_path / "back" / "rwkv-imported.pth", "cpu", log=lambda m: None)
    assert model.tokenizer == vocab  # chat.py and evaluate.py read it there
    import_hf(hf, tmp_path / "back" / "again.pth", **QUIET)  # the same vocab.json there: kept, not refused
    assert (tmp_path / "back" / "vocab.json").read_bytes() == raw


def test_tokenizer_json_encodes_as_the_char_vocabulary(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from rwkvlm.hf.chartok import TOKENIZER_FILE

    _, vocab, _ = char_proj(tmp_path / "proj")
    export_hf(tmp_path / "proj" / "rwkv-final.pth", tmp_path / "hf", **QUIET)
    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "hf" / TOKENIZER_FILE))
    for t in CHAR_TEXTS + ["".join(reversed(vocab.chars))]:
        ids = tok.encode(t).ids
        assert ids == vocab.encode(t).tolist(), t
        assert tok.decode(ids) == t
    assert tok.get_vocab_size() == vocab.vocab_size
    with pytest.raises(Exception, match="Missing \\[UNK\\] token"):  # a character the model does not know
        tok.encode("xyz")


def test_char_import_rebuilds_the_vocabulary_from_tokenizer_json_and_refuses_a_clash(tmp_path):
    from rwkvlm.data.charvocab import CharVocab
    from rwkvlm.hf.chartok import TOKENIZER_FILE, VOCAB_COPY

    sd, vocab, raw = char_proj(tmp_path / "proj")
    export_hf(tmp_path / "proj", tmp_path / "hf", **QUIET)
    hf = tmp_path / "hf"
    # a folder re-saved elsewhere may keep tokenizer.json only: the vocabulary comes back in vocab.json's format
    (hf / VOCAB_COPY).rename(tmp_path / "copy.json")
    (tmp_path / "b").mkdir()
    import_hf(hf, tmp_path / "b" / "m.pth", **QUIET)
    assert CharVocab.read(tmp_path / "b" / "vocab.json") == vocab
    assert (tmp_path / "b" / "vocab.json").read_text(encoding="utf-8") == vocab.to_json()
    (tmp_path / "copy.json").rename(hf / VOCAB_COPY)

    def refused(out: Path, *needles):
        before = sorted(p.name for p in out.parent.iterdir())
        with pytest.raises(UserError) as e:
            import_hf(hf, out, **QUIET)
        for n in needles:
            assert n in str(e.value), str(e.value)
        assert sorted(p.name for p in out.parent.iterdir()) == before  # nothing written

    other = tmp_path / "other"  # another model's vocab.json where the .pth would go
    other.mkdir()
    (other / "vocab.json").write_text(CharVocab(list("ab")).to_json())
    refused(other / "m.pth", "would read the imported model with it", "Nothing was written")
    world = tmp_path / "world"  # a World-vocabulary import beside a vocab.json
    trained_style(tmp_path / "w.pth", vocab=65536, n_embd=64)
    export_hf(tmp_path / "w.pth", world, **QUIET)
    with pytest.raises(UserError, match="no character vocabulary"):
        import_hf(world, other / "w.pth", **QUIET)
    assert not (other / "w.pth").exists()
    # tokenizer.json and rwkvlm_vocab.json that disagree
    t = json.loads((hf / TOKENIZER_FILE).read_text(encoding="utf-8"))
    chars = list(t["model"]["vocab"])
    t["model"]["vocab"] = {c: i for i, c in enumerate(chars[:-1])}
    (hf / TOKENIZER_FILE).write_text(json.dumps(t, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "c").mkdir()
    refused(tmp_path / "c" / "m.pth", "hold different character vocabularies")


def test_char_export_refuses_a_vocab_json_of_another_model(tmp_path):
    char_proj(tmp_path / "proj", vocab_size=8)  # 8 rows, more characters than that
    with pytest.raises(UserError, match="belongs to another model"):
        export_hf(tmp_path / "proj", tmp_path / "hf", **QUIET)
    assert not (tmp_path / "hf").exists() and leftovers(tmp_path) == []
    # without vocab.json a small vocabulary exports weights only, and says how to ship a char vocabulary
    (tmp_path / "proj" / "vocab.json").unlink()
    res = export_hf(tmp_path / "proj", tmp_path / "hf", **QUIET)
    assert res.vocabulary == "none" and not (tmp_path / "hf" / "tokenizer.json").exists()
    assert any("no vocab.json beside" in n and "export its PROJ_DIR" in n for n in res.notes)


# ---------------------------------------------------------------- fla and transformers, where installed

def _fla_importable() -> bool:
    import importlib

    try:
        importlib.import_module("transformers")
        importlib.import_module("fla.models.rwkv7")
    except Exception:
        return False
    return True


needs_fla = pytest.mark.skipif(not _fla_importable(), reason="needs flash-linear-attention and transformers")


# fla's model code on the CPU: its Triton kernels replaced by PyTorch (rwkvlm/hf/cpu.py); load models with
# fuse_norm=False (nn.LayerNorm / nn.GroupNorm) inside the context
from rwkvlm.hf.cpu import cpu_ready, fla_on_cpu  # noqa: E402


@pytest.fixture(scope="module")
def fla_folder(tmp_path_factory):
    """A spec-initialised (then perturbed) trained-style model, fp32, and its export."""
    d = tmp_path_factory.mktemp("fla")
    sd = trained_style(d / "a.pth", torch.float32, vocab=512, spec_init=True)
    export_hf(d / "a.pth", d / "hf", **QUIET)
    return d / "a.pth", d / "hf", sd


@pytest.fixture(scope="module")
def world_folder(tmp_path_factory):
    """An export of a World-vocabulary model (random weights): it ships the tokenizer."""
    d = tmp_path_factory.mktemp("world")
    trained_style(d / "a.pth", vocab=65536)
    export_hf(d / "a.pth", d / "hf", **QUIET)
    return d / "hf"


@needs_fla
def test_transformers_auto_classes_load_the_folder_with_remote_code(world_folder):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from fla.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM

    hf = world_folder
    config = AutoConfig.from_pretrained(hf, trust_remote_code=True)
    assert type(config) is RWKV7Config
    raw = json.loads((hf / "config.json").read_text())
    import inspect

    assert set(FLA_FIELDS) == set(inspect.signature(RWKV7Config.__init__).parameters) - {"self", "kwargs"}
    for f in FLA_FIELDS:
        assert getattr(config, f) == raw[f], f
    model = AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True, dtype=torch.float32)
    assert type(model) is RWKV7ForCausalLM
    want = load_file(hf / MODEL_FILE)
    got = model.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


@needs_fla
@pytest.mark.parametrize("layout", ["trained", "released"])
def test_fla_model_code_gives_our_logits_and_greedy_text(fla_folder, tmp_path, layout):
    from fla.models.rwkv7 import RWKV7ForCausalLM

    if layout == "trained":
        src, hf, sd = fla_folder
    else:
        src, hf = tmp_path / "rel.pth", tmp_path / "hf"
        sd = {k: v.float() for k, v in small_released(src, V=512).items()}
        export_hf(src, hf, **QUIET)
    ours = RWKV7(ModelConfig.from_state_dict(sd))
    ours.load_state_dict(sd)
    ours.eval()
    idx = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    with fla_on_cpu(), torch.no_grad():
        model = cpu_ready(RWKV7ForCausalLM.from_pretrained(hf, dtype=torch.float32, fuse_norm=False)).eval()
        want = ours(idx)
        scale = want.abs().max().item()
        assert scale > 1.0
        got = model(idx, use_cache=False).logits  # no grad, T < 64: fla's recurrent path
        assert (got - want).abs().max().item() < 1e-5 * scale
        with torch.enable_grad():  # fla's chunked path
            got = model(idx, use_cache=False).logits.detach()
        assert (got - want).abs().max().item() < 1e-5 * scale
        first = model(idx[:, :5], use_cache=True)  # fla's cache: pieces give the whole
        rest = model(idx[:, 5:], past_key_values=first.past_key_values, use_cache=True)
        assert (torch.cat([first.logits, rest.logits], 1) - want).abs().max().item() < 1e-5 * scale

        prompt = idx[:1, :7]
        model.generation_config.eos_token_id = None  # run all 10 steps, through token 0 (end of document)
        gen = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True,
                             attention_mask=torch.ones_like(prompt))
        seq = prompt
        for _ in range(10):
            seq = torch.cat([seq, ours(seq)[:, -1:].argmax(-1)], 1)
        assert gen.tolist() == seq.tolist(), "fla's greedy generation (its recurrent cache) differs from ours; " \
            "transformers >= 5.24 passes the cache as `cache=`, which fla 0.6.0 does not read"


@needs_fla
def test_parity_figures_run_off_the_gpu_with_the_stand_ins(fla_folder):
    """rwkvlm.hf.parity (the GPU check) on the CPU: fla in fp32 matches, fla in bf16 is within bf16 noise."""
    from rwkvlm.hf.parity import fla_parity

    src, hf, _ = fla_folder
    with fla_on_cpu():
        fig = fla_parity(src, hf, n_tokens=24, gen_tokens=6, prompt_tokens=8, device="cpu",
                         fla_overrides={"fuse_norm": False}, prepare_fla=cpu_ready)
    assert fig["rel_rms"]["fla_fp32"] < 1e-5
    assert fig["rel_rms"]["fla_bf16"] < 3e-2 and fig["rel_rms"]["ours_bf16"] < 3e-2
    assert fig["greedy"]["consistent"] == fig["greedy"]["n"] == 6
    from rwkvlm.hf.parity import failures

    assert failures(fig) == []


@needs_fla
def test_tokenizer_loads_with_remote_code_and_matches_ours(world_folder):
    from transformers import AutoTokenizer

    from rwkvlm.data.tokenizer import get_tokenizer

    hf = world_folder
    tok = AutoTokenizer.from_pretrained(hf, trust_remote_code=True)
    ours = get_tokenizer()
    texts = ["User: 12 + 7 = ?\n\nAssistant: 12 + 7 = 19", "壹贰叁 中文 １２３ −4.5",
             "emoji 👩‍👩‍👧 and\ttabs  \n\n\n",
             "<|endoftext|> spelled out", " " * 300 + "x", ""]
    for t in texts:
        ids = tok.encode(t)
        assert ids == ours.encode(t), t
        assert tok.decode(ids) == t
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (0, 0, 0)
    assert tok("hi").input_ids == ours.encode("hi")  # nothing added around a text
    assert tok.decode([0, 33], skip_special_tokens=True) == " "
    assert tok.decode([65535]) == "\ufffd"


@needs_fla
def test_char_export_loads_with_auto_tokenizer_and_fla_gives_our_logits(tmp_path):
    from transformers import AutoTokenizer

    from fla.models.rwkv7 import RWKV7ForCausalLM

    _, vocab, _ = char_proj(tmp_path / "proj")
    sd = {k: v.float() for k, v in perturbed_model(2, 128, vocab.vocab_size, seed=3).state_dict().items()}
    torch.save(sd, tmp_path / "proj" / "rwkv-final.pth")
    export_hf(tmp_path / "proj", tmp_path / "hf", **QUIET)
    for trust in (True, False):
        tok = AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=trust)
        assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (None, None, None) and len(tok) == \
            vocab.vocab_size
        for t in CHAR_TEXTS:
            assert tok(t).input_ids == vocab.encode(t).tolist(), t
            assert tok.decode(tok(t).input_ids) == t
            assert tok.decode(tok(t).input_ids, skip_special_tokens=True) == t  # no character is special
    ours = RWKV7(ModelConfig.from_state_dict(sd))
    ours.load_state_dict(sd)
    ours.eval()
    idx = tok(CHAR_TEXTS[0], return_tensors="pt").input_ids
    with fla_on_cpu(), torch.no_grad():
        model = cpu_ready(RWKV7ForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32,
                                                           fuse_norm=False)).eval()
        want = ours(idx)
        got = model(idx, use_cache=False).logits
        assert (got - want).abs().max().item() < 1e-5 * want.abs().max().item()
        gen = model.generate(idx[:, :8], max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(idx[:, :8]))
        assert gen.shape[1] == 14  # no eos: all 6 tokens, through id 0 (a character)


# ---------------------------------------------------------------- the lm-eval task of the held-out set

def test_lmeval_task_folder_holds_evaluate_pys_prompts_and_answers(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import lmeval_arith_task as task
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    from rwkvlm.data.arithmetic import format_prompt, make_eval_set

    assert task.main([str(tmp_path / "task"), "--n", "16"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "task" / task.DATA).read_text(encoding="utf-8").splitlines()]
    items = make_eval_set(16, 0)
    assert [(r["question"], r["answer"], r["kind"]) for r in rows] == [(i.question, i.answer, i.kind) for i in items]
    assert all(r["prompt"] == format_prompt(r["question"]) for r in rows)
    assert task.last_number("5 - (-3) = 8") == "8" and task.last_number("1 - 393 = -392") == "-392"
    assert task.last_number("x = 3.45 + 13.6 = 17.05") == "17.05"
    yaml = pytest.importorskip("yaml")
    exact = yaml.safe_load((tmp_path / "task" / "rwkv_arith.yaml").read_text())
    number = yaml.safe_load((tmp_path / "task" / "rwkv_arith_number.yaml").read_text())
    assert exact["task"] == "rwkv_arith" and exact["output_type"] == "generate_until"
    assert exact["dataset_kwargs"]["data_files"]["test"] == str((tmp_path / "task" / task.DATA).resolve())
    assert exact["generation_kwargs"]["until"] == ["\n\n"] and exact["doc_to_text"] == "{{prompt}}"
    assert exact["doc_to_target"] == "{{answer}}" and number["doc_to_target"] == "{{number}}"
    regex = number["filter_list"][0]["filter"][0]
    assert regex["function"] == "regex" and regex["group_select"] == -1
    import re

    assert re.findall(regex["regex_pattern"], " 52.9 + 89.2 = 142.1")[-1] == "142.1"


def test_a_one_layer_export_says_fla_cannot_load_it(tmp_path):
    torch.save(perturbed_model(1, 64, 300).state_dict(), tmp_path / "a.pth")
    res = export_hf(tmp_path / "a.pth", tmp_path / "hf", **QUIET)
    assert any("one layer: fla 0.6.0 cannot load it" in n for n in res.notes)
    import_hf(tmp_path / "hf", tmp_path / "back.pth", **QUIET)
    assert_same(load(tmp_path / "back.pth"), load(tmp_path / "a.pth"))
