"""Unbiased Gaussian-kernel MMD^2 against closed forms and a dense reference."""
import math

import torch
from scipy import stats

from evalp_prior.metrics import median_bandwidth, mmd2_unbiased
from evalp_prior.metrics.mmd import mmd2_permutation_null, mmd2_with_stderr


def _closed_form_shift(d: int, delta: torch.Tensor, s: float) -> float:
    """MMD^2 between N(0, I_d) and N(delta, I_d) for k(a, b) = exp(-||a - b||^2 / (2 s^2)).

    With w ~ N(m, 2 I_d) (a difference of two independent draws), E exp(-||w||^2 / (2 s^2)) =
    (s^2 / (s^2 + 2))^(d/2) exp(-||m||^2 / (2 (s^2 + 2))); m = 0 within a sample, m = delta across, so
    MMD^2 = 2 (s^2 / (s^2 + 2))^(d/2) (1 - exp(-||delta||^2 / (2 (s^2 + 2)))).
    """
    c = (s * s / (s * s + 2)) ** (d / 2)
    return 2 * c * (1 - math.exp(-delta.square().sum().item() / (2 * (s * s + 2))))


def test_gaussian_shift_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    d, delta, bandwidths = 4, torch.tensor([1.0, 0.5, 0.0, 0.0]), (1.0, 2.0)
    x = torch.randn(3000, d, generator=g)
    y = torch.randn(3000, d, generator=g) + delta
    expected = sum(_closed_form_shift(d, delta, s) for s in bandwidths)  # 0.130
    # Monte Carlo std of the estimate at this size is about 0.005 (measured over repeats).
    assert abs(mmd2_unbiased(x, y, bandwidths).item() - expected) < 0.02


def test_same_distribution_is_near_zero():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2000, 5, generator=g), torch.randn(2000, 5, generator=g)
    assert abs(mmd2_unbiased(x, y).item()) < 2e-3  # about 5 Monte Carlo standard deviations


def test_blocked_estimate_equals_dense_formula():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(37, 3, 2, generator=g), torch.randn(23, 3, 2, generator=g) + 0.3
    bandwidths = (0.7, 1.9)
    xf, yf = x.flatten(1).double(), y.flatten(1).double()

    def gram(a, b):
        d2 = torch.cdist(a, b).square()
        return sum(torch.exp(-d2 / (2 * s * s)) for s in bandwidths)

    n, m = len(xf), len(yf)
    k_xx, k_yy = gram(xf, xf), gram(yf, yf)
    dense = (
        (k_xx.sum() - k_xx.diagonal().sum()) / (n * (n - 1))
        + (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
        - 2 * gram(xf, yf).mean()
    )
    torch.testing.assert_close(mmd2_unbiased(x, y, bandwidths, block_size=5), dense)
    # Default bandwidths are median * (0.5, 1, 2).
    med = median_bandwidth(x, y).item()
    torch.testing.assert_close(
        mmd2_unbiased(x, y), mmd2_unbiased(x, y, [0.5 * med, med, 2 * med], block_size=5)
    )


def test_median_bandwidth_matches_chi_square_median():
    # Pairwise distances of N(0, I_d) points are sqrt(2 chi^2_d).
    g = torch.Generator().manual_seed(3)
    d = 6
    x, y = torch.randn(800, d, generator=g), torch.randn(800, d, generator=g)
    expected = math.sqrt(2 * stats.chi2(d).median())
    assert abs(median_bandwidth(x, y).item() / expected - 1) < 0.02
    assert abs(median_bandwidth(x, y, max_points=500).item() / expected - 1) < 0.04


def test_permutation_null_statistic_is_the_unbiased_mmd_and_detects_a_shift():
    g = torch.Generator().manual_seed(3)
    x, same, shifted = (torch.randn(150, 5, generator=g) for _ in range(3))
    shifted = shifted + 0.5
    bandwidths = [1.0, 2.0]
    for y in (same, shifted):
        null = mmd2_permutation_null(x, y, bandwidths, permutations=40)
        torch.testing.assert_close(torch.tensor(null["mmd2"]), mmd2_unbiased(x, y, bandwidths).float(),
                                   rtol=1e-6, atol=1e-9)
    assert mmd2_permutation_null(x, shifted, bandwidths, 40)["p_value"] == 1 / 41  # beyond every relabelling
    assert mmd2_permutation_null(x, same, bandwidths, 40)["p_value"] > 0.05
    # The null's spread is the noise floor: a shift's MMD^2 stands far above it, the same law's does not.
    floor = mmd2_permutation_null(x, same, bandwidths, 40)["null_std"]
    assert mmd2_unbiased(x, shifted, bandwidths) > 10 * floor > abs(float(mmd2_unbiased(x, same, bandwidths))) / 3


def test_fold_stderr_matches_the_spread_over_repeated_draws():
    """Away from the null the fold standard error estimates the full estimate's spread (within a factor 2)."""
    g = torch.Generator().manual_seed(4)
    estimates, errors = [], []
    for _ in range(30):
        x, y = torch.randn(200, 3, generator=g), torch.randn(200, 3, generator=g) * 1.3 + 0.3
        out = mmd2_with_stderr(x, y, [1.5], folds=10)
        estimates.append(out["mmd2"])
        errors.append(out["stderr"])
    spread = torch.tensor(estimates).std().item()
    mean_error = sum(errors) / len(errors)
    assert 0.5 * spread < mean_error < 2.0 * spread, (spread, mean_error)
    assert math.isnan(mmd2_with_stderr(torch.randn(3, 2), torch.randn(3, 2), [1.0])["stderr"])  # too few for two folds
