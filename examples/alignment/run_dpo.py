"""Align a causal LM with DPO (Rafailov et al., 2023, "Direct Preference Optimization: Your Language
Model is Secretly a Reward Model") using ``liger_align``'s memory-efficient ``LigerDPOTrainer``.

With no arguments it runs the embedded default (tiny Llama 3.2, local tokenizer, shipped data) and
prints a summary; with arguments it does the real job, and every ``DPOConfig`` flag works::

    python examples/alignment/run_dpo.py
    accelerate launch --config_file examples/alignment/fsdp.yaml examples/alignment/run_dpo.py \\
        --model_name_or_path meta-llama/Llama-3.2-1B --dataset_name prefs.jsonl --beta 0.1 --bf16

The reference model is a frozen copy of the starting model. ``--no-use_liger`` runs TRL's
``DPOTrainer`` instead, for comparison.
"""

from __future__ import annotations

import common
from trl import DPOConfig, DPOTrainer

common.add_repo_to_path()
from liger_align.trainers import LigerDPOTrainer  # noqa: E402

DPO = common.Algorithm(
    name="dpo",
    config_class=DPOConfig,
    trl_trainer=DPOTrainer,
    liger_trainer=LigerDPOTrainer,
    reference_model=True,
    # DPO + an NLL term on the chosen answer (RPO): from random init pure DPO only pushes rejected answers down.
    embedded_defaults={
        "beta": 0.1,
        "learning_rate": 1e-3,
        "loss_type": ["sigmoid", "sft"],
        "loss_weights": [1.0, 1.0],
    },
)

if __name__ == "__main__":
    common.main(DPO)
