"""Streaming SIR against exact sampling, and the EVaLP prior hook."""
import pytest
import torch
from scipy import stats

from evalp_prior.energy import EnergySet
from evalp_prior.prior import EVaLPPrior
from evalp_prior.sampler import SharedFlowSampler, gaussian_log_prob
from evalp_prior.sir import (ADAPTIVE_TEMPERATURES, ESSTarget, parse_sir_temperature, sir_log_weight, sir_select,
                             temperature_tag)
from nvae.hooks import GroupSpec, PriorHook
from tests.helpers import LinearEnergy

PROPOSAL = torch.distributions.Normal(0.0, 2.0)
TARGET = torch.distributions.Normal(1.0, 0.5)


def _resample(log_weight, batch: int = 3000, proposals: int = 200, chunk: int = 37) -> torch.Tensor:
    """SIR draws for ``batch`` items from N(0, 2^2) proposals."""
    torch.manual_seed(0)
    z, _, _ = sir_select(lambda k: PROPOSAL.sample((k, batch)), log_weight, proposals, chunk, batch)
    return z


def test_exact_weights_resample_the_target():
    z = _resample(
        lambda z: sir_log_weight("exact", torch.zeros_like(z), TARGET.log_prob(z), PROPOSAL.log_prob(z))
    )
    result = stats.kstest(z.numpy(), stats.norm(1.0, 0.5).cdf)
    assert result.pvalue > 0.01, result


def test_wrong_weights_fail_the_same_test():
    z = _resample(lambda z: torch.zeros_like(z))  # uniform weights: SIR returns the proposal
    result = stats.kstest(z.numpy(), stats.norm(1.0, 0.5).cdf)
    assert result.statistic > 0.3, result


def test_energy_weights_tilt_the_proposal():
    # log w = -E with E(z) = z^2 / 2 - z: the target is N(0, 2^2) * exp(-E) = N(0.8, 0.8).
    z = _resample(lambda z: sir_log_weight("energy", z.square() / 2 - z))
    result = stats.kstest(z.numpy(), stats.norm(0.8, 0.8**0.5).cdf)
    assert result.pvalue > 0.01, result


def test_chunked_selection_equals_one_argmax():
    batch, proposals = 5, 23
    table = torch.randn(proposals, batch, generator=torch.Generator().manual_seed(1)) * 3
    items = torch.arange(batch)

    def make_proposer():
        drawn = [0]

        def propose(k):
            index = torch.arange(drawn[0], drawn[0] + k).view(k, 1).expand(k, batch)  # proposal ids
            drawn[0] += k
            return index, table[index, items] * 10  # a tuple: the id and side information

        return propose

    def log_weight(index, _aux):
        return table[index, items]

    # Unchunked reference: one categorical draw by Gumbel-max with the same noise stream.
    uniform = torch.rand(proposals, batch, generator=torch.Generator().manual_seed(2))
    expected = (table - (-uniform.log()).log()).argmax(dim=0)
    w = table.exp()
    expected_ess = w.sum(0) ** 2 / w.square().sum(0)
    for chunk in (1, 7, proposals, 100):
        (index, aux), ess, used = sir_select(
            make_proposer(), log_weight, proposals, chunk, batch, torch.Generator().manual_seed(2)
        )
        assert used == 1.0
        assert torch.equal(index, expected)
        assert torch.equal(aux, table[expected, items] * 10)
        torch.testing.assert_close(ess, expected_ess)


def _brute_force_ess_temperature(log_w: torch.Tensor, fraction: float) -> float:
    """The smallest grid temperature whose mean ESS over items (columns) is at least fraction x M, else the largest."""
    for t in ADAPTIVE_TEMPERATURES:
        w = (log_w.double() / t).exp()
        if (w.sum(0) ** 2 / w.square().sum(0)).mean() >= fraction * log_w.shape[0]:
            return t
    return ADAPTIVE_TEMPERATURES[-1]


@pytest.mark.parametrize("temperature", [1.0, 2.5, ESSTarget(0.9)])
def test_selection_frequencies_match_softmax(temperature):
    # Discrete target: 4 fixed proposals per item with known weights; chi-square over 20000 items.
    batch, logits = 20000, torch.tensor([0.0, 1.0, -1.0, 2.0])
    torch.manual_seed(3)
    index, ess, used = sir_select(
        lambda k: torch.arange(k).view(k, 1).expand(k, batch),
        lambda index: logits[index],
        num_proposals=4,
        chunk=4,
        batch=batch,
        temperature=temperature,
    )
    if isinstance(temperature, ESSTarget):
        temperature = _brute_force_ess_temperature(logits.view(4, 1), temperature.fraction)
        assert 1.0 < temperature < ADAPTIVE_TEMPERATURES[-1]  # an interior grid point: the search did something
    assert used == temperature
    observed = torch.bincount(index, minlength=4).numpy()
    probs = (logits.double() / temperature).softmax(0)
    assert stats.chisquare(observed, probs.numpy() * batch).pvalue > 0.01
    torch.testing.assert_close(ess, torch.full((batch,), 1 / probs.square().sum().item()), check_dtype=False)
    other = (logits.double() * temperature).softmax(0).numpy() * batch  # 1 / T instead of T: must be rejected
    if temperature != 1.0:
        assert stats.chisquare(observed, other).pvalue < 1e-6


def test_sir_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sir_select(lambda k: torch.zeros(k, 2), lambda z: z, 4, 2, 2, temperature=0.0)


@pytest.mark.parametrize("fraction", [0.3, 0.7, 0.95, 0.999999])
def test_ess_target_picks_the_smallest_grid_temperature_that_reaches_it(fraction):
    # Items with different weight spreads; the pick must equal the Gumbel-max draw at the brute-force temperature
    # with the same noise, whatever the chunking.
    batch, proposals = 6, 40
    log_w = torch.randn(proposals, batch, generator=torch.Generator().manual_seed(4)) * torch.linspace(0.5, 4, batch)
    expected_t = _brute_force_ess_temperature(log_w, fraction)
    uniform = torch.rand(proposals, batch, generator=torch.Generator().manual_seed(5))
    expected = (log_w / expected_t - (-uniform.log()).log()).argmax(dim=0)
    w = (log_w.double() / expected_t).exp()
    for chunk in (1, 9, proposals):
        drawn = [0]

        def propose(k):
            index = torch.arange(drawn[0], drawn[0] + k).view(k, 1).expand(k, batch)
            drawn[0] += k
            return index

        index, ess, used = sir_select(propose, lambda i: log_w[i, torch.arange(batch)], proposals, chunk, batch,
                                      torch.Generator().manual_seed(5), temperature=ESSTarget(fraction))
        assert used == expected_t
        assert torch.equal(index, expected)
        torch.testing.assert_close(ess, (w.sum(0) ** 2 / w.square().sum(0)).float())
    if fraction < 0.999999:
        assert ess.mean() >= fraction * proposals
    else:
        assert used == ADAPTIVE_TEMPERATURES[-1]  # unreachable: the flattest grid point


def test_sir_temperature_parsing_and_names():
    assert parse_sir_temperature("3") == 3.0 and temperature_tag(3.0) == "_T3" and temperature_tag(1.0) == ""
    assert parse_sir_temperature("ess:0.94") == ESSTarget(0.94) and temperature_tag(ESSTarget(0.94)) == "_ess0.94"
    for bad in ("ess:1", "ess:0", "ess:x", "hot"):
        with pytest.raises(ValueError, match="--sir-temperature"):
            parse_sir_temperature(bad)


SPECS = [GroupSpec(0, 0, 4, 2, 2, 3), GroupSpec(1, 1, 4, 3, 3, 5)]


def _prior(**kwargs) -> EVaLPPrior:
    torch.manual_seed(0)
    energies = EnergySet(SPECS, [0, 1], hidden=8)
    sampler = SharedFlowSampler(SPECS, [0, 1], hidden=8)
    return EVaLPPrior(energies, sampler, [0, 1], **kwargs)


def test_prior_hook_at_identity_reproduces_nvae():
    prior = _prior()
    assert isinstance(prior, PriorHook)
    mu, sigma, h = torch.randn(3, 4, 3, 3), torch.rand(3, 4, 3, 3) + 0.5, torch.randn(3, 5, 3, 3)
    torch.manual_seed(7)
    nvae_draw = mu + 0.8 * sigma * torch.randn_like(mu)
    torch.manual_seed(7)
    assert torch.equal(prior.sample_group(1, h, mu, sigma, 0.8), nvae_draw)
    assert EVaLPPrior(prior.energies, prior.sampler, [0]).sample_group(1, h, mu, sigma, 1.0) is None


@pytest.mark.parametrize("weights, temperature", [("exact", 1.0), ("energy", 1.0), ("energy", 0.5)])
def test_prior_hook_sir_samples_the_tilted_prior(weights, temperature):
    # Identity sampler (q = p0): both weightings target p0 exp(-E), tempered p0 exp(-E / T). Each item has
    # its own mu, sigma, so proposals that do not share their item's context would shift the per-item
    # distribution. E = -a sum z shifts the mean by (a / T) sigma^2: a / T = 0.5 in every case.
    specs = [GroupSpec(0, 0, 2, 1, 1, 3)]
    torch.manual_seed(0)
    prior = EVaLPPrior(LinearEnergy(0.5 * temperature), SharedFlowSampler(specs, [0], hidden=8), [0],
                       sir_proposals=100, sir_weights=weights, sir_chunk=30, sir_temperature=temperature)
    batch = 2000
    mu = torch.linspace(-3, 3, batch).view(batch, 1, 1, 1).expand(-1, 2, -1, -1)
    sigma = torch.linspace(0.5, 1.5, batch).flip(0).view(batch, 1, 1, 1).expand(-1, 2, -1, -1)
    z = prior.sample_group(0, torch.ones(batch, 3, 1, 1), mu, sigma, 1.0)
    standardised = (z - mu - 0.5 * sigma.square()) / sigma
    assert stats.kstest(standardised.flatten().numpy(), "norm").pvalue > 0.01
    untilted = (z - mu) / sigma  # the same test against the base prior must fail
    assert stats.kstest(untilted.flatten().numpy(), "norm").statistic > 0.1


def test_prior_hook_validates_options():
    with pytest.raises(ValueError):
        _prior(sir_groups=[2])
    with pytest.raises(ValueError):
        _prior(sir_weights="uniform")
    with pytest.raises(ValueError, match="sir_temperature must be > 0"):
        _prior(sir_temperature=-1.0)


def test_prior_hook_with_an_ess_target_samples_the_prior_tilted_at_its_chosen_temperature():
    # Identity sampler, E = -a sum z: the weights' spread sets T; the draw must follow p0 exp(-E / T) for the
    # T the hook reports (mean shifted by (a / T) sigma^2), keep the targeted ESS, and differ from T = 1.
    specs = [GroupSpec(0, 0, 2, 1, 1, 3)]
    torch.manual_seed(0)
    a, batch = 2.0, 2000
    prior = EVaLPPrior(LinearEnergy(a), SharedFlowSampler(specs, [0], hidden=8), [0], sir_proposals=100,
                       sir_chunk=30, sir_temperature=ESSTarget(0.8))
    mu = torch.linspace(-3, 3, batch).view(batch, 1, 1, 1).expand(-1, 2, -1, -1)
    sigma = torch.full_like(mu, 0.7)
    z = prior.sample_group(0, torch.ones(batch, 3, 1, 1), mu, sigma, 1.0)
    t = prior.last_temperature[0]
    assert t in ADAPTIVE_TEMPERATURES and t > 1.0
    assert prior.last_ess[0].mean() >= 0.8 * 100
    standardised = (z - mu - (a / t) * sigma.square()) / sigma
    assert stats.kstest(standardised.flatten().numpy(), "norm").pvalue > 0.01
    untempered = (z - mu - a * sigma.square()) / sigma
    assert stats.kstest(untempered.flatten().numpy(), "norm").statistic > 0.1


def _randomised_flow(specs, groups, scale: float = 0.3) -> SharedFlowSampler:
    """A float64 sampler whose zero-initialised coupling outputs are randomised (not the identity)."""
    torch.manual_seed(0)
    sampler = SharedFlowSampler(specs, groups, hidden=8).double()
    with torch.no_grad():
        for coupling in sampler.couplings:
            coupling.net[-1].weight.normal_(0, scale)
            coupling.net[-1].bias.normal_(0, scale)
    return sampler


def test_prior_hook_sir_corrects_a_non_identity_sampler():
    # Zero energy: the exact weights p0 / q must turn draws of a distorted flow back into p0 = N(mu, sigma^2)
    # (this checks the log-density bookkeeping of the per-item-conditioned SIR path, chunked on the CPU).
    specs = [GroupSpec(0, 0, 2, 1, 1, 3)]
    sampler = _randomised_flow(specs, [0], scale=0.1)  # distorted, yet with tails that cover p0's
    energies = EnergySet(specs, [0], hidden=8).double()
    torch.nn.init.zeros_(energies.nets["group0"].head[-1].weight)
    torch.nn.init.zeros_(energies.nets["group0"].head[-1].bias)
    batch = 2000
    mu = torch.linspace(-2, 2, batch, dtype=torch.float64).view(batch, 1, 1, 1).expand(-1, 2, -1, -1)
    sigma = torch.linspace(0.5, 1.5, batch, dtype=torch.float64).view(batch, 1, 1, 1).expand(-1, 2, -1, -1)
    h = torch.randn(batch, 3, 1, 1, dtype=torch.float64)
    torch.manual_seed(1)
    raw = EVaLPPrior(energies, sampler, [0]).sample_group(0, h, mu, sigma, 0.8)
    assert stats.kstest(((raw - mu) / (0.8 * sigma)).flatten().numpy(), "norm").statistic > 0.05
    z = EVaLPPrior(energies, sampler, [0], sir_proposals=200, sir_weights="exact").sample_group(0, h, mu, sigma, 0.8)
    assert stats.kstest(((z - mu) / (0.8 * sigma)).flatten().numpy(), "norm").pvalue > 0.01


@pytest.mark.parametrize("weights", ["exact", "energy"])
def test_prior_hook_sir_picks_what_repeated_contexts_pick(weights):
    # The per-item conditioning is an exact rewrite: with the same random stream, SIR must choose the
    # same proposals as evaluating the sampler and the energy on h repeated for every proposal.
    sampler = _randomised_flow(SPECS, [0, 1])
    energies = EnergySet(SPECS, [0, 1], hidden=8).double()
    batch, proposals, chunk, t = 5, 23, 7, 0.9
    mu, sigma = torch.randn(batch, 4, 3, 3, dtype=torch.float64), torch.rand(batch, 4, 3, 3, dtype=torch.float64) + 0.5
    h = torch.randn(batch, 5, 3, 3, dtype=torch.float64)

    def repeat(x, k):
        return x.repeat(k, 1, 1, 1)

    def propose(k):
        z, log_q = sampler(repeat(mu, k), repeat(sigma, k), repeat(h, k), 1, t)
        return z.view(k, batch, 4, 3, 3), log_q.view(k, batch)

    def log_weight(z, log_q):
        k = z.shape[0]
        energy = energies(1, z.flatten(0, 1), repeat(h, k)).view(k, batch)
        log_p0 = gaussian_log_prob(z.flatten(0, 1), repeat(mu, k), t * repeat(sigma, k)).view(k, batch)
        return sir_log_weight(weights, energy, log_p0, log_q)

    torch.manual_seed(5)
    with torch.no_grad():
        (expected, _), _, _ = sir_select(propose, log_weight, proposals, chunk, batch)
    prior = EVaLPPrior(energies, sampler, [0, 1], sir_proposals=proposals, sir_weights=weights,
                       sir_groups=[1], sir_chunk=chunk)
    torch.manual_seed(5)
    z = prior.sample_group(1, h, mu, sigma, t)
    torch.testing.assert_close(z, expected, rtol=1e-12, atol=1e-12)
    torch.manual_seed(6)
    assert not torch.allclose(prior.sample_group(1, h, mu, sigma, t), expected)  # the draw is random
