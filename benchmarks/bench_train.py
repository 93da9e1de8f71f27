#!/usr/bin/env python
"""Stage-1 training step: seconds per step and peak memory per preset, batch, precision and variant.

Every row is the project's full training step (``NVAETask.train_step``: forward, loss, spectral and BN
regularisers, backward, Adamax, scheduler) on a fixed random binary batch. Each measurement runs in its
own process (clean memory, same thread count), and the rows are timed in interleaved rounds (one process
per row per round, median over all timed steps) so that load on the machine hits every row alike. Ratios
are against the first variant of the same preset and batch, or, with ``--baseline-tree``, against the
same step of another checkout of this project (``git worktree add /tmp/base <commit>``), measured in the
same rounds.

Variants: ``eager`` (the default step), ``compiled`` (``--compile``: torch.compile of the cells and the
prior networks; the first step's extra time is the compile time, and "pays off after" is how many steps
it takes the saving per step to repay it), ``ckpt`` (``--checkpoint-activations``), ``compiled+ckpt``.
Peak memory is measured in a separate process per row: on the CPU the peak RSS of one step after one
warm-up step (VmHWM reset through /proc/self/clear_refs, with glibc's mmap threshold fixed so that freed
activations go back to the system), "over rest" the part above the process's resident memory just before
the step; on a GPU max_memory_allocated and the part above memory_allocated before the step.

Usage: python benchmarks/bench_train.py [--presets mnist] [--batch 16 64] [--precisions fp32]
       [--variants eager ckpt] [--baseline-tree DIR] [--rounds 3] [--steps 2] [--threads 2] [--device auto]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {"eager": {}, "compiled": {"compile": True}, "ckpt": {"checkpoint_activations": True},
            "compiled+ckpt": {"compile": True, "checkpoint_activations": True}}
TARGETS = {"speed_b16": 1.4, "speed_b64": 1.25, "ckpt_memory": 0.5, "ckpt_time": 1.35}  # issue 12


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _worker(args: argparse.Namespace) -> None:
    """One row in this process, against the checkout ``args.tree``; prints one JSON line."""
    sys.path.insert(0, args.tree)
    import dataclasses

    import torch

    from nvae.config import preset
    from nvae.runtime import DistContext, Precision, RunLogger
    from nvae.train import NVAETask

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cpu" and not args.measure_memory:
        # What an entry point does on the CPU (run_entry); a checkout from before it existed runs without it.
        try:
            from nvae.runtime.process import keep_cpu_memory_mapped
        except ImportError:
            pass
        else:
            keep_cpu_memory_mapped()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    run_cfg = preset(args.preset)
    run_cfg.train = dataclasses.replace(run_cfg.train, batch_size=args.batch, precision=args.precision,
                                        **VARIANTS[args.variant])
    torch.manual_seed(0)
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=device, backend=None)
    with tempfile.TemporaryDirectory() as tmp:
        task = NVAETask(run_cfg, ctx, Precision.create(args.precision, device), total_steps=100_000, per_epoch=1000,
                        test_set=None, binarize=False, logger=RunLogger(tmp, enabled=False))
    cfg = run_cfg.model
    x = torch.rand(args.batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device).bernoulli()
    times = []
    if args.measure_memory:
        task.train_step(x, 0)  # warm-up: optimiser state, gradients, kernel caches
        sync()
        if device.type == "cuda":
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := current RSS
            before = _status_mb("VmRSS")
        task.train_step(x, 1)
        sync()
        peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _status_mb("VmHWM"))
        before_mb = before / 2**20 if device.type == "cuda" else before
        print(json.dumps({"peak_mb": peak, "over_rest_mb": peak - before_mb}))
        return
    memory = {}
    for step in range(args.warmup + args.steps):
        if step == args.warmup and device.type == "cuda":  # on a GPU the timed steps also give the peak
            rest = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        sync()
        t0 = time.perf_counter()
        task.train_step(x, step)
        sync()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        memory = {"peak_mb": peak / 2**20, "over_rest_mb": (peak - rest) / 2**20}
    print(json.dumps({"first_s": times[0], "times": times[args.warmup:], **memory}))


def _run_worker(tree: str, row: dict, args: argparse.Namespace, memory: bool) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--tree", tree, "--preset", row["preset"],
           "--batch-one", str(row["batch"]), "--precision", row["precision"], "--variant", row["variant"],
           "--threads", str(args.threads), "--device", args.device, "--steps", str(args.steps),
           "--warmup", str(args.warmup)] + (["--measure-memory"] if memory else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if memory:
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    if "compile" in VARIANTS[row["variant"]]:
        env["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"  # a cold compile every time: what a new run pays
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"worker failed for {row} in {tree}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _commit(tree: str) -> str:
    done = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["mnist"], help="presets to time (nvae.config.PRESETS)")
    parser.add_argument("--batch", nargs="+", type=int, default=[16, 64], help="per-process batch sizes, images")
    parser.add_argument("--precisions", nargs="+", default=["fp32"], help="fp32 | bf16 | fp16, one row each")
    parser.add_argument("--variants", nargs="+", default=["eager", "ckpt"], choices=sorted(VARIANTS),
                        help="step variants; ratios are against the first (or against --baseline-tree)")
    parser.add_argument("--baseline-tree", default=None,
                        help="another checkout of this project whose eager step is the baseline row (a directory)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds, one process per row each")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per process (the first includes compiling)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of every process")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory processes")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file (path)")
    # Worker mode (one row in a fresh process), used by the driver above.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tree", default=REPO, help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--batch-one", dest="batch_one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="eager", help=argparse.SUPPRESS)
    parser.add_argument("--measure-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.batch = args.batch_one
        _worker(args)
        return
    if args.device == "auto":
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.baseline_tree and not os.path.isdir(os.path.join(args.baseline_tree, "nvae")):
        parser.error(f"--baseline-tree {args.baseline_tree!r} is not a checkout of this project (no nvae/ in it)")
    batches = args.batch + [args.batch[-1]] * (len(args.presets) - len(args.batch)) if len(args.presets) > 1 \
        else args.batch
    pairs = list(zip(args.presets, batches)) if len(args.presets) > 1 else [(args.presets[0], b) for b in batches]
    rows = []
    for preset_name, batch in pairs:
        for precision in args.precisions:
            if args.baseline_tree:
                rows.append(dict(preset=preset_name, batch=batch, precision=precision, variant="eager",
                                 tree=os.path.abspath(args.baseline_tree), baseline=True))
            for i, variant in enumerate(args.variants):
                rows.append(dict(preset=preset_name, batch=batch, precision=precision, variant=variant, tree=REPO,
                                 baseline=not args.baseline_tree and i == 0))
    for row in rows:
        row["times"], row["first"] = [], []
    for _ in range(args.rounds):
        for row in rows:
            out = _run_worker(row["tree"], row, args, memory=False)
            row["times"] += out["times"]
            row["first"].append(out["first_s"])
            row["gpu_memory"] = {k: out[k] for k in ("peak_mb", "over_rest_mb") if k in out}
    for row in rows:
        row["step_s"] = statistics.median(row["times"])
        row["compile_s"] = statistics.median(row["first"]) - row["step_s"]
        mem = row.pop("gpu_memory") or (_run_worker(row["tree"], row, args, memory=True) if args.memory else {})
        row["peak_mb"], row["over_rest_mb"] = mem.get("peak_mb", float("nan")), mem.get("over_rest_mb", float("nan"))
        row["commit"] = _commit(row["tree"])
    print(f"device: {args.device} ({args.threads} threads); median of {args.rounds} rounds x {args.steps} steps "
          f"after {args.warmup} warm-up step(s)")
    head = (f"{'preset':<9}{'batch':>6}{'prec':>6}{'commit':>9}{'variant':>15}{'s/step':>9}{'vs base':>9}"
            f"{'speed-up':>9}{'peak MB':>9}{'over rest':>10}{'vs base':>9}{'first-step extra s':>20}{'pays off':>10}")
    print(head)
    for preset_name, batch in pairs:
        for precision in args.precisions:
            group = [r for r in rows if (r["preset"], r["batch"], r["precision"]) == (preset_name, batch, precision)]
            base = next(r for r in group if r["baseline"])
            eager = next((r for r in group if r["variant"] == "eager" and r["tree"] == REPO), base)
            for r in group:
                r["time_ratio"] = r["step_s"] / base["step_s"]
                r["memory_ratio"] = r["over_rest_mb"] / base["over_rest_mb"] if base["over_rest_mb"] else float("nan")
                saving = eager["step_s"] - r["step_s"]
                extra = r["compile_s"] - eager["compile_s"]
                r["pays_off_steps"] = (extra / saving if "compile" in r["variant"] and saving > 0 else None)
                pays = "never" if "compile" in r["variant"] and r["pays_off_steps"] is None else \
                    (f"{r['pays_off_steps']:.0f}" if r["pays_off_steps"] is not None else "")
                print(f"{preset_name:<9}{batch:>6}{precision:>6}{r['commit']:>9}{r['variant']:>15}{r['step_s']:>9.3f}"
                      f"{r['time_ratio']:>8.2f}x{1 / r['time_ratio']:>8.2f}x{r['peak_mb']:>9.0f}{r['over_rest_mb']:>10.0f}"
                      f"{r['memory_ratio']:>8.2f}x{r['compile_s']:>20.1f}{pays:>10}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
