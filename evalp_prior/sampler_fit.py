"""The sampler's maximum-likelihood start: the whole flow fitted to posterior samples of the top group before the game.

The moment start (``--sampler-affine moments``) puts the sampler at the Gaussian fit of the aggregate posterior;
the adversarial game does not move it from there (docs/results.md section 0d: a 1-Lipschitz critic's gradient
carries too little of what separates the posterior from its Gaussian fit). The same flow fitted by maximum
likelihood, max_alpha E_{z ~ q(z_1)} log q_alpha(z), learns much of the rest. This module draws the posterior samples
once (a bank) and runs that fit; the game then starts from the fitted sampler.

Only the top group is supported: its context (the decoder's learned start tensor) is the same for every image, so
a bank of z alone describes it; a lower group's context depends on the image and would have to be stored with it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from nvae.data import binarize_if_needed
from nvae.model import NVAE

from .objectives import GroupBatch
from .sampler import SharedFlowSampler

# Fixed seeds of the bank's posterior draws and of the fit's minibatches: every rank, and a resumed run, computes
# the same start whatever the run's own seed (the checkpoint then overwrites it on resume).
BANK_SEED = 3_141_592
FIT_SEED = 1_618_033


@dataclass
class TopGroupBank:
    """One posterior draw of z_1 per image, (N, C, H, W) float32 on the CPU, and z_1's context, the same for every
    image: h (1, C_h, H, W), mu_p and sigma_p (1, C, H, W) on the model's device."""

    z: torch.Tensor
    h: torch.Tensor
    mu_p: torch.Tensor
    sigma_p: torch.Tensor

    def batch(self, z: torch.Tensor) -> GroupBatch:
        """Rows z of this bank (any device) with the shared context expanded to them, as a posterior pass gives."""
        h, mu_p, sigma_p = (t.expand(z.shape[0], -1, -1, -1) for t in (self.h, self.mu_p, self.sigma_p))
        return GroupBatch(0, z.to(self.h.device), h, mu_p, sigma_p)


@torch.no_grad()
def top_group_bank(vae: NVAE, dataset: Dataset, count: int, batch_size: int, binarize: bool,
                   device: torch.device) -> TopGroupBank:
    """Posterior samples of z_1 for the first ``count`` images of dataset (all of them when it holds fewer), drawn
    from BANK_SEED; raises ValueError if z_1's context differs between images (it cannot be banked then)."""
    count = min(count, len(dataset))
    if count < 2:
        raise ValueError(f"the sampler fit needs at least 2 training images, got {count}")
    draws, context = [], None
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(BANK_SEED)
        for start in range(0, count, batch_size):  # no DataLoader: its iterator would draw from the seeded stream
            batch = torch.stack([dataset[i] for i in range(start, min(start + batch_size, count))]).to(device)
            top = vae.posterior(binarize_if_needed(batch, binarize)).groups[0]
            first = (top.h[:1].float(), top.mu_p[:1].float(), top.sigma_p[:1].float())
            if context is None:
                context = first
            if any(not torch.equal(c.expand_as(t), t.float()) for c, t in zip(context, (top.h, top.mu_p, top.sigma_p))):
                raise ValueError("the top group's context differs between images: its posterior samples cannot be banked")
            draws.append(top.z.float().cpu())
    return TopGroupBank(torch.cat(draws), *context)


def fit_sampler(sampler: SharedFlowSampler, bank: TopGroupBank, steps: int, batch_size: int,
                lr: float) -> dict[str, float]:
    """Maximum likelihood of the bank's z_1 under the sampler (group 0): ``steps`` Adam steps on minibatches drawn
    with replacement from FIT_SEED, in float32. Returns the bank's mean negative log-likelihood (nats per image)
    before and after, over the same fixed subset of at most 4096 rows."""
    if 0 not in sampler.groups:
        raise ValueError(f"the sampler fit is for the top group, the sampler's groups are {sampler.groups}")
    device = bank.h.device
    generator = torch.Generator().manual_seed(FIT_SEED)
    optimizer = torch.optim.Adam(sampler.parameters(), lr=lr)

    def nll(z: torch.Tensor) -> torch.Tensor:
        b = bank.batch(z)
        return -sampler.log_prob(b.z_pos, b.mu_p, b.sigma_p, b.h, 0).mean()

    probe = bank.z[torch.randperm(bank.z.shape[0], generator=generator)[:4096]]
    with torch.no_grad():
        before = float(nll(probe))
    with torch.autocast(device_type=device.type, enabled=False):
        for _ in range(steps):
            loss = nll(bank.z[torch.randint(bank.z.shape[0], (batch_size,), generator=generator)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        after = float(nll(probe))
    if not math.isfinite(after):
        raise FloatingPointError(f"the sampler fit diverged (bank NLL {after}); lower --sampler-fit-lr")
    return {"nll_before": before, "nll_after": after}
