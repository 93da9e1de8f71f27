"""Rank-0 run logging: text log, TensorBoard, JSON-lines metrics, image grids, options, progress bars."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from tqdm import tqdm

PathLike = Union[str, os.PathLike]


def atomic_write(path: PathLike, write: Any) -> None:
    """Call write(tmp_path) and rename the result onto `path`, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_text_atomic(path: PathLike, text: str) -> None:
    """Write a small UTF-8 text file (a report, a summary) so that readers never see a partial one."""
    atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _json_value(value: Any) -> Optional[float]:
    """A scalar as a JSON-safe float; NaN/inf become null because strict JSON has no such literals."""
    value = float(value)
    return value if math.isfinite(value) else None


class RunLogger:
    """train.log (+ stderr), TensorBoard events in tb/, metrics.jsonl; every method is a no-op when disabled."""

    def __init__(self, run_dir: PathLike, enabled: bool) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._logger: Optional[logging.Logger] = None
        self._writer: Any = None
        self._metrics: Any = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # One logger per run directory, not propagated, so several runs in one process stay apart.
        self._logger = logging.getLogger(f"nvae.run.{self.run_dir.resolve()}")
        self._logger.setLevel(logging.INFO)
        self._logger.propagate = False
        formatter = logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        for handler in (logging.FileHandler(self.run_dir / "train.log"), logging.StreamHandler(sys.stderr)):
            handler.setFormatter(formatter)
            self._logger.addHandler(handler)
        from tensorboardX import SummaryWriter  # imported here: only the main rank needs it

        self._writer = SummaryWriter(logdir=str(self.run_dir / "tb"))
        self._metrics = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")

    def info(self, msg: str) -> None:
        """Log one line to train.log and stderr."""
        if self._logger is not None:
            self._logger.info(msg)

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        """Record scalars (floats or 0-d tensors) under their tags in TensorBoard and metrics.jsonl."""
        if not self.enabled:
            return
        record: dict[str, Any] = {"step": int(step)}
        for tag, value in values.items():
            value = float(value)
            self._writer.add_scalar(tag, value, step)
            record[tag] = _json_value(value)
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()

    def images(
        self,
        tag: str,
        images: torch.Tensor,
        step: int,
        png_path: Optional[PathLike] = None,
        nrow: Optional[int] = None,
    ) -> None:
        """Log a (B, C, H, W) batch in [0, 1] as one grid; also save it as PNG (relative to run_dir) if asked."""
        if not self.enabled:
            return
        import torchvision.utils  # imported here: only the main rank needs it, and it is slow to import

        images = images.detach().float().cpu().clamp(0.0, 1.0)  # (B, C, H, W)
        nrow = nrow or max(1, math.ceil(math.sqrt(images.shape[0])))
        grid = torchvision.utils.make_grid(images, nrow=nrow, padding=2)  # (3 or C, H', W')
        self._writer.add_image(tag, grid, step)
        if png_path is not None:
            target = self.run_dir / png_path  # an absolute png_path replaces run_dir
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, lambda tmp: torchvision.utils.save_image(grid, tmp, format="png"))

    def save_options(self, options: Mapping[str, Any]) -> None:
        """Write run_dir/options.json atomically (non-JSON values such as paths are stored as strings), with the
        software and CPU threads the run used: floating-point reductions, hence reruns, depend on them."""
        if not self.enabled:
            return
        environment = {"python": sys.version.split()[0], "torch": torch.__version__,
                       "torch_threads": torch.get_num_threads()}
        text = json.dumps({**dict(options), "environment": environment}, indent=2, sort_keys=True, default=str) + "\n"
        atomic_write(self.run_dir / "options.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def close(self) -> None:
        """Flush and close every file this logger opened."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._logger is not None:
            for handler in list(self._logger.handlers):
                handler.close()
                self._logger.removeHandler(handler)
            self._logger = None
        self.enabled = False

    def __enter__(self) -> "RunLogger":
        """Use as a context manager that closes the logger."""
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(iterable_or_total: Union[Iterable[Any], int], desc: str, enabled: bool) -> tqdm:
    """A tqdm bar with rate and ETA; disabled off the main rank, and sparse when stderr is not a terminal."""
    is_tty = sys.stderr.isatty()
    kwargs: dict[str, Any] = {
        "desc": desc,
        "disable": not enabled,
        "dynamic_ncols": is_tty,
        "mininterval": 0.5 if is_tty else 60.0,  # keep batch-job logs to one line a minute
        "smoothing": 0.05,
    }
    if isinstance(iterable_or_total, int):
        return tqdm(total=iterable_or_total, **kwargs)
    return tqdm(iterable_or_total, **kwargs)
