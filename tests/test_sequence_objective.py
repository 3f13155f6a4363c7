"""The 3-product sequence-objective op against a float64 reference on materialised logits.

Objectives of the three shapes the losses use: pairs (DPO-like), pairs plus NLL rows (ORPO-like, with a
batch-wide token normaliser) and single rows (KTO-like). Several chunks of whole groups are asserted to run.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _helpers import count_products
from _reference import reference_logits
from conftest import triton_runs_on

from liger_align.kernels.head import sequence_objective as so
from liger_align.kernels.head.linear_logprobs import LogitOptions

IGNORE = -100


def _inputs(rows, length, width, vocab, *, dtype=torch.float32, masked_row=None, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(rows, length, width, generator=g) * 0.7).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, width, generator=g) * 0.3).to(dtype).requires_grad_()
    b = (torch.randn(vocab, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    target = torch.randint(0, vocab, (rows, length), generator=g)
    target[torch.rand(rows, length, generator=g) < 0.3] = IGNORE
    target[:, :3] = IGNORE  # a prompt
    if masked_row is not None:
        target[masked_row] = IGNORE
    return hidden, weight, b, target


def _ref_stats(hidden, weight, bias, target, **transform):
    z = reference_logits(hidden, weight, bias, **transform)
    logp = torch.log_softmax(z, -1)
    valid = target != IGNORE
    picked = logp.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
    sums = torch.where(valid, picked, 0.0).sum(-1)
    n = valid.double().sum(-1)
    means = torch.where(valid, z.mean(-1), 0.0).sum(-1)
    return sums, n, means


def dpo_like(ref):
    def objective(s, n, m):
        half = s.shape[0] // 2
        delta = (s[:half] - ref[:half]) - (s[half:] - ref[half:])
        return -F.logsigmoid(0.7 * delta).mean()
    return objective


def orpo_like(s, n, m):
    half = s.shape[0] // 2
    c = s[:half] / n[:half].clamp(min=1)
    r = s[half:] / n[half:].clamp(min=1)
    log_odds = (c - r) - (torch.log(-torch.expm1(c.clamp(max=-1e-6))) - torch.log(-torch.expm1(r.clamp(max=-1e-6))))
    nll = -s[:half].sum() / n[:half].sum().clamp(min=1)
    return nll - 0.3 * F.logsigmoid(log_odds).mean()


def kto_like(ref):
    def objective(s, n, m):
        return (1.0 - torch.sigmoid(0.5 * (s - ref - 0.1))).mean()
    return objective


def _paths():
    paths = ["torch"]
    if triton_runs_on("cpu"):
        paths.append(pytest.param("triton", marks=pytest.mark.interpreter))
    return paths


def _check(hidden, weight, bias, target, objective, groups, *, impl, chunk_bytes, upstream=1.0, tol=2e-4, **transform):
    opts = LogitOptions(ignore_index=IGNORE, chunk_bytes=chunk_bytes, impl=impl, **transform)
    loss, sums, n, means = so.sequence_objective(hidden, weight, target, bias, objective=objective, row_groups=groups,
                                                 opts=opts)
    (loss * upstream).backward()
    leaves = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    got = [t.grad.double() for t in leaves]
    ref_leaves = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None
                  for t in (hidden, weight, bias)]
    r_sums, r_n, r_means = _ref_stats(*ref_leaves[:2], ref_leaves[2], target, **transform)
    ref_loss = objective(r_sums, r_n, r_means)
    (ref_loss * upstream).backward()
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(sums.double(), r_sums.detach(), rtol=tol, atol=tol * 10)
    torch.testing.assert_close(n.double(), r_n)
    torch.testing.assert_close(means.double(), r_means.detach(), rtol=tol, atol=tol * 10)
    for mine, ref in zip(got, [t.grad for t in ref_leaves if t is not None and t.requires_grad]):
        torch.testing.assert_close(mine, ref, rtol=tol * 5, atol=tol)


@pytest.mark.parametrize("impl", _paths())
def test_pairs_match_float64_over_several_chunks(monkeypatch, impl):
    rows, length, width, vocab = 6, 37, 29, 1003
    hidden, weight, bias, target = _inputs(rows, length, width, vocab, masked_row=4, bias=True, seed=11)
    ref = torch.randn(rows, generator=torch.Generator().manual_seed(3)) * 5 - 40
    calls = count_products(monkeypatch)
    groups = (0, 1, 2, 0, 1, 2)
    # one pair (about 2 * 24 valid tokens) per chunk: budget for ~40 rows of logits
    _check(hidden, weight, bias, target, dpo_like(ref), groups, impl=impl, chunk_bytes=40 * vocab * 4, upstream=0.37)
    assert len(calls) >= 3, f"expected several chunks, ran {len(calls)}"
    assert torch.all(hidden.grad[4] == 0), "an all-masked row gets no gradient"


@pytest.mark.parametrize("impl", _paths())
def test_orpo_like_with_transform_and_single_rows(monkeypatch, impl):
    rows, length, width, vocab = 4, 23, 17, 515
    hidden, weight, bias, target = _inputs(rows, length, width, vocab, bias=True, seed=5)
    calls = count_products(monkeypatch)
    _check(hidden, weight, bias, target, orpo_like, (0, 1, 0, 1), impl=impl, chunk_bytes=20 * vocab * 4,
           softcap=3.0, temperature=0.8, logit_scale=1.3)
    assert len(calls) == 2
    hidden, weight, _, target = _inputs(5, 19, 13, 301, seed=9)
    ref = torch.randn(5, generator=torch.Generator().manual_seed(4)) - 30
    _check(hidden, weight, None, target, kto_like(ref), tuple(range(5)), impl=impl, chunk_bytes=None)


def test_frozen_weight_does_no_grad_weight_work(monkeypatch):
    hidden, weight, _, target = _inputs(4, 21, 11, 257, seed=2)
    weight.requires_grad_(False)

    def refuse(*args, **kwargs):
        raise AssertionError("no grad-weight accumulator for a frozen weight")

    monkeypatch.setattr(so, "GradWeightSum", refuse)
    ref = torch.zeros(4)
    _check(hidden, weight, None, target, dpo_like(ref), (0, 1, 0, 1), impl="torch", chunk_bytes=30 * 257 * 4)
    assert weight.grad is None


def test_all_masked_batch_is_finite_with_zero_gradients():
    hidden, weight, _, target = _inputs(4, 9, 7, 101, seed=8)
    target.fill_(IGNORE)
    loss, *_ = so.sequence_objective(hidden, weight, target, None, objective=orpo_like, row_groups=(0, 1, 0, 1),
                                     opts=LogitOptions(impl="torch"))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)


def test_one_backward_per_forward_and_bad_targets():
    hidden, weight, _, target = _inputs(2, 9, 7, 101, seed=1)
    loss, *_ = so.sequence_objective(hidden, weight, target, None, objective=orpo_like, row_groups=(0, 0),
                                     opts=LogitOptions(impl="torch"))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()
    target[0, 5] = 101
    with pytest.raises(ValueError, match=r"target must lie in \[0, V\)"):
        so.sequence_objective(hidden, weight, target, None, objective=orpo_like, row_groups=(0, 0),
                              opts=LogitOptions(impl="torch"))
    with pytest.raises(ValueError, match="row_groups"):
        so.sequence_objective(hidden, weight, target, None, objective=orpo_like, row_groups=(0,),
                              opts=LogitOptions(impl="torch"))


def test_choose_strategy():
    hidden, weight, _, _ = _inputs(4, 9, 7, 101, seed=1)
    opts = LogitOptions()
    assert so.sequence_strategy("auto", hidden, weight, separable=True, group_rows=2, opts=opts) == "grad_in_forward"
    assert so.sequence_strategy("auto", hidden, weight, separable=False, group_rows=2, opts=opts) == "recompute"
    assert so.sequence_strategy(
        "auto", hidden, weight, separable=True, group_rows=2, opts=opts, max_extra_bytes=0
    ) == "recompute"
    with torch.no_grad():
        assert so.sequence_strategy("auto", hidden, weight, separable=True, group_rows=2, opts=opts) == "recompute"
    assert so.sequence_strategy("recompute", hidden, weight, separable=True, group_rows=2, opts=opts) == "recompute"
    with pytest.raises(ValueError, match="separable"):
        so.sequence_strategy("grad_in_forward", hidden, weight, separable=False, group_rows=2, opts=opts)
    with pytest.raises(ValueError, match="strategy"):
        so.sequence_strategy("fast", hidden, weight, separable=True, group_rows=2, opts=opts)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_float64(dtype):
    rows, length, width, vocab = 8, 129, 256, 32003
    hidden, weight, bias, target = _inputs(rows, length, width, vocab, dtype=dtype, bias=True, seed=21)
    hidden = hidden.detach().cuda().requires_grad_()
    weight = weight.detach().cuda().requires_grad_()
    bias = bias.detach().cuda().requires_grad_()
    target = target.cuda()
    ref = torch.randn(rows, generator=torch.Generator().manual_seed(6)).cuda() * 5 - 400
    tol = 2e-4 if dtype == torch.float32 else 3e-2
    _check(hidden, weight, bias, target, dpo_like(ref), tuple(list(range(4)) * 2), impl=None,
           chunk_bytes=300 * vocab * 2, tol=tol)


@pytest.mark.parametrize("impl", _paths())
def test_bf16_pairs_over_several_chunks(monkeypatch, impl):
    rows, length, width, vocab = 4, 29, 32, 515
    hidden, weight, bias, target = _inputs(rows, length, width, vocab, dtype=torch.bfloat16, bias=True, seed=17)
    ref = torch.randn(rows, generator=torch.Generator().manual_seed(2)) * 3 - 40
    calls = count_products(monkeypatch)
    _check(hidden, weight, bias, target, dpo_like(ref), (0, 1, 0, 1), impl=impl, chunk_bytes=45 * vocab * 2,
           tol=3e-2)
    assert len(calls) >= 2


def test_losses_check_their_strategy_before_any_product(monkeypatch):
    from liger_align.losses import LigerFusedLinearDPOLoss, LigerFusedLinearORPOLoss

    with pytest.raises(ValueError, match="strategy must be one of"):
        LigerFusedLinearORPOLoss(strategy="fastest")
    hidden, weight, _, target = _inputs(4, 9, 7, 101, seed=3)
    calls = count_products(monkeypatch)
    aot = LigerFusedLinearDPOLoss(loss_type="aot", strategy="grad_in_forward", reference_free=True)
    with pytest.raises(ValueError, match="separable"):
        aot(weight, hidden, target)
    assert calls == []
    # auto keeps AOT (which sorts the batch) on the recomputing path: products in the forward and the backward
    loss, _ = LigerFusedLinearDPOLoss(loss_type="aot", reference_free=True)(weight, hidden, target)
    forward_products = len(calls)
    loss.backward()
    assert forward_products >= 1 and len(calls) > forward_products
    assert torch.isfinite(loss) and torch.isfinite(hidden.grad).all()
    with pytest.raises(TypeError, match="unexpected keyword"):
        LigerFusedLinearORPOLoss(chunk_size=4)
