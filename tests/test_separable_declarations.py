"""Every loss configuration that declares itself separable over row groups is: its 3-product gradients
(formed chunk by chunk, several chunks) equal the recomputing path's on a random batch, for every DPO loss
type and f-divergence, CPO/SimPO/AlphaPO, ORPO and KTO. And the check can fail: a coupled DPO loss type
(``aot``) declared separable gives other gradients, which is why it is declared coupled."""

from __future__ import annotations

import pytest
import torch
from _reference import rel_err

from liger_align.losses import dpo as dpo_module
from liger_align.losses import (
    fused_linear_cpo_loss,
    fused_linear_dpo_loss,
    fused_linear_kto_loss,
    fused_linear_orpo_loss,
    fused_linear_simpo_loss,
)
from liger_align.losses._dpo_objectives import DPO_LOSS_TYPES, F_DIVERGENCES
from liger_align.losses.cpo import CPO_LOSS_TYPES

PAIRS, T, H, V = 3, 9, 16, 203
CHUNK = 2 * T * V * 4  # one pair's tokens at most: the 3-product path takes several chunks


def _batch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * PAIRS, T, H, generator=gen).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) / H**0.5).requires_grad_()
    target = torch.randint(0, V, (2 * PAIRS, T), generator=gen)
    target[:, :3] = -100  # prompts
    ref_hidden = torch.randn(2 * PAIRS, T, H, generator=gen)
    return hidden, weight, target, ref_hidden


def _grads(call, hidden, weight, strategy):
    loss, _ = call(strategy)
    return [loss.detach(), *torch.autograd.grad(loss, (hidden, weight))]


def _both_paths_agree(call, hidden, weight):
    fused = _grads(call, hidden, weight, "grad_in_forward")
    recomputed = _grads(call, hidden, weight, "recompute")
    return max(rel_err(a, b) for a, b in zip(fused, recomputed))


SEPARABLE_DPO = [t for t in DPO_LOSS_TYPES if t not in dpo_module._COUPLED_LOSS_TYPES]
CASES = (
    [("dpo", {"loss_type": t, **({"label_smoothing": 0.1} if t in ("exo_pair", "robust") else {})})
     for t in SEPARABLE_DPO]
    + [("dpo", {"loss_type": "sigmoid", "f_divergence_type": f}) for f in F_DIVERGENCES]
    + [("dpo", {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]})]
    + [("cpo", {"loss_type": t}) for t in CPO_LOSS_TYPES if t != "simpo"]
    + [("simpo", {}), ("orpo", {}), ("kto", {}), ("kto", {"loss_type": "apo_zero_unpaired"})]
)


def _call(name, config, hidden, weight, target, ref_hidden):
    common = dict(chunk_bytes=CHUNK, impl="torch")
    if name == "dpo":
        return lambda s: fused_linear_dpo_loss(hidden, weight, target, ref_hidden=ref_hidden, strategy=s, **config,
                                               **common)
    if name == "cpo":
        return lambda s: fused_linear_cpo_loss(hidden, weight, target, strategy=s, **config, **common)
    if name == "simpo":
        return lambda s: fused_linear_simpo_loss(hidden, weight, target, strategy=s, **config, **common)
    if name == "orpo":
        return lambda s: fused_linear_orpo_loss(hidden, weight, target, strategy=s, **config, **common)
    labels = torch.tensor([True, False] * PAIRS)
    return lambda s: fused_linear_kto_loss(hidden, weight, target, preference_labels=labels, ref_hidden=ref_hidden,
                                           kl=0.1, strategy=s, **config, **common)


@pytest.mark.parametrize("name,config", CASES, ids=[f"{n}-{c}" for n, c in CASES])
def test_declared_separable_means_same_gradients(name, config):
    hidden, weight, target, ref_hidden = _batch(seed=len(str(config)))
    assert _both_paths_agree(_call(name, config, hidden, weight, target, ref_hidden), hidden, weight) < 1e-5


def test_a_coupled_loss_declared_separable_would_be_caught(monkeypatch):
    hidden, weight, target, ref_hidden = _batch(seed=7)
    call = _call("dpo", {"loss_type": "aot"}, hidden, weight, target, ref_hidden)
    with pytest.raises(ValueError, match="separable"):
        call("grad_in_forward")
    monkeypatch.setattr(dpo_module, "_COUPLED_LOSS_TYPES", set())  # a wrong declaration
    assert _both_paths_agree(call, hidden, weight) > 1e-3
