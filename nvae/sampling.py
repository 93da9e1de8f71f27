"""Drawing images from an NVAE, with its BN statistics re-adjusted under the prior that samples them."""
from __future__ import annotations

import copy
from typing import Optional

import torch

from .bn import readjust_bn
from .hooks import PriorHook
from .model import NVAE


def sample_images(model: NVAE, num: int, temperature: float, prior: Optional[PriorHook] = None,
                  bn_batches: int = 0, batch_size: int = 64, bn_prior: Optional[PriorHook] = None) -> torch.Tensor:
    """(num, C, H, W) images in [0, 1]; with bn_batches > 0 on a BN-readjusted copy of the model.

    BN statistics are re-estimated with bn_prior (default: prior); a cheaper stand-in such as the
    EVaLP sampler without SIR keeps re-adjustment from costing M proposals per image.
    """
    if bn_batches > 0:
        model = copy.deepcopy(model)
        readjust_bn(model, bn_batches, batch_size, temperature, bn_prior if bn_prior is not None else prior)
    model.eval()
    chunks = [model.sample(min(batch_size, num - i), temperature, prior) for i in range(0, num, batch_size)]
    return torch.cat(chunks)
