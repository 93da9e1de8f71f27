"""The NVAE hierarchical VAE (Vahdat & Kautz 2020) with the hooks a latent prior attaches through."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .cells import DecCombiner, EncCombiner, ResidualCell, WNConv2d, compile_cells
from .config import ModelConfig
from .distributions import Bernoulli, DiscMixLogistic, DiscretisedGaussian, Normal, draw_normal, normal_kl
from .flows import PairedShiftFlow
from .hooks import GroupSpec, GroupState, PriorHook

DEC_EXPAND = 6  # decoder cells' inverted-bottleneck expansion
POST_EXPAND = 3  # post-process cells' expansion


@dataclass
class PosteriorPass:
    """Result of encoding x and decoding the posterior sample."""

    logits: torch.Tensor  # (B, P, H, W) decoder output parameters
    groups: list[GroupState]  # top-down, index 0 = z_1


# choose_z(group, h, (mu_p_raw, log_sigma_p_raw)) -> (z, state or None): how the top-down walk picks
# each group's latent from the unclamped prior parameters.
RawParams = tuple[torch.Tensor, torch.Tensor]
ChooseZ = Callable[[int, torch.Tensor, RawParams], tuple[torch.Tensor, Optional[GroupState]]]


class NVAE(nn.Module):
    """Encoder tower, top-down decoder with residual Normal groups, and the image likelihood."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        mom, se, c_z = cfg.bn_momentum, cfg.use_se, cfg.num_latent_per_group
        groups_enc = cfg.groups_per_scale()  # highest resolution first
        self.groups_dec = list(reversed(groups_enc))  # lowest resolution first
        self.num_groups = sum(groups_enc)

        self.stem = WNConv2d(cfg.in_channels, cfg.num_channels, 3, padding=1, bias=True)
        ch = cfg.num_channels
        pre: list[nn.Module] = []
        for _ in range(cfg.num_preprocess_blocks):
            for c in range(cfg.num_preprocess_cells):
                last = c == cfg.num_preprocess_cells - 1
                pre.append(ResidualCell(ch, 2 * ch if last else ch, "enc", 2 if last else 1, use_se=se, momentum=mom))
                ch = 2 * ch if last else ch
        self.preprocess = nn.Sequential(*pre)

        # Encoder: per scale (high resolution first) per group cells, a combiner for every group but
        # the last (the top group reads the final features), a stride-2 cell between scales.
        self.enc_cells = nn.ModuleList()
        self.enc_combiners = nn.ModuleList()
        self.enc_down = nn.ModuleList()
        enc_channels = []  # channels per scale, high resolution first
        for s, n_groups in enumerate(groups_enc):
            enc_channels.append(ch)
            for g in range(n_groups):
                self.enc_cells.append(nn.Sequential(*[ResidualCell(ch, ch, "enc", use_se=se, momentum=mom)
                                                      for _ in range(cfg.num_cell_per_cond_enc)]))
                if not (s == len(groups_enc) - 1 and g == n_groups - 1):
                    self.enc_combiners.append(EncCombiner(ch, ch))
            if s < len(groups_enc) - 1:
                self.enc_down.append(ResidualCell(ch, 2 * ch, "enc", 2, use_se=se, momentum=mom))
                ch *= 2
        self.enc0 = nn.Sequential(nn.ELU(), WNConv2d(ch, ch, 1, bias=True), nn.ELU())

        top_size = cfg.image_size // 2 ** (cfg.num_preprocess_blocks + cfg.num_latent_scales - 1)
        self.prior_ftr0 = nn.Parameter(torch.rand(ch, top_size, top_size))  # learned decoder start h

        # Decoder: per scale (low resolution first) per group: cells (none before the top group),
        # prior head from h, posterior head from the combined encoder features, combiner(h, z).
        self.dec_cells = nn.ModuleList()
        self.dec_combiners = nn.ModuleList()
        self.prior_heads = nn.ModuleList()  # one per group except the top (fixed N(0, 1))
        self.posterior_heads = nn.ModuleList()
        self.nf_cells = nn.ModuleList()
        self.dec_up = nn.ModuleList()
        specs: list[GroupSpec] = []
        size = top_size
        for s, n_groups in enumerate(self.groups_dec):
            for g in range(n_groups):
                first = s == 0 and g == 0
                self.dec_cells.append(nn.Sequential(*[
                    ResidualCell(ch, ch, "dec", expand=DEC_EXPAND, use_se=se, momentum=mom)
                    for _ in range(0 if first else cfg.num_cell_per_cond_dec)]))
                if not first:
                    self.prior_heads.append(nn.Sequential(nn.ELU(), WNConv2d(ch, 2 * c_z, 1, bias=True)))
                self.posterior_heads.append(WNConv2d(ch, 2 * c_z, 3, padding=1, bias=True))
                self.nf_cells.append(nn.ModuleList(PairedShiftFlow(c_z, ch) for _ in range(cfg.num_nf)))
                self.dec_combiners.append(DecCombiner(ch, c_z))
                specs.append(GroupSpec(index=len(specs), scale=s, channels=c_z, height=size, width=size,
                                       context_channels=ch))
            if s < len(self.groups_dec) - 1:
                self.dec_up.append(ResidualCell(ch, ch // 2, "dec", -1, expand=DEC_EXPAND, use_se=se, momentum=mom))
                ch //= 2
                size *= 2
        self.group_specs: tuple[GroupSpec, ...] = tuple(specs)

        post: list[nn.Module] = []
        for _ in range(cfg.num_postprocess_blocks):
            for c in range(cfg.num_postprocess_cells):
                post.append(ResidualCell(ch, ch // 2 if c == 0 else ch, "dec", -1 if c == 0 else 1,
                                         expand=POST_EXPAND, use_se=se, momentum=mom))
                ch = ch // 2 if c == 0 else ch
        self.postprocess = nn.Sequential(*post)
        self.image_head = nn.Sequential(nn.ELU(), WNConv2d(ch, self._num_output_params(), 3, padding=1, bias=True))

    def compile_cells(self) -> None:
        """torch.compile every residual cell (``--compile``): the same maths, to float rounding."""
        compile_cells(self)

    # ----------------------------------------------------------------------------------- structure
    def _num_output_params(self) -> int:
        cfg = self.cfg
        if cfg.output_dist == "bernoulli":
            return cfg.in_channels
        if cfg.output_dist == "dmol":
            return DiscMixLogistic.num_params(cfg.in_channels, cfg.num_mixtures)
        return DiscretisedGaussian.num_params(cfg.in_channels)

    def output_distribution(self, logits: torch.Tensor):
        """The image likelihood for decoder output parameters (computed in float32)."""
        logits = logits.float()
        if self.cfg.output_dist == "bernoulli":
            return Bernoulli(logits)
        if self.cfg.output_dist == "dmol":
            return DiscMixLogistic(logits, self.cfg.in_channels, self.cfg.num_mixtures)
        return DiscretisedGaussian(logits, self.cfg.in_channels)

    def _group_scale_starts(self) -> set[int]:
        """Indices of the first group of every decoder scale after the top one (where dec_up runs)."""
        starts, total = set(), 0
        for n in self.groups_dec[:-1]:
            total += n
            starts.add(total)
        return starts

    def _prior_params(self, group: int, h: torch.Tensor) -> RawParams:
        """Raw p(z_l | z_<l) parameters: zeros for the top group (NVAE's fixed N(0, (1 + 1e-2)^2)), else from h."""
        if group == 0:
            c, hh, ww = self.group_specs[0].shape
            zeros = h.new_zeros(h.shape[0], c, hh, ww)
            return zeros, zeros
        mu, log_sigma = self.prior_heads[group - 1](h).chunk(2, dim=1)
        return mu, log_sigma

    # ----------------------------------------------------------------------------------- passes
    def _top_down(self, batch: int, choose_z: ChooseZ) -> tuple[torch.Tensor, list[GroupState]]:
        """Walk the decoder from the learned start tensor; choose_z supplies each group's z."""
        h = self.prior_ftr0.unsqueeze(0).expand(batch, -1, -1, -1)
        states: list[GroupState] = []
        scale_starts = self._group_scale_starts()
        up = iter(self.dec_up)
        for group in range(self.num_groups):
            if group in scale_starts:
                h = next(up)(h)
            h = self.dec_cells[group](h)
            z, state = choose_z(group, h, self._prior_params(group, h))
            if state is not None:
                states.append(state)
            h = self.dec_combiners[group](h, z)
        return self.image_head(self.postprocess(h)), states

    def _encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Bottom-up features; returns the combiner inputs in top-down group order and the top features."""
        s = self.preprocess(self.stem(2.0 * x - 1.0))
        stored: list[torch.Tensor] = []
        cell_idx = 0
        for sc, n_groups in enumerate(reversed(self.groups_dec)):
            for _ in range(n_groups):
                s = self.enc_cells[cell_idx](s)
                cell_idx += 1
                if len(stored) < len(self.enc_combiners):
                    stored.append(s)
            if sc < len(self.enc_down):
                s = self.enc_down[sc](s)
        stored.reverse()  # stored[l - 1] belongs to top-down group l (combiner index L - 1 - l)
        return stored, self.enc0(s)

    def posterior(self, x: torch.Tensor) -> PosteriorPass:
        """Encode x in [0, 1] and decode a posterior sample, recording every group's state."""
        enc_features, top_features = self._encode(x)

        def choose_z(group: int, h: torch.Tensor, prior_raw: RawParams) -> tuple[torch.Tensor, GroupState]:
            prior = Normal(*prior_raw)
            if group == 0:
                features = top_features
                mu_q, log_sigma_q = self.posterior_heads[0](features).chunk(2, dim=1)
                q = Normal(mu_q, log_sigma_q)
            else:
                features = self.enc_combiners[self.num_groups - 1 - group](enc_features[group - 1], h)
                d_mu, d_log_sigma = self.posterior_heads[group](features).chunk(2, dim=1)
                # Residual posterior: offsets on the prior's raw parameters, clamped together.
                q = Normal(prior_raw[0] + d_mu, prior_raw[1] + d_log_sigma)
            z = q.sample()
            log_q = q.log_prob(z)
            for flow in self.nf_cells[group]:
                z = flow(z, features)  # shift-only: log-det 0, log_q unchanged
            state = GroupState(z=z, mu_q=q.mu, sigma_q=q.sigma, mu_p=prior.mu, sigma_p=prior.sigma, h=h,
                               log_q=log_q, log_p=prior.log_prob(z))
            return z, state

        logits, states = self._top_down(x.shape[0], choose_z)
        return PosteriorPass(logits=logits, groups=states)

    forward = posterior

    def sample_logits(self, num_samples: int, temperature: float = 1.0,
                      prior: Optional[PriorHook] = None) -> torch.Tensor:
        """Decoder output parameters for num_samples draws from the prior (or the hook's replacement)."""

        def choose_z(group: int, h: torch.Tensor, prior_raw: RawParams) -> tuple[torch.Tensor, None]:
            p = Normal(*prior_raw)
            z = prior.sample_group(group, h, p.mu, p.sigma, temperature) if prior is not None else None
            if z is None:
                z = draw_normal(p.mu, p.sigma, temperature)
            return z, None

        logits, _ = self._top_down(num_samples, choose_z)
        return logits

    @torch.no_grad()
    def sample(self, num_samples: int, temperature: float = 1.0, prior: Optional[PriorHook] = None,
               mean: bool = True) -> torch.Tensor:
        """Images in [0, 1] of shape (n, C, H, W); mean=True shows the likelihood's mean, not a draw."""
        dist = self.output_distribution(self.sample_logits(num_samples, temperature, prior))
        return dist.mean() if mean else dist.sample()

    # ----------------------------------------------------------------------------------- losses
    def crop(self, t: torch.Tensor) -> torch.Tensor:
        c = self.cfg.loss_crop
        return t[..., c:t.shape[-2] - c, c:t.shape[-1] - c] if c else t

    def reconstruction_nll(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(B,) negative log-likelihood of x in nats, on the central crop for padded datasets."""
        log_p = self.output_distribution(logits).log_prob(x.float())
        return -self.crop(log_p).flatten(1).sum(1)

    def kl_per_group(self, out: PosteriorPass) -> list[torch.Tensor]:
        """(B,) KL per group: analytic, or single-sample log q - log p when posterior flows are on."""
        kls = []
        for st in out.groups:
            kl = st.log_q - st.log_p if self.cfg.num_nf else normal_kl(st.mu_q, st.sigma_q, st.mu_p, st.sigma_p)
            kls.append(kl.float().flatten(1).sum(1))
        return kls

