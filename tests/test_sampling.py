"""magic_prime sampling: a bijection over one pass, disjoint across ranks."""
import numpy as np

from rwkvlm.recipe import MINI_EPOCH_SAMPLES
from rwkvlm.train.dataset import MagicPrimeDataset, StepSampler
from rwkvlm.data.magic_prime import magic_prime


def _datasets(n_tokens, ctx, micro_bsz, world):
    p = magic_prime(n_tokens, ctx)
    epoch_steps = MINI_EPOCH_SAMPLES // (micro_bsz * world)
    tokens = np.arange(n_tokens, dtype=np.int64) % 65536
    return p, [MagicPrimeDataset(tokens, ctx, p, micro_bsz, epoch_steps, r, world) for r in range(world)]


def test_consecutive_samples_cover_every_slot_once():
    ctx = 16
    p, (ds,) = _datasets(50_000 * ctx, ctx, micro_bsz=8, world=1)
    starts = [ds.start(s) for s in range(p)]
    assert sorted(starts) == [i * ctx for i in range(p)]


def test_ranks_are_disjoint_and_cover_together():
    ctx, world, mbsz = 16, 4, 2
    p, dss = _datasets(60_000 * ctx, ctx, micro_bsz=mbsz, world=world)
    per_rank = MINI_EPOCH_SAMPLES // world  # one mini-epoch
    ii = [set(ds.ii(s) for s in range(per_rank)) for ds in dss]
    for a in range(world):
        for b in range(a + 1, world):
            assert not (ii[a] & ii[b])
    assert set().union(*ii) == set(range(1, MINI_EPOCH_SAMPLES + 1))
    # the second mini-epoch continues where the first stopped
    assert dss[0].ii(per_rank) == MINI_EPOCH_SAMPLES + 1
    # windows: p consecutive global sample numbers (all ranks) visit each slot once
    if p <= 2 * MINI_EPOCH_SAMPLES:
        starts = set()
        s = 0
        while len(starts) < p and s < 3 * per_rank:
            for ds in dss:
                if ds.ii(s) <= p:
                    starts.add(ds.start(s))
            s += 1
        assert len(starts) == p


def test_window_contents_and_shift():
    ctx = 32
    p, (ds,) = _datasets(20_000, ctx, micro_bsz=1, world=1)
    x, y = ds[7]
    assert x.shape == (ctx,) and y.shape == (ctx,)
    assert x.dtype.is_floating_point is False
    assert (x[1:] == y[:-1]).all()
    assert int(x[0]) == ds.start(7) % 65536


def test_step_sampler_resumes_mid_stream():
    full = list(StepSampler(4, 0, 10))
    tail = list(StepSampler(4, 6, 10))
    assert full[6 * 4:] == tail
    assert len(StepSampler(4, 12, 10)) == 0
