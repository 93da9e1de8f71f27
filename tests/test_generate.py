"""scripts/generate.py samples with a baseline checkpoint's own prior and passes its settings through."""
from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import run_script

# For each baseline: its default description, and flags that reduce it to NVAE's own draws bit for bit
# (zero Langevin steps start and end at the p0 draw; NCP with one proposal leaves the draw to NVAE).
BASELINES = {
    "langevin": ("langevin (2 Langevin steps, step size 0.05)",
                 ["--langevin-steps", "0", "--langevin-step-size", "0.2"],
                 "langevin (0 Langevin steps, step size 0.2)"),
    "ncp": ("ncp (SIR M=4 at groups [0, 1, 2])", ["--sir", "1"], "ncp (SIR M=1 at groups [0, 1, 2])"),
}


def _generate(checkpoint, out_dir, name: str, *flags: str) -> tuple[np.ndarray, str]:
    """(uint8 images, stdout) of generate.py with a fixed seed and BN re-adjustment under the prior."""
    png, npz = out_dir / f"{name}.png", out_dir / f"{name}.npz"
    result = run_script("scripts/generate.py", "--checkpoint", str(checkpoint), "--n", "4", "--seed", "3",
                        "--bn-batches", "1", "--batch-size", "4", "--out", str(png), "--npz", str(npz),
                        "--device", "cpu", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert png.stat().st_size > 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return np.load(npz)["images"], result.stdout


@pytest.mark.parametrize("kind", sorted(BASELINES))
def test_baseline_checkpoint_samples_with_its_own_prior(prior_checkpoints, tmp_path, kind):
    default_text, neutral_flags, neutral_text = BASELINES[kind]
    checkpoint = prior_checkpoints[kind]
    gaussian, out = _generate(checkpoint, tmp_path, "gaussian", "--prior", "gaussian")
    assert "prior gaussian," in out
    own, out = _generate(checkpoint, tmp_path, "own")  # no --prior: the checkpoint's
    assert f"prior {default_text}," in out
    assert own.shape == gaussian.shape == (4, 32, 32, 1)
    assert not np.array_equal(own, gaussian)  # the same seed: only the prior differs
    # The flags reach the hook: settings that make it NVAE's prior reproduce the Gaussian images exactly.
    neutral, out = _generate(checkpoint, tmp_path, "neutral", "--prior", kind, *neutral_flags)
    assert f"prior {neutral_text}," in out
    assert np.array_equal(neutral, gaussian)
