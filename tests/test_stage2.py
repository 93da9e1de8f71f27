"""Stage 2 on a frozen NVAE: isolation from the VAE, identity at initialisation, resume, DDP, entry points."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from evalp_prior.config import EVaLPConfig, EVaLPRunConfig
from evalp_prior.train import (MOMENT_SEED, EVaLPTask, build_prior_modules, load_evalp, shrunk_covariance, train_evalp,
                               vae_fingerprint)
from nvae.data import get_dataset, held_out_part
from nvae.runtime import RunLogger, load_checkpoint
from nvae.runtime.signals import PREEMPTED_EXIT_CODE
from nvae.train import train_nvae
from nvae.trained import load_trained_nvae
from tests.helpers import CPU, StopAt, free_port, run_script, tiny_run_config


def _stage2_config(vae, **kw) -> EVaLPRunConfig:
    settings = dict(batch_size=8, max_steps=6, n_critic=2, energy_hidden=8, sampler_hidden=8, num_couplings=2,
                    log_every=1, eval_batches=1, bn_readjust_batches=1, ckpt_every=100, lr_energy=1e-3,
                    lr_sampler=1e-3, critic_warmup_steps=0,
                    sampler_affine="none")  # the couplings-only flow; the moment start has its own tests
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
    # ... while the prior itself learned in the right direction: its critic gives posterior samples lower energy
    # than the sampler's draws (the gap E(z_pos) - E(z_neg) it minimises), more so than at initialisation.
    trained = load_evalp(tmp_path / "checkpoint.pt", torch.device("cpu"))
    torch.manual_seed(0)
    _, fresh_energies, fresh_sampler = build_prior_modules(trained.run_cfg.evalp, trained.vae)
    assert any(not torch.equal(a, b) for a, b in zip(fresh_sampler.state_dict().values(),
                                                     trained.sampler.state_dict().values()))
    x = torch.stack([get_dataset("synthetic", "train")[i] for i in range(64)])
    with torch.no_grad():
        top = trained.vae.posterior(x).groups[0]
        z_neg, _ = trained.sampler(top.mu_p, top.sigma_p, top.h, 0)
        gaps = [float(e(0, top.z, top.h).mean() - e(0, z_neg, top.h).mean()) for e in (fresh_energies, trained.energies)]
    assert gaps[1] < 0 and gaps[1] < gaps[0], gaps


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
                                      "gradient_penalty": "one-sided", "critic_warmup_steps": 1},
                                   {"groups": "top", "sampler_ema": 0.9, "sampler_affine": "moments",
                                    "moment_images": 256, "sampler_fit_steps": 5, "sampler_fit_images": 64}])
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


# lr_energy 0: the energy step computes (and DDP averages) its gradients but leaves the energies unchanged, so
# the sampler step that follows sees the same critic on every rank and in the single-process reference.
_DDP_SETTINGS = dict(lr_energy=0.0, n_critic=1, gradient_penalty="two-sided", lambda_gp=10.0)


def _one_step_gradients(task: EVaLPTask, batch: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Energy and sampler gradients of one train_step (step 0: an energy step, then a sampler step)."""
    grads: dict[str, list[torch.Tensor]] = {}
    original = task._backward_and_step

    def recording(loss, optimizer, params):
        taken = original(loss, optimizer, params)
        grads["energy" if optimizer is task.energy_opt else "sampler"] = [
            torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
        return taken

    task._backward_and_step = recording
    assert task.train_step(batch, 0) is not None
    return grads


def test_moment_start_puts_the_sampler_at_the_whitened_posterior_fit(vae_checkpoint):
    vae, vae_cfg, _ = load_trained_nvae(vae_checkpoint, torch.device("cpu"))
    train_set, count = get_dataset("synthetic", "train"), 256
    validation = held_out_part(get_dataset("synthetic", "test"), "validation")
    torch.manual_seed(0)
    task = EVaLPTask(_stage2_config(vae, groups="top", sampler_affine="moments", moment_images=count, sampler_ema=0.9),
                     vae, vae_cfg, CPU, validation, False, RunLogger(".", False), 6, train_set)
    # Brute force: one posterior draw per image, batch by batch as the task's batch size, from the moment seed.
    torch.manual_seed(MOMENT_SEED)
    with torch.no_grad():
        draws = [vae.posterior(torch.stack([train_set[i] for i in range(start, start + 8)])).groups
                 for start in range(0, count, 8)]
    for g in task.groups:
        u = torch.cat([((d[g].z - d[g].mu_p) / d[g].sigma_p).flatten(1) for d in draws]).double()
        affine = task.sampler.affines[str(g)]
        torch.testing.assert_close(affine.shift.double(), u.mean(0), rtol=1e-5, atol=1e-6)
        fitted = affine.scale_tril().double()
        torch.testing.assert_close(fitted @ fitted.T, shrunk_covariance(u), rtol=1e-4, atol=1e-5)
        assert (fitted - torch.eye(len(fitted), dtype=torch.float64)).abs().max() > 0.1  # it moved
    # Generation's moving average starts from the moment-started sampler, not from the identity.
    for a, b in zip(task.sampler.state_dict().values(), task.generation_sampler().state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="needs the training split"):
        EVaLPTask(_stage2_config(vae, sampler_affine="moments"), vae, vae_cfg, CPU, validation, False,
                  RunLogger(".", False), 6)
    # Fewer images than dimensions: the shrunk covariance is still positive definite (the sample one is singular).
    few = EVaLPTask(_stage2_config(vae, groups="top", sampler_affine="moments", moment_images=8), vae, vae_cfg, CPU,
                    validation, False, RunLogger(".", False), 6, train_set)
    fitted = few.sampler.affines["0"].scale_tril().double()
    assert len(fitted) > 8 and bool((fitted.diagonal() > 0).all())
    assert not torch.equal(fitted, torch.eye(len(fitted), dtype=torch.float64))


def test_shrunk_covariance_is_the_ledoit_wolf_estimate():
    # Brute force of Ledoit and Wolf (2004), Lemma 3.2 - 3.4: shrinkage = min(b^2, d^2) / d^2 with
    # d^2 = ||S - m I||^2 / p and b^2 = sum_k ||x_k x_k^T - S||^2 / (n^2 p), S the 1/n sample covariance.
    g = torch.Generator().manual_seed(0)
    n, p = 40, 6
    samples = torch.randn(n, p, generator=g, dtype=torch.float64) @ torch.randn(p, p, generator=g, dtype=torch.float64)
    x = samples - samples.mean(0)
    s = x.T @ x / n
    m = s.trace() / p
    d2 = ((s - m * torch.eye(p, dtype=torch.float64)) ** 2).sum() / p
    b2 = sum(((torch.outer(row, row) - s) ** 2).sum() for row in x) / (n * n * p)
    k = min(b2, d2) / d2
    assert 0 < k < 1
    torch.testing.assert_close(shrunk_covariance(samples), (1 - k) * s + k * m * torch.eye(p, dtype=torch.float64))


def test_shrinkage_beats_the_sample_covariance_on_held_out_draws_and_vanishes_with_many():
    g = torch.Generator().manual_seed(1)
    normal = torch.distributions.Normal(torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64))
    # White draws, 64 dimensions from 200: the sample covariance's held-out loss is about d (d + 1) / (4 n) = 5 nats.
    train, held_out = (torch.randn(k, 64, generator=g, dtype=torch.float64) for k in (200, 5000))
    truth = normal.log_prob(held_out).sum(1).mean()

    def held_out_log_likelihood(covariance):
        return torch.distributions.MultivariateNormal(train.mean(0), covariance).log_prob(held_out).mean()

    shrunk, sample = held_out_log_likelihood(shrunk_covariance(train)), held_out_log_likelihood(torch.cov(train.T))
    assert shrunk > truth - 0.5 and shrunk > sample + 3, (float(truth), float(shrunk), float(sample))
    # Many draws of a strongly non-spherical Gaussian: (almost) no shrinkage, the sample covariance.
    scales = torch.tensor([0.1, 0.3, 1.0, 3.0], dtype=torch.float64)
    many = torch.randn(20000, 4, generator=g, dtype=torch.float64) * scales
    x = many - many.mean(0)
    torch.testing.assert_close(shrunk_covariance(many), x.T @ x / len(x), rtol=0, atol=0.01)


def _stage2_task(vae_path: str, ctx) -> tuple[EVaLPTask, torch.Tensor]:
    vae, vae_cfg, _ = load_trained_nvae(vae_path, torch.device("cpu"))
    torch.manual_seed(0)  # identical initial weights everywhere (DDP also broadcasts rank 0's)
    task = EVaLPTask(_stage2_config(vae, **_DDP_SETTINGS), vae, vae_cfg, ctx,
                     held_out_part(get_dataset("synthetic", "test"), "validation"), False, RunLogger(".", False), 6)
    batch = torch.stack([get_dataset("synthetic", "train")[i] for i in range(16)])
    return task, batch


def _stage2_ddp_worker(rank: int, port: int, vae_path: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from nvae.runtime import init_distributed, shutdown_and_exit

    ctx = init_distributed("cpu")
    task, batch = _stage2_task(vae_path, ctx)
    torch.manual_seed(100 + rank)  # the posterior, negative, interpolation and sampler noise of this half
    grads = _one_step_gradients(task, batch[8 * rank : 8 * (rank + 1)])
    if rank == 0:
        torch.save(grads, os.path.join(out_dir, "ddp.pt"))
    shutdown_and_exit(0)


def test_ddp_stage2_gradients_equal_a_single_process_reference(tmp_path, vae_checkpoint):
    """DDP averages each rank's energy gradient (the gradient penalty's double backward included) and sampler
    gradient. A single process that runs the same step on each half with the same seeds and averages the two
    gradients must agree (only the summation order differs)."""
    mp.spawn(_stage2_ddp_worker, args=(free_port(), str(vae_checkpoint), str(tmp_path)), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    halves = []
    for half in range(2):
        task, batch = _stage2_task(str(vae_checkpoint), CPU)
        torch.manual_seed(100 + half)
        halves.append(_one_step_gradients(task, batch[8 * half : 8 * (half + 1)]))
    for net in ("energy", "sampler"):
        reference = [(a + b) / 2 for a, b in zip(halves[0][net], halves[1][net])]
        assert len(reference) == len(ddp[net]) and any(g.abs().max() > 0 for g in reference), net
        atol = 1e-6 * max(float(g.abs().max()) for g in reference)
        for i, (want, got) in enumerate(zip(reference, ddp[net])):
            assert torch.allclose(got, want, rtol=1e-4, atol=atol), (net, i, float((got - want).abs().max()))
        # The halves really differ: an un-averaged gradient (one rank's own) would fail the comparison.
        assert any(not torch.allclose(a, b, rtol=1e-3) for a, b in zip(halves[0][net], halves[1][net])), net


def test_one_job_trains_stage1_then_stage2_and_resumes_without_retraining_stage1(tmp_path):
    """Without --vae the script trains stage 1 into SAVE/vae, then EVaLP on it; resuming the job goes to
    stage 2 directly (stage 1's checkpoint is left as it was)."""
    common = ["--save", str(tmp_path), "--stage1-dataset", "synthetic", "--stage1-num-channels", "4",
              "--stage1-batch-size", "8", "--stage1-max-steps", "2", "--stage1-eval-batches", "1",
              "--stage1-bn-readjust-batches", "1", "--batch-size", "8", "--n-critic", "2", "--energy-hidden", "8",
              "--sampler-hidden", "8", "--num-couplings", "2", "--eval-batches", "1", "--bn-readjust-batches", "1",
              "--critic-warmup-steps", "0", "--device", "cpu"]
    out = run_script("scripts/train_nvae_evalp.py", *common, "--max-steps", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    stage1 = load_checkpoint(tmp_path / "vae" / "checkpoint.pt", "nvae")
    assert stage1["step"] == 2
    payload = load_checkpoint(tmp_path / "checkpoint.pt", "evalp")
    assert payload["step"] == 2 and json.loads(payload["config"])["vae_path"] == str(tmp_path / "vae" / "checkpoint.pt")
    before = (tmp_path / "vae" / "checkpoint.pt").stat().st_mtime_ns
    out = run_script("scripts/train_nvae_evalp.py", *common, "--max-steps", "2", "--resume", "auto")
    assert out.returncode == 0, out.stderr[-3000:]
    assert load_checkpoint(tmp_path / "checkpoint.pt", "evalp")["step"] == 2
    assert (tmp_path / "vae" / "checkpoint.pt").stat().st_mtime_ns == before


def test_compiled_stage2_step_matches_eager(vae_checkpoint):
    """--compile in stage 2 (the frozen NVAE's cells, as train_frozen_prior does, and the sampler's couplings)
    gives the eager step's energy and sampler gradients."""
    from nvae.cells import compile_cells

    batch = torch.stack([get_dataset("synthetic", "train")[i] for i in range(8)])
    grads = []
    for compiled in (False, True):
        vae, vae_cfg, _ = load_trained_nvae(vae_checkpoint, torch.device("cpu"))
        if compiled:
            compile_cells(vae)
        torch.manual_seed(0)
        task = EVaLPTask(_stage2_config(vae, compile=compiled), vae, vae_cfg, CPU,
                         held_out_part(get_dataset("synthetic", "test"), "validation"), False, RunLogger(".", False), 6)
        assert all((c.compiled_params is not None) == compiled for c in task.sampler.couplings)
        torch.manual_seed(1)
        grads.append(_one_step_gradients(task, batch))
    for part in ("energy", "sampler"):
        scale = max(g.abs().max().item() for g in grads[0][part])
        for eager, fast in zip(grads[0][part], grads[1][part]):
            assert torch.allclose(eager, fast, rtol=1e-3, atol=1e-5 * scale + 1e-8), part
