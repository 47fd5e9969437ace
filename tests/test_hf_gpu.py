"""fla's RWKV7ForCausalLM (flash-linear-attention 0.6.0, its Triton kernels) on our exports, on a GPU.

Marked `gpu`: skipped without CUDA, and without fla and transformers importable. A random model
(the spec's init, a fixed seed, then N(0, 0.1) noise; World vocabulary) in both layouts is saved in
bf16, exported, and run by fla in bf16 and fp32 against our model in fp32 (the PyTorch WKV path)
on 512 tokens; then fla's greedy generation of 32 tokens is scored against ours, teacher-forced.
What counts as agreement, and why: rwkvlm.hf.parity.TOLERANCES. The same check, as a benchmark
that writes its figures: benchmarks/hf_parity.py.
"""
import json

import pytest
import torch


def _fla_importable() -> bool:
    import importlib

    try:
        importlib.import_module("transformers")
        importlib.import_module("fla.models.rwkv7")
    except Exception:
        return False
    return True


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not _fla_importable(), reason="needs flash-linear-attention 0.6.0 and transformers"),
]


@pytest.mark.parametrize("layout", ["trained", "released"])
def test_fla_on_the_gpu_matches_our_logits_and_greedy_text(tmp_path, layout):
    from rwkvlm.hf import export_hf
    from rwkvlm.hf.parity import failures, fla_parity, random_checkpoint

    random_checkpoint(tmp_path / "rwkv.pth", n_layer=4, n_embd=256, layout=layout)
    export_hf(tmp_path / "rwkv.pth", tmp_path / "hf", log=lambda s: None)
    fig = fla_parity(tmp_path / "rwkv.pth", tmp_path / "hf", n_tokens=512, gen_tokens=32)
    print(json.dumps({k: v for k, v in fig.items() if k != "greedy"}, indent=1))
    print("greedy:", {k: v for k, v in fig["greedy"].items() if not k.endswith("tokens")})
    assert failures(fig) == []
