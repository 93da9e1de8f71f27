"""Training runtime: distributed setup, precision, atomic checkpoints, logging, resumable sampler, signals."""
from nvae.runtime.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    CheckpointManager,
    capture_rng_state,
    config_mismatch,
    load_checkpoint,
    resolve_resume,
    restore_rng_state,
    save_checkpoint,
)
from nvae.runtime.distributed import (
    DistContext,
    all_gather_object,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    broadcast_object,
    forked_rng,
    init_distributed,
    rank_zero_first,
    seed_everything,
    shutdown_and_exit,
)
from nvae.runtime.precision import PRECISION_MODES, Precision
from nvae.runtime.run_logging import RunLogger, atomic_write, progress, save_text_atomic
from nvae.runtime.sampler import ResumableDistributedSampler
from nvae.runtime.signals import PREEMPTED_EXIT_CODE, StopSignal

__all__ = [
    "save_text_atomic",
    "atomic_write",
    "FORMAT_VERSION",
    "PRECISION_MODES",
    "PREEMPTED_EXIT_CODE",
    "CheckpointError",
    "CheckpointManager",
    "DistContext",
    "Precision",
    "ResumableDistributedSampler",
    "RunLogger",
    "StopSignal",
    "all_gather_object",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "capture_rng_state",
    "config_mismatch",
    "init_distributed",
    "load_checkpoint",
    "progress",
    "rank_zero_first",
    "resolve_resume",
    "restore_rng_state",
    "save_checkpoint",
    "seed_everything",
    "forked_rng",
    "shutdown_and_exit",
]
