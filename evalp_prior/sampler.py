"""The shared amortized sampler g_alpha(eps, h_l, l) of EVaLP (SPEC section 2).

z_l = mu_l + sigma_l * f_alpha(eps; h_l, l), with f an invertible conditional flow of affine couplings
that is exactly the identity at initialisation, so the sampler starts as NVAE's own prior and its
density log q_alpha(z_l | h_l) = log N(eps) - log|det df/deps| - sum log sigma_l is exact. With per-group
affine layers (GroupAffine; stage 2's default ``--sampler-affine moments``) the flow starts instead at the
Gaussian fit of the whitened aggregate posterior: the game did not learn its covariance (docs/results.md 0b, 0c).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from nvae.hooks import GroupSpec
from nvae.runtime.compilation import compiled

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _at_least_f32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half/bfloat16 to float32 (float64 stays float64) so densities are computed exactly."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def standard_normal_log_prob(x: torch.Tensor) -> torch.Tensor:
    """sum over (C, H, W) of log N(x; 0, 1), (B,) in at least float32."""
    x = _at_least_f32(x)
    return -(0.5 * x.square() + _HALF_LOG_2PI).flatten(1).sum(1)


def gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """sum over (C, H, W) of log N(z; mu, sigma^2), (B,) in at least float32."""
    z, mu, sigma = _at_least_f32(z), _at_least_f32(mu), _at_least_f32(sigma)
    return standard_normal_log_prob((z - mu) / sigma) - sigma.log().flatten(1).sum(1)


class AffineCoupling(nn.Module):
    """Affine coupling on channel halves: x_b -> x_b * exp(log_s) + t with (log_s, t) = NN(x_a, cond).

    log_s = bound * tanh(raw / bound) keeps scales in [exp(-bound), exp(bound)]; the last conditioner
    layer is zero-initialised so the coupling is exactly the identity (log-det exactly 0) at init.
    The conditioning enters as an additive term after the first conv of x_a: ``term`` (B, hidden, H, W),
    computed by SharedFlowSampler.condition once per item, is broadcast over every draw of the item, so
    a draw pays only for the conditioner on its own input half.
    """

    def __init__(self, channels: int, hidden: int, flip: bool, bound: float) -> None:
        super().__init__()
        self.flip = flip
        self.bound = bound
        self.split = channels // 2
        n_cond, n_out = (channels - self.split, self.split) if flip else (self.split, channels - self.split)
        self.first = nn.Conv2d(n_cond, hidden, 3, padding=1, bias=False)  # the bias is in the term
        last = nn.Conv2d(hidden, 2 * n_out, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(nn.SiLU(), nn.Conv2d(hidden, hidden, 1), nn.SiLU(), last)
        self.compiled_params: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None  # compile_couplings

    def _halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditioning half, transformed half) of x."""
        first, second = x[:, : self.split], x[:, self.split :]
        return (second, first) if self.flip else (first, second)

    def _join(self, x_cond: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
        """Inverse of ``_halves``."""
        return torch.cat([x_out, x_cond] if self.flip else [x_cond, x_out], dim=1)

    def _params(self, x_cond: torch.Tensor, term: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log_s, t) in the dtype of x_cond (at least float32), whatever autocast ran the net in.

        x_cond holds k rows per item (row j * B + i is item i); term (B, hidden, H, W) is shared by them.
        """
        a = self.first(x_cond)  # (k * B, hidden, H, W)
        a = (a.unflatten(0, (-1, term.shape[0])) + term.to(a.dtype)).flatten(0, 1)
        raw_log_s, t = self.net(a).to(x_cond.dtype).chunk(2, dim=1)
        return self.bound * torch.tanh(raw_log_s / self.bound), t

    def _run_params(self, x_cond: torch.Tensor, term: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._params(x_cond, term) if self.compiled_params is None else self.compiled_params(self, x_cond, term)

    def forward(self, x: torch.Tensor, term: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """y = coupling(x) and log|det dy/dx| (rows of x,)."""
        x_cond, x_out = self._halves(x)
        log_s, t = self._run_params(x_cond, term)
        return self._join(x_cond, x_out * log_s.exp() + t), log_s.flatten(1).sum(1)

    def inverse(self, y: torch.Tensor, term: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x = coupling^{-1}(y) and log|det dx/dy| (rows of y,)."""
        y_cond, y_out = self._halves(y)
        log_s, t = self._run_params(y_cond, term)
        return self._join(y_cond, (y_out - t) * (-log_s).exp()), -log_s.flatten(1).sum(1)


class ChannelMix(nn.Module):
    """Invertible 1x1 convolution x -> W x at every position (Glow), W = I + A with A zero at initialisation.

    Couplings transform fixed channel halves; mixing between them lets the flow correlate any pair of
    channels. log|det| = H * W * log|det W|. Computed with autocast off: densities stay exact.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(channels, channels))

    def _multiply(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return torch.einsum("oc,bchw->bohw", weight.to(x.dtype), x)

    def _weight(self) -> torch.Tensor:
        return torch.eye(self.delta.shape[0], dtype=self.delta.dtype, device=self.delta.device) + self.delta

    def _logdet(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log|det| of W applied at every position of x, (rows of x,)."""
        return (torch.linalg.slogdet(weight.double())[1].to(x.dtype) * (x.shape[2] * x.shape[3])).expand(x.shape[0])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """W x and log|det| (rows of x,)."""
        weight = self._weight()
        return self._multiply(x, weight), self._logdet(weight, x)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """W^-1 y and log|det| of the inverse (rows of y,)."""
        weight = self._weight()
        return self._multiply(y, torch.linalg.inv(weight.double())), -self._logdet(weight, y)


class GroupAffine(nn.Module):
    """u -> b + L u on one group's flattened latent, L lower-triangular with a positive diagonal.

    The couplings are local (3x3 convolutions on channel halves), so correlations between distant positions
    and channels, which is what a prior hole of second moments is made of, are slow for them to learn; this
    layer holds them directly. Identity at initialisation; ``set_moments`` starts it at a Gaussian's mean and
    Cholesky factor instead. log|det| = sum log diag L; the inverse is one triangular solve. Computed in at
    least float32 with autocast off: densities stay exact.
    """

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(dims))
        self.lower = nn.Parameter(torch.zeros(dims, dims))  # only its strictly lower triangle is used
        self.log_diag = nn.Parameter(torch.zeros(dims))

    def scale_tril(self) -> torch.Tensor:
        """L (dims, dims)."""
        return torch.tril(self.lower, -1) + torch.diag(self.log_diag.exp())

    @torch.no_grad()
    def set_moments(self, mean: torch.Tensor, covariance: torch.Tensor) -> None:
        """Make the layer map N(0, I) to N(mean, covariance) (covariance positive definite)."""
        tril = torch.linalg.cholesky(covariance.double())
        self.shift.copy_(mean)
        self.lower.copy_(tril)
        self.log_diag.copy_(tril.diagonal().log())

    def _logdet(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_diag.to(x.dtype).sum().expand(x.shape[0])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """b + L x (x of any shape (rows, ...)) and log|det| (rows,)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = torch.addmm(self.shift.to(x.dtype), x.flatten(1), self.scale_tril().to(x.dtype).T)
        return y.view_as(x), self._logdet(x)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L^-1 (y - b) and log|det| of the inverse (rows,)."""
        with torch.autocast(device_type=y.device.type, enabled=False):
            centred = (y.flatten(1) - self.shift.to(y.dtype)).T
            x = torch.linalg.solve_triangular(self.scale_tril().to(y.dtype), centred, upper=False).T
        return x.reshape(y.shape), -self._logdet(y)


SAMPLER_AFFINE = ("none", "identity", "moments")


@dataclass
class Conditioning:
    """What the flow needs of an item batch's context: the group and each coupling's term (B, hidden, H, W)."""

    group: int
    terms: list[torch.Tensor]


class SharedFlowSampler(nn.Module):
    """One conditional flow for all EVaLP groups: z = mu_p + sigma_p * f(eps; h, l).

    Conditioning: a learned embedding of the group index and a 1x1 projection of h (one projection per
    scale, since context channels differ by scale), added as a term to every coupling's first hidden
    layer. Kept linear and 1x1 on purpose: the term is computed once per item, so SIR's M draws per item
    pay only for the conditioner on eps, and a single draw pays little more (h already carries the
    decoder's spatial context). All selected groups must share the latent channel count (20 in every
    NVAE preset).

    Temperature t scales sigma_p exactly as NVAE does (``t * sigma_p``): the sampler at temperature t
    is the same flow around the tempered prior N(mu_p, (t sigma_p)^2), so the untrained sampler
    reproduces NVAE's tempered draw bit for bit, and ``log_q`` is the exact density of the returned z
    at any t. t = 1 is the trained sampler.

    Each coupling's log-scale is bounded by ``max_log_scale``; the default 1 (so each channel half is
    rescaled by at most e^(num_couplings / 2) overall) kept adversarial training stable in the toy tests,
    where a bound of 3 let the sampler overshoot.

    ``group_affine`` adds a GroupAffine per group after the couplings, f = A_l o couplings, identity at
    initialisation (``set_group_moments`` moves it); it is unconditional: the couplings carry h_l.
    """

    def __init__(
        self,
        specs: Sequence[GroupSpec],
        groups: Sequence[int],
        hidden: int,
        num_couplings: int = 4,
        embed_dim: int = 16,
        max_log_scale: float = 1.0,
        channel_mixing: bool = False,
        group_affine: bool = False,
    ) -> None:
        super().__init__()
        if not groups:
            raise ValueError("SharedFlowSampler needs at least one group")
        for g in groups:
            if not 0 <= g < len(specs):
                raise ValueError(f"group {g} is out of range: the model has {len(specs)} groups")
        channels = {specs[g].channels for g in groups}
        if len(channels) != 1:
            raise ValueError(f"a shared flow needs equal latent channels in all groups, got {channels}")
        self.groups = [int(g) for g in groups]
        self.channels = channels.pop()
        self._row = {g: i for i, g in enumerate(self.groups)}
        self._scale = {g: specs[g].scale for g in self.groups}
        context_channels: dict[int, int] = {}
        for g in self.groups:
            prev = context_channels.setdefault(specs[g].scale, specs[g].context_channels)
            if prev != specs[g].context_channels:
                raise ValueError(f"scale {specs[g].scale} has groups with different context channels")
        # Per coupling, the conditioning term is linear in (h, group embedding): one 1x1 projection of h per
        # scale (context channels differ by scale) and one map of the embedding, for all couplings at once.
        self.hidden = hidden
        self.embedding = nn.Embedding(len(self.groups), embed_dim)
        self.embedding_proj = nn.Linear(embed_dim, num_couplings * hidden, bias=False)
        self.context = nn.ModuleDict(
            {str(s): nn.Conv2d(c, num_couplings * hidden, 1) for s, c in sorted(context_channels.items())}
        )
        self.couplings = nn.ModuleList(
            AffineCoupling(self.channels, hidden, flip=k % 2 == 1, bound=max_log_scale) for k in range(num_couplings)
        )
        # Optional invertible channel mixing before every coupling but the first (identity at initialisation).
        self.mixes = nn.ModuleList(ChannelMix(self.channels) for _ in range(num_couplings - 1)) if channel_mixing else None
        self.affines = (nn.ModuleDict({str(g): GroupAffine(math.prod(specs[g].shape)) for g in self.groups})
                        if group_affine else None)

    def set_group_moments(self, group: int, mean: torch.Tensor, covariance: torch.Tensor) -> None:
        """Start group's affine layer at N(mean, covariance) of the flattened u = (z - mu_p) / sigma_p: with
        identity couplings the sampler then draws z_l with those whitened moments."""
        if self.affines is None:
            raise ValueError("this sampler has no per-group affine layer (group_affine=False)")
        self.affines[str(group)].set_moments(mean, covariance)

    def compile_couplings(self) -> None:
        """torch.compile every coupling's conditioner (``--compile``): a few narrow convolutions and an
        element-wise tail per coupling. Measured on a CPU it does not help (the convolutions dominate there,
        docs/benchmarks.md); it is meant for GPUs, where the element-wise kernels are launch-bound."""
        params = compiled(AffineCoupling._params)
        for coupling in self.couplings:
            coupling.compiled_params = params

    def condition(self, h: torch.Tensor, group: int) -> Conditioning:
        """Each coupling's conditioning term (B, hidden, H, W) for the items of h: computed once per item
        and shared by all of an item's draws (``flow_conditioned``; SIR draws many per item)."""
        if group not in self._row:
            raise KeyError(f"group {group} is not sampled by this flow; its groups are {self.groups}")
        terms = self.context[str(self._scale[group])](h)  # (B, K * hidden, H, W)
        emb = self.embedding_proj(self.embedding.weight[self._row[group]]).to(terms.dtype)  # (K * hidden,)
        return Conditioning(group, list((terms + emb.view(1, -1, 1, 1)).split(self.hidden, dim=1)))

    def flow_conditioned(self, eps: torch.Tensor, cond: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
        """u = f(eps) and log|det du/deps| (rows,), both in at least float32, for eps (k * B, C, H, W)
        holding k draws per item (row j * B + i is item i) and ``condition``'s output for the B items."""
        x = _at_least_f32(eps)
        logdet = x.new_zeros(x.shape[0])
        for k, (coupling, term) in enumerate(zip(self.couplings, cond.terms)):
            if self.mixes is not None and k > 0:
                x, ld = self.mixes[k - 1](x)
                logdet = logdet + ld
            x, ld = coupling(x, term)
            logdet = logdet + ld
        if self.affines is not None:
            x, ld = self.affines[str(cond.group)](x)
            logdet = logdet + ld
        return x, logdet

    def flow(self, eps: torch.Tensor, h: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """u = f(eps; h, group) and log|det du/deps| (B,), both in at least float32."""
        return self.flow_conditioned(eps, self.condition(h, group))

    def inverse(self, u: torch.Tensor, h: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """eps = f^{-1}(u; h, group) and log|det deps/du| (B,), both in at least float32."""
        terms = self.condition(h, group).terms
        x = _at_least_f32(u)
        logdet = x.new_zeros(x.shape[0])
        if self.affines is not None:
            x, logdet = self.affines[str(group)].inverse(x)
        for k in reversed(range(len(self.couplings))):
            x, ld = self.couplings[k].inverse(x, terms[k])
            logdet = logdet + ld
            if self.mixes is not None and k > 0:
                x, ld = self.mixes[k - 1].inverse(x)
                logdet = logdet + ld
        return x, logdet

    def forward(
        self,
        mu_p: torch.Tensor,
        sigma_p: torch.Tensor,
        h: torch.Tensor,
        group: int,
        temperature: float = 1.0,
        eps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw z (like mu_p) and its exact log q (B,); eps ~ N(0, I) via randn_like(mu_p) unless given."""
        if eps is None:
            eps = torch.randn_like(mu_p)  # the same draw NVAE makes, so RNG streams stay aligned
        scale = temperature * sigma_p  # NVAE's order of operations, for bit-identical identity draws
        u, logdet = self.flow(eps, h, group)
        z = mu_p + scale * u
        log_q = standard_normal_log_prob(eps) - logdet - _at_least_f32(scale).log().flatten(1).sum(1)
        return z, log_q

    def log_prob(
        self,
        z: torch.Tensor,
        mu_p: torch.Tensor,
        sigma_p: torch.Tensor,
        h: torch.Tensor,
        group: int,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Exact log q(z | h, group) (B,) at the given temperature, through the inverse flow."""
        scale = _at_least_f32(temperature * sigma_p)
        eps, logdet_inverse = self.inverse((_at_least_f32(z) - _at_least_f32(mu_p)) / scale, h, group)
        return standard_normal_log_prob(eps) + logdet_inverse - scale.log().flatten(1).sum(1)
