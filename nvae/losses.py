"""NVAE's training objective: KL warm-up and balancing, spectral and BatchNorm regularisers."""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from .cells import WNConv2d
from .hooks import GroupSpec


def kl_coefficient(step: int, total_steps: int, anneal_portion: float = 0.3, const_portion: float = 1e-4,
                   min_coeff: float = 1e-4, kl_weight: float = 1.0) -> float:
    """KL warm-up: ramps linearly from min_coeff to ``kl_weight`` (beta, the ceiling after warm-up; 1 is the
    ELBO, below 1 a beta-VAE that leaves prior holes on purpose) over the first anneal_portion of training."""
    anneal = max(anneal_portion * total_steps, 1.0)
    const = const_portion * total_steps
    return float(max(kl_weight * min((step - const) / anneal, 1.0), min(min_coeff, kl_weight)))


def kl_balance_alphas(specs: tuple[GroupSpec, ...] | list[GroupSpec]) -> torch.Tensor:
    """alpha_l proportional to the group's spatial size over the number of groups at its scale (min 1)."""
    per_scale: dict[int, int] = defaultdict(int)
    for spec in specs:
        per_scale[spec.scale] += 1
    alpha = torch.tensor([spec.height * spec.width / per_scale[spec.scale] for spec in specs], dtype=torch.float32)
    return alpha / alpha.min()


def balanced_kl(kl_groups: list[torch.Tensor], kl_coeff: float, alphas: torch.Tensor,
                balance: bool = True, kl_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) weighted KL and the (L,) group weights used.

    While warming up (kl_coeff below its ceiling ``kl_weight``) each group is weighted by w_l ∝ (mean KL_l + 0.01) / alpha_l,
    normalised to mean 1 and detached, so that groups which would otherwise collapse keep receiving
    gradient (NVAE Sec. 3.2 / App. A). After warm-up all weights are 1.
    """
    kl_all = torch.stack(kl_groups, dim=1)  # (B, L)
    if balance and kl_coeff < kl_weight:
        weights = kl_all.abs().mean(dim=0) + 0.01
        weights = weights / alphas.to(kl_all) * weights.sum()
        weights = (weights / weights.mean()).detach()
    else:
        weights = torch.ones(kl_all.shape[1], device=kl_all.device, dtype=kl_all.dtype)
    return kl_coeff * (kl_all * weights).sum(dim=1), weights


class SpectralRegularizer(nn.Module):
    """Sum of the largest singular values of every weight-normalised conv (as an out x in*k*k matrix).

    Power iteration is batched over all convolutions of the same matrix shape; its vectors are buffers,
    so they live in the state dict and therefore in checkpoints.
    """

    def __init__(self, model: nn.Module, num_power_iter: int = 4, init_power_iter: int = 10):
        super().__init__()
        self.num_power_iter = num_power_iter
        self.init_power_iter = init_power_iter
        by_shape: dict[tuple[int, int], list[WNConv2d]] = defaultdict(list)
        for module in model.modules():
            if isinstance(module, WNConv2d):
                by_shape[(module.out_channels, module.weight[0].numel())].append(module)
        self._convs = [convs for _, convs in sorted(by_shape.items())]  # plain list: not submodules
        self._shapes = sorted(by_shape)
        # A fixed seed: every DDP rank starts from the same vectors, so they stay identical without a broadcast.
        generator = torch.Generator().manual_seed(0)
        for i, (rows, cols) in enumerate(self._shapes):
            n = len(self._convs[i])
            self.register_buffer(f"u{i}", F.normalize(torch.randn(n, rows, generator=generator), dim=1, eps=1e-3))
            self.register_buffer(f"v{i}", F.normalize(torch.randn(n, cols, generator=generator), dim=1, eps=1e-3))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def forward(self) -> torch.Tensor:
        """The regulariser value; updates the power-iteration vectors as a side effect."""
        iters = self.num_power_iter if bool(self.initialised) else self.init_power_iter
        total = None
        for i, convs in enumerate(self._convs):
            weights = torch.stack([c.take_forward_weight().flatten(1) for c in convs]).float()  # (n, rows, cols)
            u, v = getattr(self, f"u{i}").unsqueeze(1), getattr(self, f"v{i}").unsqueeze(2)  # (n, 1, rows), (n, cols, 1)
            # Batched matrix products (bmm), about twice as fast as the equivalent einsum on the CPU.
            with torch.no_grad():
                for _ in range(iters):
                    v = F.normalize(torch.bmm(u, weights), dim=2, eps=1e-3).transpose(1, 2)
                    u = F.normalize(torch.bmm(weights, v), dim=1, eps=1e-3).transpose(1, 2)
                getattr(self, f"u{i}").copy_(u.squeeze(1))
                getattr(self, f"v{i}").copy_(v.squeeze(2))
            sigma = torch.bmm(torch.bmm(u, weights), v).sum()  # sum over convs of u^T W v
            total = sigma if total is None else total + sigma
        self.initialised.fill_(True)
        return total if total is not None else torch.zeros(())


def batchnorm_regularizer(model: nn.Module) -> torch.Tensor:
    """Sum over BatchNorm layers of max |gamma| (keeps the BN scales from blowing up at sampling)."""
    terms = [m.weight.abs().max() for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]
    return torch.stack(terms).sum() if terms else torch.zeros(())
