"""Non-finite steps: skipped and counted, a run of them stops the job with NON_FINITE_EXIT_CODE and leaves
the last good checkpoint intact, and DDP ranks decide together (gradients are all-reduced before the check).

NaN losses come from the opt-in fault injection (NVAE_FAULT_NAN_AT_STEP, nvae/runtime/faults.py), which
makes every backward pass of the chosen steps differentiate loss * NaN.
"""
from __future__ import annotations

import copy
import json
import re

import pytest
import torch

from nvae.runtime import RunLogger, load_checkpoint
from nvae.runtime.faults import FaultPlan
from nvae.runtime.loop import NON_FINITE_EXIT_CODE
from nvae.train import NVAETask, train_nvae
from tests.helpers import CPU, run_script, tiny_run_config


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _state(task: NVAETask) -> dict[str, torch.Tensor]:
    """Parameters and optimiser state: what a skipped step must leave untouched."""
    state = {f"param/{k}": v.detach().clone() for k, v in task.model.named_parameters()}
    for index, slots in copy.deepcopy(task.optimizer.state_dict()["state"]).items():
        state.update({f"opt/{index}/{k}": torch.as_tensor(v) for k, v in slots.items()})
    return state


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def spy(monkeypatch):
    """Record (state before, state after, returned metrics, loss scale after) of every NVAETask.train_step."""
    calls: list[tuple] = []
    original = NVAETask.train_step

    def recording(self, batch, step):
        before = _state(self)
        out = original(self, batch, step)
        calls.append((before, _state(self), out, self.precision.scaler.get_scale()))
        return out

    monkeypatch.setattr(NVAETask, "train_step", recording)
    return calls


def _train(run_dir, **train) -> int:
    torch.manual_seed(0)
    with RunLogger(run_dir, True) as logger:
        return train_nvae(tiny_run_config(**train), CPU, run_dir, logger)


def test_fault_plan_from_environment():
    assert FaultPlan.from_env({}) is None
    plan = FaultPlan.from_env({"NVAE_FAULT_NAN_AT_STEP": "3, 9-11", "NVAE_FAULT_RANK": "all"})
    assert [s for s in range(1, 13) if plan.poisons(s)] == [3, 9, 10, 11] and plan.rank is None
    assert plan.describe() == "FAULT INJECTION (every rank): NaN loss at steps 3,9-11"
    plan = FaultPlan.from_env({"NVAE_FAULT_KILL_AT_STEP": "7", "TORCHELASTIC_RESTART_COUNT": "1"})
    assert (plan.kill_at_step, plan.rank, plan.exit_code, plan.first_attempt) == (7, 0, 1, False)
    for bad in ({"NVAE_FAULT_NAN_AT_STEP": "0"}, {"NVAE_FAULT_NAN_AT_STEP": "5-3"}, {"NVAE_FAULT_NAN_AT_STEP": "x"},
                {"NVAE_FAULT_KILL_AT_STEP": "-1"}, {"NVAE_FAULT_KILL_AT_STEP": "3", "NVAE_FAULT_RANK": "one"}):
        with pytest.raises(ValueError, match="NVAE_FAULT_"):
            FaultPlan.from_env(bad)


# fp16: the gradient scaler starts at 2**16 and halves on every overflow; this model needs 9 skipped steps
# before its first real one, so the injected NaN comes after those.
@pytest.mark.parametrize("precision, nan_step", [("fp32", 3), ("bf16", 3), ("fp16", 12)])
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler:UserWarning")  # skipped steps still advance it
def test_single_nan_step_is_skipped_counted_and_changes_nothing(tmp_path, monkeypatch, spy, precision, nan_step):
    monkeypatch.setenv("NVAE_FAULT_NAN_AT_STEP", str(nan_step))
    total = nan_step + 2
    assert _train(tmp_path, max_steps=total, precision=precision) == 0
    skipped = [out is None for _, _, out, _ in spy]
    assert len(skipped) == total and skipped[nan_step - 2:] == [False, True, False, False], skipped
    before, after, _, scale = spy[nan_step - 1]
    assert _same(before, after)  # the NaN step left parameters and optimiser state as they were
    assert not _same(*spy[nan_step][:2])  # ... and the next step trains again
    if precision == "fp16":  # the scaler saw the non-finite gradients and halved its scale
        assert scale == spy[nan_step - 2][3] / 2
    log = (tmp_path / "train.log").read_text()
    assert f"step {nan_step}: non-finite loss or gradient, step skipped (1 in a row)" in log
    records = _records(tmp_path)
    assert {"step": nan_step, "skipped_steps": sum(skipped)} in records  # a running count, for TensorBoard
    trained = [r["step"] for r in records if "loss" in r]
    assert nan_step not in trained and total in trained
    assert load_checkpoint(tmp_path / "checkpoint.pt", "nvae")["step"] == total


def test_run_of_nan_steps_stops_with_status_3_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, spy):
    monkeypatch.setenv("NVAE_FAULT_NAN_AT_STEP", "5-100")
    status = _train(tmp_path, max_steps=20, ckpt_every=2, max_bad_steps=3)
    assert status == NON_FINITE_EXIT_CODE == 3
    assert len(spy) == 7  # stopped right after the third bad step in a row
    latest = tmp_path / "checkpoint.pt"
    assert (f"stopping at step 7: 3 non-finite steps in a row (--max-bad-steps 3); last good checkpoint: "
            f"{latest} (step 4)") in (tmp_path / "train.log").read_text()
    payload = load_checkpoint(latest, "nvae")
    assert payload["step"] == 4
    assert latest.read_bytes() == (tmp_path / "checkpoint_00000004.pt").read_bytes()
    good = spy[3][1]  # the state right after step 4
    assert all(torch.equal(v, good[f"param/{k}"]) for k, v in payload["task"]["model"].items() if f"param/{k}" in good)
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*.pt")) == ["checkpoint_00000002.pt",
                                                                       "checkpoint_00000004.pt"]
    assert not (tmp_path / "samples.png").exists()


def test_nan_at_the_last_step_still_ends_the_run_there(tmp_path, monkeypatch):
    """The loop used to `continue` past a skipped last step and train on until the next good one."""
    monkeypatch.setenv("NVAE_FAULT_NAN_AT_STEP", "6")
    assert _train(tmp_path, max_steps=6, ckpt_every=100) == 0
    assert load_checkpoint(tmp_path / "checkpoint.pt", "nvae")["step"] == 6
    assert max(r["step"] for r in _records(tmp_path)) == 6


def test_ddp_ranks_skip_and_stop_at_the_same_step(tmp_path):
    """NaN on rank 1 only: the all-reduced gradient is NaN on both ranks, so rank 0 skips too, and both exit 3."""
    out = run_script("scripts/train_nvae.py", "--save", str(tmp_path), "--dataset", "synthetic", "--num-channels", "4",
                     "--batch-size", "8", "--max-steps", "20", "--ckpt-every", "4", "--max-bad-steps", "3",
                     "--eval-batches", "1", "--bn-readjust-batches", "1", "--device", "cpu", torchrun=2,
                     env={"NVAE_FAULT_NAN_AT_STEP": "3,6-8", "NVAE_FAULT_RANK": "1"})
    assert out.returncode == 1, out.stderr[-3000:]  # torchrun's status for any failed worker
    assert len(re.findall(rf"exitcode\s*:\s*{NON_FINITE_EXIT_CODE} ", out.stderr)) == 2, out.stderr[-3000:]
    log = (tmp_path / "train.log").read_text()  # written by rank 0, which had finite losses throughout
    assert "step 3: non-finite loss or gradient, step skipped (1 in a row)" in log
    assert f"stopping at step 8: 3 non-finite steps in a row (--max-bad-steps 3); last good checkpoint: " \
           f"{tmp_path / 'checkpoint.pt'} (step 4)" in log
    assert load_checkpoint(tmp_path / "checkpoint.pt", "nvae")["step"] == 4


def test_skipped_step_leaves_batchnorm_statistics_finite(tmp_path):
    from nvae.data import get_dataset
    from nvae.runtime import Precision

    torch.manual_seed(0)
    test_set = get_dataset("synthetic", "test")
    task = NVAETask(tiny_run_config(), CPU, Precision.create("fp32", "cpu"), 10, 10, test_set, False,
                    RunLogger(tmp_path, False))
    x = torch.stack([test_set[i] for i in range(8)])
    assert task.train_step(x, 0) is not None
    x[0, 0, 0, 0] = float("nan")  # one corrupt pixel, as a bad record would give
    assert task.train_step(x, 1) is None
    buffers = [v for k, v in task.model.state_dict().items() if "running" in k]
    assert buffers and all(torch.isfinite(v).all() for v in buffers)
