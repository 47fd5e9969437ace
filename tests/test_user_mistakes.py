"""Issue 16, items 6 and 8: mistakes that used to end in a traceback end with a message that
says what to do; a checkpoint that fails the safe load is refused with one message everywhere."""
import errno
import json
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

import rwkvlm.data.make_data as md
from rwkvlm.data.binidx import BinIdxWriter
from rwkvlm.errors import UserError, run_cli

from trainkit import make_dataset, prepare_args, run_args, run_make_data

DOCS = [f"document number {i} " + "word " * (i % 30) for i in range(60)]
Usage = namedtuple("Usage", "total used free")


def write_jsonl(path, docs=DOCS):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")


def listing(d: Path) -> list:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def no_temporaries(d: Path) -> bool:
    return not [p for p in d.rglob("*") if p.name.endswith(".tmp") or ".tokens." in p.name]


# ================================================================ make_data: ctx_len

@pytest.mark.parametrize("ctx, nearest", [(4097, ("4096", "4608")), (500, ("512", "496")),
                                          (4112, ("4096", "4608")), (1000, ("512", "1024"))])
def test_make_data_refuses_a_ctx_len_that_train_refuses(tmp_path, capsys, ctx, nearest):
    write_jsonl(tmp_path / "demo.jsonl")
    assert run_make_data(tmp_path, "demo.jsonl", 2, ctx) == 2
    err = capsys.readouterr().err
    assert f"ctx_len (3rd argument) is {ctx}" in err and "multiple of 512" in err
    for n in nearest:
        assert n in err, err
    assert listing(tmp_path) == ["demo.jsonl"]


@pytest.mark.parametrize("ctx", [512, 4096, 64])  # 64: a multiple of 16 below 512 (tiny test models)
def test_make_data_accepts_the_ctx_lens_train_accepts(tmp_path, ctx):
    write_jsonl(tmp_path / "demo.jsonl")
    assert run_make_data(tmp_path, "demo.jsonl", 1, ctx, "--seed", 0) == 0


# ================================================================ make_data: disk space

def test_make_data_refuses_output_that_does_not_fit_the_free_space(tmp_path, capsys, monkeypatch):
    write_jsonl(tmp_path / "demo.jsonl")
    assert run_make_data(tmp_path, "demo.jsonl", 2, 512, "--seed", 1) == 0
    before = {p: (tmp_path / p).read_bytes() for p in ("demo.bin", "demo.idx", "demo.meta.json")}
    capsys.readouterr()
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 5000, 5000))
    assert run_make_data(tmp_path, "demo.jsonl", 30, 512) == 2
    err = capsys.readouterr().err
    assert "ERROR:" in err and "Traceback" not in err
    assert "needs" in err and "free" in err and "5.0 kB" in err and str(tmp_path.resolve()) in err
    assert {p: (tmp_path / p).read_bytes() for p in before} == before
    assert no_temporaries(tmp_path)


def test_make_data_refuses_a_huge_n_at_once(tmp_path, capsys, monkeypatch):
    def must_not_write(*a, **k):
        raise AssertionError("make_data started writing an output that cannot fit")

    monkeypatch.setattr(md, "write_copies", must_not_write)
    write_jsonl(tmp_path / "demo.jsonl")
    assert run_make_data(tmp_path, "demo.jsonl", 10**12, 4096) == 2
    err = capsys.readouterr().err
    assert "10^12" in err or "1000000000000" in err
    assert "needs" in err and "free" in err
    assert listing(tmp_path) == ["demo.jsonl"]


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only"),
                                         (errno.EACCES, "permission")])
def test_make_data_write_failure_keeps_the_previous_dataset(tmp_path, capsys, monkeypatch, code, words):
    write_jsonl(tmp_path / "demo.jsonl")
    assert run_make_data(tmp_path, "demo.jsonl", 1, 512, "--seed", 1) == 0
    before = {p: (tmp_path / p).read_bytes() for p in ("demo.bin", "demo.idx", "demo.meta.json")}
    capsys.readouterr()
    real = BinIdxWriter.add_items
    calls = []

    def failing(self, *a, **k):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(code, os.strerror(code))
        return real(self, *a, **k)

    monkeypatch.setattr(BinIdxWriter, "add_items", failing)
    assert run_make_data(tmp_path, "demo.jsonl", 5, 512, "--seed", 2) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and words in err.lower(), err
    assert str(tmp_path.resolve()) in err and "--out-dir" in err and "untouched" in err
    if code == errno.ENOSPC:
        assert "needs" in err and "free" in err
    assert {p: (tmp_path / p).read_bytes() for p in before} == before
    assert no_temporaries(tmp_path)


def test_make_data_read_only_out_dir(tmp_path, capsys, monkeypatch):
    write_jsonl(tmp_path / "demo.jsonl")

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(md.tempfile, "TemporaryFile", read_only)
    assert run_make_data(tmp_path, "demo.jsonl", 2, 512) == 2
    err = capsys.readouterr().err
    assert "read-only" in err and "--out-dir" in err and "Traceback" not in err
    assert listing(tmp_path) == ["demo.jsonl"]


def test_make_data_out_dir_that_is_a_file(tmp_path, capsys):
    write_jsonl(tmp_path / "demo.jsonl")
    (tmp_path / "out").write_text("not a folder")
    assert run_make_data(tmp_path, "demo.jsonl", 2, 512, "--out-dir", "out") == 2
    err = capsys.readouterr().err
    assert "--out-dir" in err and "is a file" in err


# ================================================================ train.py saves

def _fill_the_disk(monkeypatch, code=errno.ENOSPC):
    """torch.save writes a little, then the disk is full (as a real full disk does)."""
    def full(obj, f, *a, **k):
        if hasattr(f, "write"):
            f.write(b"\0" * 100)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(torch, "save", full)


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only")])
def test_save_weights_on_a_full_disk(tmp_path, monkeypatch, code, words):
    from rwkvlm.rundir.weights import save_weights

    old = tmp_path / "rwkv-0.pth"
    save_weights({"emb.weight": torch.ones(4, 2)}, old, "fp32")
    before = old.read_bytes()
    _fill_the_disk(monkeypatch, code)
    with pytest.raises(UserError) as e:
        save_weights({"emb.weight": torch.zeros(4, 2)}, old, "fp32")
    msg = str(e.value)
    assert words in msg.lower() and str(tmp_path.resolve()) in msg and "--proj_dir" in msg, msg
    assert old.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["rwkv-0.pth"]
    assert isinstance(e.value, OSError)  # callers that handle OSError still see one


class FullDisk:
    """A file whose disk fills up after `room` bytes (a write then raises ENOSPC, as a real one does)."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, b):
        if len(b) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(b)
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_real_torch_save_on_a_full_disk(tmp_path, monkeypatch):
    """torch.save's own RuntimeError ('unexpected pos') hides the ENOSPC: still the full-disk message."""
    import builtins

    import rwkvlm.atomic as atomic
    from rwkvlm.rundir.weights import save_weights

    def full_open(path, mode="r", *a, **k):
        f = builtins.open(path, mode, *a, **k)
        return FullDisk(f, 300) if "w" in mode and str(path).endswith(".tmp") else f

    monkeypatch.setattr(atomic, "open", full_open, raising=False)
    with pytest.raises(UserError) as e:
        save_weights({"emb.weight": torch.zeros(1000, 2)}, tmp_path / "rwkv-1.pth", "fp32")
    assert "no space left" in str(e.value) and "--proj_dir" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_train_prepare_on_a_full_disk(tmp_path, capsys, monkeypatch):
    from rwkvlm.train.run import main

    _fill_the_disk(monkeypatch)
    assert run_cli(main, prepare_args(tmp_path / "proj")) == 2
    err = capsys.readouterr().err
    assert "ERROR:" in err and "no space left" in err and "--proj_dir" in err and "Traceback" not in err
    assert [p.name for p in (tmp_path / "proj").iterdir() if p.name != ".train.lock"] == []


def test_resume_state_on_a_full_disk_leaves_the_previous_state(tmp_path):
    from rwkvlm.train.resume import save_resume_state
    from rwkvlm.rundir import RunDir

    rd = RunDir(tmp_path)
    state = {"step": 4, "kind": "torch", "fingerprint": {"micro_bsz": 1, "world_size": 1}}

    def good(d):
        torch.save({"a": torch.zeros(2)}, d / "trainer.pt")

    first = save_resume_state(rd, 4, state, good, keep=2, is_rank0=True)

    def full(d):
        (d / "trainer.pt").write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError) as e:
        save_resume_state(rd, 8, dict(state, step=8), full, keep=2, is_rank0=True)
    msg = str(e.value)
    assert "no space left" in msg and "--proj_dir" in msg and "step-000000004" in msg, msg
    assert [d for _, d in rd.state_dirs()] == [first] and rd.state_dirs(complete=False) == []


def test_deepspeed_style_write_failure_is_explained(tmp_path, monkeypatch):
    """torch.save to a path on a full disk raises RuntimeError('... unexpected pos ...'), not OSError."""
    from rwkvlm.train.resume import save_resume_state
    from rwkvlm.rundir import RunDir

    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 1000, 1000))

    def torn(d):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    state = {"step": 4, "kind": "deepspeed", "fingerprint": {"micro_bsz": 1, "world_size": 1}}
    with pytest.raises(UserError) as e:
        save_resume_state(RunDir(tmp_path), 4, state, torn, keep=2, is_rank0=True)
    assert "1.0 kB free" in str(e.value) and "--proj_dir" in str(e.value)
    assert not (tmp_path / "resume" / "step-000000004").exists()


# ================================================================ folders that are files

def test_proj_dir_that_is_a_file(tmp_path, capsys):
    from rwkvlm.train.run import main

    f = tmp_path / "proj"
    f.write_text("a file")
    assert run_cli(main, prepare_args(f)) == 2
    err = capsys.readouterr().err
    assert "--proj_dir" in err and "is a file" in err and "Traceback" not in err
    assert f.read_text() == "a file"


def test_proj_dir_inside_a_file(tmp_path, capsys):
    from rwkvlm.train.run import main

    (tmp_path / "f").write_text("a file")
    assert run_cli(main, prepare_args(tmp_path / "f" / "proj")) == 2
    err = capsys.readouterr().err
    assert "--proj_dir" in err and "is a file" in err and str(tmp_path / "f") in err


def test_plot_out_that_is_a_folder_and_proj_dir_that_is_a_file(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from rwkvlm.infer.plot import main

    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "loss_log.csv").write_text("step,tokens,loss,lr,kt_s,time\n1,256,5.0,0.001,1,1\n2,512,4.0,0.001,1,2\n")
    (tmp_path / "out").mkdir()
    assert run_cli(main, [str(proj), "--out", str(tmp_path / "out")]) == 2
    assert "--out" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert run_cli(main, [str(proj), "--out", str(tmp_path / "file" / "loss.png")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "is a file" in err
    assert run_cli(main, [str(proj / "loss_log.csv")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_evaluate_json_into_a_folder_is_refused_before_evaluating(tmp_path, capsys):
    from rwkvlm.infer.evaluate import main

    (tmp_path / "out").mkdir()
    assert run_cli(main, [str(tmp_path / "rwkv-final.pth"), "--json", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--json" in err and "folder" in err, err
    (tmp_path / "file").write_text("x")
    assert run_cli(main, [str(tmp_path / "rwkv-final.pth"), "--json", str(tmp_path / "file" / "e.json")]) == 2
    err = capsys.readouterr().err
    assert "--json" in err and "is a file" in err, err


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), n_docs=200, copies=1)


def test_dump_samples_into_a_missing_folder_stops_before_training(data, tmp_path, capsys):
    from rwkvlm.train.run import main

    proj = tmp_path / "proj"
    assert run_cli(main, prepare_args(proj)) == 0
    before = sorted(p.name for p in proj.iterdir())
    dump = tmp_path / "no" / "such" / "dump"
    assert run_cli(main, run_args(data, proj, "--dump_samples", str(dump))) == 2
    err = capsys.readouterr().err
    assert "--dump_samples" in err and str(tmp_path / "no") in err and "Traceback" not in err
    assert sorted(p.name for p in proj.iterdir()) == before  # no training happened


# ================================================================ plot_loss: bad rows

def test_plot_skips_rows_that_are_not_numbers(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from rwkvlm.infer.plot import main, read_loss_csv

    rows = ["step,tokens,loss,lr,kt_s,time"] + [f"{s},{s * 256},{5 - s / 50:.4f},0.001,1,{s}" for s in range(1, 60)]
    rows[10] = "1e400,2560,4.8,0.001,1,10"
    rows[20] = "20,5120,inf,0.001,1,20"
    rows[30] = "30,7680,nan,0.001,1,30"
    rows[40] = "forty,10240,4.2,0.001,1,40"
    rows[45] = "45,1e400,4.1,0.001,1,45"
    (tmp_path / "loss_log.csv").write_text("\n".join(rows) + "\n")
    log = read_loss_csv(tmp_path / "loss_log.csv")
    assert len(log.step) == 54 and all(abs(x) < 10 for x in log.loss)
    assert [n for n, _ in log.skipped] == [11, 21, 31, 41, 46]
    assert run_cli(main, [str(tmp_path)]) == 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert "Traceback" not in text and "skipped 5" in text and "loss_log.csv" in text and "line 11" in text
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_refuses_a_loss_log_without_one_good_row(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from rwkvlm.infer.plot import main

    (tmp_path / "loss_log.csv").write_text("step,tokens,loss,lr,kt_s,time\n1e400,1,2,3,4,5\n2,512,inf,1,1,1\n")
    assert run_cli(main, [str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "loss_log.csv" in err and "line 2" in err and "Traceback" not in err


# ================================================================ item 8: unsafe checkpoints

class RunsCode:
    """Unpickling this would create a marker file: proof that code ran."""

    marker = None

    def __reduce__(self):
        return (os.mkdir, (RunsCode.marker,))


def _bad_checkpoints(d: Path) -> dict:
    import argparse

    RunsCode.marker = str(d / "PWNED")
    good = {"emb.weight": torch.zeros(4, 2)}
    files = {}
    files["code"] = d / "code.pth"
    torch.save(dict(good, x=RunsCode()), files["code"])
    files["object"] = d / "object.pth"
    torch.save(dict(good, args=argparse.Namespace(a=1)), files["object"])
    files["random"] = d / "random.pth"
    files["random"].write_bytes(os.urandom(2000))
    files["truncated"] = d / "truncated.pth"
    torch.save(good, files["truncated"])
    files["truncated"].write_bytes(files["truncated"].read_bytes()[:200])
    files["empty"] = d / "empty.pth"
    files["empty"].write_bytes(b"")
    return files


SAFE_WORDS = ("not a plain weights file", "damaged", "RWKV-LM", "you trust", "download it again")


def _check_message(msg: str, path: Path):
    assert str(path) in msg, msg
    for w in SAFE_WORDS:
        assert w in msg, f"{w!r} not in {msg!r}"
    rest = msg.replace(str(path), "")
    assert "weights_only" not in rest and "add_safe_globals" not in rest, msg


def test_every_tool_refuses_an_unsafe_checkpoint_with_one_message(tmp_path, capsys):
    from rwkvlm.infer.chat import chat_main
    from rwkvlm.rundir.weights import CorruptCheckpoint, load_weights
    from rwkvlm.infer.evaluate import main as eval_main
    from rwkvlm.infer.generate import load_model
    files = _bad_checkpoints(tmp_path)
    for kind, path in files.items():
        with pytest.raises(CorruptCheckpoint) as e:
            load_weights(path)
        _check_message(str(e.value), path)
        core = str(e.value)
        with pytest.raises(UserError) as e:
            load_model(path, "cpu")
        assert core in str(e.value)
        for main, argv in ((chat_main, [str(path), "--prompt", "hi", "--device", "cpu"]),
                           (eval_main, [str(path), "--n", "8", "--device", "cpu"])):
            assert run_cli(main, argv) == 2, (kind, main)
            assert core in capsys.readouterr().err, (kind, main)
    assert not (tmp_path / "PWNED").exists()


def test_train_load_model_refuses_an_unsafe_checkpoint(data, tmp_path):
    from rwkvlm.train.run import main

    files = _bad_checkpoints(tmp_path)
    for kind, path in files.items():
        with pytest.raises(UserError) as e:
            main(run_args(data, tmp_path / "proj", "--load_model", str(path)))
        _check_message(str(e.value), path)
        assert "--load_model" in str(e.value)
    assert not (tmp_path / "PWNED").exists()


def test_an_unsafe_save_in_proj_dir_is_skipped_with_the_message(tmp_path):
    import warnings

    from rwkvlm.train.resume import find_start
    from rwkvlm.train.config import parse_args

    torch.save({"emb.weight": torch.zeros(4, 2)}, tmp_path / "rwkv-init.pth")
    RunsCode.marker = str(tmp_path / "PWNED")
    torch.save({"emb.weight": torch.zeros(4, 2), "x": RunsCode()}, tmp_path / "rwkv-0.pth")
    cfg = parse_args(["--proj_dir", str(tmp_path), "--data_file", "x", "--my_exit_tokens", "100000",
                      "--magic_prime", "11", "--micro_bsz", "4", "--ctx_len", "64", "--mini_epoch_samples", "64"])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        start = find_start(cfg, log=lambda m: None)
    assert start.source == tmp_path / "rwkv-init.pth"
    msgs = [str(x.message) for x in w if "rwkv-0.pth" in str(x.message)]
    assert msgs and "not a plain weights file" in msgs[0] and "weights_only" not in msgs[0]
    assert not (tmp_path / "PWNED").exists()


def test_no_torch_load_outside_the_one_helper():
    src = Path(__file__).resolve().parents[1] / "RWKV-v7" / "rwkvlm"
    helper = src / "rundir" / "weights.py"
    found = []
    for p in sorted(src.rglob("*.py")):
        for n, line in enumerate(p.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if "torch.load(" in code and p != helper:
                found.append(f"{p.relative_to(src)}:{n}")
    assert found == []
    text = helper.read_text()
    assert text.count("torch.load(") == 1 + text.count("`torch.load(")  # one call, plus the docstring

