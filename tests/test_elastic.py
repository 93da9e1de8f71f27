"""Elastic restarts under `torchrun --max-restarts` and crashes in the middle of a checkpoint write.

A rank is killed by the opt-in fault injection (nvae/runtime/faults.py): the job must restart from the
last checkpoint and finish. torch 2.14.1 shares the rendezvous store with the workers and keeps stale
keys across restarts, so restarted gloo/NCCL groups can fail to connect or hang;
TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (docs/cluster.md, section 5) is part of the tested setup.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from nvae.runtime import load_checkpoint
from tests.test_preemption import Launch

TRAIN = ["scripts/train_nvae.py", "--dataset", "synthetic", "--num-channels", "4", "--batch-size", "8",
         "--max-steps", "12", "--ckpt-every", "4", "--eval-batches", "1", "--bn-readjust-batches", "1",
         "--log-every", "1", "--device", "cpu", "--resume", "auto"]
KILL_AT = 7  # rank 1 dies before step 7: the last checkpoint is the one of step 4


def _run(cmd: list[str], log: Path, **env: str) -> tuple[int, str]:
    """Run to the end (bounded; workers are cleaned up whatever happens): exit status and output."""
    with Launch(cmd, log, **env) as launch:
        status = launch.wait()
        return status, launch.output()


def _torchrun(*args: str) -> list[str]:
    # c10d rendezvous on a free port (no --master_port): the static one cannot restart workers reliably.
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", *args]


def _train_steps(run_dir) -> list[int]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r]


@pytest.fixture(scope="module")
def restarted_run(tmp_path_factory):
    """A 2-process run whose rank 1 exits with status 1 before step 7, under --max-restarts=1."""
    base = tmp_path_factory.mktemp("elastic")
    run_dir = base / "run"
    status, output = _run(_torchrun("--max-restarts=1", *TRAIN, "--save", str(run_dir)), base / "log",
                          NVAE_FAULT_KILL_AT_STEP=str(KILL_AT), NVAE_FAULT_RANK="1",
                          TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    return run_dir, status, output


def test_killed_rank_restarts_from_last_checkpoint_and_finishes(restarted_run):
    run_dir, status, output = restarted_run
    assert status == 0, output[-4000:]
    assert "FAULT INJECTION (rank 1): exit 1 before step 7: exiting now" in output
    # torchrun saw a failure (the killed rank, or its partner whose collective broke first), then restarted.
    assert re.search(r"failed \(exitcode: 1\) local_rank: [01] ", output), output[-4000:]
    log = (run_dir / "train.log").read_text()
    assert f"resumed from {run_dir / 'checkpoint.pt'} at step 4 (epoch 0, batch 4)" in log
    assert "elastic restarts are spared" in log  # the second attempt knew it was a restart
    payload = load_checkpoint(run_dir / "checkpoint.pt", "nvae")
    assert payload["step"] == 12 and payload["world_size"] == 2
    assert sorted(p.name for p in run_dir.glob("checkpoint_*.pt")) == [
        "checkpoint_00000004.pt", "checkpoint_00000008.pt", "checkpoint_00000012.pt"]
    # The first attempt logged steps 1-6; the restart redid 5-6 from the step-4 checkpoint, then went on.
    assert _train_steps(run_dir) == list(range(1, KILL_AT)) + list(range(5, 13))


def test_restarted_run_equals_uninterrupted_run(restarted_run, tmp_path):
    run_dir, status, _ = restarted_run
    assert status == 0
    status, output = _run(_torchrun(*TRAIN, "--save", str(tmp_path / "ref")), tmp_path / "log")
    assert status == 0, output[-3000:]
    restarted = load_checkpoint(run_dir / "checkpoint.pt", "nvae")["task"]["model"]
    uninterrupted = load_checkpoint(tmp_path / "ref" / "checkpoint.pt", "nvae")["task"]["model"]
    assert all(torch.equal(value, restarted[key]) for key, value in uninterrupted.items())


CRASH_ON_SECOND_SAVE = """
import os, runpy, sys, torch
real_save, saves = torch.save, []
def dying_save(obj, f, *args, **kwargs):
    saves.append(getattr(f, "name", ""))
    if len(saves) == 2:  # the second checkpoint: half a file on disk, then the process is gone
        f.write(b"half a checkpoint")
        f.flush()
        os._exit(137)
    return real_save(obj, f, *args, **kwargs)
torch.save = dying_save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_crash_during_checkpoint_write_keeps_previous_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    args = ["scripts/train_nvae.py", "--dataset", "synthetic", "--num-channels", "4", "--batch-size", "8",
            "--max-steps", "6", "--ckpt-every", "2", "--eval-batches", "1", "--bn-readjust-batches", "1",
            "--device", "cpu", "--save", str(run_dir)]
    status, output = _run([sys.executable, "-c", CRASH_ON_SECOND_SAVE, *args], tmp_path / "crash.log")
    assert status == 137, output[-3000:]
    assert list(run_dir.glob(".checkpoint.pt.*.tmp")), "the crash should have happened mid-write"
    # The rolling checkpoint and its snapshot are still the complete step-2 ones.
    for name in ("checkpoint.pt", "checkpoint_00000002.pt"):
        assert load_checkpoint(run_dir / name, "nvae")["step"] == 2
    status, output = _run([sys.executable, *args, "--resume", "auto"], tmp_path / "resume.log")
    assert status == 0, output[-3000:]
    log = (run_dir / "train.log").read_text()
    assert f"resumed from {run_dir / 'checkpoint.pt'} at step 2 " in log
    assert "left by a checkpoint save that was killed" in log
    assert not list(run_dir.glob(".*.tmp")), "the restart should have removed the half-written file"
    assert load_checkpoint(run_dir / "checkpoint.pt", "nvae")["step"] == 6
