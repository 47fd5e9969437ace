"""rwkvlm.data.magic_prime: the spec's definition, validity check and exact sample positions."""
import math
from decimal import Decimal, getcontext

import pytest

from rwkvlm.errors import UserError
from rwkvlm.data.magic_prime import check_magic_prime, golden_factor, is_prime, magic_prime, sample_start


def _sieve(n):
    flags = bytearray([1]) * (n + 1)
    flags[0:2] = b"\x00\x00"
    for i in range(2, int(n**0.5) + 1):
        if flags[i]:
            flags[i * i :: i] = bytearray(len(flags[i * i :: i]))
    return flags


def test_reference_values():
    assert magic_prime(1_498_226_207, 512) == 2_926_181
    assert magic_prime(12_960_789, 4096) == 3_137


def test_small_data_gives_none():
    assert magic_prime(0, 4096) is None
    assert magic_prime(3 * 4096 - 1, 4096) is None
    assert magic_prime(3 * 4096, 4096) == 2  # 3 slots -> candidates <= 2
    assert magic_prime(100, 512) is None


def test_is_prime_matches_sieve():
    flags = _sieve(200_000)
    assert [n for n in range(200_001) if is_prime(n)] == [n for n in range(200_001) if flags[n]]


def test_is_prime_large_and_pseudoprimes():
    assert is_prime(2**61 - 1) and is_prime(2**89 - 1) and is_prime(1_000_000_007)
    # Carmichael numbers and strong pseudoprimes to small bases are composite
    for n in (561, 41041, 825265, 2047, 1373653, 25326001, 3215031751, 2152302898747, 3474749660383,
              341550071728321, 3825123056546413051, (2**61 - 1) * (2**31 - 1)):
        assert not is_prime(n), n


def test_definition_by_brute_force():
    flags = _sieve(5000)
    for ctx in (1, 7, 512):
        for tokens in range(3 * ctx, 3 * ctx + 4000 * ctx, 37 * ctx + 5):
            slots = tokens // ctx
            expected = max((q for q in range(2, slots) if flags[q] and q % 3 == 2), default=None)
            assert magic_prime(tokens, ctx) == expected, (tokens, ctx)


def test_check_accepts_computed_and_rejects_wrong():
    for tokens, ctx in ((1_498_226_207, 512), (12_960_789, 4096), (127_381_830, 4096)):
        check_magic_prime(magic_prime(tokens, ctx), tokens, ctx)
    tokens, ctx = 12_960_789, 4096  # 3164 slots; 3137 is right
    for bad, why in ((3139, "not prime"), (3163, "% 3"), (2801, "(0.9, 1]"), (3167, "(0.9, 1]")):
        with pytest.raises(UserError) as e:
            check_magic_prime(bad, tokens, ctx)
        assert why in str(e.value) and "--magic_prime 3137" in str(e.value)
    with pytest.raises(UserError, match="fewer than 3 x ctx_len"):
        check_magic_prime(2, 100, 512)


def test_invalid_arguments():
    with pytest.raises(UserError):
        magic_prime(1000, 0)
    with pytest.raises(UserError):
        magic_prime(-1, 512)


def _exact_factor(p):
    getcontext().prec = 80
    return int((Decimal(p) * (Decimal(5).sqrt() - 1) / 2).to_integral_value(rounding="ROUND_FLOOR"))


def test_golden_factor_exact_and_equal_to_float_formula_in_range():
    for p in (2, 3, 5, 11, 113, 3137, 31091, 2_926_181, 1_000_003, 4_294_967_291):
        assert golden_factor(p) == int(p * (math.sqrt(5) - 1) / 2) == _exact_factor(p)
    for p in range(1, 20000):
        assert golden_factor(p) == int(p * (math.sqrt(5) - 1) / 2)
    # far past float precision the exact value still holds
    for p in (2**89 - 1, 10**40 + 121, 3**100):
        assert golden_factor(p) == _exact_factor(p)


def test_sample_start_formula_and_bijection():
    for p, ctx in ((2_926_181, 512), (3_137, 4096)):
        f = int(p * (math.sqrt(5) - 1) / 2)
        for ii in (1, 2, 3, 40320, 40321, 123_456_789):
            assert sample_start(ii, p, ctx) == ((f * ii * ii * ii) % p) * ctx
    for p in (5, 11, 17, 113, 3137):
        starts = {sample_start(ii, p, 4096) for ii in range(1, p + 1)}
        assert starts == {k * 4096 for k in range(p)}
