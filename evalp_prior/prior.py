"""EVaLP as a prior hook for NVAE's top-down sampling (SPEC section 2, generation)."""
from __future__ import annotations

import math
from collections import Counter
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from evalp_prior.energy import conditioned_energy
from evalp_prior.sampler import SharedFlowSampler, gaussian_log_prob, standard_normal_log_prob
from evalp_prior.sir import (DEFAULT_SIR_CHUNK, DEFAULT_SIR_TEMPERATURE, DEFAULT_SIR_WEIGHTS, SIR_WEIGHTS,
                             SIRTemperature, check_sir_temperature, describe_temperature, log_mean_weight,
                             sir_log_weight, sir_select)


# On the CPU, SIR evaluates at most this many latent positions (rows x H x W) at once: about 16k kept the
# chunk's activations in cache and was fastest on the tiny and mnist presets (docs/benchmarks.md).
CPU_POSITIONS_PER_CHUNK = 16384


class EVaLPPrior:
    """Implements nvae.hooks.PriorHook: EVaLP groups draw from the sampler (optionally with SIR over
    M proposals sharing h_l), the other groups are left to NVAE.

    Temperature t tempers the base N(mu_p, (t sigma_p)^2) of both the sampler and the SIR target
    p0_t exp(-E); t = 1 is the trained prior p_psi.
    """

    def __init__(
        self,
        energies: nn.Module,
        sampler: SharedFlowSampler,
        groups: Sequence[int],
        sir_proposals: int = 0,
        sir_weights: str = DEFAULT_SIR_WEIGHTS,
        sir_groups: Sequence[int] | None = None,
        sir_chunk: int = DEFAULT_SIR_CHUNK,
        sir_temperature: SIRTemperature = DEFAULT_SIR_TEMPERATURE,
    ) -> None:
        if sir_weights not in SIR_WEIGHTS:
            raise ValueError(f"unknown SIR weighting {sir_weights!r}; choose one of {SIR_WEIGHTS}")
        if sir_chunk < 1 or sir_proposals < 0:
            raise ValueError(f"need sir_chunk >= 1 and sir_proposals >= 0, got {sir_chunk}, {sir_proposals}")
        check_sir_temperature(sir_temperature, "sir_temperature")
        self.energies = energies
        self.sampler = sampler
        self.groups = sorted(int(g) for g in groups)
        # Default: the top-most EVaLP group (z_1 in both the `all` and the `top` setting).
        self.sir_groups = [self.groups[0]] if sir_groups is None else sorted(int(g) for g in sir_groups)
        missing = set(self.sir_groups) - set(self.groups)
        if missing:
            raise ValueError(f"SIR groups {sorted(missing)} are not EVaLP groups {self.groups}")
        self.sir_proposals = sir_proposals
        self.sir_weights = sir_weights
        self.sir_chunk = sir_chunk
        self.sir_temperature = sir_temperature
        # Effective sample size (sum w)^2 / sum w^2 per item of the latest SIR draw of each group: a diagnostic.
        self.last_ess: dict[int, torch.Tensor] = {}
        self.last_temperature: dict[int, float] = {}  # the temperature of that draw (an ESSTarget chooses it)
        self.temperatures_used: dict[int, Counter[float]] = {}  # draws per temperature and group, for reports
        self.sir_calibration = None  # a sir_calibration.SIRCalibration once calibrate_sir has fitted the temperature

    def settings(self) -> str:
        """How it samples, for messages ('' for the sampler alone)."""
        if self.sir_calibration is not None:
            return f"SIR M={self.sir_proposals}, {self.sir_weights} weights, {self.sir_calibration.describe()}"
        if self.sir_proposals > 1:
            tempered = describe_temperature(self.sir_temperature)
            tempered = f" at {tempered}" if tempered else ""
            return f"SIR M={self.sir_proposals}, {self.sir_weights} weights{tempered}, at groups {self.sir_groups}"
        return ""

    def sample_group(
        self, group: int, h: torch.Tensor, mu_p: torch.Tensor, sigma_p: torch.Tensor, temperature: float
    ) -> Optional[torch.Tensor]:
        """z_l for an EVaLP group (like mu_p), or None to let NVAE draw the group."""
        if group not in self.groups:
            return None
        with torch.no_grad():
            # T = inf (a calibration that found no signal) weighs every proposal alike: the sampler's own draw.
            if group in self.sir_groups and self.sir_proposals > 1 and self.sir_temperature != math.inf:
                z = self._sir(group, h, mu_p, sigma_p, temperature)
            else:
                z, _ = self.sampler(mu_p, sigma_p, h, group, temperature)
        return z.to(mu_p.dtype)

    def _sir(
        self, group: int, h: torch.Tensor, mu_p: torch.Tensor, sigma_p: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        """SIR over ``sir_proposals`` sampler draws per item, evaluated at most ``sir_chunk`` per item at a time."""
        propose, log_weight, chunk = self._weighted_proposals(group, h, mu_p, sigma_p, temperature, self.sir_weights)
        (z, *_), self.last_ess[group], self.last_temperature[group] = sir_select(
            propose, log_weight, self.sir_proposals, chunk, mu_p.shape[0], temperature=self.sir_temperature)
        self.temperatures_used.setdefault(group, Counter())[self.last_temperature[group]] += 1
        return z

    def _weighted_proposals(
        self, group: int, h: torch.Tensor, mu_p: torch.Tensor, sigma_p: torch.Tensor, temperature: float, weights: str
    ) -> tuple[Callable[[int], tuple[torch.Tensor, ...]], Callable[..., torch.Tensor], int]:
        """(propose, log_weight, chunk) of sampler draws per item for sir_select / log_mean_weight.

        Everything that depends on h alone (the flow's and the energy's context layers) is computed once
        per item and broadcast over the item's proposals; a chunk holds k proposals per item in rows
        j * batch + i, and only (k * batch)-row draws, flows and energies are ever materialised.
        """
        batch, shape = mu_p.shape[0], mu_p.shape[1:]
        chunk = self.sir_chunk
        if mu_p.device.type == "cpu":
            chunk = min(chunk, max(1, CPU_POSITIONS_PER_CHUNK // (batch * shape[-2] * shape[-1])))
        cond = self.sampler.condition(h, group)
        energy_of = conditioned_energy(self.energies, group, h)
        scale = temperature * sigma_p  # the sampler's tempered base N(mu_p, scale^2)

        def propose(k: int) -> tuple[torch.Tensor, ...]:
            """k sampler draws per item (k, batch, C, H, W), with log p0 and log q (k, batch) for exact weights."""
            eps = torch.randn((k * batch, *shape), dtype=mu_p.dtype, device=mu_p.device)
            u, logdet = self.sampler.flow_conditioned(eps, cond)  # (k * batch, C, H, W), (k * batch,)
            z = mu_p + scale * u.view(k, batch, *shape)
            if weights != "exact":
                return (z,)
            # log p0(z) = log N(u) - sum log scale and log q(z) = log N(eps) - logdet - sum log scale; the
            # per-item sum log scale cancels in the weight, so both are formed without it.
            log_p0 = standard_normal_log_prob(u).view(k, batch)
            log_q = (standard_normal_log_prob(eps) - logdet).view(k, batch)
            return z, log_p0, log_q

        inputs = getattr(self.energies, "inputs", None)

        def log_weight(z: torch.Tensor, *densities: torch.Tensor) -> torch.Tensor:
            """(k, batch) log-weights of the proposals."""
            x = z if inputs is None else inputs(z, mu_p, sigma_p)  # the critic's coordinates (whitened or not)
            energy = energy_of(x.flatten(0, 1)).view(z.shape[0], batch)
            return sir_log_weight(weights, energy, *densities)

        return propose, log_weight, chunk

    @torch.no_grad()
    def log_density_ratio(self, group: int, z: torch.Tensor, h: torch.Tensor, mu_p: torch.Tensor,
                          sigma_p: torch.Tensor) -> Optional[torch.Tensor]:
        """log p~(z) / p0(z) = -E(z, h) (B,) of the energy prior p_psi ∝ p0 exp(-E), unnormalised; None for
        a group left to NVAE. This is the density SIR targets, whatever the sampler draws."""
        if group not in self.groups:
            return None
        inputs = getattr(self.energies, "inputs", None)
        x = z if inputs is None else inputs(z, mu_p, sigma_p)
        return -conditioned_energy(self.energies, group, h)(x)

    @torch.no_grad()
    def log_normaliser(self, group: int, h: torch.Tensor, mu_p: torch.Tensor, sigma_p: torch.Tensor,
                       num: int) -> tuple[torch.Tensor, torch.Tensor]:
        """log Z(h) = log E_{z ~ q_alpha}[p0(z) exp(-E(z)) / q_alpha(z)] per item (B,) by importance sampling
        with ``num`` sampler draws (the exact SIR weights), and the weights' relative variance (B,): the log of
        the unbiased estimate is biased low by about rel_var / (2 num)."""
        propose, log_weight, chunk = self._weighted_proposals(group, h, mu_p, sigma_p, 1.0, "exact")
        return log_mean_weight(propose, log_weight, num, chunk, mu_p.shape[0])


class SamplerDensity:
    """The EVaLP sampler q_alpha itself read as a prior: a normalised flow density (log Z = 0 exactly), so the
    NVAE's likelihood with it needs no estimate. It is what plain EVaLP sampling (no SIR) draws from."""

    def __init__(self, sampler: SharedFlowSampler, groups: Sequence[int]) -> None:
        self.sampler = sampler
        self.groups = sorted(int(g) for g in groups)

    @torch.no_grad()
    def log_density_ratio(self, group: int, z: torch.Tensor, h: torch.Tensor, mu_p: torch.Tensor,
                          sigma_p: torch.Tensor) -> Optional[torch.Tensor]:
        """log q_alpha(z | h) - log p0(z | h) (B,); None for a group left to NVAE."""
        if group not in self.groups:
            return None
        return self.sampler.log_prob(z, mu_p, sigma_p, h, group) - gaussian_log_prob(z, mu_p, sigma_p)

    def log_normaliser(self, group: int, h: torch.Tensor, mu_p: torch.Tensor, sigma_p: torch.Tensor,
                       num: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exactly (0, 0): the flow is normalised."""
        zero = torch.zeros(h.shape[0], dtype=torch.float64, device=h.device)
        return zero, zero
