"""Fixtures shared by several test files."""
from __future__ import annotations

import pytest
import torch

from nvae.runtime import RunLogger
from nvae.train import train_nvae
from tests.helpers import CPU, tiny_run_config, train_prior_checkpoints


@pytest.fixture(scope="session")
def vae_checkpoint(tmp_path_factory):
    """A (barely) trained tiny NVAE on synthetic images: the frozen model stage 2 and the baselines attach to."""
    run_dir = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    with RunLogger(run_dir, True) as logger:
        assert train_nvae(tiny_run_config(max_steps=2), CPU, run_dir, logger) == 0
    return run_dir / "checkpoint.pt"


@pytest.fixture(scope="session")
def prior_checkpoints(tmp_path_factory) -> dict:
    """Tiny checkpoints of every kind (nvae, evalp, langevin, ncp) on one frozen NVAE, trained once per session."""
    return train_prior_checkpoints(tmp_path_factory.mktemp("priors"))
