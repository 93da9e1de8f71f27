"""Priors as densities, for the NVAE's likelihood under them (metrics/nll.py).

A prior that changes group l to p(z_l | h_l) = p0(z_l | h_l) r(z_l, h_l) / Z(h_l), p0 NVAE's conditional
Gaussian, exposes two methods (the ``PriorDensity`` protocol of metrics/nll.py):

- ``log_density_ratio(group, z, h, mu_p, sigma_p)``: log r (B,), unnormalised, or None for a group it
  leaves to NVAE;
- ``log_normaliser(group, h, mu_p, sigma_p, num)``: log Z(h) (B,) and the importance weights' relative
  variance (B,), from ``num`` proposals per item (log Z = 0 exactly for a normalised prior).

EVaLP's energy prior (prior.EVaLPPrior) proposes from its sampler; the energy baselines (Langevin, NCP),
whose samplers are MCMC or SIR with no density, propose from p0 itself (:class:`TiltedGaussianDensity`).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .energy import conditioned_energy
from .sir import DEFAULT_SIR_CHUNK, log_mean_weight


class TiltedGaussianDensity:
    """p(z | h) ∝ p0(z | h) exp(-E(z, h)) for ``self.groups`` with ``self.energies`` (set by the subclass):
    the density of the Langevin prior, and of NCP's reweighted prior (its logit is -E)."""

    energies: torch.nn.Module
    groups: list[int]
    sir_chunk: int = DEFAULT_SIR_CHUNK

    def _p0_proposals(self, group: int, h: torch.Tensor, mu_p: torch.Tensor, scale: torch.Tensor
                      ) -> tuple[Callable[[int], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
        """(propose, log_weight) for sir_select / log_mean_weight: k draws of N(mu_p, scale^2) per item,
        (k, batch, C, H, W) with proposal j of item i sharing item i's context, weighted by -E (k, batch)."""
        batch = mu_p.shape[0]
        energy_of = conditioned_energy(self.energies, group, h)

        def propose(k: int) -> torch.Tensor:
            return mu_p + scale * torch.randn((k, *mu_p.shape), dtype=mu_p.dtype, device=mu_p.device)

        def log_weight(z: torch.Tensor) -> torch.Tensor:
            return -energy_of(z.flatten(0, 1)).view(z.shape[0], batch)

        return propose, log_weight

    @torch.no_grad()
    def log_density_ratio(self, group: int, z: torch.Tensor, h: torch.Tensor, mu_p: torch.Tensor,
                          sigma_p: torch.Tensor) -> Optional[torch.Tensor]:
        """log r = -E(z, h) (B,), unnormalised; None for a group left to NVAE."""
        if group not in self.groups:
            return None
        return -self.energies(group, z, h)

    @torch.no_grad()
    def log_normaliser(self, group: int, h: torch.Tensor, mu_p: torch.Tensor, sigma_p: torch.Tensor,
                       num: int) -> tuple[torch.Tensor, torch.Tensor]:
        """log Z(h) = log E_{p0}[exp(-E)] (B,) from ``num`` p0 draws per item, and the relative variance (B,)."""
        propose, log_weight = self._p0_proposals(group, h, mu_p, sigma_p)
        return log_mean_weight(propose, log_weight, num, self.sir_chunk, mu_p.shape[0])
