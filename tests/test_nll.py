"""Importance-weighted NLL: exact on closed-form cases, the ELBO at K = 1, tighter with K."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from evalp_prior.metrics.nll import LN2, dataset_nll, importance_weighted_nll, iw_bound
from nvae.data.base import ArrayDataset, DatasetInfo
from nvae.model import NVAE
from tests.helpers import tiny_run_config


def _normal_log_prob(x: torch.Tensor, mean: torch.Tensor | float, var: float) -> torch.Tensor:
    return -0.5 * (x - mean) ** 2 / var - 0.5 * math.log(2 * math.pi * var)


def _linear_gaussian_log_w(x: torch.Tensor, q_mean: torch.Tensor, q_var: float, k: int, s2: float) -> torch.Tensor:
    """(k, B) log-weights for z ~ N(0, 1), x | z ~ N(z, s2), with z_k drawn from q = N(q_mean, q_var)."""
    g = torch.Generator().manual_seed(k)
    z = q_mean + math.sqrt(q_var) * torch.randn(k, x.shape[0], generator=g, dtype=torch.float64)
    return _normal_log_prob(x, z, s2) + _normal_log_prob(z, 0.0, 1.0) - _normal_log_prob(z, q_mean, q_var)


def test_iw_bound_on_a_linear_gaussian_model():
    # p(x) = N(0, 1 + s2) in closed form; the exact posterior is N(x / (1 + s2), s2 / (1 + s2)).
    s2 = 0.5
    x = torch.linspace(-2, 2, 400, dtype=torch.float64)
    exact = _normal_log_prob(x, 0.0, 1 + s2)
    post_mean, post_var = x / (1 + s2), s2 / (1 + s2)
    for k in (1, 10):  # every weight equals p(x) when q is the true posterior
        torch.testing.assert_close(iw_bound(_linear_gaussian_log_w(x, post_mean, post_var, k, s2)), exact)
    # A wider, shifted q: at K = 1 the mean gap is KL(q || posterior) = 0.29 nats; it closes as K grows.
    gaps = [float((exact - iw_bound(_linear_gaussian_log_w(x, post_mean + 0.3, 2 * post_var, k, s2))).mean())
            for k in (1, 30, 3000)]
    assert gaps[0] == pytest.approx(0.29, abs=0.1)
    assert abs(gaps[1]) < 0.05 and abs(gaps[2]) < 0.01  # measured 0.002 and 0.0005


@pytest.fixture()
def vae() -> NVAE:
    torch.manual_seed(0)
    return NVAE(tiny_run_config().model).eval()


def _images(n: int = 6) -> torch.Tensor:
    return torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("num_nf", [0, 1])
def test_k1_equals_the_single_sample_elbo(num_nf):
    torch.manual_seed(0)
    model = NVAE(dataclasses.replace(tiny_run_config().model, num_nf=num_nf)).eval()
    x = _images()
    torch.manual_seed(7)
    with torch.no_grad():
        out = model.posterior(x)
        elbo = -model.reconstruction_nll(out.logits, x) - sum((st.log_q - st.log_p).flatten(1).sum(1)
                                                              for st in out.groups)
    torch.manual_seed(7)
    nll = importance_weighted_nll(model, x, 1, binarize=False)
    torch.testing.assert_close(nll, -elbo.double(), rtol=0, atol=1e-3)


def test_bound_tightens_with_k(vae):
    x = _images()
    means = []
    for k in (1, 4, 32):
        torch.manual_seed(3)
        means.append(float(importance_weighted_nll(vae, x, k, binarize=False, chunk=8).mean()))
    assert means[0] > means[1] > means[2]


def _decoder_ignores_z(vae: NVAE) -> None:
    """Cut z out of every decoder combiner and make every posterior equal its prior (q = p)."""
    c_z = vae.cfg.num_latent_per_group
    with torch.no_grad():
        for combiner in vae.dec_combiners:
            combiner.conv.weight[:, -c_z:] = 0
        for head in vae.posterior_heads:
            head.weight.zero_()
            head.bias.zero_()


def test_exact_likelihood_when_the_decoder_ignores_z(vae):
    # With p(x | z) = p(x) for every z, log p(x) = log p(x | z) exactly, whatever K.
    _decoder_ignores_z(vae)
    x = _images()
    with torch.no_grad():
        exact = vae.reconstruction_nll(vae.posterior(x).logits, x).double()  # (B,) -log p(x)
    for k, chunk in ((1, 1), (5, 2)):
        torch.testing.assert_close(importance_weighted_nll(vae, x, k, binarize=False, chunk=chunk), exact,
                                   rtol=0, atol=1e-3)
    # q != p (posterior means shifted by 0.05): the bound is loose at K = 1 and closes with K.
    with torch.no_grad():
        for head in vae.posterior_heads:
            head.bias[:vae.cfg.num_latent_per_group] = 0.05
    gaps = []
    for k in (1, 256):
        torch.manual_seed(5)
        gaps.append(float((importance_weighted_nll(vae, x, k, binarize=False, chunk=64) - exact).mean()))
    assert gaps[0] > 0.3  # about KL(q || p) = 0.7 nats
    assert abs(gaps[1]) < 0.15  # measured 0.002; a flipped log q - log p would give about -1.4


def test_dataset_nll_reports_bits_per_cropped_dim(vae):
    model = NVAE(dataclasses.replace(tiny_run_config().model, loss_crop=2)).eval()
    _decoder_ignores_z(model)
    images = (torch.rand(5, 1, 32, 32, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8)
    data = ArrayDataset(images, DatasetInfo("synthetic", 1, 32, False, "dmol", 2))
    report = dataset_nll(model, data, num_samples=2, num_images=5, binarize=False, batch_size=2)["gaussian"]
    x = torch.stack([data[i] for i in range(5)])
    with torch.no_grad():
        exact = float(model.reconstruction_nll(model.posterior(x).logits, x).mean())
    assert report["dims"] == 28 * 28 and report["num_images"] == 5
    assert report["nats"] == pytest.approx(exact, abs=1e-3)
    assert report["bits_per_dim"] == pytest.approx(exact / (28 * 28 * LN2), abs=1e-6)
