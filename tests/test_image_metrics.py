"""KID and precision/recall on feature vectors: brute force, identities, and the cases that must separate."""
from __future__ import annotations

import itertools

import pytest
import torch

from evalp_prior.metrics.mmd import kernel_inception_distance
from evalp_prior.metrics.precision_recall import precision_recall


def _kid_brute_force(x: torch.Tensor, y: torch.Tensor) -> float:
    """The unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, by explicit loops over pairs."""
    d = x.shape[1]
    k = lambda a, b: (float(a @ b) / d + 1) ** 3  # noqa: E731
    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    xy = sum(k(a, b) for a in x for b in y) / (n * m)
    return xx + yy - 2 * xy


def test_kid_equals_brute_force_and_carries_counts():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 5, generator=g, dtype=torch.float64), 1.3 * torch.randn(30, 5, generator=g, dtype=torch.float64)
    out = kernel_inception_distance(x, y, folds=3)
    assert out["kid"] == pytest.approx(_kid_brute_force(x, y), rel=1e-10)
    assert out["num_samples"] == 12 and out["reference_images"] == 30 and out["folds"] == 3 and out["kid_stderr"] > 0


def test_kid_is_zero_in_expectation_and_separates_a_shift_beyond_its_stderr():
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(3000, 16, generator=g)
    same = kernel_inception_distance(torch.randn(1000, 16, generator=g), ref)
    shifted = kernel_inception_distance(torch.randn(1000, 16, generator=g) + 0.3, ref)
    assert abs(same["kid"]) < 3 * same["kid_stderr"]
    assert shifted["kid"] > 5 * shifted["kid_stderr"] and shifted["kid"] > 10 * abs(same["kid"])


def test_precision_recall_of_a_set_against_itself_is_one_and_against_a_far_set_zero():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 8, generator=g)
    assert precision_recall(x, x)["precision"] == 1.0 and precision_recall(x, x)["recall"] == 1.0
    far = precision_recall(x, torch.randn(300, 8, generator=g) + 20.0)
    assert far["precision"] == 0.0 and far["recall"] == 0.0
    assert far["k"] == 3 and far["num_real"] == 300 and far["num_generated"] == 300


def test_mode_dropping_costs_recall_not_precision():
    """Generated points from one of two real modes: all are realistic (precision ~1), half the reals are
    not covered (recall ~0.5): the failure SIR or a collapsed sampler would show."""
    g = torch.Generator().manual_seed(3)
    modes = torch.tensor([[-6.0, 0.0], [6.0, 0.0]])
    real = modes[torch.arange(2000) % 2] + torch.randn(2000, 2, generator=g)
    one_mode = modes[0] + torch.randn(2000, 2, generator=g)
    out = precision_recall(real, one_mode)
    assert out["precision"] > 0.95 and 0.4 < out["recall"] < 0.6


def test_precision_recall_rejects_too_few_points():
    with pytest.raises(ValueError, match="needs more than 3 points"):
        precision_recall(torch.randn(3, 2), torch.randn(10, 2))
