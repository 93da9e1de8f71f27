"""EVaLP end to end on the toy with a known answer (evalp_prior/toy.py), with the library's default settings.

The "aggregate posterior" is a two-component Gaussian mixture in 4 dimensions with a hole between its
modes, the base prior N(0, I). Training energy and sampler with the defaults of EVaLPConfig must close
most of the MMD gap on every seed. SIR with the oracle energy E* (p0 exp(-E*) is the target) checks
resampling itself: it must cut the MMD further. SIR with the trained energy is what the docs report
(docs/results.md, "SIR"): with the default latent WGAN the critic is not a log-density ratio.
"""
import pytest
import torch

from evalp_prior.config import EVaLPConfig
from evalp_prior.toy import toy_mmd, train_toy

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def toy_results():
    """MMD^2 to the target per seed for the default settings (one thread: tiny ops on shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [toy_mmd(*train_toy(EVaLPConfig(), seed, steps=1500), seed) for seed in SEEDS]
    finally:
        torch.set_num_threads(threads)


def test_evalp_closes_prior_holes_and_oracle_sir_refines(toy_results):
    for mmd in toy_results:
        assert mmd["sampler"] < mmd["base"] / 3, mmd
        assert mmd["sir_oracle"] < mmd["sampler"], mmd
