"""SIR's temperature fitted to held-out posterior samples (``--sir-temperature calibrated``).

SIR over sampler proposals with weights w moves the draws towards q_alpha(z) w(z) / Z; it moves them towards
the posterior only where log w is the log-ratio log q(z) / q_alpha(z) of the posterior to the sampler. EVaLP's
critic is a 1-Lipschitz Wasserstein potential (w_kl = 0): its ranking may carry that ratio's direction, but
nothing ties its scale to it, and on some trained critics the ranking carries nothing (docs/results.md, 5b).

Calibration (Platt scaling, as Turner et al. 2019 calibrate a GAN discriminator before resampling with it):
fit log r(z) = a s(z) + b, s the SIR log-weight, by logistic regression of posterior samples (label 1) against
sampler draws (label 0) under the same context, on images the prior was not trained on. At the optimum of the
balanced cross-entropy, a s + b is the best log-ratio of that form; SIR then uses w^a, i.e. T = 1 / a. A score
without signal gets a ~ 0 (T -> inf: the sampler's own draws), a score that ranks the wrong way a < 0, which is
clipped to 0: SIR by it cannot help, so it is switched off. A fitted slope has its own sampling error, so SIR is
also switched off unless the slope is significant: the likelihood-ratio (deviance) test of a = 0 at level
SIGNIFICANCE_LEVEL. Reweighting by a score that carries no detectable signal only changes the random stream
(docs/results.md 5c: such a row moved FID by as much as a different evaluation seed does).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from nvae.data import binarize_if_needed
from nvae.model import NVAE
from nvae.runtime import forked_rng

from .prior import EVaLPPrior
from .sampler import gaussian_log_prob
from .sir import sir_log_weight

CALIBRATION_SEED = 2_718_281  # posterior and sampler draws of the calibration: the same whatever the run's seed
DEFAULT_CALIBRATION_IMAGES = 2000
SIGNIFICANCE_LEVEL = 0.05  # SIR stays off unless the deviance test rejects "the score carries no signal" at this level


@dataclass(frozen=True)
class LogitFit:
    """A balanced logistic regression of label on a scalar score s: logit = slope * s + intercept, with the mean
    cross-entropy (nats) at the fit and at slope 0 (log 2: the score ignored), the balanced accuracy, and the
    effective number of scores (4 n_pos n_neg / (n_pos + n_neg): both counts for equal classes)."""

    slope: float
    intercept: float
    log_loss: float
    log_loss_null: float
    accuracy: float
    effective_count: float

    @property
    def log_loss_gain(self) -> float:
        """Nats per sample the score saves over ignoring it: 0 for a score without signal."""
        return self.log_loss_null - self.log_loss

    @property
    def p_value(self) -> float:
        """Likelihood-ratio test of slope 0: the deviance 2 n gain is chi-square with one degree of freedom under
        the null, whose survival function is erfc(sqrt(deviance / 2))."""
        deviance = max(2.0 * self.effective_count * self.log_loss_gain, 0.0)
        return math.erfc(math.sqrt(deviance / 2.0))


def fit_logit(score_pos: torch.Tensor, score_neg: torch.Tensor, iterations: int = 100) -> LogitFit:
    """Maximum-likelihood logistic regression, label 1 for ``score_pos`` and 0 for ``score_neg`` (each class
    weighted 1/2, whatever its count), by damped Newton steps in float64. A constant score gets slope 0."""
    if score_pos.numel() < 2 or score_neg.numel() < 2:
        raise ValueError(f"calibration needs at least 2 scores per class, got {score_pos.numel()} and {score_neg.numel()}")
    pos, neg = score_pos.double().flatten(), score_neg.double().flatten()
    if not (torch.isfinite(pos).all() and torch.isfinite(neg).all()):
        raise ValueError("calibration got non-finite SIR log-weights")
    both = torch.cat([pos, neg])
    effective_count = 4.0 * len(pos) * len(neg) / (len(pos) + len(neg))
    centre, spread = float(both.mean()), float(both.std())
    if spread == 0:
        return LogitFit(0.0, 0.0, math.log(2), math.log(2), 0.5, effective_count)
    # Standardised scores keep the Newton system well conditioned whatever the energy's scale.
    x = torch.stack([(both - centre) / spread, torch.ones_like(both)], 1)  # (n, 2)
    label = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)])
    weight = torch.cat([torch.full_like(pos, 0.5 / len(pos)), torch.full_like(neg, 0.5 / len(neg))])

    def loss_of(theta: torch.Tensor) -> torch.Tensor:
        logit = x @ theta
        return (weight * (F.softplus(logit) - label * logit)).sum()

    theta = torch.zeros(2, dtype=torch.float64)
    loss = loss_of(theta)
    for _ in range(iterations):
        p = torch.sigmoid(x @ theta)
        grad = x.T @ (weight * (p - label))
        hessian = (x * (weight * p * (1 - p))[:, None]).T @ x + 1e-12 * torch.eye(2, dtype=torch.float64)
        step = torch.linalg.solve(hessian, grad)
        shrink = 1.0
        while shrink > 1e-6:  # backtracking: separable data would send a full Newton step too far
            candidate = theta - shrink * step
            new_loss = loss_of(candidate)
            if new_loss <= loss:
                break
            shrink /= 2
        else:
            break
        converged = float(loss - new_loss) < 1e-14
        theta, loss = candidate, new_loss
        if converged:
            break
    slope = float(theta[0]) / spread
    intercept = float(theta[1]) - slope * centre
    logit_pos, logit_neg = slope * pos + intercept, slope * neg + intercept
    accuracy = 0.5 * (float((logit_pos > 0).double().mean()) + float((logit_neg <= 0).double().mean()))
    return LogitFit(slope, intercept, float(loss), math.log(2), accuracy, effective_count)


@dataclass(frozen=True)
class SIRCalibration:
    """What calibrate_sir fitted, for reports: the group, the images, the regression, and the temperature."""

    group: int
    num_images: int
    weights: str
    fit: LogitFit
    temperature: float  # 1 / slope; inf when the slope is <= 0 or not significant (SIR off)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (an infinite temperature as the string 'inf')."""
        out = asdict(self)
        out["temperature"] = "inf" if math.isinf(self.temperature) else self.temperature
        out["log_loss_gain"] = self.fit.log_loss_gain
        out["p_value"] = self.fit.p_value
        return out

    def describe(self) -> str:
        """One line: the temperature, and the signal it was fitted from."""
        told = (f"slope {self.fit.slope:.3g} (p = {self.fit.p_value:.2g}), balanced accuracy {self.fit.accuracy:.3f}, "
                f"cross-entropy {self.fit.log_loss_gain * 1e3:.2f} x 1e-3 nats below chance on {self.num_images} "
                f"held-out images")
        if math.isinf(self.temperature):
            return (f"SIR off at group {self.group}: the critic's ranking does not tell posterior from sampler at level "
                    f"{SIGNIFICANCE_LEVEL} ({told})")
        return f"calibrated temperature {self.temperature:.3g} at group {self.group} ({told})"


@torch.no_grad()
def calibrate_sir(hook: EVaLPPrior, vae: NVAE, dataset: Dataset, num: int, batch_size: int, binarize: bool,
                  device: torch.device) -> SIRCalibration:
    """Fit the hook's SIR temperature (it must have one SIR group) on the first ``num`` images of ``dataset``:
    one posterior draw of z_l per image against one sampler draw given the same context, both scored with the
    hook's SIR log-weight; sets ``hook.sir_temperature`` and ``hook.sir_calibration`` and returns the latter."""
    if len(hook.sir_groups) != 1:
        raise ValueError(f"--sir-temperature calibrated fits one SIR group, got groups {hook.sir_groups}; "
                         "pass --sir-groups with one group")
    n = min(num, len(dataset))
    if n < 2:
        raise ValueError(f"--sir-temperature calibrated needs at least 2 held-out images, got {n}")
    group = hook.sir_groups[0]

    def score(z: torch.Tensor, st: Any) -> torch.Tensor:
        """The SIR log-weight of z given the group's context, as the hook weighs its proposals."""
        energy = -hook.log_density_ratio(group, z, st.h, st.mu_p, st.sigma_p)
        densities = ()
        if hook.sir_weights == "exact":
            densities = (gaussian_log_prob(z, st.mu_p, st.sigma_p),
                         hook.sampler.log_prob(z, st.mu_p, st.sigma_p, st.h, group))
        return sir_log_weight(hook.sir_weights, energy, *densities).double().cpu()

    pos, neg = [], []
    with forked_rng(device, CALIBRATION_SEED):
        for batch in DataLoader(Subset(dataset, range(n)), batch_size=batch_size):
            st = vae.posterior(binarize_if_needed(batch.to(device), binarize)).groups[group]
            z_sampler, _ = hook.sampler(st.mu_p, st.sigma_p, st.h, group, 1.0)
            pos.append(score(st.z.float(), st))
            neg.append(score(z_sampler.float(), st))
    fit = fit_logit(torch.cat(pos), torch.cat(neg))
    temperature = 1.0 / fit.slope if fit.slope > 0 and fit.p_value < SIGNIFICANCE_LEVEL else math.inf
    calibration = SIRCalibration(group, n, hook.sir_weights, fit, temperature)
    hook.sir_temperature = temperature
    hook.sir_calibration = calibration
    return calibration
