"""Preference objectives on the lm_head output, without materialising the logits (see docs/ARCHITECTURE.md).

Each loss is a plain-torch objective on per-sequence log-probs (``orpo_objective``, ``dpo_objective``,
``cpo_objective``, ``kto_objective``), an ``nn.Module`` and a functional twin in :mod:`.functional`.
"""

from .cpo import CPO_LOSS_TYPES, LigerFusedLinearCPOLoss, LigerFusedLinearSimPOLoss, cpo_objective
from .cross_entropy import LigerFusedLinearCrossEntropyLoss
from .dpo import DPO_LOSS_TYPES, LigerFusedLinearDPOLoss, dpo_objective
from .functional import (
    fused_linear_cpo_loss,
    fused_linear_cross_entropy,
    fused_linear_dpo_loss,
    fused_linear_kto_loss,
    fused_linear_orpo_loss,
    fused_linear_simpo_loss,
)
from .kto import KTO_LOSS_TYPES, LigerFusedLinearKTOLoss, kto_objective
from .medusa import LigerFusedLinearMedusaLoss, fused_linear_medusa_loss, medusa_loss_weights
from .orpo import LigerFusedLinearORPOLoss, orpo_objective

__all__ = [
    "CPO_LOSS_TYPES",
    "DPO_LOSS_TYPES",
    "KTO_LOSS_TYPES",
    "LigerFusedLinearCPOLoss",
    "LigerFusedLinearCrossEntropyLoss",
    "LigerFusedLinearDPOLoss",
    "LigerFusedLinearKTOLoss",
    "LigerFusedLinearMedusaLoss",
    "LigerFusedLinearORPOLoss",
    "LigerFusedLinearSimPOLoss",
    "cpo_objective",
    "dpo_objective",
    "fused_linear_cpo_loss",
    "fused_linear_cross_entropy",
    "fused_linear_dpo_loss",
    "fused_linear_kto_loss",
    "fused_linear_medusa_loss",
    "fused_linear_orpo_loss",
    "fused_linear_simpo_loss",
    "kto_objective",
    "medusa_loss_weights",
    "orpo_objective",
]
