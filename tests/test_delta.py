"""delta.py: ΔW = s·BA in each base layout, and the in-place add that refuses non-finite results."""

import pytest
import torch

from lorakit.errors import MergeError
from lorakit.delta import add_delta, delta_weight


def _factors(d: int = 3, k: int = 4, r: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    A = torch.arange(r * k, dtype=torch.float64).reshape(r, k) / 10 - 0.3  # (r, k)
    B = torch.arange(d * r, dtype=torch.float64).reshape(d, r) / 7 + 0.1  # (d, r)
    return A, B


def test_linear_layout_is_s_times_BA_by_hand():
    A = torch.tensor([[1.0, 2.0], [0.0, -1.0]])  # (r=2, k=2)
    B = torch.tensor([[3.0, 1.0]])  # (d=1, r=2)
    # BA = [3·1 + 1·0, 3·2 + 1·(−1)] = [3, 5]; s = 0.5
    assert delta_weight(A, B, 0.5, "linear", torch.Size([1, 2])).tolist() == [[1.5, 2.5]]


@pytest.mark.parametrize("layout,shape", [("transposed", (4, 3)), ("embedding", (4, 3))])
def test_transposed_layouts(layout, shape):
    A, B = _factors()
    got = delta_weight(A, B, 2.0, layout, torch.Size(shape))
    torch.testing.assert_close(got, (2.0 * B @ A).T)


def test_conv_layout_reshapes_to_the_kernel():
    A, B = _factors(d=3, k=2 * 2 * 1, r=2)
    got = delta_weight(A, B, 1.0, "conv", torch.Size([3, 1, 2, 2]))
    torch.testing.assert_close(got.reshape(3, 4), B @ A)


def test_float32_factors_compute_in_float32_and_float64_stays_float64():
    A, B = _factors()
    assert delta_weight(A.half(), B.half(), 1.0, "linear", torch.Size([3, 4])).dtype == torch.float32
    assert delta_weight(A, B, 1.0, "linear", torch.Size([3, 4])).dtype == torch.float64


def test_shape_mismatch_is_a_merge_error():
    A, B = _factors()
    with pytest.raises(MergeError, match=r"\(3, 4\).*\(4, 3\)"):
        delta_weight(A, B, 1.0, "linear", torch.Size([4, 3]))


def test_add_then_subtract_restores_the_weight():
    A, B = _factors()
    weight = torch.randn(3, 4, dtype=torch.float64)
    before = weight.clone()
    delta = delta_weight(A, B, 0.7, "linear", weight.shape)
    add_delta(weight, delta, +1)
    torch.testing.assert_close(weight, before + delta)
    add_delta(weight, delta, -1)
    torch.testing.assert_close(weight, before)


def test_non_finite_result_leaves_the_weight_unchanged():
    weight = torch.ones(2, 2)
    before = weight.clone()
    delta = torch.tensor([[0.0, float("inf")], [0.0, 0.0]])
    with pytest.raises(MergeError, match="non-finite"):
        add_delta(weight, delta, what="layer 'q'")
    assert torch.equal(weight, before)
