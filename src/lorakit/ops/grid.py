"""Host-side arithmetic for kernel launch grids, in plain Python integers.

``triton.cdiv`` and ``triton.next_power_of_2`` are wrapped as constexpr functions in recent Triton
releases, which makes each host call cost microseconds; a mixed-adapter forward makes several per
layer, so the launch code uses these instead.
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for positive b."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two ≥ n (1 for n ≤ 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
