"""fla's RWKV7 model code on a CPU: PyTorch stand-ins for its Triton kernels (which need a GPU).

    with fla_on_cpu():
        model = RWKV7ForCausalLM.from_pretrained(folder, dtype=torch.float32, fuse_norm=False)
        ...

Inside the context, fla 0.6.0's RWKV7 layers call fla's own PyTorch reference functions where it
ships them (the token mix `torch_addcmul_rwkv7`, the k update `k_update_ref`, the output
correction `gate_output_correction_ref`), a float64 loop of the RWKV-7 recurrence (`wkv_float64`,
in fla's conventions) for its chunked and recurrent WKV kernels, and a PyTorch token shift; a model
built inside the context gets a plain squared ReLU (fla's is torch.compile'd). Load with
`fuse_norm=False` (nn.LayerNorm / nn.GroupNorm instead of fla's fused Triton norms); for a model
built before the context, `cpu_ready(model)` swaps the squared ReLU.

This is for checks on machines without a GPU (tests/test_hf.py: fla's logits equal ours to 1e-5)
and for rehearsing GPU benchmarks (benchmarks/bench_lmeval.py --device cpu): it is exact but slow
(one Python step per token), and it measures nothing about fla's kernels.

    python -m rwkvlm.hf.cpu lm_eval --model hf \
        --model_args pretrained=OUT_DIR,trust_remote_code=True,dtype=float32,fuse_norm=False \
        --tasks rwkv_arith --include_path TASK_DIR --device cpu --batch_size 1 --limit 16

runs lm-evaluation-harness's command line (the arguments after `lm_eval`, as the `lm_eval`
command takes them) in this process with the stand-ins in place.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["fla_on_cpu", "cpu_ready", "wkv_float64", "token_shift"]


def sqrelu(x):
    return torch.relu(x) ** 2


def token_shift(x, cu_seqlens=None, cache=None, output_cache=False, **kw):
    """fla's token_shift (delta = previous token - this one; the cache is the last token) in PyTorch."""
    if cu_seqlens is not None:
        raise NotImplementedError("the CPU stand-in of fla's token_shift takes no cu_seqlens (packed sequences)")
    prev = torch.zeros_like(x[:, :1]) if cache is None else cache.reshape(x.shape[0], 1, -1).to(x.dtype)
    delta = torch.cat([prev, x[:, :-1]], 1) - x
    return (delta, x[:, -1].clone()) if output_cache else delta


def wkv_float64(r, w, k, v, a, b, initial_state=None, output_final_state=False):
    """The RWKV-7 recurrence in float64, in fla's conventions: (B, T, H, D) inputs, w = log decay,
    state (B, H, K, V). Returns (output in r's dtype, final state or None)."""
    B, T, H, D = r.shape
    dt = r.dtype
    r, w, k, v, a, b = (t.double() for t in (r, w, k, v, a, b))
    S = torch.zeros(B, H, v.shape[-1], D, dtype=torch.float64, device=r.device) if initial_state is None \
        else initial_state.double().transpose(-1, -2)  # (B, H, V, K) here
    out = []
    for t in range(T):
        S = (S * w[:, t].exp()[:, :, None, :] + (S @ a[:, t, :, :, None]) * b[:, t, :, None, :]
             + v[:, t, :, :, None] * k[:, t, :, None, :])
        out.append((S @ r[:, t, :, :, None])[..., 0])
    final = S.transpose(-1, -2).float().contiguous() if output_final_state else None
    return torch.stack(out, 1).to(dt), final


def _chunk(r, w, k, v, a, b, scale=1.0, initial_state=None, output_final_state=False, cu_seqlens=None, **kw):
    return wkv_float64(r, w, k, v, a, b, initial_state, output_final_state)


def _recurrent(r, w, k, v, kk, a, scale=1.0, initial_state=None, output_final_state=False, cu_seqlens=None, **kw):
    return wkv_float64(r, w, k, v, -kk, kk * a, initial_state, output_final_state)


@contextlib.contextmanager
def fla_on_cpu():
    """fla's RWKV7 with its Triton kernels replaced by PyTorch (see the module's text); restored on exit."""
    import fla.layers.rwkv7 as layer
    import fla.models.rwkv7.modeling_rwkv7 as modeling
    from fla.ops.rwkv7.fused_addcmul import torch_addcmul_rwkv7
    from fla.ops.rwkv7.fused_k_update import k_update_ref
    from fla.ops.rwkv7.gate_output_correction import gate_output_correction_ref

    act = dict(modeling.ACT2FN)
    act["sqrelu"] = sqrelu
    patches = [(layer, "token_shift", token_shift), (modeling, "token_shift", token_shift),
               (layer, "fused_addcmul_rwkv7", torch_addcmul_rwkv7), (layer, "fused_k_rwkv7", k_update_ref),
               (layer, "gate_output_correction", gate_output_correction_ref), (layer, "chunk_rwkv7", _chunk),
               (layer, "fused_mul_recurrent_rwkv7", _recurrent), (modeling, "ACT2FN", act)]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    try:
        for mod, name, value in patches:
            setattr(mod, name, value)
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


def cpu_ready(model):
    """`model` with the plain squared ReLU in every RWKV7 feed-forward (fla torch.compile's its own)."""
    import fla.models.rwkv7.modeling_rwkv7 as modeling

    for m in model.modules():
        if isinstance(m, modeling.RWKV7FeedForward):
            m.act_fn = sqrelu
    return model


def main(argv=None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("lm_eval", "lm-eval"):
        print("usage: python -m rwkvlm.hf.cpu lm_eval ARGS...  (lm-evaluation-harness's command line, with fla's "
              "RWKV7 kernels replaced by PyTorch so that it runs on a CPU; pass fuse_norm=False in --model_args)",
              file=sys.stderr)
        return 2
    from lm_eval.__main__ import cli_evaluate

    old = sys.argv
    sys.argv = ["lm_eval"] + argv[1:]
    try:
        with fla_on_cpu():
            cli_evaluate()
    finally:
        sys.argv = old
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
