"""Chat with a checkpoint: the `User: ...\n\nAssistant:` format, the state carried across turns.

`python chat.py rwkv-final.pth` talks; `--prompt "12 + 7 = ?"` answers once and
exits (for scripts). Given a PROJ_DIR it talks with the newest weights there
(rwkv-final.pth, rwkv-latest.pth or rwkv-N.pth), saying which on stderr. Generation itself lives in rwkvlm.infer.generate.
A char-level model (vocab.json in its PROJ_DIR) is tokenized with its own vocabulary; `--raw`
continues a text as it is, without the User:/Assistant: turns (for models trained on plain text).
"""
from __future__ import annotations

import argparse
import sys

import torch

from rwkvlm.data.arithmetic import format_prompt
from rwkvlm.errors import UserError
from rwkvlm.infer.generate import (STOP_TEXT, Generation, Generator, SamplingOptions, check_options, load_model,
                       resolve_device, resolve_dtype)

def clean_message(msg: str) -> str:
    """A user message as one turn: no blank lines inside (they separate turns), `\\n` typed as text allowed."""
    msg = msg.replace("\r\n", "\n").replace("\\n", "\n").strip()
    while "\n\n" in msg:
        msg = msg.replace("\n\n", "\n")
    return msg


def user_turn(msg: str) -> str:
    return format_prompt(clean_message(msg))


class ChatSession:
    """A conversation whose state is carried from turn to turn."""

    def __init__(self, gen: Generator, opts: SamplingOptions, generator: torch.Generator | None = None):
        self.gen = gen
        self.opts = opts
        self.generator = generator
        self.reset()

    def reset(self):
        self.state = None
        self.turns = 0

    def ask(self, msg: str, on_text=None) -> Generation:
        g = self.gen.generate(user_turn(msg), self.state, self.opts, generator=self.generator, on_text=on_text)
        state = g.state
        if g.stop_reason != "stop":  # close the turn so the next one starts after a blank line
            _, state = self.gen.prefill(STOP_TEXT, state)
        self.state = state
        self.turns += 1
        return g


_CHAT_HELP = """commands: +reset (forget the conversation), +exit (or Ctrl-D) to quit, +help.
Type `\\n` for a line break inside a message."""


def _chat_parser():
    p = argparse.ArgumentParser(
        prog="chat.py",
        description="Chat with a pre-trained RWKV-7 checkpoint (User: ... / Assistant: ... format).",
    )
    p.add_argument("model", help="checkpoint file, e.g. train_temp/out/L12-D768-x070/rwkv-final.pth, or a "
                                 "PROJ_DIR (its newest weights: rwkv-final.pth, rwkv-latest.pth or rwkv-N.pth, "
                                 "by training progress) or an exact-resume state resume/step-N/")
    p.add_argument("--prompt", default=None, help="answer this one question, print the reply and exit")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top_p", type=float, default=0.3, help="nucleus sampling (default 0.3)")
    p.add_argument("--top_k", type=int, default=0, help="keep the k most likely tokens, 0 = off (default 0)")
    p.add_argument("--alpha_presence", type=float, default=None, help="presence penalty (default 0.5; 0 with --raw)")
    p.add_argument("--alpha_frequency", type=float, default=None,
                   help="frequency penalty (default 0.5; 0 with --raw)")
    p.add_argument("--alpha_decay", type=float, default=0.996, help="penalty decay per token (default 0.996)")
    p.add_argument("--max_tokens", type=int, default=500, help="longest reply in tokens (default 500)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on CUDA), fp32 or bf16")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--raw", action="store_true",
                   help="continue the prompt as plain text (no User:/Assistant: turns, no stop at a blank line; "
                        "each prompt starts afresh) for --max_tokens tokens: for models trained on plain text")
    return p


def _penalty(value, raw: bool) -> float:
    """A penalty flag's value: as given, else 0.5 in the chat format, 0 with --raw (plain text
    repeats its characters and words)."""
    return value if value is not None else (0.0 if raw else 0.5)


def chat_main(argv=None) -> int:
    args = _chat_parser().parse_args(argv)
    opts = SamplingOptions(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                           alpha_presence=_penalty(args.alpha_presence, args.raw),
                           alpha_frequency=_penalty(args.alpha_frequency, args.raw),
                           alpha_decay=args.alpha_decay, max_tokens=args.max_tokens)
    check_options(opts)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(args.seed)
        torch.manual_seed(args.seed)
    if args.raw:
        opts.stop = None
    model = load_model(args.model, device, dtype)
    gen = Generator(model)
    session = ChatSession(gen, opts, generator)

    def answer(msg, on_text=None):
        if args.raw:
            return gen.generate(msg.replace("\\n", "\n"), None, opts, generator=generator, on_text=on_text)
        try:
            return session.ask(msg, on_text=on_text)
        except UserError as e:
            if getattr(model, "tokenizer", None) is None:
                raise
            raise UserError(f"{e} (The User:/Assistant: turns are text too; for a char-level model trained on "
                            f"plain text, continue a text with --raw.)") from None

    if args.prompt is not None:
        g = answer(args.prompt)
        print(g.text if args.raw else g.text.strip(), flush=True)
        return 0

    cfg = model.cfg if hasattr(model, "cfg") else None
    shape = f" (L{cfg.n_layer} D{cfg.n_embd})" if cfg is not None and hasattr(cfg, "n_layer") else ""
    print(f"loaded {getattr(model, 'source_path', args.model)}{shape} on {device} {str(dtype).replace('torch.', '')}")
    print(_CHAT_HELP + "\n")
    while True:
        try:
            msg = input("User: ")
        except EOFError:
            print()
            return 0
        if not sys.stdin.isatty():  # questions piped in: the transcript shows them as typed
            print(msg)
        cmd = msg.strip()
        if not cmd:
            continue
        if cmd in ("+exit", "+quit", "+q"):
            return 0
        if cmd == "+reset":
            session.reset()
            print("(conversation reset)\n")
            continue
        if cmd == "+help":
            print(_CHAT_HELP + "\n")
            continue
        if cmd.startswith("+"):
            print(f"unknown command {cmd!r}. " + _CHAT_HELP + "\n")
            continue
        print("" if args.raw else "\nAssistant:", end="", flush=True)
        try:
            g = answer(msg, on_text=lambda piece: print(piece, end="", flush=True))
        except UserError as e:  # e.g. a character a char-level model does not know: the chat goes on
            print(f"\n({e})\n")
            continue
        note = {"length": f"  [stopped at --max_tokens {opts.max_tokens}]", "end_of_doc": ""}.get(g.stop_reason, "")
        print(note + "\n", flush=True)


if __name__ == "__main__":
    from rwkvlm.errors import run_cli

    sys.exit(run_cli(chat_main))
