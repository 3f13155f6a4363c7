"""Functional twins of the loss modules: ``loss, out = fused_linear_<x>_loss(lin_weight, hidden, target, ...)``.

Each is the function its ``LigerFusedLinear<X>Loss`` module calls; the cross-entropy is the kernel's.
"""

from __future__ import annotations

from ..kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
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
