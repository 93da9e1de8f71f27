"""EVaLP as a prior hook for NVAE's top-down sampling (SPEC section 2, generation)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from evalp_prior.sampler import gaussian_log_prob
from evalp_prior.sir import SIR_WEIGHTS, sir_log_weight, sir_select


class EVaLPPrior:
    """Implements nvae.hooks.PriorHook: EVaLP groups draw from the sampler (optionally with SIR over
    M proposals sharing h_l), the other groups are left to NVAE.

    Temperature t tempers the base N(mu_p, (t sigma_p)^2) of both the sampler and the SIR target
    p0_t exp(-E); t = 1 is the trained prior p_psi.
    """

    def __init__(
        self,
        energies: nn.Module,
        sampler: nn.Module,
        groups: Sequence[int],
        sir_proposals: int = 0,
        sir_weights: str = "exact",
        sir_groups: Sequence[int] | None = None,
        sir_chunk: int = 100,
    ) -> None:
        if sir_weights not in SIR_WEIGHTS:
            raise ValueError(f"unknown SIR weighting {sir_weights!r}; choose one of {SIR_WEIGHTS}")
        if sir_chunk < 1 or sir_proposals < 0:
            raise ValueError(f"need sir_chunk >= 1 and sir_proposals >= 0, got {sir_chunk}, {sir_proposals}")
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

    def sample_group(
        self, group: int, h: torch.Tensor, mu_p: torch.Tensor, sigma_p: torch.Tensor, temperature: float
    ) -> Optional[torch.Tensor]:
        """z_l for an EVaLP group (like mu_p), or None to let NVAE draw the group."""
        if group not in self.groups:
            return None
        with torch.no_grad():
            if group in self.sir_groups and self.sir_proposals > 1:
                z = self._sir(group, h, mu_p, sigma_p, temperature)
            else:
                z, _ = self.sampler(mu_p, sigma_p, h, group, temperature)
        return z.to(mu_p.dtype)

    def _sir(
        self, group: int, h: torch.Tensor, mu_p: torch.Tensor, sigma_p: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        """SIR over ``sir_proposals`` sampler draws per item, evaluated ``sir_chunk`` per item at a time."""
        batch = mu_p.shape[0]
        repeated: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

        def expand(k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """(h, mu_p, sigma_p) repeated k times along the batch: row j * batch + i is item i."""
            if k not in repeated:
                repeated.clear()  # at most the full chunk and one remainder are ever needed
                repeated[k] = tuple(t.repeat(k, *([1] * (t.dim() - 1))) for t in (h, mu_p, sigma_p))
            return repeated[k]

        def propose(k: int) -> tuple[torch.Tensor, torch.Tensor]:
            """k sampler draws per item and their log q: (k, batch, C, H, W), (k, batch)."""
            h_k, mu_k, sigma_k = expand(k)
            z, log_q = self.sampler(mu_k, sigma_k, h_k, group, temperature)
            return z.view(k, batch, *z.shape[1:]), log_q.view(k, batch)

        def log_weight(z: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
            """(k, batch) SIR log-weights of the proposals."""
            k = z.shape[0]
            h_k, mu_k, sigma_k = expand(k)
            z_flat = z.flatten(0, 1)
            energy = self.energies(group, z_flat, h_k).view(k, batch)
            log_p0 = None
            if self.sir_weights == "exact":
                log_p0 = gaussian_log_prob(z_flat, mu_k, temperature * sigma_k).view(k, batch)
            return sir_log_weight(self.sir_weights, energy, log_p0, log_q)

        (z, _), _ = sir_select(propose, log_weight, self.sir_proposals, self.sir_chunk, batch)
        return z
