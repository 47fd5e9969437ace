"""The document order of make_data's shuffled copies: a keyed pseudo-random permutation of
range(n), computed for any block of positions at a time, so no array of n entries is held.

`Shuffle(n, seed, copy)`: `order(positions)` -> the documents at those output positions,
`place(documents)` -> their output positions (the inverse). Up to TABLE_DOCS documents the
order is a table: the documents sorted by a keyed 64-bit hash of their number (uniform over
all n! orders; at most 1.5 MB). Past it, a Feistel network of ROUNDS rounds
on pairs (l, r) in Z_a x Z_b (x = l * b + r; a = ceil(sqrt(n)), b = ceil(n / a), so a * b
< n + a), with the two moduli alternating from round to round (each round maps Z_p x Z_q onto
Z_q x Z_p: (l, r) -> (r, (l + F(r)) mod p), and ROUNDS is even); a bijection of [0, a * b),
restricted to [0, n) by cycle walking (a value at or past n is mapped again until it falls
below n, on average fewer than 1 + 1 / sqrt(n) times). F is a 64-bit mix (splitmix64's
finaliser) of r and the round's key; the keys come from blake2b of the seed and the copy
number. So a copy's order depends on n, --seed and the copy's number only: not on the
number of workers, the chunk sizes or the machine (all arithmetic is exact uint64).
"""
from __future__ import annotations

import hashlib
import math

import numpy as np

ROUNDS = 6  # even: the pair comes back to Z_a x Z_b
TABLE_DOCS = 1 << 16  # up to this many documents, a table (a Feistel network of tiny halves is biased)
_M1, _M2, _M3 = (np.uint64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))
_S1, _S2, _S3 = np.uint64(30), np.uint64(27), np.uint64(31)


class Shuffle:
    """The order of one copy: a permutation of range(n) keyed by (seed, copy)."""

    def __init__(self, n: int, seed: int, copy: int):
        if n < 1:
            raise ValueError(f"a shuffle needs at least one document, got {n}")
        self.n = n
        self.a = math.isqrt(n - 1) + 1  # a * a >= n
        self.b = -(-n // self.a)
        digest = hashlib.blake2b(f"rwkvlm make_data shuffle: seed {seed} copy {copy}".encode(),
                                 digest_size=8 * (ROUNDS + 1)).digest()
        keys = np.frombuffer(digest, dtype="<u8").astype(np.uint64)
        self.keys = keys[:ROUNDS]
        self._table = self._inverse = None
        if n <= TABLE_DOCS:
            self._table = np.argsort(_mix(np.arange(n, dtype=np.uint64), keys[ROUNDS]), kind="stable")
            self._inverse = np.empty(n, dtype=np.int64)
            self._inverse[self._table] = np.arange(n)

    def order(self, positions) -> np.ndarray:
        """The document at each output position (int64 array of positions in [0, n))."""
        if self._table is not None:
            return self._table[np.asarray(positions, dtype=np.int64).reshape(-1)]
        return self._walk(positions, self._forward)

    def place(self, documents) -> np.ndarray:
        """The output position of each document: the inverse of order."""
        if self._inverse is not None:
            return self._inverse[np.asarray(documents, dtype=np.int64).reshape(-1)]
        return self._walk(documents, self._backward)

    def _walk(self, x, step) -> np.ndarray:
        x = step(np.asarray(x, dtype=np.uint64).reshape(-1))
        out = np.flatnonzero(x >= self.n)
        while out.size:  # cycle walking: values at or past n go round again
            x[out] = step(x[out])
            out = out[x[out] >= self.n]
        return x.astype(np.int64)

    def _forward(self, x: np.ndarray) -> np.ndarray:
        p, q = self.a, self.b  # l in Z_p, r in Z_q
        l, r = np.divmod(x, np.uint64(q))
        for key in self.keys:
            f = _mix(r, key)
            f %= np.uint64(p)
            f += l
            f %= np.uint64(p)
            l, r, p, q = r, f, q, p
        return l * np.uint64(q) + r

    def _backward(self, y: np.ndarray) -> np.ndarray:
        p, q = self.a, self.b  # the pair after an even number of rounds
        l, r = np.divmod(y, np.uint64(q))
        for key in self.keys[::-1]:
            # undo (l, r) -> (r, (l + F(r)) mod p'), where p' = q is the modulus of the output's r
            f = _mix(l, key)
            f %= np.uint64(q)
            prev_l = (r + np.uint64(q) - f) % np.uint64(q)
            l, r, p, q = prev_l, l, q, p
        return l * np.uint64(q) + r


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """A keyed 64-bit mix of each value (splitmix64's finaliser of x * golden + key), a new array."""
    z = x * _M1
    z += key
    z ^= z >> _S1
    z *= _M2
    z ^= z >> _S2
    z *= _M3
    z ^= z >> _S3
    return z


def copy_orders(n_docs: int, copies: int, seed: int):
    """The whole order of each copy, one int64 array each (for tests and small n: make_data itself
    computes the orders block by block, see rwkvlm.data.copies)."""
    for copy in range(copies):
        yield Shuffle(n_docs, seed, copy).order(np.arange(n_docs)) if n_docs else np.zeros(0, np.int64)
