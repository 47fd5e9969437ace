"""RWKV-6 ("x060"): the model against the `rwkv` pip package and RWKV-LM's definitions, its
config read off checkpoints, the optimiser groups, and MODEL_TYPE=x060 through the scripts."""
import math
import os
import subprocess
import sys

import pytest
import torch

from rwkvpip import RWKV_PKG_SCRIPT
from trainkit import TINY, TRAIN_TEMP, make_dataset, perturbed_model, prepare_args, run_args

from rwkvlm.errors import UserError
from rwkvlm.model import RWKV6, RWKV7, ModelConfig, Rwkv6Config, build_model, config_from_state_dict, model_type_of
from rwkvlm.model.rwkv6 import state_dict_shapes_x060

V = 300


def perturbed6(n_layer=3, n_embd=128, seed=0, scale=0.05):
    return perturbed_model(n_layer=n_layer, n_embd=n_embd, vocab_size=V, seed=seed, scale=scale, model_type="x060")


def pip_logits(path, toks, tmp_path):
    pytest.importorskip("rwkv")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = tmp_path / "pip-out.pt"
    r = subprocess.run([sys.executable, "-c", RWKV_PKG_SCRIPT, str(path), str(out), ",".join(map(str, toks))],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out, weights_only=True)


# ------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------

def test_logits_match_the_rwkv_package_whole_and_token_by_token(tmp_path):
    m = perturbed6()
    path = tmp_path / "x060.pth"
    torch.save(m.state_dict(), path)
    toks = torch.randint(0, V, (19,), generator=torch.Generator().manual_seed(4)).tolist()
    ref = pip_logits(path, toks, tmp_path)
    with torch.no_grad():
        ours = m(torch.tensor([toks]))[0]                      # training forward, zero state
        pieces, state = [], None
        for a, b in ((0, 1), (1, 8), (8, 19)):                 # carried state, uneven pieces
            lg, state = m.forward_rnn(torch.tensor([toks[a:b]]), state)
            pieces.append(lg[0])
        rnn = torch.cat(pieces)
    scale = ref["seq"].abs().max().item()
    assert scale > 1.0
    tol = 1e-5 * scale
    assert (ours - ref["seq"]).abs().max().item() < tol
    assert (ours - ref["one"]).abs().max().item() < tol
    assert (rnn - ours).abs().max().item() < tol


def test_every_parameter_gets_a_gradient_and_the_loss_is_cross_entropy():
    m = perturbed6(n_layer=2, n_embd=64)
    idx = torch.randint(0, V, (2, 21), generator=torch.Generator().manual_seed(1))
    tgt = torch.randint(0, V, (2, 21), generator=torch.Generator().manual_seed(2))
    loss = m.loss(idx, tgt)
    ce = torch.nn.functional.cross_entropy(m(idx).reshape(-1, V), tgt.reshape(-1))
    assert abs(loss.item() - ce.item()) < 1e-5
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_init_follows_rwkv_lm_x060_formulas():
    """The table values, recomputed here from RWKV-LM's x060 formulas with Python loops."""
    L, C, N = 4, 128, 64
    torch.manual_seed(0)
    m = RWKV6(Rwkv6Config(n_layer=L, n_embd=C, vocab_size=V))
    m.init_weights()
    for l in (0, 2, 3):
        att, ffn = m.blocks[l].att, m.blocks[l].ffn
        r0, r1 = l / (L - 1), 1.0 - l / L
        ddd = [i / C for i in range(C)]
        want = {
            "time_maa_x": [1 - d ** r1 for d in ddd], "time_maa_k": [1 - d ** r1 for d in ddd],
            "time_maa_v": [1 - (d ** r1 + 0.3 * r0) for d in ddd], "time_maa_r": [1 - d ** (0.5 * r1) for d in ddd],
            "time_decay": [-6 + 5 * (n / (C - 1)) ** (0.7 + 1.3 * r0) for n in range(C)],
            "time_faaaa": [r0 * (1 - n / (C - 1)) + ((n + 1) % 3 - 1) * 0.1 for n in range(C)],
        }
        for name, values in want.items():
            got = getattr(att, name).detach().reshape(-1)
            assert torch.allclose(got, torch.tensor(values), atol=1e-6), (l, name)
        assert torch.allclose(ffn.time_maa_k.reshape(-1), torch.tensor([1 - d ** (r1 ** 3) for d in ddd]), atol=1e-6)
        assert torch.allclose(att.ln_x.weight, torch.full((C,), ((1 + l) / L) ** 0.7))
        assert att.time_maa_w1.abs().max() == 0 and att.time_decay_w1.abs().max() == 0
        assert 0 < att.time_maa_w2.abs().max() <= 0.01 and 0 < att.time_decay_w2.abs().max() <= 0.01
        for zero in (att.output, ffn.value, ffn.receptance):
            assert zero.weight.abs().max() == 0
        for name, gain in (("key", 0.1), ("gate", 0.1), ("receptance", 1.0), ("value", 1.0)):
            w = getattr(att, name).weight.double()
            assert torch.allclose(w @ w.T, gain ** 2 * torch.eye(C, dtype=torch.float64), atol=1e-5), name
    assert m.blocks[0].att.time_faaaa.shape == (C // N, N)
    emb = m.emb.weight
    assert emb.abs().max() <= 1e-4 and emb.abs().max() > 0
    assert tuple(m.state_dict()["blocks.0.att.time_maa_w2"].shape) == (5, 32, C)


def test_shapes_and_parameter_count():
    cfg = Rwkv6Config(n_layer=12, n_embd=768)
    assert cfg.dim_ffn == int(768 * 3.5) // 32 * 32 == 2688
    m = RWKV6(Rwkv6Config(n_layer=2, n_embd=128, vocab_size=V))
    sd = m.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == state_dict_shapes_x060(m.cfg)
    assert RWKV6.count_params(m.cfg) == sum(p.numel() for p in m.parameters())


# ------------------------------------------------------------------------------------------
# checkpoints: the type is read off the keys
# ------------------------------------------------------------------------------------------

def test_config_is_read_off_an_x060_checkpoint():
    m = perturbed6(n_layer=2, n_embd=128)
    sd = m.state_dict()
    assert model_type_of(sd) == "x060"
    cfg = config_from_state_dict(sd, "f.pth")
    assert isinstance(cfg, Rwkv6Config) and (cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.head_size) == (2, 128, V, 64)
    assert isinstance(build_model(cfg), RWKV6)
    sd7 = RWKV7(ModelConfig(n_layer=1, n_embd=64, vocab_size=V)).state_dict()
    assert model_type_of(sd7) == "x070" and isinstance(config_from_state_dict(sd7), ModelConfig)


def test_a_checkpoint_of_the_other_type_names_both():
    sd6 = perturbed6(n_layer=1, n_embd=64).state_dict()
    with pytest.raises(UserError, match=r"RWKV-6 \(x060\) checkpoint.*MODEL_TYPE.*x070.*RWKV-7 \(x070\)"):
        config_from_state_dict(sd6, "f.pth", expect="x070")
    sd7 = RWKV7(ModelConfig(n_layer=1, n_embd=64, vocab_size=V)).state_dict()
    with pytest.raises(UserError, match=r"RWKV-7 \(x070\) checkpoint.*MODEL_TYPE.*x060"):
        config_from_state_dict(sd7, "f.pth", expect="x060")


def test_inconsistent_x060_shapes_name_the_key():
    sd = dict(perturbed6(n_layer=2, n_embd=128).state_dict())
    sd["blocks.1.att.time_decay_w2"] = torch.zeros(32, 128)
    with pytest.raises(UserError, match=r"blocks\.1\.att\.time_decay_w2 has shape \(32, 128\); expected \(64, 128\)"):
        config_from_state_dict(sd, "f.pth")
    sd = dict(perturbed6(n_layer=2, n_embd=128).state_dict())
    del sd["blocks.1.ffn.time_maa_r"]
    with pytest.raises(UserError, match=r"blocks\.1\.ffn\.time_maa_r is missing"):
        config_from_state_dict(sd, "f.pth")


def test_optimizer_groups_follow_rwkv_lm():
    """layerwise_lr: time_decay at 2x, its LoRAs, the mixes and time_faaaa at 1x; the matrices decay."""
    from rwkvlm.train.optim import param_groups

    m = RWKV6(Rwkv6Config(n_layer=2, n_embd=64, vocab_size=V))
    names = {id(p): n for n, p in m.named_parameters()}
    groups = {g["name"]: sorted(names[id(p)] for p in g["params"]) for g in param_groups(m, 0.1)}
    assert groups["lr_2x"] == ["blocks.0.att.time_decay", "blocks.1.att.time_decay"]
    assert "blocks.0.att.time_decay_w1" in groups["lr_1x"] and "blocks.0.att.time_faaaa" in groups["lr_1x"]
    assert "blocks.0.att.time_maa_w2" in groups["lr_1x"]
    assert "blocks.0.att.gate.weight" in groups["lr_decay"] and "blocks.0.ffn.receptance.weight" in groups["lr_decay"]
    assert not any("time_" in n for n in groups["lr_decay"])


# ------------------------------------------------------------------------------------------
# MODEL_TYPE=x060 through train.py
# ------------------------------------------------------------------------------------------

def _train(args, env):
    return subprocess.run([sys.executable, str(TRAIN_TEMP / "train.py"), *args], env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def x060_run(tmp_path_factory, cpu_env):
    root = tmp_path_factory.mktemp("x060")
    meta = make_dataset(root / "data", n_docs=120, copies=1)
    proj = root / "proj"
    r = _train(prepare_args(proj, "--my_testing", "x060"), cpu_env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    steps = 8
    args = run_args(meta, proj, "--my_testing", "x060", "--my_exit_tokens", str(steps * 4 * 64),
                    "--mini_epoch_samples", "16")
    r = _train(args, cpu_env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return dict(meta=meta, proj=proj, args=args, out=r.stdout + r.stderr, root=root)


@pytest.mark.slow  # end-to-end training (the x060_run fixture)
def test_x060_prepares_trains_and_saves(x060_run):
    proj = x060_run["proj"]
    assert "RWKV-6 L2-D64" in x060_run["out"]
    sd = torch.load(proj / "rwkv-final.pth", weights_only=True)
    assert model_type_of(sd) == "x060"
    init = torch.load(proj / "rwkv-init.pth", weights_only=True)
    assert not torch.equal(sd["blocks.0.att.key.weight"], init["blocks.0.att.key.weight"])
    assert sorted(p.name for p in proj.glob("rwkv-[0-9]*.pth")) == ["rwkv-0.pth", "rwkv-1.pth"]
    losses = [float(ln.split(",")[2]) for ln in (proj / "loss_log.csv").read_text().splitlines()[1:]]
    assert len(losses) == 8 and losses[-1] < losses[0]


@pytest.mark.slow  # end-to-end training (the x060_run fixture)
def test_x060_checkpoints_load_in_the_rwkv_package(x060_run, tmp_path):
    from rwkvlm.infer.generate import load_model

    toks = [11, 22, 33, 44, 55, 66, 77]
    for name in ("rwkv-init.pth", "rwkv-1.pth", "rwkv-final.pth"):
        path = x060_run["proj"] / name
        m = load_model(path, "cpu", log=lambda s: None)
        assert isinstance(m, RWKV6)
        ref = pip_logits(path, toks, tmp_path)
        with torch.no_grad():
            ours = m(torch.tensor([toks]))[0]
        tol = 1e-4 * max(1.0, ref["seq"].abs().max().item())
        assert (ours - ref["seq"]).abs().max().item() < tol, name
        assert (ours - ref["one"]).abs().max().item() < tol, name


@pytest.mark.slow
def test_x060_resumes_exactly(x060_run, tmp_path, cpu_env):
    """SIGKILLed during step 6 (states every 2 steps), then re-run: rwkv-final.pth is bit-identical
    to the uninterrupted run's."""
    import shutil

    from trainkit import REPO

    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copy(x060_run["proj"] / "rwkv-init.pth", proj / "rwkv-init.pth")
    args = [a if a != str(x060_run["proj"]) else str(proj) for a in x060_run["args"]] + ["--save_every_steps", "2"]
    killed = subprocess.run([sys.executable, str(REPO / "tests" / "killpoint.py"), "--kill", "append:loss_log.csv:6",
                             str(TRAIN_TEMP / "train.py"), *args], env=cpu_env, capture_output=True, timeout=600)
    assert killed.returncode == -9 and not (proj / "rwkv-final.pth").exists()
    r = _train(args, cpu_env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "resumed exactly from" in r.stdout + r.stderr
    a, b = (torch.load(p / "rwkv-final.pth", weights_only=True) for p in (x060_run["proj"], proj))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # end-to-end training (the x060_run fixture)
def test_a_run_of_the_other_type_in_proj_dir_is_refused(x060_run, tmp_path, cpu_env):
    """An x070 run script pointed at an x060 PROJ_DIR: a message naming both types, nothing written."""
    import shutil

    proj = tmp_path / "proj"
    shutil.copytree(x060_run["proj"], proj)
    before = sorted(p.name for p in proj.iterdir())
    args = [a if a != str(x060_run["proj"]) else str(proj) for a in x060_run["args"]]
    i = args.index("--my_testing")
    args[i + 1] = "x070"
    i = len(args) - 1 - args[::-1].index("--my_exit_tokens")  # the last one wins
    args[i + 1] = str(16 * 4 * 64)
    r = _train(args, cpu_env)
    assert r.returncode != 0
    msg = r.stdout + r.stderr
    assert "RWKV-6 (x060) checkpoint" in msg and "MODEL_TYPE" in msg and "x070" in msg, msg[-2000:]
    assert "Traceback" not in msg
    assert sorted(p.name for p in proj.iterdir()) == before


def test_x070_only_flags_are_refused_for_x060():
    from rwkvlm.train.config import parse_args

    with pytest.raises(UserError, match="--lora_dims and --layer0_v describe RWKV-7"):
        parse_args(["--train_stage", "1", "--my_testing", "x060", "--lora_dims", "64/64/32/128", *TINY])
    with pytest.raises(UserError, match='"x070" or "x060"'):
        parse_args(["--train_stage", "1", "--my_testing", "x052", *TINY])
    assert math.isfinite(parse_args(["--train_stage", "1", "--my_testing", "x060", *TINY]).lr_init)


@pytest.mark.slow
def test_x060_with_grad_cp_bf16_profile_and_wandb(tmp_path, cpu_env):
    """The x070 path's other flags on an RWKV-6 run: GRAD_CP 1, bf16, --profile_steps, --wandb
    (offline, no login)."""
    pytest.importorskip("wandb")
    meta = make_dataset(tmp_path / "data", n_docs=200, copies=1)
    proj = tmp_path / "proj"
    r = _train(prepare_args(proj, "--my_testing", "x060"), cpu_env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    env = {k: v for k, v in cpu_env.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), NETRC=str(tmp_path / "home" / ".netrc"), WANDB_SILENT="true")
    steps = 14
    args = run_args(meta, proj, "--my_testing", "x060", "--grad_cp", "1", "--precision", "bf16",
                    "--profile_steps", "2", "--my_exit_tokens", str(steps * 4 * 64), "--mini_epoch_samples", "64")
    args[args.index("--wandb") + 1] = "rwkv-test"
    r = _train(args, env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "logging offline" in r.stdout and list((proj / "wandb").glob("offline-run-*"))
    assert "over 2 training steps after the first 10" in (proj / "profile.txt").read_text()
    sd = torch.load(proj / "rwkv-final.pth", weights_only=True)
    assert model_type_of(sd) == "x060" and all(v.dtype == torch.bfloat16 for v in sd.values())
    losses = [float(ln.split(",")[2]) for ln in (proj / "loss_log.csv").read_text().splitlines()[1:]]
    assert len(losses) == steps and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
