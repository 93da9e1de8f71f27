"""Baseline: a noise-contrastive prior (NCP-VAE, Aneja et al. 2021) with SIR sampling.

Per group a binary classifier D(z, h) = sigmoid(logit(z, h)) tells posterior samples z_l ~ q(z_l | x, z_<l)
(label 1) from NVAE's prior samples z_l ~ p0 = N(mu_p, sigma_p^2) (label 0) with the same context h_l.
At the optimum of the balanced cross-entropy, logit = log q(z | h) / p0(z | h), so the reweighted prior
p0(z) r(z), r = D / (1 - D) = exp(logit), approximates the aggregate posterior. The classifier body is
EVaLP's GroupEnergy with logit = -E (so r = exp(-E) and the EnergySet code is shared). Sampling: SIR
with M proposals from p0 at temperature t, weights r, through evalp_prior.sir.sir_select (chunked).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from nvae.data.base import binarize_if_needed
from nvae.distributions import draw_normal
from nvae.model import NVAE
from nvae.runtime import forked_rng

from ..density import TiltedGaussianDensity
from ..objectives import GroupBatch
from ..sir import (DEFAULT_SIR_CHUNK, DEFAULT_SIR_TEMPERATURE, SIRTemperature, check_sir_temperature,
                   describe_temperature, sir_select)
from .common import Baseline, BaselineConfig, BaselineTask, TrainedBaseline

KIND = "ncp"


@dataclass
class NCPConfig(BaselineConfig):
    """The shared baseline settings plus the generation default for SIR."""

    lr: float = 1e-3  # Adam learning rate of the classifiers
    sir_proposals: int = 100  # M at generation unless overridden

    def __post_init__(self) -> None:
        if self.sir_proposals < 1:
            raise ValueError(f"NCP needs sir_proposals >= 1, got {self.sir_proposals}")


def ncp_loss(logit_pos: torch.Tensor, logit_neg: torch.Tensor) -> torch.Tensor:
    """Balanced binary cross-entropy: -mean log D(z+) - mean log(1 - D(z-)), D = sigmoid(logit).

    Minimised by logit = log q(z) / p0(z) (for balanced classes), the density ratio NCP reweights by.
    """
    return F.softplus(-logit_pos).mean() + F.softplus(logit_neg).mean()


class NCPPrior(TiltedGaussianDensity):
    """Implements nvae.hooks.PriorHook: SIR over ``sir_proposals`` p0 draws per item with weights
    r = exp(-E(z, h)) at each of ``sir_groups`` (default: every NCP group); other groups are left to NVAE.

    Since the proposals come from p0 itself, the exact importance weight p0 r / p0 is r: the two SIR
    weightings of EVaLP coincide here. With M = 1 the hook is NVAE's prior.
    """

    def __init__(self, energies: nn.Module, groups: Sequence[int], sir_proposals: int = 100,
                 sir_groups: Optional[Sequence[int]] = None, sir_chunk: int = DEFAULT_SIR_CHUNK,
                 sir_temperature: SIRTemperature = DEFAULT_SIR_TEMPERATURE) -> None:
        if sir_proposals < 1 or sir_chunk < 1:
            raise ValueError(f"need sir_proposals >= 1 and sir_chunk >= 1, got {sir_proposals}, {sir_chunk}")
        check_sir_temperature(sir_temperature, "sir_temperature")
        self.energies = energies
        self.groups = sorted(int(g) for g in groups)
        self.sir_groups = list(self.groups) if sir_groups is None else sorted(int(g) for g in sir_groups)
        missing = set(self.sir_groups) - set(self.groups)
        if missing:
            raise ValueError(f"SIR groups {sorted(missing)} are not NCP groups {self.groups}")
        self.sir_proposals = sir_proposals
        self.sir_chunk = sir_chunk
        self.sir_temperature = sir_temperature

    def settings(self) -> str:
        """How it samples, for messages."""
        tempered = describe_temperature(self.sir_temperature)
        tempered = f", {tempered}" if tempered else ""
        return f"SIR M={self.sir_proposals}{tempered} at groups {self.sir_groups}"

    def sample_group(self, group: int, h: torch.Tensor, mu_p: torch.Tensor, sigma_p: torch.Tensor,
                     temperature: float) -> Optional[torch.Tensor]:
        """z_l (like mu_p) resampled by the classifier, or None to let NVAE draw the group."""
        if group not in self.sir_groups or self.sir_proposals == 1:
            return None
        propose, log_weight = self._p0_proposals(group, h, mu_p, temperature * sigma_p)
        with torch.no_grad():
            z, _, _ = sir_select(propose, log_weight, self.sir_proposals, self.sir_chunk, mu_p.shape[0],
                              temperature=self.sir_temperature)
        return z.to(mu_p.dtype)


class NCPTask(BaselineTask):
    """Per-group classifiers of posterior vs NVAE-prior samples under the same context, on a frozen NVAE."""

    kind = KIND

    def prior(self) -> NCPPrior:
        return NCPPrior(self.energies, self.groups, self.cfg.sir_proposals)

    def loss(self, batches: list[GroupBatch]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        stats: dict[str, torch.Tensor] = {}
        total = None
        with self.precision.autocast():
            for b in batches:
                n = b.z_pos.shape[0]
                z_neg = draw_normal(b.mu_p, b.sigma_p)
                logits = -self.energy_net(b.group, torch.cat([b.z_pos, z_neg]), torch.cat([b.h, b.h]))
                loss = ncp_loss(logits[:n], logits[n:])
                total = loss if total is None else total + loss
                stats[f"bce/group{b.group}"] = loss.detach()
                stats[f"accuracy/group{b.group}"] = balanced_correct(logits[:n], logits[n:]).mean().detach()
        stats["accuracy/mean"] = torch.stack([stats[f"accuracy/group{b.group}"] for b in batches]).mean()
        return total, stats

    def eval_group(self, b: GroupBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z_neg = draw_normal(b.mu_p, b.sigma_p)
        logit_pos, logit_neg = -self.energies(b.group, b.z_pos, b.h), -self.energies(b.group, z_neg, b.h)
        z_prior = self.prior().sample_group(b.group, b.h, b.mu_p, b.sigma_p, 1.0)
        return z_prior, {"accuracy": balanced_correct(logit_pos, logit_neg), "logit_gap": logit_pos - logit_neg}


# The shared entry points (common.Baseline) under this baseline's public names.
NCP = Baseline(KIND, NCPTask, NCPConfig)
ncp_run_config = NCP.run_config
train_ncp = NCP.train


@dataclass
class TrainedNCP:
    """An 'ncp' checkpoint loaded for sampling."""

    base: TrainedBaseline

    def prior(self, sir_proposals: Optional[int] = None, sir_groups: Optional[Sequence[int]] = None,
              sir_chunk: int = DEFAULT_SIR_CHUNK, sir_temperature: SIRTemperature = DEFAULT_SIR_TEMPERATURE) -> NCPPrior:
        """The hook with the run's M (or another), SIR at every NCP group unless sir_groups says otherwise."""
        m = self.base.run_cfg.prior.sir_proposals if sir_proposals is None else sir_proposals
        return NCPPrior(self.base.energies, self.base.groups, m, sir_groups, sir_chunk, sir_temperature)


def balanced_correct(logit_pos: torch.Tensor, logit_neg: torch.Tensor) -> torch.Tensor:
    """Per pair, the mean of 'posterior z called posterior' (logit > 0) and 'prior z called prior': its mean
    over pairs is the classifier's balanced accuracy."""
    return 0.5 * ((logit_pos > 0).float() + (logit_neg <= 0).float())


@torch.no_grad()
def hole_detector_accuracy(trained: TrainedNCP, vae: NVAE, dataset: Dataset, num: int, batch_size: int,
                           binarize: bool, device: torch.device, seed: int = 0) -> dict[str, float]:
    """The classifier's balanced accuracy on the top NCP group: posterior z (of the first num images of
    dataset) against NVAE's Gaussian prior draws given the same context, as in training's diagnostics
    (0.5: the classifier sees no hole)."""
    energies, group = trained.base.energies, trained.base.groups[0]
    n = min(num, len(dataset))
    right = 0.0
    with forked_rng(device, seed):
        for batch in DataLoader(Subset(dataset, range(n)), batch_size=batch_size):
            st = vae.posterior(binarize_if_needed(batch.to(device), binarize)).groups[group]
            logit_pos = -energies(group, st.z.float(), st.h.float())
            logit_neg = -energies(group, draw_normal(st.mu_p, st.sigma_p).float(), st.h.float())
            right += float(balanced_correct(logit_pos, logit_neg).sum())
    return {"accuracy": right / n, "group": group, "num_images": n}


def load_ncp(path: Path, device: torch.device) -> TrainedNCP:
    """An NCP checkpoint with its frozen NVAE."""
    return TrainedNCP(NCP.load(path, device))
