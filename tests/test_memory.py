"""A run that does not fit in memory (issue: the hardware table, item 4): a CUDA out-of-memory error
of the set-up or of a step becomes a UserError (exit 2) that names the card's memory, what was asked
for and the peak reached, the model and M_BSZ, and the next things to try in order; PROJ_DIR's saves
are untouched and a re-run without the error resumes. On CPU, the error is raised by a monkeypatch
inside a real tiny training run (in this process, as tests/test_train_errors.py does), with the
card's figures faked; and the arithmetic of rwkvlm.train.memory."""
import json

import pytest
import torch

from rwkvlm.errors import UserError, is_out_of_memory, run_cli
from rwkvlm.train import memory
from rwkvlm.train.run import main

from trainkit import make_dataset, prepare_args, run_args, snapshot

GIB = 2**30
STEPS = 8  # 2 steps per mini-epoch (--mini_epoch_samples 8 at M_BSZ 4): a state every 2 steps

# what torch's caching allocator says (torch 2.x)
CUDA_OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 139.80 GiB of which "
            "1.25 GiB is free. Including non-PyTorch memory, this process has 138.54 GiB memory in use. Of the "
            "allocated memory 131.20 GiB is allocated by PyTorch, and 5.10 GiB is reserved by PyTorch but "
            "unallocated.")
FAKE_H200 = {"name": "NVIDIA H200", "index": 0, "total": int(139.8 * GIB), "free": int(1.25 * GIB),
             "allocated": int(131.2 * GIB), "peak": int(136.3 * GIB), "reserved": int(136.3 * GIB)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


def _args(data, proj, steps=STEPS, *extra):
    return run_args(data, proj, "--my_exit_tokens", str(steps * 4 * 64), "--mini_epoch_samples", "8", *extra)


def _saves(proj):
    """The saves of PROJ_DIR (weights and exact-resume states) with sizes and mtimes; the logs left out."""
    logs = {"train_log.txt", "loss_log.csv", "train_config.json"}
    return {k: v for k, v in snapshot(proj).items() if k not in logs}


def _no_temporaries(proj):
    return [p for p in proj.rglob("*") if p.name.endswith(".tmp")] == []


def _run_cli_capturing(args, capsys):
    rc = run_cli(main, args)
    return rc, capsys.readouterr().err


# ------------------------------------------------------------------------------------ in a run

def test_oom_in_a_step_is_a_clear_message_and_the_run_resumes(data, tmp_path, monkeypatch, capsys):
    from rwkvlm.model import RWKV7

    proj = tmp_path / "p"
    assert main(prepare_args(proj)) == 0
    assert main(_args(data, proj, 4)) == 0  # 4 steps: states at steps 2 and 4, rwkv-final.pth
    before = _saves(proj)
    lines = (proj / "loss_log.csv").read_text().splitlines()

    real_loss, calls = RWKV7.loss, []

    def loss(self, idx, targets):  # the 2nd step of the run (step 6) runs out of memory
        calls.append(1)
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError(CUDA_OOM)
        return real_loss(self, idx, targets)

    with monkeypatch.context() as mp:
        mp.setattr(RWKV7, "loss", loss)
        mp.setattr(memory, "gpu_memory", lambda: dict(FAKE_H200))
        rc, err = _run_cli_capturing(_args(data, proj), capsys)  # --my_exit_tokens raised: continues exactly
    assert rc == 2
    msg = err.strip()
    assert msg.startswith("ERROR: the GPU ran out of memory during step 6:"), msg
    for want in ("GPU 0 (NVIDIA H200) has 139.8 GiB, 1.2 GiB free now", "PyTorch held 131.2 GiB (peak 136.3 GiB",
                 "asked for 2.0 GiB more: it needed at least 138.3 GiB", "RWKV-7 L2-D64", "M_BSZ 4", "CTX_LEN 64",
                 "GRAD_CP 0", "auto fp32", "Nothing of the unfinished step was saved",
                 "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"):
        assert want in msg, (want, msg)
    order = [msg.index(s) for s in ("(1) a smaller M_BSZ: M_BSZ=2", "(2) GRAD_CP=1", "(3) --strategy deepspeed_stage_2 ",
                                    "(4) --strategy deepspeed_stage_2_offload", "(5) --strategy deepspeed_stage_3_offload",
                                    "(6) more GPUs")]
    assert order == sorted(order), msg
    assert "Traceback" not in err
    assert _saves(proj) == before and _no_temporaries(proj)
    now = (proj / "loss_log.csv").read_text().splitlines()  # step 5 was trained and logged; nothing of step 6
    assert now[:len(lines)] == lines and [ln.split(",")[0] for ln in now[len(lines):]] == ["5"], now

    capsys.readouterr()
    assert main(_args(data, proj)) == 0  # without the error: on from the newest state, exactly
    out = capsys.readouterr().out
    assert "steps 4 -> 8" in out and "resume/step-000000004" in out and "(from the state)" in out, out
    info = json.loads((proj / "rwkv-final.json").read_text())
    assert info["step"] == STEPS
    steps = [int(ln.split(",")[0]) for ln in (proj / "loss_log.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, STEPS + 1))  # the killed run's step 5 row was cut, then written again


def test_oom_in_the_set_up_names_it_and_changes_no_save(data, tmp_path, monkeypatch, capsys):
    from rwkvlm.train.lit import RWKVTrainModule

    proj = tmp_path / "p"
    assert main(prepare_args(proj)) == 0
    before = _saves(proj)

    def configure_optimizers(self):
        raise RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported")

    with monkeypatch.context() as mp:
        mp.setattr(RWKVTrainModule, "configure_optimizers", configure_optimizers)
        mp.setattr(memory, "gpu_memory", lambda: dict(FAKE_H200, peak=int(40 * GIB), allocated=int(38 * GIB)))
        rc, err = _run_cli_capturing(_args(data, proj, 4, "--micro_bsz", "1", "--grad_cp", "1",
                                           "--mini_epoch_samples", "4"), capsys)
    assert rc == 2
    assert "the GPU ran out of memory during the set-up (the model moved to the CPU, the strategy's buffers, " \
           "the optimiser)" in err, err
    assert "peak 40.0 GiB" in err and "M_BSZ 1" in err and "GRAD_CP 1" in err
    # M_BSZ is 1 and GRAD_CP on already: the offload strategies come first
    assert "M_BSZ=" not in err and "(1) --strategy deepspeed_stage_2 " in err, err
    assert _saves(proj) == before and _no_temporaries(proj)
    assert main(_args(data, proj, 4)) == 0  # the same PROJ_DIR trains without the error
    assert (proj / "rwkv-final.pth").is_file()


def test_host_oom_building_the_model_names_the_host_memory(data, tmp_path, monkeypatch, capsys):
    from rwkvlm.model.lm import RWKVLM

    proj = tmp_path / "p"
    assert main(prepare_args(proj)) == 0
    before = snapshot(proj)

    def from_weights(cls, cfg, sd, check=None):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 3221225472 bytes. Error code 12 (Cannot allocate memory)")

    with monkeypatch.context() as mp:
        mp.setattr(RWKVLM, "from_weights", classmethod(from_weights))
        rc, err = _run_cli_capturing(_args(data, proj, 4), capsys)
    assert rc == 2
    assert "the host (CPU) memory ran out during the set-up (the model's weights in host memory): this machine " \
           "has" in err and "the allocation that failed asked for 3.0 GiB" in err, err
    assert snapshot(proj) == before  # it stopped before the trainer wrote anything


# ------------------------------------------------------------------------------------ the parts

def test_what_counts_as_out_of_memory():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError(CUDA_OOM))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert is_out_of_memory(RuntimeError("NCCL error: unhandled cuda error (run with NCCL_DEBUG=INFO), "
                                         "cudaErrorMemoryAllocation"))
    assert is_out_of_memory(MemoryError())
    try:  # a compiler's wrapper keeps it as the cause
        try:
            raise torch.cuda.OutOfMemoryError(CUDA_OOM)
        except torch.cuda.OutOfMemoryError as inner:
            raise RuntimeError("backend compiler failed") from inner
    except RuntimeError as outer:
        assert is_out_of_memory(outer)
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(UserError("out of memory, said by us"))
    assert memory.asked_bytes(torch.cuda.OutOfMemoryError(CUDA_OOM)) == 2 * GIB
    assert memory.asked_bytes(RuntimeError("you tried to allocate 1024 bytes")) == 1024
    assert memory.asked_bytes(RuntimeError("out of memory")) is None


def test_compile_failure_from_memory_is_not_called_a_compiler_failure(monkeypatch):
    from rwkvlm.model import layers

    class InductorError(RuntimeError):
        pass

    InductorError.__module__ = "torch._inductor.exc"

    def compiled(*args):
        try:
            raise torch.cuda.OutOfMemoryError(CUDA_OOM)
        except torch.cuda.OutOfMemoryError as e:
            raise InductorError("autotuning failed") from e

    def fn(x):
        return x

    monkeypatch.setattr(torch, "compile", lambda f, dynamic=False: compiled)
    monkeypatch.setitem(layers._COMPILED, fn, None)
    layers._COMPILED.pop(fn)
    with pytest.raises(InductorError):  # not the UserError "torch.compile could not compile"
        layers.compile_once(fn)(1)
    layers._COMPILED.pop(fn, None)


def test_state_bytes_of_the_7b_row():
    """benchmarks/README.md's arithmetic: 7.2B parameters do not fit one 141 GB card under
    deepspeed_stage_2 (20 bytes per parameter before activations), do with the optimiser offloaded
    (4 bytes per parameter on the GPU, 16 in host memory)."""
    n = 7_000_000_000
    s2 = memory.state_bytes(n, "deepspeed_stage_2", "bf16", 1)
    off = memory.state_bytes(n, "deepspeed_stage_2_offload", "bf16", 1)
    off3 = memory.state_bytes(n, "deepspeed_stage_3_offload", "bf16", 1)
    assert (s2["gpu"], s2["host"]) == (20 * n, 0)
    assert (off["gpu"], off["host"]) == (4 * n, 16 * n)
    assert (off3["gpu"], off3["host"]) == (0, 18 * n)
    assert memory.state_bytes(n, "deepspeed_stage_2", "bf16", 4)["gpu"] == 2 * n + 18 * n / 4
    assert memory.state_bytes(n, "deepspeed_stage_1", "bf16", 4)["gpu"] == 4 * n + 16 * n / 4
    assert memory.state_bytes(n, "ddp", "bf16", 2)["gpu"] == 16 * n
    assert memory.state_bytes(n, "deepspeed_stage_2", "fp32", 1)["gpu"] == 16 * n


def test_memory_probe_measures_the_second_step_by_phase(tmp_path):
    """The GPU figures of one step (held before it, forward + backward peak, optimiser peak; the peak
    before it, the allocator's reserved peak, the card in use), from a stand-in for torch.cuda:
    printed and added to train_config.json."""
    from types import SimpleNamespace

    class Fake:
        def __init__(self):
            self.now, self.top, self.resets, self.context = 0, 0, 0, 0

        def alloc(self, n):
            self.now += n
            self.top = max(self.top, self.now)

        def allocated(self):
            return self.now

        def peak(self):
            return self.top

        def reset_peak(self):
            self.top, self.resets = self.now, self.resets + 1

        def total(self):
            return 140 * GIB

        def reserved_peak(self):
            return self.top + 2 * GIB  # the allocator's cached segments

        def reserved(self):
            return self.now + 1 * GIB

        def card_used(self):
            return self.now + 1 * GIB + self.context  # its segments, the CUDA context, NCCL's buffers

    fake, said = Fake(), []
    (tmp_path / "train_config.json").write_text(json.dumps({"n_layer": 2}))
    cfg = SimpleNamespace(total_steps=10, micro_bsz=4, ctx_len=4096)
    m = SimpleNamespace(cfg=cfg, start=SimpleNamespace(step=0), step=0,
                        rd=SimpleNamespace(train_config=tmp_path / "train_config.json"))
    trainer = SimpleNamespace(global_rank=0)
    probe = memory.MemoryProbe(log=said.append, source=fake)
    fake.context = GIB // 2  # the CUDA context
    probe.setup(trainer, m, "fit")
    fake.context += GIB // 4  # the strategy's set-up: NCCL's communicator
    fake.alloc(20 * GIB)  # weights and optimiser state
    fake.alloc(12 * GIB)  # a set-up's temporaries (e.g. DeepSpeed flattening the weights)
    fake.alloc(-12 * GIB)
    probe.on_fit_start(trainer, m)
    fake.context += GIB // 4  # the step's kernels, loaded on their first call
    for step in (1, 2, 3):
        m.step = step - 1
        probe.on_train_batch_start(trainer, m, None, 0)
        fake.alloc(8 * GIB)   # activations of 4 samples
        fake.alloc(-8 * GIB)
        probe.on_before_optimizer_step(trainer, m, None)
        fake.alloc(3 * GIB)   # the optimiser step's temporaries
        fake.alloc(-3 * GIB)
        m.step = step
        probe.on_train_batch_end(trainer, m, None, None, 0)
    assert fake.resets == 2 and len(said) == 1  # step 2 only
    got = json.loads((tmp_path / "train_config.json").read_text())["cuda_memory"]
    assert got == {"step": 2, "m_bsz": 4, "ctx_len": 4096, "total": 140.0, "held": 20.0, "peak_forward_backward": 28.0,
                   "peak_optimizer": 23.0, "per_sample": 2.0, "peak_before": 32.0, "reserved_peak": 34.0,
                   "card_used": 22.0, "outside_allocator": {"setup": 0.5, "after_strategy_setup": 0.75,
                                                            "after_step": 1.0}}
    assert "20.0 GiB held before the step, peak 28.0 GiB in forward + backward, 23.0 GiB in the optimiser step" \
        in said[0]
    assert "before this step at most 32.0 GiB); PyTorch reserved at most 34.0 GiB; the card has 22.0 of 140.0 GiB " \
        "in use; outside PyTorch's allocator: 0.50 GiB setup, 0.75 GiB after strategy setup, 1.00 GiB after step" \
        in said[0], said[0]


def test_weights_only_saves_when_the_states_do_not_fit_the_disk(data, tmp_path, capsys):
    """--resume_states 0 (a 7B state is ~100 GB, more than the benchmark machine's disk): rwkv-N.pth and
    rwkv-final.pth (with rwkv-final.json) are written, no exact-resume state; a re-run has nothing to do."""
    proj = tmp_path / "p"
    assert main(prepare_args(proj)) == 0
    assert main(_args(data, proj, 4, "--resume_states", "0")) == 0
    names = sorted(p.name for p in proj.iterdir() if p.suffix in (".pth", ".json") or p.is_dir())
    assert names == ["rwkv-0.pth", "rwkv-1.pth", "rwkv-final.json", "rwkv-final.pth", "rwkv-init.pth",
                     "train_config.json"], names
    assert json.loads((proj / "rwkv-final.json").read_text())["step"] == 4
    sd = torch.load(proj / "rwkv-final.pth", weights_only=True)
    assert all(torch.isfinite(v).all() for v in sd.values())
    capsys.readouterr()
    assert main(_args(data, proj, 4, "--resume_states", "0")) == 0
    assert "nothing to do" in capsys.readouterr().out
    with pytest.raises(UserError, match="--resume_states 0"):
        main(_args(data, proj, 4, "--resume_states", "0", "--save_every_steps", "2"))


@pytest.mark.gpu
def test_a_large_gpu_state_dict_is_written_as_the_same_plain_cpu_file(tmp_path, monkeypatch):
    """save_weights streams GPU tensors already in the save dtype (one CPU copy at a time): the file is
    byte for byte the one the CPU copies give, and loads on the CPU without map_location."""
    from rwkvlm.rundir import weights

    g = torch.Generator().manual_seed(0)
    cpu = {f"blocks.{i}.w": torch.randn(64, 32, generator=g).to(torch.bfloat16) for i in range(3)}
    monkeypatch.setattr(weights, "STREAM_BYTES", 1)
    weights.save_weights({k: v.cuda() for k, v in cpu.items()}, tmp_path / "gpu.pth", "bf16")
    weights.save_weights(cpu, tmp_path / "cpu.pth", "bf16")
    assert (tmp_path / "gpu.pth").read_bytes() == (tmp_path / "cpu.pth").read_bytes()
    back = torch.load(tmp_path / "gpu.pth", weights_only=True)
    assert all(v.device.type == "cpu" and torch.equal(v, cpu[k]) for k, v in back.items())


OOM_WRAPPER = r"""
import os, sys, torch
from rwkvlm.model import RWKV7
real, calls = RWKV7.loss, []
rank = os.environ.get("LOCAL_RANK", "0")
def loss(self, idx, targets):
    calls.append(1)
    if len(calls) == 3 and rank in os.environ["OOM_RANKS"].split(","):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
    return real(self, idx, targets)
RWKV7.loss = loss  # (Lightning starts rank 1 as this same script)
from rwkvlm.train.run import cli
cli()
"""


@pytest.mark.slow  # two runs of two DDP processes: ~25 s on 2 CPU cores
@pytest.mark.parametrize("ranks", ["1", "0"])
def test_oom_on_one_rank_stops_every_rank_with_a_message(data, tmp_path, cpu_env, ranks):
    """Under several processes the rank that ran out says so; the others, whose collective failed
    with it, stop with a line naming it instead of a traceback; the exit code is 2, the saves untouched."""
    import subprocess
    import sys

    proj = tmp_path / "p"
    assert main(prepare_args(proj)) == 0
    before = _saves(proj)
    wrapper = tmp_path / "oom_train.py"
    wrapper.write_text(OOM_WRAPPER)
    args = _args(data, proj, 8, "--devices", "2", "--strategy", "ddp", "--mini_epoch_samples", "16")
    r = subprocess.run([sys.executable, str(wrapper), *args], capture_output=True, text=True, timeout=600,
                       env=dict(cpu_env, OOM_RANKS=ranks))
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-3000:]
    other = "0" if ranks == "1" else "1"
    assert f"ERROR: rank {ranks}: the GPU ran out of memory during step 3" in out, out[-3000:]
    assert f"ERROR: rank {other}: another process of this run ended during step 3" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    saves = _saves(proj)
    assert {k: v for k, v in saves.items() if k in before} == before and _no_temporaries(proj)
