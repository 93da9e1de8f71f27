"""The comparison figures: the PCA projection against numpy's eigendecomposition, and that each figure is drawn."""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks.figures import pca_fit, pca_project, plot_bars, plot_prior_hole, plot_sample_grids


def test_pca_projection_equals_numpys_eigendecomposition():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)) @ rng.normal(size=(5, 5)) + 3.0
    mean, components = pca_fit(x, dims=2)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(x, rowvar=False))
    top = eigenvectors[:, ::-1][:, :2].T  # the two largest-variance directions
    reference = (x - x.mean(0)) @ top.T
    projected = pca_project(x, mean, components)
    for k in range(2):  # equal up to each axis's sign, which pca_fit fixes by its own convention
        sign = np.sign(projected[:, k] @ reference[:, k])
        np.testing.assert_allclose(projected[:, k], sign * reference[:, k], rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(projected.var(0, ddof=1), eigenvalues[::-1][:2], rtol=1e-8)
    assert all(c[np.abs(c).argmax()] > 0 for c in components)


def test_figures_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(1)
    post = rng.normal(size=(300, 8))
    plot_prior_hole(post, {"gaussian": rng.normal(size=(300, 8)), "evalp": post + 0.1}, tmp_path / "pca.png")
    plot_sample_grids({"a": rng.random((10, 1, 6, 6)), "b": rng.random((10, 1, 6, 6))}, tmp_path / "grid.png", columns=4)
    plot_bars(["a", "b"], {"FID": ([1.0, 2.0], [0.1, 0.2])}, tmp_path / "bars.png")
    for name in ("pca.png", "grid.png", "bars.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
