"""``LigerCPOTrainer``: TRL's ``CPOTrainer`` (CPO, SimPO, AlphaPO, IPO, hinge) through :class:`LigerFusedLinearCPOLoss`.

Only ``get_batch_loss_metrics`` changes. As TRL's decoder-only path: log-probs over the completion
labels, averaged for ``ipo``/``simpo`` and summed otherwise; the NLL (weight ``cpo_alpha``) over the
chosen completion labels; ``logits/*`` means over every position, padding included.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch

with warnings.catch_warnings():
    # The TRL range liger_align supports is pinned and tested (._versions): TRL's notice that
    # trl.experimental may change concerns this package, not the user who imported a Liger trainer.
    warnings.filterwarnings("ignore", message="You are importing from 'trl.experimental'")
    from trl.experimental.cpo import CPOTrainer

from ..losses import LigerFusedLinearCPOLoss
from ._mixin import LigerTrainerMixin, with_flag_signature


@with_flag_signature
class LigerCPOTrainer(LigerTrainerMixin, CPOTrainer):
    """Drop-in for ``trl.experimental.cpo.CPOTrainer`` (same arguments, config and metrics); SimPO is
    ``CPOConfig(loss_type="simpo", cpo_alpha=0.0)``.

    Extra keyword ``use_liger_kernel_patches`` (default True): apply liger-align's model patches.
    """

    def __init__(self, *args: Any, use_liger_kernel_patches: bool = True, **kwargs: Any) -> None:
        self._liger_init(CPOTrainer, args, kwargs, use_liger_kernel_patches, paired=True)
        self.liger_loss = LigerFusedLinearCPOLoss(
            beta=self.beta, loss_type=self.loss_type, cpo_alpha=self.cpo_alpha, label_smoothing=self.label_smoothing,
            simpo_gamma=getattr(self, "simpo_gamma", 0.5), alpha=self.alpha,
        )

    def get_batch_loss_metrics(
        self, model: Any, batch: dict[str, Any], train_eval: Literal["train", "eval"] = "train"
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """CPO-family loss and TRL's metrics for one batch, through the fused loss (rewards: the loss's own)."""
        if self.is_encoder_decoder:
            return super().get_batch_loss_metrics(model, batch, train_eval)
        loss, out = self._liger_paired_forward(
            model, batch, padding_value=self.pad_token_id, nll_over_inputs=False, means_skip_last=False
        )
        return loss, self._liger_metrics(train_eval, out, ("nll_loss",))
