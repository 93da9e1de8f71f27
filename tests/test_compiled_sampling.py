"""--compile for generation and stage 2: the compiled decoder cells and sampler couplings give the eager draws,
densities and gradients (to float rounding)."""
import copy

import torch

from evalp_prior.config import EVaLPConfig
from evalp_prior.prior import EVaLPPrior
from evalp_prior.train import build_prior_modules
from nvae.cells import compile_cells
from nvae.config import preset
from nvae.model import NVAE


def _models():
    torch.manual_seed(0)
    vae = NVAE(preset("tiny").model).eval().requires_grad_(False)
    groups, energies, sampler = build_prior_modules(EVaLPConfig(groups="all"), vae)
    with torch.no_grad():
        for coupling in sampler.couplings:  # a non-identity flow, as after training
            coupling.net[-1].weight.normal_(0, 0.05)
    return vae, groups, energies.eval(), sampler.eval()


def test_compiled_generation_matches_eager():
    vae, groups, energies, sampler = _models()
    fast_vae, fast_sampler = copy.deepcopy(vae), copy.deepcopy(sampler)
    compile_cells(fast_vae)
    fast_sampler.compile_couplings()
    images = []
    for model, flow in ((vae, sampler), (fast_vae, fast_sampler)):
        torch.manual_seed(3)
        images.append(model.sample(8, 1.0, prior=EVaLPPrior(energies, flow, groups)))
    assert torch.allclose(images[0], images[1], atol=1e-4)


def test_compiled_couplings_match_eager_densities_and_gradients():
    vae, groups, _, sampler = _models()
    sampler.train()
    fast = copy.deepcopy(sampler)
    fast.compile_couplings()
    spec = vae.group_specs[groups[-1]]
    torch.manual_seed(4)
    h = torch.randn(6, spec.context_channels, spec.height, spec.width)
    mu, sigma = torch.randn(6, *spec.shape), torch.rand(6, *spec.shape) + 0.5
    eps = torch.randn(6, *spec.shape)
    results = []
    for flow in (sampler, fast):
        z, log_q = flow(mu, sigma, h, groups[-1], eps=eps)
        loss = (z ** 2).mean() + log_q.mean() + flow.log_prob(z.detach(), mu, sigma, h, groups[-1]).mean()
        loss.backward()
        results.append((z, log_q, [p.grad.clone() for p in flow.parameters() if p.grad is not None]))
    (z0, lq0, g0), (z1, lq1, g1) = results
    assert torch.allclose(z0, z1, atol=1e-5) and torch.allclose(lq0, lq1, rtol=1e-5, atol=1e-4)
    assert len(g0) == len(g1) > 0
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5)
