"""magic_prime sampling of training windows, with no shuffle state.

Each rank sees a stream of local sample numbers s = step * micro_bsz + j. The
sample's mini-epoch is e = s // (epoch_steps * micro_bsz) and its index in the
mini-epoch idx = s % (epoch_steps * micro_bsz); the formula of RWKV-v7/docs/rwkv7-x070.md
("Data sampling")

    ii = 1 + e * 40320 + idx * W + rank
    start = ((floor(p * (sqrt(5) - 1) / 2) * ii^3) mod p) * ctx_len

gives the window [start, start + ctx_len + 1). Because the position depends
on the global step alone, resuming at step k needs nothing but k.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from rwkvlm.recipe import MINI_EPOCH_SAMPLES
from rwkvlm.data.magic_prime import sample_start


class MagicPrimeDataset(Dataset):
    """Map a local sample number to an (input, target) pair of ctx_len tokens."""

    def __init__(self, tokens, ctx_len: int, magic_prime: int, micro_bsz: int, epoch_steps: int,
                 rank: int, world_size: int, mini_epoch_samples: int = MINI_EPOCH_SAMPLES):
        self.tokens = tokens  # 1-D array-like of token ids (a np.memmap)
        self.ctx_len = ctx_len
        self.p = magic_prime
        self.samples_per_epoch = micro_bsz * epoch_steps  # per rank
        self.rank = rank
        self.world_size = world_size
        self.mini_epoch_samples = mini_epoch_samples

    def ii(self, s: int) -> int:
        e, idx = divmod(s, self.samples_per_epoch)
        return 1 + e * self.mini_epoch_samples + idx * self.world_size + self.rank

    def start(self, s: int) -> int:
        return sample_start(self.ii(s), self.p, self.ctx_len)

    def __len__(self) -> int:  # not used for sampling; the sampler decides
        return self.samples_per_epoch

    def __getitem__(self, s: int):
        i = self.start(s)
        window = np.asarray(self.tokens[i : i + self.ctx_len + 1], dtype=np.int64)
        t = torch.from_numpy(window)  # (ctx_len + 1,)
        return t[:-1], t[1:]


class StepSampler(Sampler):
    """Yield local sample numbers for steps [start_step, end_step), in order."""

    def __init__(self, micro_bsz: int, start_step: int, end_step: int):
        self.micro_bsz = micro_bsz
        self.start_step = start_step
        self.end_step = max(start_step, end_step)

    def __iter__(self):
        return iter(range(self.start_step * self.micro_bsz, self.end_step * self.micro_bsz))

    def __len__(self) -> int:
        return (self.end_step - self.start_step) * self.micro_bsz
