"""DPO loss, every TRL 1.16 loss type: value, metrics and gradients against DPOTrainer._compute_loss; bad input."""

from __future__ import annotations

import types

import pytest
import torch
from _helpers import count_products, gradient_path
from _preference_reference import (
    IGNORE,
    FusedHeadModel,
    check_grads,
    close,
    leaf_copies,
    logits64,
    make_rows,
    skip_unless_path,
    token_logps64,
    trainer_stub,
    unshifted_batch,
)
from trl import DPOTrainer

from liger_align.losses import DPO_LOSS_TYPES, LigerFusedLinearDPOLoss, fused_linear_cross_entropy
from liger_align.losses.functional import fused_linear_dpo_loss

#: Every test runs on both gradient paths of the sequence losses (3 and 4 products).
pytestmark = pytest.mark.usefixtures("loss_path")

B, T, H, V = 3, 37, 48, 1003
# loss types with the label_smoothing TRL requires or uses
SMOOTHING = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.1, "aot_unpaired": 0.05}


def trl_dpo(h64, w64, b64, target, *, ref=None, ref_logps=None, config):
    """TRL's ``DPOTrainer._compute_loss`` on float64 logits; ``ref`` float64 leaves or ``ref_logps`` precomputed."""
    input_ids, attention_mask, completion_mask = unshifted_batch(target)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, completion_mask=completion_mask)
    # TRL's alpha-divergence branch has no float64 case: give it fp32 sequence log-probs
    logps_dtype = torch.float32 if config.get("f_divergence_type") == "alpha_divergence" else torch.float64
    model = FusedHeadModel({input_ids.data_ptr(): (h64, w64, b64)}, logps_dtype)
    ref_model = FusedHeadModel({input_ids.data_ptr(): ref}, logps_dtype) if ref is not None else None
    if ref_logps is not None:
        inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = ref_logps
    loss_types = [config["loss_type"]] if isinstance(config["loss_type"], str) else list(config["loss_type"])
    trainer = trainer_stub(
        DPOTrainer, model=model, ref_model=ref_model, precompute_ref_logps=ref_logps is not None, ld_alpha=None,
        use_weighting=False, loss_types=loss_types, loss_weights=config.get("loss_weights") or [1.0] * len(loss_types),
        beta=config.get("beta", 0.1), label_smoothing=config.get("label_smoothing", 0.0),
        f_divergence_type=config.get("f_divergence_type", "reverse_kl"),
        f_alpha_divergence_coef=config.get("f_alpha_divergence_coef", 0.5),
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=config.get("discopop_tau", 0.05)),
    )
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def run_case(dtype, config, *, bias=True, reference="hidden", impl="torch", device="cpu", pairs=B, seed=0,
             scale=1.0, size=(T, V), chunk_bytes=16 * V * 4):
    length, vocab = size
    hidden, weight, b, target = make_rows(2 * pairs, length, H, vocab, dtype, bias=bias, seed=seed, device=device)
    ref_h, ref_w, ref_b, _ = make_rows(2 * pairs, length, H + 5, vocab, dtype, bias=bias, seed=seed + 1, device=device)
    h64, w64, b64 = leaf_copies(hidden, weight, b, device="cpu")
    with torch.no_grad():
        ref64 = leaf_copies(ref_h, ref_w, ref_b, device="cpu")
        ref_sums = token_logps64(logits64(*ref64), target.cpu()).sum(1)
    kwargs = {}
    if reference == "hidden":
        kwargs = dict(ref_hidden=ref_h.detach(), ref_weight=ref_w.detach(),
        ref_bias=None if ref_b is None else ref_b.detach())
        trl_ref = dict(ref=ref64)
    elif reference == "logps":
        kwargs = dict(ref_chosen_logps=ref_sums[:pairs].float().to(device),
        ref_rejected_logps=ref_sums[pairs:].float().to(device))
        trl_ref = dict(ref_logps=(ref_sums[:pairs].float().double(), ref_sums[pairs:].float().double()))
    else:  # reference-free: TRL with zero reference log-probs
        kwargs = {}
        trl_ref = dict(ref_logps=(torch.zeros(pairs, dtype=torch.float64),) * 2)
    loss_fn = LigerFusedLinearDPOLoss(**config, reference_free=reference == "free", impl=impl, chunk_bytes=chunk_bytes)
    with pytest.MonkeyPatch.context() as patch:
        products = count_products(patch)
        loss, out = loss_fn(weight, hidden, target, b, **kwargs)
    if chunk_bytes is not None:
        # the small budget split the forward into several chunks (the 3-product path keeps a pair whole)
        assert len(products) > 1 or (gradient_path(hidden, weight) == "grad_in_forward" and len(products) == 1 == pairs)
    ref_loss, metrics = trl_dpo(h64, w64, b64, target.cpu(), config=config, **trl_ref)

    assert loss.dtype == torch.float32 and loss.shape == () and torch.isfinite(loss)
    assert close(loss, ref_loss, dtype, atol=1e-4)
    for side in ("chosen", "rejected"):
        assert out[f"{side}_logps"].shape == (pairs,) and not out[f"{side}_logps"].requires_grad
        assert close(out[f"{side}_logps"].mean(), metrics[f"logps/{side}"], dtype)
        assert close(out[f"{side}_rewards"].mean(), metrics[f"rewards/{side}"], dtype, atol=2e-2)
        assert close(out[f"{side}_logits_mean"], metrics[f"logits/{side}"], dtype, atol=2e-3)
    with torch.no_grad():
        sums = token_logps64(logits64(h64, w64, b64), target.cpu()).sum(1)
        assert close(out["chosen_logps"], sums[:pairs], dtype) and close(out["rejected_logps"], sums[pairs:], dtype)
        if reference != "free":
            assert close(out["ref_chosen_logps"], ref_sums[:pairs], dtype)
    check_grads(loss, ref_loss, (hidden, weight, b), (h64, w64, b64), dtype, scale=scale)
    return loss, out


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_every_loss_type_matches_trl(loss_type, seed):
    config = dict(loss_type=loss_type, label_smoothing=SMOOTHING.get(loss_type, 0.0))
    run_case(torch.float32, config, bias=seed % 2 == 0, seed=seed)  # with or without bias, by the test id


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "apo_zero", "sigmoid_norm"])
def test_bf16(loss_type):
    run_case(torch.bfloat16, dict(loss_type=loss_type), seed=11)


@pytest.mark.parametrize(
    "config",
    [
        dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),  # RPO
        dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),  # MPO
        dict(loss_type="sigmoid", f_divergence_type="forward_kl", beta=0.05),
        dict(loss_type="hinge", f_divergence_type="js_divergence"),
        dict(loss_type="ipo", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
        dict(loss_type="discopop", discopop_tau=0.2, beta=0.02),
    ],
    ids=["rpo", "mpo", "forward_kl", "js", "alpha_div", "discopop_tau"],
)
def test_combinations_and_options(config):
    run_case(torch.float32, config, seed=21)


@pytest.mark.parametrize("reference", ["logps", "free"])
def test_reference_sources(reference):
    run_case(torch.float32, dict(loss_type="sigmoid"), reference=reference, bias=False, seed=31)


def test_sft_needs_no_reference():
    hidden, weight, b, target = make_rows(2 * B, T, H, V, torch.float32, bias=True, seed=32)
    loss, _ = fused_linear_dpo_loss(hidden, weight, target, b, loss_type="sft", impl="torch")
    h64, w64, b64 = leaf_copies(hidden, weight, b, device="cpu")
    ref = -token_logps64(logits64(h64, w64, b64)[:B], target[:B]).sum() / (target[:B] != IGNORE).sum()
    assert close(loss, ref, torch.float32)


def test_single_pair_and_scaled_upstream():
    run_case(torch.float32, dict(loss_type="sigmoid"), pairs=1, seed=41)
    run_case(torch.float32, dict(loss_type="ipo", beta=0.3), scale=3.0, seed=42)


def test_sum_with_another_loss_in_one_graph():
    hidden, weight, b, target = make_rows(2 * B, T, H, V, torch.float32, bias=True, seed=43)
    h64, w64, b64 = leaf_copies(hidden, weight, b, device="cpu")
    loss, _ = fused_linear_dpo_loss(hidden, weight, target, b, loss_type="bco_pair", reference_free=True, impl="torch")
    ce = fused_linear_cross_entropy(hidden, weight, target, b, impl="torch")
    ref_loss, _ = trl_dpo(h64, w64, b64, target, ref_logps=(torch.zeros(B, dtype=torch.float64),) * 2,
                          config=dict(loss_type="bco_pair"))
    ref_ce = torch.nn.functional.cross_entropy(logits64(h64, w64, b64).flatten(0, 1), target.flatten())
    check_grads(loss - 0.5 * ce, ref_loss - 0.5 * ref_ce, (hidden, weight, b), (h64, w64, b64), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_path(dtype):
    skip_unless_path("cpu", "triton")
    run_case(dtype, dict(loss_type="sigmoid"), impl="triton", pairs=2, size=(13, 301), chunk_bytes=None, seed=51)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda(dtype):
    skip_unless_path("cuda", "triton")
    run_case(dtype, dict(loss_type=["sigmoid", "sft"]), impl=None, device="cuda", seed=52)


def test_all_masked_row_is_finite_with_zero_gradient():
    hidden, weight, b, target = make_rows(2 * B, T, H, V, torch.float32, bias=True, seed=61, masked_rows=(1, B + 2))
    for loss_type in DPO_LOSS_TYPES:
        hidden.grad = None
        loss, out = fused_linear_dpo_loss(
            hidden, weight, target, b, loss_type=loss_type, label_smoothing=SMOOTHING.get(loss_type, 0.0),
            reference_free=True, impl="torch",
        )
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(v).all() for v in out.values()), loss_type
        assert torch.all(hidden.grad[1] == 0) and torch.all(hidden.grad[B + 2] == 0), loss_type
        assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all(), loss_type


def test_bad_input_names_the_argument():
    hidden, weight, b, target = make_rows(2 * B, T, H, V, torch.float32, bias=True, seed=71)
    ref = dict(reference_free=True)
    with pytest.raises(ValueError, match="odd number of rows"):
        fused_linear_dpo_loss(hidden[:5], weight, target[:5], **ref)
    with pytest.raises(ValueError, match="target"):
        fused_linear_dpo_loss(hidden, weight, target[:4], **ref)
    with pytest.raises(ValueError, match="ref_hidden"):
        fused_linear_dpo_loss(hidden, weight, target, ref_hidden=hidden[:, :-1])
    with pytest.raises(ValueError, match="ref_weight"):
        fused_linear_dpo_loss(hidden, weight, target, ref_hidden=hidden, ref_weight=weight[:, :-2])
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        fused_linear_dpo_loss(hidden, weight, target, ref_chosen_logps=torch.zeros(B + 1),
        ref_rejected_logps=torch.zeros(B))
    with pytest.raises(ValueError, match="together"):
        fused_linear_dpo_loss(hidden, weight, target, ref_chosen_logps=torch.zeros(B))
    with pytest.raises(ValueError, match="loss_type.*'sigmoid'"):
        LigerFusedLinearDPOLoss(loss_type="sigmoidd")
    with pytest.raises(ValueError, match="needs a reference.*ref_hidden"):
        fused_linear_dpo_loss(hidden, weight, target, loss_type="ipo")
    with pytest.raises(ValueError, match="loss_weights"):
        LigerFusedLinearDPOLoss(loss_type=["sigmoid", "sft"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="label_smoothing"):
        LigerFusedLinearDPOLoss(loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="f_divergence_type"):
        LigerFusedLinearDPOLoss(loss_type="nca_pair", f_divergence_type="forward_kl")
