"""Spectrum of ΔW = s·BA from the factors vs the full product (float64), and rank measures by hand."""

import math

import pytest
import torch

from lorakit.analysis.spectrum import effective_rank, energy_curve, lowrank_singular_values, lowrank_svd, stable_rank


@pytest.mark.parametrize("d,k,r,scale", [(40, 30, 8, 2.0), (16, 64, 4, 0.5), (6, 5, 8, 1.0), (5, 50, 16, 3.0)])
def test_factor_spectrum_equals_full_svd(d, k, r, scale):
    g = torch.Generator().manual_seed(d * k + r)
    A = torch.randn(r, k, generator=g, dtype=torch.float64)
    B = torch.randn(d, r, generator=g, dtype=torch.float64)
    full = torch.linalg.svdvals(scale * B @ A)[: min(r, d, k)]
    got = lowrank_singular_values(A, B, scale)
    assert got.shape == full.shape
    torch.testing.assert_close(got, full, rtol=1e-10, atol=1e-10)


def test_lowrank_svd_is_an_svd_of_the_product():
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(6, 20, generator=g, dtype=torch.float64), torch.randn(12, 6, generator=g, dtype=torch.float64)
    svd = lowrank_svd(A, B, 1.5)
    torch.testing.assert_close(svd.U @ torch.diag(svd.S) @ svd.V.T, 1.5 * B @ A)
    torch.testing.assert_close(svd.U.T @ svd.U, torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(svd.V.T @ svd.V, torch.eye(6, dtype=torch.float64))
    assert torch.all(svd.S[:-1] >= svd.S[1:])


def test_float32_factors_are_computed_in_float64():
    A, B = torch.randn(4, 9), torch.randn(7, 4)
    got = lowrank_singular_values(A, B)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.linalg.svdvals(B.double() @ A.double())[:4])


def test_rank_measures_by_hand():
    # σ = 3, 2, 1, 0: energies 9/14 = 0.643, 13/14 = 0.929, 14/14.
    sigma = torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(energy_curve(sigma), torch.tensor([9 / 14, 13 / 14, 1.0, 1.0], dtype=torch.float64))
    assert effective_rank(sigma, 0.60) == 1
    assert effective_rank(sigma, 0.90) == 2
    assert effective_rank(sigma, 0.95) == 3
    assert effective_rank(sigma, 0.99) == 3
    assert math.isclose(stable_rank(sigma), 14 / 9)


def test_exact_rank_three_update_has_effective_rank_three_at_every_level():
    g = torch.Generator().manual_seed(2)
    A = torch.cat([torch.randn(3, 30, generator=g, dtype=torch.float64), torch.zeros(5, 30, dtype=torch.float64)])
    B = torch.randn(20, 8, generator=g, dtype=torch.float64)
    sigma = lowrank_singular_values(A, B, 2.0)
    assert [effective_rank(sigma, e) for e in (0.999, 0.99, 0.95)] == [3, 3, 3]
    assert sigma[3:].abs().max() < 1e-10 * sigma[0]


def test_zero_update():
    sigma = lowrank_singular_values(torch.randn(4, 10), torch.zeros(8, 4))
    assert effective_rank(sigma) == 0 and stable_rank(sigma) == 0.0
    assert energy_curve(sigma).sum() == 0
