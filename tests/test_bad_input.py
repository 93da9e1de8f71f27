"""Bad input wherever a user types one: each case exits non-zero with a message naming the problem and
leaves no checkpoint, sample grid or half-written file behind. docs/errors.md lists the same cases.

The entry points run in-process (a subprocess costs seconds of start-up per case): scripts' main() with
run_entry's final os._exit replaced by an exception carrying the status.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import io
import re
import signal
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

import nvae.runtime.process
from evalp_prior.config import EVaLPConfig, EVaLPRunConfig
from evalp_prior.train import train_evalp, vae_fingerprint
from nvae.data.lmdb_store import LEN_KEY, encode_image, record_key, write_lmdb
from nvae.runtime import RunLogger
from nvae.train import train_nvae
from nvae.trained import load_trained_nvae
from tests.helpers import CPU, ROOT, run_script, tiny_run_config, train_prior_checkpoint

# Two inputs below build zero-size layers on purpose; torch warns before the run fails.
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")

DOC = ROOT / "docs" / "errors.md"
S1 = ["--save", "{out}", "--dataset", "synthetic", "--num-channels", "4", "--batch-size", "8", "--max-steps", "2",
      "--eval-batches", "1", "--bn-readjust-batches", "1", "--device", "cpu"]
S2 = ["--save", "{out}", "--vae", "{vae}", "--batch-size", "8", "--max-steps", "2", "--n-critic", "2",
      "--energy-hidden", "8", "--sampler-hidden", "8", "--num-couplings", "2", "--eval-batches", "1",
      "--bn-readjust-batches", "1", "--device", "cpu"]
GEN = ["--checkpoint", "{vae}", "--n", "2", "--bn-batches", "0", "--out", "{out}/x.png", "--device", "cpu"]
EVAL = ["--checkpoint", "{vae}", "--timing", "--timing-repeats", "1", "--out", "{out}/r.json", "--device", "cpu"]
PREP = ["--dataset", "lmdb", "--src", "{images}", "--out", "{out}/db", "--no-progress"]


def LMDB(root: str, dataset: str = "lmdb") -> list[str]:
    """Stage-1 flags that train one epoch (5 steps) on an LMDB data set."""
    return ["--save", "{out}", "--dataset", dataset, "--data-root", root, "--num-channels", "4", "--batch-size", "8",
            "--max-steps", "5", "--eval-batches", "1", "--bn-readjust-batches", "1", "--device", "cpu"]


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input: which script, its arguments ({placeholders} filled per test), the expected outcome."""

    id: str
    script: str
    argv: list[str]
    status: int
    message: str  # must appear in stderr; also the message cell of the case's row in docs/errors.md


CASES = [
    # ---- stage 1: scripts/train_nvae.py
    Case("s1-data-root-fashion", "train_nvae", S1 + ["--dataset", "fashion_mnist", "--data-root", "{tmp}/nowhere"], 2,
         "Fashion-MNIST: train-images-idx3-ubyte[.gz] not found in"),
    Case("s1-data-root-cifar10", "train_nvae", S1 + ["--dataset", "cifar10", "--data-root", "{tmp}/nowhere"], 2,
         "CIFAR-10: data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5 not found in"),
    Case("s1-data-root-mnist", "train_nvae", S1 + ["--dataset", "mnist", "--data-root", "{tmp}/nowhere"], 2,
         "not found; pass the path of mnist.pkl.gz (or a directory holding it) as the data root"),
    Case("s1-dataset-unknown", "train_nvae", S1 + ["--dataset", "imagenet"], 2,
         "unknown data set 'imagenet'; available: celeba64, cifar10, fashion_mnist, lmdb, mnist, synthetic"),
    Case("s1-resume-missing", "train_nvae", S1 + ["--resume", "{tmp}/none.pt"], 2, "checkpoint not found"),
    Case("s1-save-holds-checkpoint", "train_nvae", S1 + ["--save", "{vae_dir}"], 2,
         "exists: pass --resume auto to continue that run, or choose a new run directory"),
    # The backbone names no prior: a stage-2 kind is described only once the prior package is imported.
    Case("s1-resume-stage2", "train_nvae", S1 + ["--resume", "{evalp}"], 2,
         "checkpoint but a 'nvae' (stage-1) checkpoint is required"),
    Case("s1-resume-corrupt", "train_nvae", S1 + ["--resume", "{corrupt}"], 2, "is not a checkpoint or corrupt"),
    Case("s1-resume-model-mismatch", "train_nvae", S1 + ["--resume", "{vae}", "--num-channels", "8"], 2,
         "model.num_channels: checkpoint has 4, command line asks 8"),
    Case("s1-resume-train-mismatch", "train_nvae", S1 + ["--resume", "{vae}", "--batch-size", "16"], 2,
         "train.batch_size: checkpoint has 8, command line asks 16"),
    Case("s1-batch-size-0", "train_nvae", S1 + ["--batch-size", "0"], 2, "--batch-size must be >= 1, got 0"),
    Case("s1-batch-size-too-large", "train_nvae", S1 + ["--batch-size", "300"], 2,
         "a data set of 256 images cannot fill one batch of 300 on each of 1 process(es); lower --batch-size"),
    Case("s1-max-steps-negative", "train_nvae", S1 + ["--max-steps", "-1"], 2,
         "--max-steps and --epochs must be >= 0, got -1 and 1"),
    Case("s1-nothing-to-train", "train_nvae", S1 + ["--max-steps", "0", "--epochs", "0"], 2,
         "nothing to train: set --epochs or --max-steps to a positive value"),
    Case("s1-precision", "train_nvae", S1 + ["--precision", "fp8"], 2,
         "unknown precision 'fp8'; choose one of fp32, bf16, fp16"),
    Case("s1-ckpt-every-0", "train_nvae", S1 + ["--ckpt-every", "0"], 2, "--ckpt-every must be >= 1, got 0"),
    Case("s1-log-every-0", "train_nvae", S1 + ["--log-every", "0"], 2, "--log-every must be >= 1, got 0"),
    Case("s1-keep-checkpoints-negative", "train_nvae", S1 + ["--keep-checkpoints", "-1"], 2,
         "--keep-checkpoints must be >= 0, got -1"),
    Case("s1-num-workers-negative", "train_nvae", S1 + ["--num-workers", "-1"], 2,
         "--num-workers must be >= 0, got -1"),
    Case("s1-max-bad-steps-0", "train_nvae", S1 + ["--max-bad-steps", "0"], 2, "--max-bad-steps must be >= 1, got 0"),
    Case("s1-num-channels-0", "train_nvae", S1 + ["--num-channels", "0"], 2, "num_channels must be >= 1, got 0"),
    Case("s1-image-size", "train_nvae", S1 + ["--image-size", "30"], 2,
         "image_size 30 is not divisible by 2^(preprocess blocks + latent scales - 1) = 8"),
    Case("s1-lr-negative", "train_nvae", S1 + ["--lr", "-1"], 2, "Invalid learning rate: -1.0"),
    Case("s1-save-is-a-file", "train_nvae", S1 + ["--save", "{file}"], 2, "File exists"),
    Case("s1-preset-unknown", "train_nvae", S1 + ["--preset", "huge"], 2, "argument --preset: invalid choice: 'huge'"),
    Case("s1-int-flag-text", "train_nvae", S1 + ["--batch-size", "eight"], 2,
         "argument --batch-size: invalid int value: 'eight'"),
    Case("s1-device-unknown", "train_nvae", S1 + ["--device", "tpu"], 2, "unknown --device 'tpu'; use auto, cpu, cuda or cuda:N"),
    Case("s1-sample-temperature", "train_nvae", S1 + ["--sample-temperature", "-1"], 2, "--sample-temperature must be > 0, got -1.0"),
    Case("s1-eval-batches-0", "train_nvae", S1 + ["--eval-batches", "0"], 2, "--eval-batches must be >= 1, got 0"),
    # ---- LMDB data (scripts/prepare_data.py output) read by training
    Case("lmdb-missing", "train_nvae", LMDB("{tmp}/nowhere"), 2,
         "train not found; build it with: python scripts/prepare_data.py --dataset lmdb --src IMAGE_DIR --out"),
    Case("lmdb-root-is-a-split", "train_nvae", LMDB("{lmdb_good}/train"), 2, "ROOT must hold one directory per split"),
    Case("lmdb-wrong-length", "train_nvae", LMDB("{lmdb_bad_length}"), 2,
         "metadata key '__len__' says 41 records but the database holds 40"),
    Case("lmdb-corrupt-first-record", "train_nvae", LMDB("{lmdb_corrupt_first}"), 2,
         "record key '00000000' is corrupt: undecodable png data"),
    Case("lmdb-corrupt-record-in-training", "train_nvae", LMDB("{lmdb_corrupt_middle}"), 2,
         "record key '00000020' is corrupt: undecodable png data"),
    Case("lmdb-wrong-image-size", "train_nvae", LMDB("{lmdb_small_first}"), 2,
         "record key '00000000' is corrupt: image is 16x16, expected 32x32"),
    Case("lmdb-celeba64-wrong-shape", "train_nvae", LMDB("{lmdb_good}", "celeba64"), 2,
         "metadata key '__shape__' says 1x32x32 images, data set celeba64 needs 3x64x64"),
    # ---- stage 2: scripts/train_nvae_evalp.py
    Case("s2-vae-missing", "train_nvae_evalp", S2 + ["--vae", "{tmp}/none.pt"], 2, "checkpoint not found"),
    Case("s2-vae-directory", "train_nvae_evalp", S2 + ["--vae", "{vae_dir}"], 2,
         "is a directory; pass the checkpoint file, e.g."),
    Case("s2-vae-is-stage2", "train_nvae_evalp", S2 + ["--vae", "{evalp}"], 2,
         "is a 'evalp' (stage-2) checkpoint but a 'nvae' (stage-1) checkpoint is required"),
    Case("s2-save-holds-checkpoint", "train_nvae_evalp", S2 + ["--save", "{evalp_dir}"], 2,
         "exists: pass --resume auto to continue that run, or choose a new run directory"),
    Case("s2-resume-stage1", "train_nvae_evalp", S2 + ["--resume", "{vae}"], 2,
         "is a 'nvae' (stage-1) checkpoint but a 'evalp' (stage-2) checkpoint is required"),
    Case("s2-resume-other-vae", "train_nvae_evalp", S2 + ["--vae", "{other_vae}", "--resume", "{evalp}"], 2,
         "pass the NVAE it was trained on or start a new run directory"),
    Case("s2-resume-mismatch", "train_nvae_evalp", S2 + ["--resume", "{evalp}", "--n-critic", "3"], 2,
         "n_critic: checkpoint has 2, command line asks 3"),
    Case("s2-groups-out-of-range", "train_nvae_evalp", S2 + ["--groups", "99"], 2,
         "group indices [99] are out of range: valid indices are 0..2"),
    Case("s2-groups-text", "train_nvae_evalp", S2 + ["--groups", "first"], 2,
         "--groups must be 'all', 'top' or comma-separated group indices"),
    Case("s2-precision", "train_nvae_evalp", S2 + ["--precision", "fp8"], 2,
         "unknown precision 'fp8'; choose one of fp32, bf16, fp16"),
    Case("s2-batch-size-0", "train_nvae_evalp", S2 + ["--batch-size", "0"], 2, "--batch-size must be >= 1, got 0"),
    Case("s2-max-steps-negative", "train_nvae_evalp", S2 + ["--max-steps", "-1"], 2,
         "--max-steps and --epochs must be >= 0, got -1 and 1"),
    Case("s2-ckpt-every-0", "train_nvae_evalp", S2 + ["--ckpt-every", "0"], 2, "--ckpt-every must be >= 1, got 0"),
    Case("s2-lr-negative", "train_nvae_evalp", S2 + ["--lr-energy", "-1"], 2, "Invalid learning rate: -1.0"),
    Case("s2-n-critic-0", "train_nvae_evalp", S2 + ["--n-critic", "0"], 2, "--n-critic must be >= 1, got 0"),
    Case("s2-energy-hidden-0", "train_nvae_evalp", S2 + ["--energy-hidden", "0"], 2, "--energy-hidden must be >= 1, got 0"),
    Case("s2-num-couplings-0", "train_nvae_evalp", S2 + ["--num-couplings", "0"], 2, "--num-couplings must be >= 1, got 0"),
    Case("s2-lambda-gp-negative", "train_nvae_evalp", S2 + ["--lambda-gp", "-1"], 2, "--lambda-gp must be >= 0, got -1.0"),
    # ---- scripts/generate.py
    Case("gen-checkpoint-missing", "generate", GEN + ["--checkpoint", "{tmp}/none.pt"], 2, "checkpoint not found"),
    Case("gen-checkpoint-corrupt", "generate", GEN + ["--checkpoint", "{corrupt}"], 2,
         "is not a checkpoint or corrupt"),
    Case("gen-n-0", "generate", GEN + ["--n", "0"], 2, "--n must be >= 1, got 0"),
    Case("gen-temperature-negative", "generate", GEN + ["--temperature", "-1"], 2, "--temperature must be > 0"),
    Case("gen-evalp-prior-on-stage1", "generate", GEN + ["--prior", "evalp"], 2, "stage-1 checkpoint"),
    Case("gen-sir-0", "generate", GEN + ["--checkpoint", "{evalp}", "--sir", "0"], 2,
         "--sir needs at least 1 proposal, got 0"),
    Case("gen-sir-with-gaussian", "generate", GEN + ["--checkpoint", "{evalp}", "--prior", "gaussian", "--sir", "4"],
         2, "--sir resamples with a learned energy or classifier"),
    Case("gen-sir-groups-out-of-range", "generate",
         GEN + ["--checkpoint", "{evalp}", "--sir", "2", "--sir-groups", "9"], 2,
         "SIR groups [9] are not EVaLP groups [0, 1, 2]"),
    Case("gen-sir-groups-on-stage1", "generate", GEN + ["--sir-groups", "all"], 2,
         "--prior gaussian does not resample, so --sir-groups would be ignored; use with --prior evalp or ncp"),
    Case("gen-sir-chunk-0", "generate", GEN + ["--checkpoint", "{evalp}", "--sir", "2", "--sir-chunk", "0"], 2,
         "--sir-chunk must be >= 1, got 0"),
    Case("gen-sir-temperature-0", "generate", GEN + ["--checkpoint", "{evalp}", "--sir", "2", "--sir-temperature", "0"],
         2, "--sir-temperature must be > 0, got 0.0"),
    Case("gen-sir-ess-target-1", "generate", GEN + ["--checkpoint", "{evalp}", "--sir", "2", "--sir-temperature", "ess:1"],
         2, "--sir-temperature ess:F needs a fraction 0 < F < 1, got 'ess:1'"),
    Case("gen-sir-temperature-without-sir", "generate", GEN + ["--checkpoint", "{evalp}", "--sir-temperature", "3"], 2,
         "SIR is off for --prior evalp without --sir M, so --sir-temperature would be ignored"),
    Case("gen-calibration-images-without-calibrated", "generate",
         GEN + ["--checkpoint", "{evalp}", "--sir", "2", "--sir-calibration-images", "50"], 2,
         "--sir-calibration-images applies to --sir-temperature calibrated only"),
    Case("gen-batch-size-0", "generate", GEN + ["--batch-size", "0"], 2, "--batch-size must be >= 1, got 0"),
    Case("gen-sir-groups-text", "generate", GEN + ["--checkpoint", "{evalp}", "--sir", "2", "--sir-groups", "top"], 2,
         "--sir-groups must be 'all' or comma-separated group indices, got 'top'"),
    Case("gen-out-is-a-directory", "generate", GEN + ["--out", "{tmp}"], 2, "is a directory; give a file path"),
    Case("gen-nrow-negative", "generate", GEN + ["--nrow", "-1"], 2, "--nrow must be >= 1, got -1"),
    Case("gen-prior-not-in-checkpoint", "generate", GEN + ["--checkpoint", "{langevin}", "--prior", "ncp"], 2,
         "this is a 'langevin' checkpoint: it has no ncp prior; use --prior gaussian or langevin"),
    Case("gen-sir-with-langevin", "generate", GEN + ["--checkpoint", "{langevin}", "--sir", "4"], 2,
         "--sir does not apply to --prior langevin (it samples by MCMC)"),
    Case("gen-sir-groups-with-langevin", "generate", GEN + ["--checkpoint", "{langevin}", "--sir-groups", "0"], 2,
         "--prior langevin does not resample, so --sir-groups would be ignored; use with --prior evalp or ncp"),
    Case("gen-sir-weights-without-sir", "generate", GEN + ["--checkpoint", "{evalp}", "--sir-weights", "exact"], 2,
         "SIR is off for --prior evalp without --sir M, so --sir-weights would be ignored"),
    Case("gen-langevin-steps-with-evalp", "generate", GEN + ["--checkpoint", "{evalp}", "--langevin-steps", "3"], 2,
         "--langevin-steps / --langevin-step-size apply to --prior langevin only, not evalp"),
    Case("gen-langevin-steps-negative", "generate", GEN + ["--checkpoint", "{langevin}", "--langevin-steps", "-1"], 2,
         "--langevin-steps must be >= 0, got -1"),
    # ---- scripts/evaluate.py
    Case("eval-checkpoint-missing", "evaluate", EVAL + ["--checkpoint", "{tmp}/none.pt"], 2, "checkpoint not found"),
    Case("eval-no-metric", "evaluate", ["--checkpoint", "{vae}", "--out", "{out}/r.json", "--device", "cpu"], 2,
         "nothing to evaluate: pass at least one of --fid N, --mmd, --nll K, --timing"),
    Case("eval-fid-1", "evaluate", EVAL + ["--fid", "1"], 2, "--fid needs at least 2 samples, got 1"),
    Case("eval-checkpoint-corrupt", "evaluate", EVAL + ["--checkpoint", "{corrupt}"], 2,
         "is not a checkpoint or corrupt"),
    Case("eval-sir-groups-text", "evaluate", EVAL + ["--checkpoint", "{evalp}", "--sir", "2", "--sir-groups", "top"], 2,
         "--sir-groups must be 'all' or comma-separated group indices, got 'top'"),
    Case("eval-sir-groups-with-gaussian", "evaluate", EVAL + ["--sir-groups", "0"], 2,
         "--prior gaussian does not resample, so --sir-groups would be ignored; use with --prior evalp or ncp"),
    Case("eval-sir-temperature-with-gaussian", "evaluate", EVAL + ["--sir-temperature", "3"], 2,
         "--prior gaussian does not resample, so --sir-temperature would be ignored; use with --prior evalp or ncp"),
    Case("eval-calibration-images-1", "evaluate",
         EVAL + ["--checkpoint", "{evalp}", "--sir", "2", "--sir-temperature", "calibrated",
                 "--sir-calibration-images", "1"], 2, "--sir-calibration-images needs at least 2 images, got 1"),
    Case("eval-sir-weights-without-sir", "evaluate", EVAL + ["--checkpoint", "{evalp}", "--sir-weights", "exact"], 2,
         "SIR is off for --prior evalp without --sir M, so --sir-weights would be ignored"),
    # ---- scripts/prepare_data.py
    Case("prep-src-missing", "prepare_data", PREP + ["--src", "{tmp}/nowhere"], 2,
         "does not exist or is not a directory"),
    Case("prep-src-without-images", "prepare_data", PREP + ["--src", "{empty}"], 2, "no images ("),
    Case("prep-out-exists", "prepare_data", PREP + ["--out", "{lmdb_good}"], 2,
         "already exists; pass --overwrite to replace it"),
    Case("prep-celeba64-size", "prepare_data", PREP + ["--dataset", "celeba64", "--size", "32"], 2,
         "celeba64 images are 3x64x64; use --dataset lmdb for other sizes or channel counts"),
    Case("prep-test-fraction", "prepare_data", PREP + ["--test-fraction", "1.5"], 2,
         "--test-fraction must be in (0, 1), got 1.5"),
]


# ---------------------------------------------------------------------------------------------- fixtures


def _lmdb(root: Path, first: Optional[bytes] = None, middle: Optional[bytes] = None,
          length: Optional[int] = None) -> Path:
    """train/ (40) and test/ (8) databases of grey 32x32 PNGs, optionally damaged after writing."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 8)):
        images = rng.integers(0, 256, (n, 1, 32, 32), dtype=np.uint8)
        root.mkdir(parents=True, exist_ok=True)
        write_lmdb(root / split, (encode_image(image, "png") for image in images), n, (1, 32, 32), "png")
    env = lmdb.open(str(root / "train"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, value in ((record_key(0), first), (record_key(20), middle),
                           (LEN_KEY, None if length is None else str(length).encode())):
            if value is not None:
                txn.put(key, value)
    env.close()
    return root


def _png(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((size, size), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints of both stages and a Langevin one, a corrupt one, LMDB databases (good and damaged), image
    folders."""
    base = tmp_path_factory.mktemp("bad_input")
    vae_dir, other_dir, evalp_dir = base / "vae", base / "other_vae", base / "evalp"
    for run_dir, seed in ((vae_dir, 0), (other_dir, 1)):
        torch.manual_seed(seed)
        with RunLogger(run_dir, True) as logger:
            assert train_nvae(tiny_run_config(max_steps=1, seed=seed), CPU, run_dir, logger) == 0
    vae, vae_cfg, _ = load_trained_nvae(vae_dir / "checkpoint.pt", torch.device("cpu"))
    stage2 = EVaLPConfig(batch_size=8, max_steps=1, n_critic=2, energy_hidden=8, sampler_hidden=8, num_couplings=2,
                         eval_batches=1, bn_readjust_batches=1)
    with RunLogger(evalp_dir, True) as logger:
        run_cfg = EVaLPRunConfig(stage2, str(vae_dir / "checkpoint.pt"), vae_fingerprint(vae))
        assert train_evalp(run_cfg, vae, vae_cfg, CPU, evalp_dir, logger) == 0
    corrupt = base / "corrupt.pt"
    data = (vae_dir / "checkpoint.pt").read_bytes()
    corrupt.write_bytes(data[: len(data) // 2])  # as a copy cut short would be
    images, empty = base / "images", base / "empty"
    images.mkdir()
    empty.mkdir()
    for i in range(4):
        (images / f"{i}.png").write_bytes(_png(40))
    return {
        "vae": vae_dir / "checkpoint.pt", "vae_dir": vae_dir, "other_vae": other_dir / "checkpoint.pt",
        "evalp": evalp_dir / "checkpoint.pt", "evalp_dir": evalp_dir, "corrupt": corrupt, "images": images, "empty": empty,
        "langevin": train_prior_checkpoint("langevin", vae_dir / "checkpoint.pt", base / "langevin", max_steps=1),
        "lmdb_good": _lmdb(base / "lmdb_good"),
        "lmdb_bad_length": _lmdb(base / "lmdb_bad_length", length=41),
        "lmdb_corrupt_first": _lmdb(base / "lmdb_corrupt_first", first=b"\x89PNG\r\n\x1a\n cut short"),
        "lmdb_corrupt_middle": _lmdb(base / "lmdb_corrupt_middle", middle=b"\x89PNG\r\n\x1a\n cut short"),
        "lmdb_small_first": _lmdb(base / "lmdb_small_first", first=_png(16)),
    }


class _Exited(Exception):
    """Raised in place of run_entry's final os._exit."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


_SCRIPTS: dict[str, ModuleType] = {}


def _script(name: str) -> ModuleType:
    if name not in _SCRIPTS:
        spec = importlib.util.spec_from_file_location(f"bad_input_{name}", ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _SCRIPTS[name] = module
    return _SCRIPTS[name]


def _raise_exit(status: int) -> None:
    raise _Exited(status)


@pytest.fixture
def run_main(monkeypatch, capsys):
    """Call a script's main() in this process; returns (exit status, stderr)."""
    monkeypatch.setattr(nvae.runtime.process, "shutdown_and_exit", _raise_exit)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NVAE_FAULT_KILL_AT_STEP", "NVAE_FAULT_NAN_AT_STEP"):
        monkeypatch.delenv(name, raising=False)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def run(script: str, argv: list[str]) -> tuple[int, str]:
        capsys.readouterr()
        try:
            if script == "prepare_data":
                status = _script(script).main(argv)
            else:
                monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
                _script(script).main()
                status = 0
        except _Exited as exc:
            status = exc.status
        except SystemExit as exc:  # argparse
            status = exc.code
        return status, capsys.readouterr().err

    try:
        yield run
    finally:
        for signum, handler in handlers.items():  # the entry points install StopSignal handlers
            signal.signal(signum, handler)
        torch.set_num_threads(threads)


def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------------------- tests

LOG_FILES = {"options.json", "train.log", "metrics.jsonl"}  # a run directory's logs may exist after a failed start


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_clearly_and_writes_nothing(case, paths, run_main, tmp_path):
    out = tmp_path / "out"
    afile = tmp_path / "afile"
    afile.write_text("not a directory\n")
    fixtures_before = _snapshot(paths["vae_dir"].parent)
    argv = [a.format(out=out, tmp=tmp_path, file=afile, **paths) for a in case.argv]
    status, stderr = run_main(case.script, argv)
    assert status == case.status, stderr[-3000:]
    assert case.message in stderr, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    # Nothing but logs in the output location; no temporary file anywhere near it.
    left = [p for p in (out.rglob("*") if out.exists() else []) if p.is_file()]
    assert not [p for p in left if p.name not in LOG_FILES and "tb" not in p.relative_to(out).parts], left
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()], "temporary file left behind"
    assert _snapshot(paths["vae_dir"].parent) == fixtures_before  # shared checkpoints and databases untouched


def test_errors_md_documents_every_case():
    """docs/errors.md: one row per case, with the same message and exit status as the test expects."""
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"`([a-z0-9-]+)`", cells[0]) if len(cells) >= 4 else None
        if match:
            rows[match.group(1)] = cells
    assert sorted(rows) == sorted(c.id for c in CASES)
    for case in CASES:
        cells = rows[case.id]
        assert cells[2] == f"`{case.message}`" and cells[3] == str(case.status), case.id


def test_bad_flag_under_torchrun_every_rank_exits_2_and_the_launcher_1(tmp_path):
    out = run_script("scripts/train_nvae.py", *[a.format(out=tmp_path / "out") for a in S1], "--ckpt-every", "0",
                     torchrun=2)
    assert out.returncode == 1, out.stderr[-3000:]
    assert len(re.findall(r"exitcode\s*:\s*2 ", out.stderr)) == 2, out.stderr[-3000:]
    assert out.stderr.count("error: --ckpt-every must be >= 1, got 0") == 2
    assert not list((tmp_path / "out").glob("checkpoint*"))
