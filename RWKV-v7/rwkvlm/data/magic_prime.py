"""magic_prime: the sample-order prime of RWKV-LM's binidx training.

p is the largest prime with p % 3 == 2 and p <= floor(tokens / ctx_len) - 1.
Sample ii of the run starts at ((f * ii**3) mod p) * ctx_len with
f = floor(p * (sqrt(5) - 1) / 2); since 3 does not divide p - 1, ii -> ii**3
is a bijection mod p, so p consecutive samples visit every slot once.
All arithmetic here is exact integer arithmetic.
"""
from __future__ import annotations

import functools
import math

from rwkvlm.errors import UserError

_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)  # deterministic below 3.3e24


def is_prime(n: int) -> bool:
    """Miller-Rabin; exact for n < 3.3e24 (and overwhelmingly likely beyond)."""
    n = int(n)
    if n < 2:
        return False
    for q in _MR_BASES:
        if n % q == 0:
            return n == q
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _check_counts(n_tokens, ctx_len) -> tuple:
    n_tokens, ctx_len = int(n_tokens), int(ctx_len)
    if ctx_len < 1:
        raise UserError(f"ctx_len must be a positive integer, found {ctx_len}")
    if n_tokens < 0:
        raise UserError(f"the token count must not be negative, found {n_tokens}")
    return n_tokens, ctx_len


def magic_prime(n_tokens: int, ctx_len: int):
    """The magic_prime for a .bin of n_tokens at ctx_len, or None below 3 * ctx_len tokens."""
    n_tokens, ctx_len = _check_counts(n_tokens, ctx_len)
    if n_tokens < 3 * ctx_len:
        return None
    p = n_tokens // ctx_len - 1
    p -= (p - 2) % 3  # largest value <= p that is 2 mod 3
    while p >= 2:
        if is_prime(p):
            return p
        p -= 3
    return None


def check_magic_prime(p: int, n_tokens: int, ctx_len: int) -> None:
    """Raise UserError unless p is a valid --magic_prime for this data (the trainer's checks)."""
    n_tokens, ctx_len = _check_counts(n_tokens, ctx_len)
    p = int(p)
    slots = n_tokens // ctx_len
    problems = []
    if not is_prime(p):
        problems.append(f"{p} is not prime")
    if p % 3 != 2:
        problems.append(f"{p} % 3 is {p % 3}, expected 2")
    if not (10 * p > 9 * slots and p <= slots):
        problems.append(
            f"{p} / {slots} (the number of ctx_len slots, {n_tokens} // {ctx_len}) must lie in (0.9, 1]"
        )
    if problems:
        best = magic_prime(n_tokens, ctx_len)
        hint = (
            f"use --magic_prime {best} (what make_data.py prints for these files at --ctx_len {ctx_len})"
            if best is not None
            else f"the data has fewer than 3 x ctx_len = {3 * ctx_len} tokens: make it larger"
        )
        raise UserError(
            f"--magic_prime {p} does not fit {n_tokens} tokens at ctx_len {ctx_len}: "
            + "; ".join(problems)
            + f". {hint}"
        )


@functools.lru_cache(maxsize=16)
def golden_factor(p: int) -> int:
    """floor(p * (sqrt(5) - 1) / 2), exactly: (isqrt(5 p^2) - p) // 2 for p >= 1."""
    p = int(p)
    if p < 1:
        raise ValueError(f"p must be positive, found {p}")
    # sqrt(5) p is irrational, so isqrt(5 p^2) = s < sqrt(5) p < s + 1, and the floor of
    # (sqrt(5) p - p) / 2 is (s - p) // 2 whether s - p is even or odd.
    return (math.isqrt(5 * p * p) - p) // 2


def sample_start(ii: int, p: int, ctx_len: int) -> int:
    """Token offset of sample ii: ((f * ii**3) mod p) * ctx_len, f = golden_factor(p)."""
    return (golden_factor(p) * pow(int(ii), 3, int(p)) % int(p)) * int(ctx_len)
