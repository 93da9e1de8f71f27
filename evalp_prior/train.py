"""Stage 2: fit EVaLP energies and the shared sampler to a frozen NVAE's aggregate posterior."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset

from nvae.config import NVAERunConfig
from nvae.data import binarize_if_needed, dataset_info, get_dataset, held_out_part
from nvae.model import NVAE
from nvae.runtime import (CheckpointError, DistContext, Precision, RunLogger, StopSignal, all_gather_object,
                          forked_rng, load_checkpoint, save_text_atomic)
from nvae.runtime.distributed import ddp_if_distributed, split_for_rank
from nvae.runtime.loop import isolated_rng, loop_settings, planned_steps, run_training, steps_per_epoch
from nvae.sampling import sample_images
from nvae.trained import load_trained_nvae

from .config import EVaLPConfig, EVaLPRunConfig, FrozenPriorConfig
from .diagnostics import group_diagnostics, headline, summarise
from .energy import EnergySet
from .group_selection import parse_groups
from .objectives import GroupBatch, alternating_step
from .prior import EVaLPPrior
from .sampler import SharedFlowSampler
from .sampler_fit import HELDOUT_BANK_SEED, fit_sampler, image_batches, posterior_banks

KIND = "evalp"


def vae_fingerprint(model: NVAE) -> str:
    """SHA-256 of the NVAE's weights: identifies the frozen model a prior was fitted to."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def build_prior_modules(cfg: EVaLPConfig, vae: NVAE) -> tuple[list[int], EnergySet, SharedFlowSampler]:
    """The selected groups, their energies and the shared sampler (identity at initialisation)."""
    groups = parse_groups(cfg.groups, vae.group_specs)
    energies = EnergySet(vae.group_specs, groups, cfg.energy_hidden, cfg.share_energy_within_scale,
                         cfg.energy_spectral_norm, whiten=cfg.whiten_critic)
    sampler = SharedFlowSampler(vae.group_specs, groups, cfg.sampler_hidden, cfg.num_couplings, cfg.embed_dim,
                                cfg.max_log_scale, cfg.sampler_mixing, group_affine=cfg.sampler_affine != "none")
    return groups, energies, sampler


def lr_schedule(optimizer: torch.optim.Optimizer, kind: str, total_steps: int) -> Optional[LambdaLR]:
    """The optimiser's schedule for a run of total_steps (stepped once per training step), or None if constant."""
    if kind == "constant":
        return None
    if kind != "cosine":
        raise ValueError(f"unknown learning-rate schedule {kind!r}")
    return LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1))))


def sampler_average(sampler: SharedFlowSampler, decay: float) -> Optional[AveragedModel]:
    """An exponential moving average of the sampler's weights (torch's AveragedModel), or None when decay is 0."""
    if decay == 0:
        return None
    return AveragedModel(sampler, multi_avg_fn=get_ema_multi_avg_fn(decay))


def posterior_group_batches(vae: NVAE, x: torch.Tensor, groups: list[int], precision: Precision) -> list[GroupBatch]:
    """One frozen-VAE posterior pass: positives z_l and contexts h_l for every EVaLP group, in float32."""
    with torch.no_grad(), precision.autocast():
        out = vae.posterior(x)
    return [GroupBatch(g, out.groups[g].z.float(), out.groups[g].h.float(), out.groups[g].mu_p.float(),
                       out.groups[g].sigma_p.float()) for g in groups]


# Fixed seed of the posterior draws that start the sampler's affine layers: the same start on every rank, and
# again when a run resumes (the checkpoint then overwrites it), whatever the run's own seed.
MOMENT_SEED = 2_718_281


def shrunk_covariance(samples: torch.Tensor) -> torch.Tensor:
    """Ledoit-Wolf estimate (2004) of the covariance of samples (n, d): the sample covariance shrunk towards
    (its mean variance) x I by the coefficient that minimises the expected Frobenius error, estimated from the
    samples. Why not the sample covariance: a full d x d Gaussian fitted to n draws loses about d (d + 1) / (4 n)
    nats of held-out log-likelihood to estimation noise, 1.6 nats for `tiny`'s 256-dimensional lower groups from
    10,000 images, more than the fit gains there (measured: -1.2 and -1.6 nats against N(0, I), +0.1 and 0.0 with
    shrinkage; docs/results.md section 0e). Positive definite for any n >= 2, also where d >= n."""
    n, d = samples.shape
    x = samples.double() - samples.double().mean(0)
    sample_cov = x.T @ x / n  # the maximum-likelihood (1/n) normalisation the Ledoit-Wolf formula is stated for
    identity = torch.eye(d, dtype=torch.float64, device=x.device)
    mean_variance = sample_cov.diagonal().mean()
    distance = (sample_cov - mean_variance * identity).square().sum() / d
    # Mean squared distance of one sample's outer product from the sample covariance, / n: the noise term.
    noise = ((x.square().sum(1).square().sum() / n - sample_cov.square().sum()) / (n * d)).clamp(max=distance)
    shrinkage = noise / distance if distance > 0 else torch.ones((), dtype=torch.float64)
    return (1 - shrinkage) * sample_cov + shrinkage * mean_variance * identity


def whitened_posterior_moments(vae: NVAE, dataset: Dataset, groups: list[int], count: int, batch_size: int,
                               binarize: bool, precision: Precision,
                               device: torch.device) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per group, (mean (D,), covariance (D, D)) in float64 of the flattened u = (z_l - mu_p) / sigma_p over one
    posterior sample of each of the first ``count`` images of dataset (all of them when it holds fewer): the
    whitened aggregate posterior's Gaussian fit, which ``SharedFlowSampler.set_group_moments`` starts the
    sampler at. The covariance is the Ledoit-Wolf shrinkage estimate (shrunk_covariance)."""
    count = min(count, len(dataset))
    if count < 2:
        raise ValueError(f"the posterior moments need at least 2 training images, got {count}")
    parts: dict[int, list[torch.Tensor]] = {g: [] for g in groups}
    with forked_rng(device, MOMENT_SEED):
        for batch in image_batches(dataset, count, batch_size, device):
            for b in posterior_group_batches(vae, binarize_if_needed(batch, binarize), groups, precision):
                parts[b.group].append(((b.z_pos - b.mu_p) / b.sigma_p).flatten(1).double().cpu())
    moments = {}
    for g, draws in parts.items():
        u = torch.cat(draws)
        moments[g] = (u.mean(0), shrunk_covariance(u))
    return moments


def embedded_vae_state(vae: NVAE, vae_cfg: NVAERunConfig) -> dict[str, Any]:
    """The frozen NVAE's config and weights, stored in a prior's checkpoint so that it samples on its own."""
    return {"config": vae_cfg.to_json(), "model": vae.state_dict()}


def load_embedded_vae(payload: dict[str, Any], path: Path, device: torch.device,
                      fingerprint: str) -> tuple[NVAE, NVAERunConfig]:
    """The NVAE a prior checkpoint embeds (see embedded_vae_state), in eval mode; it must match the
    fingerprint recorded at training time."""
    vae_cfg = NVAERunConfig.from_json(payload["task"]["vae"]["config"])
    vae = NVAE(vae_cfg.model).to(device)
    vae.load_state_dict(payload["task"]["vae"]["model"])
    vae.eval()
    if vae_fingerprint(vae) != fingerprint:
        raise CheckpointError(f"{path}: the embedded NVAE does not match the fingerprint recorded at training time")
    return vae, vae_cfg


class EVaLPTask:
    """The alternating energy / sampler optimisation on a frozen NVAE."""

    kind = KIND

    def __init__(self, run_cfg: EVaLPRunConfig, vae: NVAE, vae_cfg: NVAERunConfig, ctx: DistContext,
                 test_set: Dataset, binarize: bool, logger: RunLogger, total_steps: int,
                 train_set: Optional[Dataset] = None):
        cfg = run_cfg.evalp
        self.run_cfg, self.cfg, self.vae, self.vae_cfg = run_cfg, cfg, vae, vae_cfg
        self.ctx, self.test_set, self.binarize, self.logger = ctx, test_set, binarize, logger
        vae.eval().requires_grad_(False)
        self.groups, energies, sampler = build_prior_modules(cfg, vae)
        self.energies, self.sampler = energies.to(ctx.device), sampler.to(ctx.device)
        # One scaler per optimiser: each backward pass has its own loss scale under fp16.
        self.energy_prec = Precision.create(cfg.precision, ctx.device)
        self.sampler_prec = Precision.create(cfg.precision, ctx.device)
        if cfg.sampler_affine == "moments":  # before the moving average and DDP copy the sampler
            if train_set is None:
                raise ValueError("--sampler-affine moments needs the training split to start from")
            moments = whitened_posterior_moments(vae, train_set, self.groups, cfg.moment_images, cfg.batch_size,
                                                 binarize, self.energy_prec, ctx.device)
            for g, (mean, covariance) in moments.items():
                self.sampler.set_group_moments(g, mean, covariance)
        if cfg.sampler_fit_steps:  # also before the moving average and DDP (which broadcasts rank 0's weights)
            self._fit_sampler(train_set)
        if cfg.compile:  # not the energies: their gradient penalty differentiates twice, which compiling cannot
            self.sampler.compile_couplings()
        # Separate DDP modules: the energy and the sampler have separate backward passes.
        self.energy_net = ddp_if_distributed(self.energies, ctx)
        self.sampler_net = ddp_if_distributed(self.sampler, ctx)
        self.sampler_ema = sampler_average(self.sampler, cfg.sampler_ema)
        betas = (cfg.adam_beta1, cfg.adam_beta2)
        self.energy_opt = torch.optim.Adam(self.energies.parameters(), lr=cfg.lr_energy, betas=betas)
        self.sampler_opt = torch.optim.Adam(self.sampler.parameters(), lr=cfg.lr_sampler, betas=betas)
        self.schedules = [lr_schedule(opt, cfg.lr_schedule, total_steps) for opt in (self.energy_opt, self.sampler_opt)]
        self.objective = cfg.objective()
        self.last_metrics: dict[str, float] = {}

    def _fit_sampler(self, train_set: Optional[Dataset]) -> None:
        """The maximum-likelihood start (evalp_prior.sampler_fit) on every EVaLP group, early-stopped on posterior
        draws of validation-half images, logged with the banks' NLL before and after."""
        cfg = self.cfg
        if train_set is None:
            raise ValueError("--sampler-fit-steps needs the training split to fit to")
        banks = posterior_banks(self.vae, train_set, self.groups, cfg.sampler_fit_images, cfg.batch_size,
                                self.binarize, self.ctx.device)
        held_out = (posterior_banks(self.vae, self.test_set, self.groups, cfg.sampler_fit_heldout_images,
                                    cfg.batch_size, self.binarize, self.ctx.device, HELDOUT_BANK_SEED)
                    if cfg.sampler_fit_heldout_images else [])
        fit = fit_sampler(self.sampler, banks, cfg.sampler_fit_steps, cfg.sampler_fit_batch, cfg.sampler_fit_lr,
                          held_out, cfg.sampler_fit_check_every)
        what = "z_1" if self.groups == [0] else "groups " + ", ".join(str(g) for g in self.groups)

        def change(key: str) -> str:
            per_group = "" if len(self.groups) == 1 else " (" + ", ".join(
                f"group {g}: {fit[f'{key}_before/group{g:02d}']:.2f} -> {fit[f'{key}_after/group{g:02d}']:.2f}"
                for g in self.groups) + ")"
            return f"{fit[f'{key}_before']:.2f} -> {fit[f'{key}_after']:.2f} nats{per_group}"

        stopped = (f"; kept step {fit['best_step']} of {cfg.sampler_fit_steps} by the NLL of "
                   f"{held_out[0].z.shape[0]} validation-half images' draws: {change('heldout_nll')}"
                   if held_out else "")
        self.logger.info(f"sampler fitted to {banks[0].z.shape[0]} posterior samples of {what} in "
                         f"{cfg.sampler_fit_steps} steps: NLL {change('nll')}{stopped}")

    def config_json(self) -> str:
        return self.run_cfg.to_json()

    def describe(self) -> str:
        """What is trained, for the run's first log line."""
        sizes = [sum(p.numel() for p in m.parameters()) for m in (self.energies, self.sampler)]
        return (f"EVaLP on groups {self.groups}: energies {sizes[0] / 1e3:.1f}k, "
                f"sampler {sizes[1] / 1e3:.1f}k parameters")

    def generation_sampler(self) -> SharedFlowSampler:
        """The sampler generation uses: the weights' moving average when one is kept, else the sampler."""
        return self.sampler if self.sampler_ema is None else self.sampler_ema.module

    def prior(self, **sir: Any) -> EVaLPPrior:
        """The trained prior as a sampling hook (optionally with SIR)."""
        return EVaLPPrior(self.energies, self.generation_sampler(), self.groups, **sir)

    def _backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, params) -> bool:
        prec = self.energy_prec if optimizer is self.energy_opt else self.sampler_prec
        optimizer.zero_grad(set_to_none=True)
        # An infinite clip threshold only measures the norm: that is how non-finite steps are caught.
        return prec.backward_and_step(loss, optimizer, params, max_grad_norm=float("inf"))

    def train_step(self, batch: torch.Tensor, step: int) -> Optional[dict[str, torch.Tensor]]:
        x = binarize_if_needed(batch, self.binarize)
        return self.step_on(posterior_group_batches(self.vae, x, self.groups, self.energy_prec), step)

    def step_on(self, group_batches: list[GroupBatch], step: int) -> Optional[dict[str, torch.Tensor]]:
        """One alternating step on given positives and contexts (train_step's after its posterior pass; also
        benchmarks/game_on_bank.py's, on banked posterior samples); None when a step was non-finite."""
        self.energies.train()
        self.sampler.train()
        stats = alternating_step(group_batches, self.energy_net, self.sampler_net, self.energy_opt, self.sampler_opt,
                                 step, self.objective, self.energy_prec.autocast, self._backward_and_step,
                                 frozen_energies=self.energies, gp_grad_scale=self.energy_prec.loss_scale())
        if not bool(stats["energy_step_taken"]) or not bool(stats.get("sampler_step_taken", 1.0)):
            return None
        if self.sampler_ema is not None and "sampler_step_taken" in stats:
            self.sampler_ema.update_parameters(self.sampler)
        for schedule in filter(None, self.schedules):
            schedule.step()
        return stats

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Per-group diagnostics (evalp_prior.diagnostics) on the validation split's posteriors: energy gap,
        penalty, gradient norms, KL(q_alpha || p0), MMD^2 of the sampler and of NVAE's prior, SIR's ESS."""
        self.energies.eval()
        self.sampler.eval()
        cfg = self.cfg
        sampler = self.generation_sampler()
        subset = split_for_rank(self.test_set, self.ctx, cfg.eval_batches * cfg.batch_size * self.ctx.world_size)
        parts: dict[int, dict[str, list[torch.Tensor]]] = {g: {} for g in self.groups}
        for batch in DataLoader(subset, batch_size=cfg.batch_size):
            x = binarize_if_needed(batch.to(self.ctx.device), self.binarize)
            for b in posterior_group_batches(self.vae, x, self.groups, self.energy_prec):
                sir = (self.prior(sir_proposals=cfg.eval_sir_proposals, sir_groups=[b.group])
                       if cfg.eval_sir_proposals > 1 else None)
                for key, value in group_diagnostics(self.energies, sampler, b, cfg.gradient_penalty, sir).items():
                    parts[b.group].setdefault(key, []).append(value)
        gathered = all_gather_object(parts, self.ctx)
        metrics: dict[str, float] = {}
        for g in self.groups:
            pooled = {key: torch.cat([t for part in gathered for t in part[g][key]]) for key in parts[g]}
            metrics.update(summarise(pooled, g))
        metrics.update(headline(metrics, self.groups))
        if self.ctx.is_main:
            images = sample_images(self.vae, 64, cfg.sample_temperature, self.prior())
            self.logger.images("samples_evalp", images, step, png_path=f"samples/step_{step:08d}.png")
        self.last_metrics = metrics
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"energies": self.energies.state_dict(), "sampler": self.sampler.state_dict(),
                "energy_opt": self.energy_opt.state_dict(), "sampler_opt": self.sampler_opt.state_dict(),
                "energy_scaler": self.energy_prec.scaler.state_dict(),
                "sampler_scaler": self.sampler_prec.scaler.state_dict(),
                "sampler_ema": None if self.sampler_ema is None else self.sampler_ema.state_dict(),
                "schedules": [None if s is None else s.state_dict() for s in self.schedules],
                "vae": embedded_vae_state(self.vae, self.vae_cfg)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.energies.load_state_dict(state["energies"])
        self.sampler.load_state_dict(state["sampler"])
        self.energy_opt.load_state_dict(state["energy_opt"])
        self.sampler_opt.load_state_dict(state["sampler_opt"])
        self.energy_prec.scaler.load_state_dict(state["energy_scaler"])
        self.sampler_prec.scaler.load_state_dict(state["sampler_scaler"])
        if self.sampler_ema is not None:
            self.sampler_ema.load_state_dict(state["sampler_ema"])
        for schedule, saved in zip(self.schedules, state["schedules"]):
            if schedule is not None:
                schedule.load_state_dict(saved)


def train_frozen_prior(task_cls: Callable[..., Any], run_cfg: Any, cfg: FrozenPriorConfig, vae: NVAE,
                       vae_cfg: NVAERunConfig, ctx: DistContext, run_dir: Path, logger: RunLogger,
                       resume: Optional[Path] = None, stop: Optional[StopSignal] = None) -> int:
    """Train a prior on a frozen NVAE (EVaLP or a baseline) with the shared loop, to completion or pre-emption;
    writes checkpoints, samples.png and final_metrics.json.

    ``task_cls(run_cfg, vae, vae_cfg, ctx, test_set, binarize, logger, total_steps, train_set)`` builds the task (with ``describe``,
    ``prior`` and ``last_metrics`` beyond the loop's TrainTask); ``cfg`` is run_cfg's prior settings.
    """
    tc = vae_cfg.train
    root = cfg.data_root if cfg.data_root is not None else tc.data_root  # the data may have moved since stage 1
    info = dataset_info(tc.dataset, root)
    train_set = get_dataset(tc.dataset, "train", root)
    # Diagnostics during training (and any choice made from them) use the validation half of the test split.
    test_set = held_out_part(get_dataset(tc.dataset, "test", root), "validation")
    per_epoch = steps_per_epoch(len(train_set), ctx.world_size, cfg.batch_size)
    total_steps = planned_steps(cfg, per_epoch)
    if cfg.compile:
        vae.compile_cells()
    task = task_cls(run_cfg, vae, vae_cfg, ctx, test_set, info.binarize, logger, total_steps, train_set)
    logger.info(f"{task.describe()}; {total_steps} steps on {ctx.world_size} process(es), {cfg.precision}")
    status = run_training(task, train_set, ctx, loop_settings(cfg, total_steps), run_dir, logger, resume, stop)
    if status == 0 and ctx.is_main:
        with isolated_rng(ctx):
            images = sample_images(vae, 64, cfg.sample_temperature, task.prior(), bn_batches=cfg.bn_readjust_batches)
        logger.images("final_samples", images, total_steps, png_path="samples.png")
        summary = json.dumps(task.last_metrics, indent=2, sort_keys=True) + "\n"
        save_text_atomic(run_dir / "final_metrics.json", summary)
        logger.info(f"wrote {run_dir / 'samples.png'} and {run_dir / 'final_metrics.json'}")
        logger.info(comparison_line(task.kind, task.last_metrics))
    return status


def comparison_line(kind: str, metrics: dict[str, float]) -> str:
    """The run's verdict in one line: the prior's top-group MMD^2 against NVAE's Gaussian prior's, on the
    same validation posteriors and kernel (with standard errors where measured)."""
    def value(name: str) -> str:
        error = metrics.get(f"{name}_top_stderr")
        return f"{metrics[f'{name}_top']:.4g}" + (f" +- {error:.2g}" if error is not None else "")

    ratio = metrics[f"mmd_{kind}_top"] / metrics["mmd_gaussian_top"] if metrics["mmd_gaussian_top"] > 0 else float("nan")
    line = (f"top-group prior-hole MMD^2 (validation): {kind} {value(f'mmd_{kind}')}, "
            f"Gaussian prior {value('mmd_gaussian')} ({ratio:.2f}x)")
    if "energy_gap_max" in metrics:
        line += f"; energy gap per group at most {metrics['energy_gap_max']:.3g} (negative: the critic separates)"
    return line


def train_evalp(run_cfg: EVaLPRunConfig, vae: NVAE, vae_cfg: NVAERunConfig, ctx: DistContext, run_dir: Path,
                logger: RunLogger, resume: Optional[Path] = None, stop: Optional[StopSignal] = None) -> int:
    """Run stage 2 to completion (or pre-emption); writes checkpoints, samples.png and final_metrics.json."""
    return train_frozen_prior(EVaLPTask, run_cfg, run_cfg.evalp, vae, vae_cfg, ctx, run_dir, logger, resume, stop)


def load_vae_for_stage2(path: Path, device: torch.device) -> tuple[NVAE, NVAERunConfig, str]:
    """The frozen NVAE from a stage-1 checkpoint, with its fingerprint."""
    vae, vae_cfg, _ = load_trained_nvae(path, device)
    return vae, vae_cfg, vae_fingerprint(vae)


@dataclass
class TrainedEVaLP:
    """A stage-2 checkpoint loaded for sampling: the frozen NVAE (eval mode) and the fitted prior."""

    vae: NVAE
    vae_cfg: NVAERunConfig
    run_cfg: EVaLPRunConfig
    groups: list[int]
    energies: EnergySet
    sampler: SharedFlowSampler

    def prior(self, **sir: Any) -> EVaLPPrior:
        """The prior hook; keyword arguments configure SIR (see EVaLPPrior)."""
        return EVaLPPrior(self.energies, self.sampler, self.groups, **sir)


def load_evalp(path: Path, device: torch.device) -> TrainedEVaLP:
    """Everything a stage-2 checkpoint holds, ready to sample."""
    payload = load_checkpoint(path, expected_kind=KIND, map_location=device)
    run_cfg = EVaLPRunConfig.from_json(payload["config"])
    vae, vae_cfg = load_embedded_vae(payload, path, device, run_cfg.vae_fingerprint)
    groups, energies, sampler = build_prior_modules(run_cfg.evalp, vae)
    energies.load_state_dict(payload["task"]["energies"])
    sampler.load_state_dict(payload["task"]["sampler"])
    ema = sampler_average(sampler, run_cfg.evalp.sampler_ema)
    if ema is not None:  # generation uses the moving average of the weights
        ema.load_state_dict(payload["task"]["sampler_ema"])
        sampler = ema.module
    return TrainedEVaLP(vae, vae_cfg, run_cfg, groups, energies.to(device).eval(), sampler.to(device).eval())


__all__ = ["EVaLPTask", "TrainedEVaLP", "build_prior_modules", "ddp_if_distributed", "embedded_vae_state",
           "load_embedded_vae", "load_evalp", "load_vae_for_stage2", "train_evalp", "train_frozen_prior",
           "vae_fingerprint"]
