"""The sampler's maximum-likelihood start: the bank of top-group posterior samples and the fit itself."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from evalp_prior.sampler import SharedFlowSampler
from evalp_prior.sampler_fit import BANK_SEED, TopGroupBank, fit_sampler, top_group_bank
from evalp_prior.train import EVaLPTask
from nvae.data import get_dataset, held_out_part
from nvae.hooks import GroupSpec
from nvae.runtime import RunLogger
from nvae.trained import load_trained_nvae
from tests.helpers import CPU
from tests.test_stage2 import _stage2_config

SPEC = [GroupSpec(index=0, scale=0, channels=2, height=2, width=2, context_channels=3)]


def _gaussian_bank(n: int, seed: int = 0) -> tuple[TopGroupBank, torch.Tensor, torch.Tensor]:
    """A bank of n draws of a correlated 8-d Gaussian N(mean, cov) with a base N(0.5, 2^2), and (mean, cov)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(8, 8, generator=g, dtype=torch.float64) * 0.4 + torch.eye(8, dtype=torch.float64)
    mean, cov = torch.randn(8, generator=g, dtype=torch.float64), a @ a.T
    z = (mean + torch.randn(n, 8, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T).float()
    bank = TopGroupBank(z.view(n, 2, 2, 2), torch.ones(1, 3, 2, 2), torch.full((1, 2, 2, 2), 0.5),
                        torch.full((1, 2, 2, 2), 2.0))
    return bank, mean, cov


def test_fit_reaches_the_entropy_of_a_gaussian():
    bank, _, cov = _gaussian_bank(20000)
    torch.manual_seed(0)
    sampler = SharedFlowSampler(SPEC, [0], hidden=16, num_couplings=2, group_affine=True)
    result = fit_sampler(sampler, bank, steps=1500, batch_size=256, lr=1e-2)
    # The bank's NLL under its own density is the entropy (closed form) up to the probe's noise (~0.03 nats); no
    # model does better in expectation, and the base N(0.5, 2^2) the sampler starts from is 8 nats worse.
    entropy = 0.5 * float(torch.logdet(2 * math.pi * math.e * cov))
    assert result["nll_before"] > entropy + 3
    assert abs(result["nll_after"] - entropy) < 0.15, (result, entropy)


def test_fit_is_seeded_and_refuses_a_sampler_without_the_top_group():
    bank, _, _ = _gaussian_bank(512)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        sampler = SharedFlowSampler(SPEC, [0], hidden=8, num_couplings=2)
        torch.manual_seed(123 + len(runs))  # the run's own stream must not matter
        fit_sampler(sampler, bank, steps=5, batch_size=64, lr=1e-3)
        runs.append(sampler.state_dict())
    for key, value in runs[0].items():
        assert torch.equal(value, runs[1][key]), key
    two = [SPEC[0], GroupSpec(index=1, scale=0, channels=2, height=2, width=2, context_channels=3)]
    with pytest.raises(ValueError, match="top group"):
        fit_sampler(SharedFlowSampler(two, [1], hidden=8), bank, steps=1, batch_size=8, lr=1e-3)


def test_bank_is_one_seeded_posterior_draw_per_image(vae_checkpoint):
    vae, _, _ = load_trained_nvae(vae_checkpoint, torch.device("cpu"))
    train_set = get_dataset("synthetic", "train")
    torch.manual_seed(5)
    bank = top_group_bank(vae, train_set, 24, 8, False, torch.device("cpu"))
    after = torch.rand(1)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(1))  # the caller's random stream is left as it was
    torch.manual_seed(BANK_SEED)
    with torch.no_grad():
        tops = [vae.posterior(torch.stack([train_set[i] for i in range(s, s + 8)])).groups[0] for s in range(0, 24, 8)]
    assert torch.equal(bank.z, torch.cat([t.z for t in tops]))
    assert torch.equal(bank.h, tops[0].h[:1]) and torch.equal(bank.sigma_p, tops[0].sigma_p[:1])


def test_bank_refuses_a_context_that_depends_on_the_image():
    def posterior(x):  # a group whose context is the image itself
        z = torch.zeros(x.shape[0], 2, 2, 2)
        return SimpleNamespace(groups=[SimpleNamespace(z=z, h=x[:, :1, :2, :2], mu_p=z, sigma_p=z + 1)])

    fake = SimpleNamespace(posterior=posterior)
    images = [torch.rand(1, 4, 4) for _ in range(6)]
    with pytest.raises(ValueError, match="context differs between images"):
        top_group_bank(fake, images, 6, 3, False, torch.device("cpu"))


def test_task_fits_the_top_group_and_refuses_lower_groups(vae_checkpoint):
    vae, vae_cfg, _ = load_trained_nvae(vae_checkpoint, torch.device("cpu"))
    train_set = get_dataset("synthetic", "train")
    validation = held_out_part(get_dataset("synthetic", "test"), "validation")
    messages = []

    class Log(RunLogger):
        def info(self, message):
            messages.append(message)

    torch.manual_seed(0)
    task = EVaLPTask(_stage2_config(vae, groups="top", sampler_affine="moments", moment_images=64,
                                    sampler_fit_steps=30, sampler_fit_images=64, sampler_fit_batch=32,
                                    sampler_ema=0.9),
                     vae, vae_cfg, CPU, validation, False, Log(".", False), 6, train_set)
    before, after = (float(v) for v in messages[-1].split("NLL ")[1].split(" nats")[0].split(" -> "))
    assert after < before, messages
    # Generation's moving average starts from the fitted sampler.
    for a, b in zip(task.sampler.state_dict().values(), task.generation_sampler().state_dict().values()):
        assert torch.equal(a, b)
    assert len(vae.group_specs) > 1
    with pytest.raises(ValueError, match="--groups top"):
        EVaLPTask(_stage2_config(vae, groups="all", sampler_fit_steps=1), vae, vae_cfg, CPU, validation, False,
                  RunLogger(".", False), 6, train_set)
