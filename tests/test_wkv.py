"""The WKV7 op: reference gradcheck, chunked path vs reference, state carry, GPU dispatch."""
import pytest
import torch

from rwkvlm.ops.wkv7 import wkv7, wkv7_chunked, wkv7_reference, wkv7_step

import wkvkit
from wkvkit import rel_rms


def make_inputs(B, T, H, N, **kw):
    return wkvkit.make_inputs(B, T, H, N, decay_scale=2.0, **kw)


def test_reference_gradcheck_float64():
    B, T, H, N = 1, 5, 2, 4
    inputs = [t.requires_grad_() for t in make_inputs(B, T, H, N, dtype=torch.float64, seed=1)]
    s0 = (0.3 * torch.randn(B, H, N, N, dtype=torch.float64)).requires_grad_()

    def f(r, w, k, v, a, b, s):
        y, s1 = wkv7_reference(r, w, k, v, a, b, N, state=s)
        return y, s1

    assert torch.autograd.gradcheck(f, (*inputs, s0), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_reference_matches_explicit_recurrence():
    # one head, written out with explicit index loops, against the batched reference
    B, T, H, N = 1, 4, 1, 3
    r, w, k, v, a, b = (t[0].double() for t in make_inputs(B, T, H, N, dtype=torch.float64, seed=2))
    S = torch.zeros(N, N, dtype=torch.float64)
    ys = []
    for t in range(T):
        dec = torch.exp(-torch.exp(w[t]))
        sa = [sum(S[i, m] * a[t, m] for m in range(N)) for i in range(N)]
        S = torch.stack([torch.stack([S[i, j] * dec[j] + sa[i] * b[t, j] + v[t, i] * k[t, j]
                                      for j in range(N)]) for i in range(N)])
        ys.append(torch.stack([sum(S[i, j] * r[t, j] for j in range(N)) for i in range(N)]))
    y_ref, S_ref = wkv7_reference(*(x.unsqueeze(0) for x in (r, w, k, v, a, b)), N)
    torch.testing.assert_close(y_ref[0], torch.stack(ys))
    torch.testing.assert_close(S_ref[0, 0], S)


CASES = [
    # B, T, H, N, chunk_len
    (2, 37, 2, 16, 16),   # T not a multiple of the chunk
    (1, 50, 1, 64, 32),
    (3, 16, 2, 8, 16),    # exactly one chunk
    (1, 5, 1, 32, 16),    # shorter than a chunk
    (2, 23, 3, 8, 7),     # odd chunk length
]


@pytest.mark.parametrize("B,T,H,N,L", CASES)
@pytest.mark.parametrize("mode", ["auto", "pairwise"])
def test_chunked_matches_reference_fp32(B, T, H, N, L, mode):
    inputs = make_inputs(B, T, H, N, seed=T + N)
    s0 = 0.5 * torch.randn(B, H, N, N, generator=torch.Generator().manual_seed(3))
    leaves_ref = [t.clone().requires_grad_() for t in inputs] + [s0.clone().requires_grad_()]
    leaves_chk = [t.clone().requires_grad_() for t in inputs] + [s0.clone().requires_grad_()]

    y_ref, S_ref = wkv7_reference(*leaves_ref[:6], N, state=leaves_ref[6])
    y_chk, S_chk = wkv7_chunked(*leaves_chk[:6], N, state=leaves_chk[6], chunk_len=L, mode=mode)
    assert y_chk.shape == y_ref.shape == (B, T, H * N)
    assert S_chk.shape == S_ref.shape == (B, H, N, N)
    assert S_chk.dtype == torch.float32
    assert rel_rms(y_chk, y_ref) < 1e-5
    assert rel_rms(S_chk, S_ref) < 1e-5

    gy = torch.randn_like(y_ref)
    gS = torch.randn_like(S_ref)
    ((y_ref * gy).sum() + (S_ref * gS).sum()).backward()
    ((y_chk * gy).sum() + (S_chk * gS).sum()).backward()
    for name, p_ref, p_chk in zip("r w k v a b state".split(), leaves_ref, leaves_chk):
        assert torch.isfinite(p_chk.grad).all(), name
        assert rel_rms(p_chk.grad, p_ref.grad) < 1e-4, name


def test_chunked_float64_is_exact():
    B, T, H, N = 2, 45, 2, 16
    inputs = make_inputs(B, T, H, N, dtype=torch.float64, seed=5)
    y_ref, S_ref = wkv7_reference(*inputs, N)
    for mode in ("factored", "pairwise"):
        y, S = wkv7_chunked(*inputs, N, chunk_len=16, mode=mode)
        assert y.dtype == S.dtype == torch.float64
        assert rel_rms(y, y_ref) < 1e-12
        assert rel_rms(S, S_ref) < 1e-12


def test_chunked_strong_decay_is_safe():
    # log-decays far beyond the factored bound: auto must stay finite and exact
    B, T, H, N = 1, 40, 2, 16
    inputs = [t.requires_grad_() for t in make_inputs(B, T, H, N, seed=7, strong_decay=True)]
    y_ref, S_ref = wkv7_reference(*inputs, N)
    y, S = wkv7_chunked(*inputs, N, chunk_len=16)
    assert torch.isfinite(y).all() and torch.isfinite(S).all()
    assert rel_rms(y, y_ref) < 1e-5
    g_ref = torch.autograd.grad(y_ref.square().sum(), inputs)
    g = torch.autograd.grad(y.square().sum(), inputs)
    for name, a, b in zip("rwkvab", g, g_ref):
        assert torch.isfinite(a).all(), name
        # per-step log-decays of several hundred: fp32 cumulative sums cost a little precision
        assert rel_rms(a, b) < 1e-3, name


def test_chunked_state_carry_in_pieces():
    B, T, H, N = 2, 70, 2, 16
    inputs = make_inputs(B, T, H, N, seed=11)
    y_all, S_all = wkv7_chunked(*inputs, N)
    state, ys, t0 = None, [], 0
    for piece in (1, 16, 9, 30, 14):
        ys_piece, state = wkv7_chunked(*(x[:, t0:t0 + piece] for x in inputs), N, state=state)
        ys.append(ys_piece)
        t0 += piece
    assert t0 == T
    assert rel_rms(torch.cat(ys, dim=1), y_all) < 1e-5
    assert rel_rms(state, S_all) < 1e-5


def test_bf16_inputs_accumulate_in_fp32():
    B, T, H, N = 1, 33, 2, 16
    inputs = make_inputs(B, T, H, N, seed=13)
    y32, _ = wkv7_reference(*inputs, N)
    y, S = wkv7_chunked(*(t.bfloat16() for t in inputs), N)
    assert y.dtype == torch.bfloat16 and S.dtype == torch.float32
    assert rel_rms(y.float(), y32) < 3e-2


def test_public_wkv7_cpu_any_T():
    B, T, H, N = 2, 29, 2, 64
    inputs = make_inputs(B, T, H, N, seed=17)
    y_ref, _ = wkv7_reference(*inputs, N)
    y, none = wkv7(*inputs, N)
    assert none is None
    assert y.shape == (B, T, H * N)
    assert rel_rms(y, y_ref) < 1e-5


def test_forward_rnn_pieces_equal_whole_forward():
    from rwkvlm.model import ModelConfig, RWKV7

    torch.manual_seed(0)
    model = RWKV7(ModelConfig(n_layer=2, n_embd=128, vocab_size=500))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():  # move away from the zero matrices of the init
            p.add_(0.05 * torch.randn_like(p))
    idx = torch.randint(0, 500, (2, 41))
    with torch.no_grad():
        whole = model(idx)
        logits_rnn, _ = model.forward_rnn(idx)
        pieces, state, t0 = [], None, 0
        for piece in (1, 1, 17, 5, 16, 1):
            lg, state = model.forward_rnn(idx[:, t0:t0 + piece], state)
            pieces.append(lg)
            t0 += piece
    assert t0 == idx.shape[1]
    assert rel_rms(logits_rnn, whole) < 1e-5
    assert rel_rms(torch.cat(pieces, dim=1), whole) < 1e-5
    assert len(state) == 2
    att_x, wkv_state, ffn_x = state[0]
    assert att_x.shape == ffn_x.shape == (2, 128)
    assert wkv_state.shape == (2, 2, 64, 64) and wkv_state.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wkv7_cuda_matches_reference(dtype):
    B, T, H, N = 2, 64, 4, 64
    inputs = make_inputs(B, T, H, N, seed=19)
    ref_leaves = [t.clone().requires_grad_() for t in inputs]
    y_ref, _ = wkv7_reference(*ref_leaves, N)
    gy = torch.randn_like(y_ref)
    (y_ref * gy).sum().backward()
    cu_leaves = [t.to("cuda", dtype).requires_grad_() for t in inputs]
    y, _ = wkv7(*cu_leaves, N)
    (y.float() * gy.cuda()).sum().backward()
    assert y.dtype == dtype
    tol = 3e-2  # the kernel computes in bf16 (fp32 inputs are cast), state in fp32
    assert rel_rms(y.float().cpu(), y_ref) < tol
    for name, a, b in zip("rwkvab", cu_leaves, ref_leaves):
        assert rel_rms(a.grad.float().cpu(), b.grad) < 10 * tol, name


@pytest.mark.gpu
def test_chunked_on_cuda_matches_reference_fp32():
    B, T, H, N = 2, 77, 4, 64
    inputs = make_inputs(B, T, H, N, seed=23)
    s0 = 0.5 * torch.randn(B, H, N, N, generator=torch.Generator().manual_seed(1))
    ref = [t.clone().requires_grad_() for t in inputs] + [s0.clone().requires_grad_()]
    cu = [t.cuda().requires_grad_() for t in inputs] + [s0.cuda().requires_grad_()]
    y_ref, S_ref = wkv7_reference(*ref[:6], N, state=ref[6])
    y, S = wkv7_chunked(*cu[:6], N, state=cu[6])
    assert rel_rms(y.cpu(), y_ref) < 1e-5 and rel_rms(S.cpu(), S_ref) < 1e-5
    gy, gS = torch.randn_like(y_ref), torch.randn_like(S_ref)
    ((y_ref * gy).sum() + (S_ref * gS).sum()).backward()
    ((y * gy.cuda()).sum() + (S * gS.cuda()).sum()).backward()
    for name, a, b in zip("r w k v a b state".split(), cu, ref):
        assert rel_rms(a.grad.cpu(), b.grad) < 1e-4, name


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_wkv7_op_pytorch_path_matches_chunked(compiled):
    """The custom op (what compiled blocks call) on its PyTorch path: same output and same six
    gradients as autograd through wkv7_chunked, eagerly and inside one torch.compile graph
    (fullgraph: no break around the op); T = 40 is not a multiple of the chunk length."""
    from rwkvlm.ops.wkv7.cuda import wkv7_op

    B, T, H, N = 2, 40, 2, 32
    inputs = make_inputs(B, T, H, N, seed=29)
    gy = torch.randn(B, T, H * N, generator=torch.Generator().manual_seed(2), dtype=torch.float64).float()
    ref = [t.clone().requires_grad_() for t in inputs]
    y_ref, _ = wkv7_chunked(*ref, N)
    (y_ref * gy).sum().backward()

    def f(*xs):
        return (wkv7_op(*xs, N, "torch") * gy).sum(), wkv7_op(*xs, N, "torch")

    if compiled:
        torch._dynamo.reset()
        f = torch.compile(f, fullgraph=True, dynamic=False)
    got = [t.clone().requires_grad_() for t in inputs]
    loss, y = f(*got)
    loss.backward()
    assert rel_rms(y.detach(), y_ref.detach()) < 1e-6
    for name, a, b in zip("rwkvab", got, ref):
        assert rel_rms(a.grad, b.grad) < 1e-6, name
    with torch.no_grad():  # no state kept without grad, same output
        assert rel_rms(wkv7_op(*inputs, N, "torch"), y_ref.detach()) < 1e-6


def test_one_token_step_and_dispatcher_state_semantics():
    """wkv7_step is the recurrence once; the dispatcher returns the final state exactly when
    asked for (or given one), and feeding a sequence in pieces equals feeding it whole."""
    B, T, H, N = 2, 21, 3, 64
    inputs = make_inputs(B, T, H, N, seed=31)
    s0 = 0.3 * torch.randn(B, H, N, N, generator=torch.Generator().manual_seed(4))
    y_ref, s_ref = wkv7_reference(*inputs, N, state=s0)
    y1, s1 = wkv7_step(*(t[:, :1] for t in inputs), N, state=s0)
    y1_ref, s1_ref = wkv7_reference(*(t[:, :1] for t in inputs), N, state=s0)
    assert rel_rms(y1, y1_ref) < 1e-6 and rel_rms(s1, s1_ref) < 1e-6
    y2d, _ = wkv7_step(*(t[:, 0] for t in inputs), N, state=s0)  # (B, C) inputs
    assert y2d.shape == (B, H * N) and torch.equal(y2d, y1[:, 0])
    y, none = wkv7(*inputs, N)
    assert none is None
    ys, state = [], s0
    for a, b in ((0, 1), (1, 17), (17, 18), (18, T)):
        yp, state = wkv7(*(t[:, a:b] for t in inputs), N, initial_state=state)
        ys.append(yp)
    assert rel_rms(torch.cat(ys, 1), y_ref) < 1e-5 and rel_rms(state, s_ref) < 1e-5
    _, s_zero = wkv7(*inputs, N, output_final_state=True)
    assert rel_rms(s_zero, wkv7_reference(*inputs, N)[1]) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dispatcher_state_on_cuda_uses_the_kernel_and_matches(monkeypatch):
    import rwkvlm.ops.wkv7.cuda as wc

    calls = []
    real = wc.wkv7_cuda_state
    monkeypatch.setattr(wc, "wkv7_cuda_state", lambda *a, **k: calls.append(1) or real(*a, **k))
    B, T, H, N = 2, 45, 2, 64
    inputs = make_inputs(B, T, H, N, seed=37)
    s0 = 0.3 * torch.randn(B, H, N, N, generator=torch.Generator().manual_seed(5))
    y_ref, s_ref = wkv7_reference(*inputs, N, state=s0)
    with torch.no_grad():
        y, s = wkv7(*(t.cuda() for t in inputs), N, initial_state=s0.cuda())
    assert calls == [1]
    assert rel_rms(y.cpu(), y_ref) < 3e-2 and rel_rms(s.cpu(), s_ref) < 3e-2  # bf16 inputs, fp32 state
