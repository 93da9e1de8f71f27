"""EVaLP: an energy-based variational latent prior for NVAE (arXiv 2510.00260)."""
from evalp_prior.energy import EnergySet, GroupEnergy
from evalp_prior.generation import PRIOR_KINDS  # importing it registers the prior checkpoint kinds
from evalp_prior.group_selection import parse_groups
from evalp_prior.objectives import (
    GroupBatch,
    ObjectiveConfig,
    alternating_step,
    energy_loss,
    gradient_penalty,
    sampler_loss,
)
from evalp_prior.prior import EVaLPPrior
from evalp_prior.sampler import SharedFlowSampler, gaussian_log_prob
from evalp_prior.sir import ESSTarget, sir_log_weight, sir_select

__all__ = [
    "PRIOR_KINDS",
    "ESSTarget",
    "EVaLPPrior",
    "EnergySet",
    "GroupBatch",
    "GroupEnergy",
    "ObjectiveConfig",
    "SharedFlowSampler",
    "alternating_step",
    "energy_loss",
    "gaussian_log_prob",
    "gradient_penalty",
    "parse_groups",
    "sampler_loss",
    "sir_log_weight",
    "sir_select",
]
