"""Exact resume: a run killed with SIGKILL at a random moment and re-run ends
with weights bit-identical to an uninterrupted run saving at the same steps."""
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from trainkit import TRAIN_TEMP, make_dataset, prepare_args, run_args, snapshot

STEPS = 36


def _train_cmd(meta, proj):
    args = run_args(meta, proj, "--my_exit_tokens", str(STEPS * 4 * 64), "--save_every_steps", "4",
                    "--mini_epoch_samples", "48", "--keep_resume", "2")
    return [sys.executable, str(TRAIN_TEMP / "train.py"), *args]


def _prepare(proj, env):
    subprocess.run([sys.executable, str(TRAIN_TEMP / "train.py"), *prepare_args(proj)], env=env, check=True,
                   capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cpu_env):
    """Data and an uninterrupted run that saves at the same steps."""
    root = tmp_path_factory.mktemp("resume")
    meta = make_dataset(root / "data", n_docs=300, copies=2)
    a = root / "a"
    _prepare(a, cpu_env)
    r = subprocess.run(_train_cmd(meta, a), env=cpu_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return meta, a


def _assert_same_run(a, b):
    wa = torch.load(a / "rwkv-final.pth", weights_only=True)
    wb = torch.load(b / "rwkv-final.pth", weights_only=True)
    assert wa.keys() == wb.keys()
    diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not diff, f"weights differ after resume: {diff[:5]}"
    # the per-mini-epoch log has the same lines (mini-epoch, mean loss, ppl) as the uninterrupted run
    la = [ln.split()[:3] for ln in (a / "train_log.txt").read_text().splitlines()]
    lb = [ln.split()[:3] for ln in (b / "train_log.txt").read_text().splitlines()]
    assert la == lb


def _wait_for_steps(proj, n, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        log = proj / "loss_log.csv"
        if log.is_file() and len(log.read_text().splitlines()) > n:
            return
        time.sleep(0.05)


def test_kill_and_resume_is_exact(reference, tmp_path, cpu_env):
    meta, a = reference
    b = tmp_path / "b"
    _prepare(b, cpu_env)
    # SIGKILL at a random moment after the first resume state, then re-run until done
    rng = random.Random()
    kills = 0
    out = ""
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
    _assert_same_run(a, b)


def test_sigterm_saves_and_stops_cleanly(reference, tmp_path, cpu_env):
    """SIGTERM (a cluster's preemption notice) or Ctrl-C: finish the step, save, exit 0; re-run continues."""
    meta, a = reference
    c = tmp_path / "c"
    _prepare(c, cpu_env)
    proc = subprocess.Popen(_train_cmd(meta, c), env=cpu_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    _wait_for_steps(c, 6, proc)  # step 6: between the saves at 4 and 8
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "stopped at step" in out
    stopped = int(out.split("stopped at step ")[1].split()[0])
    assert stopped < STEPS and not (c / "rwkv-final.pth").exists()
    assert (c / "resume" / f"step-{stopped:09d}" / "state.json").is_file()
    r = subprocess.run(_train_cmd(meta, c), env=cpu_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed exactly from {c / 'resume' / f'step-{stopped:09d}'}" in r.stdout
    _assert_same_run(a, c)


def test_save_every_minutes_and_deepspeed_flag_on_cpu(reference, tmp_path, cpu_env):
    """--save_every_minutes writes resume states by the clock; a DeepSpeed strategy on a CPU-only
    machine falls back to plain training with a note (the tutorial's run script passes one)."""
    meta, _ = reference
    d = tmp_path / "d"
    _prepare(d, cpu_env)
    args = run_args(meta, d, "--my_exit_tokens", str(6 * 4 * 64), "--save_every_minutes", "0.0001",
                    "--mini_epoch_samples", "48", "--keep_resume", "3", "--strategy", "deepspeed_stage_2")
    r = subprocess.run([sys.executable, str(TRAIN_TEMP / "train.py"), *args], env=cpu_env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "DeepSpeed needs GPUs" in r.stdout
    # a state after every step (the clock interval is shorter than a step); the last 3 are kept
    assert [p.name for p in sorted((d / "resume").iterdir())] == [f"step-{s:09d}" for s in (3, 4, 5)]
    # the final step (6) is not a mini-epoch's end, and no resume state is kept for it: a re-run of
    # the finished run must still find it finished rather than train step 6 again from step 5
    before = snapshot(d)
    r = subprocess.run([sys.executable, str(TRAIN_TEMP / "train.py"), *args], env=cpu_env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "nothing to do" in r.stdout, r.stdout[-2000:]
    assert snapshot(d) == before
