"""Checkpoint loading: weights_only, corrupted files falling back, the newest save first."""
import json
import warnings

import pytest
import torch

from rwkvlm.checkpoint import CorruptCheckpoint, find_start, load_weights, resume_states, save_resume_state
from rwkvlm.config import parse_args
from rwkvlm.errors import UserError


class Evil:  # anything that needs arbitrary unpickling
    def __reduce__(self):
        return (print, ("this would run code",))


def _cfg(proj, **kw):
    args = ["--proj_dir", str(proj), "--data_file", "x", "--my_exit_tokens", "100000", "--magic_prime", "11",
            "--micro_bsz", "4", "--ctx_len", "64", "--mini_epoch_samples", "64"]
    for k, v in kw.items():
        args += [f"--{k}", str(v)]
    return parse_args(args)


def _sd(value):
    return {"emb.weight": torch.full((4, 2), float(value))}


def test_weights_only_refuses_pickled_objects(tmp_path):
    p = tmp_path / "rwkv-3.pth"
    torch.save({"emb.weight": torch.zeros(2), "extra": Evil()}, p)
    with pytest.raises(UserError, match="arbitrary unpickling"):
        load_weights(p)


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
    assert float(start.weights["emb.weight"][0, 0]) == 10


def test_corrupted_newest_falls_back_with_a_warning(tmp_path):
    torch.save(_sd(-1), tmp_path / "rwkv-init.pth")
    torch.save(_sd(4), tmp_path / "rwkv-4.pth")
    (tmp_path / "rwkv-5.pth").write_bytes(b"PK\x03\x04 not really a checkpoint")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        start = find_start(_cfg(tmp_path))
    assert start.source.name == "rwkv-4.pth"
    assert any("rwkv-5.pth" in str(x.message) and "corrupted" in str(x.message) for x in w)


def test_all_corrupt_is_an_error(tmp_path):
    (tmp_path / "rwkv-init.pth").write_bytes(b"garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UserError, match="unreadable"):
            find_start(_cfg(tmp_path))


def test_load_model_path(tmp_path):
    torch.save(_sd(7), tmp_path / "mine.pth")
    start = find_start(_cfg(tmp_path, load_model=tmp_path / "mine.pth", epoch_begin=3))
    assert start.epoch_begin == 3 and float(start.weights["emb.weight"][0, 0]) == 7
    with pytest.raises(UserError, match="does not exist"):
        find_start(_cfg(tmp_path, load_model=tmp_path / "nope.pth"))


def _write_state(cfg, step, payload_ok=True, keep=2):
    from rwkvlm.checkpoint import run_fingerprint

    def write(d):
        if payload_ok:
            torch.save({"model": _sd(step), "optimizer": {"state": {}, "param_groups": []}}, d / "trainer.pt")
        else:
            (d / "trainer.pt").write_bytes(b"broken")

    state = {"step": step, "kind": "torch", "fingerprint": run_fingerprint(cfg), "epoch_begin": 0}
    return save_resume_state(cfg.proj_dir, step, state, write, keep=keep, is_rank0=True)


def test_resume_state_preferred_over_older_weights_and_pruned(tmp_path):
    cfg = _cfg(tmp_path)
    torch.save(_sd(-1), tmp_path / "rwkv-init.pth")
    torch.save(_sd(0), tmp_path / "rwkv-0.pth")  # step 16
    for s in (20, 24, 28):
        _write_state(cfg, s)
    assert [s for s, _ in resume_states(tmp_path)] == [28, 24]  # keep=2
    start = find_start(cfg)
    assert start.resume_dir is not None and start.step == 28
    assert float(start.weights["emb.weight"][0, 0]) == 28


def test_incomplete_resume_state_is_ignored(tmp_path):
    cfg = _cfg(tmp_path)
    torch.save(_sd(-1), tmp_path / "rwkv-init.pth")
    _write_state(cfg, 8)
    # a save killed before state.json was written
    (tmp_path / "resume" / "step-000000012").mkdir()
    torch.save({"model": _sd(12)}, tmp_path / "resume" / "step-000000012" / "trainer.pt")
    assert find_start(cfg).step == 8


def test_corrupt_resume_state_falls_back(tmp_path):
    cfg = _cfg(tmp_path)
    torch.save(_sd(-1), tmp_path / "rwkv-init.pth")
    _write_state(cfg, 8)
    _write_state(cfg, 12, payload_ok=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        start = find_start(cfg)
    assert start.step == 8
    assert any("step-000000012" in str(x.message) for x in w)


def test_changed_settings_use_weight_files(tmp_path):
    cfg = _cfg(tmp_path)
    torch.save(_sd(-1), tmp_path / "rwkv-init.pth")
    _write_state(cfg, 8)
    notes = []
    start = find_start(_cfg(tmp_path, micro_bsz=8), log=notes.append)
    assert start.resume_dir is None and start.source.name == "rwkv-init.pth"
    assert any("micro_bsz 4 -> 8" in n for n in notes)
    state = json.loads((tmp_path / "resume" / "step-000000008" / "state.json").read_text())
    assert state["step"] == 8
