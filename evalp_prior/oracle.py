"""The aggregate posterior of the top group as a prior: the ceiling of what any top-group prior can reach.

A learned prior for z_1 is trained to match the aggregate posterior q(z_1) = E_x q(z_1 | x) of the training
images. Drawing z_1 from a bank of such posterior samples (and the lower groups from NVAE's conditional
prior, as every top-group prior does) is what a perfect top-group prior would generate, so its FID and MMD^2
bound what EVaLP, Langevin or NCP can reach on one frozen NVAE: when even this row is barely better than the
Gaussian prior, the decoder, not the prior, limits the images.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import Dataset, Subset

from evalp_prior.evaluation import posterior_and_prior_draws
from nvae.model import NVAE


class AggregatePosteriorPrior:
    """PriorHook drawing z_1 uniformly (with replacement) from a bank of posterior samples; None below it."""

    def __init__(self, bank: torch.Tensor):
        if bank.dim() != 4 or bank.shape[0] == 0:
            raise ValueError(f"the bank must be a non-empty (N, C, H, W) tensor of top-group samples, got {tuple(bank.shape)}")
        self.bank = bank

    def sample_group(self, group: int, h: torch.Tensor, mu_p: torch.Tensor, sigma_p: torch.Tensor,
                     temperature: float) -> Optional[torch.Tensor]:
        if group != 0:
            return None
        if mu_p.shape[1:] != self.bank.shape[1:]:
            raise ValueError(f"the bank holds z_1 of shape {tuple(self.bank.shape[1:])}, the NVAE asks for "
                             f"{tuple(mu_p.shape[1:])}")
        rows = torch.randint(self.bank.shape[0], (mu_p.shape[0],), device=self.bank.device)
        return self.bank[rows].to(device=mu_p.device, dtype=mu_p.dtype)

    def settings(self) -> dict[str, int]:
        return {"bank_size": int(self.bank.shape[0])}


def aggregate_posterior_bank(vae: NVAE, dataset: Dataset, first: int, count: int, batch_size: int, binarize: bool,
                             device: torch.device) -> torch.Tensor:
    """One posterior sample of z_1 for each of images first .. first + count - 1 of dataset, (count, C, H, W).

    Pick images that are not in the FID reference set, or the row is compared against its own reconstructions.
    """
    if first < 0 or count <= 0 or first + count > len(dataset):
        raise ValueError(f"images {first}..{first + count - 1} are not all in a data set of {len(dataset)}")
    draws = posterior_and_prior_draws(vae, {}, Subset(dataset, range(first, first + count)), count, batch_size,
                                      binarize, device)
    return draws["posterior"][0].view(count, *vae.group_specs[0].shape)
