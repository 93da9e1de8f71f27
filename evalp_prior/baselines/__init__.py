"""Baseline priors on the same frozen NVAE and the same PriorHook as EVaLP: a Langevin-MCMC energy prior
and a noise-contrastive (NCP) prior with SIR."""
from evalp_prior.baselines.common import BaselineConfig, BaselineRunConfig, TrainedBaseline
from evalp_prior.baselines.langevin import (LangevinConfig, LangevinPrior, LangevinTask, TrainedLangevin,
                                            langevin_loss, langevin_run_config, langevin_sample, load_langevin,
                                            train_langevin)
from evalp_prior.baselines.ncp import (NCPConfig, NCPPrior, NCPTask, TrainedNCP, load_ncp, ncp_loss,
                                       ncp_run_config, train_ncp)

__all__ = [
    "BaselineConfig",
    "BaselineRunConfig",
    "LangevinConfig",
    "LangevinPrior",
    "LangevinTask",
    "NCPConfig",
    "NCPPrior",
    "NCPTask",
    "TrainedBaseline",
    "TrainedLangevin",
    "TrainedNCP",
    "langevin_loss",
    "langevin_run_config",
    "langevin_sample",
    "load_langevin",
    "load_ncp",
    "ncp_loss",
    "ncp_run_config",
    "train_langevin",
    "train_ncp",
]
