"""The contract between the NVAE backbone and any prior that attaches to it.

The backbone never imports a prior. A prior implements :class:`PriorHook` and is passed to
``NVAE.sample(..., prior=hook)``; training code for a prior reads :class:`GroupState` records from
``NVAE.posterior(x)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class GroupSpec:
    """Static description of one latent group z_l (top-down order, index 0 is the top group)."""

    index: int  # position in top-down order, 0 = z_1
    scale: int  # 0 = lowest resolution (top) scale, increasing towards the image
    channels: int  # latent channels of z_l
    height: int
    width: int
    context_channels: int  # channels of the decoder context h_l

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


@dataclass
class GroupState:
    """One latent group along a posterior pass; every tensor is (B, ...) on the pass's device.

    mu_p/sigma_p are the conditional prior p(z_l | z_<l) at temperature 1 (soft-clamped, sigma with
    its 1e-2 floor); mu_q/sigma_q the (residual) posterior; h the decoder state that produced the
    prior, i.e. the context h_l. For the top group h is the learned start tensor and the prior is the
    fixed N(0, 1.01^2) of NVAE. z is the posterior sample after any posterior flows; log_q/log_p are
    elementwise log-densities of that z.
    """

    z: torch.Tensor  # (B, C_z, H, W)
    mu_q: torch.Tensor
    sigma_q: torch.Tensor
    mu_p: torch.Tensor
    sigma_p: torch.Tensor
    h: torch.Tensor  # (B, C_h, H, W)
    log_q: torch.Tensor  # (B, C_z, H, W)
    log_p: torch.Tensor  # (B, C_z, H, W)


@runtime_checkable
class PriorHook(Protocol):
    """A prior that may replace NVAE's draw of any group during top-down sampling."""

    def sample_group(
        self,
        group: int,
        h: torch.Tensor,
        mu_p: torch.Tensor,
        sigma_p: torch.Tensor,
        temperature: float,
    ) -> Optional[torch.Tensor]:
        """Return z_l of shape mu_p.shape, or None to let NVAE draw mu_p + (temperature * sigma_p) * eps.

        mu_p and sigma_p are at temperature 1; h is the decoder context of group ``group``.
        """
        ...
