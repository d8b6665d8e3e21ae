import math

import pytest

from lorakit.ops.grid import cdiv, next_pow2


@pytest.mark.parametrize("a", [0, 1, 15, 16, 17, 4096, 4097])
@pytest.mark.parametrize("b", [1, 16, 128])
def test_cdiv_is_the_ceiling(a, b):
    assert cdiv(a, b) == math.ceil(a / b)


def test_next_pow2_against_a_scan():
    for n in range(0, 1100):
        expected = 1
        while expected < n:
            expected *= 2
        assert next_pow2(n) == expected, n
