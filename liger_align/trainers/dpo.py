"""``LigerDPOTrainer``: TRL's ``DPOTrainer`` with the policy and reference log-probs from liger-align's base.

TRL 1.16's DPO trainer reads per-token log-probs from ``model(..., labels=labels, fused_lm_head=True)``
(for the policy, the reference and the precomputed reference). ``LigerDPOTrainer`` installs
liger-align's fused forward in place of TRL's (see :func:`._trl_protocol.add_liger_fused_lm_head`), so every
loss type, option (``ld_alpha``, ``f_divergence_type``, ``use_weighting``, RPO's ``sft`` term),
metric and evaluation path is TRL's own, and no ``[tokens, vocab]`` logits are built.
"""

from __future__ import annotations

from typing import Any

from trl import DPOTrainer

from ._mixin import LigerTrainerMixin, with_flag_signature


@with_flag_signature
class LigerDPOTrainer(LigerTrainerMixin, DPOTrainer):
    """Drop-in for ``trl.DPOTrainer`` (same arguments, config and metrics).

    Extra keyword ``use_liger_kernel_patches`` (default True): apply liger-align's model patches to
    the policy and the reference model when the architecture is supported.
    """

    def __init__(self, *args: Any, use_liger_kernel_patches: bool = True, **kwargs: Any) -> None:
        self._liger_init(DPOTrainer, args, kwargs, use_liger_kernel_patches, paired=True, fused_protocol=True)
