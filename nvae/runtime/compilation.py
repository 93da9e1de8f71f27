"""torch.compile for the small repeated blocks whose CPU cost is per-operation dispatch (``--compile``)."""
from __future__ import annotations

import functools
from typing import Callable

import torch

# Each distinct block shape is one compiled graph (static shapes; NVAE's presets have up to about 20), and dynamo's
# default limit of 8 per function would silently leave the rest eager.
RECOMPILE_LIMIT = 64


@functools.cache
def compiled(function: Callable) -> Callable:
    """torch.compile of a plain function (a method taken from its class, called with the module as its first
    argument), made once per function. Modules keep the compiled function, never a compiled bound method, so
    that a deep copy of a module (BN re-adjustment works on one) runs the copy, not the original.

    Graphs are compiled at the first call for each input shape and shared by all blocks of the class whose
    shapes agree. Off by default everywhere: compiling takes minutes on a CPU (docs/benchmarks.md says after
    how many steps it pays for itself)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    return torch.compile(function, dynamic=False)  # static shapes: the best kernels, no symbolic-shape surprises
