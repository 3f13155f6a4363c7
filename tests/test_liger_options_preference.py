"""Liger-Kernel's preference-loss options (issue 13): ``average_log_prob`` and ORPO's ``compute_nll_loss``.

``average_log_prob`` for every DPO loss type, CPO/SimPO and KTO (policy, reference and KL rows), ORPO
without its NLL term: values and gradients (hidden, weight, bias) against a float64 reference written
here from the formulas on materialised logits, with masked tokens and an all-masked row; torch path
and Triton (the interpreter on CPU); module == functional; non-bool flags refused by name.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _preference_reference import close, leaf_copies, make_rows, rel_err, skip_unless_path, tol

from liger_align.losses import (
    DPO_LOSS_TYPES,
    LigerFusedLinearCPOLoss,
    LigerFusedLinearDPOLoss,
    LigerFusedLinearKTOLoss,
    LigerFusedLinearORPOLoss,
    LigerFusedLinearSimPOLoss,
)
from liger_align.losses.functional import (
    fused_linear_cpo_loss,
    fused_linear_dpo_loss,
    fused_linear_kto_loss,
    fused_linear_orpo_loss,
    fused_linear_simpo_loss,
)

IGNORE = -100
B, T, H, V = 2, 37, 29, 1003  # B pairs: rows 0..B-1 chosen, B..2B-1 rejected; row 1 is all-masked
SMALL = dict(pairs=2, length=13, vocab=131)  # the Triton interpreter's cases
MASKED_ROW = 1
# loss types with the label_smoothing they require or use
SMOOTHING = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.1, "aot_unpaired": 0.05}


# ---------------------------------------------------------------- the float64 reference
def token_logps(hidden, weight, bias, target):
    """Float64 ``(R, T)`` log-probs of ``target`` (0 where ignored): plain log_softmax of materialised logits."""
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(target != IGNORE, logp, torch.zeros_like(logp))


def seq(hidden, weight, bias, target, average):
    """Float64 per-row log-prob: the sum over valid tokens, or their mean (0 for an all-masked row)."""
    n = (target != IGNORE).sum(1).double()
    sums = token_logps(hidden, weight, bias, target).sum(1)
    return (sums / n.clamp(min=1) if average else sums), n


def ref_dpo_one(name, c, r, rc, rr, n_c, n_r, *, beta, ls, average, tau=0.05, f=lambda x: x, nll):
    """One DPO loss type's mean over pairs, from the formulas (TRL 1.16 / the papers)."""
    cr, rrat = c - rc, r - rr
    sc, sr = f(cr), f(rrat)
    delta = sc - sr
    z = beta * delta
    ls_ = F.logsigmoid
    if name in ("ipo", "sigmoid_norm"):
        d = delta if average else sc / n_c.clamp(min=1) - sr / n_r.clamp(min=1)
        per = (d - 1 / (2 * beta)) ** 2 if name == "ipo" else -ls_(beta * d)
    elif name == "sigmoid":
        per = -ls_(z)
    elif name == "hinge":
        per = torch.relu(1 - z)
    elif name == "exo_pair":
        per = torch.sigmoid(z) * (ls_(z) - math.log(1 - ls)) + torch.sigmoid(-z) * (ls_(-z) - math.log(ls))
    elif name == "nca_pair":
        per = -ls_(beta * cr) - 0.5 * ls_(-beta * cr) - 0.5 * ls_(-beta * rrat)
    elif name == "robust":
        per = (-(1 - ls) * ls_(z) + ls * ls_(-z)) / (1 - 2 * ls)
    elif name == "bco_pair":
        per = -ls_(beta * cr) - ls_(-beta * rrat)
    elif name == "sppo_hard":
        per = (cr - 0.5 / beta) ** 2 + (rrat + 0.5 / beta) ** 2
    elif name in ("aot", "aot_unpaired"):
        d = (c - r).sort().values - (rc - rr).sort().values if name == "aot" else cr.sort().values - rrat.sort().values
        per = -ls_(beta * d) * (1 - ls) - ls_(-beta * d) * ls
    elif name == "apo_zero":
        per = 1 - torch.sigmoid(beta * cr) + torch.sigmoid(beta * rrat)
    elif name == "apo_down":
        per = torch.sigmoid(beta * cr) + 1 - torch.sigmoid(beta * (cr - rrat))
    elif name == "discopop":
        mix = torch.sigmoid(z / tau)
        per = -ls_(z) * (1 - mix) + torch.exp(-z) * mix
    elif name == "sft":
        return nll  # the chosen tokens' mean NLL, whatever average_log_prob is
    else:
        raise AssertionError(name)
    return per.mean()


# ---------------------------------------------------------------- shared plumbing
def inputs(dtype=torch.float32, *, pairs=B, length=T, vocab=V, seed=0, device="cpu"):
    hidden, weight, bias, target = make_rows(
        2 * pairs, length, H, vocab, dtype, bias=True, seed=seed, device=device, masked_rows=(MASKED_ROW,)
    )
    return hidden, weight, bias, target


def ref_head(*, pairs=B, length=T, vocab=V, seed=100, scale=1.0, rows=None):
    """A frozen reference head and hidden states ``(rows, length, H)`` (no gradient)."""
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * pairs if rows is None else rows
    hidden = torch.randn(rows, length, H, generator=gen) * scale
    weight = torch.randn(vocab, H, generator=gen) / H**0.5
    return hidden, weight


def check_grads(loss, ref_loss, leaves, ref_leaves, dtype):
    got = torch.autograd.grad(loss, leaves)
    want = torch.autograd.grad(ref_loss, ref_leaves)
    for g, w, t in zip(got, want, leaves):
        assert g.shape == t.shape and torch.isfinite(g).all()
        assert rel_err(g, w) < tol(dtype), (tuple(t.shape), rel_err(g, w))
    return got


def assert_masked_row_has_no_grad(grad_hidden):
    assert torch.count_nonzero(grad_hidden[MASKED_ROW]) == 0 and torch.count_nonzero(grad_hidden) > 0


# ---------------------------------------------------------------- DPO
def dpo_case(loss_type, average, *, impl="torch", f_divergence_type="reverse_kl", size=None, precomputed=False):
    size = size or dict(pairs=B, length=T, vocab=V)
    pairs = size["pairs"]
    hidden, weight, bias, target = inputs(**size, seed=1)
    ref_h, ref_w = ref_head(**size)
    h64, w64, b64 = leaf_copies(hidden, weight, bias)
    beta, ls = 0.1, SMOOTHING.get(loss_type if isinstance(loss_type, str) else "", 0.0)
    with torch.no_grad():
        ref_logps, _ = seq(ref_h, ref_w, None, target, average)
    config = dict(beta=beta, loss_type=loss_type, label_smoothing=ls, f_divergence_type=f_divergence_type)
    if precomputed:
        reference = dict(ref_chosen_logps=ref_logps[:pairs].float(), ref_rejected_logps=ref_logps[pairs:].float())
    else:
        reference = dict(ref_hidden=ref_h, ref_weight=ref_w)
    loss, out = fused_linear_dpo_loss(
        hidden, weight, target, bias, **reference, **config, average_log_prob=average, impl=impl, chunk_bytes=None,
    )
    logps, n = seq(h64, w64, b64, target, average)
    sums, _ = seq(h64, w64, b64, target, False)
    nll = -sums[:pairs].sum() / n[:pairs].sum()
    f = {"reverse_kl": lambda x: x, "js_divergence": lambda x: math.log(2) + F.logsigmoid(x)}[f_divergence_type]
    names = [loss_type] if isinstance(loss_type, str) else loss_type
    ref_loss = sum(
        ref_dpo_one(
            name, logps[:pairs], logps[pairs:], ref_logps[:pairs], ref_logps[pairs:], n[:pairs], n[pairs:],
            beta=beta, ls=ls, average=average, f=f, nll=nll,
        )
        for name in names
    )
    assert loss.dtype == torch.float32 and loss.shape == () and torch.isfinite(loss)
    assert close(loss, ref_loss, torch.float32, atol=1e-5), (float(loss), float(ref_loss))
    assert close(out["chosen_logps"], logps[:pairs], torch.float32)
    assert close(out["rejected_logps"], logps[pairs:], torch.float32)
    assert close(out["ref_chosen_logps"], ref_logps[:pairs], torch.float32)
    assert close(out["chosen_rewards"], beta * (logps[:pairs] - ref_logps[:pairs]), torch.float32)
    grads = check_grads(loss, ref_loss, [hidden, weight, bias], [h64, w64, b64], torch.float32)
    assert_masked_row_has_no_grad(grads[0])
    return loss


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_average_log_prob_every_loss_type(loss_type, average):
    dpo_case(loss_type, average)


@pytest.mark.parametrize("loss_type", ["sigmoid_norm", "ipo"])
def test_dpo_normalised_types_do_not_divide_twice(loss_type):
    """ipo / sigmoid_norm already read averages: average_log_prob=True gives the same loss (reverse_kl)."""
    assert close(dpo_case(loss_type, True), dpo_case(loss_type, False), torch.float32)


@pytest.mark.parametrize("average", [False, True])
def test_dpo_average_under_f_divergence_and_precomputed_reference(average):
    """With an f-divergence, the average is taken before f; a precomputed reference is used as given."""
    dpo_case("sigmoid_norm", average, f_divergence_type="js_divergence")
    dpo_case(["sigmoid", "sft"], average, precomputed=True)


# ---------------------------------------------------------------- CPO / SimPO
def cpo_reference(logps, nll, *, pairs, loss_type, beta, cpo_alpha, ls, gamma, alpha):
    c, r = logps[:pairs], logps[pairs:]
    if alpha:
        c, r = (1 - torch.exp(-alpha * c)) / alpha, (1 - torch.exp(-alpha * r)) / alpha
    u = c - r
    if loss_type == "simpo":
        u = u - gamma / beta
    if loss_type in ("sigmoid", "simpo"):
        per = -F.logsigmoid(beta * u) * (1 - ls) - F.logsigmoid(-beta * u) * ls
    elif loss_type == "hinge":
        per = torch.relu(1 - beta * u)
    else:
        per = (u - 1 / (2 * beta)) ** 2
    return per.mean() + cpo_alpha * nll, beta * c


CPO_CASES = {  # name: (config, averages by TRL's convention)
    "sigmoid": (dict(loss_type="sigmoid", label_smoothing=0.1), False),
    "hinge": (dict(loss_type="hinge"), False),
    "ipo": (dict(loss_type="ipo"), True),
    "simpo": (dict(loss_type="simpo", cpo_alpha=0.5, label_smoothing=0.1), True),
    "alphapo": (dict(loss_type="alphapo", alpha=0.005), True),
}


def cpo_case(name, average, *, impl="torch", size=None):
    size = size or dict(pairs=B, length=T, vocab=V)
    pairs = size["pairs"]
    config, default_average = CPO_CASES[name]
    hidden, weight, bias, target = inputs(**size, seed=2)
    h64, w64, b64 = leaf_copies(hidden, weight, bias)
    loss, out = fused_linear_cpo_loss(
        hidden, weight, target, bias, beta=0.1, **config, average_log_prob=average, impl=impl, chunk_bytes=None
    )
    use_average = default_average if average is None else average
    logps, n = seq(h64, w64, b64, target, use_average)
    sums, _ = seq(h64, w64, b64, target, False)
    nll = -sums[:pairs].sum() / n[:pairs].sum()
    ref_loss, rewards = cpo_reference(
        logps, nll, pairs=pairs, loss_type="simpo" if name == "alphapo" else config["loss_type"], beta=0.1,
        cpo_alpha=0.0 if name == "alphapo" else config.get("cpo_alpha", 1.0), ls=config.get("label_smoothing", 0.0),
        gamma=0.5, alpha=config.get("alpha", 0.0),
    )
    assert torch.isfinite(loss) and close(loss, ref_loss, torch.float32, atol=1e-5), (float(loss), float(ref_loss))
    assert close(out["chosen_logps"], logps[:pairs], torch.float32)
    assert close(out["chosen_rewards"], rewards, torch.float32)
    grads = check_grads(loss, ref_loss, [hidden, weight, bias], [h64, w64, b64], torch.float32)
    assert_masked_row_has_no_grad(grads[0])


@pytest.mark.parametrize("average", [None, True, False])
@pytest.mark.parametrize("name", list(CPO_CASES))
def test_cpo_average_log_prob(name, average):
    cpo_case(name, average)


@pytest.mark.parametrize("average", [True, False])
def test_simpo_average_log_prob(average):
    """SimPO's default averages (True); False sums. Functional and module agree."""
    hidden, weight, bias, target = inputs(seed=3)
    h64, w64, b64 = leaf_copies(hidden, weight, bias)
    beta, gamma = (2.0, 0.5) if average else (0.05, 0.5)
    loss, out = fused_linear_simpo_loss(
        hidden, weight, target, bias, beta=beta, gamma=gamma, average_log_prob=average, impl="torch"
    )
    module_loss, _ = LigerFusedLinearSimPOLoss(beta=beta, gamma=gamma, average_log_prob=average, impl="torch")(
        weight, hidden, target, bias
    )
    assert torch.equal(loss, module_loss)
    if average:  # the default is the averaged form
        default_loss, _ = fused_linear_simpo_loss(hidden, weight, target, bias, beta=beta, gamma=gamma, impl="torch")
        assert torch.equal(loss, default_loss)
    logps, _ = seq(h64, w64, b64, target, average)
    ref_loss, _ = cpo_reference(
        logps, 0.0, pairs=B, loss_type="simpo", beta=beta, cpo_alpha=0.0, ls=0.0, gamma=gamma, alpha=0.0
    )
    assert close(loss, ref_loss, torch.float32) and close(out["rejected_logps"], logps[B:], torch.float32)
    grads = check_grads(loss, ref_loss, [hidden, weight, bias], [h64, w64, b64], torch.float32)
    assert_masked_row_has_no_grad(grads[0])


# ---------------------------------------------------------------- KTO
def kto_case(average, *, impl="torch", size=None, module=False):
    size = size or dict(pairs=B, length=T, vocab=V)
    pairs, length, vocab = size["pairs"], size["length"], size["vocab"]
    rows = 2 * pairs
    hidden, weight, bias, target = inputs(**size, seed=4)
    labels = torch.tensor([True, False] * pairs)
    ref_h, ref_w = ref_head(**size, seed=101)
    # KL rows: mismatched completions; a reference with sharper logits makes the KL estimate positive
    kl_hidden, _, _, kl_target = make_rows(rows, length, H, vocab, torch.float32, bias=False, seed=5)
    kl_hidden = kl_hidden.detach()
    ref_kl_h, _ = ref_head(**size, seed=102, scale=1.5)
    h64, w64, b64 = leaf_copies(hidden, weight, bias)
    beta, dw, uw = 0.1, 1.3, 0.7
    config = dict(beta=beta, desirable_weight=dw, undesirable_weight=uw, average_log_prob=average, impl=impl)
    extra = dict(ref_hidden=ref_h, ref_weight=ref_w, kl_hidden=kl_hidden, kl_target=kl_target, ref_kl_hidden=ref_kl_h)
    if module:
        loss, out = LigerFusedLinearKTOLoss(**config)(weight, hidden, target, bias, preference_labels=labels, **extra)
    else:
        loss, out = fused_linear_kto_loss(hidden, weight, target, bias, preference_labels=labels, **extra, **config)
    logps, _ = seq(h64, w64, b64, target, average)
    with torch.no_grad():
        ref_logps, _ = seq(ref_h, ref_w, None, target, average)
        kl_logps, _ = seq(kl_hidden, w64, b64, kl_target, average)
        ref_kl, _ = seq(ref_kl_h, ref_w, None, kl_target, average)
        kl = (kl_logps - ref_kl).mean()
    assert kl > 0  # else the clamp at 0 would hide how the KL rows are formed
    rho = logps - ref_logps
    per = torch.where(labels, dw * (1 - torch.sigmoid(beta * (rho - kl))), uw * (1 - torch.sigmoid(beta * (kl - rho))))
    ref_loss = per.mean()
    assert torch.isfinite(loss) and close(loss, ref_loss, torch.float32), (float(loss), float(ref_loss))
    assert close(out["kl"], kl, torch.float32) and close(out["logps"], logps, torch.float32)
    assert close(out["rewards"], beta * rho, torch.float32)
    grads = check_grads(loss, ref_loss, [hidden, weight, bias], [h64, w64, b64], torch.float32)
    assert_masked_row_has_no_grad(grads[0])
    return loss


@pytest.mark.parametrize("average", [False, True])
def test_kto_average_log_prob(average):
    assert torch.equal(kto_case(average), kto_case(average, module=True))


def test_kto_precomputed_kl_clamped_at_zero():
    """A precomputed negative ``kl`` acts as 0 (TRL's clamp; Liger-Kernel would use it as given)."""
    hidden, weight, bias, target = inputs(seed=6)
    labels = torch.tensor([True, False, False, True])
    common = dict(reference_free=True, average_log_prob=True, impl="torch")
    neg, out = fused_linear_kto_loss(hidden, weight, target, bias, preference_labels=labels, kl=-0.5, **common)
    zero, _ = fused_linear_kto_loss(hidden, weight, target, bias, preference_labels=labels, kl=0.0, **common)
    pos, _ = fused_linear_kto_loss(hidden, weight, target, bias, preference_labels=labels, kl=0.5, **common)
    assert torch.equal(neg, zero) and not torch.equal(pos, zero) and float(out["kl"]) == 0.0


# ---------------------------------------------------------------- ORPO
def orpo_case(compute_nll_loss, *, impl="torch", size=None, with_nll_target=False, module=False):
    size = size or dict(pairs=B, length=T, vocab=V)
    pairs = size["pairs"]
    hidden, weight, bias, target = inputs(**size, seed=7)
    nll_target = None
    if with_nll_target:  # prompt tokens count in the NLL too (TRL's layout), the all-masked row stays masked
        gen = torch.Generator().manual_seed(8)
        chosen = target[:pairs]
        nll_target = torch.where(chosen == IGNORE, torch.randint(0, size["vocab"], chosen.shape, generator=gen), chosen)
        nll_target[MASKED_ROW] = IGNORE
    h64, w64, b64 = leaf_copies(hidden, weight, bias)
    beta = 0.2
    if module:
        loss, out = LigerFusedLinearORPOLoss(beta=beta, compute_nll_loss=compute_nll_loss, impl=impl)(
            weight, hidden, target, bias, nll_target=nll_target
        )
    else:
        loss, out = fused_linear_orpo_loss(
            hidden, weight, target, bias, nll_target=nll_target, beta=beta, compute_nll_loss=compute_nll_loss,
            impl=impl,
        )
    avg, n = seq(h64, w64, b64, target, True)
    c, r = avg[:pairs], avg[pairs:]
    ok = (n[:pairs] > 0) & (n[pairs:] > 0)
    c, r = torch.where(ok, c, -1.0), torch.where(ok, r, -1.0)
    log_odds = (c - r) - (torch.log1p(-torch.exp(c)) - torch.log1p(-torch.exp(r)))
    ratio = torch.where(ok, F.logsigmoid(log_odds), 0.0).mean()
    nll_rows = target[:pairs] if nll_target is None else nll_target
    nll = -token_logps(h64[:pairs], w64, b64, nll_rows).sum() / (nll_rows != IGNORE).sum()
    ref_loss = (nll if compute_nll_loss else 0.0) - beta * ratio
    assert torch.isfinite(loss) and close(loss, ref_loss, torch.float32), (float(loss), float(ref_loss))
    assert close(out["nll_loss"], nll, torch.float32) and close(out["log_odds_ratio"], ratio, torch.float32)
    grads = check_grads(loss, ref_loss, [hidden, weight, bias], [h64, w64, b64], torch.float32)
    assert_masked_row_has_no_grad(grads[0])
    return loss, out


@pytest.mark.parametrize("with_nll_target", [False, True])
def test_orpo_without_nll(with_nll_target):
    loss, out = orpo_case(False, with_nll_target=with_nll_target)
    module_loss, _ = orpo_case(False, with_nll_target=with_nll_target, module=True)
    with_nll, _ = orpo_case(True, with_nll_target=with_nll_target)
    assert torch.equal(loss, module_loss)
    assert close(with_nll - loss, out["nll_loss"], torch.float32)


# ---------------------------------------------------------------- the Triton path (interpreter on CPU)
@pytest.mark.interpreter
@pytest.mark.parametrize("average", [False, True])
def test_triton_path(average):
    skip_unless_path("cpu", "triton")
    dpo_case(["sigmoid", "ipo", "sft"], average, impl="triton", size=SMALL)
    cpo_case("simpo", not average, impl="triton", size=SMALL)
    kto_case(average, impl="triton", size=SMALL)
    orpo_case(average, impl="triton", size=SMALL)  # compute_nll_loss False, then True


# ---------------------------------------------------------------- module == functional, bad flags
def test_dpo_and_cpo_module_equals_functional():
    hidden, weight, bias, target = inputs(seed=9)
    ref_h, ref_w = ref_head()
    dpo_kwargs = dict(loss_type=["sigmoid_norm", "sft"], average_log_prob=True, impl="torch")
    a, out_a = LigerFusedLinearDPOLoss(**dpo_kwargs)(weight, hidden, target, bias, ref_hidden=ref_h, ref_weight=ref_w)
    b, out_b = fused_linear_dpo_loss(hidden, weight, target, bias, ref_hidden=ref_h, ref_weight=ref_w, **dpo_kwargs)
    assert torch.equal(a, b) and torch.equal(out_a["chosen_logps"], out_b["chosen_logps"])
    for average in (None, True, False):
        cpo_kwargs = dict(loss_type="hinge", average_log_prob=average, impl="torch")
        a, _ = LigerFusedLinearCPOLoss(**cpo_kwargs)(weight, hidden, target, bias)
        b, _ = fused_linear_cpo_loss(hidden, weight, target, bias, **cpo_kwargs)
        assert torch.equal(a, b)


BAD_FLAGS = [1, 0, "yes", 1.0, torch.tensor(True)]


@pytest.mark.parametrize("value", BAD_FLAGS, ids=repr)
def test_non_bool_flags_raise_naming_the_argument(value):
    hidden, weight, bias, target = inputs(pairs=1, length=7, vocab=11, seed=10)
    labels = torch.tensor([True, False])
    calls = [
        lambda: LigerFusedLinearDPOLoss(average_log_prob=value),
        lambda: fused_linear_dpo_loss(hidden, weight, target, bias, reference_free=True, average_log_prob=value),
        lambda: LigerFusedLinearCPOLoss(average_log_prob=value),
        lambda: fused_linear_cpo_loss(hidden, weight, target, bias, average_log_prob=value),
        lambda: LigerFusedLinearSimPOLoss(average_log_prob=value),
        lambda: fused_linear_simpo_loss(hidden, weight, target, bias, average_log_prob=value),
        lambda: LigerFusedLinearKTOLoss(average_log_prob=value),
        lambda: fused_linear_kto_loss(
            hidden, weight, target, bias, preference_labels=labels, reference_free=True, average_log_prob=value
        ),
    ]
    for call in calls:
        with pytest.raises(TypeError, match="average_log_prob must be a bool"):
            call()
    with pytest.raises(TypeError, match="compute_nll_loss must be a bool"):
        LigerFusedLinearORPOLoss(compute_nll_loss=value)
    with pytest.raises(TypeError, match="compute_nll_loss must be a bool"):
        fused_linear_orpo_loss(hidden, weight, target, bias, compute_nll_loss=value)


def test_none_means_the_convention_only_for_cpo():
    """None means "the loss type's TRL convention" for CPO; elsewhere it is refused like any non-bool."""
    with pytest.raises(TypeError, match="average_log_prob"):
        LigerFusedLinearDPOLoss(average_log_prob=None)
    with pytest.raises(TypeError, match="average_log_prob"):
        LigerFusedLinearSimPOLoss(average_log_prob=None)
    with pytest.raises(TypeError, match="average_log_prob"):
        LigerFusedLinearKTOLoss(average_log_prob=None)
    with pytest.raises(TypeError, match="compute_nll_loss"):
        LigerFusedLinearORPOLoss(compute_nll_loss=None)
    assert LigerFusedLinearCPOLoss(average_log_prob=None).config["average_log_prob"] is None
