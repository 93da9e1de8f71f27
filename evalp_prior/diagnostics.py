"""What a researcher reads to see whether the EVaLP game learns, per group, on held-out posteriors.

Measured at the evaluation cadence on the validation split, never inside a training step (so never
right after a sampler update): the energy gap E(z+) - E(z-) (negative once the critic separates posterior
from sampler; at a 1-Lipschitz optimum it is -W1 between them), the gradient penalty, ||grad E|| on
positives and negatives, the single-sample KL(q_alpha || p0), the prior-hole MMD^2 of the sampler and of
NVAE's Gaussian prior with standard errors, and SIR's effective sample size.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .metrics.mmd import prior_hole_mmds
from .objectives import GroupBatch, gradient_penalty, input_gradient_norms
from .prior import EVaLPPrior
from .sampler import gaussian_log_prob


def group_diagnostics(energies: Any, sampler: Any, b: GroupBatch, penalty: str,
                      sir: EVaLPPrior | None) -> dict[str, torch.Tensor]:
    """One posterior batch of one group: per-sample diagnostics (CPU, float32) and latent samples.

    ``energies`` is an EnergySet, ``sampler`` the (EMA) generation sampler, ``sir`` an EVaLPPrior whose
    SIR runs at this group (its effective sample size is read from ``last_ess``), or None to skip it.
    """
    z_neg, log_q = sampler(b.mu_p, b.sigma_p, b.h, b.group)
    x_pos, x_neg = energies.inputs(b.z_pos, b.mu_p, b.sigma_p), energies.inputs(z_neg, b.mu_p, b.sigma_p)

    def energy(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return energies(b.group, x, h)

    with torch.enable_grad():
        gp = gradient_penalty(energy, x_pos, x_neg, b.h, kind=penalty).detach()
    out = {"energy_pos": energy(x_pos, b.h), "energy_neg": energy(x_neg, b.h),
           "grad_norm_pos": input_gradient_norms(energy, x_pos, b.h),
           "grad_norm_neg": input_gradient_norms(energy, x_neg, b.h),
           "kl": log_q - gaussian_log_prob(z_neg, b.mu_p, b.sigma_p),
           "gp": gp.expand(b.z_pos.shape[0])}
    if sir is not None:
        sir.sample_group(b.group, b.h, b.mu_p, b.sigma_p, 1.0)
        out["sir_ess"] = sir.last_ess[b.group] / sir.sir_proposals
    z_gauss = b.mu_p + b.sigma_p * torch.randn_like(b.mu_p)
    out.update(z_pos=b.z_pos.flatten(1), z_neg=z_neg.flatten(1), z_gauss=z_gauss.flatten(1))
    return {k: v.detach().float().cpu() for k, v in out.items()}


def summarise(pooled: dict[str, torch.Tensor], group: int) -> dict[str, float]:
    """The metrics of one group from its pooled per-sample values, names ``<metric>/group<l>``."""
    tag = f"group{group:02d}"
    metrics = {f"energy_gap/{tag}": float(pooled["energy_pos"].mean() - pooled["energy_neg"].mean()),
               f"gp/{tag}": float(pooled["gp"].mean()),
               f"grad_norm_pos/{tag}": float(pooled["grad_norm_pos"].mean()),
               f"grad_norm_neg/{tag}": float(pooled["grad_norm_neg"].mean()),
               f"kl_sampler_p0/{tag}": float(pooled["kl"].mean())}
    if "sir_ess" in pooled:
        metrics[f"sir_ess_fraction/{tag}"] = float(pooled["sir_ess"].mean())
    mmd = prior_hole_mmds(pooled["z_pos"], {"evalp": pooled["z_neg"], "gaussian": pooled["z_gauss"]})
    for name in ("evalp", "gaussian"):
        metrics[f"mmd_{name}/{tag}"] = mmd[name]["mmd2_multi"]
        metrics[f"mmd_{name}_stderr/{tag}"] = mmd[name]["mmd2_multi_stderr"]
    return metrics


def headline(metrics: dict[str, float], groups: Sequence[int]) -> dict[str, float]:
    """Top-group and mean-over-groups summaries of the per-group metrics."""
    top = f"group{groups[0]:02d}"
    out = {"mmd_evalp_top": metrics[f"mmd_evalp/{top}"], "mmd_gaussian_top": metrics[f"mmd_gaussian/{top}"],
           "mmd_evalp_top_stderr": metrics[f"mmd_evalp_stderr/{top}"],
           "mmd_gaussian_top_stderr": metrics[f"mmd_gaussian_stderr/{top}"]}
    # Means over groups, not a mean of ratios: a well-matched group's Gaussian MMD is ~0 (even negative).
    for name in ("mmd_evalp", "mmd_gaussian", "energy_gap"):
        out[f"{name}_mean"] = sum(metrics[f"{name}/group{g:02d}"] for g in groups) / len(groups)
    out["energy_gap_max"] = max(metrics[f"energy_gap/group{g:02d}"] for g in groups)
    return out
