"""compare_priors' reuse of finished stages: a changed setting that alters training is refused, a speed-only one is not."""
from __future__ import annotations

import json

import pytest

from benchmarks.compare_priors import _stage, _without_speed_only
from nvae.runtime import load_checkpoint


def test_speed_only_settings_are_dropped_at_any_depth():
    config = {"prior": {"lr": 1e-3, "compile": True, "inner": {"checkpoint_activations": True, "seed": 1}}, "compile": 1}
    assert _without_speed_only(config) == {"prior": {"lr": 1e-3, "inner": {"seed": 1}}}


def test_stage_reuses_across_speed_only_settings_and_refuses_other_changes(prior_checkpoints):
    ckpt = prior_checkpoints["langevin"]
    payload = load_checkpoint(ckpt, map_location="cpu")
    config, step = json.loads(payload["config"]), int(payload["step"])

    def never_train(logger, resume):
        raise AssertionError("a finished stage must be reused, not trained")

    seconds = {}
    faster = json.loads(json.dumps(config))
    faster["prior"]["compile"] = not faster["prior"].get("compile", False)
    faster["prior"].pop("checkpoint_activations", None)
    assert _stage(ckpt.parent, "langevin", json.dumps(faster), step, never_train, seconds) == ckpt
    assert seconds == {"langevin": "reused"}

    other = json.loads(json.dumps(config))
    other["prior"]["lr"] = other["prior"]["lr"] * 2
    with pytest.raises(SystemExit, match="different configuration"):
        _stage(ckpt.parent, "langevin", json.dumps(other), step, never_train, seconds)
