"""Normalised subspace similarity φ(U₁, U₂, i, j) = ‖U₁ᵢᵀU₂ⱼ‖²_F / min(i, j)."""

import pytest
import torch

from lorakit.analysis import AnalysisError
from lorakit.analysis.subspace import captured_energy, similarity_grid, subspace_similarity


def _basis(n, r, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0]


def test_identical_subspaces_give_one_everywhere():
    U = _basis(64, 8, 0)
    torch.testing.assert_close(similarity_grid(U, U), torch.ones(8, 8, dtype=torch.float64))
    # a subspace nested in a larger one: every φ(i, j) is 1 (top-i of U lies in top-j of V for i ≤ j, and vice versa)
    V = torch.linalg.qr(torch.cat([U, torch.randn(64, 8, dtype=torch.float64)], 1))[0]
    V[:, :8] = U  # keep U's columns, in order, as V's first columns
    torch.testing.assert_close(similarity_grid(U, V)[:, 7:], torch.ones(8, 9, dtype=torch.float64))


def test_hand_computed_value():
    e1 = torch.tensor([[1.0], [0.0], [0.0]], dtype=torch.float64)
    diag = torch.tensor([[1.0], [1.0], [0.0]], dtype=torch.float64) / 2**0.5
    assert subspace_similarity(e1, diag) == pytest.approx(0.5)  # cos² 45°
    two = torch.eye(3, dtype=torch.float64)[:, :2]
    assert subspace_similarity(diag, two) == pytest.approx(1.0)  # diag lies in span(e1, e2)


def test_random_subspaces_are_near_max_ij_over_n():
    n, values = 512, []
    for seed in range(10):
        values.append(subspace_similarity(_basis(n, 8, seed), _basis(n, 32, 100 + seed)))
    mean = sum(values) / len(values)
    assert mean == pytest.approx(32 / n, rel=0.25)
    assert max(values) < 0.15


def test_symmetric_in_its_arguments():
    U1, U2 = _basis(50, 4, 1), _basis(50, 7, 2)
    torch.testing.assert_close(similarity_grid(U1, U2), similarity_grid(U2, U1).T)
    assert subspace_similarity(U1, U2, 3, 5) == pytest.approx(subspace_similarity(U2, U1, 5, 3))


def test_grid_matches_definition_entrywise():
    U1, U2 = _basis(30, 5, 3), _basis(30, 6, 4)
    grid = similarity_grid(U1, U2)
    for i in range(1, 6):
        for j in range(1, 7):
            direct = torch.linalg.matrix_norm(U1[:, :i].T @ U2[:, :j]) ** 2 / min(i, j)
            assert grid[i - 1, j - 1] == pytest.approx(float(direct))


def test_captured_energy():
    U = torch.eye(4, dtype=torch.float64)
    S = torch.tensor([3.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    assert captured_energy(U[:, :1], U, S) == pytest.approx(0.9)       # 9 of 10
    assert captured_energy(U[:, 1:3], U, S) == pytest.approx(0.1)


def test_bad_shapes_are_named():
    with pytest.raises(AnalysisError, match="bases of one space"):
        similarity_grid(_basis(10, 2, 0), _basis(12, 2, 0))
    with pytest.raises(AnalysisError, match="1 ≤ i ≤ 2"):
        subspace_similarity(_basis(10, 2, 0), _basis(10, 2, 1), 3, 1)
