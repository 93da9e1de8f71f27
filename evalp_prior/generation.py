"""Sampling images from a trained NVAE with its Gaussian prior or the EVaLP prior (optionally with SIR)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from nvae.hooks import PriorHook
from nvae.model import NVAE
from nvae.runtime import CheckpointError, load_checkpoint
from nvae.train import load_trained_nvae, sample_images

from .sir import SIR_WEIGHTS
from .train import TrainedEVaLP, load_evalp

PRIORS = ("gaussian", "evalp")


@dataclass
class SamplingSetup:
    """A loaded checkpoint: the NVAE, and the fitted EVaLP prior when the checkpoint is stage 2."""

    vae: NVAE
    evalp: Optional[TrainedEVaLP]


def load_for_sampling(path: Path, device: torch.device) -> SamplingSetup:
    """Accept a stage-1 ('nvae') or stage-2 ('evalp') checkpoint."""
    kind = load_checkpoint(path, map_location="cpu")["kind"]
    if kind == "evalp":
        trained = load_evalp(path, device)
        return SamplingSetup(trained.vae, trained)
    if kind == "nvae":
        vae, _, _ = load_trained_nvae(path, device)
        return SamplingSetup(vae, None)
    raise CheckpointError(f"{path} is a {kind!r} checkpoint; expected a stage-1 or stage-2 one")


def build_prior(setup: SamplingSetup, prior: str, sir: Optional[int], sir_weights: str,
                sir_groups: Optional[Sequence[int]], sir_chunk: int) -> tuple[Optional[PriorHook], Optional[PriorHook]]:
    """(sampling hook, BN re-adjustment hook) for `prior`; checks that the request fits the checkpoint.

    BN statistics are re-estimated with the EVaLP sampler alone: with SIR they would cost M proposals
    for every re-adjustment image, for a shift in decoder statistics that resampling barely changes.
    """
    if prior not in PRIORS:
        raise ValueError(f"--prior must be one of {PRIORS}, got {prior!r}")
    if sir is not None and sir < 1:
        raise ValueError(f"--sir needs at least 1 proposal, got {sir}")
    if sir_weights not in SIR_WEIGHTS:
        raise ValueError(f"--sir-weights must be one of {SIR_WEIGHTS}, got {sir_weights!r}")
    if sir_chunk < 1:
        raise ValueError(f"--sir-chunk must be >= 1, got {sir_chunk}")
    if prior == "gaussian":
        if sir:
            raise ValueError("--sir resamples with the EVaLP energy; use it with --prior evalp")
        return None, None
    if setup.evalp is None:
        raise ValueError("this is a stage-1 checkpoint: it has no EVaLP prior; use --prior gaussian or a stage-2 checkpoint")
    hook = setup.evalp.prior(sir_proposals=sir or 0, sir_weights=sir_weights,
                             sir_groups=list(sir_groups) if sir_groups is not None else None, sir_chunk=sir_chunk)
    return hook, setup.evalp.prior()


def generate(vae: NVAE, prior: Optional[PriorHook], num: int, temperature: float, batch_size: int = 64,
             bn_batches: int = 20, seed: int = 0, bn_prior: Optional[PriorHook] = None) -> torch.Tensor:
    """(num, C, H, W) images in [0, 1]: BN re-adjusted at the temperature (with bn_prior, default prior), then sampled."""
    if num < 1:
        raise ValueError(f"--n must be >= 1, got {num}")
    if not temperature > 0:
        raise ValueError(f"--temperature must be > 0, got {temperature}")
    torch.manual_seed(seed)
    return sample_images(vae, num, temperature, prior, bn_batches=bn_batches, batch_size=batch_size, bn_prior=bn_prior)


def save_outputs(images: torch.Tensor, png: Path, npz: Optional[Path] = None, nrow: Optional[int] = None) -> None:
    """PNG grid (and optionally an .npz of uint8 images), each written to a temporary file then renamed."""
    import torchvision.utils

    png.parent.mkdir(parents=True, exist_ok=True)
    grid = torchvision.utils.make_grid(images.float().cpu(), nrow=nrow or max(1, math.isqrt(images.shape[0])), padding=2)
    tmp = png.with_name(f".{png.name}.{os.getpid()}.tmp")
    try:
        torchvision.utils.save_image(grid, tmp, format="png")
        os.replace(tmp, png)
    finally:
        tmp.unlink(missing_ok=True)
    if npz is not None:
        npz.parent.mkdir(parents=True, exist_ok=True)
        data = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, C)
        tmp = npz.with_name(f".{npz.stem}.{os.getpid()}.tmp.npz")
        try:
            np.savez_compressed(tmp, images=data)
            os.replace(tmp, npz)
        finally:
            tmp.unlink(missing_ok=True)
