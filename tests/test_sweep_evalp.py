"""sweep_evalp's evaluations are ones evaluate_checkpoint accepts, with and without SIR columns."""
from __future__ import annotations

import pytest

from benchmarks.sweep_evalp import column_requests, parse_args
from evalp_prior.evaluation import evaluate_checkpoint
from tests.helpers import CPU


@pytest.mark.parametrize("sir", [[], ["4"]])
def test_every_column_evaluates(prior_checkpoints, tmp_path, sir):
    args = parse_args(["--vae", "unused.pt", "--out", str(tmp_path), "--setting", "default", "", "--mmd-samples", "8",
                       "--sir", *sir, "--sir-weights", "exact", "energy"])
    columns = column_requests(args, seed=0)
    assert [label for label, _ in columns] == ["sampler"] + [f"sir4_{w}" for w in ("exact", "energy") if sir]
    for _, req in columns:
        top = evaluate_checkpoint(prior_checkpoints["evalp"], req, CPU.device)["metrics"]["mmd"]["top"]
        assert top["num_samples"] == 8
