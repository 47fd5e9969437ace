"""The x070 model: config checks, parameter names/shapes/count, init, loss, parity with `rwkv`."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from losskit import L2Wrap, l2wrap_loss
from rwkvlm.errors import UserError
from rwkvlm.model import ModelConfig, RWKV7, count_params, head_l2wrap_loss

L_, C_, V_ = 2, 128, 1000  # the small model used throughout


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1234)
    m = RWKV7(ModelConfig(n_layer=L_, n_embd=C_, vocab_size=V_))
    m.init_weights()
    return m


def perturbed(m, scale=0.05, seed=0):
    """A copy of m's weights with noise everywhere (so zero-init matrices matter)."""
    g = torch.Generator().manual_seed(seed)
    m2 = RWKV7(m.cfg)
    sd = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in m.state_dict().items()}
    m2.load_state_dict(sd)
    return m2


# ------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------

def test_config_derived_dims():
    cfg = ModelConfig(n_layer=12, n_embd=768)
    assert (cfg.n_head, cfg.dim_att, cfg.dim_ffn) == (12, 768, 3072)
    assert (cfg.d_decay_lora, cfg.d_aaa_lora, cfg.d_mv_lora, cfg.d_gate_lora) == (64, 64, 32, 128)
    assert cfg.vocab_size == 65536 and cfg.head_size == 64 and cfg.grad_cp is False


def test_config_rejects_bad_sizes():
    with pytest.raises(UserError, match="--n_embd"):
        ModelConfig(n_layer=2, n_embd=100)
    with pytest.raises(UserError, match="--head_size"):
        ModelConfig(n_layer=2, n_embd=192, head_size=128)
    with pytest.raises(UserError, match="--n_layer"):
        ModelConfig(n_layer=0, n_embd=128)


# ------------------------------------------------------------------------------------------
# names, shapes, count
# ------------------------------------------------------------------------------------------

def expected_shapes(L, C, V, N=64):
    H = C // N
    lora = lambda f: max(32, round(f * math.sqrt(C) / 32) * 32)  # noqa: E731
    Dw, Dv, Dg = lora(2.5), lora(1.7), lora(5.0)
    s = {"emb.weight": (V, C), "ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C),
         "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,)}
    for l in range(L):
        p = f"blocks.{l}."
        for n in ("ln1", "ln2"):
            s[p + n + ".weight"] = s[p + n + ".bias"] = (C,)
        a = p + "att."
        for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a"):
            s[a + n] = (1, 1, C)
        for n, D in (("w", Dw), ("a", Dw), ("v", Dv), ("g", Dg)):
            s[a + n + "1"], s[a + n + "2"] = (C, D), (D, C)
        s[a + "r_k"] = (H, N)
        for n in ("receptance", "key", "value", "output"):
            s[a + n + ".weight"] = (C, C)
        s[a + "ln_x.weight"] = s[a + "ln_x.bias"] = (C,)
        s[p + "ffn.x_k"] = (1, 1, C)
        s[p + "ffn.key.weight"] = (4 * C, C)
        s[p + "ffn.value.weight"] = (C, 4 * C)
    return s


def test_state_dict_names_and_shapes(model):
    sd = model.state_dict()
    exp = expected_shapes(L_, C_, V_)
    assert set(sd) == set(exp)
    for k, shape in exp.items():
        assert tuple(sd[k].shape) == shape, k
        assert sd[k].dtype == torch.float32, k


def test_count_params_reference_model():
    assert count_params(ModelConfig(n_layer=12, n_embd=768, vocab_size=65536)) == 191_084_544


@pytest.mark.parametrize("L,C,V,N", [(2, 128, 1000, 64), (1, 64, 77, 64), (3, 192, 300, 32)])
def test_count_params_matches_numel(L, C, V, N):
    m = RWKV7(ModelConfig(n_layer=L, n_embd=C, vocab_size=V, head_size=N))
    assert count_params(m.cfg) == sum(p.numel() for p in m.parameters())
    assert set(m.state_dict()) == set(expected_shapes(L, C, V, N))


# ------------------------------------------------------------------------------------------
# init
# ------------------------------------------------------------------------------------------

def test_init_table_values(model):
    sd = model.state_dict()
    C, L, N = C_, L_, 64
    n = torch.arange(C, dtype=torch.float64)
    d, lin = n / C, n / (C - 1) - 0.5
    z = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    zig = z * z.abs()
    for l in range(L):
        a = f"blocks.{l}.att."
        r0, r1 = l / (L - 1), 1 - l / L
        for name, pw in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
            torch.testing.assert_close(sd[a + name].view(C).double(), 1 - d ** (pw * r1), atol=1e-6, rtol=0)
        www = -6 + 6 * (n / (C - 1)) ** (1 + r0 ** 0.3)
        torch.testing.assert_close(sd[a + "w0"].view(C).double(), www + 0.5 + 2.5 * zig, atol=1e-5, rtol=0)
        torch.testing.assert_close(sd[a + "a0"].view(C).double(), -0.19 + 0.3 * zig + 0.4 * lin, atol=1e-6, rtol=0)
        torch.testing.assert_close(sd[a + "v0"].view(C).double(), 0.73 - 0.4 * lin, atol=1e-6, rtol=0)
        torch.testing.assert_close(sd[a + "k_k"].view(C).double(), 0.71 - 0.1 * lin, atol=1e-6, rtol=0)
        assert torch.all(sd[a + "k_a"] == torch.tensor(1.02))
        assert torch.all(sd[a + "r_k"] == torch.tensor(-0.04))
        torch.testing.assert_close(sd[f"blocks.{l}.ffn.x_k"].view(C).double(), 1 - d ** (r1 ** 4), atol=1e-6, rtol=0)
        assert torch.all(sd[a + "ln_x.bias"] == 0)
        for ln in ("ln1", "ln2"):
            assert torch.all(sd[f"blocks.{l}.{ln}.weight"] == 1) and torch.all(sd[f"blocks.{l}.{ln}.bias"] == 0)
    assert torch.all(sd["blocks.0.ln0.weight"] == 1) and torch.all(sd["ln_out.bias"] == 0)


def test_init_ln_x_layer_scale():
    L = 5
    torch.manual_seed(0)
    m = RWKV7(ModelConfig(n_layer=L, n_embd=64, vocab_size=100))
    m.init_weights()
    for l in range(L):
        w = m.state_dict()[f"blocks.{l}.att.ln_x.weight"]
        assert torch.allclose(w, torch.full_like(w, ((1 + l) / L) ** 0.7)), l


def test_init_zero_matrices(model):
    sd = model.state_dict()
    for l in range(L_):
        for name in ("att.output.weight", "ffn.value.weight", "att.w1", "att.a1", "att.v1", "att.g1"):
            assert torch.count_nonzero(sd[f"blocks.{l}.{name}"]) == 0, name


def _assert_orthogonal(M, gain, name):
    M = M.double()
    rows, cols = M.shape
    G = M @ M.T if rows <= cols else M.T @ M
    eye = torch.eye(min(rows, cols), dtype=torch.float64)
    torch.testing.assert_close(G, gain ** 2 * eye, atol=1e-4 * max(1.0, gain ** 2), rtol=0, msg=name)


def test_init_orthogonal_matrices(model):
    sd = model.state_dict()
    _assert_orthogonal(sd["head.weight"], 0.5 * math.sqrt(V_ / C_), "head")  # V > C: M^T M
    for l in range(L_):
        p = f"blocks.{l}."
        _assert_orthogonal(sd[p + "att.key.weight"], 0.1, "att.key")
        for name in ("att.receptance.weight", "att.value.weight", "ffn.key.weight"):
            _assert_orthogonal(sd[p + name], 1.0, name)  # plain gain, also for the 4C x C ffn.key
        for name in ("att.w2", "att.a2", "att.v2", "att.g2"):  # D x C, rows < cols: gain 0.1
            _assert_orthogonal(sd[p + name], 0.1, name)
    emb = sd["emb.weight"]
    assert emb.abs().max() <= 1e-4 and emb.std() > 3e-5


def test_init_is_deterministic_given_seed():
    sds = []
    for _ in range(2):
        torch.manual_seed(7)
        m = RWKV7(ModelConfig(n_layer=2, n_embd=64, vocab_size=100))
        m.init_weights()
        sds.append(m.state_dict())
    for k in sds[0]:
        assert torch.equal(sds[0][k], sds[1][k]), k


def test_single_layer_model_inits_and_runs():
    torch.manual_seed(0)
    m = RWKV7(ModelConfig(n_layer=1, n_embd=64, vocab_size=50))
    m.init_weights()
    assert torch.isfinite(m(torch.randint(0, 50, (1, 8)))).all()


# ------------------------------------------------------------------------------------------
# loss and L2Wrap
# ------------------------------------------------------------------------------------------

def test_l2wrap_gradient_goes_to_argmax():
    torch.manual_seed(0)
    B, T, V = 2, 5, 37
    logits = (3 * torch.randn(B, T, V, dtype=torch.float64)).requires_grad_()
    tgt = torch.randint(0, V, (B, T))
    scale = 2.5
    (scale * l2wrap_loss(logits, tgt)).backward()
    ce_grad = (torch.softmax(logits.detach(), -1) - F.one_hot(tgt, V).double()) / (B * T)
    extra = logits.grad / scale - ce_grad
    maxv, am = logits.detach().max(-1)
    expect = torch.zeros_like(extra).scatter_(-1, am.unsqueeze(-1), (1e-4 / (B * T) * maxv).unsqueeze(-1))
    torch.testing.assert_close(extra, expect, atol=1e-12, rtol=0)
    assert torch.count_nonzero(extra.abs() > 1e-12) == B * T  # exactly one logit per position


def test_l2wrap_function_is_identity_forward():
    torch.manual_seed(1)
    B, T, V = 3, 4, 11
    logits = torch.randn(B, T, V, requires_grad=True)
    tgt = torch.randint(0, V, (B, T))
    ce = F.cross_entropy(logits.view(-1, V), tgt.view(-1))
    out = L2Wrap.apply(ce, logits)
    assert torch.equal(out, ce)
    (3.0 * out).backward()
    maxv, am = logits.detach().max(-1)
    ce_grad = 3.0 * (torch.softmax(logits.detach(), -1) - F.one_hot(tgt, V).float()) / (B * T)
    extra = logits.grad - ce_grad
    expect = torch.zeros_like(extra).scatter_(-1, am.unsqueeze(-1), (3.0 * 1e-4 / (B * T) * maxv).unsqueeze(-1))
    torch.testing.assert_close(extra, expect, atol=1e-7, rtol=0)


@pytest.mark.parametrize("chunk_rows", [4, 1000])
def test_fused_head_loss_matches_torch_and_keeps_inputs(chunk_rows):
    torch.manual_seed(2)
    h, W = torch.randn(3, 7, 16), torch.randn(50, 16)
    keep = h.clone(), W.clone()
    tgt = torch.randint(0, 50, (3, 7))
    got = head_l2wrap_loss(h, W, tgt, chunk_rows=chunk_rows)
    torch.testing.assert_close(got, F.cross_entropy((h @ W.T).view(-1, 50), tgt.view(-1)))
    assert torch.equal(h, keep[0]) and torch.equal(W, keep[1])


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"])
@pytest.mark.parametrize("chunk_rows", [4, 1000])
def test_fused_head_loss_matches_unfused(chunk_rows, compiled):
    """The fused head loss (eager, and with its per-chunk softmax work under torch.compile,
    as --compile runs it; 18 rows in chunks of 4 leave a short last chunk) against autograd."""
    torch.manual_seed(3)
    B, T, C, V = 2, 9, 16, 70
    h1 = torch.randn(B, T, C, dtype=torch.float64, requires_grad=True)
    W1 = torch.randn(V, C, dtype=torch.float64, requires_grad=True)
    tgt = torch.randint(0, V, (B, T))
    h2, W2 = h1.detach().clone().requires_grad_(), W1.detach().clone().requires_grad_()

    fused = head_l2wrap_loss(h1, W1, tgt, chunk_rows=chunk_rows, compiled=compiled)
    (1.7 * fused).backward()
    ref = l2wrap_loss(h2 @ W2.T, tgt)
    (1.7 * ref).backward()
    torch.testing.assert_close(fused.double(), ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(W1.grad, W2.grad, atol=1e-6, rtol=1e-5)


def test_fused_head_loss_bf16_close_to_fp32():
    torch.manual_seed(4)
    h = torch.randn(2, 8, 64)
    W = torch.randn(300, 64) * 0.2
    tgt = torch.randint(0, 300, (2, 8))
    ref = head_l2wrap_loss(h, W, tgt)
    hb = h.bfloat16().requires_grad_()
    Wb = W.bfloat16().requires_grad_()
    got = head_l2wrap_loss(hb, Wb, tgt)
    got.backward()
    assert abs(got.item() - ref.item()) < 0.05
    assert hb.grad.dtype == torch.bfloat16 and Wb.grad.dtype == torch.bfloat16


def test_model_loss_equals_cross_entropy_of_forward(model):
    m = perturbed(model)
    idx = torch.randint(0, V_, (2, 24))
    tgt = torch.randint(0, V_, (2, 24))
    loss = m.loss(idx, tgt)
    with torch.no_grad():
        ref = F.cross_entropy(m(idx).view(-1, V_), tgt.view(-1))
    torch.testing.assert_close(loss.detach(), ref, atol=1e-5, rtol=0)


def test_grad_checkpointing_gives_same_grads(model):
    idx = torch.randint(0, V_, (2, 20))
    tgt = torch.randint(0, V_, (2, 20))
    grads = []
    for cp in (False, True):
        m = perturbed(model)
        m.cfg = ModelConfig(n_layer=L_, n_embd=C_, vocab_size=V_, grad_cp=cp)
        m.loss(idx, tgt).backward()
        # layer 0's v0/v1/v2 are unused (v_first is layer 0's own value): no grad there
        grads.append({k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1])
    assert {k for k, p in m.named_parameters() if p.grad is None} == {f"blocks.0.att.{n}" for n in ("v0", "v1", "v2")}
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-5, msg=k)
    assert all(torch.isfinite(g).all() for g in grads[0].values())


# ------------------------------------------------------------------------------------------
# parity with the `rwkv` pip package (the independent inference client)
# ------------------------------------------------------------------------------------------

from rwkvpip import RWKV_PKG_SCRIPT  # noqa: E402


def test_forward_parity_with_rwkv_package(model, tmp_path):
    pytest.importorskip("rwkv")
    m = perturbed(model, scale=0.1, seed=5)
    path = tmp_path / "parity"
    torch.save(m.state_dict(), str(path) + ".pth")
    toks = torch.randint(0, V_, (23,), generator=torch.Generator().manual_seed(9))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", RWKV_V7_ON="1", RWKV_JIT_ON="0", RWKV_CUDA_ON="0")
    out_file = tmp_path / "out.pt"
    r = subprocess.run([sys.executable, "-c", RWKV_PKG_SCRIPT, str(path), str(out_file),
                        ",".join(map(str, toks.tolist()))], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = torch.load(out_file, weights_only=True)

    with torch.no_grad():
        ours = m(toks.unsqueeze(0))[0]                      # whole sequence, training forward
        rnn_pieces, state = [], None
        for t0, t1 in ((0, 1), (1, 9), (9, 23)):            # carried state, uneven pieces
            lg, state = m.forward_rnn(toks[t0:t1].unsqueeze(0), state)
            rnn_pieces.append(lg[0])
        ours_rnn = torch.cat(rnn_pieces)

    scale = ref["seq"].abs().max().item()
    assert scale > 1.0  # the perturbation makes the logits non-trivial
    tol = 1e-5 * max(1.0, scale)
    assert (ours - ref["seq"]).abs().max().item() < tol
    assert (ours - ref["one"]).abs().max().item() < tol
    assert (ours_rnn - ref["seq"]).abs().max().item() < tol
    # our carried state after the last token equals the package's
    pkg_state = ref["state"]
    for l, (att_x, wkv_s, ffn_x) in enumerate(state):
        torch.testing.assert_close(att_x[0], pkg_state[3 * l], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(wkv_s[0], pkg_state[3 * l + 1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ffn_x[0], pkg_state[3 * l + 2], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------
# GPU: the CUDA kernel path against the chunked PyTorch path (skipped without CUDA)
# ------------------------------------------------------------------------------------------

def _loss_and_grads(m, idx, tgt):
    m.zero_grad(set_to_none=True)
    loss = m.loss(idx, tgt)
    loss.backward()
    return loss.detach().float(), {k: p.grad.float().clone() for k, p in m.named_parameters() if p.grad is not None}


@pytest.mark.gpu
def test_cuda_kernel_path_matches_chunked_path(model, monkeypatch):
    m = perturbed(model, scale=0.05, seed=3).cuda()
    g = torch.Generator().manual_seed(4)
    idx = torch.randint(0, V_, (2, 100), generator=g).cuda()   # T not a multiple of 16
    tgt = torch.randint(0, V_, (2, 100), generator=g).cuda()
    loss_k, grads_k = _loss_and_grads(m, idx, tgt)             # rwkvlm.ops.wkv7.cuda (bf16 kernel)
    monkeypatch.setitem(sys.modules, "rwkvlm.ops.wkv7.cuda", None)  # import fails -> chunked path
    loss_c, grads_c = _loss_and_grads(m, idx, tgt)
    assert abs(loss_k.item() - loss_c.item()) < 2e-2
    for k in grads_c:
        num = (grads_k[k] - grads_c[k]).norm().item()
        den = grads_c[k].norm().item() + 1e-12
        assert num / den < 5e-2, (k, num / den)


@pytest.mark.gpu
def test_bf16_model_trains_on_cuda(model):
    m = perturbed(model, scale=0.02, seed=6).cuda().bfloat16()
    idx = torch.randint(0, V_, (2, 64), device="cuda")
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss = m.loss(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        whole = m(idx).float()
        rnn, _ = m.forward_rnn(idx)
    assert (rnn.float() - whole).abs().max().item() < 0.1 * max(1.0, whole.abs().max().item())


def test_forward_rnn_last_only_matches_full():
    from trainkit import perturbed_model

    model = perturbed_model(vocab_size=1000, seed=1, scale=0.02)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 11))
    with torch.no_grad():
        full, s_full = model.forward_rnn(idx)
        last, s_last = model.forward_rnn(idx, last_only=True)
    assert last.shape == (2, 1, model.cfg.vocab_size)
    torch.testing.assert_close(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-6)
    for a, b in zip(s_full, s_last):
        assert all(torch.equal(x, y) for x, y in zip(a, b))  # the state does not depend on the head


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"])
def test_fused_head_loss_exact_when_target_probability_underflows(compiled):
    """Rows whose target probability underflows fp32 (loss > 87) still get the exact loss."""
    torch.manual_seed(3)
    V, C = 50, 8
    x = torch.randn(2, 9, C, dtype=torch.float64).float()
    w = torch.randn(V, C)
    w[7] = -40.0 * x.reshape(-1, C).mean(0) / x.reshape(-1, C).mean(0).norm()  # push token 7 far down
    targets = torch.randint(0, V, (2, 9))
    targets[0, :4] = 7
    logits = (x @ w.t()).double()
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))
    p_t = torch.softmax(logits.reshape(-1, V).float(), -1)[torch.arange(18), targets.reshape(-1)]
    assert bool((p_t < 1e-30).any()), "the test must hit the underflow path"
    for rows in (1, 4, 64):
        got = head_l2wrap_loss(x, w, targets, chunk_rows=rows, compiled=compiled)
        assert torch.isfinite(got)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------------
# one block implementation, run as modules (eager), on plain tensors (compiled) and with state
# ------------------------------------------------------------------------------------------

def test_block_on_plain_tensors_matches_the_modules(model):
    """What compile_blocks compiles (_block_fused on Block.params()), run uncompiled, gives the
    eager blocks' output and gradients."""
    from rwkvlm.model.rwkv7 import _block_fused

    m = perturbed(model, seed=8)
    idx = torch.randint(0, V_, (2, 21), generator=torch.Generator().manual_seed(8))
    x0 = m.emb(idx).detach()
    outs, grads = [], []
    for plain in (False, True):
        m.zero_grad(set_to_none=True)
        x, v_first = x0, None
        for blk in m.blocks:
            if plain:
                x, v_first = _block_fused(blk.params(), x, v_first, m.cfg.head_size, m.cfg.wkv_impl)
            else:
                x, v_first, _ = blk(x, v_first)
        x.square().mean().backward()
        outs.append(x.detach())
        grads.append({n: p.grad for n, p in m.blocks.named_parameters() if p.grad is not None})
    assert torch.equal(outs[0], outs[1])
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-7, rtol=1e-5, msg=n)
        assert grads[1][n].shape == grads[0][n].shape


def test_eager_model_reads_each_weight_inside_its_module(model):
    """As DeepSpeed ZeRO-3 runs it: every weight is absent (empty) except while the module that
    holds it runs its forward. The eager forward and forward_rnn still give the same logits."""
    m = perturbed(model, seed=9)
    idx = torch.randint(0, V_, (1, 13), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref, ref_rnn = m(idx), m.forward_rnn(idx)[0]
    full = {p: p.data for p in m.parameters()}

    def gather(mod, *_):
        for p in mod.parameters(recurse=False):
            p.data = full[p]

    def release(mod, *_):
        for p in mod.parameters(recurse=False):
            p.data = torch.empty(0)

    hooks = []
    for mod in m.modules():
        release(mod)
        hooks += [mod.register_forward_pre_hook(gather), mod.register_forward_hook(release)]
    try:
        with torch.no_grad():
            got, got_rnn = m(idx), m.forward_rnn(idx)[0]
    finally:
        for h in hooks:
            h.remove()
        for p, d in full.items():
            p.data = d
    assert torch.equal(got, ref) and torch.equal(got_rnn, ref_rnn)


# ------------------------------------------------------------------------------------------
# torch.compile'd blocks (--compile 1)
# ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_compiled_blocks_match_eager(model):
    """compile_blocks changes speed only: same loss and same gradient for every parameter
    (under gradient checkpointing, which re-runs the compiled graphs); the state dict keeps
    its names."""
    cfg = ModelConfig(n_layer=L_, n_embd=C_, vocab_size=V_, grad_cp=True)
    weights = perturbed(model, seed=3).state_dict()
    eager, comp = RWKV7(cfg), RWKV7(cfg)
    eager.load_state_dict(weights)
    comp.load_state_dict(weights)
    comp.compile_blocks()
    assert list(comp.state_dict()) == list(eager.state_dict())
    from torch._dynamo.utils import counters

    counters.clear()
    g = torch.Generator().manual_seed(5)
    for T in (48, 33):  # a second length: recompiles (or reuses a dynamic graph) correctly
        idx = torch.randint(0, V_, (2, T), generator=g)
        tgt = torch.randint(0, V_, (2, T), generator=g)
        losses, grads = [], []
        for m in (eager, comp):
            m.zero_grad(set_to_none=True)
            loss = m.loss(idx, tgt)
            loss.backward()
            losses.append(loss.detach())
            grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        assert torch.allclose(losses[0], losses[1], rtol=1e-5, atol=1e-6)
        assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
        for n in grads[0]:
            ref, got = grads[0][n], grads[1][n]
            err = (got - ref).norm() / ref.norm().clamp_min(1e-12)
            assert err < 1e-4, f"{n}: relative error {err:.2e}"
    # each block is one graph, the WKV op inside it: nothing falls back to eager between ops
    assert not counters["graph_break"], dict(counters["graph_break"])


def _saved_activation_bytes(m, idx, tgt) -> int:
    """Bytes of the distinct non-parameter storages the forward keeps for backward."""
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = m.loss(idx, tgt)
    loss.backward()
    return sum(seen.values())


@pytest.mark.slow
def test_compiled_blocks_checkpoint_inside_the_graph():
    """--grad_cp 1 with compiled blocks keeps about what the eager checkpointed model keeps (the
    blocks' inputs), far less than without checkpointing: the recompute happens inside the
    compiled backward, not by saving the block's intermediates."""
    g = torch.Generator().manual_seed(7)
    idx = torch.randint(0, V_, (2, 256), generator=g)
    tgt = torch.randint(0, V_, (2, 256), generator=g)
    got = {}
    for cp in (True, False):
        for compiled in (False, True):
            m = RWKV7(ModelConfig(n_layer=L_, n_embd=C_, vocab_size=V_, grad_cp=cp))
            if compiled:
                m.compile_blocks()
            got[cp, compiled] = _saved_activation_bytes(m, idx, tgt)
    assert got[True, True] <= 1.5 * got[True, False], got
    assert got[True, True] < 0.5 * got[False, True], got


def test_compiler_failure_names_the_flag(monkeypatch, model):
    """A torch.compile failure (e.g. no C compiler) stops with a UserError naming --compile 0;
    other errors pass through unchanged."""
    import torch._dynamo.exc

    from rwkvlm.model import layers as model_mod
    def broken_compile(fn, **kw):
        def run(*args):
            raise torch._dynamo.exc.BackendCompilerFailed(lambda: None, RuntimeError("no working C compiler"), None)
        return run

    monkeypatch.setattr(model_mod, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", broken_compile)
    m = perturbed(model, seed=4)
    m.compile_blocks()
    idx = torch.randint(0, V_, (1, 16))
    with pytest.raises(UserError, match="--compile 0"):
        m.loss(idx, idx)

    def other_error(fn, **kw):
        def run(*args):
            raise ValueError("a bug of ours")
        return run

    monkeypatch.setattr(model_mod, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", other_error)
    with pytest.raises(ValueError, match="a bug of ours"):
        m.loss(idx, idx)
