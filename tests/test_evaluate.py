"""scripts/evaluate.py end to end on every checkpoint kind, its errors, and the metric helpers it adds."""
from __future__ import annotations

import json
import math

import pytest
import torch

from evalp_prior.baselines import load_langevin
from evalp_prior.evaluation import prior_label
from evalp_prior.metrics.mmd import median_bandwidth, mmd2_unbiased, posterior_bandwidth, prior_hole_mmd
from evalp_prior.metrics.timing import seconds_per_image
from evalp_prior.sir import ADAPTIVE_TEMPERATURES, ESSTarget
from evalp_prior.sir_calibration import SIGNIFICANCE_LEVEL
from nvae.runtime import CheckpointError
from tests.helpers import run_script


@pytest.fixture(scope="module")
def checkpoints(prior_checkpoints) -> dict:
    """The shared checkpoints of every kind, and where this module's FID statistics cache goes."""
    return {**prior_checkpoints, "cache": prior_checkpoints["root"] / "fid_stats"}


COMMON = ["--mmd", "--mmd-samples", "32", "--nll", "2", "--nll-images", "4", "--timing", "--timing-batch", "4",
          "--timing-repeats", "2", "--bn-batches", "1", "--batch-size", "16"]
FID = ["--fid", "8", "--fid-ref-images", "8", "--fid-batch", "8"]


def _evaluate(checkpoints, kind: str, out_name: str, *flags: str) -> dict:
    out = checkpoints["root"] / out_name
    result = run_script("scripts/evaluate.py", "--checkpoint", str(checkpoints[kind]), "--out", str(out),
                        "--fid-stats-dir", str(checkpoints["cache"]), "--device", "cpu", *COMMON, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "prior-hole MMD^2 z_1" in result.stdout and f"wrote {out}" in result.stdout
    return json.loads(out.read_text())


def _check_common(report: dict) -> None:
    m = report["metrics"]
    top = m["mmd"]["top"]
    assert top["num_samples"] == 32 and top["group"] == 0 and top["bandwidth"] > 0
    assert len(m["mmd"]["groups"]) == 3 and all(math.isfinite(g["mmd2_multi"]) for g in m["mmd"]["groups"])
    nll = m["nll"]["priors"]["gaussian"]
    assert nll["num_samples"] == 2 and nll["num_images"] == 4 and nll["dims"] == 32 * 32
    assert nll["bits_per_dim"] == pytest.approx(nll["nats"] / (32 * 32 * math.log(2)))
    assert 0 < nll["bits_per_dim"] < 9  # at most about 8 bits for an untrained 8-bit likelihood
    assert nll["elbo_nats"] >= nll["nats"] - 1e-6  # -ELBO >= -L_K
    assert m["timing"]["seconds_per_image"] > 0 and m["timing"]["batch_size"] == 4


def test_every_checkpoint_kind_evaluates_against_the_same_posterior(checkpoints):
    # FID once: the Inception features of the reference and generated images dominate this test.
    stage1 = _evaluate(checkpoints, "nvae", "stage1.json")
    stage2 = _evaluate(checkpoints, "evalp", "stage2.json", *FID, "--sir", "5", "--sir-temperature", "ess:0.9")
    assert (checkpoints["cache"] / "fid_features_synthetic-train.npz").is_file()
    langevin = _evaluate(checkpoints, "langevin", "langevin.json", "--langevin-steps", "1")
    ncp = _evaluate(checkpoints, "ncp", "ncp.json")
    reports = {"gaussian": stage1, "evalp+sir5_ess0.9": stage2, "langevin": langevin, "ncp+sir4": ncp}
    for label, report in reports.items():
        assert report["label"] == label
        _check_common(report)
    # The table names the prior as generate.py does, with the settings its hook samples with.
    assert stage2["description"] == "evalp (SIR M=5, energy weights at ESS-targeted temperature (ess:0.9), at groups [0])"
    # The report says which temperatures the ESS target chose: grid points, one count per SIR draw of group 0.
    used = stage2["metrics"]["sir_temperatures_used"]
    assert list(used) == ["0"] and sum(used["0"].values()) >= 2  # at least the FID batch and the timed calls
    assert set(used["0"]) <= {f"{t:.4g}" for t in ADAPTIVE_TEMPERATURES}
    assert ncp["description"] == "ncp (SIR M=4 at groups [0, 1, 2])" and stage1["description"] == "gaussian"
    assert langevin["description"] == "langevin (1 Langevin steps, step size 0.05)"
    fid = stage2["metrics"]["fid"]
    assert fid["num_samples"] == 8 and fid["reference_images"] == 8 and math.isfinite(fid["fid"]) and fid["fid"] > 0
    assert fid["image_size"] == [32, 32] and "fid" not in stage1["metrics"]
    assert fid["kid_stderr"] > 0 and 0 <= fid["precision"] <= 1 and 0 <= fid["recall"] <= 1 and fid["num_real"] == 8
    # Each prior's own density beside the Gaussian one: EVaLP's energy prior (log Z estimated once for the
    # top group) and its sampler; Langevin's and NCP's tilted priors; none for the stage-1 Gaussian.
    assert set(stage2["metrics"]["nll"]["priors"]) == {"gaussian", "evalp", "evalp_sampler"}
    assert stage2["metrics"]["nll"]["priors"]["evalp"]["log_z"][0]["shared_context"]
    assert set(langevin["metrics"]["nll"]["priors"]) == {"gaussian", "langevin"}
    assert set(ncp["metrics"]["nll"]["priors"]) == {"gaussian", "ncp"} and set(stage1["metrics"]["nll"]["priors"]) == {"gaussian"}
    assert "SIR(5) resampling has no tractable density" in stage2["metrics"]["nll"]["note"]
    # One frozen NVAE: every report holds the same NLL and the same Gaussian-prior MMD (the same posterior
    # samples, kernel and seeds), which is the stage-1 report's own MMD.
    for report in (stage2, langevin, ncp):
        assert report["metrics"]["nll"]["priors"]["gaussian"] == stage1["metrics"]["nll"]["priors"]["gaussian"]
        assert report["metrics"]["mmd"]["top"]["bandwidth"] == stage1["metrics"]["mmd"]["top"]["bandwidth"]
        gaussian = report["metrics"]["mmd"]["top"]["gaussian"]
        assert set(gaussian) == {"mmd2", "mmd2_multi", "mmd2_multi_stderr", "null_std_multi", "p_value"}
        assert gaussian == {k: stage1["metrics"]["mmd"]["top"][k] for k in gaussian}
    assert stage2["request"]["sir"] == 5 and ncp["sir"] == 4 and langevin["request"]["langevin_steps"] == 1


@pytest.mark.parametrize("kind, flags, message", [
    ("nvae", ["--fid", "0"], "--fid needs at least 2 samples, got 0"),
    ("nvae", ["--timing", "--prior", "evalp"], "stage-1 checkpoint: it has no evalp prior; use --prior gaussian"),
    ("missing", ["--timing"], "checkpoint not found"),
    ("nvae", [], "nothing to evaluate"),
    ("langevin", ["--timing", "--sir", "10"], "--sir does not apply to --prior langevin"),
    ("evalp", ["--timing", "--prior", "ncp"], "'evalp' checkpoint: it has no ncp prior; use --prior gaussian or evalp"),
    ("ncp", ["--timing", "--sir", "2", "--sir-temperature", "calibrated"],
     "--sir-temperature calibrated applies to --prior evalp"),
])
def test_bad_input_exits_2_with_a_message(checkpoints, kind, flags, message):
    path = checkpoints["root"] / "nope.pt" if kind == "missing" else checkpoints[kind]
    out = checkpoints["root"] / "never.json"
    result = run_script("scripts/evaluate.py", "--checkpoint", str(path), "--out", str(out), "--device", "cpu", *flags)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert not out.exists()


def test_loaders_check_the_checkpoint_kind(checkpoints):
    with pytest.raises(CheckpointError,
                       match=r"'ncp' \(NCP baseline\) checkpoint but a 'langevin' \(Langevin baseline\)"):
        load_langevin(checkpoints["ncp"], torch.device("cpu"))
    trained = load_langevin(checkpoints["langevin"], torch.device("cpu"))
    assert trained.prior().steps == 2 and trained.prior(steps=7).steps == 7


def test_seconds_per_image_is_the_median_call_over_the_batch():
    ticks = iter([0.0, 1.0, 10.0, 13.0, 20.0, 22.0])  # timed calls of 1, 3 and 2 seconds
    calls = []
    result = seconds_per_image(lambda: calls.append(1), batch_size=4, warmup=2, repeats=3, clock=lambda: next(ticks))
    assert len(calls) == 5  # two warm-up calls are not timed
    assert result["call_seconds"] == [1.0, 3.0, 2.0]
    assert result["seconds_per_image"] == 2.0 / 4


def test_posterior_bandwidth_and_prior_hole_mmd():
    g = torch.Generator().manual_seed(0)
    z_post, z_prior = torch.randn(301, 3, 2, 2, generator=g), torch.randn(200, 3, 2, 2, generator=g) + 0.5
    bandwidth = float(posterior_bandwidth(z_post))
    assert bandwidth == pytest.approx(float(torch.pdist(z_post.flatten(1).double()).median()))
    assert bandwidth != pytest.approx(float(median_bandwidth(z_post, z_prior)))  # the prior does not move it
    result = prior_hole_mmd(z_post, z_prior, bandwidth)
    assert result["mmd2"] == pytest.approx(float(mmd2_unbiased(z_post, z_prior, [bandwidth])))
    assert result["mmd2_multi"] == pytest.approx(float(mmd2_unbiased(z_post, z_prior, [0.5 * bandwidth, bandwidth,
                                                                                       2 * bandwidth])))


def test_fid_reference_can_be_the_validation_half(checkpoints):
    import dataclasses

    from evalp_prior.evaluation import EvalRequest, EvalResources
    from evalp_prior.metrics.fid import image_features
    from nvae.data import get_dataset, held_out_part
    from nvae.trained import load_trained_nvae

    cpu = torch.device("cpu")
    vae, vae_cfg, _ = load_trained_nvae(checkpoints["nvae"], cpu)
    request = EvalRequest(fid_samples=8, fid_ref_images=6, fid_batch=4, fid_reference="validation",
                          fid_stats_dir=checkpoints["cache"])
    request.validate()
    resources = EvalResources(vae, vae_cfg, cpu, request)
    features, _, _, description = resources.reference()
    validation = held_out_part(get_dataset("synthetic", "test"), "validation")
    expected = image_features([vae.crop(torch.stack([validation[i] for i in range(6)]))], resources.features(),
                              progress=False)
    assert description["reference_split"] == "validation" and description["reference_images"] == 6
    torch.testing.assert_close(features, expected, atol=1e-4, rtol=1e-4)
    train = EvalResources(vae, vae_cfg, cpu, dataclasses.replace(request, fid_reference="train")).reference()[0]
    assert train.shape == features.shape and not torch.allclose(train, features)
    with pytest.raises(ValueError, match="--fid-reference must be one of"):
        dataclasses.replace(request, fid_reference="test").validate()


def test_prior_labels_name_the_sir_settings_that_change_the_samples():
    assert prior_label("evalp", 100) == "evalp+sir100"
    assert prior_label("evalp", 100, 3.0) == "evalp+sir100_T3"  # tempered reports do not overwrite untempered ones
    assert prior_label("ncp", 100, 0.5) == "ncp+sir100_T0.5"
    assert prior_label("evalp", 100, ESSTarget(0.94)) == "evalp+sir100_ess0.94"
    assert prior_label("evalp", 1, 3.0) == "evalp"  # one proposal is the sampler itself
    assert prior_label("gaussian", None) == "gaussian"


def test_calibrated_sir_fits_its_temperature_on_the_validation_half_and_samples_at_it(checkpoints):
    report = _evaluate(checkpoints, "evalp", "calibrated.json", "--sir", "4", "--sir-temperature", "calibrated",
                       "--sir-calibration-images", "24")
    calibration = report["metrics"]["sir_calibration"]
    assert report["label"] == "evalp+sir4_calibrated" and report["request"]["sir_temperature"] == "calibrated"
    assert calibration["group"] == 0 and calibration["num_images"] == 24 and calibration["weights"] == "energy"
    slope, temperature = calibration["fit"]["slope"], calibration["temperature"]
    used = report["metrics"].get("sir_temperatures_used", {})
    if slope > 0 and calibration["p_value"] < SIGNIFICANCE_LEVEL:  # every SIR draw ran at the fitted T = 1 / slope
        assert temperature == pytest.approx(1 / slope) and list(used) == ["0"]
        assert list(used["0"]) == [f"{temperature:.4g}"]
    else:  # no significant signal: SIR is off and no draw resampled
        assert temperature == "inf" and not used
