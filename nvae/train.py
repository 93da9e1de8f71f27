"""Stage 1: train NVAE with its Gaussian priors (the task run by the shared training loop)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch.utils.data import Dataset

from .cells import set_activation_checkpointing
from .config import ModelConfig, NVAERunConfig
from .data import DatasetInfo, binarize_if_needed, dataset_info, get_dataset
from .losses import SpectralRegularizer, balanced_kl, batchnorm_regularizer, kl_balance_alphas, kl_coefficient
from .model import NVAE
from .sampling import sample_images
from .optim import build_optimizer, warmup_cosine
from .runtime import (DistContext, Precision, RunLogger, StopSignal, all_reduce_sum,
                      load_checkpoint)
from .runtime.checkpoint import check_resume
from .runtime.distributed import ddp_if_distributed, split_for_rank
from .runtime.loop import isolated_rng, loop_settings, planned_steps, run_training, steps_per_epoch

ACTIVE_UNIT_THRESHOLD = 0.01  # a latent dimension is active if Var_x E[z|x] exceeds this (Burda et al.)


def model_config_for_dataset(model: ModelConfig, info: DatasetInfo, user_model: Mapping[str, Any]) -> ModelConfig:
    """Image shape and likelihood follow the data set unless the user set them explicitly."""
    fitted = dict(in_channels=info.in_channels, image_size=info.image_size, loss_crop=info.loss_crop,
                  output_dist=info.default_output)
    fitted.update({k: v for k, v in user_model.items() if k in fitted})
    return dataclasses.replace(model, **fitted)


class NVAETask:
    """One NVAE optimisation step with KL warm-up/balancing and the spectral and BN regularisers."""

    kind = "nvae"

    def __init__(self, run_cfg: NVAERunConfig, ctx: DistContext, precision: Precision, total_steps: int,
                 per_epoch: int, test_set: Dataset, binarize: bool, logger: RunLogger):
        self.cfg, self.ctx, self.precision, self.logger = run_cfg, ctx, precision, logger
        self.total_steps, self.binarize, self.test_set = total_steps, binarize, test_set
        model = NVAE(run_cfg.model).to(ctx.device)
        if run_cfg.train.sync_bn and ctx.is_distributed and ctx.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if run_cfg.train.checkpoint_activations:
            set_activation_checkpointing(model, True)
        if run_cfg.train.compile:
            model.compile_cells()
        self.model = model
        self.net = ddp_if_distributed(model, ctx)
        tc = run_cfg.train
        self.spectral = SpectralRegularizer(model, tc.num_power_iter).to(ctx.device)
        self.alphas = kl_balance_alphas(model.group_specs).to(ctx.device)
        self.optimizer = build_optimizer(model.parameters(), tc)
        # Running statistics a non-finite forward pass would poison; restored when its step is skipped.
        self.bn_buffers = [b for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                           for b in m.buffers()]
        self.bn_snapshot = [torch.empty_like(b) for b in self.bn_buffers]
        self.scheduler = warmup_cosine(self.optimizer, int(tc.warmup_epochs * per_epoch), total_steps, tc.lr_min)

    def config_json(self) -> str:
        return self.cfg.to_json()

    def loss(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The stage-1 objective on one batch and its parts (detached)."""
        tc = self.cfg.train
        kl_coeff = kl_coefficient(step, self.total_steps, tc.kl_anneal_portion, tc.kl_const_portion, tc.kl_min_coeff,
                                  tc.kl_weight)
        with self.precision.autocast():
            out = self.net(x)
            recon = self.model.reconstruction_nll(out.logits, x)
            kls = self.model.kl_per_group(out)
        weighted_kl, _ = balanced_kl(kls, kl_coeff, self.alphas, tc.kl_balance, tc.kl_weight)
        spectral = self.spectral()
        bn_reg = batchnorm_regularizer(self.model)
        loss = (recon + weighted_kl).mean() + tc.weight_decay_norm * (spectral + bn_reg)
        kl_all = torch.stack(kls, dim=1).detach()  # (B, L)
        parts = {"loss": loss.detach(), "nelbo": (recon.detach() + kl_all.sum(1)).mean(), "recon": recon.detach().mean(),
                 "kl": kl_all.sum(1).mean(), "kl_coeff": torch.tensor(kl_coeff), "spectral": spectral.detach(),
                 "bn_reg": bn_reg.detach()}
        parts.update({f"kl_group/{i:02d}": v for i, v in enumerate(kl_all.mean(0))})
        return loss, parts

    def train_step(self, batch: torch.Tensor, step: int) -> Optional[dict[str, torch.Tensor]]:
        self.net.train()
        x = binarize_if_needed(batch, self.binarize)
        torch._foreach_copy_(self.bn_snapshot, self.bn_buffers)  # one fused copy, no allocation per buffer
        loss, parts = self.loss(x, step)
        self.optimizer.zero_grad(set_to_none=True)
        # An infinite clip threshold still computes the norm, which is how non-finite steps are caught.
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        took_step = self.precision.backward_and_step(loss, self.optimizer, max_grad_norm=clip)
        parts["lr"] = torch.tensor(self.optimizer.param_groups[0]["lr"])
        self.scheduler.step()
        if not took_step:
            with torch.no_grad():
                torch._foreach_copy_(self.bn_buffers, self.bn_snapshot)
            return None
        parts["grad_norm"] = self.precision.last_grad_norm.detach()
        return parts

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Negative ELBO (nats per image, full KL) and active units on a slice of the test split."""
        self.model.eval()
        tc = self.cfg.train
        subset = split_for_rank(self.test_set, self.ctx, tc.eval_batches * tc.batch_size * self.ctx.world_size)
        loader = torch.utils.data.DataLoader(subset, batch_size=tc.batch_size)
        totals = torch.zeros(3, device=self.ctx.device, dtype=torch.float64)  # nelbo sum, recon sum, count
        mu_sums = [torch.zeros(2, *s.shape, device=self.ctx.device, dtype=torch.float64) for s in self.model.group_specs]
        for batch in loader:
            x = binarize_if_needed(batch.to(self.ctx.device), self.binarize)
            with self.precision.autocast():
                out = self.model(x)
                recon = self.model.reconstruction_nll(out.logits, x)
                kl = torch.stack(self.model.kl_per_group(out), 1).sum(1)
            totals += torch.stack([(recon + kl).sum().double(), recon.sum().double(),
                                   torch.tensor(float(x.shape[0]), device=self.ctx.device, dtype=torch.float64)])
            for acc, st in zip(mu_sums, out.groups):
                mu = st.mu_q.double()
                acc[0] += mu.sum(0)
                acc[1] += (mu * mu).sum(0)
        all_reduce_sum(totals, self.ctx)
        count = totals[2].clamp(min=1)
        metrics = {"nelbo": (totals[0] / count).item(), "recon": (totals[1] / count).item()}
        active = 0
        for i, acc in enumerate(mu_sums):
            all_reduce_sum(acc, self.ctx)
            var = acc[1] / count - (acc[0] / count) ** 2
            units = int((var > ACTIVE_UNIT_THRESHOLD).sum())
            metrics[f"active_units/{i:02d}"] = float(units)
            active += units
        metrics["active_units"] = float(active)
        dims = self.model.crop(torch.zeros(1, *self.test_set[0].shape)).numel()
        metrics["bits_per_dim"] = metrics["nelbo"] / (dims * 0.6931471805599453)
        if self.ctx.is_main:
            images = sample_images(self.model, 64, tc.sample_temperature)
            self.logger.images("samples", images, step, png_path=f"samples/step_{step:08d}.png")
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.precision.scaler.state_dict(),
                "spectral": self.spectral.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.precision.scaler.load_state_dict(state["scaler"])
        self.spectral.load_state_dict(state["spectral"])


def train_nvae(run_cfg: NVAERunConfig, ctx: DistContext, run_dir: Path, logger: RunLogger,
               resume: Optional[Path] = None, stop: Optional[StopSignal] = None) -> int:
    """Run stage 1 to completion (or pre-emption); writes checkpoints and a final sample grid."""
    tc = run_cfg.train
    info = dataset_info(tc.dataset, tc.data_root)
    train_set = get_dataset(tc.dataset, "train", tc.data_root)
    test_set = get_dataset(tc.dataset, "test", tc.data_root)
    per_epoch = steps_per_epoch(len(train_set), ctx.world_size, tc.batch_size)
    total_steps = planned_steps(tc, per_epoch)
    precision = Precision.create(tc.precision, ctx.device)
    task = NVAETask(run_cfg, ctx, precision, total_steps, per_epoch, test_set, info.binarize, logger)
    params = sum(p.numel() for p in task.model.parameters())
    logger.info(f"NVAE: {params / 1e6:.2f}M parameters, {len(task.model.group_specs)} latent groups, "
                f"{total_steps} steps ({per_epoch} per epoch) on {ctx.world_size} process(es), {tc.precision}")
    status = run_training(task, train_set, ctx, loop_settings(tc, total_steps), run_dir, logger, resume, stop)
    if status == 0 and ctx.is_main:
        with isolated_rng(ctx):
            images = sample_images(task.model, 64, tc.sample_temperature, bn_batches=tc.bn_readjust_batches)
        logger.images("final_samples", images, total_steps, png_path="samples.png")
        logger.info(f"wrote {run_dir / 'samples.png'}")
    return status


def resume_config(path: Path, requested: NVAERunConfig, explicit: Mapping[str, Mapping[str, Any]]) -> NVAERunConfig:
    """The run config stored in a checkpoint, with the cadence the command line changes (check_resume); an
    explicit value that contradicts it is an error."""
    saved = NVAERunConfig.from_json(load_checkpoint(path, expected_kind="nvae")["config"])
    sections = check_resume(path, {"model": saved.model, "train": saved.train}, explicit)
    return NVAERunConfig(model=sections["model"], train=sections["train"])


__all__ = ["NVAETask", "model_config_for_dataset", "resume_config", "train_nvae"]
