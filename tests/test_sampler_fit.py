"""The sampler's maximum-likelihood start: the banks of posterior samples and the fit itself."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from evalp_prior.sampler import SharedFlowSampler
from evalp_prior import sampler_fit
from evalp_prior.sampler_fit import (BANK_SEED, HELDOUT_BANK_SEED, LowerGroupBank, TopGroupBank, available_memory_bytes,
                                     check_bank_memory, fit_sampler, posterior_banks, top_group_bank)
from evalp_prior.train import MOMENT_SEED, EVaLPTask
from nvae.data import get_dataset, held_out_part
from nvae.hooks import GroupSpec
from nvae.runtime import RunLogger
from nvae.trained import load_trained_nvae
from tests.helpers import CPU
from tests.test_stage2 import _stage2_config

SPEC = [GroupSpec(index=0, scale=0, channels=2, height=2, width=2, context_channels=3)]
TWO_GROUPS = SPEC + [GroupSpec(index=1, scale=0, channels=2, height=2, width=2, context_channels=3)]


def _gaussian_bank(n: int, seed: int = 0) -> tuple[TopGroupBank, torch.Tensor, torch.Tensor]:
    """A bank of n draws of a correlated 8-d Gaussian N(mean, cov) with a base N(0.5, 2^2), and (mean, cov)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(8, 8, generator=g, dtype=torch.float64) * 0.4 + torch.eye(8, dtype=torch.float64)
    mean, cov = torch.randn(8, generator=g, dtype=torch.float64), a @ a.T
    z = (mean + torch.randn(n, 8, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T).float()
    bank = TopGroupBank(z.view(n, 2, 2, 2), torch.ones(1, 3, 2, 2), torch.full((1, 2, 2, 2), 0.5),
                        torch.full((1, 2, 2, 2), 2.0))
    return bank, mean, cov


def test_fit_reaches_the_entropy_of_a_gaussian():
    bank, _, cov = _gaussian_bank(20000)
    torch.manual_seed(0)
    sampler = SharedFlowSampler(SPEC, [0], hidden=16, num_couplings=2, group_affine=True)
    result = fit_sampler(sampler, [bank], steps=1500, batch_size=256, lr=1e-2)
    # The bank's NLL under its own density is the entropy (closed form) up to the probe's noise (~0.03 nats); no
    # model does better in expectation, and the base N(0.5, 2^2) the sampler starts from is 8 nats worse.
    entropy = 0.5 * float(torch.logdet(2 * math.pi * math.e * cov))
    assert result["nll_before"] > entropy + 3
    assert abs(result["nll_after"] - entropy) < 0.15, (result, entropy)


def test_fit_is_seeded_and_refuses_a_sampler_without_the_top_group():
    bank, _, _ = _gaussian_bank(512)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        sampler = SharedFlowSampler(SPEC, [0], hidden=8, num_couplings=2)
        torch.manual_seed(123 + len(runs))  # the run's own stream must not matter
        fit_sampler(sampler, [bank], steps=5, batch_size=64, lr=1e-3)
        runs.append(sampler.state_dict())
    for key, value in runs[0].items():
        assert torch.equal(value, runs[1][key]), key
    with pytest.raises(ValueError, match="sampler's groups are \\[1\\]"):
        fit_sampler(SharedFlowSampler(TWO_GROUPS, [1], hidden=8), [bank], steps=1, batch_size=8, lr=1e-3)


def _conditional_bank(n: int, seed: int = 1) -> LowerGroupBank:
    """Group 1 given a per-image context h ~ N(0, I): u = (z - mu_p) / sigma_p = 0.8 h[:, :2] + 0.5 noise, with
    mu_p = -1, sigma_p = 2, so z | h has standard deviation 1 in each of its 8 dimensions."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, 3, 2, 2, generator=g)
    u = 0.8 * h[:, :2] + 0.5 * torch.randn(n, 2, 2, 2, generator=g)
    mu_p, sigma_p = torch.full_like(u, -1.0), torch.full_like(u, 2.0)
    return LowerGroupBank(1, mu_p + sigma_p * u, h, mu_p, sigma_p, torch.device("cpu"))


def test_fit_of_a_lower_group_reaches_the_conditional_entropy():
    bank = _conditional_bank(20000)
    torch.manual_seed(0)
    sampler = SharedFlowSampler(TWO_GROUPS, [0, 1], hidden=16, num_couplings=2)
    result = fit_sampler(sampler, [bank], steps=1500, batch_size=256, lr=1e-2)
    # H(z | h) = 8 * 0.5 log(2 pi e): no density does better in expectation. A fit that ignored h would stop at the
    # marginal's entropy, 8 * 0.5 * log(0.89 / 0.25) = 5.1 nats above it, near where the identity start is.
    entropy = 8 * 0.5 * math.log(2 * math.pi * math.e)
    assert result["nll_before"] == result["nll_before/group01"] > entropy + 5
    assert abs(result["nll_after"] - entropy) < 0.2, (result, entropy)


def test_fit_of_two_groups_sums_their_likelihoods():
    top, _, _ = _gaussian_bank(512)
    lower = _conditional_bank(512)
    torch.manual_seed(0)
    sampler = SharedFlowSampler(TWO_GROUPS, [0, 1], hidden=8, num_couplings=2)
    result = fit_sampler(sampler, [top, lower], steps=20, batch_size=64, lr=1e-2)
    for when in ("before", "after"):
        assert result[f"nll_{when}"] == pytest.approx(result[f"nll_{when}/group00"] + result[f"nll_{when}/group01"])
    assert result["nll_after/group00"] < result["nll_before/group00"]
    assert result["nll_after/group01"] < result["nll_before/group01"]
    with pytest.raises(ValueError, match="different numbers of images"):
        fit_sampler(sampler, [top, _conditional_bank(100)], steps=1, batch_size=8, lr=1e-3)


def test_fit_keeps_the_weights_that_are_best_on_held_out_draws():
    # 256 training draws memorised by a wide flow: the bank's NLL falls below the entropy while fresh draws' rises.
    train, held_out = _conditional_bank(256), _conditional_bank(2000, seed=2)

    def fit(steps: int, *, stop: bool) -> tuple[SharedFlowSampler, dict[str, float]]:
        torch.manual_seed(0)
        sampler = SharedFlowSampler(TWO_GROUPS, [0, 1], hidden=64, num_couplings=4)
        return sampler, fit_sampler(sampler, [train], steps, 64, 3e-3, [held_out] if stop else (), check_every=10)

    def held_out_nll(sampler: SharedFlowSampler) -> float:
        with torch.no_grad():
            b = held_out.rows(torch.arange(2000))
            return float(-sampler.log_prob(b.z_pos, b.mu_p, b.sigma_p, b.h, 1).mean())

    overfit, plain = fit(300, stop=False)
    stopped, result = fit(300, stop=True)
    entropy = 8 * 0.5 * math.log(2 * math.pi * math.e)
    assert plain["nll_after"] < entropy - 1 < entropy + 1 < held_out_nll(overfit)  # it did memorise
    assert 0 < result["best_step"] < 300 and result["best_step"] % 10 == 0
    assert result["heldout_nll_after"] == pytest.approx(held_out_nll(stopped), abs=1e-4)
    assert result["heldout_nll_after"] < min(result["heldout_nll_before"], held_out_nll(overfit)) - 1
    # the kept weights are those of the same seeded fit stopped at the chosen step, and the next check was worse
    at_best, _ = fit(result["best_step"], stop=False)
    for key, value in at_best.state_dict().items():
        torch.testing.assert_close(value, stopped.state_dict()[key])
    assert held_out_nll(fit(result["best_step"] + 10, stop=False)[0]) > result["heldout_nll_after"]
    with pytest.raises(ValueError, match="held-out banks hold groups"):
        fit_sampler(SharedFlowSampler(TWO_GROUPS, [0, 1], hidden=8), [train], 1, 8, 1e-3, [_gaussian_bank(8)[0]])


def test_bank_is_one_seeded_posterior_draw_per_image(vae_checkpoint):
    vae, _, _ = load_trained_nvae(vae_checkpoint, torch.device("cpu"))
    train_set = get_dataset("synthetic", "train")
    torch.manual_seed(5)
    bank = top_group_bank(vae, train_set, 24, 8, False, torch.device("cpu"))
    after = torch.rand(1)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(1))  # the caller's random stream is left as it was
    torch.manual_seed(BANK_SEED)
    with torch.no_grad():
        tops = [vae.posterior(torch.stack([train_set[i] for i in range(s, s + 8)])).groups[0] for s in range(0, 24, 8)]
    assert torch.equal(bank.z, torch.cat([t.z for t in tops]))
    assert torch.equal(bank.h, tops[0].h[:1]) and torch.equal(bank.sigma_p, tops[0].sigma_p[:1])


def test_lower_group_banks_hold_each_image_with_its_own_context(vae_checkpoint):
    vae, _, _ = load_trained_nvae(vae_checkpoint, torch.device("cpu"))
    train_set = get_dataset("synthetic", "train")
    groups = list(range(len(vae.group_specs)))
    banks = posterior_banks(vae, train_set, groups, 20, 8, False, torch.device("cpu"))  # a last batch of 4
    torch.manual_seed(BANK_SEED)
    with torch.no_grad():
        passes = [vae.posterior(torch.stack([train_set[i] for i in range(s, min(s + 8, 20))])) for s in range(0, 20, 8)]
    assert isinstance(banks[0], TopGroupBank)  # the same draws as the top group's bank alone
    assert torch.equal(banks[0].z, top_group_bank(vae, train_set, 20, 8, False, torch.device("cpu")).z)
    for bank in banks[1:]:
        assert isinstance(bank, LowerGroupBank)
        for name in ("z", "h", "mu_p", "sigma_p"):
            assert torch.equal(getattr(bank, name), torch.cat([getattr(p.groups[bank.group], name) for p in passes]))
        assert not torch.equal(bank.h[0], bank.h[1])  # a context per image, not a shared one
        rows = bank.rows(torch.tensor([3, 0]))
        assert rows.group == bank.group and torch.equal(rows.h, bank.h[[3, 0]])


def test_bank_memory_check_names_the_largest_image_count_that_fits(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   1000 kB\n")
    assert available_memory_bytes(meminfo) == 1000 * 1024
    assert available_memory_bytes(tmp_path / "missing") is None
    check_bank_memory(1000, 50, 100_000, 1)  # exactly half the available memory: allowed
    check_bank_memory(1000, 10**9, None, 1)  # unknown available memory: no check
    with pytest.raises(ValueError, match="at most 50,"):
        check_bank_memory(1000, 51, 100_000, 1)
    with pytest.raises(ValueError, match="at most 25,"):  # two ranks on the node share it
        check_bank_memory(1000, 26, 100_000, 2)


def test_lower_group_banks_stop_before_the_pass_when_memory_is_short(vae_checkpoint, monkeypatch):
    vae, _, _ = load_trained_nvae(vae_checkpoint, torch.device("cpu"))
    train_set = get_dataset("synthetic", "train")
    groups = list(range(len(vae.group_specs)))
    passes = []
    forward = vae.posterior
    monkeypatch.setattr(vae, "posterior", lambda x: passes.append(1) or forward(x))
    monkeypatch.setattr(sampler_fit, "available_memory_bytes", lambda: 1000)
    with pytest.raises(ValueError, match="lower --sampler-fit-images"):
        posterior_banks(vae, train_set, groups, 24, 8, False, torch.device("cpu"))
    assert len(passes) == 1  # refused after the first batch, not after the whole pass
    assert posterior_banks(vae, train_set, [0], 24, 8, False, torch.device("cpu"))  # the top group needs no check


def test_bank_refuses_a_context_that_depends_on_the_image():
    def posterior(x):  # a group whose context is the image itself
        z = torch.zeros(x.shape[0], 2, 2, 2)
        return SimpleNamespace(groups=[SimpleNamespace(z=z, h=x[:, :1, :2, :2], mu_p=z, sigma_p=z + 1)])

    fake = SimpleNamespace(posterior=posterior)
    images = [torch.rand(1, 4, 4) for _ in range(6)]
    with pytest.raises(ValueError, match="context differs between images"):
        top_group_bank(fake, images, 6, 3, False, torch.device("cpu"))


def _fit_messages(vae, vae_cfg, train_set, validation, **overrides) -> tuple[EVaLPTask, list[str]]:
    messages = []

    class Log(RunLogger):
        def info(self, message):
            messages.append(message)

    torch.manual_seed(0)
    task = EVaLPTask(_stage2_config(vae, sampler_affine="moments", moment_images=64, sampler_fit_images=64,
                                    sampler_fit_batch=32, **overrides),
                     vae, vae_cfg, CPU, validation, False, Log(".", False), 6, train_set)
    return task, messages


def _task_inputs(vae_checkpoint):
    """The trained test NVAE, its run config, and the synthetic training set and validation half."""
    vae, vae_cfg, _ = load_trained_nvae(vae_checkpoint, torch.device("cpu"))
    return vae, vae_cfg, get_dataset("synthetic", "train"), held_out_part(get_dataset("synthetic", "test"), "validation")


def _nll_pair(text: str) -> tuple[float, float]:
    before, after = (float(v) for v in text.split(" -> "))
    return before, after


def test_task_fits_the_top_group(vae_checkpoint):
    vae, vae_cfg, train_set, validation = _task_inputs(vae_checkpoint)
    task, messages = _fit_messages(vae, vae_cfg, train_set, validation, groups="top", sampler_fit_steps=30,
                                   sampler_ema=0.9, sampler_fit_heldout_images=0)
    assert "posterior samples of z_1 in 30 steps" in messages[-1]
    before, after = _nll_pair(messages[-1].split("NLL ")[1].split(" nats")[0])
    assert after < before, messages
    # Generation's moving average starts from the fitted sampler.
    for a, b in zip(task.sampler.state_dict().values(), task.generation_sampler().state_dict().values()):
        assert torch.equal(a, b)


def test_task_fits_every_group(vae_checkpoint):
    vae, vae_cfg, train_set, validation = _task_inputs(vae_checkpoint)
    assert len(vae.group_specs) > 1
    _, messages = _fit_messages(vae, vae_cfg, train_set, validation, groups="all", sampler_fit_steps=30,
                                sampler_fit_heldout_images=0)
    line = messages[-1]
    assert "kept step" not in line
    groups = list(range(len(vae.group_specs)))
    assert f"posterior samples of groups {', '.join(map(str, groups))} in 30 steps" in line, line
    per_group = dict(part.split(": ") for part in line.split(" nats (")[1].rstrip(")").split(", "))
    assert sorted(per_group) == [f"group {g}" for g in groups]
    pairs = [_nll_pair(v) for v in per_group.values()]
    total_before, total_after = _nll_pair(line.split("NLL ")[1].split(" nats")[0])
    assert total_before == pytest.approx(sum(b for b, _ in pairs), abs=0.02 * len(pairs))
    assert all(after < before for before, after in pairs), line


def test_task_early_stops_the_fit_on_validation_draws(vae_checkpoint):
    vae, vae_cfg, train_set, validation = _task_inputs(vae_checkpoint)
    task, messages = _fit_messages(vae, vae_cfg, train_set, validation, groups="all", sampler_fit_steps=30,
                                   sampler_fit_heldout_images=16, sampler_fit_check_every=10)
    stopped = messages[-1].split("; kept step ")[1]
    step, count = int(stopped.split(" ")[0]), int(stopped.split("NLL of ")[1].split(" ")[0])
    assert step in (0, 10, 20, 30) and count == min(16, len(validation))
    before, after = _nll_pair(stopped.split("draws: ")[1].split(" nats")[0])
    assert after <= before

    def nll(seed: int) -> float:
        banks = posterior_banks(vae, validation, task.groups, 16, task.cfg.batch_size, False, torch.device("cpu"), seed)
        with torch.no_grad():
            rows = [b.rows(torch.arange(count)) for b in banks]
            return sum(float(-task.sampler.log_prob(r.z_pos, r.mu_p, r.sigma_p, r.h, r.group).mean()) for r in rows)

    # the kept weights score what the log says on draws from the held-out stream, not the training bank's stream
    # (whose noise the training bank's rows share position by position)
    assert HELDOUT_BANK_SEED not in (BANK_SEED, MOMENT_SEED)  # the start's and the fit's draws stay unseen
    assert nll(HELDOUT_BANK_SEED) == pytest.approx(after, abs=0.01)
    assert nll(BANK_SEED) != pytest.approx(after, abs=0.01)
