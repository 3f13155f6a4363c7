"""The fused Medusa multi-head loss against an independent float64 reference with materialised logits.

Heads are real :class:`~liger_align.models.medusa.MedusaHead` modules (ResBlocks given random weights so
their gradients are non-trivial) called through their projection; the model's head is a plain weight and
bias. Sizes are odd (V=1003, T=37), with ignored targets and a fully ignored row.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from _helpers import count_products, skip_unless_path
from torch.utils._python_dispatch import TorchDispatchMode

from liger_align.kernels import fused_linear_cross_entropy
from liger_align.losses.medusa import (
    LigerFusedLinearMedusaLoss,
    fused_linear_medusa_loss,
    medusa_loss_weights,
    medusa_schedule,
    tensor_head,
)
from liger_align.models.medusa import MedusaHeads

B, T, H, V = 3, 37, 40, 1003


def make_case(num_heads: int, num_layers: int, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[torch.rand(B, T, generator=gen) < 0.3] = -100
    labels[:, :4] = -100  # a prompt
    labels[1] = -100  # a row with no target at all
    w0 = (0.2 * torch.randn(V, H, generator=gen)).to(dtype).requires_grad_()
    b0 = (0.1 * torch.randn(V, generator=gen)).to(dtype).requires_grad_()
    heads = MedusaHeads(H, V, num_heads, num_layers, dtype=dtype)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return hidden, labels, w0, b0, heads


def runners(w0, b0, heads):
    return [tensor_head(w0, b0), *(functools.partial(lambda h, rows, fn: h(rows, fn), h) for h in heads)]


def reference(hidden, labels, w0, b0, heads, weights, num_items=None):
    """float64 loss, per-head losses, top-1, and gradients of (hidden, w0, b0, every head parameter)."""
    h = hidden.detach().double().requires_grad_()
    w, b = w0.detach().double().requires_grad_(), b0.detach().double().requires_grad_()
    params = [p.detach().double().requires_grad_() for p in heads.parameters()]
    layers = heads.num_layers
    total, losses, top1 = 0.0, [], []
    for k in range(len(weights)):
        x = h[:, : T - 1 - k]
        if k == 0:
            logits = x @ w.T + b
        else:
            block = params[(k - 1) * (2 * layers + 1): k * (2 * layers + 1)]
            for layer in range(layers):
                x = x + torch.nn.functional.silu(x @ block[2 * layer].T + block[2 * layer + 1])
            logits = x @ block[-1].T
        target = labels[:, 1 + k:]
        valid = target != -100
        nll = -torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None]).squeeze(-1) * valid
        denom = valid.sum().clamp(min=1) if num_items is None else torch.as_tensor(num_items[k], dtype=torch.float64)
        losses.append(nll.sum() / denom)
        top1.append((((logits.argmax(-1) == target) & valid).sum() / valid.sum().clamp(min=1)).item())
        if weights[k]:
            total = total + weights[k] * losses[-1]
    total.backward()
    return total.detach(), torch.stack(losses).detach(), top1, [h.grad, w.grad, b.grad, *(p.grad for p in params)]


def ours(hidden, labels, w0, b0, heads, weights, **kwargs):
    out = fused_linear_medusa_loss(hidden, labels, runners(w0, b0, heads), weights, **kwargs)
    out.loss.backward()
    return out, [hidden.grad, w0.grad, b0.grad, *(p.grad for p in heads.parameters())]


def assert_grads_close(got, want, rtol=1e-4):
    for i, (g, r) in enumerate(zip(got, want, strict=True)):
        assert g is not None, f"gradient {i} is missing"
        err = (g.double() - r).norm() / r.norm().clamp(min=1e-30)
        assert err <= rtol, f"gradient {i}: relative error {err:.2e}"


@pytest.mark.parametrize("num_heads", [1, 3, 5])
@pytest.mark.parametrize("num_layers", [0, 1])
def test_matches_float64_reference(num_heads: int, num_layers: int) -> None:
    hidden, labels, w0, b0, heads = make_case(num_heads, num_layers, seed=num_heads * 10 + num_layers)
    weights = medusa_loss_weights(num_heads, heads_coefficient=0.7, decay_coefficient=0.8, model_head_weight=1.3)
    want, want_losses, want_top1, want_grads = reference(hidden, labels, w0, b0, heads, weights)
    out, grads = ours(hidden, labels, w0, b0, heads, weights)
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.head_losses.double(), want_losses, rtol=1e-5, atol=1e-5)
    assert out.head_top1.tolist() == pytest.approx(want_top1, abs=1e-6)
    assert out.head_counts.tolist() == [int((labels[:, 1 + k:] != -100).sum()) for k in range(num_heads + 1)]
    assert out.computed.all()
    assert_grads_close(grads, want_grads)


@pytest.mark.parametrize("variant", ["token_chunks", "recompute", "materialized"])
def test_other_paths_match_reference(variant: str) -> None:
    hidden, labels, w0, b0, heads = make_case(3, 1, seed=7)
    weights = [1.0, 0.5, 0.25, 0.125]
    kwargs = {"token_chunks": {"chunk_bytes": 16 * V * 4}, "recompute": {"strategy": "recompute"},
              "materialized": {"materialize_logits": True}}[variant]
    want, want_losses, want_top1, want_grads = reference(hidden, labels, w0, b0, heads, weights)
    out, grads = ours(hidden, labels, w0, b0, heads, weights, **kwargs)
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.head_losses.double(), want_losses, rtol=1e-5, atol=1e-5)
    assert out.head_top1.tolist() == pytest.approx(want_top1, abs=1e-6)
    assert_grads_close(grads, want_grads)


def test_total_is_the_weighted_sum_and_schedules() -> None:
    hidden, labels, w0, b0, heads = make_case(4, 1, seed=3)
    for scheduler, progress in (("constant", 0.3), ("linear", 0.3), ("sine", 1 / 3), ("sine_0.5", 0.25)):
        weights = medusa_loss_weights(4, heads_coefficient=0.2, decay_coefficient=0.8, scheduler=scheduler,
                                      progress=progress, model_head_weight=1.0)
        out = fused_linear_medusa_loss(hidden, labels, runners(w0, b0, heads), weights)
        assert out.loss.item() == pytest.approx(sum(w * x for w, x in zip(weights, out.head_losses.tolist())), rel=1e-6)
    # Medusa-2's schedules of step / max_steps
    assert medusa_schedule("constant", 0.0) == 1.0
    assert medusa_schedule("linear", 0.25) == pytest.approx(0.25)
    assert medusa_schedule("sine", 1 / 3) == pytest.approx(0.5)
    assert medusa_schedule("sine_0.5", 0.25) == pytest.approx(math.sqrt(0.5))
    assert medusa_schedule("sine_0.5", 0.75) == 1.0
    weights = medusa_loss_weights(3, heads_coefficient=0.5, decay_coefficient=0.8, scheduler="linear", progress=0.5,
                                  model_head_weight=0.0)
    assert weights == pytest.approx([0.0, 0.25 * 0.8, 0.25 * 0.64, 0.25 * 0.512])


def test_zero_weight_head_is_not_run() -> None:
    hidden, labels, w0, b0, heads = make_case(3, 1, seed=4)
    calls = []

    def spy(k, run):
        def wrapped(rows, fn):
            calls.append(k)
            return run(rows, fn)
        return wrapped

    run = [spy(k, r) for k, r in enumerate(runners(w0, b0, heads))]
    out = fused_linear_medusa_loss(hidden, labels, run, [0.0, 1.0, 0.0, 0.5])
    out.loss.backward()
    assert calls == [1, 3]
    assert out.computed.tolist() == [False, True, False, True]
    assert w0.grad is None and all(p.grad is None for p in heads[1].parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads[0].parameters())


class CountProducts(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("frozen", [True, False])
def test_frozen_model_head_gets_no_grad_weight_product(frozen: bool) -> None:
    hidden, labels, w0, b0, heads = make_case(2, 0, seed=5)
    w0.requires_grad_(not frozen)
    b0.requires_grad_(not frozen)
    with CountProducts() as products:
        out = fused_linear_medusa_loss(hidden, labels, runners(w0, b0, heads), [1.0, 0.0, 0.0])
    assert products.count == (2 if frozen else 3)  # logits and grad-hidden (+ grad-weight), one chunk
    out.loss.backward()
    assert (w0.grad is None) == frozen


def test_all_ignored_head_contributes_zero() -> None:
    hidden, labels, w0, b0, heads = make_case(3, 1, seed=6)
    labels[:, 6:] = -100  # heads 1..3 have targets only at positions < 6; head 3 at labels[:, 4:6]
    labels[:, 4:6] = -100
    labels[0, 3], labels[2, 2] = 5, 7  # only heads 0..2 see a target
    out, grads = ours(hidden, labels, w0, b0, heads, [1.0, 1.0, 1.0, 1.0])
    assert out.head_counts.tolist()[3] == 0 and out.head_losses[3].item() == 0.0
    assert all(torch.isfinite(g).all() for g in grads)
    assert all(p.grad.abs().sum() == 0 for p in heads[2].parameters())
    labels.fill_(-100)
    hidden.grad = None
    out = fused_linear_medusa_loss(hidden, labels, runners(w0, b0, heads), [1.0, 1.0, 1.0, 1.0])
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.isfinite(out.head_top1).all()
    assert hidden.grad.abs().sum() == 0


def test_every_weight_zero_gives_a_zero_that_backpropagates() -> None:
    hidden, labels, w0, b0, heads = make_case(2, 1, seed=8)
    out = fused_linear_medusa_loss(hidden, labels, runners(w0, b0, heads), [0.0, 0.0, 0.0])
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out.loss.backward()
    assert hidden.grad is None


def test_num_items_in_batch() -> None:
    hidden, labels, w0, b0, heads = make_case(3, 1, seed=9)
    weights = [1.0, 0.9, 0.8, 0.7]
    counts = [int((labels[:, 1 + k:] != -100).sum()) for k in range(4)]
    scalar = fused_linear_medusa_loss(hidden, labels, runners(w0, b0, heads), weights, num_items_in_batch=50)
    plain = fused_linear_medusa_loss(hidden, labels, runners(w0, b0, heads), weights)
    torch.testing.assert_close(scalar.head_losses * 50, plain.head_losses * torch.tensor(counts).float())
    # gradient accumulation: two halves with the whole batch's per-head counts = the whole batch
    whole, _, _, want_grads = reference(hidden, labels, w0, b0, heads, weights)
    for rows in (slice(0, 2), slice(2, 3)):
        part = fused_linear_medusa_loss(hidden[rows], labels[rows], runners(w0, b0, heads), weights,
                                        num_items_in_batch=torch.tensor(counts))
        part.loss.backward()
    assert_grads_close([hidden.grad, w0.grad, b0.grad, *(p.grad for p in heads.parameters())], want_grads)


def test_module_and_bad_inputs() -> None:
    hidden, labels, w0, b0, heads = make_case(3, 1, seed=10)
    loss_fn = LigerFusedLinearMedusaLoss(3, heads_coefficient=0.5, decay_coefficient=0.8, scheduler="sine")
    out = loss_fn(hidden, labels, runners(w0, b0, heads), progress=0.5)
    weights = medusa_loss_weights(3, heads_coefficient=0.5, decay_coefficient=0.8, scheduler="sine", progress=0.5)
    ref = fused_linear_medusa_loss(hidden, labels, runners(w0, b0, heads), weights)
    torch.testing.assert_close(out.loss, ref.loss)
    run = runners(w0, b0, heads)
    with pytest.raises(ValueError, match="num_heads"):
        medusa_loss_weights(0)
    with pytest.raises(ValueError, match="medusa_scheduler"):
        LigerFusedLinearMedusaLoss(3, scheduler="cosine")
    with pytest.raises(ValueError, match="labels must have shape"):
        fused_linear_medusa_loss(hidden, labels[:, :-1], run, [1.0] * 4)
    with pytest.raises(ValueError, match="shorter than K"):
        fused_linear_medusa_loss(hidden[:, :3], labels[:, :3], run, [1.0] * 4)
    with pytest.raises(ValueError, match="one value per head"):
        fused_linear_medusa_loss(hidden, labels, run, [1.0] * 3)
    with pytest.raises(ValueError, match=r"weights\[2\]"):
        fused_linear_medusa_loss(hidden, labels, run, [1.0, 1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="num_items_in_batch"):
        fused_linear_medusa_loss(hidden, labels, run, [1.0] * 4, num_items_in_batch=[1, 2])
    with pytest.raises(TypeError, match="labels must be an integer"):
        fused_linear_medusa_loss(hidden, labels.float(), run, [1.0] * 4)


def test_autocast_keeps_rows_in_the_autocast_dtype() -> None:
    hidden, labels, w0, b0, heads = make_case(2, 1, seed=11)
    seen = []
    run = runners(w0, b0, heads)
    spied = [lambda rows, fn, r=r: (seen.append(rows.dtype), r(rows, fn))[1] for r in run]
    want = fused_linear_medusa_loss(hidden, labels, run, [1.0, 1.0, 1.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_linear_medusa_loss(hidden, labels, spied, [1.0, 1.0, 1.0])
    got.loss.backward()
    assert seen == [torch.bfloat16] * 3 and hidden.grad.dtype == torch.float32
    torch.testing.assert_close(got.loss, want.loss, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("strategy", ["grad_in_forward", "recompute"])
@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_cross_entropy_top1_from_the_row_pass(strategy: str, impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    skip_unless_path("cpu", impl)
    gen = torch.Generator().manual_seed(12)
    n, size, vocab = 29, 24, 301
    hidden = torch.randn(n, size, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, size, generator=gen, requires_grad=True)
    logits = hidden.detach().double() @ weight.detach().double().T
    target = torch.randint(0, vocab, (n,), generator=gen)
    target[::3] = logits.argmax(-1)[::3]  # some hits
    target[1::7] = -100
    products = count_products(monkeypatch)
    loss, is_top1 = fused_linear_cross_entropy(hidden, weight, target, strategy=strategy, impl=impl,
                                               chunk_bytes=8 * vocab * 4, return_top1=True)
    assert len(products) > 1  # the top-1 flags are gathered over several chunks
    want = (logits.argmax(-1) == target) & (target != -100)
    assert torch.equal(is_top1, want) and want.sum() > 0
    torch.testing.assert_close(loss, fused_linear_cross_entropy(hidden, weight, target, strategy=strategy, impl=impl))
    loss.backward()
    assert torch.isfinite(weight.grad).all()
