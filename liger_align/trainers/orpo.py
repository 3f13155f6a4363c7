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

from .._tokens import IGNORE_INDEX, next_token_targets
from ..losses import LigerFusedLinearORPOLoss
from ._mixin import LigerTrainerMixin, position_logit_means, with_flag_signature


@with_flag_signature
class LigerORPOTrainer(LigerTrainerMixin, ORPOTrainer):
    """Drop-in for ``trl.experimental.orpo.ORPOTrainer`` (same arguments, config and metrics).

    Extra keyword ``use_liger_kernel_patches`` (default True): apply liger-align's model patches
    (RMSNorm, RoPE, SwiGLU) when the architecture is supported.
    """

    def __init__(self, *args: Any, use_liger_kernel_patches: bool = True, **kwargs: Any) -> None:
        bound = self._liger_check_inputs(ORPOTrainer, args, kwargs, paired=True, beta_may_be_zero=True)
        self._liger_pre_init(use_liger_kernel_patches, bound.get("model"))
        super().__init__(*args, **kwargs)
        self._liger_post_init(self.model)
        self.liger_loss = LigerFusedLinearORPOLoss(beta=self.beta, ignore_index=IGNORE_INDEX)

    def get_batch_loss_metrics(
        self, model: Any, batch: dict[str, Any], train_eval: Literal["train", "eval"] = "train"
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """ORPO loss and TRL's metrics for one batch, through the fused loss."""
        if self.is_encoder_decoder:
            return super().get_batch_loss_metrics(model, batch, train_eval)
        concat = self.concatenated_inputs(
            batch, is_encoder_decoder=False, padding_value=self.padding_value, device=self.accelerator.device
        )
        input_ids, attention_mask = concat["concatenated_input_ids"], concat["concatenated_attention_mask"]
        half = batch["chosen_labels"].shape[0]
        target = next_token_targets(concat["concatenated_labels"])
        nll_target = next_token_targets(input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)[:half])
        loss_fn = self.liger_loss

        def head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
            loss, out = loss_fn(weight, hidden, target, bias, nll_target=nll_target)
            means = position_logit_means(hidden[:, :-1], weight, bias)
            return {"loss": loss, **out, "logits_chosen": means[:half].mean(), "logits_rejected": means[half:].mean()}

        out, aux_loss = self._liger_head_forward(model, input_ids, attention_mask, head)
        loss = out["loss"] if aux_loss is None else out["loss"] + aux_loss
        chosen_logps, rejected_logps = out["chosen_logps"], out["rejected_logps"]
        # The metrics of the loss itself: TRL's values, but finite for a fully truncated row and at p -> 1
        # (TRL's own odds_ratio_loss gives NaN there; see liger_align.losses.orpo).
        metrics = self._liger_metrics(
            train_eval, out["chosen_rewards"], out["rejected_rewards"], chosen_logps, rejected_logps,
            out["logits_chosen"], out["logits_rejected"],
            {"nll_loss": out["nll_loss"], "log_odds_ratio": out["log_odds_ratio"],
             "log_odds_chosen": out["log_odds_chosen"]},
        )
        return loss, metrics
