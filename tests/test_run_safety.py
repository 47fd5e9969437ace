"""One trainer per PROJ_DIR, dead writers' leftovers cleaned, token ids checked before training."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from rwkvlm.atomic import _host
from rwkvlm.data.binidx import write_binidx
from rwkvlm.errors import UserError
from rwkvlm.data.magic_prime import magic_prime
from rwkvlm.rundir import RunDir
from rwkvlm.train.run import main

from trainkit import TRAIN_TEMP, make_dataset, prepare_args, run_args, snapshot


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


def _short(data, proj, steps=3, *extra):
    args = run_args(data, proj, *extra)
    args[args.index("--my_exit_tokens") + 1] = str(steps * 4 * 64)
    return args


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


def test_second_run_in_one_proj_dir_stops_at_once(data, tmp_path):
    proj = tmp_path / "p"
    assert main(prepare_args(proj)) == 0
    before = snapshot(proj)
    with RunDir(proj).lock():  # as a running trainer holds it
        with pytest.raises(UserError) as e:
            main(_short(data, proj))
    msg = str(e.value)
    assert "another training run is using PROJ_DIR" in msg and f"pid {os.getpid()}" in msg
    assert "another PROJ_DIR" in msg
    assert snapshot(proj) == before  # nothing written, the lock file gone with its holder
    with RunDir(proj).lock():
        with pytest.raises(UserError, match="another training run"):
            main(prepare_args(proj))  # the prepare script would overwrite rwkv-init.pth under it


@pytest.mark.slow
def test_two_trainers_at_once(data, tmp_path, cpu_env):
    """A real second process while the first trains: it stops with a message naming the first, which goes on."""
    proj = tmp_path / "p"
    assert main(prepare_args(proj)) == 0
    args = _short(data, proj, 40)
    first = subprocess.Popen([sys.executable, str(TRAIN_TEMP / "train.py"), *args], env=cpu_env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while not (proj / "loss_log.csv").exists() and time.time() - t0 < 120 and first.poll() is None:
        time.sleep(0.05)
    second = subprocess.run([sys.executable, str(TRAIN_TEMP / "train.py"), *args], env=cpu_env,
                            capture_output=True, text=True, timeout=300)
    out, _ = first.communicate(timeout=600)
    assert second.returncode == 2 and f"pid {first.pid}" in second.stderr, second.stderr[-2000:]
    assert first.returncode == 0 and "reached --my_exit_tokens" in out, out[-2000:]
    rows = (proj / "loss_log.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == list(range(1, 41))  # one run's rows, no duplicates


def test_lock_of_a_dead_run_is_taken_over(data, tmp_path):
    proj = tmp_path / "p"
    assert main(prepare_args(proj)) == 0
    (proj / ".train.lock").write_text(json.dumps({"pid": _dead_pid(), "host": "h", "started": "then",
                                                  "command": "train.py"}))
    said = []
    import rwkvlm.train.run as train

    real_log = train.log
    train.log = lambda m: (said.append(m), real_log(m))
    try:
        assert main(_short(data, proj)) == 0
    finally:
        train.log = real_log
    assert any("took over the PROJ_DIR lock" in m for m in said)
    assert not (proj / ".train.lock").exists()


def test_leftovers_of_killed_writers_are_removed(data, tmp_path):
    proj = tmp_path / "p"
    assert main(prepare_args(proj)) == 0
    dead, host = _dead_pid(), _host()
    stale = [proj / f".rwkv-3.pth.{host}-{dead}-abcd1234.tmp", proj / f".loss.png.{host}-{dead}-abcd1234.png.tmp"]
    old = proj / ".rwkv-2.pth.k2j4h5g6.tmp"  # an ownerless one of an earlier version, two hours old
    fresh_old = proj / ".rwkv-1.pth.a1b2c3d4.tmp"  # ownerless but new: it may be a live writer's
    live = proj / f".loss.png.{host}-{os.getpid()}-abcd1234.png.tmp"
    incomplete = proj / "resume" / "step-000000099"
    incomplete.mkdir(parents=True)
    (incomplete / "trainer.pt").write_bytes(b"x" * 1000)
    for p in (*stale, old, fresh_old, live):
        p.write_bytes(b"x" * 1000)
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert main(_short(data, proj)) == 0
    assert not any(p.exists() for p in (*stale, old, incomplete))
    assert fresh_old.exists() and live.exists()


# ---------------------------------------------------------------- token ids

def _data_of(tmp_path, tokens, dtype):
    base = tmp_path / "d"
    write_binidx(base, [np.asarray(tokens, dtype=dtype)], dtype=dtype)
    n = len(tokens)
    return {"base": str(base), "tokens": n, "magic_prime": magic_prime(n, 64)}


@pytest.mark.parametrize("dtype,bad,words", [
    (np.int16, -3, ["negative token id -3", "int16", "above 32767", "make_data.py"]),
    (np.int32, 70000, ["token id 70000", "--vocab_size is 65536", "--vocab_size 70001"]),
    (np.float64, float("nan"), ["float64", "integers", "make_data.py"]),
])
def test_token_ids_checked_before_training(data, tmp_path, dtype, bad, words):
    proj = tmp_path / "p"
    assert main(prepare_args(proj)) == 0
    tokens = np.arange(4000) % 300
    tokens = tokens.astype(dtype)
    tokens[1234] = bad
    d = _data_of(tmp_path, tokens, dtype)
    before = snapshot(proj)
    with pytest.raises(UserError) as e:
        main(run_args(d, proj))
    for w in words:
        assert w in str(e.value), str(e.value)
    assert snapshot(proj) == before


def test_linking_a_file_onto_its_own_link_leaves_no_temporary(tmp_path):
    # rename() of one hard link onto another of the same file does nothing, so the
    # temporary name would stay behind (a repair that re-links rwkv-final.pth did that)
    from rwkvlm.atomic import link_or_copy

    src = tmp_path / "weights.pth"
    src.write_bytes(b"w" * 100)
    for _ in range(3):
        link_or_copy(src, tmp_path / "rwkv-final.pth")
        link_or_copy(src, tmp_path / "rwkv-latest.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rwkv-final.pth", "rwkv-latest.pth", "weights.pth"]
    assert (tmp_path / "rwkv-final.pth").read_bytes() == src.read_bytes()
