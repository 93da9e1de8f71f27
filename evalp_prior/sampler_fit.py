"""The sampler's maximum-likelihood start: the whole flow fitted to posterior samples of its groups before the game.

The moment start (``--sampler-affine moments``) puts the sampler at the Gaussian fit of the aggregate posterior;
the adversarial game does not move it from there (docs/results.md section 0d: a 1-Lipschitz critic's gradient
carries too little of what separates the posterior from its Gaussian fit). The same flow fitted by maximum
likelihood, max_alpha E_{z ~ q(z_1)} log q_alpha(z), learns much of the rest. This module draws the posterior samples
once (a bank) and runs that fit; the game then starts from the fitted sampler.

The top group's context (the decoder's learned start tensor) is the same for every image, so its bank is z alone.
A lower group's context h_l depends on the image (through the posterior draws of the groups above it), so its bank
stores (z_l, h_l, mu_p, sigma_p) per image and the fit is the conditional one, max_alpha E log q_alpha(z_l | h_l):
the aggregate posterior of z_l given the context a posterior pass produces, which is the context generation sees
when the groups above are sampled from a prior that matches their aggregate posterior.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch
from torch.utils.data import Dataset

from nvae.data import binarize_if_needed
from nvae.model import NVAE
from nvae.runtime import forked_rng

from .objectives import GroupBatch
from .sampler import SharedFlowSampler

# Fixed seeds of the bank's posterior draws and of the fit's minibatches: every rank, and a resumed run, computes
# the same start whatever the run's own seed (the checkpoint then overwrites it on resume).
BANK_SEED = 3_141_592
# The held-out bank's draws need a stream of their own, shared with no draw the sampler's start or fit saw: with
# BANK_SEED (or the moment start's MOMENT_SEED), row i of both would share its noise (the same random numbers in
# the same batch positions), and a sampler fitted to those draws would score as well on the held-out rows.
HELDOUT_BANK_SEED = 1_414_213
FIT_SEED = 1_618_033
# Share of the machine's available memory that the lower groups' banks may take (split between the ranks of a
# node): the fit's batches, the model and the data need the rest. Above it the fit stops before the posterior pass.
BANK_MEMORY_FRACTION = 0.5


@dataclass
class TopGroupBank:
    """One posterior draw of z_1 per image, (N, C, H, W) float32 on the CPU, and z_1's context, the same for every
    image: h (1, C_h, H, W), mu_p and sigma_p (1, C, H, W) on the model's device."""

    group = 0  # the top group (a class attribute: not a field of the saved bank)

    z: torch.Tensor
    h: torch.Tensor
    mu_p: torch.Tensor
    sigma_p: torch.Tensor

    def batch(self, z: torch.Tensor) -> GroupBatch:
        """Rows z of this bank (any device) with the shared context expanded to them, as a posterior pass gives."""
        h, mu_p, sigma_p = (t.expand(z.shape[0], -1, -1, -1) for t in (self.h, self.mu_p, self.sigma_p))
        return GroupBatch(0, z.to(self.h.device), h, mu_p, sigma_p)

    @property
    def device(self) -> torch.device:
        return self.h.device

    def rows(self, index: torch.Tensor) -> GroupBatch:
        """The bank's rows ``index`` (a CPU index tensor) as a GroupBatch."""
        return self.batch(self.z[index])


@dataclass
class LowerGroupBank:
    """One posterior draw of a lower group per image with the context the same posterior pass gave it: z, h, mu_p,
    sigma_p (N, ...) float32 on the CPU (an image's h_l depends on its own draws of the groups above)."""

    group: int
    z: torch.Tensor
    h: torch.Tensor
    mu_p: torch.Tensor
    sigma_p: torch.Tensor
    device: torch.device

    def rows(self, index: torch.Tensor) -> GroupBatch:
        """The bank's rows ``index`` (a CPU index tensor) as a GroupBatch on the model's device."""
        z, h, mu_p, sigma_p = (t[index].to(self.device) for t in (self.z, self.h, self.mu_p, self.sigma_p))
        return GroupBatch(self.group, z, h, mu_p, sigma_p)


PosteriorBank = Union[TopGroupBank, LowerGroupBank]


def image_batches(dataset: Dataset, count: int, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """The first ``count`` images of dataset in order, batch_size at a time, on device. No DataLoader: its
    iterator would draw from the random stream that seeded posterior passes over these batches must own."""
    for start in range(0, count, batch_size):
        yield torch.stack([dataset[i] for i in range(start, min(start + batch_size, count))]).to(device)


def available_memory_bytes(meminfo: Path = Path("/proc/meminfo")) -> Optional[int]:
    """The kernel's estimate of memory available without swapping (MemAvailable), None where it cannot be read."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_bank_memory(bytes_per_image: int, count: int, available: Optional[int], ranks_per_node: int) -> None:
    """ValueError, naming the largest image count that fits, when ``count`` images' lower-group banks would take
    more than BANK_MEMORY_FRACTION of the available memory shared by ``ranks_per_node`` ranks; nothing when the
    available memory is unknown."""
    if available is None or bytes_per_image == 0:
        return
    budget = BANK_MEMORY_FRACTION * available / ranks_per_node
    if bytes_per_image * count > budget:
        raise ValueError(
            f"the sampler fit's lower-group banks would take {bytes_per_image * count / 2**30:.1f} GiB for {count} "
            f"images ({bytes_per_image / 2**10:.0f} KiB each, {ranks_per_node} rank(s) on this node) of "
            f"{available / 2**30:.1f} GiB available: lower --sampler-fit-images to at most "
            f"{int(budget // bytes_per_image)}, or fit fewer --groups")


@torch.no_grad()
def posterior_banks(vae: NVAE, dataset: Dataset, groups: Sequence[int], count: int, batch_size: int, binarize: bool,
                    device: torch.device, seed: int = BANK_SEED) -> list[PosteriorBank]:
    """One bank per group (in the order given) of one posterior draw for each of the first ``count`` images of
    dataset (all of them when it holds fewer), drawn from ``seed``: a TopGroupBank for group 0, whose context must
    be the same for every image (ValueError otherwise), a LowerGroupBank for any other group. The lower groups'
    banks are allocated once, after the first batch shows their size, and checked against the available memory
    (check_bank_memory) before they are."""
    count = min(count, len(dataset))
    if count < 2:
        raise ValueError(f"the sampler fit needs at least 2 training images, got {count}")
    z_top: list[torch.Tensor] = []
    columns: dict[int, tuple[torch.Tensor, ...]] = {}
    context = None
    start = 0
    with forked_rng(device, seed):
        for batch in image_batches(dataset, count, batch_size, device):
            out = vae.posterior(binarize_if_needed(batch, binarize))
            rows = slice(start, start + batch.shape[0])
            if start == 0:
                lower = {g: (out.groups[g].z, out.groups[g].h, out.groups[g].mu_p, out.groups[g].sigma_p)
                         for g in groups if g != 0}
                check_bank_memory(sum(t[0].numel() * 4 for ts in lower.values() for t in ts), count,
                                  available_memory_bytes(), int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
                columns = {g: tuple(torch.empty((count, *t.shape[1:])) for t in ts) for g, ts in lower.items()}
            for g in groups:
                group = out.groups[g]
                if g == 0:
                    context = context or (group.h[:1].float(), group.mu_p[:1].float(), group.sigma_p[:1].float())
                    if any(not torch.equal(c.expand_as(t), t.float())
                           for c, t in zip(context, (group.h, group.mu_p, group.sigma_p))):
                        raise ValueError("the top group's context differs between images: its posterior samples "
                                         "cannot be banked")
                    z_top.append(group.z.float().cpu())
                else:
                    for column, t in zip(columns[g], (group.z, group.h, group.mu_p, group.sigma_p)):
                        column[rows] = t.float().cpu()
            start = rows.stop
    return [TopGroupBank(torch.cat(z_top), *context) if g == 0 else LowerGroupBank(g, *columns[g], device)
            for g in groups]


def top_group_bank(vae: NVAE, dataset: Dataset, count: int, batch_size: int, binarize: bool,
                   device: torch.device) -> TopGroupBank:
    """The top group's bank alone (posterior_banks for group 0)."""
    bank = posterior_banks(vae, dataset, [0], count, batch_size, binarize, device)[0]
    assert isinstance(bank, TopGroupBank)
    return bank


def fit_sampler(sampler: SharedFlowSampler, banks: Sequence[PosteriorBank], steps: int, batch_size: int,
                lr: float, held_out: Sequence[PosteriorBank] = (), check_every: int = 200) -> dict[str, float]:
    """Maximum likelihood of the banks' posterior draws under the sampler, the groups' NLLs summed (the joint
    log q_alpha(z_1, ..., z_L) of the banked draws): ``steps`` Adam steps on minibatches of images drawn with
    replacement from FIT_SEED (the same images in every group), in float32. Returns the mean negative
    log-likelihood (nats per image) before and after over the same fixed subset of at most 4096 images, summed over
    the groups (``nll_before``, ``nll_after``) and per group (``nll_before/groupGG``, ``nll_after/groupGG``).

    With ``held_out`` banks (other images' posterior draws, the same groups) the fit is early-stopped: the sampler
    keeps the weights with the lowest held-out NLL among the start and every ``check_every`` steps, and the result
    adds ``heldout_nll_before``, ``heldout_nll_after`` (per group too) and ``best_step``. A bank holds one draw per
    image, and a lower group's context h_l carries the draws above it: a conditional flow learns those fixed draws
    (on `tiny`, +0.76 nats on its own bank's draws against +0.07 on fresh draws of the same images, docs/results.md
    section 0f), which only draws from another stream (HELDOUT_BANK_SEED) show."""
    groups = [b.group for b in banks]
    missing = [g for g in groups if g not in sampler.groups]
    if missing:
        raise ValueError(f"the banks hold groups {groups}, the sampler's groups are {sampler.groups}")
    if held_out and [b.group for b in held_out] != groups:
        raise ValueError(f"the held-out banks hold groups {[b.group for b in held_out]}, the banks {groups}")
    if check_every < 1:
        raise ValueError(f"the held-out check needs check_every >= 1, got {check_every}")
    count = banks[0].z.shape[0]
    if any(b.z.shape[0] != count for b in banks):
        raise ValueError(f"the banks hold different numbers of images: {[b.z.shape[0] for b in banks]}")
    generator = torch.Generator().manual_seed(FIT_SEED)
    optimizer = torch.optim.Adam(sampler.parameters(), lr=lr)

    def nll(of: Sequence[PosteriorBank], index: torch.Tensor) -> list[torch.Tensor]:
        """Each bank's mean NLL over the images ``index``."""
        out = []
        for bank in of:
            b = bank.rows(index)
            out.append(-sampler.log_prob(b.z_pos, b.mu_p, b.sigma_p, b.h, b.group).mean())
        return out

    def report(parts: list[torch.Tensor], key: str) -> dict[str, float]:
        values = {f"{key}/group{g:02d}": float(p) for g, p in zip(groups, parts)}
        return {key: sum(values.values()), **values}

    @torch.no_grad()
    def held_out_nll() -> list[torch.Tensor]:
        total = [torch.zeros(()) for _ in held_out]
        size = held_out[0].z.shape[0]
        for chunk in torch.arange(size).split(1024):
            total = [t + n.cpu() * chunk.numel() for t, n in zip(total, nll(held_out, chunk))]
        return [t / size for t in total]

    probe = torch.randperm(count, generator=generator)[:4096]
    with torch.no_grad():
        result = report(nll(banks, probe), "nll_before")
    best = None
    if held_out:
        result.update(report(held_out_nll(), "heldout_nll_before"))
        best = (result["heldout_nll_before"], 0, {k: v.detach().clone() for k, v in sampler.state_dict().items()})
    with torch.autocast(device_type=banks[0].device.type, enabled=False):
        for step in range(1, steps + 1):
            loss = sum(nll(banks, torch.randint(count, (batch_size,), generator=generator)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if best is not None and (step % check_every == 0 or step == steps):
                score = float(sum(held_out_nll()))
                if score < best[0]:
                    best = (score, step, {k: v.detach().clone() for k, v in sampler.state_dict().items()})
    if best is not None:
        sampler.load_state_dict(best[2])
        result.update(report(held_out_nll(), "heldout_nll_after"))
        result["best_step"] = best[1]
    with torch.no_grad():
        result.update(report(nll(banks, probe), "nll_after"))
    if not math.isfinite(result["nll_after"]):
        raise FloatingPointError(f"the sampler fit diverged (bank NLL {result['nll_after']}); lower --sampler-fit-lr")
    return result
