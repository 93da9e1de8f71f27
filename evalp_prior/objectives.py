"""EVaLP training objectives: the alternating energy / sampler steps of SPEC section 1.

The min-max problem is
    min_psi max_alpha  J = E_{z+ ~ q(z)}[E_psi(z+)] - E_eps[E_psi(g_alpha(eps))] - w_kl KL(q_alpha || p0),
solved without MCMC by alternating an energy (critic) step every call and a sampler step every
``n_critic`` calls. In the hierarchical form (SPEC section 2) every selected group contributes its own
terms, with positives, negatives and the base p0 = N(mu_p, sigma_p^2) all sharing the context h_l.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable, Iterator, Sequence

import torch
from torch import nn

from evalp_prior.sampler import gaussian_log_prob

EnergyFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BackwardAndStep = Callable[[torch.Tensor, torch.optim.Optimizer, Sequence[nn.Parameter]], bool]


GRADIENT_PENALTIES = ("two-sided", "one-sided", "r1")


def input_gradient_norms(energy_fn: EnergyFn, z: torch.Tensor, h: torch.Tensor, create_graph: bool = False,
                         grad_scale: float = 1.0) -> torch.Tensor:
    """(B,) float32 norms ||grad_z E(z_i, h_i)||, per sample (energies are per-sample, so one backward of
    the sum gives every row's own gradient). ``grad_scale`` (the fp16 loss scale) multiplies the energies
    before the gradient is taken and is divided out in float32 afterwards, so that the gradient's fp16
    intermediates do not underflow (PyTorch's AMP recipe for gradient penalties)."""
    z = z.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(energy_fn(z, h).sum() * grad_scale, z, create_graph=create_graph)
    grad = grad.to(torch.promote_types(grad.dtype, torch.float32)) / grad_scale
    return grad.flatten(1).norm(dim=1)


def gradient_penalty(
    energy_fn: EnergyFn,
    z_pos: torch.Tensor,
    z_neg: torch.Tensor,
    h: torch.Tensor,
    generator: torch.Generator | None = None,
    grad_scale: float = 1.0,
    kind: str = "two-sided",
) -> torch.Tensor:
    """The Lipschitz term of L_E (SPEC section 1, energy step), ``energy_fn(z, h) -> (B,)``:

    - ``two-sided`` (WGAN-GP, Gulrajani et al. 2017): mean_i (||grad E(z_hat_i)|| - 1)^2 at
      z_hat = u z+ + (1 - u) z-, u ~ U(0, 1) per sample; forces |grad E| = 1 between the two sets.
    - ``one-sided`` (Petzka et al. 2018): mean_i max(0, ||grad E(z_hat_i)|| - 1)^2; only bounds it.
    - ``r1`` (zero-centred, Mescheder et al. 2018): mean_i ||grad E(z+_i)||^2 on positives.

    The gradient keeps its graph (create_graph=True) so the penalty trains the energy; see
    ``input_gradient_norms`` for ``grad_scale``.
    """
    if kind not in GRADIENT_PENALTIES:
        raise ValueError(f"unknown gradient penalty {kind!r}; choose one of {GRADIENT_PENALTIES}")
    if kind == "r1":
        return input_gradient_norms(energy_fn, z_pos, h, True, grad_scale).square().mean()
    u = torch.rand(z_pos.shape[0], generator=generator, device=z_pos.device, dtype=z_pos.dtype)
    u = u.view(-1, *([1] * (z_pos.dim() - 1)))
    z_hat = u * z_pos.detach() + (1 - u) * z_neg.detach()
    excess = input_gradient_norms(energy_fn, z_hat, h, True, grad_scale) - 1
    return (excess.clamp_min(0) if kind == "one-sided" else excess).square().mean()


def energy_loss(
    e_pos: torch.Tensor, e_neg: torch.Tensor, gp: torch.Tensor, lambda_gp: float = 10.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_E = mean E(z+) - mean E(z-) + lambda_gp * gp (SPEC section 1, energy step).

    Returns the loss and detached stats: ``energy_gap`` = mean E(z+) - mean E(z-) (negative once the
    energy separates posterior samples from the sampler's) and ``gp``.
    """
    gap = e_pos.mean() - e_neg.mean()
    return gap + lambda_gp * gp, {"energy_gap": gap.detach(), "gp": gp.detach()}


def sampler_loss(
    e_neg: torch.Tensor, log_q: torch.Tensor, log_p0: torch.Tensor, kl_weight: float
) -> torch.Tensor:
    """L_g = mean E(g(eps)) + w_kl * (mean log q_alpha(g(eps)) - mean log p0(g(eps))) (SPEC section 1).

    With w_kl = 0 (the default setting, a latent-space WGAN) the KL term is left out of the graph.
    """
    loss = e_neg.mean()
    if kl_weight != 0.0:
        loss = loss + kl_weight * (log_q.mean() - log_p0.mean())
    return loss


@dataclass
class GroupBatch:
    """One EVaLP group's training data from a posterior pass of the frozen NVAE (tensors (B, ...))."""

    group: int
    z_pos: torch.Tensor  # (B, C_z, H, W) posterior sample z_l ~ q(z_l | x, z_<l)
    h: torch.Tensor  # (B, C_h, H, W) decoder context on the same path
    mu_p: torch.Tensor  # (B, C_z, H, W) NVAE's conditional prior at temperature 1
    sigma_p: torch.Tensor


@dataclass(frozen=True)
class ObjectiveConfig:
    """Hyper-parameters of the alternating objective (SPEC section 1 defaults)."""

    n_critic: int = 5  # energy steps per sampler step
    lambda_gp: float = 10.0
    kl_weight: float = 0.0  # w_kl
    gradient_penalty: str = "two-sided"  # one of GRADIENT_PENALTIES
    critic_warmup_steps: int = 0  # energy-only steps before the first sampler step
    critic_only: bool = False  # never step the sampler: the critic measures a fixed sampler

    def is_sampler_step(self, step: int) -> bool:
        """Whether the call at ``step`` (0-based) also steps the sampler: calls 0, n_critic, 2 n_critic, ... (from
        the warm-up on), so that a run of k n_critic calls, and every evaluation at such a boundary, ends with
        n_critic - 1 critic-only steps: diagnostics never see a critic that has not answered the last update."""
        return not self.critic_only and step >= self.critic_warmup_steps and step % self.n_critic == 0


def plain_backward_and_step(
    loss: torch.Tensor, optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter]
) -> bool:
    """fp32 single-process update: zero grads, backward, step; always reports the step as taken."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return True


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Turn off requires_grad of ``module``'s parameters, restoring each flag afterwards.

    Used for the sampler step: the energy's gradients are discarded by never being computed, which also
    keeps a DistributedDataParallel-wrapped energy from reducing anything.
    """
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def _mean(values: Iterable[torch.Tensor]) -> torch.Tensor:
    """Mean of 0-dim tensors."""
    return torch.stack(list(values)).mean()


def alternating_step(
    batch: Sequence[GroupBatch],
    energies: nn.Module,
    sampler: nn.Module,
    energy_optimizer: torch.optim.Optimizer,
    sampler_optimizer: torch.optim.Optimizer,
    step: int,
    config: ObjectiveConfig = ObjectiveConfig(),
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
    backward_and_step: BackwardAndStep = plain_backward_and_step,
    frozen_energies: nn.Module | None = None,
    gp_grad_scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """One EVaLP training step for all groups in ``batch``: an energy step, then a sampler step when
    ``config.is_sampler_step(step)`` (SPEC section 1; the group losses are summed).

    ``energies`` is an EnergySet and ``sampler`` a SharedFlowSampler, either possibly wrapped in
    DistributedDataParallel: both are only ever called through their forward. ``autocast()`` opens the
    mixed-precision context; ``backward_and_step(loss, optimizer, params)`` zeroes the optimizer's
    grads, backpropagates (scaled or not), steps, and returns whether the step was taken. Sampler
    params get no gradient in the energy step (negatives are drawn under no_grad) and energy params
    none in the sampler step (they are frozen), so each closure only ever sees its own gradients.
    ``frozen_energies`` (default ``energies``) is the module the sampler step freezes and evaluates:
    pass the unwrapped EnergySet when ``energies`` is DDP-wrapped, so that no DDP forward runs in a
    step whose energy parameters get no gradient. ``gp_grad_scale``: the energy step's fp16 loss scale
    (see ``gradient_penalty``).

    The energies see ``EnergySet.inputs`` of every latent (whitened by (mu_p, sigma_p) when the set says
    so), and the penalty is taken in those coordinates.

    Returns detached 0-dim tensors: ``energy_gap/group{l}`` and ``gp/group{l}`` per group, their
    ``/mean``, ``energy_loss``, ``energy_step_taken``, ``sampler_step`` (1 when a sampler step ran) and,
    on sampler steps, ``sampler_loss``, ``sampler_step_taken`` and ``kl/group{l}`` (the single-sample
    estimate of KL(q_alpha || p0) for that group).
    """
    stats: dict[str, torch.Tensor] = {}
    critic = energies if frozen_energies is None else frozen_energies

    # Energy step: negatives from the current sampler, detached.
    with torch.no_grad(), autocast():
        negatives = [sampler(b.mu_p, b.sigma_p, b.h, b.group)[0] for b in batch]
    with autocast():
        total = None
        for b, z_neg in zip(batch, negatives):
            n = b.z_pos.shape[0]
            x_pos = critic.inputs(b.z_pos, b.mu_p, b.sigma_p)
            x_neg = critic.inputs(z_neg.to(b.z_pos.dtype), b.mu_p, b.sigma_p)
            # One evaluation for positives and negatives: energies are per-sample, so this is exact.
            e = energies(b.group, torch.cat([x_pos, x_neg]), torch.cat([b.h, b.h]))
            gp = gradient_penalty(lambda x, h, g=b.group: energies(g, x, h), x_pos, x_neg, b.h,
                                  grad_scale=gp_grad_scale, kind=config.gradient_penalty)
            loss, group_stats = energy_loss(e[:n], e[n:], gp, config.lambda_gp)
            total = loss if total is None else total + loss
            stats[f"energy_gap/group{b.group}"] = group_stats["energy_gap"]
            stats[f"gp/group{b.group}"] = group_stats["gp"]
    taken = backward_and_step(total, energy_optimizer, list(energies.parameters()))
    stats["energy_loss"] = total.detach()
    stats["energy_step_taken"] = torch.tensor(float(taken))
    stats["energy_gap/mean"] = _mean(stats[f"energy_gap/group{b.group}"] for b in batch)
    stats["gp/mean"] = _mean(stats[f"gp/group{b.group}"] for b in batch)

    is_sampler_step = config.is_sampler_step(step)
    stats["sampler_step"] = torch.tensor(float(is_sampler_step))
    if not is_sampler_step:
        return stats

    # Sampler step: the energy is a fixed function here.
    with frozen(critic):
        with autocast():
            total = None
            for b in batch:
                z, log_q = sampler(b.mu_p, b.sigma_p, b.h, b.group)
                log_p0 = gaussian_log_prob(z, b.mu_p, b.sigma_p)
                loss = sampler_loss(critic(b.group, critic.inputs(z, b.mu_p, b.sigma_p), b.h), log_q, log_p0,
                                    config.kl_weight)
                total = loss if total is None else total + loss
                stats[f"kl/group{b.group}"] = (log_q - log_p0).mean().detach()
        taken = backward_and_step(total, sampler_optimizer, list(sampler.parameters()))
    stats["sampler_loss"] = total.detach()
    stats["sampler_step_taken"] = torch.tensor(float(taken))
    return stats
