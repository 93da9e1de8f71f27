"""Latent Normal with NVAE's soft clamps, and the image likelihoods (Bernoulli, DMoL, discretised Gaussian)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)
SIGMA_FLOOR = 1e-2


def soft_clamp5(x: torch.Tensor) -> torch.Tensor:
    """5 * tanh(x / 5): keeps means and log-scales in (-5, 5) with a smooth gradient."""
    return 5.0 * torch.tanh(x / 5.0)


class Normal:
    """Diagonal Normal parameterised as NVAE does: soft-clamped mu and log sigma, sigma floor 1e-2."""

    def __init__(self, mu: torch.Tensor, log_sigma: torch.Tensor):
        self.mu = soft_clamp5(mu)
        self.sigma = torch.exp(soft_clamp5(log_sigma)) + SIGMA_FLOOR

    def sample(self, temperature: float = 1.0) -> torch.Tensor:
        """mu + (temperature * sigma) * eps; the order of operations is part of the prior-hook contract."""
        return draw_normal(self.mu, self.sigma, temperature)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Elementwise log N(z; mu, sigma^2)."""
        return normal_log_prob(z, self.mu, self.sigma)

    def kl(self, other: "Normal") -> torch.Tensor:
        """Elementwise analytic KL(self || other)."""
        return normal_kl(self.mu, self.sigma, other.mu, other.sigma)


def draw_normal(mu: torch.Tensor, sigma: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """NVAE's reparameterised draw at a temperature: mu + (temperature * sigma) * eps, eps = randn_like(mu).

    A prior hook that wants to reproduce this draw bit for bit must use the same order of operations.
    """
    eps = torch.randn_like(mu)
    return mu + (temperature * sigma) * eps


def normal_log_prob(z: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Elementwise Gaussian log-density."""
    u = (z - mu) / sigma
    return -0.5 * u * u - 0.5 * LOG_2PI - torch.log(sigma)


def normal_kl(mu_q: torch.Tensor, sigma_q: torch.Tensor, mu_p: torch.Tensor, sigma_p: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mu_q, sigma_q^2) || N(mu_p, sigma_p^2))."""
    ratio = sigma_q / sigma_p
    diff = (mu_q - mu_p) / sigma_p
    return 0.5 * (diff * diff + ratio * ratio) - 0.5 - torch.log(ratio)


class Bernoulli:
    """Per-pixel Bernoulli decoder for binary images."""

    num_params_per_channel = 1

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) elementwise log-likelihood of binary x."""
        return -F.binary_cross_entropy_with_logits(self.logits, x, reduction="none")

    def mean(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    def sample(self, temperature: float = 1.0) -> torch.Tensor:
        return torch.bernoulli(self.mean())


def _discretised_log_prob(centered: torch.Tensor, log_scale: torch.Tensor, x: torch.Tensor, half_bin: float,
                          cdf, log_cdf, log_sf, log_pdf) -> torch.Tensor:
    """log P(bin of x) for a location-scale law on [-1, 1] with the edge bins extended to infinity."""
    inv_scale = torch.exp(-log_scale)
    plus = inv_scale * (centered + half_bin)
    minus = inv_scale * (centered - half_bin)
    cdf_delta = cdf(plus) - cdf(minus)
    # Where the bin mass underflows, approximate it by density times bin width.
    mid = log_pdf(inv_scale * centered) - log_scale + math.log(2 * half_bin)
    log_mid = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), mid)
    edge = 1.0 - half_bin / 2
    return torch.where(x < -edge, log_cdf(plus), torch.where(x > edge, log_sf(minus), log_mid))


def _logistic_log_pdf(u: torch.Tensor) -> torch.Tensor:
    return u - 2.0 * F.softplus(u)


class DiscMixLogistic:
    """Discretised mixture of logistics (PixelCNN++/NVAE), channel-autoregressive means for colour.

    Parameters per pixel: M mixture logits + C * M means + C * M log-scales + C(C-1)/2 * M coefficients.
    """

    def __init__(self, params: torch.Tensor, channels: int, num_mix: int = 10, num_bits: int = 8):
        b, _, h, w = params.shape
        self.channels, self.num_mix = channels, num_mix
        self.max_val = 2.0 ** num_bits - 1
        num_coeffs = channels * (channels - 1) // 2
        self.logit_probs = params[:, :num_mix]  # (B, M, H, W)
        rest = params[:, num_mix:].reshape(b, 2 * channels + num_coeffs, num_mix, h, w)
        self.means = rest[:, :channels]  # (B, C, M, H, W)
        self.log_scales = rest[:, channels:2 * channels].clamp(min=-7.0)
        self.coeffs = torch.tanh(rest[:, 2 * channels:])  # (B, C(C-1)/2, M, H, W)

    @staticmethod
    def num_params(channels: int, num_mix: int) -> int:
        return num_mix * (1 + 2 * channels + channels * (channels - 1) // 2)

    def _conditional_means(self, x: torch.Tensor) -> torch.Tensor:
        """Means of channel c shifted by coefficient-weighted earlier channels of x (in [-1, 1])."""
        means, k = [], 0
        for c in range(self.channels):
            m = self.means[:, c]
            for prev in range(c):
                m = m + self.coeffs[:, k] * x[:, prev].unsqueeze(1)
                k += 1
            means.append(m)
        return torch.stack(means, dim=1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W) log-likelihood of x in [0, 1] on the 2^bits grid (channels are joint)."""
        x = 2.0 * x - 1.0
        means = self._conditional_means(x)
        xs = x.unsqueeze(2)  # (B, C, 1, H, W)
        log_probs = _discretised_log_prob(
            xs - means, self.log_scales, xs.expand_as(means), 1.0 / self.max_val,
            torch.sigmoid, lambda u: u - F.softplus(u), lambda u: -F.softplus(u), _logistic_log_pdf)
        log_probs = log_probs.sum(dim=1) + F.log_softmax(self.logit_probs, dim=1)
        return torch.logsumexp(log_probs, dim=1)

    def _select(self, temperature: float):
        gumbel = -torch.log(-torch.log(torch.rand_like(self.logit_probs).clamp(1e-5, 1 - 1e-5)))
        sel = F.one_hot(torch.argmax(self.logit_probs / temperature + gumbel, dim=1), self.num_mix)
        sel = sel.permute(0, 3, 1, 2).unsqueeze(1).to(self.means.dtype)  # (B, 1, M, H, W)
        return (self.means * sel).sum(2), (self.log_scales * sel).sum(2), (self.coeffs * sel).sum(2)

    def _autoregress(self, noise_means: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
        out, k = [], 0
        for c in range(self.channels):
            v = noise_means[:, c]
            for prev in range(c):
                v = v + coeffs[:, k] * out[prev]
                k += 1
            out.append(v.clamp(-1.0, 1.0))
        return torch.stack(out, dim=1) / 2.0 + 0.5

    def sample(self, temperature: float = 1.0) -> torch.Tensor:
        means, log_scales, coeffs = self._select(temperature)
        u = torch.rand_like(means).clamp(1e-5, 1 - 1e-5)
        return self._autoregress(means + torch.exp(log_scales) * temperature * (torch.log(u) - torch.log1p(-u)), coeffs)

    def mean(self) -> torch.Tensor:
        """Image from the most likely component's conditional means (a clean image for grids)."""
        means, _, coeffs = self._select(1e-6)
        return self._autoregress(means, coeffs)


class DiscretisedGaussian:
    """Per-pixel Gaussian on the 2^bits grid of [-1, 1] (the Gaussian decoder option)."""

    def __init__(self, params: torch.Tensor, channels: int, num_bits: int = 8):
        self.mu = params[:, :channels]
        self.log_scale = params[:, channels:].clamp(min=-7.0)
        self.max_val = 2.0 ** num_bits - 1

    @staticmethod
    def num_params(channels: int) -> int:
        return 2 * channels

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) elementwise log-likelihood of x in [0, 1]."""
        x = 2.0 * x - 1.0
        std = torch.distributions.Normal(0.0, 1.0)
        log_sf = lambda u: torch.special.log_ndtr(-u)  # noqa: E731 - pairs with log_ndtr below
        return _discretised_log_prob(x - self.mu, self.log_scale, x, 1.0 / self.max_val, std.cdf,
                                     torch.special.log_ndtr, log_sf, lambda u: -0.5 * u * u - 0.5 * LOG_2PI)

    def mean(self) -> torch.Tensor:
        return (self.mu.clamp(-1.0, 1.0) + 1.0) / 2.0

    def sample(self, temperature: float = 1.0) -> torch.Tensor:
        x = self.mu + temperature * torch.exp(self.log_scale) * torch.randn_like(self.mu)
        return (x.clamp(-1.0, 1.0) + 1.0) / 2.0
