"""The priors read off the aggregate posterior: the ceiling row draws z_1 from its bank only, the bank is the
posterior's z_1, and the Gaussian fit draws with the bank's mean and covariance."""
from __future__ import annotations

import pytest
import torch
from scipy.stats import multivariate_normal

from evalp_prior.evaluation import posterior_and_prior_draws
from evalp_prior.oracle import AggregatePosteriorPrior, PosteriorGaussianPrior, aggregate_posterior_bank
from nvae.data import get_dataset
from nvae.trained import load_trained_nvae
from tests.helpers import CPU


def bank_rows(z: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """(n, N) boolean: draw i equals bank row j exactly."""
    return (z.flatten(1)[:, None, :] == bank.flatten(1)[None, :, :]).all(dim=2)


class RecordingPrior:
    """Wraps a hook and keeps what it returned per group."""

    def __init__(self, inner):
        self.inner, self.returned = inner, {}

    def sample_group(self, group, h, mu_p, sigma_p, temperature):
        z = self.inner.sample_group(group, h, mu_p, sigma_p, temperature)
        self.returned[group] = z
        return z


def test_oracle_draws_only_bank_rows_for_the_top_group_and_declines_the_rest():
    bank = torch.randn(7, 2, 3, 3)
    prior = AggregatePosteriorPrior(bank)
    torch.manual_seed(0)
    z = prior.sample_group(0, torch.zeros(50, 4, 3, 3), torch.zeros(50, 2, 3, 3), torch.ones(50, 2, 3, 3), 1.0)
    matches = bank_rows(z, bank)
    assert torch.all(matches.any(dim=1))  # every draw is a bank row, exactly
    assert torch.all(matches.any(dim=0))  # 50 draws with replacement reach all 7 rows
    assert prior.sample_group(1, torch.zeros(5, 4, 6, 6), torch.zeros(5, 2, 6, 6), torch.ones(5, 2, 6, 6), 1.0) is None


def test_posterior_gaussian_draws_with_the_banks_mean_and_covariance():
    torch.manual_seed(0)
    mixing = torch.randn(12, 12) / 3
    bank = (torch.randn(4000, 12) @ mixing.T + torch.linspace(-1, 1, 12)).view(4000, 3, 2, 2)
    prior = PosteriorGaussianPrior(bank)
    n = 200_000
    z = prior.sample_group(0, torch.zeros(n, 4, 2, 2), torch.zeros(n, 3, 2, 2), torch.ones(n, 3, 2, 2), 1.0)
    assert z.shape == (n, 3, 2, 2) and z.dtype == torch.float32
    flat, draws = bank.flatten(1).double(), z.flatten(1).double()
    torch.testing.assert_close(draws.mean(0), flat.mean(0), atol=0.01, rtol=0)
    torch.testing.assert_close(torch.cov(draws.T), torch.cov(flat.T), atol=0.03, rtol=0)  # ~5 standard errors
    assert prior.sample_group(1, torch.zeros(5, 4, 4, 4), torch.zeros(5, 3, 4, 4), torch.ones(5, 3, 4, 4), 1.0) is None
    with pytest.raises(ValueError, match="more than"):
        PosteriorGaussianPrior(bank[:12])  # a singular covariance


def test_posterior_gaussian_density_is_the_fits_closed_form_relative_to_p0_and_normalised():
    torch.manual_seed(1)
    mixing = torch.randn(4, 4) / 2
    bank = (torch.randn(3000, 4) @ mixing.T + torch.tensor([0.5, -0.3, 0.0, 1.0])).view(3000, 1, 2, 2)
    prior = PosteriorGaussianPrior(bank)
    z, mu_p, sigma_p = torch.randn(6, 1, 2, 2), 0.3 * torch.randn(6, 1, 2, 2), 0.5 + torch.rand(6, 1, 2, 2)
    ratio = prior.log_density_ratio(0, z, torch.zeros(6, 3, 2, 2), mu_p, sigma_p)
    flat = bank.flatten(1).double().numpy()
    fit = multivariate_normal(flat.mean(0), torch.cov(torch.from_numpy(flat).T).numpy())
    log_p0 = torch.distributions.Normal(mu_p.double(), sigma_p.double()).log_prob(z.double()).flatten(1).sum(1)
    torch.testing.assert_close(ratio + log_p0, torch.from_numpy(fit.logpdf(z.flatten(1).double().numpy())),
                               rtol=0, atol=1e-5)
    # Normalised: E_{p0}[p_fit / p0] = 1, estimated with 400k draws of p0 = N(0, 2^2): its variance 4 exceeds half
    # the fit's largest (2.5), so the weights have a finite variance; standard error ~0.01.
    n = 400_000
    draws = 2 * torch.randn(n, 1, 2, 2)
    log_r = prior.log_density_ratio(0, draws, torch.zeros(n, 3, 2, 2), torch.zeros(n, 1, 2, 2),
                                    torch.full((n, 1, 2, 2), 2.0))
    assert abs(float(log_r.exp().mean()) - 1.0) < 0.04
    log_z, rel_var = prior.log_normaliser(0, torch.zeros(2, 3, 2, 2), mu_p[:2], sigma_p[:2], 10)
    assert torch.equal(log_z, torch.zeros(2, dtype=torch.float64)) and torch.equal(rel_var, log_z)
    assert prior.log_density_ratio(1, z, z, z, sigma_p) is None
    with pytest.raises(ValueError, match=r"\(1, 2, 2\)"):
        prior.log_density_ratio(0, torch.zeros(2, 2, 2, 2), None, torch.zeros(2, 2, 2, 2), torch.ones(2, 2, 2, 2))


def test_oracle_rejects_a_bank_of_the_wrong_shape():
    with pytest.raises(ValueError, match="non-empty"):
        AggregatePosteriorPrior(torch.zeros(0, 2, 3, 3))
    prior = AggregatePosteriorPrior(torch.zeros(4, 2, 3, 3))
    with pytest.raises(ValueError, match=r"\(2, 3, 3\)"):
        prior.sample_group(0, torch.zeros(1, 4, 4, 4), torch.zeros(1, 2, 4, 4), torch.ones(1, 2, 4, 4), 1.0)
    with pytest.raises(ValueError, match="no temperature"):
        prior.sample_group(0, torch.zeros(1, 4, 3, 3), torch.zeros(1, 2, 3, 3), torch.ones(1, 2, 3, 3), 0.8)


def test_bank_is_the_posterior_of_the_chosen_images_and_sampling_uses_it(vae_checkpoint):
    vae, cfg, _ = load_trained_nvae(vae_checkpoint, CPU.device)
    data = get_dataset(cfg.train.dataset, "train", cfg.train.data_root)
    bank = aggregate_posterior_bank(vae, data, 3, 6, 4, False, CPU.device)
    assert bank.shape == (6, *vae.group_specs[0].shape)
    expected = posterior_and_prior_draws(vae, {}, torch.utils.data.Subset(data, range(3, 9)), 6, 4, False, CPU.device)
    torch.testing.assert_close(bank.flatten(1), expected["posterior"][0], rtol=0, atol=0)
    other = aggregate_posterior_bank(vae, data, 0, 6, 4, False, CPU.device)
    assert not torch.equal(bank, other)  # other images, other posterior samples

    recorder = RecordingPrior(AggregatePosteriorPrior(bank))
    with torch.no_grad():
        vae.eval().sample(5, 1.0, recorder)
    assert recorder.returned[0].shape == (5, *vae.group_specs[0].shape)
    assert torch.all(bank_rows(recorder.returned[0], bank).any(dim=1))
    assert all(recorder.returned[g] is None for g in range(1, len(vae.group_specs)))
    with pytest.raises(ValueError, match="are not all in"):
        aggregate_posterior_bank(vae, data, len(data) - 2, 6, 4, False, CPU.device)
