"""Which latent groups a prior acts on: ``--groups`` (energies and sampler, SPEC section 2) and ``--sir-groups``.

One syntax for both: 'all', 'top' (``--groups`` only) or comma-separated group indices.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence, Union

from nvae.hooks import GroupSpec


def _indices(text: str, flag: str, words: str) -> list[int]:
    """Comma-separated group indices, each listed once, sorted (top-down order)."""
    parts = [p.strip() for p in text.split(",")]
    if any(re.fullmatch(r"-?[0-9]+", p) is None for p in parts):
        raise ValueError(f"{flag} must be {words} or comma-separated group indices, got {text!r}")
    groups = [int(p) for p in parts]
    if len(set(groups)) != len(groups):
        raise ValueError(f"{flag} lists a group more than once: {text!r}")
    return sorted(groups)


def parse_groups(arg: str, specs: Sequence[GroupSpec]) -> list[int]:
    """'all' -> every group, 'top' -> [0], '0,3,5' -> those groups (sorted, top-down order)."""
    text = arg.strip().lower()
    if not specs:
        raise ValueError("the model has no latent groups")
    if text == "all":
        return list(range(len(specs)))
    if text == "top":
        return [0]
    groups = _indices(text, "--groups", "'all', 'top'")
    bad = [g for g in groups if not 0 <= g < len(specs)]
    if bad:
        raise ValueError(f"group indices {bad} are out of range: valid indices are 0..{len(specs) - 1}")
    return groups


def parse_sir_groups(text: Optional[str]) -> Optional[Union[list[int], str]]:
    """--sir-groups as build_prior takes it: None (the prior's default), 'all' (every group the prior models,
    resolved against the checkpoint later), or a list of group indices."""
    if text is None or text.strip().lower() == "all":
        return None if text is None else "all"
    groups = _indices(text.strip(), "--sir-groups", "'all'")
    if any(g < 0 for g in groups):
        raise ValueError(f"--sir-groups must be 'all' or comma-separated group indices, got {text!r}")
    return groups
