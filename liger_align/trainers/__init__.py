"""TRL trainers whose preference losses run through liger-align's fused kernels (no ``[tokens, vocab]`` logits).

``LigerORPOTrainer``, ``LigerCPOTrainer`` (SimPO is ``loss_type="simpo"``), ``LigerDPOTrainer`` and
``LigerKTOTrainer`` take the same arguments and config classes as TRL's trainers, plus
``use_liger_kernel_patches`` (default True). ``MedusaTrainer`` (an HF ``Trainer``, with
:class:`MedusaTrainingArguments`) trains Medusa heads, stages 1 and 2, on the fused multi-head loss.
Importing this package checks the TRL and transformers versions (see :mod:`._versions`).
"""

from ._versions import check_supported_versions

check_supported_versions()

from .cpo import LigerCPOTrainer  # noqa: E402
from .dpo import LigerDPOTrainer  # noqa: E402
from .kto import LigerKTOTrainer  # noqa: E402
from .medusa import MedusaTrainer, MedusaTrainingArguments  # noqa: E402
from .orpo import LigerORPOTrainer  # noqa: E402

__all__ = [
    "LigerCPOTrainer", "LigerDPOTrainer", "LigerKTOTrainer", "LigerORPOTrainer", "MedusaTrainer",
    "MedusaTrainingArguments",
]
