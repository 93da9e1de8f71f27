"""The critic side of the EVaLP game: penalties against closed forms, the critic-only mode against a known
Wasserstein distance, whitened inputs against autograd, and the sampler's moving average."""
from __future__ import annotations

import pytest
import torch

from evalp_prior.energy import EnergySet
from evalp_prior.objectives import GroupBatch, ObjectiveConfig, alternating_step, gradient_penalty
from evalp_prior.sampler import SharedFlowSampler
from evalp_prior.train import sampler_average
from nvae.hooks import GroupSpec

DIM = 4
SPECS = [GroupSpec(index=0, scale=0, channels=DIM, height=1, width=1, context_channels=2)]


def _linear(a: torch.Tensor):
    """E(z) = <a, z>: its input gradient is a everywhere."""
    return lambda z, h: z.flatten(1) @ a


@pytest.mark.parametrize("scale", [2.0, 0.3])  # gradient norms above and below 1
def test_one_sided_and_r1_penalties_of_a_linear_energy(scale):
    z_pos, z_neg = torch.randn(9, DIM, 1, 1), torch.randn(9, DIM, 1, 1)
    a = (scale * torch.tensor([0.5, -2.0, 1.0, 0.25])).requires_grad_(True)
    norm = a.detach().norm()
    one_sided = gradient_penalty(_linear(a), z_pos, z_neg, None, kind="one-sided")
    torch.testing.assert_close(one_sided, (norm - 1).clamp_min(0) ** 2)
    r1 = gradient_penalty(_linear(a), z_pos, z_neg, None, kind="r1")
    torch.testing.assert_close(r1, norm ** 2)
    (grad,) = torch.autograd.grad(r1, a)  # trainable: d ||a||^2 / da = 2a
    torch.testing.assert_close(grad, 2 * a.detach())
    with pytest.raises(ValueError, match="unknown gradient penalty"):
        gradient_penalty(_linear(a), z_pos, z_neg, None, kind="zero")


def test_whitened_critic_is_the_raw_critic_composed_with_the_whitening():
    torch.manual_seed(0)
    raw = EnergySet(SPECS, [0], hidden=8)
    whitened = EnergySet(SPECS, [0], hidden=8, whiten=True)
    whitened.load_state_dict(raw.state_dict())
    z = torch.randn(6, DIM, 1, 1, requires_grad=True)
    mu, sigma, h = torch.randn(6, DIM, 1, 1), torch.rand(6, DIM, 1, 1) + 0.01, torch.randn(6, 2, 1, 1)
    assert torch.equal(raw.inputs(z, mu, sigma), z)
    e_white = whitened(0, whitened.inputs(z, mu, sigma), h)
    e_composed = raw(0, (z - mu) / sigma, h)
    torch.testing.assert_close(e_white, e_composed)
    # Chain rule through the whitening: dE/dz = (dE/dx) / sigma at x = (z - mu) / sigma.
    (grad_z,) = torch.autograd.grad(e_white.sum(), z)
    x = ((z - mu) / sigma).detach().requires_grad_(True)
    (grad_x,) = torch.autograd.grad(raw(0, x, h).sum(), x)
    torch.testing.assert_close(grad_z, grad_x / sigma)


def test_whitened_objective_penalises_in_whitened_units():
    """With whitening the step's penalty is the raw critic's penalty on whitened positives and negatives."""
    torch.manual_seed(1)
    sampler = SharedFlowSampler(SPECS, [0], hidden=8, num_couplings=2)
    mu, sigma = torch.randn(16, DIM, 1, 1), 0.01 + 0.1 * torch.rand(16, DIM, 1, 1)
    h, z_pos = torch.randn(16, 2, 1, 1), mu + sigma * (1 + torch.randn(16, DIM, 1, 1))
    stats = {}
    for whiten in (False, True):
        energies = EnergySet(SPECS, [0], hidden=8, whiten=whiten)
        energies.load_state_dict(EnergySet(SPECS, [0], hidden=8).state_dict() if not stats else stats["state"])
        stats["state"] = energies.state_dict()
        opt_e, opt_s = (torch.optim.SGD(m.parameters(), lr=0.0) for m in (energies, sampler))
        torch.manual_seed(5)
        out = alternating_step([GroupBatch(0, z_pos, h, mu, sigma)], energies, sampler, opt_e, opt_s, 0,
                               ObjectiveConfig(n_critic=10))
        stats[whiten] = out
        if whiten:
            torch.manual_seed(5)
            z_neg, _ = sampler(mu, sigma, h, 0)
            expected = gradient_penalty(lambda x, hh: energies(0, x, hh), (z_pos - mu) / sigma, (z_neg - mu) / sigma, h)
            torch.testing.assert_close(out["gp/group0"], expected.detach())
    # A raw critic sees displacements of size sigma (0.01 to 0.11) only: its gap is far smaller.
    assert abs(float(stats[True]["energy_gap/group0"])) > abs(float(stats[False]["energy_gap/group0"]))


def test_critic_only_reaches_minus_w1_between_two_gaussians():
    """Positives N(m, I), frozen sampler N(0, I) (identity flow): W1 = ||m|| = d, attained by a linear critic.

    With the sampler frozen, the critic's energy gap E(z+) - E(z-) on held-out samples must reach -d within
    10%, and the two-sided penalty must fall as the critic becomes 1-Lipschitz along the segments.
    """
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        d = 2.0
        shift = torch.tensor([1.0, -1.0, 1.0, 1.0]).view(1, DIM, 1, 1) * d / 2  # ||shift|| = d
        energies = EnergySet(SPECS, [0], hidden=32)
        sampler = SharedFlowSampler(SPECS, [0], hidden=8, num_couplings=2)
        frozen = [p.clone() for p in sampler.parameters()]
        opt_e = torch.optim.Adam(energies.parameters(), lr=2e-3, betas=(0.0, 0.9))
        opt_s = torch.optim.Adam(sampler.parameters(), lr=1e-2)
        batch = 256
        mu, sigma, h = torch.zeros(batch, DIM, 1, 1), torch.ones(batch, DIM, 1, 1), torch.zeros(batch, 2, 1, 1)
        config = ObjectiveConfig(n_critic=1, critic_only=True)
        penalties = []
        for step in range(600):
            z_pos = shift + torch.randn(batch, DIM, 1, 1)
            out = alternating_step([GroupBatch(0, z_pos, h, mu, sigma)], energies, sampler, opt_e, opt_s, step, config)
            assert float(out["sampler_step"]) == 0.0
            penalties.append(float(out["gp/group0"]))
        assert all(torch.equal(a, b) for a, b in zip(frozen, sampler.parameters()))
        n = 4000
        with torch.no_grad():
            z_pos = shift + torch.randn(n, DIM, 1, 1)
            z_neg = torch.randn(n, DIM, 1, 1)
            hh = torch.zeros(n, 2, 1, 1)
            gap = float(energies(0, z_pos, hh).mean() - energies(0, z_neg, hh).mean())
        assert -1.1 * d <= gap <= -0.9 * d, gap
        early, late = sum(penalties[:20]) / 20, sum(penalties[-100:]) / 100
        assert late < early, (early, late)
    finally:
        torch.set_num_threads(threads)


def test_critic_warmup_delays_the_first_sampler_step():
    config = ObjectiveConfig(n_critic=5, critic_warmup_steps=12)
    steps = [s for s in range(30) if config.is_sampler_step(s)]
    assert steps == [15, 20, 25]  # the last call before a multiple of n_critic is critic-only
    assert not any(ObjectiveConfig(critic_only=True).is_sampler_step(s) for s in range(30))


def test_sampler_average_is_an_exponential_moving_average():
    torch.manual_seed(0)
    sampler = SharedFlowSampler(SPECS, [0], hidden=8, num_couplings=2)
    assert sampler_average(sampler, 0.0) is None
    ema = sampler_average(sampler, 0.9)
    start = [p.detach().clone() for p in sampler.parameters()]
    ema.update_parameters(sampler)  # the first update copies the weights
    with torch.no_grad():
        for p in sampler.parameters():
            p.add_(1.0)
    ema.update_parameters(sampler)
    for p0, p_ema in zip(start, ema.module.parameters()):
        torch.testing.assert_close(p_ema, 0.9 * p0 + 0.1 * (p0 + 1.0))


def test_flag_help_comes_from_the_config_fields_own_comments():
    import argparse

    from evalp_prior.config import EVaLPConfig
    from nvae.runtime.flags import add_dataclass_args, field_comments

    comments = field_comments(EVaLPConfig)
    assert comments["critic_warmup_steps"] == "energy-only steps before the first sampler step"
    assert comments["groups"] == "all | top | comma-separated group indices"  # inherited from FrozenPriorConfig
    assert comments["lr_energy"] == "Adam learning rate of the energies (critic)"  # not the rationale above it
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, EVaLPConfig, "EVaLP")
    assert "energy-only steps before the first sampler step (preset or default: 300)" in " ".join(
        parser.format_help().split())


@pytest.mark.parametrize("path", ["nvae.config.TrainConfig", "nvae.config.ModelConfig", "evalp_prior.config.EVaLPConfig",
                                  "evalp_prior.baselines.langevin.LangevinConfig", "evalp_prior.baselines.ncp.NCPConfig"])
def test_every_config_field_has_a_help_text(path):
    """Every flag's --help says what it does: each field carries a comment on its own line (field_comments)."""
    import dataclasses
    import importlib

    from nvae.runtime.flags import field_comments

    module, name = path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    comments = field_comments(cls)
    assert [f.name for f in dataclasses.fields(cls) if not comments.get(f.name)] == []
