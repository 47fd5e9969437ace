"""Checkpoints in the layout of the released RWKV-7 files, without downloading any.

The released x070 files (BlinkDL's rwkv-7-world / rwkv7-g1 .pth) differ from what this trainer's
rwkv-init.pth holds in two ways: their LoRA sizes come from RWKV-LM's formula of before July 2025,
and layer 0 holds no att.v0/v1/v2 (it never uses them). Here: the five released sizes' exact shape
tables read by ModelConfig.from_state_dict (meta tensors, nothing allocated); a small model in the
released layout with LoRA sizes unlike the formula that loads, trains a step through train.py
--load_model, saves in the same layout, resumes exactly, and matches the `rwkv` pip package's logits
(whole and token by token); and the bad inputs, each refused with the key and shape, nothing written.
"""
import os
import subprocess
import sys

import pytest
import torch

from rwkvlm.errors import UserError
from rwkvlm.model import ModelConfig, RWKV7, count_params, state_dict_shapes

from trainkit import make_dataset, run_args, snapshot

# The released sizes and their LoRA sizes (decay w / aaa a / value v / gate g).
# Source: RWKV-LM (github.com/BlinkDL/RWKV-LM), RWKV-v5/src/model.py (RWKV_Tmix_x070) and
# RWKV-v7/train_temp/src/model.py before commit 1f5d52a (2025-07-06), with which the released
# files were trained:
#     D_DECAY_LORA = D_AAA_LORA = max(32, int(round(1.8 * C**0.5 / 32)) * 32)
#     D_MV_LORA                 = max(32, int(round(1.3 * C**0.5 / 32)) * 32)
#     D_GATE_LORA               = max(32, int(round(0.6 * C**0.8 / 32)) * 32)
# (the current formula, 2.5 / 2.5 / 1.7 / 5.0 * sqrt(C), is rwkv7._lora_dim's). The 0.1B row is also
# RWKV-v7/rwkv_v7_demo.py's constants for RWKV-x070-World-0.1B (64/64/32/128); the 1.5B's 96/96/.../256
# and the 0.4B's value LoRA of 32 are the known differences from the current formula.
RELEASED = {  # name: (n_layer, n_embd, (Dw, Da, Dv, Dg))
    "0.1B": (12, 768, (64, 64, 32, 128)),
    "0.4B": (24, 1024, (64, 64, 32, 160)),
    "1.5B": (24, 2048, (96, 96, 64, 256)),
    "2.9B": (32, 2560, (96, 96, 64, 320)),
    "7.2B": (32, 4096, (128, 128, 96, 480)),
}
VOCAB = 65536  # the World vocabulary


def _old_formula(C):
    return (max(32, int(round(1.8 * C ** 0.5 / 32)) * 32),) * 2 + (
        max(32, int(round(1.3 * C ** 0.5 / 32)) * 32), max(32, int(round(0.6 * C ** 0.8 / 32)) * 32))


def released_layout(L, C, lora, V=VOCAB, N=64, make=None):
    """The names and shapes of a released x070 file, written out here from the format (not from
    rwkv7.state_dict_shapes): no blocks.0.att.v0/v1/v2. `make(shape)` makes each tensor."""
    make = make or (lambda shape: torch.empty(shape, device="meta"))
    Dw, Da, Dv, Dg = lora
    sd = {"emb.weight": (V, C)}
    for l in range(L):
        b = f"blocks.{l}."
        if l == 0:
            sd.update({b + "ln0.weight": (C,), b + "ln0.bias": (C,)})
        sd.update({b + "ln1.weight": (C,), b + "ln1.bias": (C,), b + "ln2.weight": (C,), b + "ln2.bias": (C,)})
        att = {f"x_{x}": (1, 1, C) for x in "rwkvag"}
        att.update({"w0": (1, 1, C), "w1": (C, Dw), "w2": (Dw, C), "a0": (1, 1, C), "a1": (C, Da), "a2": (Da, C),
                    "g1": (C, Dg), "g2": (Dg, C), "k_k": (1, 1, C), "k_a": (1, 1, C), "r_k": (C // N, N),
                    "receptance.weight": (C, C), "key.weight": (C, C), "value.weight": (C, C),
                    "output.weight": (C, C), "ln_x.weight": (C,), "ln_x.bias": (C,)})
        if l > 0:
            att.update({"v0": (1, 1, C), "v1": (C, Dv), "v2": (Dv, C)})
        sd.update({b + "att." + k: v for k, v in att.items()})
        sd.update({b + "ffn.x_k": (1, 1, C), b + "ffn.key.weight": (4 * C, C), b + "ffn.value.weight": (C, 4 * C)})
    sd.update({"ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)})
    return {k: make(v) for k, v in sd.items()}


# ---------------------------------------------------------------- the five released shape tables

@pytest.mark.parametrize("name", list(RELEASED))
def test_released_shapes_are_read_from_the_file(name):
    L, C, lora = RELEASED[name]
    assert _old_formula(C) == lora  # the table is the pre-July-2025 formula
    sd = released_layout(L, C, lora)
    cfg = ModelConfig.from_state_dict(sd, name)
    assert (cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.head_size) == (L, C, VOCAB, 64)
    assert cfg.lora_sizes == lora and cfg.layer0_v is False
    assert state_dict_shapes(cfg) == {k: tuple(v.shape) for k, v in sd.items()}
    assert count_params(cfg) == sum(v.numel() for v in sd.values())
    if name in ("0.4B", "1.5B", "2.9B", "7.2B"):
        assert not cfg.lora_is_formula  # a model built by the formula would not fit these files
        with pytest.raises(UserError):
            ModelConfig.from_state_dict({**sd, "blocks.0.att.v0": torch.empty(1, 1, C, device="meta")}, name)


def test_a_formula_sized_checkpoint_gives_the_default_config():
    m = RWKV7(ModelConfig(n_layer=2, n_embd=128, vocab_size=300))
    cfg = ModelConfig.from_state_dict(m.state_dict())
    assert cfg == ModelConfig(n_layer=2, n_embd=128, vocab_size=300)  # lora_* None, layer0_v True


# ---------------------------------------------------------------- a small model in the released layout

SMALL_LORA = (64, 96, 64, 32)  # the formula gives 32/32/32/64 at n_embd 128
from rwkvpip import RWKV_PKG_SCRIPT as RWKV_PIP  # noqa: E402


def small_released(path, seed=0, V=VOCAB):
    """A random L2-D128 file in the released layout (no block-0 v params, non-formula LoRA sizes)."""
    cfg = ModelConfig(n_layer=2, n_embd=128, vocab_size=V, layer0_v=False,
                      **dict(zip(("lora_w", "lora_a", "lora_v", "lora_g"), SMALL_LORA)))
    torch.manual_seed(seed)
    m = RWKV7(cfg)
    m.init_weights()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    sd = m.state_dict()
    assert not {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"} & set(sd)
    assert set(sd) == set(released_layout(2, 128, SMALL_LORA, V=V))
    torch.save(sd, path)
    return sd


def rwkv_pip_logits(path, toks, tmp_path):
    pytest.importorskip("rwkv")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", RWKV_V7_ON="1", RWKV_JIT_ON="0", RWKV_CUDA_ON="0")
    out = tmp_path / "pip-out.pt"
    r = subprocess.run([sys.executable, "-c", RWKV_PIP, str(path).removesuffix(".pth"), str(out),
                        ",".join(map(str, toks))], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out, weights_only=True)


def check_parity(path, tmp_path):
    """Our logits (training forward, and forward_rnn in uneven pieces) against rwkv pip's, whole
    and token by token, for the file at `path` loaded as chat/evaluate load it."""
    from rwkvlm.infer.generate import load_model

    m = load_model(path, "cpu", log=lambda s: None)
    toks = torch.randint(0, m.cfg.vocab_size, (17,), generator=torch.Generator().manual_seed(3))
    ref = rwkv_pip_logits(path, toks.tolist(), tmp_path)
    with torch.no_grad():
        ours = m(toks.unsqueeze(0))[0]
        pieces, state = [], None
        for t0, t1 in ((0, 1), (1, 8), (8, 17)):
            lg, state = m.forward_rnn(toks[t0:t1].unsqueeze(0), state)
            pieces.append(lg[0])
        rnn = torch.cat(pieces)
    scale = ref["seq"].abs().max().item()
    assert scale > 0.1
    tol = 1e-5 * max(1.0, scale)
    for got, want in ((ours, ref["seq"]), (ours, ref["one"]), (rnn, ref["one"])):
        assert (got - want).abs().max().item() < tol
    return m


def test_small_released_layout_loads_and_matches_rwkv_pip(tmp_path):
    small_released(tmp_path / "rel.pth")
    m = check_parity(tmp_path / "rel.pth", tmp_path)
    assert m.cfg.lora_sizes == SMALL_LORA and m.cfg.layer0_v is False


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


def _train(args, capsys):
    from rwkvlm.train.run import main

    assert main(args) == 0
    return capsys.readouterr().out


def test_load_model_trains_a_step_saves_the_released_layout_and_resumes_exactly(data, tmp_path, capsys):
    src = tmp_path / "released.pth"
    before = small_released(src)
    proj = tmp_path / "proj"
    step = 4 * 64  # one step of micro_bsz 4 at ctx 64
    args = run_args(data, proj, "--load_model", str(src), "--my_exit_tokens", str(step))  # N_LAYER 2 N_EMBD 64
    out = _train(args, capsys)
    assert "LoRA w/a/v/g 64/96/64/32 (not the formula's 32/32/32/64" in out
    assert "no blocks.0.att.v0/v1/v2" in out
    assert "win over the flags given" in out and "N_EMBD (--n_embd) 64 -> 128" in out
    assert "RWKV-7 L2-D128, LoRA w/a/v/g 64/96/64/32 (released layout), ctx 64" in out
    assert f"from {src}" in out and "steps 0 -> 1, mini-epoch 0" in out
    final = proj / "rwkv-final.pth"
    sd = torch.load(final, weights_only=True)
    assert set(sd) == set(before)  # the released layout: no blocks.0.att.v0/v1/v2
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in before.items()}
    assert any(not torch.equal(sd[k], before[k]) for k in sd)  # it trained
    fp = __import__("json").loads((proj / "rwkv-final.json").read_text())["fingerprint"]
    assert fp["lora"] == "64/96/64/32" and fp["layer0_v"] == 0 and fp["n_embd"] == 128
    check_parity(final, tmp_path)  # rwkv pip loads our save

    # re-run with more tokens: PROJ_DIR's saves win over --load_model, and the run continues exactly
    out = _train(run_args(data, proj, "--load_model", str(src), "--my_exit_tokens", str(2 * step)), capsys)
    assert "already holds saves" in out and "does not load" in out
    assert "continuing exactly" in out and "settings changed" not in out
    assert "steps 1 -> 2" in out
    sd2 = torch.load(final, weights_only=True)
    assert set(sd2) == set(before) and any(not torch.equal(sd2[k], sd[k]) for k in sd)


def test_epoch_begin_still_counts_for_a_load_model_file(data, tmp_path, capsys):
    src = tmp_path / "released.pth"
    small_released(src)
    from rwkvlm.train.resume import find_start, shapes_from_load_model
    from rwkvlm.train.config import parse_args

    cfg = parse_args(run_args(data, tmp_path / "p", "--load_model", str(src), "--epoch_begin", "2",
                              "--mini_epoch_samples", "8", "--micro_bsz", "4"))
    cfg = shapes_from_load_model(cfg, log=lambda s: None)
    assert (cfg.n_embd, cfg.lora_dims, cfg.layer0_v) == (128, "64/96/64/32", 0)
    start = find_start(cfg, log=lambda s: None)
    assert start.step == 2 * cfg.epoch_steps and start.epoch_begin == 2


# ---------------------------------------------------------------- bad input

def _sd_small(**change):
    sd = released_layout(2, 128, SMALL_LORA, V=300, make=torch.zeros)
    for k, v in change.items():
        k = k.replace("__", ".")
        if v is None:
            sd.pop(k)
        else:
            sd[k] = torch.zeros(v)
    return sd


@pytest.mark.parametrize("change, needles", [
    ({"blocks.0.att.w2": (32, 128)}, ["blocks.0.att.w2", "(32, 128)", "(64, 128)", "LoRA pair disagrees"]),
    ({"blocks.1.att.v1": (128, 48)}, ["blocks.1.att.v2", "(48, 128)", "(64, 128)"]),
    ({"blocks.1.att.a1": (128, 32)}, ["blocks.1.att.a1", "(128, 32)", "(128, 96)", "every block"]),
    ({"blocks.0.att.r_k": (3, 64)}, ["blocks.0.att.r_k", "(3, 64)", "n_embd 128", "divide"]),
    ({"head.weight": (299, 128)}, ["head.weight", "(299, 128)", "(300, 128)"]),
    ({"blocks.0.att.v0": (1, 1, 128)}, ["blocks.0.att.v0", "v1", "missing"]),
    ({"blocks.1.ffn.key.weight": None}, ["blocks.1.ffn.key.weight", "missing", "(512, 128)"]),
    ({"blocks.1.att.extra": (4,)}, ["unexpected key blocks.1.att.extra", "(4,)"]),
    ({"emb.weight": None}, ["not an x070 state dict", "no emb.weight"]),
    ({"blocks.0.att.time_decay": (128,), "blocks.0.att.r_k": None}, ["not an x070 state dict", "time_decay"]),
])
def test_inconsistent_state_dicts_name_the_key_and_shapes(change, needles):
    with pytest.raises(UserError) as e:
        ModelConfig.from_state_dict(_sd_small(**change), "ckpt.pth")
    msg = str(e.value)
    assert "ckpt.pth" in msg
    for n in needles:
        assert n in msg, (n, msg)


def test_prefixed_keys_get_a_hint():
    sd = {"model." + k: v for k, v in _sd_small().items()}
    with pytest.raises(UserError, match=r"prefix \('model\.'\)"):
        ModelConfig.from_state_dict(sd, "x")


def _refused(data, tmp_path, obj, *needles, extra=()):
    from rwkvlm.train.run import main

    path = tmp_path / "bad.pth"
    torch.save(obj, path)
    proj = tmp_path / "proj"
    before = snapshot(tmp_path)
    with pytest.raises(UserError) as e:
        main(run_args(data, proj, "--load_model", str(path), *extra))
    msg = str(e.value)
    assert "--load_model" in msg and str(path) in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    assert snapshot(tmp_path) == before and not proj.exists()  # nothing written
    return msg


def test_train_refuses_a_file_that_is_not_an_x070_state_dict(data, tmp_path):
    _refused(data, tmp_path, {"weight": torch.zeros(3)}, "not an x070 state dict", "no emb.weight")
    _refused(data, tmp_path, [torch.zeros(3)], "not a state dict of tensors")


def test_train_refuses_inconsistent_shapes(data, tmp_path):
    _refused(data, tmp_path, _sd_small(**{"blocks.1.att.g2": (48, 128)}), "blocks.1.att.g2", "(48, 128)",
             "(32, 128)")
    _refused(data, tmp_path, _sd_small(**{"blocks.0.att.r_k": (2, 48)}), "blocks.0.att.r_k", "(2, 48)")


def test_train_refuses_a_vocab_unlike_the_datas(data, tmp_path):
    _refused(data, tmp_path, _sd_small(), "vocabulary of 300 tokens", "(300, n_embd)", "token id")
