"""Atomic checkpoints loaded with weights_only=True, RNG capture, rolling + numbered snapshots.

Payload conventions (plain types and tensors only, so weights_only loading accepts them):
``kind`` ('nvae' for stage 1; a prior package registers its own kinds with register_checkpoint_kind), ``format_version``, ``config`` (JSON string of the full
config), ``step``, state dicts (model, optimiser, scheduler, scaler, spectral-regulariser vectors),
``rng`` (from :func:`capture_rng_state`, one per rank if the caller gathers them), sampler position.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import re
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import numpy as np
import torch

from nvae.config import MAY_CHANGE_ON_RESUME

PathLike = Union[str, os.PathLike]

FORMAT_VERSION = 1
LATEST_NAME = "checkpoint.pt"
_SNAPSHOT_RE = re.compile(r"^checkpoint_(\d{8,})\.pt$")
# What save_checkpoint and CheckpointManager write before their rename: .NAME.PID[.UUID8].tmp
_TEMPORARY_RE = re.compile(r"^\.checkpoint(_\d{8,})?\.pt\.\d+(\.[0-9a-f]{8})?\.tmp$")
# Kind -> what it is, for error messages; the backbone knows its own, a prior package registers the rest.
_KIND_DESCRIPTIONS = {"nvae": "stage-1"}


def register_checkpoint_kind(kind: str, description: str) -> None:
    """Name a checkpoint kind in error messages: (kind, 'stage-2') reads "a '<kind>' (stage-2) checkpoint"."""
    _KIND_DESCRIPTIONS[kind] = description


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable, or not the one the caller needs."""


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable; some filesystems cannot open directories, which is harmless here."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(path: PathLike, payload: dict[str, Any]) -> Path:
    """Write `payload` atomically to `path` (temp file in the same directory, fsync, os.replace).

    The temp file is read back with weights_only=True before the rename, so an existing good
    checkpoint is never replaced by one that cannot be resumed from.
    """
    if "kind" not in payload:
        raise ValueError("checkpoint payload needs a 'kind' entry (e.g. 'nvae')")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its 0600 mode would survive the rename and hide checkpoints from collaborators.
    tmp_name = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp_name, "xb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            # mmap: the check costs a parse of the pickle structure, not a copy of the tensors.
            torch.load(tmp_name, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise CheckpointError(
                f"refusing to write {path}: the payload holds {_rejected_global(exc) or 'an object'}, which "
                "weights_only=True loading rejects; store tensors and plain python types only"
            ) from exc
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)
    return path


def _rejected_global(exc: Exception) -> Optional[str]:
    """The class that weights_only unpickling refused, if that is why `exc` was raised."""
    match = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
    return match.group(1) if match else None


def _describe_kind(kind: Any) -> str:
    """'nvae' -> "'nvae' (stage-1)" for error messages."""
    description = _KIND_DESCRIPTIONS.get(kind)
    return f"'{kind}' ({description})" if description else f"'{kind}'"


def load_checkpoint(
    path: PathLike, expected_kind: Optional[str] = None, map_location: Any = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint with weights_only=True, checking that it exists, is intact and has the right kind."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; pass the checkpoint file, e.g. {path / LATEST_NAME}")
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        rejected = _rejected_global(exc)
        if rejected is not None:
            raise CheckpointError(
                f"{path} holds a pickled {rejected}, which weights_only=True loading rejects; "
                "it was not written by this code and will not be loaded"
            ) from exc
        # torch's own text for a broken pickle suggests weights_only=False, which would not help here.
        text = str(exc).strip()
        reason = "bad pickle" if "Weights only load failed" in text else (text.splitlines() or [""])[0]
        raise CheckpointError(f"{path} is not a checkpoint or corrupt ({type(exc).__name__}: {reason})") from exc
    if not isinstance(payload, dict) or "kind" not in payload:
        raise CheckpointError(f"{path} is not a checkpoint or corrupt (no 'kind' entry)")
    if expected_kind is not None and payload["kind"] != expected_kind:
        stage = _KIND_DESCRIPTIONS.get(expected_kind, expected_kind)
        raise CheckpointError(
            f"{path} is a {_describe_kind(payload['kind'])} checkpoint but a {_describe_kind(expected_kind)} "
            f"checkpoint is required; pass the checkpoint.pt of a {stage} run directory instead"
        )
    return payload


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and current-CUDA-device RNG states, as tensors and plain types."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {
            "version": py_version,
            "state": torch.tensor(py_state, dtype=torch.int64),  # (625,) Mersenne Twister words
            "gauss_next": py_gauss,
        },
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    # Only the current device: get_rng_state_all would create a context on every GPU of the node.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    keys = npy["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


class CheckpointManager:
    """A rolling `checkpoint.pt` plus numbered `checkpoint_{step:08d}.pt` snapshots in one run directory."""

    def __init__(self, run_dir: PathLike, keep_last: int = 3) -> None:
        if keep_last < 0:
            raise ValueError(f"keep_last must be >= 0, got {keep_last}")
        self.run_dir = Path(run_dir)
        self.keep_last = keep_last

    def snapshot_path(self, step: int) -> Path:
        """Path of the numbered snapshot for `step`."""
        return self.run_dir / f"checkpoint_{step:08d}.pt"

    def snapshots(self) -> list[Path]:
        """Existing numbered snapshots, oldest step first."""
        if not self.run_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.run_dir.iterdir() if (m := _SNAPSHOT_RE.match(p.name))]
        return [p for _, p in sorted(found)]

    def save(self, payload: dict[str, Any], step: int) -> Path:
        """Write the rolling latest, then the snapshot for `step`, then prune old snapshots; return latest."""
        latest = save_checkpoint(self.run_dir / LATEST_NAME, payload)
        if self.keep_last > 0:
            self._snapshot_from_latest(latest, self.snapshot_path(step))
            for old in self.snapshots()[: -self.keep_last]:
                with contextlib.suppress(FileNotFoundError):
                    old.unlink()
        return latest

    def _snapshot_from_latest(self, latest: Path, snapshot: Path) -> None:
        """Hard-link (or copy, where links are unsupported) the latest file to the snapshot name, atomically."""
        tmp = snapshot.with_name(f".{snapshot.name}.{os.getpid()}.tmp")
        try:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            try:
                os.link(latest, tmp)  # no second write of a possibly large file
            except OSError:
                with open(latest, "rb") as src, open(tmp, "wb") as dst:
                    while chunk := src.read(1 << 24):
                        dst.write(chunk)
                    dst.flush()
                    os.fsync(dst.fileno())
            os.replace(tmp, snapshot)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        _fsync_dir(snapshot.parent)

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the temporary files a process killed mid-save left in the run directory; return them.

        Only for the start of a run, when no other process writes checkpoints here.
        """
        if not self.run_dir.is_dir():
            return []
        stale = [p for p in self.run_dir.iterdir() if _TEMPORARY_RE.match(p.name)]
        for path in stale:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return stale

    def latest_path(self) -> Optional[Path]:
        """The rolling latest checkpoint, or None if none was written yet."""
        latest = self.run_dir / LATEST_NAME
        return latest if latest.is_file() else None


def resolve_resume(arg: Optional[str], run_dir: PathLike) -> Optional[Path]:
    """Map `--resume` to a file: None = fresh run, 'auto' = run_dir's checkpoint.pt if any, else that path.

    A fresh run refuses a run_dir that already holds a checkpoint: it would overwrite it.
    """
    if arg is None or arg == "":
        existing = CheckpointManager(run_dir).latest_path()
        if existing is not None:
            raise CheckpointError(f"{existing} exists: pass --resume auto to continue that run, or choose a new "
                                  "run directory (a fresh run would overwrite it)")
        return None
    if arg == "auto":
        return CheckpointManager(run_dir).latest_path()
    path = Path(arg)
    if path.is_dir():
        path = path / LATEST_NAME
    if not path.is_file():
        raise CheckpointError(f"--resume {arg}: checkpoint not found: {path}")
    return path


def _lookup(config: dict[str, Any], key: str) -> tuple[bool, Any]:
    """Find a possibly dotted key ('model.num_channels') in nested dicts; (found, value)."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _normalise(value: Any) -> Any:
    """Tuples become lists so values compare equal after a JSON round trip."""
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    return value


def _fmt(value: Any) -> str:
    """Render a config value for an error message."""
    return repr(value) if isinstance(value, str) else str(value)


def config_mismatch(saved: dict[str, Any], requested: dict[str, Any], keys: Iterable[str]) -> list[str]:
    """Human-readable differences between a checkpoint's config and the requested one, for `keys`.

    A key absent from `requested` or set to None there counts as not asked for and is skipped;
    dotted keys look into nested dicts.
    """
    problems = []
    for key in keys:
        asked, want = _lookup(requested, key)
        if not asked or want is None:
            continue
        has, have = _lookup(saved, key)
        if not has:
            problems.append(f"{key}: checkpoint has no value, command line asks {_fmt(want)}")
        elif _normalise(have) != _normalise(want):
            problems.append(f"{key}: checkpoint has {_fmt(have)}, command line asks {_fmt(want)}")
    return problems


def check_resume(path: PathLike, saved: Mapping[str, Any], explicit: Mapping[str, Mapping[str, Any]],
                 may_change: Iterable[str] = MAY_CHANGE_ON_RESUME) -> dict[str, Any]:
    """The one resume check of every run: ``saved`` maps section names to the checkpoint's config dataclasses
    (e.g. 'model', 'train'), ``explicit`` the same sections to the values the user typed. A typed value that
    contradicts the checkpoint is a CheckpointError listing every such setting, unless the setting is in
    ``may_change`` (cadence, evaluation size, data location); those are applied. Returns the sections."""
    allowed = set(may_change)
    problems = [f"{section}.{key}: checkpoint has {getattr(saved[section], key)!r}, command line asks {value!r}"
                for section, values in explicit.items() for key, value in values.items()
                if key not in allowed and getattr(saved[section], key) != value]
    if problems:
        raise CheckpointError(f"{path} was trained with a different configuration:\n  " + "\n  ".join(problems)
                              + "\nDrop these flags to resume, or start a new run directory.")
    return {section: dataclasses.replace(config, **{k: v for k, v in explicit.get(section, {}).items() if k in allowed})
            for section, config in saved.items()}
