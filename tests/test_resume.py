"""Exact resume: a run killed with SIGKILL at a random moment and re-run ends
with weights bit-identical to an uninterrupted run saving at the same steps."""
import random
import signal
import subprocess
import sys
import time

import torch

from trainkit import TRAIN_TEMP, make_dataset, prepare_args, run_args

STEPS = 36


def _train_cmd(meta, proj):
    args = run_args(meta, proj, "--my_exit_tokens", str(STEPS * 4 * 64), "--save_every_steps", "4",
                    "--mini_epoch_samples", "48", "--keep_resume", "2")
    return [sys.executable, str(TRAIN_TEMP / "train.py"), *args]


def _prepare(proj, env):
    subprocess.run([sys.executable, str(TRAIN_TEMP / "train.py"), *prepare_args(proj)], env=env, check=True,
                   capture_output=True, timeout=300)


def test_kill_and_resume_is_exact(tmp_path, cpu_env):
    meta = make_dataset(tmp_path / "data", n_docs=300, copies=2)
    a, b = tmp_path / "a", tmp_path / "b"
    for p in (a, b):
        _prepare(p, cpu_env)
    # uninterrupted reference run
    r = subprocess.run(_train_cmd(meta, a), env=cpu_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    # run B: SIGKILL at a random moment after the first resume state, then re-run until done
    rng = random.Random()
    kills = 0
    for attempt in range(6):
        proc = subprocess.Popen(_train_cmd(meta, b), env=cpu_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        if kills < 2:
            t0 = time.time()
            while time.time() - t0 < 120 and proc.poll() is None and not list((b / "resume").glob("step-*")):
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 1.5))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        out, _ = proc.communicate(timeout=600)
        if (b / "rwkv-final.pth").is_file():
            break
    assert kills >= 1, "the run finished before it could be killed"
    assert (b / "rwkv-final.pth").is_file(), out[-3000:]
    assert "resumed exactly" in out or "from" in out

    wa = torch.load(a / "rwkv-final.pth", weights_only=True)
    wb = torch.load(b / "rwkv-final.pth", weights_only=True)
    assert wa.keys() == wb.keys()
    diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not diff, f"weights differ after resume: {diff[:5]}"
    # the per-mini-epoch log has the same lines (losses) as the uninterrupted run
    la = [ln.split()[:3] for ln in (a / "train_log.txt").read_text().splitlines()]
    lb = [ln.split()[:3] for ln in (b / "train_log.txt").read_text().splitlines()]
    assert la == lb[-len(la):] or la == lb
