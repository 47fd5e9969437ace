"""Learning-rate schedule values and optimiser parameter groups."""
import math

import pytest
import torch

from rwkvlm.train.config import parse_args
from rwkvlm.train.optim import lr_at, param_groups


def _cfg(**kw):
    args = ["--micro_bsz", "16", "--ctx_len", "4096", "--lr_init", "6e-4", "--lr_final", "6e-5",
            "--warmup_steps", "10", "--my_exit_tokens", str(65536 * 110), "--data_file", "x"]
    for k, v in kw.items():
        args += [f"--{k}", str(v)]
    return parse_args(args)


def test_lr_schedule_values():
    cfg = _cfg()
    assert cfg.tokens_per_step == 65536
    # warmup on the first steps of a run: lr_init (progress clipped at 0) x (0.01 + 0.99 * s / 10)
    assert lr_at(0, 0, cfg) == pytest.approx(6e-6, rel=1e-12)
    assert lr_at(5, 5, cfg) == pytest.approx(6e-4 * 0.505, rel=1e-12)
    # after warmup: cosine over tokens from lr_init to lr_final
    assert lr_at(10, 10, cfg) == pytest.approx(6e-4, rel=1e-12)
    assert lr_at(60, 60, cfg) == pytest.approx(3.3e-4, rel=1e-12)  # progress 0.5
    assert lr_at(35, 35, cfg) == pytest.approx(6e-4 * (0.55 + 0.45 * math.cos(math.pi * 0.25)), rel=1e-12)
    assert lr_at(110, 110, cfg) == pytest.approx(6e-5, rel=1e-12)
    assert lr_at(500, 500, cfg) == pytest.approx(6e-5, rel=1e-12)  # clipped at progress 1
    # a run that starts at step 60 from weights only warms up again
    assert lr_at(60, 0, cfg) == pytest.approx(3.3e-4 * 0.01, rel=1e-12)


def test_tokens_seen_counts_every_rank():
    one = _cfg()
    four = _cfg(devices=4, micro_bsz=4)
    assert one.tokens_per_step == four.tokens_per_step
    assert lr_at(60, 60, one) == lr_at(60, 60, four)


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.blocks = torch.nn.ModuleList([torch.nn.Module()])
        att = torch.nn.Module()
        att.w0 = torch.nn.Parameter(torch.zeros(1, 1, 4))
        att.x_r = torch.nn.Parameter(torch.zeros(1, 1, 4))
        att.w1 = torch.nn.Parameter(torch.zeros(4, 2))
        att.key = torch.nn.Linear(4, 4, bias=False)
        att.ln_x = torch.nn.GroupNorm(1, 4)
        self.blocks[0].att = att


def test_param_groups():
    m = _Toy()
    groups = {g["name"]: g for g in param_groups(m, weight_decay=0.001)}
    names = {id(p): n for n, p in m.named_parameters()}
    by = {k: sorted(names[id(p)] for p in g["params"]) for k, g in groups.items()}
    assert by["lr_2x"] == ["blocks.0.att.w0"] and groups["lr_2x"]["lr_scale"] == 2.0
    assert groups["lr_2x"]["weight_decay"] == 0.0
    # decay only on 2-D ".weight" tensors; w1 is 2-D but not a ".weight"
    assert by["lr_decay"] == ["blocks.0.att.key.weight", "emb.weight"]
    assert groups["lr_decay"]["weight_decay"] == 0.001
    assert "blocks.0.att.w1" in by["lr_1x"] and "blocks.0.att.ln_x.weight" in by["lr_1x"]
    # without weight decay there is no decay group
    groups0 = {g["name"] for g in param_groups(m, weight_decay=0.0)}
    assert groups0 == {"lr_1x", "lr_2x"}
    total = sum(len(g["params"]) for g in param_groups(m, 0.001))
    assert total == len(list(m.parameters()))


def test_deepspeed_arch_list_drops_suffixes(monkeypatch):
    """DeepSpeed's op builder cannot parse '9.0a': the build sees '9.0'; the variable comes back."""
    import os

    from rwkvlm.train.optim import clean_arch_list, deepspeed_arch_list

    assert clean_arch_list("9.0a") == "9.0"
    assert clean_arch_list("8.0;9.0a+PTX") == "8.0;9.0+PTX"
    assert clean_arch_list("8.6 10.0f") == "8.6 10.0"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    with deepspeed_arch_list():
        assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0"
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0a"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    with deepspeed_arch_list():
        assert "TORCH_CUDA_ARCH_LIST" not in os.environ
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ


def test_mixed_precision_optimizer_allows_clipping():
    """bf16 / fp16 without DeepSpeed: Lightning clips gradients only for a non-fused optimiser
    (a bf16 CPU run with --grad_clip 1 failed before); fp32 keeps the fused kernels."""
    from rwkvlm.model import RWKV7, ModelConfig
    from rwkvlm.train.optim import make_optimizer, param_groups

    model = RWKV7(ModelConfig(n_layer=1, n_embd=64, vocab_size=100))
    for precision, fused in (("bf16", False), ("fp32", True)):
        cfg = _cfg(precision=precision, strategy="auto")
        opt = make_optimizer(param_groups(model, cfg.weight_decay), cfg, 1e-3, "cpu")
        assert bool(opt.defaults.get("fused")) is fused
        assert getattr(opt, "_step_supports_amp_scaling", False) is fused


def test_compile_flag_resolution():
    """--compile auto compiles on GPU only; 1 also on CPU; 0 never."""
    assert _cfg().compile == "auto"
    assert _cfg().compile_on("gpu") and not _cfg().compile_on("cpu")
    assert _cfg(compile=1).compile_on("cpu") and _cfg(compile=1).compile_on("gpu")
    assert not _cfg(compile=0).compile_on("gpu")
    assert not _cfg(strategy="deepspeed_stage_3").compile_on("gpu")


def test_compile_1_under_zero3_is_refused():
    """Compiled blocks read the layer norms' weights directly: ZeRO-3 partitions them."""
    from rwkvlm.errors import UserError

    for strategy in ("deepspeed_stage_3", "deepspeed_stage_3_offload"):
        _cfg(strategy=strategy)  # auto: compiled blocks stay off
        with pytest.raises(UserError, match="--compile auto"):
            _cfg(strategy=strategy, compile=1)
    _cfg(strategy="deepspeed_stage_2", compile=1)


def test_deepspeed_bf16_section_drops_the_overflow_check(monkeypatch):
    """bf16 under DeepSpeed runs without the per-gradient overflow check where DeepSpeed has
    the option, and with a plain {"enabled": True} where it does not."""
    import sys
    import types

    from rwkvlm.train.optim import deepspeed_bf16_config

    def fake_deepspeed(fields):
        cls = type("DeepSpeedBF16Config", (), {"model_fields": dict.fromkeys(fields)})
        mod = types.ModuleType("deepspeed.runtime.precision_config")
        mod.DeepSpeedBF16Config = cls
        for name in ("deepspeed", "deepspeed.runtime"):
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        monkeypatch.setitem(sys.modules, "deepspeed.runtime.precision_config", mod)

    fake_deepspeed(["enabled", "immediate_grad_update", "check_grad_overflow"])
    assert deepspeed_bf16_config() == {"enabled": True, "check_grad_overflow": False}
    fake_deepspeed(["enabled", "immediate_grad_update"])
    assert deepspeed_bf16_config() == {"enabled": True}


def test_deepspeed_bf16_section_is_valid_for_the_installed_deepspeed():
    ds = pytest.importorskip("deepspeed")
    from deepspeed.runtime.precision_config import get_bfloat16_config

    from rwkvlm.train.optim import deepspeed_bf16_config

    got = get_bfloat16_config({"bf16": deepspeed_bf16_config()})
    assert got.enabled and getattr(got, "check_grad_overflow", False) is False, ds.__version__


# ------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-1/2 gradient norm as one multi-tensor norm (optim.foreach_grad_norm)
# ------------------------------------------------------------------------------------------

class _FakeDist:
    class ReduceOp:
        SUM = "sum"

    def __init__(self):
        self.calls = []

    def all_reduce(self, t, op=None, group=None):
        self.calls.append(("all_reduce", op, group, float(t)))


class _FakeZeroOptimizer:
    """What get_grad_norm_direct reads from DeepSpeedZeroOptimizer."""

    def __init__(self, mp_rank=0):
        self.model_parallel_rank, self.dp_process_group, self.device = mp_rank, "dp-group", "cpu"
        self.mp_calls = []

    def _model_parallel_all_reduce(self, tensor, op):
        self.mp_calls.append(op)


def _grad_norm_fixture():
    import types

    from rwkvlm.train.optim import foreach_grad_norm

    masked = []

    def mask(t, device=None):
        masked.append(float(t))
        t.masked_fill_(~torch.isfinite(t), -1.0)

    ns = types.SimpleNamespace(dist=_FakeDist(), mask_nan_or_inf_with_val_inplace=mask,
                               PIPE_REPLICATED="ds_pipe_replicated")
    original_calls = []

    def original(self, gradients, params, norm_type=2):
        original_calls.append(norm_type)
        return torch.tensor(-7.0)

    return foreach_grad_norm(original, ns), ns, masked, original_calls


def test_foreach_grad_norm_matches_fp64_norm_and_keeps_the_reduction():
    """Same total as sqrt(sum ||g||^2) in fp64 over bf16 gradients of awkward sizes (padding
    gradients left out, as DeepSpeed does); the rank and model-parallel reductions and the
    NaN masking still run."""
    fn, ns, masked, original_calls = _grad_norm_fixture()
    g = torch.Generator().manual_seed(0)
    shapes = [(65, 33), (1, 1, 768), (7,), (300, 5), (1,)]
    grads = [(torch.randn(*s, generator=g) * 10 ** (i - 2)).to(torch.bfloat16) for i, s in enumerate(shapes)]
    pad = torch.full((9,), 1e3, dtype=torch.bfloat16)
    pad._zero_padding = True
    params = [torch.nn.Parameter(torch.empty(s)) for s in shapes]
    opt = _FakeZeroOptimizer()
    got = fn(opt, grads[:2] + [pad] + grads[2:], params)
    want = torch.sqrt(sum(x.double().norm() ** 2 for x in grads))
    assert got.dtype == torch.float32 and abs(float(got) - float(want)) <= 1e-6 * float(want)
    assert [c[:3] for c in ns.dist.calls] == [("all_reduce", "sum", "dp-group")]
    assert opt.mp_calls == ["sum"] and len(masked) == 1 and original_calls == []
    # a non-finite gradient gives DeepSpeed's -1 marker
    bad = grads[:1] + [torch.tensor([float("nan")], dtype=torch.bfloat16)]
    assert float(fn(_FakeZeroOptimizer(), bad, params[:2])) == -1.0


def test_foreach_grad_norm_leaves_other_cases_to_deepspeed():
    """Other norm types, model-parallel ranks and pipeline-replicated parameters go to
    DeepSpeed's own method."""
    fn, _, _, original_calls = _grad_norm_fixture()
    grads, params = [torch.ones(3)], [torch.nn.Parameter(torch.ones(3))]
    assert float(fn(_FakeZeroOptimizer(), grads, params, norm_type=float("inf"))) == -7.0
    assert float(fn(_FakeZeroOptimizer(mp_rank=1), grads, params)) == -7.0
    params[0].ds_pipe_replicated = True
    assert float(fn(_FakeZeroOptimizer(), grads, params)) == -7.0
    assert len(original_calls) == 3


def test_use_foreach_grad_norm_installs_once_when_deepspeed_is_there():
    ds = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
    from rwkvlm.train.optim import use_foreach_grad_norm

    assert use_foreach_grad_norm() and use_foreach_grad_norm()
    method = ds.DeepSpeedZeroOptimizer.get_grad_norm_direct
    assert method.rwkvlm_foreach and not getattr(method.original, "rwkvlm_foreach", False)  # wrapped once
