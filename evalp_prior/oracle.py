"""Priors read off the aggregate posterior of the top group: its samples (the ceiling of what any top-group
prior can reach) and its Gaussian fit (the simplest learned prior, which any learned prior should beat). The fit is also a normalised density, so the
NVAE's likelihood under it (metrics/nll.py) says how much of a learned prior's ELBO gain a Gaussian gives.

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
from evalp_prior.sampler import gaussian_log_prob
from nvae.model import NVAE


def _check_bank(bank: torch.Tensor) -> None:
    if bank.dim() != 4 or bank.shape[0] == 0:
        raise ValueError(f"the bank must be a non-empty (N, C, H, W) tensor of top-group samples, got {tuple(bank.shape)}")


def _check_request(shape: torch.Size, mu_p: torch.Tensor, temperature: float) -> None:
    if temperature != 1.0:
        raise ValueError(f"a prior read off posterior samples has no temperature; asked for {temperature}")
    if mu_p.shape[1:] != shape:
        raise ValueError(f"the bank holds z_1 of shape {tuple(shape)}, the NVAE asks for {tuple(mu_p.shape[1:])}")


class AggregatePosteriorPrior:
    """PriorHook drawing z_1 uniformly (with replacement) from a bank of posterior samples; None below it."""

    def __init__(self, bank: torch.Tensor):
        _check_bank(bank)
        self.bank = bank

    def sample_group(self, group: int, h: torch.Tensor, mu_p: torch.Tensor, sigma_p: torch.Tensor,
                     temperature: float) -> Optional[torch.Tensor]:
        if group != 0:
            return None
        _check_request(self.bank.shape[1:], mu_p, temperature)
        rows = torch.randint(self.bank.shape[0], (mu_p.shape[0],), device=self.bank.device)
        return self.bank[rows].to(device=mu_p.device, dtype=mu_p.dtype)

    def settings(self) -> dict[str, int]:
        return {"bank_size": int(self.bank.shape[0])}


class PosteriorGaussianPrior:
    """PriorHook drawing z_1 from the full-covariance Gaussian fitted (mean, covariance) to a bank of posterior
    samples; None below it. Where a prior hole is a matter of second moments, this closed-form fit closes it.
    Also a PriorDensity (metrics/nll.py): exact, normalised, so log Z = 0."""

    def __init__(self, bank: torch.Tensor):
        _check_bank(bank)
        if bank[0].numel() >= bank.shape[0]:
            raise ValueError(f"a covariance of {bank[0].numel()} dimensions needs more than {bank.shape[0]} samples")
        flat = bank.flatten(1).double()
        self.shape, self.bank_size = bank.shape[1:], int(bank.shape[0])
        self.mean = flat.mean(0)
        self.scale_tril = torch.linalg.cholesky(torch.cov(flat.T))
        self.distribution = torch.distributions.MultivariateNormal(self.mean, scale_tril=self.scale_tril)

    def sample_group(self, group: int, h: torch.Tensor, mu_p: torch.Tensor, sigma_p: torch.Tensor,
                     temperature: float) -> Optional[torch.Tensor]:
        if group != 0:
            return None
        _check_request(self.shape, mu_p, temperature)
        eps = torch.randn(mu_p.shape[0], self.mean.numel(), dtype=self.mean.dtype, device=self.mean.device)
        z = self.mean + eps @ self.scale_tril.T
        return z.view(mu_p.shape).to(device=mu_p.device, dtype=mu_p.dtype)

    @torch.no_grad()
    def log_density_ratio(self, group: int, z: torch.Tensor, h: torch.Tensor, mu_p: torch.Tensor,
                          sigma_p: torch.Tensor) -> Optional[torch.Tensor]:
        """log N(z; mean, covariance) - log p0(z | h) (B,) float64 for the top group; None below it."""
        if group != 0:
            return None
        if z.shape[1:] != self.shape:
            raise ValueError(f"the fit is of z_1 of shape {tuple(self.shape)}, got {tuple(z.shape[1:])}")
        flat = z.flatten(1).to(self.mean)
        return self.distribution.log_prob(flat) - gaussian_log_prob(z, mu_p, sigma_p).to(self.mean)

    def log_normaliser(self, group: int, h: torch.Tensor, mu_p: torch.Tensor, sigma_p: torch.Tensor,
                       num: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exactly (0, 0): the fit is a normalised Gaussian."""
        zero = torch.zeros(h.shape[0], dtype=torch.float64, device=h.device)
        return zero, zero

    def settings(self) -> dict[str, int]:
        return {"bank_size": self.bank_size}


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
