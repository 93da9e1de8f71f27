"""Improved precision and recall (Kynkaanniemi et al. 2019) on feature vectors.

Each set's manifold is the union of balls around its points, a ball's radius the distance to the point's
k-th nearest neighbour within its own set. Precision is the fraction of generated points inside the real
manifold (sample quality); recall the fraction of real points inside the generated manifold (coverage:
a prior that drops modes loses recall). SIR can raise one at the cost of the other, so both are reported.
Both sets should hold the same number of points: a k-NN radius depends on the density of its set.
"""
from __future__ import annotations

import torch

DEFAULT_K = 3  # the paper's choice


def _kth_neighbour_radius(x: torch.Tensor, k: int, block_size: int) -> torch.Tensor:
    """(n,) distance from each row of x to its k-th nearest other row."""
    radii = []
    for start in range(0, x.shape[0], block_size):
        d = torch.cdist(x[start : start + block_size], x)  # (b, n); the point itself is at distance 0
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block_size: int) -> torch.Tensor:
    """(len(points),) bool: whether each point lies in some ball (centre, radius)."""
    hits = []
    for start in range(0, points.shape[0], block_size):
        d = torch.cdist(points[start : start + block_size], centres)  # (b, m)
        hits.append((d <= radii).any(dim=1))
    return torch.cat(hits)


def precision_recall(real: torch.Tensor, generated: torch.Tensor, k: int = DEFAULT_K,
                     block_size: int = 1024) -> dict[str, float]:
    """Precision and recall of generated (m, d) against real (n, d) features, float64, k-NN radius k."""
    real, generated = real.flatten(1).double(), generated.flatten(1).double()
    if min(real.shape[0], generated.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points per set, "
                         f"got {real.shape[0]} real and {generated.shape[0]} generated")
    if real.shape[1] != generated.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} vs {generated.shape[1]}")
    real_radii = _kth_neighbour_radius(real, k, block_size)
    generated_radii = _kth_neighbour_radius(generated, k, block_size)
    return {"precision": float(_inside(generated, real, real_radii, block_size).double().mean()),
            "recall": float(_inside(real, generated, generated_radii, block_size).double().mean()),
            "k": k, "num_real": int(real.shape[0]), "num_generated": int(generated.shape[0])}
