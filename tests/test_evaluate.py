"""scripts/evaluate.py end to end on every checkpoint kind, its errors, and the metric helpers it adds."""
from __future__ import annotations

import json
import math

import pytest
import torch

from evalp_prior.baselines import langevin_run_config, load_langevin, ncp_run_config, train_langevin, train_ncp
from evalp_prior.config import EVaLPConfig, EVaLPRunConfig
from evalp_prior.metrics.mmd import median_bandwidth, mmd2_unbiased, posterior_bandwidth, prior_hole_mmd
from evalp_prior.metrics.timing import seconds_per_image
from evalp_prior.train import train_evalp, vae_fingerprint
from nvae.runtime import CheckpointError, RunLogger
from nvae.train import load_trained_nvae, train_nvae
from tests.helpers import run_script, tiny_run_config
from tests.test_stage1 import CPU

PRIOR_SETTINGS = dict(batch_size=8, max_steps=3, energy_hidden=8, log_every=1, eval_batches=1, bn_readjust_batches=1,
                      ckpt_every=100)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """Tiny checkpoints of every kind on one frozen NVAE, and where the FID statistics cache goes."""
    root = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    with RunLogger(root / "vae", True) as logger:
        assert train_nvae(tiny_run_config(max_steps=2), CPU, root / "vae", logger) == 0
    vae_path = root / "vae" / "checkpoint.pt"
    vae, vae_cfg, _ = load_trained_nvae(vae_path, torch.device("cpu"))
    fingerprint = vae_fingerprint(vae)
    evalp_cfg = EVaLPRunConfig(EVaLPConfig(n_critic=2, sampler_hidden=8, num_couplings=2, **PRIOR_SETTINGS),
                               str(vae_path), fingerprint)
    runs = {"evalp": (train_evalp, evalp_cfg),
            "langevin": (train_langevin, langevin_run_config(str(vae_path), fingerprint, langevin_steps=2,
                                                             **PRIOR_SETTINGS)),
            "ncp": (train_ncp, ncp_run_config(str(vae_path), fingerprint, sir_proposals=4, **PRIOR_SETTINGS))}
    out = {"nvae": vae_path, "cache": root / "fid_stats", "root": root}
    for name, (train, run_cfg) in runs.items():
        torch.manual_seed(0)
        with RunLogger(root / name, True) as logger:
            assert train(run_cfg, vae, vae_cfg, CPU, root / name, logger) == 0
        out[name] = root / name / "checkpoint.pt"
    return out


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
    assert m["nll"]["num_samples"] == 2 and m["nll"]["num_images"] == 4 and m["nll"]["dims"] == 32 * 32
    assert m["nll"]["bits_per_dim"] == pytest.approx(m["nll"]["nats"] / (32 * 32 * math.log(2)))
    assert 0 < m["nll"]["bits_per_dim"] < 9  # at most about 8 bits for an untrained 8-bit likelihood
    assert m["timing"]["seconds_per_image"] > 0 and m["timing"]["batch_size"] == 4


def test_every_checkpoint_kind_evaluates_against_the_same_posterior(checkpoints):
    # FID once: its 2048-d matrix square root alone costs 15-30 s on a shared CPU.
    stage1 = _evaluate(checkpoints, "nvae", "stage1.json")
    stage2 = _evaluate(checkpoints, "evalp", "stage2.json", *FID, "--sir", "5")
    assert (checkpoints["cache"] / "fid_stats_synthetic-train.npz").is_file()
    langevin = _evaluate(checkpoints, "langevin", "langevin.json", "--langevin-steps", "1")
    ncp = _evaluate(checkpoints, "ncp", "ncp.json")
    reports = {"gaussian": stage1, "evalp+sir5": stage2, "langevin": langevin, "ncp+sir4": ncp}
    for label, report in reports.items():
        assert report["label"] == label
        _check_common(report)
    fid = stage2["metrics"]["fid"]
    assert fid["num_samples"] == 8 and fid["reference_images"] == 8 and math.isfinite(fid["fid"]) and fid["fid"] > 0
    assert fid["image_size"] == [32, 32] and "fid" not in stage1["metrics"]
    # One frozen NVAE: every report holds the same NLL and the same Gaussian-prior MMD (the same posterior
    # samples, kernel and seeds), which is the stage-1 report's own MMD.
    for report in (stage2, langevin, ncp):
        assert report["metrics"]["nll"]["nats"] == stage1["metrics"]["nll"]["nats"]
        assert report["metrics"]["mmd"]["top"]["bandwidth"] == stage1["metrics"]["mmd"]["top"]["bandwidth"]
        assert report["metrics"]["mmd"]["top"]["gaussian"] == {k: stage1["metrics"]["mmd"]["top"][k]
                                                               for k in ("mmd2", "mmd2_multi")}
    assert stage2["request"]["sir"] == 5 and ncp["sir"] == 4 and langevin["request"]["langevin_steps"] == 1


@pytest.mark.parametrize("kind, flags, message", [
    ("nvae", ["--fid", "0"], "--fid needs at least 2 samples, got 0"),
    ("nvae", ["--timing", "--prior", "evalp"], "stage-1 checkpoint: it has no evalp prior; use --prior gaussian"),
    ("missing", ["--timing"], "checkpoint not found"),
    ("nvae", [], "nothing to evaluate"),
    ("langevin", ["--timing", "--sir", "10"], "--sir does not apply to --prior langevin"),
    ("evalp", ["--timing", "--prior", "ncp"], "'evalp' checkpoint: it has no ncp prior; use --prior gaussian or evalp"),
])
def test_bad_input_exits_2_with_a_message(checkpoints, kind, flags, message):
    path = checkpoints["root"] / "nope.pt" if kind == "missing" else checkpoints[kind]
    out = checkpoints["root"] / "never.json"
    result = run_script("scripts/evaluate.py", "--checkpoint", str(path), "--out", str(out), "--device", "cpu", *flags)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert not out.exists()


def test_loaders_check_the_checkpoint_kind(checkpoints):
    with pytest.raises(CheckpointError, match="'ncp' checkpoint but a 'langevin'"):
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
