"""Shift-only autoregressive posterior flows (NVAE's `num_nf` cells).

Each cell maps z -> z - mu(z_<, features) where mu is computed by masked convolutions, so its
Jacobian is triangular with unit diagonal and log|det| = 0: log q(z) is unchanged and the KL becomes a
single-sample estimate. A pair of cells runs in raster order and then in the mirrored order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MaskedConv2d(nn.Conv2d):
    """Conv whose output at (c, i, j) sees inputs strictly before (c, i, j) in (raster, channel) order.

    Channel "degrees" order channels within a pixel; hidden channels cycle through the data degrees.
    strict=True excludes equal degrees at the centre pixel (first layer), False allows them.
    """

    def __init__(self, c_in: int, c_out: int, kernel_size: int, data_channels: int, strict: bool):
        super().__init__(c_in, c_out, kernel_size, padding=kernel_size // 2)
        deg_in = torch.arange(c_in) % data_channels
        deg_out = torch.arange(c_out) % data_channels
        mask = torch.ones_like(self.weight)
        centre = kernel_size // 2
        mask[:, :, centre, centre + 1:] = 0
        mask[:, :, centre + 1:, :] = 0
        allowed = (deg_in[None, :] < deg_out[:, None]) if strict else (deg_in[None, :] <= deg_out[:, None])
        mask[:, :, centre, centre] = allowed.to(mask.dtype)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, self.stride, self.padding)


class ShiftARCell(nn.Module):
    """z -> z - mu(z, features) with an autoregressive mu; the identity at initialisation."""

    def __init__(self, z_channels: int, feature_channels: int, hidden_mult: int = 6, mirror: bool = False):
        super().__init__()
        hidden = z_channels * hidden_mult
        self.mirror = mirror
        self.inp = MaskedConv2d(z_channels, hidden, 3, z_channels, strict=True)
        self.features = nn.Conv2d(feature_channels, hidden, 1)
        self.mid = MaskedConv2d(hidden, hidden, 3, z_channels, strict=False)
        self.out = MaskedConv2d(hidden, z_channels, 3, z_channels, strict=False)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        if self.mirror:
            z, features = z.flip(1, 2, 3), features.flip(2, 3)
        hidden = F.elu(self.inp(z) + self.features(features))
        mu = self.out(F.elu(self.mid(hidden)))
        out = z - mu
        return out.flip(1, 2, 3) if self.mirror else out


class PairedShiftFlow(nn.Module):
    """One posterior flow step: a raster-order cell followed by a mirrored one."""

    def __init__(self, z_channels: int, feature_channels: int):
        super().__init__()
        self.cells = nn.ModuleList([ShiftARCell(z_channels, feature_channels, mirror=False),
                                    ShiftARCell(z_channels, feature_channels, mirror=True)])

    def forward(self, z: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        for cell in self.cells:
            z = cell(z, features)
        return z
