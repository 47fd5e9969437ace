"""CPU training through the tutorial's real scripts: loss falls, checkpoints
follow the spec's contract, re-running resumes from the newest save."""
import subprocess

import pytest
import torch

from trainkit import TINY, TRAIN_TEMP, make_dataset, snapshot

pytestmark = pytest.mark.slow  # end-to-end trainings


def _sh(script, *args, env, check=True):
    r = subprocess.run(["sh", str(TRAIN_TEMP / script), *map(str, args)], env=env, capture_output=True,
                       text=True, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"{script} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def _overrides(meta, proj, exit_tokens=None):
    return ["--proj_dir", proj, "--data_file", meta["base"], "--ctx_len", "64",
            "--my_exit_tokens", exit_tokens or meta["tokens"], "--magic_prime", meta["magic_prime"],
            *TINY, "--random_seed", "3"]


def _run_overrides():
    return ["--accelerator", "cpu", "--strategy", "auto", "--precision", "fp32", "--micro_bsz", "4",
            "--wandb", "", "--enable_progress_bar", "False", "--lr_init", "3e-3", "--lr_final", "1e-3",
            "--warmup_steps", "5", "--mini_epoch_samples", "160", "--epoch_save", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cpu_env):
    work = tmp_path_factory.mktemp("e2e")
    meta = make_dataset(work / "data", n_docs=400, copies=2)
    proj = work / "proj"
    prep = _sh("demo-training-prepare.sh", *_overrides(meta, proj), env=cpu_env)
    # about 3 mini-epochs of 40 steps (160 samples / 4)
    exit_tokens = 3 * 160 * 64
    run = _sh("demo-training-run.sh", *_overrides(meta, proj, exit_tokens), *_run_overrides(), env=cpu_env)
    return dict(meta=meta, proj=proj, prep=prep, run=run, exit_tokens=exit_tokens, env=cpu_env)


def test_prepare_writes_init(trained):
    init = trained["proj"] / "rwkv-init.pth"
    sd = torch.load(init, weights_only=True)
    assert sd["emb.weight"].shape == (65536, 64)
    assert sd["emb.weight"].dtype == torch.bfloat16  # the prepare script passes --precision bf16
    assert "wrote" in trained["prep"].stdout


def test_run_writes_checkpoints_and_logs(trained):
    proj = trained["proj"]
    names = sorted(p.name for p in proj.glob("rwkv-*.pth"))
    assert names == ["rwkv-0.pth", "rwkv-1.pth", "rwkv-2.pth", "rwkv-final.pth", "rwkv-init.pth", "rwkv-latest.pth"]
    # the run ends with an exact-resume state of its last step, which the final weights come from
    final_state = proj / "resume" / "step-000000120"
    assert (proj / "rwkv-final.pth").samefile(final_state / "weights.pth")
    assert (proj / "rwkv-latest.pth").samefile(final_state / "weights.pth")
    for n in names:
        sd = torch.load(proj / n, weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in sd.values())
        assert not any(k.startswith(("model.", "module.")) for k in sd)
    lines = (proj / "train_log.txt").read_text().splitlines()
    assert len(lines) == 4  # the run's header line, then one line per mini-epoch
    assert lines[0].startswith("# ") and " new run at step 0 (mini-epoch 0) from rwkv-init.pth" in lines[0]
    fields = [ln.split() for ln in lines[1:]]
    assert [f[0] for f in fields] == ["0", "1", "2"]
    assert [f[-1] for f in fields] == ["0", "1", "2"]  # epoch_in_run
    losses = [float(f[1]) for f in fields]
    assert losses[2] < losses[0] - 0.5, losses  # loss falls
    csv = (proj / "loss_log.csv").read_text().splitlines()
    assert csv[0].startswith("step,tokens,loss,lr")
    assert len(csv) == 1 + 120
    first = float(csv[1].split(",")[2])
    assert 10.0 < first < 12.5  # ln(65536) = 11.09 at init


def test_rerun_after_final_does_nothing(trained):
    proj = trained["proj"]
    before = snapshot(proj)
    r = _sh("demo-training-run.sh", *_overrides(trained["meta"], proj, trained["exit_tokens"]),
            *_run_overrides(), env=trained["env"])
    assert "nothing to do" in r.stdout
    assert snapshot(proj) == before


def test_raising_exit_tokens_continues_exactly(trained, tmp_path):
    """A longer --my_exit_tokens continues exactly from the finished run's last state (optimizer state,
    data position, mini-epoch count, no new warmup), the schedule stretched to the new end."""
    from rwkvlm.train.config import parse_args
    from rwkvlm.train.optim import lr_at

    proj = trained["proj"]
    more = trained["exit_tokens"] + 160 * 64
    args = [*_overrides(trained["meta"], proj, more), *_run_overrides()]
    r = _sh("demo-training-run.sh", *args, env=trained["env"])
    assert f"resumed exactly from {proj / 'resume' / 'step-000000120'}" in r.stdout, r.stdout[-2000:]
    assert "--my_exit_tokens changed" in r.stdout and "mini-epoch 3" in r.stdout
    assert (proj / "rwkv-3.pth").is_file()
    lines = (proj / "train_log.txt").read_text().splitlines()
    assert " resumed exactly at step 120 (mini-epoch 3) from resume/step-000000120," in lines[-2]
    last = lines[-1].split()
    assert last[0] == "3" and last[-1] == "3"  # the same run, continued
    rows = {int(ln.split(",")[0]): float(ln.split(",")[3]) for ln in (proj / "loss_log.csv").read_text().splitlines()[1:]}
    cfg = parse_args(["--train_stage", "3", "--data_file", "x", *map(str, args)])
    assert rows[121] == pytest.approx(lr_at(120, 120, cfg), rel=1e-6)  # not a warmup's 1% start


def test_checkpoints_run_in_rwkv_package(trained):
    """rwkv-init.pth, rwkv-0.pth and rwkv-final.pth load in the rwkv pip package; its logits, fed
    whole and fed one token at a time, match our model's."""
    import json
    import sys

    from rwkvlm.model import ModelConfig, RWKV7

    names = ["rwkv-init.pth", "rwkv-0.pth", "rwkv-final.pth"]
    paths = [str((trained["proj"] / n).with_suffix("")) for n in names]
    tokens = [11, 22, 33, 4400, 0, 65000, 17]
    code = f"""
import os, json, torch
os.environ["RWKV_V7_ON"] = "1"; os.environ["RWKV_JIT_ON"] = "0"; os.environ["RWKV_CUDA_ON"] = "0"
from rwkv.model import RWKV
res = []
for path in {paths!r}:
    m = RWKV(model=path, strategy="cpu fp32")
    whole, _ = m.forward({tokens}, None, full_output=True)
    state, steps = None, []
    for t in {tokens}:
        out, state = m.forward([t], state)
        steps.append(out.float().tolist())
    res.append([whole.float().tolist(), steps])
print(json.dumps(res))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=trained["env"],
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    for name, (whole, steps) in zip(names, results):
        model = RWKV7(ModelConfig(n_layer=2, n_embd=64, vocab_size=65536, head_size=64))
        sd = torch.load(trained["proj"] / name, weights_only=True)
        model.load_state_dict({k: v.float() for k, v in sd.items()})
        with torch.no_grad():
            ours = model(torch.tensor([tokens]))[0].float()  # (T, V)
        tol = 1e-3 * max(1.0, ours.abs().max().item())
        for theirs in (torch.tensor(whole), torch.tensor(steps)):
            assert theirs.shape == ours.shape
            err = (theirs - ours).abs().max().item()
            assert err < tol, (name, err)


def test_profile_steps_writes_a_profile(tmp_path):
    """--profile_steps 3 profiles steps 11-13 into PROJ_DIR/profile.txt; training goes on to the end."""
    from trainkit import prepare_args, run_args

    from rwkvlm.train.run import main

    meta = make_dataset(tmp_path / "data", n_docs=200, copies=1)
    proj = tmp_path / "proj"
    assert main(prepare_args(proj)) == 0
    steps = 16
    args = run_args(meta, proj, "--profile_steps", "3", "--mini_epoch_samples", "64")
    args[args.index("--my_exit_tokens") + 1] = str(steps * 4 * 64)
    assert main(args) == 0
    text = (proj / "profile.txt").read_text()
    assert "over 3 training steps after the first 10" in text
    assert "Self CPU" in text and "aten::" in text
    walls = text.split("wall time per step (ms): ", 1)[1].split("\n", 1)[0].split(", ")
    assert len(walls) == 3 and all(float(w) > 0 for w in walls)
    phases = text.split("host time per phase (median ms; the profiler's overhead included): ", 1)[1].split("\n", 1)[0]
    names = [p.rsplit(" ", 1)[0] for p in phases.split(", ")]
    assert names == ["forward", "backward", "to optimizer step", "optimizer step",
                     "wait for the GPU (loss read)", "data and Lightning loop before the next step"], names
    assert all(float(p.rsplit(" ", 1)[1]) >= 0 for p in phases.split(", "))
    assert (proj / "rwkv-final.pth").is_file()
    assert len((proj / "loss_log.csv").read_text().splitlines()) == steps + 1
