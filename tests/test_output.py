"""What a training run prints (issue 16, item 4): no Lightning banners or notes, no float32
matmul hint, no barrier() warning, no stray `Training: 0/?` bar, one progress bar that counts
the run's global steps (also after a resume), the seed of an exact resume taken from its
state, the wandb "not installed" note on its own line before the bar.

Two tiny in-process CPU runs (module scope): a fresh run with a random seed, stopped at step 4
of 10 as Ctrl-C would stop it, and its exact resume to step 10.
"""
import contextlib
import io
import json
import logging
import re
import sys
import warnings

import pytest

from trainkit import make_dataset, prepare_args, run_args

STEPS, STOP_AT = 10, 4
NOISE = ("GPU available", "TPU available", "Trainer.fit` stopped", "float32 matmul", "Tensor Cores", "barrier()",
         "litlogger")


@contextlib.contextmanager
def _captured():
    """stdout, stderr and every record the Lightning and torch loggers pass on (whatever handlers
    Lightning installed when it was first imported)."""
    out, err, records = io.StringIO(), io.StringIO(), []
    handler = logging.Handler(level=logging.DEBUG)
    handler.emit = records.append
    loggers = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning_fabric", "torch")]
    for lg in loggers:
        lg.addHandler(handler)
    got = {}
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield got
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
        got.update(out=out.getvalue(), err=err.getvalue(), log="\n".join(r.getMessage() for r in records))


GPU_NOTES_SAID = "[the GPU notes were given here]"


def _gpu_notes():
    """What Lightning and torch say on a GPU machine, reproduced on CPU: the float32 matmul hint
    (Lightning's own check, an Ampere-class card pretended) and torch.distributed's barrier()
    warning (at every DDP save)."""
    import torch
    from lightning_fabric.accelerators import cuda as fabric_cuda

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: True)
        mp.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
        mp.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
        fabric_cuda._check_cuda_matmul_precision.__wrapped__(torch.device("cuda", 0))
    warnings.warn("barrier(): using the device under current context. You can specify `device_id` in "
                  "`init_process_group` to mute this warning.", UserWarning)
    print(GPU_NOTES_SAID)


def _train(args, stop_at=None, at_step_2=None):
    """train.py's main in this process; stop_at: stop there as on Ctrl-C (an exact-resume state);
    at_step_2: called at the end of step 2."""
    from rwkvlm.train.run import main
    from rwkvlm.train.saving import SaveStates

    batch_end = SaveStates.on_train_batch_end

    def on_train_batch_end(self, trainer, m, *a):
        if m.step == 2 and at_step_2 is not None:
            at_step_2()
        if m.step == stop_at:
            m.stop_requested = True  # what the Ctrl-C / SIGTERM handler sets
        return batch_end(self, trainer, m, *a)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SaveStates, "on_train_batch_end", on_train_batch_end)
        mp.setitem(sys.modules, "wandb", None)  # `import wandb` fails: the package is not installed
        return main(args)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("output")
    meta = make_dataset(root / "data", n_docs=200, copies=1)
    proj = root / "proj"
    from rwkvlm.train.run import main

    with _captured():
        assert main(prepare_args(proj)) == 0
    args = run_args(meta, proj, "--my_exit_tokens", str(STEPS * 4 * 64), "--random_seed", "-1",
                    "--enable_progress_bar", "True")
    with _captured() as first:
        assert _train(args + ["--wandb", "demo"], stop_at=STOP_AT, at_step_2=_gpu_notes) == 0
    with _captured() as resumed:
        assert _train(args) == 0
    return dict(first=first, resumed=resumed, proj=proj)


def _all(run) -> str:
    return "\n".join((run["out"], run["err"], run["log"]))


def test_no_lightning_banners_or_notes(runs):
    for name in ("first", "resumed"):
        text = _all(runs[name])
        for noise in NOISE:
            assert noise not in text, (name, noise, text[-3000:])


def test_no_stray_bar_and_the_bar_counts_global_steps(runs):
    first, resumed = runs["first"]["out"], runs["resumed"]["out"]
    for out in (first, resumed):
        assert "Training" not in out and "0/?" not in out and "Epoch 0" not in out, out[-2000:]
    assert re.search(rf"\b{STOP_AT}/{STEPS}\b", first), first[-2000:]
    # the resumed run's bar goes on from step 4 of 10, not from 0 of the 6 steps left
    assert re.search(rf"\b{STOP_AT + 1}/{STEPS}\b", resumed) and re.search(rf"\b{STEPS}/{STEPS}\b", resumed), \
        resumed[-2000:]
    assert not re.search(rf"\b[0-9]/{STEPS - STOP_AT}\b", resumed), resumed[-2000:]
    assert not re.search(rf"\b[0-3]/{STEPS}\b", resumed), resumed[-2000:]


def test_the_end_of_a_run_is_said_below_the_bar(runs):
    lines = [ln.split("\r")[-1] for ln in runs["resumed"]["out"].splitlines()]
    reached = [i for i, ln in enumerate(lines) if ln.startswith("reached --my_exit_tokens")]
    assert len(reached) == 1, lines
    assert not any("%|" in ln for ln in lines[reached[0]:]), lines  # no bar drawn again below it
    lines = [ln.split("\r")[-1] for ln in runs["first"]["out"].splitlines()]
    assert any(ln.startswith(f"stopped at step {STOP_AT} on request") for ln in lines), lines


def test_exact_resume_reuses_the_recorded_seed(runs):
    first, resumed = runs["first"]["out"], runs["resumed"]["out"]
    seeds = re.findall(r"\bseed (\d+)", first)
    assert len(seeds) == 1, first[-2000:]  # (the prepare step's seed 7 was printed by its own run)
    seed = int(seeds[0])
    assert f"seed {seed} (from the state)" in resumed, resumed[-2000:]
    assert re.findall(r"\bseed (\d+)", resumed) == [str(seed)], resumed[-2000:]  # once, no new one
    state = json.loads((runs["proj"] / "resume" / f"step-{STEPS:09d}" / "state.json").read_text())
    assert state["seed"] == seed  # and the resumed run's own states record it again


def test_wandb_missing_note_comes_once_on_its_own_line_before_the_bar(runs):
    out = runs["first"]["out"]
    assert out.count("wandb package is not installed") == 1, out[-2000:]
    segments = re.split(r"[\r\n]", out)
    note = [i for i, s in enumerate(segments) if s.startswith("note: --wandb is set but the wandb package")]
    bar = [i for i, s in enumerate(segments) if s.startswith("training:")]
    assert note and bar and note[0] < bar[0], out[-2000:]
    assert 'pip install -e ".[wandb]"' in segments[note[0]]


def test_gpu_notes_are_left_out(runs):
    import torch

    assert torch.get_float32_matmul_precision() == "highest"  # what the hint is given for
    text = _all(runs["first"])
    assert GPU_NOTES_SAID in text
    assert "Tensor Cores" not in text and "float32_matmul" not in text and "barrier()" not in text, text[-3000:]


def test_missing_checkpoint_message_names_the_path_once():
    from rwkvlm.errors import UserError
    from rwkvlm.infer.generate import load_model

    with pytest.raises(UserError) as e:
        load_model("out/L12-D768-x070/rwkv-final.pth", "cpu")
    msg = str(e.value)
    assert "out/<PROJ_DIR>" not in msg and "RWKV-v7/train_temp/out/L12-D768-x070/" in msg, msg
