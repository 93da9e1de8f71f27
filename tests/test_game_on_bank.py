"""benchmarks/game_on_bank.py: the game on banked posterior samples, end to end on a tiny NVAE."""
from __future__ import annotations

import json
import math

import torch

from benchmarks.game_on_bank import bank_batches
from evalp_prior.sampler_fit import TopGroupBank
from tests.helpers import run_script


def test_bank_batches_draw_bank_rows_with_the_shared_context():
    bank = TopGroupBank(torch.arange(10.0).view(10, 1, 1, 1), torch.ones(1, 3, 1, 1), torch.zeros(1, 1, 1, 1),
                        torch.full((1, 1, 1, 1), 2.0))
    (batch,) = bank_batches(bank, 7, torch.Generator().manual_seed(0))
    assert batch.group == 0 and batch.z_pos.shape == (7, 1, 1, 1)
    assert set(batch.z_pos.flatten().tolist()) <= set(range(10))
    assert batch.h.shape == (7, 3, 1, 1) and torch.equal(batch.sigma_p, torch.full((7, 1, 1, 1), 2.0))


def test_game_on_bank_runs_every_row(prior_checkpoints, tmp_path):
    small = "energy_hidden=8,sampler_hidden=8,num_couplings=2,batch_size=8,critic_warmup_steps=0,moment_images=32"
    out = run_script("benchmarks/game_on_bank.py", "--vae", str(prior_checkpoints["nvae"]), "--out", str(tmp_path),
                     "--setting", "game", small, "--setting", "fit", small + ",sampler_fit_steps=3,sampler_fit_images=32",
                     "--steps", "4", "2", "--bank-images", "128", "--fid", "8", "--mmd-samples", "16",
                     "--fid-stats-dir", str(tmp_path / "fid"), "--device", "cpu", "--threads", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "game_on_bank.json").read_text())
    rows = result["rows"]
    assert list(rows) == ["gaussian (NVAE)", "Gaussian fit of the aggregate posterior",
                          "aggregate posterior (bank, ceiling)", "game", "fit"]
    assert rows["game"]["steps"] == 4 and rows["fit"]["steps"] == 2 and math.isfinite(rows["game"]["energy_gap"])
    for name, row in rows.items():
        assert row["fid"]["num_samples"] == 8 and row["fid"]["reference_split"] == "validation", name
        assert row["mmd"]["top"]["num_samples"] == 16, name
        assert (row["nll"] is None) == name.startswith("aggregate"), name
    assert "| fit | 2 |" in out.stdout
