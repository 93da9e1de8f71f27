"""Sampling images from a trained NVAE with its Gaussian prior, the EVaLP prior (optionally with SIR), or a
baseline prior (Langevin-MCMC energy prior, NCP with SIR) fitted to the same frozen NVAE."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from nvae.config import NVAERunConfig
from nvae.hooks import PriorHook
from nvae.model import NVAE
from nvae.runtime import CheckpointError, load_checkpoint
from nvae.train import load_trained_nvae, sample_images

from .baselines.langevin import TrainedLangevin, load_langevin
from .baselines.ncp import TrainedNCP, load_ncp
from .sir import SIR_WEIGHTS
from .train import TrainedEVaLP, load_evalp

PRIORS = ("gaussian", "evalp", "langevin", "ncp")
CHECKPOINT_KINDS = ("nvae", "evalp", "langevin", "ncp")  # the prior each kind carries is its default


@dataclass
class SamplingSetup:
    """A loaded checkpoint: the NVAE, and the fitted prior of a stage-2 (EVaLP) or baseline checkpoint."""

    vae: NVAE
    evalp: Optional[TrainedEVaLP]
    langevin: Optional[TrainedLangevin] = None
    ncp: Optional[TrainedNCP] = None
    vae_cfg: Optional[NVAERunConfig] = None  # the frozen NVAE's run config (data set, architecture)
    kind: str = ""  # the checkpoint's kind, one of CHECKPOINT_KINDS


def load_for_sampling(path: Path, device: torch.device) -> SamplingSetup:
    """Accept a stage-1 ('nvae'), stage-2 ('evalp') or baseline ('langevin', 'ncp') checkpoint."""
    kind = load_checkpoint(path, map_location="cpu")["kind"]
    if kind == "evalp":
        trained = load_evalp(path, device)
        return SamplingSetup(trained.vae, trained, vae_cfg=trained.vae_cfg, kind=kind)
    if kind == "nvae":
        vae, vae_cfg, _ = load_trained_nvae(path, device)
        return SamplingSetup(vae, None, vae_cfg=vae_cfg, kind=kind)
    if kind == "langevin":
        langevin = load_langevin(path, device)
        return SamplingSetup(langevin.base.vae, None, langevin=langevin, vae_cfg=langevin.base.vae_cfg, kind=kind)
    if kind == "ncp":
        ncp = load_ncp(path, device)
        return SamplingSetup(ncp.base.vae, None, ncp=ncp, vae_cfg=ncp.base.vae_cfg, kind=kind)
    raise CheckpointError(f"{path} is a {kind!r} checkpoint; expected one of {', '.join(CHECKPOINT_KINDS)}")


def default_prior(setup: SamplingSetup) -> str:
    """The prior a checkpoint was trained for: gaussian for stage 1, else its own kind."""
    if setup.kind:
        return "gaussian" if setup.kind == "nvae" else setup.kind
    return "evalp" if setup.evalp is not None else "gaussian"  # a setup built by hand, without a kind


def available_priors(setup: SamplingSetup) -> list[str]:
    """The priors a checkpoint can sample with: NVAE's own, and the one it carries."""
    carried = {"evalp": setup.evalp, "langevin": setup.langevin, "ncp": setup.ncp}
    return ["gaussian"] + [name for name, trained in carried.items() if trained is not None]


def build_prior(setup: SamplingSetup, prior: str, sir: Optional[int], sir_weights: str,
                sir_groups: Optional[Sequence[int]], sir_chunk: int, *, langevin_steps: Optional[int] = None,
                langevin_step_size: Optional[float] = None) -> tuple[Optional[PriorHook], Optional[PriorHook]]:
    """(sampling hook, BN re-adjustment hook) for `prior`; checks that the request fits the checkpoint.

    BN statistics are re-estimated with the EVaLP sampler alone: with SIR they would cost M proposals
    for every re-adjustment image, for a shift in decoder statistics that resampling barely changes.
    NCP re-adjusts with its proposal (NVAE's prior) for the same reason; Langevin with its own chain.
    For NCP, --sir is M (default: the checkpoint's), SIR runs at every NCP group unless sir_groups says
    otherwise, and both weightings are the same (proposals from p0 make the exact weight r = exp(-E)).
    """
    if prior not in PRIORS:
        raise ValueError(f"--prior must be one of {PRIORS}, got {prior!r}")
    if sir is not None and sir < 1:
        raise ValueError(f"--sir needs at least 1 proposal, got {sir}")
    if sir_weights not in SIR_WEIGHTS:
        raise ValueError(f"--sir-weights must be one of {SIR_WEIGHTS}, got {sir_weights!r}")
    if sir_chunk < 1:
        raise ValueError(f"--sir-chunk must be >= 1, got {sir_chunk}")
    if prior != "langevin" and (langevin_steps is not None or langevin_step_size is not None):
        raise ValueError("--langevin-steps / --langevin-step-size apply to --prior langevin only")
    if prior == "gaussian":
        if sir:
            raise ValueError("--sir resamples with a learned energy or classifier; use it with --prior evalp or ncp")
        return None, None
    if prior not in available_priors(setup):
        stage = "stage-1" if setup.kind in ("nvae", "") else f"{setup.kind!r}"
        raise ValueError(f"this is a {stage} checkpoint: it has no {prior} prior; use --prior "
                         + " or ".join(available_priors(setup)))
    if prior == "langevin":
        assert setup.langevin is not None
        if sir:
            raise ValueError("--sir does not apply to --prior langevin (it samples by MCMC)")
        hook = setup.langevin.prior(langevin_steps, langevin_step_size)
        return hook, hook
    groups = list(sir_groups) if sir_groups is not None else None
    if prior == "ncp":
        assert setup.ncp is not None
        return setup.ncp.prior(sir, groups, sir_chunk), setup.ncp.prior(1)
    assert setup.evalp is not None
    hook = setup.evalp.prior(sir_proposals=sir or 0, sir_weights=sir_weights, sir_groups=groups, sir_chunk=sir_chunk)
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
