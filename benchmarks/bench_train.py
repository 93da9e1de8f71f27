#!/usr/bin/env python
"""Stage-1 training step: seconds per step and peak memory per preset, batch, precision and variant.

Every row is the project's full training step (``NVAETask.train_step``: forward, loss, spectral and BN
regularisers, backward, Adamax, scheduler) on a fixed random binary batch. All rows of one preset, batch
and precision live in one process and are timed in paired rounds (one step of every row per round, in a
rotating order), so that the drifts of a shared machine hit every row alike; a row's time ratio is the
median over rounds of its step time over the baseline's in the same round, with the quartiles. ``--rounds``
repeats this in fresh processes. The baseline is the first variant, or, with ``--baseline-tree``, the eager
step of another checkout of this project (``git worktree add /tmp/base <commit>``), imported into the same
process. Every checkout runs with what this one's entry points do on the CPU (keep_cpu_memory_mapped), so
a ratio against an old checkout measures the code alone.

Variants: ``eager`` (the default step), ``compiled`` (``--compile``: torch.compile of the residual cells;
"first-step +s" is the extra time of the first step, a cold compile, and "pays off" how many steps the
saving per step takes to repay it), ``ckpt`` (``--checkpoint-activations``), ``compiled+ckpt``.
Peak memory: on the CPU the peak RSS of one step after one warm-up step, in a fresh process per row (VmHWM
reset through /proc/self/clear_refs, glibc's mmap threshold fixed so that freed activations go back to the
system), "over rest" the part above the resident memory just before the step; on a GPU max_memory_allocated
of a timed step and the part above memory_allocated before it.

Usage: python benchmarks/bench_train.py [--presets mnist] [--batch 16 64] [--precisions fp32]
       [--variants eager ckpt] [--baseline-tree DIR] [--rounds 2] [--steps 4] [--threads 2] [--device auto]
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
sys.path.insert(0, REPO)

from benchmarks.process_memory import reset_peak_rss, status_mb  # noqa: E402
VARIANTS = {"eager": {}, "compiled": {"compile": True}, "ckpt": {"checkpoint_activations": True},
            "compiled+ckpt": {"compile": True, "checkpoint_activations": True}}


def _import_tree(tree: str) -> dict:
    """The project's modules from checkout ``tree``; modules of a tree imported before stay alive in the
    objects built from them, so several checkouts can be timed in one process."""
    import importlib

    for name in [m for m in sys.modules if m == "nvae" or m.startswith("nvae.")]:
        del sys.modules[name]
    sys.path.insert(0, tree)
    try:
        mods = {name: importlib.import_module(f"nvae.{name}") for name in ("config", "runtime", "train")}
        try:
            mods["process"] = importlib.import_module("nvae.runtime.process")
        except ImportError:  # a checkout from before the entry-point module
            mods["process"] = None
        return mods
    finally:
        sys.path.remove(tree)


def _build_task(mods: dict, preset_name: str, batch: int, precision: str, variant: str, device):
    import dataclasses

    import torch

    run_cfg = mods["config"].preset(preset_name)
    run_cfg.train = dataclasses.replace(run_cfg.train, batch_size=batch, precision=precision, **VARIANTS[variant])
    torch.manual_seed(0)
    rt = mods["runtime"]
    ctx = rt.DistContext(rank=0, world_size=1, local_rank=0, device=device, backend=None)
    with tempfile.TemporaryDirectory() as tmp:
        task = mods["train"].NVAETask(run_cfg, ctx, rt.Precision.create(precision, device), total_steps=100_000,
                                      per_epoch=1000, test_set=None, binarize=False, logger=rt.RunLogger(tmp, enabled=False))
    cfg = run_cfg.model
    x = torch.rand(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device).bernoulli()
    return task, x


def _paired_worker(args: argparse.Namespace) -> None:
    """Every row of one preset/batch/precision in this one process, one step of each per round in a rotating
    order, so that the machine's drifts hit all rows alike; prints one JSON line per row."""
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = json.loads(args.rows)
    mods = {tree: _import_tree(tree) for tree in dict.fromkeys(r["tree"] for r in rows)}
    if device.type == "cpu":  # what an entry point does on the CPU (run_entry), for every checkout alike
        _import_tree(REPO)["process"].keep_cpu_memory_mapped()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    built = [_build_task(mods[r["tree"]], r["preset"], r["batch"], r["precision"], r["variant"], device) for r in rows]
    times: list[list[float]] = [[] for _ in rows]
    memory: list[dict] = [{} for _ in rows]
    for step in range(args.warmup + args.steps):
        order = list(range(len(rows)))
        order = order[step % len(order):] + order[:step % len(order)]
        for i in order:
            task, x = built[i]
            if device.type == "cuda":
                sync()
                rest = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            sync()
            t0 = time.perf_counter()
            task.train_step(x, step)
            sync()
            times[i].append(time.perf_counter() - t0)
            if device.type == "cuda" and step >= args.warmup:
                peak = torch.cuda.max_memory_allocated(device)
                memory[i] = {"peak_mb": peak / 2**20, "over_rest_mb": (peak - rest) / 2**20}
    for t, mem in zip(times, memory):
        print(json.dumps({"first_s": t[0], "times": t[args.warmup:], **mem}))


def _memory_worker(args: argparse.Namespace) -> None:
    """Peak resident memory of one step of one row in a fresh process (CPU); prints one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    task, x = _build_task(_import_tree(args.tree), args.preset, args.batch, args.precision, args.variant, device)
    task.train_step(x, 0)  # warm-up: optimiser state, gradients, kernel caches
    reset_peak_rss()
    before = status_mb("VmRSS")
    task.train_step(x, 1)
    peak = status_mb("VmHWM")
    print(json.dumps({"peak_mb": peak, "over_rest_mb": peak - before}))


def _run(cmd_args: list[str], args: argparse.Namespace, env_extra: dict) -> list[dict]:
    cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(args.threads), "--device", args.device,
           "--steps", str(args.steps), "--warmup", str(args.warmup)] + cmd_args
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), **env_extra)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"benchmark process failed ({' '.join(cmd_args[:3])}):\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.strip().splitlines() if line.startswith("{")]


def _commit(tree: str) -> str:
    done = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "?"


def _quartiles(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[0], q[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["mnist"], help="presets to time (nvae.config.PRESETS)")
    parser.add_argument("--batch", nargs="+", type=int, default=[16, 64],
                        help="per-process batch sizes, images (one preset: every batch; several: one batch each)")
    parser.add_argument("--precisions", nargs="+", default=["fp32"], help="fp32 | bf16 | fp16, one row each")
    parser.add_argument("--variants", nargs="+", default=["eager", "ckpt"], choices=sorted(VARIANTS),
                        help="step variants; ratios are against the first (or against --baseline-tree)")
    parser.add_argument("--baseline-tree", default=None,
                        help="another checkout of this project whose eager step is the baseline row (a directory)")
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per preset/batch/precision")
    parser.add_argument("--steps", type=int, default=4, help="timed steps of every row per process")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of every row first (the first compiles)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of every process")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory processes")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file (path)")
    # Worker modes, used by the driver above.
    parser.add_argument("--paired-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    parser.add_argument("--tree", default=REPO, help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--batch-one", dest="batch_one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="eager", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.paired_worker:
        _paired_worker(args)
        return
    if args.memory_worker:
        args.batch = args.batch_one
        _memory_worker(args)
        return
    if args.device == "auto":
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.baseline_tree and not os.path.isdir(os.path.join(args.baseline_tree, "nvae")):
        parser.error(f"--baseline-tree {args.baseline_tree!r} is not a checkout of this project (no nvae/ in it)")
    if len(args.presets) > 1:
        pairs = list(zip(args.presets, args.batch + [args.batch[-1]] * (len(args.presets) - len(args.batch))))
    else:
        pairs = [(args.presets[0], b) for b in args.batch]
    groups = []
    for preset_name, batch in pairs:
        for precision in args.precisions:
            group = []
            if args.baseline_tree:
                group.append(dict(preset=preset_name, batch=batch, precision=precision, variant="eager",
                                  tree=os.path.abspath(args.baseline_tree), baseline=True))
            for i, variant in enumerate(args.variants):
                group.append(dict(preset=preset_name, batch=batch, precision=precision, variant=variant, tree=REPO,
                                  baseline=not args.baseline_tree and i == 0))
            groups.append(group)
    compiling = any("compile" in v for v in args.variants)
    for group in groups:
        for row in group:
            row.update(times=[], first=[], ratios=[])
        spec = json.dumps([{k: r[k] for k in ("preset", "batch", "precision", "variant", "tree")} for r in group])
        for _ in range(args.rounds):
            # A cold compile in every process: what a new run pays.
            try:
                outs = _run(["--paired-worker", "--rows", spec], args,
                            {"TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"} if compiling else {})
            except SystemExit as failure:  # e.g. bf16 on a GPU without it: report, and go on with the next group
                print(f"# {group[0]['preset']} batch {group[0]['batch']} {group[0]['precision']}: not measured: "
                      f"{str(failure).strip().splitlines()[-1]}", flush=True)
                group.clear()
                break
            base_times = outs[next(i for i, r in enumerate(group) if r["baseline"])]["times"]
            for row, out in zip(group, outs):
                row["times"] += out["times"]
                row["first"].append(out["first_s"])
                row["ratios"] += [t / b for t, b in zip(out["times"], base_times)]  # paired: same round
                row["gpu_memory"] = {k: out[k] for k in ("peak_mb", "over_rest_mb") if k in out}
        for row in group:  # empty when the group could not be measured
            row["step_s"] = statistics.median(row["times"])
            row["compile_s"] = statistics.median(row["first"]) - row["step_s"]
            mem = row.pop("gpu_memory")
            if not mem and args.memory and args.device == "cpu":
                # Fixed mmap threshold: freed activations go back to the system, so the peak is the step's.
                mem = _run(["--memory-worker", "--tree", row["tree"], "--preset", row["preset"], "--batch-one",
                            str(row["batch"]), "--precision", row["precision"], "--variant", row["variant"]], args,
                           {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"})[0]
            row["peak_mb"], row["over_rest_mb"] = mem.get("peak_mb", float("nan")), mem.get("over_rest_mb", float("nan"))
            row["commit"] = _commit(row["tree"])
    print(f"device: {args.device} ({args.threads} threads); {args.rounds} process(es) x {args.steps} paired rounds "
          f"after {args.warmup} warm-up step(s); time ratio = median over rounds of (row / baseline) in the same round")
    print(f"{'preset':<9}{'batch':>6}{'prec':>6}{'commit':>9}{'variant':>15}{'s/step':>9}{'time ratio':>11}"
          f"{'(quartiles)':>14}{'speed-up':>9}{'peak MB':>9}{'over rest':>10}{'ratio':>7}{'first-step +s':>15}"
          f"{'pays off':>10}")
    for group in filter(None, groups):
        base = next(r for r in group if r["baseline"])
        eager = next((r for r in group if r["variant"] == "eager" and r["tree"] == REPO), base)
        for r in group:
            r["time_ratio"] = statistics.median(r["ratios"])
            low, high = _quartiles(r["ratios"])
            r["memory_ratio"] = r["over_rest_mb"] / base["over_rest_mb"] if base["over_rest_mb"] else float("nan")
            saving = eager["step_s"] - r["step_s"]
            extra = r["compile_s"] - eager["compile_s"]
            r["pays_off_steps"] = extra / saving if "compile" in r["variant"] and saving > 0 else None
            pays = "never" if "compile" in r["variant"] and r["pays_off_steps"] is None else \
                (f"{r['pays_off_steps']:.0f}" if r["pays_off_steps"] is not None else "")
            print(f"{r['preset']:<9}{r['batch']:>6}{r['precision']:>6}{r['commit']:>9}{r['variant']:>15}"
                  f"{r['step_s']:>9.3f}{r['time_ratio']:>10.2f}x{f'{low:.2f}-{high:.2f}':>14}{1 / r['time_ratio']:>8.2f}x"
                  f"{r['peak_mb']:>9.0f}{r['over_rest_mb']:>10.0f}{r['memory_ratio']:>6.2f}x{r['compile_s']:>15.1f}"
                  f"{pays:>10}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r for group in groups for r in group], f, indent=1)


if __name__ == "__main__":
    main()
