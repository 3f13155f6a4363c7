"""TRL's fused-LM-head protocol answered with liger-align's fused base: :func:`trl_fused_output`.

TRL's DPO and KTO trainers call ``model(..., labels=labels, fused_lm_head=True)`` and read per-token
log-probs (and metric fields) from a ``FusedCausalLMOutput``. :func:`trl_fused_output` computes those
fields from the hidden states with :func:`~liger_align.kernels.head.linear_logprobs`, so TRL's own loss code
runs over our per-token log-probs and no ``[tokens, vocab]`` logits are built. The handler that calls it
is installed by :mod:`._head_forward`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._tokens import IGNORE_INDEX, next_token_targets
from ..kernels.head.linear_logprobs import linear_logprobs
from ..models.head_call import call_through_head, logit_options, router_aux_weight

_TRL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_STATS = ("entropy", "is_top1", "log_sum_sq_probs")


def trl_fused_output(
    lm: nn.Module, head: nn.Module, hidden: torch.Tensor, *, labels: torch.Tensor | None,
    shift_labels: torch.Tensor | None, num_items: Any, aux: torch.Tensor | None, outputs: tuple[str, ...],
    temperature: float,
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
    wanted = outputs
    opts = dict(logit_options(lm), temperature=temperature)

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
        loss = loss + router_aux_weight(lm) * aux
    return FusedCausalLMOutput(
        loss=loss,
        label_mask=mask,
        aux_loss=aux,
        **{k: (per_token.get(k) if k in wanted or k == "log_probs" else None) for k in _TRL_OUTPUTS},
    )
