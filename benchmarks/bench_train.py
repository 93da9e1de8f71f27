#!/usr/bin/env python
"""Training-step throughput and memory per preset and precision, and the regularisers' share of a step.

Prints one table. Ratios are against fp32 of the same preset, measured in the same process.
Usage: python benchmarks/bench_train.py [--presets tiny mnist] [--batch 64 8] [--steps 5] [--device auto]
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from nvae.config import preset  # noqa: E402
from nvae.losses import SpectralRegularizer, balanced_kl, batchnorm_regularizer, kl_balance_alphas  # noqa: E402
from nvae.model import NVAE  # noqa: E402
from nvae.runtime import Precision  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (KiB on Linux)


def measure(name: str, batch: int, precision: str, steps: int, device: torch.device) -> dict[str, float]:
    """Median seconds of a full training step and of its regulariser part."""
    cfg = preset(name).model
    torch.manual_seed(0)
    model = NVAE(cfg).to(device).train()
    spectral = SpectralRegularizer(model).to(device)
    alphas = kl_balance_alphas(model.group_specs).to(device)
    opt = torch.optim.Adamax(model.parameters(), lr=1e-3, eps=1e-3)
    prec = Precision.create(precision, device)
    x = torch.rand(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    if cfg.output_dist == "bernoulli":
        x = x.bernoulli()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_times, reg_times = [], []
    for i in range(steps + 2):  # two warm-up steps
        _sync(device)
        t0 = time.perf_counter()
        with prec.autocast():
            out = model(x)
            recon = model.reconstruction_nll(out.logits, x)
            kl, _ = balanced_kl(model.kl_per_group(out), 0.5, alphas)
        _sync(device)
        t1 = time.perf_counter()
        reg = 1e-2 * (spectral() + batchnorm_regularizer(model))
        _sync(device)
        t2 = time.perf_counter()
        loss = (recon + kl).mean() + reg
        opt.zero_grad(set_to_none=True)
        prec.backward_and_step(loss, opt, max_grad_norm=float("inf"))
        _sync(device)
        t3 = time.perf_counter()
        if i >= 2:
            step_times.append(t3 - t0)
            reg_times.append(t2 - t1)
    step = sorted(step_times)[len(step_times) // 2]
    reg_forward = sorted(reg_times)[len(reg_times) // 2]
    # The regulariser's backward is tiny next to the model's; its forward share is what power iteration costs.
    return {"images_per_s": batch / step, "step_s": step, "reg_share": reg_forward / step,
            "peak_mb": _peak_memory_mb(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "mnist"])
    parser.add_argument("--batch", nargs="+", type=int, default=[64, 8], help="batch per preset (same order)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    batches = args.batch + [args.batch[-1]] * (len(args.presets) - len(args.batch))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; median of {args.steps} steps after 2 warm-up steps")
    print(f"{'preset':<10}{'batch':>6}{'precision':>10}{'img/s':>10}{'step s':>9}{'vs fp32':>9}{'reg share':>11}{'peak MB':>10}")
    for preset_name, batch in zip(args.presets, batches):
        base = None
        for precision in args.precisions:
            r = measure(preset_name, batch, precision, args.steps, device)
            base = base or r["images_per_s"]
            print(f"{preset_name:<10}{batch:>6}{precision:>10}{r['images_per_s']:>10.1f}{r['step_s']:>9.3f}"
                  f"{r['images_per_s'] / base:>8.2f}x{100 * r['reg_share']:>10.1f}%{r['peak_mb']:>10.0f}")


if __name__ == "__main__":
    main()
