"""``LigerORPOTrainer``: TRL's ``ORPOTrainer`` with the loss computed by :class:`LigerFusedLinearORPOLoss`.

Only ``get_batch_loss_metrics`` changes (training and ``prediction_step`` both go through it); the
``(2B, T, V)`` logits are never built. The config and data sets are checked before TRL tokenises
(see :mod:`._inputs`). The ``log_odds_*`` metrics come from the loss: TRL's values wherever TRL's
are finite, and finite where TRL logs NaN (a fully truncated row, a mean log-prob of 0). The batch
is mapped exactly as TRL's decoder-only path does: log-probs are averaged over the completion labels
(``concatenated_labels``, -100 on the prompt and padding), the NLL is the mean cross-entropy of the
chosen rows over prompt + completion (every attended token), and ``logits/*`` are means over every
position but the last, padding included.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch

with warnings.catch_warnings():
    # The TRL range liger_align supports is pinned and tested (._versions): TRL's notice that
    # trl.experimental may change concerns this package, not the user who imported a Liger trainer.
    warnings.filterwarnings("ignore", message="You are importing from 'trl.experimental'")
    from trl.experimental.orpo import ORPOTrainer

from .._tokens import IGNORE_INDEX
from ..losses import LigerFusedLinearORPOLoss
from ._mixin import LigerTrainerMixin, with_flag_signature


@with_flag_signature
class LigerORPOTrainer(LigerTrainerMixin, ORPOTrainer):
    """Drop-in for ``trl.experimental.orpo.ORPOTrainer`` (same arguments, config and metrics).

    Extra keyword ``use_liger_kernel_patches`` (default True): apply liger-align's model patches
    (RMSNorm, RoPE, SwiGLU) when the architecture is supported.
    """

    def __init__(self, *args: Any, use_liger_kernel_patches: bool = True, **kwargs: Any) -> None:
        self._liger_init(ORPOTrainer, args, kwargs, use_liger_kernel_patches, paired=True, beta_may_be_zero=True)
        self.liger_loss = LigerFusedLinearORPOLoss(beta=self.beta, ignore_index=IGNORE_INDEX)

    def get_batch_loss_metrics(
        self, model: Any, batch: dict[str, Any], train_eval: Literal["train", "eval"] = "train"
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """ORPO loss and TRL's metrics for one batch, through the fused loss."""
        if self.is_encoder_decoder:
            return super().get_batch_loss_metrics(model, batch, train_eval)
        loss, out = self._liger_paired_forward(
            model, batch, padding_value=self.padding_value, nll_over_inputs=True, means_skip_last=True
        )
        # The metrics of the loss itself: TRL's values, but finite for a fully truncated row and at p -> 1
        # (TRL's own odds_ratio_loss gives NaN there; see liger_align.losses.orpo).
        return loss, self._liger_metrics(train_eval, out, ("nll_loss", "log_odds_ratio", "log_odds_chosen"))
