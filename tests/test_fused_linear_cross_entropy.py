"""Fused linear cross-entropy against F.cross_entropy on float64 logits; reductions, HF accumulation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _helpers import GRID_PATHS, PATHS, count_products, leaf_copies, skip_unless_path
from _reference import TOLERANCE, reference_logits, rel_err

from liger_align.kernels import fused_linear_cross_entropy


def _inputs(shape, h, v, dtype, device, *, bias=True):
    hidden = torch.randn(*shape, h).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h) / h**0.5).to(device, dtype).requires_grad_()
    b = (torch.randn(v) * 0.3).to(device, dtype).requires_grad_() if bias else None
    target = torch.randint(0, v, shape).to(device)
    target.view(-1)[::4] = -100
    return hidden, weight, b, target


def _reference(hidden, weight, bias, target, **kw):
    logits = reference_logits(hidden.reshape(-1, hidden.shape[-1]), weight, bias)
    return F.cross_entropy(logits, target.reshape(-1), **kw)


@pytest.mark.parametrize("device,impl", GRID_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("strategy", ["grad_in_forward", "recompute"])
def test_matches_cross_entropy(device, impl, dtype, reduction, label_smoothing, strategy, monkeypatch):
    skip_unless_path(device, impl)
    if strategy == "grad_in_forward" and reduction == "none":
        pytest.skip("per-token losses need the recomputing strategy")
    hidden, weight, b, target = _inputs((37,), 48, 1003, dtype, device)
    products = count_products(monkeypatch)
    loss = fused_linear_cross_entropy(
        hidden, weight, target, b, reduction=reduction, label_smoothing=label_smoothing, impl=impl,
        chunk_bytes=16 * 1003 * hidden.element_size(), strategy=strategy,  # 16 rows of logits per chunk
    )
    assert len(products) > 1  # the small budget split the forward into several chunks
    h64, w64, b64 = leaf_copies(hidden, weight, b)
    ref = _reference(h64, w64, b64, target, reduction=reduction, label_smoothing=label_smoothing)
    tol = TOLERANCE[dtype]
    assert loss.shape == ref.shape and rel_err(loss, ref) < tol
    upstream = torch.rand(ref.shape, device=device) + 0.5  # a scaled upstream gradient
    got = torch.autograd.grad(loss, (hidden, weight, b), upstream)
    want = torch.autograd.grad(ref, (h64, w64, b64), upstream.double())
    for g, r, t in zip(got, want, (hidden, weight, b)):
        assert g.dtype == t.dtype and rel_err(g, r) < tol


@pytest.mark.parametrize("device,impl", PATHS)
def test_batched_input_and_sum_with_other_loss(device, impl):
    skip_unless_path(device, impl)
    hidden, weight, b, target = _inputs((3, 13), 40, 517, torch.float32, device)
    loss = fused_linear_cross_entropy(hidden, weight, target, b, impl=impl)
    (3 * loss + (hidden**2).mean()).backward()
    h64, w64, b64 = leaf_copies(hidden, weight, b)
    (3 * _reference(h64, w64, b64, target) + (h64**2).mean()).backward()
    for t, r in ((hidden, h64), (weight, w64), (b, b64)):
        assert rel_err(t.grad, r.grad) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("device,impl", PATHS)
@pytest.mark.parametrize("strategy", ["grad_in_forward", "recompute"])
def test_num_items_in_batch_makes_accumulation_exact(device, impl, strategy):
    skip_unless_path(device, impl)
    hidden, weight, b, target = _inputs((2, 19), 32, 301, torch.float32, device)
    target[1, :12] = -100  # micro-batches with different numbers of valid tokens
    total_items = (target != -100).sum()
    accumulated = sum(
        fused_linear_cross_entropy(
            hidden[i], weight, target[i], b, num_items_in_batch=total_items, impl=impl, strategy=strategy
        )
        for i in range(2)
    )
    accumulated.backward()
    h64, w64, b64 = leaf_copies(hidden, weight, b)
    full = _reference(h64, w64, b64, target)
    full.backward()
    assert rel_err(accumulated, full) < 1e-5
    for t, r in ((hidden, h64), (weight, w64), (b, b64)):
        assert rel_err(t.grad, r.grad) < 1e-4


@pytest.mark.parametrize("device,impl", PATHS)
def test_all_masked_is_finite_with_zero_gradient(device, impl):
    skip_unless_path(device, impl)
    hidden, weight, b, target = _inputs((9,), 24, 211, torch.float32, device)
    target.fill_(-100)
    loss = fused_linear_cross_entropy(hidden, weight, target, b, impl=impl)
    loss.backward()
    assert loss.item() == 0.0
    for t in (hidden, weight, b):
        assert torch.all(t.grad == 0)


def test_frozen_weight_and_no_bias_grad():
    hidden, weight, b, target = _inputs((21,), 32, 257, torch.float32, "cpu")
    weight.requires_grad_(False)
    b.requires_grad_(False)
    fused_linear_cross_entropy(hidden, weight, target, b).backward()
    assert weight.grad is None and b.grad is None
    h64, w64, b64 = leaf_copies(hidden, weight, b)
    _reference(h64, w64, b64, target).backward()
    assert rel_err(hidden.grad, h64.grad) < TOLERANCE[torch.float32]


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(reduction="sum", num_items_in_batch=4), ValueError, "num_items_in_batch"),
        (dict(strategy="fast"), ValueError, "strategy must be one of"),
        (dict(reduction="none", strategy="grad_in_forward"), ValueError, "grad_in_forward"),
    ],
)
def test_bad_options(kwargs, error, message):
    hidden, weight, b, target = _inputs((7,), 16, 101, torch.float32, "cpu")
    with pytest.raises(error, match=message):
        fused_linear_cross_entropy(hidden, weight, target, b, **kwargs)


def test_bad_shapes():
    hidden, weight, b, target = _inputs((2, 5), 16, 101, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"target must have shape \(B, T\)"):
        fused_linear_cross_entropy(hidden, weight, target[:, :4], b)
    with pytest.raises(ValueError, match="must match weight"):
        fused_linear_cross_entropy(hidden, weight[:, :8], target, b)


def test_auto_strategy_respects_the_extra_memory_budget(monkeypatch):
    import importlib

    module = importlib.import_module("liger_align.kernels.head.fused_linear_cross_entropy")

    calls = []
    real = module.linear_token_objective
    monkeypatch.setattr(module, "linear_token_objective", lambda *a, **k: calls.append(1) or real(*a, **k))
    hidden, weight, b, target = _inputs((7,), 16, 101, torch.bfloat16, "cpu")
    fused_linear_cross_entropy(hidden, weight, target, b)
    assert calls == []
    fused_linear_cross_entropy(hidden, weight, target, b, max_extra_bytes=weight.numel())
    assert calls == [1]


def test_second_backward_is_refused_not_wrong():
    hidden, weight, b, target = _inputs((11,), 16, 101, torch.float32, "cpu")
    loss = fused_linear_cross_entropy(hidden, weight, target, b, strategy="grad_in_forward")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()
    twice = fused_linear_cross_entropy(hidden, weight, target, b, strategy="recompute")
    hidden.grad = None
    twice.backward(retain_graph=True)
    first = hidden.grad.clone()
    twice.backward()
    assert torch.allclose(hidden.grad, 2 * first)
