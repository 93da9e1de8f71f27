"""compare_priors' reuse of finished stages (a changed setting that alters training is refused, a speed-only one is not)
and its learning-rate sweep's validation measure."""
from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch

from benchmarks.compare_priors import _stage, _without_speed_only, validation_mmd2_top
from evalp_prior.evaluation import EvalRequest, EvalResources, prior_hole_mmd_per_group
from evalp_prior.generation import build_prior, load_for_sampling
from evalp_prior.train import load_vae_for_stage2
from nvae.runtime import load_checkpoint
from nvae.runtime.checkpoint import LATEST_NAME


def test_speed_only_settings_are_dropped_at_any_depth():
    config = {"prior": {"lr": 1e-3, "compile": True, "inner": {"checkpoint_activations": True, "seed": 1}}, "compile": 1}
    assert _without_speed_only(config) == {"prior": {"lr": 1e-3, "inner": {"seed": 1}}}


def test_stage_reuses_across_speed_only_settings_and_refuses_other_changes(prior_checkpoints):
    ckpt = prior_checkpoints["langevin"]
    payload = load_checkpoint(ckpt, map_location="cpu")
    config, step = json.loads(payload["config"]), int(payload["step"])

    def never_train(logger, resume):
        raise AssertionError("a finished stage must be reused, not trained")

    seconds = {}
    faster = json.loads(json.dumps(config))
    faster["prior"]["compile"] = not faster["prior"].get("compile", False)
    faster["prior"].pop("checkpoint_activations", None)
    assert _stage(ckpt.parent, "langevin", json.dumps(faster), step, never_train, seconds) == ckpt
    assert seconds == {"langevin": "reused"}

    other = json.loads(json.dumps(config))
    other["prior"]["lr"] = other["prior"]["lr"] * 2
    with pytest.raises(SystemExit, match="different configuration"):
        _stage(ckpt.parent, "langevin", json.dumps(other), step, never_train, seconds)


def test_sweep_measure_is_the_reported_evaluator_on_validation_and_is_redone_for_other_halves(prior_checkpoints, tmp_path):
    cpu = torch.device("cpu")
    stage = tmp_path / "langevin_lr0.001"
    stage.mkdir()
    shutil.copy(prior_checkpoints["langevin"], stage / LATEST_NAME)
    vae, vae_cfg, _ = load_vae_for_stage2(prior_checkpoints["nvae"], cpu)
    args = argparse.Namespace(mmd_samples=8, ncp_sir=4, seed=3)

    value = validation_mmd2_top(args, vae, vae_cfg, "langevin", stage, cpu)
    hook, _ = build_prior(load_for_sampling(stage / LATEST_NAME, cpu), "langevin")
    res = EvalResources(vae, vae_cfg, cpu, EvalRequest(mmd=True, split="validation"))
    direct = prior_hole_mmd_per_group(vae, hook, res.held_out(), 8, 64, res.binarize(), cpu, 3)["top"]["mmd2_multi"]
    assert value == pytest.approx(direct, rel=1e-6, abs=1e-9)

    cache = stage / "validation_mmd.json"
    cached = json.loads(cache.read_text())
    cached["mmd2_multi"] = 123.0
    cache.write_text(json.dumps(cached))
    assert validation_mmd2_top(args, vae, vae_cfg, "langevin", stage, cpu) == 123.0  # same settings: reused
    cached["settings"]["held_out_seed"] += 1  # measured on other halves: never reused
    cache.write_text(json.dumps(cached))
    assert validation_mmd2_top(args, vae, vae_cfg, "langevin", stage, cpu) == pytest.approx(direct, rel=1e-6, abs=1e-9)
