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

from .._tokens import next_token_targets
from ..losses import LigerFusedLinearCPOLoss
from ._mixin import LigerTrainerMixin, position_logit_means, with_flag_signature


@with_flag_signature
class LigerCPOTrainer(LigerTrainerMixin, CPOTrainer):
    """Drop-in for ``trl.experimental.cpo.CPOTrainer`` (same arguments, config and metrics); SimPO is
    ``CPOConfig(loss_type="simpo", cpo_alpha=0.0)``.

    Extra keyword ``use_liger_kernel_patches`` (default True): apply liger-align's model patches.
    """

    def __init__(self, *args: Any, use_liger_kernel_patches: bool = True, **kwargs: Any) -> None:
        bound = self._liger_check_inputs(CPOTrainer, args, kwargs, paired=True)
        self._liger_pre_init(use_liger_kernel_patches, bound.get("model"))
        super().__init__(*args, **kwargs)
        self._liger_post_init(self.model)
        self.liger_loss = LigerFusedLinearCPOLoss(
            beta=self.beta, loss_type=self.loss_type, cpo_alpha=self.cpo_alpha, label_smoothing=self.label_smoothing,
            simpo_gamma=getattr(self, "simpo_gamma", 0.5), alpha=self.alpha,
        )

    def get_batch_loss_metrics(
        self, model: Any, batch: dict[str, Any], train_eval: Literal["train", "eval"] = "train"
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """CPO-family loss and TRL's metrics for one batch, through the fused loss."""
        if self.is_encoder_decoder:
            return super().get_batch_loss_metrics(model, batch, train_eval)
        concat = self.concatenated_inputs(
            batch, is_encoder_decoder=False, padding_value=self.pad_token_id, device=self.accelerator.device
        )
        input_ids, attention_mask = concat["concatenated_input_ids"], concat["concatenated_attention_mask"]
        half = batch["chosen_labels"].shape[0]
        target = next_token_targets(concat["concatenated_labels"])
        loss_fn = self.liger_loss

        def head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
            loss, out = loss_fn(weight, hidden, target, bias)
            means = position_logit_means(hidden, weight, bias)
            return {"loss": loss, **out, "logits_chosen": means[:half].mean(), "logits_rejected": means[half:].mean()}

        out, aux_loss = self._liger_head_forward(model, input_ids, attention_mask, head)
        loss = out["loss"] if aux_loss is None else out["loss"] + aux_loss
        # The rewards are the loss's own (beta * logps, or beta * AlphaPO's r): TRL's cpo_loss formula
        # (tests/test_trainers_parity.py checks that they agree).
        metrics = self._liger_metrics(
            train_eval, out["chosen_rewards"], out["rejected_rewards"], out["chosen_logps"], out["rejected_logps"],
            out["logits_chosen"], out["logits_rejected"], {"nll_loss": out["nll_loss"]},
        )
        return loss, metrics
