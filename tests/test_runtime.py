"""Fast single-process tests of nvae.runtime: checkpoints, RNG, sampler, precision, signals, logging."""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from nvae.runtime import (
    CheckpointError,
    CheckpointManager,
    DistContext,
    Precision,
    ResumableDistributedSampler,
    RunLogger,
    StopSignal,
    all_reduce_sum,
    broadcast_object,
    capture_rng_state,
    config_mismatch,
    init_distributed,
    load_checkpoint,
    resolve_resume,
    restore_rng_state,
    save_checkpoint,
    seed_everything,
)
from nvae.runtime import checkpoint as checkpoint_module
from nvae.runtime.flags import DefaultsHelpFormatter
from tests.helpers import run_script


def _payload(step: int, kind: str = "nvae") -> dict:
    """A small checkpoint payload following the conventions."""
    return {"kind": kind, "format_version": 1, "config": json.dumps({"num_channels": 32}), "step": step,
            "model": {"w": torch.full((3,), float(step))}, "rng": capture_rng_state()}


# ---- checkpoints ---------------------------------------------------------------------------------


def test_atomic_save_keeps_old_file_when_save_fails(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _payload(1))
    real_save = torch.save

    def failing_save(obj, f):
        f.write(b"partial garbage")  # a half-written file, as a crash mid-save leaves
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, _payload(2))
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    assert load_checkpoint(path, "nvae")["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # temp file removed


def test_save_refuses_payload_that_weights_only_cannot_load(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _payload(1))
    with pytest.raises(CheckpointError, match="weights_only"):
        save_checkpoint(path, {**_payload(2), "bad": np.float64(1.0)})
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_load_errors_name_the_problem(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="not found.*nope.pt"):
        load_checkpoint(missing, "nvae")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00\x01 not a zip")
    with pytest.raises(CheckpointError, match="not a checkpoint or corrupt"):
        load_checkpoint(corrupt, "nvae")
    good = tmp_path / "good.pt"
    save_checkpoint(good, _payload(3))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a checkpoint or corrupt"):
        load_checkpoint(truncated, "nvae")
    with pytest.raises(CheckpointError, match=r"good.pt is a 'nvae' \(stage-1\) checkpoint but a 'toyprior' "
                                             r"checkpoint is required; pass"):
        load_checkpoint(good, "toyprior")  # a kind nobody registered: named without a description
    checkpoint_module.register_checkpoint_kind("toyprior", "stage-2")  # as a prior package registers its kinds
    with pytest.raises(CheckpointError, match=r"but a 'toyprior' \(stage-2\) checkpoint is required; pass the "
                                             r"checkpoint.pt of a stage-2 run directory"):
        load_checkpoint(good, "toyprior")
    loaded = load_checkpoint(good, "nvae")
    assert loaded["step"] == 3 and torch.equal(loaded["model"]["w"], torch.full((3,), 3.0))


def test_rng_round_trip_through_weights_only_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # leave cached gaussians in both generators
    save_checkpoint(tmp_path / "c.pt", {"kind": "nvae", "rng": capture_rng_state()})
    expected = (random.random(), random.gauss(0, 1), np.random.standard_normal(3), torch.rand(3))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    restore_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    got = (random.random(), random.gauss(0, 1), np.random.standard_normal(3), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1]
    np.testing.assert_array_equal(got[2], expected[2])
    assert torch.equal(got[3], expected[3])


def test_manager_removes_only_the_temporaries_of_interrupted_saves(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save(_payload(10), 10)
    stale = [".checkpoint.pt.4242.0a1b2c3d.tmp", ".checkpoint_00000020.pt.4242.tmp"]
    kept = ["checkpoint.pt", "checkpoint_00000010.pt", "notes.tmp", ".checkpoint.pt.swp", "train.log"]
    for name in stale + kept[2:]:
        (tmp_path / name).write_bytes(b"half")
    assert sorted(p.name for p in manager.remove_stale_temporaries()) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    assert load_checkpoint(manager.latest_path(), "nvae")["step"] == 10


def test_manager_prunes_snapshots_and_resolves_resume(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    assert manager.latest_path() is None and resolve_resume("auto", tmp_path) is None
    assert resolve_resume(None, tmp_path) is None  # a fresh run in an empty directory
    for step in (10, 20, 30):
        manager.save(_payload(step), step)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint.pt", "checkpoint_00000020.pt", "checkpoint_00000030.pt"]
    assert load_checkpoint(manager.latest_path(), "nvae")["step"] == 30
    assert load_checkpoint(tmp_path / "checkpoint_00000020.pt", "nvae")["step"] == 20
    assert resolve_resume("auto", tmp_path) == tmp_path / "checkpoint.pt"
    with pytest.raises(CheckpointError, match="pass --resume auto"):
        resolve_resume(None, tmp_path)  # a fresh run would overwrite checkpoint.pt
    assert resolve_resume(str(tmp_path / "checkpoint_00000020.pt"), tmp_path).name == "checkpoint_00000020.pt"
    with pytest.raises(CheckpointError, match="not found"):
        resolve_resume(str(tmp_path / "checkpoint_00000010.pt"), tmp_path)
    # Overwriting the latest must not alter the snapshot it was linked to.
    manager.save(_payload(40), 40)
    assert load_checkpoint(tmp_path / "checkpoint_00000030.pt")["step"] == 30


def test_config_mismatch_messages():
    saved = {"num_channels": 32, "dataset": "mnist", "groups": [2, 2], "opt": {"lr": 0.01}}
    requested = {"num_channels": 64, "dataset": "mnist", "groups": (2, 2), "seed": None, "opt": {"lr": 0.02}}
    assert config_mismatch(saved, requested, ["num_channels", "dataset", "groups", "seed", "opt.lr"]) == [
        "num_channels: checkpoint has 32, command line asks 64",
        "opt.lr: checkpoint has 0.01, command line asks 0.02",
    ]


# ---- sampler -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,replicas", [(23, 3), (24, 4)])
def test_sampler_ranks_partition_a_permutation(n, replicas):
    shares = []
    for rank in range(replicas):
        sampler = ResumableDistributedSampler(n, replicas, rank, seed=5)
        sampler.set_epoch(1)
        shares.append(list(sampler))
        assert len(shares[-1]) == len(sampler) == n // replicas
    union = [i for share in shares for i in share]
    assert len(set(union)) == len(union) == (n // replicas) * replicas
    assert set(union) <= set(range(n))
    sampler.set_epoch(2)
    assert list(sampler) != shares[-1]  # a new epoch gives a new order


def test_resumed_sampler_replays_the_same_remaining_batches():
    batch_size, consumed_batches = 3, 2
    full = ResumableDistributedSampler(40, 2, 1, seed=7)
    full.set_epoch(4)
    full_batches = [b.tolist() for b in DataLoader(range(40), batch_size, sampler=full, drop_last=True)]
    resumed = ResumableDistributedSampler(40, 2, 1, seed=7)
    resumed.set_epoch(4, start_index=consumed_batches * batch_size)
    assert len(resumed) == 20 - consumed_batches * batch_size
    resumed_batches = [b.tolist() for b in DataLoader(range(40), batch_size, sampler=resumed, drop_last=True)]
    assert resumed_batches == full_batches[consumed_batches:]
    resumed.set_epoch(5)  # the next epoch starts from its beginning again
    assert len(list(resumed)) == 20


def test_sampler_without_drop_last_pads_and_without_shuffle_is_ordered():
    shares = [list(ResumableDistributedSampler(5, 2, r, shuffle=False, drop_last=False)) for r in range(2)]
    assert shares == [[0, 2, 4], [1, 3, 0]]


# ---- precision -----------------------------------------------------------------------------------


def test_precision_modes_on_cpu():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    fp32 = Precision.create("fp32", "cpu")
    with fp32.autocast():
        assert not torch.is_autocast_enabled("cpu")
        assert torch.equal(a @ b, torch.mm(a, b)) and (a @ b).dtype == torch.float32
    bf16 = Precision.create("bf16", torch.device("cpu"))
    with bf16.autocast():
        assert (a @ b).dtype == torch.bfloat16
    assert not fp32.scaler.is_enabled() and not bf16.scaler.is_enabled()
    assert Precision.create("fp16", "cpu").scaler.is_enabled()
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        Precision.create("fp8", "cpu")


def test_backward_and_step_skips_non_finite_steps():
    for mode in ("fp32", "fp16"):
        precision = Precision.create(mode, "cpu")
        w = torch.nn.Parameter(torch.ones(2))
        optimizer = torch.optim.SGD([w], lr=0.5)
        assert precision.backward_and_step((w ** 2).sum(), optimizer, max_grad_norm=100.0)
        assert torch.allclose(w.detach(), torch.zeros(2))  # w - 0.5 * 2w
        optimizer.zero_grad()
        assert not precision.backward_and_step((w * float("inf")).sum(), optimizer, max_grad_norm=1.0)
        assert torch.allclose(w.detach(), torch.zeros(2))


# ---- signals, distributed at world size 1, logging -----------------------------------------------


def test_stop_signal_sets_flag_and_uninstalls():
    previous = signal.getsignal(signal.SIGUSR1)
    stop = StopSignal()
    ctx = DistContext(0, 1, 0, torch.device("cpu"), None)
    assert not stop.requested and not stop.sync(ctx)
    os.kill(os.getpid(), signal.SIGUSR1)
    assert stop.requested and stop.sync(ctx) and stop.signal_name == "SIGUSR1"
    stop.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == previous


def test_single_process_context(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.is_distributed) == (0, 1, True, False)
    t = torch.ones(2)
    assert all_reduce_sum(t, ctx) is t and torch.equal(t, torch.ones(2))
    assert broadcast_object({"a": 1}, ctx) == {"a": 1}
    assert seed_everything(3, DistContext(2, 4, 2, torch.device("cpu"), None)) == 14


def test_run_logger_writes_files_only_when_enabled(tmp_path):
    with RunLogger(tmp_path / "off", enabled=False) as off:
        off.info("x"), off.scalars(0, {"a": 1.0}), off.save_options({"a": 1})
    assert not (tmp_path / "off").exists()
    logger = RunLogger(tmp_path / "run", enabled=True)
    logger.info("hello")
    logger.scalars(5, {"loss": torch.tensor(1.5), "bad": float("nan")})
    logger.images("samples", torch.rand(3, 1, 4, 4), 5, png_path="samples/step5.png")
    logger.save_options({"lr": 0.1, "run_dir": tmp_path})
    logger.close()
    run = tmp_path / "run"
    assert "hello" in (run / "train.log").read_text()
    assert json.loads((run / "metrics.jsonl").read_text()) == {"step": 5, "loss": 1.5, "bad": None}
    assert (run / "samples/step5.png").read_bytes()[:4] == b"\x89PNG"
    options = json.loads((run / "options.json").read_text())
    assert options["lr"] == 0.1 and options["environment"]["torch"] == torch.__version__
    assert options["environment"]["torch_threads"] == torch.get_num_threads()  # reruns depend on it
    assert any((run / "tb").iterdir())


_RSS_PROBE = """
import sys
import torch
from nvae.runtime.process import keep_cpu_memory_mapped

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

if sys.argv[1] == "keep":
    assert keep_cpu_memory_mapped()
x = torch.ones(50 * 2**20)  # 200 MB, touched
held = rss_mb()
del x
print(held - rss_mb())
"""


def test_cpu_runs_keep_freed_tensor_memory_for_reuse():
    """Plain glibc unmaps a freed 200 MB tensor at once; after keep_cpu_memory_mapped the heap keeps it."""
    def released_mb(mode: str) -> float:
        done = subprocess.run([sys.executable, "-c", _RSS_PROBE, mode], capture_output=True, text=True, check=True,
                              cwd=str(Path(__file__).resolve().parents[1]))
        return float(done.stdout.strip())

    assert released_mb("plain") > 150
    assert released_mb("keep") < 20


# ---- command-line help ---------------------------------------------------------------------------


def test_help_states_each_default_once():
    """A default is appended where the help does not give one; never "(default: None)", never a second one."""
    parser = argparse.ArgumentParser(formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="training steps")
    parser.add_argument("--groups", default=None, help="groups with a prior (default: the top group)")
    parser.add_argument("--checkpoint", default=None, help="checkpoint to read")
    parser.add_argument("--batch", type=int, default=64, help="images per call (default: 64 per process)")
    text = " ".join(parser.format_help().split())
    assert "training steps (default: 5)" in text
    assert "(default: None)" not in text
    assert "(default: the top group)" in text and text.count("default: the top group") == 1
    assert "checkpoint to read" in text and "checkpoint to read (default" not in text
    assert text.count("default: 64") == 1


@pytest.mark.parametrize("script", ["train_nvae.py", "train_nvae_evalp.py", "generate.py", "evaluate.py"])
def test_entry_point_help_never_prints_a_none_default(script):
    """Every flag of the entry points has a help text, and none ends in a misleading "(default: None)"."""
    done = run_script(f"scripts/{script}", "--help", timeout=120)
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert "default: None)" not in text  # argparse's "(default: None)" and the presets' "(preset or default: None)"
    lines = done.stdout.splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        if line.startswith("  -"):  # "  --flag METAVAR   help", or the help on the next, deeper-indented line
            same_line = len(re.split(r"\s{2,}", line.strip(), maxsplit=1)) == 2
            next_line = i + 1 < len(lines) and lines[i + 1].startswith(" " * 8) and not lines[i + 1].strip().startswith("-")
            if not (same_line or next_line):
                undocumented.append(line.strip())
    assert not undocumented, f"{script}: flags without help: {undocumented}"
