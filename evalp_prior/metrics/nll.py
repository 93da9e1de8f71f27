"""Importance-weighted likelihood of the frozen NVAE under its own or another prior (Burda et al. 2016, IWAE).

log p(x) >= L_K = log (1/K) sum_k p(x | z_k) p(z_k) / q(z_k | x),  z_k ~ q(z | x).
With NVAE's own hierarchical Gaussian prior p0 the bound is exact to compute. A prior that changes group l to
p(z_l | h_l) = p0(z_l | h_l) r(z_l, h_l) / Z(h_l) (a ``PriorDensity``: EVaLP's energy prior, its sampler, the
Langevin and NCP priors; see evalp_prior/density.py) enters through log r and an importance estimate of
log Z(h_l). L_1 averaged over the K samples is the ELBO; E[L_K] increases with K towards log p(x).

The log of an unbiased estimate of Z is biased low by about rel_var / (2 M) for M proposals (reported), so
with an estimated Z the numbers are biased optimistic by that much, and L_K is no longer a strict bound.
A group whose context h_l is the same for every item (the top group: NVAE's constant start tensor) has ONE
Z, estimated once with ``log_z_samples`` proposals; other groups need one per posterior sample
(``log_z_item_samples`` each).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Protocol

import torch
from torch.utils.data import DataLoader, Dataset

from nvae.hooks import GroupState
from nvae.model import NVAE
from nvae.data import binarize_if_needed
from nvae.runtime import forked_rng

LN2 = math.log(2.0)
DEFAULT_LOG_Z_SAMPLES = 10000  # proposals for a normaliser shared by all items (the top group)
DEFAULT_LOG_Z_ITEM_SAMPLES = 100  # proposals per posterior sample for a context-conditioned normaliser
LOG_Z_SEED = 4321  # log Z proposals draw from their own stream (Normalisers.__call__)


class PriorDensity(Protocol):
    """A prior as a density relative to NVAE's p0, group by group (evalp_prior/density.py)."""

    def log_density_ratio(self, group: int, z: torch.Tensor, h: torch.Tensor, mu_p: torch.Tensor,
                          sigma_p: torch.Tensor) -> Optional[torch.Tensor]:
        ...

    def log_normaliser(self, group: int, h: torch.Tensor, mu_p: torch.Tensor, sigma_p: torch.Tensor,
                       num: int) -> tuple[torch.Tensor, torch.Tensor]:
        ...


class Normalisers:
    """log Z(h_l) of each (prior, group) along posterior passes; a shared context's Z estimated once.

    Keeps, per (prior, group), the estimates' mean log Z and relative variance for the report.
    """

    def __init__(self, log_z_samples: int = DEFAULT_LOG_Z_SAMPLES,
                 log_z_item_samples: int = DEFAULT_LOG_Z_ITEM_SAMPLES) -> None:
        if log_z_samples < 1 or log_z_item_samples < 1:
            raise ValueError(f"log Z needs at least 1 proposal, got {log_z_samples} and {log_z_item_samples}")
        self.log_z_samples = log_z_samples
        self.log_z_item_samples = log_z_item_samples
        self._shared: dict[tuple[str, int], torch.Tensor] = {}
        self._records: dict[tuple[str, int], dict[str, Any]] = {}
        self._calls = 0

    def __call__(self, name: str, density: PriorDensity, group: int, st: GroupState) -> torch.Tensor:
        """log Z (rows,) float64 for the rows of st. Its proposals come from a forked, seeded random stream,
        so the posterior samples of a likelihood evaluation do not depend on which priors it includes."""
        self._calls += 1
        with forked_rng(st.h.device, LOG_Z_SEED + self._calls):
            return self._log_z(name, density, group, st)

    def _log_z(self, name: str, density: PriorDensity, group: int, st: GroupState) -> torch.Tensor:
        rows = st.h.shape[0]
        shared = all(torch.equal(t, t[:1].expand_as(t)) for t in (st.h, st.mu_p, st.sigma_p))
        key = (name, group)
        if shared:
            if key not in self._shared:
                log_z, rel_var = density.log_normaliser(group, st.h[:1], st.mu_p[:1], st.sigma_p[:1], self.log_z_samples)
                self._shared[key] = log_z.double()
                self._record(key, log_z, rel_var, self.log_z_samples, True)
            return self._shared[key].expand(rows)
        log_z, rel_var = density.log_normaliser(group, st.h, st.mu_p, st.sigma_p, self.log_z_item_samples)
        self._record(key, log_z, rel_var, self.log_z_item_samples, False)
        return log_z.double()

    def _record(self, key: tuple[str, int], log_z: torch.Tensor, rel_var: torch.Tensor, num: int,
                shared: bool) -> None:
        r = self._records.setdefault(key, {"group": key[1], "shared_context": shared, "proposals": num,
                                           "sum_log_z": 0.0, "sum_rel_var": 0.0, "count": 0})
        r["sum_log_z"] += float(log_z.double().sum())
        r["sum_rel_var"] += float(rel_var.double().sum())
        r["count"] += log_z.numel()

    def report(self, name: str) -> list[dict[str, Any]]:
        """Per group of prior `name`: mean log Z, mean relative variance, proposals and the estimated bias of
        log Z-hat (-rel_var / (2 M), Jensen)."""
        out = []
        for (n, _), r in sorted(self._records.items()):
            if n != name:
                continue
            rel_var = r["sum_rel_var"] / r["count"]
            out.append({"group": r["group"], "shared_context": r["shared_context"], "proposals": r["proposals"],
                        "log_z": r["sum_log_z"] / r["count"], "rel_var": rel_var,
                        "log_z_bias": -rel_var / (2 * r["proposals"]), "estimates": r["count"]})
        return out


def iw_bound(log_w: torch.Tensor) -> torch.Tensor:
    """L_K (B,) from log-weights (K, B), log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x): logmeanexp over k."""
    log_w = log_w.double()
    return log_w.logsumexp(0) - math.log(log_w.shape[0])


@torch.no_grad()
def importance_log_weights(vae: NVAE, x: torch.Tensor, num_samples: int, binarize: bool, chunk: int = 16,
                           priors: Optional[Mapping[str, Optional[PriorDensity]]] = None,
                           normalisers: Optional[Normalisers] = None) -> dict[str, torch.Tensor]:
    """Log-weights (K, B) float64 of every prior in ``priors`` (name -> density, None = NVAE's own Gaussian;
    default {"gaussian": None}) for images x (B, C, H, W) in [0, 1], all from the SAME num_samples posterior
    passes (so differences between priors carry no posterior-sampling noise).

    Binarised data sets draw one binarisation per image, shared by its K samples (the bound is on that binary
    image). The K samples run ``chunk`` at a time as one batch of chunk * B images. The model should be in
    eval mode (BN running statistics), as it is after loading.
    """
    if num_samples < 1 or chunk < 1:
        raise ValueError(f"need num_samples >= 1 and chunk >= 1, got {num_samples} and {chunk}")
    priors = {"gaussian": None} if priors is None else priors
    normalisers = normalisers or Normalisers()
    x = binarize_if_needed(x, binarize)
    batch = x.shape[0]
    log_w: dict[str, list[torch.Tensor]] = {name: [] for name in priors}
    for start in range(0, num_samples, chunk):
        k = min(chunk, num_samples - start)
        xk = x.repeat(k, *([1] * (x.dim() - 1)))  # row j * B + i is image i
        out = vae.posterior(xk)
        log_px = -vae.reconstruction_nll(out.logits, xk).double()  # (k * B,)
        # Elementwise log q / log p of each group's z; with shift-only posterior flows log_q is already
        # the density of the flowed z (volume-preserving), so the sum is log q(z|x) - log p0(z) exactly.
        base = log_px - sum((st.log_q.double() - st.log_p.double()).flatten(1).sum(1) for st in out.groups)
        for name, density in priors.items():
            w = base
            for g, st in enumerate(out.groups if density is not None else ()):
                ratio = density.log_density_ratio(g, st.z, st.h, st.mu_p, st.sigma_p)
                if ratio is not None:
                    w = w + ratio.double() - normalisers(name, density, g, st)
            log_w[name].append(w.view(k, batch))
    return {name: torch.cat(chunks) for name, chunks in log_w.items()}  # each (K, B)


def importance_weighted_nll(vae: NVAE, x: torch.Tensor, num_samples: int, binarize: bool,
                            chunk: int = 16) -> torch.Tensor:
    """-L_K (B,) in nats under NVAE's own Gaussian prior, for images x (B, C, H, W) in [0, 1]."""
    return -iw_bound(importance_log_weights(vae, x, num_samples, binarize, chunk)["gaussian"])


def image_dims(vae: NVAE, x: torch.Tensor) -> int:
    """Pixels per image the likelihood is measured on (C * H * W after the loss crop)."""
    return vae.crop(x[:1]).numel()


@torch.no_grad()
def dataset_nll(vae: NVAE, dataset: Dataset, num_samples: int, num_images: int, binarize: bool,
                batch_size: int = 32, chunk: int = 16, device: Optional[torch.device] = None,
                priors: Optional[Mapping[str, Optional[PriorDensity]]] = None,
                normalisers: Optional[Normalisers] = None) -> dict[str, dict[str, Any]]:
    """Per prior (default: NVAE's Gaussian only), over the first num_images of dataset: mean -L_K (``nats``,
    ``bits_per_dim``) and the mean ELBO (``elbo_nats``: -mean_k log w_k, also as bits per dim), with the log Z
    estimates of an unnormalised prior (``log_z``). Every prior sees the same posterior samples."""
    if num_images < 1:
        raise ValueError(f"the NLL needs at least 1 image, got {num_images}")
    priors = {"gaussian": None} if priors is None else priors
    normalisers = normalisers or Normalisers()
    device = device or next(vae.parameters()).device
    n = min(num_images, len(dataset))
    nll = {name: 0.0 for name in priors}
    neg_elbo = dict(nll)
    dims = 0
    loader = DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size)
    for batch in loader:
        x = batch.to(device)
        for name, log_w in importance_log_weights(vae, x, num_samples, binarize, chunk, priors, normalisers).items():
            nll[name] -= float(iw_bound(log_w).sum())
            neg_elbo[name] -= float(log_w.mean(0).sum())
        dims = image_dims(vae, x)
    out = {}
    for name in priors:
        nats, elbo = nll[name] / n, neg_elbo[name] / n
        out[name] = {"nats": nats, "bits_per_dim": nats / (dims * LN2), "elbo_nats": elbo,
                     "elbo_bits_per_dim": elbo / (dims * LN2), "num_samples": num_samples, "num_images": n,
                     "dims": dims, "log_z": normalisers.report(name)}
    return out
