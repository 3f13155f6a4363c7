"""Align a causal LM with KTO (Ethayarajh et al., 2024, "KTO: Model Alignment as Prospect Theoretic
Optimization") using ``liger_align``'s memory-efficient ``LigerKTOTrainer``.

KTO learns from unpaired feedback: rows of ``prompt``, ``completion`` and a boolean ``label``
(desirable or not). Paired ``prompt``/``chosen``/``rejected`` data, such as the shipped default, is
unpaired first. With no arguments it runs the embedded default and prints a summary; with arguments
it does the real job, and every ``KTOConfig`` flag works::

    python examples/alignment/run_kto.py
    accelerate launch --config_file examples/alignment/fsdp.yaml examples/alignment/run_kto.py \\
        --model_name_or_path meta-llama/Llama-3.2-1B --dataset_name feedback.jsonl --beta 0.1 --bf16

``--no-use_liger`` runs TRL's ``KTOTrainer`` instead, for comparison.
"""

from __future__ import annotations

import common
from trl import KTOConfig, KTOTrainer

common.add_repo_to_path()
from liger_align.trainers import LigerKTOTrainer  # noqa: E402

KTO = common.Algorithm(
    name="kto",
    config_class=KTOConfig,
    trl_trainer=KTOTrainer,
    liger_trainer=LigerKTOTrainer,
    reference_model=True,
    paired=False,
    # lr 3e-4 for 24 epochs (3e-3 pushes everything down) and desirable_weight 4/3 (the KTO paper's upper bound).
    embedded_defaults={"beta": 0.5, "learning_rate": 3e-4, "num_train_epochs": 24, "desirable_weight": 1.33},
)

if __name__ == "__main__":
    common.main(KTO)
