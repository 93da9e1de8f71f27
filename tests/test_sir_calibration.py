"""SIR's calibrated temperature: the logistic fit against closed forms, and calibrated SIR landing on the posterior."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from evalp_prior.prior import EVaLPPrior
from evalp_prior.sampler import SharedFlowSampler
from evalp_prior.sir import Calibrated, parse_sir_temperature, sir_select, temperature_tag
from evalp_prior.sir_calibration import SIGNIFICANCE_LEVEL, calibrate_sir, fit_logit
from nvae.model import GroupSpec
from tests.helpers import LinearEnergy


def test_fit_logit_recovers_the_log_ratio_of_two_gaussians():
    # p = N(m, 1) against q = N(0, 1): log p / q = m z - m^2 / 2. A score s = z / k ranks correctly at the wrong
    # scale; the fitted logit a s + b must be the log-ratio itself: a = m k, b = -m^2 / 2.
    torch.manual_seed(0)
    m, k, n = 0.5, 3.0, 200_000
    fit = fit_logit(torch.randn(n).add(m) / k, torch.randn(n) / k)
    assert fit.slope == pytest.approx(m * k, rel=0.03)
    assert fit.intercept == pytest.approx(-m * m / 2, abs=0.01)
    # The cross-entropy gain equals the Jensen-Shannon-type divergence the ratio carries: positive, < log 2.
    assert 0 < fit.log_loss_null - fit.log_loss < math.log(2) and fit.accuracy > 0.55


def test_fit_logit_finds_no_slope_in_a_score_without_signal_and_a_negative_one_in_a_reversed_score():
    torch.manual_seed(1)
    n = 20_000
    noise = fit_logit(torch.randn(n), torch.randn(n))
    assert abs(noise.slope) < 4 / math.sqrt(n)  # about 2.8 standard errors of the slope at this n
    reversed_score = fit_logit(-(torch.randn(n) + 1.0), -torch.randn(n))
    assert reversed_score.slope == pytest.approx(-1.0, rel=0.05)
    constant = fit_logit(torch.ones(10), torch.ones(10))
    assert constant.slope == 0 and constant.log_loss == pytest.approx(math.log(2))


def test_the_slope_test_rejects_at_its_level_under_the_null_and_detects_a_real_signal():
    # Scores without signal: the deviance test must reject "slope 0" in about SIGNIFICANCE_LEVEL of 400 data sets
    # (binomial: 20 +- 4.4 expected; a deviance off by a factor of 2 in n gives ~1% or ~12%).
    generator = torch.Generator().manual_seed(4)
    rejections = sum(fit_logit(torch.randn(300, generator=generator), torch.randn(300, generator=generator)).p_value
                     < SIGNIFICANCE_LEVEL for _ in range(400))
    assert 8 <= rejections <= 36, rejections
    # Two Gaussians half a standard deviation apart: with 300 scores per class the deviance is ~40 (p ~ 1e-9).
    shifted = fit_logit(torch.randn(300, generator=generator) + 0.5, torch.randn(300, generator=generator))
    assert shifted.p_value < 1e-3
    assert fit_logit(torch.ones(10), torch.ones(10)).p_value == 1.0


def test_fit_logit_weighs_the_classes_equally_whatever_their_counts():
    torch.manual_seed(2)
    balanced = fit_logit(torch.randn(50_000) + 1, torch.randn(50_000))
    lopsided = fit_logit(torch.randn(50_000) + 1, torch.randn(200_000))
    assert lopsided.slope == pytest.approx(balanced.slope, rel=0.05)
    assert lopsided.intercept == pytest.approx(balanced.intercept, abs=0.03)


def test_fit_logit_refuses_too_few_or_non_finite_scores():
    with pytest.raises(ValueError, match="at least 2 scores per class"):
        fit_logit(torch.ones(1), torch.zeros(5))
    with pytest.raises(ValueError, match="non-finite"):
        fit_logit(torch.tensor([0.0, math.inf]), torch.zeros(5))


class ShiftedPosterior:
    """A stand-in NVAE with one group: context mu_p = 0, sigma_p = 1, posterior draws N(shift, 1) per image."""

    def __init__(self, shift: float, channels: int = 2) -> None:
        self.shift, self.channels = shift, channels

    def posterior(self, x: torch.Tensor) -> SimpleNamespace:
        b = x.shape[0]
        mu, sigma = torch.zeros(b, self.channels, 1, 1), torch.ones(b, self.channels, 1, 1)
        z = self.shift + torch.randn(b, self.channels, 1, 1)
        return SimpleNamespace(groups=[SimpleNamespace(z=z, h=torch.ones(b, 3, 1, 1), mu_p=mu, sigma_p=sigma)])


@pytest.mark.parametrize("weights", ["energy", "exact"])
def test_calibrated_sir_lands_on_the_posterior_where_the_authors_sir_overshoots(weights):
    # Identity sampler q_alpha = p0 = N(0, 1), posterior N(d, 1) per dimension, critic -E = a sum z. The log-ratio
    # posterior / sampler is d sum z + const, so calibration must find slope d / a (T = a / d), and SIR at that T
    # moves the draws' mean to d; the untempered SIR tilts p0 by exp(a sum z), mean a: too far.
    d, a = 0.3, 0.9
    specs = [GroupSpec(0, 0, 2, 1, 1, 3)]
    torch.manual_seed(0)
    hook = EVaLPPrior(LinearEnergy(a), SharedFlowSampler(specs, [0], hidden=8), [0], sir_proposals=100,
                      sir_weights=weights, sir_temperature=Calibrated())
    calibration = calibrate_sir(hook, ShiftedPosterior(d), torch.zeros(20_000, 1), 20_000, 1000, False,
                                torch.device("cpu"))
    assert calibration.fit.slope == pytest.approx(d / a, rel=0.05) and calibration.num_images == 20_000
    assert hook.sir_temperature == pytest.approx(a / d, rel=0.05) and hook.sir_calibration is calibration
    assert "calibrated temperature" in hook.settings()
    batch = 4000
    mu, sigma, h = torch.zeros(batch, 2, 1, 1), torch.ones(batch, 2, 1, 1), torch.ones(batch, 3, 1, 1)
    torch.manual_seed(1)
    calibrated = hook.sample_group(0, h, mu, sigma, 1.0)
    assert float(calibrated.mean()) == pytest.approx(d, abs=0.04)
    hook.sir_temperature = 1.0
    assert float(hook.sample_group(0, h, mu, sigma, 1.0).mean()) > a - 0.1  # the authors' T = 1: mean ~ a


def test_a_critic_that_ranks_the_wrong_way_switches_sir_off():
    specs = [GroupSpec(0, 0, 2, 1, 1, 3)]
    torch.manual_seed(0)
    hook = EVaLPPrior(LinearEnergy(-0.5), SharedFlowSampler(specs, [0], hidden=8), [0], sir_proposals=50,
                      sir_temperature=Calibrated())
    calibration = calibrate_sir(hook, ShiftedPosterior(0.3), torch.zeros(4000, 1), 4000, 500, False, torch.device("cpu"))
    assert calibration.fit.slope < 0 and math.isinf(calibration.temperature) and hook.sir_temperature == math.inf
    assert calibration.to_json()["temperature"] == "inf" and "SIR off" in hook.settings()
    # T = inf weighs every proposal alike: the hook then returns the sampler's own draw, with the same noise.
    mu, sigma, h = torch.zeros(8, 2, 1, 1), torch.ones(8, 2, 1, 1), torch.ones(8, 3, 1, 1)
    torch.manual_seed(3)
    resampled = hook.sample_group(0, h, mu, sigma, 1.0)
    torch.manual_seed(3)
    plain, _ = hook.sampler(mu, sigma, h, 0, 1.0)
    assert torch.equal(resampled, plain)


def test_a_weak_signal_switches_sir_on_only_when_enough_images_show_it():
    # A posterior shifted by 0.05 from the sampler: the log-ratio is real, but 200 images cannot tell it from noise
    # (deviance ~ 0.5), 40,000 can (~ 50). Below significance SIR is off, whatever sign the fitted slope has.
    specs = [GroupSpec(0, 0, 2, 1, 1, 3)]
    temperatures = {}
    for n in (200, 40_000):
        torch.manual_seed(0)
        hook = EVaLPPrior(LinearEnergy(0.9), SharedFlowSampler(specs, [0], hidden=8), [0], sir_proposals=10,
                          sir_temperature=Calibrated())
        calibration = calibrate_sir(hook, ShiftedPosterior(0.05), torch.zeros(n, 1), n, 1000, False,
                                    torch.device("cpu"))
        temperatures[n] = (calibration.temperature, calibration.fit.p_value)
        assert calibration.to_json()["p_value"] == calibration.fit.p_value
    assert math.isinf(temperatures[200][0]) and temperatures[200][1] > SIGNIFICANCE_LEVEL, temperatures
    assert temperatures[40_000][0] == pytest.approx(0.9 / 0.05, rel=0.2) and temperatures[40_000][1] < 1e-6


def test_calibration_needs_one_sir_group_and_sir_refuses_an_unfitted_temperature():
    specs = [GroupSpec(0, 0, 2, 1, 1, 3), GroupSpec(1, 0, 2, 1, 1, 3)]
    hook = EVaLPPrior(LinearEnergy(1.0), SharedFlowSampler(specs, [0, 1], hidden=8), [0, 1], sir_proposals=4,
                      sir_groups=[0, 1], sir_temperature=Calibrated())
    with pytest.raises(ValueError, match="fits one SIR group"):
        calibrate_sir(hook, ShiftedPosterior(0.0), torch.zeros(8, 1), 8, 4, False, torch.device("cpu"))
    with pytest.raises(ValueError, match="must be fitted before sampling"):
        sir_select(lambda k: torch.zeros(k, 2), lambda z: torch.zeros(z.shape[0], 2), 4, 4, 2,
                   temperature=Calibrated())
    assert parse_sir_temperature("calibrated") == Calibrated() and temperature_tag(Calibrated()) == "_calibrated"
