"""Which latent groups get an EVaLP energy and sampler (the ``--groups`` option, SPEC section 2)."""
from __future__ import annotations

import re
from typing import Sequence

from nvae.hooks import GroupSpec


def parse_groups(arg: str, specs: Sequence[GroupSpec]) -> list[int]:
    """'all' -> every group, 'top' -> [0], '0,3,5' -> those groups (sorted, top-down order)."""
    text = arg.strip().lower()
    if not specs:
        raise ValueError("the model has no latent groups")
    if text == "all":
        return list(range(len(specs)))
    if text == "top":
        return [0]
    parts = [p.strip() for p in text.split(",")]
    if any(re.fullmatch(r"-?[0-9]+", p) is None for p in parts):
        raise ValueError(f"--groups must be 'all', 'top' or comma-separated group indices, got {arg!r}")
    groups = [int(p) for p in parts]
    bad = [g for g in groups if not 0 <= g < len(specs)]
    if bad:
        raise ValueError(f"group indices {bad} are out of range: valid indices are 0..{len(specs) - 1}")
    if len(set(groups)) != len(groups):
        raise ValueError(f"--groups lists a group more than once: {arg!r}")
    return sorted(groups)
