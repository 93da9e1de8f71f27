"""Sampling images from a trained NVAE with its Gaussian prior, the EVaLP prior (optionally with SIR), or a
baseline prior (Langevin-MCMC energy prior, NCP with SIR) fitted to the same frozen NVAE."""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from nvae.config import NVAERunConfig
from nvae.hooks import PriorHook
from nvae.model import NVAE
from nvae.runtime import CheckpointError, load_checkpoint
from nvae.runtime.checkpoint import register_checkpoint_kind
from nvae.sampling import sample_images
from nvae.trained import load_trained_nvae

from .baselines.langevin import TrainedLangevin, load_langevin
from .baselines.ncp import TrainedNCP, load_ncp
from .sir import (DEFAULT_SIR_CHUNK, DEFAULT_SIR_TEMPERATURE, DEFAULT_SIR_WEIGHTS, SIR_WEIGHTS, Calibrated,
                  SIRTemperature, check_sir_temperature, parse_sir_temperature)
from .sir_calibration import DEFAULT_CALIBRATION_IMAGES
from .train import TrainedEVaLP, load_evalp

@dataclass
class SamplingSetup:
    """A loaded checkpoint: the NVAE and, for a stage-2 or baseline checkpoint, the fitted prior it carries."""

    vae: NVAE
    vae_cfg: Optional[NVAERunConfig] = None  # the frozen NVAE's run config (data set, architecture)
    kind: str = "nvae"  # the checkpoint's kind, one of CHECKPOINT_KINDS
    trained: Any = None  # the carried prior (TrainedEVaLP, TrainedLangevin, TrainedNCP); None for stage 1


@dataclass(frozen=True)
class HookRequest:
    """How the user asked a carried prior to sample (build_prior has checked the flags it does not take)."""

    sir: Optional[int]
    sir_weights: str
    sir_groups: Optional[Union[Sequence[int], str]]
    sir_chunk: int
    sir_temperature: SIRTemperature
    langevin_steps: Optional[int]
    langevin_step_size: Optional[float]
    tuning: str  # the SIR flags set away from their defaults, for messages


@dataclass(frozen=True)
class PriorKind:
    """A trained prior: its checkpoint kind (also its --prior name), how the checkpoint loads, how it samples."""

    name: str
    description: str  # in error messages: "a '<name>' (<description>) checkpoint"
    load: Callable[[Path, torch.device], SamplingSetup]
    # (sampling hook, BN re-adjustment hook) for the carried prior
    hooks: Callable[[Any, HookRequest], tuple[PriorHook, PriorHook]]
    resamples: bool  # takes --sir and the SIR flags
    chain: bool = False  # takes the Langevin chain flags
    why_no_sir: str = ""  # why --sir does not apply, for priors that do not resample
    compile: Callable[[Any], None] = lambda trained: None  # what --compile compiles beyond NVAE's cells


def _evalp_setup(path: Path, device: torch.device) -> SamplingSetup:
    trained = load_evalp(path, device)
    return SamplingSetup(trained.vae, trained.vae_cfg, "evalp", trained)


def _evalp_hooks(trained: TrainedEVaLP, req: HookRequest) -> tuple[PriorHook, PriorHook]:
    # BN statistics are re-estimated with the sampler alone: with SIR they would cost M proposals per
    # re-adjustment image, for a shift in decoder statistics that resampling barely changes.
    if not req.sir and req.tuning:
        raise ValueError(f"SIR is off for --prior evalp without --sir M, so {req.tuning} would be ignored")
    groups = trained.groups if req.sir_groups == "all" else (None if req.sir_groups is None else list(req.sir_groups))
    hook = trained.prior(sir_proposals=req.sir or 0, sir_weights=req.sir_weights, sir_groups=groups,
                         sir_chunk=req.sir_chunk, sir_temperature=req.sir_temperature)
    return hook, trained.prior()


def _langevin_setup(path: Path, device: torch.device) -> SamplingSetup:
    trained = load_langevin(path, device)
    return SamplingSetup(trained.base.vae, trained.base.vae_cfg, "langevin", trained)


def _langevin_hooks(trained: TrainedLangevin, req: HookRequest) -> tuple[PriorHook, PriorHook]:
    hook = trained.prior(req.langevin_steps, req.langevin_step_size)  # BN re-adjusts with its own chain
    return hook, hook


def _ncp_setup(path: Path, device: torch.device) -> SamplingSetup:
    trained = load_ncp(path, device)
    return SamplingSetup(trained.base.vae, trained.base.vae_cfg, "ncp", trained)


def _ncp_hooks(trained: TrainedNCP, req: HookRequest) -> tuple[PriorHook, PriorHook]:
    # --sir is M (default: the checkpoint's), at every NCP group unless --sir-groups says otherwise; both
    # weightings are the same (proposals from p0 make the exact weight r = exp(-E)). BN re-adjusts with the
    # proposal (NVAE's prior), as EVaLP does with its sampler.
    if isinstance(req.sir_temperature, Calibrated):
        raise ValueError("--sir-temperature calibrated applies to --prior evalp: NCP's classifier is trained as "
                         "the log density ratio itself, so its weights need no calibration")
    groups = None if req.sir_groups in (None, "all") else list(req.sir_groups)
    return trained.prior(req.sir, groups, req.sir_chunk, req.sir_temperature), trained.prior(1)


def _compile_evalp(trained: TrainedEVaLP) -> None:
    trained.sampler.compile_couplings()


# The one registry of prior kinds: a new prior adds its entry here, and nothing else in this module changes.
PRIOR_KINDS = {k.name: k for k in (
    PriorKind("evalp", "stage-2", _evalp_setup, _evalp_hooks, resamples=True, compile=_compile_evalp),
    PriorKind("langevin", "Langevin baseline", _langevin_setup, _langevin_hooks, resamples=False, chain=True,
              why_no_sir="it samples by MCMC"),
    PriorKind("ncp", "NCP baseline", _ncp_setup, _ncp_hooks, resamples=True))}
for _kind in PRIOR_KINDS.values():
    register_checkpoint_kind(_kind.name, _kind.description)
PRIORS = ("gaussian", *PRIOR_KINDS)
CHECKPOINT_KINDS = ("nvae", *PRIOR_KINDS)  # the prior each kind carries is its default
_RESAMPLERS = " or ".join(k.name for k in PRIOR_KINDS.values() if k.resamples)
_CHAINS = " or ".join(k.name for k in PRIOR_KINDS.values() if k.chain)


def load_for_sampling(path: Path, device: torch.device) -> SamplingSetup:
    """Accept a stage-1 ('nvae') checkpoint or one of any kind in PRIOR_KINDS."""
    kind = load_checkpoint(path, map_location="cpu")["kind"]
    if kind == "nvae":
        vae, vae_cfg, _ = load_trained_nvae(path, device)
        return SamplingSetup(vae, vae_cfg, kind)
    if kind in PRIOR_KINDS:
        return PRIOR_KINDS[kind].load(path, device)
    raise CheckpointError(f"{path} is a {kind!r} checkpoint; expected one of {', '.join(CHECKPOINT_KINDS)}")


def default_prior(setup: SamplingSetup) -> str:
    """The prior a checkpoint was trained for: gaussian for stage 1, else its own kind."""
    return setup.kind if setup.kind in PRIOR_KINDS else "gaussian"


def available_priors(setup: SamplingSetup) -> list[str]:
    """The priors a checkpoint can sample with: NVAE's own, and the one it carries."""
    return ["gaussian"] + ([setup.kind] if setup.kind in PRIOR_KINDS and setup.trained is not None else [])


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
    sir.add_argument("--sir-temperature", type=sir_temperature_arg, default=DEFAULT_SIR_TEMPERATURE,
                     help="T > 0 tempering the weights to w^(1/T): 1 as the authors; larger T moves less far "
                          "from the proposal; or ess:F, per draw the smallest T keeping an effective sample size "
                          "of F x M, 0 < F < 1; or calibrated (evalp): T fitted on validation-half posterior "
                          "samples, SIR off where the critic has no significant signal (docs/results.md, section 5c)")
    sir.add_argument("--sir-calibration-images", type=int, default=DEFAULT_CALIBRATION_IMAGES,
                     help="validation-half images whose posterior samples fit --sir-temperature calibrated")
    chain = parser.add_argument_group("Langevin chain (langevin only)")
    chain.add_argument("--langevin-steps", type=int, default=None, help="steps K (default: the trained K)")
    chain.add_argument("--langevin-step-size", type=float, default=None,
                       help="step size s, noise sqrt(2 s) (default: the trained s)")
    return sampling


def check_calibration_images(sir_temperature: SIRTemperature, images: int) -> None:
    """Refuse --sir-calibration-images below 2, or away from its default without --sir-temperature calibrated."""
    if images < 2:
        raise ValueError(f"--sir-calibration-images needs at least 2 images, got {images}")
    if images != DEFAULT_CALIBRATION_IMAGES and not isinstance(sir_temperature, Calibrated):
        raise ValueError("--sir-calibration-images applies to --sir-temperature calibrated only")


def sir_temperature_arg(text: str) -> SIRTemperature:
    """argparse type of --sir-temperature: parse_sir_temperature with its message as the usage error."""
    try:
        return parse_sir_temperature(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _sir_tuning_flags(sir_weights: str, sir_groups: object, sir_chunk: int,
                      sir_temperature: SIRTemperature) -> list[str]:
    """The SIR flags set away from their defaults (which a prior that does not resample must refuse)."""
    given = (("--sir-groups", sir_groups is not None), ("--sir-weights", sir_weights != DEFAULT_SIR_WEIGHTS),
             ("--sir-chunk", sir_chunk != DEFAULT_SIR_CHUNK),
             ("--sir-temperature", sir_temperature != DEFAULT_SIR_TEMPERATURE))
    return [flag for flag, is_set in given if is_set]


def build_prior(setup: SamplingSetup, prior: str, sir: Optional[int] = None, sir_weights: str = DEFAULT_SIR_WEIGHTS,
                sir_groups: Optional[Union[Sequence[int], str]] = None, sir_chunk: int = DEFAULT_SIR_CHUNK, *,
                sir_temperature: SIRTemperature = DEFAULT_SIR_TEMPERATURE, langevin_steps: Optional[int] = None,
                langevin_step_size: Optional[float] = None) -> tuple[Optional[PriorHook], Optional[PriorHook]]:
    """(sampling hook, BN re-adjustment hook) for `prior`; checks that the request fits the checkpoint.

    Flags that the chosen prior would ignore are errors: --sir and the SIR settings (--sir-groups, or
    --sir-weights / --sir-chunk / --sir-temperature away from their defaults) with a prior that does not resample (gaussian,
    langevin), or with evalp when --sir is off; --langevin-steps / --langevin-step-size with any prior but
    langevin (default: the checkpoint's trained K and s). sir_groups 'all' means every group the prior models.
    The hooks themselves come from the prior's entry in PRIOR_KINDS.
    """
    if prior not in PRIORS:
        raise ValueError(f"--prior must be one of {PRIORS}, got {prior!r}")
    if sir is not None and sir < 1:
        raise ValueError(f"--sir needs at least 1 proposal, got {sir}")
    if sir_weights not in SIR_WEIGHTS:
        raise ValueError(f"--sir-weights must be one of {SIR_WEIGHTS}, got {sir_weights!r}")
    if sir_chunk < 1:
        raise ValueError(f"--sir-chunk must be >= 1, got {sir_chunk}")
    check_sir_temperature(sir_temperature, "--sir-temperature")
    kind = PRIOR_KINDS.get(prior)  # None: NVAE's own Gaussian prior
    if not (kind and kind.chain) and (langevin_steps is not None or langevin_step_size is not None):
        raise ValueError(f"--langevin-steps / --langevin-step-size apply to --prior {_CHAINS} only, not {prior}")
    if sir and kind is None:
        raise ValueError(f"--sir resamples with a learned energy or classifier; use it with --prior {_RESAMPLERS}")
    if sir and not kind.resamples:
        raise ValueError(f"--sir does not apply to --prior {prior} ({kind.why_no_sir})")
    tuning = " / ".join(_sir_tuning_flags(sir_weights, sir_groups, sir_chunk, sir_temperature))
    if not (kind and kind.resamples) and tuning:
        raise ValueError(f"--prior {prior} does not resample, so {tuning} would be ignored; "
                         f"use with --prior {_RESAMPLERS}")
    if kind is None:
        return None, None
    if prior not in available_priors(setup):
        stage = "stage-1" if setup.kind == "nvae" else f"{setup.kind!r}"
        raise ValueError(f"this is a {stage} checkpoint: it has no {prior} prior; use --prior "
                         + " or ".join(available_priors(setup)))
    return kind.hooks(setup.trained, HookRequest(sir, sir_weights, sir_groups, sir_chunk, sir_temperature,
                                                 langevin_steps, langevin_step_size, tuning))


def compile_for_sampling(setup: SamplingSetup) -> None:
    """torch.compile the blocks generation repeats (NVAE's cells, the EVaLP sampler's couplings); same draws
    to float rounding."""
    setup.vae.compile_cells()
    if setup.kind in PRIOR_KINDS:
        PRIOR_KINDS[setup.kind].compile(setup.trained)


def describe_prior(prior: str, hook: Optional[PriorHook]) -> str:
    """The prior with the settings its hook samples with, e.g. 'langevin (20 Langevin steps, step size 0.05)'."""
    settings = hook.settings() if hasattr(hook, "settings") else ""
    return f"{prior} ({settings})" if settings else prior


def sir_proposals(hook: Optional[PriorHook]) -> Optional[int]:
    """M, the proposals per draw the hook resamples with (ncp: the checkpoint's unless --sir says); None without SIR."""
    m = getattr(hook, "sir_proposals", 0)
    return m if m > 0 else None


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
