"""The init at scale (issue: the hardware table, item 3): rwkv-init.pth drawn tensor by tensor into its
final dtype (RWKVLM.initial_state_dict), bit for bit the init of before on the CPU; models built on the
meta device take their weights without an init pass (RWKVLM.from_weights); prepare's host memory stays
well under 2x the fp32 weights.

The stored sha256s were recorded from the code of commit a184d49 (before the change), with one CPU
thread: the CPU init depends on the thread count (MKL's blocked QR), so the comparison pins it to 1.
Where this machine's LAPACK rounds differently from the recording machine (the canary's sha256, of
torch's own orthogonal init, differs) the stored values are skipped; the comparisons of the two paths
with each other run everywhere."""
import hashlib
import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from rwkvlm.model import MODEL_TYPES, ModelConfig, Rwkv6Config

from trainkit import prepare_args

CASES = {
    "x070-L2-D128": ModelConfig(n_layer=2, n_embd=128),
    "x070-L3-D192": ModelConfig(n_layer=3, n_embd=192),
    "x070-L2-D128-v300-released": ModelConfig(n_layer=2, n_embd=128, vocab_size=300, layer0_v=False),
    "x060-L2-D128": Rwkv6Config(n_layer=2, n_embd=128),
    "x060-L3-D192": Rwkv6Config(n_layer=3, n_embd=192),
}
# (the constructor's state dict, init_weights() after torch.manual_seed(42), the same in bf16), commit a184d49
STORED = {
    "x070-L2-D128": ("f411535e10fa317a525677d44a370237ef0c8c39b77b11da57125a60063855fc",
                     "34aaea71b830bdc2a827366d5a6e0a2b2f7e1cb850da24adf5764fec23a84768",
                     "da731a6e4bd68cb149819907c5a35cfe8c62960473805f12902bf7214f178248"),
    "x070-L3-D192": ("cf12d2685ada058f1433a23784a47fe9015424e841a694aa40a1c635fc0856a6",
                     "83a36ec9b1ade95fc564ed87d7db25524dc03ef1454dd4130125828341784d62",
                     "44058115b118295ce367864433a57b4bfdfe96b34c0983bbd82ba59ab9bb4f31"),
    "x070-L2-D128-v300-released": ("7cc9a3d5b95dd620031ee0644847afab043c429acdc940f5eaf1fd33e4a0f56f",
                                   "7814a29b34ac29d89669e2052db895803e9429829b3414a217cfd423457b1c6e",
                                   "3b608359ec2eb4cb30888173ac1d21fd524b7acceceefb95cfb4f694559a1426"),
    "x060-L2-D128": ("fc98886cba1d881951957cdfbcba1949c5ecaa464103807171933d64adc3535c",
                     "b15b83078b08b9dc55c5d6bee3c3284a05576d4e3cfc91224f94faec5161dcd7",
                     "37e0cffe31839825f4cdd531dc9c5edac28e7aaf20ad3e358fd0158a3223f239"),
    "x060-L3-D192": ("f720613bd429539ab40bbf6f92281db481ae98173ca42309b0c82e4e97cc2e7b",
                     "c2d077ba538e8ac30f8bec6b81ac84a78ade04105541df7cbd1eea51e615918f",
                     "c5c397e693be8d595def4818075f8a26a72f645089386af6630ab8c18dad9e1a"),
}
# torch's nn.init.orthogonal_ of the cases' matrix shapes, seed 0, one thread, on the recording machine
CANARY = "3b0b39b67ece61d25b1e4326fa75b00e5fd01d3663d1865aba616ee52c69843e"
CANARY_SHAPES = [(128, 128), (512, 128), (128, 512), (65536, 128), (192, 192), (768, 192), (65536, 192)]


def sd_sha(sd: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        v = sd[k].detach().contiguous().cpu()
        h.update(f"{k} {v.dtype} {tuple(v.shape)}\n".encode())
        h.update(v.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _canary() -> str:
    h = hashlib.sha256()
    torch.manual_seed(0)
    for shape in CANARY_SHAPES:
        t = torch.empty(shape)
        nn.init.orthogonal_(t)
        h.update(t.numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("name", list(CASES))
def test_init_is_the_one_of_before_bit_for_bit(name, one_thread):
    cfg = CASES[name]
    cls = MODEL_TYPES[cfg.model_type][2]
    ctor_sha, init_sha, bf16_sha = STORED[name]
    m = cls(cfg)
    assert sd_sha(m.state_dict()) == ctor_sha  # the table values and zeros (no random numbers): everywhere
    if _canary() != CANARY:
        pytest.skip("this machine's LAPACK rounds torch's orthogonal init differently from the machine the "
                    "stored values come from (the comparisons of the two init paths still run)")
    torch.manual_seed(42)
    m.init_weights()
    assert sd_sha(m.state_dict()) == init_sha
    torch.manual_seed(42)
    assert sd_sha(cls.initial_state_dict(cfg)) == init_sha  # tensor by tensor, in fp32
    torch.manual_seed(42)
    assert sd_sha(cls.initial_state_dict(cfg, torch.bfloat16)) == bf16_sha  # ... and in bf16: as prepare saves


SMALL = {"x070": ModelConfig(n_layer=3, n_embd=128, vocab_size=300),
         "x070-released": ModelConfig(n_layer=2, n_embd=192, vocab_size=1000, layer0_v=False),
         "x060": Rwkv6Config(n_layer=3, n_embd=128, vocab_size=300)}


@pytest.mark.parametrize("name", list(SMALL))
def test_tensor_by_tensor_init_equals_init_weights(name):
    """At this machine's thread count: initial_state_dict (what prepare writes) holds init_weights' values,
    rounded to the save dtype, with the state dict's names in its order."""
    cfg = SMALL[name]
    cls = MODEL_TYPES[cfg.model_type][2]
    torch.manual_seed(3)
    m = cls(cfg)
    m.init_weights()
    want = m.state_dict()
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(3)
        got = cls.initial_state_dict(cfg, dtype)
        assert list(got) == list(want)
        for k, v in want.items():
            assert got[k].dtype == dtype and got[k].device.type == "cpu" and torch.equal(got[k], v.to(dtype)), k


def test_every_parameter_has_one_init_step():
    for cfg in CASES.values():
        with torch.device("meta"):
            m = MODEL_TYPES[cfg.model_type][2](cfg)
        names = [n for n, _ in m.init_steps()]
        assert sorted(names) == sorted(dict(m.named_parameters())) and len(names) == len(set(names))
        assert all(p.is_meta for p in m.parameters())  # built on the meta device: no memory, no init


def test_a_model_built_from_weights_equals_one_loaded_after_an_init():
    cfg = ModelConfig(n_layer=2, n_embd=128, vocab_size=300)
    cls = MODEL_TYPES["x070"][2]
    torch.manual_seed(0)
    sd = cls.initial_state_dict(cfg, torch.bfloat16)
    ref = cls(cfg)
    ref.load_state_dict({k: v.float() for k, v in sd.items()})
    m = cls.from_weights(cfg, dict(sd))
    assert list(m.state_dict()) == list(ref.state_dict())
    for (k, a), b in zip(ref.state_dict().items(), m.state_dict().values()):
        assert b.dtype == torch.float32 and b.device.type == "cpu" and torch.equal(a, b), k
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in m.parameters())
    # fp32 tensors are taken as they are, but a view or a tensor given under two names gets its own copy
    sd32 = {k: v.float() for k, v in sd.items()}
    sd32["head.weight"] = sd32["emb.weight"]
    given = dict(sd32)
    m = cls.from_weights(cfg, sd32)
    assert sd32 == {}  # emptied: the host holds one copy
    assert m.emb.weight.data_ptr() == given["emb.weight"].data_ptr()
    assert m.head.weight.data_ptr() != m.emb.weight.data_ptr()
    x = torch.randint(0, 300, (1, 8))
    assert torch.equal(m(x), cls.from_weights(cfg, {k: v.clone() for k, v in given.items()})(x))


PEAK = r"""
import json, sys, torch
from rwkvlm.model import ModelConfig, RWKV7
from rwkvlm.rundir.weights import save_weights

def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

cfg = ModelConfig(n_layer=int(sys.argv[1]), n_embd=int(sys.argv[2]), vocab_size=int(sys.argv[3]))
dtype = getattr(torch, sys.argv[4])
base = rss("VmRSS:")
torch.manual_seed(0)
save_weights(RWKV7.initial_state_dict(cfg, dtype), sys.argv[5], "bf16" if dtype == torch.bfloat16 else "fp32")
print(json.dumps({"base": base, "peak": rss("VmHWM:"), "fp32": 4 * RWKV7.count_params(cfg)}))
"""


def _growth(tmp_path, L, C, V, dtype):
    """(peak RSS growth of the init and its save, fp32 bytes of the weights) in a fresh process. Memory
    freed by a tensor goes back to the system at once (MALLOC_MMAP_THRESHOLD_), so the peak is what was
    held, not what the allocator kept."""
    import os

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    r = subprocess.run([sys.executable, "-c", PEAK, str(L), str(C), str(V), dtype, str(tmp_path / "w.pth")],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout.strip().splitlines()[-1])
    return d["peak"] - d["base"], d["fp32"]


@pytest.mark.slow  # two inits and saves, each in a fresh process (~10 s)
def test_prepare_holds_the_saved_weights_and_one_tensor_not_a_model(tmp_path):
    """Host memory of the init and its save: each layer added costs its weights in the save dtype (bf16:
    0.5x its fp32 bytes; the path of before, an fp32 model and its bf16 copy, cost 1.5x), and the whole
    stays under 2x the fp32 weights. A small vocabulary keeps the head, the largest tensor, from
    dominating a model this small."""
    (g2, f2), (g6, f6) = _growth(tmp_path, 2, 768, 1024, "bfloat16"), _growth(tmp_path, 6, 768, 1024, "bfloat16")
    per_layer = (g6 - g2) / (f6 - f2)
    assert 0.4 < per_layer < 0.75, per_layer  # measured 0.51 (commit a184d49's path: 1.51)
    assert g6 / f6 < 2.0, g6 / f6             # measured 1.10 (a184d49: 2.00)


@pytest.mark.slow  # the tutorial's 0.1B model (its 65536 x 768 head's QR): ~15 s on 2 CPU cores
def test_prepare_of_the_tutorials_model_stays_under_twice_the_fp32_weights(tmp_path):
    grown, fp32 = _growth(tmp_path, 12, 768, 65536, "bfloat16")
    assert grown / fp32 < 2.0, grown / fp32  # measured 1.29: the bf16 dict 0.5x, the head's QR ~0.8x


def test_prepare_says_where_and_how_long(tmp_path, capsys):
    from rwkvlm.train.run import main

    assert main(prepare_args(tmp_path / "p")) == 0
    out = capsys.readouterr().out
    assert "on the CPU (" in out and "threads)" in out and "init " in out and "write " in out, out
    assert main(prepare_args(tmp_path / "q", "--init_device", "cpu")) == 0
    if not torch.cuda.is_available():
        from rwkvlm.errors import UserError

        with pytest.raises(UserError, match="--init_device cuda, but no CUDA GPU"):
            main(prepare_args(tmp_path / "r", "--init_device", "cuda"))
        assert not (tmp_path / "r" / "rwkv-init.pth").exists()


@pytest.mark.gpu
def test_gpu_init_is_deterministic_and_of_the_same_law(tmp_path):
    """--init_device cuda: the same seed gives the same weights on the GPU; the values are the GPU's own
    (not the CPU's), with the init's shapes, zeros and table values, and orthogonal matrices."""
    cfg = ModelConfig(n_layer=2, n_embd=128)
    cls = MODEL_TYPES["x070"][2]
    torch.manual_seed(5)
    a = cls.initial_state_dict(cfg, torch.float32, device="cuda")
    torch.manual_seed(5)
    b = cls.initial_state_dict(cfg, torch.float32, device="cuda")
    torch.manual_seed(5)
    c = cls.initial_state_dict(cfg, torch.float32, device="cpu")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for k, v in c.items():
        assert a[k].device.type == "cpu" and a[k].shape == v.shape
        if not v.any() or k.endswith(("x_r", "w0", "ln_x.weight", "k_k", "r_k")):  # zeros and table values
            assert torch.equal(a[k], v), k
    w = a["blocks.0.att.receptance.weight"]
    assert torch.allclose(w @ w.T, torch.eye(128), atol=1e-4)
