"""``LigerKTOTrainer``: TRL's ``KTOTrainer`` with the policy, reference and KL log-probs from liger-align's base.

Like :mod:`.dpo`: TRL's KTO trainer reads per-token log-probs from
``model(..., labels=labels, fused_lm_head=True)``; liger-align's fused forward answers those calls, so
the loss types (``kto``, ``apo_zero_unpaired``), weights, KL estimate and metrics are TRL's own, for
any batch composition, and no ``[tokens, vocab]`` logits are built.
"""

from __future__ import annotations

from typing import Any

from trl import KTOTrainer

from ._mixin import LigerTrainerMixin, with_flag_signature


@with_flag_signature
class LigerKTOTrainer(LigerTrainerMixin, KTOTrainer):
    """Drop-in for ``trl.KTOTrainer`` (same arguments, config, metrics).

    Extra keyword ``use_liger_kernel_patches`` (default True): apply liger-align's model patches to
    the policy and the reference model when the architecture is supported.
    """

    def __init__(self, *args: Any, use_liger_kernel_patches: bool = True, **kwargs: Any) -> None:
        self._liger_init(KTOTrainer, args, kwargs, use_liger_kernel_patches, paired=False, fused_protocol=True)
