"""ORPO loss: value, metrics and gradients against TRL 1.16's ORPOTrainer on float64 logits; bad input."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from _helpers import count_products, gradient_path  # noqa: E402
from _preference_reference import (  # noqa: E402
    IGNORE,
    LogitsModel,
    check_grads,
    close,
    leaf_copies,
    logits64,
    make_rows,
    masked_logits_mean,
    pad_left,
    skip_unless_path,
    token_logps64,
    trainer_stub,
)
from trl.experimental.orpo import ORPOTrainer  # noqa: E402

from liger_align.losses import LigerFusedLinearORPOLoss, fused_linear_cross_entropy  # noqa: E402
from liger_align.losses.functional import fused_linear_orpo_loss  # noqa: E402

#: Every test runs on both gradient paths of the sequence losses (3 and 4 products).
pytestmark = pytest.mark.usefixtures("loss_path")

B, T, H, V = 3, 37, 48, 1003


def trl_orpo(h64, w64, b64, target, nll_target, beta):
    """TRL's ``ORPOTrainer.get_batch_loss_metrics`` (its concatenated forward and odds-ratio loss) on float64 logits."""
    half = target.shape[0] // 2
    batch = {}
    for name, labels, nll in (
        ("chosen", target[:half], target[:half] if nll_target is None else nll_target),
        ("rejected", target[half:], target[half:]),
    ):
        batch[f"{name}_input_ids"] = pad_left(nll.clamp(min=0), 0)
        batch[f"{name}_attention_mask"] = pad_left((nll != IGNORE).long(), 1)
        batch[f"{name}_labels"] = pad_left(labels, IGNORE)
    trainer = trainer_stub(ORPOTrainer, beta=beta)
    return ORPOTrainer.get_batch_loss_metrics(trainer, LogitsModel(h64, w64, b64), batch)


def prompt_and_completion(target, seed, vocab):
    """NLL targets of the chosen rows over prompt + completion, as TRL's trainer uses."""
    gen = torch.Generator().manual_seed(seed + 1)
    half = target.shape[0] // 2
    nll = target[:half].clone()
    prompt = nll == IGNORE
    prompt &= torch.arange(nll.shape[1]) < (nll != IGNORE).float().argmax(1, keepdim=True)  # before completion
    nll[prompt] = torch.randint(0, vocab, (int(prompt.sum()),), generator=gen).to(nll.device)
    return nll


def run_case(
    dtype, *, bias, impl="torch", device="cpu", nll="default", pairs=B, seed=0, beta=0.1, scale=1.0, size=(T, V),
    chunk_bytes=16 * V * 4,
):
    length, vocab = size
    hidden, weight, b, target = make_rows(2 * pairs, length, H, vocab, dtype, bias=bias, seed=seed, device=device)
    nll_target = prompt_and_completion(target.cpu(), seed, vocab).to(device) if nll == "prompt" else None
    loss_fn = LigerFusedLinearORPOLoss(beta=beta, impl=impl, chunk_bytes=chunk_bytes)
    with pytest.MonkeyPatch.context() as patch:
        products = count_products(patch)
        loss, out = loss_fn(weight, hidden, target, b, nll_target=nll_target)
    if chunk_bytes is not None:
        # the small budget split the forward into several chunks (the 3-product path keeps a pair whole)
        assert len(products) > 1 or (gradient_path(hidden, weight) == "grad_in_forward" and len(products) == 1 == pairs)
    h64, w64, b64 = leaf_copies(hidden, weight, b, device="cpu")
    target = target.cpu()
    ref_loss, ref_metrics = trl_orpo(h64, w64, b64, target, None if nll_target is None else nll_target.cpu(), beta)

    assert loss.dtype == torch.float32 and loss.shape == ()
    assert close(loss, ref_loss, dtype)
    for key, ref_key in (
        ("nll_loss", "nll_loss"), ("log_odds_ratio", "log_odds_ratio"), ("log_odds_chosen", "log_odds_chosen"),
    ):
        assert close(out[key], ref_metrics[ref_key], dtype, atol=1e-3), key
    for side in ("chosen", "rejected"):
        assert out[f"{side}_logps"].shape == (pairs,) and not out[f"{side}_logps"].requires_grad
        assert close(out[f"{side}_logps"].mean(), ref_metrics[f"logps/{side}"], dtype)
        assert close(out[f"{side}_rewards"].mean(), ref_metrics[f"rewards/{side}"], dtype)
    with torch.no_grad():
        logits = logits64(h64, w64, b64)
        per_token = token_logps64(logits, target)
        n = (target != IGNORE).sum(1)
        avg = per_token.sum(1) / n
        assert close(out["chosen_logps"], avg[:pairs], dtype) and close(out["rejected_logps"], avg[pairs:], dtype)
        assert close(out["chosen_logits_mean"], masked_logits_mean(logits[:pairs], target[:pairs]), dtype, atol=2e-3)
        assert close(out["rejected_logits_mean"], masked_logits_mean(logits[pairs:], target[pairs:]), dtype, atol=2e-3)
    check_grads(loss, ref_loss, (hidden, weight, b), (h64, w64, b64), dtype, scale=scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("nll", ["default", "prompt"])
def test_matches_trl(dtype, bias, nll, seed):
    run_case(dtype, bias=bias, nll=nll, seed=seed)


def test_single_pair_and_scaled_upstream():
    run_case(torch.float32, bias=True, pairs=1, seed=3)
    run_case(torch.float32, bias=False, beta=0.5, scale=3.0, seed=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_path(dtype):
    skip_unless_path("cpu", "triton")
    # small sizes: Triton's interpreter is slow
    run_case(dtype, bias=True, impl="triton", nll="prompt", seed=5, pairs=2, size=(13, 301), chunk_bytes=None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda(dtype):
    skip_unless_path("cuda", "triton")
    run_case(dtype, bias=True, impl=None, device="cuda", nll="prompt", seed=6)


def test_sum_with_another_loss_in_one_graph():
    hidden, weight, b, target = make_rows(2 * B, T, H, V, torch.float32, bias=True, seed=7)
    loss, _ = fused_linear_orpo_loss(hidden, weight, target, b, beta=0.2, impl="torch")
    ce = fused_linear_cross_entropy(hidden, weight, target, b, impl="torch")
    h64, w64, b64 = leaf_copies(hidden, weight, b, device="cpu")
    ref_loss, _ = trl_orpo(h64, w64, b64, target, None, 0.2)
    ref_ce = torch.nn.functional.cross_entropy(logits64(h64, w64, b64).flatten(0, 1), target.flatten())
    check_grads(2 * loss + ce, 2 * ref_loss + ref_ce, (hidden, weight, b), (h64, w64, b64), torch.float32)


@pytest.mark.parametrize("masked_row", [0, B])  # a chosen row, a rejected row
def test_all_masked_row_is_finite_with_zero_gradient(masked_row):
    hidden, weight, b, target = make_rows(2 * B, T, H, V, torch.float32, bias=True, seed=8, masked_rows=(masked_row,))
    loss, out = fused_linear_orpo_loss(hidden, weight, target, b, impl="torch")
    assert torch.isfinite(loss) and all(torch.isfinite(v).all() for v in out.values())
    loss.backward()
    assert torch.all(hidden.grad[masked_row] == 0)
    pair = masked_row % B  # the whole pair drops out of the odds-ratio term
    assert torch.all(hidden.grad[pair + B] == 0) if masked_row < B else torch.isfinite(hidden.grad).all()
    assert torch.isfinite(weight.grad).all() and torch.isfinite(b.grad).all()
    assert hidden.grad[(pair + 1) % B].abs().sum() > 0


def test_everything_masked():
    hidden, weight, b, target = make_rows(2, T, H, V, torch.float32, bias=False, seed=9, masked_rows=(0, 1))
    loss, _ = fused_linear_orpo_loss(hidden, weight, target, impl="torch")
    loss.backward()
    assert torch.isfinite(loss) and torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)


def test_bad_input_names_the_argument():
    hidden, weight, b, target = make_rows(2 * B, T, H, V, torch.float32, bias=True, seed=10)
    with pytest.raises(ValueError, match="odd number of rows"):
        fused_linear_orpo_loss(hidden[:5], weight, target[:5])
    with pytest.raises(ValueError, match="target"):
        fused_linear_orpo_loss(hidden, weight, target[:, :-1])
    with pytest.raises(ValueError, match="lin_weight"):
        fused_linear_orpo_loss(hidden, weight[:, :-1], target)
    with pytest.raises(ValueError, match="nll_target"):
        fused_linear_orpo_loss(hidden, weight, target, nll_target=target[:2])
    with pytest.raises(ValueError, match="temperature"):
        LigerFusedLinearORPOLoss(temperature=0.0)
