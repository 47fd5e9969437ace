"""A weighted mix of binidx files, and the rule that gives each training sample its file.

    --data_file "web:0.7,code:0.2,math:0.1"     # paths without .bin/.idx, each with its weight
    --data_file mix.json                        # [{"path": "web", "weight": 0.7}, ...]

Paths are relative to the working directory (the run script's folder, RWKV-v7/train_temp, as a
plain --data_file is) or absolute; weights are positive numbers, normalised to sum to 1.

The rule (deterministic, from the sample number alone, so an exact resume needs nothing but the
step): the run's global sample sequence g = 0, 1, 2, ... (g = local sample x ranks + rank, the
numbering of the magic-prime formula, rwkvlm.train.dataset) is cut into periods of
MIX_PERIOD = 40320 samples (a mini-epoch of the recipe). In every period file f gets exactly
n_f samples, the weights' shares of 40320 rounded by largest remainder (each file at least one),
placed by smooth weighted round robin: at each position every file's credit grows by n_f, the
file with the most credit (the first on a tie) takes the sample and pays 40320. So any run of
samples holds each file within a few samples of its share (a low-discrepancy interleave, no
randomness). Sample g goes to file f = FILE[g mod 40320] and is that file's k-th sample,
k = (g div 40320) * n_f + WITHIN[g mod 40320]; its window starts at
sample_start(1 + k, p_f, ctx_len) in file f, p_f the file's own magic prime for its size
(rwkvlm.data.magic_prime). Each file's first p_f samples are thus distinct windows of it, in
its own scattered order, and a mix of one file samples exactly as the plain --data_file does.

`python RWKV-v5/mix_data.py web code math --weights 0.7,0.2,0.1 --ctx_len 4096` prints the line
for the run script (main() below): the trainer expects --magic_prime 0 with a mix (per file).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rwkvlm.errors import UserError
from rwkvlm.recipe import MINI_EPOCH_SAMPLES

MIX_PERIOD = MINI_EPOCH_SAMPLES  # samples in which every file's count is exact


@dataclass(frozen=True)
class MixEntry:
    path: str  # binidx path without extension, as given
    weight: float


def is_mix(data_file: str) -> bool:
    """Whether a --data_file names a mix: a .json file, or `path:weight` items."""
    s = str(data_file).strip()
    return s.endswith(".json") or ":" in s


def _weight(raw, item: str, flag: str) -> float:
    try:
        w = float(raw)
    except (TypeError, ValueError):
        w = float("nan")
    if isinstance(raw, bool) or not (math.isfinite(w) and w > 0):
        raise UserError(f"{flag}: the weight of {item!r} is {raw!r}, not a positive number. Give each file a "
                        f"positive weight, e.g. --data_file \"web:0.7,code:0.2,math:0.1\" (they are normalised "
                        f"to sum to 1).")
    return w


def _check_path(path: str, item: str, flag: str) -> str:
    path = str(path).strip()
    if not path:
        raise UserError(f"{flag}: {item!r} names no file; write each item as path:weight, e.g. web:0.7.")
    if path.endswith((".bin", ".idx")):
        raise UserError(f"{flag}: {path!r} in the mix: give the path WITHOUT the extension ({path[:-4]!r}); the "
                        f".bin/.idx pair is found from it.")
    return path


def parse_mix(spec: str, flag: str = "--data_file") -> list[MixEntry]:
    """The entries of a mix spec (see the module's docstring); UserError for a malformed one."""
    spec = str(spec).strip()
    entries = []
    if spec.endswith(".json"):
        p = Path(spec)
        try:
            items = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{flag} {spec!r}: no such mix file ({p.resolve()}, working directory {Path.cwd()}). "
                            f"Give a JSON list of {{\"path\": ..., \"weight\": ...}} objects.") from None
        except (OSError, ValueError) as e:
            raise UserError(f"{flag} {spec!r} is not a readable JSON file ({e}).") from None
        if not isinstance(items, list) or not items:
            raise UserError(f"{flag} {spec!r} must hold a non-empty JSON list of {{\"path\": ..., \"weight\": ...}} "
                            f"objects, e.g. [{{\"path\": \"web\", \"weight\": 0.7}}, {{\"path\": \"code\", "
                            f"\"weight\": 0.3}}].")
        for i, it in enumerate(items):
            if not isinstance(it, dict) or "path" not in it or "weight" not in it:
                raise UserError(f"{flag} {spec!r}: item {i} is {it!r}; each item is {{\"path\": ..., \"weight\": ...}}.")
            item = f"{it['path']} (item {i} of {spec})"
            entries.append(MixEntry(_check_path(it["path"], item, flag), _weight(it["weight"], item, flag)))
    else:
        for item in (x.strip() for x in spec.split(",")):
            if not item:
                raise UserError(f"{flag} {spec!r} has an empty item; write path:weight items separated by commas, "
                                f"e.g. \"web:0.7,code:0.3\".")
            if ":" not in item:
                raise UserError(f"{flag}: {item!r} in the mix {spec!r} has no weight; write it as {item}:WEIGHT "
                                f"(a positive number).")
            path, raw = item.rsplit(":", 1)
            entries.append(MixEntry(_check_path(path, item, flag), _weight(raw.strip(), item, flag)))
    seen = {}
    for e in entries:
        key = os.path.normpath(e.path)
        if key in seen:
            raise UserError(f"{flag}: {e.path!r} appears twice in the mix; give each file once, with the sum of "
                            f"its weights.")
        seen[key] = e
    return entries


def period_counts(weights, period: int = MIX_PERIOD, names=None, flag: str = "--data_file") -> tuple:
    """Samples of each file in a period: the normalised weights x period, rounded by largest
    remainder (ties to the first file); UserError when a file would get none."""
    w = np.asarray(weights, dtype=np.float64)
    share = w / w.sum() * period
    counts = np.floor(share).astype(np.int64)
    left = int(period - counts.sum())
    order = sorted(range(len(w)), key=lambda i: (-(share[i] - counts[i]), i))
    for i in order[:left]:
        counts[i] += 1
    for i, n in enumerate(counts):
        if n < 1:
            name = names[i] if names else f"file {i}"
            raise UserError(f"{flag}: the weight of {name!r} ({weights[i]:g}) is below 1/{period} of the total "
                            f"({w.sum():g}), so it would get no sample in {period}; raise it or leave the file out.")
    return tuple(int(n) for n in counts)


class MixRule:
    """Sample g of the run -> (file f, its index k among f's samples); see the module's docstring."""

    def __init__(self, counts):
        self.counts = tuple(int(n) for n in counts)
        self.period = sum(self.counts)
        self.file_of, self.within = _interleave(self.counts)

    def locate(self, g: int) -> tuple[int, int]:
        q, j = divmod(int(g), self.period)
        f = int(self.file_of[j])
        return f, q * self.counts[f] + int(self.within[j])

    def samples_of(self, f: int, n: int) -> int:
        """How many of the samples 0..n-1 go to file f."""
        q, j = divmod(int(n), self.period)
        return q * self.counts[f] + int(np.count_nonzero(self.file_of[:j] == f))


@functools.lru_cache(maxsize=8)
def _interleave(counts: tuple) -> tuple[np.ndarray, np.ndarray]:
    """FILE and WITHIN of a period: smooth weighted round robin over the counts."""
    period = sum(counts)
    n = np.asarray(counts, dtype=np.int64)
    credit = np.zeros(len(counts), dtype=np.int64)
    seen = np.zeros(len(counts), dtype=np.int64)
    file_of = np.empty(period, dtype=np.int32)
    within = np.empty(period, dtype=np.int64)
    for j in range(period):
        credit += n
        f = int(np.argmax(credit))  # the first on a tie
        credit[f] -= period
        file_of[j], within[j] = f, seen[f]
        seen[f] += 1
    return file_of, within


# ---------------------------------------------------------------- the opened mix

@dataclass
class MixSource:
    entry: MixEntry
    data: object  # BinIdx
    magic_prime: int
    count: int  # samples per MIX_PERIOD

    @property
    def tokens(self):
        return self.data.tokens

    @property
    def num_tokens(self) -> int:
        return int(self.data.num_tokens)


@dataclass
class DataMix:
    """The binidx files of a mix, opened, with their magic primes and the rule."""

    spec: str
    sources: list
    ctx_len: int

    def __post_init__(self):
        self.rule = MixRule([s.count for s in self.sources])

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.sources)

    def passes(self, exit_tokens: int) -> list[float]:
        """How many times each file's windows are read over `exit_tokens` tokens of training."""
        samples = exit_tokens // self.ctx_len
        return [self.rule.samples_of(i, samples) / s.magic_prime for i, s in enumerate(self.sources)]

    def describe(self) -> str:
        total = sum(s.count for s in self.sources)
        parts = [f"{s.entry.path} {s.count / total:.4g} ({s.num_tokens:,} tokens, magic_prime {s.magic_prime})"
                 for s in self.sources]
        return f"a mix of {len(self.sources)} binidx files, each window drawn by its file's magic prime: " + \
            ", ".join(parts)

    def fingerprint(self) -> str:
        """path:samples per 40320:p=magic prime for each file, comma-separated: what decides the
        samples (the run fingerprint's "data_mix")."""
        return ",".join(f"{os.path.normpath(s.entry.path)}:{s.count}/{MIX_PERIOD}:p={s.magic_prime}"
                        for s in self.sources)

    def record(self) -> dict:
        """What train_config.json and the run's header say about the mix."""
        return {"kind": "mix", "spec": self.spec, "period": MIX_PERIOD,
                "files": [{"path": s.entry.path, "weight": s.entry.weight, "share": s.count / MIX_PERIOD,
                           "tokens": s.num_tokens, "magic_prime": s.magic_prime} for s in self.sources]}

    def header_value(self) -> str:
        """The mix in one token of the run's header line: path:share:p=prime,..."""
        return ",".join(f"{s.entry.path}:{s.count / MIX_PERIOD:.4g}:p={s.magic_prime}" for s in self.sources)


def open_mix(spec: str, ctx_len: int, flag: str = "--data_file") -> DataMix:
    """Open every file of a mix (UserError naming a missing or too short one)."""
    from rwkvlm.data.binidx import BinIdx
    from rwkvlm.data.magic_prime import magic_prime

    entries = parse_mix(spec, flag)
    opened = []
    for e in entries:
        missing = [str(Path(e.path + ext).resolve()) for ext in (".bin", ".idx") if not Path(e.path + ext).is_file()]
        if missing:
            raise UserError(f"{flag}: the file {e.path!r} of the mix {spec!r} is not found: tried "
                            f"{' and '.join(missing)} (working directory {Path.cwd()}). Paths are relative to the "
                            f"run script's folder (RWKV-v7/train_temp) or absolute, without .bin/.idx; make the "
                            f"file with make_data.py or leave it out of the mix.")
        data = BinIdx(e.path)
        n = int(data.num_tokens)
        p = magic_prime(n, ctx_len)
        if p is None:
            raise UserError(f"{e.path}.bin (in the mix {flag}) holds {n} tokens, fewer than 3 x ctx_len = "
                            f"{3 * ctx_len}: add data to it (more copies in make_data.py), lower CTX_LEN, or leave "
                            f"it out of the mix.")
        opened.append((e, data, p))
    counts = period_counts([e.weight for e, _, _ in opened], names=[e.path for e, _, _ in opened], flag=flag)
    return DataMix(spec=str(spec), ctx_len=ctx_len,
                   sources=[MixSource(e, d, p, n) for (e, d, p), n in zip(opened, counts)])


@functools.lru_cache(maxsize=4)
def mix_fingerprint(spec: str, ctx_len: int) -> str:
    """DataMix.fingerprint() of a --data_file mix (its files opened once per process)."""
    return open_mix(spec, ctx_len).fingerprint()


# ---------------------------------------------------------------- mix_data.py

def mix_line(mix: DataMix, paths, exit_tokens: int | None = None) -> str:
    """The line to paste into the run script for a mix."""
    spec = ",".join(f"{p}:{s.entry.weight:g}" for p, s in zip(paths, mix.sources))
    tokens = exit_tokens if exit_tokens is not None else mix.num_tokens
    return f'--data_file "{spec}" --my_exit_tokens {tokens} --magic_prime 0 --ctx_len {mix.ctx_len}'


def _default_relative_to() -> str:
    """RWKV-v7/train_temp of this checkout (where the run scripts run), else the working directory."""
    here = Path(__file__).resolve().parents[2] / "train_temp"
    return str(here) if here.is_dir() else "."


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="mix_data.py",
        description="Print the train.py line for a weighted mix of make_data.py outputs (binidx files): "
                    "--data_file \"a:w1,b:w2\" --my_exit_tokens T --magic_prime 0 --ctx_len C. --magic_prime 0 "
                    "tells the trainer to sample each file by its own magic prime.")
    p.add_argument("files", nargs="+", help="binidx paths without .bin/.idx (as make_data.py wrote them)")
    p.add_argument("--weights", default=None,
                   help="comma-separated positive weights, one per file (default: each file's share of the tokens, "
                        "so that T tokens read every file about once)")
    p.add_argument("--ctx_len", type=int, required=True, help="CTX_LEN of the run (the one given to make_data.py)")
    p.add_argument("--my_exit_tokens", type=int, default=None,
                   help="tokens to train on (default: the files' tokens together)")
    p.add_argument("--relative-to", dest="relative_to", default=None,
                   help="write the paths relative to this folder (default: RWKV-v7/train_temp, where the run "
                        "scripts run; '' for absolute paths)")
    args = p.parse_args(argv)
    if args.ctx_len < 1:
        raise UserError(f"--ctx_len must be a positive number, found {args.ctx_len}")
    for f in args.files:
        if ":" in f or "," in f:
            raise UserError(f"file {f!r}: give the paths alone (the weights go in --weights), without ':' or ','.")
    if args.weights is None:
        from rwkvlm.data.binidx import BinIdx

        for f in args.files:
            if not (Path(f + ".bin").is_file() and Path(f + ".idx").is_file()):
                raise UserError(f"{f}.bin/.idx not found (working directory {Path.cwd()}); give make_data.py's "
                                f"output paths without extension.")
        weights = [str(BinIdx(f).num_tokens) for f in args.files]
    else:
        weights = [w.strip() for w in args.weights.split(",")]
        if len(weights) != len(args.files):
            raise UserError(f"--weights gives {len(weights)} weight(s) for {len(args.files)} file(s); give one per "
                            f"file, in the same order.")
    spec = ",".join(f"{f}:{w}" for f, w in zip(args.files, weights))
    mix = open_mix(spec, args.ctx_len, flag="mix_data.py")
    rel = _default_relative_to() if args.relative_to is None else args.relative_to
    paths = [os.path.relpath(Path(f).resolve(), Path(rel).resolve()) if rel else str(Path(f).resolve())
             for f in args.files]
    exit_tokens = args.my_exit_tokens if args.my_exit_tokens is not None else mix.num_tokens
    print(f"### a mix of {len(mix.sources)} files at ctx_len {args.ctx_len}, {mix.num_tokens} tokens in all; each "
          f"file sampled by its own magic prime (the trainer computes them: --magic_prime 0)")
    passes = mix.passes(exit_tokens)
    for s, n_pass in zip(mix.sources, passes):
        print(f"  {s.entry.path}: weight {s.entry.weight:g} -> {s.count} of every {MIX_PERIOD} samples "
              f"({s.count / MIX_PERIOD:.2%}), {s.num_tokens} tokens, magic_prime {s.magic_prime}, "
              f"read {n_pass:.3g} times over {exit_tokens} tokens")
    print(f"\n{mix_line(mix, paths, exit_tokens)}\n")
    print(f"### paths relative to {Path(rel).resolve() if rel else '/'} (the run script's folder); in "
          f"demo-training-run.sh set data_file to the quoted value, MY_EXIT_TOKENS and MAGIC_PRIME=\"0\".")
    return 0
