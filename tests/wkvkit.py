"""What the WKV7 tests share: inputs shaped like the model's and the relative-RMS measure."""
import torch
import torch.nn.functional as F


def make_inputs(B, T, H, N=64, *, dtype=torch.float32, device="cpu", seed=0, decay_scale=1.0,
                strong_decay=False):
    """r, w, k, v, a, b as the model makes them, each (B, T, H*N), drawn in float64 and cast.

    w = -softplus(-decay_scale * randn) - 0.5 (strong_decay: log-decay -exp(w) down to about
    -e^6 per step), kk = L2-normalised per head, a = -kk, b = kk * sigmoid(randn), r/k/v ~ randn.
    """
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    shape = (B, T, H, N)
    r, k, v = rnd(*shape), rnd(*shape), rnd(*shape)
    if strong_decay:
        w = rnd(*shape).abs() * 2.0 + 0.5
    else:
        w = -F.softplus(-decay_scale * rnd(*shape)) - 0.5
    kk = F.normalize(rnd(*shape), dim=-1)
    gate = torch.sigmoid(rnd(*shape))
    out = (r, w, k, v, -kk, kk * gate)
    return [t.reshape(B, T, H * N).to(dtype=dtype, device=device).contiguous() for t in out]  # (B, T, C)


def rel_rms(x, ref) -> float:
    """RMS of the difference relative to the RMS of the reference."""
    x, ref = x.double(), ref.double()
    return ((x - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()
