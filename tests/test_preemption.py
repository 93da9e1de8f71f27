"""Pre-emption with real signals on 2-process gloo runs under torchrun (docs/cluster.md, section 4).

Every rank stops at the same step boundary, rank 0 checkpoints there, each rank exits with
PREEMPTED_EXIT_CODE, and the same command with `--resume auto` finishes the run. torchrun itself exits 1
whenever it was signalled or a worker failed: the workers' 75 shows only in its failure summary.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nvae.runtime import load_checkpoint
from nvae.runtime.signals import PREEMPTED_EXIT_CODE
from tests.helpers import ROOT

TRAIN = ["scripts/train_nvae.py", "--dataset", "synthetic", "--num-channels", "4", "--batch-size", "8",
         "--eval-batches", "1", "--bn-readjust-batches", "1", "--log-every", "1", "--device", "cpu"]
EPOCH = 16  # steps per epoch: 256 synthetic images / 2 ranks / batch 8
TORCHRUN_STATUS = 1  # what torchrun returns after forwarding a stop signal or when any worker failed
WAIT_S = 300  # bound on every wait; generous for a loaded 2-core machine


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def children(pid: int) -> dict[int, int]:
    """pid -> RANK of the direct children of `pid` that are torchrun workers."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != pid:
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):  # gone meanwhile, or not ours
            continue
        ranks = [int(v.split(b"=", 1)[1]) for v in env if v.startswith(b"RANK=")]
        if ranks:
            found[int(entry.name)] = ranks[0]
    return found


def _torchrun(*args: str) -> list[str]:
    # No --master_port: a single-node torchrun then picks a free port itself.
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", *args]


class Launch:
    """A training process started in the background; stopped (and its workers killed) on exit."""

    def __init__(self, cmd: list[str], log: Path, **env: str) -> None:
        self.log = log
        self._out = open(log, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**_env(), **env}, stdout=self._out, stderr=subprocess.STDOUT)
        self.worker_pids: dict[int, int] = {}

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_step(self, run_dir: Path, step: int) -> None:
        """Block until metrics.jsonl records training step >= `step` (the run must not end before)."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"run ended early ({self.proc.returncode}):\n{self.output()[-3000:]}"
            if any(r.get("step", 0) >= step for r in _train_records(run_dir)):
                return
            time.sleep(0.1)
        pytest.fail(f"no step {step} within {WAIT_S} s:\n{self.output()[-3000:]}")

    def workers(self) -> dict[int, int]:
        """rank -> pid of the worker processes torchrun started."""
        found = {rank: pid for pid, rank in children(self.proc.pid).items()}
        assert sorted(found) == [0, 1], found
        self.worker_pids = found
        return found

    def wait(self) -> int:
        return self.proc.wait(timeout=WAIT_S)

    def __enter__(self) -> "Launch":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            # Workers run in sessions of their own: if torchrun is killed they live on, so note them first.
            self.worker_pids.update({rank: pid for pid, rank in children(self.proc.pid).items()})
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.worker_pids.values():  # never orphan a worker, whatever went wrong
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._out.close()


def _train_records(run_dir: Path) -> list[dict]:
    """Training-step records of metrics.jsonl (evaluation records have no 'loss')."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written right now
            continue
        if "loss" in record:
            records.append(record)
    return records


def _stop_step(run_dir: Path, pattern: str, launcher_output: str) -> int:
    """The step named by rank 0's stop message in train.log (on failure: the log, the launcher's output and
    the checkpoints present, which tell a rank that died from one that never got the signal)."""
    log = (run_dir / "train.log").read_text()
    match = re.search(pattern + r": checkpoint written at step (\d+) to (\S+); resume with --resume auto", log)
    assert match, (f"train.log:\n{log[-2000:]}\nlauncher output:\n{launcher_output[-6000:]}\n"
                   f"files: {sorted(p.name for p in run_dir.iterdir())}")
    assert match.group(2) == str(run_dir / "checkpoint.pt")
    return int(match.group(1))


def _check_checkpoint_at(run_dir: Path, step: int) -> None:
    """Rank 0 wrote the rolling and the numbered checkpoint at `step`, with both ranks' RNG states in it."""
    payload = load_checkpoint(run_dir / "checkpoint.pt", "nvae")
    assert payload["step"] == step and payload["world_size"] == 2
    # The states are gathered collectively inside save(): rank 1 was at the same boundary, with its own stream.
    assert len(payload["rng"]) == 2
    assert not torch.equal(payload["rng"][0]["torch"], payload["rng"][1]["torch"])
    assert (run_dir / f"checkpoint_{step:08d}.pt").is_file()
    assert not list(run_dir.glob(".*.tmp")), "a temporary checkpoint file was left behind"


def test_sigterm_to_torchrun_checkpoints_and_resume_auto_finishes(tmp_path):
    """The path a scheduler takes (SIGTERM to the launcher), with DataLoader worker processes in the group."""
    run_dir = tmp_path / "run"
    total = EPOCH + 8  # the resumed part crosses an epoch boundary
    # One command line for the first start and every restart, as docs/cluster.md recommends.
    cmd = _torchrun(*TRAIN, "--save", str(run_dir), "--max-steps", str(total), "--num-workers", "1",
                    "--resume", "auto")
    with Launch(cmd, tmp_path / "first.log") as first:
        first.wait_for_step(run_dir, 3)
        first.proc.send_signal(signal.SIGTERM)
        status = first.wait()
        output = first.output()
    assert status == TORCHRUN_STATUS, output[-3000:]
    assert "got signal: 15" in output  # torchrun's SignalException after it forwarded the signal
    assert "killed by signal" not in output, output[-3000:]  # loader workers must not die before the checkpoint
    step = _stop_step(run_dir, "received SIGTERM", output)
    assert 3 <= step < total
    _check_checkpoint_at(run_dir, step)
    assert [r["step"] for r in _train_records(run_dir)] == list(range(1, step + 1))

    with Launch(cmd, tmp_path / "second.log") as second:
        status = second.wait()
        output = second.output()
    assert status == 0, output[-3000:]
    assert f"resumed from {run_dir / 'checkpoint.pt'} at step {step} " in (run_dir / "train.log").read_text()
    assert load_checkpoint(run_dir / "checkpoint.pt", "nvae")["step"] == total
    # Across both starts every step ran exactly once.
    assert [r["step"] for r in _train_records(run_dir)] == list(range(1, total + 1))


def test_sigusr1_to_one_rank_stops_every_rank_with_status_75(tmp_path):
    """A signal that reaches only rank 1 (e.g. a kill of one pid) still stops both ranks at one boundary."""
    run_dir = tmp_path / "run"
    with Launch(_torchrun(*TRAIN, "--save", str(run_dir), "--max-steps", "100000"), tmp_path / "log") as launch:
        launch.wait_for_step(run_dir, 3)
        os.kill(launch.workers()[1], signal.SIGUSR1)
        status = launch.wait()
        output = launch.output()
    assert status == TORCHRUN_STATUS, output[-3000:]
    # torchrun's failure summary lists each rank's own exit status.
    assert len(re.findall(rf"exitcode\s*:\s*{PREEMPTED_EXIT_CODE} ", output)) == 2, output[-3000:]
    step = _stop_step(run_dir, "received a stop request", output)  # rank 0 only learnt of it through the all-reduce
    _check_checkpoint_at(run_dir, step)
    assert max(r["step"] for r in _train_records(run_dir)) == step


def test_sigusr1_to_torchrun_is_forwarded_when_listed_in_signals_to_handle(tmp_path):
    """torchrun ignores SIGUSR1 by default (it dies of it); --signals-to-handle makes it forward it."""
    run_dir = tmp_path / "run"
    cmd = _torchrun("--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", *TRAIN, "--save", str(run_dir),
                    "--max-steps", "100000")
    with Launch(cmd, tmp_path / "log") as launch:
        launch.wait_for_step(run_dir, 3)
        launch.workers()  # recorded, so they are killed if the forwarding did not work
        launch.proc.send_signal(signal.SIGUSR1)
        status = launch.wait()
        output = launch.output()
    assert status == TORCHRUN_STATUS, output[-3000:]
    step = _stop_step(run_dir, "received SIGUSR1", output)
    _check_checkpoint_at(run_dir, step)

