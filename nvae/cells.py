"""NVAE building blocks: weight-normalised convolutions, squeeze-excitation and residual cells."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .runtime.compilation import compiled

# Residual branches are damped so that a freshly built deep hierarchy starts close to the identity.
BRANCH_SCALE = 0.1


class _ForwardWeightSlot:
    """Holds a WNConv2d's last forward weight (part of an autograd graph); copies and pickles empty, because a
    copied module's graph belongs to the original."""

    __slots__ = ("versions", "weight")

    def __init__(self) -> None:
        self.versions: tuple[int, int] | None = None
        self.weight: torch.Tensor | None = None

    def __deepcopy__(self, memo: dict) -> "_ForwardWeightSlot":
        return _ForwardWeightSlot()

    def __reduce__(self):
        return _ForwardWeightSlot, ()


class WNConv2d(nn.Conv2d):
    """Conv2d with weight normalisation: weight = exp(log_weight_norm) * v / ||v|| per output channel."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        with torch.no_grad():
            norm = self.weight.flatten(1).norm(dim=1)
        # Start at the default initialisation's norm (NVAE adds 1e-2 to keep the log finite).
        self.log_weight_norm = nn.Parameter(torch.log(norm + 1e-2))
        self._forward_weight = _ForwardWeightSlot()

    def _versions(self) -> tuple[int, int]:
        return self.weight._version, self.log_weight_norm._version

    def normalized_weight(self) -> torch.Tensor:
        """The weight actually used in the convolution (what the spectral regulariser bounds)."""
        direction = self.weight / (self.weight.flatten(1).norm(dim=1) + 1e-5).view(-1, 1, 1, 1)
        return self.log_weight_norm.exp().view(-1, 1, 1, 1) * direction

    def take_forward_weight(self) -> torch.Tensor:
        """The normalised weight of the last forward pass with gradients, if the parameters have not changed
        since (else a fresh one); handed out once. The spectral regulariser reads it so that a training step
        normalises and back-propagates through every weight once, as NVAE does, not twice."""
        slot = self._forward_weight
        weight, slot.weight = slot.weight, None
        if weight is not None and slot.versions == self._versions():
            return weight
        return self.normalized_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.normalized_weight()
        # Not inside torch.compile: a graph cannot hand out its intermediates (the regulariser then normalises afresh).
        if torch.is_grad_enabled() and weight.requires_grad and not torch.compiler.is_compiling():
            self._forward_weight.versions, self._forward_weight.weight = self._versions(), weight
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class DepthwiseWNConv2d(WNConv2d):
    """The decoder cells' depthwise WNConv2d. In a CPU training step it runs in channels-last layout: there
    oneDNN's depthwise forward plus backward is 2-4x faster than in NCHW at every NVAE shape measured, which
    pays for the two layout copies; the result is returned contiguous, so nothing else changes. Without
    gradients (sampling) channels-last wins at some shapes and loses at others, so NCHW stays."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or not torch.is_grad_enabled():
            return super().forward(x)
        return super().forward(x.contiguous(memory_format=torch.channels_last)).contiguous()


def batch_norm(channels: int, momentum: float) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-5, momentum=momentum)


class SqueezeExcitation(nn.Module):
    """Channel gating: avg-pool, linear to max(C/16, 4), ReLU, linear, sigmoid."""

    def __init__(self, channels: int):
        super().__init__()
        hidden = max(channels // 16, 4)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3))))))
        return x * gate[:, :, None, None]


class FactorizedReduce(nn.Module):
    """Stride-2 skip: four stride-2 1x1 convs on shifted inputs, concatenated."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        sizes = [c_out // 4] * 3 + [c_out - 3 * (c_out // 4)]
        self.convs = nn.ModuleList(WNConv2d(c_in, s, 1, stride=2, bias=True) for s in sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(x)
        # On an even-sized input a stride-2 1x1 conv of the 1-pixel-shifted view has the same size.
        shifts = (x, x[:, :, 1:, 1:], x[:, :, :, 1:], x[:, :, 1:, :])
        outs = [conv(xs) for conv, xs in zip(self.convs, shifts)]
        return torch.cat(outs, dim=1)


class UpSkip(nn.Module):
    """Upsampling skip: bilinear x2 then a 1x1 conv to the new channel count."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = WNConv2d(c_in, c_out, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True))


def _skip(c_in: int, c_out: int, stride: int) -> nn.Module:
    if stride == 1:
        return nn.Identity()
    return FactorizedReduce(c_in, c_out) if stride == 2 else UpSkip(c_in, c_out)


class BNSwishConv(nn.Sequential):
    """BN, Swish, conv3x3 (the unit of NVAE's encoder cells)."""

    def __init__(self, c_in: int, c_out: int, stride: int, momentum: float):
        super().__init__(batch_norm(c_in, momentum), nn.SiLU(),
                         WNConv2d(c_in, c_out, 3, stride=stride, padding=1, bias=True))


class ResidualCell(nn.Module):
    """NVAE cell: skip(x) + 0.1 * SE(branch(x)).

    kind 'enc' (encoder and pre-process): branch [BN, Swish, conv3x3] x 2.
    kind 'dec' (decoder and post-process): BN, conv1x1 (expand), BN, Swish, depthwise conv5x5, BN,
    Swish, conv1x1, BN. stride: 1 keeps the size, 2 halves it (channels double), -1 doubles it
    (nearest upsampling in the branch, bilinear in the skip; channels halve).
    """

    def __init__(self, c_in: int, c_out: int, kind: str, stride: int = 1, expand: int = 6,
                 use_se: bool = True, momentum: float = 0.05):
        super().__init__()
        self.kind = kind
        self.skip = _skip(c_in, c_out, stride)
        if kind == "enc":
            self.branch = nn.Sequential(BNSwishConv(c_in, c_out, 2 if stride == 2 else 1, momentum),
                                        BNSwishConv(c_out, c_out, 1, momentum))
        elif kind == "dec":
            hidden = c_in * expand
            layers: list[nn.Module] = [nn.UpsamplingNearest2d(scale_factor=2)] if stride == -1 else []
            layers += [
                batch_norm(c_in, momentum),
                WNConv2d(c_in, hidden, 1, bias=False), batch_norm(hidden, momentum), nn.SiLU(),
                DepthwiseWNConv2d(hidden, hidden, 5, padding=2, groups=hidden, bias=False),
                batch_norm(hidden, momentum), nn.SiLU(),
                WNConv2d(hidden, c_out, 1, bias=False), batch_norm(c_out, momentum),
            ]
            self.branch = nn.Sequential(*layers)
        else:
            raise ValueError(f"unknown cell kind {kind!r}")
        self.se = SqueezeExcitation(c_out) if use_se else nn.Identity()

        self.checkpoint_activations = False  # set_activation_checkpointing: recompute this cell in the backward
        self.compiled_cell: Callable[["ResidualCell", torch.Tensor], torch.Tensor] | None = None  # compile_cells

    def _cell(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + BRANCH_SCALE * self.se(self.branch(x))

    def _run_cell(self, x: torch.Tensor) -> torch.Tensor:
        return self._cell(x) if self.compiled_cell is None else self.compiled_cell(self, x)

    @contextlib.contextmanager
    def _running_statistics_restored(self) -> Iterator[None]:
        """The recomputation normalises with the batch's statistics, as the forward did (the same operations, as
        checkpointing requires), and then puts back the running statistics it updated a second time."""
        # Looked up now, not at construction: convert_sync_batchnorm replaces the BN modules.
        buffers = [b for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]
        saved = [b.clone() for b in buffers]
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(buffers, saved)

    def _checkpoint_contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), self._running_statistics_restored()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_activations and torch.is_grad_enabled():
            # Keeps only the cell's input; its inner activations (the decoder cells' 6x expansion) are
            # recomputed when the backward reaches them.
            return checkpoint(self._run_cell, x, use_reentrant=False, context_fn=self._checkpoint_contexts)
        return self._run_cell(x)


def compile_cells(model: nn.Module) -> None:
    """torch.compile every residual cell (fusing the element-wise tails of BN, Swish and squeeze-excitation);
    the same maths, to float rounding."""
    cell = compiled(ResidualCell._cell)
    for module in model.modules():
        if isinstance(module, ResidualCell):
            module.compiled_cell = cell


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Recompute the decoder-kind cells' activations in the backward pass (less memory, one more forward of
    those cells per step); gradients and running statistics are those of the plain step.

    Only the decoder kind (decoder and post-process cells): their 6x (3x) inverted bottleneck holds most of a
    step's activations for about half of the cells' arithmetic; the encoder cells' two narrow 3x3 convolutions
    would cost as much to recompute for a fraction of the memory (benchmarks/bench_train.py)."""
    for module in model.modules():
        if isinstance(module, ResidualCell) and module.kind == "dec":
            module.checkpoint_activations = enabled


class EncCombiner(nn.Module):
    """Encoder combiner: x_enc + conv1x1(h_dec)."""

    def __init__(self, c_enc: int, c_dec: int):
        super().__init__()
        self.conv = WNConv2d(c_dec, c_enc, 1, bias=True)

    def forward(self, x_enc: torch.Tensor, h_dec: torch.Tensor) -> torch.Tensor:
        return x_enc + self.conv(h_dec)


class DecCombiner(nn.Module):
    """Decoder combiner: conv1x1(concat(h, z)) back to the decoder's channels."""

    def __init__(self, c_dec: int, c_z: int):
        super().__init__()
        self.conv = WNConv2d(c_dec + c_z, c_dec, 1, bias=True)

    def forward(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([h, z], dim=1))
