"""Where a run starts: weights_only loading, damaged saves falling back, the save with the most
training first whatever its settings, pruning, repairs of interrupted writes, divergence."""
import json
import warnings

import pytest
import torch

from rwkvlm.rundir.saves import run_fingerprint
from rwkvlm.rundir.weights import CorruptCheckpoint, load_weights
from rwkvlm.train.resume import find_start, save_resume_state, write_final_info
from rwkvlm.train.config import parse_args
from rwkvlm.errors import UserError
from rwkvlm.train.rng import rng_state
from rwkvlm.rundir import RunDir


class Evil:  # anything that needs arbitrary unpickling
    def __reduce__(self):
        return (print, ("this would run code",))


def _cfg(proj, **kw):
    args = ["--proj_dir", str(proj), "--data_file", "x", "--my_exit_tokens", "100000", "--magic_prime", "11",
            "--micro_bsz", "4", "--ctx_len", "64", "--mini_epoch_samples", "64", "--strategy", "auto"]
    for k, v in kw.items():
        args += [f"--{k}", str(v)]
    return parse_args(args)


def _sd(value):
    return {"emb.weight": torch.full((4, 2), float(value))}


def _value(start):
    return float(start.weights["emb.weight"][0, 0])


def _state(cfg, step, value=None, loss=None, pending=(), keep=10, optimizer=None):
    """An exact-resume state as the trainer writes it (weights.pth, trainer.pt, rng, state.json)."""
    value = step if value is None else value

    def write(d):
        torch.save(rng_state(), d / "rng-rank0.pt")
        torch.save(_sd(value), d / "weights.pth")
        torch.save({"model": _sd(value), "optimizer": optimizer or {"state": {}, "param_groups": []}},
                   d / "trainer.pt")

    state = {"format": 2, "step": step, "samples": step * cfg.real_bsz, "kind": "torch",
             "fingerprint": run_fingerprint(cfg), "epoch_begin": 0, "run_start_step": 0, "loss": loss,
             "pending": list(pending), "epoch_loss_sum": 0.0, "epoch_loss_count": 0}
    return save_resume_state(RunDir(cfg.proj_dir), step, state, write, keep=keep, is_rank0=True)


def _start(cfg):
    notes = []
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        start = find_start(cfg, log=notes.append)
    return start, notes, [str(x.message) for x in w]


# ---------------------------------------------------------------- reading weight files

def test_weights_only_refuses_pickled_objects(tmp_path):
    p = tmp_path / "rwkv-3.pth"
    torch.save({"emb.weight": torch.zeros(2), "extra": Evil()}, p)
    with pytest.raises(CorruptCheckpoint, match="not a plain weights file") as e:
        load_weights(p)
    assert "weights_only" not in str(e.value).replace(str(p), "")  # never advise the unsafe load (tests/test_user_mistakes.py)


def test_truncated_file_is_corrupt(tmp_path):
    p = tmp_path / "rwkv-0.pth"
    torch.save(_sd(1), p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpoint):
        load_weights(p)


def test_newest_epoch_checkpoint_wins(tmp_path):
    for n in (0, 1, 10, 2):
        torch.save(_sd(n), tmp_path / f"rwkv-{n}.pth")
    torch.save(_sd(-1), tmp_path / "rwkv-init.pth")
    cfg = _cfg(tmp_path)
    start = find_start(cfg)
    assert start.source.name == "rwkv-10.pth"
    assert start.epoch_begin == 11 and start.step == 11 * cfg.epoch_steps
    assert _value(start) == 10


def test_corrupted_newest_falls_back_with_a_warning(tmp_path):
    torch.save(_sd(-1), tmp_path / "rwkv-init.pth")
    torch.save(_sd(4), tmp_path / "rwkv-4.pth")
    (tmp_path / "rwkv-5.pth").write_bytes(b"PK\x03\x04 not really a checkpoint")
    start, _, warned = _start(_cfg(tmp_path))
    assert start.source.name == "rwkv-4.pth"
    assert any("rwkv-5.pth" in m and "corrupted" in m for m in warned)


def test_all_corrupt_is_an_error(tmp_path):
    (tmp_path / "rwkv-init.pth").write_bytes(b"garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UserError, match="unreadable"):
            find_start(_cfg(tmp_path))


def test_load_model_path(tmp_path):
    torch.save(_sd(7), tmp_path / "mine.pth")
    start = find_start(_cfg(tmp_path, load_model=tmp_path / "mine.pth", epoch_begin=3))
    assert start.epoch_begin == 3 and _value(start) == 7
    with pytest.raises(UserError, match="does not exist"):
        find_start(_cfg(tmp_path, load_model=tmp_path / "nope.pth"))


# ---------------------------------------------------------------- exact-resume states

def test_resume_state_preferred_over_older_weights_and_pruned(tmp_path):
    cfg = _cfg(tmp_path)
    torch.save(_sd(-1), tmp_path / "rwkv-init.pth")
    torch.save(_sd(0), tmp_path / "rwkv-0.pth")  # step 16
    for s in (20, 24, 28):
        _state(cfg, s, keep=2)
    assert [s for s, _ in RunDir(tmp_path).state_dirs()] == [28, 24]
    start = find_start(cfg)
    assert start.exact and start.resume_dir.name == "step-000000028" and start.step == 28
    assert _value(start) == 28


def test_incomplete_resume_state_is_ignored(tmp_path):
    cfg = _cfg(tmp_path)
    torch.save(_sd(-1), tmp_path / "rwkv-init.pth")
    _state(cfg, 8)
    # a save killed before state.json was written
    (tmp_path / "resume" / "step-000000012").mkdir()
    torch.save({"model": _sd(12)}, tmp_path / "resume" / "step-000000012" / "trainer.pt")
    assert find_start(cfg).step == 8


def _truncate(p):
    p.write_bytes(p.read_bytes()[:100])


@pytest.mark.parametrize("damage", [
    "trainer.pt truncated", "rng truncated", "rng malicious", "rng missing", "weights.pth truncated",
    "state.json a list", "state.json step not a number", "state.json loss a string", "state.json not json"])
def test_damaged_newest_state_falls_back_to_the_previous_save(tmp_path, damage):
    cfg = _cfg(tmp_path)
    torch.save(_sd(-1), tmp_path / "rwkv-init.pth")
    _state(cfg, 8)
    d = _state(cfg, 12)
    state = json.loads((d / "state.json").read_text())
    if damage == "trainer.pt truncated":
        _truncate(d / "trainer.pt")
    elif damage == "rng truncated":
        _truncate(d / "rng-rank0.pt")
    elif damage == "rng malicious":
        torch.save({"torch": Evil()}, d / "rng-rank0.pt")
    elif damage == "rng missing":
        (d / "rng-rank0.pt").unlink()
    elif damage == "weights.pth truncated":
        _truncate(d / "weights.pth")
    elif damage == "state.json a list":
        (d / "state.json").write_text("[]")
    elif damage == "state.json step not a number":
        (d / "state.json").write_text(json.dumps(dict(state, step="twelve")))
    elif damage == "state.json loss a string":
        (d / "state.json").write_text(json.dumps(dict(state, loss="low")))
    else:
        (d / "state.json").write_text('{"step": 12, "kind"')
    start, _, warned = _start(cfg)
    assert start.exact and start.step == 8 and _value(start) == 8
    assert any("step-000000012" in m and "previous save" in m for m in warned), warned


# ---------------------------------------------------------------- settings changed

def test_changed_settings_continue_from_the_newest_state(tmp_path):
    """M_BSZ 4 -> 8: the newest state's weights and optimiser state carry over, at the same number of
    samples; the message says what carries over and what restarts."""
    cfg = _cfg(tmp_path)
    torch.save(_sd(-1), tmp_path / "rwkv-init.pth")
    _state(cfg, 8)
    _state(cfg, 12)  # 48 samples; no rwkv-N.pth yet (a mini-epoch is 16 steps)
    start, notes, _ = _start(_cfg(tmp_path, micro_bsz=8))
    assert not start.exact and start.restore_optimizer and start.resume_dir.name == "step-000000012"
    assert _value(start) == 12 and start.step == 6 and start.run_start_step == 6
    note = " ".join(notes)
    assert "micro_bsz 4 -> 8" in note and "Carried over: its weights" in note and "optimiser state" in note
    assert "sample 48" in note and "warmup" in note and "data order" in note
    # the state itself is untouched and still the newest save
    assert json.loads((tmp_path / "resume" / "step-000000012" / "state.json").read_text())["step"] == 12


@pytest.mark.parametrize("change", [dict(ctx_len=128), dict(magic_prime=17), dict(precision="fp32"),
                                    dict(devices=2)])
def test_other_changes_keep_the_weights(tmp_path, change):
    cfg = _cfg(tmp_path)
    torch.save(_sd(-1), tmp_path / "rwkv-init.pth")
    _state(cfg, 12)
    new = _cfg(tmp_path, **change)
    start, notes, _ = _start(new)
    assert _value(start) == 12 and not start.exact
    assert start.step == 48 // new.real_bsz
    assert any(next(iter(change)).replace("devices", "world_size") in n for n in notes)


def test_optimiser_state_restarts_across_optimiser_kinds(tmp_path):
    cfg = _cfg(tmp_path)
    torch.save(_sd(-1), tmp_path / "rwkv-init.pth")
    _state(cfg, 12)
    start, notes, _ = _start(_cfg(tmp_path, strategy="deepspeed_stage_2", micro_bsz=8))
    assert _value(start) == 12 and not start.restore_optimizer
    assert any("optimiser state restarts" in n for n in notes)


def test_raised_exit_tokens_continue_exactly(tmp_path):
    cfg = _cfg(tmp_path, my_exit_tokens=12 * 4 * 64)
    torch.save(_sd(-1), tmp_path / "rwkv-init.pth")
    d = _state(cfg, 12, pending=["rwkv-final.pth"])
    (tmp_path / "rwkv-final.pth").hardlink_to(d / "weights.pth")
    write_final_info(RunDir(tmp_path), 12, 48, run_fingerprint(cfg), "resume/step-000000012")
    start, _, _ = _start(cfg)
    assert start.finished and start.step == 12
    start, notes, _ = _start(_cfg(tmp_path, my_exit_tokens=20 * 4 * 64))
    assert start.exact and not start.finished and start.step == 12 and _value(start) == 12
    assert any("stretched" in n for n in notes)


def test_final_of_other_settings_beats_rwkv_init(tmp_path):
    """A finished run (rwkv-final.pth, no state) whose settings changed: its weights, never rwkv-init.pth."""
    cfg = _cfg(tmp_path, my_exit_tokens=12 * 4 * 64)
    torch.save(_sd(-1), tmp_path / "rwkv-init.pth")
    torch.save(_sd(5), tmp_path / "rwkv-final.pth")
    write_final_info(RunDir(tmp_path), 12, 48, run_fingerprint(cfg), "x")
    start, _, _ = _start(_cfg(tmp_path, micro_bsz=2, my_exit_tokens=40 * 2 * 64))
    assert _value(start) == 5 and start.step == 24


def test_pruning_keeps_the_state_just_written(tmp_path):
    """States of other settings with higher step numbers neither displace the new state nor shadow it."""
    old = _cfg(tmp_path, micro_bsz=2)
    torch.save(_sd(-1), tmp_path / "rwkv-init.pth")
    for s in (8, 12, 14):  # M_BSZ 2: 28 samples at step 14
        _state(old, s)
    new = _cfg(tmp_path, micro_bsz=8)
    assert find_start(new).step == 3  # 28 // 8
    d = _state(new, 4, keep=2)  # 32 samples
    assert d.is_dir()
    assert [s for s, _ in RunDir(tmp_path).state_dirs()] == [14, 4]
    start = find_start(new)
    assert start.exact and start.step == 4 and _value(start) == 4


# ---------------------------------------------------------------- interrupted writes repaired

def test_missing_epoch_weights_rebuilt_from_their_state(tmp_path):
    """A kill while rwkv-0.pth was written: the state of that step lists it, and the next start makes it."""
    cfg = _cfg(tmp_path)
    torch.save(_sd(-1), tmp_path / "rwkv-init.pth")
    _state(cfg, 16, pending=["rwkv-0.pth"])
    (tmp_path / ".rwkv-0.pth.host-1-abcdefgh.tmp").write_bytes(b"half")
    start, notes, _ = _start(cfg)
    assert start.exact and start.step == 16
    assert float(load_weights(tmp_path / "rwkv-0.pth")["emb.weight"][0, 0]) == 16
    assert any("rwkv-0.pth" in n and "rebuilt" in n for n in notes)
    assert (tmp_path / "rwkv-latest.pth").samefile(tmp_path / "resume" / "step-000000016" / "weights.pth")


def test_truncated_final_beside_its_json_is_rebuilt(tmp_path):
    cfg = _cfg(tmp_path, my_exit_tokens=12 * 4 * 64)
    torch.save(_sd(-1), tmp_path / "rwkv-init.pth")
    _state(cfg, 12, pending=["rwkv-final.pth"])
    torch.save(_sd(12), tmp_path / "rwkv-final.pth")
    _truncate(tmp_path / "rwkv-final.pth")
    write_final_info(RunDir(tmp_path), 12, 48, run_fingerprint(cfg), "resume/step-000000012")
    start, _, _ = _start(cfg)
    assert start.finished
    assert float(load_weights(tmp_path / "rwkv-final.pth")["emb.weight"][0, 0]) == 12


def test_run_that_ended_on_an_epoch_file_gets_its_final(tmp_path):
    """rwkv-N.pth at the last step but no rwkv-final.pth (a stop while it was written, earlier versions)."""
    cfg = _cfg(tmp_path, my_exit_tokens=16 * 4 * 64)
    torch.save(_sd(-1), tmp_path / "rwkv-init.pth")
    torch.save(_sd(3), tmp_path / "rwkv-0.pth")  # step 16 = the end
    start, _, _ = _start(cfg)
    assert start.finished
    assert float(load_weights(tmp_path / "rwkv-final.pth")["emb.weight"][0, 0]) == 3
    assert json.loads((tmp_path / "rwkv-final.json").read_text())["step"] == 16


# ---------------------------------------------------------------- divergence

def _diverged_dir(tmp_path):
    cfg = _cfg(tmp_path)
    torch.save(_sd(-1), tmp_path / "rwkv-init.pth")
    _state(cfg, 8, loss=2.1)
    _state(cfg, 12, loss=2.0)
    _state(cfg, 14, loss=4.0e4)
    _state(cfg, 15, loss=2.5e13)
    from rwkvlm.train.resume import write_divergence

    good, bad = write_divergence(RunDir(tmp_path), cfg, 16, "the training loss is nan at step 16")
    assert good.path.name == "step-000000012" and [s.path.name for s in bad] == ["step-000000015",
                                                                                 "step-000000014"]
    return cfg


def test_diverged_run_refuses_the_same_learning_rate(tmp_path):
    cfg = _diverged_dir(tmp_path)
    with pytest.raises(UserError, match=r"diverged at step 16.*step-000000012.*Lower --lr_init"):
        find_start(cfg)


def test_lower_learning_rate_continues_from_the_last_healthy_save(tmp_path):
    _diverged_dir(tmp_path)
    start, notes, _ = _start(_cfg(tmp_path, lr_init=3e-4))
    assert start.exact and start.step == 12 and _value(start) == 12
    assert [s for s, _ in RunDir(tmp_path).state_dirs()] == [12, 8]
    aside = list((tmp_path / "set-aside").glob("*/resume/step-*"))
    assert sorted(p.name for p in aside) == ["step-000000014", "step-000000015"]
    assert not (tmp_path / "diverged.json").exists()
    assert any("set-aside" in n for n in notes)
    # later runs go on from there as usual (lr_init may even go back up)
    assert find_start(_cfg(tmp_path)).step == 12


def test_resume_from_names_a_save(tmp_path):
    cfg = _diverged_dir(tmp_path)
    start, _, _ = _start(_cfg(tmp_path, resume_from="step-8"))
    assert start.exact and start.step == 8
    assert [s for s, _ in RunDir(tmp_path).state_dirs()] == [8]
    with pytest.raises(UserError, match="not a save.*step-000000008"):
        find_start(_cfg(tmp_path, resume_from="step-99"))
    start, _, _ = _start(_cfg(tmp_path, resume_from="rwkv-init.pth"))
    assert start.step == 0 and _value(start) == -1
    assert cfg  # (the divergence record is gone: --resume_from ends it)
    assert not (tmp_path / "diverged.json").exists()
