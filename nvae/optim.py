"""Adamax with NVAE's schedule: linear warm-up, then cosine decay to lr_min."""
from __future__ import annotations

import math

import torch

from .config import TrainConfig


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adamax(lr, eps, weight decay) as in NVAE."""
    return torch.optim.Adamax(params, lr=cfg.lr, eps=cfg.adamax_eps, weight_decay=cfg.weight_decay)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  lr_min: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: linear warm-up over warmup_steps, then cosine from lr to lr_min."""
    base_lr = optimizer.param_groups[0]["lr"]
    floor = lr_min / base_lr

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
