"""Importance-weighted negative log-likelihood of the frozen NVAE (Burda et al. 2016, IWAE bound).

log p(x) >= L_K = log (1/K) sum_k p(x | z_k) p(z_k) / q(z_k | x),  z_k ~ q(z | x),
with p(z) NVAE's own hierarchical Gaussian prior: the bound is tractable only for a prior with a
normalised density, so this is the likelihood of the backbone, whatever prior later samples from it.
L_1 is the single-sample ELBO; E[L_K] increases with K towards log p(x).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset

from nvae.model import NVAE
from nvae.train import binarize_if_needed

LN2 = math.log(2.0)


def iw_bound(log_w: torch.Tensor) -> torch.Tensor:
    """L_K (B,) from log-weights (K, B), log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x): logmeanexp over k."""
    log_w = log_w.double()
    return log_w.logsumexp(0) - math.log(log_w.shape[0])


@torch.no_grad()
def importance_weighted_nll(vae: NVAE, x: torch.Tensor, num_samples: int, binarize: bool,
                            chunk: int = 16) -> torch.Tensor:
    """-L_K (B,) in nats for images x (B, C, H, W) in [0, 1], from num_samples posterior passes.

    Binarised data sets draw one binarisation per image, shared by its K samples (the bound is on
    that binary image). The K samples run ``chunk`` at a time as one batch of chunk * B images. The
    model should be in eval mode (BN running statistics), as it is after loading.
    """
    if num_samples < 1 or chunk < 1:
        raise ValueError(f"need num_samples >= 1 and chunk >= 1, got {num_samples} and {chunk}")
    x = binarize_if_needed(x, binarize)
    batch = x.shape[0]
    log_w: list[torch.Tensor] = []
    for start in range(0, num_samples, chunk):
        k = min(chunk, num_samples - start)
        xk = x.repeat(k, *([1] * (x.dim() - 1)))  # row j * B + i is image i
        out = vae.posterior(xk)
        log_px = -vae.reconstruction_nll(out.logits, xk)  # (k * B,)
        # Elementwise log q / log p of each group's z; with shift-only posterior flows log_q is already
        # the density of the flowed z (volume-preserving), so the sum is log q(z|x) - log p(z) exactly.
        log_ratio = sum((st.log_q.float() - st.log_p.float()).flatten(1).sum(1) for st in out.groups)
        log_w.append((log_px.float() - log_ratio).view(k, batch))
    return -iw_bound(torch.cat(log_w))  # from (K, B)


def image_dims(vae: NVAE, x: torch.Tensor) -> int:
    """Pixels per image the likelihood is measured on (C * H * W after the loss crop)."""
    return vae.crop(x[:1]).numel()


@torch.no_grad()
def dataset_nll(vae: NVAE, dataset: Dataset, num_samples: int, num_images: int, binarize: bool,
                batch_size: int = 32, chunk: int = 16, device: Optional[torch.device] = None) -> dict[str, float]:
    """Mean -L_K over the first num_images of dataset: nats per image and bits per dim."""
    if num_images < 1:
        raise ValueError(f"the NLL needs at least 1 image, got {num_images}")
    device = device or next(vae.parameters()).device
    n = min(num_images, len(dataset))
    total, dims = 0.0, 0
    loader = DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size)
    for batch in loader:
        x = batch.to(device)
        total += float(importance_weighted_nll(vae, x, num_samples, binarize, chunk).sum())
        dims = image_dims(vae, x)
    nats = total / n
    return {"nats": nats, "bits_per_dim": nats / (dims * LN2), "num_samples": num_samples, "num_images": n,
            "dims": dims}
