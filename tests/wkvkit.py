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


# ------------------------------------------------------------------------------------- WKV6

def make_inputs6(B, T, H, N=64, *, dtype=torch.float32, device="cpu", seed=0, decay="model"):
    """r, k, v, w (B, T, H*N) and u (H, N) for WKV6 (argument order r, k, v, w, u), drawn in
    float64 and cast.

    r, k, v ~ randn; u ~ 0.5 * randn (the x060 init of time_faaaa spans about -0.1..1.1).
    decay (w is the log-log decay: decay = exp(-exp(w))):
      "model":  w = -6 + 5 * rand + 0.5 * randn, the spread of x060's time_decay init plus a
                LoRA: per-step log-decay -exp(w) down to about -e^1.5, at most ~25 per 16-step
                chunk (the kernel's and the chunked path's relative/factored form);
      "strong": w = 0.5 + 2 * |randn|: log-decays of -e^0.5 .. -e^7 per step (the direct /
                pairwise form everywhere);
      "mixed":  "model", with every third channel made strong from step T // 3 on (both forms
                in one call, chosen chunk by chunk).
    """
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    shape = (B, T, H, N)
    r, k, v = rnd(*shape), rnd(*shape), rnd(*shape)
    if decay not in ("model", "strong", "mixed"):
        raise ValueError(f"decay must be 'model', 'strong' or 'mixed', got {decay!r}")
    if decay == "strong":
        w = 0.5 + 2.0 * rnd(*shape).abs()
    else:
        w = -6.0 + 5.0 * torch.rand(*shape, generator=g, dtype=torch.float64) + 0.5 * rnd(*shape)
        if decay == "mixed":
            w = w.reshape(B, T, H * N)
            w[:, T // 3:, ::3] = 0.5 + 2.0 * rnd(B, T - T // 3, len(range(0, H * N, 3))).abs()
    u = 0.5 * rnd(H, N)
    out = [t.reshape(B, T, H * N).to(dtype=dtype, device=device).contiguous() for t in (r, k, v, w)]  # (B, T, C)
    return out + [u.to(dtype=dtype, device=device)]  # + (H, N)
