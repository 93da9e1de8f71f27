"""Sampling images from a trained NVAE with its Gaussian prior, the EVaLP prior (optionally with SIR), or a
baseline prior (Langevin-MCMC energy prior, NCP with SIR) fitted to the same frozen NVAE."""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from nvae.cells import compile_cells
from nvae.config import NVAERunConfig
from nvae.hooks import PriorHook
from nvae.model import NVAE
from nvae.runtime import CheckpointError, load_checkpoint
from nvae.runtime.checkpoint import register_checkpoint_kind
from nvae.sampling import sample_images
from nvae.trained import load_trained_nvae

from .baselines.langevin import LangevinPrior, TrainedLangevin, load_langevin
from .baselines.ncp import NCPPrior, TrainedNCP, load_ncp
from .prior import EVaLPPrior
from .sir import DEFAULT_SIR_CHUNK, DEFAULT_SIR_WEIGHTS, SIR_WEIGHTS
from .train import TrainedEVaLP, load_evalp

@dataclass
class SamplingSetup:
    """A loaded checkpoint: the NVAE, and the fitted prior of a stage-2 (EVaLP) or baseline checkpoint."""

    vae: NVAE
    evalp: Optional[TrainedEVaLP]
    langevin: Optional[TrainedLangevin] = None
    ncp: Optional[TrainedNCP] = None
    vae_cfg: Optional[NVAERunConfig] = None  # the frozen NVAE's run config (data set, architecture)
    kind: str = ""  # the checkpoint's kind, one of CHECKPOINT_KINDS


@dataclass(frozen=True)
class PriorKind:
    """A trained prior's checkpoint kind (also its --prior name): what it is, and how its checkpoint loads."""

    name: str
    description: str  # in error messages: "a '<name>' (<description>) checkpoint"
    load: Callable[[Path, torch.device], SamplingSetup]


def _evalp_setup(path: Path, device: torch.device) -> SamplingSetup:
    trained = load_evalp(path, device)
    return SamplingSetup(trained.vae, trained, vae_cfg=trained.vae_cfg, kind="evalp")


def _langevin_setup(path: Path, device: torch.device) -> SamplingSetup:
    trained = load_langevin(path, device)
    return SamplingSetup(trained.base.vae, None, langevin=trained, vae_cfg=trained.base.vae_cfg, kind="langevin")


def _ncp_setup(path: Path, device: torch.device) -> SamplingSetup:
    trained = load_ncp(path, device)
    return SamplingSetup(trained.base.vae, None, ncp=trained, vae_cfg=trained.base.vae_cfg, kind="ncp")


# The one registry of prior kinds: a new prior adds its entry here (and its hook in build_prior).
PRIOR_KINDS = {k.name: k for k in (PriorKind("evalp", "stage-2", _evalp_setup),
                                   PriorKind("langevin", "Langevin baseline", _langevin_setup),
                                   PriorKind("ncp", "NCP baseline", _ncp_setup))}
for _kind in PRIOR_KINDS.values():
    register_checkpoint_kind(_kind.name, _kind.description)
PRIORS = ("gaussian", *PRIOR_KINDS)
CHECKPOINT_KINDS = ("nvae", *PRIOR_KINDS)  # the prior each kind carries is its default


def load_for_sampling(path: Path, device: torch.device) -> SamplingSetup:
    """Accept a stage-1 ('nvae') checkpoint or one of any kind in PRIOR_KINDS."""
    kind = load_checkpoint(path, map_location="cpu")["kind"]
    if kind == "nvae":
        vae, vae_cfg, _ = load_trained_nvae(path, device)
        return SamplingSetup(vae, None, vae_cfg=vae_cfg, kind=kind)
    if kind in PRIOR_KINDS:
        return PRIOR_KINDS[kind].load(path, device)
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


def add_prior_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add the flags that pick a prior and how it samples, shared by scripts/generate.py and scripts/evaluate.py.

    Three groups: the prior and its sampling (--prior, --temperature, --bn-batches, --seed), SIR (evalp and
    ncp) and the Langevin chain (langevin only); build_prior refuses the flags the chosen prior would ignore.
    Returns the first group, for a script's own sampling flags.
    """
    sampling = parser.add_argument_group("prior and sampling")
    sampling.add_argument("--prior", choices=PRIORS, default=None,
                          help="default: the checkpoint's own (gaussian for stage 1)")
    sampling.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    sampling.add_argument("--bn-batches", type=int, default=20,
                          help="BN re-adjustment batches before sampling (0: off)")
    sampling.add_argument("--seed", type=int, default=0, help="random seed of the draws")
    sampling.add_argument("--compile", action="store_true",
                          help="torch.compile the decoder cells and the EVaLP sampler's couplings (pays off for "
                               "many images: compiling takes minutes on a CPU; docs/benchmarks.md)")
    sir = parser.add_argument_group("sampling-importance-resampling (evalp and ncp)")
    sir.add_argument("--sir", type=int, default=None, metavar="M",
                     help="proposals per draw, e.g. 1000 (evalp: default off; ncp: default the checkpoint's M)")
    sir.add_argument("--sir-weights", choices=SIR_WEIGHTS, default=DEFAULT_SIR_WEIGHTS,
                     help="exact: -E + log p0 - log q (towards p_psi); energy: -E (the authors' variant); "
                          "the same for ncp")
    sir.add_argument("--sir-groups", default=None,
                     help="'all' or comma-separated groups (default: evalp the top group, ncp every NCP group)")
    sir.add_argument("--sir-chunk", type=int, default=DEFAULT_SIR_CHUNK,
                     help="proposals per draw evaluated at once (memory bound)")
    chain = parser.add_argument_group("Langevin chain (langevin only)")
    chain.add_argument("--langevin-steps", type=int, default=None, help="steps K (default: the trained K)")
    chain.add_argument("--langevin-step-size", type=float, default=None,
                       help="step size s, noise sqrt(2 s) (default: the trained s)")
    return sampling


def _sir_tuning_flags(sir_weights: str, sir_groups: object, sir_chunk: int) -> list[str]:
    """The SIR flags set away from their defaults (which a prior that does not resample must refuse)."""
    given = (("--sir-groups", sir_groups is not None), ("--sir-weights", sir_weights != DEFAULT_SIR_WEIGHTS),
             ("--sir-chunk", sir_chunk != DEFAULT_SIR_CHUNK))
    return [flag for flag, is_set in given if is_set]


def build_prior(setup: SamplingSetup, prior: str, sir: Optional[int] = None, sir_weights: str = DEFAULT_SIR_WEIGHTS,
                sir_groups: Optional[Union[Sequence[int], str]] = None, sir_chunk: int = DEFAULT_SIR_CHUNK, *,
                langevin_steps: Optional[int] = None,
                langevin_step_size: Optional[float] = None) -> tuple[Optional[PriorHook], Optional[PriorHook]]:
    """(sampling hook, BN re-adjustment hook) for `prior`; checks that the request fits the checkpoint.

    Flags that the chosen prior would ignore are errors: --sir and the SIR settings (--sir-groups, or
    --sir-weights / --sir-chunk away from their defaults) with gaussian or langevin, or with evalp when
    --sir is off; --langevin-steps / --langevin-step-size with any prior but langevin (default: the
    checkpoint's trained K and s). sir_groups 'all' means every group the prior models.
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
        raise ValueError(f"--langevin-steps / --langevin-step-size apply to --prior langevin only, not {prior}")
    if prior == "gaussian" and sir:
        raise ValueError("--sir resamples with a learned energy or classifier; use it with --prior evalp or ncp")
    if prior == "langevin" and sir:
        raise ValueError("--sir does not apply to --prior langevin (it samples by MCMC)")
    tuning = " / ".join(_sir_tuning_flags(sir_weights, sir_groups, sir_chunk))
    if prior in ("gaussian", "langevin") and tuning:
        raise ValueError(f"--prior {prior} does not resample, so {tuning} would be ignored; "
                         "use with --prior evalp or ncp")
    if prior == "gaussian":
        return None, None
    if prior not in available_priors(setup):
        stage = "stage-1" if setup.kind in ("nvae", "") else f"{setup.kind!r}"
        raise ValueError(f"this is a {stage} checkpoint: it has no {prior} prior; use --prior "
                         + " or ".join(available_priors(setup)))
    if prior == "langevin":
        assert setup.langevin is not None
        hook = setup.langevin.prior(langevin_steps, langevin_step_size)
        return hook, hook
    if prior == "ncp":
        assert setup.ncp is not None
        groups = None if sir_groups in (None, "all") else list(sir_groups)
        return setup.ncp.prior(sir, groups, sir_chunk), setup.ncp.prior(1)
    assert setup.evalp is not None
    if not sir and tuning:
        raise ValueError(f"SIR is off for --prior evalp without --sir M, so {tuning} would be ignored")
    groups = setup.evalp.groups if sir_groups == "all" else (None if sir_groups is None else list(sir_groups))
    hook = setup.evalp.prior(sir_proposals=sir or 0, sir_weights=sir_weights, sir_groups=groups, sir_chunk=sir_chunk)
    return hook, setup.evalp.prior()


def compile_for_sampling(setup: SamplingSetup) -> None:
    """torch.compile the blocks generation repeats (NVAE's cells, the EVaLP sampler's couplings); same draws
    to float rounding."""
    compile_cells(setup.vae)
    if setup.evalp is not None:
        setup.evalp.sampler.compile_couplings()


def describe_prior(prior: str, hook: Optional[PriorHook]) -> str:
    """The prior with the settings its hook samples with, e.g. 'langevin (20 Langevin steps, step size 0.05)'."""
    if isinstance(hook, LangevinPrior):
        return f"{prior} ({hook.steps} Langevin steps, step size {hook.step_size:g})"
    if isinstance(hook, NCPPrior):
        return f"{prior} (SIR M={hook.sir_proposals} at groups {hook.sir_groups})"
    if isinstance(hook, EVaLPPrior) and hook.sir_proposals > 1:
        return f"{prior} (SIR M={hook.sir_proposals}, {hook.sir_weights} weights, at groups {hook.sir_groups})"
    return prior


def sir_proposals(hook: Optional[PriorHook]) -> Optional[int]:
    """M, the proposals per draw the hook resamples with (ncp: the checkpoint's unless --sir says); None without SIR."""
    if isinstance(hook, (EVaLPPrior, NCPPrior)) and hook.sir_proposals > 0:
        return hook.sir_proposals
    return None


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
