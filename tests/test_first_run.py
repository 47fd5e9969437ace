"""After a partial run: train_log.txt exists from the first step (a header line per run, no
mini-epoch line repeated after a resume), and chat.py / evaluate.py given a PROJ_DIR (or an
exact-resume state) test its newest weights, or say clearly that there are none (issue 16, 2-3).

One tiny CPU training run (module scope), stopped at step 6 of a 12-step mini-epoch as Ctrl-C
would stop it; the other PROJ_DIRs are made of files directly.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from trainkit import make_dataset, perturbed_model, prepare_args, run_args

from rwkvlm.errors import UserError, run_cli
from rwkvlm.train.trainlog import before_start, epoch_lines, header_step, is_header

EPOCH_STEPS = 12  # --mini_epoch_samples 48 at M_BSZ 4
STOP_AT = 6


def _args(meta, proj, steps):
    return run_args(meta, proj, "--my_exit_tokens", str(steps * 4 * 64), "--mini_epoch_samples", "48",
                    "--save_every_steps", "4", "--keep_resume", "3")


class _Crash(Exception):
    """Stands for a kill: raised where the trainer would have been killed."""


def _train(args, stop_at=None, crash_at=None):
    """train.py's main in this process; stop_at: stop there as on Ctrl-C (an exact-resume state
    is saved); crash_at: die at that step's save, after its train_log.txt line, before its state."""
    from rwkvlm.train.run import main
    from rwkvlm.train.saving import SaveStates

    batch_end, save = SaveStates.on_train_batch_end, SaveStates.save

    def on_train_batch_end(self, trainer, m, *a):
        if m.step == stop_at:
            m.stop_requested = True  # what the Ctrl-C / SIGTERM handler sets
        return batch_end(self, trainer, m, *a)

    def _save(self, trainer, m, step, *a, **kw):
        if step == crash_at:
            raise _Crash(f"killed at step {step}")
        return save(self, trainer, m, step, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SaveStates, "on_train_batch_end", on_train_batch_end)
        mp.setattr(SaveStates, "save", _save)
        return main(args)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A PROJ_DIR whose run (2 mini-epochs of 12 steps) was stopped at step 6: exact-resume states
    of steps 4 and 6, rwkv-latest.pth, no rwkv-N.pth."""
    root = tmp_path_factory.mktemp("first_run")
    meta = make_dataset(root / "data", n_docs=200, copies=1)
    proj = root / "proj"
    from rwkvlm.train.run import main

    assert main(prepare_args(proj)) == 0
    assert _train(_args(meta, proj, 2 * EPOCH_STEPS), stop_at=STOP_AT) == 0
    return dict(meta=meta, proj=proj, root=root)


def _log(proj):
    return (proj / "train_log.txt").read_text().splitlines()


# ---------------------------------------------------------------- (a) train_log.txt from the first step

def test_stopped_run_has_a_train_log_header(stopped):
    proj = stopped["proj"]
    assert not list(proj.glob("rwkv-[0-9]*.pth"))  # stopped before the first mini-epoch ended
    lines = _log(proj)
    assert len(lines) == 1 and is_header(lines[0]), lines
    head = lines[0]
    assert " new run at step 0 (mini-epoch 0) from rwkv-init.pth, to step 24:" in head
    for setting in ("n_layer=2", "n_embd=64", "ctx_len=64", "micro_bsz=4", "lr_init=0.003", "precision=fp32",
                    "mini_epoch_samples=48", "epoch_steps=12"):
        assert setting in head.split(), (setting, head)
    assert header_step(head) == 0
    # readers of mini-epoch lines skip it
    from rwkvlm.infer.plot import read_train_log

    assert read_train_log(proj / "train_log.txt") is None


def test_resume_after_a_kill_appends_its_header_and_repeats_no_mini_epoch(stopped, tmp_path):
    proj = tmp_path / "proj"
    shutil.copytree(stopped["proj"], proj)
    args = _args(stopped["meta"], proj, 2 * EPOCH_STEPS)
    # run 2 resumes at step 6 and dies at step 12's save: mini-epoch 0's line is written, its state is
    # not; the newest state is step 8's
    with pytest.raises(_Crash):
        _train(args, crash_at=EPOCH_STEPS)
    lines = _log(proj)
    assert [header_step(ln) for ln in lines if is_header(ln)] == [0, STOP_AT]
    assert [ln.split()[0] for ln in epoch_lines(lines)] == ["0"]
    # run 3 continues exactly from step 8: the log is cut back to what that state recorded (run 2's
    # header stays: its steps 7-8 are kept), run 3's header follows, then mini-epochs 0 and 1, once each
    assert _train(args) == 0
    lines = _log(proj)
    heads = [ln for ln in lines if is_header(ln)]
    assert [header_step(ln) for ln in heads] == [0, STOP_AT, 8], lines
    assert " new run at step 0 " in heads[0]
    assert " resumed exactly at step 6 (mini-epoch 0) from resume/step-000000006," in heads[1]
    assert " resumed exactly at step 8 (mini-epoch 0) from resume/step-000000008," in heads[2]
    epochs = epoch_lines(lines)
    assert [ln.split()[0] for ln in epochs] == ["0", "1"], lines
    assert [ln.split()[-1] for ln in epochs] == ["0", "1"]  # epoch_in_run: the same run, continued
    assert lines.index(heads[2]) < lines.index(epochs[0])  # mini-epoch 0 was redone by run 3
    steps = [int(r.split(",")[0]) for r in (proj / "loss_log.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 2 * EPOCH_STEPS + 1))
    from rwkvlm.infer.plot import read_train_log

    assert list(read_train_log(proj / "train_log.txt").epoch) == [0, 1]


def test_trim_for_a_start_from_weights_keeps_earlier_runs_only():
    """Without a state's line count (a start from rwkv-N.pth at step 24, mini-epoch 2): mini-epochs
    before it and the headers of runs that began before it stay."""
    lines = ["# 2026-01-01 00:00:00 new run at step 0 (mini-epoch 0) from rwkv-init.pth, to step 48: x=1",
             "0 5.0 148.4 0.003 2026-01-01 00:01:00.0 0",
             "1 4.0 54.6 0.002 2026-01-01 00:02:00.0 1",
             "# 2026-01-01 00:03:00 resumed exactly at step 20 (mini-epoch 1) from resume/step-000000020, to step 48:",
             "2 3.0 20.1 0.001 2026-01-01 00:04:00.0 2",
             "# 2026-01-01 00:05:00 resumed exactly at step 36 (mini-epoch 3) from resume/step-000000036, to step 48:",
             "3 2.0 7.4 0.001 2026-01-01 00:06:00.0 3"]
    assert [before_start(ln, 2, 24) for ln in lines] == [True, True, True, True, False, False, False]
    assert not before_start(lines[0], 0, 0)  # a fresh start from rwkv-init.pth drops the dead run's header
    with pytest.raises(ValueError):
        before_start("junk", 2, 24)  # not ours: the caller leaves it alone


# ---------------------------------------------------------------- (b) the tools pick the newest weights

def _state(proj, step, samples, link_latest=True):
    d = proj / "resume" / f"step-{step:09d}"
    d.mkdir(parents=True)
    (d / "weights.pth").write_bytes(b"w" * step)  # sizes differ: no two look like copies of each other
    (d / "state.json").write_text(json.dumps(
        {"format": 2, "step": step, "samples": samples, "kind": "torch",
         "fingerprint": {"micro_bsz": 4, "world_size": 1, "ctx_len": 64}}))
    if link_latest:
        (proj / "rwkv-latest.pth").unlink(missing_ok=True)
        os.link(d / "weights.pth", proj / "rwkv-latest.pth")
    return d


def _proj(tmp_path, name="p"):
    proj = tmp_path / name
    proj.mkdir()
    (proj / "rwkv-init.pth").write_bytes(b"i")
    (proj / "train_config.json").write_text(json.dumps({"mini_epoch_samples": 48, "epoch_steps": 12}))
    return proj


def test_newest_weights_by_training_progress(tmp_path):
    from rwkvlm.rundir.find import find_weights

    proj = _proj(tmp_path)
    (proj / "rwkv-0.pth").write_bytes(b"0")  # 48 samples
    _state(proj, 16, 64)
    path, note = find_weights(proj)
    assert path == proj / "rwkv-latest.pth"
    assert "using rwkv-latest.pth" in note and "resume/step-000000016: step 16, 64 samples" in note
    assert "older: rwkv-0.pth" in note
    (proj / "rwkv-1.pth").write_bytes(b"1")  # 96 samples: more training than the state
    assert find_weights(proj)[0] == proj / "rwkv-1.pth"
    # a state at a mini-epoch's end: rwkv-1.pth is its weights.pth, named as such
    d = _state(proj, 24, 96)
    (proj / "rwkv-1.pth").unlink()
    os.link(d / "weights.pth", proj / "rwkv-1.pth")
    assert find_weights(proj)[0] == proj / "rwkv-1.pth"
    # the end of training
    d = _state(proj, 36, 144)
    os.link(d / "weights.pth", proj / "rwkv-final.pth")
    (proj / "rwkv-final.json").write_text(json.dumps(
        {"step": 36, "samples": 144, "fingerprint": {"micro_bsz": 4, "world_size": 1}}))
    path, note = find_weights(proj)
    assert path == proj / "rwkv-final.pth" and "step 36, 144 samples" in note
    # a stop between a state and its rwkv-latest.pth: the state's own weights.pth is the newest
    _state(proj, 40, 160, link_latest=False)
    assert find_weights(proj)[0] == proj / "resume" / "step-000000040" / "weights.pth"


def test_a_file_of_a_resume_state_gives_that_states_weights(tmp_path):
    from rwkvlm.rundir.find import find_weights

    proj = _proj(tmp_path)
    d = _state(proj, 8, 32)
    (d / "trainer.pt").write_bytes(b"t")
    for given in (d, d / "trainer.pt", d / "state.json"):
        path, note = find_weights(given)
        assert path == d / "weights.pth", given
        assert "using that state's weights" in note and "the same as" in note and "rwkv-latest.pth" in note
    assert find_weights(d / "weights.pth") == (d / "weights.pth", None)
    incomplete = proj / "resume" / "step-000000012"
    incomplete.mkdir()
    (incomplete / "trainer.pt").write_bytes(b"t")
    with pytest.raises(UserError, match=r"incomplete exact-resume state .*Use .*rwkv-latest\.pth"):
        find_weights(incomplete / "trainer.pt")
    with pytest.raises(UserError, match="folder of the exact-resume states; pass its PROJ_DIR"):
        find_weights(proj / "resume")


def test_old_state_without_weights_pth_loads_its_trainer_model(tmp_path):
    from rwkvlm.infer.generate import load_model

    model = perturbed_model(n_layer=1)
    proj = _proj(tmp_path)
    d = _state(proj, 8, 32, link_latest=False)
    (d / "weights.pth").unlink()
    torch.save({"model": model.state_dict(), "optimizer": {}}, d / "trainer.pt")
    notes = []
    got = load_model(d / "trainer.pt", "cpu", log=notes.append)
    assert "model weights saved in the exact-resume state" in notes[0]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in got.state_dict().items())


def test_chat_and_evaluate_given_the_stopped_proj_dir_use_rwkv_latest(stopped, capsys):
    from rwkvlm.infer.chat import chat_main
    from rwkvlm.infer.evaluate import main as evaluate_main

    proj = stopped["proj"]
    assert (proj / "rwkv-latest.pth").samefile(proj / "resume" / "step-000000006" / "weights.pth")
    rc = chat_main([str(proj), "--prompt", "1 + 1 = ?", "--max_tokens", "2", "--temperature", "0",
                    "--device", "cpu"])
    out = capsys.readouterr()
    assert rc == 0
    assert "using rwkv-latest.pth, the newest weights by training progress (the exact-resume state " \
           "resume/step-000000006: step 6, 24 samples trained)" in out.err
    assert "rwkv-latest" not in out.out  # --prompt: only the reply on stdout
    rc = evaluate_main([str(proj), "--n", "4", "--max-tokens", "2", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0 and "using rwkv-latest.pth" in out
    header = next(ln for ln in out.splitlines() if ln.startswith("kind"))
    assert header.split() == ["kind", "rwkv-latest"]
    # a file of the state: its weights
    rc = chat_main([str(proj / "resume" / "step-000000004" / "trainer.pt"), "--prompt", "1 + 1 = ?",
                    "--max_tokens", "2", "--temperature", "0", "--device", "cpu"])
    assert rc == 0 and "using that state's weights" in capsys.readouterr().err


def test_rwkv_package_loads_rwkv_latest_of_the_stopped_run(stopped):
    """rwkv-latest.pth of a partial run runs in the rwkv pip package, with our model's logits."""
    from rwkvlm.infer.generate import load_model

    latest = stopped["proj"] / "rwkv-latest.pth"
    tokens = [11, 22, 33, 4400, 0, 17]
    code = f"""
import json, os
os.environ["RWKV_V7_ON"] = "1"; os.environ["RWKV_JIT_ON"] = "0"; os.environ["RWKV_CUDA_ON"] = "0"
from rwkv.model import RWKV
m = RWKV(model={str(latest.with_suffix(''))!r}, strategy="cpu fp32")
out, _ = m.forward({tokens}, None, full_output=True)
print(json.dumps(out.float().tolist()))
"""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = torch.tensor(json.loads(r.stdout.strip().splitlines()[-1]))
    with torch.no_grad():
        ours = load_model(latest, "cpu")(torch.tensor([tokens]))[0]
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max().item() < 1e-3 * max(1.0, ours.abs().max().item())


# ---------------------------------------------------------------- (c) nothing to test

def test_proj_dir_without_weights_says_what_it_found_and_what_to_do(tmp_path, capsys):
    from rwkvlm.infer.chat import chat_main
    from rwkvlm.rundir.find import find_weights
    from rwkvlm.infer.evaluate import expand_checkpoints

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"holds no trained weights.*It holds: nothing\..*rwkv-latest\.pth at "
                                        r"every exact-resume save"):
        find_weights(empty)
    proj = _proj(tmp_path)
    (proj / "train_log.txt").write_text("# header\n")
    (proj / "resume" / "step-000000004").mkdir(parents=True)  # a save that was interrupted
    with pytest.raises(UserError) as e:
        expand_checkpoints([proj])
    msg = str(e.value)
    assert "rwkv-init.pth, train_config.json, train_log.txt" in msg
    assert "resume/step-000000004/ (incomplete: no state.json)" in msg
    assert "rwkv-init.pth there is the untrained initial model: pass that file by name" in msg
    assert "sh demo-training-run.sh" in msg and "Ctrl-C" in msg
    # the command line: the message, exit status 2
    assert run_cli(chat_main, [str(proj), "--prompt", "hi", "--device", "cpu"]) == 2
    assert "holds no trained weights" in capsys.readouterr().err
    assert run_cli(chat_main, [str(tmp_path / "nowhere"), "--device", "cpu"]) == 2
    assert "pass the PROJ_DIR itself" in capsys.readouterr().err

