"""compare_priors' reuse of finished stages (a changed setting that alters training is refused, a speed-only one is not),
its learning-rate sweep's validation measure, and the pairing of the reference rows' likelihood pass."""
from __future__ import annotations

import argparse
import json
import math
import shutil

import pytest
import torch

from pathlib import Path

from benchmarks.compare_priors import (_add_reference_likelihood, _rows, _stage, _without_speed_only, calibrate_rows,
                                     parse_args, validation_mmd2_top)
from evalp_prior.evaluation import EvalRequest, EvalResources, likelihood_priors, prior_hole_mmd_per_group
from evalp_prior.generation import build_prior, load_for_sampling
from evalp_prior.metrics.nll import dataset_nll
from evalp_prior.oracle import PosteriorGaussianPrior
from evalp_prior.sir import ESSTarget
from evalp_prior.sir_calibration import DEFAULT_CALIBRATION_IMAGES, SIGNIFICANCE_LEVEL
from evalp_prior.train import load_vae_for_stage2
from nvae.data import get_dataset, held_out_part
from nvae.runtime import load_checkpoint
from nvae.runtime.checkpoint import LATEST_NAME


def test_extra_evalp_checkpoints_become_rows_of_their_own(prior_checkpoints):
    args = parse_args(["--out", "o", "--vae", "v.pt", "--extra-evalp", f"fit={prior_checkpoints['evalp']}", "b=x.pt"])
    assert args.extra_evalp == {"evalp[fit]": prior_checkpoints["evalp"], "evalp[b]": Path("x.pt")}
    del args.extra_evalp["evalp[b]"]
    setups = {name: load_for_sampling(prior_checkpoints[kind], torch.device("cpu"))
              for name, kind in [("evalp", "evalp"), ("evalp[fit]", "evalp"), ("langevin", "langevin"), ("ncp", "ncp")]}
    labels = [label for label, _, _ in _rows(args, setups)]
    assert labels == ["gaussian", "evalp", "evalp+sir100", "evalp[fit]", "langevin", "ncp+sir100"]
    for bad in (["fit"], ["=x.pt"], ["fit="]):
        with pytest.raises(SystemExit):
            parse_args(["--out", "o", "--vae", "v.pt", "--extra-evalp", *bad])


def test_tempered_sir_rows_carry_their_temperature(prior_checkpoints):
    args = parse_args(["--out", "o", "--vae", "v.pt", "--sir", "10", "--sir-temperature", "1", "4", "ess:0.9",
                       "calibrated"])
    setups = {name: load_for_sampling(prior_checkpoints[name], torch.device("cpu")) for name in ("evalp", "langevin", "ncp")}
    row_list = _rows(args, setups)
    rows = {label: hook for label, hook, _ in row_list}
    assert list(rows) == ["gaussian", "evalp", "evalp+sir10", "evalp+sir10_T4", "evalp+sir10_ess0.9",
                          "evalp+sir10_calibrated", "langevin", "ncp+sir100"]
    assert [rows[f"evalp+sir10{tag}"].sir_temperature for tag in ("", "_T4", "_ess0.9")] == [1.0, 4.0, ESSTarget(0.9)]
    # The calibrated row gets its T on the validation half before anything samples; no other row is touched.
    calibrations = calibrate_rows(row_list, setups, torch.device("cpu"))
    assert list(calibrations) == ["evalp+sir10_calibrated"]
    fitted = calibrations["evalp+sir10_calibrated"]
    validation = held_out_part(get_dataset("synthetic", "test"), "validation")
    assert fitted["num_images"] == min(DEFAULT_CALIBRATION_IMAGES, len(validation))
    significant = fitted["fit"]["slope"] > 0 and fitted["p_value"] < SIGNIFICANCE_LEVEL
    expected = 1 / fitted["fit"]["slope"] if significant else math.inf
    assert rows["evalp+sir10_calibrated"].sir_temperature == pytest.approx(expected)
    assert rows["ncp+sir100"].sir_temperature == 1.0  # a classifier's log-ratio needs no tempering
    for bad in (["--sir-temperature", "0"], ["--sir-temperature", "ess:1.5"], ["--sir", "0"]):
        with pytest.raises(SystemExit):
            parse_args(["--out", "o", "--vae", "v.pt", *bad])


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


def test_reference_likelihood_pass_sees_the_trained_priors_posterior_samples(prior_checkpoints):
    cpu = torch.device("cpu")
    vae, vae_cfg, _ = load_vae_for_stage2(prior_checkpoints["nvae"], cpu)
    res = EvalResources(vae, vae_cfg, cpu, EvalRequest(split="test"))
    hook, _ = build_prior(load_for_sampling(prior_checkpoints["evalp"], cpu), "evalp")
    torch.manual_seed(1)
    bank = torch.randn(200, *vae.group_specs[0].shape)
    fit = PosteriorGaussianPrior(bank)

    def nll(priors, seed):
        torch.manual_seed(seed)
        return {"priors": dataset_nll(vae, res.held_out(), 3, 4, res.binarize(), 2, 2, cpu, priors)}

    trained = nll(likelihood_priors("evalp", hook), 5)  # EVaLP's p_psi estimates log Z: draws of its own
    _add_reference_likelihood(trained, nll({"gaussian": None, "posterior_gaussian": fit}, 5))
    assert set(trained["priors"]) == {"gaussian", "evalp", "evalp_sampler", "posterior_gaussian"}
    alone = nll({"gaussian": None, "posterior_gaussian": fit}, 5)["priors"]["posterior_gaussian"]
    assert trained["priors"]["posterior_gaussian"] == alone
    with pytest.raises(RuntimeError, match="other posterior samples"):
        _add_reference_likelihood(trained, nll({"gaussian": None, "posterior_gaussian": fit}, 6))
