"""Reliability of the kernels and losses (issue 12): every bad value named, reference inputs named,
num_items_in_batch checked, impl='triton' explained, ORPO's log-odds finite at p -> 1 and V = 1, and no
gradient work under torch.no_grad()."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _helpers import leaf_copies
from _reference import rel_err

from liger_align.kernels import _dispatch, fused_linear_cross_entropy, linear_logprobs, rms_norm
from liger_align.kernels.head._linear_chunks import valid_token_index
from liger_align.losses import (
    LigerFusedLinearCPOLoss,
    LigerFusedLinearDPOLoss,
    LigerFusedLinearKTOLoss,
    LigerFusedLinearORPOLoss,
    LigerFusedLinearSimPOLoss,
    dpo_objective,
    kto_objective,
    orpo_objective,
)
from liger_align.losses.functional import (
    fused_linear_cpo_loss,
    fused_linear_dpo_loss,
    fused_linear_kto_loss,
    fused_linear_orpo_loss,
    fused_linear_simpo_loss,
)
from liger_align.losses.orpo import LOG1MEXP_MAX, log1mexp

B, T, H, V = 2, 13, 24, 301


def rows(seed: int = 0, *, rows: int = 2 * B, vocab: int = V, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(rows, T, H, generator=gen) * scale).requires_grad_()
    weight = (torch.randn(vocab, H, generator=gen) / H**0.5).requires_grad_()
    target = torch.randint(0, vocab, (rows, T), generator=gen)
    target[:, :4] = -100
    return hidden, weight, target


# ----------------------------------------------------------------------------------------- hyper-parameters

BAD_SETTINGS = [
    ("dpo beta<0", lambda: LigerFusedLinearDPOLoss(beta=-0.1), r"beta must be a finite number > 0.*got -0.1"),
    ("dpo beta nan", lambda: LigerFusedLinearDPOLoss(beta=float("nan")), r"beta must be a finite number > 0"),
    ("ipo beta=0", lambda: LigerFusedLinearDPOLoss(beta=0.0, loss_type="ipo"), r"beta must be .*> 0.*'ipo'"),
    ("dpo nan weight", lambda: LigerFusedLinearDPOLoss(loss_type=["sigmoid", "sft"], loss_weights=[1.0, math.nan]),
     r"loss_weights\[1\] must be a finite number >= 0, got nan"),
    ("dpo smoothing", lambda: LigerFusedLinearDPOLoss(label_smoothing=1.5),
     r"label_smoothing must be a finite number in \[0, 1\], got 1.5"),
    ("dpo loss_type None", lambda: LigerFusedLinearDPOLoss(loss_type=None), r"loss_type must be one of .*None"),
    ("dpo tau", lambda: LigerFusedLinearDPOLoss(loss_type="discopop", discopop_tau=0.0), "discopop_tau"),
    ("cpo beta<0", lambda: LigerFusedLinearCPOLoss(beta=-1.0), r"beta must be a finite number > 0"),
    ("cpo ipo beta=0", lambda: LigerFusedLinearCPOLoss(beta=0.0, loss_type="ipo"), r"beta .*> 0.*'ipo'"),
    ("cpo smoothing", lambda: LigerFusedLinearCPOLoss(label_smoothing=-0.1), r"label_smoothing .*\[0, 1\]"),
    ("cpo loss_type None", lambda: LigerFusedLinearCPOLoss(loss_type=None), r"loss_type must be one of .*None"),
    ("cpo nan gamma", lambda: LigerFusedLinearCPOLoss(simpo_gamma=math.nan), "simpo_gamma"),
    ("simpo beta=0", lambda: LigerFusedLinearSimPOLoss(beta=0.0),
     r"beta must be a finite number > 0 for loss_type 'simpo', got 0.0"),
    ("simpo smoothing", lambda: LigerFusedLinearSimPOLoss(label_smoothing=2.0), "label_smoothing"),
    ("kto beta<0", lambda: LigerFusedLinearKTOLoss(beta=-0.5), r"beta must be a finite number > 0"),
    ("kto weight nan", lambda: LigerFusedLinearKTOLoss(desirable_weight=math.nan), "desirable_weight"),
    ("kto loss_type None", lambda: LigerFusedLinearKTOLoss(loss_type=None), r"loss_type must be one of .*None"),
    ("orpo beta<0", lambda: LigerFusedLinearORPOLoss(beta=-0.1), r"beta must be a finite number >= 0, got -0.1"),
    ("temperature", lambda: LigerFusedLinearORPOLoss(temperature=0.0), r"temperature must be a finite number > 0"),
    ("ignore_index", lambda: LigerFusedLinearORPOLoss(ignore_index=2**64),
     r"ignore_index .*int64.*18446744073709551616"),
    ("chunk_bytes", lambda: LigerFusedLinearORPOLoss(chunk_bytes=0), r"chunk_bytes must be an integer in \[1, inf\]"),
    ("impl", lambda: LigerFusedLinearORPOLoss(impl="cuda"), r"impl must be one of \[None, 'triton', 'torch'\]"),
]


@pytest.mark.parametrize("case,build,message", BAD_SETTINGS, ids=[c[0] for c in BAD_SETTINGS])
def test_bad_setting_is_a_value_error_naming_it(case, build, message) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_functional_losses_and_objectives_check_the_same_settings() -> None:
    hidden, weight, target = rows(1)
    c, r = torch.randn(B), torch.randn(B)
    with pytest.raises(ValueError, match="beta"):
        fused_linear_dpo_loss(hidden, weight, target, beta=0.0, loss_type="ipo", reference_free=True)
    with pytest.raises(ValueError, match="beta"):
        dpo_objective(c, r, c, r, beta=-1.0)
    with pytest.raises(ValueError, match="beta"):
        fused_linear_simpo_loss(hidden, weight, target, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        fused_linear_cpo_loss(hidden, weight, target, label_smoothing=1.01)
    with pytest.raises(ValueError, match="beta"):
        fused_linear_orpo_loss(hidden, weight, target, beta=math.nan)
    with pytest.raises(ValueError, match="beta"):
        orpo_objective(c, r, torch.tensor(1.0), beta=-0.1)
    labels = torch.tensor([True, False, True, False])
    with pytest.raises(ValueError, match="beta"):
        fused_linear_kto_loss(hidden, weight, target, preference_labels=labels, beta=0.0, reference_free=True)
    with pytest.raises(ValueError, match=r"kl must be a scalar .*got a tensor of shape \(4,\)"):
        fused_linear_kto_loss(hidden, weight, target, preference_labels=labels, kl=torch.ones(4), reference_free=True)
    with pytest.raises(ValueError, match=r"kl must be a scalar"):
        kto_objective(c, r, labels[:B], kl=torch.ones(B))
    with pytest.raises(ValueError, match="kl must be a finite number"):
        kto_objective(c, r, labels[:B], kl=math.nan)


def test_numpy_and_0d_tensor_settings_are_accepted_and_equal_to_floats() -> None:
    hidden, weight, target = rows(2)
    want, _ = fused_linear_dpo_loss(hidden, weight, target, beta=0.25, temperature=0.5, reference_free=True)
    for beta, temperature in ((np.float32(0.25), np.float32(0.5)), (torch.tensor(0.25), torch.tensor(0.5)),
                              (np.float64(0.25), 0.5)):
        got, _ = fused_linear_dpo_loss(hidden, weight, target, beta=beta, temperature=temperature,
                                       reference_free=True)
        assert torch.allclose(got, want, rtol=1e-6), (beta, temperature)
    loss_fn = LigerFusedLinearORPOLoss(beta=np.float32(0.5), ignore_index=np.int64(-100), temperature=np.float32(2.0))
    assert loss_fn.config["beta"] == 0.5 and type(loss_fn.logit_kwargs["temperature"]) is float
    with pytest.raises(TypeError, match="temperature must be a real number, got the boolean True"):
        LigerFusedLinearORPOLoss(temperature=True)


# ----------------------------------------------------------------------------------------- reference inputs


def test_bad_reference_inputs_name_the_reference_argument() -> None:
    hidden, weight, target = rows(3)
    ref_hidden = hidden.detach().clone()
    loss_fn = LigerFusedLinearDPOLoss()
    with pytest.raises(TypeError, match="ref_hidden must be a floating-point tensor"):
        loss_fn(weight, hidden, target, ref_hidden=ref_hidden.long())
    with pytest.raises(TypeError, match="ref_weight must be a floating-point tensor"):
        loss_fn(weight, hidden, target, ref_hidden=ref_hidden, ref_weight=weight.detach().long())
    with pytest.raises(ValueError, match=rf"ref_weight must have the policy's vocabulary.*V={V}.*\({V + 7}, {H}\)"):
        loss_fn(weight, hidden, target, ref_hidden=ref_hidden, ref_weight=torch.randn(V + 7, H))
    with pytest.raises(ValueError, match=rf"ref_weight must have shape \(V, H\) with H={H - 1} like ref_hidden"):
        loss_fn(weight, hidden, target, ref_hidden=ref_hidden[..., :-1], ref_weight=weight.detach())
    with pytest.raises(ValueError, match=rf"ref_bias must have shape \(V,\) = \({V},\)"):
        loss_fn(weight, hidden, target, ref_hidden=ref_hidden, ref_weight=weight.detach(), ref_bias=torch.zeros(3))
    with pytest.raises(ValueError, match="ref_bias was given without ref_weight"):
        loss_fn(weight, hidden, target, ref_hidden=ref_hidden, ref_bias=torch.zeros(V))
    with pytest.raises(TypeError, match="lin_weight must be a floating-point tensor"):
        loss_fn(weight.detach().long(), hidden, target, ref_hidden=ref_hidden)  # the shared head is the policy's
    labels = torch.tensor([True, False, True, False])
    with pytest.raises(TypeError, match="ref_kl_hidden must be a floating-point tensor"):
        fused_linear_kto_loss(hidden, weight, target, preference_labels=labels, ref_hidden=ref_hidden,
                              kl_hidden=hidden.detach(), kl_target=target, ref_kl_hidden=ref_hidden.long())
    with pytest.raises(ValueError, match="kl_target must have shape"):
        fused_linear_kto_loss(hidden, weight, target, preference_labels=labels, ref_hidden=ref_hidden,
                              kl_hidden=hidden.detach(), kl_target=target[:, :-1], ref_kl_hidden=ref_hidden)


# ----------------------------------------------------------------------------------------- num_items_in_batch


@pytest.mark.parametrize("strategy", ["grad_in_forward", "recompute"])
@pytest.mark.parametrize("bad", [0, -3, 0.0, math.nan, torch.tensor(0), torch.tensor(-2.0), np.int64(0)],
                         ids=["0", "-3", "0.0", "nan", "t0", "t-2", "np0"])
def test_non_positive_num_items_in_batch_is_refused(bad, strategy) -> None:
    hidden, weight, target = rows(4)
    with pytest.raises(ValueError, match="num_items_in_batch must be a finite number > 0"):
        fused_linear_cross_entropy(hidden.reshape(-1, H), weight, target.reshape(-1), num_items_in_batch=bad,
                                   strategy=strategy)


def test_num_items_in_batch_tensor_int_and_numpy_agree_and_the_deferred_check_runs_in_the_one_read() -> None:
    hidden, weight, target = rows(5)
    h, t = hidden.reshape(-1, H), target.reshape(-1)
    values = [fused_linear_cross_entropy(h, weight, t, num_items_in_batch=n) for n in (40, torch.tensor(40),
                                                                                          np.int32(40))]
    assert all(torch.equal(v, values[0]) for v in values)
    h64, w64 = leaf_copies(h, weight)
    want = torch.nn.functional.cross_entropy(h64 @ w64.t(), t, reduction="sum") / 40
    assert rel_err(values[0], want) < 1e-5
    # An accelerator tensor is checked inside the op's one host read of the valid-token count:
    # the same function, fed a 0-d tensor, refuses a non-positive count.
    assert valid_token_index(t, -100, V, num_items=torch.tensor(3.0)).numel() == int((t != -100).sum())
    with pytest.raises(ValueError, match="num_items_in_batch must be a finite number > 0, got -1"):
        valid_token_index(t, -100, V, num_items=torch.tensor(-1.0))


# ----------------------------------------------------------------------------------------- impl="triton" on CPU


def test_triton_on_cpu_without_the_interpreter_says_what_to_do(monkeypatch) -> None:
    monkeypatch.setattr(_dispatch, "_INTERPRET_AT_IMPORT", False)
    hidden, weight, target = rows(6)
    h, t = hidden.reshape(-1, H), target.reshape(-1)
    message = r"impl='triton' got tensors on \['cpu'\].*TRITON_INTERPRET=1.*before triton.*impl='torch'"
    for call in (
        lambda: linear_logprobs(h, weight, t, impl="triton"),
        lambda: fused_linear_cross_entropy(h, weight, t, impl="triton"),
        lambda: fused_linear_cross_entropy(h, weight, t, impl="triton", strategy="recompute"),
        lambda: fused_linear_orpo_loss(hidden, weight, target, impl="triton"),
        lambda: rms_norm(h, torch.ones(H), impl="triton"),
    ):
        with pytest.raises(ValueError, match=message):
            call()
    # Switching the variable on after the import cannot build interpreter kernels: automatic dispatch
    # keeps the torch path instead of failing in Triton's driver.
    monkeypatch.setattr(_dispatch, "interpreter_enabled", lambda: True)
    assert _dispatch.use_triton(h, impl=None) is False


# ----------------------------------------------------------------------------------------- ORPO log-odds


def _trl_log_odds64(c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """TRL's formula in float64 (finite away from 0)."""
    c, r = c.double(), r.double()
    return (c - r) - (torch.log1p(-torch.exp(c)) - torch.log1p(-torch.exp(r)))


def test_log1mexp_is_finite_with_finite_gradients_up_to_zero() -> None:
    x = torch.tensor([-30.0, -2.0, -0.7, -0.69, -1e-3, -1e-5, LOG1MEXP_MAX, -1e-8, 0.0], requires_grad=True)
    y = log1mexp(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    below = x.detach() <= LOG1MEXP_MAX
    want = torch.log(-torch.expm1(x.detach().double()))
    assert rel_err(y[below], want[below]) < 1e-6
    assert torch.all(y[~below] == y[below][-1])  # clamped: the value at the clamp
    assert torch.all(x.grad[~below] == 0)


def test_orpo_objective_at_mean_logprob_near_zero_is_finite_and_matches_trl_below_the_clamp() -> None:
    chosen = torch.tensor([0.0, -1e-9, -1e-4, -0.5, -3.0], requires_grad=True)
    rejected = torch.tensor([-1.0, 0.0, -2.0, -1e-7, -0.25], requires_grad=True)
    loss, metrics = orpo_objective(chosen, rejected, torch.tensor(1.0), beta=0.3)
    loss.backward()
    assert math.isfinite(loss.item()) and all(torch.isfinite(v).all() for v in metrics.values())
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    # rows 2 and 4 lie below the clamp on both sides: TRL's value (float64)
    inside = [2, 4]
    want = torch.nn.functional.logsigmoid(_trl_log_odds64(chosen.detach(), rejected.detach()))[inside]
    c2 = chosen.detach()[inside].clone().requires_grad_()
    r2 = rejected.detach()[inside].clone().requires_grad_()
    got, _ = orpo_objective(c2, r2, torch.tensor(0.0), beta=1.0)
    assert got.item() == pytest.approx(-want.mean().item(), rel=1e-5)
    c64, r64 = leaf_copies(c2, r2)
    (-torch.nn.functional.logsigmoid(_trl_log_odds64(c64, r64)).mean()).backward()
    got.backward()
    assert rel_err(c2.grad, c64.grad) < 1e-4 and rel_err(r2.grad, r64.grad) < 1e-4


def test_fused_orpo_with_a_vocabulary_of_one_and_a_certain_completion_is_finite() -> None:
    hidden, weight, target = rows(7, vocab=1)
    loss, out = fused_linear_orpo_loss(hidden, weight, target, beta=0.5)
    loss.backward()
    assert math.isfinite(loss.item()) and all(torch.isfinite(v).all() for v in out.values())
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
    assert torch.all(out["chosen_logps"] == 0) and out["log_odds_chosen"].item() == 0.0
    # p -> 1 on a real vocabulary: a hidden state aligned with its target's row, scaled up
    hidden, weight, target = rows(8, scale=1.0)
    with torch.no_grad():
        hidden.copy_(weight[target.clamp(min=0)] * 400.0)
    loss, out = fused_linear_orpo_loss(hidden, weight, target, beta=0.5)
    loss.backward()
    assert out["chosen_logps"].max().item() > -1e-6  # at the clamp: TRL's form is NaN here
    assert math.isfinite(loss.item()) and torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()


# ----------------------------------------------------------------------------------------- no_grad


def test_default_cross_entropy_does_no_gradient_work_when_nothing_needs_it(monkeypatch) -> None:
    import importlib

    module = importlib.import_module("liger_align.kernels.head.fused_linear_cross_entropy")
    passes = importlib.import_module("liger_align.kernels.head._row_softmax").RowPasses
    calls = []
    real_grad, real_chunks = passes.grad, module.TokenChunkGrads
    monkeypatch.setattr(passes, "grad", lambda *a, **k: calls.append("row_grad") or real_grad(*a, **k))
    monkeypatch.setattr(module, "TokenChunkGrads", lambda *a, **k: calls.append("buffers") or real_chunks(*a, **k))
    hidden, weight, target = rows(9)
    h, t = hidden.reshape(-1, H), target.reshape(-1)
    with_grad = fused_linear_cross_entropy(h, weight, t)
    assert "row_grad" in calls
    for strategy in ("auto", "grad_in_forward"):
        calls.clear()
        with torch.no_grad():
            value = fused_linear_cross_entropy(h, weight, t, strategy=strategy)
        assert "row_grad" not in calls, strategy
        assert torch.allclose(value, with_grad.detach(), rtol=1e-6)
    calls.clear()
    value = fused_linear_cross_entropy(h.detach(), weight.detach(), t)
    assert calls == [] and not value.requires_grad


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["grad_in_forward", "recompute"])
def test_cuda_num_items_is_checked_in_the_ops_one_host_read(strategy) -> None:
    """A CUDA ``num_items_in_batch`` adds no host synchronisation (its check rides on the valid-token count),
    and a non-positive one is still refused."""
    import warnings

    hidden, weight, target = rows(10)
    h, w, t = hidden.detach().reshape(-1, H).cuda(), weight.detach().cuda(), target.reshape(-1).cuda()
    h.requires_grad_()
    w.requires_grad_()

    def syncs(**kwargs) -> int:
        fused_linear_cross_entropy(h, w, t, strategy=strategy, **kwargs)  # warm-up
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                loss = fused_linear_cross_entropy(h, w, t, strategy=strategy, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert torch.isfinite(loss)
        # only the syncs themselves: the first set_sync_debug_mode of a process also warns that the mode
        # "does not yet detect all synchronizing operations", which is no synchronisation
        return sum(str(c.message).startswith("called a synchronizing CUDA operation") for c in caught)

    items = torch.tensor(40, device="cuda")
    assert syncs(num_items_in_batch=items) == syncs()
    with pytest.raises(ValueError, match="num_items_in_batch must be a finite number > 0, got 0"):
        fused_linear_cross_entropy(h, w, t, strategy=strategy, num_items_in_batch=torch.zeros((), device="cuda"))


def test_reference_dtype_mismatch_names_the_reference_arguments() -> None:
    """A bf16 ``ref_hidden`` with an fp32 ``ref_weight`` is refused naming those two, not the policy's."""
    from liger_align.losses import LigerFusedLinearDPOLoss

    torch.manual_seed(0)
    hidden = torch.randn(4, 7, 16, requires_grad=True)
    weight = torch.randn(37, 16, requires_grad=True)
    target = torch.randint(0, 37, (4, 7))
    target[:, :2] = -100
    loss_fn = LigerFusedLinearDPOLoss(beta=0.1)
    with pytest.raises(TypeError, match=r"ref_hidden \(torch.bfloat16\) and ref_weight \(torch.float32\)"):
        loss_fn(weight, hidden, target, ref_hidden=hidden.detach().bfloat16(), ref_weight=weight.detach())
    from liger_align.losses import LigerFusedLinearORPOLoss

    with pytest.raises(TypeError, match=r"^hidden \(torch.bfloat16\) and (lin_)?weight \(torch.float32\)"):
        LigerFusedLinearORPOLoss()(weight, hidden.detach().bfloat16(), target)
