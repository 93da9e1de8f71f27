"""A trained NVAE (stage 1) loaded from its checkpoint, for sampling, evaluation or a frozen-prior run."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .config import NVAERunConfig
from .model import NVAE
from .runtime import CheckpointError, load_checkpoint


def load_trained_nvae(path: Path, device: torch.device) -> tuple[NVAE, NVAERunConfig, dict[str, Any]]:
    """A stage-1 model from its checkpoint (architecture from the stored config), in eval mode."""
    payload = load_checkpoint(path, expected_kind="nvae", map_location=device)
    run_cfg = NVAERunConfig.from_json(payload["config"])
    model = NVAE(run_cfg.model).to(device)
    try:
        model.load_state_dict(payload["task"]["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: stored weights do not fit the stored configuration ({exc})") from exc
    model.eval()
    return model, run_cfg, payload
