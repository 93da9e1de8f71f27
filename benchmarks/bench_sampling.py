#!/usr/bin/env python
"""Generation cost per image: NVAE's Gaussian prior vs EVaLP (sampler only) vs EVaLP + SIR(M).

Prints one table. Ratios are against the Gaussian prior of the same preset at the same batch size,
measured in the same process; the configurations are timed in interleaved rounds (one call of each per
round, median over rounds) so that load from other users of a shared machine hits all of them alike.
Each call is one ``NVAE.sample(batch, t=1, prior=hook)`` in eval mode, fp32: no BN re-adjustment is
timed (it is a one-off per run, done with the sampler alone). Weights are untrained (timing does not
depend on them); the sampler's zero-initialised coupling outputs are perturbed so that the flow is not
the identity. EVaLP runs on every group (the default ``--groups all``), SIR on the top group (the
default ``--sir-groups``) with the default exact weights; ``--groups top`` gives the published setting.
"peak MB" is what one call needs above what the process held before it: on the CPU the peak RSS of a
call in a fresh process after one Gaussian-prior call (VmHWM, reset through /proc/self/clear_refs), on a
GPU max_memory_allocated. ``--clock cpu`` reports process CPU time instead of wall time: on a shared machine
it is the steadier measure of the work done (use it with ``--threads 1``). ``--compile`` adds every
configuration again on torch.compile'd copies of the NVAE's cells and the sampler's couplings ('+compile',
ratios against the compiled Gaussian prior; "1st call +s" is the first call's extra time, the compiling).
Results: docs/benchmarks.md.

Usage: python benchmarks/bench_sampling.py [--presets tiny mnist] [--batch 64 16] [--repeats 5]
       [--groups all] [--sir 100 1000] [--sir-chunk 100] [--threads N] [--clock wall] [--device auto] [--compile]
       [--profile]
"""
from __future__ import annotations

import argparse
import copy
import multiprocessing
import os
import statistics
import sys
import time
from typing import Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from benchmarks.process_memory import reset_peak_rss, status_mb  # noqa: E402
from evalp_prior.config import EVaLPConfig  # noqa: E402
from evalp_prior.prior import EVaLPPrior  # noqa: E402
from evalp_prior.sir import DEFAULT_SIR_CHUNK  # noqa: E402
from evalp_prior.train import build_prior_modules  # noqa: E402
from nvae.config import preset  # noqa: E402
from nvae.hooks import PriorHook  # noqa: E402
from nvae.model import NVAE  # noqa: E402

TARGETS = {"evalp": 1.05, "sir1000": 2.0}  # issue 12 (mnist): seconds per image relative to the Gaussian prior


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_extra_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Memory fn() needs above what is held when it starts: peak RSS (CPU) or peak allocation (GPU)."""
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if not reset_peak_rss():
        return float("nan")
    before = status_mb("VmRSS")
    fn()
    return status_mb("VmHWM") - before


def build(name: str, groups_flag: str, device: torch.device) -> tuple[NVAE, list[int], torch.nn.Module, torch.nn.Module]:
    """Untrained NVAE of the preset (eval mode, no gradients) with EVaLP modules of the default config
    on the groups ``groups_flag`` selects."""
    torch.manual_seed(0)
    vae = NVAE(preset(name).model).to(device).eval().requires_grad_(False)
    groups, energies, sampler = build_prior_modules(EVaLPConfig(groups=groups_flag), vae)
    with torch.no_grad():
        for coupling in sampler.couplings:  # as after training: a non-identity flow
            coupling.net[-1].weight.normal_(0, 0.05)
    energies, sampler = energies.to(device).eval().requires_grad_(False), sampler.to(device).eval().requires_grad_(False)
    return vae, groups, energies, sampler


def gflop_per_image(fn: Callable[[], object], batch: int) -> float:
    """Floating-point operations of fn() (convolutions and matrix products, as torch counts them) per image."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / batch / 1e9


def configurations(vae: NVAE, groups: list[int], energies: torch.nn.Module, sampler: torch.nn.Module, sir: list[int],
                   sir_chunk: int, compile_too: bool = False) -> dict[str, tuple[NVAE, Optional[PriorHook]]]:
    """Label -> (NVAE, prior hook; None: NVAE's Gaussian prior). With compile_too, every configuration again
    on torch.compile'd copies of the NVAE's cells and the sampler's couplings (labels '+compile')."""
    def hooks(flow: torch.nn.Module) -> dict[str, Optional[PriorHook]]:
        out: dict[str, Optional[PriorHook]] = {"gaussian": None, "evalp": EVaLPPrior(energies, flow, groups)}
        for m in sir:
            out[f"sir{m}"] = EVaLPPrior(energies, flow, groups, sir_proposals=m, sir_chunk=sir_chunk)
        return out

    configs = {label: (vae, hook) for label, hook in hooks(sampler).items()}
    if compile_too:
        fast_vae, fast_sampler = copy.deepcopy(vae), copy.deepcopy(sampler)
        fast_vae.compile_cells()
        fast_sampler.compile_couplings()
        configs.update({f"{label}+compile": (fast_vae, hook) for label, hook in hooks(fast_sampler).items()})
    return configs


def cpu_memory_probe(name: str, groups_flag: str, batch: int, label: str, sir: list[int], sir_chunk: int,
                     threads: int) -> float:
    """Peak extra RSS (MiB) of one call of one configuration in a fresh process, after a Gaussian-prior
    call has paid the one-off costs (kernel caches, first-touch of the model)."""
    if threads > 0:
        torch.set_num_threads(threads)
    vae, groups, energies, sampler = build(name, groups_flag, torch.device("cpu"))
    _, hook = configurations(vae, groups, energies, sampler, sir, sir_chunk)[label]
    vae.sample(batch, 1.0)
    return peak_extra_mb(lambda: vae.sample(batch, 1.0, prior=hook), torch.device("cpu"))


def measure(name: str, batch: int, args: argparse.Namespace, device: torch.device) -> list[dict[str, object]]:
    """Seconds per image (median over rounds), GFLOP per image and peak extra memory of every configuration."""
    vae, groups, energies, sampler = build(name, args.groups, device)
    configs = configurations(vae, groups, energies, sampler, args.sir, args.sir_chunk, args.compile)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    def call(model: NVAE, hook: Optional[PriorHook]) -> None:
        model.sample(batch, 1.0, prior=hook)
        _sync(device)

    times: dict[str, list[float]] = {label: [] for label in configs}
    first: dict[str, float] = {}
    for round_index in range(args.warmup + args.repeats):
        for label, (model, hook) in configs.items():
            t0 = clock()
            call(model, hook)
            if round_index >= args.warmup:
                times[label].append(clock() - t0)
            first.setdefault(label, clock() - t0)
    eager = [label for label in configs if not label.endswith("+compile")]
    peaks = {label: float("nan") for label in configs}
    if args.memory and device.type == "cuda":
        peaks.update({label: peak_extra_mb(lambda: call(*configs[label]), device) for label in eager})
    elif args.memory:
        # One fresh process per configuration: RSS in this one depends on what ran before.
        with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
            peaks.update({label: pool.apply(cpu_memory_probe, (name, args.groups, batch, label, args.sir, args.sir_chunk,
                                                               args.threads))
                          for label in eager})
    # Compiling changes no operation count: the compiled rows report their eager twin's FLOPs.
    flops = {label: gflop_per_image(lambda: call(*configs[label]), batch) for label in eager}
    rows = [{"preset": name, "batch": batch, "prior": label, "groups": len(groups),
             "s_per_image": statistics.median(times[label]) / batch, "gflop": flops[label.removesuffix("+compile")],
             "peak_mb": peaks[label], "first_call_extra_s": first[label] - statistics.median(times[label])}
            for label in configs]
    if args.profile:
        profile(vae, configs, batch, name, device)
    return rows


def profile(vae: NVAE, configs: dict[str, tuple[NVAE, Optional[PriorHook]]], batch: int, name: str,
            device: torch.device) -> None:
    """torch.profiler table of one call with the last (largest) eager SIR setting, operators by self time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    label = [label for label in configs if not label.endswith("+compile")][-1]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities, record_shapes=True) as prof:
        vae.sample(batch, 1.0, prior=configs[label][1])
        _sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"--- profile: {name}, {label}, batch {batch} ---")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=15, max_name_column_width=30,
                                                            max_shapes_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=None,
                        help="default: tiny mnist on the CPU; tiny mnist cifar10 celeba64 on a GPU")
    parser.add_argument("--batch", nargs="+", type=int, default=[64, 16],
                        help="batch per preset, same order; the last one repeats (default: 64 16)")
    parser.add_argument("--groups", default="all", help="EVaLP groups: all (the default) | top (the published setting) | LIST")
    parser.add_argument("--sir", nargs="+", type=int, default=[100, 1000], help="SIR proposal counts M")
    parser.add_argument("--sir-chunk", type=int, default=DEFAULT_SIR_CHUNK,
                        help=f"proposals per item evaluated at once (default: {DEFAULT_SIR_CHUNK})")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (the median is reported)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or process CPU time (steadier on a shared machine)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory calls")
    parser.add_argument("--compile", action="store_true",
                        help="also time every configuration on torch.compile'd cells and couplings (rows '+compile')")
    parser.add_argument("--profile", action="store_true", help="also print a torch.profiler table per preset")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    presets = args.presets or (["tiny", "mnist", "cifar10", "celeba64"] if device.type == "cuda" else ["tiny", "mnist"])
    batches = args.batch + [args.batch[-1]] * max(0, len(presets) - len(args.batch))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; fp32, t=1, eval mode, no BN re-adjustment timed; "
          f"{args.clock} clock, median of {args.repeats} interleaved rounds after {args.warmup} warm-up; "
          f"--groups {args.groups}, --sir-chunk {args.sir_chunk}; FLOPs as torch.utils.flop_counter counts them")
    print(f"{'preset':<10}{'batch':>6}{'groups':>7}{'prior':>18}{'s/image':>11}{'vs gauss':>10}{'target':>8}"
          f"{'GFLOP/img':>11}{'vs gauss':>10}{'peak MB':>9}{'1st call +s':>12}")
    for preset_name, batch in zip(presets, batches):
        rows = measure(preset_name, batch, args, device)
        seconds = {str(r["prior"]): float(r["s_per_image"]) for r in rows}
        base_flop = float(rows[0]["gflop"])
        for r in rows:
            target = TARGETS.get(str(r["prior"]).removesuffix("+compile"))
            # Compiled rows against the compiled Gaussian prior: the ratio a --compile user sees.
            base = seconds["gaussian+compile" if str(r["prior"]).endswith("+compile") else "gaussian"]
            print(f"{r['preset']:<10}{r['batch']:>6}{r['groups']:>7}{r['prior']:>18}{r['s_per_image']:>11.5f}"
                  f"{float(r['s_per_image']) / base:>9.2f}x{(f'{target:.2f}x' if target else ''):>8}"
                  f"{r['gflop']:>11.3f}{float(r['gflop']) / base_flop:>9.2f}x{r['peak_mb']:>9.1f}"
                  f"{r['first_call_extra_s']:>12.1f}", flush=True)


if __name__ == "__main__":
    main()
