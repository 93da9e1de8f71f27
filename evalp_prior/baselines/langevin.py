"""Baseline: a latent energy-based prior trained and sampled with short-run Langevin MCMC.

The prior of group l is p(z_l | z_<l) ∝ p0(z_l) exp(-E_l(z_l, h_l)), p0 = N(mu_p, sigma_p^2) NVAE's
conditional prior, with EVaLP's energy networks; training is maximum likelihood as in the latent-EBM
literature (Pang et al. 2020): the gradient of -log p(z+) is grad E(z+) - E_{z- ~ p}[grad E(z-)], with
z- from K steps of Langevin initialised at p0 (short-run, no Metropolis correction). Sampling runs the
same chain at every group, so it costs K energy forward and backward passes per group.

Step-size convention (documented because the literature uses two): in the whitened coordinates
eps = (z - mu_p) / (t sigma_p), one step is
    eps <- eps + s * grad_eps [log N(eps; 0, I) - E(mu_p + t sigma_p eps)] + sqrt(2 s) * xi,  xi ~ N(0, I),
i.e. the unadjusted Langevin algorithm with step s (noise sqrt(2 s)). The other common form,
drift s'^2 / 2 and noise s', is the same chain with s = s'^2 / 2 (Pang et al.'s s' = 0.1 is s = 0.005).
Whitening is a constant linear change of variables, so the target is unchanged; it makes one step size
fit all groups whatever their sigma_p (down to NVAE's 1e-2 floor).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..density import TiltedGaussianDensity
from ..objectives import GroupBatch
from .common import Baseline, BaselineConfig, BaselineTask, TrainedBaseline

KIND = "langevin"


@dataclass
class LangevinConfig(BaselineConfig):
    """The shared baseline settings plus the Langevin chain and the energy regulariser."""

    langevin_steps: int = 20  # K, at training and (by default) at generation
    langevin_step_size: float = 0.05  # s in whitened units, noise sqrt(2 s)
    energy_l2: float = 0.1  # alpha in alpha * (mean E(z+)^2 + mean E(z-)^2)

    def __post_init__(self) -> None:
        check_chain(self.langevin_steps, self.langevin_step_size)


def check_chain(steps: int, step_size: float) -> None:
    """Raise ValueError for a chain that cannot run."""
    if steps < 0:
        raise ValueError(f"--langevin-steps must be >= 0, got {steps}")
    if not step_size > 0:
        raise ValueError(f"--langevin-step-size must be > 0, got {step_size}")


def langevin_sample(energy_fn: Callable[[torch.Tensor], torch.Tensor], mu: torch.Tensor, scale: torch.Tensor,
                    steps: int, step_size: float, eps: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Short-run Langevin towards p(z) ∝ N(z; mu, scale^2) exp(-energy_fn(z)); returns z (like mu), detached.

    Runs on eps = (z - mu) / scale from eps ~ N(0, I) (a draw of the base, unless eps is given) with the
    convention of the module docstring. ``energy_fn`` maps (B, ...) to (B,) energies and must treat
    samples independently (it does for EnergySet), so the gradient of the sum is per-sample. Works
    under torch.no_grad (the chain turns gradients on for itself); parameter gradients are never formed.
    """
    eps = torch.randn_like(mu) if eps is None else eps
    noise = math.sqrt(2.0 * step_size)
    with torch.enable_grad():
        for _ in range(steps):
            eps = eps.detach().requires_grad_(True)
            log_p = -0.5 * eps.square().flatten(1).sum(1) - energy_fn(mu + scale * eps)
            (grad,) = torch.autograd.grad(log_p.sum(), eps)
            eps = eps + step_size * grad + noise * torch.randn_like(eps)
    # NVAE's order of operations: with zero steps this is bit for bit NVAE's own draw mu + (t sigma) eps.
    return mu + scale * eps.detach()


class LangevinPrior(TiltedGaussianDensity):
    """Implements nvae.hooks.PriorHook: each of ``groups`` is drawn by ``steps`` Langevin steps on
    log p0_t(z) - E(z, h), started from p0_t = N(mu_p, (t sigma_p)^2); other groups are left to NVAE."""

    def __init__(self, energies: nn.Module, groups: Sequence[int], steps: int = 20, step_size: float = 0.05) -> None:
        check_chain(steps, step_size)
        self.energies = energies
        self.groups = sorted(int(g) for g in groups)
        self.steps = steps
        self.step_size = step_size

    def settings(self) -> str:
        """How it samples, for messages."""
        return f"{self.steps} Langevin steps, step size {self.step_size:g}"

    def sample_group(self, group: int, h: torch.Tensor, mu_p: torch.Tensor, sigma_p: torch.Tensor,
                     temperature: float) -> Optional[torch.Tensor]:
        """z_l (like mu_p) for an energy group, or None to let NVAE draw the group."""
        if group not in self.groups:
            return None
        z = langevin_sample(lambda z: self.energies(group, z, h), mu_p.float(), (temperature * sigma_p).float(),
                            self.steps, self.step_size)
        return z.to(mu_p.dtype)


def langevin_loss(e_pos: torch.Tensor, e_neg: torch.Tensor, alpha: float) -> torch.Tensor:
    """Maximum-likelihood surrogate mean E(z+) - mean E(z-) plus alpha * (mean E(z+)^2 + mean E(z-)^2).

    Its gradient is the (short-run) maximum-likelihood gradient of the tilted prior; the L2 term keeps
    the energies near zero, since the likelihood does not see their offset.
    """
    return e_pos.mean() - e_neg.mean() + alpha * (e_pos.square().mean() + e_neg.square().mean())


class LangevinTask(BaselineTask):
    """Latent-EBM training on a frozen NVAE: posterior positives, short-run Langevin negatives, same h."""

    kind = KIND

    def prior(self) -> LangevinPrior:
        return LangevinPrior(self.energies, self.groups, self.cfg.langevin_steps, self.cfg.langevin_step_size)

    def _negatives(self, b: GroupBatch) -> torch.Tensor:
        """Langevin draws for b's contexts; the chain uses the unwrapped EnergySet, so no DDP forward
        runs outside the loss's single evaluation per group."""
        return langevin_sample(lambda z: self.energies(b.group, z, b.h), b.mu_p, b.sigma_p,
                               self.cfg.langevin_steps, self.cfg.langevin_step_size)

    def loss(self, batches: list[GroupBatch]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        stats: dict[str, torch.Tensor] = {}
        total = None
        negatives = [self._negatives(b) for b in batches]
        with self.precision.autocast():
            for b, z_neg in zip(batches, negatives):
                n = b.z_pos.shape[0]
                # One evaluation for positives and negatives: energies are per-sample, so this is exact.
                e = self.energy_net(b.group, torch.cat([b.z_pos, z_neg]), torch.cat([b.h, b.h]))
                loss = langevin_loss(e[:n], e[n:], self.cfg.energy_l2)
                total = loss if total is None else total + loss
                stats[f"energy_gap/group{b.group}"] = (e[:n].mean() - e[n:].mean()).detach()
        stats["energy_gap/mean"] = torch.stack([stats[f"energy_gap/group{b.group}"] for b in batches]).mean()
        return total, stats

    def eval_group(self, b: GroupBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z_neg = self._negatives(b)
        gap = self.energies(b.group, b.z_pos, b.h) - self.energies(b.group, z_neg, b.h)
        return z_neg, {"energy_gap": gap}


# The shared entry points (common.Baseline) under this baseline's public names.
LANGEVIN = Baseline(KIND, LangevinTask, LangevinConfig)
langevin_run_config = LANGEVIN.run_config
train_langevin = LANGEVIN.train


@dataclass
class TrainedLangevin:
    """A 'langevin' checkpoint loaded for sampling."""

    base: TrainedBaseline

    def prior(self, steps: Optional[int] = None, step_size: Optional[float] = None) -> LangevinPrior:
        """The hook with the trained chain, or with another step count / step size."""
        cfg = self.base.run_cfg.prior
        return LangevinPrior(self.base.energies, self.base.groups,
                             cfg.langevin_steps if steps is None else steps,
                             cfg.langevin_step_size if step_size is None else step_size)


def load_langevin(path: Path, device: torch.device) -> TrainedLangevin:
    """A Langevin checkpoint with its frozen NVAE."""
    return TrainedLangevin(LANGEVIN.load(path, device))
