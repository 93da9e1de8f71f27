"""Prior-hole MMD: unbiased squared MMD with Gaussian kernels (SPEC section 5)."""
from __future__ import annotations

from typing import Sequence

import torch

MEDIAN_MULTIPLIERS = (0.5, 1.0, 2.0)


def median_bandwidth(x: torch.Tensor, y: torch.Tensor, max_points: int = 2000) -> torch.Tensor:
    """Median heuristic: the median Euclidean distance between distinct points of the pooled sample.

    x (n, ...) and y (m, ...) are flattened per row. Above ``max_points`` pooled points a fixed-seed
    random subset of that size is used (the median of ~2M pairs is already stable, and all pairs of a
    10k sample would not fit in memory). Returns a 0-dim float64 tensor.
    """
    pooled = torch.cat([x.flatten(1), y.flatten(1)]).double()
    if pooled.shape[0] > max_points:
        # A fixed seed keeps the metric deterministic and independent of the global RNG.
        keep = torch.randperm(pooled.shape[0], generator=torch.Generator().manual_seed(0))[:max_points]
        pooled = pooled[keep.to(pooled.device)]
    return torch.pdist(pooled).median()


def _kernel_sum(
    a: torch.Tensor, b: torch.Tensor, bandwidths: Sequence[float], block_size: int, skip_diagonal: bool
) -> torch.Tensor:
    """sum_{i,j} sum_s exp(-||a_i - b_j||^2 / (2 s^2)), rows of a in blocks; i == j skipped if asked."""
    total = a.new_zeros(())
    b_sq = b.square().sum(1)  # (m,)
    for start in range(0, a.shape[0], block_size):
        a_blk = a[start : start + block_size]  # (k, d)
        d2 = (a_blk.square().sum(1, keepdim=True) + b_sq - 2 * a_blk @ b.T).clamp_min(0)  # (k, m)
        k = sum(torch.exp(d2 / (-2.0 * s * s)) for s in bandwidths)
        if skip_diagonal:
            rows = torch.arange(a_blk.shape[0], device=a.device)
            k[rows, start + rows] = 0
        total = total + k.sum()
    return total


def mmd2_unbiased(
    x: torch.Tensor,
    y: torch.Tensor,
    bandwidths: Sequence[float] | None = None,
    block_size: int = 1024,
) -> torch.Tensor:
    """Unbiased estimate of MMD^2 between samples x (n, ...) and y (m, ...), rows flattened.

    Kernel k(a, b) = sum_s exp(-||a - b||^2 / (2 s^2)) over ``bandwidths``; by default s = median *
    (0.5, 1, 2) with the median heuristic of :func:`median_bandwidth`. Computed in float64 in row blocks
    of ``block_size`` (memory O(block_size * max(n, m))), so n = m = 5000 in 320 dims is cheap. The
    estimate can be slightly negative when the distributions agree. Returns a 0-dim float64 tensor.
    """
    x, y = x.flatten(1).double(), y.flatten(1).double()
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"the unbiased MMD needs at least 2 samples on each side, got {n} and {m}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"samples differ in dimension: {x.shape[1]} vs {y.shape[1]}")
    if bandwidths is None:
        median = float(median_bandwidth(x, y))
        bandwidths = [median * c for c in MEDIAN_MULTIPLIERS]
    k_xx = _kernel_sum(x, x, bandwidths, block_size, skip_diagonal=True) / (n * (n - 1))
    k_yy = _kernel_sum(y, y, bandwidths, block_size, skip_diagonal=True) / (m * (m - 1))
    k_xy = _kernel_sum(x, y, bandwidths, block_size, skip_diagonal=False) / (n * m)
    return k_xx + k_yy - 2 * k_xy


def posterior_bandwidth(z_post: torch.Tensor, max_points: int = 2000) -> torch.Tensor:
    """Median-heuristic bandwidth from aggregate-posterior samples (n, ...) alone, 0-dim float64.

    Fixing the kernel by the posterior side only gives every prior compared against it the same kernel,
    so their prior-hole MMDs are comparable numbers.
    """
    flat = z_post.flatten(1)
    half = flat.shape[0] // 2
    return median_bandwidth(flat[:half], flat[half:], max_points)  # pooled halves = the sample itself


def prior_hole_mmd(z_post: torch.Tensor, z_prior: torch.Tensor, bandwidth: float,
                   permutations: int = 0) -> dict[str, float]:
    """Unbiased MMD^2 between posterior and prior samples at one fixed bandwidth s (``mmd2``) and summed
    over s * MEDIAN_MULTIPLIERS (``mmd2_multi``, with its fold standard error ``mmd2_multi_stderr``); with
    ``permutations`` > 0 also the estimator's two-sample noise floor at these sizes (``null_std_multi``,
    the permutation null's standard deviation) and the permutation test's ``p_value``."""
    multi = [bandwidth * c for c in MEDIAN_MULTIPLIERS]
    with_error = mmd2_with_stderr(z_post, z_prior, multi)
    out = {"mmd2": float(mmd2_unbiased(z_post, z_prior, [bandwidth])), "mmd2_multi": with_error["mmd2"],
           "mmd2_multi_stderr": with_error["stderr"]}
    if permutations:
        null = mmd2_permutation_null(z_post, z_prior, multi, permutations)
        out.update(null_std_multi=null["null_std"], p_value=null["p_value"])
    return out


def mmd2_with_stderr(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float], folds: int = 10) -> dict[str, float]:
    """The unbiased MMD^2 of all of x and y, and its standard error from ``folds`` disjoint folds.

    Row i of x and of y goes to fold i mod folds; the standard error is std(fold estimates) / sqrt(folds).
    Away from the null a fold estimate's variance is about ``folds`` times the full one's, so this is the
    full estimate's error; at the null it overstates it (the variance there falls as 1/n^2): conservative.
    """
    x, y = x.flatten(1), y.flatten(1)
    folds = min(folds, x.shape[0] // 2, y.shape[0] // 2)  # every fold needs two samples a side
    full = float(mmd2_unbiased(x, y, bandwidths))
    if folds < 2:
        return {"mmd2": full, "stderr": float("nan"), "folds": folds}
    per_fold = torch.stack([mmd2_unbiased(x[f::folds], y[f::folds], bandwidths) for f in range(folds)])
    return {"mmd2": full, "stderr": float(per_fold.std() / folds ** 0.5), "folds": folds}


def mmd2_permutation_null(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float], permutations: int = 50,
                          seed: int = 0) -> dict[str, float]:
    """The two-sample noise floor of the unbiased MMD^2 at these sample sizes: its mean and standard deviation
    over random relabellings of the pooled x and y (the permutation null), and the permutation p-value of the
    observed MMD^2. One pooled kernel matrix is built once and re-indexed, so each permutation is cheap.
    """
    x, y = x.flatten(1).double(), y.flatten(1).double()
    n, m = x.shape[0], y.shape[0]
    pooled = torch.cat([x, y])
    sq = pooled.square().sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * pooled @ pooled.T).clamp_min(0)
    kernel = sum(torch.exp(d2 / (-2.0 * s * s)) for s in bandwidths)
    kernel.fill_diagonal_(0)

    def statistic(labels: torch.Tensor) -> torch.Tensor:
        a = labels.double()  # 1 for the x side
        b = 1 - a
        return (a @ kernel @ a / (n * (n - 1)) + b @ kernel @ b / (m * (m - 1)) - 2 * (a @ kernel @ b) / (n * m))

    observed = statistic(torch.cat([torch.ones(n), torch.zeros(m)]))
    generator = torch.Generator().manual_seed(seed)
    null = torch.stack([statistic(torch.cat([torch.ones(n), torch.zeros(m)])[torch.randperm(n + m, generator=generator)])
                        for _ in range(permutations)])
    return {"mmd2": float(observed), "null_mean": float(null.mean()), "null_std": float(null.std()),
            "p_value": (int((null >= observed).sum()) + 1) / (permutations + 1), "permutations": permutations}
