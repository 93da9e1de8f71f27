"""Typed configuration of the NVAE backbone and its stage-1 training, with named presets."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

OUTPUT_DISTRIBUTIONS = ("bernoulli", "dmol", "gaussian")


@dataclass
class ModelConfig:
    """Architecture of the hierarchical VAE (Vahdat & Kautz 2020, Sec. 3 and App. A)."""

    in_channels: int = 1  # image channels (set from the data set unless given)
    image_size: int = 32  # image height = width in pixels, after padding (set from the data set unless given)
    output_dist: str = "bernoulli"  # bernoulli | dmol | gaussian
    num_mixtures: int = 10  # DMoL components
    loss_crop: int = 2  # pixels cut from each side before the reconstruction loss (28x28 MNIST in 32x32)
    num_channels: int = 32  # stem channels; doubled by every stride-2 cell
    num_preprocess_blocks: int = 2  # encoder pre-processing blocks, each halving the resolution
    num_preprocess_cells: int = 3  # residual cells per pre-processing block
    num_postprocess_blocks: int = 2  # decoder post-processing blocks, each doubling the resolution
    num_postprocess_cells: int = 3  # residual cells per post-processing block
    num_latent_scales: int = 2  # latent scales (resolutions) of the hierarchy
    num_groups_per_scale: int = 10  # at the highest-resolution latent scale
    adaptive_groups: bool = True  # halve the group count at each coarser scale
    min_groups_per_scale: int = 1  # fewest latent groups a scale gets when adaptive_groups halves them
    num_latent_per_group: int = 20  # channels of each latent group z_l
    num_cell_per_cond_enc: int = 2  # encoder cells between two latent groups
    num_cell_per_cond_dec: int = 2  # decoder cells between two latent groups
    num_nf: int = 0  # shift-only autoregressive posterior flows per group
    use_se: bool = True  # squeeze-and-excitation in every residual cell
    bn_momentum: float = 0.05  # BatchNorm running-statistics momentum (NVAE: 0.05)

    def validate(self) -> None:
        """Raise ValueError naming the first impossible field."""
        if self.output_dist not in OUTPUT_DISTRIBUTIONS:
            raise ValueError(f"output_dist must be one of {OUTPUT_DISTRIBUTIONS}, got {self.output_dist!r}")
        if self.output_dist == "bernoulli" and self.in_channels != 1:
            raise ValueError("the Bernoulli decoder is for binary single-channel images (in_channels=1)")
        downsample = 2 ** (self.num_preprocess_blocks + self.num_latent_scales - 1)
        if self.image_size % downsample:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by 2^(preprocess blocks + latent scales - 1) = {downsample}"
            )
        for name in ("num_channels", "num_latent_scales", "num_groups_per_scale", "num_latent_per_group",
                     "num_preprocess_blocks", "num_postprocess_blocks", "num_preprocess_cells",
                     "num_postprocess_cells", "num_cell_per_cond_enc", "num_cell_per_cond_dec"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_preprocess_blocks != self.num_postprocess_blocks:
            raise ValueError("num_postprocess_blocks must equal num_preprocess_blocks to return to image size")
        if 2 * self.loss_crop >= self.image_size:
            raise ValueError(f"loss_crop {self.loss_crop} leaves no pixels of a {self.image_size}px image")

    def groups_per_scale(self) -> list[int]:
        """Groups per latent scale, highest resolution first (NVAE's encoder order)."""
        groups, n = [], self.num_groups_per_scale
        for _ in range(self.num_latent_scales):
            groups.append(n)
            if self.adaptive_groups:
                n = max(self.min_groups_per_scale, n // 2)
        return groups


@dataclass
class RunCadence:
    """How often a run logs, evaluates and checkpoints, and how it loads data: the one definition of these
    settings (stage 1's TrainConfig and every frozen-prior config inherit it). They never change what a run
    computes, so a resumed run may change them (MAY_CHANGE_ON_RESUME)."""

    num_workers: int = 0  # data-loading worker processes per rank (0: load in the training process)
    log_every: int = 50  # steps between progress lines and metric records
    eval_every: int = 0  # steps between evaluations; 0 = at the end of every epoch (and of the run)
    ckpt_every: int = 500  # steps between checkpoints (the latest is also written at the end and on pre-emption)
    keep_checkpoints: int = 3  # numbered snapshots kept besides the latest checkpoint; 0 keeps none
    max_bad_steps: int = 20  # consecutive skipped non-finite steps after which the run stops (exit 3)


# Settings that change speed and memory, never the maths: a run trained with any value of them is the same run.
SPEED_ONLY_FIELDS = frozenset({"compile", "checkpoint_activations"})

# What a resumed run may set differently (check_resume): its cadence, how much it evaluates, where the data
# lives, and the speed-only settings.
MAY_CHANGE_ON_RESUME = frozenset({f.name for f in dataclasses.fields(RunCadence)}
                                 | {"eval_batches", "bn_readjust_batches", "data_root"} | SPEED_ONLY_FIELDS)


@dataclass
class TrainConfig(RunCadence):
    """Stage-1 optimisation, KL schedule and regularisers (NVAE defaults), and the run's cadence (RunCadence)."""

    dataset: str = "mnist"  # data set name (scripts/prepare_data.py --list shows them)
    data_root: str | None = None  # directory of the data set's files; None: the bundled or default location
    batch_size: int = 32  # per process
    epochs: int = 1  # passes over the training split (when max_steps is 0)
    max_steps: int = 0  # >0 caps the run (overrides epochs for the schedule length)
    lr: float = 1e-2  # Adamax learning rate after warm-up
    lr_min: float = 1e-4  # learning rate at the end of the cosine decay
    weight_decay: float = 3e-4  # L2 weight decay of the optimiser
    adamax_eps: float = 1e-3  # Adamax's epsilon
    warmup_epochs: float = 5.0  # epochs of linear learning-rate warm-up
    kl_anneal_portion: float = 0.3  # fraction of the steps over which the KL coefficient warms up to kl_weight
    kl_const_portion: float = 1e-4  # fraction of the steps at the minimum KL coefficient before the warm-up
    kl_min_coeff: float = 1e-4  # the KL coefficient during the constant portion
    # beta: the KL coefficient's ceiling after warm-up. 1 trains NVAE's ELBO; below 1 (the authors' single-latent
    # VAEs use 0.312 on MNIST) the aggregate posterior drifts from the prior and leaves holes to close.
    kl_weight: float = 1.0  # beta, the KL coefficient after warm-up (0, 1]
    kl_balance: bool = True  # NVAE's KL balancing across groups during the warm-up
    weight_decay_norm: float = 1e-2  # coefficient of the spectral regulariser (sum of largest singular values)
    num_power_iter: int = 4  # power iterations per step for the spectral regulariser
    grad_clip: float = 0.0  # 0 disables
    precision: str = "fp32"  # fp32 | bf16 | fp16 (mixed precision with loss scaling)
    seed: int = 0  # random seed (rank r uses seed + r for its noise)
    eval_batches: int = 20  # validation batches per evaluation
    sample_temperature: float = 1.0  # temperature of the sample grids written during training
    bn_readjust_batches: int = 20  # batches of prior samples that re-estimate BN statistics before sampling
    sync_bn: bool = False  # synchronise BatchNorm statistics across DDP ranks
    # Speed and memory only: the same maths, so a resumed run may switch them (MAY_CHANGE_ON_RESUME).
    compile: bool = False  # torch.compile the residual cells (first steps slower while compiling; docs/benchmarks.md)
    checkpoint_activations: bool = False  # recompute cell activations in the backward: less memory, more time per step

    def validate(self) -> None:
        """Raise ValueError naming the flag of the first impossible setting (cadence is checked by the loop)."""
        require_settings(self, positive=("sample_temperature", "lr_min", "adamax_eps"),
                         at_least_one=("eval_batches", "num_power_iter"),
                         non_negative=("bn_readjust_batches", "warmup_epochs", "grad_clip", "weight_decay",
                                       "weight_decay_norm"),
                         unit_interval=("kl_anneal_portion", "kl_const_portion", "kl_min_coeff"))
        if not 0 < self.kl_weight <= 1:
            raise ValueError(f"--kl-weight must be in (0, 1], got {self.kl_weight}")


def require_settings(cfg, positive=(), at_least_one=(), non_negative=(), unit_interval=()) -> None:
    """Shared range checks for config dataclasses; messages name the command-line flag."""
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    for name in positive:
        if not getattr(cfg, name) > 0:
            raise ValueError(f"{flag(name)} must be > 0, got {getattr(cfg, name)}")
    for name in at_least_one:
        if getattr(cfg, name) < 1:
            raise ValueError(f"{flag(name)} must be >= 1, got {getattr(cfg, name)}")
    for name in non_negative:
        if getattr(cfg, name) < 0:
            raise ValueError(f"{flag(name)} must be >= 0, got {getattr(cfg, name)}")
    for name in unit_interval:
        if not 0 <= getattr(cfg, name) <= 1:
            raise ValueError(f"{flag(name)} must be in [0, 1], got {getattr(cfg, name)}")


@dataclass
class NVAERunConfig:
    """Everything a stage-1 run needs; stored as JSON in every checkpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NVAERunConfig":
        return cls(model=ModelConfig(**data["model"]), train=TrainConfig(**data["train"]))

    @classmethod
    def from_json(cls, text: str) -> "NVAERunConfig":
        return cls.from_dict(json.loads(text))


# Presets: architecture and the stage-1 settings that go with it.
# Each says what it reproduces and roughly what it costs.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # Quick start: a visible binary-MNIST model on two CPU cores in a few minutes (3 groups).
    "tiny": {
        "model": dict(num_channels=8, num_preprocess_blocks=2, num_preprocess_cells=1,
                      num_postprocess_blocks=2, num_postprocess_cells=1, num_latent_scales=2,
                      num_groups_per_scale=2, num_latent_per_group=4, num_cell_per_cond_enc=1,
                      num_cell_per_cond_dec=1),
        "train": dict(batch_size=64, lr=1e-2, warmup_epochs=0.2, weight_decay_norm=1e-2, log_every=25,
                      ckpt_every=200, eval_batches=10),
    },
    # The authors' single-latent VAE setting built from NVAE cells: ONE latent group of 4x4x4 = 64 dimensions
    # (three stride-2 pre-process blocks, no hierarchy) and their KL weight beta = 0.312 on MNIST, which leaves
    # prior holes on purpose. About 4 minutes per 1000 steps on two CPU cores.
    "small": {
        "model": dict(num_channels=8, num_preprocess_blocks=3, num_preprocess_cells=1,
                      num_postprocess_blocks=3, num_postprocess_cells=1, num_latent_scales=1,
                      num_groups_per_scale=1, num_latent_per_group=4, num_cell_per_cond_enc=1,
                      num_cell_per_cond_dec=1),
        "train": dict(batch_size=64, lr=1e-2, warmup_epochs=0.2, weight_decay_norm=1e-2, kl_weight=0.312,
                      log_every=25, ckpt_every=500, eval_batches=10),
    },
    # NVAE's dynamically binarised MNIST model: 15 groups (10 at 8x8, 5 at 4x4), top z 20x4x4.
    # Published: 2 V100s for ~1 day, batch 200 per GPU, 400 epochs.
    "mnist": {
        "model": dict(num_channels=32, num_preprocess_blocks=2, num_preprocess_cells=3,
                      num_postprocess_blocks=2, num_postprocess_cells=3, num_latent_scales=2,
                      num_groups_per_scale=10, adaptive_groups=True, num_latent_per_group=20),
        "train": dict(batch_size=200, epochs=400, warmup_epochs=20, weight_decay_norm=1e-2),
    },
    # NVAE's CIFAR-10 model: 30 groups at 16x16, DMoL output. Published: 8 V100s, ~2 days.
    "cifar10": {
        "model": dict(in_channels=3, output_dist="dmol", loss_crop=0, num_channels=128,
                      num_preprocess_blocks=1, num_preprocess_cells=2, num_postprocess_blocks=1,
                      num_postprocess_cells=2, num_latent_scales=1, num_groups_per_scale=30,
                      adaptive_groups=False, num_latent_per_group=20),
        "train": dict(dataset="cifar10", batch_size=32, epochs=400, warmup_epochs=5, weight_decay_norm=1e-2),
    },
    # NVAE's CelebA 64x64 model: 35 groups (20/10/5 at 32/16/8). Published: 8 V100s, ~4 days.
    "celeba64": {
        "model": dict(in_channels=3, image_size=64, output_dist="dmol", loss_crop=0, num_channels=64,
                      num_preprocess_blocks=1, num_preprocess_cells=2, num_postprocess_blocks=1,
                      num_postprocess_cells=2, num_latent_scales=3, num_groups_per_scale=20,
                      adaptive_groups=True, num_latent_per_group=20),
        "train": dict(dataset="celeba64", batch_size=16, epochs=90, warmup_epochs=1, weight_decay_norm=1e-1),
    },
}


def preset(name: str) -> NVAERunConfig:
    """Return a fresh run config for a named preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    entry = PRESETS[name]
    return NVAERunConfig(model=ModelConfig(**entry["model"]), train=TrainConfig(**entry["train"]))
