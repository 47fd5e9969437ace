"""Every known user mistake stops train.py before any training work, with a
message that names the value found, the value expected and what to change,
and leaves PROJ_DIR untouched."""
import json
import warnings

import pytest

from rwkvlm.errors import UserError
from rwkvlm.train.run import main

from trainkit import make_dataset, prepare_args, run_args, snapshot


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def proj(tmp_path_factory):
    """A PROJ_DIR with an rwkv-init.pth in it."""
    d = tmp_path_factory.mktemp("proj")
    assert main(prepare_args(d)) == 0
    return d


def _fails(args, *needles, proj_dir=None):
    before = snapshot(proj_dir) if proj_dir else None
    with pytest.raises(UserError) as e:
        main(args)
    msg = str(e.value)
    for n in needles:
        assert n in msg, f"{n!r} not in message:\n{msg}"
    if proj_dir is not None:
        assert snapshot(proj_dir) == before, "PROJ_DIR changed"
    return msg


def test_no_init_and_no_checkpoint(data, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(run_args(data, empty), "no rwkv-init.pth", "demo-training-prepare.sh", str(empty.resolve()),
           proj_dir=empty)


def test_data_file_missing(data, proj, tmp_path):
    meta = dict(data, base=str(tmp_path / "nope" / "demo"))
    msg = _fails(run_args(meta, proj), "not found", "demo.bin", "without extension", proj_dir=proj)
    assert str((tmp_path / "nope" / "demo.bin").resolve()) in msg


def test_data_file_with_extension(data, proj):
    meta = dict(data, base=data["base"] + ".bin")
    _fails(run_args(meta, proj), "WITHOUT the extension", proj_dir=proj)


def test_ctx_len_mismatch(data, proj):
    # the data was prepared for ctx 64; the run says 128 with the prime for 64
    msg = _fails(run_args(data, proj, ctx_len=128), "CTX_LEN is 128", "ctx_len 64", "--magic_prime",
                 proj_dir=proj)
    from rwkvlm.data.magic_prime import magic_prime

    assert f"--magic_prime {magic_prime(data['tokens'], 128)} --ctx_len 128" in msg


@pytest.mark.parametrize("kind", ["not_prime", "not_3n2", "wrong"])
def test_magic_prime_wrong(data, proj, kind):
    from rwkvlm.data.magic_prime import is_prime

    p = data["magic_prime"]
    bad = {"not_prime": p + 1 if not is_prime(p + 1) else p + 3,
           "not_3n2": next(q for q in range(p - 1, 2, -1) if is_prime(q) and q % 3 == 1),
           "wrong": next(q for q in range(p - 1, 2, -1) if is_prime(q) and q % 3 == 2)}[kind]
    meta = dict(data, magic_prime=bad)
    why = {"not_prime": "is not prime", "not_3n2": "3n+2", "wrong": f"expected {p}"}[kind]
    right = f"--my_exit_tokens {data['tokens']} --magic_prime {p} --ctx_len 64"
    _fails(run_args(meta, proj), why, right, proj_dir=proj)


def test_exit_tokens_differs_is_a_warning(data, proj, monkeypatch):
    from rwkvlm.train.config import parse_args
    from rwkvlm.train.data_checks import open_training_data

    cfg = parse_args(run_args(dict(data, tokens=data["tokens"] * 2), proj))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds = open_training_data(cfg)
    assert ds.num_tokens == data["tokens"]
    assert any("--my_exit_tokens" in str(x.message) and "2 passes" in str(x.message) for x in w)


def test_token_ids_beyond_vocab(data, proj):
    args = run_args(data, proj) + ["--vocab_size", "300"]
    _fails(args, "token id", "--vocab_size is 300", "--vocab_size 65536", proj_dir=proj)


def test_data_shorter_than_three_contexts(data, proj):
    ctx = 16 * ((data["tokens"] // 3) // 16 + 1)
    _fails(run_args(data, proj, ctx_len=ctx), "fewer than 3 x ctx_len", proj_dir=proj)


def test_n_embd_not_multiple_of_64(data, proj):
    _fails(run_args(data, proj) + ["--n_embd", "100"], "N_EMBD", "100", "multiple of 64", proj_dir=proj)


def test_ctx_len_not_multiple_of_chunk(data, proj):
    _fails(run_args(data, proj, ctx_len=100), "CTX_LEN", "100", "multiple of 16", proj_dir=proj)


def test_batch_not_dividing_mini_epoch(data, proj):
    args = run_args(data, proj) + ["--micro_bsz", "11", "--devices", "2"]
    _fails(args, "11 x 2 x 1 = 22", "40320", "M_BSZ", proj_dir=proj)


def test_exit_tokens_missing(data, proj):
    args = run_args(data, proj) + ["--my_exit_tokens", "0"]
    _fails(args, "--my_exit_tokens", "make_data.py printed", proj_dir=proj)


def test_checkpoint_shape_mismatch(data, proj):
    args = run_args(data, proj) + ["--n_layer", "3"]
    _fails(args, "does not fit this model", "N_LAYER=2", "N_LAYER=3", proj_dir=proj)


def test_no_gpu_trains_on_cpu_with_a_note(data, proj, tmp_path, monkeypatch, capsys):
    """The scripts' defaults (--accelerator gpu, deepspeed_stage_2, bf16) on a machine with no
    visible GPU train on CPU in fp32 without DeepSpeed, saying so in one line."""
    import shutil

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    d = tmp_path / "nogpu"
    shutil.copytree(proj, d)
    args = run_args(dict(data, tokens=3 * 4 * 64), d) + [
        "--accelerator", "gpu", "--strategy", "deepspeed_stage_2", "--precision", "bf16"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("no CUDA GPU is visible") == 1 and "training on CPU in fp32" in out
    assert "cpu auto fp32" in out
    info = json.loads((d / "rwkv-final.json").read_text())
    assert info["step"] == 3 and info["fingerprint"]["precision"] == "fp32"
    assert info["fingerprint"]["strategy"] == "auto" and not info["fingerprint"]["deepspeed"]


def test_loss_turning_nan_stops_before_saving(data, tmp_path, monkeypatch):
    """A run whose loss becomes NaN stops with a message naming the step and the flags to
    change; the rwkv-N.pth of earlier mini-epochs stay, nothing of the bad step is written."""
    import math

    from rwkvlm.model import RWKV7

    proj = tmp_path / "nan"
    assert main(prepare_args(proj)) == 0
    real_loss, calls = RWKV7.loss, []

    def loss(self, idx, targets):
        calls.append(1)
        out = real_loss(self, idx, targets)
        return out * math.nan if len(calls) == 6 else out

    monkeypatch.setattr(RWKV7, "loss", loss)
    args = run_args(data, proj, "--mini_epoch_samples", "8")  # 2 steps per mini-epoch
    with pytest.raises(UserError, match=r"loss is nan at step 6.*--lr_init"):
        main(args)
    saved = sorted(p.name for p in proj.glob("rwkv-*.pth"))
    assert saved == ["rwkv-0.pth", "rwkv-1.pth", "rwkv-init.pth", "rwkv-latest.pth"], saved
    assert (proj / "rwkv-latest.pth").samefile(proj / "resume" / "step-000000004" / "weights.pth")
    assert not (proj / "rwkv-final.pth").exists()
