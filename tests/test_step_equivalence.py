"""The stage-1 step's speed-ups leave its maths unchanged: the spectral regulariser reading the forward's
normalised weights, batched matrix products in power iteration, the norm-only non-finite check and the
fused BatchNorm snapshot give the same loss, gradients and state as the plain formulation."""
import copy
import dataclasses
import math

import torch
import torch.nn.functional as F

from nvae.cells import WNConv2d
from nvae.config import preset
from nvae.losses import SpectralRegularizer
from nvae.model import NVAE
from nvae.runtime import DistContext, Precision, RunLogger
from nvae.train import NVAETask


def _tiny(seed: int = 0) -> NVAE:
    torch.manual_seed(seed)
    return NVAE(preset("tiny").model)


def _reference_spectral(model: NVAE, state: dict, iters: int) -> torch.Tensor:
    """The regulariser as first written: every weight normalised afresh, einsum power iteration."""
    reg = SpectralRegularizer(model)
    reg.load_state_dict(state)
    total = 0.0
    for i, convs in enumerate(reg._convs):
        weights = torch.stack([c.normalized_weight().flatten(1) for c in convs]).float()
        u, v = getattr(reg, f"u{i}"), getattr(reg, f"v{i}")
        with torch.no_grad():
            for _ in range(iters):
                v = F.normalize(torch.einsum("nrc,nr->nc", weights, u), dim=1, eps=1e-3)
                u = F.normalize(torch.einsum("nrc,nc->nr", weights, v), dim=1, eps=1e-3)
        total = total + torch.einsum("nr,nrc,nc->n", u, weights, v).sum()
    return total


def _loss(model: NVAE, x: torch.Tensor, spectral) -> torch.Tensor:
    torch.manual_seed(1)  # the posterior draws
    out = model(x)
    return model.reconstruction_nll(out.logits, x).mean() + sum(k.mean() for k in model.kl_per_group(out)) + spectral()


def test_spectral_regulariser_reusing_forward_weights_matches_fresh_normalisation():
    x = torch.rand(4, 1, 32, 32).bernoulli()
    fast_model, plain_model = _tiny(), _tiny()
    reg = SpectralRegularizer(fast_model, num_power_iter=3, init_power_iter=3)
    state = copy.deepcopy(reg.state_dict())
    fast = _loss(fast_model, x, reg)
    plain = _loss(plain_model, x, lambda: _reference_spectral(plain_model, state, 3))
    assert torch.allclose(fast, plain, rtol=1e-6, atol=1e-5)
    fast.backward()
    plain.backward()
    for (name, p), q in zip(fast_model.named_parameters(), plain_model.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-6), name


def test_forward_weight_is_handed_out_once_and_never_stale():
    conv = WNConv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 5, 5)
    conv(x)
    first = conv.take_forward_weight()
    assert first.grad_fn is not None
    second = conv.take_forward_weight()  # no forward since: a fresh normalisation, same value
    assert second is not first and torch.equal(second, first)
    conv(x)
    with torch.no_grad():
        conv.weight.add_(1.0)  # an optimiser step between the forward and the regulariser
    assert torch.allclose(conv.take_forward_weight(), conv.normalized_weight())
    with torch.no_grad():
        conv(x)  # no graph, nothing kept
    assert conv._forward_weight.weight is None
    conv(x)
    copied = copy.deepcopy(conv)  # a pending graph does not travel with a copy
    assert copied._forward_weight.weight is None and conv._forward_weight.weight is not None


def test_batched_power_iteration_matches_matrix_norm():
    torch.manual_seed(0)
    convs = torch.nn.Sequential(WNConv2d(6, 5, 3), WNConv2d(6, 5, 3), WNConv2d(5, 7, 1))
    reg = SpectralRegularizer(convs, num_power_iter=4, init_power_iter=300)
    exact = sum(torch.linalg.matrix_norm(c.normalized_weight().flatten(1), ord=2) for c in convs)
    assert torch.allclose(reg(), exact, rtol=1e-4)


def _task(seed: int = 0, **train) -> NVAETask:
    run_cfg = preset("tiny")
    run_cfg.train = dataclasses.replace(run_cfg.train, batch_size=4, **train)
    torch.manual_seed(seed)
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
    return NVAETask(run_cfg, ctx, Precision.create("fp32", "cpu"), total_steps=100, per_epoch=10, test_set=None,
                    binarize=False, logger=RunLogger("unused", enabled=False))


def test_norm_only_check_reports_the_clipping_norm():
    task = _task()
    x = torch.rand(4, 1, 32, 32).bernoulli()
    parts = task.train_step(x, 0)
    grads = [p.grad.clone() for p in task.model.parameters()]
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert torch.allclose(parts["grad_norm"], expected, rtol=1e-5)
    assert math.isfinite(float(parts["grad_norm"]))


def test_skipped_step_restores_batchnorm_statistics_exactly():
    task = _task()
    x = torch.rand(4, 1, 32, 32).bernoulli()
    task.train_step(x, 0)
    before = [b.clone() for b in task.bn_buffers]
    poisoned = task.model.image_head[1].bias
    params = {name: p.detach().clone() for name, p in task.model.named_parameters() if p is not poisoned}
    with torch.no_grad():
        poisoned.fill_(float("nan"))  # a non-finite loss and gradients
    assert task.train_step(x, 1) is None
    for buffer, saved in zip(task.bn_buffers, before):
        assert torch.equal(buffer, saved)
    for name, p in task.model.named_parameters():
        if name in params:
            assert torch.equal(p, params[name]), name


def test_activation_checkpointing_gives_the_plain_steps_gradients_and_statistics():
    x = torch.rand(4, 1, 32, 32).bernoulli()
    plain, saver = _task(), _task(checkpoint_activations=True)
    torch.manual_seed(1)
    plain_parts = plain.train_step(x, 0)
    plain_grads = [p.grad.clone() for p in plain.model.parameters()]
    torch.manual_seed(1)
    saver_parts = saver.train_step(x, 0)
    assert torch.equal(plain_parts["loss"], saver_parts["loss"])
    for (name, p), q in zip(plain.model.named_parameters(), saver.model.parameters()):
        assert torch.equal(q.grad, plain_grads.pop(0)), name
        assert torch.equal(p, q), name
    # The recomputation must not update BatchNorm's running statistics a second time.
    for (name, b), c in zip(plain.model.named_buffers(), saver.model.buffers()):
        assert torch.equal(b, c), name
    assert any(m.checkpoint_activations for m in saver.model.modules() if hasattr(m, "checkpoint_activations"))


def _saved_bytes(task: NVAETask, x: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward of one loss evaluation (tensors saved outside checkpoints)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        task.loss(x, 0)
    return total


def test_activation_checkpointing_keeps_far_fewer_activations():
    x = torch.rand(4, 1, 32, 32).bernoulli()
    assert _saved_bytes(_task(checkpoint_activations=True), x) < 0.5 * _saved_bytes(_task(), x)


def test_compiled_stage1_step_matches_eager():
    x = torch.rand(4, 1, 32, 32).bernoulli()
    eager, fast = _task(), _task(compile=True)
    assert all(m.compiled_cell is not None for m in fast.model.modules() if hasattr(m, "compiled_cell"))
    results = []
    for task in (eager, fast):
        torch.manual_seed(1)
        parts = task.train_step(x, 0)
        results.append((parts, [p.grad.clone() for p in task.model.parameters()]))
    (eager_parts, eager_grads), (fast_parts, fast_grads) = results
    assert torch.allclose(eager_parts["loss"], fast_parts["loss"], rtol=1e-4)
    # Some gradients are zero in exact arithmetic (a BN shift before another BN) and rounding noise in both runs:
    # the tolerance is set by the largest gradient of the model.
    scale = max(g.abs().max().item() for g in eager_grads)
    for (name, _), g, h in zip(eager.model.named_parameters(), eager_grads, fast_grads):
        assert torch.allclose(g, h, rtol=1e-3, atol=1e-5 * scale), name
