"""Functional twins of the loss modules: ``loss, out = fused_linear_<x>_loss(hidden, lin_weight, target, ...)``.

Each is the function its ``LigerFusedLinear<X>Loss`` module calls. Every functional takes the hidden states
first, then the head's weight (``F.linear``'s order, like ``fused_linear_cross_entropy(hidden, weight, ...)``
and ``fused_linear_medusa_loss``); the modules keep Liger-Kernel's call order ``(lin_weight, hidden, ...)``.
"""

from __future__ import annotations

from ..kernels.head.fused_linear_cross_entropy import fused_linear_cross_entropy
from .cpo import fused_linear_cpo_loss, fused_linear_simpo_loss
from .dpo import fused_linear_dpo_loss
from .kto import fused_linear_kto_loss
from .orpo import fused_linear_orpo_loss

__all__ = [
    "fused_linear_cpo_loss",
    "fused_linear_cross_entropy",
    "fused_linear_dpo_loss",
    "fused_linear_kto_loss",
    "fused_linear_orpo_loss",
    "fused_linear_simpo_loss",
]
