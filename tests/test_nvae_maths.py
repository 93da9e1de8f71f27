"""Maths of the backbone checked against closed forms, brute force and autograd."""
import math

import pytest
import torch

from nvae.config import ModelConfig, preset
from nvae.distributions import (Bernoulli, DiscMixLogistic, DiscretisedGaussian, Normal, normal_kl,
                                normal_log_prob)
from nvae.flows import PairedShiftFlow
from nvae.losses import SpectralRegularizer, balanced_kl, kl_balance_alphas, kl_coefficient
from nvae.model import NVAE
from nvae.optim import build_optimizer, warmup_cosine
from nvae.config import TrainConfig


def test_kl_closed_form_matches_monte_carlo():
    torch.manual_seed(0)
    mu_q, mu_p = torch.randn(5), torch.randn(5)
    sigma_q, sigma_p = torch.rand(5) + 0.3, torch.rand(5) + 0.3
    z = mu_q + sigma_q * torch.randn(400_000, 5)
    mc = (normal_log_prob(z, mu_q, sigma_q) - normal_log_prob(z, mu_p, sigma_p)).mean(0)
    exact = normal_kl(mu_q, sigma_q, mu_p, sigma_p)
    stderr = (normal_log_prob(z, mu_q, sigma_q) - normal_log_prob(z, mu_p, sigma_p)).std(0) / math.sqrt(z.shape[0])
    assert torch.all((mc - exact).abs() < 5 * stderr + 1e-4)
    assert torch.allclose(normal_kl(mu_q, sigma_q, mu_q, sigma_q), torch.zeros(5), atol=1e-6)


def test_normal_soft_clamp_and_sigma_floor():
    n = Normal(torch.tensor([100.0, -100.0]), torch.tensor([-100.0, 100.0]))
    assert torch.all(n.mu.abs() <= 5.0)
    assert n.sigma[0] == pytest.approx(math.exp(-5.0) + 1e-2, rel=1e-4)  # log sigma clamped at -5, plus floor
    assert n.sigma[1] <= math.exp(5.0) + 1e-2


@pytest.mark.parametrize("channels,num_bits", [(1, 8), (3, 3)])
def test_dmol_probabilities_sum_to_one(channels, num_bits):
    torch.manual_seed(1)
    num_mix = 3
    levels = 2 ** num_bits
    params = torch.randn(1, DiscMixLogistic.num_params(channels, num_mix), 1, 1) * 2
    grid = torch.arange(levels, dtype=torch.float64).float() / (levels - 1)
    values = torch.cartesian_prod(*([grid] * channels)).reshape(-1, channels) if channels > 1 else grid[:, None]
    x = values[:, :, None, None]  # every joint value of one pixel
    dist = DiscMixLogistic(params.expand(x.shape[0], -1, -1, -1), channels, num_mix, num_bits)
    total = dist.log_prob(x).exp().sum()
    assert abs(total.item() - 1.0) < 1e-4


def test_dmol_matches_numerical_integral_of_logistic_mixture():
    # One channel, one component: bin mass = integral of the logistic density over the bin.
    mean, log_scale = 0.1, math.log(0.2)
    params = torch.tensor([0.0, mean, log_scale]).view(1, 3, 1, 1)
    k = 100
    x = torch.tensor(k / 255.0).view(1, 1, 1, 1)
    logp = DiscMixLogistic(params, 1, 1).log_prob(x).item()
    lo, hi = 2 * k / 255 - 1 - 1 / 255, 2 * k / 255 - 1 + 1 / 255
    t = torch.linspace(lo, hi, 10001, dtype=torch.float64)
    u = (t - mean) / math.exp(log_scale)
    dens = torch.exp(-u) / (math.exp(log_scale) * (1 + torch.exp(-u)) ** 2)
    integral = torch.trapezoid(dens, t).item()
    assert abs(math.exp(logp) - integral) < 1e-6


def test_discretised_gaussian_sums_to_one():
    params = torch.tensor([0.3, math.log(0.4)]).view(1, 2, 1, 1).expand(256, -1, -1, -1)
    x = (torch.arange(256).float() / 255).view(256, 1, 1, 1)
    assert abs(DiscretisedGaussian(params, 1).log_prob(x).exp().sum().item() - 1.0) < 1e-4


def test_bernoulli_loss_only_on_central_crop():
    torch.manual_seed(0)
    model = NVAE(preset("tiny").model)
    logits = torch.randn(2, 1, 32, 32)
    x = torch.rand(2, 1, 32, 32).bernoulli()
    base = model.reconstruction_nll(logits, x)
    border = x.clone()
    border[..., :2, :] = 1 - border[..., :2, :]
    border[..., :, -2:] = 1 - border[..., :, -2:]
    assert torch.equal(model.reconstruction_nll(logits, border), base)
    centre = x.clone()
    centre[..., 2, 2] = 1 - centre[..., 2, 2]
    assert not torch.allclose(model.reconstruction_nll(logits, centre), base)
    expected = -Bernoulli(logits).log_prob(x)[..., 2:30, 2:30].sum(dim=(1, 2, 3))
    assert torch.allclose(base, expected)


def test_spectral_regularizer_matches_matrix_norm():
    torch.manual_seed(0)
    model = NVAE(preset("tiny").model)
    reg = SpectralRegularizer(model, num_power_iter=4, init_power_iter=200)
    value = reg()
    exact = sum(torch.linalg.matrix_norm(m.normalized_weight().flatten(1), ord=2)
                for m in model.modules() if hasattr(m, "normalized_weight"))
    assert torch.allclose(value, exact, rtol=1e-3)
    value.backward()  # differentiable w.r.t. the weights
    assert model.stem.log_weight_norm.grad is not None
    assert "u0" in reg.state_dict()


@pytest.mark.parametrize("name,num_groups,top,sizes", [
    ("mnist", 15, (20, 4, 4), {4: 5, 8: 10}),
    ("cifar10", 30, (20, 16, 16), {16: 30}),
    ("celeba64", 35, (20, 8, 8), {8: 5, 16: 10, 32: 20}),
])
def test_group_shapes_per_preset(name, num_groups, top, sizes):
    model = NVAE(preset(name).model)
    specs = model.group_specs
    assert len(specs) == num_groups
    assert specs[0].shape == top
    counts = {}
    for spec in specs:
        counts[spec.height] = counts.get(spec.height, 0) + 1
    assert counts == sizes
    # Top-down order: resolution never decreases.
    assert all(a.height <= b.height for a, b in zip(specs, specs[1:]))


def test_posterior_pass_shapes_match_specs():
    torch.manual_seed(0)
    model = NVAE(preset("tiny").model)
    out = model.posterior(torch.rand(3, 1, 32, 32).bernoulli())
    assert len(out.groups) == len(model.group_specs)
    for spec, st in zip(model.group_specs, out.groups):
        for t in (st.z, st.mu_q, st.sigma_q, st.mu_p, st.sigma_p, st.log_q, st.log_p):
            assert t.shape == (3, *spec.shape)
        assert st.h.shape == (3, spec.context_channels, spec.height, spec.width)
    assert torch.allclose(out.groups[0].mu_p, torch.zeros(()))


class _NVAEDraw:
    """A hook that draws exactly what NVAE would."""

    def sample_group(self, group, h, mu_p, sigma_p, temperature):
        return mu_p + (temperature * sigma_p) * torch.randn_like(mu_p)


class _NoOp:
    def sample_group(self, group, h, mu_p, sigma_p, temperature):
        return None


@pytest.mark.parametrize("hook", [_NVAEDraw(), _NoOp()])
def test_sample_hook_identity(hook):
    torch.manual_seed(0)
    model = NVAE(preset("tiny").model).eval()
    for t in (1.0, 0.7):
        torch.manual_seed(123)
        plain = model.sample_logits(4, t)
        torch.manual_seed(123)
        hooked = model.sample_logits(4, t, prior=hook)
        assert torch.equal(plain, hooked)


def test_sample_hook_replaces_draw():
    class Zero:
        def sample_group(self, group, h, mu_p, sigma_p, temperature):
            return torch.zeros_like(mu_p) if group == 0 else None

    model = NVAE(preset("tiny").model).eval()
    torch.manual_seed(5)
    a = model.sample_logits(2, 1.0, prior=Zero())
    torch.manual_seed(5)
    b = model.sample_logits(2, 1.0)
    assert not torch.equal(a, b)


def test_shift_flow_jacobian_is_unit_triangular():
    torch.manual_seed(0)
    flow = PairedShiftFlow(z_channels=2, feature_channels=3)
    for p in flow.parameters():  # leave the identity initialisation
        torch.nn.init.normal_(p, std=0.3)
    z, feats = torch.randn(1, 2, 3, 3), torch.randn(1, 3, 3, 3)
    first = flow.cells[0]
    jac = torch.autograd.functional.jacobian(lambda v: first(v.view(1, 2, 3, 3), feats).flatten(), z.flatten())
    # Order (raster position, channel): the Jacobian must be lower triangular with unit diagonal.
    perm = torch.arange(18).view(2, 9).t().flatten()
    j = jac[perm][:, perm]
    assert torch.allclose(torch.diagonal(j), torch.ones(18))
    assert torch.allclose(torch.triu(j, diagonal=1), torch.zeros(18, 18))
    full = torch.autograd.functional.jacobian(lambda v: flow(v.view(1, 2, 3, 3), feats).flatten(), z.flatten())
    assert abs(torch.linalg.slogdet(full)[1].item()) < 1e-5


def test_kl_warmup_and_balancing():
    assert kl_coefficient(0, 1000) == pytest.approx(1e-4)
    assert kl_coefficient(150, 1000) == pytest.approx(0.5, abs=1e-3)
    assert kl_coefficient(400, 1000) == 1.0
    model = NVAE(preset("mnist").model)
    alphas = kl_balance_alphas(model.group_specs)
    # 4x4 groups (5 of them): 16/5; 8x8 groups (10): 64/10 -> ratio 2.
    assert alphas[0] == pytest.approx(1.0) and alphas[-1] == pytest.approx(2.0)
    kls = [torch.rand(8) * (i + 1) for i in range(15)]
    total, weights = balanced_kl(kls, 0.5, alphas)
    assert weights.mean().item() == pytest.approx(1.0, abs=1e-5)
    assert not weights.requires_grad
    total_after, w_after = balanced_kl(kls, 1.0, alphas)
    assert torch.equal(w_after, torch.ones(15))
    assert torch.allclose(total_after, torch.stack(kls, 1).sum(1))


def test_warmup_cosine_schedule():
    params = [torch.nn.Parameter(torch.zeros(1))]
    opt = build_optimizer(params, TrainConfig(lr=1e-2, lr_min=1e-4))
    sched = warmup_cosine(opt, warmup_steps=10, total_steps=110, lr_min=1e-4)
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3)
    assert lrs[9] == pytest.approx(1e-2)
    assert lrs[60] == pytest.approx(1e-4 + (1e-2 - 1e-4) * 0.5 * (1 + math.cos(math.pi * 0.5)), rel=1e-6)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)


def test_config_validation_errors():
    with pytest.raises(ValueError, match="output_dist"):
        ModelConfig(output_dist="poisson").validate()
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(image_size=36).validate()


def test_kl_weight_caps_the_coefficient_and_ends_balancing():
    beta = 0.3
    assert kl_coefficient(0, 1000, kl_weight=beta) == pytest.approx(1e-4)
    assert kl_coefficient(150, 1000, kl_weight=beta) == pytest.approx(0.5 * beta, abs=1e-3)
    for step in (301, 600, 1000):  # after warm-up (30% of the steps plus the constant start): beta, never more
        assert kl_coefficient(step, 1000, kl_weight=beta) == pytest.approx(beta)
    kls = [torch.rand(8) * (i + 1) for i in range(3)]
    alphas = torch.tensor([1.0, 2.0, 4.0])
    total, weights = balanced_kl(kls, beta, alphas, kl_weight=beta)  # warm-up over: no balancing
    assert torch.equal(weights, torch.ones(3))
    torch.testing.assert_close(total, beta * torch.stack(kls, 1).sum(1))
    _, warming = balanced_kl(kls, 0.5 * beta, alphas, kl_weight=beta)
    assert not torch.equal(warming, torch.ones(3))


def test_kl_balancing_weights_by_hand():
    """w_l ∝ (mean KL_l + 0.01) / alpha_l, normalised to mean 1: KL means (1, 2, 3), alphas (1, 2, 4) give
    raw weights (1.01, 1.005, 0.7525)."""
    kls = [torch.full((4,), float(v)) for v in (1.0, 2.0, 3.0)]
    alphas = torch.tensor([1.0, 2.0, 4.0])
    total, weights = balanced_kl(kls, 0.5, alphas)
    raw = torch.tensor([1.01, 1.005, 0.7525])
    expected = raw / raw.mean()
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(total, 0.5 * (expected * torch.tensor([1.0, 2.0, 3.0])).sum().expand(4))
