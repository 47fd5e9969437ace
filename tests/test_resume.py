"""Exact resume under SIGKILL: a run killed at any write (weights, trainer state, RNG, json, a log
row), also across a settings change, and re-run ends bit-identical to an uninterrupted run, with
no file lost and no temporary file left.

The kill moments are file events (tests/killpoint.py), so every kill is reproducible: the random
schedule draws them from the uninterrupted run's trace with a seed that each failure prints.
"""
import json
import random
import re
import signal
import subprocess
import sys

import pytest
import torch

from trainkit import REPO, TRAIN_TEMP, make_dataset, prepare_args, run_args, snapshot

from rwkvlm.train.trainlog import epoch_lines, is_header

pytestmark = pytest.mark.slow

STEPS = 36  # 3 mini-epochs of 12 steps (48 samples at M_BSZ 4); a state every 4 steps
KILL_SEED = 20261202
KILLPOINT = REPO / "tests" / "killpoint.py"


def _args(meta, proj, *extra, steps=STEPS, micro_bsz=4):
    return run_args(meta, proj, "--my_exit_tokens", str(steps * 4 * 64), "--save_every_steps", "4",
                    "--mini_epoch_samples", "48", "--keep_resume", "2", *extra, micro_bsz=micro_bsz)


def _run(args, env, kill="", trace=None, timeout=600):
    cmd = [sys.executable, str(KILLPOINT)]
    if kill:
        cmd += ["--kill", kill]
    if trace:
        cmd += ["--trace", str(trace)]
    return subprocess.run([*cmd, str(TRAIN_TEMP / "train.py"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _prepare(proj, env):
    subprocess.run([sys.executable, str(TRAIN_TEMP / "train.py"), *prepare_args(proj)], env=env, check=True,
                   capture_output=True, timeout=300)


def _weights(p):
    return torch.load(p, weights_only=True)


def _same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _loss_rows(proj):
    return [ln.split(",")[:3] for ln in (proj / "loss_log.csv").read_text().splitlines()]


def _assert_same_run(a, b, what):
    """b ended as the uninterrupted a: final weights bit-identical, every weight file there and equal,
    the same logs, no temporary or incomplete save left."""
    names_a = sorted(p.name for p in a.glob("rwkv-*.pth"))
    names_b = sorted(p.name for p in b.glob("rwkv-*.pth"))
    assert names_a == names_b, f"{what}: weight files {names_b}, expected {names_a}"
    for n in names_a:
        assert _same_weights(a / n, b / n), f"{what}: {n} differs from the uninterrupted run's"
    # train_log.txt: the same mini-epoch lines (none repeated); each run that started left its header
    # line ('#'), the first one b's first line
    ta, tb = ((d / "train_log.txt").read_text().splitlines() for d in (a, b))
    la, lb = ([ln.split()[:3] for ln in epoch_lines(t)] for t in (ta, tb))
    assert la == lb, f"{what}: train_log.txt differs"
    assert len({ln[0] for ln in la}) == len(la), f"{what}: a mini-epoch line is repeated"
    heads = [ln for ln in tb if is_header(ln)]
    assert tb and is_header(tb[0]) and len(heads) >= len([ln for ln in ta if is_header(ln)]), \
        f"{what}: train_log.txt headers {heads}"
    assert _loss_rows(a) == _loss_rows(b), f"{what}: loss_log.csv differs"
    left = [str(p.relative_to(b)) for p in b.rglob("*.tmp")]
    assert not left, f"{what}: temporary files left: {left}"
    incomplete = [d.name for d in (b / "resume").iterdir() if not (d / "state.json").is_file()]
    assert not incomplete, f"{what}: incomplete states left: {incomplete}"
    assert json.loads((b / "rwkv-final.json").read_text())["step"] == json.loads(
        (a / "rwkv-final.json").read_text())["step"]


def _kill_and_finish(meta, proj, env, kill, args=None):
    args = args or _args(meta, proj)
    r = _run(args, env, kill=kill)
    assert r.returncode == -signal.SIGKILL, f"kill {kill} did not happen (rc {r.returncode}):\n{r.stdout[-2000:]}"
    out = [r.stdout]
    for _ in range(3):
        r = _run(args, env)
        assert r.returncode == 0, f"re-run after kill {kill} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        out.append(r.stdout)
        if "nothing to do" in r.stdout or "reached --my_exit_tokens" in r.stdout:
            break
    return "\n=====\n".join(out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cpu_env):
    """Data, an rwkv-init.pth, and an uninterrupted run with the trace of its file events."""
    root = tmp_path_factory.mktemp("resume")
    meta = make_dataset(root / "data", n_docs=300, copies=2)
    a = root / "a"
    _prepare(a, cpu_env)
    init = (a / "rwkv-init.pth").read_bytes()
    trace = root / "trace.txt"
    r = _run(_args(meta, a), cpu_env, trace=trace)
    assert r.returncode == 0, r.stderr[-3000:]
    events = trace.read_text().splitlines()
    return dict(meta=meta, a=a, init=init, events=events, root=root)


def _fresh(reference, tmp_path, name="b"):
    b = tmp_path / name
    b.mkdir()
    (b / "rwkv-init.pth").write_bytes(reference["init"])
    return b


# every kind of write the trainer makes; N picks a save in the middle of the run or its end
KILL_POINTS = [
    "create:.weights.pth.*:3",  # the state of step 12 (a mini-epoch's end), before its weights
    "create:.trainer.pt.*:2",
    "create:.rng-rank0.pt.*:5",
    "create:.state.json.*:4",
    "replace:state.json:6",  # state 24 complete but for the rename of its state.json
    "create:.rwkv-0.pth.*:1",  # the state of step 12 is complete, rwkv-0.pth is being made
    "replace:rwkv-1.pth:1",
    "create:.rwkv-latest.pth.*:7",
    "create:.rwkv-2.pth.*:1",  # the last step is a mini-epoch's end: rwkv-2.pth, then the final
    "create:.rwkv-final.pth.*:1",
    "create:.rwkv-final.json.*:1",
    "append:loss_log.csv:19",  # in the middle of a step, between saves
    "create:.train_config.json.*:1",  # while starting
]


@pytest.mark.parametrize("kill", KILL_POINTS)
def test_kill_at_each_write_resumes_exactly(reference, tmp_path, cpu_env, kill):
    b = _fresh(reference, tmp_path)
    out = _kill_and_finish(reference["meta"], b, cpu_env, kill)
    try:
        _assert_same_run(reference["a"], b, f"killed at {kill}")
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- output of the runs ---\n{out[-6000:]}") from None


def _pattern(event: str) -> str:
    """`kind glob` of a traced event: a temporary's name without its writer's host, pid and random part."""
    kind, name = event.split(" ", 1)
    return f"{kind}:{re.sub(r'[.][A-Za-z0-9-]+-[0-9]+-[a-z0-9_]+([.][A-Za-z0-9]+)?[.]tmp$', '.*', name)}"


def test_kills_at_random_writes_resume_exactly(reference, tmp_path, cpu_env):
    """Three runs, each killed twice at writes drawn by a seeded schedule: the first kill at any event of
    the uninterrupted run's trace, the second at the 1st-3rd event of some kind in the re-run."""
    rng = random.Random(KILL_SEED)
    patterns = [_pattern(e) for e in reference["events"]]
    kinds = sorted(set(patterns))
    for trial in range(3):
        b = _fresh(reference, tmp_path, f"b{trial}")
        i = rng.randrange(len(patterns))
        kills = [f"{patterns[i]}:{patterns[: i + 1].count(patterns[i])}", f"{rng.choice(kinds)}:{rng.randint(1, 3)}"]
        out = []
        for k in kills:
            r = _run(_args(reference["meta"], b), cpu_env, kill=k)
            out.append(f"[kill {k}: rc {r.returncode}]\n{r.stdout[-1500:]}")
        r = _run(_args(reference["meta"], b), cpu_env)
        out.append(r.stdout[-1500:])
        assert r.returncode == 0, r.stderr[-3000:]
        try:
            _assert_same_run(reference["a"], b, f"trial {trial}, kills {kills}")
        except AssertionError as e:
            raise AssertionError(f"{e} (KILL_SEED {KILL_SEED})\n" + "\n".join(out)) from None


# ---------------------------------------------------------------- a settings change

@pytest.fixture(scope="module")
def changed(reference, tmp_path_factory, cpu_env):
    """Run 1: 12 steps at M_BSZ 4 (it finishes); run 2: M_BSZ 8 and a longer --my_exit_tokens, which
    continues from run 1's last state at sample 48 (step 6 of M_BSZ 8). Uninterrupted."""
    root = tmp_path_factory.mktemp("changed")
    c = root / "c"
    c.mkdir()
    (c / "rwkv-init.pth").write_bytes(reference["init"])
    r = _run(_args(reference["meta"], c, steps=12), cpu_env)
    assert r.returncode == 0, r.stderr[-3000:]
    first = snapshot(c)
    r = _run(_args(reference["meta"], c, steps=36, micro_bsz=8), cpu_env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "micro_bsz 4 -> 8" in r.stdout and "Carried over: its weights" in r.stdout, r.stdout[-3000:]
    return dict(c=c, root=root, first=first)


def test_settings_change_keeps_progress(changed):
    c = changed["c"]
    rows = _loss_rows(c)
    steps = [int(r[0]) for r in rows[1:]]
    # run 1: steps 1..12 at M_BSZ 4; run 2 goes on at step 7 of M_BSZ 8 (sample 48), not from rwkv-init.pth
    assert steps[:12] == list(range(1, 13)) and steps[12] == 7 and steps[-1] == 18
    assert float(rows[13][2]) < float(rows[1][2]) - 1.0  # the loss goes on from run 1's, not from scratch


@pytest.mark.parametrize("kill", ["create:.weights.pth.*:1", "append:loss_log.csv:3", "create:.rwkv-1.pth.*:1"])
def test_kill_after_a_settings_change_resumes_exactly(reference, changed, tmp_path, cpu_env, kill):
    d = tmp_path / "d"
    d.mkdir()
    (d / "rwkv-init.pth").write_bytes(reference["init"])
    assert _run(_args(reference["meta"], d, steps=12), cpu_env).returncode == 0
    out = _kill_and_finish(reference["meta"], d, cpu_env, kill,
                           args=_args(reference["meta"], d, steps=36, micro_bsz=8))
    try:
        _assert_same_run(changed["c"], d, f"settings changed, killed at {kill}")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{out[-5000:]}") from None


def test_state_of_a_changed_run_is_never_pruned_away(reference, tmp_path, cpu_env):
    """M_BSZ 4 -> 8 leaves run 1's states with higher step numbers than run 2's; the state run 2
    reports on its stop must stay, and the next run continues exactly from it."""
    meta = reference["meta"]
    e = _fresh(reference, tmp_path, "e")
    assert _run(_args(meta, e, steps=12), cpu_env).returncode == 0  # states 8, 12 (M_BSZ 4)
    # (_args counts steps of M_BSZ 4) run 2 goes on at step 6 of M_BSZ 8 (48 samples), ends at 7 (56)
    args = _args(meta, e, steps=14, micro_bsz=8)
    r = _run(args, cpu_env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (e / "resume" / "step-000000007" / "state.json").is_file()
    assert sorted(p.name for p in (e / "resume").iterdir()) == ["step-000000007", "step-000000012"]
    r = _run(_args(meta, e, steps=18, micro_bsz=8), cpu_env)
    assert r.returncode == 0 and f"resumed exactly from {e / 'resume' / 'step-000000007'}" in r.stdout, r.stdout


# ---------------------------------------------------------------- stopping on request

def test_sigterm_saves_and_stops_cleanly(reference, tmp_path, cpu_env):
    """SIGTERM (a cluster's preemption notice) or Ctrl-C: finish the step, save, exit 0; re-run continues."""
    import time

    meta, a = reference["meta"], reference["a"]
    c = _fresh(reference, tmp_path, "c")
    proc = subprocess.Popen([sys.executable, str(TRAIN_TEMP / "train.py"), *_args(meta, c)], env=cpu_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while time.time() - t0 < 120 and proc.poll() is None:  # step 6: between the saves at 4 and 8
        log = c / "loss_log.csv"
        if log.is_file() and len(log.read_text().splitlines()) > 6:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "stopped at step" in out
    stopped = int(out.split("stopped at step ")[1].split()[0])
    assert stopped < STEPS and not (c / "rwkv-final.pth").exists()
    assert (c / "resume" / f"step-{stopped:09d}" / "state.json").is_file()
    assert (c / "rwkv-latest.pth").samefile(c / "resume" / f"step-{stopped:09d}" / "weights.pth")
    r = subprocess.run([sys.executable, str(TRAIN_TEMP / "train.py"), *_args(meta, c)], env=cpu_env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed exactly from {c / 'resume' / f'step-{stopped:09d}'}" in r.stdout
    _assert_same_run(a, c, "SIGTERM")


def test_save_every_minutes_and_deepspeed_flag_on_cpu(reference, tmp_path, cpu_env):
    """--save_every_minutes writes resume states by the clock; a DeepSpeed strategy on a CPU-only
    machine falls back to plain training with a note (the tutorial's run script passes one)."""
    meta = reference["meta"]
    d = _fresh(reference, tmp_path, "d")
    args = run_args(meta, d, "--my_exit_tokens", str(6 * 4 * 64), "--save_every_minutes", "0.0001",
                    "--mini_epoch_samples", "48", "--keep_resume", "3", "--strategy", "deepspeed_stage_2")
    r = subprocess.run([sys.executable, str(TRAIN_TEMP / "train.py"), *args], env=cpu_env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "DeepSpeed needs GPUs" in r.stdout
    # a state after every step (the clock interval is shorter than a step), the last one the final
    # step's; the newest 3 are kept
    assert [p.name for p in sorted((d / "resume").iterdir())] == [f"step-{s:09d}" for s in (4, 5, 6)]
    # a re-run of the finished run finds it finished and changes nothing
    before = snapshot(d)
    r = subprocess.run([sys.executable, str(TRAIN_TEMP / "train.py"), *args], env=cpu_env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "nothing to do" in r.stdout, r.stdout[-2000:]
    assert snapshot(d) == before
