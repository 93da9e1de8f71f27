"""Unbiased squared MMD: the prior-hole MMD with Gaussian kernels (SPEC section 5) and KID, its polynomial-kernel
form on Inception features."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

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


Kernel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (k, d), (m, d) -> (k, m) kernel matrix


def gaussian_kernel(bandwidths: Sequence[float]) -> Kernel:
    """k(a, b) = sum_s exp(-||a - b||^2 / (2 s^2)) over the bandwidths s."""
    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d2 = (a.square().sum(1, keepdim=True) + b.square().sum(1) - 2 * a @ b.T).clamp_min(0)
        return sum(torch.exp(d2 / (-2.0 * s * s)) for s in bandwidths)
    return kernel


def polynomial_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KID's kernel (Binkowski et al. 2018): k(a, b) = (a . b / d + 1)^3, d the feature dimension."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def _kernel_sum(a: torch.Tensor, b: torch.Tensor, kernel: Kernel, block_size: int, skip_diagonal: bool) -> torch.Tensor:
    """sum_{i,j} k(a_i, b_j), rows of a in blocks; i == j skipped if asked."""
    total = a.new_zeros(())
    for start in range(0, a.shape[0], block_size):
        k = kernel(a[start : start + block_size], b)  # (k, m)
        if skip_diagonal:
            rows = torch.arange(k.shape[0], device=a.device)
            k[rows, start + rows] = 0
        total = total + k.sum()
    return total


def mmd2_unbiased(
    x: torch.Tensor,
    y: torch.Tensor,
    bandwidths: Sequence[float] | None = None,
    block_size: int = 1024,
    kernel: Kernel | None = None,
) -> torch.Tensor:
    """Unbiased estimate of MMD^2 between samples x (n, ...) and y (m, ...), rows flattened.

    Kernel: ``kernel`` if given (e.g. polynomial_kernel for KID), else k(a, b) = sum_s exp(-||a - b||^2 /
    (2 s^2)) over ``bandwidths``; by default s = median * (0.5, 1, 2) with the median heuristic of
    :func:`median_bandwidth`. Computed in float64 in row blocks of ``block_size`` (memory O(block_size *
    max(n, m))), so n = m = 5000 in 320 dims is cheap. The estimate can be slightly negative when the
    distributions agree. Returns a 0-dim float64 tensor.
    """
    x, y = x.flatten(1).double(), y.flatten(1).double()
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"the unbiased MMD needs at least 2 samples on each side, got {n} and {m}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"samples differ in dimension: {x.shape[1]} vs {y.shape[1]}")
    if kernel is None:
        if bandwidths is None:
            median = float(median_bandwidth(x, y))
            bandwidths = [median * c for c in MEDIAN_MULTIPLIERS]
        kernel = gaussian_kernel(bandwidths)
    k_xx = _kernel_sum(x, x, kernel, block_size, skip_diagonal=True) / (n * (n - 1))
    k_yy = _kernel_sum(y, y, kernel, block_size, skip_diagonal=True) / (m * (m - 1))
    k_xy = _kernel_sum(x, y, kernel, block_size, skip_diagonal=False) / (n * m)
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


def prior_hole_mmds(z_post: torch.Tensor, draws: Mapping[str, torch.Tensor], permutations: int = 0) -> dict[str, Any]:
    """THE per-group prior-hole measurement of every prior (evaluation, training diagnostics, baselines): one
    kernel, set by the posterior samples z_post alone (posterior_bandwidth), for each named prior's draws.
    Returns {"bandwidth": s, name: prior_hole_mmd(z_post, draws[name], s, permutations), ...}."""
    bandwidth = float(posterior_bandwidth(z_post))
    return {"bandwidth": bandwidth,
            **{name: prior_hole_mmd(z_post, z, bandwidth, permutations) for name, z in draws.items()}}


def mmd2_with_stderr(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float] | None = None, folds: int = 10,
                     kernel: Kernel | None = None) -> dict[str, float]:
    """The unbiased MMD^2 of all of x and y, and its standard error from ``folds`` disjoint folds.

    Row i of x and of y goes to fold i mod folds; the standard error is std(fold estimates) / sqrt(folds).
    Away from the null a fold estimate's variance is about ``folds`` times the full one's, so this is the
    full estimate's error; at the null it overstates it (the variance there falls as 1/n^2): conservative.
    The kernel is ``kernel`` or the Gaussian kernels of ``bandwidths`` (as mmd2_unbiased).
    """
    if kernel is None and bandwidths is None:
        raise ValueError("mmd2_with_stderr needs bandwidths or a kernel: every fold must use the same kernel")
    x, y = x.flatten(1), y.flatten(1)
    folds = min(folds, x.shape[0] // 2, y.shape[0] // 2)  # every fold needs two samples a side
    full = float(mmd2_unbiased(x, y, bandwidths, kernel=kernel))
    if folds < 2:
        return {"mmd2": full, "stderr": float("nan"), "folds": folds}
    per_fold = torch.stack([mmd2_unbiased(x[f::folds], y[f::folds], bandwidths, kernel=kernel) for f in range(folds)])
    return {"mmd2": full, "stderr": float(per_fold.std() / folds ** 0.5), "folds": folds}


def kernel_inception_distance(features: torch.Tensor, ref_features: torch.Tensor, folds: int = 10) -> dict[str, float]:
    """KID (Binkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial kernel between generated and
    reference Inception features, over all of both sets, with the fold standard error of mmd2_with_stderr
    (disjoint folds, so the error is honest, unlike the spread of overlapping random subsets). Unbiased at
    any sample count, so 1000 samples compare priors fairly where FID's bias (~1/N) would dominate."""
    out = mmd2_with_stderr(features, ref_features, folds=folds, kernel=polynomial_kernel)
    return {"kid": out["mmd2"], "kid_stderr": out["stderr"], "folds": out["folds"],
            "num_samples": int(features.shape[0]), "reference_images": int(ref_features.shape[0])}


def mmd2_permutation_null(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float], permutations: int = 50,
                          seed: int = 0) -> dict[str, float]:
    """The two-sample noise floor of the unbiased MMD^2 at these sample sizes: its mean and standard deviation
    over random relabellings of the pooled x and y (the permutation null), and the permutation p-value of the
    observed MMD^2. One pooled kernel matrix is built once and re-indexed, so each permutation is cheap.
    """
    x, y = x.flatten(1).double(), y.flatten(1).double()
    n, m = x.shape[0], y.shape[0]
    pooled = torch.cat([x, y])
    kernel = gaussian_kernel(bandwidths)(pooled, pooled)
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
