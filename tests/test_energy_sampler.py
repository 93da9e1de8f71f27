"""Energies, the shared flow sampler, the objectives and group selection."""
import math

import pytest
import torch

from evalp_prior.energy import EnergySet
from evalp_prior.group_selection import parse_groups
from evalp_prior.objectives import (
    GroupBatch,
    ObjectiveConfig,
    alternating_step,
    energy_loss,
    gradient_penalty,
    sampler_loss,
)
from evalp_prior.sampler import SharedFlowSampler, gaussian_log_prob
from nvae.hooks import GroupSpec

# Two scales with different context channels, like NVAE's adaptive group layout.
SPECS = [
    GroupSpec(index=0, scale=0, channels=4, height=2, width=2, context_channels=6),
    GroupSpec(index=1, scale=0, channels=4, height=2, width=2, context_channels=6),
    GroupSpec(index=2, scale=1, channels=4, height=3, width=3, context_channels=5),
]


def _inputs(spec: GroupSpec, batch: int, dtype=torch.float32, seed: int = 0):
    """(mu_p, sigma_p, h) for a group."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, *spec.shape)
    mu = torch.randn(shape, generator=g, dtype=dtype)
    sigma = 0.5 + torch.rand(shape, generator=g, dtype=dtype)
    h = torch.randn(batch, spec.context_channels, spec.height, spec.width, generator=g, dtype=dtype)
    return mu, sigma, h


def _random_covariance(dims: int, generator: torch.Generator) -> torch.Tensor:
    """A well-conditioned, strongly correlated SPD matrix (dims, dims) in float64."""
    a = torch.randn(dims, dims, generator=generator, dtype=torch.float64)
    return a @ a.T / dims + 0.2 * torch.eye(dims, dtype=torch.float64)


# The sampler's optional layers: none, Glow's channel mixing, the per-group affine layer.
LAYOUTS = ["couplings", "mixing", "affine"]


def _randomised_sampler(dtype=torch.float64, layout: str = "couplings") -> SharedFlowSampler:
    """A sampler whose zero-initialised conditioner outputs (and channel mixes, affine layers) are randomised,
    so f is not the identity."""
    torch.manual_seed(0)
    sampler = SharedFlowSampler(SPECS, [0, 1, 2], hidden=8, num_couplings=4, embed_dim=3,
                                channel_mixing=layout == "mixing", group_affine=layout == "affine")
    with torch.no_grad():
        for coupling in sampler.couplings:
            last = coupling.net[-1]
            last.weight.normal_(0, 0.3)
            last.bias.normal_(0, 0.3)
        for mix in sampler.mixes or []:
            mix.delta.normal_(0, 0.3)
    if layout == "affine":
        g = torch.Generator().manual_seed(1)
        for group in sampler.groups:
            dims = math.prod(SPECS[group].shape)
            sampler.set_group_moments(group, torch.randn(dims, generator=g, dtype=torch.float64),
                                      _random_covariance(dims, g))
    return sampler.to(dtype)


def test_energy_is_per_sample_and_shares_within_scale():
    energies = EnergySet(SPECS, [0, 1, 2], hidden=8)
    shared = EnergySet(SPECS, [0, 1, 2], hidden=8, share_within_scale=True)
    assert len(energies.nets) == 3 and len(shared.nets) == 2
    mu, _, h = _inputs(SPECS[2], 5)
    e = energies(2, mu, h)
    assert e.shape == (5,) and e.dtype == torch.float32
    # No batch-dependent layers: each sample's energy ignores the rest of the batch.
    singles = torch.cat([energies(2, mu[i : i + 1], h[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(e, singles)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert energies(2, mu, h).dtype == torch.float32
    with pytest.raises(KeyError):
        EnergySet(SPECS, [0], hidden=8)(1, mu, h)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_flow_logdet_matches_autograd_jacobian(layout):
    sampler = _randomised_sampler(layout=layout)
    for group in (0, 2):
        spec = SPECS[group]
        _, _, h = _inputs(spec, 1, torch.float64, seed=group)
        eps = torch.randn(1, *spec.shape, dtype=torch.float64)
        _, logdet = sampler.flow(eps, h, group)
        jac = torch.autograd.functional.jacobian(lambda x: sampler.flow(x, h, group)[0], eps, vectorize=True)
        n = eps.numel()
        _, expected = torch.linalg.slogdet(jac.reshape(n, n))
        assert abs(logdet.item()) > 0.1  # the randomisation made the flow non-trivial
        torch.testing.assert_close(logdet, expected.reshape(1), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_inverse_and_log_prob_round_trip(layout):
    sampler = _randomised_sampler(layout=layout)
    mu, sigma, h = _inputs(SPECS[2], 4, torch.float64)
    eps = torch.randn_like(mu)
    u, logdet = sampler.flow(eps, h, 2)
    back, logdet_inverse = sampler.inverse(u, h, 2)
    torch.testing.assert_close(back, eps)
    torch.testing.assert_close(logdet_inverse, -logdet)
    for temperature in (1.0, 0.7):
        z, log_q = sampler(mu, sigma, h, 2, temperature=temperature)
        torch.testing.assert_close(sampler.log_prob(z, mu, sigma, h, 2, temperature), log_q)
    # The group embedding conditions the flow: groups 0 and 1 share scale and context, not the map.
    _, _, h0 = _inputs(SPECS[0], 4, torch.float64)
    eps0 = torch.randn(4, *SPECS[0].shape, dtype=torch.float64)
    assert not torch.allclose(sampler.flow(eps0, h0, 0)[0], sampler.flow(eps0, h0, 1)[0])


def test_log_prob_is_a_normalised_density():
    # A 2-dimensional group (C=2, 1x1) with a non-trivial flow: integrate q on a grid.
    specs = [GroupSpec(0, 0, 2, 1, 1, 3)]
    torch.manual_seed(1)
    sampler = SharedFlowSampler(specs, [0], hidden=8, num_couplings=4).double()
    with torch.no_grad():
        for coupling in sampler.couplings:
            coupling.net[-1].weight.normal_(0, 0.5)
    step = 0.05
    axis = torch.arange(-8, 8, step, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis).view(-1, 2, 1, 1)
    n = grid.shape[0]
    mu = torch.tensor([0.3, -0.2], dtype=torch.float64).view(1, 2, 1, 1).expand(n, -1, -1, -1)
    sigma = torch.tensor([1.2, 0.8], dtype=torch.float64).view(1, 2, 1, 1).expand(n, -1, -1, -1)
    h = torch.ones(n, 3, 1, 1, dtype=torch.float64)
    mass = sampler.log_prob(grid, mu, sigma, h, 0, temperature=0.9).exp().sum() * step**2
    assert abs(mass.item() - 1.0) < 1e-3


@pytest.mark.parametrize("group_affine", [False, True])
def test_identity_at_init_reproduces_nvae_draw_bit_for_bit(group_affine):
    sampler = SharedFlowSampler(SPECS, [0, 1, 2], hidden=8, group_affine=group_affine)
    mu, sigma, h = _inputs(SPECS[2], 6)
    for temperature in (1.0, 0.7):
        torch.manual_seed(123)
        nvae_draw = mu + temperature * sigma * torch.randn_like(mu)  # NVAE's own expression
        torch.manual_seed(123)
        z, log_q = sampler(mu, sigma, h, 2, temperature=temperature)
        assert torch.equal(z, nvae_draw)
        torch.testing.assert_close(log_q, gaussian_log_prob(z, mu, temperature * sigma))
    eps = torch.randn_like(mu)
    z, _ = sampler(mu, sigma, h, 2, eps=eps)
    assert torch.equal(z, mu + sigma * eps)
    _, logdet = sampler.flow(eps, h, 2)
    assert torch.equal(logdet, torch.zeros(6))


def test_affine_layer_started_at_moments_draws_them():
    # With identity couplings, u = (z - mu_p) / sigma_p = b + L eps must have the set mean and covariance,
    # across positions and channels: the correlations the couplings alone are slow to learn.
    spec = SPECS[2]
    dims = math.prod(spec.shape)
    g = torch.Generator().manual_seed(3)
    mean, covariance = torch.randn(dims, generator=g, dtype=torch.float64), _random_covariance(dims, g)
    sampler = SharedFlowSampler(SPECS, [0, 2], hidden=8, group_affine=True).double()
    sampler.set_group_moments(2, mean, covariance)
    n = 40000
    mu, sigma, h = _inputs(spec, n, torch.float64)
    torch.manual_seed(4)
    z, log_q = sampler(mu, sigma, h, 2)
    u = ((z - mu) / sigma).flatten(1)
    assert (u.mean(0) - mean).abs().max() < 5 * (covariance.diagonal().max() / n) ** 0.5
    assert (torch.cov(u.T) - covariance).abs().max() < 0.05
    # log q is the Gaussian N(mu + sigma b, sigma L L^T sigma) density of z.
    expected = torch.distributions.MultivariateNormal(mean, covariance).log_prob(u) - sigma.log().flatten(1).sum(1)
    torch.testing.assert_close(log_q, expected)
    # The other group keeps its identity layer; a sampler without affine layers refuses moments.
    eps = torch.randn(2, *SPECS[0].shape, dtype=torch.float64)
    assert torch.equal(sampler.flow(eps, torch.zeros(2, 6, 2, 2, dtype=torch.float64), 0)[0], eps)
    with pytest.raises(ValueError, match="no per-group affine layer"):
        SharedFlowSampler(SPECS, [0], hidden=8).set_group_moments(0, mean[:16], covariance[:16, :16])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_densities_stay_float32_under_autocast(layout):
    sampler = _randomised_sampler(torch.float32, layout)
    mu, sigma, h = _inputs(SPECS[2], 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, log_q = sampler(mu, sigma, h, 2)
        log_prob = sampler.log_prob(z, mu, sigma, h, 2)
    assert z.dtype == log_q.dtype == torch.float32
    # The conditioners run in bfloat16, but the inverse recomputes the same values: still exact.
    torch.testing.assert_close(log_prob, log_q, rtol=1e-5, atol=1e-4)


def test_gradient_penalty_of_a_linear_energy():
    z_pos, z_neg = torch.randn(7, 4, 1, 1), torch.randn(7, 4, 1, 1)
    for scale in (1.0, 0.2):  # gradient norms above and below 1: the penalty is two-sided
        a = (scale * torch.tensor([0.5, -2.0, 1.0, 0.25])).requires_grad_(True)  # E(z) = <a, z>
        gp = gradient_penalty(lambda z, h: z.flatten(1) @ a, z_pos, z_neg, torch.zeros(7, 1, 1, 1))
        norm = a.detach().norm()
        torch.testing.assert_close(gp, (norm - 1) ** 2)
        (grad,) = torch.autograd.grad(gp, a)  # create_graph=True makes the penalty trainable
        torch.testing.assert_close(grad, 2 * (norm - 1) * a.detach() / norm)


def test_gradient_penalty_loss_scale_keeps_small_fp16_gradients():
    # E(z) = sum((1e8 z) * 1e-4 * 1e-4) with the products in float16 has input gradient 1 per entry, but
    # its float16 intermediate gradient (1e-8) underflows to zero unless the energies are scaled first
    # (the fp16 loss scale, here 2^12); scaled, the penalty is the exact one up to float16 rounding.
    z_pos, z_neg = 1e-8 * torch.randn(5, 3, 2, 2), 1e-8 * torch.randn(5, 3, 2, 2)

    def energy(z, h):
        return (((z * 1e8).half() * 1e-4) * 1e-4).float().flatten(1).sum(1)

    exact = (math.sqrt(12) - 1) ** 2  # ||grad E|| = sqrt(12) for every sample
    assert gradient_penalty(energy, z_pos, z_neg, None).item() == 1.0  # every gradient entry flushed to zero
    scaled = gradient_penalty(energy, z_pos, z_neg, None, grad_scale=2.0**12)
    torch.testing.assert_close(scaled, torch.tensor(exact), rtol=1e-2, atol=0)


def test_loss_formulas():
    e_pos, e_neg = torch.tensor([1.0, 3.0]), torch.tensor([0.0, -2.0])
    loss, stats = energy_loss(e_pos, e_neg, torch.tensor(0.5), lambda_gp=10.0)
    torch.testing.assert_close(loss, torch.tensor(2.0 - (-1.0) + 5.0))
    torch.testing.assert_close(stats["energy_gap"], torch.tensor(3.0))
    log_q, log_p0 = torch.tensor([-1.0, -3.0]), torch.tensor([-4.0, -4.0])
    torch.testing.assert_close(sampler_loss(e_neg, log_q, log_p0, 0.0), torch.tensor(-1.0))
    torch.testing.assert_close(sampler_loss(e_neg, log_q, log_p0, 0.5), torch.tensor(-1.0 + 0.5 * 2.0))


def test_alternating_step_updates_the_right_parameters():
    groups = [0, 2]
    energies = EnergySet(SPECS, groups, hidden=8)
    sampler = SharedFlowSampler(SPECS, groups, hidden=8)
    opt_e = torch.optim.SGD(energies.parameters(), lr=0.1)
    opt_s = torch.optim.SGD(sampler.parameters(), lr=0.1)
    batch = []
    for g in groups:
        mu, sigma, h = _inputs(SPECS[g], 5, seed=g)
        batch.append(GroupBatch(g, mu + 0.5 * torch.randn_like(mu), h, mu, sigma))

    def snapshot(module):
        return [p.detach().clone() for p in module.parameters()]

    config = ObjectiveConfig(n_critic=2, kl_weight=1e-3)
    e0, s0 = snapshot(energies), snapshot(sampler)
    stats = alternating_step(batch, energies, sampler, opt_e, opt_s, step=1, config=config)
    assert stats["sampler_step"].item() == 0 and "sampler_loss" not in stats
    assert all(torch.equal(a, b) for a, b in zip(s0, snapshot(sampler)))
    assert not all(torch.equal(a, b) for a, b in zip(e0, snapshot(energies)))
    assert set(stats) >= {"energy_gap/group0", "energy_gap/group2", "energy_gap/mean", "gp/mean"}

    e1, s1 = snapshot(energies), snapshot(sampler)
    opt_e.zero_grad(set_to_none=True)
    calls = []

    def backward_and_step(loss, optimizer, params):
        calls.append(optimizer)
        if optimizer is opt_e:
            return True  # the energy step of this call is skipped, as a non-finite step would be
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in energies.parameters())  # energy grads never computed
        optimizer.step()
        return True

    stats = alternating_step(batch, energies, sampler, opt_e, opt_s, step=2, config=config,
                             backward_and_step=backward_and_step)
    assert calls == [opt_e, opt_s] and stats["sampler_step"].item() == 1
    assert set(stats) >= {"sampler_loss", "kl/group0", "kl/group2"}
    assert all(torch.equal(a, b) for a, b in zip(e1, snapshot(energies)))
    assert not all(torch.equal(a, b) for a, b in zip(s1, snapshot(sampler)))
    assert all(p.requires_grad for p in energies.parameters())  # frozen only during the step


def test_alternating_step_moves_each_loss_downhill():
    """Each optimiser step lowers its own loss: re-evaluated with the same random draws (negatives, penalty
    interpolates, sampler noise) after the step, the energy loss and the sampler loss are below what they
    were. A flipped sign in either objective, or a step on the wrong parameters, would raise them."""
    import copy

    groups = [0, 2]
    torch.manual_seed(0)
    energies = EnergySet(SPECS, groups, hidden=8)
    sampler = SharedFlowSampler(SPECS, groups, hidden=8)
    batch = []
    for g in groups:
        mu, sigma, h = _inputs(SPECS[g], 16, seed=g)
        batch.append(GroupBatch(g, mu + 0.5 * torch.randn_like(mu), h, mu, sigma))
    config = ObjectiveConfig(n_critic=1, kl_weight=1e-3)

    def losses(e: EnergySet, s: SharedFlowSampler, seed: int, lr_e: float = 0.0, lr_s: float = 0.0) -> dict:
        """alternating_step's losses at seed (with these step sizes; 0: evaluate only, on copies)."""
        if lr_e == 0 and lr_s == 0:
            e, s = copy.deepcopy(e), copy.deepcopy(s)
        torch.manual_seed(seed)
        stats = alternating_step(batch, e, s, torch.optim.SGD(e.parameters(), lr=lr_e),
                                 torch.optim.SGD(s.parameters(), lr=lr_s), step=0, config=config)
        return {k: float(stats[k]) for k in ("energy_loss", "sampler_loss")}

    before = losses(energies, sampler, seed=5)
    assert losses(energies, sampler, seed=5, lr_e=1e-3)["energy_loss"] == pytest.approx(before["energy_loss"])
    after = losses(energies, sampler, seed=5)
    assert after["energy_loss"] < before["energy_loss"]
    before = losses(energies, sampler, seed=6)
    losses(energies, sampler, seed=6, lr_s=1e-3)
    assert losses(energies, sampler, seed=6)["sampler_loss"] < before["sampler_loss"]


def test_parse_groups():
    assert parse_groups("all", SPECS) == [0, 1, 2]
    assert parse_groups("top", SPECS) == [0]
    assert parse_groups(" 2, 0 ", SPECS) == [0, 2]
    for bad in ("3", "-1", "0,,1", "1,1", "first", "", "0;1"):
        with pytest.raises(ValueError):
            parse_groups(bad, SPECS)


def test_gaussian_log_prob_matches_torch():
    z, mu, sigma = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2), torch.rand(3, 2, 2, 2) + 0.1
    expected = torch.distributions.Normal(mu, sigma).log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_log_prob(z, mu, sigma), expected)
    assert math.isfinite(gaussian_log_prob(z.half(), mu.half(), sigma.half()).sum().item())


def test_flow_with_per_item_conditioning_equals_repeated_contexts():
    # SIR's path: the conditioning is computed once per item and broadcast over k draws per item.
    sampler = _randomised_sampler()
    k = 3
    for group in (0, 2):
        _, _, h = _inputs(SPECS[group], 4, torch.float64, seed=group)
        eps = torch.randn(k * 4, *SPECS[group].shape, dtype=torch.float64)  # row j * 4 + i: item i
        u, logdet = sampler.flow_conditioned(eps, sampler.condition(h, group))
        expected_u, expected_logdet = sampler.flow(eps, h.repeat(k, 1, 1, 1), group)
        assert logdet.abs().max() > 0.1
        torch.testing.assert_close(u, expected_u, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(logdet, expected_logdet, rtol=1e-12, atol=1e-12)
    with pytest.raises(KeyError):
        SharedFlowSampler(SPECS, [0], hidden=8).condition(h, 2)


@pytest.mark.parametrize("spectral_norm", [False, True])
def test_energy_with_per_item_conditioning_equals_repeated_contexts(spectral_norm):
    torch.manual_seed(0)
    energies = EnergySet(SPECS, [0, 2], hidden=8, spectral_norm=spectral_norm).double().eval()
    k = 5
    for group in (0, 2):
        _, _, h = _inputs(SPECS[group], 3, torch.float64, seed=group)
        z = torch.randn(k * 3, *SPECS[group].shape, dtype=torch.float64)
        expected = energies(group, z, h.repeat(k, 1, 1, 1))
        torch.testing.assert_close(energies.conditioned(group, h)(z), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(KeyError):
        energies.conditioned(1, h)
