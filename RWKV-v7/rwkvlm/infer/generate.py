"""Load a trained checkpoint and generate text with it, carrying the RNN state.

Everything runs on `RWKV7.forward_rnn(idx, state) -> (logits, state)`: a
prompt is fed once (prefill), then tokens are sampled one at a time, each fed
back with the state from the step before. The state after a reply (its
trailing blank line included) continues the conversation, so a chat never
re-reads its history.

Sampling follows the options RWKV users know from the `rwkv` pip package:
`temperature` (0 = greedy), `top_p`, `top_k`, `alpha_presence`,
`alpha_frequency` and `alpha_decay` (each step the token counts are multiplied
by it). Order: penalties on the logits, softmax, top-p then top-k cut on the
plain probabilities, then the temperature as `p ** (1 / temperature)`.
Tokens made only of spaces, tabs and ASCII digits are not penalised (a number
may repeat a digit, and arithmetic answers are made of them).

Text is decoded incrementally: a token may hold only part of a UTF-8
character, so its bytes wait until the character is complete.

The tokenizer: the World vocabulary, or a char-level model's own (PROJ_DIR/vocab.json beside
the weights, rwkvlm.data.charvocab), which load_model attaches to the model as `model.tokenizer`
and Generator uses when given none. A character vocabulary has no end-of-document token, so
generation then stops at the stop text or max_tokens only (id 0 is a character).
"""
from __future__ import annotations

import codecs
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rwkvlm.errors import UserError

STOP_TEXT = "\n\n"  # a blank line ends a turn in the `User: ...\n\nAssistant: ...` format
END_OF_DOC = 0
HEAD_SIZE = 64
_PENALTY_EXEMPT_CHARS = " \t0123456789"


# ---------------------------------------------------------------- loading

def resolve_device(device: str | None = "auto") -> torch.device:
    """'auto' (cuda when available), 'cpu', 'cuda' or 'cuda:N' -> torch.device."""
    name = (device or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "gpu":
        name = "cuda"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA GPU; "
                            f"use --device cpu, or install a CUDA build of torch.")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise UserError(f"--device {device!r} is not a device; use cpu, cuda (or cuda:N) or auto.")


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """'auto' -> fp32 on CPU, bf16 on CUDA; or 'fp32' / 'bf16' / 'fp16'."""
    name = (dtype or "auto").strip().lower()
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise UserError(f"--dtype {dtype!r} is not supported; use auto, fp32 or bf16.")
    return table[name]


def _no_such_checkpoint(path: Path) -> UserError:
    hint = ""
    parent = path.parent if str(path.parent) else Path(".")
    if parent.is_dir():
        found = sorted(p.name for p in parent.glob("rwkv-*.pth"))
        if found:
            shown = ", ".join(found[-6:])
            hint = f" {parent} holds: {shown}."
    return UserError(
        f"no such checkpoint {path}; checkpoints are in the run's PROJ_DIR, which the scripts give relative to "
        f"RWKV-v7/train_temp (PROJ_DIR=out/L12-D768-x070 is RWKV-v7/train_temp/out/L12-D768-x070/): "
        f"rwkv-final.pth when training finished, rwkv-N.pth after each mini-epoch, rwkv-latest.pth at every "
        f"exact-resume save; pass the PROJ_DIR itself to use its newest weights.{hint}"
    )


def config_from_state_dict(sd: dict, path=None):
    """The model config read off the tensor shapes: an x070 ModelConfig (n_layer, n_embd, vocab_size,
    head_size, the LoRA sizes, whether layer 0 holds att.v0/v1/v2) or an x060 Rwkv6Config
    (rwkvlm.model.config_from_state_dict), which refuses a file that is not a consistent state dict
    of either with a UserError naming the key and shape."""
    from rwkvlm.model import config_from_state_dict as read_config

    return read_config(sd, path)


def _note(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)  # stderr: `chat.py --prompt` prints only the reply on stdout


def load_model(path, device="auto", dtype="auto", log=_note):
    """Build RWKV7 (or RWKV6) from a rwkv-*.pth state dict; fp32 on CPU, bf16 (or fp32) on CUDA.

    `path` may also be a PROJ_DIR (its newest weights) or an exact-resume state (resume/step-N/
    or a file in it: that state's weights); `log` gets the line saying which file was picked
    (checkpoint.find_weights). Returns the model in eval mode with gradients off, on the device.
    """
    from rwkvlm.rundir.find import find_weights, load_tool_weights
    from rwkvlm.rundir.weights import CorruptCheckpoint, check_weights_fit
    from rwkvlm.model import build_model

    path, note = find_weights(path)
    if note:
        log(note)
    if not path.exists():
        raise _no_such_checkpoint(path)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dt = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, dev)
    try:
        sd = load_tool_weights(path)
    except CorruptCheckpoint as e:  # its message says what is wrong and what to do (checkpoint.not_plain_weights)
        raise UserError(str(e)) from None
    cfg = config_from_state_dict(sd, path)
    model = build_model(cfg)
    check_weights_fit(sd, model, path)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    del sd
    model.to(device=dev, dtype=dt)
    model.eval()
    model.requires_grad_(False)
    model.source_path = str(path)
    model.tokenizer = model_tokenizer(path, cfg.vocab_size, log)
    return model


def model_tokenizer(path, vocab_size: int, log=_note):
    """The char-level vocabulary of the weights at `path` (vocab.json in its PROJ_DIR), else None
    (the World vocabulary). UserError when vocab.json does not fit the model's vocab_size."""
    from rwkvlm.data.charvocab import CharVocab
    from rwkvlm.rundir.find import vocab_file_for

    f = vocab_file_for(path)
    if f is None:
        return None
    vocab = CharVocab.read(f)
    if vocab.vocab_size > vocab_size:
        raise UserError(f"{f} lists {vocab.vocab_size} characters, but the model {path} has a vocabulary of "
                        f"{vocab_size} tokens: the vocab.json beside it belongs to another model. Move it away, "
                        f"or test the weights of the model it belongs to.")
    log(f"{path}: a char-level model; its vocabulary is {f} ({vocab.vocab_size} characters)")
    return vocab


def model_device(model) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------- decoding text

class TextStream:
    """Token ids in, text out: bytes of a partial UTF-8 character wait for the rest.

    Uses the tokenizer's `decode_bytes` when it has one (the World tokenizer
    does); otherwise it holds back ids whose text ends in U+FFFD until they
    decode cleanly (at most 4 ids).
    """

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self._decode_bytes = getattr(tokenizer, "decode_bytes", None)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending: list[int] = []

    def push(self, token: int) -> str:
        """The text completed by this token ('' while a character is still partial)."""
        if self._decode_bytes is not None:
            return self._utf8.decode(self._decode_bytes([int(token)]))
        self._pending.append(int(token))
        text = self._tok.decode(self._pending)
        if text.endswith("\ufffd") and len(self._pending) < 4:
            return ""
        self._pending = []
        return text

    def flush(self) -> str:
        """Whatever is left (an unfinished character becomes U+FFFD)."""
        if self._decode_bytes is not None:
            return self._utf8.decode(b"", final=True)
        text = self._tok.decode(self._pending) if self._pending else ""
        self._pending = []
        return text


def _held_back(text: str, stop: str) -> int:
    """Length of the longest end of `text` that could start `stop` (not shown yet)."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if stop.startswith(text[-n:]):
            return n
    return 0


# ---------------------------------------------------------------- sampling

@dataclass
class SamplingOptions:
    """How to pick each next token (rwkv pip package meanings)."""

    temperature: float = 1.0  # 0 = greedy (arg-max)
    top_p: float = 0.3  # keep the smallest set of tokens whose probability reaches top_p (>= 1: all)
    top_k: int = 0  # keep the k most likely tokens (0: all)
    alpha_presence: float = 0.0  # subtracted once from the logit of every token already generated
    alpha_frequency: float = 0.0  # subtracted per (decayed) occurrence
    alpha_decay: float = 0.996  # token counts are multiplied by this each step
    max_tokens: int = 500
    stop: str | None = STOP_TEXT  # stop when the generated text contains this
    stop_at_end_of_doc: bool = True  # stop when token 0 is picked
    ban_tokens: tuple = ()

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    @property
    def penalised(self) -> bool:
        return self.alpha_presence != 0 or self.alpha_frequency != 0


def check_options(opts: SamplingOptions) -> None:
    """UserError for values that make no sense."""
    if opts.temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0 = greedy), found {opts.temperature}")
    if opts.top_p < 0:
        raise UserError(f"--top_p must be in [0, 1], found {opts.top_p}")
    if opts.top_k < 0:
        raise UserError(f"--top_k must be >= 0 (0 = off), found {opts.top_k}")
    if opts.max_tokens < 1:
        raise UserError(f"--max_tokens must be at least 1, found {opts.max_tokens}")
    if not 0 < opts.alpha_decay <= 1:
        raise UserError(f"--alpha_decay must be in (0, 1], found {opts.alpha_decay}")


def sample_logits(logits: torch.Tensor, opts: SamplingOptions, generator: torch.Generator | None = None,
                  ) -> torch.Tensor:
    """Next tokens for logits (B, V) (or (V,)): LongTensor (B,) (or a 0-d tensor)."""
    squeeze = logits.dim() == 1
    x = logits.float().reshape(-1, logits.shape[-1])
    if opts.ban_tokens:
        x = x.clone()
        x[:, list(opts.ban_tokens)] = float("-inf")
    if opts.greedy:
        out = x.argmax(dim=-1)
        return out[0] if squeeze else out
    probs = torch.softmax(x, dim=-1)
    vocab = probs.shape[-1]
    if opts.top_p < 1:
        sorted_p = torch.sort(probs, dim=-1, descending=True).values
        cum = torch.cumsum(sorted_p, dim=-1)
        # first position where the running total reaches top_p (the last one if rounding never gets there)
        idx = torch.clamp((cum < opts.top_p * cum[:, -1:]).sum(dim=-1, keepdim=True), max=vocab - 1)
        cutoff = torch.gather(sorted_p, -1, idx)
        probs = torch.where(probs >= cutoff, probs, torch.zeros_like(probs))
    if 0 < opts.top_k < vocab:
        kth = torch.topk(probs, opts.top_k, dim=-1).values[:, -1:]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if opts.temperature != 1.0:
        logp = torch.where(probs > 0, torch.log(probs) / opts.temperature,
                           torch.full_like(probs, float("-inf")))
        probs = torch.softmax(logp, dim=-1)
    out = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return out[0] if squeeze else out


class Penalty:
    """Presence / frequency penalties with decaying counts, for a batch of B sequences."""

    def __init__(self, batch: int, vocab: int, opts: SamplingOptions, tokenizer, device):
        self.opts = opts
        self.counts = torch.zeros(batch, vocab, dtype=torch.float32, device=device)
        self.seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
        self._tok = tokenizer
        self._exempt: dict[int, bool] = {}

    def exempt(self, token: int) -> bool:
        if token not in self._exempt:
            try:
                text = self._tok.decode([token])
            except Exception:
                text = "x"
            self._exempt[token] = text != "" and text.strip(_PENALTY_EXEMPT_CHARS) == ""
        return self._exempt[token]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) minus alpha_presence (seen tokens) and alpha_frequency * count."""
        o = self.opts
        return logits.float() - self.seen.float() * o.alpha_presence - self.counts * o.alpha_frequency

    def update(self, tokens) -> None:
        """Decay all counts, then count the tokens just picked (one per row)."""
        self.counts.mul_(self.opts.alpha_decay)
        pairs = [(row, int(t)) for row, t in enumerate(tokens) if not self.exempt(int(t))]
        if pairs:
            rows, cols = torch.tensor(pairs, dtype=torch.long, device=self.counts.device).unbind(1)
            self.counts[rows, cols] += 1.0
            self.seen[rows, cols] = True

    def select(self, rows: torch.Tensor) -> None:
        self.counts = self.counts[rows]
        self.seen = self.seen[rows]


# ---------------------------------------------------------------- the state as a batch

def _leaves(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _leaves(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _leaves(x)


def _rebuild(obj, fn):
    """Copy of the nested list/tuple/dict `obj` with every tensor leaf replaced by fn(leaf, i)."""
    counter = iter(range(10**9))

    def walk(x):
        if isinstance(x, torch.Tensor):
            return fn(x, next(counter))
        if isinstance(x, tuple) and hasattr(x, "_fields"):
            return type(x)(*[walk(v) for v in x])
        if isinstance(x, (list, tuple)):
            return type(x)(walk(v) for v in x)
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        return x

    return walk(obj)


class StateBatch:
    """Select rows of / concatenate RNN states, whatever their layout.

    The batch dimension of every tensor in the state is found once by running
    forward_rnn with batch sizes 1 and 2 and comparing the shapes.
    """

    def __init__(self, dims: list[int]):
        self.dims = dims

    @classmethod
    def probe(cls, model) -> "StateBatch | None":
        dev = model_device(model)
        with torch.no_grad():
            _, s1 = model.forward_rnn(torch.zeros(1, 1, dtype=torch.long, device=dev), None)
            _, s2 = model.forward_rnn(torch.zeros(2, 1, dtype=torch.long, device=dev), None)
        l1, l2 = list(_leaves(s1)), list(_leaves(s2))
        if not l1 or len(l1) != len(l2):
            return None
        dims = []
        for a, b in zip(l1, l2):
            if a.dim() != b.dim():
                return None
            diff = [d for d in range(a.dim()) if a.shape[d] != b.shape[d]]
            if len(diff) != 1 or a.shape[diff[0]] != 1 or b.shape[diff[0]] != 2:
                return None
            dims.append(diff[0])
        return cls(dims)

    def select(self, state, rows: torch.Tensor):
        return _rebuild(state, lambda t, i: t.index_select(self.dims[i], rows.to(t.device)))

    def cat(self, states: list):
        if len(states) == 1:
            return states[0]
        flat = [list(_leaves(s)) for s in states]
        return _rebuild(states[0], lambda t, i: torch.cat([f[i] for f in flat], dim=self.dims[i]))


# ---------------------------------------------------------------- generation

@dataclass
class Generation:
    """One generated reply."""

    text: str  # up to (not including) the stop text
    tokens: list  # the generated ids (the stop token included)
    stop_reason: str  # "stop" (blank line), "end_of_doc" (token 0) or "length"
    state: object = None  # after the last generated token was fed (token 0 is never fed)
    logits: torch.Tensor | None = None  # next-token logits (V,) for that state
    raw_text: str = ""  # everything decoded, past the stop text too
    seconds: float = 0.0


@dataclass
class _Row:
    stream: TextStream
    text: str = ""
    tokens: list = field(default_factory=list)
    done: str = ""


def _check_fits(model, tokenizer) -> None:
    """UserError when the tokenizer's vocabulary is larger than the model's (its ids would not fit
    the embedding): a char-level model given the World tokenizer."""
    size = getattr(getattr(model, "cfg", None), "vocab_size", None)
    tok_size = getattr(tokenizer, "vocab_size", None)
    if isinstance(size, int) and isinstance(tok_size, int) and tok_size > size:
        own = getattr(model, "tokenizer", None)
        what = (f"a char-level model with its own vocabulary of {own.vocab_size} characters (vocab.json)"
                if own is not None else f"a model with a vocabulary of {size} tokens")
        raise UserError(f"{getattr(model, 'source_path', 'the model')} is {what}, but this tool tokenizes with "
                        f"the {getattr(tokenizer, 'vocab_name', 'given')} vocabulary of {tok_size} tokens, which "
                        f"needs a model with the World vocabulary. Give no tokenizer (Generator(model)): chat.py, "
                        f"evaluate.py and the Generator then use the vocab.json beside the weights.")


class Generator:
    """Prefill and token-by-token generation on top of model.forward_rnn."""

    def __init__(self, model, tokenizer=None, chunk_tokens: int | None = None):
        if tokenizer is None:
            tokenizer = getattr(model, "tokenizer", None)  # a char-level model's (load_model)
        if tokenizer is None:
            from rwkvlm.data.tokenizer import get_tokenizer

            tokenizer = get_tokenizer()
        _check_fits(model, tokenizer)
        self.model = model
        self.tokenizer = tokenizer
        self.end_of_doc = getattr(tokenizer, "end_of_doc", END_OF_DOC)  # None: a character vocabulary
        self.device = model_device(model)
        # tokens per forward_rnn call when prefilling (bounds the (B, T, V) logits)
        self.chunk_tokens = chunk_tokens or (8192 if self.device.type == "cuda" else 2048)
        self._state_batch = False  # not probed yet

    @property
    def state_batch(self) -> StateBatch | None:
        if self._state_batch is False:
            try:
                self._state_batch = StateBatch.probe(self.model)
            except Exception:
                self._state_batch = None
        return self._state_batch

    def encode(self, text) -> list:
        return list(self.tokenizer.encode(text)) if isinstance(text, str) else [int(t) for t in text]

    @torch.no_grad()
    def forward(self, ids, state=None):
        """Feed ids (B, T) (list of equal-length lists or LongTensor); -> (last logits (B, V) fp32, state)."""
        idx = ids if isinstance(ids, torch.Tensor) else torch.tensor(ids, dtype=torch.long)
        if idx.dim() == 1:
            idx = idx[None]
        idx = idx.to(self.device)
        B, T = idx.shape
        if T == 0:
            raise ValueError("forward() needs at least one token")
        step = max(1, self.chunk_tokens // B)
        logits = None
        for t0 in range(0, T, step):
            logits, state = self.model.forward_rnn(idx[:, t0:t0 + step], state, last_only=True)
        return logits[:, -1].float(), state

    def prefill(self, prompt, state=None):
        """Feed one prompt (text or ids); -> (next-token logits (V,), state)."""
        ids = self.encode(prompt)
        logits, state = self.forward([ids], state)
        return logits[0], state

    @torch.no_grad()
    def generate(self, prompt="", state=None, opts: SamplingOptions | None = None, logits=None,
                 generator: torch.Generator | None = None, on_text=None) -> Generation:
        """Continue `state` with `prompt`, then sample until the stop text, token 0 or max_tokens.

        `logits` (V,) may stand in for an empty prompt (the logits that came with `state`).
        `on_text(piece)` receives the reply as it is generated (never the stop text).
        """
        opts = opts or SamplingOptions()
        t0 = time.perf_counter()
        ids = self.encode(prompt)
        if ids:
            logits, state = self.prefill(ids, state)
        elif logits is None:
            raise ValueError("generate() needs a prompt, or the logits that belong to the state")
        logits = logits.float().reshape(1, -1)
        penalty = Penalty(1, logits.shape[-1], opts, self.tokenizer, logits.device) if opts.penalised else None
        stream = TextStream(self.tokenizer)
        text, tokens, shown, reason = "", [], 0, "length"
        for _ in range(opts.max_tokens):
            scores = penalty.apply(logits) if penalty is not None else logits
            token = int(sample_logits(scores, opts, generator)[0])
            if token == self.end_of_doc and opts.stop_at_end_of_doc:
                tokens.append(token)
                reason = "end_of_doc"
                break
            tokens.append(token)
            if penalty is not None:
                penalty.update([token])
            out, state = self.forward([[token]], state)
            logits = out
            text += stream.push(token)
            if opts.stop and opts.stop in text:
                reason = "stop"
                break
            if on_text is not None:
                visible = len(text) - (_held_back(text, opts.stop) if opts.stop else 0)
                if visible > shown:
                    on_text(text[shown:visible])
                    shown = visible
        text += stream.flush()
        reply = text.split(opts.stop, 1)[0] if opts.stop else text
        if on_text is not None and len(reply) > shown:
            on_text(reply[shown:])
        return Generation(text=reply, tokens=tokens, stop_reason=reason, state=state, logits=logits[0],
                          raw_text=text, seconds=time.perf_counter() - t0)

    @torch.no_grad()
    def generate_batch(self, prompts: list, opts: SamplingOptions | None = None, batch_size: int = 512,
                       prefix: list | None = None, generator: torch.Generator | None = None) -> list:
        """Replies (Generation, without state) for many independent prompts, batched.

        Prompts of equal token length are prefilled together; when the state
        layout allows, all rows then decode as one batch (finished rows are
        dropped as they stop), else each group decodes on its own.
        """
        opts = opts or SamplingOptions(temperature=0.0)
        encoded = [list(prefix or []) + self.encode(p) for p in prompts]
        if any(not ids for ids in encoded):
            raise ValueError("every prompt needs at least one token")
        results: list = [None] * len(encoded)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        groups: dict[int, list[int]] = {}
        for i in order:
            groups.setdefault(len(encoded[i]), []).append(i)
        sb = self.state_batch if len(groups) > 1 else None
        pending_rows, pending_logits, pending_states = [], [], []

        def flush():
            if pending_rows:
                logits = torch.cat(pending_logits, dim=0)
                state = sb.cat(pending_states) if sb is not None else pending_states[0]
                for i, g in zip(pending_rows, self._decode(logits, state, opts, generator)):
                    results[i] = g
                pending_rows.clear(), pending_logits.clear(), pending_states.clear()

        for length, rows in groups.items():
            for b0 in range(0, len(rows), batch_size):
                part = rows[b0:b0 + batch_size]
                if sb is not None and len(pending_rows) + len(part) > batch_size:
                    flush()
                logits, state = self.forward([encoded[i] for i in part], None)
                pending_rows.extend(part), pending_logits.append(logits), pending_states.append(state)
                if sb is None:
                    flush()
        flush()
        return results

    def _decode(self, logits, state, opts: SamplingOptions, generator) -> list:
        """Sample rows of a batch until each stops; -> Generation per row (in order)."""
        t0 = time.perf_counter()
        B = logits.shape[0]
        rows = [_Row(TextStream(self.tokenizer)) for _ in range(B)]
        active = list(range(B))  # original row of each live batch position
        penalty = Penalty(B, logits.shape[-1], opts, self.tokenizer, logits.device) if opts.penalised else None
        sb = self.state_batch
        for _ in range(opts.max_tokens):
            scores = penalty.apply(logits) if penalty is not None else logits
            picked = sample_logits(scores, opts, generator).tolist()
            if penalty is not None:
                penalty.update(picked)
            keep = []
            for pos, (r, tok) in enumerate(zip(active, picked)):
                row = rows[r]
                if row.done:
                    continue
                row.tokens.append(tok)
                if tok == self.end_of_doc and opts.stop_at_end_of_doc:
                    row.done = "end_of_doc"
                    continue
                row.text += row.stream.push(tok)
                if opts.stop and opts.stop in row.text:
                    row.done = "stop"
                    continue
                keep.append(pos)
            if not keep:
                break
            if sb is not None and len(keep) < len(active):
                sel = torch.tensor(keep, dtype=torch.long, device=logits.device)
                state = sb.select(state, sel)
                if penalty is not None:
                    penalty.select(sel)
                active = [active[p] for p in keep]
                picked = [picked[p] for p in keep]
            logits, state = self.forward([[t] for t in picked], state)
        out = []
        seconds = (time.perf_counter() - t0) / max(1, B)
        for row in rows:
            text = row.text + row.stream.flush()
            reply = text.split(opts.stop, 1)[0] if opts.stop else text
            out.append(Generation(text=reply, tokens=row.tokens, stop_reason=row.done or "length",
                                  raw_text=text, seconds=seconds))
        return out
