"""Shared test fixtures: tiny configurations, free ports, a subprocess runner for the entry points."""
from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

from nvae.config import NVAERunConfig, preset
from nvae.runtime import StopSignal

ROOT = Path(__file__).resolve().parents[1]


def tiny_run_config(**train) -> NVAERunConfig:
    """The tiny preset on 1-channel synthetic 32x32 images, small enough for a unit test."""
    cfg = preset("tiny")
    model = dataclasses.replace(cfg.model, output_dist="dmol", num_mixtures=2, loss_crop=0, num_channels=4)
    settings = dict(dataset="synthetic", batch_size=8, max_steps=8, log_every=2, eval_every=0, ckpt_every=100,
                    eval_batches=1, bn_readjust_batches=1, warmup_epochs=0.05)
    settings.update(train)
    return NVAERunConfig(model=model, train=dataclasses.replace(cfg.train, **settings))


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
