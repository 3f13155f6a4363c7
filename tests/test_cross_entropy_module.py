"""LigerFusedLinearCrossEntropyLoss: the module against F.cross_entropy on float64 logits, and its arguments."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _helpers import count_products
from _preference_reference import check_grads, close, leaf_copies, make_rows, skip_unless_path
from _reference import reference_logits

from liger_align.losses import LigerFusedLinearCrossEntropyLoss
from liger_align.losses.functional import fused_linear_cross_entropy

R, T, H, V = 3, 37, 48, 1003


def reference(hidden, weight, bias, target, *, softcap=None, num_items_in_batch=None, **kw):
    logits = reference_logits(hidden.reshape(-1, hidden.shape[-1]), weight, bias, softcap=softcap)
    if num_items_in_batch is not None:
        return F.cross_entropy(logits, target.reshape(-1), reduction="sum", **kw) / num_items_in_batch
    out = F.cross_entropy(logits, target.reshape(-1), **kw)
    return out.view(target.shape) if kw.get("reduction") == "none" else out


def run_case(dtype, *, impl="torch", device="cpu", flat=False, bias=True, seed=0, size=(T, V), call_kw=None, **options):
    length, vocab = size
    hidden, weight, b, target = make_rows(R, length, H, vocab, dtype, bias=bias, seed=seed, device=device)
    if flat:
        hidden = hidden.detach().reshape(-1, H).requires_grad_()
        target = target.reshape(-1)
    loss_fn = LigerFusedLinearCrossEntropyLoss(impl=impl, chunk_bytes=8 * vocab * 4, **options)
    with pytest.MonkeyPatch.context() as patch:
        products = count_products(patch)
        loss = loss_fn(weight, hidden, target, b, **(call_kw or {}))
    assert len(products) > 1  # the small budget split the forward into several chunks
    h64, w64, b64 = leaf_copies(hidden, weight, b, device="cpu")
    ref = reference(h64, w64, b64, target.cpu(), **options, **(call_kw or {}))
    assert loss.shape == ref.shape and close(loss, ref, dtype)
    if loss.dim():
        upstream = torch.randn(loss.shape, device=device)
        loss, ref = (loss * upstream).sum(), (ref * upstream.double().cpu()).sum()
    check_grads(loss, ref, (hidden, weight, b), (h64, w64, b64), dtype, scale=3.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_cross_entropy(dtype, reduction):
    run_case(dtype, reduction=reduction, label_smoothing=0.1 if reduction == "mean" else 0.0, seed=1)


def test_flat_input_softcap_and_items_in_batch():
    run_case(torch.float32, flat=True, bias=False, softcap=3.0, seed=2)
    run_case(torch.float32, call_kw=dict(num_items_in_batch=100), seed=3)


def test_module_equals_functional():
    hidden, weight, b, target = make_rows(R, T, H, V, torch.float32, bias=True, seed=4)
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, impl="torch")(weight, hidden, target, b)
    assert torch.equal(loss, fused_linear_cross_entropy(hidden, weight, target, b, impl="torch"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_path(dtype):
    skip_unless_path("cpu", "triton")
    run_case(dtype, impl="triton", size=(13, 301), seed=5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda(dtype):
    skip_unless_path("cuda", "triton")
    run_case(dtype, impl=None, device="cuda", seed=6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="reduction"):
        LigerFusedLinearCrossEntropyLoss(reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        LigerFusedLinearCrossEntropyLoss(label_smoothing=1.5)
    hidden, weight, b, target = make_rows(R, T, H, V, torch.float32, bias=True, seed=7)
    with pytest.raises(ValueError, match="target"):
        LigerFusedLinearCrossEntropyLoss()(weight, hidden, target[:, 1:])
