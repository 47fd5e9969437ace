"""A char-level model on generated English-like text, trained on CPU through the tutorial's flow.

    python benchmarks/bench_char_model.py --out OUTDIR [--mb 3] [--steps 500] [--n_layer 4 --n_embd 128]

1. writes OUTDIR/data/train.txt (--mb MB) and heldout.txt (a tenth of it, another seed): sentences
   of a small English grammar (determiners, adjectives, nouns with plurals, verbs with tenses,
   names, prepositional phrases, subordinate clauses, dialogue, paragraphs, chapter headings) --
   public-domain-style prose without any downloaded text;
2. train.py --train_stage 1 --data_type utf-8 --vocab_size 0 (PROJ_DIR/vocab.json), then
   --train_stage 3 for --steps steps with a validation loss every --val_every steps on the
   held-out text (the default --val_tokens), on CPU in fp32;
3. plot_loss.py's figure (OUTDIR/loss.png), samples from the trained model (OUTDIR/samples.txt:
   rwkvlm.infer.generate with the vocab.json beside the weights) and OUTDIR/summary.json (the
   command, tokens/s, first and last losses, the validation losses).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "RWKV-v7" / "train_temp" / "train.py"

DET = "the a this that every no one my his her our their".split()
ADJ = ("old young quiet bright dark little great cold warm gentle silent golden grey green red proud poor rich "
       "strange lonely ancient broken distant heavy hollow kind wild weary wise narrow deep").split()
NOUN = ("king queen river house child dog horse city road tree stone door window garden forest mountain "
        "letter sword ship village castle bird wolf fire night morning field wall bridge lamp voice song "
        "stranger soldier farmer woman man boy girl friend brother sister mother father servant captain "
        "priest merchant book candle storm sea island valley tower shadow").split()
NAME = "John Mary Thomas Anne Edward Alice Henry Clara Robert Emma Walter Grace Arthur Lucy".split()
VERB_T = [("see", "saw"), ("find", "found"), ("take", "took"), ("love", "loved"), ("follow", "followed"),
          ("watch", "watched"), ("call", "called"), ("hold", "held"), ("keep", "kept"), ("leave", "left"),
          ("carry", "carried"), ("meet", "met"), ("hear", "heard"), ("open", "opened"), ("remember", "remembered")]
VERB_I = [("sleep", "slept"), ("wait", "waited"), ("sing", "sang"), ("run", "ran"), ("laugh", "laughed"),
          ("weep", "wept"), ("listen", "listened"), ("return", "returned"), ("fall", "fell"), ("rise", "rose")]
PREP = "in on under over near beyond across behind beside through toward".split()
ADV = ["slowly", "quietly", "suddenly", "often", "never", "always", "softly", "again", "at last", "once more"]
SAY = "said asked cried whispered answered replied".split()


def plural(n: str) -> str:
    if n in ("man", "woman"):
        return n[:-2] + "en"
    if n == "child":
        return "children"
    if n.endswith(("s", "sh", "ch", "x")):
        return n + "es"
    if n.endswith("y") and n[-2] not in "aeiou":
        return n[:-1] + "ies"
    if n == "wolf":
        return "wolves"
    return n + "s"


class Grammar:
    """Sentences of a small English grammar, from a seeded RNG."""

    def __init__(self, seed: int):
        self.r = random.Random(seed)

    def c(self, xs):
        return self.r.choice(xs)

    def np(self, obj=False):
        r = self.r.random()
        if r < 0.15:
            return self.c(NAME)
        if r < 0.25:
            return self.c(["him", "her", "them", "it"] if obj else ["he", "she", "they", "it"])
        noun = self.c(NOUN)
        det = self.c(DET)
        if self.r.random() < 0.3:
            noun, det = plural(noun), self.c(["the", "some", "many", "their", "all the", "two"])
        adj = f"{self.c(ADJ)} " if self.r.random() < 0.45 else ""
        out = f"{det} {adj}{noun}"
        if self.r.random() < 0.15:
            out += f" {self.c(PREP)} {self.c(['the', 'a'])} {self.c(NOUN)}"
        return out

    def vp(self):
        r = self.r.random()
        if r < 0.55:
            v = self.c(VERB_T)[1]
            out = f"{v} {self.np(obj=True)}"
        elif r < 0.8:
            out = self.c(VERB_I)[1]
        else:
            out = f"would {self.c(VERB_T)[0]} {self.np(obj=True)}"
        if self.r.random() < 0.3:
            out += f" {self.c(PREP)} {self.np(obj=True)}"
        if self.r.random() < 0.2:
            out += f" {self.c(ADV)}"
        return out

    def clause(self):
        return f"{self.np()} {self.vp()}"

    def sentence(self):
        r = self.r.random()
        if r < 0.45:
            s = self.clause()
        elif r < 0.6:
            s = f"{self.clause()}, {self.c(['and', 'but', 'for', 'so'])} {self.clause()}"
        elif r < 0.72:
            s = f"{self.c(['when', 'after', 'because', 'while', 'before'])} {self.clause()}, {self.clause()}"
        elif r < 0.9:
            q = self.clause()
            end = self.c([".", "?", "!"])
            return f"\"{q[0].upper()}{q[1:]}{',' if end == '.' else end}\" {self.c(SAY)} {self.c(NAME)}."
        else:
            s = f"there was {self.np(obj=True)} {self.c(PREP)} {self.np(obj=True)}"
        return s[0].upper() + s[1:] + self.c([".", ".", ".", "!", ";"]).replace(";", ".")

    def paragraph(self):
        return " ".join(self.sentence() for _ in range(self.r.randint(2, 7)))


def generate_text(n_bytes: int, seed: int) -> str:
    g, parts, size, chapter = Grammar(seed), [], 0, 0
    roman = ["I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X", "XI", "XII"]
    while size < n_bytes:
        if g.r.random() < 0.02 or not parts:
            chapter += 1
            head = f"CHAPTER {roman[(chapter - 1) % len(roman)]}.\n\n"
            parts.append(head)
            size += len(head)
        p = g.paragraph() + "\n\n"
        parts.append(p)
        size += len(p)
    return "".join(parts)


def sh(cmd, env, log):
    t0 = time.perf_counter()
    r = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True)
    with open(log, "a") as f:
        f.write(f"$ {' '.join(map(str, cmd))}\n{r.stdout}{r.stderr}\n")
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): see {log}\n{r.stderr[-2000:]}")
    return r.stdout, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--mb", type=float, default=3.0, help="MB of training text")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--ctx_len", type=int, default=256)
    p.add_argument("--micro_bsz", type=int, default=8)
    p.add_argument("--lr_init", default="2e-3")
    p.add_argument("--lr_final", default="2e-4")
    p.add_argument("--val_every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "commands.log"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", WANDB_MODE="disabled")
    sys.path.insert(0, str(REPO / "RWKV-v7"))
    from rwkvlm.data.magic_prime import magic_prime
    from rwkvlm.data.text import load_text_data

    data = out / "data"
    data.mkdir(exist_ok=True)
    train_txt, val_txt = data / "train.txt", data / "heldout.txt"
    train_txt.write_text(generate_text(int(args.mb * 1e6), args.seed), encoding="utf-8")
    val_txt.write_text(generate_text(int(args.mb * 1e5), args.seed + 1), encoding="utf-8")
    text = load_text_data(train_txt, 0)
    p_magic = magic_prime(text.num_tokens, args.ctx_len)
    proj = out / "proj"
    if proj.exists():
        shutil.rmtree(proj)
    common = ["--proj_dir", proj, "--data_file", train_txt, "--data_type", "utf-8", "--vocab_size", 0,
              "--n_layer", args.n_layer, "--n_embd", args.n_embd, "--ctx_len", args.ctx_len, "--accelerator", "cpu",
              "--precision", "fp32", "--random_seed", args.seed]
    sh([sys.executable, TRAIN, "--train_stage", 1, *common], env, log)
    exit_tokens = args.steps * args.micro_bsz * args.ctx_len
    run = [sys.executable, TRAIN, "--train_stage", 3, *common, "--my_exit_tokens", exit_tokens, "--magic_prime",
           p_magic, "--micro_bsz", args.micro_bsz, "--lr_init", args.lr_init, "--lr_final", args.lr_final,
           "--warmup_steps", 20, "--strategy", "auto", "--wandb", "", "--enable_progress_bar", 0,
           "--epoch_save", 0, "--val_data_file", val_txt, "--val_every_steps", args.val_every]
    stdout, seconds = sh(run, env, log)
    sh([sys.executable, REPO / "RWKV-v7" / "plot_loss.py", proj, "--out", out / "loss.png", "--title",
        f"char-level L{args.n_layer}-D{args.n_embd} on {args.mb:g} MB of generated text (CPU)"], env, log)

    import torch

    from rwkvlm.infer.generate import Generator, SamplingOptions, load_model

    model = load_model(proj, "cpu", log=lambda m: None)
    gen = Generator(model)
    g = torch.Generator().manual_seed(1)
    opts = SamplingOptions(temperature=0.8, top_p=0.9, max_tokens=400, stop=None)
    samples = []
    for prompt in ("The old king", "\"Where", "CHAPTER", "When the"):
        s = gen.generate(prompt, opts=opts, generator=g)
        samples.append(f"--- prompt {prompt!r}\n{prompt}{s.text}\n")
    (out / "samples.txt").write_text("\n".join(samples), encoding="utf-8")

    rows = [r.split(",") for r in (proj / "loss_log.csv").read_text().splitlines()[1:]]
    vals = [(int(r[0]), float(r[6])) for r in rows if len(r) > 6 and r[6]]
    train_s = float(rows[-1][5]) - float(rows[0][5])
    summary = {
        "command": " ".join(map(str, run)), "chars": text.characters, "vocab": text.vocab.vocab_size,
        "tokens_trained": exit_tokens, "steps": args.steps, "train_seconds": round(train_s, 1),
        "wall_seconds": round(seconds, 1), "tokens_per_s": round((len(rows) - 1) * args.micro_bsz * args.ctx_len / train_s),
        "loss_first": float(rows[0][2]), "loss_last_20_mean": sum(float(r[2]) for r in rows[-20:]) / 20,
        "val": vals, "first_lines": [ln for ln in stdout.splitlines() if ln.startswith(("data:", "validation:", "RWKV"))],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    shutil.copy(proj / "loss_log.csv", out / "loss_log.csv")
    shutil.copy(proj / "train_log.txt", out / "train_log.txt")
    print(json.dumps({k: v for k, v in summary.items() if k != "command"}, indent=1))
    print("\n".join(samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
