"""Streaming sampling-importance-resampling (SIR) over M proposals per item (SPEC section 1).

One proposal per item is chosen with probability softmax(log w) over all M proposals by the Gumbel-max
trick, streamed over chunks: argmax_j (log w_j + G_j), G_j ~ Gumbel(0, 1), is an exact categorical
draw, and the running maximum needs only O(batch * chunk) memory. Proposals are latents, never decoded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Union

import torch

Proposal = torch.Tensor | tuple[torch.Tensor, ...]
SIR_WEIGHTS = ("exact", "energy")
# `energy` by measurement (docs/results.md, "SIR"): with either objective's trained critic it moved samples
# less far from the aggregate posterior than `exact` on the real models, and further towards it on the toy.
DEFAULT_SIR_WEIGHTS = "energy"
DEFAULT_SIR_CHUNK = 100  # proposals per item evaluated at once: the memory bound of SIR
DEFAULT_SIR_TEMPERATURE = 1.0  # untempered weights, as the authors resample
# Adaptive tempering picks T from this geometric grid (ratio 2^(1/4), 1 to 256): fine enough that the ESS lands
# within a few per cent of its target, and each grid point keeps only one running choice per item.
ADAPTIVE_TEMPERATURES = tuple(2.0 ** (k / 4) for k in range(33))


@dataclass(frozen=True)
class ESSTarget:
    """Adaptive tempering (written ``ess:F``): each SIR draw tempers its weights by the smallest T on
    ADAPTIVE_TEMPERATURES whose effective sample size, averaged over the draw's items, is at least F x M.

    A learned critic's scale differs between training runs, so one fixed T over- or under-tempers some of
    them; the ESS fraction is scale-free (docs/results.md, section 5b)."""

    fraction: float

    def __post_init__(self) -> None:
        if not 0 < self.fraction < 1:
            raise ValueError(f"the SIR ESS target must be a fraction in (0, 1), got ess:{self.fraction:g}")

    def __str__(self) -> str:
        return f"ess:{self.fraction:g}"


@dataclass(frozen=True)
class Calibrated:
    """A temperature fitted to held-out data (written ``calibrated``): T = 1 / a for the slope a of a logistic
    regression telling posterior samples from the sampler's by the log-weight (evalp_prior.sir_calibration).
    It must be resolved to a number before SIR draws; a = 0 (no signal) resolves to T = inf, SIR off."""

    def __str__(self) -> str:
        return "calibrated"


SIRTemperature = Union[float, ESSTarget, Calibrated]


def parse_sir_temperature(text: str) -> SIRTemperature:
    """A fixed temperature ('3'), an ESS target ('ess:0.94') or 'calibrated', as the command lines write them."""
    if text == "calibrated":
        return Calibrated()
    if text.startswith("ess:"):
        try:
            return ESSTarget(float(text[len("ess:"):]))
        except ValueError as error:
            raise ValueError(f"--sir-temperature ess:F needs a fraction 0 < F < 1, got {text!r}") from error
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--sir-temperature takes a number T > 0, ess:F (0 < F < 1) or calibrated, "
                         f"got {text!r}") from None


def check_sir_temperature(temperature: SIRTemperature, name: str = "the SIR temperature") -> None:
    """Raise ValueError unless ``temperature`` is a number > 0 (inf: SIR off), an ESSTarget or Calibrated."""
    if not isinstance(temperature, (ESSTarget, Calibrated)) and not temperature > 0:
        raise ValueError(f"{name} must be > 0, got {temperature}")


def temperature_tag(temperature: SIRTemperature) -> str:
    """The suffix that names a tempered SIR in labels and row names ('_T3', '_ess0.94', '_calibrated'); '' at the
    default."""
    if isinstance(temperature, ESSTarget):
        return f"_ess{temperature.fraction:g}"
    if isinstance(temperature, Calibrated):
        return "_calibrated"
    return f"_T{temperature:g}" if temperature != DEFAULT_SIR_TEMPERATURE else ""


def describe_temperature(temperature: SIRTemperature) -> str:
    """'temperature 3' or 'ESS-targeted temperature (ess:0.94)', for hooks' settings; '' at the default."""
    if isinstance(temperature, ESSTarget):
        return f"ESS-targeted temperature ({temperature})"
    if isinstance(temperature, Calibrated):
        return "a temperature still to be calibrated"
    return f"temperature {temperature:g}" if temperature != DEFAULT_SIR_TEMPERATURE else ""


def sir_log_weight(
    kind: str, energy: torch.Tensor, log_p0: torch.Tensor | None = None, log_q: torch.Tensor | None = None
) -> torch.Tensor:
    """SIR log-weights: ``exact`` -E(z) + log p0(z) - log q(z) (importance sampling towards
    p_psi ∝ p0 exp(-E)), or ``energy`` -E(z) (the authors' variant)."""
    if kind == "energy":
        return -energy
    if kind == "exact":
        if log_p0 is None or log_q is None:
            raise ValueError("exact SIR weights need log p0(z) and log q(z)")
        return -energy + log_p0 - log_q
    raise ValueError(f"unknown SIR weighting {kind!r}; choose one of {SIR_WEIGHTS}")


def sir_select(
    propose: Callable[[int], Proposal],
    log_weight: Callable[..., torch.Tensor],
    num_proposals: int,
    chunk: int,
    batch: int,
    generator: torch.Generator | None = None,
    temperature: SIRTemperature = DEFAULT_SIR_TEMPERATURE,
) -> tuple[Proposal, torch.Tensor, float]:
    """Pick one of ``num_proposals`` proposals per item with probability softmax(log w / T), in chunks.

    ``propose(k)`` draws k proposals for each of the ``batch`` items: a tensor, or a tuple of tensors
    carrying side information computed at draw time (e.g. log q), each shaped (k, batch, ...); all k
    proposals of item i share item i's context. ``log_weight(*proposal)`` returns (k, batch) log-weights.
    The Gumbel noise comes from ``generator`` (the default generator when None), drawn as one (k, batch)
    uniform block per chunk.

    ``temperature`` T tempers the weights to w^(1/T): T = 1 resamples towards the weights' target, larger T
    flattens them towards the proposal itself (a learned energy whose scale is not a log-density ratio, such
    as a Wasserstein critic's, can need T > 1; docs/results.md, section 5). An ESSTarget runs the selection at
    every T of ADAPTIVE_TEMPERATURES at once (one Gumbel draw shared by all: each T's pick is an exact
    categorical draw) and keeps the smallest T whose mean ESS reaches the target (the largest if none does).

    Returns the chosen proposal (same structure, each tensor (batch, ...)), the effective sample size per
    item, (sum w)^2 / sum w^2 of the tempered weights, from streamed log-sum-exps of log w and 2 log w, and
    the temperature used.
    """
    if num_proposals < 1 or chunk < 1:
        raise ValueError(f"need num_proposals >= 1 and chunk >= 1, got {num_proposals} and {chunk}")
    check_sir_temperature(temperature)
    if isinstance(temperature, Calibrated):
        raise ValueError("a calibrated SIR temperature must be fitted before sampling "
                         "(evalp_prior.sir_calibration.calibrate_sir)")
    temperatures = ADAPTIVE_TEMPERATURES if isinstance(temperature, ESSTarget) else (temperature,)
    best: tuple[torch.Tensor, ...] | None = None  # each (len(temperatures), batch, ...)
    best_key = lse_w = lse_w2 = torch.empty(0)
    drawn = 0
    while drawn < num_proposals:
        k = min(chunk, num_proposals - drawn)
        proposal = propose(k)
        tensors = proposal if isinstance(proposal, tuple) else (proposal,)
        raw = log_weight(*tensors)
        raw = raw.to(torch.promote_types(raw.dtype, torch.float32))
        if raw.shape != (k, batch):
            raise ValueError(f"log_weight returned shape {tuple(raw.shape)}, expected {(k, batch)}")
        log_w = torch.stack([raw if t == DEFAULT_SIR_TEMPERATURE else raw / t for t in temperatures])
        uniform = torch.rand(k, batch, generator=generator, device=raw.device, dtype=raw.dtype)
        key, index = (log_w - (-uniform.log()).log()).max(dim=1)  # (T, batch), first index on ties
        items = torch.arange(batch, device=index.device)
        picked = tuple(t[index, items] for t in tensors)
        if best is None:
            best, best_key = picked, key
            lse_w, lse_w2 = log_w.logsumexp(1), (2 * log_w).logsumexp(1)
        else:
            better = key > best_key  # strict: ties keep the earlier proposal, as one argmax would
            best = tuple(
                torch.where(better.view(*better.shape, *([1] * (p.dim() - 2))), p, b) for p, b in zip(picked, best)
            )
            best_key = torch.where(better, key, best_key)
            lse_w = torch.logaddexp(lse_w, log_w.logsumexp(1))
            lse_w2 = torch.logaddexp(lse_w2, (2 * log_w).logsumexp(1))
        drawn += k
    assert best is not None
    ess = (2 * lse_w - lse_w2).exp()  # (T, batch)
    chosen = 0
    if isinstance(temperature, ESSTarget):
        reached = (ess.mean(1) >= temperature.fraction * num_proposals).nonzero()
        chosen = int(reached[0]) if len(reached) else len(temperatures) - 1
    picked_best = tuple(b[chosen] for b in best)
    return (picked_best if isinstance(proposal, tuple) else picked_best[0]), ess[chosen], temperatures[chosen]


def log_mean_weight(
    propose: Callable[[int], Proposal],
    log_weight: Callable[..., torch.Tensor],
    num_proposals: int,
    chunk: int,
    batch: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log (1/M) sum_j w_j over M = ``num_proposals`` proposals per item, and the weights' relative variance.

    Same ``propose``/``log_weight`` contract as sir_select. With w = p~(z) / r(z), z ~ r, the mean is an
    unbiased estimate of the normaliser Z of p~; its log is biased low, by about rel_var / (2 M) (delta
    method), rel_var = mean(w^2) / mean(w)^2 - 1 = M / ESS - 1, returned (batch,) beside log Z (batch,).
    One proposal says nothing about the weights' spread: its rel_var is NaN (unknown), not 0, so that a
    report cannot read the log of a single weight as unbiased.
    """
    if num_proposals < 1 or chunk < 1:
        raise ValueError(f"need num_proposals >= 1 and chunk >= 1, got {num_proposals} and {chunk}")
    lse_w = lse_w2 = None
    drawn = 0
    while drawn < num_proposals:
        k = min(chunk, num_proposals - drawn)
        proposal = propose(k)
        log_w = log_weight(*(proposal if isinstance(proposal, tuple) else (proposal,))).double()
        if log_w.shape != (k, batch):
            raise ValueError(f"log_weight returned shape {tuple(log_w.shape)}, expected {(k, batch)}")
        w, w2 = log_w.logsumexp(0), (2 * log_w).logsumexp(0)
        lse_w, lse_w2 = (w, w2) if lse_w is None else (torch.logaddexp(lse_w, w), torch.logaddexp(lse_w2, w2))
        drawn += k
    log_m = math.log(num_proposals)
    rel_var = (lse_w2 - log_m - 2 * (lse_w - log_m)).exp() - 1
    if num_proposals == 1:
        rel_var = torch.full_like(rel_var, math.nan)
    return lse_w - log_m, rel_var
