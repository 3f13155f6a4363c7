"""KTO: value, metrics and gradients against TRL 1.16's KTOTrainer._compute_loss for any batch composition."""

from __future__ import annotations

import types

import pytest
import torch
from _helpers import count_products, gradient_path
from _preference_reference import (
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
from trl import KTOTrainer

from liger_align.losses import LigerFusedLinearKTOLoss, fused_linear_cross_entropy
from liger_align.losses.functional import fused_linear_kto_loss

#: Every test runs on both gradient paths of the sequence losses (3 and 4 products).
pytestmark = pytest.mark.usefixtures("loss_path")

R, T, H, V = 5, 37, 48, 1003
COMPOSITIONS = {
    "mixed": [True, False, True, True, False],
    "all_desirable": [True] * R,
    "all_undesirable": [False] * R,
    "one_row": [False],
}


def trl_kto(policy, kl_policy, target, kl_target, labels, *, ref=None, kl_ref=None, ref_logps=None, config):
    """TRL's ``KTOTrainer._compute_loss`` on float64 logits; the reference as leaves or precomputed log-probs."""
    input_ids, attention_mask, completion_mask = unshifted_batch(target)
    kl_ids, kl_attention, kl_completion = unshifted_batch(kl_target)
    batch = dict(
        input_ids=input_ids, attention_mask=attention_mask, completion_mask=completion_mask,
        KL_input_ids=kl_ids, KL_attention_mask=kl_attention, KL_completion_mask=kl_completion,
        label=torch.tensor(labels),
    )
    model = FusedHeadModel({input_ids.data_ptr(): policy, kl_ids.data_ptr(): kl_policy})
    ref_model = None
    if ref_logps is not None:
        batch["ref_logps"], batch["ref_KL_logps"] = ref_logps
    else:
        ref_model = FusedHeadModel({input_ids.data_ptr(): ref, kl_ids.data_ptr(): kl_ref})
    trainer = trainer_stub(
        KTOTrainer, model=model, ref_model=ref_model, precompute_ref_logps=ref_logps is not None,
        calculate_KL=config.get("loss_type", "kto") == "kto", loss_type=config.get("loss_type", "kto"),
        beta=config.get("beta", 0.1), desirable_weight=config.get("desirable_weight", 1.0),
        undesirable_weight=config.get("undesirable_weight", 1.0),
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
    )
    loss = KTOTrainer._compute_loss(trainer, model, batch, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def run_case(dtype, config, labels, *, bias=True, reference="hidden", impl="torch", device="cpu", seed=0,
             scale=1.0, size=(T, V), chunk_bytes=16 * V * 4):
    length, vocab = size
    rows = len(labels)
    hidden, weight, b, target = make_rows(rows, length, H, vocab, dtype, bias=bias, seed=seed, device=device)
    kl_hidden, _, _, kl_target = make_rows(rows, length, H, vocab, dtype, bias=False, seed=seed + 1, device=device)
    ref_h, ref_w, ref_b, _ = make_rows(rows, length, H + 3, vocab, dtype, bias=bias, seed=seed + 2, device=device)
    ref_kl_h, _, _, _ = make_rows(rows, length, H + 3, vocab, dtype, bias=False, seed=seed + 3, device=device)
    h64, w64, b64 = leaf_copies(hidden, weight, b, device="cpu")
    with torch.no_grad():
        kl64, ref_kl64 = leaf_copies(kl_hidden, ref_kl_h, device="cpu")
        ref64 = leaf_copies(ref_h, ref_w, ref_b, device="cpu")
        kl_logps = token_logps64(logits64(kl64, w64, b64), kl_target.cpu()).sum(1)
    label_tensor = torch.tensor(labels, device=device)
    loss_fn = LigerFusedLinearKTOLoss(**config, impl=impl, chunk_bytes=chunk_bytes)
    kwargs = dict(kl_hidden=kl_hidden.detach(), kl_target=kl_target)
    if reference == "hidden":
        kwargs.update(ref_hidden=ref_h.detach(), ref_weight=ref_w.detach(),
        ref_bias=None if ref_b is None else ref_b.detach(),
                      ref_kl_hidden=ref_kl_h.detach())
        trl_ref = dict(ref=ref64, kl_ref=(ref_kl64, *ref64[1:]))
    else:  # precomputed, with the reference less likely than the policy on the KL rows (KL > 0)
        with torch.no_grad():
            ref_logps = token_logps64(logits64(*ref64), target.cpu()).sum(1).float()
        ref_kl_logps = (kl_logps - 2.5).float()
        kwargs.update(ref_logps=ref_logps.to(device), ref_kl_logps=ref_kl_logps.to(device))
        trl_ref = dict(ref_logps=(ref_logps.double(), ref_kl_logps.double()))
    with pytest.MonkeyPatch.context() as patch:
        products = count_products(patch)
        loss, out = loss_fn(weight, hidden, target, b, preference_labels=label_tensor, **kwargs)
    if chunk_bytes is not None:
        # the small budget split the forward into several chunks (the 3-product path keeps a row whole)
        assert len(products) > 1 or (gradient_path(hidden, weight) == "grad_in_forward" and len(products) == 1 == rows)
    ref_loss, metrics = trl_kto(
        (h64, w64, b64), (kl64, w64, b64), target.cpu(), kl_target.cpu(), labels, config=config, **trl_ref
    )

    assert loss.dtype == torch.float32 and loss.shape == () and torch.isfinite(loss)
    assert close(loss, ref_loss, dtype, atol=1e-4)
    assert close(out["kl"], metrics["kl"], dtype, atol=0.05 if dtype == torch.bfloat16 else 1e-4)
    n_desirable = sum(labels)
    assert out["chosen_logps"].shape == (n_desirable,) and out["rejected_logps"].shape == (rows - n_desirable,)
    for side, count in (("chosen", n_desirable), ("rejected", rows - n_desirable)):
        if count:
            assert close(out[f"{side}_logps"].mean(), metrics[f"logps/{side}"], dtype)
            assert close(out[f"{side}_rewards"].mean(), metrics[f"rewards/{side}"], dtype, atol=2e-2)
            assert close(out[f"{side}_logits_mean"], metrics[f"logits/{side}"], dtype, atol=2e-3)
        else:
            assert f"logps/{side}" not in metrics and out[f"{side}_logits_mean"] == 0
    check_grads(loss, ref_loss, (hidden, weight, b), (h64, w64, b64), dtype, scale=scale)
    return out


@pytest.mark.parametrize("composition", list(COMPOSITIONS))
@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_every_composition_matches_trl(composition, loss_type):
    run_case(torch.float32, dict(loss_type=loss_type), COMPOSITIONS[composition], reference="logps",
             seed=len(composition) + len(loss_type))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_reference_hidden_states(dtype, bias):
    config = dict(beta=0.2, desirable_weight=1.33, undesirable_weight=0.7)
    run_case(dtype, config, COMPOSITIONS["mixed"], bias=bias, seed=7 + bias)


def test_precomputed_kl_equals_estimated_kl():
    hidden, weight, b, target = make_rows(R, T, H, V, torch.float32, bias=True, seed=9)
    labels = torch.tensor(COMPOSITIONS["mixed"])
    ref_logps = torch.randn(R) * 5 - 150
    kl_hidden, _, _, kl_target = make_rows(R, T, H, V, torch.float32, bias=False, seed=10)
    ref_kl_logps = torch.randn(R) - 300
    _, estimated = fused_linear_kto_loss(hidden, weight, target, b, preference_labels=labels, ref_logps=ref_logps,
                                         kl_hidden=kl_hidden, kl_target=kl_target, ref_kl_logps=ref_kl_logps,
                                         impl="torch")
    assert estimated["kl"] > 0
    loss, out = fused_linear_kto_loss(hidden, weight, target, b, preference_labels=labels, ref_logps=ref_logps,
                                      kl=estimated["kl"], impl="torch")
    loss_est, _ = fused_linear_kto_loss(hidden, weight, target, b, preference_labels=labels, ref_logps=ref_logps,
                                        kl_hidden=kl_hidden, kl_target=kl_target, ref_kl_logps=ref_kl_logps,
                                        impl="torch")
    assert torch.equal(out["kl"], estimated["kl"]) and torch.allclose(loss, loss_est)


def test_scaled_upstream_and_sum_with_another_loss():
    run_case(torch.float32, dict(), COMPOSITIONS["mixed"], reference="logps", scale=3.0, seed=11)
    hidden, weight, b, target = make_rows(R, T, H, V, torch.float32, bias=True, seed=12)
    labels = COMPOSITIONS["mixed"]
    h64, w64, b64 = leaf_copies(hidden, weight, b, device="cpu")
    loss, _ = fused_linear_kto_loss(hidden, weight, target, b, preference_labels=torch.tensor(labels),
                                    reference_free=True, loss_type="apo_zero_unpaired", impl="torch")
    ce = fused_linear_cross_entropy(hidden, weight, target, b, impl="torch")
    ref_loss, _ = trl_kto((h64, w64, b64), None, target, target, labels, config=dict(loss_type="apo_zero_unpaired"),
                          ref_logps=(torch.zeros(R, dtype=torch.float64), None))
    ref_ce = torch.nn.functional.cross_entropy(logits64(h64, w64, b64).flatten(0, 1), target.flatten())
    check_grads(loss + 2 * ce, ref_loss + 2 * ref_ce, (hidden, weight, b), (h64, w64, b64), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_path(dtype):
    skip_unless_path("cpu", "triton")
    run_case(dtype, dict(), [True, False, False], impl="triton", size=(13, 301), chunk_bytes=None, seed=13)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda(dtype):
    skip_unless_path("cuda", "triton")
    run_case(dtype, dict(), COMPOSITIONS["mixed"], impl=None, device="cuda", seed=14)


def test_all_masked_row_is_finite_with_zero_gradient():
    hidden, weight, b, target = make_rows(R, T, H, V, torch.float32, bias=True, seed=15, masked_rows=(1, 2))
    loss, out = fused_linear_kto_loss(hidden, weight, target, b, preference_labels=torch.tensor(COMPOSITIONS["mixed"]),
                                      ref_logps=torch.zeros(R), impl="torch")
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v).all() for v in out.values())
    assert torch.all(hidden.grad[1] == 0) and torch.all(hidden.grad[2] == 0)
    assert torch.isfinite(weight.grad).all() and hidden.grad[0].abs().sum() > 0


def test_bad_input_names_the_argument():
    hidden, weight, b, target = make_rows(R, T, H, V, torch.float32, bias=True, seed=16)
    labels = torch.tensor(COMPOSITIONS["mixed"])
    free = dict(reference_free=True)
    with pytest.raises(ValueError, match="preference_labels"):
        fused_linear_kto_loss(hidden, weight, target, preference_labels=labels[:-1], **free)
    with pytest.raises(ValueError, match="target"):
        fused_linear_kto_loss(hidden, weight, target[:-1], preference_labels=labels, **free)
    with pytest.raises(ValueError, match="ref_hidden"):
        fused_linear_kto_loss(hidden, weight, target, preference_labels=labels, ref_hidden=hidden[:-1])
    with pytest.raises(ValueError, match="ref_logps"):
        fused_linear_kto_loss(hidden, weight, target, preference_labels=labels, ref_logps=torch.zeros(R + 1))
    with pytest.raises(ValueError, match="needs a reference.*ref_hidden"):
        fused_linear_kto_loss(hidden, weight, target, preference_labels=labels)
    with pytest.raises(ValueError, match="ref_kl_hidden"):
        fused_linear_kto_loss(hidden, weight, target, preference_labels=labels, ref_logps=torch.zeros(R),
                              kl_hidden=hidden, kl_target=target)
    with pytest.raises(ValueError, match=r"loss_type must be one of \['kto', 'apo_zero_unpaired'\]"):
        LigerFusedLinearKTOLoss(loss_type="bco")
