"""Typed configuration of stage 2: the EVaLP prior and its alternating optimisation."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from nvae.config import RunCadence, require_settings

from .objectives import GRADIENT_PENALTIES, ObjectiveConfig
from .sampler import SAMPLER_AFFINE

LR_SCHEDULES = ("constant", "cosine")


@dataclass
class FrozenPriorConfig(RunCadence):
    """Settings every prior on a frozen NVAE shares (EVaLP and the baselines): the energy networks on the
    chosen groups, the run's length and precision, generation, and the run's cadence (RunCadence)."""

    groups: str = "all"  # all | top | comma-separated group indices
    data_root: str | None = None  # where the frozen NVAE's data set lives now; None: as stage 1 recorded
    # 32 (with sampler_hidden 32) keeps generation within the cost targets on every preset but `tiny`
    # (bench_sampling's FLOP column: EVaLP on all groups 1.04-1.08x the Gaussian prior, SIR(1000) at the
    # top group 1.3-2.7x); 64 put SIR(1000) at 3.7x (cifar10) and 5.3x (mnist). docs/benchmarks.md.
    energy_hidden: int = 32  # channels of each energy network
    share_energy_within_scale: bool = False  # one energy network for all groups of a scale instead of one per group
    energy_spectral_norm: bool = False  # for EVaLP on top of the gradient penalty
    # Learning-rate schedule of every optimiser: constant, or cosine from the set rate to 0 over the run
    # (GANs drift once their game is balanced; a decaying step keeps what was reached).
    lr_schedule: str = "constant"  # constant | cosine (to 0 over the run), for every optimiser
    batch_size: int = 64  # per process
    epochs: int = 1  # passes over the training split (when max_steps is 0)
    max_steps: int = 0  # >0 caps the run
    precision: str = "fp32"  # fp32 | bf16 | fp16 (mixed precision with loss scaling)
    seed: int = 0  # random seed (rank r uses seed + r for its noise)
    eval_batches: int = 10  # validation batches per evaluation (diagnostics and MMD)
    sample_temperature: float = 1.0  # temperature of the sample grids written during training
    bn_readjust_batches: int = 20  # batches of prior samples that re-estimate BN statistics before sampling
    compile: bool = False  # torch.compile the frozen NVAE's cells and EVaLP's sampler couplings (same maths)


@dataclass
class EVaLPConfig(FrozenPriorConfig):
    """Energies, shared sampler and the MCMC-free min-max objective (SPEC sections 1-2)."""

    sampler_hidden: int = 32  # channels of each coupling's conditioner in the shared sampler
    num_couplings: int = 4  # affine couplings of the shared sampler
    embed_dim: int = 16  # size of the group-index embedding the sampler is conditioned on
    # Bound on each coupling's log-scale: 1 kept adversarial training stable on the toy, 3 let it overshoot.
    max_log_scale: float = 1.0  # bound on each coupling's log-scale
    sampler_mixing: bool = False  # invertible 1x1 channel mixing between the sampler's couplings (Glow)
    # A full lower-triangular affine layer per group after the couplings: none, identity at the start, or
    # started at the mean and (Ledoit-Wolf shrunk) covariance of the whitened posterior (z - mu_p) / sigma_p of
    # moment_images training images, i.e. at the Gaussian fit of the aggregate posterior. `moments` won on the
    # validation half of `small` (MMD^2 0.11x the Gaussian prior's vs 0.41x for none; docs/results.md, section 0c).
    sampler_affine: str = "moments"  # per-group affine layer of the sampler: none | identity | moments (posterior fit)
    moment_images: int = 10000  # at most this many training images start the affine layer (--sampler-affine moments)
    # After the moment start, the whole flow fitted by maximum likelihood to posterior samples of every EVaLP group
    # (a lower group conditionally on the context h_l its posterior pass gave). Not in the paper: the game leaves the
    # sampler at its start, and the fit closes most of what the Gaussian fit leaves of the hole on `small`
    # (docs/results.md section 0d). A lower group's bank holds its context per image, in CPU memory:
    # images x (context + 3 latent) floats per group, 1.35 GB for `tiny`'s two lower groups at 60,000 images.
    sampler_fit_steps: int = 0  # maximum-likelihood steps fitting the sampler to posterior samples first; 0 = none
    sampler_fit_images: int = 60000  # training images (one posterior draw of each group each) the sampler fit uses
    sampler_fit_batch: int = 256  # posterior samples per sampler-fit step
    sampler_fit_lr: float = 1e-3  # Adam learning rate of the sampler fit
    # The fit keeps the weights with the lowest NLL of posterior draws of validation-half images (early stopping): a
    # bank holds one draw per image, and a conditional flow learns a lower group's fixed draws (docs/results.md 0f).
    sampler_fit_heldout_images: int = 2000  # validation-half images whose posterior draws early-stop the fit; 0 = none
    sampler_fit_check_every: int = 200  # sampler-fit steps between held-out checks (early stopping)
    n_critic: int = 5  # energy steps per sampler step
    lambda_gp: float = 10.0  # gradient-penalty weight lambda in the energy loss
    gradient_penalty: str = "two-sided"  # two-sided (WGAN-GP) | one-sided | r1 (zero-centred, on positives)
    # Critic input (z - mu_p) / sigma_p instead of z: Lipschitz in the prior's own units.
    whiten_critic: bool = False  # critic input (z - mu_p) / sigma_p instead of z
    critic_warmup_steps: int = 300  # energy-only steps before the first sampler step
    critic_only: bool = False  # freeze the sampler: the critic measures how far it is from the posterior
    # Decay of an exponential moving average of the sampler's weights used for generation; 0 = off.
    sampler_ema: float = 0.99  # decay of the moving average of the sampler weights used for generation; 0 = none
    kl_weight: float = 0.0  # w_kl; theory says 1, the authors' runs use 0..1e-3
    # Defaults chosen on the validation split of the `small` preset with a prior hole (docs/results.md, "the
    # sweep"), for the latent WGAN (w_kl = 0): a critic at 1e-3 with beta1 = 0 (WGAN-GP's) learns within a few
    # hundred steps, where 1e-4 needed thousands; a sampler faster than 1e-4 overshoots and drifts once the
    # critic's gap closes (KL to p0 of 2 to 12 nats, MMD^2 above the Gaussian prior's).
    lr_energy: float = 1e-3  # Adam learning rate of the energies (critic)
    lr_sampler: float = 1e-4  # Adam learning rate of the shared sampler
    adam_beta1: float = 0.0  # Adam's beta1 of both optimisers
    adam_beta2: float = 0.9  # Adam's beta2 of both optimisers
    # Diagnostics at every evaluation: SIR proposals per item for the effective sample size (0 = skip).
    eval_sir_proposals: int = 100  # SIR proposals per item for the ESS diagnostic at each evaluation; 0 = skip

    def validate(self) -> None:
        """Raise ValueError naming the flag of the first impossible setting (cadence is checked by the loop)."""
        require_settings(self, positive=("sample_temperature", "max_log_scale", "sampler_fit_lr"),
                         at_least_one=("energy_hidden", "sampler_hidden", "num_couplings", "embed_dim", "n_critic",
                                       "eval_batches", "moment_images", "sampler_fit_images", "sampler_fit_batch",
                                       "sampler_fit_check_every"),
                         non_negative=("lambda_gp", "kl_weight", "bn_readjust_batches", "critic_warmup_steps",
                                       "eval_sir_proposals", "sampler_fit_steps", "sampler_fit_heldout_images"))
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"--lr-schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.gradient_penalty not in GRADIENT_PENALTIES:
            raise ValueError(f"--gradient-penalty must be one of {GRADIENT_PENALTIES}, got {self.gradient_penalty!r}")
        if self.sampler_affine not in SAMPLER_AFFINE:
            raise ValueError(f"--sampler-affine must be one of {SAMPLER_AFFINE}, got {self.sampler_affine!r}")
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
        data["evalp"].setdefault("sampler_affine", "none")  # checkpoints from before the layer existed
        data["evalp"].setdefault("sampler_fit_steps", 0)  # checkpoints from before the fit existed
        data["evalp"].setdefault("sampler_fit_heldout_images", 0)  # ... and before it was early-stopped
        return cls(evalp=EVaLPConfig(**data["evalp"]), vae_path=data["vae_path"],
                   vae_fingerprint=data["vae_fingerprint"])
