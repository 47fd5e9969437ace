"""Resume under DeepSpeed on a GPU: a kill and re-run continues exactly from the engine's state (RWKV-7
and RWKV-6); a changed M_BSZ carries weights and optimiser state over; a state of an earlier version
(no weights.pth) still gives its weights. Needs a CUDA GPU and DeepSpeed (skipped otherwise)."""
import json
import signal
import subprocess
import sys

import pytest
import torch

from rwkvlm.model import model_type_of
from trainkit import REPO, TRAIN_TEMP, make_dataset, prepare_args, run_args

pytestmark = pytest.mark.gpu
KILLPOINT = REPO / "tests" / "killpoint.py"


def _gpu(args, micro_bsz=4, steps=24, model_type="x070"):
    """run_args for a short DeepSpeed bf16 run on one GPU."""
    a = run_args({"base": DATA["base"], "tokens": DATA["tokens"], "magic_prime": DATA["magic_prime"]}, args,
                 "--save_every_steps", "4", "--mini_epoch_samples", "48", "--keep_resume", "3",
                 "--my_testing", model_type, micro_bsz=micro_bsz)
    sub = {"--accelerator": "gpu", "--precision": "bf16", "--strategy": "deepspeed_stage_2",
           "--my_exit_tokens": str(steps * 4 * 64)}
    for k, v in sub.items():
        a[a.index(k) + 1] = v
    return a + ["--compile", "0", "--ds_bucket_mb", "2"]


DATA = {}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    pytest.importorskip("deepspeed")
    import os

    DATA.update(make_dataset(tmp_path_factory.mktemp("data"), n_docs=300, copies=2))
    return dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")


def _train(proj, env, kill="", **kw):
    cmd = [sys.executable, str(KILLPOINT)] + (["--kill", kill] if kill else [])
    return subprocess.run([*cmd, str(TRAIN_TEMP / "train.py"), *_gpu(proj, **kw)], env=env, capture_output=True,
                          text=True, timeout=900)


def _prepared(tmp_path, name, env, model_type="x070"):
    proj = tmp_path / name
    subprocess.run([sys.executable, str(TRAIN_TEMP / "train.py"), *prepare_args(proj, "--my_testing", model_type)],
                   env=env, check=True, capture_output=True, timeout=300)
    return proj


@pytest.mark.parametrize("model_type", ["x070", "x060"])
def test_deepspeed_kill_and_resume(tmp_path, env, model_type):
    a = _prepared(tmp_path, "a", env, model_type)
    r = _train(a, env, model_type=model_type)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    b = tmp_path / "b"
    b.mkdir()
    (b / "rwkv-init.pth").write_bytes((a / "rwkv-init.pth").read_bytes())
    r = _train(b, env, kill="create:.rwkv-1.pth.*:1", model_type=model_type)  # the state of step 24 is complete
    assert r.returncode == -signal.SIGKILL, r.stdout[-3000:] + r.stderr[-3000:]
    r = _train(b, env, model_type=model_type)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "rwkv-1.pth was missing or incomplete" in r.stdout and "nothing to do" in r.stdout, r.stdout[-3000:]
    r = _train(b, env, kill="append:loss_log.csv:3", steps=36, model_type=model_type)  # killed at its 3rd new step
    assert r.returncode == -signal.SIGKILL
    r = _train(b, env, steps=36, model_type=model_type)
    assert r.returncode == 0 and "resumed exactly from" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [ln.split(",") for ln in (b / "loss_log.csv").read_text().splitlines()[1:]]
    assert [int(x[0]) for x in rows] == list(range(1, 37))
    ref = [ln.split(",") for ln in (a / "loss_log.csv").read_text().splitlines()[1:]]
    assert [x[2] for x in rows[:24]] == [x[2] for x in ref]  # the same steps as the uninterrupted run
    sd = torch.load(b / "rwkv-final.pth", weights_only=True)
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    assert model_type_of(sd) == model_type  # the family asked for


def test_deepspeed_changed_batch_size_carries_optimiser_state(tmp_path, env):
    c = _prepared(tmp_path, "c", env)
    assert _train(c, env, steps=12).returncode == 0
    r = _train(c, env, micro_bsz=8, steps=24)  # from sample 48 (step 6 of M_BSZ 8) to step 12
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "micro_bsz 4 -> 8" in r.stdout and "and its optimiser state" in r.stdout, r.stdout[-3000:]
    losses = [float(ln.split(",")[2]) for ln in (c / "loss_log.csv").read_text().splitlines()[1:]]
    assert losses[12] < losses[0] - 1.0  # goes on from the trained weights


def test_deepspeed_state_of_an_earlier_version_gives_its_weights(tmp_path, env):
    """A state without weights.pth (written before it existed): a changed setting takes the weights
    from the DeepSpeed checkpoint's module file."""
    d = _prepared(tmp_path, "d", env)
    assert _train(d, env, steps=12).returncode == 0
    state_dir = d / "resume" / "step-000000012"
    (state_dir / "weights.pth").unlink()
    st = json.loads((state_dir / "state.json").read_text())
    st.pop("pending")
    st["format"] = 1
    (state_dir / "state.json").write_text(json.dumps(st))
    for f in ("rwkv-final.pth", "rwkv-final.json", "rwkv-latest.pth", "rwkv-0.pth"):
        (d / f).unlink()
    r = _train(d, env, micro_bsz=2, steps=30)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Carried over: its weights" in r.stdout and "step 24 at the new settings" in r.stdout, r.stdout[-3000:]
