"""Several processes on CPU (DDP over gloo): two devices on one node, and two
nodes on one host (NODE_RANK, MASTER_ADDR=127.0.0.1), for RWKV-7 and RWKV-6. Each rank draws its
own samples by the magic_prime formula; no window is read twice."""
import socket
import subprocess
import sys

import pytest
import torch

from rwkvlm.model import model_type_of
from rwkvlm.train.dataset import MagicPrimeDataset
from trainkit import TRAIN_TEMP, make_dataset, prepare_args, run_args

pytestmark = pytest.mark.slow  # end-to-end trainings

STEPS = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("mp"), n_docs=300, copies=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_dumps(dump, meta, world, mbsz=2):
    rows = {}
    for r in range(world):
        lines = open(f"{dump}.rank{r}.csv").read().split()
        rows[r] = [tuple(map(int, ln.split(","))) for ln in lines]
        assert len(rows[r]) == STEPS * mbsz
        ds = MagicPrimeDataset(None, 64, meta["magic_prime"], mbsz, 48 // (mbsz * world), r, world,
                               mini_epoch_samples=48)
        assert [start for _, _, start in rows[r]] == [ds.start(s) for s in range(STEPS * mbsz)]
    starts = [start for r in rows for _, _, start in rows[r]]
    assert len(set(starts)) == len(starts), "two ranks read the same window"


def _cmd(meta, proj, dump, *extra):
    args = run_args(meta, proj, "--my_exit_tokens", str(STEPS * 2 * 2 * 64), "--micro_bsz", "2",
                    "--mini_epoch_samples", "48", "--dump_samples", str(dump), "--strategy", "ddp", *extra)
    return [sys.executable, str(TRAIN_TEMP / "train.py"), *args]


@pytest.mark.parametrize("strategy,model", [("ddp", "x070"), ("auto", "x070"),  # auto with two devices is ddp
                                            ("ddp", "x060")])
def test_two_processes_one_node(data, tmp_path, cpu_env, strategy, model):
    proj = tmp_path / "proj"
    subprocess.run([sys.executable, str(TRAIN_TEMP / "train.py"), *prepare_args(proj, "--my_testing", model)],
                   env=cpu_env, check=True, capture_output=True)
    env = dict(cpu_env, MASTER_PORT=str(_free_port()))
    r = subprocess.run(_cmd(data, proj, tmp_path / "dump", "--devices", "2", "--strategy", strategy,
                            "--my_testing", model), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert (proj / "rwkv-final.pth").is_file()
    assert model_type_of(torch.load(proj / "rwkv-final.pth", weights_only=True)) == model
    _check_dumps(tmp_path / "dump", data, world=2)


@pytest.mark.parametrize("model", ["x070", "x060"])
def test_two_nodes_on_one_host(data, tmp_path, cpu_env, model):
    proj = tmp_path / "proj"
    subprocess.run([sys.executable, str(TRAIN_TEMP / "train.py"), *prepare_args(proj, "--my_testing", model)],
                   env=cpu_env, check=True, capture_output=True)
    port = str(_free_port())
    procs = []
    for node in (0, 1):
        env = dict(cpu_env, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(node))
        procs.append(subprocess.Popen(_cmd(data, proj, tmp_path / "dump", "--devices", "1", "--num_nodes", "2",
                                           "--my_testing", model),
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert (proj / "rwkv-final.pth").is_file()
    assert model_type_of(torch.load(proj / "rwkv-final.pth", weights_only=True)) == model
    _check_dumps(tmp_path / "dump", data, world=2)
