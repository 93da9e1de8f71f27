"""BatchNorm re-adjustment: recompute running statistics on samples drawn at the sampling temperature."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .hooks import PriorHook


@torch.no_grad()
def readjust_bn(model: nn.Module, num_batches: int, batch_size: int, temperature: float = 1.0,
                prior: Optional[PriorHook] = None) -> None:
    """Replace every BN layer's running stats by the cumulative average over sampled batches.

    Leaves the model in eval mode, ready to sample.

    NVAE samples with the network in train-mode BN statistics gathered from the generative path at
    temperature t; re-estimating them this way markedly improves low-temperature samples.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    model.train()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    for _ in range(num_batches):
        model.sample_logits(batch_size, temperature, prior)
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.eval()
