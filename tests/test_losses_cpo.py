"""CPO / SimPO / AlphaPO: value, metrics and gradients against TRL 1.16's CPOTrainer on float64 logits."""

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
from trl.experimental.cpo import CPOTrainer  # noqa: E402

from liger_align.losses import (  # noqa: E402
    LigerFusedLinearCPOLoss,
    LigerFusedLinearSimPOLoss,
    fused_linear_cross_entropy,
)
from liger_align.losses.functional import fused_linear_cpo_loss, fused_linear_simpo_loss  # noqa: E402

#: Every test runs on both gradient paths of the sequence losses (3 and 4 products).
pytestmark = pytest.mark.usefixtures("loss_path")

B, T, H, V = 3, 37, 48, 1003


def trl_cpo(h64, w64, b64, target, config):
    """TRL's ``CPOTrainer.get_batch_loss_metrics`` (concatenated forward + ``cpo_loss``) on float64 logits."""
    half = target.shape[0] // 2
    batch = {}
    for name, labels in (("chosen", target[:half]), ("rejected", target[half:])):
        batch[f"{name}_input_ids"] = pad_left(labels.clamp(min=0), 0)
        batch[f"{name}_attention_mask"] = torch.ones_like(batch[f"{name}_input_ids"])
        batch[f"{name}_labels"] = pad_left(labels, IGNORE)
    loss_type, cpo_alpha = config.get("loss_type", "sigmoid"), config.get("cpo_alpha", 1.0)
    if loss_type == "alphapo":  # CPOConfig's post-init
        loss_type, cpo_alpha = "simpo", 0.0
    trainer = trainer_stub(
        CPOTrainer, pad_token_id=0, beta=config.get("beta", 0.1), loss_type=loss_type, cpo_alpha=cpo_alpha,
        label_smoothing=config.get("label_smoothing", 0.0), simpo_gamma=config.get("simpo_gamma", 0.5),
        alpha=config.get("alpha", 0.0),
    )
    return CPOTrainer.get_batch_loss_metrics(trainer, LogitsModel(h64, w64, b64), batch)


def run_case(dtype, config, *, bias=True, impl="torch", device="cpu", pairs=B, seed=0, scale=1.0, size=(T, V),
             chunk_bytes=16 * V * 4, simpo_module=False):
    length, vocab = size
    hidden, weight, b, target = make_rows(2 * pairs, length, H, vocab, dtype, bias=bias, seed=seed, device=device)
    if simpo_module:
        loss_fn = LigerFusedLinearSimPOLoss(
            beta=config["beta"], gamma=config["simpo_gamma"], impl=impl, chunk_bytes=chunk_bytes
        )
        config = dict(config, loss_type="simpo", cpo_alpha=0.0)
    else:
        loss_fn = LigerFusedLinearCPOLoss(**config, impl=impl, chunk_bytes=chunk_bytes)
    with pytest.MonkeyPatch.context() as patch:
        products = count_products(patch)
        loss, out = loss_fn(weight, hidden, target, b)
    if chunk_bytes is not None:
        # the small budget split the forward into several chunks (the 3-product path keeps a pair whole)
        assert len(products) > 1 or (gradient_path(hidden, weight) == "grad_in_forward" and len(products) == 1 == pairs)
    h64, w64, b64 = leaf_copies(hidden, weight, b, device="cpu")
    ref_loss, metrics = trl_cpo(h64, w64, b64, target.cpu(), config)

    assert loss.dtype == torch.float32 and loss.shape == () and torch.isfinite(loss)
    assert close(loss, ref_loss, dtype, atol=1e-4)
    assert close(out["nll_loss"], metrics["nll_loss"], dtype, atol=1e-6)
    for side in ("chosen", "rejected"):
        assert out[f"{side}_logps"].shape == (pairs,) and not out[f"{side}_logps"].requires_grad
        assert close(out[f"{side}_logps"].mean(), metrics[f"logps/{side}"], dtype)
        assert close(out[f"{side}_rewards"].mean(), metrics[f"rewards/{side}"], dtype, atol=1e-3)
    target = target.cpu()
    with torch.no_grad():
        logits = logits64(h64, w64, b64)
        sums = token_logps64(logits, target).sum(1)
        if config.get("loss_type", "sigmoid") in ("ipo", "simpo", "alphapo"):
            sums = sums / (target != IGNORE).sum(1)
        assert close(out["chosen_logps"], sums[:pairs], dtype) and close(out["rejected_logps"], sums[pairs:], dtype)
        assert close(out["chosen_logits_mean"], masked_logits_mean(logits[:pairs], target[:pairs]), dtype, atol=2e-3)
        assert close(out["rejected_logits_mean"], masked_logits_mean(logits[pairs:], target[pairs:]), dtype, atol=2e-3)
    check_grads(loss, ref_loss, (hidden, weight, b), (h64, w64, b64), dtype, scale=scale)


CONFIGS = {
    "sigmoid": dict(loss_type="sigmoid"),
    "sigmoid_smoothed": dict(loss_type="sigmoid", label_smoothing=0.1, cpo_alpha=0.5, beta=0.05),
    "hinge": dict(loss_type="hinge", beta=0.01),
    "ipo": dict(loss_type="ipo", beta=0.5),
    "simpo": dict(loss_type="simpo", beta=2.0, simpo_gamma=0.7, cpo_alpha=0.3),
    "alphapo": dict(loss_type="alphapo", beta=2.0, alpha=0.25),
    "sigmoid_alpha": dict(loss_type="sigmoid", alpha=-0.1, beta=1.0),
}


@pytest.mark.parametrize(
    "name,dtype", [(n, torch.float32) for n in CONFIGS] + [(n, torch.bfloat16) for n in ("sigmoid", "ipo", "simpo")]
)
def test_matches_trl(name, dtype):
    run_case(dtype, CONFIGS[name], bias=len(name) % 2 == 0, seed=len(name))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_simpo_module_is_cpo_simpo_without_nll(dtype):
    run_case(dtype, dict(beta=2.0, simpo_gamma=0.5), simpo_module=True, seed=12)


def test_single_pair_and_scaled_upstream():
    run_case(torch.float32, CONFIGS["sigmoid"], pairs=1, seed=13)
    run_case(torch.float32, CONFIGS["simpo"], scale=3.0, seed=14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_path(dtype):
    skip_unless_path("cpu", "triton")
    run_case(dtype, CONFIGS["simpo"], impl="triton", pairs=2, size=(13, 301), chunk_bytes=None, seed=15)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda(dtype):
    skip_unless_path("cuda", "triton")
    run_case(dtype, CONFIGS["sigmoid"], impl=None, device="cuda", seed=16)
    run_case(dtype, CONFIGS["simpo"], impl=None, device="cuda", seed=17, simpo_module=False)


def test_sum_with_another_loss_in_one_graph():
    hidden, weight, b, target = make_rows(2 * B, T, H, V, torch.float32, bias=True, seed=18)
    h64, w64, b64 = leaf_copies(hidden, weight, b, device="cpu")
    loss, _ = fused_linear_simpo_loss(hidden, weight, target, b, impl="torch")
    ce = fused_linear_cross_entropy(hidden, weight, target, b, impl="torch")
    ref_loss, _ = trl_cpo(h64, w64, b64, target, dict(loss_type="simpo", beta=2.0, cpo_alpha=0.0))
    ref_ce = torch.nn.functional.cross_entropy(logits64(h64, w64, b64).flatten(0, 1), target.flatten())
    check_grads(loss + ce, ref_loss + ref_ce, (hidden, weight, b), (h64, w64, b64), torch.float32)


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "simpo", "alphapo"])
def test_all_masked_row_is_finite_with_zero_gradient(name):
    hidden, weight, b, target = make_rows(2 * B, T, H, V, torch.float32, bias=True, seed=19, masked_rows=(0, B + 1))
    loss, out = fused_linear_cpo_loss(hidden, weight, target, b, **CONFIGS[name], impl="torch")
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v).all() for v in out.values())
    assert torch.all(hidden.grad[0] == 0) and torch.all(hidden.grad[B + 1] == 0)
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all() and torch.isfinite(b.grad).all()


def test_bad_input_names_the_argument():
    hidden, weight, b, target = make_rows(2 * B, T, H, V, torch.float32, bias=True, seed=20)
    with pytest.raises(ValueError, match="odd number of rows"):
        fused_linear_cpo_loss(hidden[:3], weight, target[:3])
    with pytest.raises(ValueError, match="target"):
        fused_linear_simpo_loss(hidden, weight, target[:, 1:])
    with pytest.raises(ValueError, match="bias"):
        fused_linear_cpo_loss(hidden, weight, target, b[:-1])
    with pytest.raises(ValueError, match=r"loss_type must be one of \['sigmoid', 'hinge', 'ipo', 'simpo', 'alphapo'\]"):
        LigerFusedLinearCPOLoss(loss_type="dpo")
