"""--wandb: a project name logs offline on a machine without a wandb login;
the run id is kept in the exact-resume state."""
import json
import os
import subprocess
import sys

import pytest

from trainkit import TRAIN_TEMP, make_dataset, prepare_args, run_args

pytestmark = pytest.mark.slow  # end-to-end trainings

pytest.importorskip("wandb")


def test_wandb_offline_without_login(tmp_path, cpu_env):
    meta = make_dataset(tmp_path / "data", n_docs=200, copies=2)
    proj = tmp_path / "proj"
    subprocess.run([sys.executable, str(TRAIN_TEMP / "train.py"), *prepare_args(proj)], env=cpu_env, check=True,
                   capture_output=True)
    env = {k: v for k, v in cpu_env.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), NETRC=str(tmp_path / "home" / ".netrc"), WANDB_SILENT="true")
    args = run_args(meta, proj, "--my_exit_tokens", str(8 * 4 * 64), "--save_every_steps", "4",
                    "--mini_epoch_samples", "48")
    args[args.index("--wandb") + 1] = "rwkv-test"
    r = subprocess.run([sys.executable, str(TRAIN_TEMP / "train.py"), *args], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "logging offline" in r.stdout
    runs = list((proj / "wandb").glob("offline-run-*"))
    assert runs, os.listdir(proj)
    state = json.loads((proj / "resume" / "step-000000004" / "state.json").read_text())
    assert state["wandb_id"] and state["wandb_id"] in runs[0].name
