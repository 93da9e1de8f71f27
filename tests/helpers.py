"""Shared test fixtures: tiny configurations and checkpoints, free ports, a subprocess runner for the entry points."""
from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from evalp_prior.baselines import langevin_run_config, ncp_run_config, train_langevin, train_ncp
from evalp_prior.config import EVaLPConfig, EVaLPRunConfig
from evalp_prior.train import train_evalp, vae_fingerprint
from nvae.config import NVAERunConfig, preset
from nvae.runtime import RunLogger, StopSignal
from nvae.runtime.distributed import DistContext
from nvae.train import train_nvae
from nvae.trained import load_trained_nvae

ROOT = Path(__file__).resolve().parents[1]
CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)


def tiny_run_config(**train) -> NVAERunConfig:
    """The tiny preset on 1-channel synthetic 32x32 images, small enough for a unit test."""
    cfg = preset("tiny")
    model = dataclasses.replace(cfg.model, output_dist="dmol", num_mixtures=2, loss_crop=0, num_channels=4)
    settings = dict(dataset="synthetic", batch_size=8, max_steps=8, log_every=2, eval_every=0, ckpt_every=100,
                    eval_batches=1, bn_readjust_batches=1, warmup_epochs=0.05)
    settings.update(train)
    return NVAERunConfig(model=model, train=dataclasses.replace(cfg.train, **settings))


# Fitted in seconds on the CPU; shared by every prior kind (EVaLP adds its sampler's settings below).
PRIOR_SETTINGS = dict(batch_size=8, max_steps=3, energy_hidden=8, log_every=1, eval_batches=1, bn_readjust_batches=1,
                      ckpt_every=100)
PRIOR_KINDS = ("evalp", "langevin", "ncp")


def train_prior_checkpoint(kind: str, vae_path: Path, run_dir: Path, **settings) -> Path:
    """A tiny prior of kind evalp, langevin (K = 2) or ncp (M = 4) fitted to the frozen NVAE at vae_path."""
    vae, vae_cfg, _ = load_trained_nvae(vae_path, CPU.device)
    fingerprint, settings = vae_fingerprint(vae), {**PRIOR_SETTINGS, **settings}
    if kind == "evalp":
        evalp = EVaLPConfig(**{"n_critic": 2, "sampler_hidden": 8, "num_couplings": 2, "critic_warmup_steps": 0, **settings})
        train, run_cfg = train_evalp, EVaLPRunConfig(evalp, str(vae_path), fingerprint)
    elif kind == "langevin":
        train, run_cfg = train_langevin, langevin_run_config(str(vae_path), fingerprint,
                                                             **{"langevin_steps": 2, **settings})
    elif kind == "ncp":
        train, run_cfg = train_ncp, ncp_run_config(str(vae_path), fingerprint, **{"sir_proposals": 4, **settings})
    else:
        raise ValueError(f"unknown prior kind {kind!r}; expected one of {PRIOR_KINDS}")
    torch.manual_seed(0)
    with RunLogger(run_dir, True) as logger:
        assert train(run_cfg, vae, vae_cfg, CPU, run_dir, logger) == 0
    return run_dir / "checkpoint.pt"


def train_prior_checkpoints(root: Path) -> dict[str, Path]:
    """A tiny NVAE (root/vae) and a prior of every kind fitted to it (root/KIND); keys nvae, KIND and root."""
    torch.manual_seed(0)
    with RunLogger(root / "vae", True) as logger:
        assert train_nvae(tiny_run_config(max_steps=2), CPU, root / "vae", logger) == 0
    out = {"nvae": root / "vae" / "checkpoint.pt", "root": root}
    for kind in PRIOR_KINDS:
        out[kind] = train_prior_checkpoint(kind, out["nvae"], root / kind)
    return out


class StopAt(StopSignal):
    """Behaves like a pre-emption signal arriving right after step n."""

    def __init__(self, n: int):
        super().__init__(signals=())
        self.n, self.calls = n, 0

    def sync(self, ctx) -> bool:
        self.calls += 1
        if self.calls >= self.n:
            self.request()
        return self.requested


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(*args: str, torchrun: int = 0, timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run an entry point as a user would (optionally under torchrun with N CPU processes)."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}",
               f"--master_port={free_port()}", *args]
    else:
        cmd = [sys.executable, *args]
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


class LinearEnergy(torch.nn.Module):
    """E(z) = -a <1, z>: tilting N(mu, sigma^2) by exp(-E) gives N(mu + a sigma^2, sigma^2); a critic that ranks
    along one direction at scale a."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = a

    def forward(self, group: int, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return -self.a * z.flatten(1).sum(1)
