"""The adapter for TRL's fused-LM-head protocol, answered with liger-align's fused base.

TRL's DPO and KTO trainers install ``trl.trainer.utils.add_fused_lm_head`` on the model and call it
with ``model(..., labels=labels, fused_lm_head=True)``, reading per-token log-probs (and metric
fields) from a ``FusedCausalLMOutput``. While TRL's ``__init__`` runs, :func:`liger_fused_lm_head_for`
swaps that installer for :func:`add_liger_fused_lm_head`, which installs liger-align's fused forward
(:mod:`._fused_forward`); :func:`trl_fused_output` computes TRL's fields from the hidden states with
:func:`~liger_align.kernels.linear_logprobs.linear_logprobs`, so TRL's own loss code runs over our
per-token log-probs and no ``[tokens, vocab]`` logits are built.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .._tokens import IGNORE_INDEX, next_token_targets
from ..kernels.linear_logprobs import linear_logprobs
from ..models.head_call import call_through_head, causal_lm, logit_options, text_config
from ._fused_forward import FusedForwardState, install_fused_forward

logger = logging.getLogger(__name__)

_TRL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_STATS = ("entropy", "is_top1", "log_sum_sq_probs")


def add_liger_fused_lm_head(
    model: nn.Module,
    temperature: float = 1.0,
    cast_lm_head_to_fp32: bool = False,
    outputs: tuple[str, ...] = ("log_probs",),
) -> None:
    """Drop-in for TRL's ``add_fused_lm_head``: the same call protocol and output fields, on liger-align's base.

    ``model(..., labels=labels, fused_lm_head=True)`` returns TRL's ``FusedCausalLMOutput`` with per-token
    ``log_probs`` ``(B, T-1)`` (differentiable), ``mean_logits``, ``entropy``, ``is_top1``,
    ``log_sum_sq_probs`` (those in ``outputs``; no gradient), ``label_mask``, ``loss`` and ``aux_loss``.
    """
    if cast_lm_head_to_fp32:
        logger.warning("cast_lm_head_to_fp32 is ignored: liger-align's base accumulates in fp32 already")
    install_fused_forward(causal_lm(model), outputs=tuple(outputs), temperature=temperature)


def trl_fused_output(
    lm: nn.Module, head: nn.Module, hidden: torch.Tensor, *, labels: torch.Tensor | None,
    shift_labels: torch.Tensor | None, num_items: Any, aux: torch.Tensor | None, state: FusedForwardState,
) -> Any:
    """TRL's ``FusedCausalLMOutput`` for ``hidden (B, T, H)`` and unshifted ``labels (B, T)`` (or ``shift_labels``)."""
    from trl.trainer.utils import FusedCausalLMOutput

    if shift_labels is None:
        if labels is None:
            raise ValueError("fused_lm_head=True needs labels (or shift_labels)")
        hidden, labels = hidden[:, :-1], next_token_targets(labels)[:, :-1]
    else:
        labels = shift_labels
    labels = labels.to(head.weight.device)
    mask = labels != IGNORE_INDEX
    wanted = state.outputs
    opts = dict(logit_options(lm), temperature=state.temperature)

    def fn(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
        flat_h, flat_t = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
        extra = [k for k in _STATS if k in wanted]
        res = linear_logprobs(
            flat_h, weight, flat_t, bias, ignore_index=IGNORE_INDEX, distribution_stats=bool(extra), **opts
        )
        out = {"log_probs": res.logps.view(labels.shape), "mean_logits": res.logit_mean.view(labels.shape)}
        out.update({k: getattr(res, k).view(labels.shape) for k in extra})
        return out

    per_token = call_through_head(head, hidden, fn)
    log_probs = per_token["log_probs"]
    loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items is None else num_items)
    if aux is not None:
        loss = loss + getattr(text_config(lm), "router_aux_loss_coef", 0.0) * aux
    return FusedCausalLMOutput(
        loss=loss,
        label_mask=mask,
        aux_loss=aux,
        **{k: (per_token.get(k) if k in wanted or k == "log_probs" else None) for k in _TRL_OUTPUTS},
    )


@contextlib.contextmanager
def swapped(module: Any, name: str, value: Any) -> Iterator[None]:
    """Temporarily replace ``module.name`` by ``value``."""
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


@contextlib.contextmanager
def liger_fused_lm_head_for(trainer_cls: type) -> Iterator[None]:
    """While TRL's ``__init__`` of ``trainer_cls`` runs, its ``add_fused_lm_head`` installs liger-align's instead.

    Swapping the installer is the narrowest change that routes every ``fused_lm_head=True`` call
    (policy, reference, precomputed reference) through our base.
    """
    modules = []
    for klass in trainer_cls.__mro__:
        module = sys.modules.get(klass.__module__)
        if module is not None and hasattr(module, "add_fused_lm_head") and module not in modules:
            modules.append(module)
    if not modules:
        raise RuntimeError(
            f"{trainer_cls.__name__}: this TRL version has no fused-LM-head protocol (add_fused_lm_head); "
            "liger_align.trainers needs TRL's DPO/KTO trainers that call the model with fused_lm_head=True"
        )
    with contextlib.ExitStack() as stack:
        for module in modules:
            stack.enter_context(swapped(module, "add_fused_lm_head", add_liger_fused_lm_head))
        yield
