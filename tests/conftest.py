"""Fixtures shared by several test files."""
from __future__ import annotations

import pytest

from tests.helpers import train_prior_checkpoints


@pytest.fixture(scope="session")
def prior_checkpoints(tmp_path_factory) -> dict:
    """Tiny checkpoints of every kind (nvae, evalp, langevin, ncp) on one frozen NVAE, trained once per session."""
    return train_prior_checkpoints(tmp_path_factory.mktemp("priors"))
