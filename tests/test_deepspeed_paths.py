"""The DeepSpeed-only code paths of the trainer, driven by a stand-in engine on CPU.

CI has no GPU, so DeepSpeed never runs here. The stand-in has DeepSpeed
0.19.8's method signatures (save_checkpoint, load_checkpoint,
zero_optimization_stage, _zero3_consolidated_16bit_state_dict); these tests
check that the trainer calls them as it should and that what it writes
around them (state.json, rwkv-N.pth) is right. The real engine is exercised
by tests/test_gpu_resume.py and the benchmarks (benchmarks/run.py) on a GPU machine.
"""
import dataclasses
import inspect
from pathlib import Path
import json

import pytest
import torch

from rwkvlm.train.resume import find_start
from rwkvlm.train.config import parse_args
from rwkvlm.train.guard import DivergenceGuard
from rwkvlm.train.lit import RWKVTrainModule
from rwkvlm.train.saving import SaveStates
from trainkit import perturbed_model


class FakeEngine:
    def __init__(self, stage=2, module=None):
        self.stage, self.module, self.calls = stage, module, []

    def zero_optimization_stage(self):
        return self.stage

    def save_checkpoint(self, save_dir, tag=None, client_state={}, save_latest=True, exclude_frozen_parameters=False):
        Path(save_dir, tag).mkdir(parents=True)
        # DeepSpeed's layout: the module's weights (ZeRO-1/2) in mp_rank_00_model_states.pt
        torch.save({"module": {f"model.{k}": v for k, v in self.module.state_dict().items()}},
                   Path(save_dir, tag, "mp_rank_00_model_states.pt"))
        self.calls.append(("save", save_dir, tag, save_latest))

    def load_checkpoint(self, load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                        load_lr_scheduler_states=True, load_module_only=False, custom_load_fn=None):
        self.calls.append(("load", load_dir, tag, load_optimizer_states, load_lr_scheduler_states))
        return load_dir, {}

    def _zero3_consolidated_16bit_state_dict(self, exclude_frozen_parameters=False):
        return {f"model.{k}": v.to(torch.bfloat16) for k, v in self.module.state_dict().items()}


class FakeStrategy:
    def __init__(self, engine):
        self.deepspeed_engine = engine
        self.root_device = torch.device("cpu")

    def barrier(self, *a):
        pass

    def broadcast(self, obj, src=0):
        return obj


class FakeTrainer:
    def __init__(self, engine):
        self.strategy = FakeStrategy(engine)
        self.optimizers = [torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)]
        self.global_step = 0
        self.global_rank = self.local_rank = 0


def _module(tmp_path, stage=2, start=None, model_type="x070"):
    cfg = parse_args(["--proj_dir", str(tmp_path), "--data_file", "x", "--my_exit_tokens", "100000",
                      "--magic_prime", "11", "--micro_bsz", "4", "--ctx_len", "64", "--n_layer", "1",
                      "--n_embd", "64", "--precision", "bf16", "--mini_epoch_samples", "64",
                      "--my_testing", model_type])
    model = perturbed_model(n_layer=1, vocab_size=65536, model_type=model_type)
    if start is None:
        torch.save(model.state_dict(), tmp_path / "rwkv-init.pth")
        start = find_start(cfg)
    m = RWKVTrainModule(cfg, model, data=None, start=start)
    engine = FakeEngine(stage, model)
    m.trainer = FakeTrainer(engine)
    return m, engine, cfg


def _save(m, step, pending):
    """What the save policy (saving.SaveStates) does when a state is due at `step`."""
    SaveStates(DivergenceGuard()).save(m.trainer, m, step, pending=pending, final=False)


def test_fake_engine_matches_deepspeed_signatures():
    """Guard the stand-in itself: where DeepSpeed is installed, its signatures must match."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.engine import DeepSpeedEngine

    for name in ("save_checkpoint", "load_checkpoint"):
        real = list(inspect.signature(getattr(DeepSpeedEngine, name)).parameters)
        fake = list(inspect.signature(getattr(FakeEngine, name)).parameters)
        assert real[: len(fake)] == fake


@pytest.mark.parametrize("model_type", ["x070", "x060"])
def test_resume_state_through_the_engine(tmp_path, model_type):
    m, engine, cfg = _module(tmp_path, model_type=model_type)
    _save(m, 8, pending=[])
    d = tmp_path / "resume" / "step-000000008"
    assert engine.calls == [("save", str(d / "ds"), "state", False)]
    state = json.loads((d / "state.json").read_text())
    assert state["kind"] == "deepspeed" and state["step"] == 8 and state["fingerprint"]["deepspeed"]
    assert (d / "rng-rank0.pt").is_file() and not (d / "trainer.pt").exists()
    assert (tmp_path / "rwkv-latest.pth").samefile(d / "weights.pth")

    # a re-run with the same settings resumes exactly from it: weights and optimizer come from the engine
    start = find_start(cfg)
    assert start.resume_dir == d and start.weights is None and start.step == 8
    m2, engine2, _ = _module(tmp_path, start=start, model_type=model_type)
    m2.restore_resume_state()
    assert engine2.calls == [("load", str(d / "ds"), "state", True, False)]


@pytest.mark.parametrize("model_type", ["x070", "x060"])
def test_weights_saved_in_bf16_without_prefixes(tmp_path, model_type):
    from rwkvlm.model import model_type_of

    for stage in (2, 3):
        (tmp_path / str(stage)).mkdir()
        m, _, _ = _module(tmp_path / str(stage), stage=stage, model_type=model_type)
        _save(m, 16, pending=["rwkv-3.pth"])
        out = tmp_path / str(stage) / "rwkv-3.pth"
        sd = torch.load(out, weights_only=True)
        assert set(sd) == set(m.model.state_dict())
        assert all(v.dtype == torch.bfloat16 for v in sd.values())
        torch.testing.assert_close(sd["emb.weight"].float(), m.model.emb.weight.to(torch.bfloat16).float())
        assert model_type_of(sd) == model_type


def test_optimizer_device_comes_from_the_strategy(tmp_path, monkeypatch):
    """DeepSpeed builds the optimizer before moving the model: the device must come from the strategy."""
    import rwkvlm.train.lit as lit

    seen = {}
    monkeypatch.setattr(lit, "make_optimizer", lambda groups, cfg, lr, device_type: seen.setdefault("d", device_type))
    m, _, _ = _module(tmp_path)
    m.trainer.strategy.root_device = torch.device("cuda", 0)
    m.configure_optimizers()
    assert seen["d"] == "cuda"


def test_non_finite_weights_are_never_saved(tmp_path):
    """With DeepSpeed's bf16 overflow check off, a NaN gradient would reach the weights:
    rwkv-N.pth and the exact-resume state refuse them with a message, writing nothing."""
    from rwkvlm.errors import UserError

    m, engine, _ = _module(tmp_path)
    with torch.no_grad():
        m.model.blocks[0].att.w1[3, 5] = float("nan")
    with pytest.raises(UserError, match="diverged.*NaN or infinite.*--lr_init"):
        _save(m, 16, pending=["rwkv-1.pth"])
    assert not (tmp_path / "rwkv-1.pth").exists() and not (tmp_path / "resume").exists()
    assert engine.calls == []


def test_fp16_skipped_steps_are_reported(tmp_path):
    """DeepSpeed skips an fp16 step whose scaled gradients overflow; the trainer says so, once per
    skipped step, and counts from the engine's own figure (restored by a resume)."""
    from types import SimpleNamespace

    m, engine, cfg = _module(tmp_path)
    cfg = m.cfg = dataclasses.replace(cfg, precision="fp16")
    said = []
    guard = DivergenceGuard(log=said.append)
    engine.skipped_steps = 3  # as restored from a resume state
    engine.optimizer = SimpleNamespace(loss_scaler=SimpleNamespace(cur_scale=65536.0))
    guard.on_train_batch_start(m.trainer, m, None, 0)
    guard.note_fp16_skip(m.trainer, m)  # a normal step
    assert said == []
    engine.skipped_steps, engine.optimizer.loss_scaler.cur_scale = 4, 32768.0
    m.trainer.global_step = 1
    guard.note_fp16_skip(m.trainer, m)
    assert len(said) == 1 and "step 1 skipped" in said[0] and "now 32768" in said[0] and "--precision bf16" in said[0]
    guard.note_fp16_skip(m.trainer, m)  # nothing new
    assert len(said) == 1
    engine.skipped_steps, engine.optimizer.loss_scaler.cur_scale = 5, 16384.0
    m.trainer.global_step = 2
    guard.note_fp16_skip(m.trainer, m)  # the next one is told without the advice
    assert len(said) == 2 and "step 2 skipped" in said[1] and "now 16384" in said[1] and "--lr_init" not in said[1]
