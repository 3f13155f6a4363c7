"""Fused linear cross-entropy as an ``nn.Module``: ``CE(hidden @ lin_weight.T + bias, target)`` without logits."""

from __future__ import annotations

import torch

from .._checks import check_choice, check_flag, check_non_negative, check_real
from .._tokens import IGNORE_INDEX
from ..kernels import CrossEntropyOutput
from ..kernels.head.fused_linear_cross_entropy import REDUCTIONS, fused_linear_cross_entropy
from ._module import FusedLossModule


class LigerFusedLinearCrossEntropyLoss(FusedLossModule):
    """Cross-entropy of the lm_head output, matching ``F.cross_entropy`` on the materialised logits.

    ``loss_fn(lin_weight, hidden, target, bias=None, *, num_items_in_batch=None)`` with lin_weight
    ``(V, H)``, hidden ``(N, H)`` or ``(B, T, H)``, target ``(N,)`` or ``(B, T)`` already shifted, bias
    ``(V,)`` or None. Returns a 0-d loss (``reduction="mean"`` over valid tokens, or their weight sum
    with ``ce_weight``, or over ``num_items_in_batch`` when given; ``"sum"``), or per-token losses shaped
    like target (``"none"``); with ``return_z_loss``/``return_token_accuracy``/``return_predicted_tokens`` a
    :class:`~liger_align.kernels.CrossEntropyOutput`. The options, with Liger-Kernel's names:
    ``ce_weight`` (per-class weights ``(V,)``, a buffer: it follows ``.to(device)``), ``lse_square_scale``
    (z-loss), ``return_z_loss``, ``return_token_accuracy``, ``use_token_scaling`` (each token's loss times
    its detached target probability), ``return_predicted_tokens`` (argmax ids, -1 where ignored),
    ``label_smoothing``, ``softcap``; see
    :func:`liger_align.kernels.head.fused_linear_cross_entropy` for their exact semantics. The first seven
    arguments come in Liger-Kernel's order; the others are keyword-only.
    """

    def __init__(
        self,
        ce_weight: torch.Tensor | None = None,
        ignore_index: int = IGNORE_INDEX,
        lse_square_scale: float = 0.0,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        softcap: float | None = None,
        return_z_loss: bool = False,
        *,
        return_token_accuracy: bool = False,
        use_token_scaling: bool = False,
        return_predicted_tokens: bool = False,
        temperature: float = 1.0,
        logit_scale: float = 1.0,
        chunk_bytes: int | None = None,
        impl: str | None = None,
    ) -> None:
        check_choice("reduction", reduction, REDUCTIONS)
        label_smoothing = check_real("label_smoothing", label_smoothing, low=0.0, high=1.0)
        lse_square_scale = check_non_negative("lse_square_scale", lse_square_scale)
        check_flag("return_z_loss", return_z_loss)
        check_flag("return_token_accuracy", return_token_accuracy)
        check_flag("use_token_scaling", use_token_scaling)
        check_flag("return_predicted_tokens", return_predicted_tokens)
        if ce_weight is not None and (not isinstance(ce_weight, torch.Tensor) or ce_weight.dim() != 1):
            shape = tuple(ce_weight.shape) if isinstance(ce_weight, torch.Tensor) else type(ce_weight).__name__
            raise TypeError(f"ce_weight must be a 1-d tensor of shape (V,) or None, got {shape}")
        super().__init__(
            dict(
                reduction=reduction, label_smoothing=label_smoothing, lse_square_scale=lse_square_scale,
                return_z_loss=return_z_loss, return_token_accuracy=return_token_accuracy,
                use_token_scaling=use_token_scaling, return_predicted_tokens=return_predicted_tokens,
            ),
            ignore_index=ignore_index, temperature=temperature, softcap=softcap, logit_scale=logit_scale,
            chunk_bytes=chunk_bytes, impl=impl,
        )
        self.register_buffer("ce_weight", None if ce_weight is None else ce_weight.detach().clone())

    def forward(
        self,
        lin_weight: torch.Tensor,
        hidden: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> torch.Tensor | CrossEntropyOutput:
        return fused_linear_cross_entropy(
            hidden, lin_weight, target, bias, num_items_in_batch=num_items_in_batch, ce_weight=self.ce_weight,
            **self.config, **self.logit_kwargs,
        )

