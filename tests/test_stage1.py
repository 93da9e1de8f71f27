"""Stage-1 training: exact resume, DDP equivalence, learning, and the entry point's errors."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from nvae.runtime import CheckpointError, RunLogger, init_distributed, load_checkpoint
from nvae.runtime.signals import PREEMPTED_EXIT_CODE
from nvae.train import train_nvae
from tests.helpers import CPU, StopAt, free_port, run_script, tiny_run_config


def _train(run_dir, cfg, resume=None, stop=None):
    torch.manual_seed(cfg.train.seed)
    with RunLogger(run_dir, True) as logger:
        return train_nvae(cfg, CPU, run_dir, logger, resume, stop)


def test_resume_equals_uninterrupted_run(tmp_path):
    cfg = tiny_run_config(max_steps=8)
    assert _train(tmp_path / "full", cfg) == 0
    # Interrupted after 4 of 8 steps (as a pre-emption would), then resumed in a fresh "process".
    assert _train(tmp_path / "split", cfg, stop=StopAt(4)) == PREEMPTED_EXIT_CODE
    assert load_checkpoint(tmp_path / "split" / "checkpoint.pt", "nvae")["step"] == 4
    torch.manual_seed(999)  # the resumed run must not depend on the process's fresh RNG
    assert _train(tmp_path / "split", cfg, resume=tmp_path / "split" / "checkpoint.pt") == 0
    full = load_checkpoint(tmp_path / "full" / "checkpoint.pt", "nvae")
    split = load_checkpoint(tmp_path / "split" / "checkpoint.pt", "nvae")
    assert full["step"] == split["step"] == 8
    for key, value in full["task"]["model"].items():
        assert torch.equal(value, split["task"]["model"][key]), key
    for key, value in full["task"]["spectral"].items():
        assert torch.equal(value, split["task"]["spectral"][key]), key
    losses = [[json.loads(line) for line in open(tmp_path / d / "metrics.jsonl")] for d in ("full", "split")]
    last = [[r["loss"] for r in rs if r["step"] == 8 and "loss" in r] for rs in losses]
    assert last[0] == last[1] and last[0]


def _ddp_worker(rank, port, out_dir):
    """One rank of a 2-process run: one step of NVAETask.train_step on its half of a fixed batch."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from nvae.runtime import Precision, shutdown_and_exit
    from nvae.train import NVAETask
    from nvae.data import get_dataset

    ctx = init_distributed("cpu")
    cfg = tiny_run_config()
    torch.manual_seed(0)  # identical initial weights on both ranks (DDP also broadcasts rank 0's)
    test_set = get_dataset("synthetic", "test")
    task = NVAETask(cfg, ctx, Precision.create("fp32", "cpu"), 10, 10, test_set, False, RunLogger(out_dir, False))
    batch = torch.stack([test_set[i] for i in range(16)])
    torch.manual_seed(100 + rank)  # the latent noise of this half
    task.train_step(batch[8 * rank:8 * (rank + 1)], step=0)
    if rank == 0:
        grads = {name: p.grad for name, p in task.model.named_parameters()}
        torch.save(grads, os.path.join(out_dir, "ddp.pt"))
    shutdown_and_exit(0)


def test_ddp_step_matches_single_process_reference(tmp_path):
    """DDP averages the two ranks' gradients; BatchNorm statistics, KL balancing weights and the latent
    noise are per rank. So the gradient of one DDP step must equal a single process that computes the
    loss on each half separately (same noise seeds, spectral vectors restored in between so they advance
    once) and averages the two gradients: same maths, only the summation order differs."""
    mp.spawn(_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    from nvae.runtime import Precision
    from nvae.train import NVAETask
    from nvae.data import get_dataset

    cfg = tiny_run_config()
    torch.manual_seed(0)
    test_set = get_dataset("synthetic", "test")
    task = NVAETask(cfg, CPU, Precision.create("fp32", "cpu"), 10, 10, test_set, False, RunLogger(tmp_path, False))
    batch = torch.stack([test_set[i] for i in range(16)])
    spectral_state = {k: v.clone() for k, v in task.spectral.state_dict().items()}
    grads = None
    for half in range(2):
        task.spectral.load_state_dict(spectral_state)
        task.model.train()
        torch.manual_seed(100 + half)
        loss, _ = task.loss(batch[8 * half:8 * (half + 1)], step=0)
        task.optimizer.zero_grad()
        loss.backward()
        g = [p.grad.clone() for p in task.model.parameters()]
        grads = g if grads is None else [a + b for a, b in zip(grads, g)]
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    # Gradients that are zero in exact arithmetic (conv biases before BatchNorm) are pure rounding noise,
    # hence an absolute tolerance relative to the largest gradient.
    atol = 1e-6 * max(g.abs().max() for g in grads) / 2
    for (name, _), g in zip(task.model.named_parameters(), grads):
        reference = g / 2
        assert torch.allclose(reference, ddp[name], rtol=1e-4, atol=atol), (name, (reference - ddp[name]).abs().max())


def test_two_process_torchrun_training_runs(tmp_path):
    out = run_script("scripts/train_nvae.py", "--save", str(tmp_path), "--dataset", "synthetic",
                     "--num-channels", "4", "--batch-size", "8", "--max-steps", "4", "--eval-batches", "1",
                     "--bn-readjust-batches", "1", "--device", "cpu", torchrun=2)
    assert out.returncode == 0, out.stderr[-3000:]
    payload = load_checkpoint(tmp_path / "checkpoint.pt", "nvae")
    assert payload["world_size"] == 2 and payload["step"] == 4 and len(payload["rng"]) == 2
    assert (tmp_path / "samples.png").is_file()


def test_tiny_mnist_training_lowers_validation_nelbo(tmp_path):
    from nvae.config import preset
    import dataclasses

    cfg = preset("tiny")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, dataset="mnist", max_steps=200, batch_size=32,
                                                             eval_every=200, eval_batches=8, log_every=50,
                                                             bn_readjust_batches=2, ckpt_every=1000))
    with RunLogger(tmp_path, True) as logger:
        from nvae.data import get_dataset
        from nvae.runtime import Precision
        from nvae.train import NVAETask

        test_set = get_dataset("mnist", "test")
        torch.manual_seed(0)
        untrained = NVAETask(cfg, CPU, Precision.create("fp32", "cpu"), 200, 1875, test_set, True, logger)
        before = untrained.evaluate(0)["nelbo"]
        torch.manual_seed(0)
        assert train_nvae(cfg, CPU, tmp_path, logger) == 0
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    after = [r["val/nelbo"] for r in records if "val/nelbo" in r][-1]
    # An untrained decoder costs ~ 28*28*ln2 = 543 nats; 200 steps must get well below it.
    assert after < 0.6 * before, (before, after)


def test_wrong_checkpoint_kind_and_missing_data_fail_clearly(tmp_path):
    fake = {"kind": "evalp", "format_version": 1, "config": "{}", "step": 0}
    torch.save(fake, tmp_path / "checkpoint.pt")
    out = run_script("scripts/train_nvae.py", "--save", str(tmp_path), "--resume", "auto", "--dataset", "synthetic")
    assert out.returncode == 2
    # The stage-1 entry point never imports a prior package, so a prior's kind is named without a description.
    assert "is a 'evalp' checkpoint but a 'nvae' (stage-1) checkpoint is required" in out.stderr
    out = run_script("scripts/train_nvae.py", "--save", str(tmp_path / "r"), "--dataset", "fashion_mnist",
                     "--data-root", str(tmp_path / "nowhere"))
    assert out.returncode == 2 and "nowhere" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_resume_with_contradicting_architecture_is_an_error(tmp_path):
    cfg = tiny_run_config(max_steps=2)
    assert _train(tmp_path, cfg) == 0
    out = run_script("scripts/train_nvae.py", "--save", str(tmp_path), "--resume", "--dataset", "synthetic",
                     "--num-channels", "16")
    assert out.returncode == 2
    assert "model.num_channels: checkpoint has 4, command line asks 16" in out.stderr
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "options.json", "nvae")
