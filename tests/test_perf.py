"""perf.throughput_line: the summary line's numbers, computed by hand."""

from __future__ import annotations

from lorakit.perf import throughput_line


def test_cpu_line_has_rate_and_no_memory() -> None:
    assert throughput_line(1000, 2.0, "cpu") == "500 tokens/s over 1,000 tokens in 2.0 s"


def test_large_counts_are_grouped() -> None:
    assert throughput_line(131_072, 1.75, "cpu") == "74,898 tokens/s over 131,072 tokens in 1.8 s"


def test_zero_seconds_is_not_a_crash() -> None:
    assert throughput_line(10, 0.0, "cpu").startswith("nan tokens/s")
