"""--val_data_file / --val_every_steps / --val_tokens: the fixed validation windows and their split over
ranks, the loss against an independent cross-entropy, the logs (loss_log.csv's val_loss column,
train_log.txt's validation lines, the plot), bad validation files, and (slow tier) a training run
that validates, stopped and resumed exactly."""
import json
import math
import shutil

import numpy as np
import pytest
import torch

from trainkit import make_binidx, perturbed_model, prepare_args, run_args, same_weights, snapshot, train_main

from rwkvlm.errors import UserError
from rwkvlm.train.validation import (FORWARD_COST, VAL_TOKENS_MAX, ValData, due, estimated_cost, mean_loss,
                                     val_token_budget, val_windows)

VOCAB = ["--vocab_size", "512"]


# ================================================================ the windows

def test_windows_are_fixed_spread_and_whole():
    starts = val_windows(1000, 64, 640)  # (1000 - 1) // 64 = 15 slots, 10 windows
    assert len(starts) == 10 and len(set(starts)) == 10
    assert all(s % 64 == 0 and s + 65 <= 1000 for s in starts)
    assert list(starts) == [j * 15 // 10 * 64 for j in range(10)]
    assert list(val_windows(1000, 64, 10 ** 9)) == [i * 64 for i in range(15)]  # all slots at most
    assert len(val_windows(1000, 64, 1)) == 1 and len(val_windows(1000, 64, 95)) == 1  # rounded, at least 1
    assert len(val_windows(64, 64, 640)) == 0  # not one window of ctx_len + 1 tokens


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_take_distinct_slices_in_equal_batch_counts(world):
    tokens = np.arange(5000)  # a token is its offset
    val = ValData("v", tokens, val_windows(5000, 64, 64 * 25), 64)
    per_rank = [val.batches(r, world, rows=4) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # every rank runs as many batches (ZeRO-3)
    counted = [int(win[i, 0]) for b in per_rank for win, n in b for i in range(n)]
    assert sorted(counted) == sorted(val.starts.tolist())  # each window once, over all ranks


def test_schedule_and_the_default_size_stay_under_five_percent():
    from types import SimpleNamespace

    cfg = SimpleNamespace(val_every_steps=10, total_steps=25)
    assert [s for s in range(30) if due(cfg, s)] == [10, 20, 25]
    assert not due(SimpleNamespace(val_every_steps=0, total_steps=25), 25)
    for every, tps in ((16, 256), (40, 256), (100, 65536), (1000, 65536), (20, 16 * 4096), (10 ** 6, 256)):
        auto = val_token_budget(SimpleNamespace(val_tokens=0, val_every_steps=every, tokens_per_step=tps))
        assert tps <= auto <= max(tps, VAL_TOKENS_MAX) and auto % tps == 0 or auto == VAL_TOKENS_MAX
        assert estimated_cost(auto, every, tps) < 0.05
        if every >= 32:
            assert estimated_cost(auto, every, tps) <= FORWARD_COST / 32 + 1e-9
    assert val_token_budget(SimpleNamespace(val_tokens=4096, val_every_steps=1, tokens_per_step=256)) == 4096
    assert estimated_cost(16 * 256, 1, 256) == pytest.approx(16 * FORWARD_COST)


def test_val_loss_is_the_mean_cross_entropy_of_the_windows():
    model = perturbed_model(n_layer=1, n_embd=64, vocab_size=100)
    model.eval()
    tokens = np.random.default_rng(0).integers(0, 100, 3000)
    val = ValData("v", tokens, val_windows(3000, 32, 32 * 11), 32)
    with torch.no_grad():
        want = np.mean([float(torch.nn.functional.cross_entropy(
            model(torch.as_tensor(tokens[s:s + 33][None, :-1]))[0], torch.as_tensor(tokens[s + 1:s + 33])))
            for s in val.starts])
    total, count = mean_loss(model, val.batches(0, 1, rows=4), "cpu")
    assert count == 11 and total / count == pytest.approx(want, rel=1e-5)
    # split over 3 ranks and reduced: the same mean
    parts = [mean_loss(model, val.batches(r, 3, rows=2), "cpu") for r in range(3)]
    assert sum(c for _, c in parts) == 11
    assert sum(t for t, _ in parts) / 11 == pytest.approx(want, rel=1e-5)


# ================================================================ the logs

def test_validation_lines_are_skipped_by_readers_of_mini_epoch_lines(tmp_path):
    from rwkvlm.infer.plot import read_train_log, read_val_lines
    from rwkvlm.rundir import RunDir
    from rwkvlm.rundir.saves import _epoch_losses
    from rwkvlm.train.trainlog import before_start, epoch_lines, validation_fields, validation_line

    line = validation_line(40, 10240, 3.2154, 16, 0.42)
    assert line.startswith("val step 40 tokens 10240 val_loss 3.215400 val_ppl ") and line.endswith("\n")
    assert validation_fields(line) == (40, 10240, 3.2154)
    log = ["# 2026-12-03 10:00:00 new run at step 0 (mini-epoch 0) from rwkv-init.pth, to step 80: x=1\n",
           validation_line(20, 5120, 4.0, 16, 0.4), "0 3.500000 33.1155 0.00300000 2026-12-03 10:00:05.1 0\n",
           line, "1 3.100000 22.1980 0.00200000 2026-12-03 10:00:09.1 1\n"]
    (tmp_path / "train_log.txt").write_text("".join(log))
    assert [ln.split()[0] for ln in epoch_lines(log)] == ["0", "1"]
    assert list(read_train_log(tmp_path / "train_log.txt").epoch) == [0, 1]
    assert _epoch_losses(RunDir(tmp_path)) == {0: 3.5, 1: 3.1}
    tokens, losses = read_val_lines(tmp_path / "train_log.txt")
    assert list(tokens) == [5120, 10240] and list(losses) == [4.0, 3.2154]
    # a run that starts at step 40 keeps the validation of step 40, not of a later one
    assert before_start(line, 1, 40) and not before_start(line, 1, 39)


def test_loss_log_with_and_without_the_val_column_and_the_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from rwkvlm.infer.plot import plot_run, read_loss_csv
    from rwkvlm.rundir import LOSS_LOG_HEADER, LOSS_LOG_VAL_HEADER

    assert LOSS_LOG_VAL_HEADER == LOSS_LOG_HEADER + ",val_loss"
    rows = [f"{s},{s * 256},{5 - s / 10:.6f},0.001,1.0,1.0," + (f"{5.1 - s / 10:.6f}" if s % 5 == 0 else "")
            for s in range(1, 21)]
    (tmp_path / "loss_log.csv").write_text(LOSS_LOG_VAL_HEADER + "\n" + "\n".join(rows) + "\n")
    log = read_loss_csv(tmp_path / "loss_log.csv")
    assert log.has_val and np.isnan(log.val[0]) and log.val[4] == pytest.approx(4.6) and not log.skipped
    png = plot_run(tmp_path)
    assert png.read_bytes()[:4] == b"\x89PNG"
    # the plain header (validation off) reads as before
    (tmp_path / "loss_log.csv").write_text(LOSS_LOG_HEADER + "\n" + "\n".join(r.rsplit(",", 1)[0] for r in rows))
    log = read_loss_csv(tmp_path / "loss_log.csv")
    assert not log.has_val and len(log.step) == 20


# ================================================================ bad validation files

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    meta = make_binidx(root / "train", 20_000, seed=0, vocab="test512", high=512)
    proj = root / "proj"
    from rwkvlm.train.run import main

    assert main(prepare_args(proj, *VOCAB)) == 0
    return dict(root=root, meta=meta, proj=proj)


def _val_args(data, val, *extra):
    return run_args(data["meta"], data["proj"], "--val_data_file", str(val), "--val_every_steps", "4", *VOCAB,
                    *extra)


def _fails(args, *needles, proj=None):
    from rwkvlm.train.run import main

    before = snapshot(proj) if proj else None
    with pytest.raises(UserError) as e:
        main([str(a) for a in args])
    for n in needles:
        assert n in str(e.value), f"{n!r} not in:\n{e.value}"
    if proj is not None:
        assert snapshot(proj) == before, "PROJ_DIR changed"


def test_val_file_of_another_vocabulary_is_refused_before_writing(data):
    root, proj = data["root"], data["proj"]
    make_binidx(root / "world", 3_000, seed=1, vocab="rwkv_vocab_v20230424", high=512)
    _fails(_val_args(data, root / "world"), "--val_data_file", "rwkv_vocab_v20230424", "test512", proj=proj)
    make_binidx(root / "big_ids", 3_000, seed=2, vocab="test512", high=5000)
    _fails(_val_args(data, root / "big_ids"), "--val_data_file", "token id", "512 tokens", proj=proj)
    _fails(_val_args(data, root / "missing"), "--val_data_file", "not found", proj=proj)
    make_binidx(root / "tiny", 40, seed=3, vocab="test512", high=512)
    _fails(_val_args(data, root / "tiny"), "fewer than one window", proj=proj)
    _fails(run_args(data["meta"], proj, "--val_every_steps", "4", *VOCAB), "--val_data_file is empty", proj=proj)


def test_char_run_validates_on_text_of_its_characters_only(tmp_path):
    from rwkvlm.data.text import load_text_data
    from rwkvlm.train.config import parse_args
    from rwkvlm.train.data_checks import open_val_data
    from trainkit import char_args, text_numbers, write_text

    write_text(tmp_path / "train.txt", 200)
    write_text(tmp_path / "val.txt", 50, seed=9)
    meta = text_numbers(tmp_path / "train.txt")
    train = load_text_data(tmp_path / "train.txt", 0)
    cfg = parse_args(char_args(run_args(dict(meta), tmp_path / "p", "--val_data_file", str(tmp_path / "val.txt"),
                                        "--val_every_steps", "4"), meta["vocab_size"]))
    val = open_val_data(cfg, train)
    assert len(val.starts) >= 1 and int(np.max(val.tokens)) < meta["vocab_size"]
    (tmp_path / "val.txt").write_text("Über alles ÿ" * 20)
    with pytest.raises(UserError, match="--val_data_file .* does not have"):
        open_val_data(cfg, train)


# ================================================================ a run that validates (slow)

def _run(data, proj, *extra):
    val = data["root"] / "heldout"
    if not (data["root"] / "heldout.bin").exists():
        make_binidx(val, 6_000, seed=5, vocab="test512", high=512)
    return run_args(data["meta"], proj, "--my_exit_tokens", str(12 * 4 * 64), "--mini_epoch_samples", "48",
                    "--save_every_steps", "4", "--keep_resume", "9", "--val_data_file", str(val),
                    "--val_every_steps", "4", "--val_tokens", str(10 * 64), *VOCAB, *extra)


@pytest.mark.slow
def test_a_validating_run_logs_the_loss_an_independent_computation_gives(data, tmp_path, capsys):
    from rwkvlm.data.binidx import BinIdx
    from rwkvlm.infer.generate import load_model
    from rwkvlm.infer.plot import plot_run, read_loss_csv

    proj = tmp_path / "a"
    shutil.copytree(data["proj"], proj)
    assert train_main(_run(data, proj)) == 0
    assert "validation: 10 windows of 64 tokens" in capsys.readouterr().out
    csv = (proj / "loss_log.csv").read_text().splitlines()
    assert csv[0] == "step,tokens,loss,lr,kt_s,time,val_loss"
    vals = {int(r.split(",")[0]): r.split(",")[6] for r in csv[1:]}
    assert [s for s, v in vals.items() if v] == [4, 8, 12]
    lines = (proj / "train_log.txt").read_text().splitlines()
    val_lines = [ln for ln in lines if ln.startswith("val ")]
    assert [int(ln.split()[2]) for ln in val_lines] == [4, 8, 12]
    assert "val_data_file=" in lines[0] and "val_windows=10" in lines[0]
    assert json.loads((proj / "train_config.json").read_text())["validation"]["windows"] == 10
    assert read_loss_csv(proj / "loss_log.csv").has_val and plot_run(proj).is_file()
    # the loss logged at step 8 is the mean CE of the step-8 weights on the same windows
    model = load_model(proj / "resume" / "step-000000008" / "weights.pth", "cpu", log=lambda m: None)
    tokens = BinIdx(data["root"] / "heldout").tokens
    starts = val_windows(len(tokens), 64, 10 * 64)
    with torch.no_grad():
        ce = [float(torch.nn.functional.cross_entropy(model(torch.as_tensor(
            np.asarray(tokens[s:s + 64], dtype=np.int64)[None]))[0],
            torch.as_tensor(np.asarray(tokens[s + 1:s + 65], dtype=np.int64)))) for s in starts]
    assert float(vals[8]) == pytest.approx(np.mean(ce), abs=2e-5)
    assert all(math.isfinite(float(vals[s])) for s in (4, 8, 12))


@pytest.mark.slow
def test_a_validating_run_stopped_and_resumed_is_exact(data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        shutil.copytree(data["proj"], d)
    assert train_main(_run(data, a)) == 0
    assert train_main(_run(data, b), stop_at=6) == 0
    assert train_main(_run(data, b)) == 0
    assert same_weights(a / "rwkv-final.pth", b / "rwkv-final.pth")
    rows = lambda d: [(r.split(",")[:3], r.split(",")[6:]) for r in (d / "loss_log.csv").read_text().splitlines()]  # noqa: E731
    assert rows(a) == rows(b)
    vals = lambda d: [ln.split()[:7] for ln in (d / "train_log.txt").read_text().splitlines()  # noqa: E731
                      if ln.startswith("val ")]
    assert vals(a) == vals(b)  # no validation line repeated or lost
