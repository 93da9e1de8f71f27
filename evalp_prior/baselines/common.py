"""What the baseline priors share: typed settings, the frozen-NVAE training task, checkpoints, loading.

Both baselines (Langevin-MCMC energy prior, NCP) attach to the same frozen NVAE as EVaLP, with the same
EnergySet networks on the same groups, and train through the same run as EVaLP
(evalp_prior.train.train_frozen_prior over nvae.runtime.loop).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from nvae.config import NVAERunConfig
from nvae.hooks import PriorHook
from nvae.model import NVAE
from nvae.runtime import DistContext, Precision, RunLogger, StopSignal, all_gather_object, load_checkpoint
from nvae.data import binarize_if_needed
from nvae.runtime.distributed import ddp_if_distributed, split_for_rank
from nvae.sampling import sample_images

from ..config import FrozenPriorConfig
from ..energy import EnergySet
from ..group_selection import parse_groups
from ..metrics.mmd import prior_hole_mmds
from ..objectives import GroupBatch
from ..train import (embedded_vae_state, load_embedded_vae, lr_schedule, posterior_group_batches,
                     train_frozen_prior)


@dataclass
class BaselineConfig(FrozenPriorConfig):
    """The settings every prior on a frozen NVAE shares, and one optimiser's."""

    lr: float = 1e-4  # Adam learning rate of the energy or classifier networks
    adam_beta1: float = 0.9  # Adam's beta1
    adam_beta2: float = 0.999  # Adam's beta2


@dataclass
class BaselineRunConfig:
    """A baseline run: its settings (a BaselineConfig subclass) and the frozen NVAE it was trained on."""

    prior: BaselineConfig = field(default_factory=BaselineConfig)
    vae_path: str = ""
    vae_fingerprint: str = ""

    def to_json(self) -> str:
        """JSON of the settings, the NVAE path and its fingerprint."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

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
                 test_set: Dataset, binarize: bool, logger: RunLogger, total_steps: int,
                 train_set: Optional[Dataset] = None):  # train_set: EVaLP's signature; no baseline starts from data
        cfg = run_cfg.prior
        self.run_cfg, self.cfg, self.vae, self.vae_cfg = run_cfg, cfg, vae, vae_cfg
        self.ctx, self.test_set, self.binarize, self.logger = ctx, test_set, binarize, logger
        vae.eval().requires_grad_(False)
        self.groups, energies = build_energies(cfg, vae)
        self.energies = energies.to(ctx.device)
        self.energy_net = ddp_if_distributed(self.energies, ctx)
        self.optimizer = torch.optim.Adam(self.energies.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
        self.schedule = lr_schedule(self.optimizer, cfg.lr_schedule, total_steps)
        self.precision = Precision.create(cfg.precision, ctx.device)
        self.last_metrics: dict[str, float] = {}

    def config_json(self) -> str:
        """The run config stored in every checkpoint."""
        return self.run_cfg.to_json()

    def describe(self) -> str:
        """What is trained, for the run's first log line."""
        size = sum(p.numel() for p in self.energies.parameters())
        return f"{self.kind} prior on groups {self.groups}: {size / 1e3:.1f}k parameters"

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
        if self.schedule is not None:
            self.schedule.step()
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
            mmd = prior_hole_mmds(joined["pos"], {self.kind: joined["prior"], "gaussian": joined["base"]})
            for name in (self.kind, "gaussian"):
                metrics[f"mmd_{name}/group{g:02d}"] = mmd[name]["mmd2_multi"]
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
                "scaler": self.precision.scaler.state_dict(), "vae": embedded_vae_state(self.vae, self.vae_cfg),
                "schedule": None if self.schedule is None else self.schedule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict saved (the NVAE is the one the task was built with)."""
        self.energies.load_state_dict(state["energies"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.precision.scaler.load_state_dict(state["scaler"])
        if self.schedule is not None:
            self.schedule.load_state_dict(state["schedule"])


@dataclass
class TrainedBaseline:
    """A baseline checkpoint loaded for sampling: the frozen NVAE (eval mode) and the fitted networks."""

    kind: str
    vae: NVAE
    vae_cfg: NVAERunConfig
    run_cfg: BaselineRunConfig
    groups: list[int]
    energies: EnergySet


@dataclass(frozen=True)
class Baseline:
    """One baseline's entry points, from its checkpoint kind, task class and settings class."""

    kind: str
    task_cls: Callable[..., BaselineTask]
    config_cls: type

    def run_config(self, vae_path: str, fingerprint: str, **settings: Any) -> BaselineRunConfig:
        """A run config from keyword settings (fields of config_cls)."""
        return BaselineRunConfig(self.config_cls(**settings), vae_path, fingerprint)

    def train(self, run_cfg: BaselineRunConfig, vae: NVAE, vae_cfg: NVAERunConfig, ctx: DistContext, run_dir: Path,
              logger: RunLogger, resume: Optional[Path] = None, stop: Optional[StopSignal] = None) -> int:
        """Train the baseline to completion (or pre-emption); writes checkpoints, samples.png, final_metrics.json."""
        return train_frozen_prior(self.task_cls, run_cfg, run_cfg.prior, vae, vae_cfg, ctx, run_dir, logger, resume,
                                  stop)

    def load(self, path: Path, device: torch.device) -> TrainedBaseline:
        """Everything a checkpoint of this kind holds; the embedded NVAE must match its fingerprint."""
        payload = load_checkpoint(path, expected_kind=self.kind, map_location=device)
        run_cfg = BaselineRunConfig.from_json(payload["config"], self.config_cls)
        vae, vae_cfg = load_embedded_vae(payload, path, device, run_cfg.vae_fingerprint)
        groups, energies = build_energies(run_cfg.prior, vae)
        energies.load_state_dict(payload["task"]["energies"])
        return TrainedBaseline(self.kind, vae, vae_cfg, run_cfg, groups, energies.to(device).eval())
