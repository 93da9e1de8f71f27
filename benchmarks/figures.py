"""Figures of the prior comparison (benchmarks/compare_priors.py): the prior hole in a 2-D PCA of the top
group, sample grids side by side, and FID / KID / MMD bars with error bars. matplotlib is imported only
when a figure is drawn (Agg backend: no display needed), so the PCA maths is usable without it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np


def pca_fit(x: np.ndarray, dims: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(mean (d,), components (dims, d)) of the rows of x (n, d): the top right-singular vectors of the
    centred data, each signed so that its largest-magnitude loading is positive (a fixed convention)."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    components = vt[:dims]
    signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(1)])
    return mean, components * signs[:, None]


def pca_project(x: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """(n, dims) coordinates of the rows of x in a fitted PCA."""
    return (np.asarray(x, dtype=np.float64) - mean) @ components.T


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(plt, count: int, width: float, height: float, per_row: int = 4, **kw):
    """A figure of count panels wrapped into rows of at most per_row, and the used axes in reading order (the
    unused ones are hidden): one row of ten panels is too wide to read."""
    rows, columns = -(-count // per_row), min(count, per_row)
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False, **kw)
    flat = list(axes.flat)
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def _save(plt, fig, path: Path, title: str = "", dpi: int = 110) -> None:
    """Title (if any), tight layout, write the PNG (folders created), free the figure."""
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_prior_hole(posterior: np.ndarray, draws: Mapping[str, np.ndarray], path: Path, title: str = "") -> None:
    """One density panel per set: the posterior's top-group samples, then each prior's draws, all projected on
    the PCA of the posterior samples, on shared axes (a hole is where the posterior is empty and a prior is not)."""
    plt = _pyplot()
    mean, components = pca_fit(posterior)
    sets = {"posterior q(z_1)": posterior, **draws}
    projected = {name: pca_project(x, mean, components) for name, x in sets.items()}
    everything = np.concatenate(list(projected.values()))
    lo, hi = np.percentile(everything, [0.5, 99.5], axis=0)
    fig, axes = _panels(plt, len(sets), 3.2, 3.4, sharex=True, sharey=True)
    for ax, (name, xy) in zip(axes, projected.items()):
        ax.hist2d(xy[:, 0], xy[:, 1], bins=60, range=[[lo[0], hi[0]], [lo[1], hi[1]]], cmap="magma")
        ax.set_title(f"{name} (n={len(xy)})", fontsize=9)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    _save(plt, fig, path, title)


def plot_sample_grids(grids: Mapping[str, np.ndarray], path: Path, columns: int = 8) -> None:
    """Sample grids side by side, one per prior: grids[name] is (n, C, H, W) in [0, 1], drawn with one seed."""
    plt = _pyplot()
    fig, axes = _panels(plt, len(grids), 2.6, 2.9, per_row=5)
    for ax, (name, images) in zip(axes, grids.items()):
        n, c, h, w = images.shape
        rows = -(-n // columns)
        canvas = np.ones((rows * (h + 1), columns * (w + 1), c))
        for i, image in enumerate(images):
            r, col = divmod(i, columns)
            canvas[r * (h + 1) : r * (h + 1) + h, col * (w + 1) : col * (w + 1) + w] = image.transpose(1, 2, 0)
        ax.imshow(canvas.squeeze(-1) if c == 1 else canvas, cmap="gray", vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    _save(plt, fig, path, dpi=130)


def plot_bars(labels: Sequence[str], metrics: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: Path,
              note: str = "") -> None:
    """One bar panel per metric: metrics[name] = (means per label, error bars per label)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.4))
    for ax, (name, (means, errors)) in zip(np.atleast_1d(axes), metrics.items()):
        ax.bar(range(len(labels)), means, yerr=errors, capsize=4, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_title(name, fontsize=9)
    _save(plt, fig, path, note)
