"""What the baseline priors share: typed settings, the frozen-NVAE training task, checkpoints, loading.

Both baselines (Langevin-MCMC energy prior, NCP) attach to the same frozen NVAE as EVaLP, with the same
EnergySet networks on the same groups, and train through the shared loop (nvae.runtime.loop).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from nvae.config import NVAERunConfig
from nvae.data import dataset_info, get_dataset
from nvae.hooks import PriorHook
from nvae.model import NVAE
from nvae.runtime import (CheckpointError, DistContext, Precision, RunLogger, StopSignal, all_gather_object,
                          load_checkpoint)
from nvae.runtime.loop import isolated_rng, loop_settings, planned_steps, run_training, steps_per_epoch
from nvae.train import binarize_if_needed, sample_images, split_for_rank

from ..energy import EnergySet
from ..groups import parse_groups
from ..metrics.mmd import posterior_bandwidth, prior_hole_mmd
from ..objectives import GroupBatch
from ..train import posterior_group_batches, save_text_atomic, vae_fingerprint


@dataclass
class BaselineConfig:
    """Settings every baseline shares: which groups, the energy networks, optimisation and cadence."""

    groups: str = "all"  # all | top | comma-separated group indices (as EVaLP's --groups)
    energy_hidden: int = 64
    share_energy_within_scale: bool = False
    energy_spectral_norm: bool = False
    lr: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    batch_size: int = 64  # per process
    epochs: int = 1
    max_steps: int = 0  # >0 caps the run
    precision: str = "fp32"
    seed: int = 0
    num_workers: int = 0
    log_every: int = 50
    eval_every: int = 0  # steps; 0 = every epoch end
    eval_batches: int = 10
    ckpt_every: int = 500
    keep_checkpoints: int = 3
    max_bad_steps: int = 20
    sample_temperature: float = 1.0
    bn_readjust_batches: int = 20


@dataclass
class BaselineRunConfig:
    """A baseline run: its settings (a BaselineConfig subclass) and the frozen NVAE it was trained on."""

    prior: BaselineConfig = field(default_factory=BaselineConfig)
    vae_path: str = ""
    vae_fingerprint: str = ""

    def to_json(self) -> str:
        """JSON of the settings, the NVAE path and its fingerprint."""
        return json.dumps({"prior": dataclasses.asdict(self.prior), "vae_path": self.vae_path,
                           "vae_fingerprint": self.vae_fingerprint}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, config_cls: type) -> "BaselineRunConfig":
        """Inverse of to_json, with the settings read as config_cls (LangevinConfig or NCPConfig)."""
        data: dict[str, Any] = json.loads(text)
        return cls(prior=config_cls(**data["prior"]), vae_path=data["vae_path"], vae_fingerprint=data["vae_fingerprint"])


def build_energies(cfg: BaselineConfig, vae: NVAE) -> tuple[list[int], EnergySet]:
    """The selected groups and their networks (EVaLP's EnergySet: the same architecture for every prior)."""
    groups = parse_groups(cfg.groups, vae.group_specs)
    return groups, EnergySet(vae.group_specs, groups, cfg.energy_hidden, cfg.share_energy_within_scale,
                             cfg.energy_spectral_norm)


class BaselineTask:
    """The shared loop's TrainTask for a baseline: one network per group, one optimiser, a frozen NVAE.

    Subclasses set ``kind`` and implement ``loss`` (the objective over all groups of one posterior pass),
    ``prior`` (the trained sampling hook) and ``eval_group`` (their diagnostics on test posteriors).
    """

    kind = "baseline"

    def __init__(self, run_cfg: BaselineRunConfig, vae: NVAE, vae_cfg: NVAERunConfig, ctx: DistContext,
                 test_set: Dataset, binarize: bool, logger: RunLogger):
        cfg = run_cfg.prior
        self.run_cfg, self.cfg, self.vae, self.vae_cfg = run_cfg, cfg, vae, vae_cfg
        self.ctx, self.test_set, self.binarize, self.logger = ctx, test_set, binarize, logger
        vae.eval().requires_grad_(False)
        self.groups, energies = build_energies(cfg, vae)
        self.energies = energies.to(ctx.device)
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        self.energy_net = DistributedDataParallel(self.energies, device_ids=ids) if ctx.is_distributed else self.energies
        self.optimizer = torch.optim.Adam(self.energies.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
        self.precision = Precision.create(cfg.precision, ctx.device)
        self.last_metrics: dict[str, float] = {}

    def config_json(self) -> str:
        """The run config stored in every checkpoint."""
        return self.run_cfg.to_json()

    def loss(self, batches: list[GroupBatch]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The objective summed over groups and detached per-group stats."""
        raise NotImplementedError

    def prior(self) -> PriorHook:
        """The trained prior as a sampling hook with the run's generation settings."""
        raise NotImplementedError

    def eval_group(self, b: GroupBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(prior draws like b.z_pos given b's context, per-sample diagnostics (B,)) for one group."""
        raise NotImplementedError

    def train_step(self, batch: torch.Tensor, step: int) -> Optional[dict[str, torch.Tensor]]:
        """One optimiser step on one posterior pass of the frozen NVAE; None when it was non-finite."""
        self.energies.train()
        x = binarize_if_needed(batch, self.binarize)
        group_batches = posterior_group_batches(self.vae, x, self.groups, self.precision)
        loss, stats = self.loss(group_batches)
        self.optimizer.zero_grad(set_to_none=True)
        # An infinite clip threshold only measures the norm: that is how non-finite steps are caught.
        if not self.precision.backward_and_step(loss, self.optimizer, list(self.energies.parameters()),
                                                max_grad_norm=float("inf")):
            return None
        stats["loss"] = loss.detach()
        return stats

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Per group on a test slice: the subclass diagnostics, and MMD of the prior's and NVAE's draws to
        the posterior (one kernel per group, set by the posterior samples alone)."""
        self.energies.eval()
        cfg = self.cfg
        subset = split_for_rank(self.test_set, self.ctx, cfg.eval_batches * cfg.batch_size * self.ctx.world_size)
        store: dict[str, dict[int, list[torch.Tensor]]] = {}
        for batch in DataLoader(subset, batch_size=cfg.batch_size):
            x = binarize_if_needed(batch.to(self.ctx.device), self.binarize)
            for b in posterior_group_batches(self.vae, x, self.groups, self.precision):
                z_prior, diagnostics = self.eval_group(b)
                z_base = b.mu_p + b.sigma_p * torch.randn_like(b.mu_p)
                values = {"pos": b.z_pos.flatten(1), "prior": z_prior.flatten(1), "base": z_base.flatten(1),
                          **diagnostics}
                for name, value in values.items():
                    store.setdefault(name, {g: [] for g in self.groups})[b.group].append(value.cpu())
        gathered = all_gather_object(store, self.ctx)
        metrics: dict[str, float] = {}
        for g in self.groups:
            joined = {name: torch.cat([t for part in gathered for t in part[name][g]]) for name in store}
            bandwidth = float(posterior_bandwidth(joined["pos"]))
            metrics[f"mmd_{self.kind}/group{g:02d}"] = prior_hole_mmd(joined["pos"], joined["prior"], bandwidth)["mmd2_multi"]
            metrics[f"mmd_gaussian/group{g:02d}"] = prior_hole_mmd(joined["pos"], joined["base"], bandwidth)["mmd2_multi"]
            for name, value in joined.items():
                if name not in ("pos", "prior", "base"):
                    metrics[f"{name}/group{g:02d}"] = float(value.float().mean())
        top = self.groups[0]
        metrics[f"mmd_{self.kind}_top"] = metrics[f"mmd_{self.kind}/group{top:02d}"]
        metrics["mmd_gaussian_top"] = metrics[f"mmd_gaussian/group{top:02d}"]
        if self.ctx.is_main:
            images = sample_images(self.vae, 64, cfg.sample_temperature, self.prior())
            self.logger.images(f"samples_{self.kind}", images, step, png_path=f"samples/step_{step:08d}.png")
        self.last_metrics = metrics
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """Networks, optimiser, scaler, and the frozen NVAE (config and weights)."""
        return {"energies": self.energies.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.precision.scaler.state_dict(),
                # The frozen NVAE travels with the prior (as in a stage-2 checkpoint), so it samples on its own.
                "vae": {"config": self.vae_cfg.to_json(), "model": self.vae.state_dict()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict saved (the NVAE is the one the task was built with)."""
        self.energies.load_state_dict(state["energies"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.precision.scaler.load_state_dict(state["scaler"])


def train_baseline(task_cls: type, run_cfg: BaselineRunConfig, vae: NVAE, vae_cfg: NVAERunConfig, ctx: DistContext,
                   run_dir: Path, logger: RunLogger, resume: Optional[Path] = None,
                   stop: Optional[StopSignal] = None) -> int:
    """Train a baseline prior to completion (or pre-emption); writes checkpoints, samples.png, final_metrics.json."""
    cfg, tc = run_cfg.prior, vae_cfg.train
    info = dataset_info(tc.dataset, tc.data_root)
    train_set = get_dataset(tc.dataset, "train", tc.data_root)
    test_set = get_dataset(tc.dataset, "test", tc.data_root)
    per_epoch = steps_per_epoch(len(train_set), ctx.world_size, cfg.batch_size)
    total_steps = planned_steps(cfg, per_epoch)
    task = task_cls(run_cfg, vae, vae_cfg, ctx, test_set, info.binarize, logger)
    size = sum(p.numel() for p in task.energies.parameters())
    logger.info(f"{task.kind} prior on groups {task.groups}: {size / 1e3:.1f}k parameters; {total_steps} steps "
                f"on {ctx.world_size} process(es), {cfg.precision}")
    status = run_training(task, train_set, ctx, loop_settings(cfg, total_steps), run_dir, logger, resume, stop)
    if status == 0 and ctx.is_main:
        with isolated_rng(ctx):
            images = sample_images(vae, 64, cfg.sample_temperature, task.prior(), bn_batches=cfg.bn_readjust_batches)
        logger.images("final_samples", images, total_steps, png_path="samples.png")
        save_text_atomic(run_dir / "final_metrics.json", json.dumps(task.last_metrics, indent=2, sort_keys=True) + "\n")
        logger.info(f"wrote {run_dir / 'samples.png'} and {run_dir / 'final_metrics.json'}")
    return status


@dataclass
class TrainedBaseline:
    """A baseline checkpoint loaded for sampling: the frozen NVAE (eval mode) and the fitted networks."""

    kind: str
    vae: NVAE
    vae_cfg: NVAERunConfig
    run_cfg: BaselineRunConfig
    groups: list[int]
    energies: EnergySet


def load_baseline(path: Path, device: torch.device, kind: str, config_cls: type) -> TrainedBaseline:
    """Everything a baseline checkpoint of ``kind`` holds; the embedded NVAE must match its fingerprint."""
    payload = load_checkpoint(path, expected_kind=kind, map_location=device)
    run_cfg = BaselineRunConfig.from_json(payload["config"], config_cls)
    vae_cfg = NVAERunConfig.from_json(payload["task"]["vae"]["config"])
    vae = NVAE(vae_cfg.model).to(device)
    vae.load_state_dict(payload["task"]["vae"]["model"])
    vae.eval()
    if vae_fingerprint(vae) != run_cfg.vae_fingerprint:
        raise CheckpointError(f"{path}: the embedded NVAE does not match the fingerprint recorded at training time")
    groups, energies = build_energies(run_cfg.prior, vae)
    energies.load_state_dict(payload["task"]["energies"])
    return TrainedBaseline(kind, vae, vae_cfg, run_cfg, groups, energies.to(device).eval())
