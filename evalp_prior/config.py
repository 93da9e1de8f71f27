"""Typed configuration of stage 2: the EVaLP prior and its alternating optimisation."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from nvae.config import require_settings

from .objectives import GRADIENT_PENALTIES, ObjectiveConfig

LR_SCHEDULES = ("constant", "cosine")


@dataclass
class FrozenPriorConfig:
    """Settings every prior on a frozen NVAE shares (EVaLP and the baselines): the energy networks on the
    chosen groups, the run's length, precision and cadence (LoopSettings' names), and generation."""

    groups: str = "all"  # all | top | comma-separated group indices
    data_root: str | None = None  # where the frozen NVAE's data set lives now; None: as stage 1 recorded
    # 32 (with sampler_hidden 32) keeps generation within the cost targets on every preset but `tiny`
    # (bench_sampling's FLOP column: EVaLP on all groups 1.04-1.08x the Gaussian prior, SIR(1000) at the
    # top group 1.3-2.7x); 64 put SIR(1000) at 3.7x (cifar10) and 5.3x (mnist). docs/benchmarks.md.
    energy_hidden: int = 32
    share_energy_within_scale: bool = False
    energy_spectral_norm: bool = False  # for EVaLP on top of the gradient penalty
    # Learning-rate schedule of every optimiser: constant, or cosine from the set rate to 0 over the run
    # (GANs drift once their game is balanced; a decaying step keeps what was reached).
    lr_schedule: str = "constant"
    batch_size: int = 64  # per process
    epochs: int = 1
    max_steps: int = 0  # >0 caps the run
    precision: str = "fp32"
    seed: int = 0
    num_workers: int = 0
    log_every: int = 50
    eval_every: int = 0  # steps; 0 = every epoch end
    eval_batches: int = 10
    ckpt_every: int = 500
    keep_checkpoints: int = 3
    max_bad_steps: int = 20
    sample_temperature: float = 1.0
    bn_readjust_batches: int = 20


@dataclass
class EVaLPConfig(FrozenPriorConfig):
    """Energies, shared sampler and the MCMC-free min-max objective (SPEC sections 1-2)."""

    sampler_hidden: int = 32
    num_couplings: int = 4
    embed_dim: int = 16
    # Bound on each coupling's log-scale: 1 kept adversarial training stable on the toy, 3 let it overshoot.
    max_log_scale: float = 1.0
    sampler_mixing: bool = False  # invertible 1x1 channel mixing between the sampler's couplings (Glow)
    n_critic: int = 5  # energy steps per sampler step
    lambda_gp: float = 10.0
    gradient_penalty: str = "two-sided"  # two-sided (WGAN-GP) | one-sided | r1 (zero-centred, on positives)
    # Critic input (z - mu_p) / sigma_p instead of z: Lipschitz in the prior's own units.
    whiten_critic: bool = False
    critic_warmup_steps: int = 300  # energy-only steps before the first sampler step
    critic_only: bool = False  # freeze the sampler: the critic measures how far it is from the posterior
    # Decay of an exponential moving average of the sampler's weights used for generation; 0 = off.
    sampler_ema: float = 0.99
    kl_weight: float = 0.0  # w_kl; theory says 1, the authors' runs use 0..1e-3
    # Defaults chosen on the validation split of the `small` preset with a prior hole (docs/results.md, "the
    # sweep"), for the latent WGAN (w_kl = 0): a critic at 1e-3 with beta1 = 0 (WGAN-GP's) learns within a few
    # hundred steps, where 1e-4 needed thousands; a sampler faster than 1e-4 overshoots and drifts once the
    # critic's gap closes (KL to p0 of 2 to 12 nats, MMD^2 above the Gaussian prior's).
    lr_energy: float = 1e-3
    lr_sampler: float = 1e-4
    adam_beta1: float = 0.0
    adam_beta2: float = 0.9
    # Diagnostics at every evaluation: SIR proposals per item for the effective sample size (0 = skip).
    eval_sir_proposals: int = 100

    def validate(self) -> None:
        """Raise ValueError naming the flag of the first impossible setting (cadence is checked by the loop)."""
        require_settings(self, positive=("sample_temperature", "max_log_scale"),
                         at_least_one=("energy_hidden", "sampler_hidden", "num_couplings", "embed_dim", "n_critic",
                                       "eval_batches"),
                         non_negative=("lambda_gp", "kl_weight", "bn_readjust_batches", "critic_warmup_steps",
                                       "eval_sir_proposals"))
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"--lr-schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.gradient_penalty not in GRADIENT_PENALTIES:
            raise ValueError(f"--gradient-penalty must be one of {GRADIENT_PENALTIES}, got {self.gradient_penalty!r}")
        if not 0 <= self.sampler_ema < 1:
            raise ValueError(f"--sampler-ema must be in [0, 1), got {self.sampler_ema}")

    def objective(self) -> ObjectiveConfig:
        """The alternating objective's hyper-parameters."""
        return ObjectiveConfig(n_critic=self.n_critic, lambda_gp=self.lambda_gp, kl_weight=self.kl_weight,
                               gradient_penalty=self.gradient_penalty, critic_warmup_steps=self.critic_warmup_steps,
                               critic_only=self.critic_only)


@dataclass
class EVaLPRunConfig:
    """A stage-2 run: the prior's settings and the frozen NVAE it was trained on."""

    evalp: EVaLPConfig = field(default_factory=EVaLPConfig)
    vae_path: str = ""
    vae_fingerprint: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "EVaLPRunConfig":
        data: dict[str, Any] = json.loads(text)
        return cls(evalp=EVaLPConfig(**data["evalp"]), vae_path=data["vae_path"],
                   vae_fingerprint=data["vae_fingerprint"])
