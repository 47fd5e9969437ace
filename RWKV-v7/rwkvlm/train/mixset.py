"""The Dataset a run samples: one token array by the magic prime, or a weighted mix of files.

`training_dataset(data, cfg, rank)` gives, for the data the run opened (rwkvlm.train.data_checks:
a BinIdx, a TextData or a DataMix), a Dataset mapping the rank's local sample number s to
(input, target) of ctx_len tokens. A single array uses MagicPrimeDataset (rwkvlm.train.dataset)
with --magic_prime; a mix uses MixDataset: the same numbering (global sample g = s x ranks +
rank), the file of g by the mix's rule and its window by that file's own magic prime
(rwkvlm.data.mix). Both depend on s alone, so a resume at step k needs nothing but k.
"""
from __future__ import annotations

import numpy as np
import torch

from rwkvlm.data.magic_prime import sample_start
from rwkvlm.data.mix import DataMix
from rwkvlm.train.dataset import MagicPrimeDataset


class MixDataset(MagicPrimeDataset):
    """MagicPrimeDataset's numbering; each sample from the file the mix's rule gives it."""

    def __init__(self, mix: DataMix, ctx_len: int, micro_bsz: int, epoch_steps: int, rank: int, world_size: int,
                 mini_epoch_samples: int):
        super().__init__(None, ctx_len, 0, micro_bsz, epoch_steps, rank, world_size, mini_epoch_samples)
        self.mix = mix
        self.sources = [(s.tokens, s.magic_prime) for s in mix.sources]

    def locate(self, s: int) -> tuple[int, int]:
        """(file index, token offset of the window in that file) of local sample s."""
        f, k = self.mix.rule.locate(self.ii(s) - 1)
        return f, sample_start(1 + k, self.sources[f][1], self.ctx_len)

    def start(self, s: int) -> int:
        return self.locate(s)[1]

    def dump_row(self, s: int) -> str:
        """--dump_samples: 'start,file' (the file's index in the mix)."""
        f, i = self.locate(s)
        return f"{i},{f}"

    def __getitem__(self, s: int):
        f, i = self.locate(s)
        window = np.asarray(self.sources[f][0][i : i + self.ctx_len + 1], dtype=np.int64)
        t = torch.from_numpy(window)
        return t[:-1], t[1:]


def training_dataset(data, cfg, rank: int):
    """The Dataset of `data` for this rank (see the module's docstring)."""
    common = dict(micro_bsz=cfg.micro_bsz, epoch_steps=cfg.epoch_steps, rank=rank, world_size=cfg.world_size,
                  mini_epoch_samples=cfg.mini_epoch_samples)
    if isinstance(data, DataMix):
        return MixDataset(data, cfg.ctx_len, **common)
    return MagicPrimeDataset(data.tokens, cfg.ctx_len, cfg.magic_prime, **common)
