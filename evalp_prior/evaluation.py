"""Evaluation of a prior on a frozen NVAE: FID, KID, precision/recall, per-group prior-hole MMD, sampling time,
and the NVAE's importance-weighted NLL and ELBO under its Gaussian prior and under the evaluated prior's density.

- Image metrics: generated images vs Inception features of the first N training images (cached once as
  ``<stats dir>/fid_features_<data set>-train.npz``, default ``runs/fid_stats``), both cropped to the region
  the likelihood models (MNIST's 28x28 centre: the 2-pixel padding is never trained). FID from the two sets'
  Gaussians; KID, the unbiased cubic-kernel MMD^2 with a fold standard error (metrics/mmd.py); precision and
  recall by k-NN manifolds (metrics/precision_recall.py) on as many reference images as samples.
- Prior-hole MMD: unbiased MMD^2 between posterior samples of encoded held-out images and the prior's draws,
  per group, the draws given the context of the same posterior path (posterior_and_prior_draws). For the
  top group z_1 the context h_1 is NVAE's constant start tensor, so this is the aggregate posterior q(z_1)
  against the prior's marginal (the headline number); lower groups are compared conditionally on the
  posterior's h_l. The Gaussian kernel's bandwidth is the median heuristic of the posterior samples alone
  (also summed over 0.5x, 1x, 2x it), so every prior is measured with the same kernel, and posterior samples
  come from a fixed seed, so two evaluations of the same NVAE use the same samples.
- Timing: seconds per image of ``NVAE.sample`` (prior draws + decoding) at one batch size, on a BN
  re-adjusted copy, after a warm-up call; median of repeats.
- NLL and ELBO (metrics/nll.py): the IWAE bound with NVAE's own Gaussian prior, and with every density the
  evaluated prior has (likelihood_priors: EVaLP's energy prior with log Z estimated by importance sampling
  with its sampler, the sampler itself (exact), the Langevin and NCP tilted priors with p0 proposals), all
  on the same posterior samples. SIR's resampled distribution has no tractable density (the report says so).
"""
from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from nvae.bn import readjust_bn
from nvae.config import NVAERunConfig
from nvae.data import HELD_OUT_PARTS, binarize_if_needed, dataset_info, get_dataset, held_out_part
from nvae.data.base import HELD_OUT_SEED
from nvae.distributions import draw_normal
from nvae.hooks import PriorHook
from nvae.model import NVAE
from nvae.runtime import forked_rng

from .generation import (SamplingSetup, build_prior, compile_for_sampling, default_prior,
                         describe_prior, load_for_sampling, sir_proposals)
from .metrics.fid import FeatureStats, InceptionFeatures, frechet_distance, image_features, reference_features
from .metrics.mmd import kernel_inception_distance, prior_hole_mmds
from .metrics.nll import DEFAULT_LOG_Z_ITEM_SAMPLES, DEFAULT_LOG_Z_SAMPLES, Normalisers, dataset_nll
from .metrics.precision_recall import precision_recall
from .metrics.timing import seconds_per_image
from .prior import EVaLPPrior, SamplerDensity
from .sir import (DEFAULT_SIR_CHUNK, DEFAULT_SIR_TEMPERATURE, DEFAULT_SIR_WEIGHTS, Calibrated, SIRTemperature,
                  temperature_tag)
from .sir_calibration import DEFAULT_CALIBRATION_IMAGES, SIRCalibration, calibrate_sir

DEFAULT_FID_STATS_DIR = Path("runs/fid_stats")
MMD_PERMUTATIONS = 50  # relabellings for each MMD's noise floor and p-value
POSTERIOR_SEED = 1234  # fixed: every evaluation of one NVAE compares priors against the same posterior draws


# Whose images the FID reference statistics are made of (EvalRequest.fid_reference).
FID_REFERENCES = ("train", "validation")


@dataclass
class EvalRequest:
    """What to measure and how; 0 (or False) switches a metric off."""

    prior: Optional[str] = None  # default: the checkpoint's own
    fid_samples: int = 0
    fid_batch: int = 64
    fid_ref_images: int = 10000
    fid_reference: str = "train"  # FID reference images: train (reported numbers) | validation (choices)
    fid_stats_dir: Path = DEFAULT_FID_STATS_DIR
    mmd: bool = False
    mmd_samples: int = 1000
    nll_samples: int = 0  # K importance samples
    nll_images: int = 1000
    nll_chunk: int = 16
    log_z_samples: int = DEFAULT_LOG_Z_SAMPLES  # proposals for a normaliser shared by all items (top group)
    log_z_item_samples: int = DEFAULT_LOG_Z_ITEM_SAMPLES  # proposals per posterior sample, other groups
    timing: bool = False
    timing_batch: int = 64
    timing_repeats: int = 5
    sir: Optional[int] = None
    sir_weights: str = DEFAULT_SIR_WEIGHTS
    sir_groups: Optional[Union[list[int], str]] = None  # None, 'all' or group indices (group_selection.parse_sir_groups)
    sir_chunk: int = DEFAULT_SIR_CHUNK
    sir_temperature: SIRTemperature = DEFAULT_SIR_TEMPERATURE  # a number, an ESSTarget or Calibrated
    sir_calibration_images: int = DEFAULT_CALIBRATION_IMAGES  # validation-half images fitting a Calibrated one
    langevin_steps: Optional[int] = None
    langevin_step_size: Optional[float] = None
    temperature: float = 1.0
    bn_batches: int = 20
    batch_size: int = 64  # posterior passes (MMD, NLL)
    data_root: Optional[str] = None  # the data set's location now; None: as the NVAE's stage 1 recorded
    split: str = "test"  # held-out half of the test split for MMD and NLL: validation | test
    seed: int = 0
    compile: bool = False  # torch.compile the decoder cells and the sampler's couplings

    def validate(self) -> None:
        """Raise ValueError naming the flag of the first impossible setting."""
        if not (self.fid_samples or self.mmd or self.nll_samples or self.timing):
            raise ValueError("nothing to evaluate: pass at least one of --fid N, --mmd, --nll K, --timing")
        checks = [
            (self.fid_samples == 0 or self.fid_samples >= 2, f"--fid needs at least 2 samples, got {self.fid_samples}"),
            (self.fid_ref_images >= 2, f"--fid-ref-images needs at least 2 images, got {self.fid_ref_images}"),
            (self.fid_reference in FID_REFERENCES,
             f"--fid-reference must be one of {FID_REFERENCES}, got {self.fid_reference!r}"),
            (self.fid_batch >= 1, f"--fid-batch must be >= 1, got {self.fid_batch}"),
            (self.mmd_samples >= 4, f"--mmd-samples needs at least 4 samples, got {self.mmd_samples}"),
            (self.nll_samples >= 0, f"--nll needs K >= 1 importance samples, got {self.nll_samples}"),
            (self.nll_images >= 1, f"--nll-images must be >= 1, got {self.nll_images}"),
            (self.nll_chunk >= 1, f"--nll-chunk must be >= 1, got {self.nll_chunk}"),
            (self.log_z_samples >= 1, f"--log-z-samples must be >= 1, got {self.log_z_samples}"),
            (self.log_z_item_samples >= 1, f"--log-z-item-samples must be >= 1, got {self.log_z_item_samples}"),
            (self.timing_batch >= 1, f"--timing-batch must be >= 1, got {self.timing_batch}"),
            (self.timing_repeats >= 1, f"--timing-repeats must be >= 1, got {self.timing_repeats}"),
            (self.temperature > 0, f"--temperature must be > 0, got {self.temperature}"),
            (self.bn_batches >= 0, f"--bn-batches must be >= 0, got {self.bn_batches}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.split in HELD_OUT_PARTS, f"--split must be one of {HELD_OUT_PARTS}, got {self.split!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass
class EvalResources:
    """Pieces shared by every prior evaluated on one NVAE, built on first use."""

    vae: NVAE
    vae_cfg: NVAERunConfig
    device: torch.device
    request: EvalRequest
    _features: Optional[InceptionFeatures] = field(default=None, repr=False)
    _reference: Optional[tuple[torch.Tensor, np.ndarray, np.ndarray, dict[str, Any]]] = field(default=None, repr=False)

    def data_root(self) -> Optional[str]:
        """Where the NVAE's data set is read from: the request's root, else the one stage 1 recorded."""
        return self.request.data_root if self.request.data_root is not None else self.vae_cfg.train.data_root

    def binarize(self) -> bool:
        """Whether the data set is dynamically binarised (the NVAE's likelihood is on binary images)."""
        return dataset_info(self.vae_cfg.train.dataset, self.data_root()).binarize

    def split(self, split: str) -> Dataset:
        """The NVAE's data set, 'train' or 'test' split."""
        return get_dataset(self.vae_cfg.train.dataset, split, self.data_root())

    def held_out(self) -> Dataset:
        """The requested half of the test split (nvae.data.held_out_part): validation or test."""
        return held_out_part(self.split("test"), self.request.split)

    def features(self) -> InceptionFeatures:
        """The Inception-v3 feature network on the evaluation device (loaded once)."""
        if self._features is None:
            self._features = InceptionFeatures(batch_size=self.request.fid_batch).to(self.device)
        return self._features

    def reference(self) -> tuple[torch.Tensor, np.ndarray, np.ndarray, dict[str, Any]]:
        """(features (N, 2048), mu, sigma, description) of the first N images, N = fid_ref_images, of the training
        split (``fid_reference`` train: reported numbers) or of the validation half of the test split (validation:
        choosing settings without touching the reported metric's reference); the features from the cache when it
        matches (computed once per data set: 10k images ~16 min on 2 CPU cores), the statistics once per evaluation."""
        if self._reference is None:
            tc, root, which = self.vae_cfg.train, self.data_root(), self.request.fid_reference
            images = self.split("train") if which == "train" else held_out_part(self.split("test"), "validation")
            count = min(self.request.fid_ref_images, len(images))
            # Different roots of one data set name (e.g. two synthetic sets) must not share a cache file.
            name = tc.dataset + (f"@{hashlib.sha1(str(root).encode()).hexdigest()[:8]}" if root else "")
            loader = DataLoader(Subset(images, range(count)), batch_size=self.request.fid_batch)
            batches = (self.vae.crop(b) for b in loader)
            size = list(self.vae.crop(images[0].unsqueeze(0)).shape[-2:])
            # The validation half is a permutation of the test split: its cache is keyed by that permutation's seed.
            split = "train" if which == "train" else f"validation{HELD_OUT_SEED}"
            features = reference_features(batches, name, split, count, self.request.fid_stats_dir, self.features(),
                                          image_size=size)
            mu, sigma = FeatureStats(features.shape[1]).update(features).mean_cov()
            self._reference = (features, mu, sigma, {"reference_images": count, "reference_split": which,
                                                     "stats_dir": str(self.request.fid_stats_dir), "image_size": size})
        return self._reference


@torch.no_grad()
def posterior_and_prior_draws(vae: NVAE, priors: Mapping[str, Optional[PriorHook]], dataset: Dataset, num: int,
                              batch_size: int, binarize: bool, device: torch.device,
                              seed: int = 0) -> dict[str, list[torch.Tensor]]:
    """Per group, flattened samples (n, d) on the CPU: ``posterior`` z_l ~ q of the first num images of
    dataset, and each named prior's draw of z_l given the context (h_l, mu_p, sigma_p) of the same posterior
    path (None = NVAE's Gaussian). For the top group the context is the constant start tensor, so its draws
    are the prior's marginal. Posterior draws are seeded by POSTERIOR_SEED and the batch index, so they are the
    same whatever priors are asked for; each prior's draws by seed and the batch index (the same noise for all:
    a hook that declines a group draws exactly NVAE's sample)."""
    n = min(num, len(dataset))
    if n < 4:
        raise ValueError(f"the prior-hole MMD needs at least 4 test images, the split has {len(dataset)}")
    samples: dict[str, list[list[torch.Tensor]]] = {k: [[] for _ in vae.group_specs] for k in ("posterior", *priors)}
    with forked_rng(device):
        for i, batch in enumerate(DataLoader(Subset(dataset, range(n)), batch_size=batch_size)):
            torch.manual_seed(POSTERIOR_SEED + i)
            groups = vae.posterior(binarize_if_needed(batch.to(device), binarize)).groups
            for key, hook in priors.items():
                torch.manual_seed(seed * 1_000_003 + i)
                for g, st in enumerate(groups):
                    z = hook.sample_group(g, st.h, st.mu_p, st.sigma_p, 1.0) if hook is not None else None
                    samples[key][g].append((draw_normal(st.mu_p, st.sigma_p) if z is None else z).flatten(1).float().cpu())
            for g, st in enumerate(groups):
                samples["posterior"][g].append(st.z.flatten(1).float().cpu())
    return {key: [torch.cat(per_group) for per_group in groups] for key, groups in samples.items()}


def prior_hole_mmd_per_group(vae: NVAE, prior: Optional[PriorHook], dataset: Dataset, num: int, batch_size: int,
                             binarize: bool, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """Prior-hole MMD^2 of every group between posterior samples and the prior's draws, and NVAE's
    (posterior_and_prior_draws). Each group's kernel bandwidth is the median heuristic of its posterior samples
    alone, so every prior is measured with the same kernel."""
    draws = posterior_and_prior_draws(vae, {"gauss": None, "prior": prior}, dataset, num, batch_size, binarize,
                                      device, seed)
    per_group = []
    for post, z_prior, z_gauss in zip(draws["posterior"], draws["prior"], draws["gauss"]):
        mmd = prior_hole_mmds(post, {"prior": z_prior, "gaussian": z_gauss}, MMD_PERMUTATIONS)
        per_group.append({**mmd["prior"], "bandwidth": mmd["bandwidth"], "gaussian": mmd["gaussian"]})
    return {"top": {**per_group[0], "group": 0, "num_samples": int(draws["posterior"][0].shape[0])},
            "groups": per_group,
            "mean_mmd2_multi": sum(r["mmd2_multi"] for r in per_group) / len(per_group),
            "mean_mmd2_multi_gaussian": sum(r["gaussian"]["mmd2_multi"] for r in per_group) / len(per_group)}


def bn_adjusted(vae: NVAE, bn_prior: Optional[PriorHook], bn_batches: int, batch_size: int,
                temperature: float) -> NVAE:
    """A copy of the NVAE with BN statistics re-estimated under the prior (the model itself if bn_batches is 0)."""
    if bn_batches <= 0:
        return vae.eval()
    model = copy.deepcopy(vae)
    readjust_bn(model, bn_batches, batch_size, temperature, bn_prior)
    return model


def sample_batches(model: NVAE, prior: Optional[PriorHook], num: int, batch_size: int,
                   temperature: float) -> Iterator[torch.Tensor]:
    """num generated images in batches, cropped to the modelled region (never all held at once)."""
    for start in range(0, num, batch_size):
        yield model.crop(model.sample(min(batch_size, num - start), temperature, prior)).cpu()


def image_metrics(generated: torch.Tensor, ref: torch.Tensor, ref_mu: np.ndarray, ref_sigma: np.ndarray) -> dict[str, Any]:
    """FID, KID +- its fold standard error, and precision/recall of generated features against the reference's.

    Precision/recall use as many reference images as there are generated ones (the first ones): a k-NN
    radius depends on its set's size, so unequal sets would bias one of the two.
    """
    mu, sigma = FeatureStats(generated.shape[1]).update(generated).mean_cov()
    return {"fid": frechet_distance(mu, sigma, ref_mu, ref_sigma), **kernel_inception_distance(generated, ref),
            **precision_recall(ref[: generated.shape[0]], generated)}


def evaluate_prior(res: EvalResources, prior: Optional[PriorHook], bn_prior: Optional[PriorHook]) -> dict[str, Any]:
    """FID, top-group MMD and timing (whichever res.request asks for) of one prior hook on res.vae."""
    req, out = res.request, {}
    model = None
    if req.fid_samples or req.timing:
        torch.manual_seed(req.seed)
        model = bn_adjusted(res.vae, bn_prior if bn_prior is not None else prior, req.bn_batches, req.fid_batch,
                            req.temperature)
    if req.fid_samples:
        ref, mu, sigma, reference = res.reference()
        torch.manual_seed(req.seed)
        generated = image_features(sample_batches(model, prior, req.fid_samples, req.fid_batch, req.temperature),
                                   res.features(), desc="generated")
        out["fid"] = {**image_metrics(generated, ref, mu, sigma), "num_samples": req.fid_samples,
                      "temperature": req.temperature, "bn_batches": req.bn_batches, **reference}
    if req.mmd:
        out["mmd"] = prior_hole_mmd_per_group(res.vae, prior, res.held_out(), req.mmd_samples, req.batch_size,
                                              res.binarize(), res.device, req.seed)
    if req.timing:
        torch.manual_seed(req.seed)
        with torch.no_grad():
            out["timing"] = seconds_per_image(lambda: model.sample(req.timing_batch, req.temperature, prior),
                                              req.timing_batch, warmup=1, repeats=req.timing_repeats,
                                              device=res.device)
    return out


def likelihood_priors(prior_name: str, hook: Optional[PriorHook]) -> dict[str, Any]:
    """The densities the NLL is reported for: NVAE's Gaussian always; the prior's own when it has one
    (EVaLP's energy prior p_psi, Langevin's and NCP's tilted p0), and EVaLP's sampler q_alpha (exact)."""
    priors: dict[str, Any] = {"gaussian": None}
    if hook is not None and hasattr(hook, "log_density_ratio"):
        priors[prior_name] = hook
    if isinstance(hook, EVaLPPrior):
        priors[f"{prior_name}_sampler"] = SamplerDensity(hook.sampler, hook.groups)
    return priors


def likelihood_note(prior_name: str, sir: Optional[int]) -> str:
    """What the NLL rows are the likelihood of, in words (for the report)."""
    note = ("gaussian: exact IWAE bound with NVAE's own prior. Energy priors: log Z by importance sampling "
            "(log_z: proposals, relative variance and the estimated bias of log Z-hat; the estimate's log is "
            "biased low, so the NLL is biased low by about |log_z_bias|).")
    if prior_name == "evalp":
        note += (" evalp: the energy prior p_psi = p0 exp(-E) / Z, Z estimated with sampler proposals; "
                 "evalp_sampler: the sampler q_alpha read as a prior (normalised: exact).")
    if sir:
        note += (f" SIR({sir}) resampling has no tractable density: its rows are those of the density it "
                 "targets (p_psi, or NCP's tilted prior), which SIR approaches as M grows.")
    return note


def prior_label(prior: str, sir: Optional[int], sir_temperature: SIRTemperature = DEFAULT_SIR_TEMPERATURE) -> str:
    """A short name for report files and comparisons, e.g. 'evalp+sir1000', or 'evalp+sir1000_T3' and
    'evalp+sir1000_ess0.94' with tempered weights (compare_priors names its rows the same way)."""
    if not (sir and sir > 1 and prior in ("evalp", "ncp")):
        return prior
    return f"{prior}+sir{sir}{temperature_tag(sir_temperature)}"


def calibrate_on_validation(setup: SamplingSetup, hook: Optional[PriorHook], num: int, batch_size: int,
                            data_root: Optional[str], device: torch.device) -> Optional[SIRCalibration]:
    """Fit the hook's SIR temperature on the validation half (never the reported test half) when it asked for
    ``calibrated`` (sir_calibration.calibrate_sir); None for any other hook or temperature."""
    if not isinstance(getattr(hook, "sir_temperature", None), Calibrated):
        return None
    assert setup.vae_cfg is not None and isinstance(hook, EVaLPPrior)
    res = EvalResources(setup.vae, setup.vae_cfg, device, EvalRequest(data_root=data_root, split="validation"))
    return calibrate_sir(hook, setup.vae, res.held_out(), num, batch_size, res.binarize(), device)


def evaluate_checkpoint(path: Path, req: EvalRequest, device: torch.device) -> dict[str, Any]:
    """Load any checkpoint kind, evaluate the requested (or its own) prior, and return the JSON report."""
    req.validate()
    setup: SamplingSetup = load_for_sampling(path, device)
    if req.compile:
        compile_for_sampling(setup)
    prior_name = req.prior or default_prior(setup)
    prior, bn_prior = build_prior(setup, prior_name, req.sir, req.sir_weights, req.sir_groups, req.sir_chunk,
                                  sir_temperature=req.sir_temperature, langevin_steps=req.langevin_steps,
                                  langevin_step_size=req.langevin_step_size)
    sir = sir_proposals(prior)
    assert setup.vae_cfg is not None
    calibration = calibrate_on_validation(setup, prior, req.sir_calibration_images, req.batch_size, req.data_root,
                                          device)
    res = EvalResources(setup.vae, setup.vae_cfg, device, req)
    metrics = evaluate_prior(res, prior, bn_prior)
    if calibration is not None:
        metrics["sir_calibration"] = calibration.to_json()
    if req.nll_samples:
        torch.manual_seed(req.seed)
        priors = likelihood_priors(prior_name, prior)
        normalisers = Normalisers(req.log_z_samples, req.log_z_item_samples)
        metrics["nll"] = {"priors": dataset_nll(setup.vae, res.held_out(), req.nll_samples, req.nll_images,
                                                res.binarize(), req.batch_size, req.nll_chunk, device, priors,
                                                normalisers),
                          "split": req.split, "note": likelihood_note(prior_name, sir)}
    used = getattr(prior, "temperatures_used", {})
    if used:  # SIR draws per weight temperature and group: what an ess:F target chose
        metrics["sir_temperatures_used"] = {str(g): {f"{t:.4g}": n for t, n in sorted(c.items())}
                                            for g, c in used.items()}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(req).items()}
    settings["sir_temperature"] = (req.sir_temperature if isinstance(req.sir_temperature, float)
                                   else str(req.sir_temperature))  # 'ess:0.94', 'calibrated'
    return {"checkpoint": str(path), "kind": setup.kind, "prior": prior_name,
            "label": prior_label(prior_name, sir, req.sir_temperature),
            "description": describe_prior(prior_name, prior), "sir": sir, "dataset": setup.vae_cfg.train.dataset,
            "device": str(device), "request": settings, "metrics": metrics}


def format_report(report: dict[str, Any]) -> str:
    """A human-readable table of one report."""
    m = report["metrics"]
    rows = [("checkpoint", report["checkpoint"]), ("prior", report["description"]), ("data set", report["dataset"])]
    if "fid" in m:
        f = m["fid"]
        rows.append((f"FID ({f['num_samples']} samples vs {f['reference_images']} train)", f"{f['fid']:.2f}"))
        rows.append(("KID +- stderr", f"{f['kid']:.4g} +- {f['kid_stderr']:.2g}"))
        rows.append((f"precision / recall (k={f['k']}, {f['num_real']} real)", f"{f['precision']:.3f} / {f['recall']:.3f}"))
    if "mmd" in m:
        t = m["mmd"]["top"]
        rows.append((f"prior-hole MMD^2 z_1 (bandwidth {t['bandwidth']:.3g}, n={t['num_samples']})",
                     f"{t['mmd2']:.4g} (Gaussian prior {t['gaussian']['mmd2']:.4g})"))
        g = t["gaussian"]
        rows.append(("  summed over 0.5/1/2 x bandwidth, +- stderr",
                     f"{t['mmd2_multi']:.4g} +- {t['mmd2_multi_stderr']:.2g} (Gaussian prior {g['mmd2_multi']:.4g} "
                     f"+- {g['mmd2_multi_stderr']:.2g}; noise floor {g['null_std_multi']:.2g})"))
        rows.append(("  mean over all groups (given posterior h)", f"{m['mmd']['mean_mmd2_multi']:.4g} (Gaussian prior "
                                                                   f"{m['mmd']['mean_mmd2_multi_gaussian']:.4g})"))
    if "sir_calibration" in m:
        c = m["sir_calibration"]
        rows.append((f"SIR calibration, group {c['group']} ({c['num_images']} validation images)",
                     f"T = {c['temperature'] if isinstance(c['temperature'], str) else format(c['temperature'], '.4g')}"
                     f" (slope {c['fit']['slope']:.4g}, p = {c['p_value']:.2g}, balanced accuracy "
                     f"{c['fit']['accuracy']:.3f}, cross-entropy {c['log_loss_gain'] * 1e3:.3g} x 1e-3 nats below chance)"))
    for group, counts in m.get("sir_temperatures_used", {}).items():
        rows.append((f"SIR weight temperatures, group {group}",
                     ", ".join(f"T={t}: {n} draws" for t, n in counts.items())))
    if "timing" in m:
        t = m["timing"]
        rows.append((f"seconds per image (batch {t['batch_size']})", f"{t['seconds_per_image']:.4g}"))
    if "nll" in m:
        for name, n in m["nll"]["priors"].items():
            z = "".join(f"; log Z group {r['group']} {r['log_z']:.3f} ({_log_z_bias_text(r)}, M={r['proposals']})"
                        for r in n["log_z"])
            rows.append((f"NLL {name}, K={n['num_samples']} ({n['num_images']} {m['nll']['split']} images)",
                         f"{n['nats']:.2f} nats = {n['bits_per_dim']:.4f} bits/dim; -ELBO {n['elbo_nats']:.2f}{z}"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


def _log_z_bias_text(record: dict[str, Any]) -> str:
    """The estimated bias of log Z-hat, or why there is none (one proposal per item has no spread to read)."""
    bias = record.get("log_z_bias")
    if bias is None or not math.isfinite(bias):
        return "bias unknown: one proposal per item, log Z biased low and the NLL optimistic by an unknown amount"
    return f"bias ~{bias:.1g}"


def finite_or_none(report: dict[str, Any]) -> dict[str, Any]:
    """The report with non-finite floats as None, so the JSON stays standard."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v
    return clean(report)
