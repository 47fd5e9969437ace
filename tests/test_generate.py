"""Generation on top of forward_rnn: state carry, sampling options, stops, partial UTF-8, chat CLI."""
import subprocess
import sys

import pytest
import torch
from trainkit import perturbed_model

from rwkvlm.errors import UserError
from rwkvlm.infer.chat import ChatSession, user_turn
from rwkvlm.infer.generate import (
    Generator, Penalty, SamplingOptions, StateBatch, TextStream, load_model, sample_logits,
)
from rwkvlm.data.tokenizer import get_tokenizer

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
GREEDY = SamplingOptions(temperature=0.0, max_tokens=10)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random RWKV-7 (L2 D64, full vocabulary), perturbed so outputs depend on the input."""
    model = perturbed_model()
    path = tmp_path_factory.mktemp("gen") / "rwkv-final.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def gen(ckpt):
    return Generator(load_model(ckpt, "cpu"))


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


class ScriptedModel(torch.nn.Module):
    """forward_rnn whose arg-max output follows a script: after n fed tokens it predicts script[n - k0]."""

    def __init__(self, script, prompt_len, vocab=65536):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.script, self.prompt_len, self.vocab = list(script), prompt_len, vocab

    def forward_rnn(self, idx, state=None, last_only=False):
        B, T = idx.shape
        fed = torch.zeros(B, 1, dtype=torch.long) if state is None else state
        logits = torch.zeros(B, T, self.vocab)
        for t in range(T):
            n = fed[:, 0] + t + 1  # tokens fed so far, this one included
            for b in range(B):
                i = int(n[b]) - self.prompt_len
                nxt = self.script[i] if 0 <= i < len(self.script) else 100
                logits[b, t, nxt] = 10.0
        return (logits[:, -1:] if last_only else logits), fed + T


# ---------------------------------------------------------------- loading

def test_load_infers_shapes_and_casts_fp32(ckpt, tmp_path):
    model = load_model(ckpt, "cpu")
    cfg = model.cfg
    assert (cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.head_size) == (2, 64, 65536, 64)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
    sd = torch.load(ckpt, weights_only=True)
    torch.save({k: v.to(torch.bfloat16) for k, v in sd.items()}, tmp_path / "rwkv-3.pth")
    m16 = load_model(tmp_path / "rwkv-3.pth", "cpu")  # bf16 file -> fp32 on CPU
    assert next(m16.parameters()).dtype == torch.float32


def test_missing_checkpoint_is_a_user_error(tmp_path):
    (tmp_path / "rwkv-0.pth").write_bytes(b"")
    with pytest.raises(UserError, match=r"no such checkpoint .*train_temp/out.*rwkv-0\.pth"):
        load_model(tmp_path / "rwkv-final.pth", "cpu")


# ---------------------------------------------------------------- state carry

def test_carried_state_equals_refeeding_the_whole_context(gen, tok):
    prompt = tok.encode(user_turn("12 + 7 = ?"))
    g = gen.generate(prompt, opts=SamplingOptions(temperature=0.0, max_tokens=12, stop=None))
    assert len(g.tokens) == 12
    model = gen.model
    with torch.no_grad():
        for i, t in enumerate(g.tokens):
            full = model.forward_rnn(torch.tensor([prompt + g.tokens[:i]]))[0][0, -1]
            assert int(full.argmax()) == t
        whole = model.forward_rnn(torch.tensor([prompt + g.tokens]))[0][0, -1]
    assert torch.allclose(g.logits, whole, atol=1e-4, rtol=1e-4)


def test_chat_state_carries_across_turns(gen, tok):
    session = ChatSession(gen, SamplingOptions(temperature=0.0, max_tokens=6))
    a = session.ask("1 + 1 = ?")
    b = session.ask("2 + 2 = ?")
    assert session.turns == 2
    ids = tok.encode(user_turn("1 + 1 = ?")) + a.tokens
    if a.stop_reason != "stop":
        ids += tok.encode("\n\n")  # the session closes an unfinished turn with a blank line
    ids += tok.encode(user_turn("2 + 2 = ?"))
    with torch.no_grad():
        ref_logits, _ = gen.model.forward_rnn(torch.tensor([ids]))
    first = int(ref_logits[0, -1].argmax())
    assert b.tokens[0] == first
    session.reset()
    assert session.state is None


def test_batched_generation_matches_one_by_one(gen):
    prompts = [user_turn(q) for q in ("1 + 1 = ?", "What is 3 plus 4?", "12 - 5 = ?", "九加三等于多少？", "2+2=?")]
    batch = gen.generate_batch(prompts, SamplingOptions(temperature=0.0, max_tokens=6), batch_size=2)
    for p, b in zip(prompts, batch):
        single = gen.generate(p, opts=SamplingOptions(temperature=0.0, max_tokens=6))
        assert b.tokens == single.tokens
        assert b.text == single.text


def test_state_batch_select_and_cat(gen):
    sb = StateBatch.probe(gen.model)
    assert sb is not None
    _, state = gen.forward([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    one = sb.select(state, torch.tensor([1]))
    _, ref = gen.forward([[4, 5, 6]])
    for x, y in zip(one, ref):
        for a, b in zip(x, y):
            assert torch.allclose(a, b, atol=1e-5)
    both = sb.cat([one, ref])
    assert both[0][1].shape[0] == 2


# ---------------------------------------------------------------- sampling

def test_greedy_follows_the_models_arg_max(gen, tok):
    """Temperature 0 picks, at every step, the arg-max of the whole-sequence forward's logits,
    whatever the sampling seed."""
    prompt = user_turn("5 + 5 = ?")
    a = gen.generate(prompt, opts=GREEDY, generator=torch.Generator().manual_seed(1))
    b = gen.generate(prompt, opts=GREEDY, generator=torch.Generator().manual_seed(2))
    assert a.tokens == b.tokens and len(a.tokens) == 10
    ids = tok.encode(prompt) + a.tokens
    with torch.no_grad():
        logits = gen.model(torch.tensor([ids]))[0]  # (T, V)
    n = len(ids) - len(a.tokens)
    assert logits[n - 1:-1].argmax(-1).tolist() == a.tokens


def test_top_k_1_equals_greedy(gen):
    greedy = gen.generate(user_turn("8 - 3 = ?"), opts=GREEDY)
    k1 = gen.generate(user_turn("8 - 3 = ?"), opts=SamplingOptions(temperature=1.5, top_p=1.0, top_k=1,
                                                                    max_tokens=10),
                      generator=torch.Generator().manual_seed(3))
    assert k1.tokens == greedy.tokens
    logits = torch.randn(16, 1000)
    out = sample_logits(logits, SamplingOptions(temperature=1.0, top_p=1.0, top_k=1))
    assert torch.equal(out, logits.argmax(-1))


def _freqs(logits, opts, n=4000):
    g = torch.Generator().manual_seed(0)
    out = sample_logits(logits.expand(n, -1), opts, g)
    return torch.bincount(out, minlength=logits.shape[-1]).float() / n


def test_top_p_and_temperature_shape_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    f = _freqs(logits, SamplingOptions(temperature=1.0, top_p=0.7))
    assert f[2] == 0 and f[3] == 0 and abs(f[0] - 0.5 / 0.8) < 0.04
    f = _freqs(logits, SamplingOptions(temperature=1.0, top_p=0.0))
    assert f[0] == 1.0
    f = _freqs(logits, SamplingOptions(temperature=1.0, top_p=1.0, top_k=2))
    assert f[2] == 0 and f[3] == 0 and f[1] > 0.3
    hot = _freqs(logits, SamplingOptions(temperature=2.0, top_p=1.0))
    cold = _freqs(logits, SamplingOptions(temperature=0.5, top_p=1.0))
    plain = _freqs(logits, SamplingOptions(temperature=1.0, top_p=1.0))
    assert cold[0] > plain[0] + 0.1 > hot[0] + 0.2
    assert abs(plain[1] - 0.3) < 0.04


def test_penalties_lower_repeated_tokens(tok):
    opts = SamplingOptions(alpha_presence=0.4, alpha_frequency=0.3, alpha_decay=0.5)
    word = tok.encode(" hello")[0]
    digit = tok.encode("7")[0]
    pen = Penalty(1, 65536, opts, tok, "cpu")
    logits = torch.zeros(1, 65536)
    pen.update([word])
    pen.update([word])  # count: 1 * 0.5 + 1 = 1.5
    pen.update([digit])  # digits are not penalised; count of word decays to 0.75
    out = pen.apply(logits)
    assert out[0, word].item() == pytest.approx(-(0.4 + 0.3 * 0.75))
    assert out[0, digit].item() == 0.0
    p0, p1 = torch.softmax(logits[0], -1)[word], torch.softmax(out[0], -1)[word]
    assert p1 < p0


def test_frequency_penalty_in_generation_avoids_repeats(tok):
    # a model that always wants the same word: with a strong penalty it moves on
    word = tok.encode(" hello")[0]
    model = ScriptedModel([word] * 50, prompt_len=1)
    g = Generator(model, tok)
    plain = g.generate([1], opts=SamplingOptions(temperature=0.0, max_tokens=5))
    assert plain.tokens == [word] * 5
    pen = g.generate([1], opts=SamplingOptions(temperature=0.0, max_tokens=5, alpha_presence=20.0))
    assert pen.tokens[0] == word and word not in pen.tokens[1:]


# ---------------------------------------------------------------- stops and decoding

def test_stops_at_blank_line_and_keeps_it_in_the_state(tok):
    script = tok.encode(" 12 + 7 = 19\n\nUser: more")
    model = ScriptedModel(script, prompt_len=3)
    g = Generator(model, tok)
    seen = []
    out = g.generate([5, 6, 7], opts=SamplingOptions(temperature=0.0, max_tokens=50), on_text=seen.append)
    assert out.text == " 12 + 7 = 19"
    assert out.stop_reason == "stop"
    assert "".join(seen) == " 12 + 7 = 19"  # the stop text is never shown
    assert out.tokens == tok.encode(" 12 + 7 = 19\n\n")
    assert int(out.state[0, 0]) == 3 + len(out.tokens)  # every generated token was fed


def test_stops_at_token_0_and_at_max_tokens(tok):
    script = tok.encode(" 5") + [0] + tok.encode(" more")
    g = Generator(ScriptedModel(script, prompt_len=1), tok)
    out = g.generate([9], opts=SamplingOptions(temperature=0.0, max_tokens=50))
    assert out.stop_reason == "end_of_doc" and out.text == " 5"
    assert int(out.state[0, 0]) == 2  # token 0 is not fed
    out = g.generate([9], opts=SamplingOptions(temperature=0.0, max_tokens=1))
    assert out.stop_reason == "length" and out.tokens == script[:1]


def test_partial_utf8_tokens_wait_for_the_whole_character(tok):
    byte_ids = [tok.table.index(bytes([b])) for b in "你好".encode("utf-8")]
    stream = TextStream(tok)
    pieces = [stream.push(t) for t in byte_ids]
    assert pieces == ["", "", "你", "", "", "好"]
    assert stream.flush() == ""
    stream = TextStream(tok)
    assert stream.push(byte_ids[0]) == "" and stream.flush() == "\ufffd"

    class IdsOnly:  # a tokenizer without decode_bytes
        decode = staticmethod(tok.decode)

    stream = TextStream(IdsOnly())
    assert [stream.push(t) for t in byte_ids[:3]] == ["", "", "你"]

    g = Generator(ScriptedModel(byte_ids + tok.encode("\n\n"), prompt_len=1), tok)
    streamed = []
    out = g.generate([9], opts=SamplingOptions(temperature=0.0, max_tokens=20), on_text=streamed.append)
    assert out.text == "你好" and "".join(streamed) == "你好"
    assert all("\ufffd" not in s for s in streamed)


# ---------------------------------------------------------------- chat.py

@pytest.mark.slow
def test_chat_prompt_cli(ckpt, cpu_env):
    r = subprocess.run([sys.executable, str(REPO / "RWKV-v7" / "chat.py"), str(ckpt), "--prompt", "12 + 7 = ?",
                        "--max_tokens", "5", "--device", "cpu", "--seed", "1"],
                       capture_output=True, text=True, env=cpu_env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    r = subprocess.run([sys.executable, str(REPO / "RWKV-v7" / "chat.py"), str(ckpt.parent / "nope.pth"),
                        "--prompt", "1"], capture_output=True, text=True, env=cpu_env, timeout=120)
    assert r.returncode == 2 and "no such checkpoint" in r.stderr and "rwkv-final.pth" in r.stderr


def test_chat_with_questions_piped_in_shows_them_in_the_transcript(ckpt, monkeypatch, capsys):
    import io

    from rwkvlm.infer.chat import chat_main

    monkeypatch.setattr(sys, "stdin", io.StringIO("12 + 7 = ?\n+reset\nAnd 3 + 4?\n"))
    assert chat_main([str(ckpt), "--max_tokens", "3", "--temperature", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "User: 12 + 7 = ?\n\nAssistant:" in out and "User: +reset\n(conversation reset)" in out, out
    assert "User: And 3 + 4?\n\nAssistant:" in out and out.count("Assistant:") == 2, out
