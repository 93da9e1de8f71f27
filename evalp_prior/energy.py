"""Per-group energies E_l(z_l, h_l) of the EVaLP prior (SPEC section 2).

The prior of group l is p_psi(z_l | z_<l) ∝ p_theta(z_l | z_<l) exp(-E_l(z_l, h_l)); each energy is a
small fully-convolutional critic conditioned on the decoder context h_l.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from nvae.hooks import GroupSpec


def _maybe_sn(layer: nn.Module, enabled: bool) -> nn.Module:
    """Wrap ``layer`` in a spectral-norm parametrisation when ``enabled``."""
    return _spectral_norm(layer) if enabled else layer


class GroupEnergy(nn.Module):
    """Conv energy E(z, h) -> (B,) float32 energies; no batch-dependent layers, so per-sample exact."""

    def __init__(
        self, z_channels: int, context_channels: int, hidden: int, spectral_norm: bool = False
    ) -> None:
        super().__init__()
        sn = spectral_norm
        self.context = _maybe_sn(nn.Conv2d(context_channels, hidden, 1), sn)
        self.body = nn.Sequential(
            _maybe_sn(nn.Conv2d(z_channels + hidden, hidden, 3, padding=1), sn),
            nn.SiLU(),
            _maybe_sn(nn.Conv2d(hidden, hidden, 3, padding=1), sn),
            nn.SiLU(),
        )
        # Mixing after the global pool lets the energy see interactions between distant positions.
        self.head = nn.Sequential(
            _maybe_sn(nn.Linear(hidden, hidden), sn),
            nn.SiLU(),
            _maybe_sn(nn.Linear(hidden, 1), sn),
        )

    def forward(self, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Energies of z (B, C_z, H, W) given context h (B, C_h, H, W); returns (B,) float32."""
        features = self.body(torch.cat([z, self.context(h).to(z.dtype)], dim=1))  # (B, hidden, H, W)
        # Mean pool keeps the energy's scale independent of the group's resolution.
        return self.head(features.mean(dim=(2, 3))).squeeze(1).float()

    def conditioned(self, h: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """z -> E(z, h) (``forward``) for z of shape (k * B, C_z, H, W) whose row j * B + i belongs to
        item i of h: the first conv is linear in cat(z, context(h)), so its context half (bias included)
        is computed once per item and broadcast over the k proposals that share h, never repeated."""
        first = self.body[0]
        weight = first.weight  # read once: a spectral-norm parametrisation recomputes it on every read
        c_z = weight.shape[1] - self.context.out_channels
        ctx = self.context(h)  # (B, hidden, H, W)
        term = F.conv2d(ctx, weight[:, c_z:], first.bias, first.stride, first.padding)  # (B, hidden, H, W)
        batch = h.shape[0]

        def energy(z: torch.Tensor) -> torch.Tensor:
            features = F.conv2d(z, weight[:, :c_z], None, first.stride, first.padding)  # (k * B, hidden, H, W)
            features = features.unflatten(0, (-1, batch)).add_(term.to(features.dtype)).flatten(0, 1)
            for layer in tuple(self.body)[1:]:
                features = layer(features)  # (k * B, hidden, H, W)
            return self.head(features.mean(dim=(2, 3))).squeeze(1).float()

        return energy


class EnergySet(nn.Module):
    """The energies of the selected groups: one per group, or one per scale shared by its groups.

    Call it as ``energies(group, z, h)`` (its ``forward``) so that a DistributedDataParallel wrapper
    sees every evaluation.
    """

    def __init__(
        self,
        specs: Sequence[GroupSpec],
        groups: Sequence[int],
        hidden: int,
        share_within_scale: bool = False,
        spectral_norm: bool = False,
        whiten: bool = False,
    ) -> None:
        super().__init__()
        if not groups:
            raise ValueError("EnergySet needs at least one group")
        self.groups = [int(g) for g in groups]
        self.share_within_scale = share_within_scale
        self.whiten = whiten
        self._key: dict[int, str] = {}
        nets: dict[str, GroupEnergy] = {}
        shapes: dict[str, tuple[int, int]] = {}
        for g in self.groups:
            if not 0 <= g < len(specs):
                raise ValueError(f"group {g} is out of range: the model has {len(specs)} groups")
            spec = specs[g]
            key = f"scale{spec.scale}" if share_within_scale else f"group{g}"
            channels = (spec.channels, spec.context_channels)
            if key in shapes and shapes[key] != channels:
                raise ValueError(
                    f"groups sharing {key} differ in (latent, context) channels: "
                    f"{shapes[key]} vs {channels}"
                )
            if key not in nets:
                shapes[key] = channels
                nets[key] = GroupEnergy(spec.channels, spec.context_channels, hidden, spectral_norm)
            self._key[g] = key
        self.nets = nn.ModuleDict(nets)

    def forward(self, group: int, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """E_group(z, h) as (B,) float32 energies."""
        if group not in self._key:
            raise KeyError(f"group {group} has no energy; EVaLP groups are {self.groups}")
        return self.nets[self._key[group]](z, h)

    def conditioned(self, group: int, h: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """z -> E_group(z, h) for k proposals per item, rows j * B + i sharing h[i] (see GroupEnergy)."""
        if group not in self._key:
            raise KeyError(f"group {group} has no energy; EVaLP groups are {self.groups}")
        return self.nets[self._key[group]].conditioned(h)

    def inputs(self, z: torch.Tensor, mu_p: torch.Tensor, sigma_p: torch.Tensor) -> torch.Tensor:
        """The critic's input for latents z: z itself, or with ``whiten`` (z - mu_p) / sigma_p.

        Whitened, a 1-Lipschitz critic is Lipschitz in units of the prior's own spread: on raw z it cannot
        see a displacement of a group whose sigma_p sits near NVAE's 0.01 floor. The map is the same affine
        one for positives and negatives sharing a context, so the penalty's interpolates stay on its
        segments. z may carry leading proposal dimensions (k, B, ...) that broadcast over mu_p (B, ...).
        """
        return (z - mu_p) / sigma_p if self.whiten else z


def conditioned_energy(energies: nn.Module, group: int, h: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """x (k * B, ...) -> (k * B,) energies of ``energies(group, x, h)`` with rows j * B + i sharing h[i]: the
    set's own broadcasting path (h's share computed once per item) when it has one, else h repeated k times
    (for any other module with EnergySet's call signature, e.g. a test's oracle)."""
    conditioned = getattr(energies, "conditioned", None)
    if conditioned is not None:
        return conditioned(group, h)
    return lambda x: energies(group, x, h.repeat(x.shape[0] // h.shape[0], *([1] * (h.dim() - 1))))
