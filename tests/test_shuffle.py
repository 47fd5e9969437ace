"""make_data's shuffle (rwkvlm.data.shuffle): a permutation of the documents for each copy, computed
block by block, the same for a seed whatever the blocks."""
import math
from collections import Counter

import numpy as np
import pytest

import rwkvlm.data.shuffle as sh
from rwkvlm.data.shuffle import Shuffle, copy_orders

# 1, 2, primes, powers of two, 2^k + 1 (65537 is both), a square, around the table's size
AWKWARD = [1, 2, 3, 4, 5, 7, 8, 17, 97, 255, 256, 257, 1024, 1025, 4096, 65535, 65536, 65537, 65538, 1 << 17,
           (1 << 17) + 1, 131071, 1_000_003, 1 << 20, 1000 * 1000]


@pytest.fixture(params=["table", "feistel"])
def path(request, monkeypatch):
    """Both ways of computing an order: the table (small n) and the Feistel network (forced for every n)."""
    if request.param == "feistel":
        monkeypatch.setattr(sh, "TABLE_DOCS", 0)
    return request.param


@pytest.mark.parametrize("n", AWKWARD)
def test_every_document_exactly_once_per_copy(path, n):
    for copy in range(2 if n > 70_000 else 3):
        s = Shuffle(n, 12345, copy)
        order = s.order(np.arange(n))
        assert order.dtype == np.int64 and order.shape == (n,)
        assert np.array_equal(np.bincount(order, minlength=n), np.ones(n, np.int64)), (n, copy)
        assert np.array_equal(s.place(order), np.arange(n))  # place is the inverse
        assert np.array_equal(s.order(s.place(np.arange(n))), np.arange(n))


@pytest.mark.parametrize("n", [1, 2, 97, 65537, 1_000_003])
def test_blocks_of_any_size_give_the_same_order(path, n):
    s = Shuffle(n, 7, 1)
    whole = s.order(np.arange(n))
    rng = np.random.default_rng(0)
    cuts = np.unique(np.concatenate([[0, n], rng.integers(0, n + 1, 20)]))
    assert np.array_equal(np.concatenate([s.order(np.arange(a, b)) for a, b in zip(cuts[:-1], cuts[1:])]), whole)
    picks = rng.integers(0, n, 1000)
    assert np.array_equal(s.order(picks), whole[picks])  # any positions, in any order, repeated
    assert np.array_equal(Shuffle(n, 7, 1).order(np.arange(n)), whole)  # a new object: the same


def test_seed_and_copy_change_the_order(path):
    n = 100_003
    orders = {(seed, copy): Shuffle(n, seed, copy).order(np.arange(n)) for seed in (0, 1, 2**62) for copy in (0, 1, 29)}
    keys = list(orders)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            assert np.mean(orders[a] == orders[b]) < 0.001, (a, b)  # as two independent permutations
    expected = [Shuffle(5, 9, c).order(np.arange(5)).tolist() for c in range(3)]
    assert [o.tolist() for o in copy_orders(5, 3, 9)] == expected


def test_the_order_of_a_seed_is_fixed():
    """The order of a given --seed must not change between versions (the same input and seed give
    the same files): a few positions of both ways, pinned."""
    assert Shuffle(10, 1, 0).order(np.arange(10)).tolist() == [8, 2, 7, 9, 1, 4, 6, 5, 3, 0]
    assert Shuffle(1_000_003, 1, 2).order(np.arange(8)).tolist() == [
        233286, 488084, 885631, 13357, 114841, 226319, 333213, 732356]


def test_small_orders_are_uniform():
    """The table: over 24,000 seeds, each of the 120 orders of 5 documents comes up about 200 times."""
    counts = Counter(tuple(Shuffle(5, seed, 0).order(np.arange(5)).tolist()) for seed in range(24_000))
    assert len(counts) == math.factorial(5)
    assert 130 < min(counts.values()) and max(counts.values()) < 270, counts.most_common(3)


def test_large_orders_spread_every_document():
    """The Feistel network: over 2,000 seeds, document 0 and document n - 1 land in each tenth of the
    copy about equally often, and successive positions hold unrelated documents."""
    n = 100_003
    places = np.array([Shuffle(n, seed, 0).place(np.array([0, n - 1])) for seed in range(2000)])
    for column in places.T:
        tenths = np.bincount(column * 10 // n, minlength=10)
        assert tenths.min() > 140 and tenths.max() < 260, tenths
    order = Shuffle(n, 3, 0).order(np.arange(n))
    assert abs(np.corrcoef(order[:-1], order[1:])[0, 1]) < 0.02
    assert abs(np.corrcoef(np.arange(n), order)[0, 1]) < 0.02
