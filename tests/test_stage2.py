"""Stage 2 on a frozen NVAE: isolation from the VAE, identity at initialisation, resume, DDP, entry points."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from evalp_prior.config import EVaLPConfig, EVaLPRunConfig
from evalp_prior.train import EVaLPTask, build_prior_modules, load_evalp, train_evalp, vae_fingerprint
from nvae.data import get_dataset
from nvae.runtime import RunLogger, load_checkpoint
from nvae.runtime.signals import PREEMPTED_EXIT_CODE
from nvae.train import load_trained_nvae, train_nvae
from tests.helpers import CPU, StopAt, run_script, tiny_run_config


def _stage2_config(vae, **kw) -> EVaLPRunConfig:
    settings = dict(batch_size=8, max_steps=6, n_critic=2, energy_hidden=8, sampler_hidden=8, num_couplings=2,
                    log_every=1, eval_batches=1, bn_readjust_batches=1, ckpt_every=100, lr_energy=1e-3,
                    lr_sampler=1e-3, critic_warmup_steps=0)
    settings.update(kw)
    return EVaLPRunConfig(EVaLPConfig(**settings), "vae.pt", vae_fingerprint(vae))


def _train(run_dir, vae_path, cfg_kw=None, resume=None, stop=None):
    vae, vae_cfg, _ = load_trained_nvae(vae_path, torch.device("cpu"))
    run_cfg = _stage2_config(vae, **(cfg_kw or {}))
    torch.manual_seed(run_cfg.evalp.seed)
    with RunLogger(run_dir, True) as logger:
        status = train_evalp(run_cfg, vae, vae_cfg, CPU, run_dir, logger, resume, stop)
    return status, vae


def test_stage2_changes_no_vae_parameter_or_buffer(tmp_path, vae_checkpoint):
    before, _, _ = load_trained_nvae(vae_checkpoint, torch.device("cpu"))
    status, vae = _train(tmp_path, vae_checkpoint)
    assert status == 0
    for (name, a), b in zip(before.state_dict().items(), vae.state_dict().values()):
        assert torch.equal(a, b), name
    stored = load_checkpoint(tmp_path / "checkpoint.pt", "evalp")
    for name, a in before.state_dict().items():
        assert torch.equal(a, stored["task"]["vae"]["model"][name]), name
    # ... while the prior itself did learn something.
    trained = load_evalp(tmp_path / "checkpoint.pt", torch.device("cpu"))
    _, fresh_energies, fresh_sampler = build_prior_modules(trained.run_cfg.evalp, trained.vae)
    assert any(not torch.equal(a, b) for a, b in zip(fresh_sampler.state_dict().values(),
                                                     trained.sampler.state_dict().values()))


def test_zero_energy_identity_sampler_reproduces_nvae_bit_for_bit(vae_checkpoint):
    vae, _, _ = load_trained_nvae(vae_checkpoint, torch.device("cpu"))
    groups, energies, sampler = build_prior_modules(EVaLPConfig(), vae)
    for net in energies.nets.values():
        torch.nn.init.zeros_(net.head[-1].weight)
        torch.nn.init.zeros_(net.head[-1].bias)
    from evalp_prior.prior import EVaLPPrior

    z = torch.randn(3, *vae.group_specs[0].shape)
    assert torch.equal(energies(0, z, torch.randn(3, vae.group_specs[0].context_channels, 4, 4)), torch.zeros(3))
    prior = EVaLPPrior(energies, sampler, groups)
    for temperature in (1.0, 0.6):
        torch.manual_seed(7)
        plain = vae.sample_logits(5, temperature)
        torch.manual_seed(7)
        evalp = vae.sample_logits(5, temperature, prior=prior)
        assert torch.equal(plain, evalp)


@pytest.mark.parametrize("extra", [{}, {"sampler_ema": 0.9, "whiten_critic": True, "sampler_mixing": True,
                                      "gradient_penalty": "one-sided", "critic_warmup_steps": 1}])
def test_stage2_resume_equals_uninterrupted_run(tmp_path, vae_checkpoint, extra):
    assert _train(tmp_path / "full", vae_checkpoint, extra)[0] == 0
    assert _train(tmp_path / "split", vae_checkpoint, extra, stop=StopAt(3))[0] == PREEMPTED_EXIT_CODE
    torch.manual_seed(12345)
    assert _train(tmp_path / "split", vae_checkpoint, extra, resume=tmp_path / "split" / "checkpoint.pt")[0] == 0
    full = load_checkpoint(tmp_path / "full" / "checkpoint.pt", "evalp")["task"]
    split = load_checkpoint(tmp_path / "split" / "checkpoint.pt", "evalp")["task"]
    parts = ("energies", "sampler") + (("sampler_ema",) if extra else ())
    for part in parts:
        for key, value in full[part].items():
            assert torch.equal(value, split[part][key]), (part, key)
    if extra:  # the moving average is what generation loads, and it differs from the raw weights
        loaded = load_evalp(tmp_path / "full" / "checkpoint.pt", torch.device("cpu"))
        for key, value in loaded.sampler.state_dict().items():
            assert torch.equal(value, full["sampler_ema"][f"module.{key}"]), key
        assert any(not torch.equal(full["sampler"][k], full["sampler_ema"][f"module.{k}"]) for k in full["sampler"])


def test_two_process_torchrun_stage2_trains_and_generates(tmp_path, vae_checkpoint):
    out = run_script("scripts/train_nvae_evalp.py", "--vae", str(vae_checkpoint), "--save", str(tmp_path),
                     "--batch-size", "8", "--max-steps", "4", "--n-critic", "2", "--energy-hidden", "8",
                     "--sampler-hidden", "8", "--eval-batches", "1", "--bn-readjust-batches", "1", "--critic-warmup-steps", "0",
                     "--device", "cpu", torchrun=2)
    assert out.returncode == 0, out.stderr[-3000:]
    payload = load_checkpoint(tmp_path / "checkpoint.pt", "evalp")
    assert payload["world_size"] == 2 and payload["step"] == 4
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert any("energy_gap/mean" in r for r in metrics)
    out = run_script("scripts/generate.py", "--checkpoint", str(tmp_path / "checkpoint.pt"), "--n", "4",
                     "--sir", "50", "--sir-chunk", "7", "--bn-batches", "1", "--out", str(tmp_path / "g.png"),
                     "--npz", str(tmp_path / "g.npz"))
    assert out.returncode == 0, out.stderr[-3000:]
    import numpy as np

    assert np.load(tmp_path / "g.npz")["images"].shape == (4, 32, 32, 1)


def test_stage2_refuses_a_different_vae_on_resume(tmp_path, vae_checkpoint):
    assert _train(tmp_path, vae_checkpoint, {"max_steps": 1})[0] == 0
    other = tmp_path / "other"
    torch.manual_seed(1)
    with RunLogger(other, True) as logger:
        cfg = tiny_run_config(max_steps=1, seed=1)
        assert train_nvae(cfg, CPU, other, logger) == 0
    out = run_script("scripts/train_nvae_evalp.py", "--vae", str(other / "checkpoint.pt"), "--save", str(tmp_path),
                     "--resume")
    assert out.returncode == 2
    assert "was trained on the NVAE" in out.stderr and "fingerprint" in out.stderr
    out = run_script("scripts/train_nvae_evalp.py", "--vae", str(tmp_path / "checkpoint.pt"), "--save",
                     str(tmp_path / "x"))
    assert out.returncode == 2 and "'evalp' (stage-2) checkpoint but a 'nvae' (stage-1)" in out.stderr


def test_generate_rejects_impossible_flags(tmp_path, vae_checkpoint):
    for flags, message in ((["--sir", "0"], "--sir needs at least 1"), (["--temperature", "-1"], "--temperature must be > 0"),
                           (["--prior", "evalp"], "stage-1 checkpoint"), (["--n", "0"], "--n must be >= 1")):
        out = run_script("scripts/generate.py", "--checkpoint", str(vae_checkpoint), "--out", str(tmp_path / "x.png"),
                         *flags)
        assert out.returncode == 2 and message in out.stderr, (flags, out.stderr[-1000:])
        assert not (tmp_path / "x.png").exists()
